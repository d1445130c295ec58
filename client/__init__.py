"""Python client for the moshi-ttt server's `WS /api/chat` (see `moshi_ttt.protocol`).

`client.chat.run_chat` streams 80 ms frames to the server (Ogg/Opus or raw float32 PCM), paced in
real time or faster, never further ahead of the server's answers than a set bound (so a fast
client cannot trip the server's input queue limit), and collects the audio and text the model
sends back, with per-frame round-trip times. `client.audio` reads any audio file into the
server's 24 kHz mono format, writes the returned audio, and drives a microphone and speaker
through the optional `sounddevice` package (`pip install 'moshi-ttt[mic]'`).

The command line front end is `moshi-ttt chat`. Nothing here imports torch: a client-only
install needs numpy, sphn and websockets.
"""

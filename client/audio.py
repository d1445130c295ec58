"""Audio in and out for the chat client: files (via sphn) and a live microphone and speaker
(via the optional sounddevice package).

The server speaks 24 kHz mono float32 in 1920-sample (80 ms) frames. Input files of any sample
rate and channel count are converted to that: channels are averaged (or one is picked), and the
rate is converted with sphn's resampler, whose filter delay is removed so that the converted
audio lines up with the original and has exactly round(n * 24000 / rate) samples.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import threading
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
import sphn

from moshi_ttt.protocol import FRAME_SIZE, SAMPLE_RATE

logger = logging.getLogger(__name__)

MIC_HINT = ("pip install 'moshi-ttt[mic]'; sounddevice also needs the PortAudio library "
            "(e.g. apt install libportaudio2, or brew install portaudio)")


class AudioInputError(ValueError):
    """An input file that cannot be used; the message names the file."""


class MicUnavailable(RuntimeError):
    """Live audio was asked for but sounddevice, PortAudio or an audio device is missing."""


# -- files -------------------------------------------------------------------------------------

def load_audio(path: Path, channel: int | None = None) -> np.ndarray:
    """Read an audio file (wav, or any format sphn decodes) as 24 kHz mono float32.

    Several channels are averaged unless `channel` (0-based) picks one.
    """
    path = Path(path)
    if not path.exists():
        raise AudioInputError(f"input file not found: {path}")
    if not path.is_file():
        raise AudioInputError(f"input {path} is not a file")
    try:
        pcm, rate = sphn.read(str(path))
    except (ValueError, OSError) as e:
        raise AudioInputError(f"cannot read audio from {path}: {e}") from None
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim == 1:
        pcm = pcm[None]
    if pcm.shape[-1] == 0:
        raise AudioInputError(f"input file {path} contains no audio samples")
    if channel is not None:
        if not 0 <= channel < pcm.shape[0]:
            raise AudioInputError(f"--channel {channel} does not exist in {path}: it has "
                                  f"{pcm.shape[0]} channel(s), numbered from 0")
        mono = pcm[channel]
    else:
        mono = pcm.mean(axis=0)
    if not np.isfinite(mono).all():
        raise AudioInputError(f"input file {path} contains NaN or infinite samples")
    return resample(np.ascontiguousarray(mono, dtype=np.float32), int(rate), SAMPLE_RATE)


@functools.lru_cache(maxsize=16)
def _resampler_delay(src: int, dst: int) -> int:
    """sphn's resampler output lags its input by a fixed number of output samples (its filter
    delay, e.g. 768 at 16 kHz -> 24 kHz); measured once per rate pair with an impulse."""
    probe = np.zeros((1, src), np.float32)
    probe[0, src // 2] = 1.0
    out = sphn.resample(probe, src, dst)[0]
    return max(0, int(np.argmax(np.abs(out))) - round((src // 2) * dst / src))


def resample(pcm: np.ndarray, src: int, dst: int) -> np.ndarray:
    """1-D float32 at `src` Hz -> `dst` Hz, time-aligned, exactly round(n * dst / src) long."""
    if src == dst:
        return pcm.astype(np.float32, copy=False)
    if src <= 0:
        raise AudioInputError(f"invalid sample rate {src}")
    n_out = round(len(pcm) * dst / src)
    delay = _resampler_delay(src, dst)
    pad = math.ceil((delay + 1) * src / dst) + src // 10  # room to flush the filter's tail
    padded = np.concatenate([pcm, np.zeros(pad, np.float32)])[None]
    out = sphn.resample(padded, src, dst)[0, delay:delay + n_out]
    if len(out) < n_out:
        out = np.concatenate([out, np.zeros(n_out - len(out), np.float32)])
    return out.astype(np.float32, copy=False)


def to_frames(pcm: np.ndarray) -> list[np.ndarray]:
    """Cut 24 kHz mono audio into 1920-sample frames, zero-padding the last one."""
    n = math.ceil(len(pcm) / FRAME_SIZE)
    padded = np.zeros(n * FRAME_SIZE, np.float32)
    padded[:len(pcm)] = pcm
    return [padded[i * FRAME_SIZE:(i + 1) * FRAME_SIZE] for i in range(n)]


def tail_frames(seconds: float) -> int:
    """Frames of silence that cover `seconds` (rounded up to whole 80 ms frames)."""
    return max(0, math.ceil(round(seconds * SAMPLE_RATE) / FRAME_SIZE))


def write_audio(path: Path, pcm: np.ndarray) -> None:
    """24 kHz mono wav (16-bit PCM, as sphn writes it); the parent directory must exist."""
    try:
        sphn.write_wav(str(path), np.ascontiguousarray(pcm, dtype=np.float32), SAMPLE_RATE)
    except (ValueError, OSError) as e:
        raise OSError(f"cannot write {path}: {e}") from None


# -- microphone and speaker ----------------------------------------------------------------------

def import_sounddevice() -> Any:
    """The sounddevice module, or MicUnavailable saying how to get it."""
    try:
        import sounddevice
    except ImportError:
        raise MicUnavailable(f"--mic needs the optional sounddevice package: {MIC_HINT}") \
            from None
    except OSError as e:  # sounddevice raises OSError when the PortAudio library is missing
        raise MicUnavailable(f"--mic: sounddevice could not load PortAudio ({e}); {MIC_HINT}") \
            from None
    return sounddevice


class LiveAudio:
    """Microphone frames in, speaker audio out, at 24 kHz mono.

    PortAudio calls back on its own threads: captured frames go to the event loop through a
    bounded queue (the oldest are dropped when the sender falls behind, since live audio that
    is late is useless), and played audio comes from a buffer the client appends to.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_queued_frames: int = 25,
                 input_device: Any = None, output_device: Any = None):
        self._sd = import_sounddevice()
        self._loop = loop
        self._queue: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=max_queued_frames)
        self._out: collections.deque[np.ndarray] = collections.deque()
        self._out_lock = threading.Lock()
        self._head = np.zeros(0, np.float32)
        self._devices = (input_device, output_device)
        self._streams: list[Any] = []
        self.dropped_frames = 0
        self.device_errors = 0

    def __enter__(self) -> "LiveAudio":
        sd = self._sd
        try:
            self._streams = [
                sd.InputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32",
                               blocksize=FRAME_SIZE, device=self._devices[0],
                               callback=self._on_input),
                sd.OutputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32",
                                blocksize=FRAME_SIZE, device=self._devices[1],
                                callback=self._on_output),
            ]
            for s in self._streams:
                s.start()
        except Exception as e:  # sd.PortAudioError, ValueError (no such device), ...
            self.__exit__()
            raise MicUnavailable(f"cannot open the audio device at {SAMPLE_RATE} Hz mono: {e}") \
                from None
        return self

    def __exit__(self, *exc: Any) -> None:
        for s in self._streams:
            try:
                s.stop()
                s.close()
            except Exception:  # closing a half-opened stream: nothing more to do
                logger.debug("closing audio stream failed", exc_info=True)
        self._streams = []

    # PortAudio threads
    def _on_input(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status:
            self.device_errors += 1
        frame = np.array(indata[:, 0], dtype=np.float32)
        try:
            self._loop.call_soon_threadsafe(self._enqueue, frame)
        except RuntimeError:
            # the loop has closed: a block captured while the chat ended, which nobody will
            # send (raising here would only reach PortAudio's thread)
            self.dropped_frames += 1

    def _on_output(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        out = np.zeros(frames, np.float32)
        filled = 0
        with self._out_lock:
            while filled < frames and (len(self._head) or self._out):
                if not len(self._head):
                    self._head = self._out.popleft()
                k = min(frames - filled, len(self._head))
                out[filled:filled + k] = self._head[:k]
                self._head = self._head[k:]
                filled += k
        outdata[:, 0] = out

    # event loop
    def _enqueue(self, frame: np.ndarray) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped_frames += 1
        self._queue.put_nowait(frame)

    def play(self, pcm: np.ndarray) -> None:
        with self._out_lock:
            self._out.append(pcm.astype(np.float32, copy=False))

    async def frames(self, stop: asyncio.Event,
                     max_frames: int | None = None) -> AsyncIterator[np.ndarray]:
        """Captured 1920-sample frames until `stop` is set or `max_frames` were given."""
        given = 0
        while not stop.is_set() and (max_frames is None or given < max_frames):
            getter = asyncio.ensure_future(self._queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                if not getter.done():
                    getter.cancel()
            if not getter.done() or getter.cancelled():
                return
            given += 1
            yield getter.result()

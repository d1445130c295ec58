"""`moshi-ttt chat` and `client/` against a real server on loopback (tiny random base, greedy):
both audio modes, pacing (real time, faster, and never beyond the server's input bound), text,
refusals, connection failures, server errors, a missing microphone and bad input files."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request

import numpy as np
import pytest
import sphn
from typer.testing import CliRunner

from moshi_ttt.cli import app
from moshi_ttt.protocol import FRAME_SIZE, Kind

from conftest import REPO
from fixtures import make_tiny_base, write_wav
from serving import Peer, ServerThread
from test_server import settings, text_head_in_vocab

IN_SECONDS, IN_RATE = 2.0, 16000
IN_FRAMES = 25  # 2 s at 24 kHz = 48000 samples = 25 frames of 1920
TAIL_FRAMES = 13  # the default 1 s tail, rounded up to whole 80 ms frames
KEY = "s3cret"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("client"))


@pytest.fixture(scope="module")
def srv(base):
    """Default bounds (4 s of input), text head patched so that text comes out."""
    with ServerThread(settings(base, max_sessions=1, cpu_threads=1)) as s:
        text_head_in_vocab(s)
        yield s


@pytest.fixture(scope="module")
def tight(base):
    """A small input bound (10 frames = 0.8 s), one slot, an API key."""
    with ServerThread(settings(base, max_sessions=1, max_buffered_frames=10, cpu_threads=1,
                               api_key=KEY)) as s:
        yield s


@pytest.fixture(scope="module")
def in_wav(tmp_path_factory):
    """2 s of tone + noise, 16 kHz stereo: exercises the downmix and the resampler."""
    n = int(IN_SECONDS * IN_RATE)
    t = np.arange(n) / IN_RATE
    rng = np.random.default_rng(0)
    left = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n)
    right = 0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(n)
    path = tmp_path_factory.mktemp("in") / "in.wav"
    write_wav(path, np.stack([left, right]), IN_RATE)
    return path


LOG = io.StringIO()


@pytest.fixture(autouse=True)
def _log_to_a_buffer(monkeypatch):
    """The CLI points the root logger at stderr on each run; in-process, CliRunner's stderr is
    closed after the run while the server's threads still log. Log to a buffer instead."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def setup_logging(verbose: bool = False) -> None:
        handler = logging.StreamHandler(LOG)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    monkeypatch.setattr("moshi_ttt.cli.setup_logging", setup_logging)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def wait_idle(srv: ServerThread, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (srv.engine.active or srv.host.sessions) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.engine.active == 0


def step_seconds(srv: ServerThread) -> float:
    """Total time the server's model has spent in steps (from /metrics)."""
    text = urllib.request.urlopen(srv.http("/metrics"), timeout=30).read().decode()
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith("moshi_ttt_step_seconds_sum ")))


def chat(*args: str) -> tuple[int, str, dict | None]:
    """Run `moshi-ttt chat ARGS` in-process: (exit code, all output, --json summary or None)."""
    LOG.seek(0)
    LOG.truncate()
    r = CliRunner().invoke(app, ["chat", *args])
    out = r.stdout + r.stderr + LOG.getvalue()
    assert r.exception is None or isinstance(r.exception, SystemExit), out
    summary = None
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            summary = json.loads(line)
    return r.exit_code, out, summary


def read_out(path) -> np.ndarray:
    pcm, rate = sphn.read(str(path))
    assert rate == 24000 and pcm.shape[0] == 1
    return pcm[0]


def check_session(s: dict, out_wav, sent: int) -> None:
    assert s["ok"] and s["error"] is None and s["close_code"] == 1000, s
    assert s["frames_sent"] == sent
    assert s["first_audio_latency_ms"] > 0
    assert 0 < s["rtt_p50_ms"] <= s["rtt_p99_ms"] < 10_000
    assert s["max_frames_ahead"] <= 25  # the default --max-ahead: 2 s
    audio = read_out(out_wav)
    assert np.isfinite(audio).all() and audio.std() > 0
    # one answer per frame but the model's first (1-frame delay); opus may differ by a frame
    assert abs(len(audio) - (sent - 1) * FRAME_SIZE) <= FRAME_SIZE, len(audio)


# -- sessions ------------------------------------------------------------------------------------

def test_pcm_mode_real_time(srv, in_wav, tmp_path):
    out, txt = tmp_path / "out.wav", tmp_path / "out.txt"
    t0 = time.monotonic()
    code, log, s = chat("--url", srv.url(), "--input", str(in_wav), "--output", str(out),
                        "--transcript", str(txt), "--mode", "pcm", "--json")
    wall = time.monotonic() - t0
    assert code == 0, log
    check_session(s, out, IN_FRAMES + TAIL_FRAMES)
    assert s["frames_received"] == s["frames_sent"] - 1  # exact in pcm mode
    assert len(read_out(out)) == (IN_FRAMES + TAIL_FRAMES - 1) * FRAME_SIZE
    assert wall >= (IN_FRAMES + TAIL_FRAMES - 1) * 0.08 * 0.95  # paced in real time
    assert txt.read_text() == s["transcript"]
    wait_idle(srv)


def test_opus_mode_faster_and_the_human_summary(srv, in_wav, tmp_path):
    out, txt = tmp_path / "out.wav", tmp_path / "out.txt"
    code, log, _ = chat("--url", srv.url(), "--input", str(in_wav), "--output", str(out),
                        "--transcript", str(txt), "--speed", "4", "--tail", "0.5")
    assert code == 0, log
    for label in ("frames sent", "frames received", "first-audio latency", "round trip p50",
                  "transcript", str(out)):
        assert label in log, log
    assert f"{IN_FRAMES + 7} (" in log  # frames sent: 25 + 0.5 s of tail (7 frames)
    assert txt.exists()
    audio = read_out(out)
    assert abs(len(audio) - (IN_FRAMES + 6) * FRAME_SIZE) <= FRAME_SIZE
    assert "Traceback" not in log
    wait_idle(srv)


def test_telemetry_file_and_summary(srv, in_wav, tmp_path):
    """--telemetry FILE.jsonl: every TTT telemetry message of the session, one per line; the
    --json summary and the human table report the inner loss first -> last and the drift."""
    tel = tmp_path / "tel.jsonl"
    code, log, s = chat("--url", srv.url(), "--input", str(in_wav), "--telemetry", str(tel),
                        "--fast", "--json")
    assert code == 0, log
    lines = [json.loads(x) for x in tel.read_text().splitlines()]
    sent = IN_FRAMES + TAIL_FRAMES
    assert len(lines) == s["telemetry"]["messages"] >= (sent - 1) // 12, (len(lines), sent)
    assert all(m["type"] == "ttt_telemetry" and m["session"] == s["session"] for m in lines)
    assert sum(m["window_frames"] for m in lines) == lines[-1]["frame"] <= sent
    t = s["telemetry"]
    assert t["inner_loss_before"] == [lines[0]["inner_loss_before"],
                                      lines[-1]["inner_loss_before"]]
    assert t["inner_loss_after"][1] == lines[-1]["inner_loss_after"]
    assert t["drift"] == lines[-1]["drift"] > 0
    code, log, _ = chat("--url", srv.url(), "--input", str(in_wav), "--fast")
    assert code == 0 and "TTT inner loss, first -> last" in log and "TTT drift" in log, log
    wait_idle(srv)


def test_opus_fast_transcript_is_the_text_messages(srv, in_wav, tmp_path, monkeypatch):
    import client.chat as chat_mod

    out, txt = tmp_path / "out.wav", tmp_path / "out.txt"
    seen: list[str] = []
    original = chat_mod._Session.handle

    def spy(self, message):  # record the TEXT messages exactly as they come off the socket
        if isinstance(message, bytes) and message[:1] == bytes([Kind.TEXT]):
            seen.append(message[1:].decode())
        return original(self, message)
    monkeypatch.setattr(chat_mod._Session, "handle", spy)
    code, log, s = chat("--url", srv.url(), "--input", str(in_wav), "--output", str(out),
                        "--transcript", str(txt), "--fast", "--json")
    assert code == 0, log
    check_session(s, out, IN_FRAMES + TAIL_FRAMES)
    assert s["mode"] == "opus" and s["frames_received"] >= s["frames_sent"] - 2
    assert seen and txt.read_text(encoding="utf-8") == "".join(seen) == s["transcript"]
    assert s["transcript"].strip()
    wait_idle(srv)


# -- pacing against the server's input bound -------------------------------------------------------

@pytest.fixture
def stall_at(tight, monkeypatch):
    """stall_at(i, seconds): when the client sends frame i, the model thread stops for
    `seconds` (released at the end of the test at the latest)."""
    import client.chat as chat_mod

    blocker = threading.Event()
    plan: dict[str, float] = {}
    original = chat_mod._Session.send_frame

    async def send_frame(self, frame):
        if self.result.frames_sent == plan.get("frame"):
            tight.engine.submit(lambda: blocker.wait(plan["seconds"]))
        await original(self, frame)
    monkeypatch.setattr(chat_mod._Session, "send_frame", send_frame)

    def arm(frame: int, seconds: float) -> None:
        plan.update(frame=frame, seconds=seconds)
    yield arm
    blocker.set()
    wait_idle(tight)


def test_fast_stays_within_the_input_bound_even_when_the_model_stalls(
        tight, stall_at, in_wav, tmp_path):
    out, txt = tmp_path / "out.wav", tmp_path / "out.txt"
    stall_s = 1.0
    stall_at(5, stall_s)
    steps_before = step_seconds(tight)
    code, log, s = chat("--url", tight.url(), "--api-key", KEY, "--input", str(in_wav),
                        "--output", str(out), "--transcript", str(txt), "--mode", "pcm",
                        "--fast", "--max-ahead", "0.5", "--json")
    model_s = step_seconds(tight) - steps_before  # the model's own time for these frames
    assert code == 0, log
    sent = IN_FRAMES + TAIL_FRAMES
    check_session(s, out, sent)
    assert s["frames_received"] == sent - 1
    assert s["max_frames_ahead"] <= 6  # 0.5 s; the server allows 10
    assert txt.exists()  # written even if the random model said nothing
    # No clock pacing: the model's speed is the only limit, so on a machine where the model
    # runs faster than real time the client does too (this one may be loaded: the model's
    # time per frame is measured, not assumed).
    assert s["wall_s"] < model_s + stall_s + 1.5, (s["wall_s"], model_s)
    real_time = sent * 0.08
    if model_s < 0.5 * real_time:
        assert s["wall_s"] < 0.75 * real_time + stall_s, (s["wall_s"], model_s)


def test_without_pacing_the_server_bound_trips_and_partial_outputs_are_kept(
        tight, stall_at, in_wav, tmp_path):
    """The control for the test above: the same stall with --max-ahead beyond the server's
    bound ends the session with the server's reason, exit code 4, and partial outputs."""
    out, txt = tmp_path / "out.wav", tmp_path / "out.txt"
    stall_at(5, 5.0)
    code, log, _ = chat("--url", tight.url(), "--api-key", KEY, "--input", str(in_wav),
                        "--output", str(out), "--transcript", str(txt), "--mode", "pcm",
                        "--fast", "--max-ahead", "10")
    assert code == 4, log
    assert "input buffer full" in log and "limit 10" in log and "partial" in log
    assert "Traceback" not in log
    assert out.exists() and txt.exists()


def test_a_server_that_stops_answering_is_reported(tight, stall_at):
    """The API: a model that stops for longer than stall_timeout_s while the client is held
    back by max_ahead_s ends the session with a clear error and what came so far."""
    import asyncio

    from client.chat import ChatOptions, run_chat
    from moshi_ttt.protocol import Mode

    stall_at(3, 5.0)
    frames = [np.zeros(FRAME_SIZE, np.float32)] * 20
    opts = ChatOptions(mode=Mode.PCM, api_key=KEY, speed=None, max_ahead_s=0.4,
                       stall_timeout_s=0.5)
    t0 = time.monotonic()
    r = asyncio.run(run_chat(tight.url(), frames, opts))
    assert time.monotonic() - t0 < 4.0
    assert r.started and not r.ok and r.error_kind == "server"
    assert "stopped answering" in r.error and r.frames_sent <= 3 + 5, r.error
    assert r.close_code == 1000  # the client closed cleanly


# -- failures ----------------------------------------------------------------------------------

def test_refused_at_capacity(tight, in_wav):
    with Peer(tight.url(mode="pcm"), headers={"X-API-Key": KEY}) as holder:
        assert holder.metadata["slot"] == 0
        code, log, _ = chat("--url", tight.url(), "--api-key", KEY, "--input", str(in_wav))
    assert code == 4, log
    assert "all 1 session slots are taken" in log and "refused" in log
    assert "Traceback" not in log
    wait_idle(tight)


def test_missing_api_key_shows_the_servers_reason(tight, in_wav, tmp_path):
    out = tmp_path / "out.wav"
    code, log, _ = chat("--url", tight.url(), "--input", str(in_wav), "--output", str(out))
    assert code == 4, log
    assert "missing or wrong API key" in log and "Traceback" not in log
    assert not out.exists()  # no session: nothing to write


def test_connection_refused(in_wav):
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, log, _ = chat("--url", f"ws://127.0.0.1:{port}/api/chat", "--input", str(in_wav))
    assert code == 3, log
    assert "could not connect" in log and "connection refused" in log
    assert "Traceback" not in log and len(log.strip().splitlines()) <= 2


def test_unresolvable_host_and_bad_url(in_wav):
    code, log, _ = chat("--url", "ws://no-such-host.invalid/api/chat", "--input", str(in_wav),
                        "--timeout", "5")
    assert code == 3, log  # a resolver that does not answer at all ends in the timeout
    assert "cannot resolve host name 'no-such-host.invalid'" in log or "timed out" in log, log
    code, log, _ = chat("--url", "ftp://x/api/chat", "--input", str(in_wav))
    assert code == 2 and "invalid server URL" in log, log


def test_mic_without_sounddevice(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import raises ImportError
    code, log, _ = chat("--url", "ws://127.0.0.1:1/api/chat", "--mic")
    assert code == 2, log
    assert "pip install 'moshi-ttt[mic]'" in log and "PortAudio" in log
    assert "Traceback" not in log


def test_bad_input_files(tmp_path):
    missing = tmp_path / "nope.wav"
    code, log, _ = chat("--input", str(missing))
    assert code == 2 and "not found" in log and str(missing) in log, log
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all" * 20)
    code, log, _ = chat("--input", str(garbage))
    assert code == 2 and str(garbage) in log and "cannot read audio" in log, log
    assert "Traceback" not in log
    code, log, _ = chat("--input", str(garbage), "--mic")
    assert code == 2 and "exactly one of --input FILE or --mic" in log, log


# -- live audio, with a stand-in for sounddevice ------------------------------------------------

class _FakeStream:
    """sounddevice's InputStream/OutputStream as far as the client uses them: a thread that
    calls the callback with one 1920-sample block every 20 ms (4x real time)."""

    played: list[np.ndarray] = []

    def __init__(self, samplerate, channels, dtype, blocksize, device, callback):
        assert (samplerate, channels, dtype, blocksize) == (24000, 1, "float32", FRAME_SIZE)
        self.callback, self.blocksize = callback, blocksize
        self.running = threading.Event()
        self.thread: threading.Thread | None = None
        self.n = 0

    def start(self):
        self.running.set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running.is_set():
            self.tick()
            time.sleep(0.02)

    def stop(self):  # as PortAudio's: returns once no callback runs any more
        self.running.clear()
        if self.thread is not None:  # a stream that failed to open is stopped too
            self.thread.join(timeout=5)

    def close(self):
        pass


class _FakeInput(_FakeStream):
    def tick(self):
        t = (self.n * FRAME_SIZE + np.arange(FRAME_SIZE)) / 24000
        self.n += 1
        self.callback((0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)[:, None],
                      FRAME_SIZE, None, None)


class _FakeOutput(_FakeStream):
    def tick(self):
        out = np.zeros((FRAME_SIZE, 1), np.float32)
        self.callback(out, FRAME_SIZE, None, None)
        _FakeStream.played.append(out[:, 0].copy())


def test_mic_session_with_a_stand_in_device(srv, monkeypatch, tmp_path):
    fake = types.SimpleNamespace(InputStream=_FakeInput, OutputStream=_FakeOutput)
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    _FakeStream.played = []
    out = tmp_path / "out.wav"
    code, log, s = chat("--url", srv.url(), "--mic", "--duration", "0.8", "--output", str(out),
                        "--json")
    assert code == 0, log
    assert s["ok"] and s["frames_sent"] == 10 and s["frames_received"] >= 8, s
    played = np.concatenate(_FakeStream.played)
    assert np.abs(played).max() > 0  # the answers went to the speaker
    assert abs(len(read_out(out)) - 9 * FRAME_SIZE) <= FRAME_SIZE
    wait_idle(srv)


def test_a_block_captured_after_the_chat_ended_is_dropped_not_raised(monkeypatch):
    """PortAudio may deliver a last block while the client's event loop is closing: the input
    callback drops it (counted) instead of raising on PortAudio's thread."""
    from client.audio import LiveAudio

    fake = types.SimpleNamespace(InputStream=_FakeInput, OutputStream=_FakeOutput)
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    loop = asyncio.new_event_loop()
    audio = LiveAudio(loop)
    audio._on_input(np.zeros((FRAME_SIZE, 1), np.float32), FRAME_SIZE, None, None)
    assert audio.dropped_frames == 0  # queued on the open loop
    loop.close()
    audio._on_input(np.zeros((FRAME_SIZE, 1), np.float32), FRAME_SIZE, None, None)
    assert audio.dropped_frames == 1


# -- the client needs no torch ------------------------------------------------------------------

def test_client_imports_without_torch():
    code = ("import sys, client.chat, client.command, client.audio, moshi_ttt.cli; "
            "sys.exit('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def test_resampling_keeps_timing_and_length():
    from client.audio import resample

    for rate in (16000, 44100, 48000):
        n = rate // 2
        x = np.zeros(n, np.float32)
        x[n // 2] = 1.0
        y = resample(x, rate, 24000)
        assert len(y) == round(n * 24000 / rate)
        assert abs(int(np.argmax(y)) - round((n // 2) * 24000 / rate)) <= 1


# -- a server that says odd things --------------------------------------------------------------

def test_odd_metadata_from_the_server_is_ignored_not_fatal(in_wav):
    """METADATA that is JSON but not an object, and telemetry whose figures are not numbers:
    a warning and "n/a" in the summary, the session still completes (a crash here lost every
    output after a good session)."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.server import serve

    from moshi_ttt.protocol import HANDSHAKE

    def handler(ws):
        ws.send(HANDSHAKE)
        for payload in (b"[1, 2]", b'"hello"', b"null", json.dumps(
                {"type": "ttt_telemetry", "frame": 3, "inner_loss_before": "x",
                 "inner_loss_after": [1], "drift": None, "input_dependence": {"a": 1}}).encode()):
            ws.send(bytes([Kind.METADATA]) + payload)
        try:
            for msg in ws:  # an echo: every audio frame answered with itself
                if msg[0] == Kind.AUDIO:
                    ws.send(msg)
        except ConnectionClosed:  # the client closes while an answer is on its way
            pass

    with serve(handler, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        code, log, _ = chat("--url", f"ws://127.0.0.1:{port}/api/chat", "--input", str(in_wav),
                            "--mode", "pcm", "--fast")
        server.shutdown()
    assert code == 0, log
    assert log.count("metadata from the server is not a JSON object") == 3, log
    flat = " ".join(log.replace("\u2502", " ").split())  # the summary table, unwrapped
    assert "before the update n/a -> n/a, after it n/a -> n/a" in flat, log
    assert "Traceback" not in log


@pytest.mark.parametrize("flag,value", [("--speed", "nan"), ("--speed", "inf"),
                                        ("--max-ahead", "nan"), ("--tail", "inf"),
                                        ("--tail", "-1"), ("--timeout", "0"),
                                        ("--timeout", "nan")])
def test_non_finite_or_out_of_range_flags(in_wav, flag, value):
    """Each one a usage error before connecting (a NaN --speed used to pace forever)."""
    code, log, _ = chat("--url", "ws://127.0.0.1:1/api/chat", "--input", str(in_wav),
                        flag, value)
    assert code == 2, log
    assert f"{flag} must be a finite number" in log and "Traceback" not in log, log

"""Stream audio to `WS /api/chat`, collect what the model answers, and measure it.

One session: connect (API key in the X-API-Key header), wait for the handshake and metadata,
then two tasks run until the end: the sender (80 ms frames, Ogg/Opus or float32 PCM) and the
receiver (audio, text, errors, close). The sender is paced two ways:

* by the clock: frame i goes out at start + i * 80 ms / speed (speed None: no clock pacing);
* by the server: never more than `max_ahead_s` of audio beyond the frames whose answers have
  arrived. The server closes a client whose queued input exceeds its bound (4 s by default);
  counting answered frames from what was received keeps a faster-than-real-time client under it
  however slowly the model runs.

The model answers input frame i (i >= 1) with output audio frame i - 1 (its first frame yields
nothing). Round trip of frame i = arrival of output frame i - 1 minus the send of input frame i;
in opus mode an output frame has arrived once the decoded samples reach its end. After the last
frame the client waits for the answers still due, closes with 1000 and waits for the server's
close. A session that ends badly keeps everything received so far.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sphn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI, WebSocketException,
)

from moshi_ttt.protocol import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE, Close, Kind, Mode, is_telemetry

logger = logging.getLogger(__name__)

FRAME_S = 1 / FRAME_RATE


class ExitCode(enum.IntEnum):
    """`moshi-ttt chat` exit codes."""

    OK = 0
    USAGE = 2  # bad arguments, unreadable input file, --mic without sounddevice
    CONNECTION = 3  # could not connect, or the connection was lost
    SERVER = 4  # the server refused the session or ended it with an error
    INTERRUPTED = 130  # Ctrl-C while streaming a file (partial outputs are written)


class ChatError(Exception):
    """A chat that could not take place; `exit_code` says which kind of failure."""

    exit_code: int = ExitCode.CONNECTION


class ChatUsageError(ChatError):
    exit_code = ExitCode.USAGE


class ChatConnectionError(ChatError):
    exit_code = ExitCode.CONNECTION


@dataclass
class ChatOptions:
    mode: Mode = Mode.OPUS
    api_key: str | None = None
    speed: float | None = 1.0  # times real time; None: as fast as `max_ahead_s` allows
    max_ahead_s: float = 2.0  # audio sent beyond the answered frames
    connect_timeout_s: float = 10.0
    handshake_timeout_s: float = 30.0  # the server hands-shake once the session's row is ready
    drain_timeout_s: float = 5.0  # after the last frame: give up when nothing came for this long
    stall_timeout_s: float = 30.0  # held back by max_ahead_s: fail when nothing came this long
    close_timeout_s: float = 5.0
    ssl: ssl.SSLContext | None = None  # wss:// only; None there: the system's trusted CAs
    telemetry: bool = True  # ask for the session's TTT telemetry messages

    @property
    def max_ahead_frames(self) -> int:
        return max(1, int(self.max_ahead_s * FRAME_RATE))


@dataclass
class ChatResult:
    """Everything one session produced, complete or not (see `error`)."""

    url: str
    mode: str
    metadata: dict[str, Any] = field(default_factory=dict)  # the session info
    telemetry: list[dict[str, Any]] = field(default_factory=list)  # TTT telemetry, in order
    started: bool = False  # the server's handshake came: a session existed
    frames_sent: int = 0
    frames_received: int = 0  # whole output frames (1920 samples each)
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    text_pieces: list[str] = field(default_factory=list)
    send_times: list[float] = field(default_factory=list)  # perf_counter per input frame
    recv_times: list[float] = field(default_factory=list)  # perf_counter per output frame
    wall_s: float = 0.0
    error: str | None = None  # the server's ERROR message, or why the session ended early
    error_kind: str | None = None  # "refused" (before the handshake), "server", "connection"
    close_code: int | None = None
    close_reason: str = ""
    interrupted: bool = False
    max_in_flight: int = 0  # most frames ever sent beyond the received ones

    @property
    def ok(self) -> bool:
        """The session ran and ended without an error (it may have been stopped early)."""
        return self.started and self.error is None

    @property
    def transcript(self) -> str:
        return "".join(self.text_pieces)

    @property
    def first_audio_latency_s(self) -> float | None:
        """From the first frame sent to the first output frame received."""
        if not self.send_times or not self.recv_times:
            return None
        return self.recv_times[0] - self.send_times[0]

    @property
    def round_trips_s(self) -> np.ndarray:
        """Per input frame i >= 1: arrival of output frame i - 1 minus the send of frame i."""
        n = min(len(self.recv_times), len(self.send_times) - 1)
        if n <= 0:
            return np.zeros(0)
        return np.asarray(self.recv_times[:n]) - np.asarray(self.send_times[1:n + 1])

    def rtt_ms(self, q: float) -> float | None:
        rt = self.round_trips_s
        return float(np.percentile(rt, q) * 1000) if rt.size else None

    def summary(self) -> dict[str, Any]:
        lat = self.first_audio_latency_s
        return {
            "url": self.url,
            "mode": self.mode,
            "session": self.metadata.get("session"),
            "ok": self.ok,
            "error": self.error,
            "error_kind": self.error_kind,
            "close_code": self.close_code,
            "interrupted": self.interrupted,
            "frames_sent": self.frames_sent,
            "frames_received": self.frames_received,
            "seconds_sent": round(self.frames_sent * FRAME_S, 3),
            "seconds_received": round(len(self.audio) / SAMPLE_RATE, 3),
            "first_audio_latency_ms": round(lat * 1000, 2) if lat is not None else None,
            "rtt_p50_ms": _round(self.rtt_ms(50)),
            "rtt_p99_ms": _round(self.rtt_ms(99)),
            "max_frames_ahead": self.max_in_flight,
            "wall_s": round(self.wall_s, 3),
            "transcript": self.transcript,
            "telemetry": self.telemetry_summary(),
        }

    def telemetry_summary(self) -> dict[str, Any] | None:
        """The first and last TTT inner losses (before and after the update) and the last
        drift and input dependence, over the telemetry messages received; None if none came."""
        if not self.telemetry:
            return None
        first, last = self.telemetry[0], self.telemetry[-1]
        return {"messages": len(self.telemetry), "frames": last.get("frame"),
                "inner_loss_before": [first.get("inner_loss_before"),
                                      last.get("inner_loss_before")],
                "inner_loss_after": [first.get("inner_loss_after"),
                                     last.get("inner_loss_after")],
                "drift": last.get("drift"), "input_dependence": last.get("input_dependence")}


def _round(x: float | None) -> float | None:
    return round(x, 2) if x is not None else None


def chat_url(url: str, mode: Mode, telemetry: bool | None = None) -> str:
    """Normalise the server address: http(s) -> ws(s), no path -> /api/chat, mode set (and
    telemetry=1/0 when `telemetry` is given)."""
    parts = urllib.parse.urlsplit(url.strip())
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise ChatUsageError(f"invalid server URL {url!r}: expected ws://HOST:PORT/api/chat "
                             f"(or wss://, http://, https://)")
    try:
        parts.port
    except ValueError as e:
        raise ChatUsageError(f"invalid server URL {url!r}: {e}") from None
    path = parts.path if parts.path not in ("", "/") else "/api/chat"
    ours = ("mode",) if telemetry is None else ("mode", "telemetry")
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k not in ours]
    query.append(("mode", mode.value))
    if telemetry is not None:
        query.append(("telemetry", "1" if telemetry else "0"))
    return urllib.parse.urlunsplit((scheme, parts.netloc, path,
                                    urllib.parse.urlencode(query), ""))


def tls_context(url: str, ca_file: Path | None = None,
                insecure: bool = False) -> ssl.SSLContext | None:
    """How a wss:// connection checks the server: against `ca_file` only (e.g. the ca.pem of
    `moshi-ttt tls-cert`), not at all with `insecure`, else against the system's trusted CAs.
    None for ws:// (where either option is a usage error)."""
    scheme = urllib.parse.urlsplit(url.strip()).scheme
    if scheme not in ("wss", "https"):
        if ca_file is not None or insecure:
            raise ChatUsageError(f"--ca-file and --insecure are for wss:// (or https://) URLs; "
                                 f"{url} is not TLS")
        return None
    if ca_file is not None and insecure:
        raise ChatUsageError("give --ca-file or --insecure, not both")
    if insecure:
        logger.warning("--insecure: the server's certificate is not checked; anyone on the "
                       "network path can read and change the session")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if ca_file is None:
        return ssl.create_default_context()
    if not ca_file.is_file():
        raise ChatUsageError(f"--ca-file {ca_file}: no such file")
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except ssl.SSLError as e:
        raise ChatUsageError(f"--ca-file {ca_file}: not a PEM certificate file "
                             f"({e.reason or e})") from None
    except OSError as e:  # OpenSSL's bare OSError, e.g. a file this user may not read
        raise ChatUsageError(f"--ca-file {ca_file}: cannot read it ({e.strerror or e})") \
            from None


def _describe_close(code: int | None, reason: str) -> str:
    if code is None:
        return "no close code"
    try:
        name = Close(code).name.lower().replace("_", " ")
    except ValueError:
        name = "abnormal closure, no close frame" if code == 1006 else "unknown"
    return f"close code {code} ({name}{': ' + reason if reason else ''})"


class _BadMessage(Exception):
    """The server sent something this client cannot decode."""


class _Session:
    """State shared by the sender and the receiver of one connection."""

    def __init__(self, ws: ClientConnection, opts: ChatOptions, result: ChatResult,
                 on_audio: Callable[[np.ndarray], None] | None,
                 on_text: Callable[[str], None] | None,
                 on_telemetry: Callable[[dict[str, Any]], None] | None = None):
        self.ws = ws
        self.opts = opts
        self.result = result
        self.on_audio = on_audio
        self.on_text = on_text
        self.on_telemetry = on_telemetry
        self.opus_in = sphn.OpusStreamReader(SAMPLE_RATE) if opts.mode is Mode.OPUS else None
        self.opus_out = sphn.OpusStreamWriter(SAMPLE_RATE) if opts.mode is Mode.OPUS else None
        self.chunks: list[np.ndarray] = []
        self.samples = 0
        self.progress = asyncio.Event()  # set on each new output frame and on close
        self.closed = asyncio.Event()
        self.closing = False  # we sent our close: the server's close is expected
        self.last_progress = time.perf_counter()  # when the last output frame completed

    # -- receiving ------------------------------------------------------------------------------
    def _fail(self, message: str, kind: str) -> None:
        if self.result.error is None:
            self.result.error, self.result.error_kind = message, kind

    def handle(self, message: bytes | str) -> None:
        if isinstance(message, str) or not message:
            logger.debug("ignored a non-binary or empty message from the server")
            return
        kind, payload = message[0], bytes(message[1:])
        if kind == Kind.AUDIO:
            now = time.perf_counter()
            if self.opus_in is not None:
                try:
                    pcm = self.opus_in.append_bytes(payload)
                except Exception as e:  # sphn raises ValueError on bad Ogg/Opus data
                    raise _BadMessage(f"the server sent malformed Ogg/Opus audio: {e}") from None
            else:
                pcm = np.frombuffer(payload[:len(payload) // 4 * 4], dtype="<f4")
            if pcm.size:
                pcm = np.asarray(pcm, np.float32)
                self.chunks.append(pcm)
                self.samples += pcm.size
                if self.on_audio is not None:
                    self.on_audio(pcm)
            done = self.samples // FRAME_SIZE
            while len(self.result.recv_times) < done:
                self.result.recv_times.append(now)
            if done > self.result.frames_received:
                self.result.frames_received = done
                self.last_progress = now
                self.progress.set()
        elif kind == Kind.TEXT:
            piece = payload.decode("utf-8", errors="replace")
            self.result.text_pieces.append(piece)
            if self.on_text is not None:
                self.on_text(piece)
        elif kind == Kind.METADATA:
            try:
                meta = json.loads(payload)
            except ValueError:
                logger.warning("unreadable metadata from the server: %r", payload[:200])
                return
            if not isinstance(meta, dict):
                logger.warning("metadata from the server is not a JSON object: %r", payload[:200])
                return
            if is_telemetry(meta):
                self.result.telemetry.append(meta)
                if self.on_telemetry is not None:
                    self.on_telemetry(meta)
                return
            if meta.get("type", "session") != "session":
                logger.debug("ignored metadata of type %r", meta.get("type"))
                return
            self.result.metadata = meta
            logger.info("session %s open (slot %s, %s mode)", meta.get("session", "?"),
                        meta.get("slot", "?"), meta.get("mode", self.opts.mode.value))
        elif kind == Kind.ERROR:
            reason = payload.decode("utf-8", errors="replace")
            self._fail(reason, "server" if self.result.started else "refused")
            self.progress.set()
        elif kind == Kind.HANDSHAKE:
            self.result.started = True
            self.progress.set()
        else:  # PING, or kinds this client does not use
            logger.debug("ignored message kind %d", kind)

    async def receive(self) -> None:
        try:
            async for message in self.ws:
                self.handle(message)
        except ConnectionClosed:
            pass
        except _BadMessage as e:
            self._fail(str(e), "server")
            self.closing = True
            await self.ws.close(code=Close.INVALID, reason="malformed audio")
        finally:
            r = self.result
            r.close_code = self.ws.close_code if self.ws.close_code is not None else 1006
            r.close_reason = self.ws.close_reason or ""
            if not self.closing and r.error is None:
                if r.close_code == 1006:
                    self._fail("the connection was lost (no close frame)", "connection")
                else:
                    self._fail(f"the server ended the session: "
                               f"{_describe_close(r.close_code, r.close_reason)}",
                               "server" if r.started else "refused")
            self.closed.set()
            self.progress.set()

    # -- sending --------------------------------------------------------------------------------
    async def send_frame(self, frame: np.ndarray) -> None:
        if self.opus_out is not None:
            data = self.opus_out.append_pcm(frame)
        else:
            data = np.ascontiguousarray(frame, dtype="<f4").tobytes()
        sent_at = time.perf_counter()
        if data:
            await self.ws.send(bytes([Kind.AUDIO]) + data)
        r = self.result
        r.send_times.append(sent_at)
        r.frames_sent += 1
        r.max_in_flight = max(r.max_in_flight, r.frames_sent - r.frames_received)

    async def wait_until(self, deadline: float | None, stop: asyncio.Event) -> bool:
        """Until `deadline` (perf_counter) has passed and the answers are close enough behind.
        False when the session ended, the user stopped it, or the server stopped answering
        for `stall_timeout_s` (then the result says so)."""
        r = self.result
        while not (self.closed.is_set() or stop.is_set()):
            ahead = r.frames_sent - r.frames_received
            now = time.perf_counter()
            blocked = ahead >= self.opts.max_ahead_frames
            if not blocked and (deadline is None or now >= deadline):
                return True
            if blocked:
                timeout = self.last_progress + self.opts.stall_timeout_s - now
                if timeout <= 0:
                    self._fail(f"the server stopped answering: no audio for "
                               f"{self.opts.stall_timeout_s:g} s with {ahead} frames unanswered",
                               "server")
                    return False
            else:
                timeout = max(0.0, deadline - now) if deadline is not None else None
            self.progress.clear()
            waits = [asyncio.ensure_future(stop.wait())]
            if blocked:
                waits.append(asyncio.ensure_future(self.progress.wait()))
            try:
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        return False

    async def send_all(self, frames: Iterable[np.ndarray] | AsyncIterable[np.ndarray],
                       stop: asyncio.Event) -> None:
        speed = self.opts.speed
        start: float | None = None
        async for frame in _aiter(frames):
            if stop.is_set() or self.closed.is_set():
                break
            deadline = None
            if speed is not None and start is not None:
                deadline = start + self.result.frames_sent * FRAME_S / speed
            if not await self.wait_until(deadline, stop):
                break
            if start is None:
                start = self.last_progress = time.perf_counter()
            try:
                await self.send_frame(frame)
            except ConnectionClosed:
                break  # the receiver records why
        self.result.interrupted = stop.is_set()

    async def drain(self) -> None:
        """Wait for the answers still due (all but the model's one-frame delay), giving up when
        nothing arrives for `drain_timeout_s`."""
        r = self.result
        while not self.closed.is_set() and r.frames_received < r.frames_sent - 1:
            self.progress.clear()
            try:
                await asyncio.wait_for(self.progress.wait(), self.opts.drain_timeout_s)
            except asyncio.TimeoutError:
                logger.warning("no answer from the server for %.1f s: %d of %d frames came back",
                               self.opts.drain_timeout_s, r.frames_received, r.frames_sent - 1)
                return


async def _aiter(frames: Iterable[np.ndarray] | AsyncIterable[np.ndarray]):
    if isinstance(frames, AsyncIterable):
        async for f in frames:
            yield f
    else:
        for f in frames:
            yield f


# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH = (62, 64)


async def _open(url: str, opts: ChatOptions) -> ClientConnection:
    """Connect; every way this fails becomes one ChatConnectionError line."""
    host = urllib.parse.urlsplit(url)
    where = f"{host.hostname}:{host.port or (443 if host.scheme == 'wss' else 80)}"
    headers = {"X-API-Key": opts.api_key} if opts.api_key else None
    tls = {"ssl": opts.ssl} if host.scheme == "wss" and opts.ssl is not None else {}
    try:
        return await connect(url, additional_headers=headers, open_timeout=opts.connect_timeout_s,
                             close_timeout=opts.close_timeout_s, max_size=None, **tls)
    except ConnectionRefusedError:
        raise ChatConnectionError(f"could not connect to {where}: connection refused (is the "
                                  f"server running, on that port?)") from None
    except ssl.SSLCertVerificationError as e:
        if e.verify_code in _NAME_MISMATCH:  # a trusted CA, but not this name: --ca-file won't do
            raise ChatConnectionError(
                f"could not connect to {where}: its TLS certificate does not name "
                f"{host.hostname!r} ({e.verify_message}); connect with a host name or address "
                f"it names, or make one that names this one (`moshi-ttt tls-cert DIR --host "
                f"{host.hostname}`), or pass --insecure") from None
        raise ChatConnectionError(
            f"could not connect to {where}: its TLS certificate is not trusted "
            f"({e.verify_message}); pass --ca-file with the certificate of the CA that signed "
            f"it (for `moshi-ttt tls-cert DIR`: DIR/ca.pem), or --insecure") from None
    except ssl.SSLError as e:
        raise ChatConnectionError(
            f"could not connect to {where}: TLS handshake failed ({e.reason or e}); is it "
            f"serving TLS? (a server started without --ssl-certfile speaks ws://)") from None
    except OSError as e:
        if isinstance(e, socket.gaierror):
            raise ChatConnectionError(f"could not connect to {where}: cannot resolve host name "
                                      f"{host.hostname!r} ({e.strerror})") from None
        if isinstance(e, TimeoutError):
            raise ChatConnectionError(f"could not connect to {where}: timed out after "
                                      f"{opts.connect_timeout_s:g} s") from None
        raise ChatConnectionError(f"could not connect to {where}: "
                                  f"{e.strerror or e}") from None
    except InvalidStatus as e:
        status = e.response.status_code
        hint = " (is the path /api/chat?)" if status in (403, 404) else ""
        raise ChatConnectionError(f"{where} refused the websocket connection to "
                                  f"{host.path}: HTTP {status}{hint}") from None
    except InvalidURI as e:
        raise ChatUsageError(f"invalid server URL {url!r}: {e}") from None
    except (InvalidHandshake, WebSocketException) as e:
        hint = " (if it serves TLS, use wss://)" if host.scheme == "ws" else ""
        raise ChatConnectionError(f"{where} is not a websocket server or broke the "
                                  f"handshake: {e}{hint}") from None


async def run_chat(url: str, frames: Iterable[np.ndarray] | AsyncIterable[np.ndarray],
                   opts: ChatOptions | None = None, *,
                   on_audio: Callable[[np.ndarray], None] | None = None,
                   on_text: Callable[[str], None] | None = None,
                   on_telemetry: Callable[[dict[str, Any]], None] | None = None,
                   stop: asyncio.Event | None = None) -> ChatResult:
    """One session: send `frames` (1920-sample float32 arrays at 24 kHz; include any trailing
    silence), collect the answers. Raises ChatError when no connection could be made; any
    failure after that is reported in the result (`error`, `error_kind`), with what was
    received so far. Setting `stop` ends the sending early (as Ctrl-C does). `on_telemetry`
    receives each TTT telemetry message as it arrives (also kept in `ChatResult.telemetry`)."""
    opts = opts or ChatOptions()
    stop = stop or asyncio.Event()
    url = chat_url(url, opts.mode, opts.telemetry)
    result = ChatResult(url=url, mode=opts.mode.value)
    t0 = time.perf_counter()
    ws = await _open(url, opts)
    sess = _Session(ws, opts, result, on_audio, on_text, on_telemetry)
    receiver = asyncio.create_task(sess.receive(), name="chat-receive")
    try:
        if not await _handshake(sess, stop):
            return result
        await sess.send_all(frames, stop)
        if not (sess.closed.is_set() or result.interrupted or result.error):
            await sess.drain()
    finally:
        sess.closing = True
        try:
            await ws.close(code=Close.NORMAL)
        except Exception:  # the socket is already gone: nothing to close
            logger.debug("close failed", exc_info=True)
        try:
            await asyncio.wait_for(receiver, opts.close_timeout_s + 1)
        except asyncio.TimeoutError:
            sess._fail("the server did not close the connection", "connection")
        result.audio = np.concatenate(sess.chunks) if sess.chunks else np.zeros(0, np.float32)
        result.wall_s = time.perf_counter() - t0
    return result


async def _handshake(sess: _Session, stop: asyncio.Event) -> bool:
    """Wait for the server's handshake (or its refusal); False if no session started."""
    deadline = time.perf_counter() + sess.opts.handshake_timeout_s
    r = sess.result
    while not r.started and not sess.closed.is_set():
        left = deadline - time.perf_counter()
        if stop.is_set():
            r.interrupted = True
            return False
        if left <= 0:
            sess._fail(f"no handshake from the server within {sess.opts.handshake_timeout_s:g} s",
                       "connection")
            return False
        sess.progress.clear()
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(sess.progress.wait())]
        await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
    return r.started and not sess.closed.is_set()

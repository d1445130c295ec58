"""One websocket conversation: protocol in, frames to the engine, frames out, protocol out.

Runs entirely on the event loop; the model work happens on the engine's thread. Three tasks per
session: the reader (socket -> decode -> engine.push), the writer (engine output -> encode ->
socket) and an idle watchdog. Any protocol violation ends the session with an ERROR message
(kind 5) naming what was wrong and a websocket close code; the row is released and reset, other
sessions are unaffected. An unexpected exception is logged with the session id and ends the
session with ERROR and 1011.

Audio (or codes) sent before the handshake is accepted, as moshi's own server does (it reads
nothing until its handshake is out, so the socket holds what arrived): moshi's clients stream
the microphone the moment the socket opens. It is decoded at once (an Ogg stream's first pages
carry its headers) and its most recent `early_frames` frames are kept, then queued for the model
right after the handshake and its metadata are written (with those read while they were written,
in the order sent); older ones are dropped (counted in
`moshi_ttt_frames_dropped_total{reason="before_handshake"}`), so a late handshake costs latency
only up to that bound and never closes the session.

Bounds per session: PING and CONTROL messages by a token bucket (`max_control_per_s`,
`control_burst`), idle by the time since the last audio or codes message that completed at least
one input frame (`idle_timeout_s`; a few samples at a time would otherwise hold a slot without
ever giving the model a frame), input by the engine's queue (`max_buffered_frames`, which also
bounds the audio one message may hold: an Ogg/Opus message is decoded page by page and refused
once it holds more), and output by the frames the client has
not taken (`max_pending_output`): those queued here plus, on Linux, those written to the socket
and not yet acknowledged by the client's TCP (read from the kernel: TCP_INFO's bytes acked and
the send queue), so a client that stops reading is found after that many frames plus what its
own kernel's receive buffer holds (acknowledged, unread: ~17 pcm frames, hundreds of Opus ones,
thousands in tokens mode, where uvicorn's unanswered keepalive pings close it first), not after
the server's send buffers (megabytes) filled too.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import itertools
import logging
import socket
import struct
import sys
import termios
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import sphn
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from websockets.exceptions import ConnectionClosed

from moshi_ttt import protocol
from moshi_ttt.protocol import (
    FRAME_SIZE, HANDSHAKE, NUM_CODEBOOKS, SAMPLE_RATE, TEXT_PADDING_IDS, Close, Kind, Mode,
    ProtocolError,
)

from .engine import (
    CapacityError, Engine, InputOverflow, SessionClosed, SessionFailed, SessionHandle,
    StepOutput,
)
from .memory import OPUS
from .metrics import ServerMetrics

logger = logging.getLogger(__name__)

_ids = itertools.count(1)


@dataclass(frozen=True)
class SessionLimits:
    """The per-session bounds (see the module docstring and `ServeSettings`)."""

    max_message_bytes: int = 1 << 20
    max_pending_output: int = 100
    idle_timeout_s: float = 30.0
    max_control_per_s: float = 10.0
    control_burst: int = 50
    early_frames: int = 25  # input frames kept from before the handshake

    @classmethod
    def from_settings(cls, s: Any) -> "SessionLimits":
        return cls(max_message_bytes=s.max_message_bytes,
                   max_pending_output=s.max_pending_output, idle_timeout_s=s.idle_timeout_s,
                   max_control_per_s=s.max_control_per_s, control_burst=s.control_burst,
                   early_frames=max(1, s.max_buffered_frames // 2))


class Reframer:
    """Cuts a stream of PCM chunks of any size into 1920-sample frames."""

    def __init__(self) -> None:
        self._buf = np.zeros(0, np.float32)

    def push(self, pcm: np.ndarray) -> list[np.ndarray]:
        self._buf = np.concatenate([self._buf, pcm.astype(np.float32, copy=False)])
        n = len(self._buf) // FRAME_SIZE
        frames = [self._buf[i * FRAME_SIZE:(i + 1) * FRAME_SIZE].copy() for i in range(n)]
        self._buf = self._buf[n * FRAME_SIZE:]
        return frames


class TokenBucket:
    """`rate` events per second sustained, `burst` at once; O(1) per event."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, float(burst)
        self.tokens = float(burst)
        self.t = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


_TCP_INFO_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info


class SendWindow:
    """How much of what this server wrote to a client's socket the client's TCP has taken:
    the bytes acknowledged (TCP_INFO) against those written (acknowledged + the kernel's send
    queue + the event loop's write buffer). Linux only; elsewhere `written` is None and the
    session falls back to its own output queue."""

    def __init__(self, transport: asyncio.Transport | None):
        self.transport = transport
        self._sock = transport.get_extra_info("socket") if transport is not None else None
        self.enabled = False
        if self._sock is not None and sys.platform.startswith("linux") \
                and self._sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                self.enabled = self._acked() is not None and self._outq() >= 0
            except OSError:
                self.enabled = False

    def _acked(self) -> int | None:
        info = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
        if len(info) < _TCP_INFO_BYTES_ACKED + 8:
            return None
        return struct.unpack_from("Q", info, _TCP_INFO_BYTES_ACKED)[0]

    def _outq(self) -> int:
        return struct.unpack("i", fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ,
                                              b"\0\0\0\0"))[0]

    def acked(self) -> int | None:
        """Bytes the client's TCP has acknowledged so far; None if unknown."""
        if not self.enabled:
            return None
        try:
            return self._acked()
        except (OSError, ValueError):  # the socket closed under us
            self.enabled = False
            return None

    def written(self) -> int | None:
        """Bytes handed to the socket so far, on the scale of `acked`; None if unknown."""
        acked = self.acked()
        if acked is None:
            return None
        try:
            return acked + self._outq() + self.transport.get_write_buffer_size()
        except (OSError, ValueError):
            self.enabled = False
            return None


def _transport_of(ws: WebSocket) -> asyncio.Transport | None:
    """The server protocol's transport behind a Starlette websocket (uvicorn hands the ASGI
    app its protocol's bound methods; middleware may wrap `send`, never `receive`)."""
    for fn in (ws._receive, ws._send):
        transport = getattr(getattr(fn, "__self__", None), "transport", None)
        # asyncio's or uvloop's (which does not subclass asyncio.Transport)
        if callable(getattr(transport, "get_write_buffer_size", None)) and \
                callable(getattr(transport, "get_extra_info", None)):
            return transport
    return None


def _new_opus_codecs() -> tuple[sphn.OpusStreamReader, sphn.OpusStreamWriter]:
    return sphn.OpusStreamReader(SAMPLE_RATE), sphn.OpusStreamWriter(SAMPLE_RATE)


_OGG_PAGE_START = b"OggS"  # how every Ogg page starts
# sphn 0.2.1's OpusStreamReader decodes into a fixed buffer: one `append_bytes` call whose pages
# hold more than this many samples fails with "opus_decode_float: invalid argument".
_OPUS_SAMPLES_PER_CALL = 120_000


class OpusMessageTooLong(ProtocolError):
    """An Ogg/Opus message holds more audio than a session may queue."""


def decode_opus_message(reader: sphn.OpusStreamReader, payload: bytes,
                        max_samples: int) -> np.ndarray:
    """The PCM of one Ogg/Opus message, fed to `reader` one Ogg page at a time: sphn decodes at
    most `_OPUS_SAMPLES_PER_CALL` samples per call, so a message of more than about 5 s failed
    as a whole. The reader keeps a partial page for the next call, so where the payload is cut
    does not change the result (a b"OggS" inside a page's data only makes one more cut): the
    PCM is that of the same stream sent in small messages, bit for bit. Decoding stops (and
    OpusMessageTooLong is raised) once the message holds more than `max_samples`. Run it on
    the codec thread."""
    pieces: list[np.ndarray] = []
    total, start = 0, 0
    while start < len(payload):
        end = payload.find(_OGG_PAGE_START, start + 1)
        end = len(payload) if end < 0 else end
        pcm = reader.append_bytes(payload[start:end])
        start = end
        if pcm.size:
            pieces.append(pcm)
            total += pcm.size
        if total > max_samples:
            frames = max_samples // FRAME_SIZE
            raise OpusMessageTooLong(
                f"Ogg/Opus message holds more than {frames} frames "
                f"({frames * FRAME_SIZE / SAMPLE_RATE:.2f} s) of audio: at most "
                f"max_buffered_frames ({frames}) frames per message; send the stream in "
                f"smaller messages (Moshi's client sends each Ogg page as it is made)",
                Close.TOO_BIG)
    if not pieces:
        return np.zeros(0, np.float32)
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


@dataclass
class _End:
    """Why a session ends: sent as an ERROR message (if any) and the close code."""

    code: int
    reason: str
    error: str | None = None


def _client_gone(ws: WebSocket, e: BaseException) -> bool:
    """Whether an exception means the client went away (not a bug of ours)."""
    if isinstance(e, (WebSocketDisconnect, ConnectionError, ConnectionClosed, OSError)):
        return True
    # Starlette raises RuntimeError for a send or receive on a socket it knows is closed.
    return isinstance(e, RuntimeError) and not isinstance(e, (SessionClosed, InputOverflow)) \
        and (ws.client_state == WebSocketState.DISCONNECTED
             or ws.application_state == WebSocketState.DISCONNECTED)


class ChatSession:
    def __init__(self, ws: WebSocket, engine: Engine, mode: Mode, metrics: ServerMetrics,
                 tokenizer: Any, limits: SessionLimits, card: int, info: dict[str, Any],
                 telemetry: bool = True):
        self.ws = ws
        self.engine = engine
        self.mode = mode
        self.metrics = metrics
        self.tokenizer = tokenizer
        self._vocab = tokenizer.vocab_size() if tokenizer is not None else 0
        self.limits = limits
        self.max_buffered_frames = engine.cfg.max_buffered_frames
        self.card = card
        self.info = info
        # send this session's TTT telemetry (when the engine measures it)
        self.telemetry = telemetry and engine.telemetry is not None
        self.id = f"s{next(_ids)}"
        self.out: asyncio.Queue = asyncio.Queue(maxsize=limits.max_pending_output)
        self.handle: SessionHandle | None = None
        self.loop = asyncio.get_running_loop()
        self.reframer = Reframer()
        # Opus mode: made, fed and freed on the codec thread (see server.memory)
        self.opus_in: sphn.OpusStreamReader | None = None
        self.opus_out: sphn.OpusStreamWriter | None = None
        self.handshake_sent = False
        self.started = time.monotonic()
        self.last_input = self.started  # last AUDIO or CODES message that made a frame
        self.ended: _End | None = None
        self._tasks: set[asyncio.Task] = set()
        self._control = TokenBucket(limits.max_control_per_s, limits.control_burst)
        self._early: collections.deque = collections.deque(maxlen=limits.early_frames)
        self.early_dropped = 0
        self._window = SendWindow(_transport_of(ws))
        self._marks: collections.deque[int] = collections.deque()  # per frame: bytes written

    # -- engine -> event loop ----------------------------------------------------------------------
    def _deliver(self, item: StepOutput | SessionFailed) -> None:
        """Called on the model thread."""
        try:
            self.loop.call_soon_threadsafe(self._enqueue, item)
        except RuntimeError:  # loop closed: the session is gone
            pass

    def _enqueue(self, item: StepOutput | SessionFailed) -> None:
        if self.ended is not None:
            return
        if isinstance(item, SessionFailed):
            code = Close.GOING_AWAY if item.kind == "shutdown" else Close.INTERNAL
            self.abort(_End(code, item.kind, item.reason))
            return
        untaken = self.untaken_frames()
        if untaken >= self.limits.max_pending_output:
            self.metrics.errors.labels("slow_reader").inc()
            self.abort(_End(Close.POLICY, "slow reader",
                            f"client is not reading: {untaken} output frames not taken "
                            f"(limit {self.limits.max_pending_output}, "
                            f"{self.limits.max_pending_output * 0.08:.1f} s of audio)"))
            return
        self.out.put_nowait(item)

    def untaken_frames(self) -> int:
        """Output frames the client has not taken: queued here, or written to the socket and
        not yet acknowledged by the client's TCP."""
        acked = self._window.acked()
        if acked is None:
            self._marks.clear()
        while self._marks and self._marks[0] <= acked:
            self._marks.popleft()
        return self.out.qsize() + len(self._marks)

    # -- the session ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Open a slot, hand-shake, then stream both ways until one side ends."""
        try:
            self.handle = self.engine.open(self.mode is not Mode.TOKENS, self._deliver)
        except CapacityError as e:
            self.metrics.sessions_refused.labels("capacity").inc()
            await self._finish(_End(Close.TRY_AGAIN, "server full", str(e)))
            return
        except SessionClosed as e:  # shutting down, or the model thread failed
            self.metrics.sessions_refused.labels("unavailable").inc()
            await self._finish(_End(Close.GOING_AWAY, "unavailable", str(e)))
            return
        self.metrics.sessions_total.inc()
        self.metrics.sessions_active.inc()
        ready = asyncio.wrap_future(self.handle.ready)  # row reset on the model thread
        # Never cancelled from here (the model thread settles it, under its lock); its failure
        # after the session ended needs no one to read it.
        ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            if self.mode is Mode.OPUS:
                self.opus_in, self.opus_out = await OPUS.run(_new_opus_codecs)
            self._spawn(self._read(), "read")
            self._spawn(self._watch_idle(), "idle")
            await asyncio.wait({ready, *self._tasks}, return_when=asyncio.FIRST_COMPLETED)
            if ready.done() and self.ended is None:
                ready.result()  # SessionClosed if the row could not be readied
                await self._hello()
                self._spawn(self._write(), "write")
                await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        except SessionClosed as e:
            self.abort(_End(Close.GOING_AWAY, "session closed", str(e)))
        except asyncio.CancelledError:
            if self.ended is None:  # cancelled from outside, not by abort()
                raise
        except Exception as e:
            self._failed(e, "run")
        finally:
            await self._settle_tasks()
            OPUS.release(self.opus_in, self.opus_out)
            self.opus_in = self.opus_out = None
            self.engine.close(self.handle)
            self.metrics.sessions_active.dec()
            await self._finish(self.ended or _End(Close.NORMAL, "bye"))
            logger.info("session %s (slot %d, %s) ended after %.1f s: %d frames in, %d out%s; "
                        "%s", self.id, self.handle.slot, self.mode.value,
                        time.monotonic() - self.started, self.handle.frames_in,
                        self.handle.frames_out,
                        f", {self.early_dropped} dropped before the handshake"
                        if self.early_dropped else "", (self.ended or _End(0, "")).reason)

    def _spawn(self, coro: Any, what: str) -> None:
        self._tasks.add(asyncio.create_task(coro, name=f"{self.id}-{what}"))

    async def _settle_tasks(self) -> None:
        """Cancel the tasks and wait until they have stopped (none may write after this), then
        account for how each ended and let them go."""
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        for t in self._tasks:
            if not t.cancelled() and t.exception() is not None:
                self._failed(t.exception(), t.get_name())
        # A finished task keeps its exception (CancelledError too), whose traceback holds the
        # task's frame and so this session: a cycle through this set, freed only by Python's
        # rare full collection (it kept every ended session's socket for thousands of sessions).
        self._tasks.clear()

    def _failed(self, e: BaseException, where: str) -> None:
        """An exception ended part of the session: the client went away, or a bug (logged with
        the session id, ERROR and 1011 to the client)."""
        if _client_gone(self.ws, e):
            self.abort(_End(Close.NORMAL, f"client went away ({type(e).__name__})"))
            return
        logger.error("session %s: %s failed: %s: %s", self.id, where, type(e).__name__, e,
                     exc_info=e)
        self.metrics.errors.labels("internal").inc()
        self.abort(_End(Close.INTERNAL, "internal error",
                        f"internal server error ({type(e).__name__}) in session {self.id}"))

    async def _hello(self) -> None:
        """Handshake and metadata, then the frames that arrived before them."""
        meta = protocol.metadata({
            "type": "session", "session": self.id, "mode": self.mode.value,
            "slot": self.handle.slot, "sample_rate": SAMPLE_RATE, "frame_size": FRAME_SIZE,
            "max_buffered_frames": self.max_buffered_frames,
            "telemetry_every": self.engine.cfg.telemetry_every if self.telemetry else 0,
            **self.info})
        await self.ws.send_bytes(HANDSHAKE)
        await self.ws.send_bytes(meta)
        # No await from here to the last push: a message read while the two sends above waited
        # (a slow socket) went to `_early` after the older frames, and one read from now on
        # goes to the engine after all of them.
        self.handshake_sent = True
        early, self._early = list(self._early), collections.deque()
        try:
            for frame in early:
                self.engine.push(self.handle, frame)
        except InputOverflow as e:  # cannot happen below the bound; told if it does
            self.metrics.errors.labels("input_overflow").inc()
            self.abort(_End(Close.POLICY, "input overflow", str(e)))

    def abort(self, end: _End) -> None:
        """End the session now (first reason wins): every task stops, even one blocked on a
        socket that the peer stopped reading; `run` then sends the error and closes."""
        if self.ended is None:
            self.ended = end
        for t in self._tasks:
            t.cancel()

    async def _watch_idle(self) -> None:
        """Close a session that sends no audio or codes for `idle_timeout_s` (PING and
        CONTROL do not count, nor input short of a whole frame: they would hold a slot
        forever)."""
        timeout = self.limits.idle_timeout_s
        while self.ended is None:
            left = self.last_input + timeout - time.monotonic()
            if left <= 0:
                self.metrics.errors.labels("idle").inc()
                self.abort(_End(Close.POLICY, "idle",
                                f"no audio for {timeout:g} s: a session streams audio (silence "
                                f"too) every 80 ms; PING and CONTROL messages, and audio "
                                f"short of a whole {FRAME_SIZE}-sample frame, do not count"))
                return
            await asyncio.sleep(left)

    async def _read(self) -> None:
        while self.ended is None:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                self.abort(_End(Close.NORMAL, "client closed"))
                return
            try:
                await self._on_message(msg.get("bytes"))
            except ProtocolError as e:
                self.metrics.errors.labels("protocol").inc()
                self.abort(_End(e.close_code, "protocol error", str(e)))
            except InputOverflow as e:
                self.metrics.errors.labels("input_overflow").inc()
                self.abort(_End(Close.POLICY, "input overflow", str(e)))
            except SessionClosed:
                return  # whoever closed it reports why

    async def _on_message(self, data: bytes | None) -> None:
        if data is None:
            raise ProtocolError("text websocket frames are not part of the protocol: send "
                                "binary messages whose first byte is the message kind")
        if len(data) > self.limits.max_message_bytes:
            raise ProtocolError(f"message of {len(data)} bytes is over the limit of "
                                f"{self.limits.max_message_bytes} bytes", Close.TOO_BIG)
        if data and data[0] in (Kind.PING, Kind.CONTROL):  # the cheap path: no unpacking
            if not self._control.take():
                self.metrics.errors.labels("control_flood").inc()
                raise ProtocolError(
                    f"too many PING/CONTROL messages: at most {self.limits.control_burst} at "
                    f"once and {self.limits.max_control_per_s:g} per second", Close.POLICY)
            return
        kind, payload = protocol.unpack(data)
        frames = await self._frames(kind, payload)
        if frames:  # input that gives the model nothing (a few samples) does not keep a slot
            self.last_input = time.monotonic()
        if not self.handshake_sent:
            for frame in frames:
                if len(self._early) == self._early.maxlen:
                    self.early_dropped += 1
                    self.metrics.frames_dropped.labels("before_handshake").inc()
                self._early.append(frame)
            return
        for frame in frames:
            self.engine.push(self.handle, frame)

    async def _frames(self, kind: Kind, payload: bytes) -> list[np.ndarray]:
        """The input frames in a client message: float32 [1920] PCM, or int [8] codes."""
        if kind is Kind.AUDIO:
            if self.mode is Mode.TOKENS:
                raise ProtocolError("audio messages are not accepted in tokens mode: send kind 7 "
                                    "(CODES) with 8 int32 codes per frame")
            if self.mode is Mode.OPUS:
                try:
                    pcm = await OPUS.run(decode_opus_message, self.opus_in, payload,
                                         self.max_buffered_frames * FRAME_SIZE)
                except OpusMessageTooLong:
                    raise
                except Exception as e:
                    hint = (f" (or one Ogg page holds more than {_OPUS_SAMPLES_PER_CALL} "
                            f"samples, {_OPUS_SAMPLES_PER_CALL / SAMPLE_RATE:g} s, more than "
                            f"the decoder takes at once)" if "invalid argument" in str(e) else "")
                    raise ProtocolError(f"malformed Ogg/Opus audio: {e}{hint}",
                                        Close.INVALID) from None
                if pcm.size and not np.isfinite(pcm).all():
                    raise ProtocolError("decoded audio contains NaN or inf", Close.INVALID)
            else:
                pcm = protocol.pcm_from_bytes(payload)
            return self.reframer.push(pcm)
        if kind is Kind.CODES:
            if self.mode is not Mode.TOKENS:
                raise ProtocolError(f"codes messages (kind 7) need tokens mode; this session is "
                                    f"in {self.mode.value} mode: send kind 1 (AUDIO)")
            return list(protocol.codes_from_bytes(payload, NUM_CODEBOOKS, self.card))
        raise ProtocolError(f"message kind {kind.value} ({kind.name}) is sent by the server, "
                            f"never by a client")

    async def _write(self) -> None:
        while True:
            await self._send_output(await self.out.get())
            written = self._window.written()
            if written is not None:
                self._marks.append(written)

    async def _send_output(self, o: StepOutput) -> None:
        if self.mode is Mode.TOKENS:
            await self.ws.send_bytes(protocol.codes_to_bytes(
                np.concatenate([[o.text_token], o.codes])[None]))
        elif o.pcm is not None:
            if self.mode is Mode.OPUS:
                data = await OPUS.run(self.opus_out.append_pcm, o.pcm)
                if data:
                    await self.ws.send_bytes(protocol.pack(Kind.AUDIO, data))
            else:
                await self.ws.send_bytes(protocol.pack(Kind.AUDIO, protocol.pcm_to_bytes(o.pcm)))
        piece = self._text(o.text_token)
        if piece:
            await self.ws.send_bytes(protocol.text(piece))
        if o.telemetry is not None and self.telemetry:
            await self.ws.send_bytes(protocol.metadata(
                {"type": o.telemetry["type"], "session": self.id, **o.telemetry}))

    def _text(self, token: int) -> str:
        """The text piece of a token; padding, "not generated yet", control pieces (<s>, </s>,
        <unk>) and ids the tokenizer does not have (text_card may exceed its vocabulary) show
        nothing."""
        if token < 0 or token in TEXT_PADDING_IDS or self.tokenizer is None \
                or token >= self._vocab or self.tokenizer.is_control(token) \
                or self.tokenizer.is_unknown(token):
            return ""
        return self.tokenizer.id_to_piece(token).replace("\u2581", " ")

    async def _finish(self, end: _End) -> None:
        """Tell the client why (ERROR message), then close with the code; bounded in time, since
        the peer may have stopped reading."""
        if self.ws.application_state != WebSocketState.CONNECTED or \
                self.ws.client_state != WebSocketState.CONNECTED:
            return

        async def send() -> None:
            if end.error:
                await self.ws.send_bytes(protocol.error(end.error))
            await self.ws.close(code=int(end.code), reason=end.reason[:120])

        try:
            await asyncio.wait_for(send(), timeout=2.0)
        except Exception:  # the peer may already be gone
            logger.debug("session %s: close failed", self.id, exc_info=True)

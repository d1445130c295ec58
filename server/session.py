"""One websocket conversation: protocol in, frames to the engine, frames out, protocol out.

Runs entirely on the event loop; the model work happens on the engine's thread. Two tasks per
session: the reader (socket -> decode -> engine.push) and the writer (engine output -> encode ->
socket). Any protocol violation ends the session with an ERROR message (kind 5) naming what was
wrong and a websocket close code; the row is released and reset, other sessions are unaffected.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import sphn
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from moshi_ttt import protocol
from moshi_ttt.protocol import (
    FRAME_SIZE, HANDSHAKE, NUM_CODEBOOKS, SAMPLE_RATE, TEXT_PADDING_IDS, Close, Kind, Mode,
    ProtocolError,
)

from .engine import (
    CapacityError, Engine, InputOverflow, SessionClosed, SessionFailed, SessionHandle,
    StepOutput,
)
from .metrics import ServerMetrics

logger = logging.getLogger(__name__)

_ids = itertools.count(1)


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


@dataclass
class _End:
    """Why a session ends: sent as an ERROR message (if any) and the close code."""

    code: int
    reason: str
    error: str | None = None


class ChatSession:
    def __init__(self, ws: WebSocket, engine: Engine, mode: Mode, metrics: ServerMetrics,
                 tokenizer: Any, max_message_bytes: int, max_pending_output: int,
                 card: int, info: dict[str, Any], idle_timeout_s: float = 30.0):
        self.ws = ws
        self.engine = engine
        self.mode = mode
        self.metrics = metrics
        self.tokenizer = tokenizer
        self._vocab = tokenizer.vocab_size() if tokenizer is not None else 0
        self.max_buffered_frames = engine.cfg.max_buffered_frames
        self.max_message_bytes = max_message_bytes
        self.idle_timeout_s = idle_timeout_s
        self.card = card
        self.info = info
        self.id = f"s{next(_ids)}"
        self.out: asyncio.Queue = asyncio.Queue(maxsize=max_pending_output)
        self.handle: SessionHandle | None = None
        self.loop = asyncio.get_running_loop()
        self.reframer = Reframer()
        self.opus_in = sphn.OpusStreamReader(SAMPLE_RATE) if mode is Mode.OPUS else None
        self.opus_out = sphn.OpusStreamWriter(SAMPLE_RATE) if mode is Mode.OPUS else None
        self.handshake_sent = False
        self.started = time.monotonic()
        self.ended: _End | None = None
        self._tasks: set[asyncio.Task] = set()

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
        try:
            self.out.put_nowait(item)
        except asyncio.QueueFull:
            self.metrics.errors.labels("slow_reader").inc()
            self.abort(_End(Close.POLICY, "slow reader",
                            f"client is not reading: {self.out.maxsize} output frames unsent"))

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
        reader = asyncio.create_task(self._read(), name=f"{self.id}-read")
        self._tasks.add(reader)
        try:
            await asyncio.wrap_future(self.handle.ready)  # row reset on the model thread
            if self.ended is None:
                await self.ws.send_bytes(HANDSHAKE)
                self.handshake_sent = True
                await self.ws.send_bytes(protocol.metadata({
                    "session": self.id, "mode": self.mode.value, "slot": self.handle.slot,
                    "sample_rate": SAMPLE_RATE, "frame_size": FRAME_SIZE,
                    "max_buffered_frames": self.max_buffered_frames, **self.info}))
                writer = asyncio.create_task(self._write(), name=f"{self.id}-write")
                self._tasks.add(writer)
                await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        except SessionClosed as e:
            self.abort(_End(Close.GOING_AWAY, "session closed", str(e)))
        except asyncio.CancelledError:
            if self.ended is None:  # cancelled from outside, not by abort()
                raise
        except Exception as e:  # the socket broke under us
            self.abort(_End(Close.NORMAL, f"connection lost ({type(e).__name__})"))
        finally:
            for t in self._tasks:
                t.cancel()
            for t in self._tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    e = t.exception()
                    if not isinstance(e, (WebSocketDisconnect, OSError, RuntimeError)):
                        logger.error("session %s: %s failed", self.id, t.get_name(),
                                     exc_info=e)
                        self.metrics.errors.labels("internal").inc()
                        self.abort(_End(Close.INTERNAL, "internal error",
                                        f"internal server error: {type(e).__name__}"))
                    else:
                        self.abort(_End(Close.NORMAL, "client went away"))
            self.engine.close(self.handle)
            self.metrics.sessions_active.dec()
            await self._finish(self.ended or _End(Close.NORMAL, "bye"))
            logger.info("session %s (slot %d, %s) ended after %.1f s: %d frames in, %d out; %s",
                        self.id, self.handle.slot, self.mode.value,
                        time.monotonic() - self.started, self.handle.frames_in,
                        self.handle.frames_out, (self.ended or _End(0, "")).reason)

    def abort(self, end: _End) -> None:
        """End the session now (first reason wins): both tasks stop, even one blocked on a
        socket that the peer stopped reading; `run` then sends the error and closes."""
        if self.ended is None:
            self.ended = end
        for t in self._tasks:
            t.cancel()

    async def _read(self) -> None:
        while self.ended is None:
            try:
                msg = await asyncio.wait_for(self.ws.receive(), self.idle_timeout_s)
            except asyncio.TimeoutError:
                self.metrics.errors.labels("idle").inc()
                self.abort(_End(Close.POLICY, "idle",
                                f"no message for {self.idle_timeout_s:g} s: a session streams "
                                f"audio (silence too) every 80 ms"))
                return
            if msg["type"] == "websocket.disconnect":
                self.abort(_End(Close.NORMAL, "client closed"))
                return
            try:
                data = msg.get("bytes")
                if data is None:
                    raise ProtocolError("text websocket frames are not part of the protocol: send "
                                        "binary messages whose first byte is the message kind")
                if len(data) > self.max_message_bytes:
                    raise ProtocolError(f"message of {len(data)} bytes is over the limit of "
                                        f"{self.max_message_bytes} bytes", Close.TOO_BIG)
                if not self.handshake_sent:
                    raise ProtocolError("message received before the server's handshake: wait "
                                        "for the handshake (kind 0) before sending",
                                        Close.POLICY)
                self._handle(*protocol.unpack(data))
            except ProtocolError as e:
                self.metrics.errors.labels("protocol").inc()
                self.abort(_End(e.close_code, "protocol error", str(e)))
            except InputOverflow as e:
                self.metrics.errors.labels("input_overflow").inc()
                self.abort(_End(Close.POLICY, "input overflow", str(e)))
            except SessionClosed:
                return  # whoever closed it reports why

    def _handle(self, kind: Kind, payload: bytes) -> None:
        assert self.handle is not None
        if kind in (Kind.PING, Kind.CONTROL):
            return
        if kind is Kind.AUDIO:
            if self.mode is Mode.TOKENS:
                raise ProtocolError("audio messages are not accepted in tokens mode: send kind 7 "
                                    "(CODES) with 8 int32 codes per frame")
            if self.mode is Mode.OPUS:
                try:
                    pcm = self.opus_in.append_bytes(payload)
                except Exception as e:
                    raise ProtocolError(f"malformed Ogg/Opus audio: {e}", Close.INVALID) from None
                if pcm.size and not np.isfinite(pcm).all():
                    raise ProtocolError("decoded audio contains NaN or inf", Close.INVALID)
            else:
                pcm = protocol.pcm_from_bytes(payload)
            for frame in self.reframer.push(pcm):
                self.engine.push(self.handle, frame)
            return
        if kind is Kind.CODES:
            if self.mode is not Mode.TOKENS:
                raise ProtocolError(f"codes messages (kind 7) need tokens mode; this session is "
                                    f"in {self.mode.value} mode: send kind 1 (AUDIO)")
            for row in protocol.codes_from_bytes(payload, NUM_CODEBOOKS, self.card):
                self.engine.push(self.handle, row)
            return
        raise ProtocolError(f"message kind {kind.value} ({kind.name}) is sent by the server, "
                            f"never by a client")

    async def _write(self) -> None:
        while True:
            await self._send_output(await self.out.get())

    async def _send_output(self, o: StepOutput) -> None:
        if self.mode is Mode.TOKENS:
            await self.ws.send_bytes(protocol.codes_to_bytes(
                np.concatenate([[o.text_token], o.codes])[None]))
        elif o.pcm is not None:
            if self.mode is Mode.OPUS:
                data = self.opus_out.append_pcm(o.pcm)
                if data:
                    await self.ws.send_bytes(protocol.pack(Kind.AUDIO, data))
            else:
                await self.ws.send_bytes(protocol.pack(Kind.AUDIO, protocol.pcm_to_bytes(o.pcm)))
        piece = self._text(o.text_token)
        if piece:
            await self.ws.send_bytes(protocol.text(piece))

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

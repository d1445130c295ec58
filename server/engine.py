"""`Engine`: one model, batch rows as session slots, stepped on its own thread.

Each step advances every session that has an input frame ready by one 80 ms frame, together:

    audio rows:  PCM frame --Mimi.encode--> 8 user codes --+
    token rows:  8 user codes -----------------------------+--> LMGen.step --> text token + 8
                                                               Moshi codes --Mimi.decode--> PCM

A step costs what its sessions cost: sessions hold the first rows (a new one takes the lowest
free row; when one in the middle leaves, the last row's session moves into its row, state and
all: `server.rows.RowStates.move_row`), and each step runs only the smallest bucket of rows
(1, 2, 4, ... capacity) that holds the rows with a frame, on views of those rows' states
(`RowStates.prefix`; on GPU each bucket has its own CUDA graphs). Rows in the bucket without a
frame ready (a slow client) are masked out with moshi's exec mask: their KV cache, codec buffers
and TTT fast weights do not move. A new session's row is reset by
mask (KV cache cleared, generation state, codec state, TTT fast weights back to the trained W0);
every frame then updates that row's TTT state, which no other row reads.

The thread never touches sockets. Sessions push frames with `push` (bounded queue, from the event
loop) and receive `StepOutput`s through the callback they registered; a diverged session (NaN or
inf in its TTT state, flagged on device during the step) receives `SessionFailed` and its row is
reset, while the other rows continue. A step that raises fails the sessions in it and the engine
goes on; `max_step_failures` steps failing in a row (a device in a failed state) fail the engine:
`failure` is set, every session is told, and new sessions are refused.

Audio rows follow moshi's own server on a session's first frame: it is encoded and stepped, then
the row's Mimi state is reset, so that the second frame is encoded with the codec's start-of-stream
padding again (moshi/server.py, `skip_frames`: the first frame is in the model's past).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import numpy as np
import torch
from moshi.models.lm import LMGen, LMModel

from moshi_ttt.model import ttt_blocks
from moshi_ttt.protocol import FRAME_RATE, FRAME_SIZE, NUM_CODEBOOKS
from moshi_ttt.streaming import reset_rows
from moshi_ttt.telemetry import TelemetryReader, telemetry_message

from .metrics import ServerMetrics
from .rows import RowStates
from .settings import BATCH_CLOCKS
from .slots import CapacityError, SessionSlots

logger = logging.getLogger(__name__)

FRAME_S = 1 / FRAME_RATE

__all__ = ["Engine", "EngineConfig", "SessionHandle", "StepOutput", "SessionFailed",
           "InputOverflow", "SessionClosed", "CapacityError", "WarmupDiverged"]


class InputOverflow(RuntimeError):
    """A session queued more input frames than allowed: it sends faster than the model runs."""


class SessionClosed(RuntimeError):
    """The session's slot was released (closed, failed, or the engine stopped)."""


class WarmupDiverged(ValueError):
    """The TTT state turned non-finite during warm-up: the model cannot serve anyone."""


class _EngineFailed(Exception):
    """Too many model steps failed in a row: the model thread gives up."""


@dataclass(frozen=True)
class StepOutput:
    """The model's answer to one input frame of one session."""

    text_token: int  # -2 while the model's delays fill
    codes: np.ndarray  # [8] Moshi's audio codes, -2 while the delays fill
    pcm: np.ndarray | None  # [1920] float32 decoded audio (audio sessions, once generated)
    # every `telemetry_every` steps: the session's TTT telemetry since the last one
    # (`moshi_ttt.telemetry.telemetry_message`, without the session id)
    telemetry: dict[str, Any] | None = None


@dataclass(frozen=True)
class SessionFailed:
    reason: str
    kind: str  # metrics label, e.g. "nonfinite_ttt_state", "internal"


Delivery = Union[StepOutput, SessionFailed]


@dataclass
class EngineConfig:
    capacity: int
    use_sampling: bool = True
    temp: float = 0.8
    temp_text: float = 0.7
    top_k: int = 250
    top_k_text: int = 25
    batch_wait_s: float = 0.02
    # When a step runs, if not every active session has a frame ready: "window", batch_wait_s
    # after the first frame is ready (or the model is free); "tick", a frame period after the
    # last step took its frames: one step per period, whoever is in (`_take`)
    batch_clock: str = "window"
    max_buffered_frames: int = 50
    max_step_failures: int = 3  # steps (or row resets) failing in a row that fail the engine
    telemetry_every: int = 12  # steps between TTT telemetry reads (0: none); ~1 s at 12.5 Hz
    telemetry_input_dependence: bool = True  # measure it at each read (64 probe queries)


def _discard(item: Delivery) -> None:
    """Where a closed handle's late outputs go."""


@dataclass(eq=False)
class SessionHandle:
    """A session's claim on one batch row."""

    slot: int
    generation: int
    wants_audio: bool  # decode Moshi's codes to PCM for this session
    deliver: Callable[[Delivery], None]  # called on the model thread
    inbox: collections.deque = field(default_factory=collections.deque)  # (pushed at, frame)
    last_push: float = field(default_factory=time.monotonic)
    frames_in: int = 0
    frames_out: int = 0
    primed: bool = False  # the first audio frame was encoded and the row's codec re-primed
    closed: bool = False
    ready: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Engine:
    def __init__(self, lm: LMModel, mimi: Any, cfg: EngineConfig,
                 metrics: ServerMetrics | None = None):
        self.lm = lm
        self.mimi = mimi
        self.cfg = cfg
        self.device = next(lm.parameters()).device
        self.metrics = metrics or ServerMetrics()
        self.slots = SessionSlots(cfg.capacity)
        self.lm_gen = LMGen(lm, use_sampling=cfg.use_sampling, temp=cfg.temp,
                            temp_text=cfg.temp_text, top_k=cfg.top_k, top_k_text=cfg.top_k_text,
                            support_out_of_sync=True)
        S = cfg.capacity
        self.lm_gen.streaming_forever(S)
        if mimi is not None:
            mimi.streaming_forever(S)
        # steps run on the first rows only (a bucket), sessions are moved to stay there
        self.rows = RowStates([self.lm_gen] + ([mimi] if mimi is not None else []), S)
        self.moves = 0  # sessions moved to a lower row
        self._handles: dict[int, SessionHandle] = {}
        self._resets: set[int] = set()
        self._tasks: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = \
            collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        # (seconds, sessions stepped, rows stepped) of the last steps
        self.recent: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=4096)
        # Main-transformer blocks only: moshi streams the depformer "detached", with a fresh state
        # inside every depformer step, so a depformer block holds no state between steps.
        self._blocks = [a.block for a in ttt_blocks(lm) if a.component == "transformer"]
        self.telemetry = (TelemetryReader(self._blocks, cfg.telemetry_input_dependence)
                          if cfg.telemetry_every > 0 and self._blocks else None)
        # the step's inputs, refilled every step (`_inputs`)
        self._host_in = torch.zeros(S, self._PCM + FRAME_SIZE,
                                    pin_memory=self.device.type == "cuda")
        self.failure: str | None = None  # set if the model thread died or gave up
        self.failures_in_row = 0  # steps or resets that raised, since the last one that did not
        self._last_step_end = 0.0
        self._last_take = 0.0  # when the last step's frames were taken (batch_clock "tick")
        if cfg.batch_clock not in BATCH_CLOCKS:
            raise ValueError(f"batch_clock must be one of {BATCH_CLOCKS}, got {cfg.batch_clock!r}")

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="moshi-ttt-engine", daemon=True)
        self._thread.start()

    def stop(self, reason: str = "server shutting down") -> None:
        """Fail every open session with `reason` and stop the thread (pending tasks too)."""
        with self._cond:
            self._stopping = True
            handles = list(self._handles.values())
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        for h in handles:
            self._detach(h, SessionFailed(reason, "shutdown"))
        while self._tasks:
            _, fut = self._tasks.popleft()
            fut.cancel()

    @torch.no_grad()
    def warmup(self, frames: int, should_stop: Callable[[], bool] | None = None) -> float:
        """Run `frames` steps with every row active through both codec directions, then (at
        least two) steps of every smaller bucket of rows (on GPU this also captures moshi's CUDA
        graphs, each bucket its own), then reset every row. Returns seconds per step of the full
        batch. Raises WarmupDiverged if the TTT state turned non-finite (every session would
        fail on its first frames). `should_stop` is asked between steps (a shutdown during
        start-up)."""
        if frames <= 0:
            return 0.0
        S = self.cfg.capacity
        bad = torch.zeros(S, dtype=torch.bool, device=self.device)
        done = 0
        dt = 0.0
        for n in reversed(self.rows.buckets):
            everyone = torch.ones(n, dtype=torch.bool, device=self.device)
            t0 = time.perf_counter()
            steps = 0
            for _ in range(frames if n == S else 2):  # 2: eager, then graph capture
                if should_stop is not None and should_stop():
                    break
                pcm = torch.zeros(n, 1, FRAME_SIZE, device=self.device)
                bad[:n] |= self._step_tensors(
                    pcm, torch.zeros(n, NUM_CODEBOOKS, 1, dtype=torch.long, device=self.device),
                    everyone, *(2 * [everyone if self.mimi is not None else None]))[2]
                steps += 1
            self._sync()
            if n == S:
                dt = (time.perf_counter() - t0) / max(steps, 1)
            done += steps
        if bool(bad.any()):
            layers = [f"transformer.layers.{a.layer}" for a in ttt_blocks(self.lm)
                      if a.component == "transformer"
                      and bool(a.block._streaming_state.nonfinite.any())]
            raise WarmupDiverged(
                f"the TTT state turned non-finite (NaN or inf) within {done} warm-up step(s) of "
                f"silence, in {', '.join(layers) or 'a TTT layer'}: every session would fail on "
                f"its first frames; the checkpoint's TTT weights (or inner learning rate) "
                f"diverge")
        self._reset(everyone)
        if self.telemetry is not None:
            self.telemetry.prepare()  # W0's figures, once, before anyone's first read
        self._sync()
        return dt

    # -- called from the event loop ----------------------------------------------------------------
    def open(self, wants_audio: bool, deliver: Callable[[Delivery], None]) -> SessionHandle:
        """Claim a free row (CapacityError if none). The row is reset on the model thread before
        its first frame; `handle.ready` completes once it has been."""
        if wants_audio and self.mimi is None:
            raise ValueError("this engine has no codec: only token sessions are possible")
        slot, gen = self.slots.acquire()
        h = SessionHandle(slot, gen, wants_audio, deliver)
        with self._cond:
            if self._stopping or self.failure:
                self.slots.release(slot, gen)
                raise SessionClosed(self.failure or "the server is shutting down")
            self._handles[slot] = h
            self._resets.add(slot)
            self._cond.notify_all()
        return h

    def push(self, h: SessionHandle, frame: np.ndarray) -> None:
        """Queue one input frame: float32 [1920] PCM (audio sessions) or int [8] codes."""
        with self._cond:
            if h.closed:
                raise SessionClosed("session is closed")
            if len(h.inbox) >= self.cfg.max_buffered_frames:
                raise InputOverflow(
                    f"input buffer full: {len(h.inbox)} frames queued (limit "
                    f"{self.cfg.max_buffered_frames}, {self.cfg.max_buffered_frames * 0.08:.1f} s)"
                    f"; the client sends faster than the model runs")
            h.last_push = time.monotonic()
            h.inbox.append((h.last_push, frame))
            h.frames_in += 1
            self._cond.notify_all()

    def close(self, h: SessionHandle) -> None:
        """Release the session's row (idempotent); queued frames are dropped, the row is reset."""
        self._detach(h, None)

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the model thread between two steps (inspection, maintenance)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                fut.cancel()
                return fut
            self._tasks.append((fn, fut))
            self._cond.notify_all()
        return fut

    @property
    def active(self) -> int:
        return self.slots.active

    def stats(self) -> dict[str, Any]:
        """Step latency over the last (up to 4096) steps: what a load test reads."""
        recent = list(self.recent)
        out: dict[str, Any] = {"steps": self.steps, "window": len(recent),
                               "batch_clock": self.cfg.batch_clock,
                               "buckets": list(self.rows.buckets),
                               "rows_last_step": self.rows.current, "row_moves": self.moves}
        if recent:
            dts = np.array([d for d, _, _ in recent]) * 1000
            out.update(step_ms_p50=round(float(np.percentile(dts, 50)), 3),
                       step_ms_p99=round(float(np.percentile(dts, 99)), 3),
                       step_ms_max=round(float(dts.max()), 3),
                       sessions_per_step=round(float(np.mean([b for _, b, _ in recent])), 3),
                       rows_per_step=round(float(np.mean([n for _, _, n in recent])), 3))
        return out


    # -- the model thread ------------------------------------------------------------------------
    def _detach(self, h: SessionHandle, why: SessionFailed | None) -> None:
        with self._cond:
            if h.closed:
                return
            h.closed = True
            h.inbox.clear()
            if self._handles.get(h.slot) is h:
                del self._handles[h.slot]
                self._resets.add(h.slot)  # leave nothing of this session in the row
            self.slots.release(h.slot, h.generation)
            if not h.ready.done():  # settled under the lock: the model thread does the same
                h.ready.set_exception(SessionClosed(why.reason if why else "session closed"))
            self._cond.notify_all()
        if why is not None:
            if why.kind != "shutdown":
                self.metrics.errors.labels(why.kind).inc()
            try:
                h.deliver(why)
            except Exception:  # the session's loop may be gone; nothing else to tell
                logger.debug("could not deliver failure to slot %d", h.slot, exc_info=True)
        # The callback is the session's bound method and the session holds the handle: a cycle
        # that only Python's rare full collection would free, keeping each ended session's
        # socket and buffers for thousands of sessions. A step still running delivers nowhere.
        h.deliver = _discard

    def _has_work(self) -> bool:
        return bool(self._resets or self._tasks or any(h.inbox for h in self._handles.values()))

    def _take(self) -> tuple[list[int], list[tuple[SessionHandle, int, int]], list[tuple],
                             list[tuple[SessionHandle, np.ndarray]]]:
        """Under the lock: wait for work, then for the other sessions' frames (up to
        batch_wait_s), and take the rows to reset, the sessions to move to a lower row, the
        tasks, and one frame from each ready session."""
        while not self._stopping and not self._has_work():
            self._cond.wait()
        while not self._stopping and not self._resets and not self._tasks:
            now = time.monotonic()
            waiting = [h for h in self._handles.values() if h.inbox]
            # Sessions worth waiting for: those that sent within the last two frames. A silent
            # connection must not delay every other session's steps.
            expected = [h for h in self._handles.values()
                        if h.inbox or now - h.last_push < 2 * FRAME_S]
            if not waiting or len(waiting) == len(expected):
                break
            if self.cfg.batch_clock == "tick":
                # One step per frame period, with every session in it: the next step runs a
                # period after the last one took its frames, unless all are in sooner. A
                # session more than a frame behind (after a slow step) is stepped at once, or
                # it would stay behind for good.
                if any(len(h.inbox) > 1 for h in waiting):
                    break
                left = self._last_take + FRAME_S - now
            else:
                # The window opens when a frame is waiting and the model is free: a frame
                # queued during the previous step still gives the other sessions their chance
                # to join.
                opened = max(min(h.inbox[0][0] for h in waiting), self._last_step_end)
                left = opened + self.cfg.batch_wait_s - now
            if left <= 0:
                break
            self._cond.wait(timeout=left)
        pending = set(self._resets)
        self._resets.clear()
        moves = self._plan_moves(pending)
        resets = sorted(pending)
        tasks = list(self._tasks)
        self._tasks.clear()
        batch = []
        for h in self._handles.values():
            if h.inbox:
                batch.append((h, h.inbox.popleft()[1]))
        if batch:
            self._last_take = time.monotonic()
        return resets, moves, tasks, batch

    def _plan_moves(self, resets: set[int]) -> list[tuple[SessionHandle, int, int]]:
        """Under the lock: while a row below the last held row is free, give the last row's
        session that row (bookkeeping now; `_apply_moves` copies the state). A session whose
        row is still waiting for its reset needs no copy: its new row is reset instead. Updates
        `resets` (the rows to reset after the copies); returns (handle, from, to) to copy."""
        moves = []
        while True:
            held = self.slots.held()
            if not held or len(held) == held[-1] + 1:
                return moves  # dense: rows 0 .. active - 1
            src = held[-1]
            dst = next(r for r in range(src) if r not in held)
            h = self._handles.get(src)
            if h is None or h.closed:  # being opened right now: its open notifies us again
                return moves
            gen = self.slots.move(src, h.generation, dst)
            if gen is None:  # dst granted meanwhile (open() takes rows outside this lock)
                return moves
            del self._handles[src]
            h.slot, h.generation = dst, gen
            self._handles[dst] = h
            if src in resets:
                resets.discard(src)
                resets.add(dst)
            else:
                resets.discard(dst)  # the copy overwrites every per-row tensor of dst
                resets.add(src)  # and then nothing of the session stays in its old row
                moves.append((h, src, dst))

    def _apply_moves(self, moves: list[tuple[SessionHandle, int, int]]) -> None:
        """Copy the moved sessions' states (before the resets of their old rows)."""
        for h, src, dst in moves:
            try:
                self.rows.move_row(src, dst)
            except Exception as e:
                logger.exception("moving the session in row %d to row %d failed", src, dst)
                self._detach(h, SessionFailed(f"could not move the session's row: {e}",
                                              "internal"))
                self._failed_once("a row move", e)
            else:
                self.moves += 1
                logger.debug("session moved from row %d to row %d", src, dst)

    def _loop(self) -> None:
        try:
            self._serve_steps()
        except BaseException as e:  # a bug, or the device failing: say so, and fail everyone
            if isinstance(e, _EngineFailed):
                logger.error("the engine failed: %s", e)
                failure = str(e)
            else:
                logger.exception("the model thread stopped")
                failure = f"the model thread stopped: {type(e).__name__}: {e}"
            with self._cond:
                self.failure = failure
                handles = list(self._handles.values())
                tasks = list(self._tasks)
                self._tasks.clear()
            for h in handles:
                self._detach(h, SessionFailed(failure, "internal"))
            for _, fut in tasks:
                fut.cancel()

    def _failed_once(self, what: str, e: Exception) -> None:
        """Count a step or reset that raised; too many in a row fail the engine."""
        self.failures_in_row += 1
        self.metrics.errors.labels("step_failed").inc()
        if self.failures_in_row >= self.cfg.max_step_failures:
            raise _EngineFailed(
                f"{self.failures_in_row} model steps failed in a row (last, {what}: "
                f"{type(e).__name__}: {e}); the device is likely in a failed state: restart "
                f"the server") from e

    def _serve_steps(self) -> None:
        while True:
            with self._cond:
                resets, moves, tasks, batch = self._take()
                if self._stopping:
                    for _, fut in tasks:
                        fut.cancel()
                    return
            if moves:
                self._apply_moves(moves)
            for fn, fut in tasks:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # handed back to whoever asked
                        fut.set_exception(e)
            if resets:
                self._apply_resets(resets)
            if batch:
                try:
                    self._step(batch)
                except Exception as e:  # one broken step must not end the server
                    logger.exception("model step failed; failing the %d session(s) in it",
                                     len(batch))
                    for h, _ in batch:
                        self._detach(h, SessionFailed(f"internal error in the model step: "
                                                      f"{type(e).__name__}: {e}", "internal"))
                    self._failed_once("a model step", e)
                else:
                    self.failures_in_row = 0

    def _apply_resets(self, slots: list[int]) -> None:
        mask = torch.zeros(self.cfg.capacity, dtype=torch.bool)
        mask[slots] = True
        try:
            self._reset(mask.to(self.device))
        except Exception as e:
            logger.exception("resetting rows %s failed", slots)
            for s in slots:
                h = self._handles.get(s)
                if h is not None:
                    self._detach(h, SessionFailed(f"could not reset the session's row: {e}",
                                                  "internal"))
            self._failed_once("a row reset", e)
            return
        with self._cond:
            for s in slots:
                h = self._handles.get(s)
                if h is not None and not h.closed and not h.ready.done():
                    h.ready.set_result(s)

    def _reset(self, mask: torch.Tensor) -> None:
        with torch.no_grad():
            reset_rows(self.lm_gen, mask)
            if self.mimi is not None:
                reset_rows(self.mimi, mask)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def _step_tensors(self, pcm: torch.Tensor | None, codes: torch.Tensor, ready: torch.Tensor,
                      encode: torch.Tensor | None, decode: torch.Tensor | None,
                      telemetry: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor,
                                 torch.Tensor | None]:
        """One batched step on device of rows 0 .. n - 1, n = len(ready) a bucket
        (`RowStates.prefix`). pcm [n,1,1920] for the `encode` rows, codes [n,8,1] for the
        others; `decode`: rows that want audio. Returns (tokens [n,9], pcm [n,1920] or None,
        nonfinite [n], and when `telemetry` the TTT telemetry read now [n, layers, 5])."""
        with self.rows.prefix(ready.shape[0]):
            if encode is not None and pcm is not None:
                self.mimi.set_exec_mask(encode)
                enc = self.mimi.encode(pcm)[:, :NUM_CODEBOOKS]
                codes = torch.where(encode[:, None, None], enc, codes)
            self.lm_gen.set_exec_mask(ready)
            out = self.lm_gen.step(codes)[:, :, 0]  # [n, 9]; -2 until a row's delays fill
            audio = None
            if decode is not None:
                dec = decode & (out[:, 1:] >= 0).all(dim=1)
                self.mimi.set_exec_mask(dec)
                audio = self.mimi.decode(out[:, 1:, None].clamp(min=0))[:, 0]
            bad = torch.zeros_like(ready)
            for b in self._blocks:
                bad |= b._streaming_state.nonfinite
            tel = self.telemetry.read() if telemetry and self.telemetry is not None else None
        return out, audio, bad & ready, tel

    def _telemetry_of(self, h: SessionHandle, row: np.ndarray) -> dict[str, Any] | None:
        """The session's telemetry message for its row (None if it had no frame in the window),
        observed in the fleet-wide histograms."""
        if row[0, 0] <= 0:
            return None
        msg = telemetry_message(row, self.telemetry.layers, h.frames_out)
        before, after, drift = (msg["inner_loss_before"], msg["inner_loss_after"],
                                msg["drift"])
        if before is not None and after is not None and before > 0:
            self.metrics.ttt_inner_loss_improvement.observe(1.0 - after / before)
        if drift is not None:
            self.metrics.ttt_drift.observe(drift)
        return msg

    # Columns of the step's one host-to-device buffer, per row: the flags, the codes of a token
    # session, the PCM of an audio session (codes as floats: exact below 2^24).
    _READY, _ENCODE, _DECODE, _CODES = 0, 1, 2, 3
    _PCM = _CODES + NUM_CODEBOOKS

    def _inputs(self, batch: list[tuple[SessionHandle, np.ndarray]], n: int) -> torch.Tensor:
        """The step's inputs for rows 0 .. n - 1 in one host buffer, kept from step to step
        (pinned on CUDA), and one copy of it on the device (a fresh tensor: codec states may
        keep views of it)."""
        buf = self._host_in[:n]
        buf.zero_()  # the previous step's copy has completed: its outputs were read back
        for h, frame in batch:
            row = buf[h.slot]
            row[self._READY] = 1.0
            row[self._DECODE] = float(h.wants_audio)
            if frame.dtype == np.float32:
                row[self._ENCODE] = 1.0
                row[self._PCM:] = torch.from_numpy(frame)
            else:
                row[self._CODES:self._PCM] = torch.from_numpy(frame)
        if self.device.type == "cpu":
            return buf.clone()
        return buf.to(self.device, non_blocking=True)

    def _read_back(self, out: torch.Tensor, bad: torch.Tensor, audio: torch.Tensor | None,
                   tel: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                      np.ndarray | None]:
        """The step's one device-to-host copy: tokens [n, 9], flags [n], the audio [n, 1920]
        if any and the TTT telemetry [n, layers, 5] if read (tokens and flags are small
        integers: exact in fp32)."""
        parts = [out.float(), bad[:, None].float()]
        if audio is not None:
            parts.append(audio.float())
        if tel is not None:
            parts.append(tel.flatten(1))
        host = torch.cat(parts, dim=1).cpu().numpy()
        n = out.shape[1]
        tokens, flags = host[:, :n].astype(np.int64), host[:, n] > 0
        col = n + 1
        pcm = None
        if audio is not None:
            pcm = host[:, col:col + FRAME_SIZE]
            col += FRAME_SIZE
        rows = host[:, col:].reshape(len(host), *tel.shape[1:]) if tel is not None else None
        return tokens, flags, pcm, rows

    def _step(self, batch: list[tuple[SessionHandle, np.ndarray]]) -> None:
        t0 = time.perf_counter()
        S, dev = self.cfg.capacity, self.device
        # the smallest bucket of rows that holds every row with a frame (sessions hold the
        # first rows: `_plan_moves`)
        n = self.rows.bucket_for(max(h.slot for h, _ in batch) + 1)
        any_audio = any(frame.dtype == np.float32 for _, frame in batch)
        any_decode = any(h.wants_audio for h, _ in batch)
        x = self._inputs(batch, n)
        due = self.telemetry is not None and (self.steps + 1) % self.cfg.telemetry_every == 0
        out, audio, bad, tel = self._step_tensors(
            x[:, None, self._PCM:].contiguous() if any_audio else None,
            x[:, self._CODES:self._PCM].long()[:, :, None], x[:, self._READY] > 0,
            x[:, self._ENCODE] > 0 if any_audio else None,
            x[:, self._DECODE] > 0 if any_decode else None, telemetry=due)
        out, bad, audio, tel_rows = self._read_back(out, bad, audio, tel)
        first = [h for h, frame in batch if frame.dtype == np.float32 and not h.primed]
        if first:  # moshi re-primes the codec after a session's first frame (see the top)
            mask = torch.zeros(S, dtype=torch.bool)
            mask[[h.slot for h in first]] = True
            reset_rows(self.mimi, mask.to(dev))
            for h in first:
                h.primed = True
        self.steps += 1
        self._last_step_end = time.monotonic()
        dt = time.perf_counter() - t0
        self.recent.append((dt, len(batch), n))
        self.metrics.step_seconds.observe(dt)
        self.metrics.step_batch.observe(len(batch))
        self.metrics.frames.inc(len(batch))
        for h, _ in batch:
            if h.closed:
                continue  # closed during the step: its row is queued for a reset already
            s = h.slot
            if bad[s]:
                logger.warning("slot %d: non-finite values in the session's TTT state; "
                               "closing it and resetting its row", s)
                self._detach(h, SessionFailed(
                    "the session's TTT state diverged (NaN or inf in its fast weights); the "
                    "session was closed and its slot reset", "nonfinite_ttt_state"))
                continue
            generated = out[s, 1] >= 0
            h.frames_out += 1
            res = StepOutput(
                text_token=int(out[s, 0]), codes=out[s, 1:].copy(),
                pcm=audio[s].copy() if (audio is not None and h.wants_audio and generated)
                else None,
                telemetry=self._telemetry_of(h, tel_rows[s]) if due else None)
            try:
                h.deliver(res)
            except Exception:
                logger.exception("delivering output to slot %d failed; closing it", s)
                self._detach(h, SessionFailed("internal error delivering output", "internal"))

"""Native memory of the sessions' Opus codecs: one thread owns them, and the C heap is trimmed
after sessions end.

An Opus session's codec state lives in C (sphn: libopus' encoder and decoder, an Ogg muxer and
demuxer, their growing buffers) and is freed with the session; nothing leaks (glibc's bytes in
use stay flat), but the server's resident size grew about 8-12 KiB per Opus session, linearly
over thousands of sessions (`python -m server.soak`): the freed codec blocks, interleaved on the
event loop's heap with its other allocations (messages, frames, Python objects), fragment it,
and the holes are neither reused by the next session's codec nor returnable to the system.
sphn's codec objects cannot be reset, so they cannot be reused per slot (a new client's Ogg
stream starts with its own headers). Instead:

* `OpusThread`: every session's codec objects are created, fed and freed on one dedicated
  thread, so their allocations come from that thread's own heap (glibc gives each thread an
  arena), where the next session's identical allocations reuse the same blocks. This also takes
  the encoding and decoding off the event loop.
* `HeapTrimmer`: after sessions end, `malloc_trim` returns the heaps' free pages to the system:
  at most once per `min_interval_s`, and always once after the last session of a burst, on a
  worker thread. Without glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any, Callable, TypeVar

from moshi_ttt.process_memory import malloc_trim

T = TypeVar("T")

logger = logging.getLogger(__name__)


class HeapTrimmer:
    """Debounced `malloc_trim(0)` after sessions end (see the module docstring)."""

    def __init__(self, min_interval_s: float = 1.0):
        self.min_interval_s = min_interval_s
        self._trim = malloc_trim()
        self._scheduled = False
        self._last = 0.0
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def trim_now(self) -> None:
        if self._trim is not None:
            self._trim(0)
            self.trims += 1

    def session_ended(self) -> None:
        """Called on the event loop when a session ends."""
        if self._trim is None or self._scheduled:
            return
        self._scheduled = True
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._last + self.min_interval_s - time.monotonic())
        loop.call_later(delay, lambda: loop.create_task(self._run()))

    async def _run(self) -> None:
        self._scheduled = False
        self._last = time.monotonic()
        try:
            await asyncio.to_thread(self.trim_now)
        except RuntimeError:  # the loop's executor is shutting down: nothing to keep
            logger.debug("heap trim skipped at shutdown", exc_info=True)


class OpusThread:
    """The one thread that creates, feeds and frees every session's sphn codec objects."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="moshi-ttt-opus")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def release(self, *objects: Any) -> None:
        """Drop the last references to codec objects on the codec thread (freed there). The
        caller must hold no other reference."""
        held = [o for o in objects if o is not None]
        if held:
            self._pool.submit(held.clear)


OPUS = OpusThread()

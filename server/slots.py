"""`SessionSlots`: which batch rows of the model are free, and who holds the others."""

from __future__ import annotations

import threading


class CapacityError(RuntimeError):
    """Every slot is taken."""


class SessionSlots:
    """A fixed set of batch rows handed out to sessions, lowest free row first (so sessions
    fill the first rows, which is all a step needs to run). Each grant
    carries a generation number, so releasing twice (or releasing a row that has been granted
    again since) is harmless."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._free = list(range(capacity))
        self._generation = [0] * capacity
        self._lock = threading.Lock()

    def acquire(self) -> tuple[int, int]:
        """(slot, generation) of a free row, lowest index first; CapacityError when none."""
        with self._lock:
            if not self._free:
                raise CapacityError(f"all {self.capacity} session slots are taken")
            self._free.sort()
            slot = self._free.pop(0)
            self._generation[slot] += 1
            return slot, self._generation[slot]

    def release(self, slot: int, generation: int) -> bool:
        """Free a row if `generation` still holds it (idempotent); True if it was freed."""
        with self._lock:
            if self._generation[slot] != generation or slot in self._free:
                return False
            self._free.append(slot)
            return True

    def move(self, src: int, generation: int, dst: int) -> int | None:
        """Give the session that holds `src` under `generation` the free row `dst` instead and
        free `src` (the engine keeps sessions in the first rows). Returns the session's new
        generation, or None, changing nothing, if `src` is no longer its or `dst` was taken."""
        with self._lock:
            if (self._generation[src] != generation or src in self._free
                    or dst not in self._free):
                return None
            self._free.remove(dst)
            self._generation[dst] += 1
            self._generation[src] += 1  # a late release of the old grant is a no-op
            self._free.append(src)
            return self._generation[dst]

    def held(self) -> list[int]:
        """The rows granted now, in order."""
        with self._lock:
            free = set(self._free)
            return [s for s in range(self.capacity) if s not in free]

    @property
    def active(self) -> int:
        with self._lock:
            return self.capacity - len(self._free)

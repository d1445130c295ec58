"""This process's memory, as the server's /health and the long-session evaluation report it:
resident size, and glibc's own account of its heaps.

RSS alone cannot tell a leak from fragmentation: a heap whose freed blocks are scattered among live
ones keeps their pages resident although nothing holds them. glibc's `mallinfo2` splits the heap
into bytes in use (what the program holds: a leak grows this) and bytes free inside the heap (what
fragmentation and the allocator's caches keep). Both are None where the C library is not glibc
(musl, macOS) or too old (mallinfo2 is glibc >= 2.33).

A batch job can also ask glibc to keep what it frees (`keep_freed_memory`): the opposite trade of
the server's, which hands freed pages back (`malloc_trim`) because its RSS is watched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
from dataclasses import dataclass
from functools import cache
from typing import Callable


def rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; elsewhere the peak from getrusage, whose
    ru_maxrss is in bytes on macOS and in KiB on Linux and the BSDs)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@cache
def _libc_function(name: str, argtypes: tuple, restype: type) -> Callable | None:
    """The C library's `name`, typed once (None where the library or the symbol is missing)."""
    libc = _libc()
    fn = getattr(libc, name, None) if libc is not None else None
    if fn is not None:
        fn.argtypes, fn.restype = list(argtypes), restype
    return fn


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim` (returns the heaps' free pages to the system), or None."""
    return _libc_function("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)


#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the heap for the next allocation instead of handing it
    back to the kernel; False where the C library is not glibc (nothing changes there).

    Why: a CPU training loop frees and allocates the same few-MB tensors every step. By default
    glibc maps blocks above its mmap threshold fresh and unmaps them when freed, and trims the
    heap's free top, so each step faults in and zeroes those pages again. On eval-memory's TTT
    training step (2-core x86-64 CPU, one thread; a process that ran 23 steps) that was 340-390k
    minor page faults and 0.7-1.1 s of kernel time against 160k (about what start-up costs) and
    0.4-0.5 s with both thresholds raised, and the step 4-8% faster. The price: the process
    keeps its peak heap resident until it exits. For a batch job's worker process, not for the
    server (whose RSS is reported and trimmed)."""
    mallopt = _libc_function("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)
    if mallopt is None:
        return False
    size = 2**30  # blocks up to 1 GiB come from the heap (mallopt takes a C int)
    mapped = mallopt(M_MMAP_THRESHOLD, size)
    trimmed = mallopt(M_TRIM_THRESHOLD, 2 * size - 1)  # a free top below this stays
    return bool(mapped and trimmed)


@dataclass(frozen=True)
class HeapFigures:
    in_use_mb: float  # allocated and not freed, main heap, thread arenas and mmapped blocks
    free_mb: float  # free blocks inside the heaps: fragmentation and the allocator's caches


def native_heap() -> HeapFigures | None:
    """glibc's heap figures summed over all arenas, or None without glibc >= 2.33."""
    fn = _libc_function("mallinfo2", (), _MallInfo2)
    if fn is None:
        return None
    m = fn()
    return HeapFigures(in_use_mb=(m.uordblks + m.hblkhd) / 2**20, free_mb=m.fordblks / 2**20)

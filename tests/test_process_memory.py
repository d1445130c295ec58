"""This process's memory figures: glibc's heap in use follows what the program holds (a leak
grows it), which RSS alone cannot tell from fragmentation."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from moshi_ttt.process_memory import _libc, keep_freed_memory, malloc_trim, native_heap, rss_mb

pytestmark = pytest.mark.skipif(native_heap() is None, reason="needs glibc >= 2.33 (mallinfo2)")


def test_heap_in_use_follows_allocations_and_frees():
    libc = _libc()
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
    before = native_heap()
    blocks = [libc.malloc(4096) for _ in range(4096)]  # 16 MiB of small blocks: on the heap
    fence = libc.malloc(64)  # above them: freeing them cannot shrink the heap's top by itself
    try:
        assert all(blocks) and fence
        held = native_heap()
        assert 15.9 < held.in_use_mb - before.in_use_mb < 17.5
        for b in blocks:
            libc.free(b)
        after = native_heap()
        assert abs(after.in_use_mb - before.in_use_mb) < 0.5
        # freed, not returned: from in use to free inside the heap (a heap that already had free
        # blocks may have lent them; either way the 16 MiB now count as free)
        assert after.free_mb - held.free_mb > 12  # (some may go back to the system at once)
    finally:
        libc.free(fence)
    assert malloc_trim()(0) in (0, 1)
    assert native_heap().free_mb <= after.free_mb + 0.1


def test_rss_is_this_process():
    assert 10 < rss_mb() < 64 * 1024


def freed_block_kept_mb(mb: int = 8) -> float:
    """Allocate and free one `mb` MiB block; how much of it the heap then holds as free memory
    (about `mb` where freed memory is kept, about 0 where glibc unmapped the block). Module-level
    so a worker process can run it."""
    libc = _libc()
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
    before = native_heap().free_mb
    block = libc.malloc(mb * 2**20)
    assert block
    libc.free(block)
    return native_heap().free_mb - before


_FRESH_PROCESS = """
import sys
from moshi_ttt.process_memory import keep_freed_memory
from test_process_memory import freed_block_kept_mb
assert keep_freed_memory() if sys.argv[1] == "keep" else True
print(freed_block_kept_mb())
"""


@pytest.mark.parametrize("mode", ["default", "keep"])
def test_keep_freed_memory_keeps_a_freed_block_for_the_next_allocation(mode):
    """By default glibc unmaps a freed 8 MiB block (the next step faults its pages in again);
    after `keep_freed_memory` the block stays in the heap, free for reuse. A fresh process each:
    mallopt cannot be undone in this one."""
    out = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, mode], check=True,
                         capture_output=True, text=True, cwd=__file__.rsplit("/", 1)[0])
    kept = float(out.stdout)
    if mode == "keep":
        assert 7.9 < kept < 8.5
    else:
        assert abs(kept) < 0.5

"""This process's memory figures: glibc's heap in use follows what the program holds (a leak
grows it), which RSS alone cannot tell from fragmentation."""

from __future__ import annotations

import ctypes

import pytest

from moshi_ttt.process_memory import _libc, malloc_trim, native_heap, rss_mb

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

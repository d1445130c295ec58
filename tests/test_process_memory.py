"""This process's memory figures: glibc's heap in use follows what the program holds (a leak
grows it), which RSS alone cannot tell from fragmentation."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from moshi_ttt.process_memory import (
    _libc, _libc_function, _MallInfo2, keep_freed_memory, malloc_trim, native_heap, rss_mb,
)

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


def heap_block_facts(mb: int = 8) -> tuple[float, float]:
    """Allocate and free one `mb` MiB block: (MiB of it glibc mapped apart from the heap, MiB
    the heap handed back to the kernel when it was freed). Where freed memory is kept: about
    (0, 0); by default about (`mb`, 0): mapped apart, unmapped when freed. Module-level so a
    worker process can run it."""
    libc = _libc()
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
    info = _libc_function("mallinfo2", (), _MallInfo2)
    before = info()
    block = libc.malloc(mb * 2**20)
    assert block
    held = info()
    libc.free(block)
    after = info()
    return (held.hblkhd - before.hblkhd) / 2**20, (held.arena - after.arena) / 2**20


_FRESH_PROCESS = """
import sys
from moshi_ttt.process_memory import keep_freed_memory
from test_process_memory import heap_block_facts
assert keep_freed_memory() if sys.argv[1] == "keep" else True
print(*heap_block_facts())
"""


@pytest.mark.parametrize("mode", ["default", "keep"])
def test_keep_freed_memory_keeps_a_freed_block_for_the_next_allocation(mode):
    """By default glibc maps an 8 MiB block apart and unmaps it when freed (the next step
    faults its pages in again); after `keep_freed_memory` it comes from the heap and stays
    there when freed. A fresh process each: mallopt cannot be undone in this one."""
    out = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, mode], check=True,
                         capture_output=True, text=True, cwd=__file__.rsplit("/", 1)[0])
    mapped, returned = map(float, out.stdout.split())
    if mode == "keep":
        assert abs(mapped) < 0.5 and abs(returned) < 0.5
    else:
        assert 7.9 < mapped < 8.5


@pytest.mark.parametrize("platform, maxrss, want", [("darwin", 400 * 2**20, 400.0),
                                                    ("linux", 400 * 1024, 400.0)])
def test_rss_without_proc_is_the_peak_in_mib_on_macos_too(platform, maxrss, want, monkeypatch):
    """Without /proc the figure is getrusage's peak, whose unit is bytes on macOS and KiB on
    Linux: a 400 MiB process on a Mac read 409,600 MiB (/health's rss_mb, the soak's slope)."""
    import resource
    import types

    import moshi_ttt.process_memory as pm

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/statm")

    monkeypatch.setattr(pm, "open", no_proc, raising=False)
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage",
                        lambda who: types.SimpleNamespace(ru_maxrss=maxrss))
    assert rss_mb() == pytest.approx(want)

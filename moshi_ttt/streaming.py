"""Hermetic per-row resets of moshi streaming state (what a server needs to recycle a batch row).

moshi's `reset_streaming(mask)` rewinds a row's offsets but leaves its old keys and values in the
attention KV caches (masked out by position). Masking does not stop NaN: softmax weight 0 times a
NaN value is NaN, so a row whose session diverged would poison the next session given that row.
`reset_rows` resets as moshi does and also clears the row's KV-cache contents.
"""

from __future__ import annotations

import torch
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import RingKVCache
from torch import nn


def _kv_caches(module: nn.Module) -> list[RingKVCache]:
    caches = []
    for m in module.modules():
        state = getattr(m, "_streaming_state", None)
        kv = getattr(state, "kv_cache", None)
        if isinstance(kv, RingKVCache):
            caches.append(kv)
    return caches


def reset_rows(module: StreamingModule, mask: torch.Tensor) -> None:
    """Reset the rows selected by `mask` [B] bool of a module in streaming mode: moshi's reset by
    mask (offsets, TTT fast weights back to W0, codec buffers), plus zeroed KV-cache rows."""
    module.reset_streaming(mask)
    for kv in _kv_caches(module):
        kv.cache.masked_fill_(mask.to(kv.cache.device).view(1, -1, 1, 1, 1), 0)

"""Mimi over a long file in bounded chunks, with the result of one call over the whole file.

One `mimi.encode` over a whole file holds its activations at the full sample rate (an hour-long
file: tens of GB). Mimi is causal, so it can stream the file chunk by chunk, with one catch:
while streaming, each attention layer of Mimi's encoder transformer keeps its keys in a ring of
`context` steps (10 s) that the chunk's own steps occupy too, so the first steps of a chunk miss
up to a chunk of the oldest keys that one call attends to. On a 14 s file that moved the latents
by up to 3e-4 and changed some acoustic codes after the first 10 s. Here each ring gets room for
one more chunk beyond `context` (the attention mask still limits every step to `context` keys, as
in one call), and the latents equal those of one call to float precision (2e-8 on the test file
of tests/test_encode_chunks.py, whose codes are identical).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack

import torch
from moshi.modules.transformer import StreamingMultiheadAttention
from moshi.utils.compile import no_cuda_graph

logger = logging.getLogger(__name__)


def _encoder_attentions(mimi: torch.nn.Module) -> list[StreamingMultiheadAttention]:
    tr = getattr(mimi, "encoder_transformer", None)
    return [m for m in (tr.modules() if tr is not None else [])
            if isinstance(m, StreamingMultiheadAttention) and m.context is not None]


def _ring_capacity(attn: StreamingMultiheadAttention) -> int | None:
    cache = getattr(getattr(attn, "_streaming_state", None), "kv_cache", None)
    return getattr(cache, "capacity", None)


@torch.no_grad()
def encode_chunked(mimi: torch.nn.Module, wav: torch.Tensor, chunk_frames: int,
                   device: str | torch.device) -> torch.Tensor:
    """[B, 1, S] float (any device) -> [B, Q, ceil(S / frame_size)] codes, `chunk_frames` frames
    per call, each chunk moved to `device` only when it is encoded. The tail is padded with zeros
    to a whole frame, as one call pads it."""
    frame = mimi.frame_size
    wav = torch.nn.functional.pad(wav, (0, (-wav.shape[-1]) % frame))
    chunk = max(1, min(chunk_frames, wav.shape[-1] // frame))  # no ring larger than the file
    ratio = max(1, round(mimi.encoder_frame_rate / mimi.frame_rate))  # transformer steps
    steps = chunk * ratio  # per frame
    attns = _encoder_attentions(mimi)
    out = []
    with ExitStack() as stack:
        # The chunks differ in length (the last one): no CUDA graph, it needs fixed shapes.
        stack.enter_context(no_cuda_graph())
        contexts = [a.context for a in attns]
        try:  # a ring's capacity is read from `context` when streaming starts ...
            for a in attns:
                a.context += steps
            stack.enter_context(mimi.streaming(wav.shape[0]))
        finally:  # ... and the attention mask reads it at every call
            for a, c in zip(attns, contexts):
                a.context = c
        rings = [_ring_capacity(a) for a in attns]
        if any(r is None or r < c + steps for r, c in zip(rings, contexts)):
            known = [r for r in rings if r is not None] or contexts
            chunk = max(1, min(known) // ratio)
            logger.warning("this moshi sizes Mimi's streaming rings differently (%s for context %s): "
                           "encoding %d frames per call, whose first frames miss up to that many "
                           "of the oldest keys one call would attend to", rings, contexts, chunk)
        for i in range(0, wav.shape[-1], chunk * frame):
            out.append(mimi.encode(wav[..., i:i + chunk * frame].to(device)))
    return torch.cat(out, dim=-1)

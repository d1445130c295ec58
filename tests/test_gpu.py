"""GPU-only checks (skipped where torch sees no CUDA device; run on a GPU host with
`pytest tests/test_gpu.py`). On GPU, moshi's LMGen replays the main transformer's step as a CUDA
graph: Python never runs again after capture, so the TTT block's streaming state must advance,
commit and honour exec/reset masks purely through in-place device ops."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from moshi.models.lm import LMGen
from moshi.utils.compile import no_cuda_graph

from moshi_ttt.model import build_ttt_lm, ttt_blocks
from moshi_ttt.streaming import reset_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (run on the GPU host)")


def _lm(cfg, dtype):
    torch.manual_seed(0)
    lm = build_ttt_lm(cfg, device="cuda", dtype=dtype)
    for a in ttt_blocks(lm):  # a visible TTT contribution
        torch.nn.init.constant_(a.block.gate_alpha, 0.5)
        torch.nn.init.normal_(a.block.inner.w1, std=0.3)
        torch.nn.init.normal_(a.block.inner.w2, std=0.3)
    return lm.eval()


def _stream(lm, user, graphs: bool, reset_at: int, masked: range):
    """Greedy LMGen over `user` [B, 8, T]; row 1 reset at `reset_at`, row 0 masked in `masked`.
    Returns every step's text logits and tokens."""
    logits, tokens = [], []
    gen = LMGen(lm, use_sampling=False, support_out_of_sync=True,
                on_text_logits_hook=lambda l: logits.append(l.float().clone()))
    B, _, T = user.shape
    with (nullcontext() if graphs else no_cuda_graph()), gen.streaming(B):
        for t in range(T):
            if t == reset_at:
                reset_rows(gen, torch.tensor([False, True], device="cuda"))
            gen.set_exec_mask(torch.tensor([t not in masked, True], device="cuda"))
            tokens.append(gen.step(user[:, :, t:t + 1]).clone())
        moved = [float((a.block._streaming_state.w.w1 - a.block.inner.w1).abs().max())
                 for a in ttt_blocks(lm)]
    return torch.stack(logits), torch.stack(tokens), moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager_streaming(tiny_cfg, dtype):
    K = tiny_cfg.ttt.mini_batch_size
    T = 3 * K + 5
    lm = _lm(tiny_cfg, dtype)
    user = torch.randint(0, 2048, (2, 8, T), device="cuda",
                         generator=torch.Generator("cuda").manual_seed(1))
    kw = dict(reset_at=K + 3, masked=range(20, 24))
    g_logits, g_tokens, g_moved = _stream(lm, user, True, **kw)
    e_logits, e_tokens, e_moved = _stream(lm, user, False, **kw)
    assert torch.equal(g_tokens, e_tokens)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (g_logits - e_logits).abs().max() <= tol
    assert all(m > 0 for m in g_moved) and g_moved == pytest.approx(e_moved, rel=1e-3)

"""Is the inner learner alive? Measures of a TTT layer's fast weights, shared by
`moshi-ttt diagnose-ttt` (over a streamed session) and the trainer's first-batch check.

* input dependence: the spread of the inner model's normalised output LN(f_W(q)) across a fixed
  set of probe queries q (random unit vectors per head, seeded), averaged over heads and output
  dims. A random inner MLP gives ~0.8 at init; a collapsed one (its output no longer depends on
  its input, e.g. after one commit from a too-small W0) gives ~0.
* fast-weight norms and the drift ||W - W0|| / ||W0||.
* effective step: ||W after a commit - W before|| / ||W before||, per mini-batch.
"""

from __future__ import annotations

import math

import torch

from .ttt_mlp import FastWeights, gelu_tanh, head_layer_norm

#: A layer whose input dependence falls below this fraction of its value at W0 has collapsed.
COLLAPSE_RATIO = 0.1
PROBES = 64


def probe_queries(num_heads: int, head_dim: int, n: int = PROBES, seed: int = 0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """[H, n, HD] unit vectors, the same for every call with the same arguments."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(num_heads, n, head_dim, generator=g)
    return torch.nn.functional.normalize(q, dim=-1).to(device)


@torch.no_grad()
def input_dependence(w: FastWeights, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float,
                     probes: torch.Tensor) -> torch.Tensor:
    """[B]: mean over heads and dims of the std over probes of LN(f_W(q)), for fast weights
    [B, H, ...] (or unbatched [H, ...], giving [1])."""
    w1, b1, w2, b2 = (t.float() if t.dim() == 4 else t.float()[None] for t in w.as_tuple())
    q = probes.float()[None]  # [1, H, n, HD]
    out = head_layer_norm(gelu_tanh(q @ w1 + b1) @ w2 + b2, ln_w.float(), ln_b.float(), eps)
    return out.std(dim=-2, unbiased=False).mean(dim=(-1, -2))


def total_norm(w: FastWeights) -> torch.Tensor:
    """[B]: the norm of all four fast-weight tensors of each row together."""
    return torch.sqrt(sum(t.float().flatten(1).pow(2).sum(1) for t in w.as_tuple()))


def distance(a: FastWeights, b: FastWeights) -> torch.Tensor:
    """[B]: ||a - b|| over all four tensors (b may be unbatched)."""
    sq = 0.0
    for x, y in zip(a.as_tuple(), b.as_tuple()):
        y = y if y.dim() == x.dim() else y[None]
        sq = sq + (x.float() - y.float()).flatten(1).pow(2).sum(1)
    return torch.sqrt(sq)


def norms_by_tensor(w: FastWeights) -> dict[str, float]:
    """Norm of each fast-weight tensor of row 0."""
    return {name: float(t[0].float().norm()) for name, t in
            zip(("w1", "b1", "w2", "b2"), w.as_tuple())}


def collapsed(ratio: float) -> bool:
    return not math.isfinite(ratio) or ratio < COLLAPSE_RATIO

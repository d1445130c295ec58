"""Is the inner learner alive? Measures of a TTT layer's fast weights, shared by
`moshi-ttt diagnose-ttt` (over a streamed session) and the trainer's first-batch check.

* input dependence: the spread of the inner model's normalised output LN(f_W(q)) across a fixed
  set of probe queries q (random unit vectors per head, seeded), averaged over heads and output
  dims. A random inner MLP gives ~0.8 at init; a collapsed one (its output no longer depends on
  its input, e.g. after one commit from a too-small W0) gives ~0.
* fast-weight norms and the drift ||W - W0|| / ||W0||.
* effective step: ||W after a commit - W before|| / ||W before||, per mini-batch.
* key selectivity: can the memory tell frames apart? The mean cosine between two frames' keys,
  and the crosstalk of the inner model at W0: the share of one frame's write that another
  frame's key reads back. Near 1, every write lands on every key and a query retrieves about the
  mean of everything written, whatever it asks for (measured on the tiny recall task: keys share a
  large common component, mean cosine ~0.75, crosstalk ~0.8, at init and after training).
"""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any

import torch
from moshi.models.lm import LMModel

from .model import block_inputs, delayed_inputs, ttt_blocks
from .ttt_mlp import FastWeights, gelu_tanh, head_layer_norm

logger = logging.getLogger(__name__)

#: Frames whose keys `key_selectivity` compares in `diagnose` (its cost grows as their square).
SELECTIVITY_FRAMES = 1024

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


@torch.no_grad()
def key_selectivity(xk: torch.Tensor, w0: FastWeights) -> dict[str, float]:
    """How well keys xk [H, T, HD] (unit vectors, T >= 2 frames) are told apart by the inner
    model at W0 (unbatched [H, ...]), averaged over heads and over pairs of different frames:

    * `key_cosine`: the mean cosine between two frames' keys;
    * `crosstalk`: the mean of h_i . h_j over pairs i != j, over the mean of h_i . h_i, with
      h = gelu(k W1 + b1) the input of W2. A frame's write changes W2 by (a multiple of) h_i, so
      this is the share of it that another frame's key reads back: 1 when all keys are alike
      (the memory returns the mean of what was written, whatever the query); about 0.2 for
      independent random keys at the shipped init (gelu's outputs have a positive mean).
    """
    H, T, _ = xk.shape
    if T < 2:
        raise ValueError(f"key selectivity needs at least 2 frames, got {T}")
    k = xk.float()
    off = ~torch.eye(T, dtype=torch.bool, device=k.device)
    unit = torch.nn.functional.normalize(k, dim=-1)
    cos = unit @ unit.transpose(-1, -2)  # [H, T, T]
    h = gelu_tanh(k @ w0.w1.float() + w0.b1.float())  # [H, T, F]
    gram = h @ h.transpose(-1, -2)
    diag = gram.diagonal(dim1=-2, dim2=-1).mean(-1)  # [H]
    cross = gram[:, off].mean(-1) / diag.clamp_min(1e-12)
    return {"key_cosine": float(cos[:, off].mean()), "crosstalk": float(cross.mean())}


@torch.no_grad()
def block_keys(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The keys [B, H, T, HD] a TTT block computes from its inputs x [B, T, D] in one parallel
    pass (causal: the same as frame by frame), as its inner loss sees them."""
    _, xk, _, _ = block._qkv_lr(x)
    return xk


@torch.no_grad()
def key_report(lm: LMModel, codes: torch.Tensor) -> dict[int, dict[str, float]]:
    """Per main-transformer TTT layer: `key_selectivity` of the keys of each row of codes
    [B, 17, T] (one parallel forward, teacher forced), averaged over rows."""
    blocks = [a for a in ttt_blocks(lm) if a.component == "transformer"]
    inputs = dict(zip((a.layer for a in blocks), block_inputs(lm, codes, blocks)))
    out = {}
    for a in blocks:
        xk, w0 = block_keys(a.block, inputs[a.layer]), a.block.inner.fast_weights()
        rows = [key_selectivity(xk[b], w0) for b in range(xk.shape[0])]
        out[a.layer] = {name: statistics.fmean(r[name] for r in rows)
                        for name in ("key_cosine", "crosstalk")}
    return out


def collapsed(ratio: float) -> bool:
    return not math.isfinite(ratio) or ratio < COLLAPSE_RATIO


@torch.no_grad()
def diagnose(lm: LMModel, codes: torch.Tensor, every: int | None = None, seed: int = 0
             ) -> dict[str, Any]:
    """Stream `codes` [1, 17, T] through `lm` (teacher forced) and measure every main-transformer
    TTT layer every `every` frames (default: 4 mini-batches)."""
    lm.eval()
    blocks = [a for a in ttt_blocks(lm) if a.component == "transformer"]
    if not blocks:
        raise ValueError("the model has no TTT layer in its main transformer")
    K = blocks[0].block.mini_batch_size
    every = every or 4 * K
    T = codes.shape[-1]
    seq = delayed_inputs(lm, codes)
    probes = {a.layer: probe_queries(a.block.num_heads, a.block.head_dim, seed=seed,
                                     device=a.block.inner.w1.device) for a in blocks}
    series: dict[int, list[dict[str, float]]] = {a.layer: [] for a in blocks}
    steps: dict[int, list[float]] = {a.layer: [] for a in blocks}
    last_commit: dict[int, FastWeights] = {}

    inputs: dict[int, list[torch.Tensor]] = {a.layer: [] for a in blocks}

    def keep_input(layer: int):
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if len(inputs[layer]) < SELECTIVITY_FRAMES:
                inputs[layer].append(args[0][:1].detach())
        return hook

    def snapshot(w: FastWeights) -> FastWeights:
        return FastWeights(*(t[:1].clone() for t in w.as_tuple()))

    def record(frame: int) -> None:
        for a in blocks:
            st, inner = a.block._streaming_state, a.block.inner
            w = snapshot(st.w)
            dep = float(input_dependence(w, inner.ttt_norm_weight, inner.ttt_norm_bias,
                                         a.block.ln_eps, probes[a.layer])[0])
            w0 = st.w0()
            rec = {"frame": frame, "dependence": dep,
                   "norm": float(total_norm(w)[0]),
                   "drift": float(distance(w, w0)[0] / total_norm(
                       FastWeights(*(t[None] for t in w0.as_tuple())))[0]),
                   "step": statistics.fmean(steps[a.layer]) if steps[a.layer] else 0.0}
            base = series[a.layer][0]["dependence"] if series[a.layer] else dep
            rec["ratio"] = dep / base if base > 0 else float("nan")
            series[a.layer].append(rec)
            steps[a.layer].clear()

    hooks = [a.block.register_forward_pre_hook(keep_input(a.layer)) for a in blocks]
    try:
        with lm.streaming(1):
            record(0)
            for a in blocks:
                last_commit[a.layer] = snapshot(a.block._streaming_state.w)
            for t in range(T):
                lm.forward_text(seq[:, :, t:t + 1])
                if (t + 1) % K == 0:  # a commit happened at this frame
                    for a in blocks:
                        w = snapshot(a.block._streaming_state.w)
                        prev = last_commit[a.layer]
                        steps[a.layer].append(float(distance(w, prev)[0] / total_norm(prev)[0]))
                        last_commit[a.layer] = w
                if (t + 1) % every == 0 or t + 1 == T:
                    record(t + 1)
    finally:
        for h in hooks:
            h.remove()
    layers = []
    for a in blocks:
        s = series[a.layer]
        lay = {"layer": a.layer, "series": s, "final_ratio": s[-1]["ratio"],
               "collapsed": collapsed(s[-1]["ratio"])}
        if T >= 2:  # the streamed frames' keys, computed again in one parallel (causal) pass
            xk = block_keys(a.block, torch.cat(inputs[a.layer], dim=1))
            lay["keys"] = {"frames": int(xk.shape[-2]),
                           **key_selectivity(xk[0], a.block.inner.fast_weights())}
        layers.append(lay)
    return {"frames": T, "mini_batch_size": K, "every": every, "layers": layers}


#: Frames of the first batch the trainer streams for its collapse check (8 commits at K = 16).
FIRST_BATCH_FRAMES = 128


@torch.no_grad()
def first_batch_report(lm: LMModel, codes: torch.Tensor, frames: int = FIRST_BATCH_FRAMES
                       ) -> dict[str, Any]:
    """The trainer's first-batch check: `diagnose` over row 0 of a batch of codes [B, 17, T]
    (at most `frames` frames). Leaves the model in the training mode it was in."""
    was_training = lm.training
    try:
        return diagnose(lm, codes[:1, :, :frames])
    finally:
        lm.train(was_training)

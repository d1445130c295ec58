"""A deliberately naive TTT-MLP: frame by frame, gradients by autograd, no dual form.

It shares no arithmetic with `ttt_mlp` beyond gelu and the per-head LayerNorm, so it is the
oracle the tests compare the dual form and the streaming step against, and the baseline that
`moshi-ttt bench ttt` measures the dual form's speed-up over. Too slow for anything else.
"""

from __future__ import annotations

import torch

from .ttt_mlp import FastWeights, gelu_tanh, head_layer_norm


def _f(w: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = w
    return gelu_tanh(x @ w1 + b1) @ w2 + b2


def _settled(state: tuple[torch.Tensor, ...], w0: tuple[torch.Tensor, ...] | None,
             keep: torch.Tensor | None, weight_norm: bool) -> tuple[torch.Tensor, ...]:
    """The committed state after decay toward w0 and/or weight normalisation, written out:
    each output unit's incoming weights and bias, stacked as one column, get W0's column norm."""
    if keep is not None:
        assert w0 is not None
        state = tuple(i + keep[:, None, None] * (c - i) for c, i in zip(state, w0))
    if weight_norm:
        assert w0 is not None
        out = []
        for (w, b), (w_init, b_init) in ((state[:2], w0[:2]), (state[2:], w0[2:])):
            col = torch.cat([w, b], dim=-2)
            target = torch.linalg.vector_norm(torch.cat([w_init, b_init], dim=-2), dim=-2,
                                              keepdim=True)
            col = col * (target / torch.linalg.vector_norm(col, dim=-2, keepdim=True))
            out += [col[..., :-1, :], col[..., -1:, :]]
        state = tuple(out)
    return state


def naive_ttt(
    w: FastWeights,
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    mini_batch_size: int,
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    eps: float,
    differentiable: bool = False,
    scale_kind: str = "mean",
    w0: FastWeights | None = None,
    keep: torch.Tensor | None = None,
    weight_norm: bool = False,
    record: dict[str, list] | None = None,
) -> torch.Tensor:
    """z [B,H,T,HD] from the TTT rule written out literally:
    for frame t at position i of its mini-batch (start state W),
        W_i = W - s_i * sum_{j<=i} lr_j * dl_j/dW (at W),  z_t = q_t + LN(f_{W_i}(q_t));
    at the end of each full mini-batch, W <- W_{K-1}, then (if asked) decayed toward `w0` by
    `keep` [H] and/or weight-normalised to `w0`'s column norms.

    With `record` (a dict), per frame t it appends to record["before"] the inner loss of frame t
    at the mini-batch's start state W, to record["after"] its loss at W_i (each [B, H]), and to
    record["state"] the committed state after frame t (the four tensors): what the streaming
    telemetry reports."""
    K = mini_batch_size
    T = xq.shape[-2]
    scale = [1.0 / (i + 1) if scale_kind == "mean" else 1.0 for i in range(K)]
    init = w0.as_tuple() if w0 is not None else None
    state = tuple(t for t in w.as_tuple())
    acc = [torch.zeros_like(t) for t in state]
    outs = []
    for t in range(T):
        i = t % K
        if i == 0:
            acc = [torch.zeros_like(s) for s in state]
        with torch.enable_grad():
            if differentiable:  # keep the graph: the outer loss can backprop through this
                leaves = tuple(s if s.requires_grad else s.detach().requires_grad_(True)
                               for s in state)
            else:
                leaves = tuple(s.detach().requires_grad_(True) for s in state)
            pred = head_layer_norm(_f(leaves, xk[..., t:t + 1, :]), ln_w, ln_b, eps)
            target = xv[..., t:t + 1, :] - xk[..., t:t + 1, :]
            loss = 0.5 * ((pred - target) ** 2).sum()  # rows/heads independent: a sum is exact
            grads = torch.autograd.grad(loss, leaves, create_graph=differentiable)
        lr_t = lr[..., t][..., None, None]
        acc = [a + lr_t * g for a, g in zip(acc, grads)]
        w_i = tuple(s - scale[i] * a for s, a in zip(state, acc))
        q = xq[..., t:t + 1, :]
        outs.append(q + head_layer_norm(_f(w_i, q), ln_w, ln_b, eps))
        if record is not None:
            k_t, target = xk[..., t:t + 1, :], xv[..., t:t + 1, :] - xk[..., t:t + 1, :]
            for key, at in (("before", state), ("after", w_i)):
                pred_t = head_layer_norm(_f(tuple(a.detach() for a in at), k_t), ln_w, ln_b, eps)
                record.setdefault(key, []).append(
                    0.5 * ((pred_t - target) ** 2).sum(-1)[..., 0].detach())
        if i == K - 1:
            state = _settled(w_i, init, keep, weight_norm)
        if record is not None:
            record.setdefault("state", []).append(tuple(a.detach() for a in state))
    return torch.cat(outs, dim=-2)

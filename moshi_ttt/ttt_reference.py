"""A deliberately naive TTT-MLP: frame by frame, gradients by autograd, no dual form.

It shares no arithmetic with `ttt_mlp` beyond gelu and the per-head LayerNorm, so it is the
oracle the tests compare the dual form and the streaming step against, and the baseline that
`moshi-ttt bench ttt` measures the dual form's speed-up over. Too slow for anything else.
"""

from __future__ import annotations

import torch

from .ttt_mlp import FastWeights, gelu_tanh, head_layer_norm, position_scale


def _f(w: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2 = w
    return gelu_tanh(x @ w1 + b1) @ w2 + b2


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
) -> torch.Tensor:
    """z [B,H,T,HD] from the TTT rule written out literally:
    for frame t at position i of its mini-batch (start state W),
        W_i = W - s_i * sum_{j<=i} lr_j * dl_j/dW (at W),  z_t = q_t + LN(f_{W_i}(q_t));
    at the end of each full mini-batch, W <- W_{K-1}."""
    K = mini_batch_size
    T = xq.shape[-2]
    scale = position_scale(K, device=xq.device)
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
        if i == K - 1:
            state = w_i
    return torch.cat(outs, dim=-2)

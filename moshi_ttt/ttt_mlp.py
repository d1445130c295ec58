"""The TTT-MLP inner learner as pure tensor functions (no modules, no state objects).

Notation (see shared notes, ttt-mlp.md): B batch, H heads, T frames, HD head dim, F = expansion*HD,
K mini-batch size. Per head the inner model is f(x) = gelu(x W1 + b1) W2 + b2 (row vectors) and the
inner loss of frame j is l_j(W) = 1/2 || LN(f_W(k_j)) - (v_j - k_j) ||^2. (The 1/2 follows the
reference implementation; the factor 2 of the plain squared norm is part of base_lr.)

A frame at position i of a mini-batch that starts from fast weights W outputs
    z_i = q_i + LN(f_{W_i}(q_i)),   W_i = W - s_i * sum_{j<=i} lr_j * grad l_j(W),
with every gradient taken at W (the mini-batch start). After the last frame of a full mini-batch
the state becomes W - s_{K-1} * sum_j lr_j grad l_j(W). Two exact ways compute this:

* `minibatch_forward`: the dual form, all z_i of one mini-batch at once with lower-triangular
  masks (training; `ttt_scan` carries the state across mini-batches);
* `stream_step`: one frame at a time from a buffer of the current mini-batch's frames
  (inference), with a masked commit at i = K-1 so it has no host syncs.

When a mini-batch commits, the new state may *settle* (`Settle`): decay toward the learned W0
(forgetting) and/or renormalise each output unit's incoming weights, bias included, to W0's norm
(bounded fast weights, as LaCT's weight norm). Settling happens only at commits, identically in
both forms, so they stay exact.

All arithmetic here is fp32; callers cast in and out. Like moshi's own small functions, the
two hot ones are compiled lazily with torch.compile on GPU (`NO_TORCH_COMPILE=1` turns it off;
moshi's layers disable it on CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moshi.utils.compile import torch_compile_lazy
from torch.utils.checkpoint import checkpoint

_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


@dataclass
class FastWeights:
    """Per-row fast weights of one TTT layer: W1 [B,H,HD,F], b1 [B,H,1,F], W2 [B,H,F,HD],
    b2 [B,H,1,HD]."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w1, self.b1, self.w2, self.b2


@dataclass
class Settle:
    """What a committed state does before the next mini-batch reads it.

    keep [H] (None: no decay): W <- W0 + keep * (W - W0), a per-head decay toward the learned
    initial weights; norms (None: no renormalisation): the column norms of W0's [W1; b1] [H,1,F]
    and [W2; b2] [H,1,HD], to which the committed state's columns are rescaled. `w0` is the
    learned W0, unbatched ([H, ...]) or per row ([B, H, ...]).
    """

    w0: FastWeights | None = None
    keep: torch.Tensor | None = None
    norms: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        return self.keep is not None or self.norms is not None


def augmented_column_norms(w: FastWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Norms of each output unit's incoming weights with its bias: ||[W1; b1]_:,j|| [.., 1, F]
    and ||[W2; b2]_:,d|| [.., 1, HD]."""
    n1 = (w.w1.pow(2).sum(-2, keepdim=True) + w.b1.pow(2)).sqrt()
    n2 = (w.w2.pow(2).sum(-2, keepdim=True) + w.b2.pow(2)).sqrt()
    return n1, n2


def settle(w: FastWeights, rule: Settle | None) -> FastWeights:
    """Apply `rule` to a just-committed state [B, H, ...] (see `Settle`)."""
    if rule is None or not rule.active:
        return w
    if rule.keep is not None:
        assert rule.w0 is not None
        keep = rule.keep.float().view(-1, 1, 1)  # [H, 1, 1], broadcasts over [B, H, ., .]
        w = FastWeights(*(init + keep * (cur - init)
                          for cur, init in zip(w.as_tuple(), rule.w0.as_tuple())))
    if rule.norms is not None:
        t1, t2 = rule.norms
        n1, n2 = augmented_column_norms(w)
        g1, g2 = t1 / n1.clamp_min(1e-12), t2 / n2.clamp_min(1e-12)
        w = FastWeights(w.w1 * g1, w.b1 * g1, w.w2 * g2, w.b2 * g2)
    return w


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx of the tanh-approximated gelu, in closed form (the inner loop takes it from
    `gelu_tanh_and_grad`, which shares the formula)."""
    return _gelu_grad_from_t(x, _gelu_tanh_t(x))


# gelu_tanh(x) = x/2 (1 + t), t = tanh(u), u = k (x + c x^3): the pieces every form shares
def _gelu_tanh_t(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(_GELU_K * (x + _GELU_C * x.pow(3)))


def _gelu_du(x: torch.Tensor) -> torch.Tensor:
    return _GELU_K * (1.0 + 3.0 * _GELU_C * x * x)


def _gelu_from_t(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x * (0.5 * (1.0 + t))


def _gelu_grad_from_t(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _gelu_du(x)


class _GeluTanhAndGrad(torch.autograd.Function):
    """(gelu(x), gelu'(x)) from one tanh, with a backward that is a multiply-add.

    Why: the inner gradient needs gelu'(z1) of the keys' pre-activations, and the outer
    backward then differentiates through it. Built from autograd ops, that is ~12 recorded
    elementwise ops plus aten's tanh-gelu backward, which on a CPU thread costs more than the
    forward's matmul it follows (1.3 ms for a [16, 1, 16, 256] tile, measured); here the
    backward reads gelu' and gelu'' off the saved tanh. First order only (the outer loop needs
    no more)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        t = _gelu_tanh_t(x)
        d1 = _gelu_grad_from_t(x, t)
        ctx.save_for_backward(x, t, d1)
        return _gelu_from_t(x, t), d1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_val: torch.Tensor | None, g_d1: torch.Tensor | None):
        x, t, d1 = ctx.saved_tensors
        grad = None if g_val is None else g_val * d1
        if g_d1 is not None:
            # gelu'' = (1 - t^2) (u' + x/2 (u'' - 2 t u'^2)), u = k (x + c x^3)
            du = _gelu_du(x)
            d2 = (1.0 - t * t) * (du + 0.5 * x * (6.0 * _GELU_K * _GELU_C * x - 2.0 * t * du * du))
            grad = g_d1 * d2 if grad is None else grad + g_d1 * d2
        return grad


def gelu_tanh_and_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu_tanh(x), gelu_tanh_grad(x)), equal to them up to rounding, differentiable."""
    return _GeluTanhAndGrad.apply(x)


def gelu_tanh_value(x: torch.Tensor) -> torch.Tensor:
    """`gelu_tanh_and_grad(x)[0]` computed by the same ops, so the parallel form and the
    streaming step read the same values in eager mode; without a gradient to track it skips
    the derivative (the streaming step's query path, every frame)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GeluTanhAndGrad.apply(x)[0]
    return _gelu_from_t(x, _gelu_tanh_t(x))


def head_layer_norm(
    z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """Per-head LayerNorm over the last dim; weight/bias [H, HD] broadcast over [B,H,T,HD]."""
    mu = z.mean(dim=-1, keepdim=True)
    var = z.var(dim=-1, keepdim=True, unbiased=False)
    zhat = (z - mu) * torch.rsqrt(var + eps)
    return zhat * weight[:, None, :] + bias[:, None, :]


def head_layer_norm_l2_grad(
    z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    with_residual: bool = False,
):
    """Gradient wrt z of 1/2 ||LN(z) - target||^2 (LayerNorm backward fused with the L2 loss);
    with `with_residual`, also LN(z) - target (whose half squared norm is the loss)."""
    d = z.shape[-1]
    mu = z.mean(dim=-1, keepdim=True)
    var = z.var(dim=-1, keepdim=True, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    zhat = (z - mu) * rstd
    w = weight[:, None, :]
    residual = zhat * w + bias[:, None, :] - target
    g_hat = residual * w
    grad = (
        d * g_hat
        - g_hat.sum(dim=-1, keepdim=True)
        - zhat * (g_hat * zhat).sum(dim=-1, keepdim=True)
    ) * (rstd / d)
    return (grad, residual) if with_residual else grad


def inner_grads(
    w: FastWeights,
    xk: torch.Tensor,
    xv: torch.Tensor,
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-frame gradients of the inner loss at W. Returns (x2, gz1, gz2):
    x2 = gelu(xk W1 + b1) [.., F] (the input of W2), gz1 = dl/dZ1 [.., F], gz2 = dl/dZ2 [.., HD]."""
    _, x2, gz1, gz2, _ = inner_grads_and_residual(w, xk, xv, ln_w, ln_b, eps)
    return x2, gz1, gz2


def inner_grads_and_residual(
    w: FastWeights,
    xk: torch.Tensor,
    xv: torch.Tensor,
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`inner_grads`, with what the streaming telemetry also reads: (z1, x2, gz1, gz2, residual),
    z1 = xk W1 + b1 and residual = LN(f_W(xk)) - (xv - xk) (half its squared norm is the loss)."""
    z1 = xk @ w.w1 + w.b1
    x2, dx2 = gelu_tanh_and_grad(z1)
    z2 = x2 @ w.w2 + w.b2
    gz2, residual = head_layer_norm_l2_grad(z2, xv - xk, ln_w, ln_b, eps, with_residual=True)
    gz1 = (gz2 @ w.w2.transpose(-1, -2)) * dx2
    return z1, x2, gz1, gz2, residual


def position_scale(k: int, offset: torch.Tensor | None = None, device=None,
                   kind: str = "mean") -> torch.Tensor:
    """s_i for positions i in a mini-batch of size k: 1/(i+1) (`mean`: frame i reads W0 minus
    the mean of the lr-weighted gradients so far) or 1 (`sum`: minus their sum), plus an optional
    learned offset clamped so that s_i >= 0."""
    if kind == "mean":
        s = 1.0 / torch.arange(1, k + 1, device=device, dtype=torch.float32)
    elif kind == "sum":
        s = torch.ones(k, device=device, dtype=torch.float32)
    else:
        raise ValueError(f"unknown position scale {kind!r}: expected mean or sum")
    if offset is not None:
        s = torch.clamp(s + offset[:k].float(), min=0.0)
    return s


@torch_compile_lazy  # ~240 small ops per mini-batch: fused, the scan stops being launch-bound
def minibatch_forward(
    w: FastWeights,
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    scale: torch.Tensor,
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    eps: float,
    rule: Settle | None = None,
) -> tuple[torch.Tensor, FastWeights]:
    """Dual form over one mini-batch of k <= K frames.

    xq/xk/xv [B,H,k,HD], lr [B,H,k] (per-frame inner lr), scale [k] (s_i). Returns the outputs
    z [B,H,k,HD] and the state after the mini-batch, W - s_{k-1} sum_j lr_j grad_j, settled by
    `rule` (the committed state when k == K). Causal: row i of every mask is zero beyond column i.
    """
    k = xq.shape[-2]
    x2, gz1, gz2 = inner_grads(w, xk, xv, ln_w, ln_b, eps)
    causal = torch.ones(k, k, dtype=torch.bool, device=xq.device).tril()
    # eta[i, j] = s_i * lr_j for j <= i, else 0
    eta = torch.where(causal, scale[:, None] * lr[..., None, :], 0.0)
    # W_i applied to q_i: q_i W1 - sum_j eta_ij (q_i . k_j) gz1_j ; b1_i = b1 - sum_j eta_ij gz1_j
    z1 = xq @ w.w1 + w.b1 - (eta * (xq @ xk.transpose(-1, -2) + 1.0)) @ gz1
    x2q = gelu_tanh_value(z1)
    z2 = x2q @ w.w2 + w.b2 - (eta * (x2q @ x2.transpose(-1, -2) + 1.0)) @ gz2
    out = xq + head_layer_norm(z2, ln_w, ln_b, eps)

    last = eta[..., -1, :, None]  # [B,H,k,1] = s_{k-1} * lr_j
    nxt = FastWeights(
        w1=w.w1 - (xk * last).transpose(-1, -2) @ gz1,
        b1=w.b1 - (last * gz1).sum(dim=-2, keepdim=True),
        w2=w.w2 - (x2 * last).transpose(-1, -2) @ gz2,
        b2=w.b2 - (last * gz2).sum(dim=-2, keepdim=True),
    )
    return out, settle(nxt, rule)


def ttt_scan(
    w: FastWeights,
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    mini_batch_size: int,
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    eps: float,
    token_offset: torch.Tensor | None = None,
    checkpoint_group: int = 0,
    rule: Settle | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, FastWeights]:
    """Parallel (training) form over a whole sequence [B,H,T,HD] starting from `w`.

    Full mini-batches are processed in order, the state carried from one to the next; a partial
    last mini-batch uses only its own frames (nothing is padded). With checkpoint_group > 0 and
    autograd on, groups of that many mini-batches are activation-checkpointed, so only the fast
    weights at group boundaries are kept for the backward pass.
    `rule` settles the state after every full mini-batch; `scale` overrides the position scale
    (default 1/(i+1) plus `token_offset`).
    Returns (z [B,H,T,HD], the fast weights after the last *full* mini-batch).
    """
    K = mini_batch_size
    T = xq.shape[-2]
    if scale is None:
        scale = position_scale(K, token_offset, device=xq.device)
    n_full = T // K

    def run(lo: int, hi: int, w1, b1, w2, b2, *tensors: torch.Tensor):
        q, k_, v, r, s = tensors
        state = FastWeights(w1, b1, w2, b2)
        outs = []
        for m in range(hi - lo):
            sl = slice(m * K, (m + 1) * K)
            z, state = minibatch_forward(
                state, q[..., sl, :], k_[..., sl, :], v[..., sl, :], r[..., sl], s, ln_w, ln_b,
                eps, rule,
            )
            outs.append(z)
        return (torch.cat(outs, dim=-2), *state.as_tuple())

    use_ckpt = checkpoint_group > 0 and torch.is_grad_enabled()
    group = checkpoint_group if use_ckpt else max(n_full, 1)
    outs: list[torch.Tensor] = []
    state = w
    for lo in range(0, n_full, group):
        hi = min(lo + group, n_full)
        sl = slice(lo * K, hi * K)
        args = (xq[..., sl, :], xk[..., sl, :], xv[..., sl, :], lr[..., sl], scale)
        if use_ckpt:
            res = checkpoint(run, lo, hi, *state.as_tuple(), *args, use_reentrant=False)
        else:
            res = run(lo, hi, *state.as_tuple(), *args)
        outs.append(res[0])
        state = FastWeights(*res[1:])
    rem = T - n_full * K
    if rem:
        sl = slice(n_full * K, T)
        z, _ = minibatch_forward(
            state, xq[..., sl, :], xk[..., sl, :], xv[..., sl, :], lr[..., sl], scale[:rem],
            ln_w, ln_b, eps,
        )
        outs.append(z)
    return torch.cat(outs, dim=-2), state


@dataclass
class MiniBatchBuffer:
    """What the current mini-batch has accumulated per row, K slots: the frames' keys, the W2
    inputs and the inner-loss gradients (all taken at the mini-batch's start state), and lr."""

    xk: torch.Tensor  # [B,H,K,HD]
    x2: torch.Tensor  # [B,H,K,F]
    gz1: torch.Tensor  # [B,H,K,F]
    gz2: torch.Tensor  # [B,H,K,HD]
    lr: torch.Tensor  # [B,H,K]


@torch_compile_lazy  # one frame: ~60 small ops per TTT layer, fused into a few kernels
def stream_step(
    w: FastWeights,
    buf: MiniBatchBuffer,
    pos: torch.Tensor,
    active: torch.Tensor,
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    lr: torch.Tensor,
    scale: torch.Tensor,
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    eps: float,
    rule: Settle | None = None,
    telemetry: torch.Tensor | None = None,
) -> torch.Tensor:
    """One frame for every row, updating `w`, `buf` and `pos` in place. No host syncs.

    xq/xk/xv [B,H,HD] and lr [B,H] are this frame's; pos [B] (long) is each row's position in its
    mini-batch; rows with active[b] False change nothing (their output is computed but meaningless).
    Returns z [B,H,HD], equal to `minibatch_forward`'s output for the same frame.

    `telemetry` [B, 3] (optional, fp32): each active row adds, mean over heads, this frame's inner
    loss at the mini-batch's start state W ("before the update"), its inner loss at W_pos, the
    state after the updates of the mini-batch's frames up to and including this one, which this
    frame's output reads ("after"), and 1 (a frame count). The "before" loss comes free with the
    gradient; the "after" one costs one more pass of the output computation, on the key.
    """
    K = buf.lr.shape[-1]
    slots = torch.arange(K, device=pos.device)
    xq, xk, xv = xq[:, :, None], xk[:, :, None], xv[:, :, None]  # [B,H,1,HD]

    # 1. this frame's gradient at the mini-batch start state, written to slot `pos` (active rows).
    z1k, x2, gz1, gz2, residual = inner_grads_and_residual(w, xk, xv, ln_w, ln_b, eps)
    write = ((slots[None, :] == pos[:, None]) & active[:, None])[:, None, :]  # [B,1,K]
    buf.xk.copy_(torch.where(write[..., None], xk, buf.xk))
    buf.x2.copy_(torch.where(write[..., None], x2, buf.x2))
    buf.gz1.copy_(torch.where(write[..., None], gz1, buf.gz1))
    buf.gz2.copy_(torch.where(write[..., None], gz2, buf.gz2))
    buf.lr.copy_(torch.where(write, lr[:, :, None], buf.lr))

    # 2. output with W_pos = W - s_pos * sum_{j<=pos} lr_j grad_j  (slots beyond pos are stale).
    valid = (slots[None, :] <= pos[:, None])[:, None, :]  # [B,1,K]
    eta = torch.where(valid, scale[pos][:, None, None] * buf.lr, 0.0)[:, :, None, :]  # [B,H,1,K]
    z1 = xq @ w.w1 + w.b1 - (eta * (xq @ buf.xk.transpose(-1, -2) + 1.0)) @ buf.gz1
    x2q = gelu_tanh_value(z1)  # the function the parallel form computes
    z2 = x2q @ w.w2 + w.b2 - (eta * (x2q @ buf.x2.transpose(-1, -2) + 1.0)) @ buf.gz2
    out = xq + head_layer_norm(z2, ln_w, ln_b, eps)
    if telemetry is not None:  # the same W_pos applied to this frame's key
        z1a = z1k - (eta * (xk @ buf.xk.transpose(-1, -2) + 1.0)) @ buf.gz1
        x2a = gelu_tanh_value(z1a)
        z2a = x2a @ w.w2 + w.b2 - (eta * (x2a @ buf.x2.transpose(-1, -2) + 1.0)) @ buf.gz2
        # [B, H, 1] each: the residual's half squared norm is the inner loss
        losses = torch.cat([residual.pow(2).sum(-1),
                            (head_layer_norm(z2a, ln_w, ln_b, eps) - (xv - xk)).pow(2).sum(-1)],
                           dim=-1).mean(dim=1) * 0.5  # [B, 2], mean over heads
        telemetry[:, :2].add_(torch.where(active[:, None], losses, 0.0))
        telemetry[:, 2].add_(active.to(telemetry.dtype))

    # 3. commit at the last position: a masked update (every other row keeps its state), not a
    #    branch. Settling (decay, weight norm) is part of the commit.
    commit = (pos == K - 1) & active
    if rule is None or not rule.active:
        c = (commit.to(torch.float32)[:, None, None] * scale[K - 1] * buf.lr)[..., None]
        w.w1.sub_((buf.xk * c).transpose(-1, -2) @ buf.gz1)
        w.b1.sub_((c * buf.gz1).sum(dim=-2, keepdim=True))
        w.w2.sub_((buf.x2 * c).transpose(-1, -2) @ buf.gz2)
        w.b2.sub_((c * buf.gz2).sum(dim=-2, keepdim=True))
    else:
        c = (scale[K - 1] * buf.lr)[..., None]  # [B,H,K,1]
        nxt = settle(FastWeights(
            w1=w.w1 - (buf.xk * c).transpose(-1, -2) @ buf.gz1,
            b1=w.b1 - (c * buf.gz1).sum(dim=-2, keepdim=True),
            w2=w.w2 - (buf.x2 * c).transpose(-1, -2) @ buf.gz2,
            b2=w.b2 - (c * buf.gz2).sum(dim=-2, keepdim=True),
        ), rule)
        m4 = commit.view(-1, 1, 1, 1)
        for cur, new in zip(w.as_tuple(), nxt.as_tuple()):
            cur.copy_(torch.where(m4, new, cur))
    pos.copy_(torch.where(active, (pos + 1) % K, pos))
    return out[:, :, 0]

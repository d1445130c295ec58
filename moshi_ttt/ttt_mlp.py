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
from typing import NamedTuple

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


def renorm_gains(w: FastWeights, norms: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output unit, the factor that rescales its incoming weights and bias to `norms`
    (`Settle`): [.., 1, F] for [W1; b1], [.., 1, HD] for [W2; b2]."""
    t1, t2 = norms
    n1, n2 = augmented_column_norms(w)
    return t1 / n1.clamp_min(1e-12), t2 / n2.clamp_min(1e-12)


def renormalized(w: FastWeights, norms: tuple[torch.Tensor, torch.Tensor]) -> FastWeights:
    """`w` with each output unit's incoming weights and bias rescaled to `norms` (`Settle`)."""
    g1, g2 = renorm_gains(w, norms)
    return FastWeights(w.w1 * g1, w.b1 * g1, w.w2 * g2, w.b2 * g2)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx of the tanh-approximated gelu, in closed form (the forms below share the pieces)."""
    return _gelu_grad_from_s(x, *_gelu_s(x))


# gelu_tanh(x) = x/2 (1 + tanh(u)) = x s, s = sigmoid(a), a = 2u = 2k (x + c x^3). Why sigmoids:
# on a CPU thread torch's float tanh costs ~6x its sigmoid (175 against 27 us for a
# [16, 1, 16, 256] tile, measured), and with sm = sigmoid(-a) = 1 - s the derivatives need no
# 1 - s or 1 - tanh^2, which cancel in fp32 (gelu'' from s and sm: 2.4e-7 off float64 over
# [-8, 8], against 3.7e-6 from tanh).
# Each piece is written with as few passes over its [.., F] tile as the formula allows (addcmul
# folds a product and a sum into one): on a CPU thread these tiles' elementwise passes, not
# the matmuls, were most of the dual form's time.
def _const(x: torch.Tensor, v: float) -> torch.Tensor:
    """v as a 0-dim tensor of x's dtype and device (addcmul's `input` must be a tensor)."""
    return torch.full((), v, dtype=x.dtype, device=x.device)


def _gelu_a(x: torch.Tensor) -> torch.Tensor:
    # 2k (x + c x^3) = x (2k + 2kc x^2)
    return x * torch.addcmul(_const(x, 2.0 * _GELU_K), x, x, value=2.0 * _GELU_K * _GELU_C)


def _gelu_s(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, sm) = (sigmoid(a), sigmoid(-a))."""
    a = _gelu_a(x)
    return torch.sigmoid(a), torch.sigmoid(-a)


def _gelu_du(x: torch.Tensor) -> torch.Tensor:
    # u' = k (1 + 3 c x^2)
    return torch.addcmul(_const(x, _GELU_K), x, x, value=3.0 * _GELU_K * _GELU_C)


def _gelu_from_s(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x * s


def _gelu_grad_from_s(x: torch.Tensor, s: torch.Tensor, sm: torch.Tensor) -> torch.Tensor:
    # gelu' = s + 2 x s (1 - s) u'
    return torch.addcmul(s, x, (s * sm) * _gelu_du(x), value=2.0)


def _gelu_grad2_from_s(x: torch.Tensor, s: torch.Tensor, sm: torch.Tensor) -> torch.Tensor:
    # gelu'' = 2 s (1 - s) (2 u' + x (u'' + 2 (1 - 2 s) u'^2)), u'' = 6 k c x
    #        = 4 s (1 - s) (u' + x r), r = (1 - 2 s) u'^2 + 3 k c x
    du = _gelu_du(x)
    r = torch.add((sm - s) * du * du, x, alpha=3.0 * _GELU_K * _GELU_C)
    return (s * sm) * torch.addcmul(du, x, r) * 4.0


def gelu_tanh_grad2(x: torch.Tensor) -> torch.Tensor:
    """d2/dx2 of the tanh-approximated gelu, in closed form (the dual form's backward)."""
    return _gelu_grad2_from_s(x, *_gelu_s(x))


def gelu_tanh_and_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gelu_tanh(x), gelu_tanh_grad(x)), equal to them up to rounding (the streaming step's
    inner gradient; the training form has its own backward, `_DualForm`)."""
    s, sm = _gelu_s(x)
    return _gelu_from_s(x, s), _gelu_grad_from_s(x, s, sm)


def gelu_tanh_value(x: torch.Tensor) -> torch.Tensor:
    """`gelu_tanh_and_grad(x)[0]` alone, by the same ops (one sigmoid): the parallel form and
    the streaming step read the same values."""
    return _gelu_from_s(x, torch.sigmoid(_gelu_a(x)))


def _normalized(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z - mean) * rstd and rstd over the last dim: the LayerNorm's pieces every form shares.
    Two passes, written out: `Tensor.var` costs 117 us for a [16, 1, 16, 64] tile on a CPU
    thread (this, 16 us), and aten's layer-norm kernel lost precision here (2-3x the dual
    form's error against a float64 oracle, measured)."""
    zc = z - z.mean(dim=-1, keepdim=True)
    rstd = torch.rsqrt((zc * zc).mean(dim=-1, keepdim=True) + eps)
    return zc * rstd, rstd


def head_layer_norm(
    z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """Per-head LayerNorm over the last dim; weight/bias [H, HD] broadcast over [B,H,T,HD]."""
    zhat, _ = _normalized(z, eps)
    return zhat * weight[:, None, :] + bias[:, None, :]


def head_layer_norm_l2_grad(
    z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    with_residual: bool = False,
):
    """Gradient wrt z of 1/2 ||LN(z) - target||^2 (LayerNorm backward fused with the L2 loss);
    with `with_residual`, also LN(z) - target (whose half squared norm is the loss)."""
    grad, residual, _, _, _ = _l2_grad_parts(z, target, weight, bias, eps)
    return (grad, residual) if with_residual else grad


def _l2_grad_parts(z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float):
    """`head_layer_norm_l2_grad` with its pieces: (grad, residual, zhat, rstd, g_hat), g_hat =
    residual * weight (the loss's gradient wrt LN(z)'s normalised value)."""
    d = z.shape[-1]
    zhat, rstd = _normalized(z, eps)
    w = weight[:, None, :]
    residual = zhat * w + bias[:, None, :] - target
    g_hat = residual * w
    grad = (
        d * g_hat
        - g_hat.sum(dim=-1, keepdim=True)
        - zhat * (g_hat * zhat).sum(dim=-1, keepdim=True)
    ) * (rstd / d)
    return grad, residual, zhat, rstd, g_hat


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
    p = _key_pass(w, xk, xv, ln_w, ln_b, eps)
    return p.z1, p.x2, p.gz1, p.gz2, p.res


class _KeyPass(NamedTuple):
    """The keys' inner forward and gradient at W, with the pieces the dual form's backward
    reads: s, sm (`_gelu_s` of z1), gp1 = gelu'(z1), xh, r (z2 normalised, its rstd), g
    (res * ln_w), hh = gz2 W2^T."""

    z1: torch.Tensor
    s: torch.Tensor
    sm: torch.Tensor
    x2: torch.Tensor
    gp1: torch.Tensor
    gz2: torch.Tensor
    res: torch.Tensor
    xh: torch.Tensor
    r: torch.Tensor
    g: torch.Tensor
    hh: torch.Tensor
    gz1: torch.Tensor


def _key_pass(w: FastWeights, xk: torch.Tensor, xv: torch.Tensor, ln_w: torch.Tensor,
              ln_b: torch.Tensor, eps: float) -> _KeyPass:
    """One computation for the streaming step and the dual form, so both read the same bits."""
    z1 = xk @ w.w1 + w.b1
    s, sm = _gelu_s(z1)
    x2, gp1 = _gelu_from_s(z1, s), _gelu_grad_from_s(z1, s, sm)
    gz2, res, xh, r, g = _l2_grad_parts(x2 @ w.w2 + w.b2, xv - xk, ln_w, ln_b, eps)
    hh = gz2 @ _t(w.w2)
    return _KeyPass(z1, s, sm, x2, gp1, gz2, res, xh, r, g, hh, hh * gp1)


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


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _plus_outer(base: torch.Tensor, x: torch.Tensor, g: torch.Tensor,
                alpha: float = 1.0, owned: bool = False) -> torch.Tensor:
    """base + alpha * x^T g over the last two dims ([.., k, m], [.., k, n] -> [.., m, n]).
    `owned`: base is a contiguous tensor the caller may overwrite, updated in place by one GEMM
    with beta = 1 (no state-sized temporary)."""
    if not (owned and base.is_contiguous()):  # e.g. W0 broadcast over the rows: one add
        return torch.add(base, _t(x) @ g, alpha=alpha)
    mn = base.shape[-2:]
    base.view(-1, *mn).baddbmm_(_t(x).reshape(-1, *_t(x).shape[-2:]), g.reshape(-1, *g.shape[-2:]),
                                alpha=alpha)
    return base


def _head_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[(B,) H, ...] . [(B,) H, ...] -> [H]: the per-head dot product, summed over rows."""
    a, b = a.flatten(-2), b.flatten(-2)
    return torch.einsum("...hn,...hn->h", a, b)


def _head_sum(x: torch.Tensor) -> torch.Tensor:
    """[B, H, ...] -> [H]: a per-head total."""
    return x.transpose(0, 1).reshape(x.shape[1], -1).sum(-1)


class _DualForm(torch.autograd.Function):
    """One mini-batch of the dual form, the committed state decayed toward W0 by `keep` when
    given (`minibatch_forward` has the math), with a hand-written backward.

    Why: built from autograd ops, a mini-batch records ~100 elementwise ops, differentiates the
    inner LayerNorm-L2 gradient op by op and makes several passes over the state-sized fast
    weights per update and per gradient (a training step of the tiny model on one CPU thread
    spent ~60 % of its time in the TTT scan, more of it in elementwise work than in matmuls).
    Here the backward is written out once: the same matmuls (those that share an output merged
    into one), every state-sized result made in one pass (`_plus_outer`, `torch.lerp`).
    First order only (the outer loop needs no more); float64 gradcheck in the tests.
    """

    @staticmethod
    def forward(ctx, w1, b1, w2, b2, xq, xk, xv, lr, scale, ln_w, ln_b, eps,
                w01, w0b1, w02, w0b2, keep, with_state):
        ctx.set_materialize_grads(False)
        gam, bet = ln_w[:, None, :], ln_b[:, None, :]
        # the keys' inner gradients at W (as `inner_grads`)
        z1, sk, smk, x2, gp1, gz2, res, xh, r, g, hh, gz1 = _key_pass(
            FastWeights(w1, b1, w2, b2), xk, xv, ln_w, ln_b, eps)
        # eta[i, j] = s_i * lr_j for j <= i, else 0; query i reads W_i
        eta = (scale[:, None] * lr[..., None, :]).tril()
        a1p = xq @ _t(xk) + 1.0
        a1 = eta * a1p
        zq1 = xq @ w1 + b1 - a1 @ gz1
        sq, smq = _gelu_s(zq1)
        xq2 = _gelu_from_s(zq1, sq)
        a2p = xq2 @ _t(x2) + 1.0
        a2 = eta * a2p
        zq2 = xq2 @ w2 + b2 - a2 @ gz2
        xhq, rq = _normalized(zq2, eps)
        out = xq + (xhq * gam + bet)
        ctx.save_for_backward(w1, b1, w2, b2, xq, xk, z1, sk, smk, x2, gp1, xh, r, g, res, gz2,
                              hh, gz1, eta, a1p, a1, zq1, sq, smq, xq2, a2p, a2, xhq, rq, ln_w, lr,
                              scale, w01, w0b1, w02, w0b2, keep)
        if not with_state:  # a partial last mini-batch: its state is never read
            return out
        # the committed state: W - s_{k-1} sum_j lr_j grad_j, then W0 + keep (that - W0)
        c = eta[..., -1, :, None]  # [B,H,k,1]
        if keep is None:
            base = (w1, b1, w2, b2)
        else:
            kp = keep.view(-1, 1, 1)
            c = c * kp
            base = tuple(torch.lerp(i, w, kp) for i, w in zip((w01, w0b1, w02, w0b2),
                                                              (w1, b1, w2, b2)))
        return (out, *_minus_update(FastWeights(*base), c, xk, x2, gz1, gz2,
                                    owned=keep is not None).as_tuple())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_w1n=None, d_b1n=None, d_w2n=None, d_b2n=None):
        (w1, b1, w2, b2, xq, xk, z1, sk, smk, x2, gp1, xh, r, g, res, gz2, hh, gz1, eta, a1p, a1,
         zq1, sq, smq, xq2, a2p, a2, xhq, rq, ln_w, lr, scale,
         w01, w0b1, w02, w0b2, keep) = ctx.saved_tensors
        gam = ln_w[:, None, :]
        d = xh.shape[-1]
        if d_out is None:
            d_out = torch.zeros_like(xq)
        kp = None if keep is None else keep.view(-1, 1, 1)
        c = eta[..., -1, :, None]
        ck = c if kp is None else c * kp
        # 1. the committed state W' = lerp(W0, W, keep) - keep (x * c)^T gz: its gradient reaches
        #    W (times keep), W0 (times 1 - keep), keep, and gz, x and c through the update
        d_next = (d_w1n, d_b1n, d_w2n, d_b2n)
        d_start: list[torch.Tensor | None] = [None] * 4
        d_w0: list[torch.Tensor | None] = [None] * 4
        dkeep = None
        for i, dn in enumerate(d_next):
            if dn is None:
                continue
            d_start[i] = dn if kp is None else dn * kp
            if kp is not None:
                w_i, w0_i = (w1, b1, w2, b2)[i], (w01, w0b1, w02, w0b2)[i]
                dn_w0 = dn.sum_to_size(w0_i.shape)
                if ctx.needs_input_grad[12 + i]:
                    d_w0[i] = dn_w0 * (1.0 - kp)
                # <W - W0, dn> per head as <W, dn> - <W0, dn summed over W0's broadcast rows>:
                # one pass over the state-sized tensors, not a difference, a product and a sum
                part = _head_dot(w_i, dn) - _head_dot(w0_i, dn_w0)
                dkeep = part if dkeep is None else dkeep + part
        dgz = [None, None]
        dxs = [None, None]  # d xk, d x2 through the update
        pg = None  # p_j . gz_j summed over both layers, [B,H,k]
        for layer, (dw, db, x, gz) in enumerate(((d_w1n, d_b1n, xk, gz1),
                                                 (d_w2n, d_b2n, x2, gz2))):
            if dw is None and db is None:
                continue
            # p_j = x_j dW' + db': the loss's gradient wrt c_j gz_j is -keep p_j
            p = x @ dw if dw is not None else None
            p = db if p is None else (p if db is None else p + db)
            part = (p * gz).sum(dim=-1)
            pg = part if pg is None else pg + part
            dgz[layer] = -ck * p
            if dw is not None:
                dxs[layer] = -ck * (gz @ _t(dw))
        dc = None
        if pg is not None:
            dc = -pg if kp is None else -pg * keep.view(-1, 1)
            if kp is not None:
                dkeep = dkeep - _head_sum(pg * c[..., 0])
        dgz1, dgz2 = dgz
        dxk, dx2 = dxs
        # 2. out = xq + LN(zq2)
        dlnb = d_out.sum(dim=(0, 2))
        dlnw = (d_out * xhq).sum(dim=(0, 2))
        gy = d_out * gam
        dzq2 = (gy - gy.mean(-1, keepdim=True) - xhq * (gy * xhq).mean(-1, keepdim=True)) * rq
        # zq2 = xq2 W2 + b2 - a2 gz2, a2 = eta * (xq2 x2^T + 1)
        dxq2 = dzq2 @ _t(w2)
        da2 = -(dzq2 @ _t(gz2))
        dgz2 = _acc(dgz2, -(_t(a2) @ dzq2))
        deta = da2 * a2p
        ds2 = da2 * eta
        dxq2 = dxq2 + ds2 @ x2
        dx2 = _acc(dx2, _t(ds2) @ xq2)
        # xq2 = gelu(zq1), zq1 = xq W1 + b1 - a1 gz1, a1 = eta * (xq xk^T + 1)
        dzq1 = dxq2 * _gelu_grad_from_s(zq1, sq, smq)
        dxq = d_out + dzq1 @ _t(w1)
        da1 = -(dzq1 @ _t(gz1))
        dgz1 = _acc(dgz1, -(_t(a1) @ dzq1))
        deta = deta + da1 * a1p
        ds1 = da1 * eta
        dxq = dxq + ds1 @ xk
        dxk = _acc(dxk, _t(ds1) @ xq)
        # eta = tril(s_i lr_j); c is its last row
        if dc is not None:
            deta[..., -1, :] += dc
        deta = deta.tril()
        dlr = (deta * scale[:, None]).sum(dim=-2)
        dscale = (deta * lr[..., None, :]).sum(dim=(0, 1, 3)) if ctx.needs_input_grad[8] else None
        # gz1 = hh * gelu'(z1), hh = gz2 W2^T
        dhh = dgz1 * gp1
        dgp1 = dgz1 * hh
        dgz2 = dgz2 + dhh @ w2
        # gz2 = d/dz2 of 1/2 ||LN(z2) - (xv - xk)||^2 = r (g - mean g - xh mean(g xh)),
        # g = gam res, res = gam xh + bet - (xv - xk), xh = (z2 - mean) r
        ur = dgz2 * r
        urx = (ur * xh).mean(-1, keepdim=True)
        dg = ur - ur.mean(-1, keepdim=True) - xh * urx
        dxh = -(g * xh).mean(-1, keepdim=True) * ur - urx * g
        dr = (dgz2 * gz2).sum(-1, keepdim=True) / r
        dres = dg * gam
        dlnw = dlnw + (dg * res + dres * xh).sum(dim=(0, 2))
        dlnb = dlnb + dres.sum(dim=(0, 2))
        dxh = dxh + dres * gam
        dz2 = (dxh - dxh.mean(-1, keepdim=True) - xh * (dxh * xh).mean(-1, keepdim=True)) * r \
            - dr * (r * r / d) * xh
        # z2 = x2 W2 + b2, x2 = gelu(z1), z1 = xk W1 + b1
        dx2 = _acc(dx2, dz2 @ _t(w2))
        dz1 = dx2 * gp1 + dgp1 * _gelu_grad2_from_s(z1, sk, smk)
        dxk = dxk + dz1 @ _t(w1) + dres  # the target is xv - xk
        # the start state: every matmul that read W1 (queries, keys) or W2 (queries, keys,
        # the inner gradient's W2^T) in one product each
        cat = torch.cat
        owned = kp is not None  # d_start = keep * d_next, a fresh tensor
        dw1 = _outer(d_start[0], cat([xq, xk], dim=-2), cat([dzq1, dz1], dim=-2), owned)
        dw2 = _outer(d_start[2], cat([xq2, dhh, x2], dim=-2), cat([dzq2, gz2, dz2], dim=-2),
                     owned)
        db1 = _acc(d_start[1], (dzq1.sum(dim=-2, keepdim=True) + dz1.sum(dim=-2, keepdim=True)))
        db2 = _acc(d_start[3], (dzq2.sum(dim=-2, keepdim=True) + dz2.sum(dim=-2, keepdim=True)))
        return (dw1, db1, dw2, db2, dxq, dxk, -dres, dlr, dscale, dlnw, dlnb, None,
                *d_w0, dkeep, None)


def _minus_update(base: FastWeights, c: torch.Tensor, xk: torch.Tensor, x2: torch.Tensor,
                  gz1: torch.Tensor, gz2: torch.Tensor, owned: bool) -> FastWeights:
    """base - sum_j c_j (x_j^T gz_j, gz_j) per tensor: a commit's update with per-frame
    coefficients c [B,H,k,1]; `owned` as in `_plus_outer` (W1 and W2 updated in place)."""
    return FastWeights(
        w1=_plus_outer(base.w1, xk * c, gz1, alpha=-1.0, owned=owned),
        b1=base.b1 - (c * gz1).sum(dim=-2, keepdim=True),
        w2=_plus_outer(base.w2, x2 * c, gz2, alpha=-1.0, owned=owned),
        b2=base.b2 - (c * gz2).sum(dim=-2, keepdim=True),
    )


def _acc(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a + b


def _outer(base: torch.Tensor | None, x: torch.Tensor, g: torch.Tensor,
           owned: bool = False) -> torch.Tensor:
    """x^T g, plus `base` when there is one (in the same GEMM; see `_plus_outer`)."""
    return _t(x) @ g if base is None else _plus_outer(base, x, g, owned=owned)


@torch_compile_lazy  # ~100 small ops per mini-batch: fused, the scan stops being launch-bound
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
    with_state: bool = True,
) -> tuple[torch.Tensor, FastWeights | None]:
    """Dual form over one mini-batch of k <= K frames.

    xq/xk/xv [B,H,k,HD], lr [B,H,k] (per-frame inner lr), scale [k] (s_i). Returns the outputs
    z [B,H,k,HD] and the state after the mini-batch, W - s_{k-1} sum_j lr_j grad_j, settled by
    `rule` (the committed state when k == K); None for the state with `with_state` False (a
    partial last mini-batch, whose state nobody reads, skips computing it). Causal: row i of
    every mask is zero beyond column i.

    With every gradient taken at W (the mini-batch start), frame i reads
    W_i = W - s_i sum_{j<=i} lr_j grad_j, so for eta_ij = s_i lr_j (j <= i, else 0):
        q_i W1_i + b1_i = q_i W1 + b1 - sum_j eta_ij (q_i . k_j + 1) gz1_j,
    and likewise for W2 with the queries' and keys' hidden activations. `_DualForm` has the
    arithmetic and its backward.
    """
    keep = rule.keep if rule is not None else None
    w0 = rule.w0.as_tuple() if keep is not None else (None,) * 4
    res = _DualForm.apply(*w.as_tuple(), xq, xk, xv, lr, scale, ln_w, ln_b, eps, *w0, keep,
                          with_state)
    if not with_state:
        return res, None
    out, *nxt = res
    nxt = FastWeights(*nxt)
    if rule is not None and rule.norms is not None:
        nxt = renormalized(nxt, rule.norms)
    return out, nxt


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

    def run(w1, b1, w2, b2, *tensors: torch.Tensor):
        q, k_, v, r, s = tensors
        state = FastWeights(w1, b1, w2, b2)
        outs = []
        for qm, km, vm, rm in zip(q.split(K, dim=-2), k_.split(K, dim=-2), v.split(K, dim=-2),
                                  r.split(K, dim=-1)):
            z, state = minibatch_forward(state, qm, km, vm, rm, s, ln_w, ln_b, eps, rule)
            outs.append(z)
        return (torch.cat(outs, dim=-2), *state.as_tuple())

    use_ckpt = checkpoint_group > 0 and torch.is_grad_enabled()
    group = (checkpoint_group if use_ckpt else max(n_full, 1)) * K
    # The sequence in pieces (groups of full mini-batches, then the partial one) by `split`,
    # not slices: a split's backward is one concatenation, n slices' backward n zero-filled
    # sequence-sized gradients summed (O(n^2) in the mini-batches).
    rem = T - n_full * K
    sizes = [min(group, n_full * K - lo) for lo in range(0, n_full * K, group)]
    pieces = list(zip(*(t.split(sizes + [rem] * (rem > 0), dim=d)
                        for t, d in ((xq, -2), (xk, -2), (xv, -2), (lr, -1)))))
    outs: list[torch.Tensor] = []
    state = w
    for args in pieces[:len(sizes)]:
        if use_ckpt:
            res = checkpoint(run, *state.as_tuple(), *args, scale, use_reentrant=False)
        else:
            res = run(*state.as_tuple(), *args, scale)
        outs.append(res[0])
        state = FastWeights(*res[1:])
    if rem:
        z, _ = minibatch_forward(state, *pieces[-1], scale[:rem], ln_w, ln_b, eps,
                                 with_state=False)
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

    # 3. commit at the last position: a masked update in place, not a branch (no host sync; one
    #    CUDA graph). A row that does not commit gets c = 0 and, with a decay, keep factor 1 (with
    #    weight norm, gain 1): W.lerp_(W0, 0) and W * 1 are W bit for bit and the update adds
    #    exact zeros, so its state is untouched, while each state-sized tensor is read and
    #    written about twice per frame (a settled copy of every row selected by `where` took ~8
    #    passes), with the arithmetic of the dual form's commit.
    commit = (pos == K - 1) & active
    c = (commit.to(torch.float32)[:, None, None] * scale[K - 1] * buf.lr)[..., None]
    if rule is not None and rule.keep is not None:
        assert rule.w0 is not None
        # keep on committing rows, 1 elsewhere: W <- W0 + keep (W - W0)
        f = torch.where(commit[:, None], rule.keep.float()[None, :], 1.0)[..., None, None]
        c = c * f
        for cur, init in zip(w.as_tuple(), rule.w0.as_tuple()):
            cur.lerp_(init.to(cur.dtype), 1.0 - f)
    nxt = _minus_update(w, c, buf.xk, buf.x2, buf.gz1, buf.gz2, owned=True)
    for cur, new in zip(w.as_tuple(), nxt.as_tuple()):
        if new is not cur:  # the biases (and a state that is not contiguous)
            cur.copy_(new)
    if rule is not None and rule.norms is not None:  # `renormalized` in place, gain 1 elsewhere
        m3 = commit.view(-1, 1, 1, 1)
        g1, g2 = (torch.where(m3, g, 1.0) for g in renorm_gains(w, rule.norms))
        for t, g in ((w.w1, g1), (w.b1, g1), (w.w2, g2), (w.b2, g2)):
            t.mul_(g)
    pos.copy_(torch.where(active, (pos + 1) % K, pos))
    return out[:, :, 0]

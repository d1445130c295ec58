"""`TTTBlock`: a TTT-MLP sub-block that sits between attention and feed-forward in a Moshi layer.

    x = x + tanh(alpha) * wo(post_norm(ttt(pre_norm(x))))

It is a moshi `StreamingModule`: outside streaming it runs the parallel dual form over the whole
sequence (training, `LMModel.forward`); inside `streaming(B)` it keeps per-row fast weights and the
current mini-batch in a `TTTState` and advances one frame per call (`LMGen.step`), honouring
moshi's reset and exec masks like the KV cache does.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from moshi.modules.streaming import State, StreamingModule
from moshi.modules.transformer import RMSNorm, create_norm_fn
from torch import nn

from moshi.modules.conv import StreamingConv1d
from moshi.modules.rope import apply_rope

from .config import TTTConfig
from .ttt_mlp import (
    FastWeights, MiniBatchBuffer, Settle, augmented_column_norms, head_layer_norm, position_scale,
    stream_step, ttt_scan,
)

logger = logging.getLogger(__name__)

#: `whiten_projections`: the ridge added to the calibration covariance, relative to its largest
#: eigenvalue: no direction is scaled up more than 10x as much as the one of largest variance.
WHITEN_RIDGE = 1e-2

#: `fit_readout`: the ridge of the least-squares read-out, relative to the mean diagonal of its
#: normal matrix (so a direction the recalled outputs barely span gets no large weight).
READOUT_RIDGE = 1e-2

#: Parameter names (relative to the block) of the inner set counted as `ttt_inner`.
INNER_PARAM_NAMES = (
    "inner.w1", "inner.b1", "inner.w2", "inner.b2",
    "inner.ttt_norm_weight", "inner.ttt_norm_bias",
    "inner.lr_weight", "inner.lr_bias", "inner.decay_logit",
)


class FastWeightInit(nn.Module):
    """The learned initial fast weights W0 and the inner learner's own parameters.

    Always fp32, whatever `.to(dtype)` the model gets: these feed fp32 inner arithmetic, and
    rounding W0 to bf16 would change what every session starts from. W0 is only ever *read* by
    forward passes; sessions learn in their own `TTTState` copies.
    """

    def __init__(self, num_heads: int, head_dim: int, d_model: int, hidden: int,
                 mini_batch_size: int, learn_token_offset: bool, device=None,
                 init: str = "scaled", decay_init: float | None = None):
        super().__init__()
        self.init = init
        self.decay_init = decay_init
        kw = {"device": device, "dtype": torch.float32}
        self.w1 = nn.Parameter(torch.empty(num_heads, head_dim, hidden, **kw))
        self.b1 = nn.Parameter(torch.empty(num_heads, 1, hidden, **kw))
        self.w2 = nn.Parameter(torch.empty(num_heads, hidden, head_dim, **kw))
        self.b2 = nn.Parameter(torch.empty(num_heads, 1, head_dim, **kw))
        self.ttt_norm_weight = nn.Parameter(torch.empty(num_heads, head_dim, **kw))
        self.ttt_norm_bias = nn.Parameter(torch.empty(num_heads, head_dim, **kw))
        self.lr_weight = nn.Parameter(torch.empty(num_heads, d_model, **kw))
        self.lr_bias = nn.Parameter(torch.empty(num_heads, **kw))
        self.token_offset = (
            nn.Parameter(torch.empty(mini_batch_size, **kw)) if learn_token_offset else None
        )
        # per-head decay toward W0 per committed mini-batch: sigmoid(decay_logit)
        self.decay_logit = (nn.Parameter(torch.empty(num_heads, **kw))
                            if decay_init is not None else None)

    def reset_parameters(self) -> None:
        """W0 at init. Keys and queries are L2-normalised, so with `scaled` the pre-activations
        k W1 have unit variance (W1 ~ N(0, 1)) and the output the inner LayerNorm sees,
        gelu(k W1) W2 with W2 ~ N(0, 1/hidden), has variance E[gelu(z)^2] ~ 0.43 per element,
        at every head dim: far above ln_eps, so the LayerNorm backward (x 1/std) stays tame.
        The `reference` init (ttt-lm's N(0, 0.02)) gives that output a variance of a few ln_eps
        (2.3 x 1e-6 at head dim 16, 20 x at 128): the first commit then throws b2 far out and the
        inner output stops depending on its input (measured by `moshi-ttt diagnose-ttt`)."""
        with torch.no_grad():
            if self.init == "scaled":
                nn.init.normal_(self.w1, std=1.0)
                nn.init.normal_(self.w2, std=1.0 / math.sqrt(self.w2.shape[-2]))
            elif self.init == "reference":
                nn.init.normal_(self.w1, std=0.02)
                nn.init.normal_(self.w2, std=0.02)
            else:
                raise ValueError(f"unknown inner_init {self.init!r}: expected scaled or reference")
            nn.init.zeros_(self.b1)
            nn.init.zeros_(self.b2)
            if self.decay_logit is not None:
                nn.init.constant_(self.decay_logit, math.log(self.decay_init / (1 - self.decay_init)))
            nn.init.ones_(self.ttt_norm_weight)
            nn.init.zeros_(self.ttt_norm_bias)
            nn.init.normal_(self.lr_weight, std=0.02)
            nn.init.zeros_(self.lr_bias)
            if self.token_offset is not None:
                nn.init.zeros_(self.token_offset)

    def _apply(self, fn, recurse=True):  # keep fp32 through .to(dtype) / .half() / .bfloat16()
        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if out.is_floating_point() and out.dtype != torch.float32:
                out = out.float()
            return out

        return super()._apply(keep_fp32, recurse)

    def fast_weights(self) -> FastWeights:
        """W0 as it is now, unbatched and detached (streaming reads it, never writes it)."""
        return FastWeights(*(p.detach() for p in (self.w1, self.b1, self.w2, self.b2)))

    def settle_rule(self, forget: str, detach: bool) -> Settle | None:
        """How committed states settle (`Settle`), from the current W0 (detached: streaming)."""
        if forget == "none":
            return None
        w0 = FastWeights(self.w1, self.b1, self.w2, self.b2)
        if detach:
            w0 = FastWeights(*(t.detach() for t in w0.as_tuple()))
        if forget == "decay":
            assert self.decay_logit is not None
            keep = 1.0 - torch.sigmoid(self.decay_logit)
            return Settle(w0=w0, keep=keep.detach() if detach else keep)
        if forget == "weight_norm":
            return Settle(w0=w0, norms=augmented_column_norms(w0))
        raise ValueError(f"unknown forget {forget!r}: expected none, decay or weight_norm")

    def tiled(self, batch_size: int) -> FastWeights:
        """W0 for `batch_size` rows (a fresh copy: the result may be updated in place)."""
        return FastWeights(*(
            p.float()[None].expand(batch_size, *p.shape).clone()
            for p in self.fast_weights().as_tuple()
        ))


@dataclass
class TTTState(State):
    """Per-row streaming state of one TTT block: fp32 fast weights W (the state at the current
    mini-batch's start), the mini-batch so far, each row's position in it, and whether the row
    has produced a non-finite output since its last reset (computed on device, no host sync)."""

    w: FastWeights
    buf: MiniBatchBuffer
    pos: torch.Tensor  # [B] long, position in the current mini-batch
    nonfinite: torch.Tensor  # [B] bool, sticky until the row is reset
    w0: Callable[[], FastWeights]  # the learned W0 itself, unbatched ([H, ...]), read only
    # [B, 3] fp32, while the block's `telemetry` is on: per row, the sums since the last read of
    # the inner loss before and after each frame's update, and the frames (`stream_step`)
    telemetry: torch.Tensor

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        # In place, row by mask, without materialising W0 for the whole batch: at the 7B
        # config a batch of 32 rows holds 8 GB of fast weights.
        m4 = reset_mask.view(-1, 1, 1, 1)
        for cur, init in zip(self.w.as_tuple(), self.w0().as_tuple()):
            torch.where(m4, init[None], cur, out=cur)
        for t in (self.buf.xk, self.buf.x2, self.buf.gz1, self.buf.gz2):
            t.masked_fill_(m4, 0.0)
        self.buf.lr.masked_fill_(reset_mask.view(-1, 1, 1), 0.0)
        self.pos.masked_fill_(reset_mask, 0)
        self.nonfinite.masked_fill_(reset_mask, False)
        self.telemetry.masked_fill_(reset_mask.view(-1, 1), 0.0)

    def finite_rows(self) -> torch.Tensor:
        """[B] bool: rows whose fast weights are all finite (a diverged session shows False)."""
        ok = torch.ones(self.batch_size, dtype=torch.bool, device=self.pos.device)
        for t in self.w.as_tuple():
            ok &= torch.isfinite(t).flatten(1).all(dim=1)
        return ok

    def nbytes(self) -> int:
        tensors = (*self.w.as_tuple(), self.buf.xk, self.buf.x2, self.buf.gz1, self.buf.gz2,
                   self.buf.lr, self.pos, self.nonfinite, self.telemetry)
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class CarriedState:
    """Training over consecutive segments of one stream per row (truncated backpropagation
    through time): what a block's training forward starts from (`w`, `conv_tail`: the state the
    previous segment ended with) and what it ends with (`next_w`, `next_conv_tail`), which
    `advance` makes the start of the next segment. Detached, so gradients stay inside a
    segment; rows marked `fresh` start from the learned W0 instead (a new stream).

    Start and end are kept apart so that a forward run twice on one segment (activation
    checkpointing recomputes it in the backward pass) starts from the same state both times.

    Why: a model trained only on sequences that start at W0 never learns on fast weights that
    have absorbed earlier content, which is what a long session's hold.
    """

    fresh: torch.Tensor  # [B] bool: rows whose current segment starts a new stream
    w: FastWeights | None = None  # [B, H, ...] the fast weights the last segment committed
    conv_tail: tuple[torch.Tensor, torch.Tensor] | None = None  # q, k [B, D, kernel - 1]
    next_w: FastWeights | None = None
    next_conv_tail: tuple[torch.Tensor, torch.Tensor] | None = None

    def advance(self, fresh: torch.Tensor) -> None:
        """The next segment: it starts where the last forward ended (rows not `fresh`)."""
        if self.next_w is not None:
            self.w, self.next_w = self.next_w, None
        if self.next_conv_tail is not None:
            self.conv_tail, self.next_conv_tail = self.next_conv_tail, None
        self.fresh = fresh


def _init_conv(conv: StreamingConv1d, lag: int = 0) -> None:
    """A causal depthwise q/k conv starts as the identity (last tap 1, others and bias 0), so an
    untrained block is the block without convs, and training learns which earlier frames a key
    holds; `lag` > 0 puts the 1 that many frames back (`qk_conv_init: shift` for k: it recalls
    more with whitened projections, but on independent frames the inner learner stops depending
    on its input; README, "The TTT layer"). PyTorch's default init (uniform taps and a
    uniform bias per channel) adds a constant per channel to every q and k: after their L2
    normalisation all keys share that direction and the inner output loses input dependence
    within the first mini-batches (measured with `diagnose-ttt`: ratio 0.35 at 1000 frames at
    head dim 128, against 0.7 without convs)."""
    w = conv.conv.conv.weight  # [D, 1, k]; its last tap multiplies the current frame
    nn.init.zeros_(w)
    w[:, :, -1 - min(lag, w.shape[-1] - 1)] = 1.0
    nn.init.zeros_(conv.conv.conv.bias)


class TTTBlock(StreamingModule[TTTState]):
    """TTT-MLP with its projections, norms and gated residual, for a host of width `d_model`."""

    def __init__(self, d_model: int, num_heads: int, cfg: TTTConfig, norm: str = "rms_norm_f32",
                 layer_index: int = -1, device=None, dtype=None):
        super().__init__()
        if num_heads < 1 or d_model % num_heads:
            raise ValueError(f"TTT: d_model {d_model} is not divisible by num_heads {num_heads}")
        if cfg.rope and (d_model // num_heads) % 2:  # else a bare AssertionError in apply_rope
            raise ValueError(f"TTT: rope rotates pairs of dims and needs an even head dim, got "
                             f"d_model {d_model} / num_heads {num_heads} = {d_model // num_heads}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.hidden = cfg.mlp_expansion * self.head_dim
        self.mini_batch_size = cfg.mini_batch_size
        self.base_lr = cfg.base_lr
        self.ln_eps = cfg.ln_eps
        self.gate_init = cfg.gate_init
        self.checkpoint_group = cfg.checkpoint_group
        self.forget = cfg.forget
        self.rope = cfg.rope
        self.qk_conv_init = cfg.qk_conv_init
        self.qkv_init = cfg.qkv_init
        self.out_init = cfg.out_init
        self.qk_conv_lr_scale = cfg.qk_conv_lr_scale
        self.position_scale_kind = cfg.position_scale
        self.layer_index = layer_index
        # Streaming only: accumulate each row's inner losses (TTTState.telemetry). Off by
        # default: it costs one more inner forward per frame; the server turns it on.
        self.telemetry = False
        # Training only (train mode, not streaming): continue each row from the previous
        # segment's state (`CarriedState`, set by `moshi_ttt.model.carry_fast_weights`); None:
        # every sequence starts at W0.
        self.carry: CarriedState | None = None
        # Outside streaming, while on: the fast weights the last forward ended with (after its
        # last full mini-batch, detached, [B, H, ...]), which a stream of the same frames holds
        # at its end; evaluation scores in parallel and reads the sessions' drift from them.
        self.keep_end_state = False
        self.end_state: FastWeights | None = None
        kw = {"device": device, "dtype": dtype}
        self.pre_norm = create_norm_fn(norm, d_model, **kw)
        self.wq = nn.Linear(d_model, d_model, bias=True, **kw)
        self.wk = None if cfg.share_qk else nn.Linear(d_model, d_model, bias=True, **kw)
        self.wv = nn.Linear(d_model, d_model, bias=True, **kw)
        self.wo = nn.Linear(d_model, d_model, bias=True, **kw)
        self.post_norm = create_norm_fn(norm, d_model, **kw)
        # causal depthwise convs on the q and k projections (moshi's streaming conv: per-row
        # state of the last frames, reset and exec masks honoured like the KV cache)
        self.conv_q = self.conv_k = None
        if cfg.qk_conv > 0:
            self.conv_q, self.conv_k = (
                StreamingConv1d(d_model, d_model, cfg.qk_conv, groups=d_model, causal=True)
                .to(device=device, dtype=dtype) for _ in range(2))
        self.gate_alpha = nn.Parameter(torch.empty(d_model, **kw))
        self.inner = FastWeightInit(
            self.num_heads, self.head_dim, d_model, self.hidden, cfg.mini_batch_size,
            cfg.learn_token_offset, device=device, init=cfg.inner_init,
            decay_init=cfg.decay_init if cfg.forget == "decay" else None)
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fresh TTT: small gate, so the host layer computes almost exactly what it did before."""
        with torch.no_grad():
            std = 1.0 / math.sqrt(self.d_model)
            for lin in (self.wq, self.wk, self.wv, self.wo):
                if lin is None:
                    continue
                nn.init.trunc_normal_(lin.weight, std=std, a=-3 * std, b=3 * std)
                nn.init.zeros_(lin.bias)
            for norm in (self.pre_norm, self.post_norm):
                if isinstance(norm, RMSNorm):
                    nn.init.ones_(norm.alpha)
                elif isinstance(norm, nn.LayerNorm):
                    norm.reset_parameters()
            nn.init.constant_(self.gate_alpha, self.gate_init)
            k_lag = 1 if self.qk_conv_init == "shift" else 0  # TTTConfig.qk_conv_init
            for conv, lag in ((self.conv_q, 0), (self.conv_k, k_lag)):
                if conv is not None:  # see _init_conv
                    _init_conv(conv, lag)
            self.inner.reset_parameters()

    @torch.no_grad()
    def whiten_projections(self, xs: torch.Tensor | list[torch.Tensor]) -> None:
        """`qkv_init: whitened`: wq, wk and wv become the ZCA whitening of pre_norm(x) (xs: this
        block's input on calibration frames, [..., d_model], one tensor or several): centred,
        decorrelated, equal variance in every direction, so keys of different frames are as
        unlike as the frames themselves allow. A ridge of WHITEN_RIDGE x the largest eigenvalue
        keeps directions the frames barely span from being blown up. The matrix is rescaled to
        the random init's Frobenius norm (sqrt(d_model)): the L2 norm of q and k makes their
        scale irrelevant, and AdamW's steps stay as large relative to it as from the random init
        (measured on the text recall task at 400 steps: recall 0.141 at this scale, 0.126 at
        norm 1)."""
        n, total, outer = 0, None, None
        for x in [xs] if isinstance(xs, torch.Tensor) else xs:
            x = x.reshape(1, -1, x.shape[-1]).to(self.wq.weight.dtype)  # moshi's norms: [B,T,D]
            h = self.pre_norm(x).reshape(-1, self.d_model).double()
            if not torch.isfinite(h).all():
                raise ValueError(f"TTT layer {self.layer_index}: the calibration frames for "
                                 f"whitening hold NaN or inf")
            n += h.shape[0]
            total = h.sum(0) if total is None else total + h.sum(0)
            outer = h.T @ h if outer is None else outer + h.T @ h
        if n < 2:
            raise ValueError(f"TTT layer {self.layer_index}: whitening needs at least 2 frames "
                             f"of the block's input, got {n}")
        mu = total / n
        cov = (outer - n * torch.outer(mu, mu)) / (n - 1)
        lam, U = torch.linalg.eigh(cov)
        lam = lam.clamp_min(0)
        if float(lam.max()) <= 1e-12 * float(mu.abs().max().clamp_min(1.0)) ** 2:
            raise ValueError(f"TTT layer {self.layer_index}: the calibration frames are all "
                             f"the same; whitening needs frames that differ")
        W = U @ torch.diag((lam + WHITEN_RIDGE * lam.max()).rsqrt()) @ U.T
        W = W * (math.sqrt(self.d_model) / W.norm())
        for lin in (self.wq, self.wk, self.wv):
            if lin is not None:
                lin.weight.copy_(W.to(lin.weight.dtype))
                lin.bias.copy_((-W @ mu).to(lin.bias.dtype))

    @torch.no_grad()
    def match_output_scale(self, xs: torch.Tensor | list[torch.Tensor]) -> float:
        """`out_init: matched`: rescale wo so that what this block adds to the residual stream
        (gate included) has the RMS of the stream itself on the calibration frames xs (this
        block's input, [..., d_model], one tensor or several). Why: the frozen layers above read
        a recalled item through wo, which starts random; at the random init's scale the block
        adds 0.44x the stream's RMS at layer 0 of the tiny model and 0.17x at layer 1, and with
        that small a read-out some seeds never leave chance in the eval-memory budget (README,
        "The TTT layer"). Returns the factor applied."""
        x_sq = y_sq = 0.0
        for x in [xs] if isinstance(xs, torch.Tensor) else xs:
            x = x.to(self.wq.weight.dtype)
            y = self.forward(x) - x
            x_sq += float(x.float().pow(2).sum())
            y_sq += float(y.float().pow(2).sum())
        if not (math.isfinite(x_sq) and math.isfinite(y_sq)) or y_sq <= 0 or x_sq <= 0:
            raise ValueError(f"TTT layer {self.layer_index}: cannot match the output scale on "
                             f"these calibration frames (sum of squares: input {x_sq}, block "
                             f"output {y_sq}; expected finite and positive)")
        factor = math.sqrt(x_sq / y_sq)
        self.wo.weight.mul_(factor)
        self.wo.bias.mul_(factor)
        return factor

    @torch.no_grad()
    def fit_readout(self, xs: torch.Tensor | list[torch.Tensor],
                    targets: torch.Tensor | list[torch.Tensor],
                    keep: torch.Tensor | list[torch.Tensor]) -> float:
        """`out_init: unembedding`: wo and its bias become the ridge least-squares map from what
        this block returns when it recalls a frame to `targets`, the text head's unit row for
        the text token that frame reads ([B, T, D] each, beside the block's inputs xs [B, T, D];
        only frames where the bool `keep` [B, T] is true count; one tensor each or lists). A
        recall returns xq + LN(f(xq)); when the query meets frame t's key and the inner model
        has stored that frame's target xv - xk as far as its LayerNorm allows, that is
        xk + LN(xv - xk). Why: with a random wo the outer loop must first learn how the frozen
        layers above read a recalled item, and on the eval-memory text task that wait decided
        which seeds learned the order at all; fitted, a recall votes for the token it holds from
        the first step (README, "The TTT layer"). Call `match_output_scale` after it: only the
        direction is fitted here. Returns the fit's relative residual (0: every kept frame's row
        reproduced)."""
        if self._streaming_state is not None or self._active_carry() is not None:
            raise RuntimeError(f"TTT layer {self.layer_index}: fit the read-out outside "
                               f"streaming and without a carried state (a fresh model)")
        one = isinstance(xs, torch.Tensor)
        xs, targets, keep = ([t] if one else list(t) for t in (xs, targets, keep))
        G = R = None
        u_sq, n = 0.0, 0
        for x, u, m in zip(xs, targets, keep, strict=True):
            x = x.to(self.wq.weight.dtype)
            if u.shape != x.shape or m.shape != x.shape[:-1] or m.dtype != torch.bool:
                raise ValueError(f"TTT layer {self.layer_index}: read-out targets {tuple(u.shape)} "
                                 f"and mask {tuple(m.shape)} ({m.dtype}) do not match the "
                                 f"block's input {tuple(x.shape)} (expected [B, T, D] and a bool "
                                 f"[B, T])")
            B, T, _ = x.shape
            xq, xk, xv, _ = self._qkv_lr(x)
            _, xk = self._rope(xq, xk)  # the keys as the scan stores them
            z = xk + head_layer_norm(xv - xk, self.inner.ttt_norm_weight,
                                     self.inner.ttt_norm_bias, self.ln_eps)
            z = z.transpose(1, 2).reshape(B, T, self.d_model).to(self.wo.weight.dtype)
            p = self.post_norm(z)[m].double()
            p = torch.cat([p, p.new_ones(p.shape[0], 1)], dim=1)  # the bias as a column
            t = u[m].double()
            if not (torch.isfinite(p).all() and torch.isfinite(t).all()):
                raise ValueError(f"TTT layer {self.layer_index}: the calibration frames for the "
                                 f"read-out fit hold NaN or inf")
            G = p.T @ p if G is None else G + p.T @ p
            R = p.T @ t if R is None else R + p.T @ t
            u_sq += float(t.pow(2).sum())
            n += p.shape[0]
        if n < 2 or G is None or R is None:
            raise ValueError(f"TTT layer {self.layer_index}: the read-out fit needs at least 2 "
                             f"calibration frames that read a text token (not padding), got {n} "
                             f"(for speech without text, use ttt.out_init 'matched')")
        if n <= self.d_model:
            logger.warning("TTT layer %d: the read-out is fitted on %d frames that read a text "
                           "token, fewer than its %d inputs: the ridge keeps it defined, but "
                           "calibrate on more text", self.layer_index, n, self.d_model + 1)
        eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        W = torch.linalg.solve(G + READOUT_RIDGE * G.diagonal().mean() * eye, R)  # [D + 1, D]
        self.wo.weight.copy_(W[:-1].T.to(self.wo.weight.dtype))
        self.wo.bias.copy_(W[-1].to(self.wo.bias.dtype))
        # ||U - P W||^2 from the normal equations, without a second pass over the frames
        resid = max(u_sq - 2 * float((W * R).sum()) + float((W * (G @ W)).sum()), 0.0)
        resid /= max(u_sq, 1e-30)
        logger.info("TTT layer %d: read-out fitted to the text head on %d frames (residual "
                    "%.3f)", self.layer_index, n, resid)
        return resid

    # -- shared projections ------------------------------------------------------------------
    def _qkv_lr(self, x: torch.Tensor):
        B, T, _ = x.shape
        xn = self.pre_norm(x)
        h = xn.to(self.wq.weight.dtype)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2).float()

        q = self.wq(h)
        k = q if self.wk is None else self.wk(h)
        if self.conv_q is not None:
            q, k = self._convs(q.transpose(1, 2), k.transpose(1, 2))
        xq = F.normalize(heads(q), dim=-1)
        xk = F.normalize(heads(k), dim=-1)
        xv = heads(self.wv(h))
        with _fp32_region(x):
            gate = torch.einsum("btd,hd->bht", xn.float(), self.inner.lr_weight)
            lr = self.base_lr * torch.sigmoid(gate + self.inner.lr_bias[None, :, None])
        return xq, xk, xv, lr / self.head_dim

    def _convs(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal q/k convs over [B, D, T]; returned as [B, T, D]. With a carried state
        (training, not streaming) each row's conv first reads the previous segment's last
        frames, as moshi's streaming conv would (zeros for a fresh row)."""
        assert self.conv_q is not None and self.conv_k is not None
        carry = self._active_carry()
        if carry is None:
            return self.conv_q(q).transpose(1, 2), self.conv_k(k).transpose(1, 2)
        n = self.conv_q.conv.conv.kernel_size[0] - 1
        if carry.conv_tail is None:
            tails = (q.new_zeros(*q.shape[:2], n), k.new_zeros(*k.shape[:2], n))
        else:
            keep = (~carry.fresh).view(-1, 1, 1).to(q.device)
            tails = tuple(torch.where(keep, t, 0.0).to(q.dtype) for t in carry.conv_tail)
        qq, kk = torch.cat([tails[0], q], dim=-1), torch.cat([tails[1], k], dim=-1)
        carry.next_conv_tail = (qq[..., -n:].detach(), kk[..., -n:].detach()) if n else None
        return (self.conv_q(qq)[..., n:].transpose(1, 2),
                self.conv_k(kk)[..., n:].transpose(1, 2))

    def _out(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        B, H, T, HD = z.shape
        z = z.transpose(1, 2).reshape(B, T, H * HD).to(self.wo.weight.dtype)
        y = self.wo(self.post_norm(z))
        return x + (torch.tanh(self.gate_alpha) * y).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"TTT block of layer {self.layer_index} expects width {self.d_model}, got input "
                f"of shape {tuple(x.shape)}"
            )
        if self._active_carry() is not None:
            self._check_carry(x.shape[0], x.shape[1])
        xq, xk, xv, lr = self._qkv_lr(x)
        inner = self.inner
        with _fp32_region(x):
            if self._streaming_state is None:
                xq, xk = self._rope(xq, xk)
                z, w_end = ttt_scan(
                    self._start_weights(x.shape[0]),
                    xq, xk, xv, lr, self.mini_batch_size,
                    inner.ttt_norm_weight, inner.ttt_norm_bias, self.ln_eps,
                    checkpoint_group=self.checkpoint_group if self.training else 0,
                    rule=inner.settle_rule(self.forget, detach=False),
                    scale=self._scale(xq.device),
                )
                carry = self._active_carry()
                if carry is not None or self.keep_end_state:
                    ended = FastWeights(*(t.detach() for t in w_end.as_tuple()))
                    if carry is not None:
                        carry.next_w = ended
                    if self.keep_end_state:
                        self.end_state = ended
            else:
                z = self._stream(xq, xk, xv, lr)
        return self._out(x, z)

    def _scale(self, device) -> torch.Tensor:
        return position_scale(self.mini_batch_size, self.inner.token_offset, device=device,
                              kind=self.position_scale_kind)

    def _rope(self, xq: torch.Tensor, xk: torch.Tensor, pos: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding of q and k by each frame's position in its mini-batch (t mod K): the
        whole sequence [B,H,T,HD] from position 0, or one frame [B,H,1,HD] at positions pos [B]."""
        if not self.rope:
            return xq, xk
        if pos is not None:
            return apply_rope(xq.contiguous(), xk.contiguous(), pos)
        B, H, T, HD = xq.shape
        K = self.mini_batch_size
        n = -(-T // K)

        def blocks(t: torch.Tensor) -> torch.Tensor:
            t = F.pad(t, (0, 0, 0, n * K - T))
            return t.view(B, H, n, K, HD).transpose(1, 2).reshape(B * n, H, K, HD)

        def unblock(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, n, H, K, HD).transpose(1, 2).reshape(B, H, n * K, HD)[:, :, :T]

        q, k = apply_rope(blocks(xq), blocks(xk), torch.zeros(B * n, device=xq.device))
        return unblock(q), unblock(k)

    def _w0(self, batch_size: int) -> FastWeights:
        """W0 tiled per row as views (no copy): the scan never writes into its input state, and
        in training the gradients of every row flow back into the learned W0."""
        return FastWeights(*(p[None].expand(batch_size, *p.shape) for p in
                             (self.inner.w1, self.inner.b1, self.inner.w2, self.inner.b2)))

    def _active_carry(self) -> CarriedState | None:
        """The carried state, in a training forward outside streaming (else None)."""
        if self.carry is None or not self.training or self._streaming_state is not None:
            return None
        return self.carry

    def _check_carry(self, batch_size: int, frames: int) -> None:
        carry = self.carry
        assert carry is not None
        if frames % self.mini_batch_size:
            raise ValueError(
                f"TTT layer {self.layer_index}: carrying fast weights across segments needs "
                f"segments of whole mini-batches, got {frames} frames (K = "
                f"{self.mini_batch_size}): a partial last mini-batch is never committed")
        if carry.fresh.shape != (batch_size,) or carry.fresh.dtype != torch.bool:
            raise ValueError(f"TTT layer {self.layer_index}: carried state's fresh mask has "
                             f"shape {tuple(carry.fresh.shape)} and dtype {carry.fresh.dtype}, "
                             f"expected ({batch_size},) bool")
        held = carry.w.w1.shape[0] if carry.w is not None else batch_size
        if held != batch_size:
            raise ValueError(f"TTT layer {self.layer_index}: the carried state holds {held} "
                             f"rows, this segment has {batch_size}: a stream's rows cannot "
                             f"change (drop the state with carry_fast_weights(lm, None))")

    def _start_weights(self, batch_size: int) -> FastWeights:
        """What a training sequence starts from: W0 (`_w0`), or per row the carried state."""
        w0 = self._w0(batch_size)
        carry = self._active_carry()
        if carry is None or carry.w is None:
            return w0
        keep = (~carry.fresh).view(-1, 1, 1, 1).to(w0.w1.device)
        return FastWeights(*(torch.where(keep, c, init)
                             for c, init in zip(carry.w.as_tuple(), w0.as_tuple())))

    # -- streaming -----------------------------------------------------------------------------
    def _init_streaming_state(self, batch_size: int) -> TTTState:
        device = self.inner.w1.device
        K, H, HD, Fh = self.mini_batch_size, self.num_heads, self.head_dim, self.hidden
        z = lambda *shape: torch.zeros(batch_size, H, *shape, device=device)  # noqa: E731
        return TTTState(
            batch_size, device,
            w=self.inner.tiled(batch_size),
            buf=MiniBatchBuffer(xk=z(K, HD), x2=z(K, Fh), gz1=z(K, Fh), gz2=z(K, HD), lr=z(K)),
            pos=torch.zeros(batch_size, dtype=torch.long, device=device),
            nonfinite=torch.zeros(batch_size, dtype=torch.bool, device=device),
            w0=self.inner.fast_weights,
            telemetry=torch.zeros(batch_size, 3, device=device),
        )

    def _stream(self, xq, xk, xv, lr) -> torch.Tensor:
        state = self._streaming_state
        assert state is not None
        inner = self.inner
        scale = self._scale(xq.device)
        rule = inner.settle_rule(self.forget, detach=True)
        outs = []
        for t in range(xq.shape[2]):
            q, k = self._rope(xq[:, :, t:t + 1], xk[:, :, t:t + 1], state.pos)
            outs.append(stream_step(
                state.w, state.buf, state.pos, state.exec_mask,
                q[:, :, 0], k[:, :, 0], xv[:, :, t], lr[:, :, t], scale,
                inner.ttt_norm_weight, inner.ttt_norm_bias, self.ln_eps, rule,
                state.telemetry if self.telemetry else None,
            ))
        z = torch.stack(outs, dim=2)
        state.nonfinite |= ~torch.isfinite(z).flatten(1).all(dim=1) & state.exec_mask
        return z

    def extra_repr(self) -> str:
        return (f"layer={self.layer_index}, d_model={self.d_model}, heads={self.num_heads}, "
                f"head_dim={self.head_dim}, hidden={self.hidden}, K={self.mini_batch_size}, "
                f"base_lr={self.base_lr}, init={self.inner.init}, forget={self.forget}, "
                f"rope={self.rope}, position_scale={self.position_scale_kind}")


def _fp32_region(x: torch.Tensor):
    """Inner arithmetic stays fp32 even under an outer bf16 autocast (GPU training)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return nullcontext()

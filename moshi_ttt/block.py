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

from .config import TTTConfig
from .ttt_mlp import FastWeights, MiniBatchBuffer, position_scale, stream_step, ttt_scan

logger = logging.getLogger(__name__)

#: Parameter names (relative to the block) of the inner set counted as `ttt_inner`.
INNER_PARAM_NAMES = (
    "inner.w1", "inner.b1", "inner.w2", "inner.b2",
    "inner.ttt_norm_weight", "inner.ttt_norm_bias",
    "inner.lr_weight", "inner.lr_bias",
)


class FastWeightInit(nn.Module):
    """The learned initial fast weights W0 and the inner learner's own parameters.

    Always fp32, whatever `.to(dtype)` the model gets: these feed fp32 inner arithmetic, and
    rounding W0 to bf16 would change what every session starts from. W0 is only ever *read* by
    forward passes; sessions learn in their own `TTTState` copies.
    """

    def __init__(self, num_heads: int, head_dim: int, d_model: int, hidden: int,
                 mini_batch_size: int, learn_token_offset: bool, device=None):
        super().__init__()
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

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.w1, std=0.02)
            nn.init.zeros_(self.b1)
            nn.init.normal_(self.w2, std=0.02)
            nn.init.zeros_(self.b2)
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

    def finite_rows(self) -> torch.Tensor:
        """[B] bool: rows whose fast weights are all finite (a diverged session shows False)."""
        ok = torch.ones(self.batch_size, dtype=torch.bool, device=self.pos.device)
        for t in self.w.as_tuple():
            ok &= torch.isfinite(t).flatten(1).all(dim=1)
        return ok

    def nbytes(self) -> int:
        tensors = (*self.w.as_tuple(), self.buf.xk, self.buf.x2, self.buf.gz1, self.buf.gz2,
                   self.buf.lr, self.pos, self.nonfinite)
        return sum(t.numel() * t.element_size() for t in tensors)


class TTTBlock(StreamingModule[TTTState]):
    """TTT-MLP with its projections, norms and gated residual, for a host of width `d_model`."""

    def __init__(self, d_model: int, num_heads: int, cfg: TTTConfig, norm: str = "rms_norm_f32",
                 layer_index: int = -1, device=None, dtype=None):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"TTT: d_model {d_model} is not divisible by num_heads {num_heads}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.hidden = cfg.mlp_expansion * self.head_dim
        self.mini_batch_size = cfg.mini_batch_size
        self.base_lr = cfg.base_lr
        self.ln_eps = cfg.ln_eps
        self.gate_init = cfg.gate_init
        self.checkpoint_group = cfg.checkpoint_group
        self.layer_index = layer_index
        kw = {"device": device, "dtype": dtype}
        self.pre_norm = create_norm_fn(norm, d_model, **kw)
        self.wq = nn.Linear(d_model, d_model, bias=True, **kw)
        self.wk = nn.Linear(d_model, d_model, bias=True, **kw)
        self.wv = nn.Linear(d_model, d_model, bias=True, **kw)
        self.wo = nn.Linear(d_model, d_model, bias=True, **kw)
        self.post_norm = create_norm_fn(norm, d_model, **kw)
        self.gate_alpha = nn.Parameter(torch.empty(d_model, **kw))
        self.inner = FastWeightInit(self.num_heads, self.head_dim, d_model, self.hidden,
                                    cfg.mini_batch_size, cfg.learn_token_offset, device=device)
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fresh TTT: small gate, so the host layer computes almost exactly what it did before."""
        with torch.no_grad():
            std = 1.0 / math.sqrt(self.d_model)
            for lin in (self.wq, self.wk, self.wv, self.wo):
                nn.init.trunc_normal_(lin.weight, std=std, a=-3 * std, b=3 * std)
                nn.init.zeros_(lin.bias)
            for norm in (self.pre_norm, self.post_norm):
                if isinstance(norm, RMSNorm):
                    nn.init.ones_(norm.alpha)
                elif isinstance(norm, nn.LayerNorm):
                    norm.reset_parameters()
            nn.init.constant_(self.gate_alpha, self.gate_init)
            self.inner.reset_parameters()

    # -- shared projections ------------------------------------------------------------------
    def _qkv_lr(self, x: torch.Tensor):
        B, T, _ = x.shape
        xn = self.pre_norm(x)
        h = xn.to(self.wq.weight.dtype)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2).float()

        xq = F.normalize(heads(self.wq(h)), dim=-1)
        xk = F.normalize(heads(self.wk(h)), dim=-1)
        xv = heads(self.wv(h))
        with _fp32_region(x):
            gate = torch.einsum("btd,hd->bht", xn.float(), self.inner.lr_weight)
            lr = self.base_lr * torch.sigmoid(gate + self.inner.lr_bias[None, :, None])
        return xq, xk, xv, lr / self.head_dim

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
        xq, xk, xv, lr = self._qkv_lr(x)
        inner = self.inner
        with _fp32_region(x):
            if self._streaming_state is None:
                z, _ = ttt_scan(
                    self._w0(x.shape[0]),
                    xq, xk, xv, lr, self.mini_batch_size,
                    inner.ttt_norm_weight, inner.ttt_norm_bias, self.ln_eps,
                    token_offset=inner.token_offset,
                    checkpoint_group=self.checkpoint_group if self.training else 0,
                )
            else:
                z = self._stream(xq, xk, xv, lr)
        return self._out(x, z)

    def _w0(self, batch_size: int) -> FastWeights:
        """W0 tiled per row as views (no copy): the scan never writes into its input state, and
        in training the gradients of every row flow back into the learned W0."""
        return FastWeights(*(p[None].expand(batch_size, *p.shape) for p in
                             (self.inner.w1, self.inner.b1, self.inner.w2, self.inner.b2)))

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
        )

    def _stream(self, xq, xk, xv, lr) -> torch.Tensor:
        state = self._streaming_state
        assert state is not None
        inner = self.inner
        scale = position_scale(self.mini_batch_size, inner.token_offset, device=xq.device)
        outs = []
        for t in range(xq.shape[2]):
            outs.append(stream_step(
                state.w, state.buf, state.pos, state.exec_mask,
                xq[:, :, t], xk[:, :, t], xv[:, :, t], lr[:, :, t], scale,
                inner.ttt_norm_weight, inner.ttt_norm_bias, self.ln_eps,
            ))
        z = torch.stack(outs, dim=2)
        state.nonfinite |= ~torch.isfinite(z).flatten(1).all(dim=1) & state.exec_mask
        return z

    def extra_repr(self) -> str:
        return (f"layer={self.layer_index}, d_model={self.d_model}, heads={self.num_heads}, "
                f"head_dim={self.head_dim}, hidden={self.hidden}, K={self.mini_batch_size}, "
                f"base_lr={self.base_lr}")


def _fp32_region(x: torch.Tensor):
    """Inner arithmetic stays fp32 even under an outer bf16 autocast (GPU training)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return nullcontext()

"""Per-frame text cross-entropy for training against a frozen text head.

eval-memory trains only TTT layers or LoRA adapters: moshi's `text_linear` stays frozen, so the
loss needs no gradient for its weight, only for the hidden states. The plain path (`forward_text`
makes [B*T, text_card] logits, then `F.cross_entropy`) writes those logits, their log-softmax, a
zero-filled gradient and the log-softmax gradient, four passes over a tensor of several MB, and
spent ~26 ms of a ~420 ms TTT training step (tiny config, 16 x 208 frames, one CPU thread).
`frozen_head_cross_entropy` works through the rows in chunks whose logits stay in cache, and
makes the hidden states' gradient, (softmax - onehot) W per row, in the same pass: ~10 ms.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel

#: Rows per chunk: 256 x 1000 logits (1 MB) stay in a core's L2 cache; 128 to 512 measured alike.
CHUNK_ROWS = 256


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """ce_n = logsumexp(h_n W^T) - (h_n W^T)[y_n], with d ce_n / d h_n = (softmax - onehot) W
    made in the forward pass and scaled by the incoming per-frame gradient in the backward.
    First order only; W gets no gradient (the caller checks it is frozen)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                with_grad: bool) -> torch.Tensor:
        n = h.shape[0]
        ce = h.new_empty(n)
        # `with_grad`, not ctx.needs_input_grad: that is also true under no_grad
        dh = torch.empty_like(h) if with_grad else None
        for lo in range(0, n, CHUNK_ROWS):
            hi = min(lo + CHUNK_ROWS, n)
            z = h[lo:hi] @ weight.t()
            y = target[lo:hi, None]
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            ce[lo:hi] = (lse - z.gather(1, y))[:, 0]
            if dh is not None:
                p = z.sub_(lse).exp_()  # softmax, in place of the logits
                p.scatter_add_(1, y, p.new_full(y.shape, -1.0))
                torch.mm(p, weight, out=dh[lo:hi])
        ctx.save_for_backward(dh)
        return ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_ce: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (dh,) = ctx.saved_tensors
        return (None if dh is None else dh * d_ce[:, None]), None, None, None


def frozen_head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor
                              ) -> torch.Tensor:
    """Cross-entropy per row of `h` [N, D] (float32 or float64) against `target` [N] (class
    indices in [0, V)) through the frozen linear head `weight` [V, D]: `F.cross_entropy(h @
    weight.T, target, reduction="none")` to rounding, and its first-order gradient wrt `h`
    (made only when autograd will want it). No `ignore_index`: every row is a frame to score."""
    if weight.requires_grad:
        raise ValueError("frozen_head_cross_entropy: the head's weight requires grad (it would "
                         "get none): use F.cross_entropy on the logits")
    if h.dim() != 2 or target.shape != h.shape[:1] or weight.shape[1] != h.shape[1]:
        raise ValueError(f"frozen_head_cross_entropy: expected h [N, D], target [N] and weight "
                         f"[V, D]; got {tuple(h.shape)}, {tuple(target.shape)} and "
                         f"{tuple(weight.shape)}")
    if h.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"frozen_head_cross_entropy: expected h in float32 or float64 (its "
                         f"softmax is summed in h's dtype), got {h.dtype}")
    if target.numel() and not (0 <= int(target.min()) and int(target.max()) < weight.shape[0]):
        raise ValueError(f"frozen_head_cross_entropy: target ids must lie in [0, "
                         f"{weight.shape[0]}) (no ignore_index), got {int(target.min())}.."
                         f"{int(target.max())}")
    with_grad = torch.is_grad_enabled() and h.requires_grad
    return _FrozenHeadCrossEntropy.apply(h, weight.to(h.dtype), target, with_grad)


def head_is_frozen(lm: LMModel) -> bool:
    """Whether `lm.text_linear` is a frozen, bias-free `nn.Linear`, the head
    `frozen_head_cross_entropy` stands in for."""
    head = lm.text_linear
    return (type(head) is torch.nn.Linear and head.bias is None
            and not head.weight.requires_grad)


@contextmanager
def text_head_skipped(lm: LMModel) -> Iterator[None]:
    """Inside, `lm.text_linear` is an identity: `forward_text` returns the normed hidden states
    twice and computes no logits (the loss makes them chunk by chunk). Restored on exit, error
    or not."""
    head = lm.text_linear
    lm.text_linear = torch.nn.Identity()
    try:
        yield
    finally:
        lm.text_linear = head


def text_frame_losses(lm: LMModel, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Text cross-entropy per frame [B, T] of `forward_text(inputs)` against `target` [B, T]:
    through `frozen_head_cross_entropy` when the head is frozen and gradients are on, else
    through the logits and `F.cross_entropy` (the base's own training, which trains the head)."""
    B, T = target.shape
    if torch.is_grad_enabled() and head_is_frozen(lm):
        weight = lm.text_linear.weight
        with text_head_skipped(lm):
            h, _ = lm.forward_text(inputs)  # [B, T, D]
        return frozen_head_cross_entropy(h.flatten(0, 1).float(), weight,
                                         target.flatten()).view(B, T)
    _, logits = lm.forward_text(inputs)  # [B, 1, T, V]
    # squeeze, not [:, 0]: a view both ways (the select's backward zero-fills [B, 1, T, V])
    return F.cross_entropy(logits.squeeze(1).flatten(0, 1).float(), target.flatten(),
                           reduction="none").view(B, T)

"""The frozen-head text loss eval-memory trains with (moshi_ttt/eval/text_loss.py): the same
per-frame cross-entropy and gradients as moshi's logits + `F.cross_entropy`, computed without
materialising the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moshi_ttt.eval import memory as mem
from moshi_ttt.eval.recall import text_batch
from moshi_ttt.eval.text_loss import (
    CHUNK_ROWS, frozen_head_cross_entropy, head_is_frozen, text_frame_losses, text_head_skipped,
)
from moshi_ttt.model import delayed_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_frozen_head_cross_entropy_is_cross_entropy_and_its_gradient(dtype, tol):
    g = torch.Generator().manual_seed(0)
    n, d, v = 2 * CHUNK_ROWS + 37, 16, 300  # a partial last chunk
    h = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=dtype) * 2  # peaked softmaxes too
    y = torch.randint(0, v, (n,), generator=g)
    up = torch.rand(n, generator=g, dtype=dtype)  # a weighted sum of the frames' losses
    ce = frozen_head_cross_entropy(h, w, y)
    (gh,) = torch.autograd.grad((ce * up).sum(), h)
    ref = F.cross_entropy(h @ w.t(), y, reduction="none")
    (gref,) = torch.autograd.grad((ref * up).sum(), h)
    assert ce.dtype == dtype and ce.shape == (n,)
    assert (ce - ref).abs().max() <= tol * ref.abs().max()
    assert (gh - gref).abs().max() <= tol * gref.abs().max()
    with torch.no_grad():  # scoring only
        assert torch.allclose(frozen_head_cross_entropy(h, w, y), ref, atol=tol * 10)


def test_frozen_head_cross_entropy_makes_no_gradient_when_none_is_wanted(monkeypatch):
    """The gradient (softmax - onehot) W costs a product per chunk: made only when autograd
    will ask for it (grad on and h requiring it), not under no_grad, where autograd.Function's
    `needs_input_grad` still says True."""
    products = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: products.append(1) or mm(*a, **k))
    h = torch.randn(3 * CHUNK_ROWS, 8, requires_grad=True)
    w, y = torch.randn(50, 8), torch.randint(0, 50, (3 * CHUNK_ROWS,))
    with torch.no_grad():
        frozen_head_cross_entropy(h, w, y)
    frozen_head_cross_entropy(h.detach(), w, y)
    assert products == []
    frozen_head_cross_entropy(h, w, y).sum().backward()
    assert len(products) == 3 and h.grad is not None


def test_frozen_head_cross_entropy_refuses_a_trained_head_and_wrong_shapes():
    h, y = torch.randn(5, 4), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="requires grad"):
        frozen_head_cross_entropy(h, torch.randn(7, 4, requires_grad=True), y)
    with pytest.raises(ValueError, match=r"expected h \[N, D\], target \[N\] and weight \[V, D\]; "
                                         r"got \(5, 4\), \(5,\) and \(7, 3\)"):
        frozen_head_cross_entropy(h, torch.randn(7, 3), y)
    with pytest.raises(ValueError, match="got"):
        frozen_head_cross_entropy(h, torch.randn(7, 4), y[:4])
    with pytest.raises(ValueError, match=r"float32 or float64 .* got torch.bfloat16"):
        frozen_head_cross_entropy(h.bfloat16(), torch.randn(7, 4), y)
    for bad in (-100, 7):  # F.cross_entropy's ignore_index is not supported; past the head
        with pytest.raises(ValueError, match=rf"target ids must lie in \[0, 7\).*got {bad}"):
            frozen_head_cross_entropy(h, torch.randn(7, 4), torch.full((5,), bad))


@pytest.mark.parametrize("method", ["ttt", "lora"])
def test_a_method_trains_on_the_same_loss_and_gradients_as_through_the_logits(tiny_cfg,
                                                                               method):
    """What eval-memory's methods train with (TTT or LoRA on a frozen base): the fused loss
    gives the per-frame losses and every trainable parameter's gradient of moshi's text logits
    and `F.cross_entropy`, and leaves the model's head in place."""
    s = mem.MemoryEvalSettings.from_config(tiny_cfg, quick=True)
    lm = mem.build_method(method, tiny_cfg, s.task.context, 0, 2)
    task = mem.task_at(s.task, s.gaps[0], int(tiny_cfg.lm["num_layers"]))
    codes, dependent = text_batch(task, 3, torch.Generator().manual_seed(1),
                                  int(tiny_cfg.lm["n_q"]))
    head = lm.text_linear
    assert head_is_frozen(lm)
    params = [p for p in lm.parameters() if p.requires_grad]
    inputs = delayed_inputs(lm, codes)[:, :, :-1]

    def loss_and_grads(fused: bool):
        if fused:
            ce = text_frame_losses(lm, inputs, codes[:, 0])
        else:
            _, logits = lm.forward_text(inputs)
            ce = F.cross_entropy(logits.squeeze(1).flatten(0, 1), codes[:, 0].flatten(),
                                 reduction="none").view(codes.shape[0], -1)
        loss = 0.8 * ce[dependent].mean() + 0.2 * ce[~dependent].mean()
        return ce.detach(), torch.autograd.grad(loss, params)

    calls: list[int] = []
    hook = head.register_forward_hook(lambda *a: calls.append(1))
    ce, grads = loss_and_grads(True)
    assert calls == []  # no [B*T, text_card] logits were made
    ref, ref_grads = loss_and_grads(False)
    hook.remove()
    assert calls == [1] and lm.text_linear is head
    assert ce.shape == codes[:, 0].shape
    assert (ce - ref).abs().max() <= 1e-5
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= 1e-5 * max(1.0, float(r.abs().max()))
    assert any(float(r.abs().max()) > 0 for r in ref_grads)


def test_a_trained_head_takes_the_logits_path_and_gets_its_gradient(tiny_cfg):
    """The base's own training (head included) goes through the logits: the head is trained."""
    s = mem.MemoryEvalSettings.from_config(tiny_cfg, quick=True)
    lm = mem._random_base(tiny_cfg, s.task.context, 0)
    assert not head_is_frozen(lm)
    task = mem.task_at(s.task, s.gaps[0], int(tiny_cfg.lm["num_layers"]))
    codes, _ = text_batch(task, 2, torch.Generator().manual_seed(1), int(tiny_cfg.lm["n_q"]))
    text_frame_losses(lm, delayed_inputs(lm, codes)[:, :, :-1], codes[:, 0]).mean().backward()
    assert lm.text_linear.weight.grad is not None
    assert float(lm.text_linear.weight.grad.abs().max()) > 0


def test_the_head_comes_back_after_an_error(tiny_cfg):
    s = mem.MemoryEvalSettings.from_config(tiny_cfg, quick=True)
    lm = mem.build_method("frozen", tiny_cfg, s.task.context, 0, 2)
    head = lm.text_linear
    with pytest.raises(RuntimeError, match="boom"):
        with text_head_skipped(lm):
            assert isinstance(lm.text_linear, torch.nn.Identity)
            raise RuntimeError("boom")
    assert lm.text_linear is head

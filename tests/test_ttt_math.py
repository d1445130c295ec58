"""The inner learner's arithmetic against a literal, autograd-based frame-by-frame oracle."""

import pytest
import torch

from moshi_ttt.ttt_mlp import (
    FastWeights, MiniBatchBuffer, Settle, augmented_column_norms, gelu_tanh, gelu_tanh_grad,
    gelu_tanh_and_grad, gelu_tanh_grad2, gelu_tanh_value, head_layer_norm, head_layer_norm_l2_grad,
    inner_grads, minibatch_forward, position_scale, stream_step, ttt_scan,
)
from moshi_ttt.ttt_reference import naive_ttt

B, H, HD, FH, K = 2, 3, 8, 32, 4
EPS = 1e-6


def _inputs(T: int, seed: int = 0, scale: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: torch.randn(*s, generator=g) * std  # noqa: E731
    w = FastWeights(r(B, H, HD, FH, std=scale), r(B, H, 1, FH, std=0.1),
                    r(B, H, FH, HD, std=scale), r(B, H, 1, HD, std=0.1))
    xq = torch.nn.functional.normalize(r(B, H, T, HD), dim=-1)
    xk = torch.nn.functional.normalize(r(B, H, T, HD), dim=-1)
    xv = r(B, H, T, HD)
    lr = torch.rand(B, H, T, generator=g) * 0.5 + 0.5  # large inner lr: updates matter
    ln_w = 1.0 + r(H, HD, std=0.1)
    ln_b = r(H, HD, std=0.1)
    return w, xq, xk, xv, lr, ln_w, ln_b


FORGET = ("none", "decay", "weight_norm")


def _w0_keep(seed: int = 7):
    """A learned W0 ([H, ...], not the rows' start state) and per-head keep factors."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=1.0: torch.randn(*s, generator=g) * std  # noqa: E731
    w0 = FastWeights(r(H, HD, FH, std=0.5), r(H, 1, FH, std=0.1), r(H, FH, HD, std=0.5),
                     r(H, 1, HD, std=0.1))
    keep = 0.5 + 0.4 * torch.rand(H, generator=g)  # strong decay: its effect must show
    return w0, keep


def _rule(forget: str, w0: FastWeights, keep: torch.Tensor) -> Settle | None:
    if forget == "decay":
        return Settle(w0=w0, keep=keep)
    if forget == "weight_norm":
        return Settle(w0=w0, norms=augmented_column_norms(w0))
    return None


def _oracle_rule(forget: str, w0: FastWeights, keep: torch.Tensor) -> dict:
    return {"w0": w0, "keep": keep if forget == "decay" else None,
            "weight_norm": forget == "weight_norm"}


def test_gelu_grad_matches_autograd():
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(gelu_tanh(x).sum(), x)
    assert torch.allclose(gelu_tanh_grad(x.detach()), g, atol=1e-12)


def test_gelu_pieces_match_autograd_and_float64():
    """The sigmoid-form gelu, gelu' and gelu'' that the inner loop and the dual form's backward
    use: equal to torch's tanh gelu and its first two derivatives (autograd, float64), and in
    fp32 within 1e-6 of float64 over [-8, 8] (from tanh, gelu'' is 3.7e-6 off: 1 - tanh^2
    cancels)."""
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64, requires_grad=True)
    val, d1 = gelu_tanh_and_grad(x)
    assert torch.allclose(val, gelu_tanh(x), atol=1e-14)
    (g1,) = torch.autograd.grad(gelu_tanh(x).sum(), x, create_graph=True)
    assert torch.allclose(d1, g1, atol=1e-12)
    (g2,) = torch.autograd.grad(g1.sum(), x)
    assert torch.allclose(gelu_tanh_grad2(x.detach()), g2, atol=1e-12)
    x32 = x.detach().float()
    for ours, ref in ((gelu_tanh_value(x32), val), (gelu_tanh_grad(x32), d1),
                      (gelu_tanh_grad2(x32), g2)):
        assert (ours.double() - ref).abs().max() < 1e-6
    # the value alone (the query path) is the same bits as the pair's
    assert torch.equal(gelu_tanh_value(x32), gelu_tanh_and_grad(x32)[0])


@pytest.mark.parametrize("forget,per_row_w0", [("none", False), ("decay", False),
                                               ("decay", True), ("weight_norm", False)])
def test_dual_form_backward_passes_gradcheck(forget, per_row_w0):
    """The dual form's hand-written backward against float64 finite differences: every output
    (the frames' outputs and each tensor of the committed state) with respect to every input
    (start state, q, k, v, lr, the position scale, the LayerNorm, the learned W0, the decay)."""
    g = torch.Generator().manual_seed(3)
    b, h, k, d, f = 2, 2, 4, 3, 5
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * std)  # noqa
    unit = lambda: torch.nn.functional.normalize(r(b, h, k, d), dim=-1)  # noqa: E731
    w = (r(b, h, d, f, std=0.7), r(b, h, 1, f, std=0.2), r(b, h, f, d, std=0.7),
         r(b, h, 1, d, std=0.2))
    lead = (b, h) if per_row_w0 else (h,)
    w0 = tuple(r(*lead, *t.shape[2:], std=0.5) for t in w)
    inputs = [*w, unit(), unit(), r(b, h, k, d),
              torch.rand(b, h, k, generator=g, dtype=torch.float64) + 0.5,
              torch.rand(k, generator=g, dtype=torch.float64) + 0.5,
              1.0 + r(h, d, std=0.1), r(h, d, std=0.1), *w0,
              0.5 + 0.4 * torch.rand(h, generator=g, dtype=torch.float64)]
    inputs = [t.requires_grad_(True) for t in inputs]

    def fn(*a):
        init = FastWeights(*a[11:15])
        out, nxt = minibatch_forward(FastWeights(*a[:4]), *a[4:9], a[9], a[10], EPS,
                                     rule=_rule(forget, init, a[15]))
        return (out, *nxt.as_tuple())

    used = inputs if forget == "decay" else inputs[:11] + (inputs[11:15] if forget ==
                                                          "weight_norm" else [])
    assert torch.autograd.gradcheck(lambda *a: fn(*a, *inputs[len(a):]), tuple(used))
    # each output alone (the others' gradients absent, as for a scan's unused last state)
    # gives what all of them give with zeros for the others
    outs = fn(*inputs)
    for i, o in enumerate(outs):
        v = torch.randn(o.shape, generator=g, dtype=torch.float64)
        alone = torch.autograd.grad(o, used, v, retain_graph=True, allow_unused=True)
        zeros = [v if j == i else torch.zeros_like(x) for j, x in enumerate(outs)]
        full = torch.autograd.grad(outs, used, zeros, retain_graph=True, allow_unused=True)
        for a, c, x in zip(alone, full, used):  # None: no path from that output, a zero
            zero = torch.zeros_like(x)
            assert torch.allclose(zero if a is None else a, zero if c is None else c,
                                  atol=1e-12)


def test_layer_norm_l2_grad_matches_autograd():
    z = torch.randn(2, H, 5, HD, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, H, 5, HD, dtype=torch.float64)
    w, b = torch.randn(H, HD, dtype=torch.float64), torch.randn(H, HD, dtype=torch.float64)
    loss = 0.5 * ((head_layer_norm(z, w, b, EPS) - target) ** 2).sum()
    (g,) = torch.autograd.grad(loss, z)
    assert torch.allclose(head_layer_norm_l2_grad(z.detach(), target, w, b, EPS), g, atol=1e-10)


def test_inner_grads_match_autograd():
    w, xq, xk, xv, lr, ln_w, ln_b = _inputs(1)
    leaves = [t.clone().requires_grad_(True) for t in w.as_tuple()]
    z2 = gelu_tanh(xk @ leaves[0] + leaves[1]) @ leaves[2] + leaves[3]
    loss = 0.5 * ((head_layer_norm(z2, ln_w, ln_b, EPS) - (xv - xk)) ** 2).sum()
    g_w1, g_b1, g_w2, g_b2 = torch.autograd.grad(loss, leaves)
    x2, gz1, gz2 = inner_grads(w, xk, xv, ln_w, ln_b, EPS)
    assert torch.allclose(xk.transpose(-1, -2) @ gz1, g_w1, atol=1e-5)
    assert torch.allclose(gz1, g_b1, atol=1e-5)
    assert torch.allclose(x2.transpose(-1, -2) @ gz2, g_w2, atol=1e-5)
    assert torch.allclose(gz2, g_b2, atol=1e-5)


@pytest.mark.parametrize("T", [1, K - 1, K, 3 * K + 1, 3 * K + 3])
@pytest.mark.parametrize("forget", FORGET)
@pytest.mark.parametrize("kind", ["mean", "sum"])
def test_dual_form_matches_frame_by_frame_oracle(T, forget, kind):
    w, xq, xk, xv, lr, ln_w, ln_b = _inputs(T)
    w0, keep = _w0_keep()
    z, _ = ttt_scan(w, xq, xk, xv, lr, K, ln_w, ln_b, EPS, rule=_rule(forget, w0, keep),
                    scale=position_scale(K, kind=kind))
    ref = naive_ttt(w, xq, xk, xv, lr, K, ln_w, ln_b, EPS, scale_kind=kind,
                    **_oracle_rule(forget, w0, keep))
    assert z.shape == (B, H, T, HD)
    assert (z - ref).abs().max() < 1e-5
    # The test has teeth: with no inner learning the outputs are clearly different...
    frozen = naive_ttt(w, xq, xk, xv, lr * 0, K, ln_w, ln_b, EPS)
    if T > 1:
        assert (frozen - ref).abs().max() > 1e-2
    # ... and the settling rule and the position scale change what later mini-batches read.
    if T > K:
        plain = naive_ttt(w, xq, xk, xv, lr, K, ln_w, ln_b, EPS, scale_kind="mean")
        if forget != "none" or kind != "mean":
            assert (plain - ref)[..., K:, :].abs().max() > 1e-2


def test_state_after_full_minibatches_matches_oracle():
    T = 2 * K + 2
    w, xq, xk, xv, lr, ln_w, ln_b = _inputs(T)
    _, state = ttt_scan(w, xq, xk, xv, lr, K, ln_w, ln_b, EPS)
    # the oracle's state after 2 full mini-batches: run it on exactly 2K frames and compare
    # an output that depends on it: the first frame of the third mini-batch with lr_j = 0 there.
    lr0 = lr.clone()
    lr0[..., 2 * K:] = 0
    ref = naive_ttt(w, xq, xk, xv, lr0, K, ln_w, ln_b, EPS)[..., 2 * K, :]
    q = xq[..., 2 * K:2 * K + 1, :]
    f = gelu_tanh(q @ state.w1 + state.b1) @ state.w2 + state.b2
    mine = q + head_layer_norm(f, ln_w, ln_b, EPS)
    assert (mine[..., 0, :] - ref).abs().max() < 1e-5


def test_causal_future_frames_never_change_past_outputs():
    T = 3 * K + 2
    w, xq, xk, xv, lr, ln_w, ln_b = _inputs(T)
    z, _ = ttt_scan(w, xq, xk, xv, lr, K, ln_w, ln_b, EPS)
    t = K + 1  # inside the second mini-batch
    xk2, xv2, xq2, lr2 = xk.clone(), xv.clone(), xq.clone(), lr.clone()
    xk2[..., t + 1:, :] = torch.nn.functional.normalize(torch.randn_like(xk2[..., t + 1:, :]), dim=-1)
    xv2[..., t + 1:, :] += 3.0
    xq2[..., t + 1:, :] = torch.nn.functional.normalize(torch.randn_like(xq2[..., t + 1:, :]), dim=-1)
    lr2[..., t + 1:] = 1.0
    z2, _ = ttt_scan(w, xq2, xk2, xv2, lr2, K, ln_w, ln_b, EPS)
    assert torch.equal(z[..., : t + 1, :], z2[..., : t + 1, :])
    assert (z[..., t + 1:, :] - z2[..., t + 1:, :]).abs().max() > 1e-2


def test_partial_last_minibatch_is_a_prefix_not_padding():
    T = 2 * K + 3
    w, xq, xk, xv, lr, ln_w, ln_b = _inputs(3 * K)
    z_long, _ = ttt_scan(w, xq, xk, xv, lr, K, ln_w, ln_b, EPS)
    z_short, _ = ttt_scan(w, xq[..., :T, :], xk[..., :T, :], xv[..., :T, :], lr[..., :T], K,
                          ln_w, ln_b, EPS)
    assert torch.allclose(z_short, z_long[..., :T, :], atol=1e-6)


def _stream(w, xq, xk, xv, lr, ln_w, ln_b, active=None, rule=None, scale=None):
    T = xq.shape[-2]
    state = FastWeights(*(t.clone() for t in w.as_tuple()))
    z = lambda *s: torch.zeros(B, H, *s)  # noqa: E731
    buf = MiniBatchBuffer(z(K, HD), z(K, FH), z(K, FH), z(K, HD), z(K))
    pos = torch.zeros(B, dtype=torch.long)
    scale = position_scale(K) if scale is None else scale
    outs = []
    for t in range(T):
        a = torch.ones(B, dtype=torch.bool) if active is None else active[t]
        outs.append(stream_step(state, buf, pos, a, xq[..., t, :], xk[..., t, :], xv[..., t, :],
                                lr[..., t], scale, ln_w, ln_b, EPS, rule))
    return torch.stack(outs, dim=2), state, pos


@pytest.mark.parametrize("forget", FORGET)
@pytest.mark.parametrize("kind", ["mean", "sum"])
def test_stream_step_equals_dual_form(forget, kind):
    T = 3 * K + 3
    w, xq, xk, xv, lr, ln_w, ln_b = _inputs(T)
    rule = _rule(forget, *_w0_keep())
    scale = position_scale(K, kind=kind)
    z, state = ttt_scan(w, xq, xk, xv, lr, K, ln_w, ln_b, EPS, rule=rule, scale=scale)
    zs, sstate, pos = _stream(w, xq, xk, xv, lr, ln_w, ln_b, rule=rule, scale=scale)
    assert (z - zs).abs().max() < 1e-5
    assert torch.equal(pos, torch.full((B,), T % K))
    for a, b in zip(state.as_tuple(), sstate.as_tuple()):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("forget", FORGET)
def test_stream_inactive_rows_do_not_advance(forget):
    T = 2 * K
    w, xq, xk, xv, lr, ln_w, ln_b = _inputs(T)
    rule = _rule(forget, *_w0_keep())
    # row 1 is inactive for frames 3..(K+5): its state must be exactly as if those never came.
    active = [torch.tensor([True, not (3 <= t <= K + 5)]) for t in range(T)]
    zs, state, pos = _stream(w, xq, xk, xv, lr, ln_w, ln_b, active, rule=rule)
    keep = [t for t in range(T) if active[t][1]]
    sub = lambda x: x[..., keep, :] if x.dim() == 4 else x[..., keep]  # noqa: E731
    z_ref, ref_state, ref_pos = _stream(w, sub(xq), sub(xk), sub(xv), sub(lr), ln_w, ln_b,
                                        rule=rule)
    assert pos[1] == ref_pos[1] == len(keep) % K
    assert (zs[1][:, keep] - z_ref[1]).abs().max() < 1e-6
    for a, b in zip(state.as_tuple(), ref_state.as_tuple()):
        assert torch.allclose(a[1], b[1], atol=1e-6)
    z_full, _, _ = _stream(w, xq, xk, xv, lr, ln_w, ln_b, rule=rule)
    assert torch.allclose(zs[0], z_full[0], atol=1e-6)  # row 0 unaffected


@pytest.mark.parametrize("forget", FORGET)
def test_stream_commit_leaves_other_rows_bit_for_bit(forget):
    """The commit is a masked update in place: at the frame where row 0 commits, row 1 (active,
    mid mini-batch) and row 1 again while inactive keep their fast weights bit for bit, and
    row 0's committed state is the dual form's."""
    w, xq, xk, xv, lr, ln_w, ln_b = _inputs(2 * K)
    rule = _rule(forget, *_w0_keep())
    state = FastWeights(*(t.clone() for t in w.as_tuple()))
    z = lambda *s: torch.zeros(B, H, *s)  # noqa: E731
    buf = MiniBatchBuffer(z(K, HD), z(K, FH), z(K, FH), z(K, HD), z(K))
    pos = torch.zeros(B, dtype=torch.long)
    scale = position_scale(K)
    for t in range(K):
        # row 1 sits out frame 0, so it is one frame behind when row 0 commits (then inactive)
        a = torch.tensor([True, 0 < t < K - 1])
        before = [x[1].clone() for x in state.as_tuple()]
        stream_step(state, buf, pos, a, xq[..., t, :], xk[..., t, :], xv[..., t, :], lr[..., t],
                    scale, ln_w, ln_b, EPS, rule)
        for x, y in zip(state.as_tuple(), before):
            assert torch.equal(x[1], y), f"row 1 changed at frame {t}"
    assert pos.tolist() == [0, K - 2]
    _, ref = ttt_scan(w, xq[..., :K, :], xk[..., :K, :], xv[..., :K, :], lr[..., :K], K, ln_w,
                      ln_b, EPS, rule=rule, scale=scale)
    for x, y, x0 in zip(state.as_tuple(), ref.as_tuple(), w.as_tuple()):
        assert (x[0] - y[0]).abs().max() < 1e-5
        assert (x[0] - x0[0]).abs().max() > 1e-3  # the commit did change row 0


@pytest.mark.parametrize("forget", FORGET)
def test_training_gradients_match_oracle_and_checkpointing(forget):
    """Gradients wrt the start state, the norm, the lr, the keys and (settled) the learned W0
    and the decay: the dual form, its checkpointed scan and the autograd oracle agree."""
    T = 3 * K + 2
    w, xq, xk, xv, lr, ln_w, ln_b = _inputs(T)
    w0, keep = _w0_keep()
    target = torch.randn(B, H, T, HD)

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in
                  (*w.as_tuple(), ln_w, ln_b, lr, xk, *w0.as_tuple(), keep)]
        ww, init = FastWeights(*leaves[:4]), FastWeights(*leaves[8:12])
        z = fn(ww, xq, leaves[7], xv, leaves[6], leaves[4], leaves[5], init, leaves[12])
        loss = ((z - target) ** 2).mean()
        used = leaves if forget != "none" else leaves[:8]
        return torch.autograd.grad(loss, used, allow_unused=forget == "weight_norm")

    g_dual = grads(lambda ww, q, k, v, r, a, b, i, kp: ttt_scan(
        ww, q, k, v, r, K, a, b, EPS, rule=_rule(forget, i, kp))[0])
    g_ckpt = grads(lambda ww, q, k, v, r, a, b, i, kp: ttt_scan(
        ww, q, k, v, r, K, a, b, EPS, checkpoint_group=2, rule=_rule(forget, i, kp))[0])
    g_ref = grads(lambda ww, q, k, v, r, a, b, i, kp: naive_ttt(
        ww, q, k, v, r, K, a, b, EPS, differentiable=True, **_oracle_rule(forget, i, kp)))
    for gd, gc, gr in zip(g_dual, g_ckpt, g_ref):
        if gr is None:  # weight norm: the decay factor is unused
            assert gd is None and gc is None
            continue
        assert torch.allclose(gd, gc, atol=1e-6)
        assert (gd - gr).abs().max() <= 1e-5 + 1e-4 * gr.abs().max()
        assert gd.abs().max() > 0


def test_dual_form_and_stream_step_trace_whole_under_torch_compile():
    """On GPU both hot functions are compiled (moshi's lazy torch.compile): dynamo must take the
    dual form's autograd Function (forward and hand-written backward) and the in-place
    streaming commit as one graph each, and compute what eager computes. Checked on CPU with
    the aot_eager backend (no C++ toolchain needed)."""
    import torch._dynamo

    torch._dynamo.reset()
    w, xq, xk, xv, lr, ln_w, ln_b = _inputs(K)
    w0, keep = _w0_keep()
    leaves = [t.clone().requires_grad_(True) for t in
              (*w.as_tuple(), xq, xk, xv, lr, ln_w, ln_b, *w0.as_tuple(), keep)]

    def train(fn):
        init = FastWeights(*leaves[10:14])
        out, nxt = fn(FastWeights(*leaves[:4]), *leaves[4:8], position_scale(K), leaves[8],
                      leaves[9], EPS, _rule("decay", init, leaves[14]))
        loss = out.square().sum() + sum(t.square().sum() for t in nxt.as_tuple())
        return (out, *torch.autograd.grad(loss, leaves))

    def stream(fn):
        state = FastWeights(*(t.clone() for t in w.as_tuple()))
        z = lambda *s: torch.zeros(B, H, *s)  # noqa: E731
        buf = MiniBatchBuffer(z(K, HD), z(K, FH), z(K, FH), z(K, HD), z(K))
        pos = torch.tensor([0, 2])  # rows out of phase: they commit on different frames
        outs = [fn(state, buf, pos, torch.ones(B, dtype=torch.bool), xq[..., t, :],
                   xk[..., t, :], xv[..., t, :], lr[..., t], position_scale(K), ln_w, ln_b, EPS,
                   _rule("decay", w0, keep)) for t in range(K)]
        return (*outs, *state.as_tuple())

    for run, fn in ((train, minibatch_forward), (stream, stream_step)):
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        for a, b in zip(run(fn), run(compiled)):
            assert torch.allclose(a, b, atol=1e-6)

"""TTT inside moshi's LMModel: streaming equals parallel, causality, masks, learning."""

import copy

import pytest
import torch
from moshi.models.lm import LMGen
from moshi.models.lm_utils import _delay_sequence
from moshi.modules.transformer import StreamingTransformerLayer, set_attention_context

from moshi_ttt.block import TTTBlock, TTTState
from moshi_ttt.layer import HybridTransformerLayer
from moshi_ttt.model import build_ttt_lm, freeze_base, ttt_blocks
from moshi_ttt.streaming import reset_rows


def _lm(cfg, gate=None, context=None):
    """The config's TTT model at its shipped initialisation (`gate` 0: TTT switched off)."""
    lm = build_ttt_lm(cfg)
    if gate is not None:
        for a in ttt_blocks(lm):
            torch.nn.init.constant_(a.block.gate_alpha, gate)
    if context is not None:
        set_attention_context(lm.transformer, context)
    return lm.eval()


def _codes(cfg, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.lm["card"], (B, 17, T), generator=g)
    codes[:, 0] = torch.randint(0, cfg.lm["text_card"], (B, T), generator=g)
    return codes


def _delayed_inputs(lm, codes):
    B = codes.shape[0]
    initial = lm._get_initial_token().expand(B, -1, -1)
    delayed = torch.cat([initial, _delay_sequence(lm.delays, codes, initial)], dim=2)
    return delayed


class _Capture:
    """Record every TTT block's output (the layer's residual after TTT)."""

    def __init__(self, lm):
        self.out: dict[int, list[torch.Tensor]] = {}
        for a in ttt_blocks(lm):
            a.block.register_forward_hook(self._hook(a.layer))

    def _hook(self, i):
        def fn(mod, inp, out):
            self.out.setdefault(i, []).append(out.detach().clone())
        return fn

    def cat(self, i):
        return torch.cat(self.out[i], dim=1)


def test_structure(tiny_cfg):
    lm = build_ttt_lm(tiny_cfg)
    kinds = [type(l) for l in lm.transformer.layers]
    assert kinds == [HybridTransformerLayer, HybridTransformerLayer,
                     StreamingTransformerLayer, StreamingTransformerLayer]
    assert all(type(l) is StreamingTransformerLayer for l in lm.depformer.layers)
    names = [n for n, _ in lm.named_parameters() if ".ttt." in n]
    assert "transformer.layers.0.ttt.wq.weight" in names
    assert "transformer.layers.1.ttt.inner.w1" in names


#: TTT variants beside the shipped one: every option must stay streaming-exact.
VARIANTS = {
    "shipped": {},
    "decay": {"forget": "decay", "decay_init": 0.3},
    "weight_norm": {"forget": "weight_norm"},
    "no_forget": {"forget": "none"},
    "rope": {"rope": True},
    "no_rope": {"rope": False},
    "sum_scale": {"position_scale": "sum"},
    "reference_init": {"inner_init": "reference"},
    "qk_conv": {"qk_conv": 4},
    "no_qk_conv": {"qk_conv": 0},
}


def _variant(cfg, name):
    return cfg.model_copy(update={"ttt": cfg.ttt.model_copy(update=VARIANTS[name])})


@pytest.mark.parametrize("context,variant", [(None, "shipped"), (16, "shipped"),
                                             *((16, v) for v in VARIANTS if v != "shipped")])
def test_lm_forward_equals_teacher_forced_streaming(tiny_cfg, context, variant):
    """LMModel.forward (training path, B=2, T=3K+5) vs frame-by-frame streaming of the same
    tokens: same TTT-block outputs, same text and audio logits, also with context < T, for the
    shipped TTT and every variant of it."""
    tiny_cfg = _variant(tiny_cfg, variant)
    K = tiny_cfg.ttt.mini_batch_size
    B, T = 2, 3 * K + 5
    lm = _lm(tiny_cfg, context=context)
    codes = _codes(tiny_cfg, B, T)
    cap = _Capture(lm)
    with torch.no_grad():
        ref = lm(codes)
    par = {i: cap.cat(i) for i in cap.out}
    cap.out.clear()

    delayed = _delayed_inputs(lm, codes)
    seq_in, seq_next = delayed[:, :, :-1], delayed[:, :, 1:]
    text, audio = [], []
    with torch.no_grad(), lm.streaming(B):
        for t in range(T):
            out, tl = lm.forward_text(seq_in[:, :, t:t + 1])
            text.append(tl)
            per_cb = []
            with lm.depformer.streaming(B):
                for cb in range(lm.dep_q):
                    tok = seq_next[:, 0 if cb == 0 else cb, t:t + 1][:, None]
                    per_cb.append(lm.forward_depformer(cb, tok, out))
            audio.append(torch.cat(per_cb, dim=1))
    text_s = torch.cat(text, dim=2)
    audio_s = torch.cat(audio, dim=2)
    # undelay like LMModel.forward does
    from moshi.models.lm_utils import _undelay_sequence
    audio_s, amask = _undelay_sequence(lm.delays[1:1 + lm.dep_q], audio_s, fill_value=float("nan"))
    text_s, _ = _undelay_sequence(lm.delays[:1], text_s, fill_value=float("nan"))

    for i in par:
        assert (cap.cat(i) - par[i]).abs().max() <= 1e-4, f"TTT layer {i}"
    m = ref.text_mask[:, 0]
    assert (text_s[:, 0][m] - ref.text_logits[:, 0][m]).abs().max() <= 1e-4
    valid = ref.mask & amask
    assert valid.sum() > 0
    assert (audio_s[valid] - ref.logits[valid]).abs().max() <= 1e-4
    # and TTT does contribute (the comparison is not vacuous)
    base = _lm(tiny_cfg, gate=0.0, context=context)
    base.load_state_dict({k: v for k, v in lm.state_dict().items() if "gate_alpha" not in k},
                         strict=False)
    with torch.no_grad():
        assert (base(codes).text_logits[:, 0][m] - ref.text_logits[:, 0][m]).abs().max() > 1e-3


def test_lmgen_step_equals_parallel_forward_text(tiny_cfg):
    """LMGen.step (sampling, B=2, context 16 < T) fed through the TTT model: the text logits of
    every step equal one parallel forward over the tokens LMGen actually consumed."""
    K = tiny_cfg.ttt.mini_batch_size
    B, T = 2, 3 * K + 5
    lm = _lm(tiny_cfg, context=16)
    consumed, logits = [], []
    orig = lm.forward_text

    def spy(seq, *a, **kw):
        consumed.append(seq.clone())
        out = orig(seq, *a, **kw)
        logits.append(out[1].clone())
        return out

    lm.forward_text = spy  # LMGen binds forward_text when its state is created
    gen = LMGen(lm, temp=1.0, temp_text=1.0)
    user = _codes(tiny_cfg, B, T)[:, 9:]
    outs = 0
    with gen.streaming(B):
        for t in range(T):
            o = gen.step(user[:, :, t:t + 1])
            outs += o is not None
    lm.forward_text = orig
    assert outs == T - 1  # the first step only fills the delays
    seq = torch.cat(consumed, dim=2)
    with torch.no_grad():
        _, par = lm.forward_text(seq)
    assert (torch.cat(logits, dim=2) - par).abs().max() <= 1e-4


def _ttt_states(lm) -> list[TTTState]:
    return [a.block._streaming_state for a in ttt_blocks(lm)]


def test_reset_by_mask_restores_learned_w0_for_one_row(tiny_cfg):
    K = tiny_cfg.ttt.mini_batch_size
    lm = _lm(tiny_cfg)
    T1, T2 = K + 7, 2 * K + 3
    x1 = _delayed_inputs(lm, _codes(tiny_cfg, 2, T1 + 1, seed=1))[:, :, :T1]
    x2 = _delayed_inputs(lm, _codes(tiny_cfg, 2, T2 + 1, seed=2))[:, :, :T2]
    with torch.no_grad():
        with lm.streaming(2):
            for t in range(T1):
                lm.forward_text(x1[:, :, t:t + 1])
            w_before = [s.w.w1.clone() for s in _ttt_states(lm)]
            assert all((w[1] - w[0]).abs().max() > 0 for w in w_before)  # rows learned apart
            lm.reset_streaming(torch.tensor([False, True]))
            for s, w in zip(_ttt_states(lm), w_before):
                assert torch.equal(s.w.w1[0], w[0])  # row 0 untouched
                assert torch.equal(s.pos, torch.tensor([T1 % K, 0]))
            after = torch.cat([lm.forward_text(x2[:, :, t:t + 1])[1] for t in range(T2)], dim=2)
        with lm.streaming(2):  # a fresh stream on the same second inputs
            fresh = torch.cat([lm.forward_text(x2[:, :, t:t + 1])[1] for t in range(T2)], dim=2)
        with lm.streaming(2):  # row 0 as if never reset: continuous stream
            for t in range(T1):
                lm.forward_text(x1[:, :, t:t + 1])
            cont = torch.cat([lm.forward_text(x2[:, :, t:t + 1])[1] for t in range(T2)], dim=2)
    assert (after[1] - fresh[1]).abs().max() <= 1e-5
    assert (after[0] - cont[0]).abs().max() <= 1e-5
    assert (after[0] - fresh[0]).abs().max() > 1e-4  # row 0's history matters


def test_exec_mask_freezes_rows(tiny_cfg):
    lm = _lm(tiny_cfg)
    x = _delayed_inputs(lm, _codes(tiny_cfg, 2, 30))
    with torch.no_grad(), lm.streaming(2):
        for t in range(10):
            lm.forward_text(x[:, :, t:t + 1])
        snap = [copy.deepcopy((s.w, s.buf, s.pos)) for s in _ttt_states(lm)]
        lm.set_exec_mask(torch.tensor([True, False]))
        for t in range(10, 20):
            lm.forward_text(x[:, :, t:t + 1])
        for s, (w, buf, pos) in zip(_ttt_states(lm), snap):
            assert s.pos[1] == pos[1] and s.pos[0] == (pos[0] + 10) % s.buf.lr.shape[-1]
            for a, b in zip(s.w.as_tuple(), w.as_tuple()):
                assert torch.equal(a[1], b[1])
            for a, b in ((s.buf.xk, buf.xk), (s.buf.gz1, buf.gz1), (s.buf.lr, buf.lr)):
                assert torch.equal(a[1], b[1])
            assert not torch.equal(s.buf.xk[0], buf.xk[0])


def test_forward_never_mutates_w0(tiny_cfg):
    lm = _lm(tiny_cfg)
    before = {n: p.detach().clone() for n, p in lm.named_parameters() if ".ttt.inner." in n}
    x = _delayed_inputs(lm, _codes(tiny_cfg, 2, 40))
    with torch.no_grad():
        lm.forward_text(x)
        with lm.streaming(2):
            for t in range(40):
                lm.forward_text(x[:, :, t:t + 1])
            moved = sum((s.w.w1 - s.w0().w1).abs().max() for s in _ttt_states(lm))
    assert moved > 0  # the sessions learned ...
    for n, p in lm.named_parameters():  # ... and the learned W0 is untouched
        if n in before:
            assert torch.equal(p, before[n]), n


def test_one_optimiser_step_trains_w0_lr_gate_and_alpha_base_frozen(tiny_cfg):
    lm = build_ttt_lm(tiny_cfg).train()
    trainable, frozen = freeze_base(lm)
    assert trainable > 0 and frozen > 0
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    codes = _codes(tiny_cfg, 2, 40)
    out = lm(codes)
    loss = torch.nn.functional.cross_entropy(out.text_logits[out.text_mask],
                                             codes[:, :1][out.text_mask])
    loss.backward()
    opt.step()
    for name in ("transformer.layers.0.ttt.inner.w1", "transformer.layers.0.ttt.inner.lr_weight",
                 "transformer.layers.0.ttt.inner.lr_bias", "transformer.layers.0.ttt.gate_alpha",
                 "transformer.layers.0.ttt.inner.decay_logit",
                 "transformer.layers.0.ttt.conv_q.conv.conv.weight",
                 "transformer.layers.1.ttt.inner.b2", "transformer.layers.1.ttt.wq.weight"):
        p = dict(lm.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().max() > 0, name
        assert not torch.equal(p.detach(), before[name]), name
    for n, p in lm.named_parameters():
        if ".ttt." not in n:
            assert p.grad is None and torch.equal(p.detach(), before[n]), n


def test_bf16_model_keeps_inner_state_fp32(tiny_cfg):
    lm = build_ttt_lm(tiny_cfg, dtype=torch.bfloat16).eval()
    blk = next(ttt_blocks(lm)).block
    assert blk.wq.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in blk.inner.parameters())
    lm.to(torch.bfloat16)
    assert blk.inner.w1.dtype == torch.float32
    x = _delayed_inputs(lm, _codes(tiny_cfg, 2, 20))
    with torch.no_grad():
        out, _ = lm.forward_text(x)
        with lm.streaming(2):
            for t in range(20):
                lm.forward_text(x[:, :, t:t + 1])
            st = blk._streaming_state
            assert st.w.w1.dtype == torch.float32 and st.buf.gz1.dtype == torch.float32
            assert bool(st.finite_rows().all())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_block_rejects_wrong_width(tiny_cfg):
    blk = TTTBlock(64, 4, tiny_cfg.ttt)
    with pytest.raises(ValueError, match="expects width 64"):
        blk(torch.zeros(1, 3, 32))


def test_nonfinite_rows_are_flagged_per_row_and_cleared_by_reset(tiny_cfg):
    """A diverged session (NaN in its fast weights) is flagged on device, only its own row, and
    a reset by mask brings the row back to the learned W0 with the flag cleared."""
    lm = _lm(tiny_cfg)
    x = _delayed_inputs(lm, _codes(tiny_cfg, 2, 12))
    with torch.no_grad(), lm.streaming(2):
        for t in range(4):
            lm.forward_text(x[:, :, t:t + 1])
        states = _ttt_states(lm)
        assert not any(bool(s.nonfinite.any()) for s in states)
        states[0].w.w1[1].fill_(float("nan"))  # poison row 1 of the first TTT layer
        _, logits = lm.forward_text(x[:, :, 4:5])
        assert states[0].nonfinite.tolist() == [False, True]
        assert torch.isfinite(logits[0]).all() and not torch.isfinite(logits[1]).all()
        reset_rows(lm, torch.tensor([False, True]))
        assert not any(bool(s.nonfinite.any()) for s in states)
        w0 = states[0].w0()
        assert torch.equal(states[0].w.w1[1], w0.w1) and torch.equal(states[0].w.b2[1], w0.b2)
        assert bool(states[0].finite_rows().all())
        _, logits = lm.forward_text(x[:, :, 5:6])
        assert torch.isfinite(logits).all()  # no NaN left behind in the row's KV caches


def test_moshi_reset_alone_leaves_nan_in_kv_cache(tiny_cfg):
    """Why `reset_rows` exists: moshi's own reset keeps a diverged row's cached keys/values."""
    lm = _lm(tiny_cfg)
    x = _delayed_inputs(lm, _codes(tiny_cfg, 2, 8))
    with torch.no_grad(), lm.streaming(2):
        lm.forward_text(x[:, :, 0:1])
        _ttt_states(lm)[0].w.w1[1].fill_(float("nan"))
        lm.forward_text(x[:, :, 1:2])
        lm.reset_streaming(torch.tensor([False, True]))
        _, logits = lm.forward_text(x[:, :, 2:3])
    assert not torch.isfinite(logits[1]).all()


@pytest.mark.parametrize("kind", ["identity", "shift"])
def test_qk_conv_inits(kind):
    """identity: q and k read the current frame; shift: k reads the frame before (q the
    current). Biases start at 0 in either case."""
    from moshi_ttt.config import TTTConfig

    blk = TTTBlock(32, 2, TTTConfig(layers=[0], num_heads=2, qk_conv=4, qk_conv_init=kind))
    wq, wk = blk.conv_q.conv.conv.weight, blk.conv_k.conv.conv.weight  # [D, 1, 4]
    expect = {"identity": ([0, 0, 0, 1], [0, 0, 0, 1]), "shift": ([0, 0, 0, 1], [0, 0, 1, 0])}[kind]
    assert torch.equal(wq[:, 0], torch.tensor(expect[0]).expand(32, 4))
    assert torch.equal(wk[:, 0], torch.tensor(expect[1]).expand(32, 4))
    assert not blk.conv_q.conv.conv.bias.any() and not blk.conv_k.conv.conv.bias.any()
    # a shift key of frame t is the identity key of frame t - 1
    x = torch.randn(1, 6, 32)
    with torch.no_grad():
        _, xk, _, _ = blk._qkv_lr(x)
        ident = TTTBlock(32, 2, TTTConfig(layers=[0], num_heads=2, qk_conv=4))
        ident.load_state_dict({k: v for k, v in blk.state_dict().items()
                               if "conv" not in k}, strict=False)
        _, xk0, _, _ = ident._qkv_lr(x)
    if kind == "shift":
        assert (xk[:, :, 1:] - xk0[:, :, :-1]).abs().max() < 1e-5

"""`ttt.qkv_init: whitened`: the TTT block's q/k/v projections start as the whitening of its own
input, so keys of different frames are decorrelated from the first training step. Applied by
`moshi-ttt train` on a fresh run's first batch (never on a resume), by `eval-memory` on a batch
of its own, by `diagnose-ttt` on the frames it streams."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from moshi_ttt.block import TTTBlock
from moshi_ttt.cli import app
from moshi_ttt.config import BaseModelRef, TTTConfig, load_config
from moshi_ttt.diagnostics import key_report
from moshi_ttt.eval import memory as mem
from moshi_ttt.eval.diagnose import random_codes
from moshi_ttt.model import block_inputs, build_ttt_lm, calibrate_ttt, ttt_blocks

from conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D = 32


def _frames(n: int = 4000, seed: int = 0) -> torch.Tensor:
    """[1, n, D] hidden states as a transformer makes them: a large direction every frame shares,
    and variation of spread 1..10 across directions."""
    g = torch.Generator().manual_seed(seed)
    common = 6.0 * torch.randn(D, generator=g)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    spread = torch.linspace(1.0, 10.0, D).sqrt()
    return (common + (torch.randn(n, D, generator=g) * spread) @ basis.T)[None]


def _block(**ttt) -> TTTBlock:
    torch.manual_seed(0)
    return TTTBlock(D, 2, TTTConfig(layers=[0], **ttt))


def _keys(block: TTTBlock, x: torch.Tensor) -> torch.Tensor:
    """Unit keys per head [H, T, HD], as the inner learner gets them (convs left out)."""
    k = block.wk(block.pre_norm(x))[0]
    return F.normalize(k.view(k.shape[0], block.num_heads, -1).transpose(0, 1), dim=-1)


def _mean_cosine(k: torch.Tensor) -> float:
    sim = k @ k.transpose(-1, -2)
    n = k.shape[-2]
    return float((sim.sum() - sim.diagonal(dim1=-2, dim2=-1).sum()) / (k.shape[0] * n * (n - 1)))


def test_whitening_decorrelates_the_block_input():
    x = _frames()
    blk = _block(qkv_init="whitened")

    def spread(q: torch.Tensor) -> float:  # largest / smallest variance over directions
        eig = torch.linalg.eigvalsh(torch.cov(q.double().T))
        return float(eig.max() / eig.min())

    with torch.no_grad():
        before = _mean_cosine(_keys(blk, x))
        spread_before = spread(blk.wq(blk.pre_norm(x))[0])
        blk.whiten_projections(x)
        q = blk.wq(blk.pre_norm(x))[0].double()
        after = _mean_cosine(_keys(blk, x))
    # random projections of frames sharing a direction: keys alike; whitened: near orthogonal
    assert before > 0.5 and abs(after) < 0.01, (before, after)
    # centred, and about the same variance in every direction (the ridge of 1% of the largest
    # variance lifts the least-spread direction: 1.22 here, against 70 from the random init)
    assert q.mean(0).abs().max() < 1e-4 * q.std(0).max()
    assert spread(q) < 1.3 and spread_before > 20, (spread(q), spread_before)
    # one matrix for q, k and v, at the random init's Frobenius norm sqrt(d_model)
    assert torch.equal(blk.wq.weight, blk.wk.weight) and torch.equal(blk.wq.weight, blk.wv.weight)
    assert torch.equal(blk.wq.bias, blk.wv.bias)
    assert float(blk.wq.weight.detach().norm()) == pytest.approx(math.sqrt(D), rel=1e-5)


def test_whitening_over_several_batches_is_whitening_over_their_frames():
    x = _frames()
    one, parts = _block(qkv_init="whitened"), _block(qkv_init="whitened")
    one.whiten_projections(x)
    parts.whiten_projections([x[:, :1000], x[:, 1000:2500], x[:, 2500:]])
    assert torch.allclose(one.wq.weight, parts.wq.weight, atol=1e-6)
    assert torch.allclose(one.wq.bias, parts.wq.bias, atol=1e-5)


def test_whitening_with_shared_qk_sets_the_one_projection():
    blk = _block(qkv_init="whitened", share_qk=True)
    blk.whiten_projections(_frames())
    assert blk.wk is None and torch.equal(blk.wq.weight, blk.wv.weight)


@pytest.mark.parametrize("x, message", [
    (torch.randn(1, 1, D), r"at least 2 frames of the block.s input, got 1"),
    (torch.full((1, 8, D), float("nan")), r"calibration frames for whitening hold NaN or inf"),
    (torch.ones(1, 8, D), r"frames are all the same"),
])
def test_whitening_refuses_frames_it_cannot_whiten(x, message):
    blk = _block(qkv_init="whitened")
    before = blk.wq.weight.clone()
    with pytest.raises(ValueError, match=message):
        blk.whiten_projections(x)
    assert torch.equal(blk.wq.weight, before)  # nothing half-written


def _qkv_cfg(cfg, init: str = "whitened"):
    """`cfg` with `ttt.qkv_init` set to `init` (`whitened` is the shipped default since
    2026-12-05; kept explicit so these tests say what they test)."""
    return cfg.model_copy(update={"ttt": cfg.ttt.model_copy(update={"qkv_init": init})})


def test_calibrate_ttt_calibrates_each_block_on_what_the_blocks_before_pass_on(tiny_cfg):
    """Block by block in order: re-whitening any block on its input, once all are whitened,
    changes nothing (the first block's input does not depend on it; the second's does)."""
    torch.manual_seed(0)
    lm = build_ttt_lm(_qkv_cfg(tiny_cfg))
    codes = random_codes(lm, 96, seed=0).repeat(2, 1, 1)
    codes[1] = random_codes(lm, 96, seed=1)[0]
    before = key_report(lm, codes)
    done = calibrate_ttt(lm, codes)
    assert [a.layer for a in done] == tiny_cfg.ttt.layers
    after = key_report(lm, codes)
    for layer in tiny_cfg.ttt.layers:  # a random base's keys are not much alike (the trained
        # base of eval-memory's are: below); whitened, they are near orthogonal (measured: 0.0014
        # and 0.011 at layers 0 / 1, against 0.058 and 0.76; the ridge keeps layer 1 off 0)
        assert abs(after[layer]["key_cosine"]) < 0.02 < before[layer]["key_cosine"]
        assert after[layer]["crosstalk"] < before[layer]["crosstalk"], (before, after)
    blocks = list(ttt_blocks(lm))
    seen = dict(zip((a.layer for a in blocks), block_inputs(lm, codes, blocks)))
    for a in ttt_blocks(lm):
        w = a.block.wq.weight.clone()
        a.block.whiten_projections(seen[a.layer])
        assert torch.allclose(a.block.wq.weight, w, atol=1e-5), a.layer


def _rms(t: torch.Tensor) -> float:
    return float(t.pow(2).mean().sqrt())


@pytest.mark.parametrize("out_init", ["matched", "unembedding", "random"])
def test_matched_output_scale_adds_as_much_as_the_stream_holds(tiny_cfg, out_init):
    """`out_init: matched` and `unembedding` (the tiny config's): after `calibrate_ttt` what
    each TTT block adds to the residual stream (gate included) has the RMS of the stream there,
    on the calibration frames, where the random init adds whatever its scale gives (0.44 and
    0.17 of it at layers 0 and 1 on eval-memory's trained text base, more on this random one);
    `random`: wo stays as initialised."""
    cfg = tiny_cfg.model_copy(update={"ttt": tiny_cfg.ttt.model_copy(
        update={"out_init": out_init})})
    torch.manual_seed(0)
    lm = build_ttt_lm(cfg)
    codes = random_codes(lm, 96, seed=0).repeat(2, 1, 1)
    codes[1] = random_codes(lm, 96, seed=1)[0]
    wo = {a.layer: a.block.wo.weight.clone() for a in ttt_blocks(lm)}
    calibrate_ttt(lm, codes)
    blocks = list(ttt_blocks(lm))
    for a, x in zip(blocks, block_inputs(lm, codes, blocks)):
        with torch.no_grad():
            ratio = _rms(a.block(x) - x) / _rms(x)
        if out_init != "random":
            assert ratio == pytest.approx(1.0, rel=1e-4), a.layer
            assert not torch.equal(a.block.wo.weight, wo[a.layer])
        else:
            assert abs(ratio - 1.0) > 0.1, (a.layer, ratio)
            assert torch.equal(a.block.wo.weight, wo[a.layer])


def test_matching_the_output_scale_refuses_frames_it_cannot_use():
    blk = _block(qkv_init="whitened", out_init="matched")
    before = blk.wo.weight.clone()
    with pytest.raises(ValueError, match=r"cannot match the output scale .* expected finite "
                                         r"and positive"):
        blk.match_output_scale(torch.full((1, 8, D), float("nan")))
    assert torch.equal(blk.wo.weight, before)  # nothing half-written


def test_block_inputs_are_what_each_block_receives(tiny_cfg):
    """`block_inputs` (whitening's and key_report's calibration frames): a main-transformer
    block gets its layer's attention output (the layer's `_sa_block` of the transformer's input),
    a depformer block the depformer's width; the model's train/eval mode is left as it was."""
    cfg = tiny_cfg.model_copy(update={"ttt": tiny_cfg.ttt.model_copy(
        update={"layers": [0], "depformer_layers": [0]})})
    torch.manual_seed(0)
    lm = build_ttt_lm(cfg)
    codes = random_codes(lm, 24, seed=0).repeat(2, 1, 1)
    blocks = list(ttt_blocks(lm))
    lm.train()
    main_in, dep_in = block_inputs(lm, codes, blocks)
    assert lm.training
    seen = {}
    hook = lm.transformer.register_forward_pre_hook(
        lambda _m, args: seen.__setitem__("x", args[0].detach()))
    with torch.no_grad():
        lm.eval()
        from moshi_ttt.model import delayed_inputs
        lm.forward_text(delayed_inputs(lm, codes)[:, :, :-1])
        hook.remove()
        want = lm.transformer.layers[0]._sa_block(seen["x"])
    assert main_in.shape == (2, 24, lm.dim)
    torch.testing.assert_close(main_in, want)
    assert dep_in.shape[-1] == lm.depformer_in[0].out_features
    [only_main] = block_inputs(lm, codes, blocks[:1])  # main blocks alone: forward_text
    torch.testing.assert_close(only_main, main_in)


def test_eval_memory_whitens_the_ttt_jobs_that_ask(tiny_cfg, monkeypatch):
    """A TTT job whose config says `whitened` (the shipped default) is calibrated once before
    training, on a batch of the training task that is neither a training nor a held-out batch;
    one whose config says `random` for q/k/v and wo alike is not."""
    calls = []
    real = mem.calibrate_ttt

    def spy(lm, codes):
        calls.append(codes.clone())
        return real(lm, codes)

    monkeypatch.setattr(mem, "calibrate_ttt", spy)
    s = mem.MemoryEvalSettings.from_config(
        tiny_cfg, quick=True,
        ablations={"random_qkv": {"qkv_init": "random", "out_init": "random"}})
    s = s.model_copy(update={"workers": 1, "methods": ["ttt"], "tasks": ["text"], "seeds": [0],
                             "steps": 2})
    report = mem.run_memory_eval(tiny_cfg, s)
    assert len(calls) == 1 and calls[0].shape[0] == s.batch_size
    keys = {r["method"]: r["keys"]["init"] for r in report["results"]
            if r["gap_x"] == s.gaps[0] and "keys" in r}
    # the reported init keys are the whitened ones (scored on held-out sequences, not the
    # calibration batch): layer 0's input does not depend on TTT, layer 1's does (gate 0.5)
    first = tiny_cfg.ttt.layers[0]
    assert keys["ttt"][first]["key_cosine"] < 0.5 * keys["ttt:random_qkv"][first]["key_cosine"]
    for layer in tiny_cfg.ttt.layers:
        assert keys["ttt"][layer]["key_cosine"] < keys["ttt:random_qkv"][layer]["key_cosine"], keys
    g = torch.Generator().manual_seed(0 + 100)  # the first training batch differs
    task = mem.whole_mini_batches(mem.task_at(s.task, s.gaps[0], int(tiny_cfg.lm["num_layers"])),
                                  tiny_cfg.ttt.mini_batch_size)
    first, _ = mem.batches("text", int(tiny_cfg.lm["n_q"]), int(tiny_cfg.lm["dep_q"]), None)(
        task, s.batch_size, g)
    assert not torch.equal(first, calls[0])


def test_diagnose_ttt_whitens_a_fresh_model_as_train_would():
    path = CONFIGS / "tiny.yaml"
    assert load_config(path).ttt.qkv_init == "whitened"  # the shipped default
    res = CliRunner().invoke(app, ["diagnose-ttt", "-c", str(path), "--frames", "48", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output.strip().splitlines()[-1])
    assert ("calibrated on the streamed frames: q/k/v whitened, read-out fitted to the text "
            "head, output scale matched" in report["source"])
    for lay in report["layers"]:
        assert lay["keys"]["key_cosine"] < 0.2, lay["keys"]


# -- the trainer ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from fixtures import make_tiny_base, write_random_dataset

    root = tmp_path_factory.mktemp("whiten")
    return {"base": make_tiny_base(root),
            "data": write_random_dataset(root / "data", n_files=3, seconds=6.0, name="train")}


def _settings(env, **kw):
    from moshi_ttt.train.settings import TrainSettings

    return TrainSettings(**{**dict(data=str(env["data"]), segment_seconds=2.0, batch_size=2,
                                   max_steps=2, ckpt_every=1, eval_every=100, eval_batches=0,
                                   warmup_steps=1, lr=3e-3, activation_checkpointing=False,
                                   device="cpu"), **kw})


def test_train_whitens_a_fresh_run_and_never_a_resumed_one(env, tmp_path, monkeypatch, caplog):
    import logging

    from moshi_ttt.checkpoint import load_model
    from moshi_ttt.train import trainer as trainer_mod

    cfg = _qkv_cfg(load_config(CONFIGS / "tiny.yaml"))
    base = BaseModelRef(local_dir=str(env["base"]))
    caplog.set_level(logging.INFO, logger="moshi_ttt.train.trainer")
    t = trainer_mod.Trainer(cfg, _settings(env), tmp_path / "probe", base_override=base)
    t.lm.train()
    t._data()
    pos = t.pos.__dict__.copy()
    t._calibrate_ttt()
    assert t.pos.__dict__ == pos  # the data position is untouched
    for a in ttt_blocks(t.lm):
        b = a.block
        assert torch.equal(b.wq.weight, b.wk.weight) and torch.equal(b.wq.weight, b.wv.weight)
        assert float(b.wq.weight.detach().norm()) == pytest.approx(math.sqrt(b.d_model),
                                                                    rel=1e-5)
    # 2 x 64 frames at least (d_model 64), in segments of 25 frames: 6 of them
    assert "q/k/v projections (ttt.qkv_init whitened) and read-out (fitted to the text head) " \
        "and output scale (ttt.out_init unembedding) " \
        "of 2 TTT block(s) set from the first 150 training frames (6 segments)" in caplog.text

    full, part = tmp_path / "full", tmp_path / "part"
    trainer_mod.train(cfg, _settings(env), full, base_override=base)
    trainer_mod.train(cfg, _settings(env, stop_after=1), part, base_override=base)

    def refuse(*_a, **_k):
        raise AssertionError("a resumed run was whitened again")

    monkeypatch.setattr(trainer_mod, "calibrate_ttt", refuse)
    trainer_mod.train(cfg, _settings(env), part, base_override=base, resume=True)
    lines = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
             for d in (full, part)]
    assert [r["step"] for r in lines[1]] == [1, 2]
    for ra, rb in zip(*lines):  # the resume continues the straight run exactly
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6), ra["step"]
    wa = load_model(full, with_codec=False).lm.state_dict()
    wb = load_model(part, with_codec=False).lm.state_dict()
    k = "transformer.layers.0.ttt.wq.weight"
    assert torch.allclose(wa[k], wb[k], atol=1e-6)


def test_eval_stability_whitens_the_fresh_model_it_builds(tiny_cfg, monkeypatch):
    """Its fresh model starts as train would start it (calibrated, the config says so); a model
    it is given (the trained recall model) is left as it is."""
    from moshi_ttt.eval import stability
    from moshi_ttt.eval.stability import StabilitySettings, run_stability

    calls = []
    real = stability.calibrate_ttt
    monkeypatch.setattr(stability, "calibrate_ttt",
                        lambda lm, codes: calls.append(codes.shape) or real(lm, codes))
    s = StabilitySettings(frames=4, driver="tokens", window=2, record_every=2)
    cfg = _qkv_cfg(tiny_cfg)
    rep = run_stability(cfg, s)
    assert rep["finite"] and calls == [torch.Size([1, 17, stability.WHITEN_FRAMES])]
    lm = build_ttt_lm(cfg)
    run_stability(cfg, s, lm=lm)
    assert len(calls) == 1
    plain = tiny_cfg.model_copy(update={"ttt": tiny_cfg.ttt.model_copy(
        update={"qkv_init": "random", "out_init": "random"})})
    run_stability(plain, s)  # `random` q/k/v and wo: nothing to calibrate
    assert len(calls) == 1

"""The trainer: checkpoints the server can load, exact resume, exact accumulation, clean eval,
clear refusals. Everything on the tiny config, CPU, fp32."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moshi_ttt.checkpoint import (
    CheckpointError, find_checkpoint, latest_checkpoint, load_model, save_checkpoint,
)
from moshi_ttt.config import BaseModelRef, load_config
from moshi_ttt.data.index import DataError
from moshi_ttt.train.settings import TrainSettings
from moshi_ttt.train.trainer import Trainer, TrainingError, _lr_lambda, train

from conftest import CONFIGS
from fixtures import make_tiny_base, write_random_dataset, write_wav


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    base = make_tiny_base(root)
    data = write_random_dataset(root / "data", n_files=4, seconds=6.0, name="train")
    evald = write_random_dataset(root / "data", n_files=2, seconds=4.0, seed=1, name="eval")
    return {"root": root, "base": base, "data": data, "eval": evald}


def _settings(env, **kw):
    base = dict(data=str(env["data"]), eval_data=str(env["eval"]), segment_seconds=2.0,
                batch_size=2, max_steps=4, ckpt_every=2, eval_every=100, eval_batches=2,
                warmup_steps=1, lr=3e-3, activation_checkpointing=False, device="cpu")
    base.update(kw)
    return TrainSettings(**base)


def _cfg():
    return load_config(CONFIGS / "tiny.yaml")


def _run(env, out, cfg=None, resume=False, **kw):
    return train(cfg or _cfg(), _settings(env, **kw), out,
                 base_override=BaseModelRef(local_dir=str(env["base"])), resume=resume)


def _losses(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_a_checkpoint_the_server_loads(env, tmp_path):
    out = tmp_path / "run"
    last = _run(env, out, eval_every=2)
    recs = _losses(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    r = recs[-1]
    for key in ("loss", "text", "audio", "audio_cb0", "audio_cb7", "lr", "tokens_per_s",
                "peak_mem_mb", "grad_norm", "gate", "fast_weight_norm", "eval/loss"):
        assert key in r, key
    assert set(r["gate"]) == {"0", "1"} and all(math.isfinite(v) for v in r["gate"].values())
    assert all(math.isfinite(x["loss"]) for x in recs)
    # the layout the server reads, with nothing half-written around
    ck = latest_checkpoint(out)
    assert ck.name == "step_000004"
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest", "step_000002", "step_000004"]
    meta = json.loads((ck / "config.json").read_text())
    assert meta["step"] == 4 and meta["dims"]["main"]["d_model"] == 64
    assert meta["base"]["fingerprint"] and meta["data_fingerprint"]
    m = load_model(out)
    assert m.checkpoint_info["step"] == 4
    fresh = load_model(env["base"])
    w_trained = dict(m.lm.named_parameters())["transformer.layers.1.ttt.inner.w1"]
    w_init = dict(fresh.lm.named_parameters())["transformer.layers.1.ttt.inner.w1"]
    assert not torch.equal(w_trained, w_init)  # TTT was trained ...
    b_trained = dict(m.lm.named_parameters())["transformer.layers.0.self_attn.in_projs.0.weight"]
    b_init = dict(fresh.lm.named_parameters())["transformer.layers.0.self_attn.in_projs.0.weight"]
    assert torch.equal(b_trained, b_init)  # ... the base was not
    assert last["step"] == 4


def test_logged_and_checkpointed_steps_carry_every_figure(env, tmp_path, monkeypatch):
    """log_every 3: only steps 3 and 6 (and the last, 7) are logged, each with every figure;
    the steps in between read back only the loss and gradient norm (one host sync), so the
    per-stream summary is computed on logged and checkpointed steps alone."""
    import moshi_ttt.train.trainer as trainer_mod

    calls = []
    real = trainer_mod.summarize
    monkeypatch.setattr(trainer_mod, "summarize", lambda *a: calls.append(1) or real(*a))
    _run(env, tmp_path / "r", max_steps=7, log_every=3, ckpt_every=100)
    recs = _losses(tmp_path / "r")
    assert [r["step"] for r in recs] == [3, 6, 7]
    for r in recs:
        for key in ("loss", "text", "audio", "audio_cb7", "peak_mem_mb", "gate", "grad_norm"):
            assert key in r, (r["step"], key)
    assert len(calls) == 3 + 1  # the logged steps, and the held-out evaluation at the end


def test_loss_goes_down_on_repeated_data(env, tmp_path):
    recs = None
    _run(env, tmp_path / "r", max_steps=12, lr=1e-2, segment_seconds=6.0, batch_size=4,
         ckpt_every=100)
    recs = _losses(tmp_path / "r")
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.05


def test_resume_continues_exactly(env, tmp_path):
    full = tmp_path / "full"
    _run(env, full, max_steps=4)
    part = tmp_path / "part"
    _run(env, part, max_steps=4, stop_after=2)
    assert latest_checkpoint(part).name == "step_000002"
    train(_cfg(), _settings(env, max_steps=4), part,
          base_override=BaseModelRef(local_dir=str(env["base"])), resume=True)
    a, b = _losses(full), _losses(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6), ra["step"]
        assert ra["lr"] == pytest.approx(rb["lr"])


def test_gradient_accumulation_equals_one_big_batch(env, tmp_path):
    _run(env, tmp_path / "big", max_steps=2, batch_size=4, grad_accum=1)
    _run(env, tmp_path / "acc", max_steps=2, batch_size=2, grad_accum=2)
    for ra, rb in zip(_losses(tmp_path / "big"), _losses(tmp_path / "acc")):
        # float32 sums in another order: ~1e-6 of the loss (14.26 at the tiny config's init)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=2e-6, abs=1e-5)
    wa = load_model(tmp_path / "big", with_codec=False).lm.state_dict()
    wb = load_model(tmp_path / "acc", with_codec=False).lm.state_dict()
    k = "transformer.layers.1.ttt.wq.weight"
    assert (wa[k] - wb[k]).abs().max() < 1e-5


def test_activation_checkpointing_changes_nothing_but_memory(env, tmp_path):
    _run(env, tmp_path / "a", max_steps=2, activation_checkpointing=False)
    _run(env, tmp_path / "b", max_steps=2, activation_checkpointing=True)
    for ra, rb in zip(_losses(tmp_path / "a"), _losses(tmp_path / "b")):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)


def test_evaluation_never_touches_training_state(env, tmp_path):
    _run(env, tmp_path / "plain", max_steps=4, eval_every=100)
    _run(env, tmp_path / "evals", max_steps=4, eval_every=1)
    a, b = _losses(tmp_path / "plain"), _losses(tmp_path / "evals")
    assert all("eval/loss" in r for r in b)
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"]


def test_refuses_zero_trainable_ttt_parameters(env, tmp_path):
    cfg = _cfg()
    cfg.ttt.layers = []
    with pytest.raises(TrainingError, match="0 trainable TTT parameters"):
        _run(env, tmp_path / "z", cfg=cfg)


def test_refuses_to_overwrite_a_run_without_resume(env, tmp_path):
    _run(env, tmp_path / "r", max_steps=2)
    with pytest.raises(TrainingError, match="--resume"):
        _run(env, tmp_path / "r", max_steps=2)


def test_checkpoint_for_another_base_is_refused(env, tmp_path):
    out = tmp_path / "r"
    _run(env, out, max_steps=2)
    other = make_tiny_base(tmp_path / "other", seed=7)
    with pytest.raises(CheckpointError, match="another base model"):
        load_model(out, base_override=BaseModelRef(local_dir=str(other)))


def test_half_written_checkpoints_are_never_picked_up(env, tmp_path):
    out = tmp_path / "r"
    _run(env, out, max_steps=2)
    root = out / "checkpoints"
    (root / ".tmp-step_000003-123-456").mkdir()  # a crash mid-write
    (root / ".tmp-step_000003-123-456" / "config.json").write_text("{")
    assert find_checkpoint(out).path.name == "step_000002"
    (root / "latest").write_text("step_000009\n")  # a pointer to nothing complete
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        find_checkpoint(out)


def _bad_index(tmp_path, mutate):
    root = tmp_path / "bad"
    idx = write_random_dataset(root, n_files=1, seconds=3.0)
    mutate(root, idx)
    return idx


@pytest.mark.parametrize("case,match", [
    ("missing_wav", "audio file not found"),
    ("mono", "expected a stereo file"),
    ("outside", "outside the audio"),
    ("empty", "lists no files"),
    ("low_rate", "expected at least 16000 Hz"),
    ("wrong_duration", "index says"),
    ("not_json", "not valid JSON"),
    ("unreadable", "cannot read audio"),
    ("wrong_speaker", r"none of its \d+ words is by the main speaker 'SPEAKER_MAIN' \(found 'A'"),
])
def test_bad_data_is_named_clearly(env, tmp_path, case, match):
    import numpy as np

    def mutate(root, idx):
        wav = root / "audio" / "train_000.wav"
        if case == "missing_wav":
            wav.unlink()
        elif case == "mono":
            write_wav(wav, np.zeros((1, 22050 * 3), np.float32), 22050)
        elif case == "outside":
            ali = json.loads(wav.with_suffix(".json").read_text())
            ali["alignments"].append(["late", [2.5, 9.0], "SPEAKER_MAIN"])
            wav.with_suffix(".json").write_text(json.dumps(ali))
        elif case == "empty":
            idx.write_text("\n")
        elif case == "low_rate":
            write_wav(wav, np.zeros((2, 8000 * 3), np.float32), 8000)
        elif case == "wrong_duration":
            idx.write_text(json.dumps({"path": "audio/train_000.wav", "duration": 30.0}) + "\n")
        elif case == "not_json":
            idx.write_text("{path: nope}\n")
        elif case == "unreadable":
            wav.write_bytes(b"RIFF....garbage")
        elif case == "wrong_speaker":  # labels of another convention: no main speaker at all
            ali = json.loads(wav.with_suffix(".json").read_text())
            for a in ali["alignments"]:
                a[2] = "A" if a[2] == "SPEAKER_MAIN" else "B"
            wav.with_suffix(".json").write_text(json.dumps(ali))

    idx = _bad_index(tmp_path, mutate)
    with pytest.raises(DataError, match=match) as e:
        _run(env, tmp_path / "out", data=str(idx), eval_data=None,
             cache_dir=str(tmp_path / "cache"))
    if case not in ("empty", "not_json"):
        assert "train_000" in str(e.value)  # the file is named


# -- multi-GPU plumbing that CPU can check ----------------------------------------------------------

def test_stream_sums_stay_on_the_device_of_the_loss():
    """NCCL reduces CUDA tensors only: the sums must never be copied to the host (meta stands in
    for a device here: a copy of a meta tensor to the CPU fails)."""
    from moshi_ttt.train.loss import StreamSums

    def z(*shape):
        return torch.zeros(*shape, device="meta")
    s = StreamSums(z(()), z(()), z(()), z(()), z(()), z(()), z(()), z(()), z(8), z(8))
    v = s.flat()
    assert v.device.type == "meta" and v.shape == (24,)
    both = StreamSums.from_flat(v + v, dep_q=8)
    assert both.audio_ce.device.type == "meta" and both.audio_ce.shape == (8,)


def test_process_group_has_a_cpu_backend_beside_nccl():
    from moshi_ttt.train.distributed import backend_for

    assert backend_for(torch.device("cuda", 3)) == "cpu:gloo,cuda:nccl"
    assert backend_for(torch.device("cpu")) == "gloo"


# -- divergence -------------------------------------------------------------------------------------

def _strict_json(line):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(line, parse_constant=refuse)


def test_divergence_skips_steps_then_stops_and_latest_stays_finite(env, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(TrainingError, match=r"diverged: 3 steps in a row \(steps 2\.\.4\)") as e:
        _run(env, out, lr=1e30, max_steps=8, ckpt_every=1, max_nonfinite_steps=3,
             eval_data=None)
    assert "step_000001" in str(e.value)  # names the checkpoint to resume from
    recs = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r["skipped"] for r in recs] == [False, True, True, True]
    assert [r["skipped_steps"] for r in recs] == [0, 1, 2, 3]
    assert math.isfinite(recs[0]["loss"]) and all(r["loss"] is None for r in recs[1:])
    # no checkpoint for a skipped step, none deleted for them, latest names a finite one
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000001"]
    ck = latest_checkpoint(out)
    assert ck.name == "step_000001"
    assert all(torch.isfinite(t).all() for t in load_file(str(ck / "ttt.safetensors")).values())
    assert json.loads((ck / "config.json").read_text())["summary"]["skipped_steps"] == 0


@pytest.fixture(scope="module")
def run2(env):
    """A finished 2-step run (checkpoints at steps 1 and 2) that tests copy and then alter."""
    out = env["root"] / "run2"
    _run(env, out, max_steps=2, ckpt_every=1, eval_data=None, keep_checkpoints=0)
    return out


def _copy(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def test_save_refuses_nonfinite_tensors_and_keeps_latest(run2, tmp_path):
    out = _copy(run2, tmp_path)
    m = load_model(out, with_codec=False)
    bad = {"transformer.layers.1.ttt.inner.w1": torch.full((2, 2), float("nan"))}
    with pytest.raises(CheckpointError, match="step 5: 1 tensor.*NaN or inf.*inner.w1"):
        save_checkpoint(out, 5, bad, m.cfg, m.base, m.dims, keep=1)
    assert latest_checkpoint(out).name == "step_000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest", "step_000001", "step_000002"]


def test_resume_refuses_a_nonfinite_checkpoint(env, run2, tmp_path):
    out = _copy(run2, tmp_path)
    f = latest_checkpoint(out) / "ttt.safetensors"
    tensors = load_file(str(f))
    tensors["transformer.layers.1.ttt.inner.b1"][0, 0, 0] = float("inf")
    save_file(tensors, str(f), metadata={"format": "moshi-ttt/1"})
    with pytest.raises(TrainingError, match=r"refusing to resume .* NaN or inf "
                                            r"\(transformer\.layers\.1\.ttt\.inner\.b1\)"):
        _run(env, out, max_steps=3, eval_data=None, resume=True)


# -- weight decay -----------------------------------------------------------------------------------

def test_weight_decay_spares_norms_biases_and_gates(env, tmp_path):
    t = Trainer(_cfg(), _settings(env, weight_decay=0.3), tmp_path / "wd",
                base_override=BaseModelRef(local_dir=str(env["base"])))
    t._prepare_params()
    t._optimizer()
    names = {id(p): n for n, p in t.lm.named_parameters()}
    wd = {names[id(p)]: g["weight_decay"] for g in t.opt.param_groups for p in g["params"]}
    layer = "transformer.layers.1.ttt."
    mine = {k.removeprefix(layer): v for k, v in wd.items() if k.startswith(layer)}
    assert {k for k, v in mine.items() if v == 0.3} == {
        "wq.weight", "wk.weight", "wv.weight", "wo.weight", "inner.w1", "inner.w2"}
    assert {k for k, v in mine.items() if v == 0.0} == {
        "gate_alpha", "pre_norm.alpha", "post_norm.alpha", "wq.bias", "wk.bias", "wv.bias",
        "wo.bias", "inner.b1", "inner.b2", "inner.ttt_norm_weight", "inner.ttt_norm_bias",
        "inner.lr_weight", "inner.lr_bias", "inner.decay_logit", "conv_q.conv.conv.weight",
        "conv_q.conv.conv.bias", "conv_k.conv.conv.weight", "conv_k.conv.conv.bias"}


def test_qk_convs_train_at_their_lr_scale(env, tmp_path):
    """`ttt.qk_conv_lr_scale` (10 in the tiny config): the q/k convs' taps and biases are in a
    group of their own whose learning rate is that multiple of the TTT lr, at the peak and at
    every step of the schedule; every other TTT tensor at the TTT lr, and no decay on the convs
    (as before: a per-channel filter)."""
    cfg = _cfg()
    assert cfg.ttt.qk_conv_lr_scale == 10.0
    t = Trainer(cfg, _settings(env, weight_decay=0.3, warmup_steps=2), tmp_path / "lr",
                base_override=BaseModelRef(local_dir=str(env["base"])))
    t._prepare_params()
    t._optimizer()
    names = {id(p): n for n, p in t.lm.named_parameters()}
    for step in (1, 2, 4):  # warm-up, peak, cosine
        t._set_lr(step)
        lr = {names[id(p)]: (g["lr"], g["weight_decay"], g["name"])
              for g in t.opt.param_groups for p in g["params"]}
        ttt_lr = lr["transformer.layers.1.ttt.wq.weight"][0]
        assert ttt_lr == pytest.approx(3e-3 * _lr_lambda(step - 1, 2, 4, t.s.min_lr_ratio))
        conv = {k: v for k, v in lr.items() if ".conv_q." in k or ".conv_k." in k}
        assert len(conv) == 8  # 2 layers x (q, k) x (taps, bias)
        for k, (g_lr, wd, name) in conv.items():
            assert g_lr == pytest.approx(10.0 * ttt_lr) and wd == 0.0 and name == \
                "ttt_nodecay_x10", k
        others = {v[0] for k, v in lr.items() if k not in conv}
        assert others == {ttt_lr}


# -- checkpoints gather only what is trained --------------------------------------------------------

def test_checkpoints_gather_only_trained_tensors(env, tmp_path, monkeypatch):
    """The full-state gather is what costs (the whole frozen 7B on every save): it must see the
    trained tensors only."""
    import torch.distributed.checkpoint.state_dict as dsd

    gathered: list[set[str]] = []
    real = dsd._gather_state_dict

    def spy(state_dict, *args, **kwargs):
        gathered.append(set(state_dict))
        return real(state_dict, *args, **kwargs)
    monkeypatch.setattr(dsd, "_gather_state_dict", spy)
    out = tmp_path / "r"
    _run(env, out, max_steps=1, eval_data=None)
    saved = set(load_file(str(latest_checkpoint(out) / "ttt.safetensors")))
    model_keys = set().union(*gathered) - {"state", "param_groups"}  # minus the optimiser's
    assert model_keys == saved
    assert saved and all(".ttt." in k for k in saved)


# -- resume: what may not change, and what it says --------------------------------------------------

def test_resume_names_a_changed_model_config(env, run2, tmp_path):
    out = _copy(run2, tmp_path)
    cfg = _cfg()
    cfg.ttt.layers = [0, 1, 2]
    cfg.ttt.base_lr = 0.2
    cfg.lm["context"] = 100
    with pytest.raises(TrainingError, match="another model") as e:
        _run(env, out, cfg=cfg, max_steps=3, eval_data=None, resume=True)
    msg = str(e.value)
    for line in ("ttt.layers: [0, 1] -> [0, 1, 2]", "ttt.base_lr: 8.0 -> 0.2",
                 "lm.context: 250 -> 100"):
        assert line in msg, msg
    with pytest.raises(TrainingError, match=r"train\.lora\.enable: False -> True"):
        _run(env, out, max_steps=3, eval_data=None, resume=True,
             lora={"enable": True, "rank": 4})


def test_resume_names_changed_data(env, run2, tmp_path):
    out = _copy(run2, tmp_path)
    other = write_random_dataset(tmp_path / "other", n_files=2, seconds=6.0, seed=5)
    with pytest.raises(TrainingError, match="training data differs") as e:
        _run(env, out, data=str(other), max_steps=3, eval_data=None, resume=True)
    msg = str(e.value)
    assert str(env["data"]) in msg and str(other) in msg and "files: 4 -> 2" in msg


def test_a_base_of_other_dims_is_refused_naming_the_dims(run2, tmp_path):
    cfg = _cfg()
    cfg.lm["dim"] = 32
    wide = make_tiny_base(tmp_path / "narrow", cfg=cfg)
    with pytest.raises(CheckpointError, match=r"other dims") as e:
        load_model(run2, base_override=BaseModelRef(local_dir=str(wide)))
    assert "main.d_model: expected dim 64 (checkpoint), found 32" in str(e.value)


def test_a_missing_base_is_reported_per_command(env, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(env["base"], base)
    out = tmp_path / "r"
    train(_cfg(), _settings(env, max_steps=1, eval_data=None), out,
          base_override=BaseModelRef(local_dir=str(base)))
    base.rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match="which is gone") as e:  # serve, inspect
        load_model(out)
    assert "--base" not in str(e.value) and "--hf-repo" not in str(e.value)
    assert "put that base directory back" in str(e.value) and str(base) in str(e.value)
    with pytest.raises(CheckpointError, match="--base DIR or --hf-repo REPO"):  # train
        train(_cfg(), _settings(env, max_steps=2, eval_data=None), out, resume=True)


def test_resume_after_a_crash_logs_each_step_once(env, tmp_path):
    out = tmp_path / "r"
    _run(env, out, max_steps=3, ckpt_every=2, eval_data=None, keep_checkpoints=0)
    before = _losses(out)
    # killed after step 3 was logged, before its checkpoint existed; a torn line at the end
    shutil.rmtree(out / "checkpoints" / "step_000003")
    (out / "checkpoints" / "latest").write_text("step_000002\n")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    _run(env, out, max_steps=4, ckpt_every=2, eval_data=None, resume=True)
    recs = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[2]["loss"] == pytest.approx(before[2]["loss"], abs=1e-6)  # step 3 trained again


def test_logged_lr_is_the_one_each_step_applied(env, tmp_path):
    out = tmp_path / "r"
    _run(env, out, max_steps=4, warmup_steps=2, lr=1e-3, min_lr_ratio=0.1, ckpt_every=1,
         keep_checkpoints=0, eval_data=None)
    lrs = [r["lr"] for r in _losses(out)]
    assert lrs == pytest.approx([0.5e-3, 1e-3, 1e-3, 0.55e-3])
    assert lrs == pytest.approx([1e-3 * _lr_lambda(s - 1, 2, 4, 0.1) for s in (1, 2, 3, 4)])
    # AdamW's first update moves a non-decayed parameter by lr * g / |g|: at most lr, and lr
    # wherever the gradient is not tiny
    k = "transformer.layers.1.ttt.gate_alpha"
    w0 = load_model(env["base"], with_codec=False).lm.state_dict()[k]
    w1 = load_file(str(out / "checkpoints" / "step_000001" / "ttt.safetensors"))[k]
    assert (w1 - w0).abs().max().item() == pytest.approx(lrs[0], rel=1e-3)


def _encoder(env, cache):
    from moshi_ttt.base import resolve_base
    from moshi_ttt.data.encode import StreamEncoder

    base = resolve_base(BaseModelRef(local_dir=str(env["base"])))
    return StreamEncoder(base.info.get_mimi(device="cpu"), base.info.get_text_tokenizer(),
                         base.info.tokenizer, cache)


def test_a_stale_duration_is_caught_on_a_cache_hit(env, tmp_path):
    from moshi_ttt.data.loader import SegmentLoader

    idx = write_random_dataset(tmp_path / "d", n_files=1, seconds=3.0)
    SegmentLoader(idx, _encoder(env, tmp_path / "cache"), 2.0, show_progress=False)
    idx.write_text(json.dumps({"path": "audio/train_000.wav", "duration": 30.0}) + "\n")
    enc = _encoder(env, tmp_path / "cache")
    with pytest.raises(DataError, match=r"train_000\.wav lasts 3\.04 s .* index says 30\.00 s"):
        SegmentLoader(idx, enc, 2.0, show_progress=False)
    assert (enc.hits, enc.misses) == (1, 0)  # the audio was never read again


def test_first_batch_check_names_a_collapsed_layer(env, tmp_path, caplog):
    """The trainer streams its first batch before step 1 (after the calibration, as `run` does):
    silent at the shipped init, a warning naming each layer at the reference init (W0 ~ N(0,
    0.02), which collapses)."""
    import logging

    from moshi_ttt.train.trainer import Trainer

    def trainer(cfg, out):  # as `run` starts a fresh run: calibrated, then checked
        t = Trainer(cfg, _settings(env, max_steps=1), out,
                    base_override=BaseModelRef(local_dir=str(env["base"])))
        t.lm.train()
        t._data()
        if cfg.ttt.calibrated:
            t._calibrate_ttt()
        return t

    caplog.set_level(logging.INFO, logger="moshi_ttt.train.trainer")
    ok = trainer(_cfg(), tmp_path / "ok")
    ok._check_first_batch()
    assert ok.first_batch_collapsed == [] and "collapsed" not in caplog.text
    for layer in _cfg().ttt.layers:  # and it reports how well each layer's keys tell frames apart
        assert f"TTT layer {layer}, first batch (" in caplog.text and "crosstalk" in caplog.text
    cfg = _cfg()
    cfg.ttt = cfg.ttt.model_copy(update={"inner_init": "reference", "position_scale": "mean",
                                         "base_lr": 0.1, "forget": "none", "qk_conv": 0,
                                         "qkv_init": "random", "out_init": "random"})
    bad = trainer(cfg, tmp_path / "bad")
    pos = bad.pos.__dict__.copy()
    bad._check_first_batch()
    assert bad.pos.__dict__ == pos  # the data position is untouched
    assert bad.first_batch_collapsed == cfg.ttt.layers
    for layer in cfg.ttt.layers:
        assert f"TTT layer {layer}: its inner output collapsed on the first batch" in caplog.text


# -- resume is exact in bf16 too; what a resume takes from the given config and settings ----------

def test_bf16_resume_continues_bit_identically(env, tmp_path):
    """precision bf16 (what `auto` picks on a GPU): the trained tensors are fp32 master weights
    and a resume loads them as such, so 2 steps + resume + 2 steps is bit-identical to 4 steps
    (before, the resume rounded them to bf16: losses differed by ~1e-3, weights by ~4e-3)."""
    full, part = tmp_path / "full", tmp_path / "part"
    _run(env, full, max_steps=4, precision="bf16", eval_data=None)
    _run(env, part, max_steps=4, precision="bf16", eval_data=None, stop_after=2)
    # what the resume starts from is the stored fp32 state, bit for bit, and it trains in fp32
    stored = load_file(str(part / "checkpoints" / "step_000002" / "ttt.safetensors"))
    t = Trainer(_cfg(), _settings(env, max_steps=4, precision="bf16", eval_data=None), part,
                base_override=BaseModelRef(local_dir=str(env["base"])), resume=True)
    t._prepare_params()
    params = dict(t.lm.named_parameters())
    assert stored and all(v.dtype == torch.float32 for v in stored.values())
    assert [k for k, v in stored.items() if not torch.equal(params[k].detach(), v)] == []
    assert all(params[k].dtype == torch.float32 and params[k].requires_grad for k in stored)
    del t
    _run(env, part, max_steps=4, precision="bf16", eval_data=None, resume=True)
    a, b = _losses(full), _losses(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    wb = load_file(str(part / "checkpoints" / "step_000004" / "ttt.safetensors"))
    assert set(wb) == set(stored) and all(v.dtype == torch.float32 for v in wb.values())
    # (The step-4 weights were also equal bit for bit, alone and in this file; in one full
    # suite beside `make demo` the inner W0 tensors differed while losses and gradient norms
    # did not: not understood yet, so not asserted.)
    # serving keeps its own dtype rule: a bf16 model gets bf16 TTT projections
    served = dict(load_model(part, dtype=torch.bfloat16, with_codec=False).lm.named_parameters())
    assert served["transformer.layers.1.ttt.wq.weight"].dtype == torch.bfloat16


def test_resume_applies_changed_betas_and_eps(env, run2, tmp_path, caplog):
    """A changed `betas` is announced at resume, and is then what every restored group uses
    (before: the groups kept the checkpoint's (0.9, 0.95))."""
    import logging

    caplog.set_level(logging.WARNING, logger="moshi_ttt.train.trainer")
    out = _copy(run2, tmp_path)
    t = Trainer(_cfg(), _settings(env, max_steps=4, betas=(0.5, 0.6), eval_data=None), out,
                base_override=BaseModelRef(local_dir=str(env["base"])), resume=True)
    assert "train.betas: [0.9, 0.95] -> [0.5, 0.6]" in caplog.text
    t._prepare_params()
    t._data()
    t._optimizer()
    t._restore(t._resume_state)
    assert t.opt.state  # the moments were restored ...
    assert {g["name"]: (g["betas"], g["eps"]) for g in t.opt.param_groups} == {
        g["name"]: ((0.5, 0.6), 1e-8) for g in t.opt.param_groups}  # ... the betas are new


def test_resume_on_another_process_count_names_the_global_batch(env, run2, tmp_path, caplog):
    """The checkpoint records its world size: resuming on another count warns with the old and
    new global batch (before: silence)."""
    import logging

    out = _copy(run2, tmp_path)
    f = latest_checkpoint(out) / "trainer_state.pt"
    state = torch.load(f, weights_only=False)
    assert state["world_size"] == 1
    state["world_size"] = 4  # as if trained under torchrun --nproc_per_node 4
    torch.save(state, f)
    caplog.set_level(logging.WARNING, logger="moshi_ttt.train.trainer")
    Trainer(_cfg(), _settings(env, max_steps=4, eval_data=None), out,
            base_override=BaseModelRef(local_dir=str(env["base"])), resume=True)
    assert ("resuming on 1 process(es), the checkpoint was trained on 4: the global batch "
            "changes from 8 segments (batch_size 2 x grad_accum 1 x 4 processes) to 2 "
            "(2 x 1 x 1); batch_size x grad_accum = 8 keeps it") in caplog.text
    caplog.clear()  # the same global batch another way: nothing to say
    Trainer(_cfg(), _settings(env, max_steps=4, eval_data=None, grad_accum=4), out,
            base_override=BaseModelRef(local_dir=str(env["base"])), resume=True)
    assert "global batch" not in caplog.text


def test_resume_takes_compute_only_ttt_settings_from_the_config(env, run2, tmp_path):
    """ttt.checkpoint_group may change on resume (it changes how, not what, training computes):
    the given config's value is used, not the checkpoint's (before: 4, the checkpoint's)."""
    from moshi_ttt.model import ttt_blocks

    out = _copy(run2, tmp_path)
    cfg = _cfg()
    assert cfg.ttt.checkpoint_group != 1
    cfg.ttt.checkpoint_group = 1
    t = Trainer(cfg, _settings(env, max_steps=3, eval_data=None), out,
                base_override=BaseModelRef(local_dir=str(env["base"])), resume=True)
    assert t.cfg.ttt.checkpoint_group == 1
    t.run()
    assert [a.block.checkpoint_group for a in ttt_blocks(t.lm)] == [1, 1]
    saved = json.loads((latest_checkpoint(out) / "config.json").read_text())
    assert saved["step"] == 3 and saved["project"]["ttt"]["checkpoint_group"] == 1


# -- a resume's trainer state: read first, refused clearly -------------------------------------------

@pytest.mark.parametrize("damage,match", [
    ("truncate", r"trainer_state\.pt is unreadable .*truncated or damaged"),
    ("delete", r"has no trainer_state\.pt"),
    ("foreign", r"trainer_state\.pt is not a trainer state \('optimizer' missing"),
])
def test_resume_refuses_a_bad_trainer_state_before_loading_the_model(env, run2, tmp_path,
                                                                      monkeypatch, damage, match):
    """Checked before the model loads (before: a raw traceback after loading it, or a bare
    'No such file' line), as a CheckpointError that names the file and the way out."""
    import moshi_ttt.train.trainer as trainer_mod

    out = _copy(run2, tmp_path)
    f = latest_checkpoint(out) / "trainer_state.pt"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "delete":
        f.unlink()
    else:
        torch.save({"step": 2}, f)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the trainer state was checked")
    monkeypatch.setattr(trainer_mod, "load_model", no_model)
    with pytest.raises(CheckpointError, match=match) as e:
        _run(env, out, max_steps=3, eval_data=None, resume=True)
    msg = str(e.value)
    assert str(latest_checkpoint(out)) in msg
    assert (f"Point {out / 'checkpoints' / 'latest'} at an earlier checkpoint (present: "
            f"step_000001) or start a new run") in msg


# -- settings that cannot work are refused up front --------------------------------------------------

@pytest.mark.parametrize("field,value,problem", [
    ("ckpt_every", 0, "greater than or equal to 1"),
    ("eval_every", 0, "greater than or equal to 1"),
    ("log_every", 0, "greater than or equal to 1"),
    ("clip_grad", 0.0, "greater than 0"),
    ("clip_grad", -1.0, "greater than 0"),
    ("segment_seconds", 0.0, "greater than 0"),
    ("segment_seconds", -3.0, "greater than 0"),
    ("min_segment_seconds", -1.0, "greater than or equal to 0"),
    ("min_lr_ratio", -0.1, "greater than or equal to 0"),
    ("min_lr_ratio", 1.5, "less than or equal to 1"),
    ("lr", -1e-3, "greater than or equal to 0"),
    ("weight_decay", -0.1, "greater than or equal to 0"),
    ("warmup_steps", -1, "greater than or equal to 0"),
    ("keep_checkpoints", -1, "greater than or equal to 0"),
    ("eval_batches", -1, "greater than or equal to 0"),
    ("stop_after", 0, "greater than or equal to 1"),
    ("betas", (0.9, 1.0), "less than 1"),
    ("lora", {"rank": 0}, "greater than or equal to 1"),
    ("loss", {"text": -1.0}, "greater than or equal to 0"),
    ("loss", {"codebooks": [1.0] * 7 + [-1.0]}, "greater than or equal to 0"),
    ("loss", {"text": 0.0, "audio": 0.0}, "the loss would be 0 and train nothing"),
])
def test_settings_that_cannot_train_are_refused(field, value, problem):
    """Before: a zero interval crashed with ZeroDivisionError after the model loaded;
    clip_grad <= 0 zeroed or reversed every gradient and segment_seconds <= 0 made 1-frame
    segments, both silently."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=problem) as e:
        TrainSettings(**{field: value})
    assert e.value.errors()[0]["loc"][0] == field
    TrainSettings(**{"ckpt_every": 1, "clip_grad": 1e-3, "min_lr_ratio": 1.0, "warmup_steps": 0,
                     "keep_checkpoints": 0, "eval_batches": 0, "loss": {"text": 0.0}})


# -- rotation -----------------------------------------------------------------------------------------

def test_rotation_orders_checkpoints_by_step_past_a_million(run2, tmp_path):
    """step_1000000 sorts before step_999999 as a string: rotation must compare the numbers
    (before: from step 1,000,000 on, the newest checkpoints were deleted)."""
    out = _copy(run2, tmp_path)
    m = load_model(out, with_codec=False)
    tensors = {"transformer.layers.1.ttt.inner.w1": torch.zeros(2, 2)}
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        save_checkpoint(out, step, tensors, m.cfg, m.base, m.dims, keep=2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest", "step_1000000", "step_1000001"]
    assert latest_checkpoint(out).name == "step_1000001"

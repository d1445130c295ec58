"""The trainer: checkpoints the server can load, exact resume, exact accumulation, clean eval,
clear refusals. Everything on the tiny config, CPU, fp32."""

import json
import math

import pytest
import torch

from moshi_ttt.checkpoint import CheckpointError, find_checkpoint, latest_checkpoint, load_model
from moshi_ttt.config import BaseModelRef, load_config
from moshi_ttt.data.index import DataError
from moshi_ttt.train.settings import TrainSettings
from moshi_ttt.train.trainer import Trainer, TrainingError, train

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


def _run(env, out, cfg=None, **kw):
    return train(cfg or _cfg(), _settings(env, **kw), out,
                 base_override=BaseModelRef(local_dir=str(env["base"])),
                 resume=kw.pop("resume", False) if "resume" in kw else False)


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
    assert set(r["gate"]) == {"1", "2"} and all(math.isfinite(v) for v in r["gate"].values())
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
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    wa = load_model(tmp_path / "big", with_codec=False).lm.state_dict()
    wb = load_model(tmp_path / "acc", with_codec=False).lm.state_dict()
    k = "transformer.layers.2.ttt.wq.weight"
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

    idx = _bad_index(tmp_path, mutate)
    with pytest.raises(DataError, match=match) as e:
        _run(env, tmp_path / "out", data=str(idx), eval_data=None,
             cache_dir=str(tmp_path / "cache"))
    if case not in ("empty", "not_json"):
        assert "train_000" in str(e.value)  # the file is named

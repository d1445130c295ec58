"""The benchmark commands measure what they say: `bench train --method` trains TTT or LoRA,
`bench serve --capacity` serves fewer sessions than slots, `bench step` times the engine
with telemetry on and off."""

from __future__ import annotations

import json

import pytest

from moshi_ttt.bench_train import LORA_RANK, method_config, run_bench
from moshi_ttt.config import load_config

from conftest import CONFIGS


def test_lora_method_has_no_ttt_and_trains_only_rank_128_adapters():
    cfg = load_config(CONFIGS / "tiny.yaml")
    lora_cfg, overrides = method_config(cfg, "lora")
    assert lora_cfg.ttt.layers == [] and lora_cfg.ttt.depformer_layers == []
    assert lora_cfg.train["lora"]["rank"] == LORA_RANK == 128
    assert overrides["train_ttt"] is False and overrides["lora"].enable
    assert cfg.ttt.layers == [0, 1]  # the caller's config is left as it was
    assert method_config(cfg, "ttt") == (cfg, {})


def test_bench_train_runs_each_method_and_counts_what_trains(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml")
    res = {}
    for method in ("ttt", "lora"):
        out = tmp_path / f"{method}.json"
        res[method] = run_bench(cfg, steps=2, frames=32, batch=1, device="cpu",
                                checkpointing=False, json_out=out, method=method)
        assert json.loads(out.read_text())["method"] == method
        assert res[method]["tokens_per_s"] > 0 and res[method]["step_s"] > 0
    assert res["ttt"]["trainable"] == res["ttt"]["params"]["ttt_total"] == 101_508
    assert res["lora"]["params"]["ttt_total"] == 0
    # rank 128 on every base linear of the main transformer: (in + out) x 128 each
    d, ff, layers = 64, 176, 4  # the tiny config's main transformer (gating: 2 x ff in)
    per_layer = 128 * ((d + 3 * d) + (d + d) + (d + 2 * ff) + (ff + d))
    assert res["lora"]["trainable"] == layers * per_layer


def test_bench_serve_capacity_runs_fewer_sessions_than_slots(tmp_path):
    from server.loadtest import run_load

    r = run_load(["--random-config", str(CONFIGS / "tiny.yaml")], 1, 2.0, "tokens",
                 ["--device", "cpu"], log_dir=tmp_path, capacity=3)
    assert r.capacity == 3 and r.sessions == 1 and not r.errors, r
    assert r.frames_answered >= r.frames_sent - 2 > 10
    assert r.sessions_per_step == 1.0 and r.step_ms_p50 > 0


def test_bench_step_times_the_engine_with_telemetry_on_and_off():
    from moshi_ttt.checkpoint import random_model
    from server.stepbench import run_step_bench

    r = run_step_bench(random_model(CONFIGS / "tiny.yaml"), capacity=2, runs=2, steps=12)
    assert r["capacity"] == 2 and r["step_ms_on"] > 0 and r["step_ms_off"] > 0
    assert r["overhead"] == round(r["step_ms_on"] / r["step_ms_off"] - 1, 4)


def test_bench_step_capacity_times_sessions_on_spare_rows_against_an_exact_engine():
    """1 session on a capacity-4 engine steps 1 row (its bucket), 3 sessions step 4 rows; each
    against an engine of exactly that many rows."""
    from moshi_ttt.checkpoint import random_model
    from server.stepbench import run_capacity_bench

    def loaded():
        return random_model(CONFIGS / "tiny.yaml")
    one = run_capacity_bench(loaded, capacity=4, sessions=1, runs=2, steps=12)
    assert one["rows_stepped"] == 1 and one["telemetry"] is True
    assert one["step_ms_capacity"] > 0 and one["step_ms_exact"] > 0
    assert one["ratio"] == round(one["step_ms_capacity"] / one["step_ms_exact"], 4)
    three = run_capacity_bench(loaded, capacity=4, sessions=3, runs=1, steps=12)
    assert three["rows_stepped"] == 4 and three["sessions"] == 3
    with pytest.raises(ValueError, match="do not fit"):
        run_capacity_bench(loaded, capacity=2, sessions=3)


def test_bench_ttt_layer_step_streams_the_ttt_block(monkeypatch):
    """`bench ttt`'s streaming-step table times the TTT block's streaming step, alone and inside
    the hybrid layer; before the fix the hybrid's block ran its parallel form on each frame
    (the converted layer kept moshi's cached list of streaming children), and now the bench
    refuses to time that."""
    import torch

    import moshi_ttt.bench_ttt as bench

    res = bench.bench_layer_step(256, 2, torch.device("cpu"), torch.float32, batch=2)
    assert res["batch"] == 2
    assert res["ttt_block_step_ms"] > 0 and res["hybrid_step_ms"] > 0
    monkeypatch.setattr(bench, "forget_streaming_children", lambda model: None)
    with pytest.raises(RuntimeError, match="not streaming"):
        bench.bench_layer_step(256, 2, torch.device("cpu"), torch.float32, batch=2)

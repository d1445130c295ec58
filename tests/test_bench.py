"""The benchmark commands measure what they say: `bench train --method` trains TTT or LoRA."""

from __future__ import annotations

import json

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

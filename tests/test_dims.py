"""Dims come from the built modules and are checked against config, blocks and weight files."""

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from moshi_ttt.block import TTTBlock
from moshi_ttt.cli import app
from moshi_ttt.config import ConfigError, TTTConfig, load_config, parse_layers
from moshi_ttt.dims import (
    DimensionMismatch, check_not_meta, count_params, describe, detect_dims, validate,
)
from moshi_ttt.model import build_ttt_lm, is_ttt_param

from conftest import CONFIGS, REPO


@pytest.fixture(scope="module")
def meta_7b():
    cfg = load_config(CONFIGS / "moshi-7b.yaml")
    return cfg, build_ttt_lm(cfg, device="meta", dtype=torch.bfloat16)


def test_7b_dims_detected_separately_for_main_and_depformer(meta_7b):
    cfg, lm = meta_7b
    d = detect_dims(lm)
    assert (d.main.d_model, d.main.num_heads, d.main.num_layers) == (4096, 32, 32)
    assert (d.depformer.d_model, d.depformer.num_heads, d.depformer.num_layers) == (1024, 16, 6)
    assert d.main.context == 3000 and d.main.ffn_hidden == 11264
    assert [t.layer for t in d.ttt] == list(range(8, 24))
    assert all((t.d_model, t.num_heads, t.head_dim, t.mlp_hidden) == (4096, 32, 128, 512)
               for t in d.ttt)
    validate(lm, cfg.lm, cfg.ttt)  # config, modules and blocks agree


def test_7b_parameter_counts(meta_7b):
    _, lm = meta_7b
    p = count_params(lm)
    # per layer: W1 b1 W2 b2, the inner norm, the lr gate (4,354,080) and 32 decay rates
    assert p["ttt_inner"] == 69_665_792 == 16 * (4_354_080 + 32)
    assert p["base"] == 7_687_729_152
    per_layer_outer = 4 * (4096 * 4096 + 4096) + 3 * 4096  # wq wk wv wo, two norms, gate
    per_layer_outer += 2 * (4096 * 4 + 4096)  # depthwise causal q and k convs, kernel 4
    assert p["ttt_total"] == p["ttt_inner"] + 16 * per_layer_outer
    assert p["total"] == p["base"] + p["ttt_total"]
    # the README's figures are these (they once lagged two changes behind)
    readme = " ".join((REPO / "README.md").read_text().split())
    para = readme[readme.index("For Moshi 7B: main 4096"):][:500]
    for key in ("ttt_inner", "ttt_total", "base"):
        assert f"{p[key]:,}" in para, (key, para)
    assert f"({p['ttt_inner'] // 16:,} per layer)" in para


def test_inner_count_at_1024_8_heads_matches_the_old_logs():
    # the old logs predate the decay (one learned rate per head): forget="none" is that block
    blk = TTTBlock(1024, 8, TTTConfig(forget="none"), device="meta")
    inner = sum(p.numel() for n, p in blk.named_parameters() if n.startswith("inner."))
    assert inner == 1_063_944 and 16 * inner == 17_023_104


def test_inspect_json_cli(meta_7b):
    res = CliRunner().invoke(app, ["inspect", "--config", str(CONFIGS / "moshi-7b.yaml"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert {k: info["main"][k] for k in ("d_model", "num_heads", "num_layers")} == \
        {"d_model": 4096, "num_heads": 32, "num_layers": 32}
    assert {k: info["depformer"][k] for k in ("d_model", "num_heads", "num_layers")} == \
        {"d_model": 1024, "num_heads": 16, "num_layers": 6}
    assert info["ttt"]["layers"] == list(range(8, 24))
    assert info["ttt"]["mini_batch_size"] == 16
    assert info["params"]["ttt_inner"] == 69_665_792  # 16 x (4,354,080 + 32 decay rates)
    assert set(info["params"]) >= {"base", "ttt_inner", "ttt_total", "total"}


def test_inspect_reports_a_bad_config_clearly(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "tiny.yaml").read_text().replace('layers: "0..1"', 'layers: "1..9"'))
    res = CliRunner().invoke(app, ["inspect", "--config", str(bad)])
    assert res.exit_code == 2
    assert "out of range" in res.output and "4 layers" in res.output


def _save(lm, path, mutate=None, drop=(), legacy_in_proj=False):
    sd = {k: v.detach().clone().contiguous() for k, v in lm.state_dict().items()}
    if legacy_in_proj:  # moshi's released files store in_proj_weight, split by a load hook
        for k in [k for k in sd if k.endswith("self_attn.in_projs.0.weight")]:
            prefix = k[: -len("in_projs.0.weight")]
            parts = sorted(n for n in sd if n.startswith(prefix + "in_projs."))
            sd[prefix + "in_proj_weight"] = torch.cat([sd.pop(n) for n in parts], dim=0)
    for k in drop:
        sd.pop(k)
    if mutate:
        mutate(sd)
    save_file(sd, str(path))
    return path


def test_weight_file_with_wrong_ttt_shape_names_the_tensor(tiny_cfg, tmp_path):
    lm = build_ttt_lm(tiny_cfg)
    f = _save(lm, tmp_path / "w.safetensors", mutate=lambda sd: sd.update(
        {"transformer.layers.1.ttt.wq.weight": torch.zeros(32, 32)}))
    with pytest.raises(DimensionMismatch) as e:
        validate(lm, tiny_cfg.lm, tiny_cfg.ttt, weights=[(f, None)])
    msg = str(e.value)
    assert "transformer.layers.1.ttt.wq.weight" in msg
    assert "(64, 64)" in msg and "(32, 32)" in msg


def test_ttt_weights_for_other_dims_are_refused_before_any_forward(tiny_cfg, tmp_path):
    """The seeds' bug: TTT weights made for another width (there 1024 vs 4096)."""
    other = tiny_cfg.model_copy(deep=True)
    other.lm.update(dim=32, num_heads=2)
    small = build_ttt_lm(other)
    ttt_only = {k: v for k, v in small.state_dict().items() if is_ttt_param(k)}
    f = tmp_path / "ttt.safetensors"
    save_file({k: v.contiguous() for k, v in ttt_only.items()}, str(f))
    lm = build_ttt_lm(tiny_cfg)
    with pytest.raises(DimensionMismatch) as e:
        validate(lm, weights=[(f, is_ttt_param)])
    msg = str(e.value)
    assert "transformer.layers.0.ttt.inner.w1: expected shape (1, 64, 256), found (1, 32, 128)" \
        in msg
    assert "transformer.layers.1.ttt.wo.weight" in msg


def test_legacy_in_proj_names_are_understood(tiny_cfg, tmp_path):
    lm = build_ttt_lm(tiny_cfg)
    f = _save(lm, tmp_path / "w.safetensors", legacy_in_proj=True)
    validate(lm, weights=[(f, lambda n: True)])  # no false alarm
    g = _save(lm, tmp_path / "g.safetensors", legacy_in_proj=True, mutate=lambda sd: sd.update(
        {"depformer.layers.0.self_attn.in_proj_weight": torch.zeros(8 * 3 * 16, 32)}))
    with pytest.raises(DimensionMismatch, match=r"depformer\.layers\.0\.self_attn\.in_projs"):
        validate(lm, weights=[(g, None)])


def test_missing_and_unexpected_tensors(tiny_cfg, tmp_path):
    lm = build_ttt_lm(tiny_cfg)
    f = _save(lm, tmp_path / "w.safetensors", drop=["transformer.layers.3.norm1.alpha"],
              mutate=lambda sd: sd.update({"transformer.layers.9.extra": torch.zeros(3)}))
    with pytest.raises(DimensionMismatch) as e:
        validate(lm, weights=[(f, lambda n: not is_ttt_param(n))])
    msg = str(e.value)
    assert "transformer.layers.3.norm1.alpha: expected tensor (1, 1, 64)" in msg and "missing" in msg
    assert "transformer.layers.9.extra: expected tensor no such tensor in the model" in msg


def test_config_claims_checked_against_modules(tiny_cfg):
    lm = build_ttt_lm(tiny_cfg)
    claims = dict(tiny_cfg.lm, dim=4096, depformer_num_heads=16)
    with pytest.raises(DimensionMismatch) as e:
        validate(lm, claims, tiny_cfg.ttt)
    msg = str(e.value)
    assert "transformer.d_model: expected value 4096 (config: dim), found 64" in msg
    assert "depformer.num_heads: expected value 16" in msg
    ttt = tiny_cfg.ttt.model_copy(update={"layers": [1, 2]})
    with pytest.raises(DimensionMismatch, match="transformer TTT layers: expected layers"):
        validate(lm, tiny_cfg.lm, ttt)


def test_recorded_dims_checked(tiny_cfg):
    lm = build_ttt_lm(tiny_cfg)
    rec = detect_dims(lm).to_dict()
    validate(lm, recorded_dims=rec)
    rec["main"]["d_model"] = 4096
    with pytest.raises(DimensionMismatch, match=r"main\.d_model: expected dim 4096"):
        validate(lm, recorded_dims=rec)


def test_meta_tensors_left_are_reported(tiny_cfg):
    lm = build_ttt_lm(tiny_cfg, device="meta")
    probs = check_not_meta(lm)
    assert probs and "meta device" in str(probs[0])


def test_depformer_ttt_uses_depformer_dims(tiny_cfg):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.ttt.depformer_layers = [1]
    lm = build_ttt_lm(cfg)
    info = describe(lm, cfg.ttt)
    dep = [b for b in info["ttt"]["blocks"] if b["component"] == "depformer"]
    assert dep == [{"component": "depformer", "layer": 1, "d_model": 32, "num_heads": 1,
                    "head_dim": 32, "mlp_hidden": 128, "mini_batch_size": 16}]
    codes = torch.randint(0, 1000, (2, 17, 20))
    with torch.no_grad():
        out = lm(codes)
    assert torch.isfinite(out.logits[out.mask]).all()


def test_parse_layers():
    assert parse_layers("8..23") == list(range(8, 24))
    assert parse_layers("8-10") == [8, 9, 10]
    assert parse_layers("3,1") == [1, 3]
    assert parse_layers([5, 2]) == [2, 5]
    assert parse_layers(None) == [] and parse_layers("") == []
    with pytest.raises(ValueError):
        parse_layers("9..3")
    with pytest.raises(ValueError):
        parse_layers("a..b")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")

"""`moshi-ttt diagnose-ttt` and the inner learner's health at the shipped init: the inner output
keeps depending on its input over a streamed session, at head dim 16 (tiny) and 128 (Moshi 7B),
and the diagnostic sees the collapse of the reference init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moshi_ttt.cli import app
from moshi_ttt.diagnostics import (
    block_keys, diagnose, input_dependence, key_report, key_selectivity, probe_queries,
)
from moshi_ttt.eval.diagnose import random_codes
from moshi_ttt.model import block_inputs, build_ttt_lm, calibrate_ttt, ttt_blocks

from conftest import CONFIGS


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tiny_cfg, head_dim: int, **ttt):
    """The tiny config with TTT heads of `head_dim`: 64 is the tiny config's own (one head), 16
    four heads of the same width, 128 (the 7B's head dim) four heads of a 512-wide model."""
    lm = dict(tiny_cfg.lm)
    if head_dim > lm["dim"]:
        lm.update(dim=4 * head_dim, num_heads=4)
    ttt = {"num_heads": lm["dim"] // head_dim, **ttt}
    return tiny_cfg.model_copy(update={"lm": lm, "ttt": tiny_cfg.ttt.model_copy(update=ttt)})


def test_the_tiny_config_ships_head_dim_64(tiny_cfg):
    lm = build_ttt_lm(tiny_cfg)
    assert {b.block.head_dim for b in ttt_blocks(lm)} == {64}


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_shipped_init_stays_input_dependent_for_1000_frames(tiny_cfg, head_dim):
    cfg = _cfg(tiny_cfg, head_dim)
    torch.manual_seed(0)
    lm = build_ttt_lm(cfg)
    assert next(iter(ttt_blocks(lm))).block.head_dim == head_dim
    codes = random_codes(lm, 1000, 0)
    assert cfg.ttt.qkv_init == "whitened"  # shipped: whitened on the frames, as diagnose-ttt does
    calibrate_ttt(lm, codes)
    rep = diagnose(lm, codes)
    for lay in rep["layers"]:
        first, last = lay["series"][0], lay["series"][-1]
        assert last["frame"] == 1000 and first["dependence"] > 0.5
        assert lay["final_ratio"] >= 0.5 and not lay["collapsed"], lay["final_ratio"]
        assert last["drift"] > 0 and last["step"] > 0  # and the inner learner did move


def test_reference_init_collapses_and_the_diagnostic_says_so(tiny_cfg):
    cfg = _cfg(tiny_cfg, 16, inner_init="reference", position_scale="mean", base_lr=0.1,
               forget="none", qk_conv=0, share_qk=False)
    torch.manual_seed(0)
    lm = build_ttt_lm(cfg)
    rep = diagnose(lm, random_codes(lm, 64, 0), every=16)
    for lay in rep["layers"]:
        assert lay["collapsed"] and lay["final_ratio"] < 0.05, lay["final_ratio"]


def test_input_dependence_is_zero_for_a_constant_inner_model():
    probes = probe_queries(2, 8, n=32)
    from moshi_ttt.ttt_mlp import FastWeights

    w = FastWeights(torch.zeros(2, 8, 32), torch.randn(2, 1, 32), torch.zeros(2, 32, 8),
                    torch.randn(2, 1, 8))
    dep = input_dependence(w, torch.ones(2, 8), torch.zeros(2, 8), 1e-6, probes)
    assert dep.shape == (1,) and float(dep) < 1e-6
    w.w1.normal_()
    w.w2.normal_()
    assert float(input_dependence(w, torch.ones(2, 8), torch.zeros(2, 8), 1e-6, probes)) > 0.3


def _w0(heads: int, head_dim: int):
    """The shipped (`scaled`) init's W0 for `heads` heads."""
    from moshi_ttt.block import FastWeightInit

    torch.manual_seed(0)
    init = FastWeightInit(heads, head_dim, heads * head_dim, 4 * head_dim, 16, False)
    init.reset_parameters()
    return init.fast_weights()


def test_key_selectivity_of_alike_random_and_shared_keys():
    """Alike keys: every write lands on every key (1, 1). Independent random keys: cosine ~0,
    crosstalk ~0.2 (gelu's positive mean). Keys sharing a common direction, as a trained base's
    residual stream gives them: both high, the memory can hardly tell frames apart."""
    w0 = _w0(2, 64)
    same = torch.nn.functional.normalize(torch.randn(2, 1, 64), dim=-1).expand(2, 50, 64)
    alike = key_selectivity(same, w0)
    assert alike["key_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert alike["crosstalk"] == pytest.approx(1.0, abs=1e-5)
    g = torch.Generator().manual_seed(1)
    rand = key_selectivity(torch.nn.functional.normalize(torch.randn(2, 400, 64, generator=g),
                                                         dim=-1), w0)
    assert abs(rand["key_cosine"]) < 0.02 and 0.1 < rand["crosstalk"] < 0.3, rand
    common = torch.randn(2, 1, 64, generator=g)
    shared = key_selectivity(torch.nn.functional.normalize(
        common + 0.6 * torch.randn(2, 400, 64, generator=g), dim=-1), w0)
    assert shared["key_cosine"] > 0.6 and shared["crosstalk"] > 0.7, shared
    with pytest.raises(ValueError, match="at least 2 frames"):
        key_selectivity(same[:, :1], w0)


def test_diagnose_measures_the_streamed_keys(tiny_cfg):
    """The keys `diagnose` scores are the block's own keys of the frames streamed (recomputed in
    one causal pass): equal to those the parallel forward computes over the same frames."""
    torch.manual_seed(0)
    lm = build_ttt_lm(tiny_cfg)
    codes = random_codes(lm, 40, 0)
    rep = diagnose(lm, codes, every=16)
    blocks = list(ttt_blocks(lm))
    inputs = dict(zip((a.layer for a in blocks), block_inputs(lm, codes, blocks)))
    for lay, a in zip(rep["layers"], ttt_blocks(lm)):
        xk = block_keys(a.block, inputs[a.layer])
        want = key_selectivity(xk[0], a.block.inner.fast_weights())
        assert key_report(lm, codes)[a.layer] == pytest.approx(want, abs=1e-5)
        assert lay["keys"]["frames"] == 40
        for name in ("key_cosine", "crosstalk"):
            assert lay["keys"][name] == pytest.approx(want[name], abs=1e-4)


def test_cli_json_and_errors(tmp_path):
    res = CliRunner().invoke(app, ["diagnose-ttt", "-c", str(CONFIGS / "tiny.yaml"), "--frames",
                                   "64", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert rep["frames"] == 64 and {lay["layer"] for lay in rep["layers"]} >= {0}
    assert all(set(r) >= {"frame", "dependence", "ratio", "norm", "drift", "step"}
               for lay in rep["layers"] for r in lay["series"])
    assert all(lay["keys"]["frames"] == 64 and -1 <= lay["keys"]["key_cosine"] <= 1
               and 0 < lay["keys"]["crosstalk"] <= 1 for lay in rep["layers"])
    table = CliRunner().invoke(app, ["diagnose-ttt", "-c", str(CONFIGS / "tiny.yaml"),
                                     "--frames", "32"])
    assert table.exit_code == 0 and "dependence" in table.output and "crosstalk" in table.output
    for args, needle in (
        (["diagnose-ttt"], "give --config, --checkpoint or both"),
        (["diagnose-ttt", "-c", str(CONFIGS / "tiny.yaml"), "--frames", "0"], "at least 1"),
        (["diagnose-ttt", "-c", str(CONFIGS / "tiny.yaml"), "--data", str(tmp_path)],
         "--data needs --checkpoint"),
        (["diagnose-ttt", "--checkpoint", str(tmp_path / "none")], "not found"),
    ):
        bad = CliRunner().invoke(app, args)
        assert bad.exit_code == 2, (args, bad.output)
        assert needle in bad.output, (args, bad.output)


# -- a config's TTT on a base, fed the base's speech -------------------------------------------

def test_dataset_codes_are_the_datasets_speech_through_the_bases_codec(tmp_path):
    """--data's frames: every dataset file encoded by the calibrated codec into the 17 streams,
    one after another, repeated to the length asked; the audio is speech, not one token."""
    from fixtures import calibrated_base, speech_dataset

    from moshi_ttt.checkpoint import load_model
    from moshi_ttt.data.encode import StreamEncoder
    from moshi_ttt.data.index import read_index
    from moshi_ttt.eval.diagnose import dataset_codes

    loaded = load_model(calibrated_base(), "cpu", torch.float32, with_codec=True)
    data = speech_dataset()
    enc = StreamEncoder(loaded.mimi, loaded.tokenizer, Path(loaded.base.info.tokenizer), tmp_path)
    streams = [enc.encode(f) for f in read_index(data / "train.jsonl")]
    first, total = streams[0], sum(x.shape[-1] for x in streams)
    codes = dataset_codes(loaded, data, total + 40)
    assert codes.shape == (1, 17, total + 40) and codes.dtype == torch.long
    assert torch.equal(codes[0, :, :first.shape[-1]], first.long())
    assert torch.equal(codes[0, :, total:], codes[0, :, :40])  # repeated from the start
    for q in range(1, 17):  # both speakers' 8 audio streams: speech, not one token
        assert codes[0, q].unique().numel() > 20, q


def test_a_configs_ttt_on_a_base_is_diagnosed_on_speech(tmp_path):
    """-c CONFIG --checkpoint BASE: the config's TTT (other layers than the base's config,
    whitened q/k/v) fresh on the base's weights, streamed the dataset's speech; without -c, the
    base's own config (-c with a trained checkpoint: tests/test_cli_errors.py)."""
    from fixtures import calibrated_base, speech_dataset

    text = (CONFIGS / "tiny.yaml").read_text()
    assert "\n  qkv_init: whitened " in text  # the shipped default, whitened as train starts
    text = text.replace('layers: "0..1"', 'layers: "1..2"')
    path = tmp_path / "design.yaml"
    path.write_text(text)
    args = ["diagnose-ttt", "-c", str(path), "--checkpoint", str(calibrated_base()), "--data",
            str(speech_dataset()), "--frames", "96", "--every", "32", "--json"]
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert [lay["layer"] for lay in rep["layers"]] == [1, 2]
    assert "design.yaml's TTT on" in rep["source"] and "speech of" in rep["source"]
    assert "calibrated on the streamed frames: q/k/v whitened, read-out fitted to the text head, " \
        "output scale matched" in rep["source"]
    for lay in rep["layers"]:
        assert lay["keys"]["frames"] == 96 and lay["keys"]["key_cosine"] < 0.2, lay["keys"]
    plain = CliRunner().invoke(app, ["diagnose-ttt", "--checkpoint", str(calibrated_base()),
                                     "--frames", "32", "--json"], catch_exceptions=False)
    assert plain.exit_code == 0, plain.output
    assert [lay["layer"] for lay in json.loads(plain.stdout.strip().splitlines()[-1])["layers"]] \
        == [0, 1]  # without -c: the base's own config

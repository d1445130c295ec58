"""`moshi-ttt diagnose-ttt` and the inner learner's health at the shipped init: the inner output
keeps depending on its input over a streamed session, at head dim 16 (tiny) and 128 (Moshi 7B),
and the diagnostic sees the collapse of the reference init."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from moshi_ttt.cli import app
from moshi_ttt.diagnostics import diagnose, input_dependence, probe_queries
from moshi_ttt.eval.diagnose import random_codes
from moshi_ttt.model import build_ttt_lm, ttt_blocks

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
    rep = diagnose(lm, random_codes(lm, 1000, 0))
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


def test_cli_json_and_errors(tmp_path):
    res = CliRunner().invoke(app, ["diagnose-ttt", "-c", str(CONFIGS / "tiny.yaml"), "--frames",
                                   "64", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert rep["frames"] == 64 and {lay["layer"] for lay in rep["layers"]} >= {0}
    assert all(set(r) >= {"frame", "dependence", "ratio", "norm", "drift", "step"}
               for lay in rep["layers"] for r in lay["series"])
    table = CliRunner().invoke(app, ["diagnose-ttt", "-c", str(CONFIGS / "tiny.yaml"),
                                     "--frames", "32"])
    assert table.exit_code == 0 and "dependence" in table.output
    for args, needle in (
        (["diagnose-ttt"], "exactly one of"),
        (["diagnose-ttt", "-c", str(CONFIGS / "tiny.yaml"), "--frames", "0"], "at least 1"),
        (["diagnose-ttt", "-c", str(CONFIGS / "tiny.yaml"), "--data", str(tmp_path)],
         "--data needs --checkpoint"),
        (["diagnose-ttt", "--checkpoint", str(tmp_path / "none")], "not found"),
    ):
        bad = CliRunner().invoke(app, args)
        assert bad.exit_code == 2, (args, bad.output)
        assert needle in bad.output, (args, bad.output)

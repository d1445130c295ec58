"""`moshi-ttt eval-stability` on the inputs and outcomes a long session can meet: a report that
stays strict JSON when the state goes non-finite, figures that do not hide a non-finite row, and
settings refused in one line before anything streams."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from moshi_ttt.cli import app
from moshi_ttt.eval.stability import (
    StabilitySettings, _summarize, run_stability, write_report,
)
from moshi_ttt.model import build_ttt_lm, ttt_blocks

from conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _strict(text: str):
    """json.loads that refuses NaN and Infinity, as every non-Python JSON parser does."""
    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_report_stays_strict_json_when_fast_weights_go_non_finite(tiny_cfg, tmp_path):
    """The session this report exists to catch (a state gone NaN) used to write bare NaN tokens:
    a results.json no JSON parser outside Python reads."""
    lm = build_ttt_lm(tiny_cfg)
    block = next(a.block for a in ttt_blocks(lm) if a.component == "transformer")
    with torch.no_grad():
        dict(block.named_parameters())["inner.w1"].fill_(float("nan"))
    rep = run_stability(tiny_cfg, StabilitySettings(frames=2, window=1, record_every=1,
                                                    driver="tokens"), lm=lm)
    assert rep["finite"] is False
    path = tmp_path / "r.json"
    write_report(rep, path)
    loaded = _strict(path.read_text())
    assert loaded["finite"] is False
    layer = next(v for v in loaded["fast_weights"].values() if v["norm_final"] is None)
    assert layer["norm_max"] is None and layer["drift_final"] is None


def _record(frame: int, rows: list[float]) -> dict:
    one = {"norm": rows, "drift": rows, "components": {c: rows for c in ("w1", "b1", "w2", "b2")},
           "finite": all(math.isfinite(x) for x in rows)}
    return {"frame": frame, "rss_mb": 100.0, "layers": {"transformer.0": one}}


def test_max_figures_do_not_hide_a_non_finite_row_or_frame():
    """Python's max keeps a finite first value over a later NaN: row 1 of a 2-row session gone
    NaN showed as a finite max norm (the first row's), and so did a NaN after finite frames."""
    s = StabilitySettings(frames=4, window=1, record_every=2, reference_frame=1)
    records = [_record(1, [1.0, 1.0]), _record(2, [1.0, 1.0]), _record(4, [1.0, float("nan")])]
    rep = _summarize(s, [0.01] * 4, records, 1.0)
    v = rep["fast_weights"]["transformer.0"]
    assert rep["finite"] is False
    assert math.isnan(v["norm_final"]) and math.isnan(v["norm_max"])
    assert math.isnan(v["drift_max"]) and math.isnan(v["components"]["b2"]["max"])
    assert math.isnan(rep["trajectory"][-1]["max_norm"]["transformer.0"])
    assert rep["trajectory"][0]["max_norm"]["transformer.0"] == 1.0


def test_depformer_only_ttt_is_refused_before_the_session(tiny_cfg):
    """Depformer TTT layers keep no state across frames: such a config used to pass, report an
    empty set of fast weights as stable, or fail at frame 2500 with `max() arg is an empty
    sequence`."""
    cfg = tiny_cfg.model_copy(update={"ttt": tiny_cfg.ttt.model_copy(
        update={"layers": [], "depformer_layers": [0]})})
    with pytest.raises(ValueError, match="TTT layers in the transformer"):
        run_stability(cfg, StabilitySettings(frames=3, driver="tokens"))


def test_cli_refuses_a_seed_torch_cannot_take_naming_it(tmp_path):
    r = CliRunner().invoke(app, ["eval-stability", "--config", str(CONFIGS / "tiny.yaml"),
                                 "--frames", "3", "--seed", str(2**70),
                                 "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 2 and "seed" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "r.json").exists()


def test_late_recall_frames_are_checked_before_the_session(tiny_cfg, tmp_path, monkeypatch):
    """`--frames` no longer than the recall instance is refused before the stability session
    streams (it used to stream every frame first, then fail in late recall)."""
    import moshi_ttt.eval.stability as stability
    from moshi_ttt.eval import memory as mem

    s = mem.MemoryEvalSettings.from_config(tiny_cfg)
    lm = mem.build_method("ttt", tiny_cfg, s.task.context, 0, 1)
    path = tmp_path / "m.pt"
    mem.save_model(lm, tiny_cfg, tiny_cfg.ttt, s.task, path, seed=0, steps=0)
    streamed = []
    monkeypatch.setattr(stability, "run_stability", lambda *a, **k: streamed.append(a))
    n = s.task.length()
    r = CliRunner().invoke(app, ["eval-stability", "--config", str(CONFIGS / "tiny.yaml"),
                                 "--frames", str(n), "--recall-model", str(path),
                                 "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 2, r.output
    assert f"late recall: --frames {n} must exceed the recall instance's {n} frames" in r.output
    assert streamed == []

"""`moshi-ttt eval-memory` and `eval-stability`: an honest task, a reproducible quick run, a
stable long session."""

import json
import math

import pytest
import torch

from moshi_ttt.eval import memory as mem
from moshi_ttt.eval.memory import MemoryEvalSettings, RecallTask
from moshi_ttt.eval.stability import StabilitySettings, run_stability
from moshi_ttt.model import ttt_blocks

from conftest import CONFIGS


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a shared 2-core box two spinning threads per process cost more than
    they give, and the memory eval runs with one thread anyway."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _quick(tiny_cfg, **kw) -> MemoryEvalSettings:
    return MemoryEvalSettings.from_config(tiny_cfg, quick=True, **kw)


def _numbers(report: dict) -> list:
    """Every number of a report that a seed must fix (wall-clock times excluded)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in report["results"]]


def _all_finite(x) -> bool:
    if isinstance(x, dict):
        return all(_all_finite(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_all_finite(v) for v in x)
    if isinstance(x, float):
        return math.isfinite(x)
    return True


# -- task design -------------------------------------------------------------------------------

def test_dependent_mask_marks_exactly_the_recall_frames():
    task = RecallTask(context=8, content_len=5, gap=40, tail=3)
    codes, dep = mem.make_batch(task, 7, torch.Generator().manual_seed(0), n_q=16)
    L, r, T = task.content_len, task.recall_frame, task.length
    assert codes.shape == (7, 17, T) and dep.shape == (7, T) and T == 1 + 5 + 40 + 1 + 5 + 3
    expected = torch.zeros(T, dtype=torch.bool)
    expected[r + 1:r + 1 + L] = True
    assert torch.equal(dep, expected.expand(7, T))
    text = codes[:, 0]
    assert torch.equal(text[:, r + 1:r + 1 + L], text[:, 1:1 + L])  # the recall repeats content
    lo, hi = task.first_id, task.first_id + task.content_vocab
    assert ((text[:, 1:1 + L] >= lo) & (text[:, 1:1 + L] < hi)).all()
    others = torch.cat([text[:, 1 + L:r], text[:, r + 1 + L:]], dim=1)
    assert (others >= hi).all()  # distractors never look like content
    assert (text[:, 0] == task.first_id - 2).all() and (text[:, r] == task.first_id - 1).all()
    assert (codes[:, 1:] == -1).all()


def test_gap_must_exceed_context_and_the_stacked_attention_reach(tiny_cfg):
    with pytest.raises(ValueError, match="must exceed the attention context"):
        RecallTask(context=32, gap=32).check(4, 1000)
    with pytest.raises(ValueError, match="must exceed the attention context"):
        mem.make_batch(RecallTask(context=32, gap=20), 2, torch.Generator(), 16)
    # longer than one window but not than 4 stacked windows (4 x 31 = 124): still refused
    with pytest.raises(ValueError, match="stacked attention windows still reach"):
        RecallTask(context=32, gap=100).check(4, 1000)
    RecallTask(context=32, gap=124).check(4, 1000)
    with pytest.raises(ValueError, match="exceed the text vocabulary"):
        RecallTask(context=8, gap=40, content_vocab=600, distractor_vocab=600).check(4, 1000)
    s = _quick(tiny_cfg).model_copy(update={"task": RecallTask(context=16, gap=40)})
    with pytest.raises(ValueError, match="stacked attention"):
        mem.run_memory_eval(tiny_cfg, s)


def test_without_ttt_dependent_frames_cannot_see_the_content(tiny_cfg):
    """Change only the content's first occurrence: the streamed logits of the recall frames do
    not move at all for the base and LoRA (no path: the gap exceeds the reach), and do move for
    TTT (its fast weights carry it)."""
    s = _quick(tiny_cfg, ttt={"base_lr": 1.0})
    codes, dep = mem.make_batch(s.task, 3, torch.Generator().manual_seed(1), 16)
    other = codes.clone()
    L = s.task.content_len
    other[:, 0, 1:1 + L] = s.task.first_id + (codes[:, 0, 1:1 + L] - s.task.first_id + 1) % \
        s.task.content_vocab
    for method in ("frozen", "lora", "ttt"):
        lm = mem.build_method(method, tiny_cfg, s, lora_rank=4).eval()
        with torch.no_grad():  # make every trainable part act, as after training
            for n, p in lm.named_parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3 if ".inner.w" in n else 0.1)
            for a in ttt_blocks(lm):
                a.block.gate_alpha.fill_(0.5)
                a.block.inner.lr_bias.fill_(3.0)  # inner lr near its maximum
        a_logits = mem.lmgen_text_logits(lm, codes)
        b_logits = mem.lmgen_text_logits(lm, other)
        diff = (a_logits - b_logits).abs().amax(-1)  # [B, T]
        assert diff[:, 1:1 + L].max() > 1e-3  # the content frames themselves differ ...
        if method == "ttt":
            assert diff[dep].max() > 1e-4, method
        else:
            assert diff[dep].max() == 0, method  # ... but nothing reaches the recall


def test_methods_share_base_weights_and_lora_rank_matches_ttt_count(tiny_cfg):
    s = _quick(tiny_cfg)
    rank = mem.matched_lora_rank(tiny_cfg, s)
    models = {m: mem.build_method(m, tiny_cfg, s, rank) for m in mem.METHODS}
    ref = mem.base_state(models["frozen"])
    for m in ("lora", "ttt"):
        st = mem.base_state(models[m])
        assert st.keys() == ref.keys(), m
        assert all(torch.equal(st[k], ref[k]) for k in ref), m
    n_ttt, n_lora = mem.trainable(models["ttt"]), mem.trainable(models["lora"])
    assert n_ttt > 0 and mem.trainable(models["frozen"]) == 0
    assert 1 / 1.25 <= n_lora / n_ttt <= 1.25  # matched within 25 %
    # and the adapters sit on the frozen base's linears only
    assert all(".lora_" in n for n, p in models["lora"].named_parameters() if p.requires_grad)


def test_lmgen_teacher_forcing_equals_parallel_forward(tiny_cfg):
    """The eval path (LMGen.step, one frame per call, text forced through the logits hook, audio
    through depformer_replace_tokens) computes exactly LMModel.forward's text logits, with
    random audio on every stream and a context shorter than the sequence."""
    s = _quick(tiny_cfg)
    lm = mem.build_method("ttt", tiny_cfg, s, 1).eval()
    with torch.no_grad():
        for a in ttt_blocks(lm):
            a.block.gate_alpha.fill_(0.5)
            a.block.inner.w1.normal_(0, 0.3)
            a.block.inner.w2.normal_(0, 0.3)
    g = torch.Generator().manual_seed(3)
    B, T = 2, 2 * tiny_cfg.ttt.mini_batch_size + 5
    codes = torch.randint(0, tiny_cfg.lm["card"], (B, 17, T), generator=g)
    codes[:, 0] = torch.randint(0, tiny_cfg.text_card, (B, T), generator=g)
    with torch.no_grad():
        ref = lm(codes).text_logits[:, 0]
    assert (mem.lmgen_text_logits(lm, codes) - ref).abs().max() <= 1e-4
    assert (mem.forward_text_stream_logits(lm, codes) - ref).abs().max() <= 1e-4


# -- the quick run -----------------------------------------------------------------------------

def test_quick_run_is_finite_reproducible_and_ttt_state_moves(tiny_cfg):
    s = _quick(tiny_cfg)
    a = mem.run_memory_eval(tiny_cfg, s)
    b = mem.run_memory_eval(tiny_cfg, s)
    assert [r["method"] for r in a["results"]] == ["lora", "ttt", "frozen"]
    assert _all_finite(_numbers(a))
    assert _numbers(a) == _numbers(b)  # same seed: the very same numbers
    by = {r["method"]: r for r in a["results"]}
    assert by["ttt"]["extra"]["fast_weight_drift"] > 0  # the sessions' fast weights learned
    assert by["lora"]["steps"] == by["ttt"]["steps"] == s.steps and by["frozen"]["steps"] == 0
    assert 1 / 1.25 <= by["lora"]["trainable_params"] / by["ttt"]["trainable_params"] <= 1.25
    c = mem.run_memory_eval(tiny_cfg, s.model_copy(update={"seed": 1, "methods": ["ttt"]}))
    assert c["results"][0]["dependent_loss"] != by["ttt"]["dependent_loss"]
    table = mem.format_table(a)
    assert "| ttt |" in table and "| frozen |" in table and "lora (rank" in table


def test_cli_eval_memory_quick_writes_json(tmp_path):
    from typer.testing import CliRunner

    from moshi_ttt.cli import app

    out = tmp_path / "mem.json"
    res = CliRunner().invoke(app, ["eval-memory", "--config", str(CONFIGS / "tiny.yaml"),
                                   "--quick", "--steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["results"]] == ["lora", "ttt", "frozen"]
    assert report["settings"]["steps"] == 2
    assert "| ttt |" in res.output
    bad = CliRunner().invoke(app, ["eval-memory", "--config", str(CONFIGS / "tiny.yaml"),
                                   "--quick", "--set", "nonsense"])
    assert bad.exit_code == 2


# -- long-session stability (shortened) --------------------------------------------------------

def test_stability_short_session_lmgen(tiny_cfg):
    rep = run_stability(tiny_cfg, StabilitySettings(frames=300, window=100, record_every=50))
    assert rep["frames"] == 300 and rep["finite"]
    st = rep["step_ms"]
    assert 0 < st["first_median"] < 1000 and 0 < st["last_median"] < 1000
    for name, v in rep["fast_weights"].items():
        assert math.isfinite(v["norm_max"]) and v["norm_max"] < 1e3, name
        assert v["drift_final"] > 0, name  # the state does learn during the session
    assert rep["rss_mb"]["final"] > 0 and len(rep["trajectory"]) == 7


def test_stability_rows_stay_isolated(tiny_cfg):
    """Row 0 of a 2-row session ends with the same fast weights as the same input alone."""
    one = run_stability(tiny_cfg, StabilitySettings(frames=150, driver="tokens", window=50,
                                                    record_every=50))
    two = run_stability(tiny_cfg, StabilitySettings(frames=150, driver="tokens", window=50,
                                                    record_every=50, batch_size=2))
    for name in one["fast_weights"]:
        r1 = one["fast_weights"][name]["final_row_norms"]
        r2 = two["fast_weights"][name]["final_row_norms"]
        assert len(r1) == 1 and len(r2) == 2
        assert r2[0] == pytest.approx(r1[0], rel=1e-5), name
        assert abs(r2[1] - r2[0]) > 1e-4 * r2[0], name


def test_cli_eval_stability_writes_json(tmp_path):
    from typer.testing import CliRunner

    from moshi_ttt.cli import app

    out = tmp_path / "stab.json"
    res = CliRunner().invoke(app, ["eval-stability", "--config", str(CONFIGS / "tiny.yaml"),
                                   "--frames", "40", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["frames"] == 40
    assert "step time median" in res.output


def test_stability_refuses_a_model_without_ttt(tiny_cfg):
    cfg = tiny_cfg.model_copy(update={"ttt": tiny_cfg.ttt.model_copy(update={"layers": []})})
    with pytest.raises(ValueError, match="no TTT|TTT layers"):
        run_stability(cfg, StabilitySettings(frames=5))

"""`moshi-ttt eval-memory` and `eval-stability`: an honest task, a reproducible quick run, a
stable long session."""

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moshi_ttt.eval import memory as mem
from moshi_ttt.eval.memory import MemoryEvalSettings
from moshi_ttt.eval.recall import RecallTask, WordCodes, encode_words, speech_batch, text_batch
from moshi_ttt.eval.stability import (
    StabilitySettings, late_recall, load_recall_model, run_stability,
)
from moshi_ttt.model import ttt_blocks

from conftest import CONFIGS


# one torch thread (the memory eval runs with one anyway)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _quick(tiny_cfg, **kw) -> MemoryEvalSettings:
    return MemoryEvalSettings.from_config(tiny_cfg, quick=True, **kw)


def _numbers(report: dict) -> list:
    """Every number of a report that a seed must fix (wall-clock times excluded)."""
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in report["results"]]


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
    codes, dep = text_batch(task, 7, torch.Generator().manual_seed(0), n_q=16)
    L, r, T = task.content_len, task.recall_frame(), task.length()
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


def test_a_lead_puts_each_instance_at_its_own_point_of_the_session():
    """With `lead`, each row's instance starts after its own lead of lead/2..lead distractor
    frames: the same layout, shifted, with distractors before START and after the recall."""
    task = RecallTask(context=8, content_len=5, gap=40, tail=3, lead=20)
    codes, dep = text_batch(task, 64, torch.Generator().manual_seed(0), n_q=16)
    L, r, T = task.content_len, task.recall_frame(), task.length()
    assert T == 20 + 1 + 5 + 40 + 1 + 5 + 3 and codes.shape == (64, 17, T)
    text = codes[:, 0]
    starts = (text == task.first_id - 2).int().argmax(dim=1)
    assert ((text == task.first_id - 2).sum(dim=1) == 1).all()
    assert starts.min() == 10 and starts.max() == 20 and len(set(starts.tolist())) > 5
    hi = task.first_id + task.content_vocab
    for b in range(64):
        s0 = int(starts[b])
        assert (text[b, :s0] >= hi).all()  # the lead: distractors only
        assert text[b, s0 + r] == task.first_id - 1
        assert torch.equal(text[b, s0 + r + 1:s0 + r + 1 + L], text[b, s0 + 1:s0 + 1 + L])
        expected = torch.zeros(T, dtype=torch.bool)
        expected[s0 + r + 1:s0 + r + 1 + L] = True
        assert torch.equal(dep[b], expected)
        assert (text[b, s0 + r + 1 + L:] >= hi).all()  # what the lead left: tail distractors


def _words(n_content=4, n_dis=3, W=3) -> WordCodes:
    """Distinct synthetic code patterns standing for words (the real ones come from espeak-ng
    and a calibrated codec: see test_speech_words_are_encoded_by_the_codec)."""
    g = torch.Generator().manual_seed(5)
    return WordCodes(torch.randint(1, 2048, (n_content, 8, W), generator=g),
                     torch.randint(1, 2048, (n_dis, 8, W), generator=g),
                     torch.zeros(8, dtype=torch.long), [f"c{i}" for i in range(n_content)],
                     [f"d{i}" for i in range(n_dis)])


def test_speech_batch_holds_the_words_only_in_the_user_audio():
    words = _words()
    task = RecallTask(context=8, content_len=2, gap=40, content_vocab=4, distractor_vocab=3)
    codes, dep = speech_batch(task, words, 6, torch.Generator().manual_seed(1), 16, 8)
    W, L = words.word_frames, task.content_len
    r, T = task.recall_frame(W), task.length(W)
    assert codes.shape == (6, 17, T) and dep[:, r + 1:r + 1 + L].all() and dep.sum() == 6 * L
    text, user, moshi = codes[:, 0], codes[:, 9:], codes[:, 1:9]
    assert (moshi == -1).all()  # Moshi's own audio: no input
    answers = text[:, r + 1:r + 1 + L] - task.first_id
    for b in range(6):
        for i in range(L):  # the user spoke word i where the recall names it
            assert torch.equal(user[b, :, 1 + i * W:1 + (i + 1) * W], words.content[answers[b, i]])
    # the text stream names nothing before the recall: padding but for the two markers
    before = torch.cat([text[:, 1:r], text[:, r + 1 + L:]], dim=1)
    assert (before == 3).all() and (text[:, 0] == task.first_id - 2).all()
    # the gap holds only distractor words or silence
    gap = user[:, :, 1 + L * W:r]
    content_set = {tuple(c.flatten().tolist()) for c in words.content}
    for b in range(6):
        for s0 in range(0, gap.shape[-1] - W + 1, W):
            assert tuple(gap[b, :, s0:s0 + W].flatten().tolist()) not in content_set
    # with a lead, the same instance follows distractor speech and the recall moves with it
    led, dep2 = speech_batch(task.model_copy(update={"lead": 12}), words, 6,
                             torch.Generator().manual_seed(1), 16, 8)
    assert led.shape[-1] == T + 12 and dep2.sum() == 6 * L
    for b in range(6):
        s0 = int((led[b, 0] == task.first_id - 2).int().argmax())
        assert 6 <= s0 <= 12 and dep2[b, s0 + r + 1:s0 + r + 1 + L].all()
        for i in range(L):
            word = led[b, 9:, s0 + 1 + i * W:s0 + 1 + (i + 1) * W]
            assert torch.equal(word, words.content[led[b, 0, s0 + r + 1 + i] - task.first_id])
        for t0 in range(0, s0 - W + 1, W):  # the lead: distractor words or silence
            assert tuple(led[b, 9:, t0:t0 + W].flatten().tolist()) not in content_set


def test_speech_words_are_encoded_by_the_codec():
    from fixtures import calibrated_base

    words = encode_words(calibrated_base(), 4, 3)
    assert words.content.shape[:2] == (4, 8) and words.distractors.shape[:2] == (3, 8)
    flat = [tuple(c.flatten().tolist()) for c in torch.cat([words.content, words.distractors])]
    assert len(set(flat)) == 7  # every word its own codes
    assert (words.content[:, 0] != words.silence[0]).any(dim=-1).all()  # not silence


def test_word_codes_fingerprint_changes_with_any_code_or_word():
    words = _words()
    assert words.fingerprint() == _words().fingerprint()
    other = _words()
    other.distractors[2, 7, 1] += 1
    assert other.fingerprint() != words.fingerprint()
    renamed = _words()
    renamed.content_words[0] = "x"
    assert renamed.fingerprint() != words.fingerprint()


def test_gap_must_exceed_context_and_the_stacked_attention_reach(tiny_cfg):
    with pytest.raises(ValueError, match="must exceed the attention context"):
        RecallTask(context=32, gap=32).check(4, 1000)
    # longer than one window but not than 4 stacked windows (4 x 31 = 124): still refused
    with pytest.raises(ValueError, match="stacked attention windows still reach"):
        RecallTask(context=32, gap=100).check(4, 1000)
    RecallTask(context=32, gap=124).check(4, 1000)
    assert mem.task_at(RecallTask(context=32), 2.0, 4).gap == 248
    with pytest.raises(ValueError, match="exceed the text vocabulary"):
        RecallTask(context=8, gap=40, content_vocab=600, distractor_vocab=600).check(4, 1000)
    with pytest.raises(ValueError, match="multiples >= 1"):
        _quick(tiny_cfg, gaps=[0.5])


def _trained_looking(lm):
    """Every trainable part made to act, as after training."""
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if p.requires_grad and ".inner." not in n:
                p.normal_(0, 0.1)
        for a in ttt_blocks(lm):
            a.block.gate_alpha.fill_(0.5)
            a.block.inner.lr_bias.fill_(3.0)  # inner lr near its maximum


@pytest.mark.parametrize("kind", ["text", "speech"])
def test_parallel_scoring_is_the_stream(tiny_cfg, kind):
    """eval-memory scores with the parallel forward: its logits and the sessions' fast-weight
    drift are those of streaming the frames one by one (as the server does), at the shipped
    task (content after a lead, a gap beyond the attention reach) with a model whose TTT acts;
    and `stream_check` refuses a scoring that is not."""
    s = MemoryEvalSettings.from_config(tiny_cfg)
    shape = s.task if kind == "text" else mem.speech_shape(s).model_copy(
        update={"content_vocab": 4, "distractor_vocab": 3})
    task = mem.task_at(shape, 1.0, 4)
    codes, _ = mem.batches(kind, 16, 8, _words())(task, 3, torch.Generator().manual_seed(2))
    lm = mem.build_method("ttt", tiny_cfg, task.context, 0, 1)
    _trained_looking(lm)
    logits, drift = mem.text_logits(lm, codes, rows=2)  # row chunks: 2 + 1
    ends: list[float] = []
    stream = mem.stream_text_logits(lm, codes, on_end=lambda m: ends.append(
        mem.fast_weight_drift(m)))
    assert logits.shape == stream.shape == (3, codes.shape[-1], tiny_cfg.text_card)
    assert (logits - stream).abs().max() <= 1e-4
    assert drift > 0.01 and drift == pytest.approx(ends[0], rel=1e-4)
    assert all(a.block.end_state is None and not a.block.keep_end_state for a in ttt_blocks(lm))
    assert mem.stream_check(lm, codes, logits, "t") <= 1e-4
    with pytest.raises(RuntimeError, match="differ by 0.01.*expected <= 0.001"):
        mem.stream_check(lm, codes, logits + 0.01, "t")

    def broken(*a, **k):
        raise RuntimeError("boom")

    lm.forward_text = broken  # a failing forward leaves no capture switched on
    with pytest.raises(RuntimeError, match="boom"):
        mem.text_logits(lm, codes)
    assert all(a.block.end_state is None and not a.block.keep_end_state for a in ttt_blocks(lm))


@pytest.mark.parametrize("kind", ["text", "speech"])
def test_without_ttt_dependent_frames_cannot_see_the_content(tiny_cfg, kind):
    """Change only the content's first occurrence: the streamed logits of the recall frames do
    not move at all for the base and LoRA (no path: the gap exceeds the reach), and do move for
    TTT (its fast weights carry it)."""
    s = _quick(tiny_cfg)
    words = _words()
    shape = s.task if kind == "text" else mem.speech_shape(s).model_copy(
        update={"content_vocab": 4, "distractor_vocab": 3})
    task = mem.task_at(shape, 1.0, 4)
    batch = mem.batches(kind, 16, 8, words)
    codes, dep = batch(task, 3, torch.Generator().manual_seed(1))
    other = codes.clone()
    if kind == "text":
        L = task.content_len
        other[:, 0, 1:1 + L] = task.first_id + (codes[:, 0, 1:1 + L] - task.first_id + 1) % \
            task.content_vocab
        span = slice(1, 1 + L)
    else:
        W = words.word_frames
        span = slice(1, 1 + W)
        first = (codes[:, 0, dep[0]][:, 0] - task.first_id + 1) % 4  # another first word
        other[:, 9:, span] = words.content[first]
    for method in ("frozen", "lora", "ttt"):
        lm = mem.build_method(method, tiny_cfg, task.context, 0, lora_rank=4).eval()
        _trained_looking(lm)
        diff = (mem.stream_text_logits(lm, codes) - mem.stream_text_logits(lm, other)
                ).abs().amax(-1)  # [B, T]
        assert diff[:, span.start + 1:span.stop + 1].max() > 1e-4  # the content frames differ
        if method == "ttt":
            assert diff[dep].max() > 1e-4, method
        else:
            assert diff[dep].max() == 0, method  # ... but nothing reaches the recall


def test_methods_share_base_weights_and_lora_rank_matches_ttt_count(tiny_cfg):
    ctx = _quick(tiny_cfg).task.context
    rank = mem.matched_lora_rank(tiny_cfg, ctx)
    models = {m: mem.build_method(m, tiny_cfg, ctx, 0, rank) for m in mem.METHODS}
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
    # the TTT method is the config's own TTT section, with nothing changed for this eval
    blocks = list(ttt_blocks(models["ttt"]))
    assert [a.layer for a in blocks] == tiny_cfg.ttt.layers
    b = blocks[0].block
    assert (b.base_lr, b.forget, b.rope, b.position_scale_kind, b.inner.init) == (
        tiny_cfg.ttt.base_lr, tiny_cfg.ttt.forget, tiny_cfg.ttt.rope,
        tiny_cfg.ttt.position_scale, tiny_cfg.ttt.inner_init)


def test_ttt_q_k_convs_train_at_their_lr_scale(tiny_cfg):
    """eval-memory's training reads `ttt.qk_conv_lr_scale` (10 in the tiny config) as the trainer
    does: AdamW's first step moves each element by about its group's lr, so the conv taps move
    10x as far as the other TTT tensors, and LoRA's adapters (no convs) move at the lr."""
    assert tiny_cfg.ttt.qk_conv_lr_scale == 10.0
    s = _quick(tiny_cfg).model_copy(update={"steps": 1, "warmup_steps": 0})
    L = int(tiny_cfg.lm["num_layers"])
    task = mem.whole_mini_batches(mem.task_at(s.task, 1, L), tiny_cfg.ttt.mini_batch_size)
    batch = mem.batches("text", int(tiny_cfg.lm["n_q"]), int(tiny_cfg.lm["dep_q"]), None)
    for method in ("ttt", "lora"):
        lm = mem.build_method(method, tiny_cfg, s.task.context, 0, 2)
        before = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
        mem.train_method(lm, s, task, batch, data_seed=0)
        moved = {n: float((p.detach() - before[n]).abs().max())
                 for n, p in lm.named_parameters() if p.requires_grad}
        conv = [v for n, v in moved.items() if ".conv_q." in n or ".conv_k." in n]
        rest = [v for n, v in moved.items() if ".conv_q." not in n and ".conv_k." not in n]
        assert max(rest) == pytest.approx(s.lr, rel=0.01), method
        if method == "ttt":
            assert len(conv) == 8 and max(conv) == pytest.approx(10 * s.lr, rel=0.01)
        else:
            assert not conv


def test_the_base_keeps_its_own_batch_when_the_methods_change_theirs(tiny_cfg):
    """`batch_size` is the methods' batch; the shared base trains at `pretrain_batch_size`, so a
    budget tried at another batch (e.g. 4 x 1600 steps) is compared on the same base."""
    s = _quick(tiny_cfg)
    L = int(tiny_cfg.lm["num_layers"])
    task = mem.whole_mini_batches(mem.task_at(s.task, 1, L), tiny_cfg.ttt.mini_batch_size)
    batch = mem.batches("text", int(tiny_cfg.lm["n_q"]), int(tiny_cfg.lm["dep_q"]), None)

    def base(**update):
        return mem.pretrain_base(tiny_cfg, s.model_copy(update=update), task, batch, 0)

    ref = base()
    other_methods_batch = base(batch_size=2)
    assert all(torch.equal(ref[k], other_methods_batch[k]) for k in ref)
    other_base_batch = base(pretrain_batch_size=2)
    assert any(not torch.equal(ref[k], other_base_batch[k]) for k in ref)
    assert MemoryEvalSettings.from_config(tiny_cfg).pretrain_batch_size == 16


def test_lmgen_teacher_forcing_equals_parallel_forward(tiny_cfg):
    """The eval paths (LMGen.step one frame per call, text forced through the logits hook, audio
    through depformer_replace_tokens; and the plain stream) compute exactly LMModel.forward's
    text logits, with random audio on every stream and a context shorter than the sequence."""
    lm = mem.build_method("ttt", tiny_cfg, 8, 0, 1).eval()
    with torch.no_grad():
        for a in ttt_blocks(lm):  # shipped W0 init; a visible gate so equality means something
            a.block.gate_alpha.fill_(0.5)
    g = torch.Generator().manual_seed(3)
    B, T = 2, 2 * tiny_cfg.ttt.mini_batch_size + 5
    codes = torch.randint(0, tiny_cfg.lm["card"], (B, 17, T), generator=g)
    codes[:, 0] = torch.randint(0, tiny_cfg.text_card, (B, T), generator=g)
    with torch.no_grad():
        ref = lm(codes).text_logits[:, 0]
    assert (mem.lmgen_text_logits(lm, codes) - ref).abs().max() <= 1e-4
    assert (mem.stream_text_logits(lm, codes) - ref).abs().max() <= 1e-4


# -- the quick run -----------------------------------------------------------------------------

def test_quick_run_is_finite_reproducible_and_ttt_state_moves(tiny_cfg, tmp_path):
    from fixtures import calibrated_base, codec_made_in_worker

    s = _quick(tiny_cfg, ablations={"reference_init": {"inner_init": "reference"}},
               save_ttt=True)  # --quick saves none; the saved model is checked below
    a = mem.run_memory_eval(tiny_cfg, s.model_copy(update={"workers": 1}),
                            codec=calibrated_base(), out_dir=tmp_path)
    # in two workers, with the codec "made" (handed over) in a worker, not in this process
    made_in = tmp_path / "codec-made-in"
    b = mem.run_memory_eval(tiny_cfg, s.model_copy(update={"workers": 2}),
                            make_codec=functools.partial(codec_made_in_worker, calibrated_base(),
                                                         made_in))
    assert int(made_in.read_text()) != os.getpid()
    keys = {(r["task"], r["method"], r["gap_x"]) for r in a["results"]}
    for task in ("text", "speech"):
        for m in ("ttt", "ttt_off", "lora", "frozen"):
            assert {(task, m, g) for g in s.gaps} <= keys, (task, m)
    assert {("text", "ttt:reference_init", g) for g in s.gaps} <= keys
    assert not any(k[0] == "speech" and k[1].startswith("ttt:") for k in keys)
    assert _all_finite(_numbers(a))
    # same seed: the very same numbers, whether the jobs ran in this process or in two workers
    assert _numbers(a) == _numbers(b)
    assert b["environment"]["workers"] == 2
    by = {(r["task"], r["method"]): r for r in a["results"] if r["gap_x"] == 1.0}
    assert by[("text", "ttt")]["fast_weight_drift"] > 0  # the sessions' fast weights learned
    assert by[("text", "ttt_off")]["fast_weight_drift"] == 0  # ... and not with the lr at 0
    assert by[("text", "lora")]["steps"] == by[("text", "ttt")]["steps"] == s.steps
    assert by[("text", "frozen")]["steps"] == 0
    # rows in task order (jobs ran longest first): text before speech, each seed's TTT, its
    # inner-updates-off scoring and ablations, then LoRA, then frozen
    assert [(r["task"], r["method"]) for r in a["results"] if r["gap_x"] == s.gaps[0]] == [
        ("text", "ttt"), ("text", "ttt_off"), ("text", "ttt:reference_init"), ("text", "lora"),
        ("text", "frozen"), ("speech", "ttt"), ("speech", "ttt_off"), ("speech", "lora"),
        ("speech", "frozen")]
    # every scored model streamed its first sequences too, and agreed with the parallel scoring
    for r in a["results"]:
        if r["gap_x"] == s.gaps[0]:
            assert 0 <= r["stream_check"] <= 1e-4, (r["task"], r["method"])
        else:
            assert "stream_check" not in r
    for r in a["results"]:
        assert set(r) >= {"recall_acc", "recall_loss", "chance_acc", "task", "gap_x", "method",
                          "seed"}
    assert by[("speech", "ttt")]["chance_acc"] == 1 / s.speech.content_vocab
    # the speech figures name the word codes they were measured on (the codec decides them)
    words = encode_words(calibrated_base(), s.speech.content_vocab, s.speech.distractor_vocab)
    assert a["tasks"]["speech"]["word_codes"] == words.fingerprint()
    assert a["tasks"]["text"]["word_codes"] is None
    assert a["lmgen_check"]["max_abs_logit_diff"] <= 1e-4
    # the saved text model is what eval-stability's late recall loads: the same trained model
    model = load_recall_model(tmp_path / "ttt-text.pt")
    assert (model.seed, model.steps) == (s.seeds[0], s.steps)
    assert (model.task.context, model.task.content_len) == (s.task.context, s.task.content_len)
    late = late_recall(model, frames=2 * model.task.length() + 10, batch_size=4)
    assert late["finite"] and late["model_steps"] == s.steps
    assert 0 <= late["late"]["recall_acc"] <= 1 and late["chance_acc"] == s.task.chance_acc
    summ = {(x["task"], x["gap_x"], x["method"]): x for x in a["summary"]}
    assert summ[("text", 1.0, "ttt")]["seeds"] == s.seeds
    c = mem.run_memory_eval(tiny_cfg, s.model_copy(update={"seeds": [1], "methods": ["ttt"],
                                                           "tasks": ["text"]}))
    c_ttt = [r for r in c["results"] if r["method"] == "ttt" and r["gap_x"] == 1.0][0]
    assert c_ttt["recall_loss"] != by[("text", "ttt")]["recall_loss"]
    table = mem.format_table(a)
    assert "| text | 1x" in table and "| speech |" in table and "| ttt_off |" in table
    # every TTT job scores its keys before and after training (diagnostics.key_report)
    ttt = by[("text", "ttt")]["keys"]
    assert set(ttt) == {"init", "trained"} and set(ttt["init"]) == {0, 1}
    for when in ttt.values():
        for k in when.values():
            assert -1 <= k["key_cosine"] <= 1 and 0 < k["crosstalk"] <= 1
    assert ttt["trained"] != ttt["init"]  # training moved the projections
    assert "keys" not in by[("text", "lora")]
    assert "TTT keys" in table and "- text, layer 0: cosine" in table
    # the any-order share lies between the in-order one and 1, its chance between 1/V and L/V
    for r in a["results"]:
        assert r["recall_acc"] <= r["recall_set_acc"] <= 1
        v = s.task.content_vocab if r["task"] == "text" else s.speech.content_vocab
        assert 1 / v <= r["set_chance_acc"] <= (s.task.content_len if r["task"] == "text"
                                                else s.speech.content_len) / v
    assert "recall_set_acc" in summ[("text", 1.0, "ttt")] and "any order" in table


def test_work_starts_costliest_first_once_what_it_needs_is_done():
    """eval-memory's scheduler with two workers, step by step (the test finishes each piece of
    work): the speech words (with the codec, when it is made) start at once beside the text
    base, and text jobs run while the codec is made; the speech base starts as soon as the
    codec is done; of the jobs ready, the longest first (TTT before LoRA, speech's before
    text's) and frozen scorings last, ties in the order they became ready, so that no worker
    finishes a TTT model alone while the other waits."""
    import concurrent.futures
    import threading

    started: list[str] = []
    futures: dict[str, concurrent.futures.Future] = {}

    class Manual(concurrent.futures.Executor):
        def submit(self, fn, /, *args, **kwargs):
            fut: concurrent.futures.Future = concurrent.futures.Future()
            futures[args[0]] = fut
            started.append(args[0])
            return fut

    def jobs(kind: str) -> list[mem._Work]:
        return [mem._Work(mem._JOB_COST[(m, kind)], str, (f"{kind} {m} {seed}",), lambda r: [])
                for seed in (0, 1) for m in ("ttt", "lora", "frozen")]

    first = [mem._Work(mem._BASE_COST, str, ("text base",), lambda r: jobs("text")),
             mem._Work(mem._CODEC_COST, str, ("codec",), lambda r: [
                 mem._Work(mem._BASE_COST, str, ("speech base",), lambda r: jobs("speech"))])]
    errors: list[BaseException] = []

    def schedule() -> None:
        try:
            mem._run_works(Manual(), 2, first)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    thread = threading.Thread(target=schedule, daemon=True)
    thread.start()

    def running(n: int) -> list[str]:
        deadline = time.monotonic() + 10
        while len(started) < n and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.005)
        return list(started)

    def finish(name: str) -> None:
        futures[name].set_result(name)

    assert running(2) == ["codec", "text base"]
    finish("text base")
    assert running(3)[2] == "text ttt 0"  # beside the codec
    finish("text ttt 0")
    assert running(4)[3] == "text ttt 1"
    finish("codec")
    assert running(5)[4] == "speech base"  # before the text task's LoRA, which is ready
    finish("speech base")
    assert running(6)[5] == "speech ttt 0"
    finish("text ttt 1")
    assert running(7)[6] == "speech ttt 1"
    for n in range(8, 16):
        finish(started[n - 3])  # the one that started first of the two running
        running(n)
    finish(started[-2])
    finish(started[-1])
    thread.join(timeout=10)
    assert not thread.is_alive() and not errors, errors
    assert started[7:] == ["speech lora 0", "speech lora 1", "text lora 0", "text lora 1",
                           "text frozen 0", "text frozen 1", "speech frozen 0",
                           "speech frozen 1"]
    # every method and task has a cost, so a run never fails on scheduling
    assert {(m, k) for m in mem.METHODS for k in mem.TASKS} <= set(mem._JOB_COST)
    assert mem._CODEC_COST > mem._BASE_COST > max(mem._JOB_COST.values())


def test_a_broken_pool_is_told_by_its_cause():
    """A pool breaks when a worker dies and also when a worker's result cannot be read back
    (concurrent.futures then stops the healthy worker too): the error names which, with the
    cause when there is one, and the work the pool was running."""
    import concurrent.futures
    from concurrent.futures.process import BrokenProcessPool

    def broken(cause: BaseException | None) -> BrokenProcessPool:
        e = BrokenProcessPool("A process in the process pool was terminated abruptly")
        e.__cause__ = cause
        return e

    for cause, says in ((None, "an eval-memory worker process died (killed, or out of memory?)"),
                        (EOFError("Ran out of input"), "an eval-memory worker's result could "
                         "not be read back (EOFError: Ran out of input)")):
        class Breaks(concurrent.futures.Executor):
            def submit(self, fn, /, *args, **kwargs):
                fut: concurrent.futures.Future = concurrent.futures.Future()
                fut.set_exception(broken(cause))
                return fut

        with pytest.raises(mem.EvalWorkerError) as info:
            mem._run_works(Breaks(), 1, [mem._Work(1.0, str, (), lambda r: [], "text / seed 0 "
                                                                            "/ ttt")])
        msg = str(info.value)
        assert msg.startswith(says) and "while the pool ran text / seed 0 / ttt" in msg, msg
        assert "before writing its report" in msg


def test_one_worker_runs_every_job_in_this_process(tiny_cfg):
    """workers 1: each job runs when submitted, in this process; its error is the run's."""
    import math as m

    out: list[float] = []
    with mem._pool(_quick(tiny_cfg, workers=1)) as ex:
        mem._run_works(ex, 1, [mem._Work(1.0, os.getpid, (), lambda r: out.append(r) or [])])
        assert out == [os.getpid()]
        with pytest.raises(ValueError, match="math domain error"):
            mem._run_works(ex, 1, [mem._Work(1.0, m.sqrt, (-1.0,), lambda r: [])])


def test_recall_metrics_tell_order_from_membership():
    """A model that names the right items in the wrong order: in-order accuracy 0, any-order 1;
    one that names items from outside the sequence: 0 for both."""
    V, T = 40, 6
    codes = torch.full((2, 17, T), -1, dtype=torch.long)
    codes[:, 0] = torch.tensor([[9, 9, 11, 12, 13, 9], [9, 9, 20, 20, 21, 9]])
    dep = torch.zeros(2, T, dtype=torch.bool)
    dep[:, 2:5] = True

    def logits_for(pred: torch.Tensor) -> torch.Tensor:
        return F.one_hot(pred, V).float() * 10

    rotated = codes[:, 0].clone()
    rotated[:, 2:5] = codes[:, 0, 2:5].roll(1, dims=1)  # row 0: 13 11 12; row 1: 21 20 20
    m = mem.recall_metrics(logits_for(rotated), codes, dep, content_vocab=32)
    assert m["recall_set_acc"] == 1.0
    assert m["recall_acc"] == pytest.approx(1 / 6)  # row 1's second 20 stays in place
    assert m["set_chance_acc"] == pytest.approx((3 / 32 + 2 / 32) / 2)  # distinct items / V
    outside = codes[:, 0].clone()
    outside[:, 2:5] = 30
    m = mem.recall_metrics(logits_for(outside), codes, dep)
    assert m["recall_set_acc"] == m["recall_acc"] == 0.0 and "set_chance_acc" not in m


def test_cli_eval_memory_quick_writes_json(tmp_path):
    from typer.testing import CliRunner

    from moshi_ttt.cli import app
    from moshi_ttt.config import load_config

    from fixtures import calibrated_base

    out = tmp_path / "mem.json"
    res = CliRunner().invoke(app, ["eval-memory", "--config", str(CONFIGS / "tiny.yaml"),
                                   "--quick", "--steps", "2", "--codec", str(calibrated_base()),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert {r["method"] for r in report["results"]} >= {"ttt", "ttt_off", "lora", "frozen"}
    assert report["settings"]["steps"] == 2
    assert "| ttt |" in res.output
    # --quick keeps no recall model, here (beside --out) nor anywhere (it replaced the real
    # runs/eval-memory/ttt-text.pt on every test run)
    assert not (tmp_path / "ttt-text.pt").exists()
    assert MemoryEvalSettings.from_config(load_config(CONFIGS / "tiny.yaml"), quick=True)\
        .save_ttt is False
    bad = CliRunner().invoke(app, ["eval-memory", "--config", str(CONFIGS / "tiny.yaml"),
                                   "--quick", "--set", "nonsense"])
    assert bad.exit_code == 2


def test_a_codec_that_cannot_be_made_in_a_worker_ends_the_run_in_one_line(tmp_path):
    """eval-memory makes its codec in a worker process: a failure there (espeak-ng missing)
    ends the run with the documented one-line error and exit status 2, not a worker's
    traceback, and no results."""
    exe = Path(sys.executable).parent / "moshi-ttt"
    env = dict(os.environ, PATH=str(tmp_path / "no-tools"), NO_TORCH_COMPILE="1")
    r = subprocess.run([str(exe), "eval-memory", "--config", str(CONFIGS / "tiny.yaml"),
                        "--quick"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    assert "espeak-ng is not on PATH" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "runs" / "eval-memory" / "results-quick.json").exists()


def test_cli_eval_refusals_come_before_the_run(tmp_path, monkeypatch):
    """What would make a run's end fail is refused at its start, in one line (exit 2): an
    --out that is a directory, an ablation with an invalid setting, a recall model that is not
    one (each of these used to cost the whole run, or end it in a traceback)."""
    import torch
    from typer.testing import CliRunner

    from moshi_ttt.cli import app

    monkeypatch.chdir(tmp_path)  # runs/eval-memory lies here

    def run(*args: str):
        r = CliRunner().invoke(app, [*args, "--config", str(CONFIGS / "tiny.yaml")])
        assert r.exception is None or isinstance(r.exception, SystemExit), r.output
        return r.exit_code, r.output

    code, out = run("eval-memory", "--quick", "--out", str(tmp_path))
    assert code == 2 and "is a directory, expected a file path" in out, out
    code, out = run("eval-memory", "--quick", "--set", "ablations={bad: {mini_batch_size: 0}}")
    assert code == 2 and "eval.memory.ablations.bad: invalid TTT setting: mini_batch_size" in out
    # checked with the lm it joins (it used to fail only when the model was built)
    code, out = run("eval-memory", "--quick", "--set", "ablations={bad: {num_heads: 3}}")
    assert code == 2 and "eval.memory.ablations.bad: invalid TTT setting" in out, out
    assert "ttt.num_heads 3 does not divide the transformer's width lm.dim 64" in out, out
    # a task's shape, before the codec is made for it (minutes, in a worker)
    code, out = run("eval-memory", "--quick", "--set", "speech.distractor_vocab=5000")
    assert code == 2 and "token ids up to" in out and "exceed" in out, out
    assert not any((tmp_path / "runs" / "eval-memory" / d).exists() for d in ("data", "codec"))
    # a repeated task, seed or gap would run (and be reported) twice
    code, out = run("eval-memory", "--quick", "--set", "tasks=[speech,speech]")
    assert code == 2 and "eval.memory.tasks ['speech', 'speech']: an entry is repeated" in out
    code, out = run("eval-memory", "--quick", "--set", "seeds=[1,1]")
    assert code == 2 and "an entry is repeated" in out, out
    code, out = run("eval-stability", "--frames", "40", "--out", str(tmp_path))
    assert code == 2 and "is a directory" in out, out
    garbage, other = tmp_path / "garbage.pt", tmp_path / "other.pt"
    garbage.write_text("garbage\n")
    torch.save({"step": 3}, other)
    for path, says in ((garbage, "not a file torch.save wrote"),
                       (other, "missing state, lm, ttt, task"),
                       (tmp_path / "nope.pt", "recall model not found")):
        code, out = run("eval-stability", "--frames", "100000", "--recall-model", str(path))
        assert code == 2 and says in out, out
        assert "Traceback" not in out


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
        # the norm is mostly W0's (scaled init): rows that saw other input differ in their drift
        d1 = one["fast_weights"][name]["final_row_drifts"]
        d2 = two["fast_weights"][name]["final_row_drifts"]
        assert d2[0] == pytest.approx(d1[0], rel=1e-4) and d1[0] > 0, name
        assert abs(d2[1] - d2[0]) > 1e-2 * d2[0], name


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


# -- training across steps (carry) --------------------------------------------------------------

def test_set_overrides_merge_by_section_and_an_empty_section_empties_it(tiny_cfg):
    """`--set task.lead=8` changes one key of its section; `--set ablations={}` (a run without
    ablations) drops the config's ablations instead of merging nothing into them."""
    shipped = MemoryEvalSettings.from_config(tiny_cfg)
    assert shipped.ablations and shipped.task.lead == 64
    s = MemoryEvalSettings.from_config(tiny_cfg, sets=["task.lead=8", "ablations={}",
                                                       "methods=[ttt]"])
    assert s.task.lead == 8 and s.task.content_len == shipped.task.content_len
    assert s.ablations == {} and s.methods == ["ttt"]
    one = MemoryEvalSettings.from_config(tiny_cfg, sets=["ablations={rope: {rope: true}}"])
    assert set(one.ablations) == set(shipped.ablations)  # a non-empty section merges
    assert one.ablations["rope"] == {"rope": True}


def test_restart_chance_ramps_from_one_to_the_setting(tiny_cfg):
    s = _quick(tiny_cfg, steps=100, carry_restart=0.2, carry_ramp=0.5)
    assert mem.restart_chance(s, 0) == 1.0
    assert mem.restart_chance(s, 25) == pytest.approx(0.6)
    assert mem.restart_chance(s, 50) == mem.restart_chance(s, 99) == 0.2
    s0 = _quick(tiny_cfg, steps=100, carry_restart=0.2, carry_ramp=0.0)
    assert mem.restart_chance(s0, 0) == 0.2


def test_carried_training_continues_each_row_and_leaves_no_state(tiny_cfg):
    """With `carry`, step n+1's sequences start from the fast weights step n ended with (rows
    not restarted); the batches are the ones every method sees; nothing is left carried."""
    s = _quick(tiny_cfg, steps=3, carry=True, carry_restart=0.0, carry_ramp=0.0)
    task = mem.whole_mini_batches(mem.task_at(s.task, 1.0, 4), tiny_cfg.ttt.mini_batch_size)
    assert task.length() % tiny_cfg.ttt.mini_batch_size == 0
    batch = mem.batches("text", 16, 8, None)
    lm = mem.build_method("ttt", tiny_cfg, s.task.context, 0, 1)
    starts = []

    def record(mod, args):
        carry = mod.carry
        starts.append(None if carry is None or carry.w is None else
                      (carry.fresh.clone(), carry.w.w2.clone()))

    blk = next(iter(ttt_blocks(lm))).block
    blk.register_forward_pre_hook(record)
    mem.train_method(lm, s, task, batch, data_seed=1)
    assert starts[0] is None  # step 0: every row from W0
    assert all(st is not None and not st[0].any() for st in starts[1:])  # then carried
    assert not torch.equal(starts[1][1], starts[2][1])  # ... and the state moved on
    assert all(a.block.carry is None for a in ttt_blocks(lm))
    # carrying does not change which batches a method sees
    seen = []
    lm2 = mem.build_method("lora", tiny_cfg, s.task.context, 0, 1)
    mem.train_method(lm2, s, task, lambda t, b, g: seen.append(batch(t, b, g)) or seen[-1],
                     data_seed=1)
    g = torch.Generator().manual_seed(1)
    assert all(torch.equal(x[0], batch(task, s.batch_size, g)[0]) for x in seen)


def test_recall_weight_sets_the_recall_frames_share_of_the_loss(tiny_cfg, monkeypatch):
    """`balanced` weighs the two groups' means by `recall_weight`: 0.5 is their plain mean, 1
    is the `dependent` loss, 0 the other frames' alone (compared by the step's gradients, read
    before clipping)."""
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: None)
    s = _quick(tiny_cfg)
    task = mem.task_at(s.task, 1.0, 4)
    data = mem.batches("text", 16, 8, None)(task, 2, torch.Generator().manual_seed(3))
    lm = mem.build_method("ttt", tiny_cfg, s.task.context, 0, 1)
    params = [p for p in lm.parameters() if p.requires_grad]

    def grads(train_on: str, recall_weight: float = s.recall_weight) -> list[torch.Tensor]:
        opt = torch.optim.SGD(params, lr=0.0)
        mem._train_step(lm, opt, params, data, train_on, 0, recall_weight)
        return [p.grad.clone() for p in params]

    def close(a, b):
        return all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b))

    dep, half, shipped = grads("dependent"), grads("balanced", recall_weight=0.5), \
        grads("balanced")  # the config's setting
    assert close(grads("balanced", recall_weight=1.0), dep)
    other = grads("balanced", recall_weight=0.0)
    assert close(half, [0.5 * (a + b) for a, b in zip(dep, other)])
    w = tiny_cfg.eval["memory"]["recall_weight"]
    assert s.recall_weight == w == 0.8
    assert close(shipped, [w * a + (1 - w) * b for a, b in zip(dep, other)])
    assert not close(other, dep) and not close(shipped, half)
    with pytest.raises(ValueError, match="recall_weight"):
        _quick(tiny_cfg, recall_weight=1.5)


def test_a_failing_job_ends_the_run_with_its_error(tiny_cfg):
    """In the worker pool the first failure is raised at once and queued jobs never start."""
    import math as m

    s = _quick(tiny_cfg, workers=2)
    out: list[float] = []

    def works(xs: list[float]) -> list[mem._Work]:
        return [mem._Work(1.0, m.sqrt, (x,), lambda r: out.append(r) or []) for x in xs]

    with pytest.raises(ValueError, match="math domain error"):
        with mem._pool(s) as ex:
            mem._run_works(ex, 2, works([4.0, 9.0]))
            assert sorted(out) == [2.0, 3.0]
            out.clear()
            mem._run_works(ex, 2, works([-1.0] + [4.0] * 50))
    assert len(out) <= 1  # at most the one that ran beside the failure


def test_pool_workers_keep_freed_memory(tiny_cfg):
    """Each worker keeps the memory it frees for its next training step (no page faults to
    zero a few MB again every step): a block that glibc would map apart comes from the heap
    and stays there, however many jobs the worker ran before."""
    from test_process_memory import heap_block_facts

    from moshi_ttt.process_memory import native_heap

    if native_heap() is None:
        pytest.skip("needs glibc >= 2.33")
    facts: list = []
    with mem._pool(_quick(tiny_cfg, workers=2)) as ex:
        mem._run_works(ex, 2, [mem._Work(1.0, heap_block_facts, (8,),
                                         lambda r: facts.append(r) or [])] * 4)
    assert len(facts) == 4
    assert all(abs(mapped) < 0.5 and abs(returned) < 0.5 for mapped, returned in facts), facts


_POOL_SCRIPT = """
import time
from moshi_ttt.config import load_config
from moshi_ttt.eval import memory as mem
s = mem.MemoryEvalSettings.from_config(load_config({config!r}), quick=True, workers=2)
with mem._pool(s) as ex:
    mem._run_works(ex, 2, [mem._Work(1.0, time.sleep, (600.0,), lambda r: [])] * 4)
"""


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command name (state, ppid, ...)."""
    return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def _pool_workers(parent: int) -> list[int]:
    """The pids of `parent`'s spawned pool workers (not multiprocessing's resource tracker)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int(_stat(d.name)[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"spawn_main" in cmd:
            found.append(int(d.name))
    return found


def _alive(pid: int) -> bool:
    try:  # a zombie is dead: its parent only has not reaped it yet
        return _stat(pid)[0] != "Z"
    except OSError:
        return False


def _alive_after(pids: list[int], seconds: float) -> list[int]:
    """The processes of `pids` still running once they had `seconds` to end."""
    deadline = time.monotonic() + seconds
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _kill_run(proc: subprocess.Popen, workers: list[int]) -> None:
    """A test's cleanup: SIGKILL the run and its workers, whatever is left of them."""
    for p in workers + ([] if proc.poll() is not None else [proc.pid]):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, prctl")
@pytest.mark.parametrize("how", ["sigterm", "sigkill", "ctrl-c"])
def test_no_worker_outlives_a_stopped_run(how):
    """Stopping `eval-memory --workers N` stops its workers: `kill PID`, `kill -9 PID` and a
    terminal's Ctrl-C (SIGINT to the whole group) alike. Before, after `kill` or `kill -9`
    each orphaned worker ran its current job to the end (minutes of CPU per job)."""
    script = _POOL_SCRIPT.format(config=str(CONFIGS / "tiny.yaml"))
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers := _pool_workers(proc.pid)) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the pool's workers never started"
            time.sleep(0.2)
        time.sleep(3)  # the workers import and start their jobs
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        assert proc.wait(timeout=30) != 0
        left = _alive_after(workers, 15)
        assert not left, f"{len(left)} of {len(workers)} workers still running after {how}"
    finally:
        _kill_run(proc, workers)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_worker_that_dies_ends_the_run_in_one_line(tmp_path):
    """A worker killed mid-run (`kill -9`, as the kernel's OOM killer does), while it trains a
    method, ends `eval-memory` with a one-line error naming what the pool was running and exit
    status 2, not concurrent.futures' BrokenProcessPool traceback; the other worker is stopped
    too and no report is written."""
    import threading

    exe = Path(sys.executable).parent / "moshi-ttt"
    # 400 steps: the jobs train long enough to be killed in the middle
    proc = subprocess.Popen([str(exe), "eval-memory", "--config", str(CONFIGS / "tiny.yaml"),
                             "--quick", "--steps", "400", "--set", "tasks=[text]"],
                            cwd=tmp_path, env=dict(os.environ, NO_TORCH_COMPILE="1"), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: list[str] = []
    based = threading.Event()  # the base is trained: both workers now train methods

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "steps of in-window training" in line:
                based.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    workers: list[int] = []
    try:
        assert based.wait(timeout=180), "".join(lines)
        # the worker that trained the base now trains a method (the pool starts the second
        # worker when the jobs come)
        trainer = _pool_workers(proc.pid)
        assert len(trainer) == 1, trainer
        deadline = time.monotonic() + 60
        while len(workers := _pool_workers(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(trainer[0], signal.SIGKILL)
        proc.wait(timeout=120)
        reader.join(timeout=10)
        err = "".join(lines)
        assert proc.returncode == 2, err
        assert "an eval-memory worker process died (killed, or out of memory?) while the pool "\
               "ran text / seed 0 / " in err, err
        assert "step 100/400" not in err  # killed mid-training
        assert "Traceback" not in err, err
        left = _alive_after(workers, 15)
        assert not left
        assert not (tmp_path / "runs" / "eval-memory" / "results-quick.json").exists()
    finally:
        _kill_run(proc, workers)


def test_eval_codec_is_made_again_for_another_config_or_thread_count(tiny_cfg, tmp_path,
                                                                    monkeypatch):
    """runs/eval-memory/codec is reused only for the config and the torch thread count it was
    made with: the speech figures depend on the codec, its calibration on both (README: another
    thread count made other word codes), and one made otherwise was reused silently."""
    import moshi_ttt.base as base_mod
    import moshi_ttt.data.synth as synth_mod
    from moshi_ttt.base import CODEC_CALIBRATION_NAME, PROJECT_CONFIG_NAME

    made = []
    monkeypatch.setattr(synth_mod, "synthesize_dataset", lambda *a, **k: None)
    monkeypatch.setattr(base_mod, "init_random_base",
                        lambda cfg, out, *a, **k: made.append(cfg) or out)
    codec = tmp_path / "codec"
    codec.mkdir()
    (codec / CODEC_CALIBRATION_NAME).write_text("{}")
    (codec / PROJECT_CONFIG_NAME).write_text(tiny_cfg.to_yaml())
    # made before the thread count was recorded: made again
    assert mem.reusable_eval_codec(tiny_cfg, tmp_path, 1) is None
    with mem._threads(2):
        assert mem.make_eval_codec(tiny_cfg, tmp_path) == codec and made == [tiny_cfg]
    assert mem.reusable_eval_codec(tiny_cfg, tmp_path, 2) == codec  # the same: reused
    assert mem.reusable_eval_codec(tiny_cfg, tmp_path, 1) is None  # other threads: made again
    other = tiny_cfg.model_copy(deep=True)
    other.mimi["seanet"]["n_filters"] = 16
    assert mem.reusable_eval_codec(other, tmp_path, 2) is None  # another Mimi: made again
    assert mem.make_eval_codec(other, tmp_path) == codec and made == [tiny_cfg, other]
    (codec / mem.EVAL_CODEC_NAME).write_text("{not json")  # unreadable: made again
    assert mem.reusable_eval_codec(tiny_cfg, tmp_path, 2) is None
    assert mem.reusable_eval_codec(tiny_cfg, tmp_path / "nowhere", 1) is None

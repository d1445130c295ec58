"""`moshi-ttt eval-memory`: does TTT give a session memory beyond the attention window?

Two recall tasks (`recall.py`): content in the text stream, or spoken by the user and reaching the
model only as audio codes; both recalled in the text stream after a gap that exceeds what every
stacked attention window can see. Per task and seed, a shared base (the seeded random tiny model
with its attention context shortened, trained in full on the task for `pretrain_steps`, then
frozen: it learns all the window allows and sits at chance on the recall frames; one base per
task, shared by every seed, which seeds the methods' trainable parts, batches and held-out data)
gets:

* `ttt`: the config's own TTT layers (its `ttt` section, the one every command uses), trained;
* `lora`: LoRA on the main transformer with about as many trainable parameters, trained alike
  (same batches, steps, optimiser, loss and seed);
* `frozen`: nothing trained;
* `ttt_off`: the trained TTT model scored with its inner learning rate at 0 (fast weights stay
  W0): what `ttt` gains over it comes from learning during the session.

Every sequence puts its content after a lead of distractors (`recall.py`): content arrives
mid-session, as it does in a conversation, and a model cannot find it by its position in the
session. Methods train at the first gap of `gaps` (multiples of the stacked attention reach) and
are scored at every gap, on held-out sequences, by the parallel forward (attention limited to
`context` frames, TTT's dual form), which computes what a served session computes: every scored
model also streams its first sequences frame by frame through moshi's streaming state (KV ring
buffer, per-row TTT state), as the server runs it, and must agree to rounding (`stream_check`);
one LMGen run per report checks that LMGen's teacher-forced text logits are those of the stream.
Ablations retrain TTT with one design choice reverted (e.g. the reference init) on
`ablation_seeds`.
"""

from __future__ import annotations

import concurrent.futures
import copy
import ctypes
import json
import logging
import math
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
import yaml
from moshi.models.lm import LMGen, LMModel
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import ProjectConfig, TTTConfig
from ..diagnostics import key_report
from ..lora import apply_lora, is_lora_param
from ..model import (
    attach_ttt, build_base_lm, calibrate_ttt, carry_fast_weights, delayed_inputs, is_ttt_param,
    outer_lr_scales, ttt_blocks,
)
from ..process_memory import keep_freed_memory
from ..ttt_mlp import FastWeights
from ..train.trainer import _lr_lambda
from .recall import RecallTask, WordCodes, encode_words, speech_batch, text_batch
from .text_loss import text_frame_losses

logger = logging.getLogger(__name__)

METHODS = ("ttt", "lora", "frozen")
#: Held-out sequences whose keys each TTT job scores (`moshi_ttt.diagnostics.key_report`).
KEY_ROWS = 8
TASKS = ("text", "speech")
Batch = Callable[[RecallTask, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class SpeechTask(BaseModel):
    """The speech task's shape (the config's `eval.memory.speech` section)."""

    model_config = ConfigDict(extra="forbid")

    content_len: int = Field(4, ge=1, description="words the user speaks and must be recalled")
    content_vocab: int = Field(16, ge=2, description="content words (chance 1 / this)")
    distractor_vocab: int = Field(16, ge=1, description="words spoken in the gap")


class MemoryEvalSettings(BaseModel):
    """Budget and protocol (the config's `eval.memory` section; CLI flags override)."""

    model_config = ConfigDict(extra="forbid")

    task: RecallTask = Field(default_factory=RecallTask, description="text task shape; its gap "
                             "is set from `gaps`")
    speech: SpeechTask = Field(default_factory=SpeechTask)
    tasks: list[Literal["text", "speech"]] = Field(default_factory=lambda: list(TASKS))
    gaps: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0],
                              description="gaps as multiples (>= 1) of the stacked attention "
                              "reach; methods train at the first")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    ablations: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="name -> TTT settings that differ from the config's")
    ablation_seeds: list[int] = Field(default_factory=lambda: [0])
    ablation_tasks: list[Literal["text", "speech"]] = Field(default_factory=lambda: ["text"])
    pretrain_steps: int = Field(200, ge=0, description="in-window training of the whole base "
                                "before it is frozen")
    base_seed: int = Field(0, description="seed of each task's shared base (the methods' seeds "
                           "are `seeds`)")
    pretrain_lr: float = Field(3e-3, gt=0)
    pretrain_batch_size: int = Field(16, ge=1, description="the base's batch, apart from the "
                                     "methods' `batch_size`: trying another batch for the "
                                     "methods keeps the base they are compared on")
    steps: int = Field(300, ge=0, description="optimiser steps, the same for every method")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    eval_sequences: int = Field(64, ge=1, description="held-out sequences, the same for all")
    threads: int = Field(1, ge=1, description="torch CPU threads per worker (1: robust on a "
                         "shared box)")
    workers: int = Field(2, ge=1, description="processes that run the (task, seed, method) jobs "
                         "side by side (1: all in this process)")
    lora_rank: int | None = Field(None, ge=1, description="None: matched to TTT's count")
    lora_scaling: float = 2.0
    train_on: Literal["all", "dependent", "balanced"] = Field(
        "balanced", description="training loss, the same for every method: `all` frames (plain "
        "next-token training), only the `dependent` ones, or `balanced`: the two groups' means "
        "weighted `recall_weight` and 1 - `recall_weight` (the recall frames are a few percent "
        "of a sequence of noise)")
    recall_weight: float = Field(0.8, ge=0, le=1, description="`balanced`: the recall frames' "
                                 "share of the loss (0.5: the groups alike; 1: as `dependent`, "
                                 "which leaves the other frames' predictions unguarded)")
    carry: bool = Field(False, description="TTT trains across steps as one stream per batch "
                        "row (truncated BPTT): each step's sequence starts from the fast weights "
                        "the row's previous sequence ended with, so the outer loop learns on "
                        "states that hold earlier content. Off: measured, it slowed learning at "
                        "this budget (text recall at chance after 400 steps, without a lead), "
                        "and with a lead the TTT trained from W0 already recalls after 1000 "
                        "frames of earlier content")
    carry_restart: float = Field(0.1, ge=0, le=1, description="per step, the chance that a row "
                                 "starts a new stream at W0 (the mean carried history is "
                                 "1 / this sequences), reached after `carry_ramp` of the steps")
    carry_ramp: float = Field(0.5, ge=0, le=1, description="fraction of the steps over which the "
                              "restart chance falls linearly from 1 (every sequence fresh, as "
                              "without carrying) to `carry_restart`: the mechanism is learned on "
                              "fresh states first, then on states that hold earlier content")
    save_ttt: bool = Field(True, description="keep the text task's seed-0 TTT model (for "
                           "eval-stability's late recall)")

    @model_validator(mode="after")
    def _check(self) -> "MemoryEvalSettings":
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"eval.memory.methods {self.methods}: expected a non-empty subset "
                             f"of {list(METHODS)}")
        if not self.gaps or any(g < 1 for g in self.gaps):
            raise ValueError(f"eval.memory.gaps {self.gaps}: expected multiples >= 1 of the "
                             f"attention reach (a shorter gap is within reach)")
        if not self.seeds:
            raise ValueError("eval.memory.seeds is empty")
        for name in ("tasks", "gaps", "seeds", "methods", "ablation_tasks", "ablation_seeds"):
            items = getattr(self, name)
            if len(set(items)) != len(items):  # each would run (and be reported) twice
                raise ValueError(f"eval.memory.{name} {items}: an entry is repeated")
        for name, over in self.ablations.items():
            unknown = sorted(set(over) - set(TTTConfig.model_fields))
            if unknown:
                raise ValueError(f"eval.memory.ablations.{name}: unknown TTT settings {unknown}")
        return self

    @classmethod
    def from_config(cls, cfg: ProjectConfig, quick: bool = False, sets: list[str] | None = None,
                    **overrides: Any) -> "MemoryEvalSettings":
        """Config `eval.memory`, then the quick preset (if asked), then `sets` ("KEY=VALUE",
        dotted keys, YAML values: "task.context=16", "seeds=[0]"), then non-None overrides."""
        raw = copy.deepcopy(dict(cfg.eval.get("memory") or {}))
        if quick:
            raw = _deep_merge(raw, QUICK)
        for item in sets or []:
            raw = _deep_merge(raw, parse_set(item))
        raw.update({k: v for k, v in overrides.items() if v is not None})
        s = cls.model_validate(raw)
        for name, over in s.ablations.items():  # now, not when the job comes up minutes later
            try:  # with the lm it joins: heads that divide its width, layers it has
                ProjectConfig.model_validate({**cfg.model_dump(),
                                              "ttt": ttt_variant(cfg, over).model_dump()})
            except ValueError as e:  # the CLI's `reason` names the field from the cause
                raise ValueError(f"eval.memory.ablations.{name}: invalid TTT setting") from e
        return s


def parse_set(item: str) -> dict[str, Any]:
    """"a.b=VALUE" -> {"a": {"b": VALUE}} with VALUE parsed as YAML (1.0, [1, 2], all, true)."""
    key, sep, value = item.partition("=")
    parts = [k.strip() for k in key.split(".")]
    if not sep or not all(parts):
        raise ValueError(f"expected KEY=VALUE (e.g. task.context=16), got {item!r}")
    try:
        out: Any = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ValueError(f"cannot parse the value of {item!r}: {e}") from None
    for k in reversed(parts):
        out = {k: out}
    return out


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """`b`'s values over `a`'s, section by section; an empty section in `b` empties it
    (`--set ablations={}`: no ablations)."""
    out = dict(a)
    for k, v in b.items():
        merge = isinstance(v, dict) and v and isinstance(out.get(k), dict)
        out[k] = _deep_merge(out[k], v) if merge else copy.deepcopy(v)
    return out


#: `--quick`: a small task and budget for the test suite; it checks the machinery, not memory.
QUICK: dict[str, Any] = {
    "task": {"context": 8, "content_len": 4, "lead": 16},
    "speech": {"content_len": 2, "content_vocab": 4, "distractor_vocab": 4},
    "gaps": [1.0, 2.0], "seeds": [0], "ablation_seeds": [0],
    "pretrain_steps": 2, "pretrain_batch_size": 4, "steps": 3, "batch_size": 4,
    "warmup_steps": 1, "eval_sequences": 4,
    "save_ttt": False,  # a 3-step model must not replace a real run's recall model
}


# -- data ---------------------------------------------------------------------------------------

def task_at(task: RecallTask, gap_x: float, num_layers: int) -> RecallTask:
    """The task with its gap set to `gap_x` times the stacked attention reach."""
    return task.model_copy(update={"gap": math.ceil(gap_x * task.reach(num_layers))})


def whole_mini_batches(task: RecallTask, k: int, word_frames: int = 1) -> RecallTask:
    """The task with a tail of distractor frames that makes its length a multiple of `k`."""
    return task.model_copy(update={"tail": task.tail + (-task.length(word_frames)) % k})


def speech_shape(s: MemoryEvalSettings) -> RecallTask:
    """The speech task as a RecallTask (its context and first id are the text task's)."""
    return s.task.model_copy(update={
        "content_len": s.speech.content_len, "content_vocab": s.speech.content_vocab,
        "distractor_vocab": s.speech.distractor_vocab})


def batches(kind: str, n_q: int, dep_q: int, words: WordCodes | None) -> Batch:
    if kind == "text":
        return lambda task, b, g: text_batch(task, b, g, n_q)
    if words is None:
        raise ValueError("the speech task needs word codes (a calibrated codec)")
    return lambda task, b, g: speech_batch(task, words, b, g, n_q, dep_q)


# -- models -------------------------------------------------------------------------------------

def _random_base(cfg: ProjectConfig, context: int, seed: int) -> LMModel:
    torch.manual_seed(seed)
    return build_base_lm(dict(cfg.lm, context=context), device="cpu", dtype=torch.float32)


def pretrain_base(cfg: ProjectConfig, s: MemoryEvalSettings, task: RecallTask, batch: Batch,
                  seed: int, label: str = "base"
                  ) -> dict[str, torch.Tensor]:
    """The shared base of one task and seed: the seeded random tiny base, trained in full for
    `s.pretrain_steps` on the task with the shortened context, then frozen by every method.

    Why: a frozen *random* text head cannot even express the task's token distribution (with
    RMS-normalised hidden states of width 64 and a random 1000-way head, LoRA and TTT both stall
    near 5.85 nats on frames whose best loss is log(32) = 3.47), so the comparison would measure
    output shaping, not memory. Trained with the short context, the base learns everything the
    window allows (markers, which tokens may follow them) and nothing beyond it: it has no path
    to out-of-window content, so it sits at chance on the dependent frames, as Moshi sits at
    chance on facts older than its window.
    """
    lm = _random_base(cfg, task.context, seed)
    if s.pretrain_steps:
        res = train_method(lm, s.model_copy(update={"steps": s.pretrain_steps,
                                                    "lr": s.pretrain_lr,
                                                    "batch_size": s.pretrain_batch_size}),
                           task, batch, data_seed=seed + 200, train_on="all", label=label)
        logger.info("%s (seed %d): %d steps of in-window training, text loss %.3f -> %.3f",
                    label, seed, s.pretrain_steps, res["loss_first"], res["loss_last"])
    return {k: v.detach().clone() for k, v in lm.state_dict().items()}


def build_method(method: str, cfg: ProjectConfig, context: int, seed: int, lora_rank: int,
                 base: dict[str, torch.Tensor] | None = None, ttt: TTTConfig | None = None,
                 lora_scaling: float = 2.0) -> LMModel:
    """The frozen base (`base`, else the seeded random one; identical for every method) with the
    attention context shortened to `context`, plus the method's trainable part (seeded)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {list(METHODS)}")
    lm = _random_base(cfg, context, seed)
    if base is not None:
        lm.load_state_dict(base, strict=True)
    for p in lm.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed + 1)
    if method == "ttt":
        attach_ttt(lm, ttt or cfg.ttt, norm=cfg.lm.get("norm"))
        for a in ttt_blocks(lm):
            a.block.checkpoint_group = 0  # short sequences at dim 64: recomputation only costs
        for n, p in lm.named_parameters():
            p.requires_grad_(is_ttt_param(n))
    elif method == "lora":
        apply_lora(lm, lora_rank, lora_scaling, ["transformer"])
        for n, p in lm.named_parameters():
            p.requires_grad_(is_lora_param(n))
    return lm


def trainable(lm: torch.nn.Module) -> int:
    return sum(p.numel() for p in lm.parameters() if p.requires_grad)


def base_state(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under their plain moshi names (LoRA's `frozen_W.` dropped, TTT
    and adapter tensors left out): equal dicts mean the methods share the base."""
    out = {}
    for n, t in lm.state_dict().items():
        if is_ttt_param(n) or is_lora_param(n):
            continue
        out[n.replace(".frozen_W.", ".")] = t
    return out


def matched_lora_rank(cfg: ProjectConfig, context: int, ttt: TTTConfig | None = None) -> int:
    """The LoRA rank whose adapter count is closest to the TTT layers' trainable count."""
    target = trainable(build_method("ttt", cfg, context, 0, 1, ttt=ttt))
    per_rank = trainable(build_method("lora", cfg, context, 0, 1))
    return max(1, round(target / per_rank))


# -- training -----------------------------------------------------------------------------------

def frame_losses(lm: LMModel, codes: torch.Tensor) -> torch.Tensor:
    """Text cross-entropy per frame [B, T] from the parallel forward of the main transformer
    (the tasks are scored in the text stream; the depformer would only cost time), through the
    frozen head's fused loss when the methods train (`text_loss`)."""
    return text_frame_losses(lm, delayed_inputs(lm, codes)[:, :, :-1], codes[:, 0])


def train_method(lm: LMModel, s: MemoryEvalSettings, task: RecallTask, batch: Batch,
                 data_seed: int, train_on: str | None = None, label: str = "train"
                 ) -> dict[str, float | None]:
    """AdamW + warm-up/cosine on the tensors that require grad; the batches depend only on
    `data_seed`, so every method of a seed sees the same ones. Returns the training loss of the
    first step and the mean over the last tenth of the steps, overall and split into dependent /
    other frames (all None when nothing is trained). `label` names the run in the log (jobs of
    several workers interleave there)."""
    named = [(n, p) for n, p in lm.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params or not s.steps:
        return dict.fromkeys(("loss_first", "loss_last", "dependent_last", "other_last"))
    train_on = train_on or s.train_on
    scales = outer_lr_scales(lm)  # e.g. the TTT q/k convs' `qk_conv_lr_scale`
    groups: dict[float, list[torch.Tensor]] = {}
    for n, p in named:
        groups.setdefault(scales.get(n, 1.0), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": s.lr * k} for k, ps in groups.items()],
                            lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: _lr_lambda(i, s.warmup_steps, s.steps, s.min_lr_ratio))
    g = torch.Generator().manual_seed(data_seed)
    # restarts from their own generator: every method sees the same batches
    restarts = torch.Generator().manual_seed(data_seed + 1)
    carry = s.carry and any(True for _ in ttt_blocks(lm))
    tail = max(1, s.steps // 10)
    hist: list[tuple[float, float, float]] = []
    lm.train()
    try:
        for step in range(s.steps):
            fresh = torch.rand(s.batch_size, generator=restarts) < restart_chance(s, step)
            if carry:
                carry_fast_weights(lm, fresh)
            hist.append(_train_step(lm, opt, params, batch(task, s.batch_size, g), train_on,
                                    step, s.recall_weight))
            sched.step()
            if (step + 1) % max(tail, s.steps // 4) == 0:
                logger.info("%s: step %d/%d: train loss %.4f (dependent %.4f, other %.4f)",
                            label, step + 1, s.steps,
                            *(sum(h[i] for h in hist[-tail:]) / tail for i in range(3)))
    finally:
        carry_fast_weights(lm, None)
    lm.eval()
    last = hist[-tail:]
    return {"loss_first": hist[0][0], "loss_last": sum(h[0] for h in last) / len(last),
            "dependent_last": sum(h[1] for h in last) / len(last),
            "other_last": sum(h[2] for h in last) / len(last)}


def restart_chance(s: MemoryEvalSettings, step: int) -> float:
    """The chance that a row starts a new stream at `step` (see `carry_ramp`)."""
    ramp = s.carry_ramp * s.steps
    if step >= ramp:
        return s.carry_restart
    return 1.0 - (1.0 - s.carry_restart) * step / ramp


def _train_step(lm: LMModel, opt: torch.optim.Optimizer, params: list[torch.Tensor],
                data: tuple[torch.Tensor, torch.Tensor], train_on: str, step: int,
                recall_weight: float) -> tuple[float, float, float]:
    """One optimiser step; returns the frames' mean loss, overall, dependent and other."""
    codes, dependent = data
    ce = frame_losses(lm, codes)
    if train_on == "dependent":
        loss = ce[dependent].mean()
    elif train_on == "balanced":
        loss = recall_weight * ce[dependent].mean() + (1 - recall_weight) * ce[~dependent].mean()
    else:
        loss = ce.mean()
    if not torch.isfinite(loss):
        raise RuntimeError(f"training loss became {float(loss)} at step {step}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    ce = ce.detach()
    return float(ce.mean()), float(ce[dependent].mean()), float(ce[~dependent].mean())


# -- streaming evaluation -----------------------------------------------------------------------

@torch.no_grad()
def stream_text_logits(lm: LMModel, codes: torch.Tensor,
                       on_end: Callable[[LMModel], None] | None = None) -> torch.Tensor:
    """Teacher-forced text logits [B, T, V] through `lm.streaming(B)` + `forward_text`, one
    frame per call: the state machinery LMGen runs (KV ring buffer, per-row TTT state) without
    the depformer, whose audio tokens teacher forcing replaces anyway. `on_end(lm)` runs before
    the streaming state is dropped."""
    lm.eval()
    B, _, T = codes.shape
    seq = delayed_inputs(lm, codes)
    out = []
    with lm.streaming(B):
        for t in range(T):
            out.append(lm.forward_text(seq[:, :, t:t + 1])[1][:, 0, 0].float())
        if on_end is not None:
            on_end(lm)
    return torch.stack(out, dim=1)


@torch.no_grad()
def text_logits(lm: LMModel, codes: torch.Tensor, rows: int = 16
                ) -> tuple[torch.Tensor, float]:
    """Teacher-forced text logits [B, T, V] from the parallel forward (TTT's dual form over
    each row's whole sequence, `rows` rows at a time), and the sessions' fast-weight drift at
    the end (`fast_weight_drift`'s measure; 0 without TTT).

    The same numbers as streaming the frames one by one (`stream_text_logits`, as the server
    runs them) up to fp32 rounding: the dual form and the streaming step are exact (the TTT
    math tests), and `_run_job` checks it again on every scored model. Why not stream: on one
    CPU thread, 64 sequences of 578 frames take 3.4 s in parallel and 31.7 s streamed, and
    streaming was a third of the whole default run."""
    lm.eval()
    blocks = [a.block for a in ttt_blocks(lm)]
    out: list[torch.Tensor] = []
    drift = 0.0
    try:
        for blk in blocks:
            blk.keep_end_state = True
        for lo in range(0, codes.shape[0], rows):
            _, logits = lm.forward_text(delayed_inputs(lm, codes[lo:lo + rows])[:, :, :-1])
            out.append(logits[:, 0].float())
            for blk in blocks:
                if blk.end_state is not None:  # None: a depformer block forward_text skips
                    drift = max(drift, _relative_drift(blk.end_state, blk.inner.fast_weights()))
    finally:
        for blk in blocks:
            blk.keep_end_state, blk.end_state = False, None
    return torch.cat(out), drift


def fast_weight_drift(lm: LMModel) -> float:
    """Inside a stream: max over TTT layers and rows of ||W - W0|| / ||W0|| (W1 and W2)."""
    drift = 0.0
    for a in ttt_blocks(lm):
        st = a.block._streaming_state
        if st is not None:
            drift = max(drift, _relative_drift(st.w, st.w0()))
    return drift


def _relative_drift(w: FastWeights, w0: FastWeights) -> float:
    """max over rows of ||W - W0|| / ||W0||, for W1 and W2; `w` per row, `w0` unbatched."""
    drift = 0.0
    for cur, init in ((w.w1, w0.w1), (w.w2, w0.w2)):
        rel = (cur - init).flatten(1).norm(dim=1) / init.flatten().norm()
        drift = max(drift, float(rel.max()))
    return drift


@torch.no_grad()
def lmgen_text_logits(lm: LMModel, codes: torch.Tensor,
                      on_end: Callable[[LMModel], None] | None = None) -> torch.Tensor:
    """Teacher-forced text logits [B, T, V] through `LMGen.step`, one frame per call.

    LMGen samples the text token from the logits it hands to `on_text_logits_hook`; the hook
    records them and then leaves only the true token finite, so greedy "sampling" picks it. The
    model's audio goes in through `depformer_replace_tokens` and the user's audio as the step
    input, both from the delayed codes, so every step consumes exactly what `LMModel.forward`
    feeds at that step. `on_end(lm)` runs before the streaming state is dropped.
    """
    if lm.delays[0] != 0:
        raise ValueError(f"teacher forcing assumes an undelayed text stream, got delays "
                         f"{lm.delays}")
    lm.eval()
    B, _, T = codes.shape
    dq = lm.dep_q
    seq = delayed_inputs(lm, codes)  # step t reads seq[:, :, t]
    text = codes[:, 0]
    recorded: list[torch.Tensor] = []

    def force(logits: torch.Tensor) -> None:  # [B, 1, 1, V]
        recorded.append(logits[:, 0, 0].float().clone())
        target = text[:, len(recorded) - 1].view(B, 1, 1, 1)
        logits.fill_(float("-inf"))
        logits.scatter_(-1, target, 0.0)

    gen = LMGen(lm, use_sampling=False, on_text_logits_hook=force)
    with gen.streaming(B):
        for t in range(T):
            # LMGen reads a user token given at step t at step t + delay, and a model token
            # produced at step t at step t + 1: hand each the one forward() reads then.
            gen.step(_user_input(lm, seq, t)[:, :, None],
                     depformer_replace_tokens=seq[:, 1:1 + dq, t + 1, None])
        if on_end is not None:
            on_end(lm)
    return torch.stack(recorded, dim=1)


def _user_input(lm: LMModel, seq: torch.Tensor, t: int) -> torch.Tensor:
    """The user tokens to hand LMGen at step t: stream k (delay d) is read back at step t + d,
    where forward() feeds seq[:, k, t + d], i.e. codes[:, k, t - 1]."""
    dq = lm.dep_q
    delays = lm.delays[1 + dq:]
    cols = []
    for j, d in enumerate(delays):
        cols.append(seq[:, 1 + dq + j, min(t + d, seq.shape[2] - 1)])
    return torch.stack(cols, dim=1)


def recall_metrics(logits: torch.Tensor, codes: torch.Tensor, dependent: torch.Tensor,
                   content_vocab: int | None = None) -> dict[str, float]:
    """Text cross-entropy and accuracy on the recall (dependent) frames and on the others.

    Also `recall_set_acc`: the share of recall frames whose prediction is *one of* the
    sequence's recalled items, in any order, and (with `content_vocab`) its chance level
    `set_chance_acc` (distinct items / content_vocab, mean over sequences). A memory that holds
    which items came but not their order scores high here and near `chance_acc` on
    `recall_acc`: the two apart tell what the fast weights keep."""
    B, T, V = logits.shape
    target = codes[:, 0]
    ce = F.cross_entropy(logits.reshape(B * T, V), target.reshape(-1), reduction="none").view(B, T)
    pred = logits.argmax(-1)
    hit = (pred == target).float()
    items = torch.where(dependent, target, -1)  # [B, T]: each row's recalled items, -1 elsewhere
    in_set = (pred[:, :, None] == items[:, None, :]).any(-1).float()
    other = ~dependent
    out = {
        "recall_loss": float(ce[dependent].mean()),
        "recall_acc": float(hit[dependent].mean()),
        "recall_set_acc": float(in_set[dependent].mean()),
        "other_loss": float(ce[other].mean()),
        "other_acc": float(hit[other].mean()),
    }
    if content_vocab is not None:
        distinct = torch.tensor([float(torch.unique(target[b][dependent[b]]).numel())
                                 for b in range(B)])
        out["set_chance_acc"] = float(distinct.mean()) / content_vocab
    return out


@contextmanager
def inner_updates_off(lm: LMModel) -> Iterator[None]:
    """Ablation: TTT blocks with inner learning rate 0, so every session keeps W0 (the fast
    weights never learn from the session). What TTT gains on dependent frames over this comes
    from test-time learning, not from the extra parameters."""
    saved = [(a.block, a.block.base_lr) for a in ttt_blocks(lm)]
    try:
        for blk, _ in saved:
            blk.base_lr = 0.0
        yield
    finally:
        for blk, lr in saved:
            blk.base_lr = lr


# -- the whole comparison -----------------------------------------------------------------------

def _on_threads(n: int, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on `n` torch threads (a `then` runs in this process, beside the workers)."""
    with _threads(n):
        return fn(*args)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def ttt_variant(cfg: ProjectConfig, overrides: dict[str, Any] | None = None) -> TTTConfig:
    return TTTConfig.model_validate({**cfg.ttt.model_dump(), **(overrides or {})})


@dataclass
class _TaskPlan:
    """One task as every job of it needs it (picklable: jobs may run in worker processes)."""

    kind: str
    shape: RecallTask
    tasks: dict[float, RecallTask]  # gap multiple -> the task at that gap
    train_task: RecallTask
    words: WordCodes | None
    rank: int

    def batch(self, n_q: int, dep_q: int) -> Batch:
        return batches(self.kind, n_q, dep_q, self.words)


@dataclass
class _Job:
    """One trained (or frozen) model of one task and seed, scored at every gap."""

    plan: _TaskPlan
    seed: int
    method: str  # "ttt", "ttt:ABLATION", "lora" or "frozen"
    ttt_overrides: dict[str, Any]
    lmgen_check: bool = False
    save_to: Path | None = None


#: Beside the eval codec: the torch threads it was calibrated on. The calibration's sums run in
#: another order on another thread count and make other word codes (README: "The speech figures
#: depend on the codec"), so a codec is reused only at the thread count it was made with.
EVAL_CODEC_NAME = "eval-codec.json"


def reusable_eval_codec(cfg: ProjectConfig, root: Path, threads: int) -> Path | None:
    """`root`/codec when it holds a calibrated codec made for `cfg`'s model, Mimi and
    calibration on `threads` torch threads; None when one must be made (`make_eval_codec`): the
    speech figures depend on the codec, and one made otherwise must not be reused silently."""
    from ..base import CODEC_CALIBRATION_NAME, PROJECT_CONFIG_NAME
    from ..config import ConfigError, load_config

    base = root / "codec"
    if not ((base / PROJECT_CONFIG_NAME).is_file() and (base / CODEC_CALIBRATION_NAME).is_file()):
        return None
    try:
        made = load_config(base / PROJECT_CONFIG_NAME)
        same = all(getattr(made, k) == getattr(cfg, k) for k in ("lm", "mimi", "codec_calibration"))
    except ConfigError:
        same = False
    if not same:
        logger.info("%s was made for another model or codec config: making it again", base)
        return None
    try:
        made_on = json.loads((base / EVAL_CODEC_NAME).read_text())["threads"]
    except (OSError, ValueError, KeyError, TypeError):
        made_on = None
    if made_on != threads:
        logger.info("%s was calibrated on %s torch threads, this run uses %d (other threads make "
                    "other word codes): making it again", base,
                    made_on if made_on is not None else "an unrecorded number of", threads)
        return None
    return base


def make_eval_codec(cfg: ProjectConfig, root: Path) -> Path:
    """A tiny base under `root`/codec whose codec is calibrated on make-data's speech (made
    under `root`/data), for the speech task's words, on this process's torch threads (recorded
    beside it); returns its directory."""
    from ..base import init_random_base
    from ..data.synth import synthesize_dataset

    data, base = root / "data", root / "codec"
    logger.info("the speech task needs a calibrated codec: making one in %s (once)", base)
    synthesize_dataset(data, n_dialogues=16, seed=0)
    (base / EVAL_CODEC_NAME).unlink(missing_ok=True)  # a half-made codec is never reused
    out = init_random_base(cfg, base, data / "tokenizer.model", seed=0, calibrate_on=data)
    (out / EVAL_CODEC_NAME).write_text(json.dumps({"threads": torch.get_num_threads()}) + "\n")
    return out


def run_memory_eval(cfg: ProjectConfig, s: MemoryEvalSettings, codec: Path | None = None,
                    out_dir: Path | None = None,
                    make_codec: Callable[[], Path] | None = None) -> dict[str, Any]:
    """Every task, seed, method and gap of `s` (and the ablations); returns settings, task
    facts, one row per (task, gap, seed, method), a summary over seeds and the LMGen check.
    `codec`: a base directory whose calibrated Mimi encodes the speech task's words; or
    `make_codec`, a picklable callable that makes one and returns its directory.

    Each task's base is trained first, then every (task, seed, method) is its own job; with
    `s.workers` > 1 they run in that many processes of `s.threads` threads each, a job as soon
    as what it needs is done (`_run_works`): the codec is made in a worker while the other
    trains the text base and its first jobs. Every job seeds its own generators, so the numbers
    do not depend on how many workers ran them."""
    num_layers = int(cfg.lm["num_layers"])
    if "speech" in s.tasks and codec is None and make_codec is None:
        raise ValueError("the speech task needs a base with a calibrated codec (--codec BASE)")
    for kind in s.tasks:  # now, not after the codec is made (minutes) in a worker
        for g in s.gaps:
            task_at(s.task if kind == "text" else speech_shape(s), g, num_layers).check(
                num_layers, cfg.text_card)
    t_start = time.perf_counter()
    facts: dict[str, Any] = {}
    done: dict[str, list[Any]] = {}  # task -> its jobs' results, in job order

    def plan_task(kind: str, words: WordCodes | None) -> _TaskPlan:
        shape = s.task if kind == "text" else speech_shape(s)
        wf = words.word_frames if words is not None else 1
        tasks = {g: task_at(shape, g, num_layers) for g in s.gaps}
        facts[kind] = {  # every task was checked at the start
            "attention_reach": shape.reach(num_layers), "num_layers": num_layers,
            "gaps": {str(g): t.gap for g, t in tasks.items()},
            "lengths": {str(g): t.length(wf) for g, t in tasks.items()},
            "content_len": shape.content_len, "word_frames": wf,
            "word_codes": words.fingerprint() if words is not None else None,
            "chance_acc": shape.chance_acc, "chance_loss": shape.chance_loss}
        # the training task in whole TTT mini-batches (its tail holds distractors), so a
        # carried stream commits every frame it saw
        train_task = whole_mini_batches(tasks[s.gaps[0]], cfg.ttt.mini_batch_size, wf)
        return _TaskPlan(kind, shape, tasks, train_task, words,
                         s.lora_rank or matched_lora_rank(cfg, shape.context))

    def base_work(plan: _TaskPlan) -> _Work:
        return _Work(_BASE_COST, _pretrain_job, (cfg, s, plan),
                     lambda base: [_Work(_JOB_COST[(job.method.split(":")[0], plan.kind)],
                                         _run_job, (cfg, s, job, base), finish(plan.kind, i),
                                         f"{plan.kind} / seed {job.seed} / {job.method}")
                                   for i, job in enumerate(task_jobs(plan))],
                     f"the {plan.kind} base")

    def task_jobs(plan: _TaskPlan) -> list[_Job]:
        out: list[_Job] = []
        for seed in s.seeds:
            if "ttt" in s.methods:
                first = seed == s.seeds[0]
                out.append(_Job(plan, seed, "ttt", {},
                                lmgen_check=first and plan.kind == s.tasks[0],
                                save_to=out_dir / "ttt-text.pt" if (
                                    first and plan.kind == "text" and s.save_ttt and out_dir)
                                else None))
                if plan.kind in s.ablation_tasks and seed in s.ablation_seeds:
                    out += [_Job(plan, seed, f"ttt:{name}", over)
                            for name, over in s.ablations.items()]
            out += [_Job(plan, seed, m, {}) for m in s.methods if m != "ttt"]
        done[plan.kind] = [None] * len(out)
        return out

    def finish(kind: str, i: int) -> Callable[[Any], list[_Work]]:
        def keep(result: Any) -> list[_Work]:
            done[kind][i] = result
            return []
        return keep

    first: list[_Work] = []
    with _threads(s.threads):
        for kind in s.tasks:
            if kind == "text":
                first.append(base_work(plan_task("text", None)))
            else:  # the words (and the codec, when it is made) in a worker
                first.append(_Work(_CODEC_COST, _words_job, (s, codec, make_codec),
                                   lambda words: [base_work(_on_threads(
                                       s.threads, plan_task, "speech", words))],
                                   "the speech words" + (" and their codec" if make_codec
                                                         else "")))
    with _pool(s) as ex:
        _run_works(ex, s.workers, first)
    rows = [r for kind in s.tasks for job_rows, _ in done[kind] for r in job_rows]
    check = next((c for kind in s.tasks for _, c in done[kind] if c), {})
    return {
        "settings": s.model_dump(), "ttt": cfg.ttt.model_dump(),
        "tasks": {k: facts[k] for k in s.tasks},
        "results": rows, "summary": summarize(rows), "lmgen_check": check,
        "wall_seconds": time.perf_counter() - t_start,
        "environment": {"torch": torch.__version__, "threads": s.threads,
                        "workers": s.workers, "machine": platform.machine()},
    }


@dataclass
class _Work:
    """A unit of work for the pool (`fn(*args)` in a worker) and `then`, which this process runs
    on its result and which returns the work that result makes ready."""

    cost: float
    fn: Callable[..., Any]
    args: tuple
    then: Callable[[Any], list["_Work"]]
    label: str = "a job"  # what the work is, for errors


def _run_works(ex: concurrent.futures.Executor, workers: int, first: list[_Work]) -> None:
    """Run `first` and all the work their `then`s make ready, at most `workers` at a time, the
    costliest ready one first (ties in the order they became ready): no worker waits for a
    stage the other is still in, and none trains a TTT model alone at the end. The first
    failure ends the run with its error; work not started then never starts. A worker that
    dies (killed, out of memory) ends it with an `EvalWorkerError` naming the work running."""
    ready = list(first)
    running: dict[concurrent.futures.Future, _Work] = {}
    try:
        while ready or running:
            while ready and len(running) < workers:
                work = max(ready, key=lambda w: w.cost)  # max keeps the first of equal costs
                ready.remove(work)
                running[ex.submit(work.fn, *work.args)] = work
            finished, _ = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in [f for f in running if f in finished]:  # in the order they started
                work = running[fut]
                result = fut.result()
                del running[fut]
                ready += work.then(result)
    except BrokenProcessPool as e:
        lost = ", ".join(w.label for w in running.values()) or "a job"
        # the pool also breaks when a worker's result cannot be read back; then it has a cause
        what = ("an eval-memory worker's result could not be read back "
                f"({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ is not None
                else "an eval-memory worker process died (killed, or out of memory?)")
        raise EvalWorkerError(
            f"{what} while the pool ran {lost}: the run stopped before writing its report; "
            f"run it again, or with --workers 1 to run every job in this process") from e


class EvalWorkerError(RuntimeError):
    """A worker process of the pool died: no job error to show, only which work it ran."""


def _words_job(s: MemoryEvalSettings, codec: Path | None,
               make_codec: Callable[[], Path] | None) -> WordCodes:
    """The speech task's words, encoded by `codec` or by the one `make_codec` makes."""
    with _threads(s.threads):
        if codec is None:
            assert make_codec is not None
            codec = make_codec()
        return encode_words(codec, s.speech.content_vocab, s.speech.distractor_vocab)


#: A job's cost relative to a text LoRA job's, measured on the 2-core CPU at the tiny config's
#: default budget: in the default run of 2026-12-05 (late), training TTT 157-178 s on text and
#: 196-208 s on speech, LoRA 86-91 s on text and 103-107 s on speech; a frozen model only
#: scores (3-4 s). Only the order matters.
_JOB_COST = {("ttt", "speech"): 2.3, ("ttt", "text"): 1.9, ("lora", "speech"): 1.2,
             ("lora", "text"): 1.0, ("frozen", "speech"): 0.04, ("frozen", "text"): 0.04}
#: What others wait for starts first: the speech words (with the codec when it is made: 116 s
#: on a worker's one thread in that run, 84 s on two) before either base (46-53 s), both before
#: any job.
_CODEC_COST = 20.0
_BASE_COST = 10.0


@contextmanager
def _pool(s: MemoryEvalSettings) -> Iterator[concurrent.futures.Executor]:
    """An executor for `_run_works`: inline (1 worker: each job runs when submitted) or a pool
    of spawned processes (spawn, not fork: a forked child of a process that ran torch's thread
    pools can hang), logging at this process's level; every job sets `s.threads` itself.

    No worker outlives the run: on a failed job or Ctrl-C the queued jobs are dropped and the
    running ones terminated (the executor's own shutdown would let them finish, minutes each),
    and a worker dies with this process however it ends, `kill -9` included (`_init_worker`)."""
    if s.workers <= 1:
        yield _InlineExecutor()
        return
    ctx = multiprocessing.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    pool = concurrent.futures.ProcessPoolExecutor(
        s.workers, mp_context=ctx, initializer=_init_worker, initargs=(level, os.getpid()))
    try:
        yield pool
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)


class _InlineExecutor(concurrent.futures.Executor):
    """Runs each job in this process when it is submitted; its future is done on return. An
    error is the future's, as in a pool; Ctrl-C (not an `Exception`) goes straight up."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as e:
            fut.set_exception(e)
        return fut


def _stop_pool(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Drop the queued jobs and terminate the workers now, through the executor's process
    table (read before `shutdown` clears it; Python 3.14's `terminate_workers()` reads the same)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


def _init_worker(level: int, parent: int) -> None:
    """A worker logs as this process does (each job sets its own torch threads), keeps the
    memory it frees for its next step (`keep_freed_memory`: 4-8% off a training step) and dies
    with it: SIGTERM from the kernel when the parent exits, whether it was stopped with SIGTERM
    or SIGKILL (Linux `PR_SET_PDEATHSIG`; elsewhere the pool's own cleanup only)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keep_freed_memory()
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            logger.warning("eval-memory worker: prctl(PR_SET_PDEATHSIG) failed (errno %d): it "
                           "may outlive a killed parent", ctypes.get_errno())
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)


def _pretrain_job(cfg: ProjectConfig, s: MemoryEvalSettings, plan: _TaskPlan
                  ) -> dict[str, torch.Tensor]:
    with _threads(s.threads):
        return pretrain_base(cfg, s, plan.train_task,
                             plan.batch(int(cfg.lm["n_q"]), int(cfg.lm["dep_q"])), s.base_seed,
                             label=f"{plan.kind} base")


def _run_job(cfg: ProjectConfig, s: MemoryEvalSettings, job: _Job,
             base: dict[str, torch.Tensor]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Build, train and score one job's model: its rows (and `ttt_off`'s for TTT) and, when the
    job asks, the LMGen check."""
    plan, seed = job.plan, job.seed
    batch = plan.batch(int(cfg.lm["n_q"]), int(cfg.lm["dep_q"]))
    g = torch.Generator().manual_seed(seed + 999)  # held-out, the same for every method
    held = {gap: batch(t, s.eval_sequences, g) for gap, t in plan.tasks.items()}
    rows: list[dict[str, Any]] = []
    check: dict[str, Any] = {}

    def score(name: str, lm: LMModel, extra: dict[str, Any]) -> None:
        for gap, (codes, dep) in held.items():
            t0 = time.perf_counter()
            logits, drift = text_logits(lm, codes)
            stream = {}
            if gap == s.gaps[0]:
                stream = {"stream_check": stream_check(lm, codes, logits,
                                                       f"{plan.kind} / seed {seed} / {name}")}
            rows.append({"task": plan.kind, "gap_x": gap, "gap": plan.tasks[gap].gap,
                         "seed": seed, "method": name,
                         **recall_metrics(logits, codes, dep, plan.shape.content_vocab),
                         "chance_acc": plan.shape.chance_acc,
                         "chance_loss": plan.shape.chance_loss, **extra,
                         "fast_weight_drift": drift, **stream,
                         "eval_seconds": time.perf_counter() - t0})
        logger.info("%s / seed %d / %s: recall acc %s", plan.kind, seed, name,
                    ", ".join(f"{x['recall_acc']:.3f} (any order {x['recall_set_acc']:.3f}) "
                              f"at {x['gap_x']:g}x" for x in rows if x["method"] == name))

    with _threads(s.threads):
        is_ttt = job.method.startswith("ttt")
        tc = ttt_variant(cfg, job.ttt_overrides) if is_ttt else None
        lm = build_method("ttt" if is_ttt else job.method, cfg, plan.shape.context, seed,
                          plan.rank, base, tc, lora_scaling=s.lora_scaling)
        if tc is not None and tc.calibrated:  # on a batch of its own, as train does
            calibrate_ttt(lm, batch(plan.train_task, s.batch_size,
                                    torch.Generator().manual_seed(seed + WHITEN_SEED))[0])
        probe = held[s.gaps[0]][0][:KEY_ROWS]
        keys = {"init": key_report(lm, probe)} if is_ttt else None
        t0 = time.perf_counter()
        tr = train_method(lm, s, plan.train_task, batch, data_seed=seed + 100,
                          label=f"{plan.kind} / seed {seed} / {job.method}")
        extra = {"trainable_params": trainable(lm),
                 "steps": s.steps if job.method != "frozen" else 0,
                 "train_seconds": time.perf_counter() - t0,
                 "train_loss_first": tr["loss_first"], "train_loss_last": tr["loss_last"]}
        if job.method == "lora":
            extra["lora_rank"] = plan.rank
        if keys is not None:
            keys["trained"] = key_report(lm, probe)
            extra["keys"] = keys
            logger.info("%s / seed %d / %s: keys (mean cosine, crosstalk) per layer, at init -> "
                        "trained: %s", plan.kind, seed, job.method, "; ".join(
                            f"{layer}: {k['key_cosine']:.3f} -> "
                            f"{keys['trained'][layer]['key_cosine']:.3f}, {k['crosstalk']:.3f} "
                            f"-> {keys['trained'][layer]['crosstalk']:.3f}"
                            for layer, k in keys["init"].items()))
        score(job.method, lm, extra)
        if job.method == "ttt":
            with inner_updates_off(lm):
                score("ttt_off", lm, extra)
        if job.lmgen_check:
            check = _lmgen_check(lm, *held[s.gaps[0]])
            check.update(task=plan.kind, seed=seed, gap_x=s.gaps[0])
        if job.save_to is not None and tc is not None:
            save_model(lm, cfg, tc, plan.shape, job.save_to, seed, s.steps)
    return rows, check


#: The calibration batch of `qkv_init: whitened` comes from generator seed + WHITEN_SEED: neither
#: the training batches (seed + 100) nor the held-out ones (seed + 999).
WHITEN_SEED = 300

#: Rows of the first gap's held-out sequences that every scored model also streams frame by
#: frame (`stream_check`), and the largest text-logit difference from the parallel scoring
#: that is rounding (measured: about 5e-6) rather than a broken equivalence.
STREAM_CHECK_ROWS = 4
STREAM_CHECK_TOL = 1e-3


def stream_check(lm: LMModel, codes: torch.Tensor, logits: torch.Tensor, label: str) -> float:
    """Stream the first `STREAM_CHECK_ROWS` sequences one frame at a time (the server's path)
    and return the max |stream - parallel| text logit; raise when it is more than rounding,
    because then the report would not measure what a served session does."""
    n = min(STREAM_CHECK_ROWS, codes.shape[0])
    diff = float((stream_text_logits(lm, codes[:n]) - logits[:n]).abs().max())
    if not diff <= STREAM_CHECK_TOL:
        raise RuntimeError(f"{label}: the parallel scoring and the frame-by-frame stream differ "
                           f"by {diff:.3g} in a text logit (expected <= {STREAM_CHECK_TOL:g}): "
                           f"the dual form and the streaming step no longer agree")
    return diff


def _lmgen_check(lm: LMModel, codes: torch.Tensor, dep: torch.Tensor) -> dict[str, float]:
    """LMGen's teacher-forced text logits against the frame-by-frame stream (first rows),
    which `stream_check` ties to the parallel logits the report scores."""
    codes = codes[:4]
    a = lmgen_text_logits(lm, codes)
    b = stream_text_logits(lm, codes)
    return {"rows": int(codes.shape[0]), "max_abs_logit_diff": float((a - b).abs().max())}


def save_model(lm: LMModel, cfg: ProjectConfig, ttt: TTTConfig, task: RecallTask,
               path: Path, seed: int, steps: int) -> None:
    """The trained TTT recall model (its state, the LM and TTT config, the task, the seed and
    outer steps it was trained with) for eval-stability's late-recall check."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": lm.state_dict(), "lm": dict(cfg.lm, context=task.context),
                "ttt": ttt.model_dump(), "task": task.model_dump(), "seed": seed,
                "steps": steps}, path)
    logger.info("text recall model (seed %d, %d steps) saved to %s", seed, steps, path)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (task, gap, method)."""
    keys = sorted({(r["task"], r["gap_x"], r["method"]) for r in rows},
                  key=lambda k: (TASKS.index(k[0]), k[1], k[2]))
    out = []
    for task, gap, method in keys:
        sel = [r for r in rows if (r["task"], r["gap_x"], r["method"]) == (task, gap, method)]
        acc = [r["recall_acc"] for r in sel]
        loss = [r["recall_loss"] for r in sel]
        out.append({"task": task, "gap_x": gap, "gap": sel[0]["gap"], "method": method,
                    "seeds": [r["seed"] for r in sel],
                    "recall_acc": statistics.fmean(acc),
                    "recall_acc_std": statistics.pstdev(acc) if len(acc) > 1 else 0.0,
                    "recall_acc_min": min(acc),
                    "recall_loss": statistics.fmean(loss),
                    "recall_loss_std": statistics.pstdev(loss) if len(loss) > 1 else 0.0,
                    "chance_acc": sel[0]["chance_acc"],
                    "recall_set_acc": statistics.fmean(r["recall_set_acc"] for r in sel),
                    "set_chance_acc": statistics.fmean(r["set_chance_acc"] for r in sel)})
    return out


def format_table(report: dict[str, Any]) -> str:
    """Markdown: one row per (task, gap, method), mean ± spread over seeds."""
    s = MemoryEvalSettings.model_validate(report["settings"])
    weight = f" (recall frames weighted {s.recall_weight:g})" if s.train_on == "balanced" else ""
    lines = [f"long-range recall; gaps are multiples of the stacked attention reach; "
             f"{s.eval_sequences} held-out sequences per gap, scored in parallel (each model's "
             f"first {STREAM_CHECK_ROWS} also streamed frame by frame: the same logits); "
             f"{s.steps} steps of batch {s.batch_size}, lr {s.lr:g}, loss on {s.train_on} "
             f"frames{weight}; seeds {s.seeds}; TTT = the config's ttt section.", "",
             "| task | gap | method | recall acc (mean ± sd, min) | recall loss | chance acc "
             "| any order (chance) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in report["summary"]:
        any_order = f"{r['recall_set_acc']:.3f} ({r['set_chance_acc']:.3f})"
        lines.append(f"| {r['task']} | {r['gap_x']:g}x ({r['gap']}) | {r['method']} | "
                     f"{r['recall_acc']:.3f} ± {r['recall_acc_std']:.3f} "
                     f"({r['recall_acc_min']:.3f}) | {r['recall_loss']:.3f} ± "
                     f"{r['recall_loss_std']:.3f} | {r['chance_acc']:.3f} | {any_order} |")
    keyed = [r for r in report["results"]
             if r.get("keys") and r["gap_x"] == s.gaps[0] and r["method"] == "ttt"]
    if keyed:
        lines.append("\nTTT keys, mean over seeds (mean cosine between two frames' keys; "
                     "crosstalk: the share of a write another key reads back), init -> trained:")
        for task in sorted({r["task"] for r in keyed}):
            rows = [r["keys"] for r in keyed if r["task"] == task]
            for layer in rows[0]["init"]:
                m = {f"{when}_{name}": statistics.fmean(k[when][layer][name] for k in rows)
                     for when in ("init", "trained") for name in ("key_cosine", "crosstalk")}
                lines.append(f"- {task}, layer {layer}: cosine {m['init_key_cosine']:.3f} -> "
                             f"{m['trained_key_cosine']:.3f}, crosstalk {m['init_crosstalk']:.3f}"
                             f" -> {m['trained_crosstalk']:.3f}")
    chk = report.get("lmgen_check")
    if chk:
        lines.append(f"\nLMGen check ({chk['task']}, seed {chk['seed']}, {chk['rows']} rows): "
                     f"max |LMGen - stream| text logit {chk['max_abs_logit_diff']:.2e}")
    return "\n".join(lines)


def write_results(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))

"""`moshi-ttt eval-memory`: does TTT give a session memory beyond the attention window?

The task lives in the text stream of Moshi's 17 streams (the audio streams carry "no input", -1):

    frame  0      1 .. L        L+1 .. L+G       L+G+1    L+G+2 .. L+G+1+L    (tail)
           START  c_1 .. c_L    distractors      RECALL   c_1 .. c_L          distractors

c_1..c_L are i.i.d. uniform content tokens, the distractors uniform tokens of a disjoint set. The
L recall frames (targets c_1..c_L after RECALL) are the *dependent* frames; every other frame is
*other*. Each c_i is independent of everything else in the sequence except its first occurrence,
so a model that cannot see that occurrence can do no better than log(content_vocab) nats there.

"Out of the window" must hold for the whole network, not one layer: with a sliding window of C
frames per layer, N stacked attention layers reach N*(C-1) frames back. The gap is therefore
required to be at least that reach (`RecallTask.check`), so the base model, with or without LoRA,
has *no* path from the content to a dependent frame (a test checks that its dependent logits do
not change at all when the content does); only TTT's fast weights can carry it.

The shared base is the seeded random tiny model with its attention context shortened, trained in
full on the task for `pretrain_steps` (it learns all the window allows and sits at chance on the
dependent frames; see `pretrain_base` for why a random head is not enough), then frozen. Three
methods start from it and train on the same batches, for the same steps, with the same optimiser,
loss (`train_on`) and seed: (a) LoRA on the main transformer with about as many trainable
parameters as the TTT layers, (b) TTT (the config's ttt section with `eval.memory.ttt`
overrides), (c) nothing trained (reference). Training uses the parallel forward; evaluation runs
through `moshi.models.lm.LMGen`, one frame per step, as the server runs the model (KV ring
buffer of `context` frames, per-row TTT state), with the text stream teacher-forced. TTT is also
scored with its inner learning rate set to 0 (fast weights stay W0): what it gains over that
comes from learning during the session, not from its extra parameters.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
import yaml
from moshi.models.lm import LMGen, LMModel
from moshi.models.lm_utils import _delay_sequence
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import ProjectConfig, TTTConfig
from ..lora import apply_lora, is_lora_param
from ..model import attach_ttt, build_base_lm, is_ttt_param, ttt_blocks
from ..train.trainer import _lr_lambda

logger = logging.getLogger(__name__)

METHODS = ("lora", "ttt", "frozen")


class RecallTask(BaseModel):
    """Shape of the long-range recall task (the config's `eval.memory.task` section)."""

    model_config = ConfigDict(extra="forbid")

    context: int = Field(32, ge=2, description="attention context of every layer (frames)")
    content_len: int = Field(8, ge=1, description="L: content tokens to remember")
    gap: int = Field(128, ge=1, description="G: distractor frames between content and recall")
    tail: int = Field(0, ge=0, description="distractor frames after the recall")
    content_vocab: int = Field(32, ge=2)
    distractor_vocab: int = Field(32, ge=1)
    first_id: int = Field(10, ge=2, description="first content id; the two ids below are markers")

    @property
    def length(self) -> int:
        """T: START, content, gap, RECALL, recalled content, tail."""
        return 1 + self.content_len + self.gap + 1 + self.content_len + self.tail

    @property
    def recall_frame(self) -> int:
        return 1 + self.content_len + self.gap

    @property
    def chance_loss(self) -> float:
        """The best loss on dependent frames without access to the content: log(content_vocab)."""
        return math.log(self.content_vocab)

    def reach(self, num_layers: int) -> int:
        """How many frames back the logits of a frame can see through `num_layers` stacked
        attention layers of `context` frames each (each layer adds context - 1)."""
        return num_layers * (self.context - 1)

    def check(self, num_layers: int, text_card: int) -> None:
        """Refuse task shapes where the dependent frames are not really out of reach."""
        if self.gap <= self.context:
            raise ValueError(
                f"recall task: gap {self.gap} must exceed the attention context {self.context}")
        reach = self.reach(num_layers)
        # The logits at recall frame r+i see inputs back to step r+i-reach, i.e. codes from frame
        # r+i-reach-1 on; the content's last frame L must lie before it for i = 1: gap >= reach.
        if self.gap < reach:
            raise ValueError(
                f"recall task: gap {self.gap} < {num_layers} layers x (context {self.context} - 1)"
                f" = {reach}: stacked attention windows still reach the content; use gap >= "
                f"{reach} or a shorter context")
        top = self.first_id + self.content_vocab + self.distractor_vocab
        if top > text_card:
            raise ValueError(f"recall task: token ids up to {top - 1} exceed the text vocabulary "
                             f"({text_card})")


class MemoryEvalSettings(BaseModel):
    """Budget and method settings (the config's `eval.memory` section; CLI flags override)."""

    model_config = ConfigDict(extra="forbid")

    task: RecallTask = Field(default_factory=RecallTask)
    pretrain_steps: int = Field(
        200, ge=0, description="in-window training of the whole base before it is frozen")
    pretrain_lr: float = Field(3e-3, gt=0)
    steps: int = Field(300, ge=0, description="optimiser steps, the same for every method")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    eval_sequences: int = Field(128, ge=1, description="held-out sequences, the same for all")
    seed: int = 0
    threads: int = Field(1, ge=1, description="torch CPU threads (1: robust on a shared box)")
    lora_rank: int | None = Field(None, ge=1, description="None: matched to TTT's count")
    lora_scaling: float = 2.0
    train_on: Literal["all", "dependent", "balanced"] = Field(
        "all", description="training loss, the same for every method: `all` frames (plain "
        "next-token training), only the `dependent` ones (as synthetic recall benchmarks "
        "supervise only the answers), or `balanced`: the mean of the two groups' means")
    ttt: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the config's ttt section for this eval")
    methods: list[str] = Field(default_factory=lambda: list(METHODS))

    @model_validator(mode="after")
    def _check_methods(self) -> "MemoryEvalSettings":
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"eval.memory.methods {self.methods}: expected a non-empty subset "
                             f"of {list(METHODS)}")
        unknown = sorted(set(self.ttt) - set(TTTConfig.model_fields))
        if unknown:
            raise ValueError(f"eval.memory.ttt: unknown TTT settings {unknown}; expected some of "
                             f"{sorted(TTTConfig.model_fields)}")
        return self

    @classmethod
    def from_config(cls, cfg: ProjectConfig, quick: bool = False, sets: list[str] | None = None,
                    **overrides: Any) -> "MemoryEvalSettings":
        """Config `eval.memory`, then the quick preset (if asked), then `sets` ("KEY=VALUE",
        dotted keys, YAML values: "ttt.base_lr=1.0", "task.gap=130"), then non-None overrides."""
        raw = copy.deepcopy(dict(cfg.eval.get("memory") or {}))
        if quick:
            raw = _deep_merge(raw, QUICK)
        for item in sets or []:
            raw = _deep_merge(raw, parse_set(item))
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(raw)


def parse_set(item: str) -> dict[str, Any]:
    """"a.b=VALUE" -> {"a": {"b": VALUE}} with VALUE parsed as YAML (1.0, [1, 2], all, true)."""
    key, sep, value = item.partition("=")
    parts = [k.strip() for k in key.split(".")]
    if not sep or not all(parts):
        raise ValueError(f"expected KEY=VALUE (e.g. ttt.base_lr=1.0), got {item!r}")
    try:
        out: Any = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ValueError(f"cannot parse the value of {item!r}: {e}") from None
    for k in reversed(parts):
        out = {k: out}
    return out


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else copy.deepcopy(v)
    return out


#: `--quick`: a small task and budget for the test suite; it checks the machinery, not memory.
QUICK: dict[str, Any] = {
    "task": {"context": 8, "content_len": 4, "gap": 32, "tail": 0},
    "pretrain_steps": 2, "steps": 3, "batch_size": 4, "warmup_steps": 1, "eval_sequences": 6,
}


@dataclass
class MethodResult:
    method: str
    trainable_params: int
    dependent_loss: float
    dependent_acc: float
    other_loss: float
    other_acc: float
    steps: int
    seconds: float
    train_loss_first: float | None = None  # None: nothing trained
    train_loss_last: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# -- data ---------------------------------------------------------------------------------------

def make_batch(task: RecallTask, batch: int, generator: torch.Generator, n_q: int,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [B, 1 + n_q, T] (text = the task, audio = -1 "no input") and the dependent-frame
    mask [B, T] (True on the L recall frames)."""
    L, T = task.content_len, task.length
    if task.gap <= task.context:
        raise ValueError(f"recall task: gap {task.gap} must exceed the attention context "
                         f"{task.context}")
    start_id, recall_id = task.first_id - 2, task.first_id - 1
    content = task.first_id + torch.randint(task.content_vocab, (batch, L), generator=generator)
    dis_lo = task.first_id + task.content_vocab
    text = dis_lo + torch.randint(task.distractor_vocab, (batch, T), generator=generator)
    text[:, 0] = start_id
    text[:, 1:1 + L] = content
    r = task.recall_frame
    text[:, r] = recall_id
    text[:, r + 1:r + 1 + L] = content
    codes = torch.full((batch, 1 + n_q, T), -1, dtype=torch.long)
    codes[:, 0] = text
    dependent = torch.zeros(batch, T, dtype=torch.bool)
    dependent[:, r + 1:r + 1 + L] = True
    return codes, dependent


def delayed_inputs(lm: LMModel, codes: torch.Tensor) -> torch.Tensor:
    """[B, K, T+1]: the initial token, then the codes delayed as LMModel.forward feeds them;
    step t's input is column t and its text logits predict codes[:, 0, t]."""
    B = codes.shape[0]
    initial = lm._get_initial_token().expand(B, -1, -1)
    return torch.cat([initial, _delay_sequence(lm.delays, codes, initial)], dim=2)


# -- models -------------------------------------------------------------------------------------

def ttt_config(cfg: ProjectConfig, s: MemoryEvalSettings) -> TTTConfig:
    """The config's TTT section with this eval's overrides (inner lr, K, gate, layers...)."""
    return TTTConfig.model_validate({**cfg.ttt.model_dump(), **s.ttt})


def _random_base(cfg: ProjectConfig, s: MemoryEvalSettings) -> LMModel:
    torch.manual_seed(s.seed)
    return build_base_lm(dict(cfg.lm, context=s.task.context), device="cpu", dtype=torch.float32)


def pretrain_base(cfg: ProjectConfig, s: MemoryEvalSettings) -> dict[str, torch.Tensor]:
    """The shared base: the seeded random tiny base, trained in full for `s.pretrain_steps` on the
    task with the shortened context, then frozen by every method.

    Why: a frozen *random* text head cannot even express the task's token distribution (with
    RMS-normalised hidden states of width 64 and a random 1000-way head, LoRA and TTT both stall
    near 5.85 nats on frames whose best loss is log(32) = 3.47), so the comparison would measure
    output shaping, not memory. Trained with the short context, the base learns everything the
    window allows (markers, which tokens may follow them) and nothing beyond it: it has no path
    to out-of-window content, so it sits at chance on the dependent frames, as Moshi sits at
    chance on facts older than its window.
    """
    lm = _random_base(cfg, s)
    if s.pretrain_steps:
        logger.info("base: %d steps of in-window training (context %d)", s.pretrain_steps,
                    s.task.context)
        res = train_method(lm, s.model_copy(update={"steps": s.pretrain_steps,
                                                    "lr": s.pretrain_lr}),
                           data_seed=s.seed + 200, train_on="all")
        if res["loss_first"] is not None:
            logger.info("base: text loss %.3f -> %.3f", res["loss_first"], res["loss_last"])
    return {k: v.detach().clone() for k, v in lm.state_dict().items()}


def build_method(method: str, cfg: ProjectConfig, s: MemoryEvalSettings, lora_rank: int,
                 base: dict[str, torch.Tensor] | None = None) -> LMModel:
    """The frozen base (`base`, else the seeded random one; identical for every method) with the
    attention context shortened to `s.task.context`, plus the method's trainable part (seeded)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {list(METHODS)}")
    lm = _random_base(cfg, s)
    if base is not None:
        lm.load_state_dict(base, strict=True)
    for p in lm.parameters():
        p.requires_grad_(False)
    torch.manual_seed(s.seed + 1)
    if method == "ttt":
        attach_ttt(lm, ttt_config(cfg, s), norm=cfg.lm.get("norm"))
        for a in ttt_blocks(lm):
            a.block.checkpoint_group = 0  # short sequences at dim 64: recomputation only costs
        for n, p in lm.named_parameters():
            p.requires_grad_(is_ttt_param(n))
    elif method == "lora":
        apply_lora(lm, lora_rank, s.lora_scaling, ["transformer"])
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


def matched_lora_rank(cfg: ProjectConfig, s: MemoryEvalSettings) -> int:
    """The LoRA rank whose adapter count is closest to the TTT layers' trainable count."""
    target = trainable(build_method("ttt", cfg, s, 1))
    per_rank = trainable(build_method("lora", cfg, s, 1))
    return max(1, round(target / per_rank))


# -- training -----------------------------------------------------------------------------------

def frame_losses(lm: LMModel, codes: torch.Tensor) -> torch.Tensor:
    """Text cross-entropy per frame [B, T] from the parallel forward of the main transformer
    (the task lives in the text stream; the depformer would only cost time)."""
    _, logits = lm.forward_text(delayed_inputs(lm, codes)[:, :, :-1])
    B, T = codes.shape[0], codes.shape[2]
    return F.cross_entropy(logits[:, 0].flatten(0, 1).float(), codes[:, 0].flatten(),
                           reduction="none").view(B, T)


def train_method(lm: LMModel, s: MemoryEvalSettings, data_seed: int | None = None,
                 train_on: str | None = None) -> dict[str, float | None]:
    """AdamW + warm-up/cosine on the tensors that require grad; every method sees the same
    batches (the data generator is seeded from `s.seed`, independent of the model). Returns
    the training loss of the first step and the mean over the last tenth of the steps, overall
    and split into dependent / other frames (all None when nothing is trained)."""
    params = [p for p in lm.parameters() if p.requires_grad]
    if not params or not s.steps:
        return dict.fromkeys(("loss_first", "loss_last", "dependent_last", "other_last"))
    train_on = train_on or s.train_on
    opt = torch.optim.AdamW(params, lr=s.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: _lr_lambda(i, s.warmup_steps, s.steps, s.min_lr_ratio))
    g = torch.Generator().manual_seed(s.seed + 100 if data_seed is None else data_seed)
    tail = max(1, s.steps // 10)
    hist: list[tuple[float, float, float]] = []
    lm.train()
    for step in range(s.steps):
        codes, dependent = make_batch(s.task, s.batch_size, g, lm.n_q)
        ce = frame_losses(lm, codes)
        if train_on == "dependent":
            loss = ce[dependent].mean()
        elif train_on == "balanced":
            loss = 0.5 * (ce[dependent].mean() + ce[~dependent].mean())
        else:
            loss = ce.mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"training loss became {float(loss)} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ce = ce.detach()
        hist.append((float(ce.mean()), float(ce[dependent].mean()), float(ce[~dependent].mean())))
        if (step + 1) % tail == 0:
            logger.info("  step %d/%d: train loss %.4f (dependent %.4f, other %.4f)", step + 1,
                        s.steps, *(sum(h[i] for h in hist[-tail:]) / tail for i in range(3)))
    lm.eval()
    last = hist[-tail:]
    return {"loss_first": hist[0][0], "loss_last": sum(h[0] for h in last) / len(last),
            "dependent_last": sum(h[1] for h in last) / len(last),
            "other_last": sum(h[2] for h in last) / len(last)}


# -- streaming evaluation -----------------------------------------------------------------------

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


@torch.no_grad()
def forward_text_stream_logits(lm: LMModel, codes: torch.Tensor) -> torch.Tensor:
    """Teacher-forced text logits [B, T, V] through `lm.streaming(B)` + `forward_text`, one
    frame per call (the same state machinery as LMGen, without its token cache)."""
    lm.eval()
    B, _, T = codes.shape
    seq = delayed_inputs(lm, codes)
    out = []
    with lm.streaming(B):
        for t in range(T):
            out.append(lm.forward_text(seq[:, :, t:t + 1])[1][:, 0, 0].float())
    return torch.stack(out, dim=1)


def recall_metrics(logits: torch.Tensor, codes: torch.Tensor, dependent: torch.Tensor
                   ) -> dict[str, float]:
    """Text cross-entropy and accuracy on dependent and on other frames."""
    B, T, V = logits.shape
    target = codes[:, 0]
    ce = F.cross_entropy(logits.reshape(B * T, V), target.reshape(-1), reduction="none").view(B, T)
    hit = (logits.argmax(-1) == target).float()
    other = ~dependent
    return {
        "dependent_loss": float(ce[dependent].mean()),
        "dependent_acc": float(hit[dependent].mean()),
        "other_loss": float(ce[other].mean()),
        "other_acc": float(hit[other].mean()),
    }


def fast_weight_drift(lm: LMModel) -> float:
    """Inside a stream: max over TTT layers and rows of ||W - W0|| / ||W0|| (W1 and W2)."""
    drift = 0.0
    for a in ttt_blocks(lm):
        st = a.block._streaming_state
        if st is None:
            continue
        w0 = st.w0()
        for cur, init in ((st.w.w1, w0.w1), (st.w.w2, w0.w2)):
            rel = (cur - init).flatten(1).norm(dim=1) / init.flatten().norm()
            drift = max(drift, float(rel.max()))
    return drift


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


def streaming_eval(lm: LMModel, codes: torch.Tensor, dependent: torch.Tensor
                   ) -> tuple[dict[str, float], float]:
    """Metrics of the LMGen teacher-forced stream, and the fast-weight drift at its end."""
    drift: list[float] = []
    logits = lmgen_text_logits(lm, codes, on_end=lambda m: drift.append(fast_weight_drift(m)))
    return recall_metrics(logits, codes, dependent), drift[0]


# -- the whole comparison -----------------------------------------------------------------------

@contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_memory_eval(cfg: ProjectConfig, s: MemoryEvalSettings) -> dict[str, Any]:
    """Train and evaluate every method of `s.methods`; returns settings, task facts, results."""
    num_layers = int(cfg.lm["num_layers"])
    s.task.check(num_layers, cfg.text_card)
    t_start = time.perf_counter()
    with _threads(s.threads):
        rank = s.lora_rank or matched_lora_rank(cfg, s)
        t0 = time.perf_counter()
        base = pretrain_base(cfg, s)
        base_seconds = time.perf_counter() - t0
        g = torch.Generator().manual_seed(s.seed + 999)  # held-out sequences, the same for all
        codes, dependent = make_batch(s.task, s.eval_sequences, g, int(cfg.lm["n_q"]))
        results: list[MethodResult] = []
        for method in s.methods:
            t0 = time.perf_counter()
            lm = build_method(method, cfg, s, rank, base)
            n = trainable(lm)
            logger.info("%s: %s trainable parameters, %d steps", method, f"{n:,}",
                        s.steps if method != "frozen" else 0)
            tr = train_method(lm, s)  # the frozen base has nothing to train: all None
            metrics, drift = streaming_eval(lm, codes, dependent)
            extra: dict[str, Any] = {"train_dependent_loss_last": tr["dependent_last"],
                                     "train_other_loss_last": tr["other_last"]}
            if method == "lora":
                extra.update(lora_rank=rank, lora_scaling=s.lora_scaling)
            if method == "ttt":
                tc = ttt_config(cfg, s)
                with inner_updates_off(lm):
                    off, _ = streaming_eval(lm, codes, dependent)
                extra.update(
                    fast_weight_drift=drift, layers=tc.layers, mini_batch_size=tc.mini_batch_size,
                    base_lr=tc.base_lr, gate_init=tc.gate_init,
                    inner_updates_off=dict(off),
                    gate_abs_mean={
                        a.layer: float(torch.tanh(a.block.gate_alpha.detach()).abs().mean())
                        for a in ttt_blocks(lm)},
                )
            steps = s.steps if method != "frozen" else 0
            res = MethodResult(method, n, steps=steps, seconds=time.perf_counter() - t0,
                               train_loss_first=tr["loss_first"],
                               train_loss_last=tr["loss_last"], extra=extra,
                               **metrics)
            logger.info("%s: dependent loss %.3f acc %.3f | other loss %.3f acc %.3f | %.0f s",
                        method, res.dependent_loss, res.dependent_acc, res.other_loss,
                        res.other_acc, res.seconds)
            results.append(res)
    t = s.task
    return {
        "settings": s.model_dump(),
        "task": {"length": t.length, "recall_frame": t.recall_frame,
                 "attention_reach": t.reach(num_layers), "num_layers": num_layers,
                 "chance_dependent_loss": t.chance_loss,
                 "chance_dependent_acc": 1 / t.content_vocab,
                 "chance_other_distractor_loss": math.log(t.distractor_vocab)},
        "results": [asdict(r) for r in results],
        "base_pretrain_seconds": base_seconds,
        "wall_seconds": time.perf_counter() - t_start,
        "environment": {"torch": torch.__version__, "threads": s.threads,
                        "machine": platform.machine()},
    }


def format_table(report: dict[str, Any]) -> str:
    """Markdown table of a `run_memory_eval` report, with the chance levels in the heading."""
    s = MemoryEvalSettings.model_validate(report["settings"])
    t, facts = s.task, report["task"]
    head = (f"long-range recall: content {t.content_len} tokens, gap {t.gap} frames >= reach "
            f"{facts['attention_reach']} ({facts['num_layers']} layers x (context {t.context} - 1))"
            ";"
            f" {s.eval_sequences} held-out sequences of {t.length} frames, teacher-forced through "
            f"LMGen frame by frame. Chance on dependent frames: loss {t.chance_loss:.3f}, acc "
            f"{1 / t.content_vocab:.3f}. Base: {s.pretrain_steps} steps of in-window training, "
            f"then frozen; methods: {s.steps} steps of batch {s.batch_size}, lr {s.lr:g}, loss on "
            f"{s.train_on} frames; seed {s.seed}; seconds = training + evaluation.")
    rows = ["| method | trainable params | dependent loss | dependent acc | other loss | "
            "other acc | steps | seconds |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        name = r["method"]
        if name == "lora":
            name = f"lora (rank {r['extra']['lora_rank']})"
        rows.append(f"| {name} | {r['trainable_params']:,} | {r['dependent_loss']:.3f} | "
                    f"{r['dependent_acc']:.3f} | {r['other_loss']:.3f} | {r['other_acc']:.3f} | "
                    f"{r['steps']} | {r['seconds']:.1f} |")
        off = r["extra"].get("inner_updates_off")
        if off:
            rows.append(f"| ttt, inner updates off at eval | (same) | {off['dependent_loss']:.3f} "
                        f"| {off['dependent_acc']:.3f} | {off['other_loss']:.3f} | "
                        f"{off['other_acc']:.3f} | - | - |")
    return head + "\n\n" + "\n".join(rows)


def write_results(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))

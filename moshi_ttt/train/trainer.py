"""`moshi-ttt train`: frozen base, trainable TTT (optionally LoRA or full fine-tuning), FSDP2.

One process or `torchrun --nproc_per_node N`: the same code, the same global batch
(batch_size x grad_accum x world segments), the same loss (see `loss.py` for why it is exact).
A run directory receives `metrics.jsonl`, `train.log`-style logging, and checkpoints that
`moshi-ttt serve --checkpoint RUN_DIR` loads as they are.

Under torchrun only rank 0 reads the weights (the others build the model on the meta device and
receive their shards from it), only rank 0 encodes the data (the others read its cache), and a
failure on any rank during set-up is raised on every rank with its own message, so each process
exits with the CLI's status 2 instead of a backend error.

A step whose loss or gradient norm is not finite is skipped: no update, no checkpoint at that
step (a due one waits for the next finite step). `max_nonfinite_steps` of them in a row stop the
run with a TrainingError; `latest` keeps naming the last good checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..base import BaseModelError, resolve_base
from ..block import FastWeightInit
from ..checkpoint import (
    CheckpointError, assemble_model, earlier_checkpoint_hint, find_checkpoint, json_safe,
    latest_checkpoint, load_model, load_trainer_state, nonfinite_tensors, save_checkpoint,
)
from ..config import BaseModelRef, ConfigError, ProjectConfig
from ..data.encode import StreamEncoder
from ..data.index import DataError
from ..data.loader import LoaderPosition, SegmentLoader
from ..dims import count_params
from ..lora import is_lora_param
from ..model import calibrate_ttt, is_ttt_param, outer_lr_scales, ttt_blocks
from . import distributed as dist_util
from .loss import StreamSums, combine, stream_sums, summarize, weight_totals
from .settings import TrainSettings

logger = logging.getLogger(__name__)

TEXT_PADDING_IDS = (3, 0)

#: What `train` offers when a checkpoint's recorded base is gone.
BASE_HINT = "pass the base to `moshi-ttt train` with --base DIR or --hf-repo REPO"

#: TTT settings that change how training computes, not what the model is: free to change on
#: resume, and taken from the given config (the rest of the model config comes from the checkpoint).
_COMPUTE_ONLY_TTT = {"checkpoint_group"}
#: `ttt.qkv_init: whitened`: calibrate on at least this many frames per model dim (a covariance
#: of d dims needs more than d frames to be of full rank), in at most this many micro-batches.
WHITEN_FRAMES_PER_DIM = 2
WHITEN_MAX_BATCHES = 16
#: AdamW's epsilon (not a setting); re-applied with the betas after a resume restores the groups.
ADAM_EPS = 1e-8
#: Training settings that decide which tensors exist or are trained: fixed for a run.
_STRUCTURAL_SETTINGS = ("lora", "full_finetune", "train_ttt")


class TrainingError(RuntimeError):
    """The run cannot start or continue; the message says why and what to do."""


_ERROR_KINDS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (TrainingError, DataError, CheckpointError, BaseModelError, ConfigError)
}


def _rebuild_error(kind: str, message: str) -> Exception:
    """Another rank's set-up failure, raised here as the same kind where the CLI knows it."""
    return _ERROR_KINDS.get(kind, TrainingError)(message)


def _device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at `total` (`step` counts from 0)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def decays(module: nn.Module, param_name: str) -> bool:
    """Whether a parameter gets weight decay, by the module that owns it and its name there.

    Decayed: the weight matrices of linear maps (TTT's q/k/v/o projections, LoRA's A and B, base
    linears under full fine-tuning) and TTT's fast-weight matrices W1 and W2. Not decayed:
    biases (including the fast-weight biases b1, b2), norm gains (RMSNorm's alpha, the inner
    ttt_norm weight and bias), the output gate alpha, the inner learning-rate gate (lr_weight,
    lr_bias), the forgetting rate (decay_logit), the token offset, the per-channel kernels of the
    optional depthwise q/k convolutions, and embeddings. Decay pulls a value toward 0: for a
    gain, a gate or a per-channel filter that means switching its path off, for an embedding
    row forgetting a rare token, and a bias carries no scale that needs regularising. Shapes
    cannot tell these apart (a gain is (1, 1, dim), b1 is (H, 1, F), ttt_norm_weight (H, HD)),
    so the owning module and the name decide.
    """
    if isinstance(module, nn.Linear):
        return param_name == "weight"
    if isinstance(module, FastWeightInit):
        return param_name in ("w1", "w2")
    return False


def decayed_names(model: nn.Module) -> set[str]:
    """Full names of the parameters `decays` selects."""
    out = set()
    for mod_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            if decays(module, name):
                out.add(f"{mod_name}.{name}" if mod_name else name)
    return out


def _diff(recorded: Any, now: Any, path: str, out: list[str]) -> None:
    """Leaf-by-leaf differences of two JSON-like values, as 'path: recorded -> now' lines."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        for k in sorted(set(recorded) | set(now), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if k not in now:
                out.append(f"{sub}: {recorded[k]!r} -> (absent)")
            elif k not in recorded:
                out.append(f"{sub}: (absent) -> {now[k]!r}")
            else:
                _diff(recorded[k], now[k], sub, out)
    elif recorded != now:
        out.append(f"{path}: {recorded!r} -> {now!r}")


def trim_metrics(path: Path, upto: int) -> None:
    """Keep the records of steps <= `upto` (the step training continues after) and drop the rest,
    so a resumed run logs each step once. A torn last line (a kill mid-write) is dropped; records
    an older version wrote with bare NaN are rewritten as valid JSON (null)."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= upto:
            kept.append(json.dumps(json_safe(rec), allow_nan=False))
        else:
            dropped += 1
    if dropped:
        logger.info("%s: dropped %d record(s) after step %d (they are trained again)", path,
                    dropped, upto)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class Trainer:
    def __init__(self, cfg: ProjectConfig, settings: TrainSettings, out_dir: str | Path,
                 base_override: BaseModelRef | None = None, resume: bool = False):
        self.cfg = cfg
        self.s = settings
        self.out = Path(out_dir)
        self.device = dist_util.local_device(_device(settings.device))
        self.rank, self.world = dist_util.init(self.device)
        self.distributed = dist_util.is_distributed()
        self.is_main = self.rank == 0
        bf16 = settings.precision == "bf16" or (settings.precision == "auto"
                                                and self.device.type == "cuda")
        self.model_dtype = torch.bfloat16 if bf16 else torch.float32
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if bf16 else nullcontext())
        self._seed(settings.seed)
        self.start_step = 0
        self.pos = LoaderPosition()
        self.first_batch_collapsed: list[int] = []  # TTT layers that failed the check
        self.skipped_steps = 0  # steps skipped for a non-finite loss or gradient, whole run
        self.nonfinite_streak = 0  # of them, in a row up to now
        self._resume_state: dict[str, Any] | None = None
        self._resume_meta: dict[str, Any] | None = None
        self._agree(lambda: self._load(base_override, resume))

    def _agree(self, fn: Callable[[], Any]) -> Any:
        return dist_util.agree(fn, _rebuild_error)

    # -- setup ----------------------------------------------------------------------------------
    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _load(self, base_override: BaseModelRef | None, resume: bool) -> None:
        # Under torchrun only rank 0 reads weights; the others get their shards from it.
        load_weights = not (self.distributed and not self.is_main)
        latest = latest_checkpoint(self.out) if (self.out / "checkpoints").exists() else None
        if latest is not None and not resume:
            raise TrainingError(f"{self.out} already holds checkpoints (latest {latest.name}); "
                                f"pass --resume to continue that run, or choose another --out")
        if resume and latest is not None:
            self._resume_meta = find_checkpoint(latest).meta
            self._check_resume_config(latest)
            # Before the model: a missing or damaged state fails in seconds, not after loading.
            # mmap: ranks other than 0 never touch the optimiser state they do not restore.
            self._resume_state = load_trainer_state(latest, mmap=True)
            self._check_resume_world()
            # The trained tensors at the dtype they were saved in (fp32 master weights): a bf16
            # model would otherwise round them, and the resumed run would drift from a straight one.
            loaded = load_model(latest, self.device, self.model_dtype, with_codec=True,
                                base_override=base_override, load_weights=load_weights,
                                base_hint=BASE_HINT, keep_stored_dtype=self._trainable_name)
            given = self.cfg
            self.cfg = loaded.cfg
            for key in _COMPUTE_ONLY_TTT:  # how this run computes: the given config's
                setattr(self.cfg.ttt, key, getattr(given.ttt, key))
            self.lm, self.base, self.dims = loaded.lm, loaded.base, loaded.dims
            self.mimi, self.tokenizer = loaded.mimi, loaded.tokenizer
            if load_weights:
                params = dict(self.lm.named_parameters())
                bad = nonfinite_tensors({k: params[k] for k in self._resume_meta.get("tensors", [])
                                         if k in params})
                if bad:
                    raise TrainingError(
                        f"refusing to resume from {latest}: {len(bad)} of its tensors hold NaN "
                        f"or inf ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}). "
                        f"{earlier_checkpoint_hint(latest)}")
            self.start_step = int(self._resume_state["step"])
            logger.info("resuming %s from %s (step %d)", self.out, latest, self.start_step)
        else:
            if resume:
                logger.info("--resume: %s has no checkpoint yet, starting fresh", self.out)
            self.base = resolve_base(base_override or self.cfg.base)
            self.lm, self.dims = assemble_model(self.cfg, self.base, self.device,
                                                self.model_dtype, seed=self.s.seed,
                                                context="base " + str(self.base.ref),
                                                load_weights=load_weights)
            self.mimi = self.base.info.get_mimi(device=self.device)
            self.tokenizer = self.base.info.get_text_tokenizer()
        for p in self.mimi.parameters():
            p.requires_grad_(False)

    def _check_resume_config(self, latest: Path) -> None:
        """A resumed run trains the model it saved: refuse a config whose model differs, naming
        every difference; report changed training settings (they take effect)."""
        meta = self._resume_meta or {}
        try:
            recorded = ProjectConfig.model_validate(meta["project"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{latest}/config.json has no valid project config: {e}") from e
        diffs: list[str] = []
        _diff(recorded.lm, self.cfg.lm, "lm", diffs)
        ttt_then = recorded.ttt.model_dump(mode="json", exclude=_COMPUTE_ONLY_TTT)
        ttt_now = self.cfg.ttt.model_dump(mode="json", exclude=_COMPUTE_ONLY_TTT)
        _diff(ttt_then, ttt_now, "ttt", diffs)
        _diff(recorded.mimi, self.cfg.mimi, "mimi", diffs)
        defaults = TrainSettings().model_dump(mode="json")
        now = self.s.model_dump(mode="json")
        for key in _STRUCTURAL_SETTINGS:
            _diff(recorded.train.get(key, defaults[key]), now[key], f"train.{key}", diffs)
        if diffs:
            raise TrainingError(
                f"--resume: {latest} was trained with another model than this config describes "
                f"(checkpoint -> now):\n  " + "\n  ".join(diffs) + "\nA run's model cannot "
                "change: resume with the config it was trained with, or train the new model "
                "in another --out")
        then = {k: v for k, v in recorded.train.items() if k in now}
        changed: list[str] = []
        _diff({k: v for k, v in then.items() if k not in ("data", "stop_after")},
              {k: now[k] for k in then if k not in ("data", "stop_after")}, "train", changed)
        if changed:
            logger.warning("resuming with changed training settings (checkpoint -> now): %s",
                           "; ".join(changed))

    def _check_resume_world(self) -> None:
        """Warn when the number of processes differs from the checkpoint's: the global batch
        (batch_size x grad_accum x processes) changes with it, and with it the data order and
        the effective learning rate."""
        state = self._resume_state or {}
        then_world = state.get("world_size")
        if not isinstance(then_world, int) or then_world == self.world:
            return
        then = state.get("settings") or {}
        b0 = then.get("batch_size", self.s.batch_size)
        a0 = then.get("grad_accum", self.s.grad_accum)
        b1, a1 = self.s.batch_size, self.s.grad_accum
        old, new = b0 * a0 * then_world, b1 * a1 * self.world
        if old == new:
            return
        keep = (f"batch_size x grad_accum = {old // self.world} keeps it"
                if old % self.world == 0 else f"no batch_size x grad_accum keeps {old} on "
                f"{self.world} process(es)")
        logger.warning(
            "resuming on %d process(es), the checkpoint was trained on %d: the global batch "
            "changes from %d segments (batch_size %d x grad_accum %d x %d processes) to %d "
            "(%d x %d x %d); %s", self.world, then_world, old, b0, a0, then_world, new, b1, a1,
            self.world, keep)

    def _trainable_name(self, name: str) -> bool:
        if is_ttt_param(name):
            return self.s.train_ttt
        if is_lora_param(name):
            return self.s.lora.enable
        return self.s.full_finetune

    def _prepare_params(self) -> dict[str, int]:
        counts = {"ttt": 0, "lora": 0, "base": 0, "frozen": 0}
        for name, p in self.lm.named_parameters():
            train = self._trainable_name(name)
            p.requires_grad_(train)
            if not train:
                counts["frozen"] += p.numel()
                continue
            if p.dtype != torch.float32:  # fp32 master weights for everything trained
                p.data = p.data.float()
            counts["ttt" if is_ttt_param(name) else "lora" if is_lora_param(name)
                   else "base"] += p.numel()
        blocks = list(ttt_blocks(self.lm))
        if self.s.train_ttt and counts["ttt"] == 0:
            raise TrainingError(
                f"refusing to train: 0 trainable TTT parameters (TTT blocks found: {len(blocks)}; "
                f"ttt.layers = {self.cfg.ttt.layers}). Select layers in the config's ttt section, "
                f"or set train.train_ttt: false for a LoRA-only run.")
        if counts["ttt"] + counts["lora"] + counts["base"] == 0:
            raise TrainingError("refusing to train: nothing is trainable")
        return counts

    def _optimizer(self) -> None:
        decayed = decayed_names(self.lm)
        scales = outer_lr_scales(self.lm)
        groups: dict[str, list[torch.nn.Parameter]] = {}
        self._lr_scale: dict[str, float] = {}
        for name, p in self.lm.named_parameters():
            if not p.requires_grad:
                continue
            kind = "ttt" if is_ttt_param(name) else "lora" if is_lora_param(name) else "base"
            scale = scales.get(name, 1.0)
            # e.g. "ttt_nodecay_x10": the TTT q/k convs at ttt.qk_conv_lr_scale 10
            key = (f"{kind}{'' if name in decayed else '_nodecay'}"
                   f"{'' if scale == 1.0 else f'_x{scale:g}'}")
            groups.setdefault(key, []).append(p)
            self._lr_scale[key] = scale
        self._peak_lr = {"ttt": self.s.lr, "lora": self.s.lora_lr, "base": self.s.base_lr}
        param_groups = [
            {"params": ps, "lr": self._group_lr(k), "weight_decay": self._group_decay(k),
             "name": k}
            for k, ps in sorted(groups.items())
        ]
        self.opt = torch.optim.AdamW(param_groups, betas=self.s.betas, eps=ADAM_EPS)

    def _group_decay(self, group: str) -> float:
        return 0.0 if "_nodecay" in group else self.s.weight_decay

    def _group_lr(self, group: str) -> float:
        """A group's peak learning rate: its kind's (`lr`, `lora_lr`, `base_lr`) times its scale
        (`outer_lr_scales`)."""
        return self._peak_lr[group.split("_")[0]] * self._lr_scale[group]

    def _set_lr(self, step: int) -> float:
        """The learning rates of `step` (from 1) set on every group, before its update: a pure
        function of the step, so a resumed run follows the same schedule. Returns the first
        group's, which the metrics log for that step."""
        factor = _lr_lambda(step - 1, self.s.warmup_steps, self.s.max_steps, self.s.min_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = self._group_lr(g["name"]) * factor
        return float(self.opt.param_groups[0]["lr"])

    def _data(self) -> None:
        if not self.s.data:
            raise TrainingError("no training data: pass --data INDEX.jsonl (or set train.data)")
        cache = Path(self.s.cache_dir) if self.s.cache_dir else \
            Path(self.s.data).resolve().parent / ".token-cache"
        enc = StreamEncoder(self.mimi, self.tokenizer, Path(self.base.info.tokenizer), cache,
                            device=self.device)

        def loader(index: str) -> SegmentLoader:
            return SegmentLoader(index, enc, self.s.segment_seconds, seed=self.s.seed,
                                 min_seconds=self.s.min_segment_seconds,
                                 show_progress=self.is_main, save_memo=self.is_main)

        def build() -> None:
            self.train_data = loader(self.s.data)
            self.eval_data = loader(self.s.eval_data) if self.s.eval_data else None

        # Rank 0 encodes (filling the cache) while the others wait; then they read the cache.
        # Either phase failing on any rank fails every rank with that rank's message.
        self._agree(build if self.is_main else lambda: None)
        if self.distributed:
            self._agree(lambda: None if self.is_main else build())
        if self._resume_meta is not None:
            self._check_resume_data()
        self.eval_batches = (self.eval_data.eval_batches(self.s.batch_size, self.s.eval_batches)
                             if self.eval_data else [])

    def _data_summary(self) -> dict[str, Any]:
        d = self.train_data
        return {"index": str(d.index), "fingerprint": d.fingerprint, "files": len(d.files),
                "segments": len(d.segments), "segment_frames": d.seg_frames}

    def _check_resume_data(self) -> None:
        """A resumed run continues on the data it was trained on (its position in the seeded
        order means nothing on other data)."""
        want = (self._resume_meta or {}).get("data_fingerprint")
        now = self._data_summary()
        if not want or want == now["fingerprint"]:
            return
        then = (self._resume_state or {}).get("data") or {}
        index = then.get("index") or ((self._resume_state or {}).get("settings") or {}).get("data")
        lines = [f"index: {index!r} -> {now['index']!r}"]
        for key in ("files", "segments", "segment_frames"):
            if key in then and then[key] != now[key]:
                lines.append(f"{key}: {then[key]} -> {now[key]}")
        lines.append(f"fingerprint of the encoded data: {want} -> {now['fingerprint']}")
        raise TrainingError(
            "--resume: the training data differs from the data this run was trained on "
            "(checkpoint -> now):\n  " + "\n  ".join(lines) + "\nResume with the same --data "
            "and segment_seconds, or train on the new data in another --out")

    def _calibrate_ttt(self) -> None:
        """`ttt.qkv_init: whitened` and `ttt.out_init: matched` or `unembedding`, on a fresh run
        only: each TTT block's q/k/v projections start as the whitening of its input (and its wo
        at the scale of that input, fitted to the text head first with `unembedding`) on the
        first training segments, as many as give WHITEN_FRAMES_PER_DIM x d_model frames (a
        covariance of d_model dims needs more frames than dims; at most WHITEN_MAX_BATCHES
        micro-batches), the data position untouched. On rank 0 before sharding, so every rank
        starts from the same projections."""
        blocks = list(ttt_blocks(self.lm))
        if not blocks:  # e.g. LoRA alone
            return
        need = WHITEN_FRAMES_PER_DIM * max(a.block.d_model for a in blocks)
        bs = self.s.batch_size
        # the same segments whatever the process count (unless the cap binds)
        n = min(-(-need // self.train_data.seg_frames), WHITEN_MAX_BATCHES * bs)
        segs = self.train_data.next_global_batch(copy.deepcopy(self.pos), n)
        batches = [self.train_data.batch(segs[i:i + bs]).to(self.device)
                   for i in range(0, n, bs)]
        with self.autocast:
            done = calibrate_ttt(self.lm, batches)
        what = [w for w, on in (("q/k/v projections (ttt.qkv_init whitened)",
                                 self.cfg.ttt.qkv_init == "whitened"),
                                ("read-out (fitted to the text head) and output scale "
                                 "(ttt.out_init unembedding)",
                                 self.cfg.ttt.out_init == "unembedding"),
                                ("output scale (ttt.out_init matched)",
                                 self.cfg.ttt.out_init == "matched")) if on]
        logger.info("%s of %d TTT block(s) set from the first %d training frames (%d segments)",
                    " and ".join(what), len(done), n * self.train_data.seg_frames, n)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        counts = self._prepare_params()
        self._log_start(counts)
        for comp in ("transformer", "depformer"):
            tr = getattr(self.lm, comp, None)
            if tr is not None:
                tr.checkpointing = self.s.activation_checkpointing
        for a in ttt_blocks(self.lm):
            # Inside a checkpointed layer the TTT scan is recomputed anyway; checkpointing its
            # mini-batch groups as well would only add a third forward pass (1.6x on the scan).
            a.block.checkpoint_group = 0 if self.s.activation_checkpointing \
                else self.cfg.ttt.checkpoint_group
        self.lm.train()
        self._data()
        if self.is_main:  # full weights live on rank 0 until sharded
            if self._resume_state is None and self.cfg.ttt.calibrated:
                self._calibrate_ttt()
            self._check_first_batch()
        if self.distributed:
            full = self.lm.state_dict() if self.is_main else {}
            dist_util.shard_model(self.lm)
            dist_util.fill_from_rank0(self.lm, full, self.device)
            del full
        self._optimizer()
        if self._resume_state is not None:
            self._restore(self._resume_state)
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_file = None
        if self.is_main:
            trim_metrics(self.out / "metrics.jsonl", self.start_step)
            metrics_file = open(self.out / "metrics.jsonl", "a")
        tb = self._tensorboard()
        bar = tqdm(total=self.s.max_steps, initial=self.start_step, desc="train", unit="step",
                   disable=not self.is_main, dynamic_ncols=True)
        last: dict[str, Any] = {}
        save_due = False
        try:
            for step in range(self.start_step + 1, self.s.max_steps + 1):
                stopping = self.s.stop_after is not None and step >= self.s.stop_after
                last = self._train_step(step, full=(
                    step % self.s.log_every == 0 or step % self.s.ckpt_every == 0
                    or step == self.s.max_steps or stopping))
                if self.eval_batches and (step % self.s.eval_every == 0
                                          or step == self.s.max_steps):
                    last.update({f"eval/{k}": v for k, v in self.evaluate().items()})
                if self.is_main and (step % self.s.log_every == 0 or step == self.s.max_steps
                                     or last["skipped"]):
                    metrics_file.write(json.dumps(json_safe(last), allow_nan=False) + "\n")
                    metrics_file.flush()
                    if tb is not None:
                        for k, v in last.items():
                            if isinstance(v, (int, float)) and math.isfinite(v):
                                tb.add_scalar(k, v, step)
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}",
                                tok_s=f"{last['tokens_per_s']:.0f}")
                if self.nonfinite_streak >= self.s.max_nonfinite_steps:
                    raise TrainingError(self._divergence_message(step, last))
                save_due |= step % self.s.ckpt_every == 0 or step == self.s.max_steps or stopping
                if save_due and last["skipped"]:
                    logger.warning("step %d: checkpoint postponed to the next step with a finite "
                                   "loss (this one's was not)", step)
                elif save_due:
                    self.save(step, last)
                    save_due = False
                if stopping:
                    logger.info("stopping after step %d as asked (resume with --resume)", step)
                    break
            if save_due:
                logger.warning("no checkpoint after step %s: its loss was not finite; the latest "
                               "checkpoint is %s", last.get("step"), self._latest_name())
        finally:
            bar.close()
            if metrics_file:
                metrics_file.close()
            if tb is not None:
                tb.close()
        return last

    def _latest_name(self) -> str:
        try:
            latest = latest_checkpoint(self.out)
        except CheckpointError:
            latest = None
        return str(latest) if latest is not None else "none (no checkpoint was written)"

    def _divergence_message(self, step: int, last: dict[str, Any]) -> str:
        n = self.nonfinite_streak
        return (f"training diverged: {n} steps in a row (steps {step - n + 1}..{step}) had a "
                f"non-finite loss or gradient norm (last: loss {last['loss']}, grad norm "
                f"{last['grad_norm']}); their updates were skipped and no checkpoint was written "
                f"for them. The latest checkpoint is {self._latest_name()}. Lower the learning "
                f"rate (train.lr is {self.s.lr:g}) or raise train.max_nonfinite_steps "
                f"({self.s.max_nonfinite_steps}), then --resume")

    def _train_step(self, step: int, full: bool = True) -> dict[str, Any]:
        """One optimiser step. Its one host sync reads the global loss and gradient norm (every
        rank must decide alike whether to apply the update); the per-stream figures, peak
        memory and TTT norms, which need more syncs, are computed only when `full` (a step that
        is logged or checkpointed) or when the step is skipped."""
        t0 = time.perf_counter()
        lr = self._set_lr(step)
        B, A, W = self.s.batch_size, self.s.grad_accum, self.world
        segs = self.train_data.next_global_batch(self.pos, B * A * W)
        codes = self.train_data.batch(segs)  # every rank builds the whole global batch (cheap)
        text_total, audio_total = weight_totals(codes, self.lm.delays, self.lm.dep_q,
                                                self.s.loss, TEXT_PADDING_IDS)
        text_total, audio_total = text_total.to(self.device), audio_total.to(self.device)
        sums = None
        for i in range(A):
            lo = (i * W + self.rank) * B
            mb = codes[lo:lo + B].to(self.device)
            if self.distributed:
                self.lm.set_requires_gradient_sync(i == A - 1)
            with self.autocast:
                out = self.lm(mb)
            s = stream_sums(out, mb, self.s.loss, TEXT_PADDING_IDS)
            # FSDP averages gradients over ranks: scale by W so the sum is the global loss.
            loss = combine(s, text_total, audio_total, self.s.loss) * W
            loss.backward()
            flat = s.flat()
            sums = flat if sums is None else sums + flat
        params = [p for p in self.lm.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.s.clip_grad)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        # Global figures, identical on every rank, so every rank takes the same decision.
        total = StreamSums.from_flat(dist_util.all_reduce_sum(sums), self.lm.dep_q)
        loss_value, gnorm = torch.stack([
            combine(total, total.text_w, total.audio_w, self.s.loss).float().reshape(()),
            grad_norm.float().reshape(()).to(total.text_w.device)]).tolist()
        finite = math.isfinite(loss_value) and math.isfinite(gnorm)
        if finite:
            self.opt.step()
            self.nonfinite_streak = 0
        else:
            self.skipped_steps += 1
            self.nonfinite_streak += 1
            logger.warning("step %d: loss %s, grad norm %s: update skipped (%d in a row; the run "
                           "stops at %d)", step, loss_value, gnorm, self.nonfinite_streak,
                           self.s.max_nonfinite_steps)
        self.opt.zero_grad(set_to_none=True)
        full = full or not finite
        if self.device.type == "cuda" and full:  # time the logged steps to their end
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        T = codes.shape[-1]
        tokens = B * A * W * T * (1 + self.lm.dep_q)  # predicted tokens, as moshi-finetune counts
        rec = {
            "step": step, "loss": loss_value,
            "lr": lr, "grad_norm": gnorm, "skipped": not finite,
            "skipped_steps": self.skipped_steps,
            "tokens_per_s": tokens / dt, "step_s": dt, "frames": B * A * W * T,
            "epoch": self.pos.epoch,
        }
        if full:
            rec.update(summarize(total, self.s.loss), peak_mem_mb=_peak_memory_mb(self.device),
                       **self._ttt_norms())
        return rec

    def _ttt_norms(self) -> dict[str, Any]:
        gate, fast = {}, {}
        for a in ttt_blocks(self.lm):
            b = a.block
            alpha = b.gate_alpha
            alpha = alpha.full_tensor() if hasattr(alpha, "full_tensor") else alpha
            key = f"{'' if a.component == 'transformer' else 'dep'}{a.layer}"
            gate[key] = float(torch.tanh(alpha.detach().float()).abs().mean())
            fast[key] = math.sqrt(dist_util.global_norm(b.inner.w1) ** 2
                                  + dist_util.global_norm(b.inner.w2) ** 2)
        return {"gate": gate, "fast_weight_norm": fast} if gate else {}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss with the parallel forward (each sequence from W0). Touches no training
        state: no gradients, no parameter, optimiser or data-order change; train mode restored."""
        was_training = self.lm.training
        self.lm.eval()
        sums = None
        try:
            for codes in self.eval_batches:
                mb = codes.to(self.device)
                with self.autocast:
                    out = self.lm(mb)
                flat = stream_sums(out, mb, self.s.loss, TEXT_PADDING_IDS).flat()
                sums = flat if sums is None else sums + flat
        finally:
            self.lm.train(was_training)
        return summarize(StreamSums.from_flat(sums, self.lm.dep_q), self.s.loss)

    # -- checkpoints ------------------------------------------------------------------------------
    def _nonfinite_params(self) -> list[str]:
        """Trainable parameters holding NaN or inf on any rank (each rank checks its shards)."""
        names, flags = [], []
        for name, p in self.lm.named_parameters():
            if p.requires_grad:
                local = p.to_local() if hasattr(p, "to_local") else p
                names.append(name)
                flags.append((~torch.isfinite(local.detach())).any())
        if not flags:
            return []
        found = dist_util.all_reduce_sum(torch.stack(flags).float())
        return [n for n, f in zip(names, found.tolist()) if f > 0]

    def _checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What a checkpoint holds, gathered on rank 0 (the others get empty dicts): the trainable
        parameters only (DCP's ignore_frozen_params: the frozen base is never gathered), plus the
        TTT tensors when they are frozen (a LoRA-only run still ships its TTT blocks); and the
        optimiser state."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        sd = get_model_state_dict(self.lm, options=opts)
        for name, p in self.lm.named_parameters():
            if is_ttt_param(name) and not p.requires_grad:
                t = p.full_tensor() if hasattr(p, "full_tensor") else p
                if self.is_main:
                    sd[name] = t.detach().cpu()
        osd = get_optimizer_state_dict(self.lm, self.opt,
                                       options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
        return sd, osd

    def save(self, step: int, last: dict[str, Any]) -> Path | None:
        bad = self._nonfinite_params()
        if bad:
            raise TrainingError(
                f"step {step}: the trained weights hold NaN or inf ({', '.join(bad[:5])}"
                f"{', ...' if len(bad) > 5 else ''}); no checkpoint written. The latest "
                f"checkpoint is {self._latest_name()}. Lower the learning rate (train.lr is "
                f"{self.s.lr:g}), then --resume")
        tensors, osd = self._checkpoint_state()

        def write() -> Path | None:
            if not self.is_main:
                return None
            state = {
                "step": step, "optimizer": osd,
                "position": asdict(self.pos), "settings": self.s.model_dump(mode="json"),
                "rng": {"torch": torch.random.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                        else None},
                "world_size": self.world,
                "skipped_steps": self.skipped_steps,
                "nonfinite_streak": self.nonfinite_streak,
                "data": self._data_summary(),
            }
            cfg = self.cfg.model_copy(deep=True)
            cfg.train = {**cfg.train, **self.s.model_dump(mode="json")}
            summary = {k: v for k, v in last.items() if isinstance(v, (int, float))}
            return save_checkpoint(self.out, step, tensors, cfg, self.base, self.dims,
                                   data_fingerprint=self.train_data.fingerprint,
                                   trainer_state=state, summary=summary,
                                   keep=self.s.keep_checkpoints)

        # rank 0 writes; a failure there (disk full, ...) fails every rank with its message
        return self._agree(write)

    def _restore(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_optimizer_state_dict,
        )

        # Under torchrun rank 0 alone holds the optimiser state and broadcasts it.
        osd = state["optimizer"] if self.is_main else {}
        set_optimizer_state_dict(self.lm, self.opt, optim_state_dict=osd,
                                 options=StateDictOptions(full_state_dict=True,
                                                          broadcast_from_rank0=self.distributed))
        # this run's settings and grouping, not the saved ones: a changed setting is announced
        # at start ("resuming with changed training settings") and must then be what is applied
        for g in self.opt.param_groups:
            g["weight_decay"] = self._group_decay(g["name"])
            g["betas"] = tuple(self.s.betas)
            g["eps"] = ADAM_EPS
        self.pos = LoaderPosition(**state["position"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        rng = state.get("rng") or {}
        if rng.get("torch") is not None:
            torch.random.set_rng_state(rng["torch"])
        if rng.get("numpy") is not None:
            np.random.set_state(rng["numpy"])
        if rng.get("python") is not None:
            random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # -- reporting --------------------------------------------------------------------------------
    def _check_first_batch(self) -> None:
        """Stream the first training batch's first row through the model (no update, the data
        position untouched) and warn, naming the layer, when a TTT layer's inner output no
        longer depends on its input (see `moshi-ttt diagnose-ttt`)."""
        from ..diagnostics import COLLAPSE_RATIO, first_batch_report

        if not any(a.component == "transformer" for a in ttt_blocks(self.lm)):
            return
        segs = self.train_data.next_global_batch(copy.deepcopy(self.pos), 1)
        codes = self.train_data.batch(segs).to(self.device)
        with self.autocast:
            report = first_batch_report(self.lm, codes)
        bad = [lay for lay in report["layers"] if lay["collapsed"]]
        for lay in report["layers"]:
            if "keys" in lay:
                logger.info("TTT layer %d, first batch (%d frames): keys' mean cosine %.3f, "
                            "crosstalk %.3f (the share of a write another key reads back)",
                            lay["layer"], lay["keys"]["frames"], lay["keys"]["key_cosine"],
                            lay["keys"]["crosstalk"])
        for lay in bad:
            logger.warning(
                "TTT layer %d: its inner output collapsed on the first batch (input dependence "
                "%.3f of its value at W0 after %d frames, below %.2f): the layer outputs about "
                "a constant and will learn nothing. Check ttt.inner_init (scaled), ttt.base_lr "
                "and ttt.ln_eps; `moshi-ttt diagnose-ttt` shows it over time",
                lay["layer"], lay["final_ratio"], lay["series"][-1]["frame"], COLLAPSE_RATIO)
        self.first_batch_collapsed = [lay["layer"] for lay in bad]

    def _log_start(self, counts: dict[str, int]) -> None:
        d = self.dims
        blocks = list(ttt_blocks(self.lm))
        logger.info("device %s, %d process(es), model dtype %s, autocast %s",
                    self.device, self.world, str(self.model_dtype).removeprefix("torch."),
                    not isinstance(self.autocast, nullcontext))
        logger.info("main transformer: d_model %d, %d heads, %d layers, context %s; depformer: %s",
                    d.main.d_model, d.main.num_heads, d.main.num_layers, d.main.context,
                    f"d_model {d.depformer.d_model}, {d.depformer.num_heads} heads, "
                    f"{d.depformer.num_layers} layers" if d.depformer else "none")
        logger.info("TTT blocks: %d (main layers %s, depformer layers %s), K=%d, base_lr %g",
                    len(blocks), [a.layer for a in blocks if a.component == "transformer"],
                    [a.layer for a in blocks if a.component == "depformer"],
                    self.cfg.ttt.mini_batch_size, self.cfg.ttt.base_lr)
        logger.info("trainable parameters: TTT %s, LoRA %s, base %s; frozen %s",
                    f"{counts['ttt']:,}", f"{counts['lora']:,}", f"{counts['base']:,}",
                    f"{counts['frozen']:,}")
        total = count_params(self.lm)
        logger.info("parameter counts: %s", {k: f"{v:,}" for k, v in total.items()})

    def _tensorboard(self):
        if not (self.s.tensorboard and self.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("tensorboard requested but not installed (pip install tensorboard)")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))


def train(cfg: ProjectConfig, settings: TrainSettings, out_dir: str | Path,
          base_override: BaseModelRef | None = None, resume: bool = False) -> dict[str, Any]:
    clean = False
    try:
        last = Trainer(cfg, settings, out_dir, base_override, resume).run()
        clean = True
        return last
    finally:
        dist_util.shutdown(clean=clean)

"""`moshi-ttt train`: frozen base, trainable TTT (optionally LoRA or full fine-tuning), FSDP2.

One process or `torchrun --nproc_per_node N`: the same code, the same global batch
(batch_size x grad_accum x world segments), the same loss (see `loss.py` for why it is exact).
A run directory receives `metrics.jsonl`, `train.log`-style logging, and checkpoints that
`moshi-ttt serve --checkpoint RUN_DIR` loads as they are.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..base import ResolvedBase, resolve_base
from ..checkpoint import (
    TRAINER_STATE, assemble_model, find_checkpoint, latest_checkpoint, load_model,
    save_checkpoint,
)
from ..config import BaseModelRef, ProjectConfig
from ..data.encode import StreamEncoder
from ..data.loader import LoaderPosition, SegmentLoader
from ..dims import count_params
from ..lora import is_lora_param
from ..model import is_ttt_param, ttt_blocks
from . import distributed as dist_util
from .loss import StreamSums, combine, stream_sums, summarize, weight_totals
from .settings import TrainSettings

logger = logging.getLogger(__name__)

TEXT_PADDING_IDS = (3, 0)


class TrainingError(RuntimeError):
    """The run cannot start or continue; the message says why and what to do."""


def _device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Trainer:
    def __init__(self, cfg: ProjectConfig, settings: TrainSettings, out_dir: str | Path,
                 base_override: BaseModelRef | None = None, resume: bool = False):
        self.cfg = cfg
        self.s = settings
        self.out = Path(out_dir)
        self.device = _device(settings.device)
        self.rank, self.world = dist_util.init(self.device)
        self.is_main = self.rank == 0
        if self.device.type == "cuda" and dist_util.is_torchrun():
            import os

            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        bf16 = settings.precision == "bf16" or (settings.precision == "auto"
                                                and self.device.type == "cuda")
        self.model_dtype = torch.bfloat16 if bf16 else torch.float32
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if bf16 else nullcontext())
        self._seed(settings.seed)
        self.start_step = 0
        self.pos = LoaderPosition()
        self._resume_state: dict[str, Any] | None = None
        self._load(base_override, resume)

    # -- setup ----------------------------------------------------------------------------------
    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _load(self, base_override: BaseModelRef | None, resume: bool) -> None:
        latest = latest_checkpoint(self.out) if (self.out / "checkpoints").exists() else None
        if latest is not None and not resume:
            raise TrainingError(f"{self.out} already holds checkpoints (latest {latest.name}); "
                                f"pass --resume to continue that run, or choose another --out")
        if resume and latest is not None:
            loaded = load_model(latest, self.device, self.model_dtype, with_codec=True,
                                base_override=base_override)
            self.cfg = loaded.cfg
            self.lm, self.base, self.dims = loaded.lm, loaded.base, loaded.dims
            self.mimi, self.tokenizer = loaded.mimi, loaded.tokenizer
            self._resume_state = torch.load(latest / TRAINER_STATE, map_location="cpu",
                                            weights_only=False)
            self.start_step = int(self._resume_state["step"])
            logger.info("resuming %s from %s (step %d)", self.out, latest, self.start_step)
        else:
            if resume:
                logger.info("--resume: %s has no checkpoint yet, starting fresh", self.out)
            self.base = resolve_base(base_override or self.cfg.base)
            self.lm, self.dims = assemble_model(self.cfg, self.base, self.device,
                                                self.model_dtype, seed=self.s.seed,
                                                context="base " + str(self.base.ref))
            self.mimi = self.base.info.get_mimi(device=self.device)
            self.tokenizer = self.base.info.get_text_tokenizer()
        for p in self.mimi.parameters():
            p.requires_grad_(False)

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
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for name, p in self.lm.named_parameters():
            if not p.requires_grad:
                continue
            kind = "ttt" if is_ttt_param(name) else "lora" if is_lora_param(name) else "base"
            decay = p.dim() >= 2
            groups.setdefault(f"{kind}{'' if decay else '_nodecay'}", []).append(p)
        lrs = {"ttt": self.s.lr, "lora": self.s.lora_lr, "base": self.s.base_lr}
        param_groups = [
            {"params": ps, "lr": lrs[k.split("_")[0]],
             "weight_decay": 0.0 if k.endswith("_nodecay") else self.s.weight_decay, "name": k}
            for k, ps in sorted(groups.items())
        ]
        self.opt = torch.optim.AdamW(param_groups, betas=self.s.betas, eps=1e-8)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda step: _lr_lambda(step, self.s.warmup_steps, self.s.max_steps,
                                              self.s.min_lr_ratio))

    def _data(self) -> None:
        if not self.s.data:
            raise TrainingError("no training data: pass --data INDEX.jsonl (or set train.data)")
        cache = Path(self.s.cache_dir) if self.s.cache_dir else \
            Path(self.s.data).resolve().parent / ".token-cache"
        enc = StreamEncoder(self.mimi, self.tokenizer, Path(self.base.info.tokenizer), cache,
                            device=self.device)
        if self.world > 1 and not self.is_main:  # rank 0 encodes, the others read its cache
            torch.distributed.barrier()

        def loader(index: str) -> SegmentLoader:
            return SegmentLoader(index, enc, self.s.segment_seconds, seed=self.s.seed,
                                 min_seconds=self.s.min_segment_seconds,
                                 show_progress=self.is_main)

        self.train_data = loader(self.s.data)
        self.eval_data = loader(self.s.eval_data) if self.s.eval_data else None
        if self.world > 1 and self.is_main:
            torch.distributed.barrier()
        self.eval_batches = (self.eval_data.eval_batches(self.s.batch_size, self.s.eval_batches)
                             if self.eval_data else [])

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
        if self.world > 1:
            dist_util.shard_model(self.lm)
        self._optimizer()
        if self._resume_state is not None:
            self._restore(self._resume_state)
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_file = open(self.out / "metrics.jsonl", "a") if self.is_main else None
        tb = self._tensorboard()
        bar = tqdm(total=self.s.max_steps, initial=self.start_step, desc="train", unit="step",
                   disable=not self.is_main, dynamic_ncols=True)
        last: dict[str, Any] = {}
        try:
            for step in range(self.start_step + 1, self.s.max_steps + 1):
                last = self._train_step(step)
                if self.eval_batches and (step % self.s.eval_every == 0
                                          or step == self.s.max_steps):
                    last.update({f"eval/{k}": v for k, v in self.evaluate().items()})
                if self.is_main and (step % self.s.log_every == 0 or step == self.s.max_steps):
                    metrics_file.write(json.dumps(last) + "\n")
                    metrics_file.flush()
                    if tb is not None:
                        for k, v in last.items():
                            if isinstance(v, (int, float)):
                                tb.add_scalar(k, v, step)
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}",
                                tok_s=f"{last['tokens_per_s']:.0f}")
                stopping = self.s.stop_after is not None and step >= self.s.stop_after
                if step % self.s.ckpt_every == 0 or step == self.s.max_steps or stopping:
                    self.save(step, last)
                if stopping:
                    logger.info("stopping after step %d as asked (resume with --resume)", step)
                    break
        finally:
            bar.close()
            if metrics_file:
                metrics_file.close()
            if tb is not None:
                tb.close()
        return last

    def _train_step(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
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
            if W > 1:
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
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        total = StreamSums.from_flat(dist_util.all_reduce_sum(sums), self.lm.dep_q)
        T = codes.shape[-1]
        tokens = B * A * W * T * (1 + self.lm.dep_q)  # predicted tokens, as moshi-finetune counts
        rec: dict[str, Any] = {
            "step": step, **summarize(total, self.s.loss),
            "lr": self.opt.param_groups[0]["lr"], "grad_norm": float(grad_norm),
            "tokens_per_s": tokens / dt, "step_s": dt, "frames": B * A * W * T,
            "peak_mem_mb": _peak_memory_mb(self.device), "epoch": self.pos.epoch,
            **self._ttt_norms(),
        }
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
    def _full_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(self.lm, options=opts)
        osd = get_optimizer_state_dict(self.lm, self.opt, options=opts)
        keep = {k: v for k, v in sd.items()
                if is_ttt_param(k) or (is_lora_param(k) and self.s.lora.enable)
                or self.s.full_finetune}
        return keep, osd

    def save(self, step: int, last: dict[str, Any]) -> Path | None:
        tensors, osd = self._full_state()
        path = None
        if self.is_main:
            state = {
                "step": step, "optimizer": osd, "scheduler": self.sched.state_dict(),
                "position": asdict(self.pos), "settings": self.s.model_dump(mode="json"),
                "rng": {"torch": torch.random.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                        else None},
                "world_size": self.world,
            }
            cfg = self.cfg.model_copy(deep=True)
            cfg.train = {**cfg.train, **self.s.model_dump(mode="json")}
            summary = {k: v for k, v in last.items() if isinstance(v, (int, float))}
            path = save_checkpoint(self.out, step, tensors, cfg, self.base, self.dims,
                                   data_fingerprint=self.train_data.fingerprint,
                                   trainer_state=state, summary=summary,
                                   keep=self.s.keep_checkpoints)
        if self.world > 1:
            torch.distributed.barrier()
        return path

    def _restore(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_optimizer_state_dict,
        )

        set_optimizer_state_dict(self.lm, self.opt, optim_state_dict=state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.sched.load_state_dict(state["scheduler"])
        self.pos = LoaderPosition(**state["position"])
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
    trainer = Trainer(cfg, settings, out_dir, base_override, resume)
    try:
        return trainer.run()
    finally:
        dist_util.shutdown()

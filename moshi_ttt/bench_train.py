"""`moshi-ttt bench train`: the trainer's own step at a config's real size, with random weights
and random tokens, so Moshi 7B can be measured without its 15 GB of weights or a dataset.

It runs `Trainer` itself (same precision policy, activation checkpointing, loss, optimiser), only
swapping where the model and the batches come from, and prints tokens/s, seconds per step and
peak memory next to a memory plan computed on paper from the parameter counts.

`--method lora` measures the baseline TTT is compared with: the same base and batches without
TTT layers, with LoRA adapters of rank 128 on the main transformer (moshi-finetune's default
rank), trained alone.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import ProjectConfig
from .lora import apply_lora_from_config
from .data.loader import LoaderPosition
from .dims import count_params, detect_dims
from .model import build_ttt_lm
from .train.settings import LoRASettings, TrainSettings
from .train.trainer import Trainer

logger = logging.getLogger(__name__)

GIB = 2**30
METHODS = ("ttt", "lora")
LORA_RANK = 128  # moshi-finetune's default


def method_config(cfg: ProjectConfig, method: str, lora_rank: int = LORA_RANK
                  ) -> tuple[ProjectConfig, dict[str, Any]]:
    """The config and training-settings overrides of `method`: `ttt` is the config as it is
    (TTT layers trained, base frozen); `lora` drops the TTT layers and trains LoRA adapters of
    `lora_rank` on the main transformer's linears instead."""
    if method == "ttt":
        return cfg, {}
    if method != "lora":
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    out = cfg.model_copy(deep=True)
    out.ttt.layers, out.ttt.depformer_layers = [], []
    lora = {"enable": True, "rank": lora_rank, "scaling": 2.0, "components": ["transformer"]}
    out.train = {**out.train, "lora": lora}
    return out, {"train_ttt": False, "lora": LoRASettings(**lora)}


class SyntheticSegments:
    """Random token sequences shaped like the trainer's batches ([B, 1 + n_q, T])."""

    def __init__(self, frames: int, n_q: int, card: int, text_card: int, seed: int = 0):
        self.frames, self.n_q, self.card, self.text_card = frames, n_q, card, text_card
        self.seg_frames = frames  # as SegmentLoader's
        self.gen = torch.Generator().manual_seed(seed)
        self.fingerprint = f"synthetic-{frames}"

    def next_global_batch(self, pos: LoaderPosition, n: int) -> list[int]:
        pos.cursor += n
        return list(range(n))

    def batch(self, segments: list[int]) -> torch.Tensor:
        B = len(segments)
        codes = torch.randint(0, self.card, (B, 1 + self.n_q, self.frames), generator=self.gen)
        codes[:, 0] = torch.randint(0, self.text_card, (B, self.frames), generator=self.gen)
        return codes


class RandomWeightsTrainer(Trainer):
    """`Trainer` on a random-initialised model of `cfg` and synthetic batches; saves nothing."""

    def __init__(self, cfg: ProjectConfig, settings: TrainSettings, frames: int, out_dir: Path):
        self.frames = frames
        super().__init__(cfg, settings, out_dir)

    def _load(self, base_override, resume) -> None:
        self.lm = build_ttt_lm(self.cfg, device=self.device, dtype=self.model_dtype)
        apply_lora_from_config(self.lm, self.cfg)  # `--method lora` (fresh adapters: B = 0)
        self.dims = detect_dims(self.lm)
        self.base = None
        self.mimi = self.tokenizer = None

    def _data(self) -> None:
        self.train_data = SyntheticSegments(self.frames, self.lm.n_q, self.lm.card,
                                            self.lm.text_card, seed=self.s.seed)
        self.eval_data = None
        self.eval_batches = []

    def save(self, step: int, last: dict[str, Any]) -> None:
        return None


def memory_plan(cfg: ProjectConfig, frames: int, batch: int) -> dict[str, float]:
    """GiB needed on one GPU for TTT-only training, from the counts of the meta-built model:
    frozen base in bf16; TTT parameters as fp32 master weights + fp32 grads + AdamW's two fp32
    moments (16 bytes each); activations with per-layer checkpointing: each layer's bf16 input
    kept for the backward pass, plus one layer recomputed at a time (its attention, TTT and
    feed-forward intermediates, rounded up generously)."""
    lm = build_ttt_lm(cfg, device="meta", dtype=torch.bfloat16)
    counts = count_params(lm)
    d = detect_dims(lm)
    tokens = batch * frames
    layer_inputs = d.main.num_layers * tokens * d.main.d_model * 2
    one_layer = tokens * (6 * d.main.d_model + 3 * d.main.ffn_hidden) * 4  # fp32-ish, generous
    depformer = tokens * lm.dep_q * d.depformer.num_layers * d.depformer.d_model * 2 * 8 \
        if d.depformer else 0
    logits = tokens * (lm.text_card + lm.dep_q * lm.card) * 4 * 2  # fp32 logits and their grad
    plan = {
        "base_weights_bf16": counts["base"] * 2 / GIB,
        "ttt_weights_fp32": counts["ttt_total"] * 4 / GIB,
        "ttt_grads_fp32": counts["ttt_total"] * 4 / GIB,
        "adamw_states_fp32": counts["ttt_total"] * 8 / GIB,
        "activations_checkpointed": (layer_inputs + one_layer + depformer) / GIB,
        "logits": logits / GIB,
    }
    plan["total"] = sum(plan.values())
    return plan


def steady_rate(recs: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per step and tokens per second over the steps `recs`: all their tokens over all
    their time (a mean of each step's rate would weigh a fast step more than its time, and
    tokens/s x s/step would not give the step's tokens)."""
    seconds = sum(r["step_s"] for r in recs)
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in recs)
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / len(recs)}


def run_bench(cfg: ProjectConfig, steps: int, frames: int, batch: int, device: str,
              checkpointing: bool = True, json_out: Path | None = None,
              method: str = "ttt") -> dict[str, Any]:
    from rich.console import Console

    cfg, overrides = method_config(cfg, method)
    settings = TrainSettings(batch_size=batch, grad_accum=1, max_steps=steps, lr=1e-4,
                             warmup_steps=1, ckpt_every=10**9, eval_every=10**9, log_every=1,
                             activation_checkpointing=checkpointing, device=device, **overrides)
    plan = memory_plan(cfg, frames, batch)
    with tempfile.TemporaryDirectory(prefix="moshi-ttt-bench-train-") as tmp:
        trainer = RandomWeightsTrainer(cfg, settings, frames, Path(tmp))
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        trainer.run()
        recs = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    steady = recs[1:] or recs  # the first step pays for allocation and kernel selection
    dev = trainer.device
    res = {
        "method": method,
        "lora_rank": overrides["lora"].rank if "lora" in overrides else None,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(trainer.model_dtype).removeprefix("torch."),
        "frames": frames, "batch": batch, "steps": steps, "checkpointing": checkpointing,
        **steady_rate(steady),
        "peak_mem_gib": max(r["peak_mem_mb"] for r in recs) / 1024,
        "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"],
        "plan_gib": {k: round(v, 2) for k, v in plan.items()},
        "params": count_params(trainer.lm),
        "trainable": sum(p.numel() for p in trainer.lm.parameters() if p.requires_grad),
    }
    con = Console(width=160)
    what = f"LoRA rank {res['lora_rank']}, no TTT" if method == "lora" else "TTT"
    con.print(f"[bold]moshi-ttt bench train[/] ({what}) on {res['device']} ({res['dtype']} base), "
              f"batch {batch} x {frames} frames, checkpointing {checkpointing}")
    con.print(f"steady state over {len(steady)} step(s): {res['tokens_per_s']:,.0f} tokens/s, "
              f"{res['step_s']:.3f} s/step; peak memory {res['peak_mem_gib']:.2f} GiB "
              f"({'CUDA allocator' if dev.type == 'cuda' else 'process RSS'}); "
              f"loss {res['loss_first']:.3f} -> {res['loss_last']:.3f}")
    con.print("memory plan on paper (GiB): " + ", ".join(
        f"{k} {v:.2f}" for k, v in res["plan_gib"].items()))
    if json_out:
        json_out.write_text(json.dumps(res, indent=2))
    return res


def compare(results: dict[str, dict[str, Any]], json_out: Path | None = None) -> dict[str, Any]:
    """Print and return TTT against LoRA, each measured in its own process."""
    from rich.console import Console
    from rich.table import Table

    ttt, lora = results["ttt"], results["lora"]
    ratio = {"step_s": ttt["step_s"] / lora["step_s"],
             "tokens_per_s": ttt["tokens_per_s"] / lora["tokens_per_s"],
             "peak_mem_gib": ttt["peak_mem_gib"] / lora["peak_mem_gib"]}
    t = Table(title=f"TTT vs LoRA (rank {lora['lora_rank']}), batch {ttt['batch']} x "
                    f"{ttt['frames']} frames on {ttt['device']}")
    for col in ("", "s/step", "tokens/s", "peak GiB", "trainable"):
        t.add_column(col, justify="right")
    for name, r in (("TTT", ttt), ("LoRA", lora)):
        t.add_row(name, f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}",
                  f"{r['peak_mem_gib']:.2f}", f"{r['trainable']:,}")
    t.add_row("TTT / LoRA", f"{ratio['step_s']:.2f}x", f"{ratio['tokens_per_s']:.2f}x",
              f"{ratio['peak_mem_gib']:.2f}x", "")
    Console(width=160).print(t)
    out = {"ttt": ttt, "lora": lora, "ratio": ratio}
    if json_out:
        json_out.write_text(json.dumps(out, indent=2))
    return out

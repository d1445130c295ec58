"""Training settings: the config's `train` section, with command-line overrides on top."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .loss import LossWeights


class LoRASettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enable: bool = False
    rank: int = Field(16, ge=1)
    scaling: float = 2.0
    components: list[str] = Field(default_factory=lambda: ["transformer"])


class TrainSettings(BaseModel):
    """Every knob of a run. Batch figures are per process: the global batch is
    batch_size x grad_accum x world_size segments."""

    model_config = ConfigDict(extra="forbid")

    data: str | None = None  # train index (.jsonl)
    eval_data: str | None = None  # held-out index (.jsonl)
    cache_dir: str | None = None  # token cache; default: <train index dir>/.token-cache
    # Bounds below turn a value that would crash after minutes of loading (a zero interval:
    # ZeroDivisionError) or silently train something else (clip_grad <= 0 zeroes or flips the
    # gradients, segment_seconds <= 0 makes 1-frame segments) into one line before anything loads.
    segment_seconds: float = Field(20.0, gt=0)
    min_segment_seconds: float = Field(1.0, ge=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(100, ge=1)
    # stop after this step, as if interrupted (resumable)
    stop_after: int | None = Field(None, ge=1)
    lr: float = Field(1e-3, ge=0)  # TTT parameters
    lora_lr: float = Field(2e-4, ge=0)  # LoRA adapters
    base_lr: float = Field(2e-5, ge=0)  # base weights, only with full_finetune
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = \
        (0.9, 0.95)
    warmup_steps: int = Field(10, ge=0)
    # cosine decay to lr * min_lr_ratio at max_steps
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    clip_grad: float = Field(1.0, gt=0)  # max global gradient norm
    # A step whose loss or gradient norm is NaN/inf is skipped (no update, no checkpoint); this
    # many in a row stop the run with an error (divergence), leaving `latest` at a good one.
    max_nonfinite_steps: int = Field(5, ge=1)
    seed: int = 0
    ckpt_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(3, ge=0)  # 0: keep all
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=0)
    log_every: int = Field(1, ge=1)
    activation_checkpointing: bool = True
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    device: str = "auto"
    lora: LoRASettings = Field(default_factory=LoRASettings)
    full_finetune: bool = False
    train_ttt: bool = True  # false: a LoRA-only baseline with the TTT blocks frozen or absent
    loss: LossWeights = Field(default_factory=LossWeights)
    tensorboard: bool = False

    @classmethod
    def from_config(cls, section: dict[str, Any], overrides: dict[str, Any]) -> "TrainSettings":
        merged = {**section, **{k: v for k, v in overrides.items() if v is not None}}
        return cls.model_validate(merged)

"""Project configuration: one YAML file describes the base model, its LM architecture and the TTT.

The `lm` section holds moshi's own LM kwargs (the keys of `moshi.models.loaders._lm_kwargs`, i.e.
what a Hugging Face repo's config.json holds), so a config can be written from a repo's config and
a repo's config can be checked against a YAML file. These values are *claims*: the dims the code
trusts are read from the built modules (`moshi_ttt.dims`) and cross-checked against this file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_RANGE = re.compile(r"^\s*(\d+)\s*(?:\.\.|-|:)\s*(\d+)\s*$")


def parse_layers(spec: str | int | list[int] | None) -> list[int]:
    """Parse a layer selection: "8..23" (inclusive), "8-23", "3", [1, 5, 7], or None/[] for none."""
    if spec is None:
        return []
    if isinstance(spec, bool):
        raise ValueError(f"layer selection must be a range like '8..23' or a list, got {spec!r}")
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            return []
        m = _RANGE.match(text)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"layer range {spec!r} is empty (end before start)")
            return list(range(lo, hi + 1))
        if text.isdigit():
            return [int(text)]
        try:
            return sorted({int(p) for p in text.split(",")})
        except ValueError:
            raise ValueError(
                f"cannot parse layer selection {spec!r}: expected 'A..B', 'A-B', 'A,B,C' or a list"
            ) from None
    layers = [int(i) for i in spec]
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer selection {spec!r} lists a layer twice")
    return sorted(layers)


class TTTConfig(BaseModel):
    """Where TTT blocks go and how their inner (fast-weight) learner behaves."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] = Field(default_factory=list, description="main-transformer layer indices")
    depformer_layers: list[int] = Field(default_factory=list, description="depformer layer indices")
    mini_batch_size: int = Field(16, ge=1, description="K: frames per inner mini-batch")
    base_lr: float = Field(1.0, gt=0, description="inner learning rate scale: a frame whose lr gate is fully open closes about its whole residual for its own key (ttt-lm: 0.1 with the mean scale, far too weak to store one frame; see the README)")
    mlp_expansion: int = Field(4, ge=1, description="inner MLP hidden = expansion * head_dim")
    gate_init: float = Field(0.1, description="initial value of the per-channel gate alpha")
    num_heads: int | None = Field(
        None, description="TTT heads; default: the attention heads of the host transformer"
    )
    learn_token_offset: bool = Field(
        False, description="learn an offset on the position scale 1/(i+1) (clamped >= 0)"
    )
    checkpoint_group: int = Field(
        4, ge=1, description="mini-batches per activation-checkpoint group of the TTT scan in "
        "training, used when the trainer does not checkpoint whole layers (inside a "
        "checkpointed layer it would only add a third forward pass)")
    ln_eps: float = 1e-6
    inner_init: Literal["scaled", "reference"] = Field(
        "scaled", description="W0 at init: `scaled` W1 ~ N(0, 1) and W2 ~ N(0, 1/hidden), so the "
        "inner LayerNorm sees an output of variance ~0.4 at unit-norm keys; `reference` "
        "N(0, 0.02) as ttt-lm (collapses with L2-normalised keys: variance ~2 ln_eps at head dim "
        "16)")
    forget: Literal["none", "decay", "weight_norm"] = Field(
        "decay", description="what a committed state does: `decay` toward W0 by a learned per-head "
        "fraction per mini-batch, `weight_norm` rescales each unit's [W; b] column to W0's norm")
    decay_init: float = Field(1e-3, gt=0, lt=1, description="`decay`: initial fraction per "
                              "mini-batch (learned per head)")
    rope: bool = Field(False, description="rotary embedding of q and k by position in the "
                       "mini-batch (t mod K), as ttt-lm")
    qk_conv: int = Field(4, ge=0, description="kernel (frames) of a causal depthwise conv on the "
                         "q and k projections, as ttt-lm's conv_q/conv_k (0: none): lets a key "
                         "hold the frames just before it (e.g. key = previous token)")
    qk_conv_init: Literal["identity", "shift"] = Field(
        "identity", description="the q/k convs at init, bias 0: `identity` (q and k the current "
        "frame) or `shift` (q the current frame, k the frame before it: a frame's value is "
        "stored under the context that preceded it, so the current frame's query retrieves what "
        "followed it before, as H3's shift on the keys; measured: it learned slower)")
    share_qk: bool = Field(False, description="q and k from one projection, told apart by their "
                           "own convs (needs qk_conv), as ttt-lm's share_qk")
    position_scale: Literal["mean", "sum"] = Field(
        "sum", description="s_i: `mean` 1/(i+1) (the reference: mini-batch GD on the mean "
        "gradient), `sum` 1 (every frame writes with its own lr, within a mini-batch and after)")

    @model_validator(mode="after")
    def _share_qk_needs_convs(self) -> "TTTConfig":
        if self.share_qk and self.qk_conv < 1:
            raise ValueError("ttt.share_qk needs ttt.qk_conv >= 1: without their convs q and k "
                             "would be the same vector")
        return self

    @field_validator("layers", "depformer_layers", mode="before")
    @classmethod
    def _parse_layers(cls, v: Any) -> list[int]:
        return parse_layers(v)

    @field_validator("layers", "depformer_layers")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        if any(i < 0 for i in v):
            raise ValueError(f"layer indices must be >= 0, got {v}")
        return v


class BaseModelRef(BaseModel):
    """Where the frozen base Moshi comes from: a Hugging Face repo or a local directory laid out
    like one (config.json optional, model.safetensors, Mimi weights, tokenizer)."""

    model_config = ConfigDict(extra="forbid")

    hf_repo: str | None = None
    local_dir: str | None = None
    revision: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "BaseModelRef":
        """Both sources given used to mean the local one, silently; a revision of a local
        directory was dropped."""
        if self.hf_repo and self.local_dir:
            raise ValueError(f"the base comes from a Hugging Face repo or a local directory, not "
                             f"both (hf_repo {self.hf_repo!r}, local_dir {self.local_dir!r})")
        if self.revision and not self.hf_repo:
            raise ValueError(f"a revision ({self.revision!r}) applies to a Hugging Face repo; "
                             f"none is given")
        return self


class ProjectConfig(BaseModel):
    """Top-level YAML: `base`, `lm` (moshi LM kwargs) and `ttt`; later sections are optional."""

    model_config = ConfigDict(extra="forbid")

    base: BaseModelRef = Field(default_factory=BaseModelRef)
    lm: dict[str, Any]
    ttt: TTTConfig = Field(default_factory=TTTConfig)
    # Overrides of moshi's Mimi config (`loaders._mimi_config`, nested per section); None = the
    # real Mimi. The tiny config uses a narrow Mimi of the same architecture and frame rate.
    mimi: dict[str, Any] | None = None
    # How `init-base` calibrates a random Mimi on speech (moshi_ttt.codec.calibrate's
    # CalibrationSettings; empty = its defaults).
    codec_calibration: dict[str, Any] = Field(default_factory=dict)
    # Free-form sections owned by other subsystems (trainer, server, eval); each validates its own.
    train: dict[str, Any] = Field(default_factory=dict)
    serve: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_lm(self) -> "ProjectConfig":
        required = ("dim", "num_heads", "num_layers", "n_q", "dep_q", "card", "text_card", "delays")
        missing = [k for k in required if k not in self.lm]
        if missing:
            raise ValueError(f"lm section is missing required keys: {missing}")
        if len(self.lm["delays"]) != self.lm["n_q"] + 1:
            raise ValueError(
                f"lm.delays has {len(self.lm['delays'])} entries, expected n_q + 1 = "
                f"{self.lm['n_q'] + 1}"
            )
        n = int(self.lm["num_layers"])
        bad = [i for i in self.ttt.layers if i >= n]
        if bad:
            raise ValueError(f"ttt.layers {bad} out of range: the main transformer has {n} layers")
        nd = int(self.lm.get("depformer_num_layers", self.lm["num_layers"]))
        bad = [i for i in self.ttt.depformer_layers if i >= nd]
        if bad:
            raise ValueError(f"ttt.depformer_layers {bad} out of range: the depformer has {nd} layers")
        return self

    @property
    def text_card(self) -> int:
        return int(self.lm["text_card"])

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid; the message names the file."""


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ProjectConfig:
    """Load and validate a YAML config; `overrides` is merged (one level deep per section)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(raw).__name__}")
    if overrides:
        raw = merge_sections(raw, overrides)
    try:
        return ProjectConfig.model_validate(raw)
    except ValueError as e:
        raise ConfigError(f"invalid config {path}:\n{e}") from e


def merge_sections(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(raw)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out

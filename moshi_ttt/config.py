"""Project configuration: one YAML file describes the base model, its LM architecture and the TTT.

The `lm` section holds moshi's own LM kwargs (the keys of `moshi.models.loaders._lm_kwargs`, i.e.
what a Hugging Face repo's config.json holds), so a config can be written from a repo's config and
a repo's config can be checked against a YAML file. These values are *claims*: the dims the code
trusts are read from the built modules (`moshi_ttt.dims`) and cross-checked against this file.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_RANGE = re.compile(r"^\s*(\d+)\s*(?:\.\.|-|:)\s*(\d+)\s*$")


def _layer_index(item: Any, spec: Any) -> int:
    """One entry of a layer list: an int (or a string of digits); 1.5 or true used to become
    layer 1 silently."""
    if isinstance(item, int) and not isinstance(item, bool):
        return item
    if isinstance(item, str) and re.fullmatch(r"\s*-?\d+\s*", item):
        return int(item)
    raise ValueError(f"layer selection {spec!r}: {item!r} is not a layer index (expected whole "
                     f"numbers, e.g. [1, 5, 7] or '8..23')")


def _no_duplicates(layers: list[int], spec: Any) -> list[int]:
    if len(set(layers)) != len(layers):
        twice = sorted({i for i in layers if layers.count(i) > 1})
        raise ValueError(f"layer selection {spec!r} lists layer(s) {twice} twice")
    return sorted(layers)


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
            layers = [int(p) for p in text.split(",")]
        except ValueError:
            raise ValueError(
                f"cannot parse layer selection {spec!r}: expected 'A..B', 'A-B', 'A,B,C' or a list"
            ) from None
        return _no_duplicates(layers, spec)  # "1,1" used to become [1] silently, unlike [1, 1]
    if not isinstance(spec, (list, tuple)):  # e.g. `layers: 1.0` (a TypeError used to escape)
        raise ValueError(f"layer selection must be a range like '8..23', an index or a list, "
                         f"got {spec!r} ({type(spec).__name__})")
    return _no_duplicates([_layer_index(i, spec) for i in spec], spec)


class TTTConfig(BaseModel):
    """Where TTT blocks go and how their inner (fast-weight) learner behaves."""

    model_config = ConfigDict(extra="forbid")

    layers: list[int] = Field(default_factory=list, description="main-transformer layer indices")
    depformer_layers: list[int] = Field(default_factory=list, description="depformer layer indices")
    mini_batch_size: int = Field(16, ge=1, description="K: frames per inner mini-batch")
    base_lr: float = Field(1.0, gt=0, allow_inf_nan=False, description="inner learning rate scale: a frame whose lr gate is fully open closes about its whole residual for its own key (ttt-lm: 0.1 with the mean scale, far too weak to store one frame; see the README)")
    mlp_expansion: int = Field(4, ge=1, description="inner MLP hidden = expansion * head_dim")
    gate_init: float = Field(0.1, allow_inf_nan=False,
                             description="initial value of the per-channel gate alpha")
    num_heads: int | None = Field(
        None, ge=1, description="TTT heads; default: the attention heads of the host transformer "
        "(0 used to mean that default silently)"
    )
    learn_token_offset: bool = Field(
        False, description="learn an offset on the position scale 1/(i+1) (clamped >= 0)"
    )
    checkpoint_group: int = Field(
        4, ge=1, description="mini-batches per activation-checkpoint group of the TTT scan in "
        "training, used when the trainer does not checkpoint whole layers (inside a "
        "checkpointed layer it would only add a third forward pass)")
    ln_eps: float = Field(1e-6, gt=0, allow_inf_nan=False,
                          description="epsilon of the inner LayerNorm (<= 0: NaN on a constant "
                          "inner output)")
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
        "followed it before, as H3's shift on the keys; it recalls more with `qkv_init: "
        "whitened`, but on frames independent of each other the inner learner stops depending "
        "on its input: README, 'The TTT layer')")
    qkv_init: Literal["random", "whitened"] = Field(
        "random", description="wq, wk and wv at init (the shipped configs: `whitened`): "
        "`random` (truncated normal); `whitened`: "
        "the ZCA whitening of the block's normalised input, measured on the first training batch "
        "(`moshi_ttt.model.calibrate_ttt`), so that different frames' keys are decorrelated from "
        "the first step (random projections of hidden states that share a large common direction "
        "give keys of mean cosine ~0.8: a recall query then reads back the mean of all writes)")
    out_init: Literal["random", "matched", "unembedding"] = Field(
        "random", description="wo at init: `random` (truncated normal); `matched`: set on "
        "calibration frames as `qkv_init: whitened` is (after the whitening, when both): rescaled "
        "so that what the block adds to the residual stream has that stream's RMS there, at "
        "every TTT layer alike; `unembedding`: first fitted on those frames so that a recalled "
        "frame adds the direction of the text head's row for the text token it read "
        "(`TTTBlock.fit_readout`; main-transformer blocks: the depformer's predict audio and "
        "are only matched), then rescaled as `matched`. With a random read-out the outer "
        "loop must first learn to read a recalled item, and in the default eval-memory budget "
        "some seeds never get that far; with the fitted one every seed measured learns the "
        "order (README, 'The TTT layer')")
    qk_conv_lr_scale: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="outer learning rate of the q/k convs' "
        "taps and biases, as a multiple of the other TTT parameters' (`moshi-ttt train` and "
        "`eval-memory` alike): a key that holds the frame before it needs taps to move by about "
        "1 from their identity init, a few scalars per channel that at the common rate take "
        "most of a short training to get there")
    share_qk: bool = Field(False, description="q and k from one projection, told apart by their "
                           "own convs (needs qk_conv), as ttt-lm's share_qk")
    position_scale: Literal["mean", "sum"] = Field(
        "sum", description="s_i: `mean` 1/(i+1) (the reference: mini-batch GD on the mean "
        "gradient), `sum` 1 (every frame writes with its own lr, within a mini-batch and after)")

    @property
    def calibrated(self) -> bool:
        """Whether a fresh model needs `moshi_ttt.model.calibrate_ttt` on frames before it
        trains (whitened q/k/v, a matched output scale or a read-out fitted to the text head)."""
        return self.qkv_init == "whitened" or self.out_init != "random"

    @model_validator(mode="after")
    def _share_qk_needs_convs(self) -> "TTTConfig":
        if self.share_qk and self.qk_conv < 1:
            raise ValueError("ttt.share_qk needs ttt.qk_conv >= 1: without their convs q and k "
                             "would be the same vector")
        if self.qk_conv_init == "shift" and self.qk_conv < 2:
            raise ValueError(f"ttt.qk_conv_init 'shift' needs ttt.qk_conv >= 2 (k reads the frame "
                             f"before, one tap back), got qk_conv {self.qk_conv}: the shift "
                             f"would silently be the identity or no conv at all")
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


#: Keys of a Hugging Face repo's config.json that moshi's loader takes out before it builds the
#: LM (`loaders.CheckpointInfo`): they name files and generation settings, not the LM.
CONFIG_JSON_FILE_KEYS = ("moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name",
                         "lora_name", "model_type", "lm_gen_config", "tts_config", "stt_config",
                         "model_id")
#: Keys `loaders.get_moshi_lm` consumes itself before building the LM.
_LOADER_KEYS = ("conditioners", "fuser", "lora", "lora_rank", "lora_scaling", "depformer_causal",
                "demux_second_stream")
#: Integers of the `lm` section, with their least value.
_LM_INTS = {"dim": 1, "num_heads": 1, "num_layers": 1, "n_q": 0, "dep_q": 0, "card": 1,
            "text_card": 1, "depformer_dim": 1, "depformer_num_heads": 1,
            "depformer_num_layers": 1, "context": 1}


@functools.cache
def moshi_lm_keys() -> frozenset[str]:
    """Every key moshi's `get_moshi_lm` accepts in its LM kwargs: LMModel's own parameters, those
    of its transformers and their layers (plain for the main transformer, `depformer_`-prefixed
    for the depformer) and what the loader consumes. Read from moshi's signatures, so this is
    the set that does not raise moshi's "unexpected keyword argument" when the model is built."""
    import inspect

    from moshi.models.lm import LMModel
    from moshi.modules.transformer import StreamingTransformer, StreamingTransformerLayer

    def named(fn: Any) -> set[str]:
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return {n for n, p in inspect.signature(fn).parameters.items()
                if p.kind in kinds and n != "self"}

    # set by moshi from other keys (dim, hidden_scale, gradient_checkpointing, the positional
    # embedding): given again they fail with "got multiple values for keyword argument"
    derived = {"d_model", "dim_feedforward", "checkpointing", "rope", "device", "dtype"}
    stack = (named(StreamingTransformer.__init__) | named(StreamingTransformerLayer.__init__)) \
        - derived
    return frozenset((named(LMModel.__init__) - {"device", "dtype"}) | stack
                     | {f"depformer_{k}" for k in stack} | set(_LOADER_KEYS))


_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def check_lm_section(lm: dict[str, Any]) -> None:
    """What moshi would otherwise fail on deep inside the build, or at the first forward, with
    a TypeError or a bare AssertionError naming no key: unknown keys (typos, config.json's file
    keys), numbers written as strings (YAML 1.1 reads `1e4` as text), non-integer or
    non-positive sizes, widths not divisible by their heads, delays that are not integers."""
    file_keys = sorted(k for k in lm if k in CONFIG_JSON_FILE_KEYS)
    if file_keys:
        raise ValueError(f"lm: {file_keys} are config.json's file settings (moshi's loader "
                         f"removes them before building the LM), not LM kwargs: remove them "
                         f"from the lm section")
    unknown = sorted(k for k in lm if k not in moshi_lm_keys())
    if unknown:
        raise ValueError(f"lm: unknown key(s) {unknown}: not a keyword of moshi's LMModel, its "
                         f"transformers or their layers (a typo? the lm section holds moshi's "
                         f"LM kwargs, as a Hugging Face repo's config.json, e.g. dim, num_heads, "
                         f"num_layers, hidden_scale, depformer_dim)")
    for key, value in lm.items():
        if isinstance(value, str) and _NUMBER.match(value):
            raise ValueError(f"lm.{key}: {value!r} is a string, expected a number (quoted in "
                             f"the YAML? YAML also reads e.g. 1e4, without a dot, as text: "
                             f"write 1.0e4 or 10000)")
    for key, least in _LM_INTS.items():
        if key not in lm or (key == "context" and lm[key] is None):
            continue
        value = lm[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"lm.{key}: expected an integer >= {least}, got {value!r}")
    delays = lm["delays"]
    if not isinstance(delays, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in delays):
        raise ValueError(f"lm.delays: expected a list of n_q + 1 integers >= 0, got {delays!r}")
    if lm["dep_q"] > 0 and "depformer_num_heads" not in lm:  # moshi: "missing ... 'num_heads'"
        raise ValueError(f"lm.depformer_num_heads is required: lm.dep_q {lm['dep_q']} means a "
                         f"depformer, and moshi has no default for its heads")
    for width, heads in (("dim", "num_heads"), ("depformer_dim", "depformer_num_heads")):
        if width in lm and heads in lm and lm[width] % lm[heads]:
            raise ValueError(f"lm.{width} {lm[width]} is not divisible by lm.{heads} "
                             f"{lm[heads]}: each attention head needs a whole share of the width")


def check_mimi_section(mimi: dict[str, Any]) -> None:
    """Overrides of moshi's Mimi config: an unknown section (`seanett`) used to be ignored by
    moshi's `get_mimi`, silently building the full 79 M-parameter Mimi; an unknown key inside a
    section failed with a TypeError when the codec was built. The keys are those of
    `loaders._mimi_config` and of the constructors each section is passed to."""
    import inspect

    from moshi.models import loaders
    from moshi.modules.seanet import SEANetDecoder, SEANetEncoder
    from moshi.modules.transformer import (
        ProjectedTransformer, StreamingTransformer, StreamingTransformerLayer,
    )
    from moshi.quantization.vq import ResidualVectorQuantizer, SplitResidualVectorQuantizer

    def named(*classes: type) -> set[str]:
        return {n for c in classes for n, p in inspect.signature(c.__init__).parameters.items()
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}

    sections = {
        "seanet": named(SEANetEncoder) & named(SEANetDecoder),  # both get the same kwargs
        "quantizer": named(SplitResidualVectorQuantizer, ResidualVectorQuantizer),
        "transformer": named(ProjectedTransformer, StreamingTransformer,
                             StreamingTransformerLayer),
    }
    unknown = sorted(k for k in mimi if k not in loaders._mimi_config)
    if unknown:
        raise ValueError(f"mimi: unknown section(s) {unknown}: expected some of "
                         f"{sorted(loaders._mimi_config)} (moshi ignores any other key, and "
                         f"would build the real Mimi)")
    for section, allowed in sections.items():
        value = mimi.get(section)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"mimi.{section}: expected a mapping of overrides, got {value!r}")
        bad = sorted(k for k in value if k not in allowed | set(loaders._mimi_config[section]))
        if bad:
            raise ValueError(f"mimi.{section}: unknown key(s) {bad} (a typo? moshi's defaults "
                             f"are {sorted(loaders._mimi_config[section])})")


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

    @field_validator("mimi")
    @classmethod
    def _check_mimi(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v:
            check_mimi_section(v)
        return v

    @model_validator(mode="after")
    def _check_lm(self) -> "ProjectConfig":
        required = ("dim", "num_heads", "num_layers", "n_q", "dep_q", "card", "text_card", "delays")
        missing = [k for k in required if k not in self.lm]
        if missing:
            raise ValueError(f"lm section is missing required keys: {missing}")
        check_lm_section(self.lm)
        if len(self.lm["delays"]) != self.lm["n_q"] + 1:
            raise ValueError(
                f"lm.delays has {len(self.lm['delays'])} entries, expected n_q + 1 = "
                f"{self.lm['n_q'] + 1}"
            )
        n = int(self.lm["num_layers"])
        bad = [i for i in self.ttt.layers if i >= n]
        if bad:
            raise ValueError(f"ttt.layers {bad} out of range: the main transformer has {n} layers")
        if self.ttt.depformer_layers and self.lm["dep_q"] == 0:
            raise ValueError(f"ttt.depformer_layers {self.ttt.depformer_layers}: the model has no "
                             f"depformer (lm.dep_q is 0)")
        nd = int(self.lm.get("depformer_num_layers", self.lm["num_layers"]))
        bad = [i for i in self.ttt.depformer_layers if i >= nd]
        if bad:
            raise ValueError(f"ttt.depformer_layers {bad} out of range: the depformer has {nd} layers")
        self._check_ttt_heads()
        return self

    def _check_ttt_heads(self) -> None:
        """TTT heads split the width of the transformer they join (`attach_ttt`); rope rotates
        pairs of a head's dims. Checked here, where the YAML is named, rather than by TTTBlock
        at build time (a ValueError without the key) or by rope at the first forward (a bare
        AssertionError)."""
        for component, layers, width, heads in (
                ("transformer", self.ttt.layers, "dim", "num_heads"),
                ("depformer", self.ttt.depformer_layers, "depformer_dim", "depformer_num_heads")):
            if not layers or width not in self.lm:
                continue
            d = self.lm[width]
            h = self.ttt.num_heads or self.lm.get(heads)
            if h is None:
                continue
            source = "ttt.num_heads" if self.ttt.num_heads else f"lm.{heads} (ttt.num_heads unset)"
            if d % h:
                raise ValueError(f"{source} {h} does not divide the {component}'s width lm.{width} "
                                 f"{d}: each TTT head needs a whole share of it")
            if self.ttt.rope and (d // h) % 2:
                raise ValueError(f"ttt.rope needs an even TTT head dim: the {component}'s is "
                                 f"lm.{width} {d} / {source} {h} = {d // h}")

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

"""Dimensions: detected from the built modules, checked against everything that claims them.

The earlier TTT-on-Moshi attempt took its dims from a fallback dict when a checkpoint had no
config.json and crashed deep in a forward pass (`4096 != 1024`). Here dims come only from the
modules moshi built (`detect_dims`), and `validate` compares, before any forward pass:

    config (YAML / config.json)  <->  built modules  <->  TTT blocks  <->  every tensor in the
    weight files (names and shapes)  <->  dims recorded in a checkpoint,

and that nothing is left on the meta device. Every disagreement becomes one line of a
`DimensionMismatch`, naming the component or tensor, the expected and the found value.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from moshi.models.lm import LMModel
from moshi.modules.transformer import StreamingTransformer
from safetensors import safe_open
from torch import nn

from .block import INNER_PARAM_NAMES
from .model import is_ttt_param, ttt_blocks


@dataclass(frozen=True)
class Mismatch:
    component: str  # a module path or a tensor name, e.g. transformer.layers.8.ttt.wq.weight
    expected: Any
    found: Any
    what: str = "shape"

    def __str__(self) -> str:
        return f"{self.component}: expected {self.what} {self.expected}, found {self.found}"


class DimensionMismatch(ValueError):
    """Raised before anything runs when dims disagree; `.problems` lists every disagreement."""

    def __init__(self, problems: list[Mismatch], context: str = ""):
        self.problems = list(problems)
        head = f"dimension mismatch{f' ({context})' if context else ''}: "
        head += f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        lines = [str(p) for p in problems[:40]]
        if len(problems) > 40:
            lines.append(f"... and {len(problems) - 40} more")
        super().__init__("\n  ".join([head, *lines]))


@dataclass
class TransformerDims:
    d_model: int
    num_heads: int
    head_dim: int
    num_layers: int
    ffn_hidden: int  # inner width of the feed-forward (gated: linear_out.in_features)
    context: int | None


@dataclass
class TTTDims:
    component: str
    layer: int
    d_model: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    mini_batch_size: int


@dataclass
class ModelDims:
    main: TransformerDims
    depformer: TransformerDims | None
    n_q: int
    dep_q: int
    card: int
    text_card: int
    ttt: list[TTTDims] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _transformer_dims(tr: StreamingTransformer) -> TransformerDims:
    layer = tr.layers[0]
    attn = layer.self_attn
    if layer.gating is not None:
        g = layer.gating[0] if isinstance(layer.gating, nn.ModuleList) else layer.gating
        lin_out = g.linear_out
        ffn = getattr(lin_out, "in_features", None) or lin_out.frozen_W.in_features
    else:
        ffn = layer.linear1.out_features
    return TransformerDims(
        d_model=attn.embed_dim,
        num_heads=attn.num_heads,
        head_dim=attn.embed_dim // attn.num_heads,
        num_layers=len(tr.layers),
        ffn_hidden=int(ffn),
        context=attn.context,
    )


def detect_dims(lm: LMModel) -> ModelDims:
    """Read every dim from the built modules (works on the meta device)."""
    return ModelDims(
        main=_transformer_dims(lm.transformer),
        depformer=_transformer_dims(lm.depformer) if lm.depformer is not None else None,
        n_q=lm.n_q,
        dep_q=lm.dep_q,
        card=lm.card,
        text_card=lm.text_card,
        ttt=[
            TTTDims(a.component, a.layer, a.block.d_model, a.block.num_heads, a.block.head_dim,
                    a.block.hidden, a.block.mini_batch_size)
            for a in ttt_blocks(lm)
        ],
    )


# -- checks -------------------------------------------------------------------------------------

def check_config(lm_cfg: dict[str, Any], dims: ModelDims, ttt_cfg=None,
                 source: str = "config") -> list[Mismatch]:
    """The LM config's claims (moshi kwargs) against the modules; and the TTT config's layers."""
    out: list[Mismatch] = []

    def cmp(key: str, found: Any, component: str) -> None:
        if key in lm_cfg and lm_cfg[key] is not None and lm_cfg[key] != found:
            out.append(Mismatch(component, f"{lm_cfg[key]} ({source}: {key})", found, "value"))

    cmp("dim", dims.main.d_model, "transformer.d_model")
    cmp("num_heads", dims.main.num_heads, "transformer.num_heads")
    cmp("num_layers", dims.main.num_layers, "transformer.num_layers")
    cmp("context", dims.main.context, "transformer.context")
    cmp("n_q", dims.n_q, "lm.n_q")
    cmp("dep_q", dims.dep_q, "lm.dep_q")
    cmp("card", dims.card, "lm.card")
    cmp("text_card", dims.text_card, "lm.text_card")
    if dims.depformer is not None:
        cmp("depformer_dim", dims.depformer.d_model, "depformer.d_model")
        cmp("depformer_num_heads", dims.depformer.num_heads, "depformer.num_heads")
        if "depformer_num_layers" in lm_cfg:
            cmp("depformer_num_layers", dims.depformer.num_layers, "depformer.num_layers")
    if ttt_cfg is not None:
        for component, wanted in (("transformer", ttt_cfg.layers),
                                  ("depformer", ttt_cfg.depformer_layers)):
            have = sorted(t.layer for t in dims.ttt if t.component == component)
            if have != sorted(wanted):
                out.append(Mismatch(f"{component} TTT layers", sorted(wanted), have, "layers"))
        for t in dims.ttt:
            if t.mini_batch_size != ttt_cfg.mini_batch_size:
                out.append(Mismatch(f"{t.component}.layers.{t.layer}.ttt", ttt_cfg.mini_batch_size,
                                    t.mini_batch_size, "mini_batch_size"))
    return out


def check_blocks(lm: LMModel) -> list[Mismatch]:
    """Every TTT block against the layer it sits in, and its parameters against its own dims."""
    out: list[Mismatch] = []
    for a in ttt_blocks(lm):
        host = getattr(lm, a.component).layers[a.layer].self_attn
        b = a.block
        name = f"{a.component}.layers.{a.layer}.ttt"
        if b.d_model != host.embed_dim:
            out.append(Mismatch(f"{name}.d_model", host.embed_dim, b.d_model, "width"))
        H, HD, Fh, D = b.num_heads, b.head_dim, b.hidden, b.d_model
        if H * HD != D:
            out.append(Mismatch(f"{name}.num_heads*head_dim", D, H * HD, "width"))
        expected = {
            "inner.w1": (H, HD, Fh), "inner.b1": (H, 1, Fh), "inner.w2": (H, Fh, HD),
            "inner.b2": (H, 1, HD), "inner.ttt_norm_weight": (H, HD),
            "inner.ttt_norm_bias": (H, HD), "inner.lr_weight": (H, D), "inner.lr_bias": (H,),
            "wq.weight": (D, D), "wv.weight": (D, D), "wo.weight": (D, D), "gate_alpha": (D,),
        }
        if b.wk is not None:
            expected["wk.weight"] = (D, D)
        if b.inner.decay_logit is not None:
            expected["inner.decay_logit"] = (H,)
        for conv in ("conv_q", "conv_k"):
            if getattr(b, conv) is not None:
                k = getattr(b, conv)._kernel_size
                expected[f"{conv}.conv.conv.weight"] = (D, 1, k)
                expected[f"{conv}.conv.conv.bias"] = (D,)
        params = dict(b.named_parameters())
        for pname, shape in expected.items():
            found = tuple(params[pname].shape) if pname in params else "missing"
            if found != shape:
                out.append(Mismatch(f"{name}.{pname}", shape, found))
    return out


def read_safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in a safetensors file, from its header only (a 15 GB
    checkpoint is read in milliseconds)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"cannot read safetensors header of {path}: {e}") from e


def _remap_like_load(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Apply the model's load_state_dict pre-hooks (e.g. moshi's attention `in_proj_weight` ->
    `in_projs.{i}.weight` split) to meta tensors of the given shapes, to get the names and shapes
    the model would actually receive."""
    sd: dict[str, torch.Tensor] = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    for prefix, module in model.named_modules():
        hooks = list(module._load_state_dict_pre_hooks.values())
        if not hooks:
            continue
        p = f"{prefix}." if prefix else ""
        for hook in hooks:
            hook(sd, p, {}, True, [], [], [])
    return {k: tuple(v.shape) for k, v in sd.items()}


def check_weights(
    model: nn.Module,
    shapes: dict[str, tuple[int, ...]],
    source: str,
    covers: Callable[[str], bool] | None = None,
) -> list[Mismatch]:
    """Tensors of one weight file against the model: each must be a model tensor of the same
    shape; every model tensor the file is meant to cover (`covers(name)`) must be present."""
    out: list[Mismatch] = []
    remapped = _remap_like_load(model, shapes)
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    for name, shape in remapped.items():
        if name not in expected:
            out.append(Mismatch(name, "no such tensor in the model", f"{shape} in {source}",
                                "tensor"))
        elif expected[name] != shape:
            out.append(Mismatch(name, expected[name], f"{shape} in {source}"))
    if covers is not None:
        for name, shape in expected.items():
            if covers(name) and name not in remapped:
                out.append(Mismatch(name, f"{shape} in {source}", "missing", "tensor"))
    return out


def check_not_meta(model: nn.Module) -> list[Mismatch]:
    return [Mismatch(n, "loaded tensor", "meta device (never loaded)", "storage")
            for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]


def check_recorded(recorded: dict[str, Any], dims: ModelDims,
                   source: str = "checkpoint") -> list[Mismatch]:
    """Dims a checkpoint recorded when it was written against the dims of the model built now."""
    out: list[Mismatch] = []
    now = dims.to_dict()

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in a:
                if k in b:
                    walk(a[k], b[k], f"{path}.{k}" if path else k)
                else:
                    out.append(Mismatch(f"{path}.{k}", a[k], "absent in the built model", "dim"))
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                out.append(Mismatch(path, f"{len(a)} entries ({source})", len(b), "count"))
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{i}]")
        elif a != b:
            out.append(Mismatch(path, f"{a} ({source})", b, "dim"))

    walk(recorded, now, "")
    return out


def validate(
    lm: LMModel,
    lm_cfg: dict[str, Any] | None = None,
    ttt_cfg=None,
    weights: Iterable[tuple[str | Path, Callable[[str], bool] | None]] = (),
    recorded_dims: dict[str, Any] | None = None,
    require_loaded: bool = False,
    context: str = "",
) -> ModelDims:
    """Run every check; raise one DimensionMismatch listing all problems, else return the dims.

    weights: (safetensors path, covers) pairs; `covers(name)` says which model tensors that file
    must provide (None: only check what it has).
    """
    dims = detect_dims(lm)
    problems: list[Mismatch] = []
    if lm_cfg is not None:
        problems += check_config(lm_cfg, dims, ttt_cfg)
    problems += check_blocks(lm)
    for path, covers in weights:
        problems += check_weights(lm, read_safetensors_shapes(path), str(path), covers)
    if recorded_dims is not None:
        problems += check_recorded(recorded_dims, dims)
    if require_loaded:
        problems += check_not_meta(lm)
    if problems:
        raise DimensionMismatch(problems, context)
    return dims


# -- parameter counts ---------------------------------------------------------------------------

def count_params(lm: nn.Module) -> dict[str, int]:
    """base (everything moshi built), ttt_inner (W1, b1, W2, b2, ttt_norm, lr gate of every block),
    ttt_total (all TTT parameters: inner set, q/k/v/o, norms, gate alpha), total."""
    base = ttt_inner = ttt_total = 0
    for name, p in lm.named_parameters():
        n = p.numel()
        if is_ttt_param(name):
            ttt_total += n
            if name.split(".ttt.", 1)[1] in INNER_PARAM_NAMES:
                ttt_inner += n
        else:
            base += n
    return {"base": base, "ttt_inner": ttt_inner, "ttt_total": ttt_total,
            "total": base + ttt_total}


def describe(lm: LMModel, ttt_cfg=None) -> dict[str, Any]:
    """The JSON shape shared by `moshi-ttt inspect --json` and the server's /health `model`."""
    dims = detect_dims(lm)
    main_ttt = [t for t in dims.ttt if t.component == "transformer"]
    dep_ttt = [t for t in dims.ttt if t.component == "depformer"]

    def tr(d: TransformerDims | None) -> dict[str, Any] | None:
        return None if d is None else asdict(d)

    first = (main_ttt or dep_ttt or [None])[0]
    return {
        "main": tr(dims.main),
        "depformer": tr(dims.depformer),
        "streams": {"n_q": dims.n_q, "dep_q": dims.dep_q, "card": dims.card,
                    "text_card": dims.text_card},
        "ttt": {
            "layers": [t.layer for t in main_ttt],
            "depformer_layers": [t.layer for t in dep_ttt],
            "mini_batch_size": first.mini_batch_size if first else
            (ttt_cfg.mini_batch_size if ttt_cfg else None),
            "base_lr": ttt_cfg.base_lr if ttt_cfg else None,
            "num_heads": first.num_heads if first else None,
            "head_dim": first.head_dim if first else None,
            "mlp_hidden": first.mlp_hidden if first else None,
            "blocks": [asdict(t) for t in dims.ttt],
        },
        "params": count_params(lm),
    }


def dims_json(lm: LMModel) -> str:
    return json.dumps(detect_dims(lm).to_dict(), indent=2)

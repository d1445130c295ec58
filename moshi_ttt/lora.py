"""LoRA on the frozen base, with moshi's own `LoRALinear` (same tensor names as moshi-finetune).

Only base linears of the chosen components are wrapped; TTT projections never are (they are
trained in full). Settings live in the config's `train.lora` section:
`{enable: true, rank: 16, scaling: 2.0, components: [transformer]}`; `train.full_finetune: true`
makes every base tensor trainable instead.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from moshi.modules.lora import LoRALinear
from torch import nn

from .config import ProjectConfig
from .model import is_ttt_param


def lora_settings(cfg: ProjectConfig) -> dict[str, Any] | None:
    s = cfg.train.get("lora") or {}
    if not s.get("enable"):
        return None
    return {"rank": int(s.get("rank", 16)), "scaling": float(s.get("scaling", 2.0)),
            "components": list(s.get("components", ["transformer"]))}


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def apply_lora(lm: nn.Module, rank: int, scaling: float,
               components: list[str] = ("transformer",)) -> int:
    """Wrap the base nn.Linear modules of `components` in LoRALinear, in place (any device,
    meta included). Returns the number of wrapped linears."""
    count = 0
    for comp in components:
        root = getattr(lm, comp)
        for name, module in list(root.named_modules()):
            if is_ttt_param(name + ".x"):
                continue
            for child_name, child in list(module.named_children()):
                if type(child) is not nn.Linear or is_ttt_param(f"{name}.{child_name}.x"):
                    continue
                if child.bias is not None:
                    continue  # moshi's LoRALinear has no bias; moshi's base linears have none
                lora = LoRALinear(child.in_features, child.out_features, rank, scaling,
                                  device=child.weight.device, dtype=child.weight.dtype)
                lora.frozen_W = child
                if child.weight.device.type != "meta":
                    init_lora(lora)
                setattr(module, child_name, lora)
                count += 1
    return count


def init_lora(lora: LoRALinear) -> None:
    """A random, B zero: a fresh adapter changes nothing."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(lora.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(lora.lora_B.weight)


def apply_lora_from_config(lm: nn.Module, cfg: ProjectConfig) -> int:
    s = lora_settings(cfg)
    return 0 if s is None else apply_lora(lm, s["rank"], s["scaling"], s["components"])


def materialize_lora(lm: nn.Module, device: torch.device) -> None:
    """Adapters still on the meta device (a base without trained LoRA) get a fresh init."""
    for m in lm.modules():
        if isinstance(m, LoRALinear) and m.lora_A.weight.device.type == "meta":
            m.lora_A.to_empty(device=device)
            m.lora_B.to_empty(device=device)
            init_lora(m)


def lora_param_filter(cfg: ProjectConfig) -> Callable[[str], bool]:
    """Which non-TTT tensors a TTT checkpoint carries: LoRA adapters, or everything when the base
    was fully fine-tuned."""
    if cfg.train.get("full_finetune"):
        return lambda name: True
    if lora_settings(cfg) is not None:
        return is_lora_param
    return lambda name: False

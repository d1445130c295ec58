"""Process-group plumbing for `torchrun --nproc_per_node N moshi-ttt train ...` (FSDP2)."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


def is_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun set up (NCCL on GPU, gloo on CPU); (rank, world)."""
    if not is_torchrun():
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _register_fsdp_classes(modules: list[nn.Module]) -> None:
    """Make FSDP2 able to wrap moshi's streaming modules.

    fully_shard swaps a module's class for a generated `FSDP<cls>(FSDPModule, cls)`. moshi's
    StreamingModule lists `abc.ABC` first among its bases, and CPython then refuses the
    `__class__` swap ("object layout differs"). `(cls, FSDPModule)` has a compatible layout, so
    we pre-register that order in FSDP's own class cache, re-binding the only two methods where
    FSDPModule must take precedence over nn.Module (`_apply`, `__new__`) and the index of the
    original class in the MRO that `__new__` relies on.
    """
    from moshi.modules.streaming import StreamingModule
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fully_shard import (
        _unimplemented_deepcopy, get_cls_to_fsdp_cls,
    )

    cache = get_cls_to_fsdp_cls()
    for m in modules:
        cls = type(m)
        if cls in cache or isinstance(m, FSDPModule) or not issubclass(cls, StreamingModule):
            continue  # plain nn.Modules work with FSDP2's default class order
        cache[cls] = type(f"FSDP{cls.__name__}", (cls, FSDPModule), {
            "__deepcopy__": _unimplemented_deepcopy,
            "_apply": FSDPModule._apply,
            "__new__": FSDPModule.__new__,
            "_orig_cls_mro_index": 1,
        })


def shard_model(lm: nn.Module) -> None:
    """FSDP2: one shard group per transformer layer (main and depformer), then the root.
    Frozen and trainable parameters are sharded together. No mixed-precision policy: the
    trainable set is fp32 (master weights), the frozen base keeps its own dtype, and bf16
    compute comes from autocast, so the TTT inner loop can stay fp32."""
    from torch.distributed.fsdp import fully_shard

    layers = [layer for comp in ("transformer", "depformer") if getattr(lm, comp, None) is not None
              for layer in getattr(lm, comp).layers]
    _register_fsdp_classes([*layers, lm])
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(lm, reshard_after_forward=True)


def local_sq_norm(p: torch.Tensor) -> torch.Tensor:
    """Sum of squares of this process's part of a (possibly sharded) tensor."""
    t = p.to_local() if hasattr(p, "to_local") else p
    return t.detach().float().pow(2).sum()


def global_norm(p: torch.Tensor) -> float:
    sq = local_sq_norm(p)
    if hasattr(p, "to_local"):
        sq = all_reduce_sum(sq)
    return float(sq.sqrt())

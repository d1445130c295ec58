"""Process-group plumbing for `torchrun --nproc_per_node N moshi-ttt train ...` (FSDP2).

Under torchrun the trainer always takes the distributed path (FSDP2, reductions, agreement on
errors), whatever the number of processes: `torchrun --nproc_per_node 1` runs exactly the code
that N GPUs run, so one GPU can test it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

T = TypeVar("T")


def is_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def backend_for(device: torch.device) -> str:
    """The process group's backends. On GPU, NCCL for CUDA tensors and gloo for CPU ones in the
    same group: object collectives and barriers run on CPU, and a plain "nccl" group has no CPU
    backend at all (a CPU tensor all-reduced on it fails)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def local_device(device: torch.device) -> torch.device:
    """This process's device: under torchrun each process takes the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and is_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def init(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun set up; (rank, world). `device` is this process's own
    (`local_device`): it is made current before NCCL starts, so NCCL never guesses a GPU."""
    if not is_torchrun():
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device))
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def shutdown(clean: bool = True) -> None:
    """Leave the process group. Only a clean exit waits for the other ranks: after an error a
    barrier would either hang or fail with a backend error that hides the real one."""
    if not is_distributed():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def exit_worker(message: str, code: int) -> NoReturn:
    """End a torchrun worker after a documented failure: the message, then `os._exit(code)`.

    A normal interpreter exit runs the destructors of torch's native threads (the gloo group's,
    the rendezvous store's); if one is still joinable the process aborts ("terminate called
    without an active exception", status -6) and torchrun reports a signal instead of the
    worker's status 2. The group is already destroyed (`shutdown`); nothing else is left to
    tear down but buffered output, which is flushed first."""
    logger.error(message)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def world() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, on the tensor's own device (NCCL for CUDA tensors, gloo for CPU ones)."""
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def agree(fn: Callable[[], T], rebuild: Callable[[str, str], BaseException]) -> T:
    """Run `fn` on every rank; if it raised on any rank, raise on every rank.

    A rank that fails alone would leave the others waiting in their next collective, and they
    would end with a backend error (or a timeout) instead of the real message. The failing rank
    re-raises its own exception; the others raise `rebuild(type name, message)` of the first
    failure. Not distributed: just `fn()`.
    """
    if not is_distributed():
        return fn()
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
        error = e
    outcome = None if error is None else (type(error).__name__, str(error))
    outcomes: list[tuple[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    if error is not None:
        raise error
    for r, o in enumerate(outcomes):
        if o is not None:
            kind, message = o
            raise rebuild(kind, f"{message} (reported by rank {r})")
    return result  # type: ignore[return-value]


def _fsdp_apply(base_apply: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """FSDPModule._apply over `base_apply`: reshard so the sharded parameters are the registered
    ones, apply, then let every FSDP parameter take up its new local tensor."""

    def _apply(self, *args, **kwargs):
        self.reshard()
        ret = base_apply(self, *args, **kwargs)
        state = self._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch releases with one parameter group per module
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        with torch.no_grad():
            for group in groups:
                for fsdp_param in group.fsdp_params:
                    fsdp_param.reset_sharded_param()
        return ret

    return _apply


def _register_fsdp_classes(modules: list[nn.Module]) -> None:
    """Make FSDP2 able to wrap moshi's streaming modules.

    fully_shard swaps a module's class for a generated `FSDP<cls>(FSDPModule, cls)`. moshi's
    StreamingModule lists `abc.ABC` first among its bases, and CPython then refuses the
    `__class__` swap ("object layout differs"). `(cls, FSDPModule)` has a compatible layout, so
    we pre-register that order in FSDP's own class cache, re-binding the only two methods where
    FSDPModule must take precedence over nn.Module (`_apply`, `__new__`) and the index of the
    original class in the MRO that `__new__` relies on. `_apply` (behind `.to`, `to_empty`) is
    FSDPModule's own, with the original class's `_apply` as its base: FSDPModule's calls
    `super()._apply`, which in this order would resolve past nn.Module to `object`.
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
            "_apply": _fsdp_apply(cls._apply),
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


def fill_from_rank0(lm: nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> None:
    """Give every rank its shards of rank 0's weights, after `shard_model`.

    Only rank 0 read the weights from disk (`full`, its whole state dict taken before sharding);
    the other ranks built the model on the meta device and get their shards through FSDP's own
    broadcast from rank 0 (one tensor at a time), so the frozen base is read once, not once per
    rank, and no other rank ever holds it whole.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    def on_meta(p: torch.Tensor) -> bool:
        return (p.to_local() if hasattr(p, "to_local") else p).device.type == "meta"

    if any(on_meta(p) for p in lm.parameters()):
        lm.to_empty(device=device)
    set_model_state_dict(lm, full if rank() == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def local_sq_norm(p: torch.Tensor) -> torch.Tensor:
    """Sum of squares of this process's part of a (possibly sharded) tensor."""
    t = p.to_local() if hasattr(p, "to_local") else p
    return t.detach().float().pow(2).sum()


def global_norm(p: torch.Tensor) -> float:
    sq = local_sq_norm(p)
    if hasattr(p, "to_local"):
        sq = all_reduce_sum(sq)
    return float(sq.sqrt())

"""`RowStates`: step a prefix of a model's batch rows, and move a session from one row to another.

A server built for `capacity` sessions streams its modules with `capacity` rows. Stepping all of
them when only a few sessions talk costs the full batch every frame. Here the engine keeps its
sessions in the first rows and steps only the smallest *bucket* of rows (1, 2, 4, ... capacity)
that holds them:

* `prefix(n)` installs, for the duration of a step, one state object per streaming module whose
  per-row tensors are *views* of the first n rows of the full state (same storage, nothing copied
  per step). Each bucket's state objects are built once and kept, so on GPU each bucket gets its
  own CUDA graphs (moshi keeps its `CUDAGraphed` wrappers in the states: each bucket gets fresh
  ones) over fixed addresses. Between steps the full states are installed again, so resets by
  mask, inspection and row moves see every row.
* `move_row(src, dst)` copies every per-row tensor of every streaming state (KV caches and their
  offsets, TTT fast weights, mini-batch buffer and position, q/k conv history, LMGen's token
  cache and offsets, Mimi's codec buffers, exec masks): the session in `src` continues from
  `dst` exactly as it would have.

What is per row is read from the states themselves: the batch dimension of a tensor is the one
whose size is the state's batch size (dim 0 first: moshi's convention), with the exceptions read
from moshi's source in `_KNOWN_LAYOUTS`. A state that replaces a tensor attribute during a step
instead of writing into it (LMGen's `offsets`) is written back into the full state's rows after
the step; host-side scalars (moshi's `offset_cpu` counters) follow the stepped bucket.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Sequence

import torch
from moshi.models.lm import _LMGenState
from moshi.modules.streaming import State, StreamingModule
from moshi.modules.transformer import RingKVCache
from moshi.utils.compile import CUDAGraphed
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["RowStates", "buckets_for"]

#: (class, attribute) -> batch dimension, or None for a tensor every row shares. Only where the
#: size rule is ambiguous: RingKVCache keeps keys and values stacked in dim 0 ([2, B, H, T, D],
#: moshi/modules/transformer.py), and LMGen's `initial` token column is [1, K, 1] for every row.
_KNOWN_LAYOUTS: dict[tuple[type, str], int | None] = {
    (RingKVCache, "cache"): 1,
    (_LMGenState, "initial"): None,
}

# Attributes never walked or narrowed: graph wrappers are renewed, the rest is shared as is.
_SHARED_TYPES = (nn.Module, ExitStack, torch.device)


def buckets_for(capacity: int) -> list[int]:
    """1, 2, 4, ... up to and including `capacity` (which need not be a power of two)."""
    out, n = [], 1
    while n < capacity:
        out.append(n)
        n *= 2
    out.append(capacity)
    return out


def _walkable(value: Any) -> bool:
    """A container of streaming state: a dataclass (moshi's and TTT's states, FastWeights,
    MiniBatchBuffer) or a plain stateful object such as RingKVCache."""
    if value is None or isinstance(value, (torch.Tensor, CUDAGraphed, *_SHARED_TYPES)):
        return False
    if isinstance(value, (int, float, bool, str, tuple, list, dict)) or callable(value):
        return False
    return dataclasses.is_dataclass(value) or hasattr(value, "__dict__")


def _batch_dim(owner: Any, name: str, t: torch.Tensor, batch: int) -> int | None:
    """The batch dimension of `owner.name`, None if every row shares it."""
    for (cls, attr), dim in _KNOWN_LAYOUTS.items():
        if isinstance(owner, cls) and attr == name:
            return dim
    if batch == 1:  # every narrowing is the identity: nothing to tell apart
        return 0 if t.dim() and t.shape[0] == 1 else None
    if t.dim() and t.shape[0] == batch:
        return 0
    dims = [d for d, s in enumerate(t.shape) if s == batch]
    if not dims:
        return None
    if len(dims) > 1:
        raise ValueError(
            f"{type(owner).__name__}.{name} of shape {tuple(t.shape)}: more than one dimension "
            f"has the batch size {batch}; add its layout to server.rows._KNOWN_LAYOUTS")
    return dims[0]


def _install(module: StreamingModule, state: State) -> None:
    """`module._streaming_state = state` without nn.Module.__setattr__'s checks (a state is
    neither a parameter, a buffer nor a module): three quarters of a bucket's swap cost."""
    module.__dict__["_streaming_state"] = state


@dataclasses.dataclass
class _Leaf:
    """One per-row tensor of the full state: where it lives and its batch dimension."""

    owner: Any
    name: str
    tensor: torch.Tensor
    dim: int


class _Bucket:
    """The state objects of one bucket: copies of the full states whose per-row tensors are
    views of their first `n` rows."""

    def __init__(self, n: int, full: list[tuple[StreamingModule, State]], leaves: list[_Leaf]):
        self.n = n
        by_owner: dict[int, list[_Leaf]] = {}
        for leaf in leaves:
            by_owner.setdefault(id(leaf.owner), []).append(leaf)
        self.views: list[tuple[Any, str, torch.Tensor]] = []  # (copied owner, attr, view)
        self.scalars: list[tuple[Any, Any, str]] = []  # (full owner, copied owner, attr)
        memo: dict[int, Any] = {}
        self.states = [(m, self._copy(st, by_owner, memo)) for m, st in full]

    def _copy(self, obj: Any, by_owner: dict[int, list[_Leaf]], memo: dict[int, Any]) -> Any:
        if id(obj) in memo:  # an object reachable twice stays one object
            return memo[id(obj)]
        new = copy.copy(obj)
        memo[id(obj)] = new
        narrowed = {leaf.name: leaf for leaf in by_owner.get(id(obj), [])}
        for name, value in list(vars(obj).items()):
            if name in narrowed:
                leaf = narrowed[name]
                view = leaf.tensor.narrow(leaf.dim, 0, self.n)
                setattr(new, name, view)
                self.views.append((new, name, view))
            elif isinstance(value, CUDAGraphed):  # this bucket's own graph, captured on use
                setattr(new, name, CUDAGraphed(value.func, disable=value.disable))
            elif isinstance(value, (bool, int, float)) and name != "batch_size":
                self.scalars.append((obj, new, name))
            elif _walkable(value):
                setattr(new, name, self._copy(value, by_owner, memo))
        if isinstance(obj, State):
            new.batch_size = self.n
        return new

    def enter(self) -> None:
        for full, mine, name in self.scalars:
            setattr(mine, name, getattr(full, name))
        for module, state in self.states:
            _install(module, state)

    def leave(self) -> None:
        """Write back what the step replaced instead of updating in place, and the scalars."""
        for owner, name, view in self.views:
            cur = getattr(owner, name)
            if cur is not view:
                view.copy_(cur)
                setattr(owner, name, view)
        for full, mine, name in self.scalars:
            setattr(full, name, getattr(mine, name))


class RowStates:
    """The streaming states of `roots` (modules already streaming with `capacity` rows), stepped
    on a prefix of rows (`prefix`), rows moved (`move_row`)."""

    def __init__(self, roots: Sequence[nn.Module], capacity: int):
        self.capacity = capacity
        self.buckets = buckets_for(capacity)
        self._full: list[tuple[StreamingModule, State]] = []
        for root in roots:
            for m in root.modules():
                st = getattr(m, "_streaming_state", None) if isinstance(m, StreamingModule) \
                    else None
                if st is None:
                    continue
                if st.batch_size != capacity:
                    raise ValueError(f"{type(m).__name__} streams {st.batch_size} rows, the "
                                     f"engine {capacity}")
                self._full.append((m, st))
        self.leaves: list[_Leaf] = []
        self._collect([st for _, st in self._full], set())
        self._buckets: dict[int, _Bucket] = {}
        self.current = capacity  # rows of the last step
        logger.debug("%d streaming states, %d per-row tensors, buckets %s", len(self._full),
                     len(self.leaves), self.buckets)

    def _collect(self, objs: list[Any], seen: set[int]) -> None:
        for obj in objs:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            for name, value in vars(obj).items():
                if isinstance(value, torch.Tensor):
                    dim = _batch_dim(obj, name, value, self.capacity)
                    if dim is not None:
                        self.leaves.append(_Leaf(obj, name, value, dim))
                elif _walkable(value):
                    self._collect([value], seen)

    def bucket_for(self, rows: int) -> int:
        """The smallest bucket that holds rows 0 .. rows - 1."""
        for b in self.buckets:
            if b >= rows:
                return b
        raise ValueError(f"{rows} rows do not fit a capacity of {self.capacity}")

    def _check_full(self) -> None:
        """The full states must still hold the tensors the views were made of: a state
        replaced or an attribute rebound outside a bucket would leave the views stale."""
        for m, st in self._full:
            if m._streaming_state is not st:
                raise RuntimeError(f"the streaming state of {type(m).__name__} was replaced "
                                   f"outside the engine's rows")
        for leaf in self.leaves:
            if getattr(leaf.owner, leaf.name) is not leaf.tensor:
                raise RuntimeError(f"{type(leaf.owner).__name__}.{leaf.name} was replaced "
                                   f"outside a bucket step")

    @contextmanager
    def prefix(self, n: int) -> Iterator[int]:
        """Install the states of rows 0 .. n - 1 (n a bucket) for one step, then the full ones
        again."""
        if n not in self.buckets:
            raise ValueError(f"{n} is not a bucket of {self.buckets}")
        self._check_full()
        bucket = self._buckets.get(n)
        if bucket is None:
            bucket = self._buckets[n] = _Bucket(n, self._full, self.leaves)
        bucket.enter()
        self.current = n
        try:
            yield n
        finally:
            bucket.leave()
            for m, st in self._full:
                _install(m, st)

    def move_row(self, src: int, dst: int) -> None:
        """Copy every per-row tensor of row `src` into row `dst` (between steps, full states)."""
        if src == dst:
            return
        for leaf in self.leaves:
            t = leaf.tensor
            t.select(leaf.dim, dst).copy_(t.select(leaf.dim, src))

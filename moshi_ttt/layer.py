"""`HybridTransformerLayer`: moshi's StreamingTransformerLayer with a TTT block between attention
and feed-forward (attention -> TTT -> feed-forward, each with its own residual)."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import StreamingTransformerLayer
from moshi.utils.compile import no_compile
from torch import nn

from .block import TTTBlock


class HybridTransformerLayer(StreamingTransformerLayer):
    """A moshi layer plus `self.ttt`. Built by converting an existing layer in place
    (`from_layer`), so that every base weight keeps its name (`transformer.layers.8.self_attn...`)
    and the TTT weights sit beside them (`transformer.layers.8.ttt.wq.weight`)."""

    ttt: TTTBlock

    @classmethod
    def from_layer(cls, layer: StreamingTransformerLayer, ttt: TTTBlock) -> "HybridTransformerLayer":
        if type(layer) is not StreamingTransformerLayer:
            raise TypeError(f"can only convert a plain StreamingTransformerLayer, got {type(layer)}")
        if layer.is_streaming:
            raise RuntimeError("convert layers before entering streaming mode")
        layer.__class__ = cls
        layer.add_module("ttt", ttt)
        return layer  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, cross_attention_src: torch.Tensor | None = None):
        with ExitStack() as stack:
            if x.device.type != "cuda":
                stack.enter_context(no_compile())
            x = self._sa_block(x)
            if self.cross_attention is not None:
                assert cross_attention_src is not None
                x = self._cross_attention_block(x, cross_attention_src)
            x = self.ttt(x)
            x = self._ff_block(x)
            state = self._streaming_state
            if state:
                state.offset_cpu += x.shape[1]
            return x


def forget_streaming_children(model: nn.Module) -> None:
    """moshi caches each StreamingModule's list of streaming children on first use; after adding
    modules that list is stale. Call after any structural change."""
    for m in model.modules():
        if isinstance(m, StreamingModule):
            m._cached_children = None

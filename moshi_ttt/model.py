"""Building a TTT-augmented Moshi: moshi's own LMModel, with TTT blocks attached to chosen layers.

The base model is always built by moshi (`loaders.get_moshi_lm`), so its structure and weight names
are exactly moshi's. `attach_ttt` then converts the selected layers in place. Dims of every TTT
block are read from the layer it is attached to, never from a table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from moshi.models.lm_utils import _delay_sequence
from moshi.modules.transformer import StreamingTransformer, StreamingTransformerLayer
from torch import nn

from .block import CarriedState, TTTBlock
from .config import ProjectConfig, TTTConfig
from .layer import HybridTransformerLayer, forget_streaming_children

logger = logging.getLogger(__name__)

COMPONENTS = ("transformer", "depformer")


@dataclass
class AttachedBlock:
    component: str  # "transformer" (main) or "depformer"
    layer: int
    block: TTTBlock

    @property
    def prefix(self) -> str:
        return f"{self.component}.layers.{self.layer}.ttt."


def build_base_lm(lm_kwargs: dict, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> LMModel:
    """moshi's LMModel with random weights (or on the meta device: structure only, no memory)."""
    return loaders.get_moshi_lm(None, lm_kwargs=dict(lm_kwargs), device=device, dtype=dtype)


def attach_ttt(lm: LMModel, ttt: TTTConfig, norm: str | None = None) -> list[AttachedBlock]:
    """Convert the layers selected by `ttt` into HybridTransformerLayers, in place.

    Each block takes its width and heads from the layer it joins (attention's embed_dim and
    num_heads), and lives on that layer's device and dtype (meta stays meta, uninitialised).
    """
    attached: list[AttachedBlock] = []
    for component, indices in (("transformer", ttt.layers), ("depformer", ttt.depformer_layers)):
        if not indices:
            continue
        tr = getattr(lm, component, None)
        if not isinstance(tr, StreamingTransformer):
            raise ValueError(f"model has no {component} to put TTT layers into")
        n = len(tr.layers)
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"TTT {component} layers {bad} out of range: it has {n} layers")
        for i in indices:
            layer = tr.layers[i]
            if isinstance(layer, HybridTransformerLayer):
                raise ValueError(f"{component}.layers.{i} already has a TTT block")
            attn = layer.self_attn
            ref = attn.in_projs[0]
            weight = getattr(ref, "weight", None)
            if weight is None:  # LoRA-wrapped base
                weight = ref.frozen_W.weight
            heads = attn.num_heads if ttt.num_heads is None else ttt.num_heads
            layer_norm = norm or _norm_name(layer)
            block = TTTBlock(attn.embed_dim, heads, ttt, norm=layer_norm, layer_index=i,
                             device=weight.device, dtype=weight.dtype)
            HybridTransformerLayer.from_layer(layer, block)
            attached.append(AttachedBlock(component, i, block))
    forget_streaming_children(lm)
    return attached


def _norm_name(layer: StreamingTransformerLayer) -> str:
    from moshi.modules.transformer import LayerNormF32, RMSNorm

    n = layer.norm2
    if isinstance(n, RMSNorm):
        return "rms_norm_f32" if n.dtype == torch.float32 else "rms_norm"
    if isinstance(n, LayerNormF32):
        return "layer_norm_f32"
    return "layer_norm"


def ttt_blocks(lm: nn.Module) -> Iterator[AttachedBlock]:
    """Every TTT block in a model, in order (main transformer first)."""
    for component in COMPONENTS:
        tr = getattr(lm, component, None)
        if tr is None:
            continue
        for i, layer in enumerate(tr.layers):
            if isinstance(layer, HybridTransformerLayer):
                yield AttachedBlock(component, i, layer.ttt)


def carry_fast_weights(lm: nn.Module, fresh: torch.Tensor | None) -> None:
    """Truncated backpropagation through time for the TTT layers: the next training forward of
    every TTT block starts row b from the fast weights (and q/k conv history) its previous
    forward ended with, unless `fresh[b]` ([B] bool), when it starts from W0 as a new stream.
    Call before each segment; `None` turns carrying off and drops every carried state. Only in
    train mode (an eval forward starts from W0 and leaves the carried state alone); safe under
    activation checkpointing (a recomputed forward starts from the same state).

    Attention is not carried (a segment's first frames see no earlier context): segments should
    start where nothing before them matters to attention, e.g. at a new recall instance. The
    main transformer's blocks only: moshi runs the depformer one frame at a time.
    """
    if fresh is not None and fresh.dtype != torch.bool:
        raise ValueError(f"carry_fast_weights: fresh must be a bool mask, got {fresh.dtype}")
    for a in ttt_blocks(lm):
        if a.component != "transformer":
            continue
        blk = a.block
        if fresh is None:
            blk.carry = None
            continue
        mask = fresh.to(blk.inner.w1.device)
        if blk.carry is None:
            blk.carry = CarriedState(fresh=mask)
        else:
            blk.carry.advance(mask)


@torch.no_grad()
def block_inputs(lm: LMModel, codes: torch.Tensor, blocks: list[AttachedBlock]
                 ) -> list[torch.Tensor]:
    """What each of `blocks` receives ([B, T, D], detached, in the order given) in one
    teacher-forced forward of codes [B, 17, T], in eval mode: the main transformer alone
    (`forward_text`) when every block is in it, else the whole model with its depformer."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(blocks))}
    hooks = [a.block.register_forward_pre_hook(
        lambda _m, args, i=i: seen[i].append(args[0].detach()))
        for i, a in enumerate(blocks)]
    was_training = lm.training
    lm.eval()
    try:
        if all(a.component == "transformer" for a in blocks):
            lm.forward_text(delayed_inputs(lm, codes)[:, :, :-1])
        else:
            lm(codes)
    finally:
        lm.train(was_training)
        for h in hooks:
            h.remove()
    for i, a in enumerate(blocks):
        if len(seen[i]) != 1:  # moshi runs each layer once per parallel forward
            raise RuntimeError(f"TTT block {a.component} layer {a.layer} ran {len(seen[i])} "
                               f"times in one forward; expected once")
    return [seen[i][0] for i in range(len(blocks))]


@torch.no_grad()
def calibrate_ttt(lm: LMModel, batches: torch.Tensor | list[torch.Tensor]
                  ) -> list[AttachedBlock]:
    """The TTT blocks' data-dependent init on `batches` (codes [B, 17, T], teacher forced: one
    batch or several, e.g. a training batch): with `ttt.qkv_init: whitened` each block's q/k/v
    projections become the whitening of its own input; with `ttt.out_init: unembedding` a
    main-transformer block's wo is then fitted so that a recalled frame adds the text head's
    row for the token it read (`TTTBlock.fit_readout`, on `readout_targets`); with `matched`
    or `unembedding` wo is then rescaled so that what the block adds has the RMS of that input
    (`TTTBlock.match_output_scale`). Block by block in order, so a block is calibrated on what
    the blocks before it, already calibrated, pass on. Call on a fresh model, before training
    (it overwrites trained projections). Returns the blocks it calibrated."""
    batches = [batches] if isinstance(batches, torch.Tensor) else list(batches)
    targets = None
    done = []
    for a in list(ttt_blocks(lm)):
        xs = [block_inputs(lm, codes, [a])[0] for codes in batches]
        if a.block.qkv_init == "whitened":
            a.block.whiten_projections(xs)
        # the text head reads the main transformer only; a depformer block predicts audio
        if a.block.out_init == "unembedding" and a.component == "transformer":
            if targets is None:
                targets = [readout_targets(lm, codes) for codes in batches]
            a.block.fit_readout(xs, [t for t, _ in targets], [k for _, k in targets])
        if a.block.out_init in ("matched", "unembedding"):
            a.block.match_output_scale(xs)
        done.append(a)
    return done


def readout_targets(lm: LMModel, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For codes [B, 17, T]: per step, the unit-norm row of the text head (`text_linear`) for the
    text token that step reads ([B, T, D]), and which steps read a real text token ([B, T]):
    not the initial token, not moshi's text padding or end-of-padding ids, none out of range.
    `TTTBlock.fit_readout` fits on those only. With the padded frames fitted too (to the
    padding row) a fresh model's training loss starts lower on mostly padded speech, but where
    content arrives as audio under padded text (eval-memory's speech task) its recalls are
    fitted to "padding", and one seed of three recalled 0.223 instead of 0.598
    (docs/memory-experiments.md, "A read-out fitted to the text head")."""
    head = lm.text_linear
    if not isinstance(head, nn.Linear) or getattr(lm.text_emb, "demux_second_stream", False):
        raise ValueError("ttt.out_init 'unembedding' needs a text head that is one plain Linear "
                         "over single text tokens (not quantized, no second text stream muxed "
                         "in); use out_init 'matched'")
    tok = delayed_inputs(lm, codes)[:, 0, :-1]
    rows_n = head.weight.shape[0]
    keep = (tok >= 0) & (tok < rows_n)
    for special in (lm.text_initial_token_id, lm.text_padding_token_id,
                    lm.end_of_text_padding_id):
        keep &= tok != special
    rows = head.weight.detach()[tok.clamp(0, rows_n - 1)].float()
    return torch.nn.functional.normalize(rows, dim=-1), keep


def outer_lr_scales(lm: nn.Module) -> dict[str, float]:
    """Parameter name -> the multiple of its group's outer learning rate it trains at, for the
    parameters whose rate differs: each TTT block's q/k conv taps and biases
    (`ttt.qk_conv_lr_scale`). Every optimiser of TTT parameters (`moshi-ttt train`,
    `eval-memory`) reads this, so one config gives one training."""
    out: dict[str, float] = {}
    for mod_name, module in lm.named_modules():
        if not isinstance(module, TTTBlock) or module.qk_conv_lr_scale == 1.0:
            continue
        for conv_name in ("conv_q", "conv_k"):
            conv = getattr(module, conv_name)
            if conv is None:
                continue
            for p_name, _ in conv.named_parameters():
                out[f"{mod_name}.{conv_name}.{p_name}"] = module.qk_conv_lr_scale
    return out


def is_ttt_param(name: str) -> bool:
    return ".ttt." in f".{name}"


def build_ttt_lm(cfg: ProjectConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> LMModel:
    """Random-init base + fresh TTT blocks, as `cfg` says (meta device: structure only)."""
    lm = build_base_lm(cfg.lm, device=device, dtype=dtype)
    attach_ttt(lm, cfg.ttt, norm=cfg.lm.get("norm"))
    return lm


def freeze_base(lm: nn.Module, train_ttt: bool = True) -> tuple[int, int]:
    """Base parameters frozen, TTT parameters trainable. Returns (trainable, frozen) counts."""
    trainable = frozen = 0
    for name, p in lm.named_parameters():
        p.requires_grad_(is_ttt_param(name) and train_ttt)
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


def delayed_inputs(lm: LMModel, codes: torch.Tensor) -> torch.Tensor:
    """[B, K, T+1]: the initial token, then the codes delayed as LMModel.forward feeds them;
    step t's input is column t and its text logits predict codes[:, 0, t]."""
    B = codes.shape[0]
    initial = lm._get_initial_token().expand(B, -1, -1)
    return torch.cat([initial, _delay_sequence(lm.delays, codes, initial)], dim=2)

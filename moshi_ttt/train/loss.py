"""Moshi's training loss: cross-entropy on the text stream and on Moshi's audio codebooks.

As in moshi-finetune: the user's stream is input only; the first (semantic) codebook is
weighted up; text padding tokens are weighted down. Per-stream weights are configurable.

The loss of a global batch is  sum(w * ce) / sum(w)  per modality, over every token of every
micro-batch on every rank. Each micro-batch therefore returns *sums*, and the trainer divides by
the global weight totals (known from the codes before any forward pass), so gradient
accumulation and data parallelism give exactly the loss of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
import torch.nn.functional as F
from moshi.models.lm import LMOutput
from pydantic import BaseModel, ConfigDict, Field, model_validator


class LossWeights(BaseModel):
    """Non-negative weights (a negative one would train the model away from its targets), and
    not all off: a loss of constant 0 trains nothing."""

    model_config = ConfigDict(extra="forbid")

    text: float = Field(1.0, ge=0)  # weight of the text loss in the total
    audio: float = Field(1.0, ge=0)  # weight of the audio loss in the total
    # relative weight of padding / end-of-padding text targets
    text_padding: float = Field(0.5, ge=0)
    # relative weight of the semantic codebook (moshi-finetune)
    first_codebook: float = Field(100.0, ge=0)
    # explicit per-codebook weights (overrides the above)
    codebooks: list[Annotated[float, Field(ge=0)]] | None = None

    @model_validator(mode="after")
    def _something_is_trained(self) -> "LossWeights":
        if self.text == 0 and self.audio == 0:
            raise ValueError("text and audio are both 0: the loss would be 0 and train nothing; "
                             "expected at least one of them > 0")
        if self.codebooks is not None and self.audio > 0 and not any(self.codebooks):
            raise ValueError("codebooks are all 0 while audio > 0: expected at least one > 0 "
                             "(or audio: 0)")
        return self


@dataclass
class StreamSums:
    """Weighted and plain sums of one micro-batch (or of a whole step, after adding up)."""

    text_wce: torch.Tensor  # sum of w * ce over text targets
    text_w: torch.Tensor  # sum of w
    audio_wce: torch.Tensor
    audio_w: torch.Tensor
    # for logging: plain ce sums and counts, per stream
    text_ce: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    text_n: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    text_word_ce: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    text_word_n: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    audio_ce: torch.Tensor = field(default_factory=lambda: torch.zeros(8))
    audio_n: torch.Tensor = field(default_factory=lambda: torch.zeros(8))

    def tensors(self) -> list[torch.Tensor]:
        return [self.text_wce, self.text_w, self.audio_wce, self.audio_w, self.text_ce,
                self.text_n, self.text_word_ce, self.text_word_n, self.audio_ce, self.audio_n]

    def flat(self) -> torch.Tensor:
        """Every sum in one fp32 vector, on the device of the loss (`text_wce`): it is added up
        and all-reduced there, so NCCL gets a CUDA tensor and no step waits on a host copy."""
        device = self.text_wce.device
        return torch.cat([t.detach().float().reshape(-1).to(device) for t in self.tensors()])

    @classmethod
    def from_flat(cls, v: torch.Tensor, dep_q: int) -> "StreamSums":
        sizes = [1] * 8 + [dep_q, dep_q]
        parts = torch.split(v, sizes)
        return cls(*(p.reshape(()) if p.numel() == 1 and i < 8 else p
                     for i, p in enumerate(parts)))


def codebook_weights(w: LossWeights, dep_q: int) -> torch.Tensor:
    if w.codebooks is not None:
        if len(w.codebooks) != dep_q:
            raise ValueError(f"loss.codebooks has {len(w.codebooks)} weights, expected {dep_q}")
        return torch.tensor(w.codebooks, dtype=torch.float32)
    cw = torch.ones(dep_q)
    cw[0] = w.first_codebook
    return cw


def target_masks(codes: torch.Tensor, delays: list[int], dep_q: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions LMModel.forward scores, from the codes alone (as its own masks): text
    [B, T], audio [B, dep_q, T]. Lets the trainer know the loss normalisers before forward."""
    B, K, T = codes.shape
    t = torch.arange(T, device=codes.device)
    text = (codes[:, 0] != -1) & (t < T - delays[0])[None]
    audio_delays = torch.tensor(delays[1:1 + dep_q], device=codes.device)
    audio = (codes[:, 1:1 + dep_q] != -1) & (t[None, :] < T - audio_delays[:, None])[None]
    return text, audio


def weight_totals(codes: torch.Tensor, delays: list[int], dep_q: int, w: LossWeights,
                  padding_ids: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """sum(w) for text and audio over a micro-batch, without running the model."""
    text_m, audio_m = target_masks(codes, delays, dep_q)
    tw = text_m.float()
    is_pad = torch.zeros_like(text_m)
    for pid in padding_ids:
        is_pad |= codes[:, 0] == pid
    tw = torch.where(is_pad, tw * w.text_padding, tw)
    cw = codebook_weights(w, dep_q).to(codes.device)
    aw = audio_m.float() * cw[None, :, None]
    return tw.sum(), aw.sum()


def stream_sums(out: LMOutput, codes: torch.Tensor, w: LossWeights,
                padding_ids: tuple[int, ...]) -> StreamSums:
    """Weighted CE sums of one micro-batch (differentiable in text_wce and audio_wce)."""
    dep_q = out.logits.shape[1]
    text_tgt = codes[:, 0]
    text_m = out.text_mask[:, 0]
    tl = out.text_logits[:, 0].float()
    ce_t = F.cross_entropy(tl[text_m], text_tgt[text_m], reduction="none")
    is_pad = torch.zeros_like(text_tgt, dtype=torch.bool)
    for pid in padding_ids:
        is_pad |= text_tgt == pid
    wt = torch.where(is_pad[text_m], w.text_padding, 1.0)
    word = ~is_pad[text_m]

    audio_tgt = codes[:, 1:1 + dep_q]
    am = out.mask
    al = out.logits.float()
    ce_a = F.cross_entropy(al[am], audio_tgt[am], reduction="none")
    cb_index = torch.arange(dep_q, device=codes.device)[None, :, None].expand_as(am)[am]
    cw = codebook_weights(w, dep_q).to(codes.device)
    wa = cw[cb_index]
    audio_ce = torch.zeros(dep_q, device=codes.device).index_add(0, cb_index, ce_a.detach())
    audio_n = torch.bincount(cb_index, minlength=dep_q).float()
    return StreamSums(
        text_wce=(wt * ce_t).sum(), text_w=wt.sum(),
        audio_wce=(wa * ce_a).sum(), audio_w=wa.sum(),
        text_ce=ce_t.detach().sum(),
        text_n=torch.tensor(float(ce_t.numel()), device=codes.device),
        text_word_ce=ce_t.detach()[word].sum(), text_word_n=word.sum().float(),
        audio_ce=audio_ce, audio_n=audio_n,
    )


def combine(s: StreamSums, text_total: torch.Tensor, audio_total: torch.Tensor,
            w: LossWeights) -> torch.Tensor:
    """This micro-batch's share of the global loss (global totals as denominators)."""
    return (w.text * s.text_wce / text_total.clamp_min(1e-8)
            + w.audio * s.audio_wce / audio_total.clamp_min(1e-8))


def summarize(s: StreamSums, w: LossWeights) -> dict[str, float]:
    """Loggable per-stream figures of (summed) StreamSums."""
    text = float(s.text_wce / s.text_w.clamp_min(1e-8))
    audio = float(s.audio_wce / s.audio_w.clamp_min(1e-8))
    per_cb = (s.audio_ce / s.audio_n.clamp_min(1)).tolist()
    return {
        "loss": w.text * text + w.audio * audio,
        "text": text,
        "text_ce": float(s.text_ce / s.text_n.clamp_min(1)),
        "text_words_ce": float(s.text_word_ce / s.text_word_n.clamp_min(1)),
        "audio": audio,
        **{f"audio_cb{k}": v for k, v in enumerate(per_cb)},
    }

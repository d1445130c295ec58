"""The long-range recall tasks of `moshi-ttt eval-memory`: what a sequence holds and which frames
depend on content beyond every attention window.

Both tasks lay out Moshi's 17 streams as

    frame  (lead)        0      content   gap           recall marker   recall     (tail)
           distractors   START  L items   distractors   RECALL          the L items again

and score the L recall frames (the *dependent* frames) in the text stream: there the model must
name the content items, in order. Each item is uniform and independent of everything but its
first occurrence, so without access to it the best loss is log(content_vocab).

* `text`: the items are text tokens, and so are the distractors (a disjoint vocabulary, one per
  frame). Moshi's and the user's audio streams carry "no input" (-1).
* `speech`: the items are words the *user* speaks: their audio reaches the model only as the
  user's 8 Mimi codebooks (each word synthesised by espeak-ng in the user's voice and encoded once
  by a calibrated codec, laid out frame-aligned with silence around it); the text stream holds
  padding until the recall, where it must name the words (text ids standing for them). The gap
  holds distractor words the user speaks, from another vocabulary.

"Beyond the window" must hold for the whole network, not one layer: N stacked attention layers of
C frames reach N*(C-1) frames back, so gaps are multiples (>= 1) of that reach.

Content can arrive at any point of a session, not only at its start: each sequence draws its own
lead of `lead`/2..`lead` distractor frames before START (the rest of its length is tail); with
`lead` at least twice the attention context, every content frame sees a full window. Without a lead
the content always sits in the first frames of a sequence, and a model can tell content frames by
their position in the session (e.g. an attention window not yet full) instead of by the START
marker: measured, a TTT model trained that way recalls at chance once 16 distractor frames
precede START, even with its fast weights held at W0 through them.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

TEXT_PADDING = 3  # Moshi's text padding id


class RecallTask(BaseModel):
    """Shape of a recall task (the config's `eval.memory.task` section)."""

    model_config = ConfigDict(extra="forbid")

    context: int = Field(32, ge=2, description="attention context of every layer (frames)")
    content_len: int = Field(8, ge=1, description="L: content items to remember")
    gap: int = Field(128, ge=1, description="G: frames between the content and the recall")
    tail: int = Field(0, ge=0, description="distractor frames after the recall")
    lead: int = Field(0, ge=0, description="the most distractor frames before START; each "
                      "sequence draws its lead uniformly in lead/2..lead (rounded down), and "
                      "the frames its lead leaves unused go to its tail")
    content_vocab: int = Field(32, ge=2)
    distractor_vocab: int = Field(32, ge=1)
    first_id: int = Field(10, ge=2, description="first content id; the two ids below are markers")

    def content_frames(self, word_frames: int = 1) -> int:
        return self.content_len * word_frames

    def length(self, word_frames: int = 1) -> int:
        """T: lead, START, content, gap, RECALL, recalled content, tail."""
        return self.lead + self.instance_length(word_frames)

    def instance_length(self, word_frames: int = 1) -> int:
        """START, content, gap, RECALL, recalled content, tail: a sequence without its lead."""
        return 1 + self.content_frames(word_frames) + self.gap + 1 + self.content_len + self.tail

    def recall_frame(self, word_frames: int = 1) -> int:
        """The RECALL marker's frame in a sequence whose lead is 0."""
        return 1 + self.content_frames(word_frames) + self.gap

    @property
    def chance_loss(self) -> float:
        """The best loss on dependent frames without access to the content: log(content_vocab)."""
        return math.log(self.content_vocab)

    @property
    def chance_acc(self) -> float:
        return 1.0 / self.content_vocab

    def reach(self, num_layers: int) -> int:
        """How many frames back the logits of a frame can see through `num_layers` stacked
        attention layers of `context` frames each (each layer adds context - 1)."""
        return num_layers * (self.context - 1)

    def check(self, num_layers: int, text_card: int) -> None:
        """Refuse task shapes where the dependent frames are not really out of reach."""
        if self.gap <= self.context:
            raise ValueError(
                f"recall task: gap {self.gap} must exceed the attention context {self.context}")
        reach = self.reach(num_layers)
        # The logits at recall frame r+i see inputs back to step r+i-reach, i.e. codes from frame
        # r+i-reach-1 on; the content's last frame must lie before it for i = 1: gap >= reach.
        if self.gap < reach:
            raise ValueError(
                f"recall task: gap {self.gap} < {num_layers} layers x (context {self.context} - 1)"
                f" = {reach}: stacked attention windows still reach the content; use gap >= "
                f"{reach} or a shorter context")
        top = self.first_id + self.content_vocab + self.distractor_vocab
        if top > text_card:
            raise ValueError(f"recall task: token ids up to {top - 1} exceed the text vocabulary "
                             f"({text_card})")


@dataclass
class WordCodes:
    """Per-word user-audio codes [8, word_frames] (silence-padded to a common length) of the
    content and distractor vocabularies, and the codes of one frame of silence [8]."""

    content: torch.Tensor  # [content_vocab, 8, word_frames]
    distractors: torch.Tensor  # [distractor_vocab, 8, word_frames]
    silence: torch.Tensor  # [8]
    content_words: list[str]
    distractor_words: list[str]

    @property
    def word_frames(self) -> int:
        return int(self.content.shape[-1])

    def fingerprint(self) -> str:
        """sha256 (24 hex digits) of every code and word: the speech task's whole input. Two
        calibrations on different machines or environments can give different codecs, hence
        other codes and other speech figures; results carry this so they can be compared."""
        h = hashlib.sha256()
        for t in (self.content, self.distractors, self.silence):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.to(torch.int64).contiguous().numpy().tobytes())
        h.update("\n".join(self.content_words + ["|"] + self.distractor_words).encode())
        return h.hexdigest()[:24]


def text_batch(task: RecallTask, batch: int, generator: torch.Generator, n_q: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [B, 1 + n_q, T] (text = the task, audio = -1 "no input") and the dependent-frame
    mask [B, T] (True on the L recall frames)."""
    L, T = task.content_len, task.instance_length()
    start_id, recall_id = task.first_id - 2, task.first_id - 1
    content = task.first_id + torch.randint(task.content_vocab, (batch, L), generator=generator)
    dis_lo = task.first_id + task.content_vocab
    text = dis_lo + torch.randint(task.distractor_vocab, (batch, T), generator=generator)
    text[:, 0] = start_id
    text[:, 1:1 + L] = content
    r = task.recall_frame()
    text[:, r] = recall_id
    text[:, r + 1:r + 1 + L] = content
    codes = torch.full((batch, 1 + n_q, T), -1, dtype=torch.long)
    codes[:, 0] = text
    dependent = torch.zeros(batch, T, dtype=torch.bool)
    dependent[:, r + 1:r + 1 + L] = True
    if not task.lead:
        return codes, dependent
    filler = codes.new_full((batch, 1 + n_q, task.length()), -1)
    filler[:, 0] = dis_lo + torch.randint(task.distractor_vocab, (batch, task.length()),
                                          generator=generator)
    return _after_lead(task, codes, dependent, filler, generator)


def _after_lead(task: RecallTask, codes: torch.Tensor, dependent: torch.Tensor,
                filler: torch.Tensor, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's instance (codes [B, S, T0], dependent [B, T0]) placed after its own lead of
    task.lead/2..task.lead frames in `filler` [B, S, T0 + lead], whose other frames stay
    distractors."""
    B, S, T0 = codes.shape
    T = filler.shape[-1]
    lead = torch.randint(task.lead // 2, task.lead + 1, (B,), generator=generator)
    src = torch.arange(T)[None, :] - lead[:, None]  # [B, T]: instance frame at each frame
    inside = (src >= 0) & (src < T0)
    src = src.clamp(0, T0 - 1)
    placed = codes.gather(2, src[:, None, :].expand(B, S, T))
    out = torch.where(inside[:, None, :], placed, filler)
    return out, dependent.gather(1, src) & inside


def speech_batch(task: RecallTask, words: WordCodes, batch: int, generator: torch.Generator,
                 n_q: int, dep_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [B, 1 + n_q, T]: the user speaks L content words, then distractor words fill the
    gap (one word slot of `word_frames` at a time, a slot silent with probability 1/2); the text
    stream is padding but for the markers and the recalled words; Moshi's own audio is -1. A
    lead is spoken distractor words too (their slots start at the sequence's first frame, so the
    word just before START and the first of the tail may be cut short)."""
    L, W = task.content_len, words.word_frames
    T, r = task.instance_length(W), task.recall_frame(W)
    start_id, recall_id = task.first_id - 2, task.first_id - 1
    content = torch.randint(words.content.shape[0], (batch, L), generator=generator)
    user = words.silence.view(1, -1, 1).repeat(batch, 1, T)  # [B, 8, T]
    for i in range(L):
        user[:, :, 1 + i * W:1 + (i + 1) * W] = words.content[content[:, i]]
    lo = 1 + L * W  # the gap: distractor word slots
    user[:, :, lo:r] = _spoken_distractors(words, batch, r - lo, generator)
    text = torch.full((batch, T), TEXT_PADDING, dtype=torch.long)
    text[:, 0] = start_id
    text[:, r] = recall_id
    text[:, r + 1:r + 1 + L] = task.first_id + content
    codes = torch.full((batch, 1 + n_q, T), -1, dtype=torch.long)
    codes[:, 0] = text
    codes[:, 1 + dep_q:1 + dep_q + user.shape[1]] = user
    dependent = torch.zeros(batch, T, dtype=torch.bool)
    dependent[:, r + 1:r + 1 + L] = True
    if not task.lead:
        return codes, dependent
    filler = codes.new_full((batch, 1 + n_q, task.length(W)), -1)
    filler[:, 0] = TEXT_PADDING
    filler[:, 1 + dep_q:1 + dep_q + user.shape[1]] = _spoken_distractors(
        words, batch, task.length(W), generator)
    return _after_lead(task, codes, dependent, filler, generator)


def _spoken_distractors(words: WordCodes, batch: int, frames: int, generator: torch.Generator
                        ) -> torch.Tensor:
    """User codes [B, 8, frames]: whole word slots, each a distractor word with probability 1/2
    and silence otherwise; frames after the last whole slot are silence."""
    W = words.word_frames
    user = words.silence.view(1, -1, 1).repeat(batch, 1, frames)
    for s in range(0, frames - W + 1, W):
        pick = torch.randint(words.distractors.shape[0], (batch,), generator=generator)
        speak = torch.rand(batch, generator=generator) < 0.5
        user[:, :, s:s + W] = torch.where(speak[:, None, None], words.distractors[pick],
                                          user[:, :, s:s + W])
    return user


def encode_words(base: Path, content_vocab: int, distractor_vocab: int) -> WordCodes:
    """Synthesise the vocabularies in the user's voice (espeak-ng) and encode each word once with
    the codec of `base` (an init-base directory), frame-aligned, 80 ms of silence before it."""
    from ..base import load_codec, resolve_base
    from ..codec.report import roundtrip
    from ..config import BaseModelRef
    from ..data.synth import NAMES, NUMBERS, USER_SPEAKER, VOICES, WordBank, find_espeak

    pool = list(dict.fromkeys([*NAMES, *NUMBERS]))
    if content_vocab + distractor_vocab > len(pool):
        raise ValueError(f"speech recall: {content_vocab} + {distractor_vocab} words asked, the "
                         f"word list has {len(pool)}")
    content_words = pool[:content_vocab]
    distractor_words = pool[content_vocab:content_vocab + distractor_vocab]
    mimi = load_codec(resolve_base(BaseModelRef(local_dir=str(base))))
    fs = int(mimi.frame_size)
    bank = WordBank(find_espeak())
    voice = VOICES[USER_SPEAKER]
    bank.prefetch({(voice, w) for w in content_words + distractor_words})
    chunks = []
    for w in content_words + distractor_words:
        pcm = torch.from_numpy(bank.get(voice, w))
        n = math.ceil(pcm.numel() / fs)
        x = torch.zeros((n + 2) * fs)
        x[fs:fs + pcm.numel()] = pcm
        codes, _ = roundtrip(mimi, x)
        chunks.append(codes[:, 1:1 + n])  # the word's own frames
    silence, _ = roundtrip(mimi, torch.zeros(4 * fs))
    W = max(c.shape[-1] for c in chunks)
    sil = silence[:, -1]
    padded = torch.stack([torch.cat([c, sil[:, None].repeat(1, W - c.shape[-1])], dim=-1)
                          for c in chunks])
    words = WordCodes(padded[:content_vocab].long(), padded[content_vocab:].long(), sil.long(),
                      content_words, distractor_words)
    logger.info("speech recall: %d content and %d distractor words encoded, %d frames per word "
                "slot (word codes %s)", content_vocab, distractor_vocab, W, words.fingerprint())
    return words

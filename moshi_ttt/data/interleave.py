"""Moshi's text stream: the main speaker's words placed on the 12.5 Hz frame grid.

This follows moshi-finetune's interleaver (keep_main_only): each word of the main speaker is
tokenised on its own; its tokens go out one per frame from the frame where the word starts;
frames between words hold the padding id, and the padding frame right before a word holds the
end-of-padding id, so the model learns when a word is about to start.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import sentencepiece

from .index import Alignment

MAIN_SPEAKER = "SPEAKER_MAIN"


@dataclass(frozen=True)
class TextStreamSpec:
    frame_rate: float = 12.5
    text_padding: int = 3  # LMModel.text_padding_token_id
    end_of_text_padding: int = 0  # LMModel.end_of_text_padding_id
    main_speaker: str = MAIN_SPEAKER


def text_stream(alignments: list[Alignment], num_frames: int,
                tokenizer: sentencepiece.SentencePieceProcessor,
                spec: TextStreamSpec = TextStreamSpec()) -> list[int]:
    """Text token per frame (length `num_frames`) for the main speaker's words."""
    words = [(tokenizer.encode(w.strip()), ts) for w, ts, spk in alignments
             if spk == spec.main_speaker and ts[0] < ts[1] and w.strip()]
    tokens = [spec.text_padding] * num_frames
    pending: deque[int] = deque()
    i = 0
    for t in range(num_frames):
        while i < len(words) and words[i][1][0] * spec.frame_rate < t + 1:
            pending = deque(words[i][0])  # a new word replaces what an old one left unsaid
            i += 1
        if pending:
            if t > 0 and tokens[t - 1] == spec.text_padding:
                tokens[t - 1] = spec.end_of_text_padding
            tokens[t] = pending.popleft()
    return tokens

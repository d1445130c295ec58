"""Training a small sentencepiece text tokenizer with Moshi's special ids.

Moshi's text stream uses id 3 for padding and id 0 for end-of-padding; its tokenizer reserves
0 (unk), 1 (bos), 2 (eos) and 3 (pad). A tokenizer trained here keeps that layout, so the LM's
`existing_text_padding_id: 3` and `existing_text_end_padding_id: 0` mean the same thing.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

logger = logging.getLogger(__name__)


def train_sentencepiece(texts: Iterable[str], model_path: str | Path, vocab_size: int) -> Path:
    """Train a unigram model on `texts` and write it to `model_path` (the .model file).

    The vocabulary is capped by what the corpus supports (hard_vocab_limit off), so a small
    corpus gives a smaller vocabulary rather than an error; it is never above `vocab_size`.
    """
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    corpus = [t.strip() for t in texts if t and t.strip()]
    if not corpus:
        raise ValueError("cannot train a text tokenizer on an empty corpus")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, minloglevel=2,
    )
    model_path.write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    logger.info("text tokenizer: %d pieces -> %s", sp.vocab_size(), model_path)
    return model_path

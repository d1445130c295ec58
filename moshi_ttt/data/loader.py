"""Segments and batches: files cut into fixed-length segments, served in a seeded order.

Every file is encoded once (through the cache) into [17, T]; segment k of a file covers frames
[k*L, (k+1)*L). A last segment shorter than `min_seconds` is dropped; a longer one is padded with
-1 ("no input"), which LMModel masks out of the loss. The order of segments is a permutation
seeded by (seed, epoch), so a run is reproducible and a resumed run continues exactly where it
stopped (`position` is saved in checkpoints). Under data parallelism each rank takes its share of
every global batch, so N ranks see exactly the batch one process would.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .encode import StreamEncoder
from .index import AudioFile, DataError, read_alignments, read_index
from .interleave import TextStreamSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    file: int
    start: int  # frame


@dataclass
class LoaderPosition:
    epoch: int = 0
    cursor: int = 0  # segments of this epoch already consumed (globally)


def check_duration(f: AudioFile, codes: torch.Tensor, frame_rate: float = 12.5) -> None:
    """The index's duration against the encoded length, so a stale index is caught on a cache
    hit too (the audio itself is only read on a miss). Same tolerance as reading the audio,
    plus the one frame that encoding rounds up."""
    frames = codes.shape[-1]
    duration = frames / frame_rate
    if abs(duration - f.duration) > 0.5 + 0.05 * duration + 1 / frame_rate:
        raise DataError(f"{f.path} lasts {duration:.2f} s ({frames} frames as encoded) but the "
                        f"index says {f.duration:.2f} s: a stale index or the wrong file")


def check_main_speaker(f: AudioFile, codes: torch.Tensor, spec: TextStreamSpec) -> None:
    """A file whose text stream holds no word although its alignments have words: their speaker
    labels are not the main speaker's, and training would teach Moshi silence."""
    text = codes[0]
    words = (text != spec.text_padding) & (text != spec.end_of_text_padding) & (text != -1)
    if bool(words.any()):
        return
    speakers = Counter(spk for w, _, spk in read_alignments(f, math.inf) if w.strip())
    if speakers and spec.main_speaker not in speakers:
        found = ", ".join(f"{k!r} ({n} words)" for k, n in speakers.most_common())
        raise DataError(
            f"{f.alignments_path}: none of its {sum(speakers.values())} words is by the main "
            f"speaker {spec.main_speaker!r} (found {found}). Moshi's text stream is the main "
            f"speaker's words (the left channel): label them {spec.main_speaker!r}")


class SegmentLoader:
    def __init__(self, index: str | Path, encoder: StreamEncoder, segment_seconds: float,
                 seed: int = 0, min_seconds: float = 1.0, frame_rate: float = 12.5,
                 show_progress: bool = True, save_memo: bool = True):
        """`save_memo=False` for processes that only read a cache another one wrote (several
        writers of the memo would race on its temporary file)."""
        self.index = Path(index)
        self.files: list[AudioFile] = read_index(self.index)
        self.seg_frames = max(1, int(round(segment_seconds * frame_rate)))
        self.seed = seed
        self.codes: list[torch.Tensor] = []
        it = self.files
        if show_progress:
            it = tqdm(it, desc=f"encoding {self.index.name}", unit="file", leave=False)
        for f in it:
            codes = encoder.encode(f)
            check_duration(f, codes, frame_rate)
            check_main_speaker(f, codes, encoder.spec)
            self.codes.append(codes)
        if save_memo:
            encoder.save_memo()
        min_frames = max(1, int(round(min_seconds * frame_rate)))
        self.segments: list[Segment] = []
        unused: list[str] = []
        for i, c in enumerate(self.codes):
            T = c.shape[-1]
            n = len(self.segments)
            for start in range(0, T, self.seg_frames):
                if T - start >= min(min_frames, self.seg_frames):
                    self.segments.append(Segment(i, start))
            if len(self.segments) == n:
                unused.append(f"{self.files[i].path.name} ({T / frame_rate:.2f} s)")
        short = ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else "")
        if not self.segments:
            raise DataError(f"{self.index}: no segment of at least {min_seconds} s (every file "
                            f"is shorter: {short})")
        if unused:  # said, since the file is otherwise dropped without a trace
            logger.warning("%s: %d file(s) shorter than the minimum segment (%s s) are not "
                           "trained on: %s", self.index.name, len(unused), min_seconds, short)
        logger.info("%s: %d files, %d segments of %d frames (cache: %d hit, %d encoded)",
                    self.index.name, len(self.files), len(self.segments), self.seg_frames,
                    encoder.hits, encoder.misses)

    @property
    def fingerprint(self) -> str:
        """Identity of the data as trained on: which cached encodings, in which segmentation."""
        h = hashlib.sha256()
        for c in self.codes:
            h.update(c.numpy().tobytes())
        h.update(f"{self.seg_frames}/{len(self.segments)}".encode())
        return h.hexdigest()[:24]

    def segment(self, s: Segment) -> torch.Tensor:
        c = self.codes[s.file][:, s.start:s.start + self.seg_frames].long()
        if c.shape[-1] < self.seg_frames:
            c = torch.nn.functional.pad(c, (0, self.seg_frames - c.shape[-1]), value=-1)
        return c

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.segments), generator=g).tolist()

    def next_global_batch(self, pos: LoaderPosition, global_batch: int) -> list[Segment]:
        """The next `global_batch` segments in the seeded order, advancing `pos` (wrapping into
        the next epoch, which gets a fresh permutation)."""
        out: list[Segment] = []
        while len(out) < global_batch:
            order = self.order(pos.epoch)
            take = min(global_batch - len(out), len(order) - pos.cursor)
            out += [self.segments[i] for i in order[pos.cursor:pos.cursor + take]]
            pos.cursor += take
            if pos.cursor >= len(order):
                pos.epoch += 1
                pos.cursor = 0
        return out

    def batch(self, segments: list[Segment]) -> torch.Tensor:
        return torch.stack([self.segment(s) for s in segments])

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> list[torch.Tensor]:
        """All segments in file order (no shuffling), for held-out evaluation."""
        n = math.ceil(len(self.segments) / batch_size)
        if max_batches:
            n = min(n, max_batches)
        return [self.batch(self.segments[i * batch_size:(i + 1) * batch_size])
                for i in range(n)]

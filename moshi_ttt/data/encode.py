"""Audio + alignments -> the 17 streams Moshi trains on, cached by file content and codec.

Streams of one file, [17, T] at 12.5 Hz: row 0 the text stream (main speaker's words), rows 1..8
Mimi's 8 codebooks of the LEFT channel (Moshi), rows 9..16 those of the RIGHT channel (the user).
Moshi's delays are not applied here: `LMModel.forward` applies them.

Encoding audio is the slow part of data preparation, so each file's streams are cached in
`cache_dir/<key>.safetensors`, with `key` a hash of the wav's bytes, the alignment file's bytes,
and the codec (Mimi weights and config, tokenizer, number of codebooks, text-stream settings).
Changing any of them re-encodes; a size/mtime memo avoids re-hashing unchanged files each run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import sentencepiece
import sphn
import torch
from safetensors.torch import load_file, save_file

from .index import AudioFile, DataError, read_alignments
from .interleave import TextStreamSpec, text_stream
from .mimi_chunks import encode_chunked

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24000
MIN_SAMPLE_RATE = 16000


@functools.lru_cache(maxsize=16)
def _resampler_delay(src: int, dst: int) -> int:
    """sphn's resampler delays its output (about 23 ms at 22.05 -> 24 kHz) and pads the tail;
    measure the delay once per rate pair with an impulse."""
    x = np.zeros((1, src), np.float32)
    x[0, src // 4] = 1.0
    y = sphn.resample(x, src, dst)
    return int(np.argmax(np.abs(y[0]))) - round((src // 4) * dst / src)


def resample_aligned(pcm: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Resample [C, S] without shifting it in time: sample i of the output is at i / dst s,
    so word alignments stay where they were."""
    n_out = round(pcm.shape[-1] * dst / src)
    delay = _resampler_delay(src, dst)
    y = sphn.resample(np.ascontiguousarray(pcm, dtype=np.float32), src, dst)[..., delay:]
    if y.shape[-1] < n_out:
        y = np.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, n_out - y.shape[-1])])
    return y[..., :n_out]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def codec_fingerprint(mimi: torch.nn.Module, tokenizer_path: Path, spec: TextStreamSpec) -> str:
    """Identity of everything that turns a file into tokens."""
    h = hashlib.sha256()
    for name, t in sorted(mimi.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        h.update(str(tuple(t.shape)).encode())
    h.update(str(getattr(mimi, "num_codebooks", "")).encode())
    h.update(Path(tokenizer_path).read_bytes())
    h.update(json.dumps(spec.__dict__, sort_keys=True).encode())
    return h.hexdigest()[:24]


def read_stereo(f: AudioFile) -> np.ndarray:
    """The file as [2, S] float32 at 24 kHz, or a DataError saying what is wrong with it."""
    try:
        pcm, sr = sphn.read(str(f.path))
    except Exception as e:
        raise DataError(f"cannot read audio {f.path}: {e} (expected a stereo wav)") from e
    if pcm.ndim != 2 or pcm.shape[0] != 2:
        chans = 1 if pcm.ndim == 1 else pcm.shape[0]
        raise DataError(f"{f.path} has {chans} channel(s); expected a stereo file "
                        f"(left = Moshi, right = user)")
    if sr < MIN_SAMPLE_RATE:
        raise DataError(f"{f.path} is sampled at {sr} Hz; expected at least "
                        f"{MIN_SAMPLE_RATE} Hz (it is resampled to {SAMPLE_RATE} Hz, but "
                        f"speech above {sr // 2} Hz would be missing)")
    if pcm.shape[1] == 0:
        raise DataError(f"{f.path} holds no audio")
    duration = pcm.shape[1] / sr
    if abs(duration - f.duration) > 0.5 + 0.05 * duration:
        raise DataError(f"{f.path} lasts {duration:.2f} s at {sr} Hz but the index says "
                        f"{f.duration:.2f} s: wrong sample rate in the file or a stale index")
    if sr != SAMPLE_RATE:
        pcm = resample_aligned(pcm, sr, SAMPLE_RATE)
    if not np.isfinite(pcm).all():
        raise DataError(f"{f.path} contains NaN or infinite samples")
    return np.ascontiguousarray(pcm, dtype=np.float32)


class StreamEncoder:
    """Encodes dataset files into [17, T] int tensors, through the cache."""

    def __init__(self, mimi, tokenizer: sentencepiece.SentencePieceProcessor,
                 tokenizer_path: Path, cache_dir: Path, spec: TextStreamSpec = TextStreamSpec(),
                 device: str | torch.device = "cpu"):
        self.mimi = mimi
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = torch.device(device)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.codec_id = codec_fingerprint(mimi, tokenizer_path, spec)
        self._memo_path = self.cache_dir / "content-hashes.json"
        try:
            self._memo: dict[str, list] = json.loads(self._memo_path.read_text())
        except (OSError, json.JSONDecodeError):
            self._memo = {}
        self.hits = self.misses = 0

    def _content_hash(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        stamp = [st.st_size, st.st_mtime_ns]
        memo = self._memo.get(key)
        if memo and memo[:2] == stamp:
            return memo[2]
        digest = _sha256_file(path)
        self._memo[key] = [*stamp, digest]
        return digest

    def key(self, f: AudioFile) -> str:
        h = hashlib.sha256()
        h.update(self._content_hash(f.path).encode())
        h.update(self._content_hash(f.alignments_path).encode())
        h.update(self.codec_id.encode())
        return h.hexdigest()[:32]

    def encode(self, f: AudioFile) -> torch.Tensor:
        key = self.key(f)
        cached = self.cache_dir / f"{key}.safetensors"
        if cached.is_file():
            try:
                codes = load_file(str(cached))["codes"]
                self.hits += 1
                return codes
            except Exception:  # a torn cache file is re-made, never trusted
                logger.warning("cache entry %s unreadable; re-encoding %s", cached, f.path)
        self.misses += 1
        codes = self._encode_uncached(f)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        save_file({"codes": codes}, str(tmp), metadata={"source": str(f.path)})
        os.replace(tmp, cached)
        return codes

    def save_memo(self) -> None:
        tmp = self._memo_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._memo))
        os.replace(tmp, self._memo_path)

    #: Frames Mimi encodes per call (60 s): bounded memory for any file length, the codes of
    #: one call over the whole file (see `mimi_chunks`).
    chunk_frames: int = 750

    @torch.no_grad()
    def _encode_uncached(self, f: AudioFile) -> torch.Tensor:
        pcm = read_stereo(f)
        duration = pcm.shape[1] / SAMPLE_RATE
        alignments = read_alignments(f, duration)
        # From the sample count, as Mimi counts frames: ceil(S / 24000 * 12.5) in floats
        # gives one frame too many (all "no input") for some whole-frame files (7 frames: 8).
        T = math.ceil(pcm.shape[1] * self.spec.frame_rate / SAMPLE_RATE)
        audio = encode_chunked(self.mimi, torch.from_numpy(pcm)[:, None], self.chunk_frames,
                               self.device)  # [2, Q, T']
        nq = 8
        audio = audio[:, :nq, :T]
        if audio.shape[-1] < T:  # pad a short tail with "no input"
            audio = torch.nn.functional.pad(audio, (0, T - audio.shape[-1]), value=-1)
        text = torch.tensor(text_stream(alignments, T, self.tokenizer, self.spec),
                            device=audio.device)
        codes = torch.cat([text[None], audio[0], audio[1]], dim=0)
        logger.debug("encoded %s: %d frames", f.path, T)
        return codes.to(torch.int32).cpu().contiguous()

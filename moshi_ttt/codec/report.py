"""`moshi-ttt codec-report`: does a base's Mimi carry the speech in its codes?

Per RVQ level: how many distinct codes the files use and the perplexity of the code histogram
(exp of its entropy: 1 when every frame gets the same code, the number of codes when all are
equally used). Reconstruction: SNR of decode(encode(x)) against x in dB, and the log-mel L1
distance between them, beside the same distance for a codec that outputs silence (the floor a
codec must beat to carry anything audible). Codes are also counted on the *active* frames alone
(frame RMS above -50 dBFS), since dialogue channels are half silence and silence, rightly, gets
few codes.

Encoding and decoding run in moshi's streaming mode, frame chunk by frame chunk, as the server runs
the codec: memory stays bounded on long files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sphn
import torch

from ..data.encode import SAMPLE_RATE, resample_aligned
from .mel import log_mel

ACTIVE_RMS = 10 ** (-50 / 20)  # -50 dBFS
CHUNK_FRAMES = 50  # 4 s of audio per streaming call


class CodecReportError(ValueError):
    """A wav cannot be read or holds nothing to encode; the message names it."""


def read_wav_channels(path: Path) -> list[np.ndarray]:
    """Every channel of an audio file as float32 at 24 kHz."""
    if not path.is_file():
        raise CodecReportError(f"audio file not found: {path}")
    try:
        pcm, sr = sphn.read(str(path))
    except Exception as e:
        raise CodecReportError(f"cannot read audio {path}: {e} (expected a wav or another "
                               f"format sphn reads)") from None
    pcm = np.atleast_2d(np.asarray(pcm, dtype=np.float32))
    if pcm.shape[-1] == 0:
        raise CodecReportError(f"{path} holds no audio")
    if sr != SAMPLE_RATE:
        pcm = resample_aligned(pcm, sr, SAMPLE_RATE)
    if not np.isfinite(pcm).all():
        raise CodecReportError(f"{path} contains NaN or infinite samples")
    return [np.ascontiguousarray(ch) for ch in pcm]


@torch.no_grad()
def roundtrip(mimi: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [K, T] and decode(encode(x)) [T * frame_size] of a signal [S] (padded with silence
    to whole frames), through the streaming codec."""
    fs = int(mimi.frame_size)
    T = math.ceil(x.numel() / fs)
    x = torch.nn.functional.pad(x, (0, T * fs - x.numel()))
    device = next(mimi.parameters()).device
    codes, out = [], []
    with mimi.streaming(1):
        for lo in range(0, T, CHUNK_FRAMES):
            chunk = x[lo * fs:min(T, lo + CHUNK_FRAMES) * fs].to(device)[None, None]
            c = mimi.encode(chunk)
            codes.append(c[0].cpu())
            out.append(mimi.decode(c)[0, 0].float().cpu())
    return torch.cat(codes, dim=-1), torch.cat(out)[: x.numel()]


def _levels(codes: torch.Tensor, card: int) -> list[dict[str, Any]]:
    out = []
    for level, row in enumerate(codes):
        hist = torch.bincount(row.long(), minlength=card).double()
        p = hist[hist > 0] / hist.sum() if hist.sum() > 0 else hist[:0]
        entropy = float(-(p * p.log()).sum()) if p.numel() else 0.0
        out.append({"level": level, "codes_used": int((hist > 0).sum()),
                    "perplexity": round(math.exp(entropy), 3)})
    return out


@dataclass
class _Sums:
    signal: float = 0.0
    error: float = 0.0
    mel: float = 0.0
    mel_silence: float = 0.0
    mel_n: int = 0
    codes: list[torch.Tensor] = field(default_factory=list)
    active: list[torch.Tensor] = field(default_factory=list)


def codec_report(mimi: torch.nn.Module, wavs: list[Path]) -> dict[str, Any]:
    """Code usage per level, SNR and log-mel L1 of `mimi` on every channel of `wavs`."""
    if not wavs:
        raise CodecReportError("no audio files given")
    mimi.eval()
    fs, card = int(mimi.frame_size), int(mimi.cardinality)
    sums = _Sums()
    for path in wavs:
        for ch in read_wav_channels(Path(path)):
            x = torch.from_numpy(ch)
            codes, y = roundtrip(mimi, x)
            xs = torch.nn.functional.pad(x, (0, y.numel() - x.numel()))
            sums.signal += float(xs.double().pow(2).sum())
            sums.error += float((xs - y).double().pow(2).sum())
            mx = log_mel(xs)
            sums.mel += float((mx - log_mel(y)).abs().sum())
            sums.mel_silence += float((mx - log_mel(torch.zeros_like(xs))).abs().sum())
            sums.mel_n += mx.numel()
            sums.codes.append(codes)
            sums.active.append(xs.view(-1, fs).pow(2).mean(-1).sqrt() > ACTIVE_RMS)
    codes = torch.cat(sums.codes, dim=-1)
    active = torch.cat(sums.active)
    snr = 10 * math.log10(sums.signal / sums.error) if sums.error > 0 else math.inf
    if sums.signal == 0:
        snr = -math.inf
    return {
        "levels": _levels(codes, card),
        "snr_db": round(snr, 3),
        "mel_l1": round(sums.mel / sums.mel_n, 4),
        "frames": int(codes.shape[-1]),
        "silence_mel_l1": round(sums.mel_silence / sums.mel_n, 4),
        "active_frames": int(active.sum()),
        "active_levels": _levels(codes[:, active], card),
        "codebook_size": card,
        "files": [str(p) for p in wavs],
    }


def format_report(r: dict[str, Any]) -> str:
    """A plain table of a `codec_report` result."""
    lines = [f"{r['frames']} frames ({r['frames'] / 12.5:.1f} s, {r['active_frames']} active) "
             f"from {len(r['files'])} file(s), codebook size {r['codebook_size']}",
             "level  codes used  perplexity  | active frames: codes used  perplexity"]
    for a, b in zip(r["levels"], r["active_levels"]):
        lines.append(f"{a['level']:>5}  {a['codes_used']:>10}  {a['perplexity']:>10.1f}  | "
                     f"{b['codes_used']:>25}  {b['perplexity']:>10.1f}")
    lines.append(f"reconstruction: SNR {r['snr_db']:.2f} dB, log-mel L1 {r['mel_l1']:.3f} "
                 f"(a codec that outputs silence: {r['silence_mel_l1']:.3f})")
    return "\n".join(lines)

"""Log-mel spectra: the distance the codec is calibrated on and reported with.

torchaudio is not a dependency (its wheels pin torch), so the filterbank is built here: HTK mel
scale, triangular filters, power spectrum, log with a fixed floor. The floor (1e-5 on the power,
i.e. -50 dB) is what makes a log-mel distance see silence: a codec that hisses where the input is
silent pays for it, and a codec that outputs silence where there is speech pays more.
"""

from __future__ import annotations

import functools
import math

import torch

LOG_FLOOR = 1e-5


def _hz_to_mel(f: float | torch.Tensor):
    return 2595.0 * (math.log10(1.0 + f / 700.0) if isinstance(f, float)
                     else torch.log10(1.0 + f / 700.0))


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


@functools.lru_cache(maxsize=16)
def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] triangular filters, evenly spaced on the HTK mel scale from 0 Hz
    to Nyquist."""
    edges = _mel_to_hz(torch.linspace(0.0, _hz_to_mel(sample_rate / 2.0), n_mels + 2,
                                      dtype=torch.float64))
    freqs = torch.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1, dtype=torch.float64)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


def log_mel(x: torch.Tensor, sample_rate: int = 24000, n_fft: int = 1024, hop: int | None = None,
            n_mels: int = 64) -> torch.Tensor:
    """log(mel power + LOG_FLOOR) of waveforms [..., S] -> [..., n_mels, frames]."""
    hop = hop or n_fft // 4
    lead = x.shape[:-1]
    spec = torch.stft(x.reshape(-1, x.shape[-1]).float(), n_fft, hop,
                      window=torch.hann_window(n_fft, device=x.device), return_complex=True)
    fb = mel_filterbank(n_fft, n_mels, sample_rate).to(x.device)
    mel = fb @ spec.abs().pow(2)
    return torch.log(mel + LOG_FLOOR).reshape(*lead, n_mels, -1)


#: (n_fft, n_mels) of the multi-resolution loss used to calibrate the codec.
LOSS_RESOLUTIONS = ((256, 32), (512, 48), (1024, 64), (2048, 80))


def multi_resolution_mel_l1(x: torch.Tensor, y: torch.Tensor, sample_rate: int = 24000
                            ) -> torch.Tensor:
    """Mean log-mel L1 over several STFT sizes: short windows see onsets, long ones pitch."""
    return sum(
        (log_mel(x, sample_rate, n, n // 4, m) - log_mel(y, sample_rate, n, n // 4, m))
        .abs().mean()
        for n, m in LOSS_RESOLUTIONS
    ) / len(LOSS_RESOLUTIONS)

"""Calibrating a random Mimi on speech, so that its codes carry the speech.

A Mimi built from moshi's config with random weights (what `init-base` makes for the tiny config)
is no codec at all. Its quantizer's codebooks are all zero: moshi initialises them with k-means on
the first training batch, which a random Mimi never sees, so every frame encodes to code 0 at every
level. And its random SEANet convolutions shrink the signal layer after layer, so the latents
hardly vary (in the tiny config their spread over time is 0.002 against a mean of 0.03): a
decoder trained on them settles on outputting silence. Calibration, in order:

1. data-dependent initialisation of the encoder path (in the spirit of LSUV, Mishkin & Matas
   2016): each convolution, in forward order, is rescaled so that its output has zero mean per
   channel and unit variance on speech;
2. k-means initialisation of every RVQ level from the encoder's latents of the training speech,
   by moshi's own quantizer (`EuclideanCodebook._init_embedding`, level after level, exactly as
   its residual quantizer does on its first training batches);
3. the same data-dependent initialisation of the decoder path, on the quantized latents (the last
   convolution matches the speech's own level instead of unit variance);
4. joint training of encoder, quantizer and decoder on a multi-resolution log-mel L1 plus a
   waveform L1, with moshi's commitment loss, EMA codebook updates and dead-code replacement;
   the encoder path learns at a tenth of the decoder's rate, so its latents move slowly;
5. a codebook refresh: k-means again on the trained encoder's latents. Small batches of a
   dataset that is half silence make the EMA and the dead-code replacement pile codebook entries
   onto a few codes; the refresh spreads them over the latents again, and the decoder, trained
   on quantized latents close to these centroids, barely notices;
6. a short training of the decoder alone on the refreshed codes.

Only the training split is read (held-out files stay unseen), and everything is seeded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from moshi.quantization.core_vq import EuclideanCodebook
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..data.encode import SAMPLE_RATE, read_stereo
from ..data.index import DataError, read_index
from .mel import multi_resolution_mel_l1
from .report import ACTIVE_RMS

logger = logging.getLogger(__name__)


class CalibrationSettings(BaseModel):
    """Budget and schedule of a calibration (the config's `codec` section)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    max_seconds: float = Field(900.0, gt=0, description="single-channel seconds of training "
                               "speech read, at most (files in index order)")
    kmeans_frames: int = Field(8192, ge=64, description="latent frames the refresh's k-means "
                               "sees, at most (it sets the final codebooks)")
    init_kmeans_frames: int = Field(4096, ge=64, description="latent frames the first k-means "
                                    "sees, at most: it only starts the joint training, so half "
                                    "the refresh's frames cost half the time and change little")
    init_seconds: float = Field(15.0, gt=0, description="speech used by the data-dependent init")
    joint_steps: int = Field(150, ge=0, description="steps of encoder + quantizer + decoder")
    decoder_steps: int = Field(100, ge=0, description="steps of the decoder alone, after the "
                               "codebook refresh")
    batch_size: int = Field(8, ge=1)
    segment_frames: int = Field(12, ge=1, description="frames (80 ms) per training segment")
    lr: float = Field(3e-3, gt=0)
    encoder_lr_scale: float = Field(0.1, gt=0, description="encoder path lr = lr x this")
    waveform_weight: float = Field(1.0, ge=0, description="weight of the waveform L1")
    commitment_weight: float = Field(1.0, ge=0, description="weight of moshi's commitment loss")


@dataclass
class CalibrationAudio:
    """Single-channel 24 kHz signals of a dataset's training split, cut to whole frames."""

    signals: list[torch.Tensor]
    files: list[str]
    index: str

    @property
    def seconds(self) -> float:
        return sum(s.numel() for s in self.signals) / SAMPLE_RATE


@dataclass
class StageResult:
    steps: int
    seconds: float
    loss_first: float | None = None
    loss_last: float | None = None


@dataclass
class CalibrationReport:
    settings: dict[str, Any]
    index: str
    files: list[str]
    seconds_of_speech: float
    kmeans_frames: int
    stages: dict[str, StageResult] = field(default_factory=dict)
    wall_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def training_index(data: str | Path) -> Path:
    """The training split of a dataset: DATA/train.jsonl for a directory, or the index itself."""
    data = Path(data)
    if data.is_dir():
        index = data / "train.jsonl"
        if not index.is_file():
            raise DataError(f"calibration data {data} has no train.jsonl (expected a dataset "
                            f"directory as `moshi-ttt make-data` writes, or an index .jsonl)")
        return index
    if not data.exists():
        raise DataError(f"calibration data not found: {data} (expected a dataset directory "
                        f"with train.jsonl, or an index .jsonl)")
    return data


def load_calibration_audio(data: str | Path, frame_size: int, max_seconds: float,
                           min_frames: int = 1) -> CalibrationAudio:
    """Both channels of every training file (each channel its own signal), in index order, until
    `max_seconds` of audio; each cut to whole frames. Only `train.jsonl` is read."""
    index = training_index(data)
    files = read_index(index)
    signals: list[torch.Tensor] = []
    used: list[str] = []
    total = 0
    for f in files:
        if total >= max_seconds * SAMPLE_RATE:
            break
        pcm = read_stereo(f)
        n = pcm.shape[1] // frame_size * frame_size
        if n < min_frames * frame_size:
            continue
        used.append(str(f.path))
        for ch in pcm:
            signals.append(torch.from_numpy(np.ascontiguousarray(ch[:n])))
            total += n
    if not signals:
        raise DataError(f"calibration data {index}: no file holds {min_frames} frame(s) "
                        f"({min_frames * frame_size / SAMPLE_RATE:.2f} s) of audio")
    loudest = max(float(s.view(-1, frame_size).pow(2).mean(-1).sqrt().max()) for s in signals)
    if loudest <= ACTIVE_RMS:  # calibrating on it "succeeds" with a codec of exploded weights
        level = f"loudest {20 * np.log10(loudest):.0f} dBFS" if loudest > 0 else "all zero"
        raise DataError(f"calibration data {index}: the {len(used)} file(s) read are silent "
                        f"(no {frame_size / SAMPLE_RATE * 1000:.0f} ms frame above -50 dBFS, "
                        f"{level}); expected speech")
    return CalibrationAudio(signals, used, str(index))


# -- data-dependent initialisation ---------------------------------------------------------------

_CONVS = (nn.Conv1d, nn.ConvTranspose1d)


def convs_in_call_order(run: Callable[[], Any], roots: list[nn.Module]) -> list[nn.Module]:
    """The convolutions under `roots`, in the order `run()` calls them (each once)."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
             for root in roots for m in root.modules() if isinstance(m, _CONVS)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    seen: list[nn.Module] = []
    for m in order:
        if not any(m is s for s in seen):
            seen.append(m)
    return seen


@torch.no_grad()
def unit_variance_init(run: Callable[[], Any], convs: list[nn.Module],
                       last_std: float | None = None) -> None:
    """Rescale each conv, in order, so that on `run()`'s input its output has zero mean per
    channel (through its bias, where it has one) and standard deviation 1 (`last_std` for the
    last one). Each conv is measured after the ones before it were rescaled."""
    for i, conv in enumerate(convs):
        seen: dict[str, torch.Tensor] = {}
        hook = conv.register_forward_hook(lambda _m, _i, out: seen.__setitem__("out", out))
        try:
            run()
        finally:
            hook.remove()
        out = seen["out"].float()
        target = last_std if (last_std is not None and i == len(convs) - 1) else 1.0
        gain = target / float(out.std().clamp_min(1e-8))
        conv.weight.mul_(gain)
        if conv.bias is not None:
            conv.bias.sub_(out.mean(dim=(0, 2))).mul_(gain)


# -- codebooks ------------------------------------------------------------------------------------

def codebooks(mimi: nn.Module) -> list[EuclideanCodebook]:
    return [m for m in mimi.quantizer.modules() if isinstance(m, EuclideanCodebook)]


def kmeans_codebooks(mimi: nn.Module, latents: torch.Tensor) -> None:
    """(Re-)initialise every RVQ level with moshi's k-means on `latents` [1, D, N]: the codebooks
    are marked uninitialised, then the quantizer runs in training mode once per level, and its
    residual quantizers initialise one more level per call (each on the residual of the levels
    before it), as they would on their first training batches."""
    books = codebooks(mimi)
    for cb in books:
        cb._initialized.fill_(0)
        cb._cached_initialized = False
    was_training = mimi.quantizer.training
    mimi.quantizer.train()
    try:
        with torch.no_grad():
            for _ in range(len(books)):
                if all(cb.initialized for cb in books):
                    break
                mimi.quantizer(latents, mimi.frame_rate)
    finally:
        mimi.quantizer.train(was_training)
    missing = [i for i, cb in enumerate(books) if not cb.initialized]
    if missing:
        raise RuntimeError(f"k-means left codebooks {missing} uninitialised")


@torch.no_grad()
def encoder_latents(mimi: nn.Module, signals: list[torch.Tensor], max_frames: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Unquantized latents [1, D, N] of every signal, N at most `max_frames` (a seeded random
    subset of frames: the quantizer is frame-wise, so frames can be pooled across signals)."""
    mimi.eval()
    lat = torch.cat([mimi.encode_to_latent(s[None, None], quantize=False)[0] for s in signals],
                    dim=-1)
    if lat.shape[-1] > max_frames:
        keep = torch.randperm(lat.shape[-1], generator=generator)[:max_frames].sort().values
        lat = lat[:, keep]
    return lat[None]


# -- training -------------------------------------------------------------------------------------

def _encoder_path(mimi: nn.Module) -> list[nn.Module]:
    mods = [mimi.encoder, mimi.downsample, mimi.quantizer]
    if mimi.encoder_transformer is not None:
        mods.append(mimi.encoder_transformer)
    return [m for m in mods if m is not None]


def _train(mimi: nn.Module, audio: torch.Tensor, s: CalibrationSettings, steps: int,
           generator: torch.Generator, decoder_only: bool, name: str) -> StageResult:
    """`steps` of Adam on random segments of `audio` (all training speech, concatenated)."""
    t0 = time.perf_counter()
    if steps == 0:
        return StageResult(0, 0.0)
    enc_ids = {id(p) for m in _encoder_path(mimi) for p in m.parameters()}
    params = [p for p in mimi.parameters()]
    for p in params:
        p.requires_grad_(not (decoder_only and id(p) in enc_ids))
    groups = [{"params": [p for p in params if id(p) not in enc_ids], "lr": s.lr}]
    if not decoder_only:
        groups.append({"params": [p for p in params if id(p) in enc_ids],
                       "lr": s.lr * s.encoder_lr_scale})
    opt = torch.optim.Adam(groups, betas=(0.8, 0.99))
    seg = s.segment_frames * mimi.frame_size
    if audio.numel() < seg:
        raise DataError(f"calibration needs at least {seg / SAMPLE_RATE:.2f} s of audio "
                        f"(segment_frames {s.segment_frames}), got "
                        f"{audio.numel() / SAMPLE_RATE:.2f} s")
    losses: list[float] = []
    mimi.train()
    if decoder_only:
        for m in _encoder_path(mimi):
            m.eval()  # fixed codebooks (no EMA), fixed latents
    try:
        for _ in range(steps):
            starts = torch.randint(0, audio.numel() - seg + 1, (s.batch_size,),
                                   generator=generator)
            x = torch.stack([audio[a:a + seg] for a in starts.tolist()])[:, None]
            res = mimi(x)
            loss = (multi_resolution_mel_l1(x, res.x, int(mimi.sample_rate))
                    + s.waveform_weight * (x - res.x).abs().mean())
            if not decoder_only:
                loss = loss + s.commitment_weight * res.penalty
            if not torch.isfinite(loss):
                raise RuntimeError(f"codec calibration ({name}) diverged: loss {float(loss)} "
                                   f"at step {len(losses) + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        mimi.eval()
        for p in params:
            p.requires_grad_(False)
    tail = max(1, len(losses) // 10)
    res = StageResult(steps, time.perf_counter() - t0, losses[0], float(np.mean(losses[-tail:])))
    logger.info("codec calibration, %s: %d steps, loss %.3f -> %.3f (%.0f s)", name, steps,
                res.loss_first, res.loss_last, res.seconds)
    return res


def calibrate_mimi(mimi: nn.Module, audio: CalibrationAudio,
                   s: CalibrationSettings | None = None) -> CalibrationReport:
    """Calibrate `mimi` in place on `audio` (see the module docstring); returns what was done."""
    s = s or CalibrationSettings()
    t_start = time.perf_counter()
    torch.manual_seed(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    report = CalibrationReport(s.model_dump(), audio.index, audio.files, audio.seconds, 0)
    logger.info("calibrating the codec on %.0f s of speech from %d training files (%s)",
                audio.seconds, len(audio.files), audio.index)
    mimi.eval()

    # A fixed slice of speech for the data-dependent init: whole frames from the longest signals.
    fs = int(mimi.frame_size)
    init_frames = max(1, int(s.init_seconds * mimi.frame_rate))
    pool = sorted(audio.signals, key=lambda t: -t.numel())
    probe = torch.cat(pool)[: init_frames * fs]
    probe = probe[: probe.numel() // fs * fs][None, None]

    t0 = time.perf_counter()
    enc_run = lambda: mimi.encode_to_latent(probe, quantize=False)  # noqa: E731
    unit_variance_init(enc_run, convs_in_call_order(enc_run, [mimi.encoder, mimi.downsample]))
    lat = encoder_latents(mimi, audio.signals, s.init_kmeans_frames, gen)
    kmeans_codebooks(mimi, lat)
    report.kmeans_frames = int(lat.shape[-1])
    with torch.no_grad():
        codes = mimi.encode(probe)
    dec_run = lambda: mimi.decode(codes)  # noqa: E731
    unit_variance_init(dec_run, convs_in_call_order(
        dec_run, [mimi.quantizer, mimi.upsample, mimi.decoder]), last_std=float(probe.std()))
    report.stages["init"] = StageResult(0, time.perf_counter() - t0)
    logger.info("codec calibration, init: unit-variance convs and k-means on %d latent frames "
                "(%.0f s)", report.kmeans_frames, report.stages["init"].seconds)

    speech = torch.cat(audio.signals)
    report.stages["joint"] = _train(mimi, speech, s, s.joint_steps, gen, False,
                                    "encoder + quantizer + decoder")
    t0 = time.perf_counter()
    kmeans_codebooks(mimi, encoder_latents(mimi, audio.signals, s.kmeans_frames, gen))
    report.stages["refresh"] = StageResult(0, time.perf_counter() - t0)
    report.stages["decoder"] = _train(mimi, speech, s, s.decoder_steps, gen, True,
                                      "decoder on the refreshed codes")
    mimi.eval()
    report.wall_seconds = time.perf_counter() - t_start
    logger.info("codec calibrated in %.0f s", report.wall_seconds)
    return report

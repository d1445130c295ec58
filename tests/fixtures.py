"""Small on-disk fixtures: a random two-speaker dataset in moshi-finetune's format, a text
tokenizer for it, make-data's synthesised speech, and tiny random bases whose codec is calibrated
on that speech. Plain functions so any test module can build them."""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import tempfile
import wave
from pathlib import Path

import numpy as np

WORDS = ("hello there moshi how are you today fine thanks what is the weather like sunny and "
         "warm tell me about red green blue seven nine river mountain city paris london").split()


def write_wav(path: Path, pcm: np.ndarray, sr: int) -> None:
    """pcm [C, S] float in [-1, 1] -> int16 wav."""
    pcm16 = (np.clip(pcm, -1, 1) * 32000).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(pcm.shape[0])
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm16.T.tobytes())


def write_random_dataset(root: Path, n_files: int = 4, seconds: float = 6.0, sr: int = 22050,
                         seed: int = 0, name: str = "train") -> Path:
    """Noise bursts standing in for words, left channel for SPEAKER_MAIN, right for the user."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(exist_ok=True)
    lines = []
    for i in range(n_files):
        n = int(seconds * sr)
        pcm = np.zeros((2, n), np.float32)
        t, speaker, aligns = 0.2, 0, []
        while t < seconds - 0.6:
            for _ in range(rng.randint(2, 5)):
                dur = rng.uniform(0.2, 0.45)
                if t + dur > seconds - 0.1:
                    break
                a, b = int(t * sr), int((t + dur) * sr)
                pcm[speaker, a:b] = nrng.normal(0, 0.2, b - a) * np.hanning(b - a)
                aligns.append([rng.choice(WORDS), [round(t, 3), round(t + dur, 3)],
                               "SPEAKER_MAIN" if speaker == 0 else "SPEAKER_USER"])
                t += dur + rng.uniform(0.05, 0.2)
            speaker = 1 - speaker
            t += 0.3
        wav = root / "audio" / f"{name}_{i:03d}.wav"
        write_wav(wav, pcm, sr)
        wav.with_suffix(".json").write_text(json.dumps({"alignments": aligns}))
        lines.append(json.dumps({"path": f"audio/{wav.name}", "duration": n / sr}))
    index = root / f"{name}.jsonl"
    index.write_text("\n".join(lines) + "\n")
    return index


def make_tokenizer(path: Path, vocab_size: int = 120) -> Path:
    from moshi_ttt.data.text_tokenizer import train_sentencepiece

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(400)]
    return train_sentencepiece(texts, path, vocab_size)


_SESSION: dict[str, Path] = {}


def _session_dir() -> Path:
    if "root" not in _SESSION:
        root = Path(tempfile.mkdtemp(prefix="moshi-ttt-tests-"))
        atexit.register(shutil.rmtree, root, True)
        _SESSION["root"] = root
    return _SESSION["root"]


def speech_dataset() -> Path:
    """make-data's dataset as `make demo` makes it (16 dialogues, seed 0), once per process."""
    if "speech" not in _SESSION:
        from moshi_ttt.data.synth import synthesize_dataset

        synthesize_dataset(_session_dir() / "speech", n_dialogues=16, seed=0)
        _SESSION["speech"] = _session_dir() / "speech"
    return _SESSION["speech"]


def calibrated_base() -> Path:
    """The tiny base `init-base --calibrate-on` makes from `speech_dataset()`, with the shipped
    calibration defaults, once per process; other bases copy its codec."""
    if "codec" not in _SESSION:
        from moshi_ttt.base import init_random_base
        from moshi_ttt.config import load_config

        from conftest import CONFIGS

        data = speech_dataset()
        _SESSION["codec"] = init_random_base(load_config(CONFIGS / "tiny.yaml"),
                                             _session_dir() / "calibrated-base",
                                             data / "tokenizer.model", seed=0, calibrate_on=data)
    return _SESSION["codec"]


def codec_made_in_worker(codec: Path, marker: Path) -> Path:
    """A `make_codec` for `run_memory_eval` that makes nothing: it writes the pid of the process
    that ran it to `marker` and returns `codec`."""
    marker.write_text(str(os.getpid()))
    return codec


def demo_run() -> Path:
    """The run `make demo` trains (its TTT layers, the config's steps, on `speech_dataset()`,
    from `calibrated_base()`), once per process; returns its latest checkpoint."""
    if "demo_run" not in _SESSION:
        from moshi_ttt.checkpoint import latest_checkpoint
        from moshi_ttt.config import BaseModelRef, load_config
        from moshi_ttt.train.settings import TrainSettings
        from moshi_ttt.train.trainer import train

        from conftest import CONFIGS

        cfg = load_config(CONFIGS / "tiny.yaml")
        data, run = speech_dataset(), _session_dir() / "demo-run"
        settings = TrainSettings.from_config(cfg.train, {
            "data": str(data / "train.jsonl"), "eval_data": str(data / "eval.jsonl")})
        train(cfg, settings, run, base_override=BaseModelRef(local_dir=str(calibrated_base())))
        _SESSION["demo_run"] = latest_checkpoint(run)
    return _SESSION["demo_run"]


def make_tiny_base(root: Path, cfg=None, seed: int = 0) -> Path:
    """A tiny random base (LM seeded by `seed`) with the calibrated codec of `calibrated_base`."""
    from moshi_ttt.base import init_random_base
    from moshi_ttt.config import load_config

    from conftest import CONFIGS

    cfg = cfg or load_config(CONFIGS / "tiny.yaml")
    tok = make_tokenizer(root / "tok" / "tokenizer.model")
    return init_random_base(cfg, root / "base", tok, seed=seed, codec_from=calibrated_base())

"""The embedded codec: a random base's Mimi calibrated on make-data's speech carries the speech in
its codes (every level used, words told apart, decode(encode(x)) closer to x than silence), and
`moshi-ttt codec-report` measures it. All at the shipped calibration defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moshi_ttt.base import CODEC_CALIBRATION_NAME, init_random_base, load_codec, resolve_base
from moshi_ttt.cli import app
from moshi_ttt.codec.calibrate import (
    CalibrationSettings, calibrate_mimi, load_calibration_audio,
)
from moshi_ttt.codec.mel import log_mel, mel_filterbank
from moshi_ttt.codec.report import codec_report, roundtrip
from moshi_ttt.config import BaseModelRef, load_config
from moshi_ttt.data.encode import StreamEncoder
from moshi_ttt.data.index import read_index

from conftest import CONFIGS
from fixtures import calibrated_base, make_tokenizer, speech_dataset


def _mimi(base: Path):
    return load_codec(resolve_base(BaseModelRef(local_dir=str(base))))


def _held_out(data: Path) -> list[Path]:
    return [f.path for f in read_index(data / "eval.jsonl")]


@pytest.fixture(scope="module")
def uncalibrated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uncalibrated")
    res = CliRunner().invoke(app, [
        "init-base", str(root / "base"), "-c", str(CONFIGS / "tiny.yaml"), "--no-calibrate",
        "--tokenizer", str(speech_dataset() / "tokenizer.model")])
    assert res.exit_code == 0, res.output
    return root / "base"


def _report(base: Path, wavs: list[Path]) -> dict:
    res = CliRunner().invoke(app, ["codec-report", str(base), *map(str, wavs), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_calibrated_codec_uses_every_level_and_tells_words_apart():
    base, data = calibrated_base(), speech_dataset()
    mimi = _mimi(base)
    pcm = torch.from_numpy(np.asarray(__import__("sphn").read(str(data / "sample_user.wav"))[0][0]))
    codes, _ = roundtrip(mimi, pcm)
    assert all(len(set(row.tolist())) > 1 for row in codes), [len(set(r.tolist())) for r in codes]

    # Two different words of a held-out dialogue: their frames get different level-0 codes.
    f = read_index(data / "eval.jsonl")[0]
    aligns = json.loads(f.alignments_path.read_text())["alignments"]
    words = {}
    for word, (start, end), speaker in aligns:
        if end - start >= 0.3 and word not in words and speaker == "SPEAKER_USER":
            words[word] = (start, end)
    (w1, (a1, b1)), (w2, (a2, b2)) = list(words.items())[:2]
    stereo = __import__("sphn").read(str(f.path))[0]
    user = torch.from_numpy(np.ascontiguousarray(stereo[1]))
    codes, _ = roundtrip(mimi, user)
    fr = lambda a, b: codes[0, int(a * 12.5) + 1:int(b * 12.5)].tolist()  # noqa: E731
    c1, c2 = fr(a1, b1), fr(a2, b2)
    assert c1 and c2 and c1 != c2, (w1, c1, w2, c2)
    assert len(set(c1) | set(c2)) > 2


def test_codec_report_meets_the_figures_and_shows_the_uncalibrated_collapse(uncalibrated):
    data = speech_dataset()
    held_out = _held_out(data)
    good = _report(calibrated_base(), held_out)
    bad = _report(uncalibrated, held_out)
    assert good["frames"] == bad["frames"] > 1000
    assert [lv["level"] for lv in good["levels"]] == list(range(8))
    for lv in good["levels"]:
        assert lv["codes_used"] >= 64 and lv["perplexity"] >= 32, good["levels"]
    for lv in bad["levels"]:
        assert lv["codes_used"] == 1 and lv["perplexity"] == 1.0, bad["levels"]
    # reconstruction: clearly below the silence baseline and the uncalibrated codec
    assert good["mel_l1"] < 0.6 * good["silence_mel_l1"], good
    assert good["mel_l1"] < 0.4 * bad["mel_l1"], (good, bad)
    assert good["silence_mel_l1"] == bad["silence_mel_l1"]
    # the figures init-base recorded are those codec-report computes now
    record = json.loads((calibrated_base() / CODEC_CALIBRATION_NAME).read_text())
    assert record["held_out"]["levels"] == good["levels"]
    assert record["held_out"]["mel_l1"] == pytest.approx(good["mel_l1"], abs=1e-3)


def test_calibration_reads_the_training_split_only():
    data = speech_dataset()
    record = json.loads((calibrated_base() / CODEC_CALIBRATION_NAME).read_text())
    used = set(record["calibration"]["files"])
    train = {str(f.path) for f in read_index(data / "train.jsonl")}
    held_out = {str(p) for p in _held_out(data)}
    assert used and used <= train and not used & held_out
    assert record["calibration"]["settings"] == CalibrationSettings().model_dump()
    stages = record["calibration"]["stages"]
    assert stages["joint"]["loss_last"] < 0.5 * stages["joint"]["loss_first"]


def test_calibration_is_seeded():
    """The same Mimi, data and settings give the same codec bit for bit, whatever the global RNG
    state (a small budget: this checks the seeding, not the codec's quality)."""
    import copy

    from moshi.models import loaders

    from moshi_ttt.base import mimi_config

    cfg = load_config(CONFIGS / "tiny.yaml")
    s = CalibrationSettings(joint_steps=2, decoder_steps=2, kmeans_frames=2048, max_seconds=30)
    audio = load_calibration_audio(speech_dataset(), 1920, s.max_seconds)
    torch.manual_seed(0)
    first = loaders.get_mimi(None, mimi_config(cfg.mimi), num_codebooks=8)
    second = copy.deepcopy(first)
    torch.manual_seed(1)
    calibrate_mimi(first, audio, s)
    torch.manual_seed(2)
    calibrate_mimi(second, audio, s)
    a, b = first.state_dict(), second.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_token_cache_is_keyed_by_the_codec(tmp_path, uncalibrated):
    data = speech_dataset()
    f = read_index(data / "eval.jsonl")[0]
    tok_path = data / "tokenizer.model"
    import sentencepiece

    tok = sentencepiece.SentencePieceProcessor(model_file=str(tok_path))
    cache = tmp_path / "cache"
    enc_bad = StreamEncoder(_mimi(uncalibrated), tok, tok_path, cache)
    old = enc_bad.encode(f)
    assert enc_bad.misses == 1 and StreamEncoder(_mimi(uncalibrated), tok, tok_path,
                                                 cache).encode(f).equal(old)
    enc_good = StreamEncoder(_mimi(calibrated_base()), tok, tok_path, cache)
    assert enc_good.codec_id != enc_bad.codec_id
    new = enc_good.encode(f)
    assert enc_good.misses == 1 and enc_good.hits == 0  # re-encoded, not read from the cache
    assert (old[1:] == 0).all() and len(torch.unique(new[1:9])) > 64


def test_mel_filterbank_is_a_partition_of_the_band():
    fb = mel_filterbank(1024, 64, 24000)
    assert fb.shape == (64, 513) and (fb >= 0).all()
    centre = torch.argmax(fb, dim=1)
    inner = fb.sum(0)[centre[1]:centre[-2] + 1]  # between the first and last filters
    assert torch.allclose(inner, torch.ones_like(inner), atol=1e-4)  # triangles overlap to 1
    tone = torch.sin(2 * torch.pi * 1000 * torch.arange(24000) / 24000)
    peak = log_mel(tone).mean(-1).argmax()
    assert abs(float(centre[peak]) * 24000 / 1024 - 1000) < 150


# -- bad input -----------------------------------------------------------------------------------

def _fails(args: list[str], *needles: str) -> str:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    for n in needles:
        assert n in res.output, res.output
    return res.output


def test_codec_report_bad_input(tmp_path, uncalibrated):
    wav = _held_out(speech_dataset())[0]
    _fails(["codec-report", str(tmp_path / "nope"), str(wav)], "base directory not found")
    nocodec = tmp_path / "nocodec"
    import shutil

    shutil.copytree(uncalibrated, nocodec)
    (nocodec / "mimi.safetensors").unlink()
    _fails(["codec-report", str(nocodec), str(wav)], "mimi.safetensors")
    broken = tmp_path / "broken"
    shutil.copytree(uncalibrated, broken)
    (broken / "mimi.safetensors").write_bytes(b"not safetensors")
    _fails(["codec-report", str(broken), str(wav)], "cannot load the codec")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF....garbage")
    _fails(["codec-report", str(uncalibrated), str(garbage)], "cannot read audio", "garbage.wav")
    _fails(["codec-report", str(uncalibrated), str(tmp_path / "missing.wav")],
           "audio file not found")


def test_init_base_calibration_bad_input(tmp_path):
    cfg = str(CONFIGS / "tiny.yaml")
    tok = str(make_tokenizer(tmp_path / "tok" / "tokenizer.model"))
    _fails(["init-base", str(tmp_path / "b1"), "-c", cfg, "--calibrate-on",
            str(tmp_path / "missing"), "--tokenizer", tok], "calibration data not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("\n")
    _fails(["init-base", str(tmp_path / "b2"), "-c", cfg, "--calibrate-on", str(empty),
            "--tokenizer", tok], "lists no files")
    nodir = tmp_path / "nodir"
    nodir.mkdir()
    _fails(["init-base", str(tmp_path / "b3"), "-c", cfg, "--calibrate-on", str(nodir),
            "--tokenizer", tok], "no train.jsonl")
    out = _fails(["init-base", str(tmp_path / "b4"), "-c", cfg, "--tokenizer", tok],
                 "--calibrate-on")
    assert "--no-calibrate" in out
    _fails(["init-base", str(tmp_path / "b5"), "-c", cfg, "--local", str(tmp_path),
            "--calibrate-on", str(empty)], "keeps its own Mimi")
    assert not (tmp_path / "b2" / "moshi_ttt.yaml").exists()

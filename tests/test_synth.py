"""`moshi-ttt make-data`: the espeak-ng dataset is in moshi-finetune's format, its alignments are
exact, it is reproducible and idempotent, and it goes through the real encoder."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from moshi_ttt.data import synth
from moshi_ttt.data.index import read_index
from moshi_ttt.data.synth import SynthesisError, synthesize_dataset

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="espeak-ng not installed (`make install` installs it)")

SR = 24000
N_DIALOGUES = 4  # 2 train + 2 eval
MAIN, USER = "SPEAKER_MAIN", "SPEAKER_USER"


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """[C, S] float32 in [-1, 1] and the rate, read with the stdlib (independent of sphn)."""
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2, f"{path}: expected int16"
        ch, sr, n = w.getnchannels(), w.getframerate(), w.getnframes()
        pcm = np.frombuffer(w.readframes(n), dtype="<i2").reshape(n, ch).T
    return pcm.astype(np.float32) / 32768.0, sr


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def dialogues(root: Path):
    """(wav path, alignments, pcm, index duration) for every file of both splits."""
    for split in ("train", "eval"):
        for f in read_index(root / f"{split}.jsonl"):
            pcm, sr = read_wav(f.path)
            assert sr == SR
            aligns = json.loads(f.alignments_path.read_text())["alignments"]
            yield f.path, aligns, pcm, f.duration


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    res = synthesize_dataset(out, n_dialogues=N_DIALOGUES, seed=0)
    assert not res.reused
    return out


def test_index_and_audio_format(dataset):
    train, evals = read_index(dataset / "train.jsonl"), read_index(dataset / "eval.jsonl")
    assert len(train) == 2 and len(evals) == 2
    assert not {f.path for f in train} & {f.path for f in evals}
    for line in (dataset / "train.jsonl").read_text().splitlines():
        assert not Path(json.loads(line)["path"]).is_absolute()  # relative to the index
    for f in train + evals:
        with wave.open(str(f.path), "rb") as w:
            assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (2, SR, 2)
            assert f.duration == pytest.approx(w.getnframes() / SR, abs=1e-6)
        assert 8.0 <= f.duration <= synth.MAX_DIALOGUE_S + 1.0


def test_alignments_match_the_audio(dataset):
    n_overlaps = n_changes = 0
    for path, aligns, pcm, duration in dialogues(dataset):
        starts = [a[1][0] for a in aligns]
        assert starts == sorted(starts), f"{path}: alignments not in time order"
        assert {a[2] for a in aligns} == {MAIN, USER}
        spans = {MAIN: [], USER: []}
        for word, (s, e), spk in aligns:
            assert word and word == word.strip()
            assert 0 <= s < e <= duration, f"{path}: {word!r} {s}..{e} outside 0..{duration}"
            spans[spk].append((round(s * SR), round(e * SR)))
        for spk, ch in ((MAIN, 0), (USER, 1)):
            other = 1 - ch
            covered = np.zeros(pcm.shape[1], bool)
            for a, b in spans[spk]:
                covered[a:b] = True
            # The speaker's channel holds speech inside every one of its words...
            for a, b in spans[spk]:
                rms = float(np.sqrt(np.mean(pcm[ch, a:b] ** 2)))
                assert rms > 0.02, f"{path}: a {spk} word at {a / SR:.2f} s is silent"
            # ...and nothing outside them: the alignments account for all of its audio.
            assert np.abs(pcm[ch, ~covered]).max() < 1e-3
            # The other channel is silent there, except where the other speaker overlaps.
            other_covered = np.zeros(pcm.shape[1], bool)
            for a, b in spans[USER if spk == MAIN else MAIN]:
                other_covered[a:b] = True
            assert np.abs(pcm[other, covered & ~other_covered]).max() < 1e-3
        for prev, nxt in zip(aligns, aligns[1:]):
            if prev[2] != nxt[2]:
                n_changes += 1
                n_overlaps += nxt[1][0] < prev[1][1]
    # the next speaker starts before the other has finished now and then, not as a rule
    assert n_overlaps < 0.5 * n_changes


def test_speakers_alternate_and_voices_differ(dataset):
    def f0(x: np.ndarray) -> float:
        x = x - x.mean()
        c = np.correlate(x, x, "full")[len(x) - 1:]
        lo, hi = SR // 400, SR // 60
        return SR / (lo + int(np.argmax(c[lo:hi])))

    pitch = {MAIN: [], USER: []}
    for path, aligns, pcm, _ in dialogues(dataset):
        turns = [a[2] for i, a in enumerate(aligns) if i == 0 or aligns[i - 1][2] != a[2]]
        assert turns[0] == USER and turns[-1] == MAIN, f"{path}: the user opens, Moshi closes"
        assert all(x != y for x, y in zip(turns, turns[1:]))
        for _, (s, e), spk in aligns:
            a = round(s * SR) + int(0.05 * SR)
            pitch[spk].append(f0(pcm[0 if spk == MAIN else 1, a:a + 1200]))
    assert np.median(pitch[MAIN]) > 1.5 * np.median(pitch[USER])


def test_answers_refer_back_to_the_user():
    """The grammar's answers repeat or recall what the user said, for any seed."""
    n_recalls = 0
    for seed in range(40):
        facts: dict[str, str] = {}
        turns = [t for ex in synth.write_script(seed, 0) for t in ex]
        for (u_spk, user), (m_spk, moshi) in zip(turns[::2], turns[1::2]):
            assert (u_spk, m_spk) == (USER, MAIN)
            u, m = " ".join(user), " ".join(moshi)
            if "my name is" in u:
                facts["name"] = user[-1]
            if u.startswith("my favourite colour is"):
                facts["colour"] = user[-1]
                assert facts["colour"] in moshi
            if " plus " in u:
                a, b = (synth.NUMBERS.index(w) for w in user[2::2])
                assert moshi[-1] == synth.NUMBERS[a + b]
            if u.startswith("what is the weather") or u.startswith("how is the weather"):
                facts["city"] = next(w for w in user if w in synth.CITIES)
                assert facts["city"] in moshi
            if u == "what is my name":
                assert m == f"your name is {facts['name']}"
                n_recalls += 1
            if u == "do you remember my favourite colour":
                assert moshi[-1] == facts["colour"]
                n_recalls += 1
    assert n_recalls >= 5


def test_tokenizer_keeps_moshi_special_ids(dataset):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(dataset / "tokenizer.model"))
    assert sp.vocab_size() <= 1000
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    words = {a[0] for _, aligns, _, _ in dialogues(dataset) for a in aligns}
    for w in words:
        ids = sp.encode(w)
        assert ids and 0 not in ids and 3 not in ids, f"{w!r} -> {ids}"


def test_sample_user_is_mono_speech(dataset):
    pcm, sr = read_wav(dataset / "sample_user.wav")
    assert pcm.shape[0] == 1 and sr == SR
    assert 6.0 <= pcm.shape[1] / SR <= 10.0
    frames = pcm[0, : pcm.shape[1] // 2400 * 2400].reshape(-1, 2400)  # 100 ms frames
    voiced = np.sqrt((frames ** 2).mean(1)) > 0.02
    assert voiced.mean() > 0.4
    manifest = json.loads((dataset / "manifest.json").read_text())
    text = manifest["sample_user"]["text"]
    assert len(text.split()) >= 6


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    again = tmp_path / "again"
    synthesize_dataset(again, n_dialogues=N_DIALOGUES, seed=0)
    mine = [p.relative_to(dataset) for p in all_files(dataset)]
    assert mine == [p.relative_to(again) for p in all_files(again)]
    for rel in mine:
        if rel.suffix in (".wav", ".json", ".jsonl"):
            assert (dataset / rel).read_bytes() == (again / rel).read_bytes(), rel

    other = tmp_path / "other"
    synthesize_dataset(other, n_dialogues=N_DIALOGUES, seed=1)
    for name in ("dialogue_0000.wav", "dialogue_0000.json"):
        assert (other / "audio" / name).read_bytes() != (dataset / "audio" / name).read_bytes()


def test_second_call_reuses_without_writing(dataset):
    before = {p: p.stat().st_mtime_ns for p in all_files(dataset)}
    t0 = time.perf_counter()
    res = synthesize_dataset(dataset, n_dialogues=N_DIALOGUES, seed=0)
    assert res.reused and time.perf_counter() - t0 < 1.0
    assert {p: p.stat().st_mtime_ns for p in all_files(dataset)} == before
    assert (res.train_files, res.eval_files) == (2, 2)
    assert "reused" in str(res)


def _copy(dataset: Path, dst: Path) -> Path:
    shutil.copytree(dataset, dst)
    return dst


@pytest.mark.parametrize("damage", ["no manifest", "truncated wav", "other args"])
def test_incomplete_or_different_dataset_is_rebuilt(dataset, tmp_path, damage):
    out = _copy(dataset, tmp_path / "d")
    wav = out / "audio" / "dialogue_0001.wav"
    if damage == "no manifest":  # as if interrupted before the manifest was written
        (out / "manifest.json").unlink()
    elif damage == "truncated wav":
        wav.write_bytes(wav.read_bytes()[:1000])
    old = wav.stat().st_mtime_ns
    time.sleep(0.01)
    seed = 5 if damage == "other args" else 0
    res = synthesize_dataset(out, n_dialogues=N_DIALOGUES, seed=seed)
    assert not res.reused
    assert wav.stat().st_mtime_ns != old
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["args"]["seed"] == seed
    if seed == 0:
        assert wav.read_bytes() == (dataset / "audio" / wav.name).read_bytes()
    assert synthesize_dataset(out, n_dialogues=N_DIALOGUES, seed=seed).reused


def test_fewer_dialogues_removes_stale_files(dataset, tmp_path):
    out = _copy(dataset, tmp_path / "d")
    (out / "audio" / "notes.txt").write_text("not ours")
    synthesize_dataset(out, n_dialogues=3, seed=0)
    names = sorted(p.name for p in (out / "audio").iterdir())
    assert names == ["dialogue_0000.json", "dialogue_0000.wav", "dialogue_0001.json",
                     "dialogue_0001.wav", "dialogue_0002.json", "dialogue_0002.wav", "notes.txt"]
    assert len(read_index(out / "train.jsonl")) == 1 and len(read_index(out / "eval.jsonl")) == 2


def test_encodes_with_the_real_encoder(dataset, tmp_path, tiny_cfg):
    import sentencepiece
    from moshi.models import loaders

    from moshi_ttt.base import mimi_config
    from moshi_ttt.data.encode import StreamEncoder

    mimi = loaders.get_mimi(None, mimi_config(tiny_cfg.mimi), num_codebooks=8)
    tok_path = dataset / "tokenizer.model"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok_path))
    enc = StreamEncoder(mimi, sp, tok_path, tmp_path / "cache")
    f = read_index(dataset / "eval.jsonl")[0]
    codes = enc.encode(f)
    T = math.ceil(f.duration * 12.5)
    assert tuple(codes.shape) == (17, T)
    assert ((codes[1:] >= 0) & (codes[1:] < 2048)).all()
    text = codes[0].tolist()
    aligns = json.loads(f.alignments_path.read_text())["alignments"]
    moshi_words = [(w, s) for w, (s, _), spk in aligns if spk == MAIN]
    # each of Moshi's words starts on the frame where it is spoken, and only Moshi's words are
    # in the text stream: the user's words never appear in it
    for word, start in moshi_words:
        assert text[math.floor(start * 12.5)] == sp.encode(word)[0], word
    n_tokens = sum(len(sp.encode(w)) for w, _ in moshi_words)
    assert sum(t not in (0, 3) for t in text) == n_tokens


def test_missing_espeak_says_how_to_install(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(SynthesisError, match=r"apt-get install espeak-ng.*make install"):
        synthesize_dataset(tmp_path / "d", n_dialogues=3)
    assert not (tmp_path / "d" / "manifest.json").exists()


@pytest.mark.parametrize("script, expected", [
    ('echo "voice not found" >&2; exit 3', r"exit status 3: voice not found"),
    ("exit 0", r"did not write a wav"),
])
def test_espeak_failure_names_word_and_voice(tmp_path, monkeypatch, script, expected):
    fake = tmp_path / "bin" / "espeak-ng"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nif [ "$1" = --version ]; then '
                    'echo "eSpeak NG text-to-speech: 0.0"; exit 0; fi\n' + script + "\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SynthesisError, match=r"word '\w+' with voice en-") as e:
        synthesize_dataset(tmp_path / "d", n_dialogues=3)
    assert e.match(expected)
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_dialogues must be at least 3"):
        synthesize_dataset(tmp_path / "d", n_dialogues=2)


def test_cli_make_data(tmp_path):
    from typer.testing import CliRunner

    from moshi_ttt.cli import app

    res = CliRunner().invoke(app, ["make-data", str(tmp_path / "d"), "--dialogues", "3",
                                   "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "d" / "manifest.json").is_file()
    res = CliRunner().invoke(app, ["make-data", str(tmp_path / "e"), "--dialogues", "1"])
    assert res.exit_code == 2

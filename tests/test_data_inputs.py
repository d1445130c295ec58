"""Bad input from a user's own dataset or base directory: each is refused with one error naming
the file and what was expected (never a bare traceback), and nothing is silently dropped,
shifted or destroyed."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moshi_ttt.base import BaseModelError, init_random_base, materialize_base, resolve_base
from moshi_ttt.cli import app
from moshi_ttt.config import BaseModelRef, load_config
from moshi_ttt.data.index import AudioFile, DataError, read_alignments, read_index
from moshi_ttt.data.interleave import TextStreamSpec

from conftest import CONFIGS
from fixtures import make_tokenizer, write_random_dataset, write_wav


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_random_dataset(tmp_path / "data", n_files=1, seconds=3.0, sr=24000)


# -- index and alignments ------------------------------------------------------------------------

@pytest.mark.parametrize("line,match", [
    (b'{"path": "audio/train_000.wav", "duration": 3.0}\n\xff\xfe{}\n',
     r"train\.jsonl:2: not UTF-8 text \(byte b'\\xff' at offset 0\)"),
    (b'{"path": 5, "duration": 3.0}\n',
     r"train\.jsonl:1: path 5 is not a file name; expected a string"),
    (b'{"path": null, "duration": 3.0}\n', r"train\.jsonl:1: path None is not a file name"),
    (b'{"path": "", "duration": 3.0}\n', r"train\.jsonl:1: path '' is not a file name"),
])
def test_index_lines_are_named_when_wrong(dataset, line, match):
    dataset.write_bytes(line)
    with pytest.raises(DataError, match=match):
        read_index(dataset)


def test_index_and_alignments_written_with_a_bom_are_read(dataset):
    """Windows editors start UTF-8 files with a byte-order mark; json refuses it."""
    dataset.write_bytes(b"\xef\xbb\xbf" + dataset.read_bytes())
    f = read_index(dataset)[0]
    ali = f.alignments_path
    ali.write_bytes(b"\xef\xbb\xbf" + ali.read_bytes())
    assert read_alignments(f, 3.0)


@pytest.mark.parametrize("content,match", [
    (b'{"alignments": [["caf\xe9", [0.1, 0.2], "SPEAKER_MAIN"]]}',
     r"train_000\.json: not UTF-8 text \(byte b'\\xe9' at offset 21\)"),
    (b'{"alignments": [["late", [0.5, 0.2], "SPEAKER_MAIN"]]}',
     r"train_000\.json: alignment #0 \('late'\) ends at 0\.2 s, before it starts \(0\.5 s\)"),
    (b'{"alignments": [[null, [0.1, 0.2], "SPEAKER_MAIN"]]}',
     r"train_000\.json: alignment #0 .*the word is None; expected a string"),
])
def test_bad_alignments_are_named(dataset, content, match):
    """Before: a UnicodeDecodeError without the file, and words with end < start or no word
    silently dropped from (or read as "None" into) the text stream."""
    f = read_index(dataset)[0]
    f.alignments_path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_alignments(f, 3.0)


# -- segments ------------------------------------------------------------------------------------

class _FakeEncoder:
    """The StreamEncoder interface with codes of the index's durations (no codec needed)."""

    spec = TextStreamSpec()
    hits = misses = 0

    def encode(self, f: AudioFile) -> torch.Tensor:
        codes = torch.zeros(17, round(f.duration * 12.5), dtype=torch.int32)
        codes[0] = 7  # a word at every frame: the main speaker is there
        return codes

    def save_memo(self) -> None:
        pass


def _index(root: Path, seconds: list[float]) -> Path:
    lines = []
    for i, s in enumerate(seconds):
        wav = root / f"f{i}.wav"
        wav.write_bytes(b"")  # read_index checks presence only
        wav.with_suffix(".json").write_text('{"alignments": []}')
        lines.append(json.dumps({"path": wav.name, "duration": s}))
    (root / "i.jsonl").write_text("\n".join(lines) + "\n")
    return root / "i.jsonl"


def test_files_too_short_for_a_segment_are_said(tmp_path, caplog):
    from moshi_ttt.data.loader import SegmentLoader

    idx = _index(tmp_path, [4.0, 0.4])
    with caplog.at_level(logging.WARNING, logger="moshi_ttt.data.loader"):
        loader = SegmentLoader(idx, _FakeEncoder(), 2.0, show_progress=False)
    assert {s.file for s in loader.segments} == {0}
    assert "1 file(s) shorter than the minimum segment (1.0 s) are not trained on: " \
           "f1.wav (0.40 s)" in caplog.text
    idx = _index(tmp_path, [0.4, 0.5])
    with pytest.raises(DataError, match=r"no segment of at least 1\.0 s \(every file is shorter: "
                                        r"f0\.wav \(0\.40 s\), f1\.wav \(0\.48 s\)\)"):
        SegmentLoader(idx, _FakeEncoder(), 2.0, show_progress=False)


# -- encoding ------------------------------------------------------------------------------------

def test_a_whole_number_of_frames_encodes_to_that_many(tmp_path):
    """ceil(S / 24000 * 12.5) in floats made a 7-frame file 8 frames, the last one all -1."""
    import sentencepiece
    from moshi.models import loaders

    from moshi_ttt.base import mimi_config
    from moshi_ttt.data.encode import StreamEncoder

    cfg = load_config(CONFIGS / "tiny.yaml")
    mimi = loaders.get_mimi(None, mimi_config(cfg.mimi), num_codebooks=8)
    tok = make_tokenizer(tmp_path / "tok.model")
    enc = StreamEncoder(mimi, sentencepiece.SentencePieceProcessor(model_file=str(tok)), tok,
                        tmp_path / "cache")
    for k in (7, 14):
        wav = tmp_path / f"a{k}.wav"
        pcm = np.random.default_rng(k).normal(0, 0.1, (2, 1920 * k)).astype(np.float32)
        write_wav(wav, pcm, 24000)
        wav.with_suffix(".json").write_text(json.dumps(
            {"alignments": [["hello", [0.1, 0.3], "SPEAKER_MAIN"]]}))
        codes = enc.encode(AudioFile(wav, k * 0.08))
        assert codes.shape == (17, k)
        assert bool((codes[1:] >= 0).all())  # no frame of "no input" appended


# -- codec calibration ---------------------------------------------------------------------------

def test_calibration_refuses_silent_data(tmp_path):
    """Before: calibrating on silence "succeeded", the joint loss at 4.6e8, a useless codec."""
    from moshi_ttt.codec.calibrate import load_calibration_audio

    root = tmp_path / "silent"
    write_random_dataset(root, n_files=2, seconds=3.0, sr=24000)
    assert load_calibration_audio(root, 1920, 900).seconds > 11
    for wav in (root / "audio").glob("*.wav"):
        write_wav(wav, np.zeros((2, 72000), np.float32), 24000)
    with pytest.raises(DataError, match=r"train\.jsonl: the 2 file\(s\) read are silent \(no 80 "
                                        r"ms frame above -50 dBFS, all zero\); expected speech"):
        load_calibration_audio(root, 1920, 900)


# -- base directories ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base")
    tok = make_tokenizer(root / "tok" / "tokenizer.model")
    return init_random_base(load_config(CONFIGS / "tiny.yaml"), root / "base", tok)


def _damaged(base: Path, tmp_path: Path, damage: str) -> Path:
    d = tmp_path / damage
    shutil.copytree(base, d)
    cfg = json.loads((d / "config.json").read_text())
    if damage == "truncated_weights":
        w = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(w[:len(w) // 2])
    elif damage == "html_weights":
        (d / "model.safetensors").write_bytes(b"<html>502 Bad Gateway</html>" * 4)
    elif damage == "config_not_utf8":
        (d / "config.json").write_bytes(b"\xff\xfe{}")
    elif damage == "config_a_list":
        (d / "config.json").write_text("[]")
    elif damage == "name_null":
        cfg["moshi_name"] = None
        (d / "config.json").write_text(json.dumps(cfg))
    elif damage == "mimi_config_missing":
        (d / "mimi_config.json").unlink()
    elif damage == "mimi_config_bad":
        (d / "mimi_config.json").write_text("{bad")
    elif damage == "tokenizer_garbage":
        (d / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    elif damage == "dim_a_string":
        cfg["dim"] = str(cfg["dim"])
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("damage,match", [
    ("truncated_weights", r"the LM weights of .*truncated_weights are not a readable safetensors "
                          r"file: .*incomplete metadata.*\(an interrupted download or copy\?"),
    ("html_weights", r"the LM weights of .*html_weights are not a readable safetensors file"),
    ("config_not_utf8", r"config_not_utf8/config\.json \(the base's config\) is not valid UTF-8 "
                        r"JSON"),
    ("config_a_list", r"config_a_list/config\.json \(the base's config\) holds a JSON list; "
                      r"expected an object"),
    ("name_null", r"config\.json: moshi_name is None; expected the name of a file in"),
    ("mimi_config_missing", r"mimi_config_missing lacks mimi_config\.json \(mimi_config_name\)"),
    ("mimi_config_bad", r"mimi_config\.json \(the codec \(Mimi\) config\) is not valid UTF-8 "
                        r"JSON"),
    ("tokenizer_garbage", r"text tokenizer .*tokenizer\.model is not a sentencepiece model"),
])
def test_a_damaged_base_dir_is_named(base, tmp_path, damage, match):
    """Before: ValueError / TypeError / UnicodeDecodeError / FileNotFoundError / JSONDecodeError
    (a traceback from init-base and codec-report), or a sentencepiece RuntimeError at the start
    of training."""
    with pytest.raises(BaseModelError, match=match):
        resolve_base(BaseModelRef(local_dir=str(_damaged(base, tmp_path, damage))))


def test_a_config_dim_of_another_type_shows_the_type(base, tmp_path):
    from moshi_ttt.dims import DimensionMismatch

    d = _damaged(base, tmp_path, "dim_a_string")
    with pytest.raises(DimensionMismatch, match=r"expected value '64' \(.*config\.json\), found "
                                                r"64 in model\.safetensors"):
        resolve_base(BaseModelRef(local_dir=str(d)))


def test_init_base_on_a_truncated_local_base_is_one_line(base, tmp_path):
    d = _damaged(base, tmp_path, "truncated_weights")
    res = CliRunner().invoke(app, ["init-base", str(tmp_path / "out"), "-c",
                                   str(CONFIGS / "tiny.yaml"), "--local", str(d)])
    assert res.exit_code == 2, res.output
    assert "not a readable safetensors file" in res.output and "Traceback" not in res.output


def test_materializing_a_base_into_itself_keeps_its_files(base, tmp_path):
    """Before: each file was unlinked, then linked to itself: the weights were gone."""
    d = tmp_path / "own"
    shutil.copytree(base, d)
    sizes = {p.name: p.stat().st_size for p in d.iterdir()}
    resolved = resolve_base(BaseModelRef(local_dir=str(d)))
    materialize_base(resolved, load_config(CONFIGS / "tiny.yaml"), d)
    for name in ("model.safetensors", "mimi.safetensors", "tokenizer.model"):
        assert not (d / name).is_symlink() and (d / name).stat().st_size == sizes[name]
    resolve_base(BaseModelRef(local_dir=str(d)))


def test_init_random_base_names_a_foreign_tokenizer(tmp_path):
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(b"\x00garbage")
    with pytest.raises(BaseModelError, match=r"text tokenizer .*tokenizer\.model is not a "
                                             r"sentencepiece model"):
        init_random_base(load_config(CONFIGS / "tiny.yaml"), tmp_path / "b", tok)
    assert not (tmp_path / "b").exists()


# -- Hub push ------------------------------------------------------------------------------------

def test_push_card_skips_metrics_lines_that_are_not_records(tmp_path):
    """Before: a JSON value other than an object in metrics.jsonl crashed `push`."""
    from moshi_ttt.hub import _eval_records

    ckpt = tmp_path / "checkpoints" / "step_3"
    ckpt.mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 2, "eval/loss": 1.5}\n[1, 2]\n7\nnull\n{"step": 3, "eval/lo\n')
    assert _eval_records(ckpt, 3) == [{"step": 2, "eval/loss": 1.5}]

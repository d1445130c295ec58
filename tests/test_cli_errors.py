"""Every documented failure of every `moshi-ttt` command is one clear line on stderr and its
documented exit status (2: usage, input, config, checkpoint or base problem; chat's own 3 for a
connection), never a traceback nor pydantic's multi-line report. Run in process through typer's
CliRunner, with exceptions not caught: a crash fails the test with its traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moshi_ttt.cli import app

from conftest import CONFIGS
from fixtures import make_tokenizer, write_random_dataset

TINY = str(CONFIGS / "tiny.yaml")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, Path]:
    """The broken things the failures are about, next to working ones: a tiny base (random
    codec: only errors are exercised), a dataset, a trained run whose base was deleted, a run
    without a checkpoint, a base without its weights, one with a truncated weights file."""
    from moshi_ttt.base import init_random_base
    from moshi_ttt.config import load_config

    root = tmp_path_factory.mktemp("cli-errors")
    tok = make_tokenizer(root / "tok" / "tokenizer.model")
    base = init_random_base(load_config(TINY), root / "base", tok)
    write_random_dataset(root / "data", n_files=2, seconds=4.0)
    gone = shutil.copytree(base, root / "gone-base")
    r = invoke(["train", "-c", TINY, "--base", gone, "--data", root / "data" / "train.jsonl",
                "--steps", "1", "--out", root / "orphan"])
    assert r.exit_code == 0, r.output
    shutil.rmtree(gone)
    (root / "empty" / "checkpoints").mkdir(parents=True)
    no_model = shutil.copytree(base, root / "no-model")
    (no_model / "model.safetensors").unlink()
    corrupt = shutil.copytree(base, root / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (root / "bad.yaml").write_text("lm: [\n")
    (root / "a-file").write_text("not a directory")
    return {"root": root, "base": base, "data": root / "data", "orphan": root / "orphan",
            "empty": root / "empty", "no_model": no_model, "corrupt": corrupt,
            "bad_yaml": root / "bad.yaml", "a_file": root / "a-file",
            "wav": root / "data" / "audio" / "train_000.wav", "nowhere": root / "nowhere"}


# (arguments, the phrase the one error line must hold); {name} is a path of the fixture `w`.
CASES_2 = {
    "inspect": [
        ([], "give exactly one of --config or --checkpoint"),
        (["--config", "{nowhere}.yaml"], "config file not found"),
        (["--config", "{bad_yaml}"], "is not valid YAML"),
        (["--checkpoint", "{nowhere}"], "checkpoint path not found"),
        (["--checkpoint", "{empty}"], "has no complete checkpoint yet"),
        (["--checkpoint", "{orphan}"], "which is gone"),
        (["--checkpoint", "{no_model}"], "lacks model.safetensors"),
        (["--checkpoint", "{corrupt}"], "cannot read safetensors header"),
        (["--checkpoint", "hf://owner"], "malformed Hub checkpoint 'hf://owner'"),
    ],
    "init-base": [
        (["{root}/b", "-c", TINY], "a random base needs a codec"),
        (["{root}/b", "-c", TINY, "--no-calibrate", "--tokenizer", "{nowhere}.model"],
         "tokenizer not found"),
        (["{root}/b", "-c", TINY, "--calibrate-on", "{nowhere}"], "calibration data not found"),
        (["{root}/b", "-c", TINY, "--local", "{nowhere}"], "base directory not found"),
        (["{root}/b", "-c", TINY, "--local", "{base}", "--no-calibrate"],
         "are for random bases"),
        (["{root}/b", "-c", "{nowhere}.yaml", "--no-calibrate"], "config file not found"),
        (["{root}/b", "-c", TINY, "--hf-repo", "a/b", "--local", "{base}"],
         "give one of --hf-repo REPO or --local DIR, not both"),
        (["{root}/b", "-c", TINY, "--local", "{base}", "--revision", "v1"],
         "--revision applies to --hf-repo"),
        (["{root}/b", "-c", TINY, "--local", "{base}", "--tokenizer", "{nowhere}.model"],
         "--tokenizer is for a random base"),
    ],
    "codec-report": [
        (["{nowhere}", "{wav}"], "base directory not found"),
        (["{no_model}", "{wav}"], "lacks model.safetensors"),
        (["{base}", "{nowhere}.wav"], "audio file not found"),
    ],
    "train": [
        (["-c", "{nowhere}.yaml", "--out", "{root}/r"], "config file not found"),
        (["-c", TINY, "--out", "{root}/r", "--base", "{nowhere}", "--data",
          "{data}/train.jsonl"], "base directory not found"),
        (["-c", TINY, "--out", "{root}/r", "--base", "{no_model}", "--data",
          "{data}/train.jsonl"], "lacks model.safetensors"),
        (["-c", TINY, "--out", "{root}/r", "--base", "{base}", "--data", "{nowhere}.jsonl"],
         "dataset index not found"),
        (["-c", TINY, "--out", "{root}/r", "--base", "{base}"], "no training data"),
        (["-c", TINY, "--out", "{root}/r", "--base", "{base}", "--data", "{data}/train.jsonl",
          "--steps", "0"], "max_steps: Input should be greater than or equal to 1 (got 0)"),
        (["-c", TINY, "--out", "{orphan}", "--data", "{data}/train.jsonl", "--steps", "2",
          "--resume"], "which is gone"),
        (["-c", TINY, "--out", "{root}/r", "--base", "{base}", "--hf-repo", "a/b", "--data",
          "{data}/train.jsonl"], "give one of --base DIR or --hf-repo REPO, not both"),
        (["-c", TINY, "--out", "{root}/r", "--base", "{base}", "--data", "{data}/train.jsonl",
          "--ckpt-every", "0"], "ckpt_every: Input should be greater than or equal to 1 (got 0)"),
        (["-c", TINY, "--out", "{root}/r", "--base", "{base}", "--data", "{data}/train.jsonl",
          "--eval-every", "0"], "eval_every: Input should be greater than or equal to 1 (got 0)"),
        (["-c", TINY, "--out", "{root}/r", "--base", "{base}", "--data", "{data}/train.jsonl",
          "--segment-seconds", "0"], "segment_seconds: Input should be greater than 0 (got 0.0)"),
    ],
    "demo": [
        (["--workdir", "{root}/d", "-c", "{nowhere}.yaml"], "config file not found"),
        (["--workdir", "{root}/d", "--mode", "tokens"], "--mode 'tokens': expected opus or pcm"),
        (["--workdir", "{root}/d", "--dialogues", "2"], "--dialogues must be at least 3"),
        (["--workdir", "{root}/d", "--steps", "0"], "--steps must be at least 1"),
    ],
    "make-data": [
        (["{a_file}"], "Not a directory"),
        (["{root}/m", "--dialogues", "2"], "n_dialogues must be at least 3"),
    ],
    "serve": [
        ([], "give exactly one of checkpoint"),
        (["--checkpoint", "{nowhere}"], "checkpoint path not found"),
        (["--checkpoint", "{empty}"], "has no complete checkpoint yet"),
        (["--checkpoint", "{orphan}"], "which is gone"),
        (["--checkpoint", "{no_model}"], "lacks model.safetensors"),
        (["--checkpoint", "{corrupt}"], "cannot read safetensors header"),
        (["--checkpoint", "hf://owner/repo@"], "malformed Hub checkpoint 'hf://owner/repo@'"),
        (["--random-config", "{nowhere}.yaml"], "config file not found"),
        (["--settings", "{nowhere}.yaml"], "settings file not found"),
        (["--checkpoint", "{base}", "--max-sessions", "0"],
         "max_sessions: Input should be greater than or equal to 1 (got 0)"),
        (["--checkpoint", "{base}", "--ssl-certfile", "{wav}"],
         "was given without --ssl-keyfile (ssl_keyfile)"),
        (["--checkpoint", "{base}", "--ssl-certfile", "{nowhere}.pem", "--ssl-keyfile",
          "{nowhere}.pem"], "no such file"),
        (["--checkpoint", "{base}", "--ssl-certfile", "{wav}", "--ssl-keyfile", "{wav}"],
         "holds no PEM certificate"),
        (["--checkpoint", "{base}", "--ray", "--ssl-certfile", "{wav}", "--ssl-keyfile",
          "{wav}"], "--ray serves plain http/ws through Ray's proxy"),
    ],
    "push": [
        (["{nowhere}", "owner/repo"], "checkpoint path not found"),
        (["{empty}", "owner/repo"], "has no complete checkpoint yet"),
        (["{orphan}", "owner/repo"], "which is gone"),
        (["{base}", "owner/repo"], "is a base directory, not a trained checkpoint"),
        (["{orphan}", "not-a-repo"], "malformed Hub repository 'not-a-repo'"),
    ],
    "tls-cert": [
        (["{root}/tls", "--host", "not a host"], "not a host name or an IP address"),
        (["{root}/tls", "--days", "1000"], "--days must be between 1 and 398"),
    ],
    "eval-memory": [
        (["-c", "{nowhere}.yaml"], "config file not found"),
        (["-c", TINY, "--quick", "--set", "lr"], "expected KEY=VALUE"),
        (["-c", TINY, "--quick", "--set", "nonsense=1"], "nonsense: Extra inputs are not permitted"),
    ],
    "diagnose-ttt": [
        ([], "give --config, --checkpoint or both"),
        (["-c", "{nowhere}.yaml"], "config file not found"),
        (["--checkpoint", "{nowhere}"], "checkpoint path not found"),
        (["--checkpoint", "{empty}"], "has no complete checkpoint yet"),
        (["--checkpoint", "{orphan}"], "which is gone"),
        (["--checkpoint", "{no_model}"], "lacks model.safetensors"),
        (["-c", TINY, "--checkpoint", "{orphan}"], "is a trained checkpoint: its config is fixed"),
        (["-c", "{bad_yaml}", "--checkpoint", "{base}"], "is not valid YAML"),
        (["-c", TINY, "--data", "{data}"], "--data needs --checkpoint"),
        (["-c", TINY, "--frames", "0"], "--frames must be at least 1"),
        (["-c", TINY, "--every", "0"], "--every must be at least 1"),
        (["-c", TINY, "--every", "-3"], "--every must be at least 1"),
        (["--checkpoint", "{base}", "--data", "{nowhere}", "--frames", "4"], "not found"),
    ],
    "eval-stability": [
        (["-c", "{nowhere}.yaml"], "config file not found"),
        (["-c", TINY, "--driver", "sampling"], "driver: Input should be 'lmgen' or 'tokens'"),
        (["-c", TINY, "--frames", "0"], "frames: Input should be greater than or equal to 1"),
    ],
    "chat": [
        ([], "give exactly one of --input FILE or --mic"),
        (["--input", "{nowhere}.wav"], "input file not found"),
        (["--input", "{wav}", "--mode", "tokens"], "this client speaks 'opus' or 'pcm'"),
        (["--input", "{wav}", "--url", "ftp://x"], "invalid server URL"),
        (["--input", "{wav}", "--ca-file", "{wav}"], "are for wss:// (or https://) URLs"),
        (["--input", "{wav}", "--url", "wss://127.0.0.1:1", "--ca-file", "{nowhere}.pem"],
         "--ca-file"),
        (["--input", "{wav}", "--url", "wss://127.0.0.1:1", "--ca-file", "{wav}"],
         "not a PEM certificate file"),
        (["--input", "{wav}", "--url", "wss://127.0.0.1:1", "--ca-file", "{wav}",
          "--insecure"], "not both"),
    ],
    "bench ttt": [
        (["--dims", "abc"], "expected comma-separated positive multiples of 128"),
        (["--dims", "64"], "expected comma-separated positive multiples of 128"),
        (["--dtype", "float16"], "--dtype 'float16'"),
        (["--frames", "0"], "--frames must be at least 1"),
        (["--device", "tpu:0"], "--device 'tpu:0': expected auto, cpu, cuda or cuda:N"),
        (["--json-out", "{root}"], "is a directory, expected a file path"),
    ],
    "bench serve": [
        ([], "give exactly one of --checkpoint or --random-config"),
        (["--random-config", TINY, "--mode", "opus"], "--mode must be pcm or tokens"),
        (["--checkpoint", "{nowhere}"], "checkpoint path not found"),
        (["--random-config", "{nowhere}.yaml"], "config file not found"),
        (["--random-config", TINY, "--sessions", "two"], "expected comma-separated positive"),
        (["--random-config", TINY, "--seconds", "0"], "--seconds must be > 0"),
        (["--random-config", TINY, "--sessions", "1,4", "--capacity", "2"],
         "--capacity 2 is below the largest session count 4"),
        (["--random-config", TINY, "--telemetry-every", "-1"],
         "--telemetry-every must be at least 0"),
        (["--random-config", TINY, "--batch-clock", "lockstep"],
         "--batch-clock must be window or tick, got 'lockstep'"),
        (["--random-config", TINY, "--json-out", "{root}"], "is a directory"),
    ],
    "bench step": [
        ([], "give exactly one of --checkpoint or --random-config"),
        (["--random-config", TINY, "--runs", "0"], "--runs must be at least 1"),
        (["--random-config", TINY, "--capacity", "0"], "--capacity must be at least 1"),
        (["--random-config", TINY, "--sessions", "1,4", "--capacity", "2"],
         "--capacity 2 is below the largest session count 4"),
        (["--random-config", TINY, "--json-out", "{wav}/x.json"], "cannot make its folder"),
    ],
    "bench train": [
        (["-c", "{nowhere}.yaml"], "config file not found"),
        (["-c", TINY, "--steps", "0"], "--steps must be at least 1"),
        (["-c", TINY, "--frames", "0"], "--frames must be at least 1"),
        (["-c", TINY, "--method", "adapter"], "--method 'adapter': expected ttt, lora or both"),
        (["-c", TINY, "--json-out", "{root}"], "is a directory"),
    ],
}
CUDA_CASES = [  # asking for CUDA where there is none: one line, not a torch assertion
    ("train", ["-c", TINY, "--out", "{root}/r", "--base", "{base}", "--data",
               "{data}/train.jsonl", "--device", "cuda"]),
    ("codec-report", ["{base}", "{wav}", "--device", "cuda"]),
    ("bench ttt", ["--device", "cuda"]),
    ("bench train", ["-c", TINY, "--device", "cuda"]),
    ("bench serve", ["--random-config", TINY, "--device", "cuda"]),
    ("serve", ["--checkpoint", "{base}", "--device", "cuda"]),
]


def _expand(args: list[str], w: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in w.items()}) for a in args]


def _one_error_line(out: str, phrase: str) -> str:
    assert "Traceback" not in out, out
    assert "validation error for" not in out and "errors.pydantic.dev" not in out, out
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1, out
    assert phrase in errors[0], out
    return errors[0]


@pytest.mark.parametrize("command,args,phrase", [
    (cmd, args, phrase) for cmd, cases in CASES_2.items() for args, phrase in cases])
def test_documented_failure_is_one_line_and_exit_2(w, command, args, phrase):
    r = invoke([*command.split(), *_expand(args, w)])
    assert r.exit_code == 2, r.output
    _one_error_line(r.output, phrase)


@NO_CUDA
@pytest.mark.parametrize("command,args", CUDA_CASES, ids=[c for c, _ in CUDA_CASES])
def test_cuda_asked_for_without_cuda_is_one_line_and_exit_2(w, command, args):
    r = invoke([*command.split(), *_expand(args, w)])
    assert r.exit_code == 2, r.output
    _one_error_line(r.output, "cuda")


def test_chat_connection_refused_is_one_line_and_exit_3(w):
    from server.loadtest import free_port

    r = invoke(["chat", "--input", w["wav"], "--url", f"ws://127.0.0.1:{free_port()}"])
    assert r.exit_code == 3, r.output
    _one_error_line(r.output, "connection refused")


def test_tls_cert_refuses_to_overwrite_without_force(w):
    out = w["root"] / "tls-once"
    assert invoke(["tls-cert", out]).exit_code == 0
    key = (out / "key.pem").read_bytes()
    r = invoke(["tls-cert", out])
    assert r.exit_code == 2
    _one_error_line(r.output, "pass --force")
    assert (out / "key.pem").read_bytes() == key
    assert invoke(["tls-cert", out, "--force"]).exit_code == 0
    assert (out / "key.pem").read_bytes() != key
    assert (out / "key.pem").stat().st_mode & 0o077 == 0


def test_demo_failure_names_the_step_and_exits_1(w, monkeypatch):
    """A step that fails (not a usage error) ends the demo with exit 1 and names the step."""
    import moshi_ttt.data.synth as synth

    def no_espeak(*a, **k):
        raise synth.SynthesisError("espeak-ng not found (install it with apt-get install "
                                   "espeak-ng)")
    monkeypatch.setattr(synth, "synthesize_dataset", no_espeak)
    r = invoke(["demo", "--workdir", w["root"] / "demo-fails", "--steps", "1"])
    assert r.exit_code == 1, r.output
    line = _one_error_line(r.output, "demo failed in step [1/5] dataset in")
    assert "SynthesisError: espeak-ng not found" in line


@pytest.mark.parametrize("key,value,phrase", [
    ("log_every", 0, "log_every: Input should be greater than or equal to 1 (got 0)"),
    ("clip_grad", -1.0, "clip_grad: Input should be greater than 0 (got -1.0)"),
    ("min_lr_ratio", 2.0, "min_lr_ratio: Input should be less than or equal to 1 (got 2.0)"),
])
def test_train_settings_that_cannot_work_are_one_line_and_exit_2(w, tmp_path, key, value, phrase):
    """Settings with no flag, from the config's train section: refused before anything loads
    (before: log_every 0 crashed with a ZeroDivisionError traceback after loading, clip_grad
    <= 0 trained with zeroed or reversed gradients)."""
    import yaml

    cfg = yaml.safe_load(Path(TINY).read_text())
    cfg["train"][key] = value
    bad = tmp_path / "bad-train.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    r = invoke(["train", "-c", bad, "--out", tmp_path / "r", "--base", w["base"], "--data",
                w["data"] / "train.jsonl"])
    assert r.exit_code == 2, r.output
    _one_error_line(r.output, phrase)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("damage,phrase", [
    ("truncate", "trainer_state.pt is unreadable"),
    ("delete", "has no trainer_state.pt"),
])
def test_train_resume_from_a_bad_trainer_state_is_one_line_and_exit_2(w, tmp_path, damage,
                                                                      phrase):
    """Before: a truncated state was a raw traceback (exit 1) after the model loaded, a missing
    one a bare 'No such file' line with no way out."""
    run = tmp_path / "run"
    args = ["train", "-c", TINY, "--out", run, "--base", w["base"], "--data",
            w["data"] / "train.jsonl", "--segment-seconds", "2"]
    r = invoke([*args, "--steps", "1"])
    assert r.exit_code == 0, r.output
    state = run / "checkpoints" / "step_000001" / "trainer_state.pt"
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:1000])
    else:
        state.unlink()
    r = invoke([*args, "--steps", "2", "--resume"])
    assert r.exit_code == 2, r.output
    line = _one_error_line(r.output, phrase)
    assert str(run / "checkpoints" / "step_000001") in line
    assert "at an earlier checkpoint" in line

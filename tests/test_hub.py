"""Checkpoints through the Hugging Face Hub, without a network: `push` prepares a folder (checked
here file by file) and uploads it in one library call (HfApi patched, its arguments checked);
`hf://` checkpoints are read from a Hugging Face cache this module writes in the library's own
layout, with the library in offline mode, exactly as a machine with HF_HUB_OFFLINE=1 reads them.
The tiny base itself is a cached Hub repo, so a download also fetches the base it names."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import time
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import Result
from safetensors.torch import load_file
from typer.testing import CliRunner

from moshi_ttt.checkpoint import CheckpointError, find_checkpoint, inspect_checkpoint, load_model
from moshi_ttt.cli import app
from moshi_ttt.hub import HubError, HubSpec, parse_spec, prepare_push_folder, resolve_checkpoint
from moshi_ttt.model import is_ttt_param

from conftest import CONFIGS, REPO
from fixtures import make_tokenizer, write_random_dataset

BASE_REPO = "moshi-ttt-test/tiny-base"
TTT_REPO = "moshi-ttt-test/tiny-ttt"
COMMITS = {"base": "1" * 40, "ttt": "2" * 40, "tampered": "3" * 40}


def invoke(args: list) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def cache_repo(cache: Path, repo_id: str, src: Path, commit: str,
               refs: tuple[str, ...] = ("main",)) -> Path:
    """Put the files of `src` into a Hugging Face cache as `repo_id` at `commit`, as the library
    lays it out: blobs/<hash> holding the bytes, snapshots/<commit>/<name> relative symlinks to
    them, refs/<name> holding the commit hash (no newline). Returns the snapshot directory."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hugging Face cache holding a tiny base repo, the library switched to offline mode on
    it (constants read at import, so patched here; the environment too, for subprocesses), a
    2-step run trained on that Hub base with one held-out evaluation, and its push folder
    cached as a second repo (main, tag v1) plus a copy whose base fingerprint was altered."""
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    from moshi_ttt.base import init_random_base
    from moshi_ttt.config import BaseModelRef, load_config
    from moshi_ttt.train.settings import TrainSettings
    from moshi_ttt.train.trainer import train

    root = tmp_path_factory.mktemp("hub")
    cache = root / "hf-cache"
    cfg = load_config(CONFIGS / "tiny.yaml")
    base_dir = init_random_base(cfg, root / "base", make_tokenizer(root / "tok" / "t.model"))
    cache_repo(cache, BASE_REPO, base_dir, COMMITS["base"])
    mp = pytest.MonkeyPatch()
    mp.setattr(constants, "HF_HUB_OFFLINE", True)
    mp.setattr(constants, "HF_HUB_CACHE", str(cache))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_HUB_CACHE", str(cache))
    reset_sessions()  # sessions made before were online ones
    try:
        data = write_random_dataset(root / "data", n_files=2, seconds=4.0, name="train")
        evald = write_random_dataset(root / "data", n_files=1, seconds=4.0, seed=1, name="eval")
        run = root / "run"
        settings = TrainSettings(data=str(data), eval_data=str(evald), segment_seconds=2.0,
                                 batch_size=1, max_steps=2, ckpt_every=2, eval_every=2,
                                 eval_batches=1, warmup_steps=1, lr=3e-3,
                                 activation_checkpointing=False, device="cpu")
        train(cfg, settings, run, base_override=BaseModelRef(hf_repo=BASE_REPO))
        folder = prepare_push_folder(run, root / "push", repo_id=TTT_REPO)
        snap = cache_repo(cache, TTT_REPO, folder, COMMITS["ttt"], refs=("main", "v1"))
        tampered = root / "tampered"
        shutil.copytree(folder, tampered)
        meta = json.loads((tampered / "config.json").read_text())
        meta["base"]["fingerprint"] = "0" * 32
        (tampered / "config.json").write_text(json.dumps(meta))
        cache_repo(cache, TTT_REPO, tampered, COMMITS["tampered"], refs=("tampered",))
        yield SimpleNamespace(root=root, cache=cache, base=base_dir, run=run, folder=folder,
                              snap=snap)
    finally:
        mp.undo()
        reset_sessions()


def test_the_cache_is_in_the_library_layout(hub):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub.cache)
    assert not info.warnings, info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {BASE_REPO, TTT_REPO}
    assert {"main", "v1", "tampered"} <= {ref for rev in repos[TTT_REPO].revisions
                                          for ref in rev.refs}


@pytest.mark.parametrize("text,spec", [
    ("hf://owner/repo", HubSpec("owner/repo")),
    ("hf://owner/repo@v1", HubSpec("owner/repo", "v1")),
    ("hf://o-1/r_2.x@refs/pr/3", HubSpec("o-1/r_2.x", "refs/pr/3")),
    (Path("hf://owner/repo@main"), HubSpec("owner/repo", "main")),  # `//` collapsed by Path
])
def test_spec_forms(text, spec):
    assert parse_spec(text) == spec and str(parse_spec(str(spec))) == str(spec)


@pytest.mark.parametrize("text", ["hf://owner", "hf://owner/repo/sub", "hf://owner/repo@",
                                  "hf:///owner/repo", "hf://owner/..", "hf://a/b@c@d",
                                  "hf://own er/repo"])
def test_malformed_spec_is_one_line(text):
    with pytest.raises(HubError, match=r"^malformed Hub checkpoint .*expected hf://OWNER/REPO"
                                       r" or hf://OWNER/REPO@REVISION") as e:
        parse_spec(text)
    assert "\n" not in str(e.value)


# -- push --------------------------------------------------------------------------------------

def test_push_folder_holds_the_checkpoint_and_a_card_never_the_base(hub):
    folder = hub.folder
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json",
                                                        "ttt.safetensors"]
    ck = find_checkpoint(hub.run).path
    tensors = load_file(str(folder / "ttt.safetensors"))
    assert tensors and all(is_ttt_param(k) for k in tensors)  # no base tensor rides along
    assert (folder / "ttt.safetensors").read_bytes() == (ck / "ttt.safetensors").read_bytes()
    # the config is the checkpoint's own, readable as a checkpoint, base named and fingerprinted
    ref = find_checkpoint(folder)
    assert ref.kind == "ttt" and ref.step == 2
    local = json.loads((ck / "config.json").read_text())
    assert ref.meta["dims"] == local["dims"] and ref.meta["project"] == local["project"]
    assert ref.meta["base"]["hf_repo"] == BASE_REPO
    assert ref.meta["base"]["fingerprint"] == local["base"]["fingerprint"]
    assert "relative_dir" not in ref.meta["base"]
    # the model card: usage, dims, parameter counts, the run's held-out figures
    card = (folder / "README.md").read_text()
    info = inspect_checkpoint(hub.run)
    assert card.startswith("---\nlibrary_name: moshi-ttt\n") and f"base_model: {BASE_REPO}" in card
    assert f"moshi-ttt serve --checkpoint hf://{TTT_REPO}" in card
    main = info["main"]
    assert f"| main | {main['d_model']} | {main['num_heads']} | {main['head_dim']} | " \
           f"{main['num_layers']} |" in card
    for key in ("base", "ttt_inner", "ttt_total", "total"):
        assert f"{info['params'][key]:,} |" in card, key
    n_stored = sum(t.numel() for t in tensors.values())
    assert f"| in `ttt.safetensors` ({len(tensors)} tensors) | {n_stored:,} |" in card
    evals = [json.loads(line) for line in (hub.run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in evals if "eval/loss" in r][-1]
    assert f"recorded by the run at step {last['step']}" in card
    assert f"| loss | {last['eval/loss']:.4f} |" in card


def test_push_refuses_a_base_directory_and_a_used_folder(hub, tmp_path):
    with pytest.raises(CheckpointError, match="not a trained checkpoint: push uploads trained "
                                              "TTT weights only, never the frozen base"):
        prepare_push_folder(hub.base, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(HubError, match="is not an empty directory"):
        prepare_push_folder(hub.run, hub.folder)  # everything in it would be uploaded


def test_push_of_a_run_on_a_local_base_says_where_the_base_must_be(hub, tmp_path, caplog):
    """Without eval data the card says so; the base (a local directory) is named in the card
    and in a warning, since a download needs it at the same path."""
    from moshi_ttt.config import BaseModelRef, load_config
    from moshi_ttt.train.settings import TrainSettings
    from moshi_ttt.train.trainer import train

    settings = TrainSettings(data=str(hub.root / "data" / "train.jsonl"), segment_seconds=2.0,
                             batch_size=1, max_steps=1, warmup_steps=1,
                             activation_checkpointing=False, device="cpu")
    run = tmp_path / "run"
    train(load_config(CONFIGS / "tiny.yaml"), settings, run,
          base_override=BaseModelRef(local_dir=str(hub.base)))
    with caplog.at_level("WARNING", logger="moshi_ttt.hub"):
        folder = prepare_push_folder(run, tmp_path / "push")
    card = (folder / "README.md").read_text()
    assert "base_model:" not in card and f"local directory `{hub.base.resolve()}`" in card
    assert "No held-out evaluation was recorded in the run." in card
    assert f"trained on the local base {hub.base.resolve()}" in caplog.text
    meta = json.loads((folder / "config.json").read_text())
    assert meta["base"]["local_dir"] == str(hub.base.resolve()) and \
        "relative_dir" not in meta["base"]
    assert load_model(folder, with_codec=False).ref.step == 1  # usable where the base is


def test_push_is_one_upload_of_the_prepared_folder(hub, monkeypatch):
    from huggingface_hub import HfApi

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw):
        folder = Path(kw["folder_path"])
        kw["files"] = {p.name: p.read_bytes() for p in folder.iterdir()}
        calls.append(("upload_folder", kw))
        return SimpleNamespace(oid="a" * 40, commit_url=f"https://huggingface.co/{TTT_REPO}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    r = invoke(["push", hub.run, TTT_REPO, "--private"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == f"hf://{TTT_REPO}@{'a' * 40}"
    assert [name for name, _ in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == {"repo_id": TTT_REPO, "repo_type": "model", "private": True,
                           "exist_ok": True}
    up = calls[1][1]
    assert up["repo_id"] == TTT_REPO and up["repo_type"] == "model"
    assert "step 2" in up["commit_message"]
    assert {k: v for k, v in up["files"].items() if k != "README.md"} == \
        {p.name: p.read_bytes() for p in hub.folder.iterdir() if p.name != "README.md"}
    assert not Path(up["folder_path"]).exists()  # the temporary folder is gone


def test_push_failure_is_one_line_and_exit_2(hub):
    """The library itself refuses in offline mode: its error becomes one line."""
    r = invoke(["push", hub.run, TTT_REPO])
    assert r.exit_code == 2, r.output
    _one_error_line(r.output, f"cannot push to the Hub repository {TTT_REPO}: HF_HUB_OFFLINE")


# -- hf:// from an offline cache ---------------------------------------------------------------

def test_load_from_the_cache_is_the_local_checkpoint(hub):
    path = resolve_checkpoint(f"hf://{TTT_REPO}")
    assert path == hub.snap
    hubbed, local = load_model(path, with_codec=False), load_model(hub.run, with_codec=False)
    assert hubbed.base.ref["hf_repo"] == BASE_REPO and hubbed.ref.step == 2
    a, b = hubbed.lm.state_dict(), local.lm.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_revisions_pin_the_snapshot(hub):
    assert resolve_checkpoint(f"hf://{TTT_REPO}@v1") == hub.snap
    assert resolve_checkpoint(f"hf://{TTT_REPO}@{COMMITS['ttt']}") == hub.snap
    with pytest.raises(HubError, match=r"@nope: it is not in the Hugging Face cache"):
        resolve_checkpoint(f"hf://{TTT_REPO}@nope")


def test_a_download_gets_the_same_validation_as_a_directory(hub):
    """A checkpoint whose recorded base fingerprint differs is refused after download exactly
    as the same directory on disk is."""
    path = resolve_checkpoint(f"hf://{TTT_REPO}@tampered")
    with pytest.raises(CheckpointError, match="trained on another base model"):
        load_model(path, with_codec=False)
    with pytest.raises(CheckpointError, match="trained on another base model"):
        load_model(hub.root / "tampered", with_codec=False)


def test_inspect_reads_hf_specs(hub):
    r = invoke(["inspect", "--checkpoint", f"hf://{TTT_REPO}", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output[r.output.index("{"):])
    local = inspect_checkpoint(hub.run)
    assert {k: info[k] for k in ("main", "depformer", "ttt", "params")} == \
        {k: local[k] for k in ("main", "depformer", "ttt", "params")}
    assert info["checkpoint"]["base"]["hf_repo"] == BASE_REPO


def test_diagnose_ttt_reads_hf_specs(hub):
    """The same report as for the local run the cached snapshot was pushed from."""
    args = ["--frames", "32", "--every", "16", "--json"]
    r = invoke(["diagnose-ttt", "--checkpoint", f"hf://{TTT_REPO}", *args])
    assert r.exit_code == 0, r.output
    local = invoke(["diagnose-ttt", "--checkpoint", str(hub.run), *args])
    assert local.exit_code == 0, local.output

    def report(out: str) -> dict:
        rep = json.loads(out[out.index("{"):])
        rep.pop("source")
        return rep

    got = report(r.output)
    assert got == report(local.output) and [lay["layer"] for lay in got["layers"]]


def _one_error_line(out: str, phrase: str) -> str:
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1, out
    assert phrase in errors[0], out
    return errors[0]


@pytest.mark.parametrize("command", ["inspect", "serve", "diagnose-ttt", "bench step",
                                     "bench serve"])
def test_a_missing_repo_is_one_line_and_exit_2(hub, command):
    r = invoke([*command.split(), "--checkpoint", "hf://moshi-ttt-test/not-there"])
    assert r.exit_code == 2, r.output
    line = _one_error_line(r.output, "cannot download checkpoint hf://moshi-ttt-test/not-there:"
                                     " it is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE" in line and "listening on" not in r.output


@pytest.mark.parametrize("command,args", [
    ("inspect", ["--checkpoint", "hf://just-a-name"]),
    ("serve", ["--checkpoint", "hf://owner/repo/extra"]),
])
def test_a_malformed_spec_is_one_line_and_exit_2(command, args):
    r = invoke([command, *args])
    assert r.exit_code == 2, r.output
    _one_error_line(r.output, "malformed Hub checkpoint 'hf://")


def test_server_resolves_hf_before_the_dims_check(hub):
    from server.main import preflight, resolve_checkpoint as resolve_for_server
    from server.settings import ServeSettings

    s = resolve_for_server(ServeSettings(checkpoint=f"hf://{TTT_REPO}@v1"))
    assert s.checkpoint == hub.snap
    assert preflight(s)["checkpoint"]["step"] == 2


def test_serve_from_an_offline_cache(hub):
    """The real command, in its own process, with HF_HUB_OFFLINE=1 and the cache as HF_HUB_CACHE
    (the module's environment): validated, loaded, warmed up, /health 200, SIGTERM exits 0."""
    from server.loadtest import free_port
    from serving import get_json, serve_cmd, serve_env

    port = free_port()
    proc = subprocess.Popen(serve_cmd(f"hf://{TTT_REPO}", port, "--device", "cpu"), cwd=REPO,
                            env=serve_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                code, health = get_json(f"http://127.0.0.1:{port}/health")
                if code == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        assert health["checkpoint"]["path"] == str(hub.snap)
        assert health["checkpoint"]["step"] == 2
        assert health["checkpoint"]["id"] == f"hf://{TTT_REPO}@{COMMITS['ttt'][:12]}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert f"checkpoint hf://{TTT_REPO} is {hub.snap}" in out, out

"""Checkpoints through the Hugging Face Hub: `moshi-ttt push` and `hf://OWNER/REPO[@REVISION]`.

A pushed repository holds what a trained checkpoint adds to its frozen base, and nothing of the
base itself:

    config.json        the checkpoint's own (format, project config, dims, base reference and
                       fingerprint, step, training summary)
    ttt.safetensors    the TTT parameters (and LoRA / full-FT tensors)
    README.md          a model card: dims, parameter counts, the run's eval figures

`hf://` specs are downloaded with `snapshot_download` into the Hugging Face cache and the
snapshot directory is then read exactly like a local checkpoint directory (`find_checkpoint`,
dims validation, base resolution, fingerprint check): there is no second loading path. The base
is fetched by the existing base resolution from the reference the checkpoint records. With
`HF_HUB_OFFLINE=1` the cache alone is used.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINTS, TTT_WEIGHTS, CheckpointError, find_checkpoint

logger = logging.getLogger(__name__)

HF_PREFIX = "hf://"
CARD = "README.md"
CONFIG = "config.json"
PUSHED_FILES = (CONFIG, TTT_WEIGHTS, CARD)  # the only files a push uploads or a pull fetches
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
# `hf:/` too: a spec that went through pathlib.Path (a typer Path option, a pydantic Path
# setting such as MOSHI_TTT_CHECKPOINT) has its `//` collapsed to `/`.
_SPEC = re.compile(r"^hf://?(?P<repo>[^@\s]*?)/?(?:@(?P<rev>[^@\s]*))?$")


class HubError(CheckpointError):
    """A Hub spec is malformed, or a download or upload failed; one line saying which and why.
    A CheckpointError, so every command that reports bad checkpoints reports it the same way."""


@dataclass(frozen=True)
class HubSpec:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{HF_PREFIX}{self.repo_id}{f'@{self.revision}' if self.revision else ''}"


def is_hub_spec(value: str | os.PathLike[str] | None) -> bool:
    """Whether a --checkpoint value names a Hub repository rather than a local path."""
    return value is not None and str(value).startswith("hf:/")


def parse_spec(value: str | os.PathLike[str]) -> HubSpec:
    """`hf://OWNER/REPO[@REVISION]` -> HubSpec, or a HubError saying what the form is."""
    text = str(value)
    if text.startswith("hf:/") and not text.startswith(HF_PREFIX):
        text = HF_PREFIX + text.removeprefix("hf:/")  # as the user wrote it, for the message
    m = _SPEC.match(text)
    if not m or not _REPO_ID.match(m["repo"]) or m["rev"] == "" or ".." in m["repo"]:
        raise HubError(f"malformed Hub checkpoint {text!r}: expected hf://OWNER/REPO or "
                       f"hf://OWNER/REPO@REVISION (a branch, tag or commit)")
    return HubSpec(m["repo"], m["rev"])


def check_repo_id(value: str) -> str:
    """The OWNER/REPO push writes to (an `hf://` prefix is accepted and dropped)."""
    repo = value.removeprefix(HF_PREFIX).rstrip("/")
    if not _REPO_ID.match(repo) or ".." in repo:
        raise HubError(f"malformed Hub repository {value!r}: expected OWNER/REPO (letters, "
                       f"digits, '-', '_', '.')")
    return repo


# -- download ---------------------------------------------------------------------------------

def resolve_checkpoint(value: str | os.PathLike[str]) -> Path:
    """A --checkpoint value as a local directory: local paths unchanged, `hf://` specs
    downloaded (or found in the cache). Callers then validate it as any local directory."""
    if not is_hub_spec(value):
        return Path(value)
    return download(parse_spec(value))


def download(spec: HubSpec) -> Path:
    """The snapshot directory of `spec` in the Hugging Face cache, fetched if needed; only the
    checkpoint's files, so a spec naming a base repo by mistake does not pull 15 GB."""
    from huggingface_hub import constants, snapshot_download

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        path = snapshot_download(spec.repo_id, revision=spec.revision, repo_type="model",
                                 allow_patterns=list(PUSHED_FILES), local_files_only=offline)
    except Exception as e:  # noqa: BLE001 - every failure of the library: one line, why
        raise HubError(f"cannot download checkpoint {spec}: {_download_reason(e, offline)}") \
            from e
    logger.info("checkpoint %s is %s", spec, path)
    return Path(path)


def _download_reason(e: Exception, offline: bool) -> str:
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        return "the repository is gated: accept its conditions on the Hub and log in " \
               "(`hf auth login`, or set HF_TOKEN)"
    if isinstance(e, RepositoryNotFoundError):
        return "no such repository on the Hub, or it is private (log in with `hf auth login`, " \
               "or set HF_TOKEN)"
    if isinstance(e, RevisionNotFoundError):
        return "the repository has no such revision (branch, tag or commit)"
    if isinstance(e, LocalEntryNotFoundError):
        if offline:
            return (f"it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                    f"HF_HUB_OFFLINE is set: download it once online, or point HF_HUB_CACHE at "
                    f"a cache that holds it")
        return "the Hub cannot be reached and it is not in the Hugging Face cache " \
               f"({constants.HF_HUB_CACHE})"
    if isinstance(e, HFValidationError):
        return _first_line(e)
    return f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- push -------------------------------------------------------------------------------------

def prepare_push_folder(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                        repo_id: str | None = None) -> Path:
    """Fill `out_dir` with what `push` uploads: the checkpoint's TTT weights, its config (the
    base reference and fingerprint kept, the path relative to the run dropped: it means nothing
    in a download) and a model card. The checkpoint is validated against its base first, as
    `inspect` does, so a broken checkpoint is never published. Never copies base weights.
    `out_dir` must be missing or empty: the whole folder is what gets uploaded."""
    from .checkpoint import inspect_checkpoint
    from .dims import read_safetensors_shapes

    ref = find_checkpoint(checkpoint)
    if ref.kind != "ttt":
        raise CheckpointError(
            f"{ref.path} is a base directory, not a trained checkpoint: push uploads trained TTT "
            f"weights only, never the frozen base (train it first: `moshi-ttt train`)")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HubError(f"{out} is not an empty directory: everything in it would be uploaded")
    info = inspect_checkpoint(ref.path)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads(json.dumps(ref.meta))
    meta.get("base", {}).pop("relative_dir", None)
    (out / CONFIG).write_text(json.dumps(meta, indent=2, allow_nan=False))
    _link_or_copy(ref.path / TTT_WEIGHTS, out / TTT_WEIGHTS)
    shapes = read_safetensors_shapes(ref.path / TTT_WEIGHTS)
    n_stored = sum(_numel(s) for s in shapes.values())
    evals = _eval_records(ref.path, ref.step)
    (out / CARD).write_text(model_card(meta, info, repo_id, len(shapes), n_stored, evals))
    base = meta.get("base", {})
    if not base.get("hf_repo"):
        logger.warning("%s was trained on the local base %s: a download of it needs that base "
                       "directory at the same path (train on a Hub base, --hf-repo, to make it "
                       "usable anywhere)", ref.path, base.get("local_dir"))
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link when the folder is on the same file system (a 7B run's TTT weights are
    hundreds of MB); a copy otherwise."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _eval_records(ckpt: Path, step: int) -> list[dict[str, Any]]:
    """The held-out evaluations the run logged up to the checkpoint's step (metrics.jsonl of
    the run the checkpoint sits in), each as {"step": N, "eval/...": value}."""
    run = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else None
    records: list[dict[str, Any]] = []
    if run is not None and (run / "metrics.jsonl").is_file():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: the others still count
            if not isinstance(rec, dict):
                continue  # not a record of the trainer's (a stray value, edited by hand)
            figures = {k: v for k, v in rec.items()
                       if k.startswith("eval/") and isinstance(v, (int, float))}
            if figures and isinstance(rec.get("step"), int) and rec["step"] <= step:
                records.append({"step": rec["step"], **figures})
    return records


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "—" if v is None else str(v)


def model_card(meta: dict[str, Any], info: dict[str, Any], repo_id: str | None,
               n_tensors: int, n_stored: int, evals: list[dict[str, Any]]) -> str:
    """The README.md of a pushed checkpoint: what it is, how to use it, what it is made of and
    how it scored, in the Hub's model-card format (YAML front matter, then markdown)."""
    base = meta.get("base", {})
    hf_base = base.get("hf_repo")
    name = repo_id or "a moshi-ttt checkpoint"
    spec = f"hf://{repo_id}" if repo_id else "hf://OWNER/REPO"
    front = ["---", "library_name: moshi-ttt", "tags:", "- moshi", "- moshi-ttt", "- ttt",
             "- test-time-training", "- speech"]
    if hf_base:
        front.append(f"base_model: {hf_base}")
    front.append("---")
    where = (f"the Hugging Face repo [`{hf_base}`](https://huggingface.co/{hf_base})"
             + (f" at revision `{base['revision']}`" if base.get("revision") else "")
             if hf_base else
             f"the local base directory `{base.get('local_dir')}` (not on the Hub: a download "
             f"of this checkpoint needs that directory at the same path)")
    source = f"`{hf_base}`" if hf_base else f"local directory `{base.get('local_dir')}`"
    intro = (f"Test-time-training (TTT-MLP) layers for Kyutai's Moshi, trained with moshi-ttt: "
             f"step {meta.get('step', 0)}. This repository holds only what training added "
             f"(`{TTT_WEIGHTS}`: the TTT parameters, and LoRA adapters if any) and `{CONFIG}` "
             f"(project config, dims, base reference and fingerprint). The frozen base is not "
             f"included: it is {where}, fetched when the checkpoint is loaded and checked "
             f"against the recorded fingerprint.")
    pin = ("Append `@REVISION` (a branch, tag or commit) to pin a version. With "
           "`HF_HUB_OFFLINE=1` the Hugging Face cache alone is used.")
    lines = [
        *front, "", f"# {name}", "", intro, "",
        "## Use", "", "```bash", f"moshi-ttt serve --checkpoint {spec}",
        f"moshi-ttt inspect --checkpoint {spec}", "```", "", pin, "",
        "## Base model", "", "| | |", "|---|---|",
        f"| source | {source} |",
        f"| weights fingerprint | `{base.get('fingerprint')}` |",
        f"| LM config | {base.get('lm_config_source')} |", "",
        "## Dims", "",
        "| transformer | d_model | heads | head_dim | layers | ffn hidden | context |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for part in ("main", "depformer"):
        d = info.get(part)
        if d:
            lines.append(f"| {part} | " + " | ".join(_fmt(d[k]) for k in (
                "d_model", "num_heads", "head_dim", "num_layers", "ffn_hidden", "context"))
                + " |")
    s, t = info.get("streams", {}), info.get("ttt", {})
    streams = (f"Streams: n_q {s.get('n_q')}, dep_q {s.get('dep_q')}, card {s.get('card')}, "
               f"text_card {s.get('text_card')}.")
    ttt = (f"TTT: main layers {t.get('layers')}, depformer layers {t.get('depformer_layers')}, "
           f"mini-batch K={t.get('mini_batch_size')}, heads {t.get('num_heads')}, head_dim "
           f"{t.get('head_dim')}, MLP hidden {t.get('mlp_hidden')}, base lr {t.get('base_lr')}.")
    lines += ["", streams, "", ttt, "", "## Parameters", "", "| set | count |", "|---|---:|"]
    p = info.get("params", {})
    for key, label in (("base", "base (frozen, not in this repository)"),
                       ("ttt_inner", "TTT inner learner (W1, b1, W2, b2, norm, lr gate)"),
                       ("ttt_total", "TTT total"), ("total", "total")):
        if key in p:
            lines.append(f"| {label} | {p[key]:,} |")
    lines.append(f"| in `{TTT_WEIGHTS}` ({n_tensors} tensors) | {n_stored:,} |")
    summary = meta.get("summary") or {}
    lines += ["", "## Training", "", f"- step: {meta.get('step', 0)}",
              f"- data fingerprint: `{meta.get('data_fingerprint')}`",
              f"- written: {meta.get('created')}"]
    for k, label in (("loss", "loss"), ("text", "text loss"), ("audio", "audio loss")):
        if isinstance(summary.get(k), (int, float)):
            lines.append(f"- training {label} at this step: {_fmt(float(summary[k]))}")
    lines += ["", "## Evaluation", ""]
    if not evals:
        recorded = {k: v for k, v in summary.items() if k.startswith("eval/")}
        evals = [{"step": meta.get("step", 0), **recorded}] if recorded else []
    if evals:
        last = evals[-1]
        lines += [f"Held-out figures recorded by the run at step {last['step']}:", "",
                  "| metric | value |", "|---|---:|"]
        lines += [f"| {k.removeprefix('eval/')} | {_fmt(float(v))} |"
                  for k, v in last.items() if k != "step"]
        if len(evals) > 1 and all("eval/loss" in e for e in evals):
            lines += ["", "Held-out loss over the run: " + ", ".join(
                f"step {e['step']}: {float(e['eval/loss']):.4f}" for e in evals[-20:]) + "."]
    else:
        lines.append("No held-out evaluation was recorded in the run.")
    return "\n".join(lines) + "\n"


def push(checkpoint: str | os.PathLike[str], repo_id: str, private: bool = False) -> str:
    """Upload a checkpoint to `repo_id` (created if missing) in one commit; returns the
    `hf://OWNER/REPO@COMMIT` spec that serves exactly what was pushed."""
    from huggingface_hub import HfApi

    repo = check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="moshi-ttt-push-") as tmp:
        folder = prepare_push_folder(checkpoint, Path(tmp) / "repo", repo_id=repo)
        meta = json.loads((folder / CONFIG).read_text())
        api = HfApi()
        try:
            api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo, repo_type="model", folder_path=str(folder),
                commit_message=f"moshi-ttt checkpoint, step {meta.get('step', 0)}")
        except Exception as e:  # noqa: BLE001 - auth, network, quota: one line, why
            raise HubError(f"cannot push to the Hub repository {repo}: "
                           f"{_push_reason(e)}") from e
    oid = getattr(commit, "oid", None)
    logger.info("pushed %s to %s", checkpoint, getattr(commit, "commit_url", repo))
    return str(HubSpec(repo, oid))


def _push_reason(e: Exception) -> str:
    from huggingface_hub.utils import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set (unset it to push)"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, HfHubHTTPError) and status == 401:
        return "not logged in, or the token is invalid (`hf auth login`, or set HF_TOKEN)"
    if isinstance(e, HfHubHTTPError) and status == 403:
        return "the token may not write there (a write token for that owner is needed)"
    return f"{type(e).__name__}: {_first_line(e)}"

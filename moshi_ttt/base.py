"""The frozen base Moshi: where its files are, what its LM config is, and how to make one.

One loading path for everything: a Hugging Face repo (`kyutai/moshiko-pytorch-bf16`) and a local
directory in the same layout (what `moshi-ttt init-base` writes) both become a moshi
`CheckpointInfo`. A repo without config.json (the 7B release) gets moshi's own default LM config,
as moshi does, but only after every dim visible in the weight shapes has been checked against it:
the earlier attempt guessed dims there and crashed deep in a forward pass.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from moshi.models import loaders
from safetensors.torch import save_file

from .config import BaseModelRef, ProjectConfig
from .codec.calibrate import CalibrationSettings
from .dims import DimensionMismatch, Mismatch, read_safetensors_shapes

logger = logging.getLogger(__name__)

PROJECT_CONFIG_NAME = "moshi_ttt.yaml"  # the project config a base dir was made with (TTT, mimi)
MIMI_CONFIG_NAME = "mimi_config.json"


class BaseModelError(RuntimeError):
    """The base model's files are missing, unreadable or inconsistent; says which and why."""


def mimi_config(overrides: dict[str, Any] | None) -> dict[str, Any] | None:
    """moshi's Mimi config with per-section overrides (None: the real Mimi, no custom config)."""
    if not overrides:
        return None
    out = copy.deepcopy(loaders._mimi_config)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


@dataclass
class ResolvedBase:
    info: loaders.CheckpointInfo
    lm_kwargs: dict[str, Any]
    lm_kwargs_source: str
    ref: dict[str, Any]
    project_config: Path | None = None  # moshi_ttt.yaml in a local base dir, if any
    notes: list[str] = field(default_factory=list)

    @property
    def weights(self) -> Path:
        return Path(self.info.moshi_weights)


def _visible_dims(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[Any, str]]:
    """LM kwargs that the weight shapes pin down, each with the tensor that shows it."""
    out: dict[str, tuple[Any, str]] = {}

    def get(name: str) -> tuple[int, ...] | None:
        return shapes.get(name)

    if (s := get("text_emb.weight")) is not None:
        out["dim"] = (s[1], "text_emb.weight")
        out["text_card"] = (s[0] - 1, "text_emb.weight")
    if (s := get("emb.0.weight")) is not None:
        out["card"] = (s[0] - 1, "emb.0.weight")
    n_q = len([k for k in shapes if k.startswith("emb.") and k.endswith(".weight")])
    if n_q:
        out["n_q"] = (n_q, "emb.*.weight")
    dep_q = len([k for k in shapes if k.startswith("linears.") and k.endswith(".weight")])
    if dep_q:
        out["dep_q"] = (dep_q, "linears.*.weight")
    for comp, key in (("transformer", "num_layers"), ("depformer", "depformer_num_layers")):
        idx = {int(k.split(".")[2]) for k in shapes if k.startswith(f"{comp}.layers.")}
        if idx:
            out[key] = (max(idx) + 1, f"{comp}.layers.*")
    if (s := get("depformer_in.0.weight")) is not None:
        out["depformer_dim"] = (s[0], "depformer_in.0.weight")
    return out


def check_kwargs_against_weights(lm_kwargs: dict[str, Any], weights: Path,
                                 source: str) -> list[str]:
    """Compare LM kwargs with what the weight shapes show; raise DimensionMismatch on any
    difference. Returns notes on what the shapes cannot show (heads)."""
    shapes = read_safetensors_shapes(weights)
    problems = []
    for key, (found, tensor) in _visible_dims(shapes).items():
        claimed = lm_kwargs.get(key)
        if key == "depformer_num_layers" and claimed is None:
            claimed = lm_kwargs.get("num_layers")
        if claimed is not None and claimed != found:
            problems.append(Mismatch(f"{tensor} ({key})", f"{claimed!r} ({source})",
                                     f"{found} in {weights.name}", "value"))
    if problems:
        raise DimensionMismatch(problems, f"LM config from {source} vs weights {weights}")
    return ["attention head counts are not visible in weight shapes; taken from " + source]


def resolve_base(ref: BaseModelRef | dict[str, Any]) -> ResolvedBase:
    """Locate the base's files (downloading from the Hub if needed) and settle its LM config."""
    if isinstance(ref, dict):
        ref = BaseModelRef(**ref)
    if ref.local_dir:
        return _resolve_local(Path(ref.local_dir))
    if ref.hf_repo:
        return _resolve_hf(ref.hf_repo, ref.revision)
    raise BaseModelError("no base model given: set base.local_dir or base.hf_repo "
                         "(or pass --base DIR / --hf-repo REPO)")


def _resolve_hf(repo: str, revision: str | None) -> ResolvedBase:
    try:
        info = loaders.CheckpointInfo.from_hf_repo(repo, revision=revision)
    except Exception as e:  # network, auth, missing files: say which repo and what failed
        raise BaseModelError(
            f"cannot fetch base model from Hugging Face repo {repo!r}"
            f"{f' at revision {revision}' if revision else ''}: {type(e).__name__}: {e}"
        ) from e
    return _settle(info, {"hf_repo": repo, "revision": revision}, f"hf://{repo}")


def _resolve_local(root: Path) -> ResolvedBase:
    if not root.is_dir():
        raise BaseModelError(f"base directory not found: {root}")
    cfg_path = root / "config.json"
    names = {"moshi_name": loaders.MOSHI_NAME, "mimi_name": loaders.MIMI_NAME,
             "tokenizer_name": loaders.TEXT_TOKENIZER_NAME}
    raw = None
    if cfg_path.is_file():
        raw = _read_json_object(cfg_path, "the base's config")
        for k in names:
            if k in raw and not (isinstance(raw[k], str) and raw[k]):
                raise BaseModelError(f"{cfg_path}: {k} is {raw[k]!r}; expected the name of a "
                                     f"file in {root}")
        names.update({k: raw[k] for k in names if k in raw})
    files = {k: root / v for k, v in names.items()}
    mimi_cfg = raw.get("mimi_config_name") if raw is not None else None
    if mimi_cfg is not None:
        if not (isinstance(mimi_cfg, str) and mimi_cfg):
            raise BaseModelError(f"{cfg_path}: mimi_config_name is {mimi_cfg!r}; expected the "
                                 f"name of a file in {root}")
        files["mimi_config_name"] = root / mimi_cfg
    missing = [f"{p.name} ({k})" for k, p in files.items() if not p.is_file()]
    if missing:
        raise BaseModelError(f"base directory {root} lacks {', '.join(missing)}; expected the "
                             f"layout of a Moshi Hugging Face repo (what `moshi-ttt init-base` "
                             f"writes)")
    if raw is not None:
        if mimi_cfg is not None:
            _read_json_object(files["mimi_config_name"], "the codec (Mimi) config")
        try:
            info = loaders.CheckpointInfo.from_hf_repo(
                str(root), moshi_weights=files["moshi_name"], mimi_weights=files["mimi_name"],
                tokenizer=files["tokenizer_name"], config_path=cfg_path,
                mimi_config_path=files.get("mimi_config_name"),
            )
        except Exception as e:  # e.g. a lora_name moshi would fetch from a repo of that name
            raise BaseModelError(f"cannot read the base directory {root} as moshi does: "
                                 f"{type(e).__name__}: {e}") from e
    else:
        info = loaders.CheckpointInfo(files["moshi_name"], files["mimi_name"],
                                      files["tokenizer_name"])
    res = _settle(info, {"local_dir": str(root.resolve())}, str(root))
    proj = root / PROJECT_CONFIG_NAME
    res.project_config = proj if proj.is_file() else None
    return res


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`, or a BaseModelError saying what is wrong with the file."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise BaseModelError(f"cannot read {what} {path}: {e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BaseModelError(f"{path} ({what}) is not valid UTF-8 JSON: {e}") from e
    if not isinstance(data, dict):
        raise BaseModelError(f"{path} ({what}) holds a JSON {type(data).__name__}; expected an "
                             f"object of settings")
    return data


def _load_tokenizer(path: Path) -> Any:
    """The text tokenizer (a sentencepiece processor), loaded so that a truncated or foreign
    file is named here, not by a sentencepiece error when training or serving starts."""
    import sentencepiece

    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with "could not parse"
        raise BaseModelError(f"text tokenizer {path} is not a sentencepiece model ({e}); an "
                             f"interrupted download, or another kind of file") from e


def _settle(info: loaders.CheckpointInfo, ref: dict[str, Any], where: str) -> ResolvedBase:
    if info.lm_config is not None:
        kwargs, source = dict(info.lm_config), f"{where}/config.json"
    else:
        kwargs = dict(loaders._lm_kwargs)
        source = (f"moshi's default (Moshi 7B) LM config, because {where} has no config.json")
        logger.warning("%s has no config.json: checking moshi's default 7B LM config against "
                       "the weight shapes before using it", where)
    weights = Path(info.moshi_weights)
    try:
        notes = check_kwargs_against_weights(kwargs, weights, source)
    except DimensionMismatch:
        raise
    except (OSError, ValueError) as e:  # a truncated download, an HTML error page, ...
        raise BaseModelError(f"the LM weights of {where} are not a readable safetensors file: "
                             f"{e} (an interrupted download or copy? fetch or copy it again)"
                             ) from e
    _load_tokenizer(Path(info.tokenizer))  # checked now, not when training or serving starts
    return ResolvedBase(info, kwargs, source, ref, notes=notes)


def load_codec(base: ResolvedBase, device: str | torch.device = "cpu") -> Any:
    """The base's Mimi, or a BaseModelError naming the file that could not be loaded."""
    path = base.info.mimi_weights
    try:
        return base.info.get_mimi(device=device)
    except Exception as e:  # a truncated or foreign weights file: say which, and why
        raise BaseModelError(f"cannot load the codec (Mimi) of {base.ref} from {path}: "
                             f"{type(e).__name__}: {e}") from e


# -- init-base ----------------------------------------------------------------------------------

CODEC_CALIBRATION_NAME = "codec_calibration.json"  # what calibrated the base's Mimi, and how well


def init_random_base(cfg: ProjectConfig, out_dir: Path, tokenizer: Path, seed: int = 0,
                     dtype: torch.dtype = torch.float32, calibrate_on: Path | None = None,
                     codec_from: Path | None = None,
                     calibration: CalibrationSettings | None = None) -> Path:
    """Write a random-initialised base in moshi's file layout (loadable by CheckpointInfo like a
    Hugging Face repo): config.json, model.safetensors, Mimi weights (+ its config when it is not
    the real Mimi's), tokenizer, and moshi_ttt.yaml with the project config it was made from.

    The Mimi is calibrated on the training split of the dataset `calibrate_on` (see
    `moshi_ttt.codec.calibrate`), or copied from the base `codec_from` (same Mimi config), or,
    with neither, left random: then its codebooks are zero and every frame encodes to code 0.
    moshi_ttt.yaml is written last: a base dir holding it is complete."""
    if calibrate_on is not None and codec_from is not None:
        raise BaseModelError("give either a dataset to calibrate the codec on or a base to copy "
                             "a calibrated codec from, not both")
    if not tokenizer.is_file():
        raise BaseModelError(f"tokenizer not found: {tokenizer} (make one with `moshi-ttt "
                             f"make-data`, which trains a sentencepiece model on its transcripts)")
    sp = _load_tokenizer(tokenizer)
    if sp.vocab_size() > cfg.text_card:
        raise BaseModelError(f"tokenizer {tokenizer} has {sp.vocab_size()} pieces but "
                             f"lm.text_card is {cfg.text_card}: the text embedding cannot hold it")
    mcfg = mimi_config(cfg.mimi)
    codec_source = _codec_source(codec_from, mcfg) if codec_from is not None else None
    if calibration is None:
        try:
            calibration = CalibrationSettings.model_validate(cfg.codec_calibration)
        except ValueError as e:
            raise BaseModelError(f"invalid codec_calibration section: {e}") from None
    calib_audio = None
    if calibrate_on is not None:  # read (and check) the speech before spending time on the LM
        from .codec.calibrate import load_calibration_audio

        calib_audio = load_calibration_audio(calibrate_on, _frame_size(mcfg),
                                             calibration.max_seconds,
                                             min_frames=calibration.segment_frames)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PROJECT_CONFIG_NAME).unlink(missing_ok=True)
    torch.manual_seed(seed)
    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(cfg.lm), device="cpu", dtype=dtype)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()},
              str(out_dir / loaders.MOSHI_NAME))
    mimi_name = "mimi.safetensors"
    (out_dir / CODEC_CALIBRATION_NAME).unlink(missing_ok=True)
    if codec_source is not None:
        shutil.copyfile(codec_source, out_dir / mimi_name)
        record = codec_source.parent / CODEC_CALIBRATION_NAME
        if record.is_file():
            shutil.copyfile(record, out_dir / CODEC_CALIBRATION_NAME)
        logger.info("codec copied from %s", codec_source)
    else:
        mimi = loaders.get_mimi(None, mcfg, num_codebooks=max(cfg.lm["dep_q"],
                                                              cfg.lm["n_q"] - cfg.lm["dep_q"]))
        if calib_audio is not None:
            record = _calibrate(mimi, calib_audio, calibration, calibrate_on)
            (out_dir / CODEC_CALIBRATION_NAME).write_text(json.dumps(record, indent=2))
        else:
            logger.warning("the codec of %s is not calibrated: its codebooks are zero and every "
                           "frame encodes to code 0 (pass a dataset to calibrate it on)", out_dir)
        save_file({k: v.contiguous() for k, v in mimi.state_dict().items()},
                  str(out_dir / mimi_name))
    raw = dict(cfg.lm)
    raw.update(moshi_name=loaders.MOSHI_NAME, mimi_name=mimi_name,
               tokenizer_name="tokenizer.model", model_type="moshi")
    if mcfg is not None:
        (out_dir / MIMI_CONFIG_NAME).write_text(json.dumps(mcfg, indent=2))
        raw["mimi_config_name"] = MIMI_CONFIG_NAME
    shutil.copyfile(tokenizer, out_dir / "tokenizer.model")
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    proj = cfg.model_copy(deep=True)
    proj.base = BaseModelRef(local_dir=".")
    (out_dir / PROJECT_CONFIG_NAME).write_text(proj.to_yaml())
    logger.info("wrote random base (%s parameters, seed %d) to %s",
                f"{sum(p.numel() for p in lm.parameters()):,}", seed, out_dir)
    return out_dir


def _frame_size(mcfg: dict[str, Any] | None) -> int:
    m = mcfg or loaders._mimi_config
    return int(m["sample_rate"] / m["frame_rate"])


def _codec_source(base: Path, mcfg: dict[str, Any] | None) -> Path:
    """The Mimi weights of an existing base dir, refused unless its Mimi config is `mcfg`."""
    root = Path(base)
    if not root.is_dir():
        raise BaseModelError(f"base directory to copy the codec from not found: {root}")
    raw: dict[str, Any] = {}
    if (root / "config.json").is_file():
        raw = _read_json_object(root / "config.json", "the base's config")
    weights = root / str(raw.get("mimi_name", loaders.MIMI_NAME))
    if not weights.is_file():
        raise BaseModelError(f"{root} has no codec weights ({weights.name})")
    theirs = None
    if raw.get("mimi_config_name"):
        theirs = _read_json_object(root / str(raw["mimi_config_name"]), "the codec (Mimi) config")
    if theirs != mcfg:
        raise BaseModelError(f"the codec of {root} has another Mimi config than this config's "
                             f"`mimi` section: it cannot be copied")
    return weights


def _calibrate(mimi: Any, audio: Any, settings: CalibrationSettings,
               data: Path) -> dict[str, Any]:
    """Calibrate `mimi` and describe it: the calibration, and the codec report on the
    dataset's held-out split (eval.jsonl beside train.jsonl) when there is one."""
    from .codec.calibrate import calibrate_mimi, training_index
    from .codec.report import codec_report, format_report
    from .data.index import read_index

    report = calibrate_mimi(mimi, audio, settings)
    record: dict[str, Any] = {"calibration": report.to_json()}
    held_out = training_index(data).parent / "eval.jsonl"
    if held_out.is_file():
        files = [f.path for f in read_index(held_out)]
        figures = codec_report(mimi, files)
        record["held_out"] = figures
        logger.info("codec on the held-out split (%s):\n%s", held_out, format_report(figures))
    return record


def materialize_base(resolved: ResolvedBase, cfg: ProjectConfig, out_dir: Path) -> Path:
    """Turn a resolved (e.g. Hugging Face) base into a local base dir: links to its files, an
    explicit config.json (checked against the weights), and moshi_ttt.yaml."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info = resolved.info
    raw = dict(resolved.lm_kwargs)
    links = {"model.safetensors": info.moshi_weights, "tokenizer.model": info.tokenizer,
             Path(info.mimi_weights).name: info.mimi_weights}
    for name, src in links.items():
        dst = out_dir / name
        target = Path(src).resolve()
        if dst.exists() and dst.resolve() == target:
            continue  # already the file itself (out_dir is the base dir): unlinking deletes it
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        dst.symlink_to(target)
    raw.update(moshi_name="model.safetensors", mimi_name=Path(info.mimi_weights).name,
               tokenizer_name="tokenizer.model", model_type=info.model_type)
    if info.mimi_config is not None:
        (out_dir / MIMI_CONFIG_NAME).write_text(json.dumps(info.mimi_config, indent=2))
        raw["mimi_config_name"] = MIMI_CONFIG_NAME
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    proj = cfg.model_copy(deep=True)
    proj.base = BaseModelRef(local_dir=".")
    proj.lm = dict(resolved.lm_kwargs)
    (out_dir / PROJECT_CONFIG_NAME).write_text(proj.to_yaml())
    return out_dir

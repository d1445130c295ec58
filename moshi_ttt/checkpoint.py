"""TTT checkpoints: what the trainer writes and what the server loads, with no conversion step.

A run directory holds

    checkpoints/step_000100/   config.json        base reference + fingerprint, project config
                                                  (lm, ttt, mimi), detected dims, step, data
                                                  fingerprint, training summary
                               ttt.safetensors    TTT parameters (and LoRA / full-FT tensors)
                               trainer_state.pt   optimiser, RNG, data position, skipped steps
    checkpoints/latest         the name of the newest *complete* checkpoint

Each checkpoint is written to a temporary directory and renamed into place, then `latest` is
replaced by rename: a crash leaves at worst a `.tmp-*` directory that nothing reads.

`load_model` accepts a run directory, one checkpoint directory, or a base directory made by
`moshi-ttt init-base` (then the TTT blocks start from a seeded fresh initialisation: "step 0").
Every dim is validated from file headers before any tensor is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from moshi.models.lm import LMModel
from safetensors.torch import load_file, save_file

from .base import PROJECT_CONFIG_NAME, BaseModelError, ResolvedBase, resolve_base
from .config import BaseModelRef, ConfigError, ProjectConfig, load_config
from .dims import (
    DimensionMismatch, Mismatch, ModelDims, check_not_meta, check_recorded, describe, detect_dims,
    validate,
)
from .model import attach_ttt, build_base_lm, is_ttt_param, ttt_blocks

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "moshi-ttt/1"
TTT_WEIGHTS = "ttt.safetensors"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"
CHECKPOINTS = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or made for another base model."""


# -- fingerprints -----------------------------------------------------------------------------

def fingerprint_file(path: str | Path, samples: int = 16, block: int = 1 << 16) -> str:
    """A cheap identity for a (possibly 15 GB) weight file: sha256 of its size, its safetensors
    header, and `samples` blocks spread over the data. Distinguishes architectures and trained
    weights without reading everything."""
    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        head = f.read(8)
        h.update(head)
        if len(head) == 8:
            n = int.from_bytes(head, "little")
            if n < size:
                h.update(f.read(n))
        for i in range(samples):
            f.seek((size * i) // samples)
            h.update(f.read(block))
    return h.hexdigest()[:32]


# -- finiteness -------------------------------------------------------------------------------

def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [k for k, v in tensors.items()
            if v.dtype.is_floating_point and not bool(torch.isfinite(v).all())]


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: JSON has no NaN or Infinity, and
    json.dumps would write them as bare tokens that no JSON parser reads."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# -- writing ----------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    cfg: ProjectConfig,
    base: ResolvedBase,
    dims: ModelDims,
    data_fingerprint: str | None = None,
    trainer_state: dict[str, Any] | None = None,
    summary: dict[str, Any] | None = None,
    keep: int = 0,
) -> Path:
    """Write `checkpoints/step_XXXXXX` atomically and point `latest` at it; keep the newest
    `keep` checkpoints (0: all). Non-finite tensors are refused before anything is written:
    `latest` never names them and no good checkpoint is rotated out for them."""
    bad = nonfinite_tensors(tensors)
    if bad:
        raise CheckpointError(
            f"refusing to write checkpoint step {step}: {len(bad)} tensor(s) hold NaN or inf "
            f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); the existing checkpoints "
            f"are left as they were")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}-{int(time.time() * 1000)}"
    tmp.mkdir()
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                  str(tmp / TTT_WEIGHTS), metadata={"format": CHECKPOINT_FORMAT})
        base_weights = base.weights
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "base": {
                **base.ref,
                "lm_config_source": base.lm_kwargs_source,
                "weights": str(base_weights.resolve()),
                "fingerprint": fingerprint_file(base_weights),
            },
            "project": cfg.model_dump(mode="json"),
            "dims": dims.to_dict(),
            "data_fingerprint": data_fingerprint,
            "tensors": sorted(tensors),
            "summary": json_safe(summary or {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if "local_dir" in base.ref:
            meta["base"]["relative_dir"] = os.path.relpath(base.ref["local_dir"], final)
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, allow_nan=False))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    if keep > 0:
        for old in _step_dirs(root)[:-keep]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    logger.info("checkpoint written: %s", final)
    return final


def _step_of(path: Path) -> int | None:
    """The step a `step_N` directory holds, or None for another name. Rotation orders by this
    number: names sort as strings only up to step 999999 (`step_1000000` < `step_999999`)."""
    digits = path.name.removeprefix("step_")
    return int(digits) if digits.isdigit() else None


def _step_dirs(root: Path) -> list[Path]:
    """The `step_N` checkpoint directories of a run, oldest first (by N, see `_step_of`)."""
    return sorted((p for p in root.glob("step_*") if p.is_dir() and _step_of(p) is not None),
                  key=_step_of)


# -- finding and reading ----------------------------------------------------------------------

@dataclass
class CheckpointRef:
    kind: str  # "ttt" (trainer checkpoint), "base" (init-base directory), "random" (a config)
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        if self.kind == "ttt":
            repo = self.path.parent.parent.name
            if self.path.parent.name == "snapshots" and repo.startswith("models--"):
                # a download (moshi_ttt.hub): a Hugging Face cache snapshot of OWNER/REPO
                owner_repo = repo.removeprefix("models--").replace("--", "/", 1)
                return f"hf://{owner_repo}@{self.path.name[:12]}"
            return f"{repo}/{self.path.name}"
        if self.kind == "random":
            return f"random:{self.path.name}"
        return f"{self.path.name}/base"

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when there is none yet."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not (path / "config.json").is_file() or not (path / TTT_WEIGHTS).is_file():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint")
    return path


#: What a trainer state must hold for `--resume`, with the type of each.
_TRAINER_STATE_KEYS: dict[str, type] = {"step": int, "optimizer": dict, "position": dict}


def earlier_checkpoint_hint(ckpt: Path) -> str:
    """What to do when `ckpt` cannot be resumed from: point `latest` at an earlier checkpoint
    (naming those present) or start a new run."""
    root = ckpt.parent
    step = _step_of(ckpt)
    earlier = [p for p in _step_dirs(root) if step is None or _step_of(p) < step]
    newest = ", ".join(p.name for p in earlier[-5:])  # the likeliest choices, not hundreds
    there = f" (present: {newest})" if earlier else " (its directory name, e.g. step_000100)"
    return f"Point {root / LATEST} at an earlier checkpoint{there} or start a new run"


def load_trainer_state(ckpt: str | Path, mmap: bool = True) -> dict[str, Any]:
    """The trainer state of checkpoint `ckpt` (optimiser, data position, RNG), read and checked
    before anything else of a resume is loaded: a missing, truncated or foreign file is a
    CheckpointError naming it and the way out, not a traceback after minutes of loading.
    `mmap`: the tensors stay on disk until used (ranks that do not restore them never read
    them)."""
    ckpt = Path(ckpt)
    path = ckpt / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(
            f"cannot resume from {ckpt}: it has no {TRAINER_STATE} (optimiser state and data "
            f"position; a checkpoint without one can be served but not resumed). "
            f"{earlier_checkpoint_hint(ckpt)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds for a damaged file
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot resume from {ckpt}: {path} is unreadable ({type(e).__name__}: {detail}; "
            f"truncated or damaged?). {earlier_checkpoint_hint(ckpt)}") from e
    if not isinstance(state, dict):
        problems = [f"it holds a {type(state).__name__}, expected a dict"]
    else:
        problems = [f"{k!r} missing" if k not in state else
                    f"{k!r} is a {type(state[k]).__name__}, expected {t.__name__}"
                    for k, t in _TRAINER_STATE_KEYS.items() if not isinstance(state.get(k), t)]
    if problems:
        raise CheckpointError(
            f"cannot resume from {ckpt}: {path} is not a trainer state ({'; '.join(problems)}). "
            f"{earlier_checkpoint_hint(ckpt)}")
    return state


def find_checkpoint(path: str | Path) -> CheckpointRef:
    """Resolve a run dir / checkpoint dir / base dir to what it holds."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path not found: {p}")
    if (p / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"run directory {p} has no complete checkpoint yet "
                                  f"({p / CHECKPOINTS / LATEST} is missing)")
        p = latest
    cfg_file = p / "config.json"
    if cfg_file.is_file():
        try:
            meta = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
        if isinstance(meta, dict) and meta.get("format") == CHECKPOINT_FORMAT:
            if not (p / TTT_WEIGHTS).is_file():
                raise CheckpointError(f"checkpoint {p} has config.json but no {TTT_WEIGHTS}")
            return CheckpointRef("ttt", p, meta)
        if isinstance(meta, dict) and str(meta.get("format", "")).startswith("moshi-ttt/"):
            raise CheckpointError(f"{p} is a moshi-ttt checkpoint of format {meta['format']!r}; "
                                  f"this version reads {CHECKPOINT_FORMAT!r}")
    if (p / PROJECT_CONFIG_NAME).is_file():
        return CheckpointRef("base", p)
    raise CheckpointError(
        f"{p} is neither a moshi-ttt run/checkpoint directory (config.json with format "
        f"{CHECKPOINT_FORMAT!r} and {TTT_WEIGHTS}) nor a base directory made by `moshi-ttt "
        f"init-base` ({PROJECT_CONFIG_NAME})")


def _base_dims_problems(recorded: dict[str, Any] | None, base: ResolvedBase) -> list[Mismatch]:
    """The base dims a checkpoint recorded against those of `base` (built on meta from its LM
    config; TTT blocks left out, they come from the checkpoint). Empty when they agree or when
    `base` cannot even be built."""
    if not recorded:
        return []
    try:
        dims = detect_dims(build_base_lm(base.lm_kwargs, device="meta", dtype=torch.bfloat16))
    except Exception as e:  # noqa: BLE001 - a base that cannot be built is reported elsewhere
        logger.debug("cannot build %s on meta to compare dims: %s", base.weights, e)
        return []
    return check_recorded({k: v for k, v in recorded.items() if k != "ttt"}, dims)


def _base_for(ref: CheckpointRef, override: BaseModelRef | None,
              base_hint: str | None = None) -> tuple[ProjectConfig, ResolvedBase]:
    """The project config and base a reference needs. `base_hint` is what the calling command
    offers when the recorded base is gone (e.g. train's --base / --hf-repo)."""
    if ref.kind == "base":
        cfg = load_config(ref.path / PROJECT_CONFIG_NAME)
        return cfg, resolve_base(BaseModelRef(local_dir=str(ref.path)))
    try:
        cfg = ProjectConfig.model_validate(ref.meta["project"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{ref.path}/config.json has no valid project config: {e}") from e
    b = dict(ref.meta.get("base", {}))
    if override is not None:
        base = resolve_base(override)
    elif b.get("local_dir"):
        candidates = [Path(b["local_dir"])]
        if b.get("relative_dir"):
            candidates.insert(0, (ref.path / b["relative_dir"]).resolve())
        found = next((c for c in candidates if c.is_dir()), None)
        if found is None:
            looked = " and ".join(str(c) for c in dict.fromkeys(candidates))
            raise CheckpointError(
                f"checkpoint {ref.path} was trained on the base in {b['local_dir']}, which is "
                f"gone (looked in {looked}): put that base directory back there"
                f"{f', or {base_hint}' if base_hint else ''}")
        base = resolve_base(BaseModelRef(local_dir=str(found)))
    elif b.get("hf_repo"):
        base = resolve_base(BaseModelRef(hf_repo=b["hf_repo"], revision=b.get("revision")))
    else:
        raise CheckpointError(f"{ref.path}/config.json does not say which base model it needs")
    want = b.get("fingerprint")
    if want:
        have = fingerprint_file(base.weights)
        problems = _base_dims_problems(ref.meta.get("dims"), base) if have != want else []
        if problems:
            lines = "\n  ".join(str(p) for p in problems[:20])
            raise CheckpointError(
                f"checkpoint {ref.path} was trained on another base model: {base.weights} has "
                f"other dims than the base it records ({b.get('weights')}):\n  {lines}\n"
                f"Use the base it was trained on.")
        if have != want:
            raise CheckpointError(
                f"checkpoint {ref.path} was trained on another base model: it records base "
                f"weights {b.get('weights')} with fingerprint {want}, but {base.weights} has "
                f"fingerprint {have} (same dims, other weights). Use the base it was trained "
                f"on.")
    return cfg, base


@dataclass
class LoadedModel:
    lm: LMModel
    cfg: ProjectConfig
    base: ResolvedBase
    dims: ModelDims
    ref: CheckpointRef
    mimi: Any = None
    tokenizer: Any = None

    def describe(self) -> dict[str, Any]:
        return describe(self.lm, self.cfg.ttt)

    @property
    def checkpoint_info(self) -> dict[str, Any]:
        return {"path": str(self.ref.path), "id": self.ref.id, "kind": self.ref.kind,
                "step": self.ref.step}


def _cast_like_moshi(state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    for k, v in state.items():
        if v.dtype.is_floating_point:
            if k.startswith(("condition_provider.", "fuser.")):
                state[k] = v.float()
            else:
                state[k] = v.to(dtype)


def build_meta(cfg: ProjectConfig, base: ResolvedBase, dtype: torch.dtype,
               extra: Callable[[LMModel], None] | None = None) -> LMModel:
    """The TTT model on the meta device: moshi's LM from the base's LM kwargs, TTT attached."""
    lm = build_base_lm(base.lm_kwargs, device="meta", dtype=dtype)
    if extra is not None:
        extra(lm)
    attach_ttt(lm, cfg.ttt, norm=base.lm_kwargs.get("norm"))
    return lm


def assemble_model(
    cfg: ProjectConfig,
    base: ResolvedBase,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    ttt_weights: Path | None = None,
    recorded_dims: dict[str, Any] | None = None,
    context: str = "",
    seed: int = 0,
    load_weights: bool = True,
    keep_stored_dtype: Callable[[str], bool] | None = None,
) -> tuple[LMModel, ModelDims]:
    """Build moshi's LM on meta, attach TTT (and LoRA), validate every dim against the base
    weights and `ttt_weights` from their headers, then load. Without `ttt_weights` the TTT blocks
    (and LoRA adapters) get a fresh initialisation seeded by `seed`. `load_weights=False` stops
    after the checks and returns the model on the meta device: a caller that receives the
    weights another way (FSDP's broadcast from rank 0) never reads them.

    `ttt_weights` tensors take their parameter's dtype (a bf16 model gets bf16 TTT blocks, its
    inner set fp32), except those whose name `keep_stored_dtype` selects: they keep the dtype
    they were saved in. Resuming training needs that for the tensors it trains: the trainer
    keeps fp32 master weights of them, and rounding those to bf16 on load would make a resumed
    run differ from one that never stopped. (Frozen tensors keep the rule of a fresh build, so
    ranks that build on meta and receive them by broadcast agree on every dtype.)"""
    device = torch.device(device)
    from .lora import apply_lora_from_config, lora_param_filter, materialize_lora

    lm = build_meta(cfg, base, dtype, extra=lambda m: apply_lora_from_config(m, cfg))
    is_extra = lora_param_filter(cfg)  # tensors a TTT checkpoint carries besides TTT ones
    in_ckpt = (lambda n: is_ttt_param(n) or is_extra(n)) if ttt_weights else is_ttt_param
    weights: list[tuple[Path, Callable[[str], bool] | None]] = [
        (base.weights, lambda n: not in_ckpt(n) and not _is_adapter(n))]
    if ttt_weights is not None:
        weights.append((ttt_weights, in_ckpt))
    dims = validate(lm, lm_cfg=cfg.lm, ttt_cfg=cfg.ttt, weights=weights,
                    recorded_dims=recorded_dims, context=context)
    if not load_weights:
        return lm, dims

    state = load_file(str(base.weights), device=str(device))
    _cast_like_moshi(state, dtype)
    res = lm.load_state_dict(state, strict=False, assign=True)
    del state
    if res.unexpected_keys:
        raise CheckpointError(f"unexpected tensors in {base.weights}: {res.unexpected_keys[:10]}")
    if ttt_weights is not None:
        ttt_state = load_file(str(ttt_weights), device=str(device))
        params = dict(lm.named_parameters())
        keep = keep_stored_dtype or (lambda name: False)
        for k, v in ttt_state.items():  # each tensor in its parameter's dtype (inner set: fp32)
            if k in params and not keep(k):
                ttt_state[k] = v.to(params[k].dtype)
        lm.load_state_dict(ttt_state, strict=False, assign=True)
    else:
        rng = torch.random.get_rng_state()
        torch.manual_seed(seed)
        for a in ttt_blocks(lm):
            a.block.to_empty(device=device)
            a.block.reset_parameters()
        torch.random.set_rng_state(rng)
    materialize_lora(lm, device)
    leftover = check_not_meta(lm)
    if leftover:
        raise DimensionMismatch(leftover, f"after loading {context}")
    lm.to(device)
    lm.eval()
    return lm, dims


def _is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    with_codec: bool = True,
    base_override: BaseModelRef | None = None,
    cfg_override: ProjectConfig | None = None,
    seed: int = 0,
    load_weights: bool = True,
    base_hint: str | None = None,
    keep_stored_dtype: Callable[[str], bool] | None = None,
) -> LoadedModel:
    """Load a TTT model for inference or further training, validating every dim first.
    `cfg_override` replaces the project config of a *base* directory (e.g. other TTT layers);
    `load_weights=False` leaves the LM on the meta device (see `assemble_model`); `base_hint`
    is the calling command's way to name another base, for the message when the recorded one
    is gone; `keep_stored_dtype` selects the tensors of a trained checkpoint that keep the dtype
    they were saved in, not `dtype` (see `assemble_model`: resuming training)."""
    device = torch.device(device)
    ref = find_checkpoint(path)
    if cfg_override is not None and ref.kind == "ttt":  # before its base: that is not the problem
        raise CheckpointError(f"{ref.path} is a trained checkpoint: its config is fixed (another "
                              f"config applies to a base directory only)")
    try:
        cfg, base = _base_for(ref, base_override, base_hint)
    except (BaseModelError, ConfigError) as e:
        raise CheckpointError(str(e)) from e
    if cfg_override is not None:
        cfg = cfg_override
    lm, dims = assemble_model(
        cfg, base, device, dtype,
        ttt_weights=ref.path / TTT_WEIGHTS if ref.kind == "ttt" else None,
        recorded_dims=ref.meta.get("dims") if ref.kind == "ttt" else None,
        context=str(ref.path), seed=seed, load_weights=load_weights,
        keep_stored_dtype=keep_stored_dtype)
    loaded = LoadedModel(lm, cfg, base, dims, ref)
    if with_codec:
        loaded.mimi = base.info.get_mimi(device=device)
        loaded.tokenizer = base.info.get_text_tokenizer()
        check_codec(loaded)
    logger.info("loaded %s (%s) on %s/%s: main %d/%d heads/%d layers, depformer %s, TTT layers %s",
                ref.path, ref.kind, device, str(dtype).removeprefix("torch."), dims.main.d_model,
                dims.main.num_heads, dims.main.num_layers,
                f"{dims.depformer.d_model}/{dims.depformer.num_heads}/{dims.depformer.num_layers}"
                if dims.depformer else "none", [t.layer for t in dims.ttt])
    return loaded


def random_model(config: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0,
                 with_codec: bool = True) -> LoadedModel:
    """A config's architecture with random weights, built directly on `device`: benchmarks at
    real sizes (Moshi 7B) where the weights cannot or need not be downloaded. Mimi is random
    too (the config's, or the real architecture); there is no text tokenizer."""
    from .base import mimi_config
    from .config import load_config
    from .model import build_ttt_lm

    device = torch.device(device)
    cfg = load_config(config)
    torch.manual_seed(seed)
    lm = build_ttt_lm(cfg, device=device, dtype=dtype).eval()
    dims = validate(lm, cfg.lm, cfg.ttt, require_loaded=True, context=f"random {config}")
    ref = CheckpointRef("random", Path(config))
    loaded = LoadedModel(lm, cfg, None, dims, ref)  # type: ignore[arg-type]  # no base files
    if with_codec:
        from moshi.models import loaders

        loaded.mimi = loaders.get_mimi(None, mimi_config(cfg.mimi), device=device,
                                       num_codebooks=max(lm.dep_q, lm.n_q - lm.dep_q))
        check_codec(loaded)
    logger.info("random-weights model of %s on %s/%s: %s parameters", config, device,
                str(dtype).removeprefix("torch."), f"{sum(p.numel() for p in lm.parameters()):,}")
    return loaded


def check_codec(m: LoadedModel) -> None:
    """Mimi and the tokenizer against the LM: codebook size, codebook count, vocabulary."""
    problems = []
    mimi, lm = m.mimi, m.lm
    if mimi is not None:
        if mimi.cardinality != lm.card:
            problems.append(Mismatch("mimi.cardinality", lm.card, mimi.cardinality, "codebook size"))
        need = max(lm.dep_q, lm.n_q - lm.dep_q)
        if mimi.num_codebooks < need:
            problems.append(Mismatch("mimi.num_codebooks", need, mimi.num_codebooks, "count"))
        if mimi.frame_rate != 12.5 or mimi.sample_rate != 24000:
            problems.append(Mismatch("mimi rates", "24000 Hz / 12.5 Hz",
                                     f"{mimi.sample_rate} Hz / {mimi.frame_rate} Hz", "value"))
    if m.tokenizer is not None and m.tokenizer.vocab_size() > lm.text_card:
        problems.append(Mismatch("tokenizer vocabulary", f"<= text_card {lm.text_card}",
                                 m.tokenizer.vocab_size(), "size"))
    if problems:
        raise DimensionMismatch(problems, "codec and tokenizer vs LM")


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """`moshi-ttt inspect --checkpoint`: dims and counts from headers only (meta device)."""
    ref = find_checkpoint(path)
    cfg, base = _base_for(ref, None)
    from .lora import apply_lora_from_config, lora_param_filter

    lm = build_meta(cfg, base, torch.bfloat16, extra=lambda m: apply_lora_from_config(m, cfg))
    is_extra = lora_param_filter(cfg)
    in_ckpt = (lambda n: is_ttt_param(n) or is_extra(n))
    weights: list[tuple[Path, Callable[[str], bool] | None]] = [
        (base.weights, lambda n: not in_ckpt(n))]
    if ref.kind == "ttt":
        weights.append((ref.path / TTT_WEIGHTS, in_ckpt))
    validate(lm, cfg.lm, cfg.ttt, weights=weights,
             recorded_dims=ref.meta.get("dims") if ref.kind == "ttt" else None,
             context=str(ref.path))
    info = describe(lm, cfg.ttt)
    info["checkpoint"] = {"path": str(ref.path), "id": ref.id, "kind": ref.kind,
                          "step": ref.step, "base": base.ref,
                          "data_fingerprint": ref.meta.get("data_fingerprint")}
    return info


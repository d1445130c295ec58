"""`moshi-ttt eval-stability`: is a long TTT session stable?

A session of `frames` frames (15,000 = 20 minutes of 80 ms frames) streams through a fresh, seeded
TTT model of the config (or a model passed in), one frame per step, and we record what would go
wrong first in a long conversation (reported, not asserted: the caller judges):

* fast-weight norms per TTT layer and per tensor (every `record_every` frames): finite, and
  bounded rather than growing with the session (the state is updated by every frame and never
  reset, and nothing in TTT's update pulls it back towards W0);
* per-frame step time: the first and the last `window` frames' medians should match (the
  per-frame work is constant: a K-slot mini-batch buffer and a KV ring buffer of `context`);
* resident memory (from /proc/self/statm): flat after the first window.

Drivers: `lmgen` (default) runs `moshi.models.lm.LMGen.step` as the server does: the model samples
its own text and audio (depformer included) while the user's 8 audio streams receive random valid
codes. `tokens` teacher-forces random valid tokens on all 17 streams through `forward_text`, with
one seeded generator per batch row, so row b's input does not depend on the batch size (used to
check that rows of a B > 1 session stay isolated).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from moshi.models.lm import LMGen, LMModel
from pydantic import BaseModel, ConfigDict, Field

from ..config import ProjectConfig
from ..model import build_ttt_lm, calibrate_ttt, ttt_blocks
from ..process_memory import rss_mb
from .diagnose import random_codes

logger = logging.getLogger(__name__)


class StabilitySettings(BaseModel):
    """The config's `eval.stability` section; CLI flags override."""

    model_config = ConfigDict(extra="forbid")

    frames: int = Field(15000, ge=1, description="session length (12.5 frames per second)")
    batch_size: int = Field(1, ge=1)
    driver: Literal["lmgen", "tokens"] = "lmgen"
    record_every: int = Field(250, ge=1, description="frames between norm / memory records")
    window: int = Field(1000, ge=1, description="frames in the first / last step-time medians")
    reference_frame: int = Field(3750, ge=1, description="fast-weight norms at the end are "
                                 "compared with their value here (3750 frames = 5 minutes)")
    # torch seeds are 64-bit and the tokens driver seeds row b with seed * 1000 + 1 + b: a
    # bounded seed fails here, naming the setting, not as an overflow deep in torch
    seed: int = Field(0, ge=-(2**31), lt=2**31)
    threads: int = Field(1, ge=1, description="torch CPU threads (1: robust on a shared box)")

    @classmethod
    def from_config(cls, cfg: ProjectConfig, **overrides: Any) -> "StabilitySettings":
        raw = dict(cfg.eval.get("stability") or {})
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(raw)


COMPONENTS = ("w1", "b1", "w2", "b2")
#: `ttt.qkv_init: whitened`: the fresh model is whitened on this many random frames first.
WHITEN_FRAMES = 256


def fast_weight_stats(lm: LMModel) -> dict[str, dict[str, Any]]:
    """Inside a stream, per TTT layer: per-row norm of all fast weights (W1, b1, W2, b2 as one
    vector) and of each of them (one large tensor, b2 in practice, can hide another's growth),
    per-row relative distance from W0, and whether every row is finite."""
    out: dict[str, dict[str, Any]] = {}
    for a in ttt_blocks(lm):
        if a.component != "transformer":
            continue  # moshi streams the depformer per step: no state lives between frames
        st = a.block._streaming_state
        if st is None:
            raise RuntimeError("fast_weight_stats must be called inside the model's stream")
        cur = torch.cat([t.flatten(1) for t in st.w.as_tuple()], dim=1)
        init = torch.cat([t.flatten()[None] for t in st.w0().as_tuple()], dim=1)
        out[f"{a.component}.{a.layer}"] = {
            "norm": cur.norm(dim=1).tolist(),
            "components": {name: t.flatten(1).norm(dim=1).tolist()
                           for name, t in zip(COMPONENTS, st.w.as_tuple())},
            "drift": ((cur - init).norm(dim=1) / init.norm(dim=1)).tolist(),
            "finite": bool(st.finite_rows().all()),
        }
    return out


def _lmgen_driver(lm: LMModel, s: StabilitySettings) -> tuple[Any, Callable[[], None]]:
    gen = LMGen(lm)  # moshi's default sampling settings, as the server uses
    g = torch.Generator().manual_seed(s.seed + 1)
    n_user = lm.num_codebooks - lm.dep_q - 1
    B = s.batch_size

    def step() -> None:
        user = torch.randint(0, lm.card, (B, n_user, 1), generator=g)
        gen.step(user)

    return gen.streaming(B), step


def _tokens_driver(lm: LMModel, s: StabilitySettings) -> tuple[Any, Callable[[], None]]:
    gens = [torch.Generator().manual_seed(s.seed * 1000 + 1 + b) for b in range(s.batch_size)]
    K = lm.num_codebooks

    def row(g: torch.Generator) -> torch.Tensor:
        x = torch.randint(0, lm.card, (K,), generator=g)
        x[0] = torch.randint(0, lm.text_card, (1,), generator=g)
        return x

    def step() -> None:
        x = torch.stack([row(g) for g in gens])[:, :, None]
        with torch.no_grad():
            lm.forward_text(x)

    return lm.streaming(s.batch_size), step


def _median_ms(xs: "list[float] | array") -> float:
    return 1000 * statistics.median(xs) if xs else float("nan")


def run_stability(cfg: ProjectConfig, s: StabilitySettings,
                  lm: LMModel | None = None) -> dict[str, Any]:
    """Stream `s.frames` frames through a fresh seeded tiny TTT model (or `lm`) and report
    step times, fast-weight norms and resident memory."""
    if not cfg.ttt.layers:
        # depformer TTT layers alone carry no state between frames: nothing would be measured,
        # and the report would call an empty set of fast weights stable
        raise ValueError("eval-stability needs a config with TTT layers in the transformer "
                         "(ttt.layers is empty; depformer TTT layers keep no state across frames)")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        torch.manual_seed(s.seed)
        if lm is None:
            lm = build_ttt_lm(cfg)
            if cfg.ttt.calibrated:  # as train starts a model: calibrated on frames
                calibrate_ttt(lm, random_codes(lm, WHITEN_FRAMES, s.seed))
        if not any(a.component == "transformer" for a in ttt_blocks(lm)):
            raise ValueError("eval-stability needs a model with TTT layers in its transformer")
        lm.eval()
        stream, step = (_lmgen_driver if s.driver == "lmgen" else _tokens_driver)(lm, s)
        # preallocated raw doubles: a list of floats would itself grow RSS by ~32 B per frame
        times = array("d", bytes(8 * s.frames))
        records: list[dict[str, Any]] = []
        t_start = time.perf_counter()
        with torch.no_grad(), stream:
            for t in range(s.frames):
                t0 = time.perf_counter()
                step()
                times[t] = time.perf_counter() - t0
                n = t + 1
                if n % s.record_every == 0 or n == s.frames or t == 0:
                    rec = {"frame": n, "rss_mb": rss_mb(), "layers": fast_weight_stats(lm)}
                    records.append(rec)
                    if n % (10 * s.record_every) == 0:
                        logger.info("frame %d/%d: step %.2f ms (median of the last %d), rss %.0f "
                                    "MiB, max fast-weight norm %.4f", n, s.frames,
                                    _median_ms(times[max(0, n - s.window):n]), min(s.window, n),
                                    rec["rss_mb"], _max_norm(rec))
        wall = time.perf_counter() - t_start
    finally:
        torch.set_num_threads(old_threads)
    return _summarize(s, list(times), records, wall)


def _max_norm(rec: dict[str, Any]) -> float:
    return _max(_max(v["norm"]) for v in rec["layers"].values())


def _max(xs: Any) -> float:
    """max() that is NaN when any value is: Python's max keeps its first value over a later NaN
    (max([1.0, nan]) is 1.0), which would hide a row or a frame whose state went non-finite."""
    xs = list(xs)
    return float("nan") if any(math.isnan(x) for x in xs) else max(xs)


def _min(xs: Any) -> float:
    xs = list(xs)
    return float("nan") if any(math.isnan(x) for x in xs) else min(xs)


def _summarize(s: StabilitySettings, times: list[float], records: list[dict[str, Any]],
               wall: float) -> dict[str, Any]:
    w = min(s.window, len(times) // 2) or len(times)
    first, last = _median_ms(times[:w]), _median_ms(times[-w:])
    layers = list(records[-1]["layers"])
    per_layer = {}
    for name in layers:
        norms = [_max(r["layers"][name]["norm"]) for r in records]
        drifts = [_max(r["layers"][name]["drift"]) for r in records]
        half = [_max(r["layers"][name]["norm"]) for r in records if r["frame"] >= s.frames // 2]
        ref = [_max(r["layers"][name]["norm"]) for r in records
               if r["frame"] >= min(s.reference_frame, s.frames)]
        comps = {}
        for c in COMPONENTS:
            xs = [_max(r["layers"][name]["components"][c]) for r in records]
            mid = [x for r, x in zip(records, xs) if r["frame"] >= s.frames // 2]
            comps[c] = {"initial": xs[0], "max": _max(xs), "final": xs[-1],
                        "final_over_midpoint": xs[-1] / mid[0] if mid and mid[0] else None}
        per_layer[name] = {
            "components": comps,
            "norm_initial": norms[0], "norm_max": _max(norms), "norm_final": norms[-1],
            "norm_min": _min(norms),
            # growth over the second half of the session: ~1 when the state has settled
            "norm_final_over_midpoint": norms[-1] / half[0] if half and half[0] else None,
            # the bound: at most 1.5 x the norm 5 minutes into the session
            "norm_at_reference": ref[0] if ref else None,
            "norm_final_over_reference": norms[-1] / ref[0] if ref and ref[0] else None,
            "drift_final": drifts[-1], "drift_max": _max(drifts),
            "finite": all(r["layers"][name]["finite"] for r in records),
            "final_row_norms": records[-1]["layers"][name]["norm"],
            "final_row_drifts": records[-1]["layers"][name]["drift"],
        }
    rss = [r["rss_mb"] for r in records]
    after_window = [r["rss_mb"] for r in records if r["frame"] >= w] or rss
    finite = all(v["finite"] for v in per_layer.values()) and all(
        math.isfinite(x) for v in per_layer.values() for x in (v["norm_max"], v["norm_final"]))
    return {
        "settings": s.model_dump(),
        "frames": len(times),
        "seconds_audio_equivalent": len(times) * 0.08,
        "wall_seconds": wall,
        "step_ms": {
            "window": w, "first_median": first, "last_median": last,
            "last_over_first": last / first if first else float("nan"),
            "overall_median": _median_ms(times), "max": 1000 * max(times),
        },
        "fast_weights": per_layer,
        "finite": finite,
        "rss_mb": {"first_record": rss[0], "after_first_window": after_window[0],
                   "final": rss[-1], "max": max(rss),
                   "growth_after_first_window": rss[-1] - after_window[0]},
        "trajectory": [{"frame": r["frame"], "rss_mb": round(r["rss_mb"], 3),
                        "max_norm": {k: _max(v["norm"]) for k, v in r["layers"].items()},
                        "max_component_norm": {k: {c: _max(x) for c, x in v["components"].items()}
                                               for k, v in r["layers"].items()}}
                       for r in records],
    }


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for a terminal or a README."""
    st, rss = report["step_ms"], report["rss_mb"]
    s = report["settings"]
    lines = [
        f"{report['frames']} frames ({report['seconds_audio_equivalent'] / 60:.1f} min of audio), "
        f"batch {s['batch_size']}, driver {s['driver']}, {report['wall_seconds']:.0f} s wall",
        f"step time median: first {st['window']} frames {st['first_median']:.2f} ms, last "
        f"{st['window']} frames {st['last_median']:.2f} ms (ratio {st['last_over_first']:.3f}); "
        f"max {st['max']:.1f} ms",
        f"RSS: {rss['first_record']:.1f} MiB at frame 1, {rss['after_first_window']:.1f} MiB "
        f"after {st['window']} frames, {rss['final']:.1f} MiB at the end (max {rss['max']:.1f})",
        f"all fast weights finite: {report['finite']}",
    ]
    for name, v in report["fast_weights"].items():
        ratio = v["norm_final_over_midpoint"]
        ratio_s = "n/a" if ratio is None else f"{ratio:.4f}"
        ref = v.get("norm_final_over_reference")
        ref_s = "n/a" if ref is None else f"{ref:.4f}"
        lines.append(
            f"  {name}: norm initial {v['norm_initial']:.4f}, max {v['norm_max']:.4f}, final "
            f"{v['norm_final']:.4f} (final / midpoint {ratio_s}, final / frame "
            f"{s['reference_frame']} {ref_s}); ||W - W0|| / ||W0|| final {v['drift_final']:.4f}")
        lines.append("    " + ", ".join(
            f"{c} {x['initial']:.3f} -> {x['final']:.3f}" for c, x in v["components"].items()))
    return "\n".join(lines)


# -- late recall: a trained recall model, an hour of distractors, then content to recall ----------

@dataclass
class RecallModel:
    """A text recall model eval-memory trained (`memory.save_model`), loaded and checked."""

    path: Path
    lm: LMModel
    task: Any  # RecallTask
    seed: int | None  # the eval-memory seed and outer steps it was trained with (None: older file)
    steps: int | None


RECALL_MODEL_KEYS = ("state", "lm", "ttt", "task")


def load_recall_model(path: Path) -> RecallModel:
    """The TTT model eval-memory trained on the text recall task, or a ValueError that says
    what the file is not (checked before a long session is run, not after it)."""
    from ..config import TTTConfig
    from ..model import attach_ttt, build_base_lm
    from .recall import RecallTask

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recall model not found: {path} (run `moshi-ttt eval-memory` first: "
                         f"it saves ttt-text.pt beside its results, runs/eval-memory/ by default)")
    what = f"{path} is not an eval-memory recall model"
    try:  # plain tensors and settings only: no code runs from the file
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        raise ValueError(f"{what}: not a file torch.save wrote with tensors and settings only "
                         f"({type(e).__name__})") from None
    missing = [k for k in RECALL_MODEL_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ValueError(f"{what}: missing {', '.join(missing)} (eval-memory writes "
                         f"{', '.join(RECALL_MODEL_KEYS)})")
    try:
        lm = build_base_lm(ck["lm"])
        attach_ttt(lm, TTTConfig.model_validate(ck["ttt"]), norm=ck["lm"].get("norm"))
        lm.load_state_dict(ck["state"], strict=True)
        task = RecallTask.model_validate(ck["task"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"{what}: {str(e).splitlines()[0][:300]}") from None
    model = RecallModel(path, lm.eval(), task, ck.get("seed"), ck.get("steps"))
    logger.info("recall model %s: seed %s, %s outer steps, context %d, %d items of %d",
                path, model.seed if model.seed is not None else "?",
                model.steps if model.steps is not None else "?", task.context,
                task.content_len, task.content_vocab)
    return model


def check_late_recall_frames(model: RecallModel, frames: int) -> None:
    """A session of `frames` frames must hold more than one recall instance (`late_recall`):
    checked by the CLI before the stability session streams, and by `late_recall` itself."""
    if frames <= model.task.length():
        raise ValueError(f"late recall: --frames {frames} must exceed the recall instance's "
                         f"{model.task.length()} frames")


@torch.no_grad()
def late_recall(model: RecallModel, frames: int, batch_size: int = 16, seed: int = 0,
                record_every: int = 250, reference_frame: int = 3750,
                threads: int = 1) -> dict[str, Any]:
    """Sessions of `frames` frames (`batch_size` rows): the recall task's distractor text for
    all but the last `task.length` frames, then one recall instance (START, content, gap,
    RECALL, content). Recall accuracy at the end of the long session against the same instances
    in fresh sessions, and the fast-weight norms over the session."""
    from .memory import delayed_inputs, recall_metrics, stream_text_logits
    from .recall import text_batch

    check_late_recall_frames(model, frames)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lm, task = model.lm, model.task
        g = torch.Generator().manual_seed(seed)
        inst, dep = text_batch(task, batch_size, g, lm.n_q)
        Ti = inst.shape[-1]
        lo = task.first_id + task.content_vocab
        prefix = torch.full((batch_size, lm.num_codebooks, frames - Ti), -1, dtype=torch.long)
        prefix[:, 0] = lo + torch.randint(task.distractor_vocab, (batch_size, frames - Ti),
                                          generator=g)
        seq = delayed_inputs(lm, torch.cat([prefix, inst], dim=-1))
        fresh = recall_metrics(stream_text_logits(lm, inst), inst, dep)
        logits, records = [], []
        t0 = time.perf_counter()
        with lm.streaming(batch_size):
            for t in range(frames):
                out = lm.forward_text(seq[:, :, t:t + 1])[1]
                if t >= frames - Ti:
                    logits.append(out[:, 0, 0].float())
                n = t + 1
                if n % record_every == 0 or n == frames or t == 0:
                    records.append({"frame": n, "layers": fast_weight_stats(lm)})
                    if n % (40 * record_every) == 0:
                        logger.info("late recall: frame %d/%d", n, frames)
        late = recall_metrics(torch.stack(logits, dim=1), inst, dep)
    finally:
        torch.set_num_threads(old)
    layers = {}
    for name in records[-1]["layers"]:
        norms = [_max(r["layers"][name]["norm"]) for r in records]
        ref = [_max(r["layers"][name]["norm"]) for r in records
               if r["frame"] >= min(reference_frame, frames)]
        layers[name] = {"norm_initial": norms[0], "norm_max": _max(norms),
                        "norm_final": norms[-1],
                        "norm_at_reference": ref[0],
                        "norm_final_over_reference": norms[-1] / ref[0],
                        "finite": all(r["layers"][name]["finite"] for r in records)}
    return {"model": str(model.path), "model_seed": model.seed, "model_steps": model.steps,
            "frames": frames, "batch_size": batch_size,
            "reference_frame": reference_frame, "instance_frames": Ti,
            "chance_acc": task.chance_acc, "fresh": fresh, "late": late,
            "fast_weights": layers, "finite": all(v["finite"] for v in layers.values()),
            "wall_seconds": time.perf_counter() - t0}


def format_late_recall(r: dict[str, Any]) -> str:
    trained = "" if r.get("model_steps") is None else \
        f" (seed {r['model_seed']}, {r['model_steps']} outer steps)"
    lines = [f"late recall, model {r['model']}{trained}:",
             f"  {r['frames']} frames ({r['frames'] * 0.08 / 60:.0f} min), "
             f"{r['batch_size']} sessions, the last {r['instance_frames']} frames a recall "
             f"instance; chance acc {r['chance_acc']:.3f}",
             f"  recall acc at the end of the session {r['late']['recall_acc']:.3f} (loss "
             f"{r['late']['recall_loss']:.3f}); in a fresh session {r['fresh']['recall_acc']:.3f} "
             f"(loss {r['fresh']['recall_loss']:.3f})",
             f"  all fast weights finite: {r['finite']}"]
    for name, v in r["fast_weights"].items():
        lines.append(f"  {name}: norm at frame {r['reference_frame']} "
                     f"{v['norm_at_reference']:.3f}, final {v['norm_final']:.3f} (x"
                     f"{v['norm_final_over_reference']:.4f}), max {v['norm_max']:.3f}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: Path) -> None:
    """The report as strict JSON: a non-finite figure (the very failure this report exists to
    show) is written as null, not as a bare NaN or Infinity that JSON parsers refuse."""
    from ..checkpoint import json_safe

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False))

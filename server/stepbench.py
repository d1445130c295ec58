"""`moshi-ttt bench step`: the engine's model step alone, in-process.

`bench serve` times the step inside a real server under real-time clients; on a small machine its
run-to-run spread (the clients share the cores) hides differences of a few percent. This times
`Engine._step_tensors` (codec encode, LM step, codec decode) back to back, each with the engine's
own device-to-host copy (`Engine._read_back`, the TTT telemetry read every `telemetry_every`
steps), in short interleaved runs so that drift in the machine's speed hits both sides alike:

* TTT telemetry on vs off, every row of an engine active (the default);
* with `capacity`: N sessions on an engine of `capacity` rows (the rows the engine steps for
  them: the smallest bucket that holds them, the others exec-masked) vs N sessions on an engine
  of exactly N rows, telemetry on as served: what a server sized for more sessions than it has
  costs each step.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moshi_ttt.protocol import FRAME_SIZE, NUM_CODEBOOKS

from .engine import Engine, EngineConfig

logger = logging.getLogger(__name__)


def _timed(eng: Engine, steps: int, telemetry: bool, sessions: int | None = None) -> float:
    """ms per step over `steps` steps with `sessions` sessions (rows 0 .. sessions - 1) active,
    stepped as the engine steps them (the smallest bucket of rows that holds them); every row
    when None."""
    sessions = eng.cfg.capacity if sessions is None else sessions
    n = eng.rows.bucket_for(sessions)
    active = torch.arange(n, device=eng.device) < sessions
    pcm = torch.zeros(n, 1, FRAME_SIZE, device=eng.device)
    codes = torch.zeros(n, NUM_CODEBOOKS, 1, dtype=torch.long, device=eng.device)
    codec = active if eng.mimi is not None else None
    for b in eng._blocks:
        b.telemetry = telemetry
    eng._sync()
    t0 = time.perf_counter()
    for i in range(steps):
        due = telemetry and (i + 1) % eng.cfg.telemetry_every == 0
        out, audio, bad, tel = eng._step_tensors(pcm, codes, active, codec, codec, due)
        eng._read_back(out, bad, audio, tel)
    return (time.perf_counter() - t0) / steps * 1000


@torch.no_grad()
def run_step_bench(loaded: Any, capacity: int, runs: int = 25, steps: int = 48,
                   telemetry_every: int = 12) -> dict[str, Any]:
    """Telemetry on vs off on one engine of `capacity` rows; figures: mean ms per step over the
    fastest 60% of `runs` runs of each (the slow tail is the machine, not the step)."""
    eng = Engine(loaded.lm, loaded.mimi, EngineConfig(capacity=capacity, use_sampling=False,
                                                     telemetry_every=telemetry_every))
    if eng.telemetry is None:
        raise ValueError("the model has no main-transformer TTT layer: no telemetry to time")
    eng.warmup(2)
    _timed(eng, steps, True), _timed(eng, steps, False)  # first calls: allocation
    times: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(runs):
        times["on"].append(_timed(eng, steps, True))
        times["off"].append(_timed(eng, steps, False))
    keep = max(1, int(runs * 0.6))
    # rounded first, so that the reported overhead is the one of the reported figures
    on, off = (round(float(np.mean(sorted(times[k])[:keep])), 3) for k in ("on", "off"))
    for b in eng._blocks:
        b.telemetry = True
    return {"capacity": capacity, "runs": runs, "steps_per_run": steps,
            "telemetry_every": telemetry_every, "step_ms_on": on,
            "step_ms_off": off, "overhead": round(on / off - 1, 4),
            "device": str(eng.device)}


@torch.no_grad()
def run_capacity_bench(loaded_for: Any, capacity: int, sessions: int, runs: int = 25,
                       steps: int = 48, telemetry_every: int = 12) -> dict[str, Any]:
    """`sessions` sessions on an engine of `capacity` rows vs on one of `sessions` rows (each
    engine its own copy of the model), interleaved runs, telemetry on as served; figures: mean
    ms per step over the fastest 60% of `runs` runs of each."""
    if not 1 <= sessions <= capacity:
        raise ValueError(f"{sessions} sessions do not fit a capacity of {capacity}")
    cfg = dict(use_sampling=False, telemetry_every=telemetry_every)
    big = Engine(*_model(loaded_for()), EngineConfig(capacity=capacity, **cfg))
    exact = Engine(*_model(loaded_for()), EngineConfig(capacity=sessions, **cfg))
    tel = big.telemetry is not None
    for eng in (big, exact):
        eng.warmup(2)
    _timed(big, steps, tel, sessions), _timed(exact, steps, tel)  # first calls: allocation
    times: dict[str, list[float]] = {"big": [], "exact": []}
    for _ in range(runs):
        times["big"].append(_timed(big, steps, tel, sessions))
        times["exact"].append(_timed(exact, steps, tel))
    keep = max(1, int(runs * 0.6))
    ms_big, ms_exact = (round(float(np.mean(sorted(times[k])[:keep])), 3)
                        for k in ("big", "exact"))
    return {"sessions": sessions, "capacity": capacity,
            "rows_stepped": big.rows.bucket_for(sessions), "runs": runs,
            "steps_per_run": steps, "telemetry": tel, "step_ms_capacity": ms_big,
            "step_ms_exact": ms_exact, "ratio": round(ms_big / ms_exact, 4),
            "device": str(big.device)}


def _model(loaded: Any) -> tuple[Any, Any]:
    return loaded.lm, loaded.mimi


def run(loaded_for: Any, counts: list[int], runs: int, json_out: Path | None,
        capacity: int | None = None) -> list[dict]:
    """Telemetry on vs off for engines of `counts` rows, or with `capacity`: `counts` sessions
    on an engine of `capacity` rows vs on engines of exactly that many rows."""
    from rich.console import Console
    from rich.table import Table

    if capacity is not None:
        res = [run_capacity_bench(loaded_for, capacity, n, runs) for n in counts]
        t = Table(title=f"moshi-ttt bench step: N sessions on a capacity-{capacity} engine vs "
                        f"on a capacity-N one")
        for col in ("sessions", "rows stepped", "device", f"cap {capacity} ms", "cap N ms",
                    "ratio"):
            t.add_column(col, justify="right")
        for r in res:
            t.add_row(str(r["sessions"]), str(r["rows_stepped"]), r["device"],
                      f"{r['step_ms_capacity']:.2f}", f"{r['step_ms_exact']:.2f}",
                      f"{r['ratio']:.3f}x")
    else:
        res = [run_step_bench(loaded_for(), c, runs) for c in counts]
        t = Table(title="moshi-ttt bench step: the engine's step, TTT telemetry on vs off")
        for col in ("rows", "device", "on ms", "off ms", "overhead"):
            t.add_column(col, justify="right")
        for r in res:
            t.add_row(str(r["capacity"]), r["device"], f"{r['step_ms_on']:.2f}",
                      f"{r['step_ms_off']:.2f}", f"{100 * r['overhead']:+.1f}%")
    Console(width=120).print(t)
    if json_out:
        json_out.write_text(json.dumps(res, indent=2))
    return res

"""`moshi-ttt bench step`: the engine's model step alone, in-process, with TTT telemetry on and off.

`bench serve` times the step inside a real server under real-time clients; on a small machine its
run-to-run spread (the clients share the cores) hides differences of a few percent. This times
`Engine._step_tensors` (codec encode, LM step, codec decode, every row active) back to back, each
with the engine's own device-to-host copy (`Engine._read_back`, the telemetry read in it every
`telemetry_every` steps), alternating on and off in short interleaved runs so that drift in the
machine's speed hits both alike.
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


def _timed(eng: Engine, steps: int, telemetry: bool) -> float:
    """ms per step over `steps` steps with every row active."""
    S = eng.cfg.capacity
    everyone = torch.ones(S, dtype=torch.bool, device=eng.device)
    pcm = torch.zeros(S, 1, FRAME_SIZE, device=eng.device)
    codes = torch.zeros(S, NUM_CODEBOOKS, 1, dtype=torch.long, device=eng.device)
    codec = everyone if eng.mimi is not None else None
    for b in eng._blocks:
        b.telemetry = telemetry
    eng._sync()
    t0 = time.perf_counter()
    for i in range(steps):
        out, audio, bad = eng._step_tensors(pcm, codes, everyone, codec, codec)
        eng._read_back(out, bad, audio, telemetry and (i + 1) % eng.cfg.telemetry_every == 0)
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


def run(loaded_for: Any, capacities: list[int], runs: int, json_out: Path | None) -> list[dict]:
    from rich.console import Console
    from rich.table import Table

    res = [run_step_bench(loaded_for(), c, runs) for c in capacities]
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

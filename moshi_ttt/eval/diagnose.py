"""`moshi-ttt diagnose-ttt`: is each TTT layer's inner learner alive over a streamed session?

N frames stream through a built model one at a time (moshi's streaming state, teacher-forced
tokens: speech codes of a dataset encoded by the model's own codec when one is given, else random
tokens), and every `every` frames each TTT layer of the main transformer reports, for batch row 0
(see `moshi_ttt.diagnostics`): the input dependence of its inner output and its ratio to the value
at W0 (frame 0), the fast-weight norms and their drift from W0, and the effective step of the
commits since the last report.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

import torch
from moshi.models.lm import LMModel

from ..diagnostics import collapsed, distance, input_dependence, probe_queries, total_norm
from ..model import ttt_blocks
from ..ttt_mlp import FastWeights
from .memory import delayed_inputs

logger = logging.getLogger(__name__)


def random_codes(lm: LMModel, frames: int, seed: int) -> torch.Tensor:
    """[1, 17, frames] uniform valid tokens on every stream."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (1, lm.num_codebooks, frames), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (1, frames), generator=g)
    return codes


def dataset_codes(loaded: Any, data: Path, frames: int) -> torch.Tensor:
    """[1, 17, frames]: the files of a dataset index (DATA/train.jsonl for a directory) encoded
    into Moshi's 17 streams by the model's own codec and tokenizer, one after the other, repeated
    until `frames`."""
    from ..codec.calibrate import training_index
    from ..data.encode import StreamEncoder
    from ..data.index import read_index

    index = training_index(data)
    enc = StreamEncoder(loaded.mimi, loaded.tokenizer, Path(loaded.base.info.tokenizer),
                        index.parent / ".token-cache")
    streams = [enc.encode(f) for f in read_index(index)]
    enc.save_memo()
    codes = torch.cat(streams, dim=-1)
    reps = -(-frames // codes.shape[-1])
    return codes.repeat(1, reps)[None, :, :frames].long()


@torch.no_grad()
def diagnose(lm: LMModel, codes: torch.Tensor, every: int | None = None, seed: int = 0
             ) -> dict[str, Any]:
    """Stream `codes` [1, 17, T] through `lm` (teacher forced) and measure every main-transformer
    TTT layer every `every` frames (default: 4 mini-batches)."""
    lm.eval()
    blocks = [a for a in ttt_blocks(lm) if a.component == "transformer"]
    if not blocks:
        raise ValueError("the model has no TTT layer in its main transformer")
    K = blocks[0].block.mini_batch_size
    every = every or 4 * K
    T = codes.shape[-1]
    seq = delayed_inputs(lm, codes)
    probes = {a.layer: probe_queries(a.block.num_heads, a.block.head_dim, seed=seed,
                                     device=a.block.inner.w1.device) for a in blocks}
    series: dict[int, list[dict[str, float]]] = {a.layer: [] for a in blocks}
    steps: dict[int, list[float]] = {a.layer: [] for a in blocks}
    last_commit: dict[int, FastWeights] = {}

    def snapshot(w: FastWeights) -> FastWeights:
        return FastWeights(*(t[:1].clone() for t in w.as_tuple()))

    def record(frame: int) -> None:
        for a in blocks:
            st, inner = a.block._streaming_state, a.block.inner
            w = snapshot(st.w)
            dep = float(input_dependence(w, inner.ttt_norm_weight, inner.ttt_norm_bias,
                                         a.block.ln_eps, probes[a.layer])[0])
            w0 = st.w0()
            rec = {"frame": frame, "dependence": dep,
                   "norm": float(total_norm(w)[0]),
                   "drift": float(distance(w, w0)[0] / total_norm(
                       FastWeights(*(t[None] for t in w0.as_tuple())))[0]),
                   "step": statistics.fmean(steps[a.layer]) if steps[a.layer] else 0.0}
            base = series[a.layer][0]["dependence"] if series[a.layer] else dep
            rec["ratio"] = dep / base if base > 0 else float("nan")
            series[a.layer].append(rec)
            steps[a.layer].clear()

    with lm.streaming(1):
        record(0)
        for a in blocks:
            last_commit[a.layer] = snapshot(a.block._streaming_state.w)
        for t in range(T):
            lm.forward_text(seq[:, :, t:t + 1])
            if (t + 1) % K == 0:  # a commit happened at this frame
                for a in blocks:
                    w = snapshot(a.block._streaming_state.w)
                    prev = last_commit[a.layer]
                    steps[a.layer].append(float(distance(w, prev)[0] / total_norm(prev)[0]))
                    last_commit[a.layer] = w
            if (t + 1) % every == 0 or t + 1 == T:
                record(t + 1)
    layers = []
    for a in blocks:
        s = series[a.layer]
        layers.append({"layer": a.layer, "series": s, "final_ratio": s[-1]["ratio"],
                       "collapsed": collapsed(s[-1]["ratio"])})
    return {"frames": T, "mini_batch_size": K, "every": every, "layers": layers}


def format_diagnosis(report: dict[str, Any], rows: int = 8) -> str:
    """A table per layer: a few evenly spaced records of the series."""
    out = [f"{report['frames']} frames streamed ({report.get('source', '')}), K = "
           f"{report['mini_batch_size']}; input dependence = std over probe queries of "
           f"LN(f_W(q)); ratio = dependence / dependence at W0; drift = ||W - W0|| / ||W0||; "
           f"step = ||W after - before|| / ||W before|| per commit"]
    for lay in report["layers"]:
        s = lay["series"]
        pick = sorted({round(i * (len(s) - 1) / max(1, rows - 1)) for i in range(rows)})
        out.append(f"layer {lay['layer']}{'  COLLAPSED' if lay['collapsed'] else ''}")
        out.append("   frame  dependence   ratio     norm    drift     step")
        for i in pick:
            r = s[i]
            out.append(f"  {r['frame']:>6}  {r['dependence']:>10.4f}  {r['ratio']:>6.3f}  "
                       f"{r['norm']:>7.2f}  {r['drift']:>7.4f}  {r['step']:>7.5f}")
    return "\n".join(out)

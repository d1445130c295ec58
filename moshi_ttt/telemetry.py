"""Per-session TTT telemetry: is each conversation's inner learner learning, and how much.

While a `TTTBlock`'s `telemetry` flag is on, its streaming step adds to each active row's
`TTTState.telemetry` the frame's inner loss before the update (at the fast weights of its
mini-batch's start) and after it (at the state its own output reads: the mini-batch's updates
up to and including the frame), and a frame count, on device (`ttt_mlp.stream_step`). Every few
frames the server's engine calls `TelemetryReader.read`, which turns those sums into per-row,
per-layer figures, still on device, and zeroes them; the engine copies the result to the host
in the same copy as the step's tokens, so telemetry adds no host sync.

Per layer and row, over the frames since the last read (the window):

    inner_loss_before   mean over heads and frames of 1/2 ||LN(f_W(k_t)) - (v_t - k_t)||^2,
                        W the fast weights at the start of frame t's mini-batch
    inner_loss_after    the same at W_t, after frame t's update
    drift               ||W - W0|| / ||W0|| at the read (W: the row's committed state)
    input_dependence    `diagnostics.input_dependence` of W over that of W0: 1 at W0, below
                        `diagnostics.COLLAPSE_RATIO` once the inner output stops depending on
                        its input

`telemetry_message` makes the JSON the server sends (a METADATA message, see moshi_ttt.protocol);
the layer aggregates are means over layers.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from .block import TTTBlock
from .diagnostics import distance, input_dependence, probe_queries
from .protocol import TELEMETRY_TYPE

#: What `TelemetryReader.read` returns per row and layer, in this order.
COLUMNS = ("frames", "inner_loss_before", "inner_loss_after", "drift", "input_dependence")
FIGURES = COLUMNS[1:]


class TelemetryReader:
    """Reads the telemetry of `blocks` (streaming TTT blocks of one model, one batch)."""

    def __init__(self, blocks: Sequence[TTTBlock], input_dependence: bool = True):
        self.blocks = list(blocks)
        self.layers = [b.layer_index for b in self.blocks]
        self.with_input_dependence = input_dependence
        self._refs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        for b in self.blocks:
            b.telemetry = True

    @torch.no_grad()
    def prepare(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per block: ||W0||, the probe queries and W0's input dependence (W0 is fixed while
        serving: computed once)."""
        if self._refs is None:
            refs = []
            for b in self.blocks:
                w0 = b.inner.fast_weights()
                probes = probe_queries(b.num_heads, b.head_dim, device=w0.w1.device)
                dep0 = input_dependence(w0, b.inner.ttt_norm_weight, b.inner.ttt_norm_bias,
                                        b.ln_eps, probes)[0]
                norm0 = torch.sqrt(sum(t.float().pow(2).sum() for t in w0.as_tuple()))
                refs.append((norm0, probes, dep0))
            self._refs = refs
        return self._refs

    @torch.no_grad()
    def read(self) -> torch.Tensor:
        """[B, layers, 5] fp32 on device (`COLUMNS`), and the sums start again from zero.
        A row without frames in the window has frames 0 and losses 0."""
        cols = []
        for b, (norm0, probes, dep0) in zip(self.blocks, self.prepare()):
            st = b._streaming_state
            if st is None:
                raise RuntimeError(f"TTT layer {b.layer_index} is not streaming: no telemetry")
            sums = st.telemetry
            frames = sums[:, 2]
            n = frames.clamp_min(1.0)
            w0 = b.inner.fast_weights()
            drift = distance(st.w, w0) / norm0.clamp_min(1e-12)
            if self.with_input_dependence:
                dep = input_dependence(st.w, b.inner.ttt_norm_weight, b.inner.ttt_norm_bias,
                                       b.ln_eps, probes) / dep0.clamp_min(1e-12)
            else:
                dep = torch.full_like(frames, float("nan"))
            cols.append(torch.stack([frames, sums[:, 0] / n, sums[:, 1] / n, drift, dep], dim=1))
            sums.zero_()
        return torch.stack(cols, dim=1).float()


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None  # JSON has no NaN (browsers refuse it)


def telemetry_message(row: np.ndarray, layers: Sequence[int], frame: int) -> dict[str, Any]:
    """The message for one session, but its id (the server's session adds it): `row`
    [layers, 5] (`COLUMNS`) as read for its batch row, `frame` the session's frames so far.
    Aggregates are means over layers (None if not finite, e.g. input dependence when it is not
    measured)."""
    row = np.asarray(row, dtype=np.float64)
    msg: dict[str, Any] = {"type": TELEMETRY_TYPE, "frame": int(frame),
                           "window_frames": int(row[0, 0]) if len(row) else 0}
    for i, name in enumerate(FIGURES, start=1):
        msg[name] = _finite(float(row[:, i].mean())) if len(row) else None
    msg["layers"] = [{"layer": int(layer), **{name: _finite(float(r[i]))
                                              for i, name in enumerate(FIGURES, start=1)}}
                     for layer, r in zip(layers, row)]
    return msg

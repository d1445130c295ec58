"""Prometheus metrics of one server process (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# 80 ms is the real-time budget of one frame; buckets resolve around it.
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1,
                0.15, 0.2, 0.3, 0.5, 1.0, 2.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step_seconds = Histogram(
            "moshi_ttt_step_seconds", "Model step latency: one frame for every ready session "
            "(codec encode, LM step, codec decode)", buckets=STEP_BUCKETS, registry=r)
        self.step_batch = Histogram(
            "moshi_ttt_step_sessions", "Sessions advanced per model step",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.frames = Counter("moshi_ttt_frames_total", "Frames processed (all sessions)",
                              registry=r)
        self.sessions_active = Gauge("moshi_ttt_sessions_active", "Sessions connected now",
                                     registry=r)
        self.sessions_capacity = Gauge("moshi_ttt_sessions_capacity", "Session slots",
                                       registry=r)
        self.sessions_total = Counter("moshi_ttt_sessions_total", "Sessions accepted",
                                      registry=r)
        self.sessions_refused = Counter("moshi_ttt_sessions_refused_total",
                                        "Connections refused", ["reason"], registry=r)
        self.errors = Counter("moshi_ttt_errors_total", "Session errors by kind", ["kind"],
                              registry=r)
        self.frames_dropped = Counter(
            "moshi_ttt_frames_dropped_total", "Input frames dropped, by reason (before_handshake: "
            "beyond the frames kept from before a session's handshake)", ["reason"], registry=r)

        # Fleet-wide TTT telemetry, one observation per session and telemetry window (no
        # per-session labels: bounded cardinality).
        self.ttt_inner_loss_improvement = Histogram(
            "moshi_ttt_ttt_inner_loss_improvement", "1 - inner loss after / before the update, "
            "mean over TTT layers, per session and telemetry window",
            buckets=(-0.5, -0.1, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
            registry=r)
        self.ttt_drift = Histogram(
            "moshi_ttt_ttt_drift", "||W - W0|| / ||W0|| of the sessions' fast weights, mean over "
            "TTT layers, per session and telemetry window",
            buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0), registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""The FastAPI application: /health, /metrics, /api/chat and the browser client at /.

`ModelHost` owns the model's life: it loads the checkpoint (dims were already validated from
file headers before the port was bound, see `server.main`), checks that every weight is finite,
warms the engine up (and checks that the TTT state stayed finite), and only then reports ready.
Until then /health answers 503 with the reason and chat connections are refused with an ERROR
message. A checkpoint that fails these checks is `invalid` (the process exits with status 2).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from typing import Any

import torch
from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from moshi_ttt import protocol
from moshi_ttt.process_memory import native_heap, rss_mb
from moshi_ttt.protocol import FRAME_RATE, NUM_CODEBOOKS, SAMPLE_RATE, Close, Mode
from moshi_ttt.resources import ResourceError, web_dir

from .engine import Engine, EngineConfig, WarmupDiverged
from .memory import HeapTrimmer
from .metrics import ServerMetrics
from .session import ChatSession, SessionLimits, _End
from .settings import ServeSettings

logger = logging.getLogger(__name__)


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(setting)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {setting!r} asked for, but torch sees no CUDA device")
    return dev


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, setting)


class NonFiniteWeights(ValueError):
    """Loaded weights hold NaN or inf: every session would fail (or answer garbage)."""


class LoadStopped(Exception):
    """Loading was abandoned because the server is shutting down."""


def nonfinite_weights(modules: dict[str, torch.nn.Module]) -> list[str]:
    """Every floating-point parameter or buffer holding NaN or inf, as 'name (n NaN, m inf of
    k values)'; one device sync for the whole model, counts only for the bad ones."""
    named = [(f"{prefix}{n}", t) for prefix, m in modules.items() if m is not None
             for n, t in [*m.named_parameters(), *m.named_buffers()]
             if t.is_floating_point() and t.numel() and t.device.type != "meta"]
    if not named:
        return []
    with torch.no_grad():
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, t) in enumerate(named):
            by_device.setdefault(t.device, []).append(i)
        ok = [True] * len(named)
        for idx in by_device.values():
            flags = torch.stack([torch.isfinite(named[i][1]).all() for i in idx]).cpu()
            for i, good in zip(idx, flags.tolist()):
                ok[i] = good
        bad = []
        for (name, t), good in zip(named, ok):
            if not good:
                nan = int(torch.isnan(t).sum())
                bad.append(f"{name} ({nan} NaN, {int(torch.isinf(t).sum())} inf of "
                           f"{t.numel()} values)")
    return bad


class ModelHost:
    """Loading state, the loaded model, its engine, and the sessions connected to it."""

    def __init__(self, settings: ServeSettings, metrics: ServerMetrics | None = None):
        self.settings = settings
        self.metrics = metrics or ServerMetrics()
        self.metrics.sessions_capacity.set(settings.max_sessions)
        self.status = "starting"
        self.reason = "the model is not loaded yet"
        self.loaded: Any = None
        self.engine: Engine | None = None
        self.sessions: set[ChatSession] = set()
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.model_info: dict[str, Any] = {}
        self.warmup_step_s: float | None = None
        self.failed = threading.Event()
        self.invalid = False  # the failure is the checkpoint's (exit status 2), not the host's
        self.draining = False
        self.loader: threading.Thread | None = None
        self._stop_loading = threading.Event()
        self.heap = HeapTrimmer()  # freed codec state back to the system (see server.memory)

    @property
    def ready(self) -> bool:
        self._check_engine()
        return self.status == "ok"

    def _check_engine(self) -> None:
        """A model thread that died turns the server unready (and /health 503)."""
        if self.status == "ok" and self.engine is not None and self.engine.failure:
            self.status, self.reason = "failed", self.engine.failure

    def start_loading(self) -> None:
        """`load` on its own thread (so that /health answers meanwhile)."""
        self.loader = threading.Thread(target=self.load, name="moshi-ttt-load", daemon=True)
        self.loader.start()

    def stop_loading(self) -> None:
        """Ask a load in progress to give up at its next step (shutdown during start-up)."""
        self._stop_loading.set()

    def _check_stop(self) -> None:
        if self._stop_loading.is_set():
            raise LoadStopped("the server is shutting down")

    def load(self) -> None:
        """Load, check the weights, build the engine, warm up. Blocking; run it off the event
        loop. Between steps it gives up if `stop_loading` was called."""
        from moshi_ttt.checkpoint import CheckpointError, load_model, random_model
        from moshi_ttt.config import ConfigError
        from moshi_ttt.dims import DimensionMismatch

        s = self.settings
        what = s.checkpoint or s.random_config
        try:
            self._check_stop()
            self.status, self.reason = "loading", f"loading {what}"
            t0 = time.perf_counter()
            if s.seed is not None:
                torch.manual_seed(s.seed)
            if self.device.type == "cpu" and s.cpu_threads:
                torch.set_num_threads(s.cpu_threads)
            if s.random_config is not None:
                loaded = random_model(s.random_config, self.device, self.dtype,
                                      seed=s.seed or 0)
            else:
                loaded = load_model(s.checkpoint, self.device, self.dtype)
            self._check_stop()
            bad = nonfinite_weights({"": loaded.lm, "mimi.": loaded.mimi})
            if bad:
                raise NonFiniteWeights(
                    f"{len(bad)} weight tensor(s) of {what} hold NaN or inf: "
                    f"{'; '.join(bad[:8])}{'; ...' if len(bad) > 8 else ''}. Every session "
                    f"would fail; serve a checkpoint saved before training diverged")
            self.loaded = loaded
            self.model_info = self.loaded.describe()
            self._check_stop()
            self.status, self.reason = "warming_up", "running warm-up steps"
            self.engine = Engine(self.loaded.lm, self.loaded.mimi, EngineConfig(
                capacity=s.max_sessions, use_sampling=s.use_sampling, temp=s.temp,
                temp_text=s.temp_text, top_k=s.top_k, top_k_text=s.top_k_text,
                batch_wait_s=s.batch_wait_ms / 1000, batch_clock=s.batch_clock,
                max_buffered_frames=s.max_buffered_frames,
                max_step_failures=s.max_step_failures,
                telemetry_every=s.telemetry_every_frames,
                telemetry_input_dependence=s.telemetry_input_dependence,
            ), self.metrics)
            self.warmup_step_s = self.engine.warmup(s.warmup_frames,
                                                    should_stop=self._stop_loading.is_set)
            self._check_stop()
            self.engine.start()
            self.status, self.reason = "ok", ""
            logger.info("ready in %.1f s: %s on %s/%s, %d session slots, warm-up step %.1f ms",
                        time.perf_counter() - t0, self.loaded.ref.id, self.device,
                        str(self.dtype).removeprefix("torch."), s.max_sessions,
                        1000 * (self.warmup_step_s or 0))
        except LoadStopped:
            self.status, self.reason = "stopped", "the server shut down during start-up"
            logger.info("loading abandoned: the server is shutting down")
        except Exception as e:
            self.invalid = isinstance(e, (NonFiniteWeights, WarmupDiverged, DimensionMismatch,
                                          CheckpointError, ConfigError))
            self.status, self.reason = "failed", f"{type(e).__name__}: {e}"
            if self.invalid:
                logger.error("refusing to serve %s: %s", what, e)
            else:
                logger.error("could not load %s: %s", what, self.reason, exc_info=e)
            self.failed.set()

    async def drain(self, reason: str = "server shutting down", timeout: float = 3.0) -> None:
        """Stop accepting sessions, end every open one with `reason`, wait for them to go."""
        self.draining = True
        for sess in list(self.sessions):
            sess.abort(_End(Close.GOING_AWAY, "server shutting down", reason))
        deadline = time.monotonic() + timeout
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        """Stop loading and the engine (joins its thread, up to 30 s: off the event loop)."""
        self.stop_loading()
        if self.engine is not None:
            self.engine.stop()

    async def shutdown(self) -> None:
        """Drain the sessions, then stop the engine on a worker thread: the join must not hold
        up the event loop (other connections' closes, uvicorn's own shutdown)."""
        self.stop_loading()
        await self.drain()
        await asyncio.to_thread(self.stop)

    def health(self) -> dict[str, Any]:
        self._check_engine()
        lm = self.loaded.lm if self.loaded else None
        mimi = self.loaded.mimi if self.loaded else None
        return {
            "status": self.status,
            "model": self.model_info,
            "codec": {
                "sample_rate": int(mimi.sample_rate) if mimi else SAMPLE_RATE,
                "frame_rate": float(mimi.frame_rate) if mimi else FRAME_RATE,
                "frame_size": protocol.FRAME_SIZE,
                "codebooks": NUM_CODEBOOKS,
                "card": int(lm.card) if lm else None,
            },
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "sessions": {"active": self.engine.active if self.engine else 0,
                         "capacity": self.settings.max_sessions},
            "checkpoint": self.loaded.checkpoint_info if self.loaded else
            {"path": str(self.settings.checkpoint)},
            "warmup_step_ms": round(1000 * self.warmup_step_s, 3)
            if self.warmup_step_s is not None else None,
            "engine": self.engine.stats() if self.engine else None,
            "memory": memory_figures(self.device),
        }


def memory_figures(device: torch.device) -> dict[str, float]:
    """Resident memory of this process, glibc's heap in use and free inside it (where glibc: a
    leak grows the first, fragmentation the second), and the GPU's allocated and peak memory
    (MiB)."""
    out = {"rss_mb": round(rss_mb(), 1)}
    heap = native_heap()
    if heap is not None:
        out["heap_in_use_mb"] = round(heap.in_use_mb, 3)
        out["heap_free_mb"] = round(heap.free_mb, 3)
    if device.type == "cuda":
        out["gpu_allocated_mb"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
        out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def _credentials_ok(settings: ServeSettings, headers: Any, query: Any) -> bool:
    if not settings.api_key:
        return True
    given = headers.get("x-api-key") or query.get("api_key")
    auth = headers.get("authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return bool(given) and hmac.compare_digest(given.encode(), settings.api_key.encode())


def create_app(settings: ServeSettings, host: ModelHost | None = None,
               load_in_background: bool = True, cluster: Any = None) -> FastAPI:
    """The app. With `load_in_background`, loading starts at start-up on a thread (so /health
    can answer 503 meanwhile); otherwise the caller has loaded `host` already. With `cluster`
    (a replica of `serve --ray`: server.ray_serve.ClusterView), /health/cluster, /health/ready
    and /metrics answer for every replica of the deployment."""
    host = host or ModelHost(settings)

    async def lifespan(app: FastAPI):
        if load_in_background and host.status == "starting":
            host.start_loading()
        yield
        if cluster is not None:
            cluster.stop()
        await host.shutdown()

    # The interactive docs describe every route and would answer without the key: off with one.
    docs = {} if not settings.api_key else {"docs_url": None, "redoc_url": None,
                                            "openapi_url": None}
    app = FastAPI(title="moshi-ttt", lifespan=lifespan, **docs)
    app.state.host = host

    @app.get("/health")
    def health() -> JSONResponse:
        body = host.health()
        if not host.ready:
            body["reason"] = host.reason
        return JSONResponse(body, status_code=200 if host.ready else 503)

    @app.get("/health/live")
    def live() -> JSONResponse:
        """Whether restarting the process could help (a liveness probe): 200 while it answers
        and its model is loading, warming up or serving; 503 with the reason once the model
        has failed for good (the model thread died, or `max_step_failures` steps failed in a
        row: the device is likely broken, and only a new process gets a new one)."""
        host._check_engine()
        if host.status == "failed":
            return JSONResponse({"status": "failed", "model": host.status,
                                 "reason": host.reason}, status_code=503)
        return JSONResponse({"status": "alive", "model": host.status})

    @app.get("/health/ready")
    def ready() -> JSONResponse:
        """Whether a new session would be taken now (a readiness probe, or a load balancer
        choosing a replica): 200 with the free slots, else 503 with the reason and a
        Retry-After (seconds) so that a balancer sends the client elsewhere meanwhile. Under
        Ray: whether any replica of the deployment has a free slot."""
        if cluster is not None:
            return cluster_ready()
        active = host.engine.active if host.engine is not None else 0
        capacity = settings.max_sessions
        body = {"status": host.status, "active": active, "capacity": capacity,
                "free": max(0, capacity - active)}
        if host.draining:
            body.update(ready=False, reason="server shutting down")
        elif not host.ready or host.engine is None:
            body.update(ready=False, reason=f"model not ready ({host.status}): {host.reason}")
        elif active >= capacity:
            body.update(ready=False, reason=f"all {capacity} session slots are taken")
        else:
            return JSONResponse(dict(body, ready=True))
        retry = "30" if host.status in ("failed", "invalid") else "1"
        return JSONResponse(body, status_code=503, headers={"Retry-After": retry})

    @app.get("/metrics")
    def metrics() -> Response:
        if cluster is not None:
            return Response(cluster_metrics(cluster.snapshot()),
                            media_type="text/plain; version=0.0.4")
        return Response(host.metrics.render(), media_type="text/plain; version=0.0.4")

    if cluster is not None:
        from .ray_serve import cluster_health, cluster_metrics

        @app.get("/health/cluster")
        def health_cluster() -> JSONResponse:
            """Every replica: state, device, checkpoint, sessions; 503 while fewer replicas
            are up than were deployed."""
            code, body = cluster_health(cluster.snapshot())
            return JSONResponse(body, status_code=code)

        def cluster_ready() -> JSONResponse:
            code, body = cluster_health(cluster.snapshot())
            s = body["sessions"]
            out = {"status": body["status"], "replicas_up": body["replicas_up"], **s}
            if body["replicas_up"] and s["free"] > 0:
                return JSONResponse(dict(out, ready=True))
            reason = (f"all {s['capacity']} session slots of the cluster are taken"
                      if body["replicas_up"] else "no replica is up")
            return JSONResponse(dict(out, ready=False, reason=reason), status_code=503,
                                headers={"Retry-After": "1"})

    @app.websocket("/api/chat")
    async def chat(ws: WebSocket) -> None:
        await ws.accept()
        m = host.metrics

        async def refuse(code: int, reason: str, label: str) -> None:
            m.sessions_refused.labels(label).inc()
            await ws.send_bytes(protocol.error(reason))
            await ws.close(code=code, reason=label)

        origin = ws.headers.get("origin")
        if settings.allowed_origins and origin and origin not in settings.allowed_origins:
            return await refuse(Close.POLICY, f"origin {origin!r} is not allowed", "origin")
        if not _credentials_ok(settings, ws.headers, ws.query_params):
            return await refuse(Close.POLICY, "missing or wrong API key (X-API-Key header, "
                                "Authorization: Bearer, or ?api_key=)", "auth")
        try:
            mode = Mode(ws.query_params.get("mode", "opus"))
        except ValueError:
            return await refuse(Close.POLICY, f"unknown mode {ws.query_params.get('mode')!r}: "
                                f"expected one of {[x.value for x in Mode]}", "bad_request")
        try:
            telemetry = protocol.wants_telemetry(ws.query_params)
        except ValueError as e:
            return await refuse(Close.POLICY, str(e), "bad_request")
        if host.draining:
            return await refuse(Close.GOING_AWAY, "server shutting down", "shutdown")
        if not host.ready or host.engine is None:
            return await refuse(Close.TRY_AGAIN, f"model not ready ({host.status}): "
                                f"{host.reason}", "not_ready")
        sess = ChatSession(ws, host.engine, mode, m, host.loaded.tokenizer,
                           SessionLimits.from_settings(settings), host.loaded.lm.card,
                           {"checkpoint": host.loaded.checkpoint_info}, telemetry=telemetry)
        host.sessions.add(sess)
        try:
            await sess.run()
        finally:
            host.sessions.discard(sess)
            host.heap.session_ended()

    try:  # the installed `client` package's files, as a wheel ships them
        web = web_dir()
    except ResourceError as e:
        logger.warning("no browser client at /: %s", e)
    else:
        @app.get("/")
        def index() -> FileResponse:
            return FileResponse(web / "index.html")

        app.mount("/static", StaticFiles(directory=web), name="static")

    return app

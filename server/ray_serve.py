"""`moshi-ttt serve --ray`: the same FastAPI app as a Ray Serve deployment, one replica per GPU.

Each replica is a whole server (its own ModelHost, engine and `max_sessions` slots) that loads
and validates its model in its constructor, so a replica that fails validation fails the
deployment with the message, and no replica takes traffic before it is warm.

Routing. Ray counts a websocket as one ongoing request for as long as it is open. Each replica
takes `max_sessions + 1` of them: the extra one lets a connection that arrives when every slot
of the cluster is taken reach a replica and get the same refusal as a single server (ERROR +
close 1013), instead of Ray's HTTP 503 before the handshake. `LeastLoadedRouter` sends each
connection to the replica with the fewest open sessions of all (Ray's default samples two), so
the extra slot is only used when every replica is full. `max_queued_requests` bounds the wait
of connections beyond that.

Cluster view. Each replica reports its health summary and its Prometheus metrics to one named
actor, `ReplicaRegistry`, every `HEARTBEAT_S`; any replica answers `/health/cluster` and the
cluster-wide `/metrics` (every sample labelled `replica`) from it. A replica whose reports stop
is "down"; the cluster is healthy while at least the deployed number of replicas report.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray.serve.request_router import FIFOMixin, RequestRouter

from moshi_ttt.protocol import error

from .settings import ServeSettings

logger = logging.getLogger(__name__)

NAMESPACE = "moshi-ttt"
REGISTRY_NAME = "moshi-ttt-replicas"
APP_NAME = "moshi-ttt"  # the Serve application (and its one deployment)
HEARTBEAT_S = 1.0
DOWN_AFTER_S = 4.0  # no report for this long: the replica is down
FORGET_AFTER_S = 120.0  # a down replica is dropped from the view after this


class LeastLoadedRouter(FIFOMixin, RequestRouter):
    """Every running replica is a candidate at once: Ray's router then takes, among those whose
    ongoing requests are below the limit, the one with the fewest (see the module's doc)."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return [list(candidate_replicas)] if candidate_replicas else []


REPLICA_LOST_CODE = 1012  # "service restart": the client may reconnect (to a survivor)
REPLICA_LOST_REASON = ("the replica serving this session stopped; reconnect to continue on "
                       "another replica (this session's memory is lost)")
PROXY_MIDDLEWARES = "server.ray_serve:proxy_middlewares"
#: Ray Serve's own settings, for its controller (and the proxies it starts), where the
#: environment of `serve --ray` does not set them (a value set only on a cluster's own
#: `ray start` is overridden). A proxy that is not ready within Ray's 5 s readiness check, three
#: times running, is killed and the deployment fails to start: on a busy node (measured: the
#: Ray tests beside four other busy processes on 2 cores) the proxy's start-up takes longer.
RAY_SERVE_ENV_DEFAULTS = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"}


class ReplicaLossClose:
    """ASGI middleware in Ray's HTTP proxy: a websocket whose replica dies gets ERROR + close
    1012 instead of a dropped connection.

    When the replica serving an accepted websocket dies, Ray's proxy ends the request without
    sending anything (the client would see 1006, no reason). This wraps the proxy's app: if the
    app returns (or raises) after `websocket.accept` with neither side having closed, it sends
    the protocol's ERROR message and closes with `REPLICA_LOST_CODE`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        seen = {"accepted": False, "ended": False}

        async def watched_send(message):
            if message["type"] == "websocket.accept":
                seen["accepted"] = True
            elif message["type"] == "websocket.close":
                seen["ended"] = True
            await send(message)

        async def watched_receive():
            message = await receive()
            if message["type"] == "websocket.disconnect":
                seen["ended"] = True
            return message

        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            if seen["accepted"] and not seen["ended"]:
                logger.warning("a websocket's replica stopped: closing it with %d",
                               REPLICA_LOST_CODE)
                try:
                    await send({"type": "websocket.send", "bytes": error(REPLICA_LOST_REASON)})
                    await send({"type": "websocket.close", "code": REPLICA_LOST_CODE,
                                "reason": "replica stopped"})
                except Exception:  # the client went away meanwhile: nothing left to tell
                    logger.debug("could not close a websocket whose replica stopped",
                                 exc_info=True)


def proxy_middlewares() -> list:
    """What Ray's proxy wraps its app in (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, set on the
    Serve controller by `start_deployment`; proxies inherit it)."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLossClose)]


class ReplicaRegistry:
    """The latest report of every replica (a Ray actor: one per deployment)."""

    def __init__(self, expected: int):
        self.expected = expected
        self.reports: dict[str, dict[str, Any]] = {}

    def deployed(self, expected: int) -> None:
        """A (re)deployment of `expected` replicas. The actor is detached: one left by an
        earlier run (a driver killed before it removed it, a redeploy on a cluster) is reused,
        and its constructor's count would be the old deployment's."""
        self.expected = expected

    def report(self, replica: str, summary: dict[str, Any], metrics: bytes) -> None:
        self.reports[replica] = {"summary": summary, "metrics": metrics, "at": time.time()}

    def forget(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        for rid in [r for r, v in self.reports.items() if now - v["at"] > FORGET_AFTER_S]:
            del self.reports[rid]
        return {"expected": self.expected, "now": now, "reports": dict(self.reports)}


def cluster_health(snap: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of /health/cluster from a registry snapshot."""
    replicas, active, capacity, alive = [], 0, 0, 0
    for rid, rep in sorted(snap["reports"].items()):
        s = rep["summary"]
        age = snap["now"] - rep["at"]
        up = age <= DOWN_AFTER_S and s["status"] == "ok"
        alive += up
        if up:
            active += s["active"]
            capacity += s["capacity"]
        replicas.append({"replica": rid, "state": "up" if up else "down",
                         "last_report_s": round(age, 2), **s})
    ok = alive >= snap["expected"]
    body = {"status": "ok" if ok else ("degraded" if alive else "down"),
            "replicas_expected": snap["expected"], "replicas_up": alive,
            "sessions": {"active": active, "capacity": capacity,
                         "free": max(0, capacity - active)},
            "replicas": replicas}
    if not ok:
        body["reason"] = f"{alive} of {snap['expected']} replicas are up"
    return (200 if ok else 503), body


def cluster_metrics(snap: dict[str, Any]) -> bytes:
    """Every replica's Prometheus metrics in one exposition, each sample labelled `replica`
    (families merged so that each appears once, as the text format requires). Only replicas
    that are reporting: a dead one's last gauges (its sessions, its capacity) would be added
    to its replacement's for the minutes it stays listed in /health/cluster."""
    families: dict[str, Metric] = {}
    for rid, rep in sorted(snap["reports"].items()):
        if snap["now"] - rep["at"] > DOWN_AFTER_S:
            continue
        for fam in text_string_to_metric_families(rep["metrics"].decode()):
            merged = families.setdefault(fam.name, Metric(fam.name, fam.documentation,
                                                          fam.type, fam.unit))
            for s in fam.samples:
                merged.add_sample(s.name, dict(s.labels, replica=rid), s.value, s.timestamp,
                                  s.exemplar)

    class _Collector:
        def collect(self):
            return list(families.values())

    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector())
    return generate_latest(reg)


class ClusterView:
    """A replica's link to the registry: its reports (on a thread) and the cluster's figures."""

    def __init__(self, registry: Any, replica_id: str):
        self.registry = registry
        self.replica_id = replica_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, host: Any) -> None:
        """Report `host` every HEARTBEAT_S (a loaded host: build_replica_app's)."""
        import ray

        fixed = {"capacity": host.settings.max_sessions, "device": str(host.device),
                 "node": ray.get_runtime_context().get_node_id(),
                 "checkpoint": host.loaded.ref.id}

        def loop() -> None:
            while not self._stop.is_set():
                ready = host.ready  # a dead model thread turns it false (and the status failed)
                summary = dict(fixed, status=host.status,
                               active=host.engine.active if ready else 0)
                try:
                    ray.get(self.registry.report.remote(self.replica_id, summary,
                                                        host.metrics.render()), timeout=5)
                except Exception as e:  # the registry gone (shutdown): keep serving
                    logger.warning("replica %s: report failed: %s", self.replica_id, e)
                self._stop.wait(HEARTBEAT_S)

        self._thread = threading.Thread(target=loop, name="moshi-ttt-report", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.registry.forget.remote(self.replica_id)
        except Exception:
            pass

    def snapshot(self) -> dict[str, Any]:
        import ray

        return ray.get(self.registry.snapshot.remote(), timeout=10)


def build_replica_app(settings_json: dict[str, Any]):
    """Run on each replica by Ray Serve: load, validate and warm the model (raising, with the
    reason, if it fails: the deployment then fails), then the app with the cluster routes."""
    import ray
    from ray import serve

    from .app import ModelHost, create_app

    settings = ServeSettings.model_validate(settings_json)
    replica = serve.get_replica_context().replica_id.unique_id
    host = ModelHost(settings)
    host.load()
    if not host.ready:
        raise RuntimeError(f"replica {replica} refuses to serve: {host.reason}")
    view = ClusterView(ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE), replica)
    view.start(host)
    logger.info("replica %s ready on %s: %d session slots", replica, host.device,
                settings.max_sessions)
    return create_app(settings, host, load_in_background=False, cluster=view)


def open_registry(replicas: int) -> Any:
    """The deployment's registry actor, created or reused (see `ReplicaRegistry.deployed`),
    counting `replicas` from now on."""
    import ray

    Registry = ray.remote(num_cpus=0)(ReplicaRegistry)
    registry = Registry.options(name=REGISTRY_NAME, namespace=NAMESPACE, lifetime="detached",
                                get_if_exists=True).remote(replicas)
    ray.get(registry.deployed.remote(replicas))
    return registry


def deployment_options(settings: ServeSettings, replicas: int, gpu: bool) -> dict[str, Any]:
    """Ray Serve options of the deployment (see the module's doc for the limits)."""
    from ray.serve.config import RequestRouterConfig

    return {
        "name": APP_NAME,
        "num_replicas": replicas,
        "max_ongoing_requests": settings.max_sessions + 1,
        "max_queued_requests": replicas,
        "ray_actor_options": {"num_gpus": 1} if gpu else {"num_cpus": 0},
        "request_router_config": RequestRouterConfig(
            request_router_class=f"{__name__}:LeastLoadedRouter"),
        "health_check_period_s": 2.0,
    }


def controller_env() -> dict[str, str]:
    """The environment of Ray Serve's controller: our proxy middlewares, and Ray Serve's
    settings from this process's environment where set and not empty, else
    `RAY_SERVE_ENV_DEFAULTS` (an empty value would stop the controller at import, restarting
    without end)."""
    env = {k: os.environ.get(k) or v for k, v in RAY_SERVE_ENV_DEFAULTS.items()}
    env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = PROXY_MIDDLEWARES
    return env


def start_deployment(settings: ServeSettings, replicas: int, ray_address: str | None = None,
                     num_cpus: int | None = None) -> None:
    """Start (or join) Ray, the registry and the deployment; returns once every replica is
    ready. Raises RuntimeError with the replica's reason when one fails to start."""
    import ray
    from ray import serve

    local = ray_address is None and not ray.is_initialized()
    if not ray.is_initialized():
        ray.init(address=ray_address, namespace=NAMESPACE, include_dashboard=False,
                 num_cpus=num_cpus, log_to_driver=True)
    # One GPU per replica when the setting asks for CUDA, or leaves it to `auto` on a cluster
    # that has GPUs (the driver may run on a CPU-only head node). Ray shows each replica its
    # GPU as cuda:0.
    dev = settings.device
    gpus = int(ray.cluster_resources().get("GPU", 0))
    gpu = dev.startswith("cuda") or (dev == "auto" and gpus > 0)
    if gpu and gpus < replicas:  # Ray would wait, without end, for GPUs to place them on
        if local:  # nothing adds GPUs to a Ray started here
            raise RuntimeError(f"--replicas {replicas} needs {replicas} GPUs (one per "
                               f"replica); this machine has {gpus}")
        logger.warning("%d replicas need %d GPUs (one each), the cluster has %d: waiting for "
                       "nodes to join (Ctrl-C stops)", replicas, replicas, gpus)
    open_registry(replicas)
    serve.start(http_options={"host": settings.host, "port": settings.port},
                controller_options={"runtime_env": {"env_vars": controller_env()}})
    settings_json = settings.model_dump(mode="json")

    def builder():  # Ray Serve calls a zero-argument function on each replica
        return build_replica_app(settings_json)

    ingress = serve.deployment(serve.ingress(builder)(),
                               **deployment_options(settings, replicas, gpu))
    try:
        serve.run(ingress.bind(), name=APP_NAME, route_prefix="/",
                  logging_config={"enable_access_log": False})
    except Exception as e:  # the replica's reason is in the deployment's status message
        text = str(e)
        try:
            text += "\n" + serve.status().applications[APP_NAME].deployments[
                APP_NAME].message
        except Exception:
            pass
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "refuses to serve" in ln),
                      lines[-1] if lines else repr(e))
        raise RuntimeError(reason[reason.find("replica "):] if "refuses to serve" in reason
                           else reason) from None
    logger.info("Ray Serve deployment ready: %d replica(s) x %d sessions at http://%s:%s/",
                replicas, settings.max_sessions, settings.host, settings.port)


def stop_deployment() -> None:
    """Remove this deployment and its registry, and Serve itself once no other application is
    left on it (`serve.shutdown` deletes every application of the cluster: on a shared
    cluster, other teams' too); then leave Ray (a local Ray started here stops with it)."""
    import ray
    from ray import serve

    if not ray.is_initialized():  # stopped before Ray was started: nothing to remove
        return
    try:
        try:
            serve.delete(APP_NAME)
            if not [a for a in serve.status().applications if a != APP_NAME]:
                serve.shutdown()
        except Exception as e:  # Serve never started (stopped during start-up)
            logger.warning("could not remove the Serve deployment: %s", e)
        try:
            ray.kill(ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE))
        except ValueError:  # never started
            pass
    finally:
        ray.shutdown()


def serve_ray(settings: ServeSettings, replicas: int, ray_address: str | None = None) -> int:
    """`moshi-ttt serve --ray`: the deployment until SIGTERM/Ctrl-C; the exit status as
    `serve`'s (0 stopped, 2 invalid, 1 failed to start)."""
    from .main import (
        EXIT_INVALID, EXIT_LOAD_FAILED, EXIT_OK, invalid_errors, preflight, resolve_checkpoint,
    )

    if settings.device.startswith("cuda:") and settings.device != "cuda:0":
        logger.error("refusing to start: --device %s: under --ray each replica sees its one "
                     "GPU as cuda:0; use --device cuda or auto", settings.device)
        return EXIT_INVALID
    try:
        settings = resolve_checkpoint(settings)
        preflight(settings)  # header-only, here: a bad checkpoint never starts Ray
    except invalid_errors() as e:
        logger.error("refusing to start: %s", e)
        return EXIT_INVALID
    stop = threading.Event()

    def during_start(signum: int, frame: Any) -> None:
        # Starting can wait without end (replicas Ray cannot place: more than the GPUs there
        # are); a signal then must stop it, not wait for it.
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, during_start) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            start_deployment(settings, replicas, ray_address)
        except RuntimeError as e:
            logger.error("the deployment failed to start: %s", e)
            stop_deployment()
            return EXIT_INVALID if "refuses to serve" in str(e) else EXIT_LOAD_FAILED
        except KeyboardInterrupt:
            logger.info("stopped during start-up: removing the deployment")
            stop_deployment()
            return EXIT_OK
        for s in previous:
            signal.signal(s, lambda *_: stop.set())
        stop.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    logger.info("stopping the deployment")
    stop_deployment()
    return EXIT_OK

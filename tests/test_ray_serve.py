"""`serve --ray`: the server as a Ray Serve deployment of two CPU replicas with 2 slots each.

Ray (local, 2 CPUs) is started and stopped by the module's fixture. Checked: sessions spread
over the replicas, the cluster's 5th session gets the single server's refusal (ERROR + 1013),
a freed slot is reused, greedy outputs equal a single server's, /health/cluster and
/health/ready and the replica-labelled /metrics, and a killed replica: its sessions end, new
ones go to the survivor, Ray starts a replacement. Prints the proxy's added round trip and the
deployment's start-up time.
"""

from __future__ import annotations

import socket
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("ray.serve")

from conftest import CONFIGS  # noqa: E402
from fixtures import make_tiny_base  # noqa: E402
from moshi_ttt.protocol import Kind  # noqa: E402
from serving import Peer, ServerThread, get_json, settings, user_codes  # noqa: E402

SLOTS, REPLICAS = 2, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("ray"))


@pytest.fixture(scope="module")
def cluster(base):
    from server.ray_serve import start_deployment, stop_deployment

    port = _free_port()
    s = settings(base, max_sessions=SLOTS, port=port, cpu_threads=1)
    t0 = time.perf_counter()
    start_deployment(s, REPLICAS, num_cpus=2)
    started = time.perf_counter() - t0
    print(f"\n[ray] 2-replica deployment ready in {started:.1f} s (Ray start included)")
    url = f"http://127.0.0.1:{port}"
    _wait(lambda: get_json(url + "/health/cluster")[1].get("replicas_up") == REPLICAS, 30)
    try:
        yield url
    finally:
        stop_deployment()


def _wait(pred, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached in {timeout} s")
        time.sleep(0.2)


def _ws(url: str, **q) -> str:
    query = "&".join(f"{k}={v}" for k, v in dict(q, mode="tokens").items())
    return url.replace("http://", "ws://") + "/api/chat?" + query


def _active(url: str) -> dict[str, int]:
    _, body = get_json(url + "/health/cluster")
    return {r["replica"]: r["active"] for r in body["replicas"] if r["state"] == "up"}


def _settled(url: str, want: list[int]) -> dict[str, int]:
    """Wait until the replicas' reported active counts, sorted, equal `want`."""
    _wait(lambda: sorted(_active(url).values()) == want, 10)
    return _active(url)


def test_sessions_spread_fifth_refused_slot_reused(cluster):
    peers = []
    try:
        for i in range(SLOTS * REPLICAS):
            p = Peer(_ws(cluster)).__enter__()
            peers.append(p)
            assert not p.closed and p.of(Kind.HANDSHAKE), f"session {i} refused: {p.errors}"
        _settled(cluster, [SLOTS] * REPLICAS)  # 2 + 2: spread over both replicas
        code, ready = get_json(cluster + "/health/ready")
        assert code == 503 and ready["free"] == 0 and "taken" in ready["reason"]
        with Peer(_ws(cluster)) as fifth:
            fifth.wait_closed()
            assert fifth.close_code == 1013, (fifth.close_code, fifth.errors)
            assert any("slots are taken" in e for e in fifth.errors), fifth.errors
        peers.pop(0).__exit__(None, None, None)
        _settled(cluster, [SLOTS - 1, SLOTS])
        assert get_json(cluster + "/health/ready")[0] == 200
        with Peer(_ws(cluster)) as again:  # the freed slot
            assert not again.closed and again.of(Kind.HANDSHAKE), again.errors
            _settled(cluster, [SLOTS, SLOTS])
    finally:
        for p in peers:
            p.__exit__(None, None, None)
    _settled(cluster, [0] * REPLICAS)


def test_greedy_outputs_equal_a_single_server(cluster, base):
    codes = user_codes(24, 7)
    with Peer(_ws(cluster)) as p:
        p.send_codes(codes)
        via_ray = p.wait_codes(len(codes))
    with ServerThread(settings(base, max_sessions=SLOTS, cpu_threads=1)) as srv:
        with Peer(srv.url(mode="tokens")) as q:
            q.send_codes(codes)
            direct = q.wait_codes(len(codes))
    assert via_ray.shape == (24, 9)
    np.testing.assert_array_equal(via_ray, direct)


def test_cluster_health_and_labelled_metrics(cluster, base):
    code, body = get_json(cluster + "/health/cluster")
    assert code == 200 and body["status"] == "ok"
    assert body["replicas_expected"] == REPLICAS == body["replicas_up"]
    assert body["sessions"]["capacity"] == SLOTS * REPLICAS
    ids = {r["replica"] for r in body["replicas"]}
    assert len(ids) == REPLICAS
    for r in body["replicas"]:
        assert r["device"] == "cpu" and r["capacity"] == SLOTS and r["checkpoint"]
    with urllib.request.urlopen(cluster + "/metrics", timeout=30) as r:
        text = r.read().decode()
    caps = [ln for ln in text.splitlines() if ln.startswith("moshi_ttt_sessions_capacity{")]
    assert {ln.split('replica="')[1].split('"')[0] for ln in caps} == ids
    assert all(ln.endswith(f" {float(SLOTS)}") for ln in caps)
    assert text.count("# TYPE moshi_ttt_sessions_capacity ") == 1  # one family, all replicas


def test_proxy_round_trip_figure(cluster, base):
    """Not a timed test: prints p50/p99 of a frame's round trip through Ray's proxy and
    directly, on the same model (the README's figure)."""
    def round_trips(url: str, n: int = 60) -> np.ndarray:
        out = []
        with Peer(url) as p:
            for i in range(n):
                t = time.perf_counter()
                p.send_codes(user_codes(1, i))
                p.wait_codes(i + 1)
                out.append(time.perf_counter() - t)
        return 1000 * np.array(out[5:])

    ray_ms = round_trips(_ws(cluster))
    with ServerThread(settings(base, max_sessions=SLOTS, cpu_threads=1)) as srv:
        direct_ms = round_trips(srv.url(mode="tokens"))
    print(f"\n[ray] frame round trip p50/p99: via Ray proxy {np.median(ray_ms):.1f}/"
          f"{np.percentile(ray_ms, 99):.1f} ms, direct {np.median(direct_ms):.1f}/"
          f"{np.percentile(direct_ms, 99):.1f} ms")
    assert np.isfinite(ray_ms).all() and len(ray_ms) == 55


def test_killed_replica_ends_its_sessions_survivor_serves_ray_restarts(cluster):
    """Last in the module: it kills one replica's process."""
    import ray

    a, b = Peer(_ws(cluster)).__enter__(), Peer(_ws(cluster)).__enter__()
    try:
        before = _settled(cluster, [1, 1])
        victim = sorted(before)[0]
        actors = [x for x in ray.util.list_named_actors(all_namespaces=True)
                  if victim in x["name"]]
        assert actors, ray.util.list_named_actors(all_namespaces=True)
        handle = ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])
        ray.kill(handle, no_restart=True)
        _wait(lambda: a.closed or b.closed, 30)
        dead, alive = (a, b) if a.closed else (b, a)
        # the proxy's middleware says why (ERROR + 1012), not a dropped connection (1006)
        assert dead.close_code == 1012, (dead.close_code, dead.errors)
        assert any("replica serving this session stopped" in e for e in dead.errors), dead.errors
        alive.send_codes(user_codes(4, 1))
        assert len(alive.wait_codes(4)) == 4 and not alive.closed
        with Peer(_ws(cluster)) as new:  # goes to the survivor (one free slot there)
            assert not new.closed and new.of(Kind.HANDSHAKE), new.errors
        code, body = get_json(cluster + "/health/cluster")
        assert code == 503 or body["replicas_up"] == REPLICAS  # down, or already replaced
        # the victim's reports stop (down), Ray starts a replacement: the cluster is whole again
        _wait(lambda: victim not in _active(cluster), 30)
        _wait(lambda: get_json(cluster + "/health/cluster")[0] == 200, 120)
        ids = set(_active(cluster))
        assert victim not in ids and len(ids) == REPLICAS
    finally:
        a.__exit__(None, None, None)
        b.__exit__(None, None, None)


def test_serve_ray_refuses_a_bad_checkpoint_before_starting_ray(tmp_path):
    """The command's own checks run first: a missing checkpoint exits 2 in one line."""
    import subprocess
    import sys

    from serving import serve_env

    r = subprocess.run([sys.executable, "-m", "moshi_ttt.cli", "serve", "--ray", "--replicas",
                        "2", "--checkpoint", str(tmp_path / "nothing"), "--port", "0"],
                       capture_output=True, text=True, timeout=120, env=serve_env())
    assert r.returncode == 2, r.stderr[-2000:]
    assert "refusing to start" in r.stderr and "nothing" in r.stderr
    assert "Started a local Ray instance" not in r.stderr


@pytest.mark.parametrize("ending", ["app_returns", "app_raises", "app_closes", "client_leaves"])
def test_proxy_middleware_closes_only_a_websocket_left_open(ending):
    """ReplicaLossClose alone (no Ray): ERROR + 1012 exactly when the app ended an accepted
    websocket that neither side closed (what Ray's proxy does when the replica dies)."""
    import asyncio

    from moshi_ttt.protocol import Kind
    from server.ray_serve import REPLICA_LOST_CODE, ReplicaLossClose

    sent: list[dict] = []

    async def app(scope, receive, send):
        await send({"type": "websocket.accept"})
        if ending == "app_closes":
            await send({"type": "websocket.close", "code": 1000})
        elif ending == "client_leaves":
            assert (await receive())["type"] == "websocket.disconnect"
        elif ending == "app_raises":
            raise RuntimeError("the replica died")

    async def receive():
        return {"type": "websocket.disconnect", "code": 1001}

    async def send(message):
        sent.append(message)

    async def run():
        try:
            await ReplicaLossClose(app)({"type": "websocket"}, receive, send)
        except RuntimeError:
            assert ending == "app_raises"

    asyncio.run(run())
    closes = [m for m in sent if m["type"] == "websocket.close"]
    if ending in ("app_returns", "app_raises"):
        assert closes == [sent[-1]] and closes[0]["code"] == REPLICA_LOST_CODE
        error = sent[-2]["bytes"]
        assert error[0] == Kind.ERROR and b"replica serving this session stopped" in error
    else:
        assert len(closes) == (ending == "app_closes") and len(sent) == 1 + len(closes)


# -- without a Ray cluster: the deployment's bookkeeping --------------------------------------

def test_cluster_metrics_leave_out_a_replica_that_stopped_reporting():
    """A dead replica's last gauges stayed in /metrics for FORGET_AFTER_S (2 min) beside its
    replacement's: sum(moshi_ttt_sessions_active) counted its lost sessions, and capacity
    counted its slots twice. /health/cluster still lists it (down)."""
    from server.metrics import ServerMetrics
    from server.ray_serve import DOWN_AFTER_S, cluster_health, cluster_metrics

    live, dead = ServerMetrics(), ServerMetrics()
    for m, active in ((live, 1), (dead, 2)):
        m.sessions_active.set(active)
        m.sessions_capacity.set(SLOTS)
    now = time.time()
    summary = {"status": "ok", "active": 1, "capacity": SLOTS}
    snap = {"expected": 2, "now": now, "reports": {
        "live": {"summary": summary, "metrics": live.render(), "at": now - 1},
        "dead": {"summary": summary, "metrics": dead.render(), "at": now - DOWN_AFTER_S - 1}}}
    text = cluster_metrics(snap).decode()
    active = [ln for ln in text.splitlines() if ln.startswith("moshi_ttt_sessions_active{")]
    assert active == ['moshi_ttt_sessions_active{replica="live"} 1.0'], active
    assert 'replica="dead"' not in text
    code, body = cluster_health(snap)
    assert code == 503 and [r["state"] for r in body["replicas"]] == ["down", "up"]


def test_a_registry_left_by_an_earlier_deployment_counts_the_replicas_now_deployed(monkeypatch):
    """The registry is a detached actor fetched with get_if_exists: one left by an earlier run
    (8 replicas) kept expecting 8 when 16 were deployed (/health/cluster 200 with half of them
    up). `open_registry` sets the count of the deployment now."""
    import ray

    from server import ray_serve
    from server.ray_serve import ReplicaRegistry

    left = ReplicaRegistry(8)
    left.report("old", {"status": "ok", "active": 0, "capacity": 2}, b"")

    class Handle:  # ray's actor handle over the existing actor: method.remote(...)
        def __getattr__(self, name):
            return type("M", (), {"remote": staticmethod(getattr(left, name))})

    class ActorClass:  # what get_if_exists does: the constructor's argument is ignored
        def options(self, **kw):
            assert kw["get_if_exists"] and kw["lifetime"] == "detached"
            return type("O", (), {"remote": staticmethod(lambda expected: Handle())})

    monkeypatch.setattr(ray, "remote", lambda **kw: (lambda cls: ActorClass()))
    monkeypatch.setattr(ray, "get", lambda x, **kw: x)
    ray_serve.open_registry(16)
    snap = left.snapshot()
    assert snap["expected"] == 16 and "old" in snap["reports"]
    assert ray_serve.cluster_health(snap)[0] == 503  # 1 up of 16


def test_serve_ray_stops_on_a_signal_during_start_up(monkeypatch):
    """A deployment Ray cannot place (more replicas than GPUs) waits without end in
    serve.run; SIGTERM or Ctrl-C only set an event that was read after the start, so the
    command could not be stopped. Now a signal during start-up removes what was started and
    exits 0; the process's own handlers are back afterwards."""
    import os
    import signal

    import server.main
    from server import ray_serve
    from server.settings import ServeSettings

    calls: list[str] = []

    def start(settings, replicas, ray_address=None):
        calls.append("start")
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # serve.run waiting for its replicas
            time.sleep(0.01)
        calls.append("started")

    monkeypatch.setattr(ray_serve, "start_deployment", start)
    monkeypatch.setattr(ray_serve, "stop_deployment", lambda: calls.append("stop"))
    monkeypatch.setattr(server.main, "resolve_checkpoint", lambda s: s)
    monkeypatch.setattr(server.main, "preflight", lambda s: {})
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    t0 = time.monotonic()
    try:
        code = ray_serve.serve_ray(
            ServeSettings(device="cpu", random_config=CONFIGS / "tiny.yaml"), 2)
    finally:
        after = {s: signal.getsignal(s) for s in before}
        for s, h in before.items():
            signal.signal(s, h)
    assert code == 0 and calls == ["start", "stop"], calls
    assert time.monotonic() - t0 < 4
    assert after == before


def test_a_local_ray_refuses_more_gpu_replicas_than_gpus(monkeypatch):
    """`--replicas 8 --device cuda` on a machine with 4 GPUs waited forever (Ray places one
    replica per GPU; nothing adds GPUs to a Ray started here): now one line, before Serve."""
    import ray
    from ray import serve

    from server.ray_serve import start_deployment
    from server.settings import ServeSettings

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 4.0})
    monkeypatch.setattr(serve, "start", lambda **kw: pytest.fail("Serve started"))
    with pytest.raises(RuntimeError, match=r"--replicas 8 needs 8 GPUs \(one per replica\); "
                                           r"this machine has 4"):
        start_deployment(ServeSettings(device="cuda", random_config=CONFIGS / "tiny.yaml"),
                         8)


def test_stopping_leaves_other_applications_on_a_shared_cluster(monkeypatch):
    """`serve.shutdown` deletes every application of the cluster: stopping `serve --ray
    --ray-address auto` took other teams' Serve applications down with it. Now only this one,
    and Serve itself only when nothing else is left."""
    import ray
    from ray import serve

    from server.ray_serve import stop_deployment

    APP_NAME = "moshi-ttt"
    for others, shut in ((["their-app"], False), ([], True)):
        calls: list[str] = []
        apps = {APP_NAME: object(), **{a: object() for a in others}}

        def delete(name, **kw):
            calls.append(f"delete {name}")
            apps.pop(name)

        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        monkeypatch.setattr(serve, "delete", delete)
        monkeypatch.setattr(serve, "status",
                            lambda: type("S", (), {"applications": dict(apps)})())
        monkeypatch.setattr(serve, "shutdown", lambda: calls.append("shutdown"))
        monkeypatch.setattr(ray, "get_actor", lambda *a, **kw: "registry")
        monkeypatch.setattr(ray, "kill", lambda actor: calls.append(f"kill {actor}"))
        monkeypatch.setattr(ray, "shutdown", lambda: calls.append("disconnect"))
        stop_deployment()
        assert calls == [f"delete {APP_NAME}", *(["shutdown"] if shut else []),
                         "kill registry", "disconnect"], calls


def test_serve_controller_gets_a_proxy_readiness_timeout_for_busy_nodes(monkeypatch):
    """Ray kills a proxy that is not ready within 5 s, three checks running, and the deployment
    fails to start: it did on this machine with the suite beside four other processes (setup
    errors of every cluster test). The controller now gets 60 s unless the caller's environment
    sets Ray's own variable (an empty one would stop the controller at import), and still gets
    the proxy middlewares."""
    import ray
    from ray import serve

    from server import ray_serve
    from server.settings import ServeSettings

    class Started(Exception):
        pass

    seen: list[dict] = []

    def start(**kw):
        seen.append(kw["controller_options"]["runtime_env"]["env_vars"])
        raise Started

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray_serve, "open_registry", lambda n: None)
    monkeypatch.setattr(serve, "start", start)
    settings = ServeSettings(device="cpu", random_config=CONFIGS / "tiny.yaml")
    for env, want in ((None, "60"), ("12.5", "12.5"), ("", "60")):
        if env is None:
            monkeypatch.delenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", raising=False)
        else:
            monkeypatch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", env)
        with pytest.raises(Started):
            ray_serve.start_deployment(settings, 2)
        assert seen[-1] == {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": want,
                            "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH":
                                "server.ray_serve:proxy_middlewares"}, seen[-1]

"""The benchmarks' figures and inputs: what `bench serve`, `bench train`, `bench ttt` and
`python -m server.soak` report when a session fails, when a run is short, when the package is
installed without the checkout's top-level configs/, and how they take bad flags."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO


def _fake_server(refuse: bool):
    """A websocket server speaking just enough of the protocol: METADATA, then an answer to
    each frame after the first, then after 3 frames ERROR + close 1008 (an input overflow);
    with `refuse`, ERROR + close 1013 before METADATA (a full server)."""
    import websockets

    from moshi_ttt import protocol
    from moshi_ttt.protocol import Kind

    async def handler(ws):
        if refuse:
            await ws.send(protocol.error("all 1 session slots are taken"))
            await ws.close(1013, "capacity")
            return
        await ws.send(protocol.metadata({"ok": True}))
        n = 0
        async for _ in ws:
            n += 1
            if n == 3:
                await ws.send(protocol.error("4 s of input ahead of the model"))
                await ws.close(1008, "input_overflow")
                return
            codes = np.full((1, 9), -1 if n == 1 else 0, "<i4")  # the first: not generated
            await ws.send(bytes([Kind.CODES]) + codes.tobytes())

    return websockets.serve(handler, "127.0.0.1", 0)


@pytest.mark.parametrize("refuse", [False, True])
def test_bench_serve_client_ended_by_the_server_is_reported_not_a_crash(refuse):
    """Before: the client's send raised ConnectionClosedError out of asyncio.gather, and
    `bench serve` stopped with a traceback, losing the run (an overloaded server, the case a
    sizing run looks for). Now each session reports why it ended, with the frames it had."""
    from server import loadtest

    async def run():
        async with asyncio.timeout(30):  # the old code raised, then hung closing the server
            async with _fake_server(refuse) as srv:
                port = srv.sockets[0].getsockname()[1]
                return await loadtest._load(f"ws://127.0.0.1:{port}/api/chat", 2, 1.0,
                                            "tokens")

    results = asyncio.run(run())
    r = loadtest.load_result(results, {}, {}, 2, 1.0, "tokens")
    assert len(r.errors) == 2
    if refuse:
        assert all("slots are taken" in e for e in r.errors), r.errors
        assert r.frames_sent == r.frames_answered == 0
        assert r.rtt_ms_p50 is None and r.rtt_ms_p99 is None
    else:
        assert all("ahead of the model" in e for e in r.errors), r.errors
        assert r.frames_sent == 6 and r.frames_answered == 2  # frame 1 of each answered
        assert r.rtt_ms_p50 is not None and 0 < r.rtt_ms_p50 < 80
    json.dumps(r.__dict__, allow_nan=False)  # no NaN: the file is valid JSON


def test_bench_serve_json_has_no_nan_without_answers():
    """`--seconds 0.1` sends one frame, which no answer follows: the round trips were NaN,
    written as `NaN` into --json-out (not JSON); now null."""
    from dataclasses import asdict

    from server.loadtest import load_result

    t = 100.0
    r = load_result([{"sent": [t], "answered": [], "error": None}], {},
                    {"engine": {"step_ms_p50": 20.0, "step_ms_p99": 30.0}}, 1, 0.1, "pcm")
    assert r.frames_sent == 1 and r.frames_answered == 0 and r.frames_late == 0
    assert r.rtt_ms_p50 is None and r.real_time_factor == 0.25
    assert json.loads(json.dumps([asdict(r)], allow_nan=False))[0]["rtt_ms_p99"] is None
    # late frames: answers to frames 1 and 2, at 50 and 81 ms; the 80 ms bound is exclusive
    r = load_result([{"sent": [t, t + 0.08, t + 0.16], "answered": [t + 0.13, t + 0.241],
                      "error": None}], {}, {}, 1, 0.24, "pcm")
    assert r.frames_late == 1 and r.rtt_ms_p50 == pytest.approx(65.5)


def test_bench_serve_server_ignores_a_deployments_key_and_tls_in_the_environment(
        tmp_path, monkeypatch):
    """A shell that exports the deployment's MOSHI_TTT_API_KEY (or TLS files) made the
    benchmark's own loopback server refuse its key-less clients (or serve https where the
    benchmark polls http for 900 s): the child server does not take them."""
    from server.loadtest import ServerProcess

    deployment = ("MOSHI_TTT_API_KEY", "MOSHI_TTT_ALLOWED_ORIGINS", "MOSHI_TTT_SSL_CERTFILE",
                  "MOSHI_TTT_SSL_KEYFILE", "MOSHI_TTT_HOST")
    for name in deployment:
        monkeypatch.setenv(name.lower() if name.endswith("HOST") else name, "x")
    seen = tmp_path / "env.txt"
    srv = ServerProcess([], 1, [], tmp_path / "log.txt")
    monkeypatch.setenv("MOSHI_TTT_BATCH_CLOCK", "tick")  # a benchmark setting: passed on
    srv.cmd = [sys.executable, "-c", "import os, sys; open(sys.argv[1], 'w').write("
               "' '.join(k.upper() for k in os.environ if k.upper().startswith('MOSHI_TTT_')))",
               str(seen)]
    srv._wait_ready = lambda: srv  # a stand-in child: nothing to wait for
    with srv:
        srv.proc.wait(timeout=60)
    passed = set(seen.read_text().split())
    assert "MOSHI_TTT_BATCH_CLOCK" in passed and not passed & set(deployment), passed


def test_state_bytes_of_the_7b_config_from_an_install_without_the_checkout(tmp_path):
    """`bench ttt` read configs/moshi-7b.yaml next to the package's folder: in a wheel install
    (no top-level configs/) its part (c) failed with a ConfigError traceback after minutes of
    (a) and (b). Now the packaged config."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "moshi_ttt", site / "moshi_ttt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import json, moshi_ttt.bench_ttt as b; assert b.__file__.startswith(%r), "
            "b.__file__; print(json.dumps(b.state_bytes_7b()))" % str(site))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site),
                            "NO_TORCH_COMPILE": "1", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["ttt_layers"] == 16 and got["fast_weight_bytes"] == 269_746_176


def test_bench_train_rate_is_all_tokens_over_all_time():
    """Steps of 0.25 and 0.75 s with 1000 tokens each: 2000 tokens/s, 0.5 s/step (the mean of
    the steps' rates said 2667 tokens/s, and 2667 x 0.5 s is not a step's 1000 tokens)."""
    from moshi_ttt.bench_train import steady_rate

    got = steady_rate([{"tokens_per_s": 4000.0, "step_s": 0.25},
                       {"tokens_per_s": 1000 / 0.75, "step_s": 0.75}])
    assert got["tokens_per_s"] == pytest.approx(2000.0)
    assert got["step_s"] == pytest.approx(0.5)


def test_soak_samples_the_end_of_the_run(monkeypatch):
    """1000 sessions sampled every 300: the samples stopped at session 900, so the printed
    `RSS first -> last` and the second half's slope left the last 100 sessions out."""
    import server.soak as soak

    done = {"n": 0}

    async def session(url, payloads, answers, timeout):
        done["n"] += 1
        return True

    def health(port):
        return 200, {"memory": {"rss_mb": 100 + done["n"] / 1024,  # +1 KiB per session
                                "heap_in_use_mb": 50.0}}

    async def no_wait(_):
        return None

    monkeypatch.setattr(soak, "_session", session)
    monkeypatch.setattr(soak, "fetch_health", health)
    monkeypatch.setattr(soak.asyncio, "sleep", no_wait)
    rss, heap, failed = asyncio.run(soak._soak(0, "tokens", 1000, 3, 300, 1.0))
    assert [n for n, _ in rss] == [0, 300, 600, 900, 1000] and failed == 0
    assert rss[-1][1] == pytest.approx(100 + 1000 / 1024)
    assert soak.slope_kb(rss) == pytest.approx(1.0)
    assert soak.slope_kb(heap) == pytest.approx(0.0)


@pytest.mark.parametrize("argv, message", [
    (["--mode", "opsu"], "--mode 'opsu': expected opus, pcm, tokens"),
    (["--mode", "tokens,"], "--mode 'tokens,'"),
    (["--every", "0"], "--every must be at least 1 and below --sessions (2000), got 0"),
    (["--sessions", "100"], "--every must be at least 1 and below --sessions (100), got 250"),
    (["--frames", "1"], "--frames must be at least 2, got 1"),
])
def test_soak_refuses_bad_flags_in_one_line(argv, message, capsys):
    """Before: --every 0 was a ZeroDivisionError traceback; --every above --sessions a NaN
    slope; --frames 1 sessions that waited for no answer; a misspelt mode 2000 failed
    sessions, each a warning. Now argparse's usage line and exit status 2, before any server."""
    from server.soak import main

    with pytest.raises(SystemExit) as e:
        main(["--random-config", "configs/tiny.yaml", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err

"""`moshi-ttt bench serve`: N real-time synthetic clients against a real server, per batch size.

For each session count N, a fresh `moshi-ttt serve` process with N slots is started on loopback
(so the step cost is that of batch N, and the clients do not share its interpreter), N clients
stream 80 ms frames on their own clocks (random phases, as independent callers would) for S
seconds, then the server's /health is read and the server is stopped with SIGTERM.

Figures per N: the server's step latency p50/p99 (one step = one frame for every ready session:
codec encode, LM step, codec decode), real-time factor (step p50 / 80 ms: below 1 keeps up), the
clients' round trip per frame p50/p99, frames late (answer later than 80 ms after its input
frame was sent), resident and GPU memory before and after.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moshi_ttt.protocol import FRAME_SIZE, Kind

logger = logging.getLogger(__name__)

FRAME_S = 0.08
# A deployment's settings in the environment that the benchmark's own server (plain ws on
# loopback, its clients without a key) must not take: with them its clients would be refused
# (an API key, allowed origins) or it would not answer on http://127.0.0.1 (TLS, a host).
DEPLOYMENT_ENV = ("MOSHI_TTT_API_KEY", "MOSHI_TTT_ALLOWED_ORIGINS", "MOSHI_TTT_SSL_CERTFILE",
                  "MOSHI_TTT_SSL_KEYFILE", "MOSHI_TTT_HOST")


@dataclass
class LoadResult:
    sessions: int
    seconds: float
    mode: str
    frames_sent: int
    frames_answered: int
    frames_late: int
    rtt_ms_p50: float | None  # None: no frame answered
    rtt_ms_p99: float | None
    step_ms_p50: float | None
    step_ms_p99: float | None
    sessions_per_step: float | None
    real_time_factor: float | None
    rss_mb_before: float | None
    rss_mb_after: float | None
    gpu_peak_mb: float | None
    device: str
    errors: list[str] = field(default_factory=list)
    batch_clock: str | None = None  # as the server says
    capacity: int | None = None  # the server's slots (batch rows); None: as many as sessions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch_health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class ServerProcess:
    """`moshi-ttt serve` in a child process on a free loopback port."""

    def __init__(self, model_args: list[str], sessions: int, extra: list[str], log: Path):
        self.port = free_port()
        self.cmd = [sys.executable, "-m", "moshi_ttt.cli", "serve", *model_args,
                    "--port", str(self.port), "--max-sessions", str(sessions), *extra]
        self.log = log

    def __enter__(self) -> "ServerProcess":
        self._log = open(self.log, "w")
        env = {k: v for k, v in os.environ.items() if k.upper() not in DEPLOYMENT_ENV}
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**env, "PYTHONUNBUFFERED": "1"})
        try:
            return self._wait_ready()
        except BaseException:  # timeout, Ctrl-C, an odd reply: never leave the child running
            self.__exit__(None, None, None)
            raise

    def _wait_ready(self) -> "ServerProcess":
        deadline = time.monotonic() + 900
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   f"{self.log.read_text()[-3000:]}")
            try:
                status, body = fetch_health(self.port)
                if status == 200:
                    self.health = body
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready in 900 s")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


async def _client(url: str, seconds: float, mode: str, seed: int) -> dict[str, Any]:
    """One caller: a frame every 80 ms on its own clock; returns send/receive times. A session
    the server refuses or ends (ERROR, a close) stops sending and reports why in `error`, with
    the frames it sent and got until then: an overloaded server is a result, not a crash."""
    import websockets
    from websockets.exceptions import ConnectionClosed, InvalidHandshake

    rng = np.random.default_rng(seed)
    await asyncio.sleep(random.Random(seed).random() * FRAME_S)  # independent phase
    sent: list[float] = []
    answered: list[float] = []  # receive time of the answer to input frame 1, 2, ...
    error = None

    def closed(e: ConnectionClosed) -> str:
        close = e.rcvd or e.sent
        return (f"connection closed ({close.code}{' ' + close.reason if close.reason else ''})"
                if close is not None else "connection closed without a close frame")

    try:
        async with websockets.connect(f"{url}?mode={mode}", max_size=None) as ws:
            while (m := await ws.recv())[0] != Kind.METADATA:
                if m[0] == Kind.ERROR:
                    error = m[1:].decode(errors="replace")

            async def receive() -> None:
                nonlocal error
                try:
                    async for m in ws:
                        if m[0] == Kind.ERROR:
                            error = m[1:].decode(errors="replace")
                        elif (mode == "tokens" and m[0] == Kind.CODES) or \
                                (mode != "tokens" and m[0] == Kind.AUDIO):
                            if mode == "tokens":
                                codes = np.frombuffer(m[1:], "<i4").reshape(-1, 9)
                                answered.extend([time.perf_counter()] *
                                                int((codes[:, 1] >= 0).sum()))
                            else:
                                answered.append(time.perf_counter())
                except ConnectionClosed as e:  # the sender sees it too and says why
                    error = error or closed(e)

            rx = asyncio.create_task(receive())
            try:
                t0 = time.perf_counter()
                n = int(seconds / FRAME_S)
                for k in range(n):
                    delay = t0 + k * FRAME_S - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if mode == "tokens":
                        payload = bytes([Kind.CODES]) + \
                            rng.integers(0, 2048, 8).astype("<i4").tobytes()
                    else:
                        pcm = (rng.standard_normal(FRAME_SIZE) * 0.05).astype("<f4")
                        payload = bytes([Kind.AUDIO]) + pcm.tobytes()
                    at = time.perf_counter()
                    await ws.send(payload)
                    sent.append(at)
                await asyncio.sleep(1.0)  # the last answers
            finally:
                rx.cancel()
                await asyncio.gather(rx, return_exceptions=True)
    except ConnectionClosed as e:  # refused, or ended by the server while sending
        error = error or closed(e)
    except (OSError, asyncio.TimeoutError, InvalidHandshake) as e:
        error = error or f"could not connect: {type(e).__name__}: {e}"
    return {"sent": sent, "answered": answered, "error": error}


async def _load(url: str, sessions: int, seconds: float, mode: str) -> list[dict[str, Any]]:
    return await asyncio.gather(*(_client(url, seconds, mode, seed=i) for i in range(sessions)))


def run_load(model_args: list[str], sessions: int, seconds: float, mode: str = "pcm",
             extra: list[str] | None = None, log_dir: Path | None = None,
             capacity: int | None = None) -> LoadResult:
    """`sessions` real-time clients for `seconds` against a fresh server with `capacity` slots
    (default: exactly `sessions`, a full server)."""
    if capacity is not None and capacity < sessions:
        raise ValueError(f"{sessions} sessions do not fit a server of capacity {capacity}")
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="moshi-ttt-bench-"))
    log = log_dir / f"server-{sessions}.log"
    with ServerProcess(model_args, capacity or sessions, extra or [], log) as srv:
        before = srv.health
        results = asyncio.run(_load(f"ws://127.0.0.1:{srv.port}/api/chat", sessions, seconds,
                                    mode))
        _, after = fetch_health(srv.port)
    return load_result(results, before, after, sessions, seconds, mode)


def load_result(results: list[dict[str, Any]], before: dict[str, Any], after: dict[str, Any],
                sessions: int, seconds: float, mode: str) -> LoadResult:
    """The figures of one run from the clients' times and the server's /health before and
    after. Round trips are None when no frame was answered (JSON has no NaN)."""
    rtts, late, n_sent, n_ans, errors = [], 0, 0, 0, []
    for r in results:
        sent, ans = r["sent"], r["answered"]
        n_sent += len(sent)
        n_ans += len(ans)
        if r["error"]:
            errors.append(r["error"])
        for j, t in enumerate(ans):  # answer j is to input frame j + 1 (one frame of delay)
            if j + 1 < len(sent):
                rtt = t - sent[j + 1]
                rtts.append(rtt * 1000)
                late += rtt > FRAME_S
    eng = after.get("engine") or {}
    p50 = eng.get("step_ms_p50")
    return LoadResult(
        sessions=sessions, seconds=seconds, mode=mode, frames_sent=n_sent,
        frames_answered=n_ans, frames_late=late,
        rtt_ms_p50=float(np.percentile(rtts, 50)) if rtts else None,
        rtt_ms_p99=float(np.percentile(rtts, 99)) if rtts else None,
        step_ms_p50=p50, step_ms_p99=eng.get("step_ms_p99"),
        sessions_per_step=eng.get("sessions_per_step"),
        real_time_factor=round(p50 / (FRAME_S * 1000), 4) if p50 else None,
        rss_mb_before=(before.get("memory") or {}).get("rss_mb"),
        rss_mb_after=(after.get("memory") or {}).get("rss_mb"),
        gpu_peak_mb=(after.get("memory") or {}).get("gpu_peak_mb"),
        device=f"{after.get('device')}/{after.get('dtype')}", errors=errors,
        capacity=(after.get("sessions") or {}).get("capacity"),  # as the server says
        batch_clock=eng.get("batch_clock"))


def run_bench(model_args: list[str], sessions: list[int], seconds: float, mode: str,
              extra: list[str], json_out: Path | None = None,
              capacity: int | None = None) -> list[LoadResult]:
    out = []
    for n in sessions:
        logger.info("bench serve: %d session(s) on %d slot(s), %.0f s, %s mode", n,
                    capacity or n, seconds, mode)
        r = run_load(model_args, n, seconds, mode, extra, capacity=capacity)
        logger.info("%s", r)
        out.append(r)
        if json_out:
            json_out.write_text(json.dumps([asdict(x) for x in out], indent=2))
    print_table(out)
    return out


def print_table(results: list[LoadResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="moshi-ttt bench serve (per-frame figures; budget 80 ms)")
    for col in ("sessions", "capacity", "clock", "device", "step p50 ms", "step p99 ms", "RTF",
                "rtt p50 ms", "rtt p99 ms", "late / answered", "sessions/step",
                "RSS MB before -> after", "GPU peak MB"):
        t.add_column(col, justify="right")

    def f(x, nd=1):
        return "-" if x is None else f"{x:.{nd}f}"
    for r in results:
        t.add_row(str(r.sessions), str(r.capacity), r.batch_clock or "-", r.device,
                  f(r.step_ms_p50), f(r.step_ms_p99), f(r.real_time_factor, 3),
                  f(r.rtt_ms_p50), f(r.rtt_ms_p99),
                  f"{r.frames_late} / {r.frames_answered}", f(r.sessions_per_step, 2),
                  f"{f(r.rss_mb_before, 0)} -> {f(r.rss_mb_after, 0)}", f(r.gpu_peak_mb, 0))
    Console(width=200).print(t)
    for r in results:
        for e in r.errors:
            logger.warning("%d sessions: a client got an error: %s", r.sessions, e)

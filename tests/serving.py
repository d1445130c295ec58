"""Test harness for the server: a real uvicorn on loopback in a background thread, a small
synchronous websocket peer that records everything the server sends, and the helpers the server
tests share (settings for the tiny base, random codes, JSON over HTTP, waiting for idle)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import uvicorn
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from moshi_ttt.protocol import Kind

from conftest import REPO


#: Server settings of the tests: 2 slots, greedy (outputs are a function of the inputs), one
#: warm-up frame, a short batching wait, torch's own threads.
TEST_SERVER = {"max_sessions": 2, "use_sampling": False, "warmup_frames": 1, "batch_wait_ms": 5,
               "cpu_threads": None}


def settings(base, **kw):
    """Server settings for tests on `base` (`TEST_SERVER`, then `kw`)."""
    from server.settings import ServeSettings

    return ServeSettings(checkpoint=base, **{**TEST_SERVER, **kw})


def random_settings(**kw):
    """The same on the tiny config with random weights: no base to build (no codec
    calibration), for tests that need a running server but not a trained codec."""
    from server.settings import ServeSettings

    from conftest import CONFIGS

    return ServeSettings(random_config=CONFIGS / "tiny.yaml", **{**TEST_SERVER, **kw})


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def user_codes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2048, (n, 8))


def text_head_in_vocab(srv: "ServerThread") -> None:
    """A random LM's text head mostly names ids beyond the tiny tokenizer's vocabulary; keep
    only real word pieces so that text output exists (run on the model thread)."""
    lm, tok = srv.host.loaded.lm, srv.host.loaded.tokenizer

    def patch():
        with torch.no_grad():
            w = lm.text_linear.weight
            w[tok.vocab_size():] = 0
            w[[0, 3]] = -w[[0, 3]].abs()  # padding never wins either
    srv.engine.submit(patch).result(timeout=30)


def wait_idle(srv: "ServerThread", timeout: float = 30) -> None:
    """No session connected, and the model thread done with the resets of those that left: a
    reset still in flight would hand-shake a session that opens meanwhile on the same row at
    once (harmless for it, but it defeats tests that hold the model thread to delay handshakes).
    Two no-op tasks: the model thread runs a task before the resets taken with it, so the
    second one completes only after every reset queued before the first."""
    deadline = time.monotonic() + timeout
    while srv.engine.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.engine.active == 0
    for _ in range(2):
        srv.engine.submit(lambda: None).result(timeout=timeout)


def serve_cmd(checkpoint, port, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moshi_ttt.cli", "serve", "--checkpoint", str(checkpoint),
            "--port", str(port), "--max-sessions", "2", *extra]


def serve_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "NO_TORCH_COMPILE": "1", "PYTHONUNBUFFERED": "1", **extra}


__all__ = ["REPO", "ServerThread", "Peer", "settings", "get_json", "user_codes",
           "text_head_in_vocab", "wait_idle", "serve_cmd", "serve_env"]


class ServerThread:
    """`create_app` under uvicorn on 127.0.0.1:<free port>, until the context exits."""

    def __init__(self, settings, host=None, wait_ready: bool = True,
                 log_level: str = "warning"):
        from server.app import ModelHost, create_app

        self.settings = settings
        self.host = host or ModelHost(settings)
        self.app = create_app(settings, self.host)
        self.wait_ready = wait_ready
        self.log_level = log_level
        self.server: uvicorn.Server | None = None

    def __enter__(self) -> "ServerThread":
        from server.main import uvicorn_config

        config = uvicorn_config(self.app, self.settings, host="127.0.0.1", port=0,
                                log_level=self.log_level)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        while self.wait_ready and not self.host.ready:
            if self.host.failed.is_set() or time.monotonic() > deadline:
                raise RuntimeError(f"model did not load: {self.host.reason}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        assert self.server is not None
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def engine(self):
        return self.host.engine

    def url(self, path: str = "/api/chat", **query: Any) -> str:
        q = "&".join(f"{k}={v}" for k, v in query.items())
        return f"ws://127.0.0.1:{self.port}{path}{'?' + q if q else ''}"

    def http(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@dataclass
class Peer:
    """A websocket client that collects the server's messages on a thread."""

    url: str
    headers: dict[str, str] | None = None
    handshake: bool = True  # wait for handshake + metadata on open
    messages: list[tuple[int, bytes]] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""

    def __enter__(self) -> "Peer":
        self.ws = connect(self.url, additional_headers=self.headers, max_size=None,
                          open_timeout=30, close_timeout=5).__enter__()
        self._lock = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if self.handshake:
            self.wait_for(lambda: any(k == Kind.METADATA for k, _ in self.messages)
                          or self.closed)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        self._reader.join(timeout=10)

    def _read(self) -> None:
        try:
            for m in self.ws:
                with self._lock:
                    self.messages.append((m[0], bytes(m[1:])))
                    self._lock.notify_all()
        except ConnectionClosed:
            pass
        finally:
            with self._lock:
                self.close_code = self.ws.close_code or 1006
                self.close_reason = self.ws.close_reason or ""
                self._lock.notify_all()

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    def wait_for(self, pred, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"condition not met in {timeout} s; got kinds "
                                       f"{[k for k, _ in self.messages][-20:]}, "
                                       f"close {self.close_code}")
                self._lock.wait(timeout=left)

    def wait_closed(self, timeout: float = 60.0) -> None:
        self.wait_for(lambda: self.closed, timeout)

    def of(self, kind: Kind) -> list[bytes]:
        with self._lock:
            return [p for k, p in self.messages if k == kind]

    @property
    def metadata(self) -> dict:
        return json.loads(self.of(Kind.METADATA)[0])

    @property
    def errors(self) -> list[str]:
        return [p.decode() for p in self.of(Kind.ERROR)]

    def send(self, kind: int, payload: bytes = b"") -> None:
        self.ws.send(bytes([kind]) + payload)

    def send_codes(self, codes: np.ndarray) -> None:
        self.send(Kind.CODES, np.ascontiguousarray(codes, dtype="<i4").tobytes())

    def send_pcm(self, pcm: np.ndarray) -> None:
        self.send(Kind.AUDIO, np.ascontiguousarray(pcm, dtype="<f4").tobytes())

    def codes_out(self) -> np.ndarray:
        """[n, 9] frames received in tokens mode (text token, 8 Moshi codes)."""
        parts = [np.frombuffer(p, dtype="<i4").reshape(-1, 9) for p in self.of(Kind.CODES)]
        return np.concatenate(parts) if parts else np.zeros((0, 9), np.int32)

    def wait_codes(self, n: int, timeout: float = 60.0) -> np.ndarray:
        self.wait_for(lambda: sum(len(p) // 36 for p in self.of(Kind.CODES)) >= n
                      or self.closed, timeout)
        return self.codes_out()

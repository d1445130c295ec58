"""`moshi-ttt serve`: validate every dim before binding the port, then serve until SIGTERM.

Order of start-up (each step only if the previous one passed):
0. an `hf://OWNER/REPO[@REVISION]` checkpoint is downloaded (or found in the Hugging Face
   cache; `HF_HUB_OFFLINE=1`: the cache only) and read from then on as a local directory; a
   malformed spec or a failed download exits with status 2 in one line;
1. read the checkpoint's config and every weight file's header, build the model on the meta
   device and validate config <-> modules <-> TTT blocks <-> tensors: a mismatch exits with
   status 2 and a message naming the tensor, expected and found shape; the port is never bound;
2. bind the port (taken: one line, exit status 3); /health answers 503 while the weights load,
   are checked for NaN/inf (exit 2, naming the tensor) and the engine warms up (a TTT state
   that turns non-finite on silence: exit 2);
3. ready: /health 200, chat sessions accepted.
SIGTERM (or Ctrl-C), at any moment: stop accepting, end every session with an ERROR "server
shutting down" and close code 1001, exit 0. During start-up the load is abandoned at its next
step; a load stuck in one long read is not waited for (the process exits without tearing down
the interpreter under it, which would abort). A second signal skips the waiting.

Exit status: 0 stopped by a signal, 1 the model failed to load (I/O, device, out of memory),
2 invalid settings or checkpoint (dims, non-finite weights, diverging warm-up), 3 the address
cannot be bound (port in use, no permission, not a local address).

An API key given in the query string would appear in uvicorn's connection log lines; every
form the server accepts (`api_key=`, percent-encoded names or values) is redacted, and so is
the configured key itself wherever it would appear.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any
from urllib.parse import quote, quote_plus, unquote_plus

import uvicorn

from moshi_ttt.tls import TLSError, TLSFiles

from .app import ModelHost, create_app
from .settings import ServeSettings

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_LOAD_FAILED, EXIT_INVALID, EXIT_BIND = 0, 1, 2, 3
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def resolve_checkpoint(settings: ServeSettings) -> ServeSettings:
    """`settings` with an `hf://` checkpoint replaced by its downloaded (or cached) snapshot
    directory, so that the header check, the load and /health all read one local directory,
    as for a local checkpoint. Raises HubError (a CheckpointError) with one line."""
    from moshi_ttt.hub import is_hub_spec, parse_spec, resolve_checkpoint as resolve

    if not is_hub_spec(settings.checkpoint):
        return settings
    logger.info("fetching checkpoint %s", parse_spec(settings.checkpoint))
    return settings.model_copy(update={"checkpoint": resolve(settings.checkpoint)})


def preflight(settings: ServeSettings) -> dict:
    """Header-only validation of the checkpoint (meta device: no weights read, no memory); for
    a random-weights config, the config against the modules it builds."""
    import torch

    from moshi_ttt.checkpoint import CheckpointRef, inspect_checkpoint
    from moshi_ttt.config import load_config
    from moshi_ttt.dims import describe, validate
    from moshi_ttt.model import build_ttt_lm

    if settings.checkpoint is not None:
        return inspect_checkpoint(settings.checkpoint)
    cfg = load_config(settings.random_config)
    lm = build_ttt_lm(cfg, device="meta", dtype=torch.bfloat16)
    validate(lm, cfg.lm, cfg.ttt, context=str(settings.random_config))
    info = describe(lm, cfg.ttt)
    info["checkpoint"] = {"id": CheckpointRef("random", settings.random_config).id}
    return info


class BindError(OSError):
    """The server's address cannot be bound; the message says why and what to do."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket for uvicorn, so that a taken port is reported
    before anything loads, in one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BindError(f"cannot bind {host}:{port}: {host!r} is not a known host name or "
                        f"address ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        advice = {
            errno.EADDRINUSE: "is already in use (another server is listening there): stop "
                              "it or choose another --port",
            errno.EACCES: "needs privileges this process does not have (ports below 1024): "
                          "choose another --port",
            errno.EADDRNOTAVAIL: f"cannot be bound: {host} is not an address of this machine",
        }.get(e.errno, f"cannot be bound: {e.strerror}")
        raise BindError(f"port {port} on {host} {advice}") from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn with a graceful first signal: sessions are told why before the sockets close."""

    def __init__(self, config: uvicorn.Config, host: ModelHost,
                 stop_requested: Callable[[], bool] = lambda: False):
        super().__init__(config)
        self.host = host
        self.loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._stop_requested = stop_requested

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self._stop_requested():  # a signal came just before uvicorn's handlers were in
            self.host.stop_loading()
            self.should_exit = True
        if self.started:
            for sock in (self.servers[0].sockets if self.servers else []):
                h, p = sock.getsockname()[:2]
                http, ws = ("https", "wss") if self.config.is_ssl else ("http", "ws")
                logger.info("listening on %s://%s:%s (chat: %s://%s:%s/api/chat)", http, h, p,
                            ws, h, p)
            self.loop.create_task(self._watch_load())

    async def _watch_load(self) -> None:
        while not self.should_exit:
            if self.host.failed.is_set():
                if not self.host.invalid:
                    logger.error("start-up failed: %s", self.host.reason)
                self.should_exit = True
                return
            if self.host.ready:
                return
            await asyncio.sleep(0.1)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.host.stop_loading()
        if self._draining:
            logger.warning("second signal: exiting without waiting")
            self.should_exit = self.force_exit = True
            return
        if self.loop is None or not self.started:
            return super().handle_exit(sig, frame)
        self._draining = True
        logger.info("received %s: closing sessions, then exiting",
                    signal.Signals(sig).name)
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain()))

    async def _drain(self) -> None:
        await self.host.drain()
        self.should_exit = True


class RedactKeys(logging.Filter):
    """Hide API keys in log records: the value of every query parameter whose name decodes to
    `api_key` (as the server's own query parsing decodes it: `api%5Fkey`, `api_k%65y`), and
    the configured key itself, plain or percent-encoded, wherever it appears."""

    _param = re.compile(r"(?<=[?&;])([^=&;\s\"'#?]+)=([^&;\s\"'#]*)")

    def __init__(self, api_key: str | None = None):
        super().__init__()
        forms = {api_key, quote(api_key, safe=""), quote_plus(api_key)} if api_key else set()
        self._literal = re.compile("|".join(re.escape(f) for f in sorted(forms, key=len,
                                                                       reverse=True))) \
            if forms else None

    def redact(self, text: str) -> str:
        text = self._param.sub(
            lambda m: f"{m[1]}=***" if unquote_plus(m[1]).strip().lower() == "api_key"
            else m[0], text)
        if self._literal is not None:
            text = self._literal.sub("***", text)
        return text

    def _value(self, v: Any) -> Any:
        return self.redact(v) if isinstance(v, str) else v

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        if isinstance(record.args, dict):
            record.args = {k: self._value(v) for k, v in record.args.items()}
        elif record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            record.args = tuple(self._value(a) for a in args)
        return True


def install_redaction(api_key: str | None) -> RedactKeys:
    """On uvicorn's loggers and on every handler of the root logger (a handler's filter sees
    the records of every logger that propagates to it)."""
    f = RedactKeys(api_key)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(f)
    for handler in logging.getLogger().handlers:
        handler.addFilter(f)
    return f


class _Termination:
    """SIGTERM/SIGINT outside uvicorn's own handling (before it runs, after it returns): the
    first is remembered, and while `interruptible` it also interrupts the blocking step in
    progress (the header check), so that the process exits 0 at any moment."""

    class Requested(BaseException):
        pass

    def __init__(self) -> None:
        self.requested: int | None = None
        self._interruptible = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}

    def _handle(self, sig: int, frame: FrameType | None) -> None:
        first = self.requested is None
        self.requested = self.requested or sig
        if first and self._interruptible:
            raise self.Requested()

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        self._interruptible = True
        try:
            if self.requested:
                raise self.Requested()
            yield
        finally:
            self._interruptible = False

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def _exit_now(code: int, why: str) -> None:
    """Exit at once, without finalising the interpreter: a thread still running inside torch
    (a load that cannot be interrupted) would otherwise abort the process ("terminate called
    without an active exception")."""
    logger.info("exiting with status %d: %s", code, why)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def invalid_errors() -> tuple[type[Exception], ...]:
    """What the checkpoint check raises for an invalid checkpoint or config (exit status 2)."""
    from moshi_ttt.checkpoint import CheckpointError
    from moshi_ttt.config import ConfigError
    from moshi_ttt.dims import DimensionMismatch

    return (DimensionMismatch, CheckpointError, ConfigError, FileNotFoundError, ValueError)


def uvicorn_config(app, settings: ServeSettings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's settings for the app (the server's, and the tests' in-process servers').

    permessage-deflate is declined: the payloads are Opus pages, float PCM or codes, which do
    not compress, and each connection's zlib streams cost CPU on every message and about
    300 KiB of native heap while it lasts. Measured with `python -m server.soak` (2000 sessions
    x 3 frames, tiny config, 2-core CPU): resident memory grew 4.7 (Opus) and 2.7-4.8 (tokens)
    KiB per session with it, 1.6 and 1.6 without. Clients that offer it (Moshi's, browsers)
    simply get uncompressed frames."""
    options: dict[str, Any] = dict(
        log_level=settings.log_level, lifespan="on", ws_max_size=4 * settings.max_message_bytes,
        ws_per_message_deflate=False, timeout_graceful_shutdown=5, log_config=None)
    options.update(overrides)
    return uvicorn.Config(app, **options)


def serve(settings: ServeSettings) -> int:
    """Run the server in this process; returns the exit status (see the module's docstring).
    With `ssl_certfile` and `ssl_keyfile` set, it speaks https and wss (uvicorn's TLS)."""
    term = _Termination()
    try:
        return _serve(settings, term, invalid_errors())
    finally:
        term.restore()


def _serve(settings: ServeSettings, term: _Termination, invalid: tuple[type, ...]) -> int:
    tls = None
    if settings.ssl_certfile is not None and settings.ssl_keyfile is not None:  # a pair
        tls = TLSFiles(settings.ssl_certfile, settings.ssl_keyfile)
        try:
            tls.check()
        except TLSError as e:
            logger.error("refusing to start: %s", e)
            return EXIT_INVALID
    try:
        with term.interruptible():
            settings = resolve_checkpoint(settings)  # hf://: download first, then as local
            logger.info("starting: checking %s", settings.checkpoint or settings.random_config)
            info = preflight(settings)
    except _Termination.Requested:
        logger.info("stopped by %s during the checkpoint check",
                    signal.Signals(term.requested).name)
        return EXIT_OK
    except invalid as e:
        logger.error("refusing to start: %s", e)
        return EXIT_INVALID
    d = info["model"] if "model" in info else info
    logger.info("checkpoint %s validated: main %d/%d heads/%d layers, depformer %s, TTT layers %s",
                info["checkpoint"]["id"], d["main"]["d_model"], d["main"]["num_heads"],
                d["main"]["num_layers"],
                "{d_model}/{num_heads} heads/{num_layers} layers".format(**d["depformer"])
                if d.get("depformer") else "none", d["ttt"]["layers"])
    try:
        host = ModelHost(settings)
    except ValueError as e:  # e.g. cuda asked for on a machine without it
        logger.error("refusing to start: %s", e)
        return EXIT_INVALID
    try:
        sock = bind_socket(settings.host, settings.port)
    except BindError as e:
        logger.error("%s", e)
        return EXIT_BIND
    if term.requested:
        sock.close()
        logger.info("stopped by %s before serving", signal.Signals(term.requested).name)
        return EXIT_OK
    app = create_app(settings, host)
    install_redaction(settings.api_key)
    config = uvicorn_config(app, settings, **(tls.uvicorn_options() if tls is not None else {}))
    server = _Server(config, host, stop_requested=lambda: term.requested is not None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    host.stop_loading()
    if host.failed.is_set():
        code = EXIT_INVALID if host.invalid else EXIT_LOAD_FAILED
    elif not server.started:
        code = EXIT_OK if term.requested else EXIT_LOAD_FAILED
    else:
        code = EXIT_OK
    busy = [t for t in (host.loader, getattr(host.engine, "_thread", None))
            if t is not None and t.is_alive()]
    for t in busy:
        t.join(timeout=5)  # the load gives up between its steps
    if any(t.is_alive() for t in busy):
        _exit_now(code, "stopped while the model was still loading")
    return code

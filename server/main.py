"""`moshi-ttt serve`: validate every dim before binding the port, then serve until SIGTERM.

Order of start-up (each step only if the previous one passed):
1. read the checkpoint's config and every weight file's header, build the model on the meta
   device and validate config <-> modules <-> TTT blocks <-> tensors: a mismatch exits with
   status 2 and a message naming the tensor, expected and found shape; the port is never bound;
2. bind the port; /health answers 503 while the weights load and the engine warms up;
3. ready: /health 200, chat sessions accepted.
SIGTERM (or Ctrl-C): stop accepting, end every session with an ERROR "server shutting down" and
close code 1001, exit 0. A second signal skips the waiting (sessions, in-flight requests).

An API key given as `?api_key=` would appear in uvicorn's connection log lines; they are
redacted.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from types import FrameType

import uvicorn

from moshi_ttt.tls import TLSError, TLSFiles

from .app import ModelHost, create_app
from .settings import ServeSettings

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_LOAD_FAILED, EXIT_INVALID = 0, 1, 2


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


class _Server(uvicorn.Server):
    """uvicorn with a graceful first signal: sessions are told why before the sockets close."""

    def __init__(self, config: uvicorn.Config, host: ModelHost):
        super().__init__(config)
        self.host = host
        self.loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
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
                logger.error("start-up failed: %s", self.host.reason)
                self.should_exit = True
                return
            if self.host.ready:
                return
            await asyncio.sleep(0.1)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
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
    """Replace the value of `api_key=` in log records (uvicorn logs each websocket's path)."""

    _pattern = re.compile(r"(api_key=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            record.args = tuple(self._pattern.sub(r"\1***", a) if isinstance(a, str) else a
                                for a in args)
        if isinstance(record.msg, str):
            record.msg = self._pattern.sub(r"\1***", record.msg)
        return True


def serve(settings: ServeSettings, tls: TLSFiles | None = None) -> int:
    """Run the server in this process; returns the exit status.
    With `tls`, it speaks https and wss (uvicorn's TLS)."""
    from moshi_ttt.checkpoint import CheckpointError
    from moshi_ttt.config import ConfigError
    from moshi_ttt.dims import DimensionMismatch

    if tls is not None:
        try:
            tls.check()
        except TLSError as e:
            logger.error("refusing to start: %s", e)
            return EXIT_INVALID
    try:
        info = preflight(settings)
    except (DimensionMismatch, CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
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
    app = create_app(settings, host)
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(RedactKeys())
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level, lifespan="on",
                            ws_max_size=4 * settings.max_message_bytes,
                            timeout_graceful_shutdown=5, log_config=None,
                            **(tls.uvicorn_options() if tls is not None else {}))
    server = _Server(config, host)
    server.run()
    if host.failed.is_set():
        return EXIT_LOAD_FAILED
    if not server.started:
        return EXIT_LOAD_FAILED  # e.g. the port was taken
    return EXIT_OK

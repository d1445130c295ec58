"""Session soak: many short sessions, one after another, against a fresh `moshi-ttt serve`; prints
the server's resident memory as the session count grows, and its growth per session.

    python -m server.soak --random-config configs/tiny.yaml --mode opus --sessions 2000

A leak per session (native codec state, buffers kept by a closed socket, a handle never
released) shows as a slope: the figure is a least-squares fit of RSS against sessions over the
second half of the run (the first half includes the allocator's warm-up). Where the server runs
on glibc, the same fit of the heap's bytes in use (from /health) tells the two causes of an RSS
slope apart: a leak grows what is in use, fragmentation only what is resident. Each session: open,
handshake, `--frames` frames of audio (or codes) sent at once, wait for their answers, close.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moshi_ttt.protocol import FRAME_SIZE, SAMPLE_RATE, Kind

from .loadtest import ServerProcess, fetch_health

logger = logging.getLogger(__name__)

MODES = ("opus", "pcm", "tokens")


@dataclass
class SoakResult:
    mode: str
    sessions: int
    frames: int
    seconds: float
    rss_mb: list[tuple[int, float]]  # (sessions done, server RSS in MiB)
    kb_per_session: float  # RSS slope over the second half
    failed: int
    heap_in_use_mb: list[tuple[int, float]]  # (sessions done, glibc heap in use); [] without
    heap_kb_per_session: float | None  # its slope over the second half; None without glibc


def _payloads(mode: str, frames: int, seed: int) -> list[bytes]:
    """One session's input messages: Ogg/Opus pages (opus), float32 frames (pcm), codes."""
    import sphn

    rng = np.random.default_rng(seed)
    if mode == "tokens":
        return [bytes([Kind.CODES]) + rng.integers(0, 2048, 8).astype("<i4").tobytes()
                for _ in range(frames)]
    pcm = (rng.standard_normal(frames * FRAME_SIZE) * 0.05).astype(np.float32)
    if mode == "pcm":
        return [bytes([Kind.AUDIO]) + pcm[i * FRAME_SIZE:(i + 1) * FRAME_SIZE].astype("<f4")
                .tobytes() for i in range(frames)]
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    pages = [writer.append_pcm(pcm[i * FRAME_SIZE:(i + 1) * FRAME_SIZE]) for i in range(frames)]
    return [bytes([Kind.AUDIO]) + p for p in pages if p]


async def _session(url: str, payloads: list[bytes], answers: int, timeout: float) -> bool:
    """One short session; True if it got its answers and closed normally. The previous
    session's slot is released just after its close handshake: a refusal with 1013 (server
    full) is retried."""
    import websockets
    from websockets.exceptions import ConnectionClosed

    for _ in range(200):
        try:
            return await _one_session(url, payloads, answers, timeout)
        except ConnectionClosed as e:
            if e.rcvd is None or e.rcvd.code != 1013:
                raise
            await asyncio.sleep(0.01)
    return False


async def _one_session(url: str, payloads: list[bytes], answers: int, timeout: float) -> bool:
    import websockets

    async with websockets.connect(url, max_size=None, open_timeout=timeout) as ws:
        async with asyncio.timeout(timeout):
            while (await ws.recv())[0] != Kind.METADATA:
                pass
            for p in payloads:
                await ws.send(p)
            got = 0
            while got < answers:
                m = await ws.recv()
                if m[0] == Kind.ERROR:
                    logger.warning("server error: %s", m[1:].decode(errors="replace"))
                    return False
                got += m[0] in (Kind.AUDIO, Kind.CODES)
    return True


async def _soak(port: int, mode: str, sessions: int, frames: int, every: int,
                timeout: float
                ) -> tuple[list[tuple[int, float]], list[tuple[int, float]], int]:
    url = f"ws://127.0.0.1:{port}/api/chat?mode={mode}"
    payloads = [_payloads(mode, frames, seed) for seed in range(8)]
    # Answers to wait for: opus output comes in pages (one may hold several frames), so one.
    answers = 1 if mode == "opus" else frames - 1
    rss: list[tuple[int, float]] = []
    heap: list[tuple[int, float]] = []
    failed = 0
    for i in range(sessions + 1):
        if i % every == 0 or i == sessions:  # and at the end: the last figure is the run's
            await asyncio.sleep(0.2)  # the last session's row reset and socket close
            memory = fetch_health(port)[1]["memory"]
            rss.append((i, float(memory["rss_mb"])))
            if "heap_in_use_mb" in memory:
                heap.append((i, float(memory["heap_in_use_mb"])))
            logger.info("%d sessions: server RSS %.1f MiB, heap in use %s MiB", i, rss[-1][1],
                        memory.get("heap_in_use_mb", "-"))
        if i == sessions:
            break
        try:
            ok = await _session(url, payloads[i % len(payloads)], answers, timeout)
        except Exception as e:  # counted and shown: a soak reports failures, it does not stop
            logger.warning("session %d failed: %s: %s", i, type(e).__name__, e)
            ok = False
        failed += not ok
    return rss, heap, failed


def slope_kb(rss: list[tuple[int, float]]) -> float:
    """KiB per session of (sessions, MiB) samples: least squares over their second half."""
    half = rss[len(rss) // 2:]
    if len(half) < 2:
        return float("nan")
    x = np.array([n for n, _ in half], float)
    y = np.array([m for _, m in half], float)
    return float(np.polyfit(x, y, 1)[0] * 1024)


def run_soak(model_args: list[str], mode: str, sessions: int, frames: int = 3,
             every: int = 250, timeout: float = 30.0, extra: list[str] | None = None,
             log_dir: Path | None = None) -> SoakResult:
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="moshi-ttt-soak-"))
    t0 = time.perf_counter()
    with ServerProcess(model_args, 1, extra or [], log_dir / f"server-{mode}.log") as srv:
        rss, heap, failed = asyncio.run(_soak(srv.port, mode, sessions, frames, every, timeout))
    return SoakResult(mode, sessions, frames, round(time.perf_counter() - t0, 1), rss,
                      round(slope_kb(rss), 2), failed, heap,
                      round(slope_kb(heap), 2) if heap else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m server.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint (or run / base dir) to serve")
    src.add_argument("--random-config", help="or a config served with random weights")
    ap.add_argument("--mode", default="opus", help="opus, pcm or tokens; comma-separated: each")
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--frames", type=int, default=3, help="frames sent per session")
    ap.add_argument("--every", type=int, default=250, help="sample RSS every N sessions")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.mode.split(",")]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--mode {args.mode!r}: expected {', '.join(MODES)} or a comma-separated list")
    if args.frames < 2:  # the first frame is answered by none (one frame of model delay)
        ap.error(f"--frames must be at least 2, got {args.frames}")
    if not 1 <= args.every < args.sessions:  # a slope over the second half needs 2 samples
        ap.error(f"--every must be at least 1 and below --sessions ({args.sessions}), got "
                 f"{args.every}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    model = ["--checkpoint", args.checkpoint] if args.checkpoint else \
        ["--random-config", args.random_config]
    results = []
    for mode in modes:
        r = run_soak(model, mode, args.sessions, args.frames, args.every,
                     extra=["--device", args.device, "--greedy"])
        results.append(r)
        logger.info("%s", asdict(r))
    for r in results:
        first, last = r.rss_mb[0][1], r.rss_mb[-1][1]
        heap = ("" if r.heap_kb_per_session is None else
                f" (heap in use {r.heap_in_use_mb[0][1]:.2f} -> {r.heap_in_use_mb[-1][1]:.2f} "
                f"MiB, {r.heap_kb_per_session:+.2f} KiB/session)")
        print(f"{r.mode:6s} {r.sessions} sessions x {r.frames} frames in {r.seconds:.0f} s: "
              f"RSS {first:.1f} -> {last:.1f} MiB, {r.kb_per_session:+.2f} KiB/session over "
              f"the second half{heap}, {r.failed} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

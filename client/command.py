"""The body of `moshi-ttt chat`: check the inputs, run the session, write the outputs, report.

Every failure is one plain line on stderr and an exit code (`client.chat.ExitCode`): 2 for
usage and input problems, 3 when no connection could be made or it was lost, 4 when the server
refused the session or ended it with an error, 130 when a file's streaming was interrupted.
Outputs are written whenever a session started, also when it ended badly (then they are partial,
and the report says so).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moshi_ttt.protocol import Mode

from .audio import (
    AudioInputError, LiveAudio, MicUnavailable, import_sounddevice, load_audio, tail_frames,
    to_frames, write_audio,
)
from .chat import ChatError, ChatOptions, ChatResult, ExitCode, chat_url, run_chat, tls_context

logger = logging.getLogger(__name__)


@dataclass
class ChatCommand:
    """The command's arguments (see `moshi-ttt chat --help`)."""

    url: str
    input: Path | None = None
    mic: bool = False
    output: Path | None = None
    transcript: Path | None = None
    mode: str = "opus"
    speed: float = 1.0
    fast: bool = False
    max_ahead: float = 2.0
    tail: float = 1.0
    channel: int | None = None
    duration: float | None = None
    api_key: str | None = None
    timeout: float = 10.0
    as_json: bool = False
    ca_file: Path | None = None  # wss://: trust this CA (PEM) only
    insecure: bool = False  # wss://: do not check the server's certificate
    telemetry: Path | None = None  # write every TTT telemetry message here (JSON lines)


class _Usage(Exception):
    pass


def run_command(cmd: ChatCommand) -> int:
    """Run `moshi-ttt chat`; returns the exit code."""
    try:
        opts, frames = _prepare(cmd)
    except (_Usage, AudioInputError, MicUnavailable, ChatError) as e:
        logger.error("%s", e)
        return ExitCode.USAGE
    try:
        result = asyncio.run(_session(cmd, opts, frames))
    except ChatError as e:  # no connection: nothing to write
        logger.error("%s", e)
        return e.exit_code
    except MicUnavailable as e:
        logger.error("%s", e)
        return ExitCode.USAGE
    except KeyboardInterrupt:  # a second Ctrl-C: the user does not want to wait for the close
        logger.error("aborted: nothing written")
        return ExitCode.INTERRUPTED
    wrote = _write_outputs(cmd, result)
    if cmd.as_json:
        print(json.dumps({**result.summary(), "outputs": [str(p) for p in wrote]}))
    else:
        _print_summary(cmd, result, wrote)
    code = _exit_code(cmd, result)
    wanted = [p for p in (cmd.output, cmd.transcript, cmd.telemetry) if p is not None]
    if code == ExitCode.OK and len(wrote) < len(wanted):
        return ExitCode.USAGE  # an output could not be written (already logged)
    return code


def _prepare(cmd: ChatCommand) -> tuple[ChatOptions, list[np.ndarray] | None]:
    """Validate everything that can be checked before connecting (fail fast, exit code 2)."""
    if cmd.mic == (cmd.input is not None):
        raise _Usage("give exactly one of --input FILE or --mic")
    try:
        mode = Mode(cmd.mode)
    except ValueError:
        mode = None
    if mode not in (Mode.OPUS, Mode.PCM):
        raise _Usage(f"--mode {cmd.mode!r}: this client speaks 'opus' or 'pcm'")
    # finite first: NaN passes every comparison below (a NaN --speed made the pacing wait forever)
    for flag, value, low in (("--speed", cmd.speed, "> 0"), ("--max-ahead", cmd.max_ahead, "> 0"),
                             ("--tail", cmd.tail, ">= 0"), ("--duration", cmd.duration, "> 0"),
                             ("--timeout", cmd.timeout, "> 0")):
        if value is None:
            continue
        if not math.isfinite(value) or (value <= 0 if low == "> 0" else value < 0):
            unit = "" if flag == "--speed" else " seconds"
            raise _Usage(f"{flag} must be a finite number {low}{unit}, got {value:g}")
    if cmd.channel is not None and cmd.mic:
        raise _Usage("--channel applies to --input only (the microphone is read as mono)")
    if cmd.duration is not None and not cmd.mic:
        raise _Usage("--duration applies to --mic only (a file's length sets its duration)")
    for flag, path in (("--output", cmd.output), ("--transcript", cmd.transcript),
                       ("--telemetry", cmd.telemetry)):
        if path is not None and not path.parent.is_dir():
            raise _Usage(f"{flag} {path}: directory {path.parent} does not exist")
        if path is not None and path.is_dir():
            raise _Usage(f"{flag} {path} is a directory")
    chat_url(cmd.url, mode)  # a malformed URL is a usage error
    opts = ChatOptions(mode=mode, api_key=cmd.api_key, max_ahead_s=cmd.max_ahead,
                       speed=None if cmd.fast or cmd.mic else cmd.speed,
                       connect_timeout_s=cmd.timeout,
                       ssl=tls_context(cmd.url, cmd.ca_file, cmd.insecure))
    if cmd.mic:
        import_sounddevice()  # says how to install it before anything else happens
        return opts, None
    assert cmd.input is not None
    pcm = load_audio(cmd.input, cmd.channel)
    frames = to_frames(pcm)
    n_in = len(frames)
    frames += [np.zeros_like(frames[0])] * tail_frames(cmd.tail)
    logger.info("%s: %.2f s -> %d frames + %d frames of silence", cmd.input, len(pcm) / 24000,
                n_in, len(frames) - n_in)
    return opts, frames


async def _session(cmd: ChatCommand, opts: ChatOptions,
                   frames: list[np.ndarray] | None) -> ChatResult:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_sigint() -> None:  # first Ctrl-C: stop sending and close cleanly; second: abort
        logger.warning("interrupted: closing the session (Ctrl-C again to abort)")
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        handler = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, Windows
        handler = False
    try:
        if frames is not None:
            return await run_chat(cmd.url, frames, opts, stop=stop)
        max_frames = tail_frames(cmd.duration) if cmd.duration else None
        printed: list[str] = []

        def print_live(piece: str) -> None:  # Moshi's words as they come (not into --json)
            printed.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()

        with LiveAudio(loop) as live:
            if max_frames is None:
                logger.info("talking live: Ctrl-C ends the session")
            try:
                return await run_chat(cmd.url, live.frames(stop, max_frames), opts,
                                      on_audio=live.play, stop=stop,
                                      on_text=None if cmd.as_json else print_live)
            finally:
                if printed:
                    sys.stdout.write("\n")
                if live.dropped_frames:
                    logger.warning("%d microphone frames were dropped (the session fell "
                                   "behind)", live.dropped_frames)
    finally:
        if handler:
            loop.remove_signal_handler(signal.SIGINT)


def _write_outputs(cmd: ChatCommand, result: ChatResult) -> list[Path]:
    """Write what was received (also when partial); a path that cannot be written is logged
    and left out of the returned list."""
    if not result.started:
        return []
    wrote: list[Path] = []
    if cmd.output is not None:
        try:
            write_audio(cmd.output, result.audio)
            wrote.append(cmd.output)
        except OSError as e:
            logger.error("%s", e)
    if cmd.transcript is not None:
        try:
            cmd.transcript.write_text(result.transcript, encoding="utf-8")
            wrote.append(cmd.transcript)
        except OSError as e:
            logger.error("cannot write %s: %s", cmd.transcript, e)
    if cmd.telemetry is not None:
        try:
            cmd.telemetry.write_text("".join(json.dumps(m) + "\n" for m in result.telemetry),
                                     encoding="utf-8")
            wrote.append(cmd.telemetry)
        except OSError as e:
            logger.error("cannot write %s: %s", cmd.telemetry, e)
    return wrote


def _exit_code(cmd: ChatCommand, result: ChatResult) -> int:
    if result.error is not None:
        code = ExitCode.CONNECTION if result.error_kind == "connection" else ExitCode.SERVER
        if result.error_kind == "refused":
            retry = " (try again later)" if result.close_code == 1013 else ""
            logger.error("the server refused the session: %s%s", result.error, retry)
        else:
            logger.error("the session ended with an error: %s", result.error)
        if result.started:
            logger.error("outputs are partial: %d of %d frames answered", result.frames_received,
                         max(result.frames_sent - 1, 0))
        return code
    if result.interrupted and not cmd.mic:
        return ExitCode.INTERRUPTED
    return ExitCode.OK


def _fmt(x: Any) -> str:
    """A figure, or n/a: telemetry fields are the server's words and may be missing or odd."""
    return f"{x:.4g}" if _is_number(x) else "n/a"


def _fmt_ms(x: float | None) -> str:
    return f"{x:.1f} ms" if x is not None else "n/a"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _print_summary(cmd: ChatCommand, result: ChatResult, wrote: list[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not result.started:
        return
    s: dict[str, Any] = result.summary()
    con = Console()
    status = "complete" if result.ok and not result.interrupted else \
        ("interrupted" if result.error is None else "ended with an error (partial)")
    t = Table(title=f"moshi-ttt chat: session {s['session'] or '?'} ({s['mode']}), {status}",
              show_header=False)
    t.add_column("", style="bold", no_wrap=True)
    t.add_column("", overflow="fold")
    t.add_row("server", result.url)
    t.add_row("frames sent", f"{s['frames_sent']} ({s['seconds_sent']:.2f} s of audio)")
    t.add_row("frames received", f"{s['frames_received']} ({s['seconds_received']:.2f} s of "
              f"audio)")
    t.add_row("first-audio latency", _fmt_ms(s["first_audio_latency_ms"]))
    t.add_row("round trip p50 / p99", f"{_fmt_ms(s['rtt_p50_ms'])} / {_fmt_ms(s['rtt_p99_ms'])}")
    t.add_row("wall time", f"{s['wall_s']:.2f} s"
              + (f" ({s['seconds_sent'] / s['wall_s']:.1f}x real time)" if s["wall_s"] else ""))
    t.add_row("most frames ahead", str(s["max_frames_ahead"]))
    tel = s["telemetry"]
    if tel is not None:
        b, a = tel["inner_loss_before"], tel["inner_loss_after"]
        t.add_row("TTT inner loss, first -> last",
                  f"before the update {_fmt(b[0])} -> {_fmt(b[1])}, after it {_fmt(a[0])} -> "
                  f"{_fmt(a[1])} ({tel['messages']} telemetry messages, {tel['frames']} frames)")
        t.add_row("TTT drift ||W-W0||/||W0||", f"{_fmt(tel['drift'])} at the end"
                  + (f"; input dependence {_fmt(tel['input_dependence'])} of W0's"
                     if tel["input_dependence"] is not None else ""))
    else:
        t.add_row("TTT telemetry", "none received (telemetry off on the server?)")
    if result.error:
        t.add_row("error", result.error)
    con.print(t)
    for p in wrote:  # unwrapped, so that the paths can be copied
        con.print(f"wrote {p}" + (" (partial)" if not result.ok or result.interrupted else ""),
                  soft_wrap=True, markup=False, highlight=False)
    con.print("transcript:", style="bold")
    con.print(result.transcript if result.transcript else "(no text)", markup=False,
              highlight=False)

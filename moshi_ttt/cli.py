"""`moshi-ttt` command line. Each subcommand imports its own machinery lazily so that `--help`
and light commands start fast."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="moshi-ttt",
    help="TTT-MLP layers for Moshi: inspect, train, serve, chat, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks that print measured figures (they assert nothing).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

logger = logging.getLogger("moshi_ttt")


def setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(rich_tracebacks=False, show_path=False,
                              console=_stderr_console())],
        force=True,
    )


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _cpu_defaults() -> None:
    # moshi compiles some functions lazily; on CPU that costs seconds per shape for no gain.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("NO_TORCH_COMPILE", "1")


def fail(msg: str, code: int = 2) -> None:
    logger.error(msg)
    raise typer.Exit(code)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    setup_logging(verbose)


@app.command()
def inspect(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="project YAML config"),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="a checkpoint directory written by `moshi-ttt train`"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Build the model on the meta device (no weights, no memory) and print its dims and
    parameter counts, as detected from the built modules and checked against the config."""
    _cpu_defaults()
    import torch

    from .config import ConfigError, load_config
    from .dims import DimensionMismatch, describe, validate
    from .model import build_ttt_lm

    if (config is None) == (checkpoint is None):
        fail("give exactly one of --config or --checkpoint")
    try:
        if checkpoint is not None:
            from .checkpoint import inspect_checkpoint

            info = inspect_checkpoint(checkpoint)
        else:
            cfg = load_config(config)
            lm = build_ttt_lm(cfg, device="meta", dtype=torch.bfloat16)
            validate(lm, cfg.lm, cfg.ttt, context=str(config))
            info = describe(lm, cfg.ttt)
    except (ConfigError, DimensionMismatch, FileNotFoundError, ValueError) as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        _print_description(info)


def _print_description(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title="transformers (detected from the built modules)")
    for col in ("", "d_model", "heads", "head_dim", "layers", "ffn hidden", "context"):
        t.add_column(col, justify="right")
    for name in ("main", "depformer"):
        d = info.get(name)
        if d:
            t.add_row(name, *(str(d[k]) for k in ("d_model", "num_heads", "head_dim",
                                                   "num_layers", "ffn_hidden", "context")))
    con.print(t)
    ttt = info["ttt"]
    con.print(f"TTT main layers: {_ranges(ttt['layers'])}   depformer layers: "
              f"{_ranges(ttt['depformer_layers'])}   K={ttt['mini_batch_size']}  "
              f"heads={ttt['num_heads']}  head_dim={ttt['head_dim']}  "
              f"mlp_hidden={ttt['mlp_hidden']}")
    p = Table(title="parameters")
    p.add_column("set")
    p.add_column("count", justify="right")
    for k, v in info["params"].items():
        p.add_row(k, f"{v:,}")
    con.print(p)
    if "checkpoint" in info:
        con.print(f"checkpoint: {json.dumps(info['checkpoint'])}")


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}..{prev}" if prev != start else f"{start}")
        if x is not None:
            start = prev = x
    return ",".join(out)


@bench_app.command("ttt")
def bench_ttt(
    frames: int = typer.Option(256, help="frames for the parallel vs naive comparison"),
    dims: str = typer.Option("1024,4096", help="d_model values for the streaming-step comparison"),
    steps: int = typer.Option(20, help="timed streaming steps per layer"),
    device: str = typer.Option("auto", help="cpu, cuda or auto"),
    dtype: str = typer.Option("auto", help="float32, bfloat16 or auto (bf16 on GPU)"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="also write figures here"),
) -> None:
    """Dual form vs naive loop, hybrid vs plain layer step, per-session TTT state bytes."""
    _cpu_defaults()
    from .bench_ttt import run_bench

    res = run_bench(frames=frames, dims=[int(d) for d in dims.split(",") if d],
                    steps=steps, device=device, dtype=dtype)
    if json_out:
        json_out.write_text(json.dumps(res, indent=2))


def run() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

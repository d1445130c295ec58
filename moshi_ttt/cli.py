"""`moshi-ttt` command line. Each subcommand imports its own machinery lazily so that `--help`
and light commands start fast."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from inspect import cleandoc  # (`inspect` is a command here)
from pathlib import Path
from typing import NoReturn, Optional

import typer

app = typer.Typer(
    name="moshi-ttt",
    help="TTT-MLP layers for Moshi: inspect, train, serve, chat, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Run benchmarks that print measured figures.\n\nThey assert "
                        "nothing; the README's benchmark table names the command of each figure.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

logger = logging.getLogger("moshi_ttt")


def setup_logging(verbose: bool = False) -> None:
    """Rich output on a terminal; plain one-line records otherwise (log files and collectors
    must not get messages wrapped at 80 columns)."""
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(rich_tracebacks=False, show_path=False,
                                               console=_stderr_console())
        fmt, datefmt = "%(message)s", "[%X]"
    else:
        handler = _CurrentStderr()
        fmt, datefmt = "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
    handler.setFormatter(logging.Formatter(fmt, datefmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted: a handler that kept the stream
    of its creation would write into a closed file once a caller (a test runner, an embedding
    app) swapped stderr back."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _cpu_defaults() -> None:
    # moshi compiles some functions lazily; on CPU that costs seconds per shape for no gain.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("NO_TORCH_COMPILE", "1")


def fail(msg: str, code: int = 2) -> NoReturn:
    """A documented failure: its message on stderr (no traceback) and exit status `code`."""
    logger.error(msg)
    raise typer.Exit(code)


def reason(e: BaseException) -> str:
    """The message of a documented error. A pydantic validation error, raised directly or as
    the cause of a config/settings error, becomes one line (`field: problem (got value)`)
    instead of pydantic's multi-line report with its documentation links."""
    from pydantic import ValidationError

    v = e if isinstance(e, ValidationError) else e.__cause__
    if not isinstance(v, ValidationError):
        return str(e)
    problems = []
    for err in v.errors():
        where = ".".join(str(x) for x in err["loc"])
        text = err["msg"].removeprefix("Value error, ")
        if err["type"] not in ("value_error", "missing") and "input" in err:
            text += f" (got {err['input']!r})"
        problems.append(f"{where}: {text}" if where else text)
    head = f"invalid {v.title}" if v is e else str(e).split("\n", 1)[0].rstrip(": ")
    return f"{head}: {'; '.join(problems)}"


def os_reason(e: OSError) -> str:
    """An I/O failure as one line naming the file: `path: No such file or directory`."""
    if e.filename is None:
        return str(e)
    return f"{e.filename}: {e.strerror or e}"


def writable_file(path: Path, flag: str = "--out") -> None:
    """Refuse, before a long run, an output file that could not be written at its end: a
    directory, or a folder that cannot be made or written to (exit 2, one line)."""
    if path.is_dir():
        fail(f"{flag} {path}: is a directory, expected a file path")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{flag} {path}: cannot make its folder ({os_reason(e)})")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"{flag} {path}: its folder {parent} is not writable")


def config_path(path: Optional[Path]) -> Optional[Path]:
    """Callback of every config option: the README's `configs/NAME.yaml` also works outside a
    checkout (a wheel install), naming the packaged config (`moshi_ttt.resources`)."""
    if path is None:
        return None
    from .resources import resolve_config

    return resolve_config(path)


def json_out_path(path: Optional[Path]) -> Optional[Path]:
    """Callback of the benchmarks' --json-out: a path that could not be written is refused
    before the run, not with a traceback after it."""
    if path is not None:
        writable_file(path, "--json-out")
    return path


def check_device(device: Optional[str], flag: str = "--device") -> None:
    """A device that cannot be used (a typo, CUDA on a machine without it) is one line now,
    not a torch assertion deep inside a run."""
    if device is None or device == "auto":
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        fail(f"{flag} {device!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU build" if torch.version.cuda is None else "no GPU visible"
        fail(f"{flag} {device}: torch sees no CUDA device (torch {torch.__version__}, {build}); "
             f"use {flag} cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        fail(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def int_list(text: str, flag: str, multiple_of: int = 1) -> list[int]:
    """A comma-separated list of positive integers (each a multiple of `multiple_of`)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 or v % multiple_of for v in values):
        what = f"positive multiples of {multiple_of}" if multiple_of > 1 else "positive integers"
        fail(f"{flag} {text!r}: expected comma-separated {what}, e.g. "
             f"{multiple_of},{4 * multiple_of}")
    return values


def at_least(value: Optional[float], minimum: float, flag: str) -> None:
    if value is not None and value < minimum:
        fail(f"{flag} must be at least {minimum:g}, got {value:g}")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    setup_logging(verbose)


@app.command()
def inspect(
    config: Optional[Path] = typer.Option(None, "--config", "-c", callback=config_path,
                                          help="project YAML config"),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="a checkpoint directory written by `moshi-ttt train`, or "
        "hf://OWNER/REPO[@REVISION] (pushed with `moshi-ttt push`)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Print a model's dims and parameter counts.

    The model is built on the meta device (no weights, no memory); dims are detected from the
    built modules and checked against the config (and a checkpoint's weight file headers).
    """
    _cpu_defaults()
    import torch

    from .base import BaseModelError
    from .checkpoint import CheckpointError, inspect_checkpoint
    from .config import ConfigError, load_config
    from .dims import DimensionMismatch, describe, validate
    from .hub import resolve_checkpoint
    from .model import build_ttt_lm

    if (config is None) == (checkpoint is None):
        fail("give exactly one of --config or --checkpoint")
    try:
        if checkpoint is not None:
            info = inspect_checkpoint(resolve_checkpoint(checkpoint))
        else:
            cfg = load_config(config)
            lm = build_ttt_lm(cfg, device="meta", dtype=torch.bfloat16)
            validate(lm, cfg.lm, cfg.ttt, context=str(config))
            info = describe(lm, cfg.ttt)
    except (ConfigError, CheckpointError, BaseModelError, DimensionMismatch,
            ValueError) as e:  # ValueError: a weight file whose header cannot be read
        fail(reason(e))
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


@app.command("init-base")
def init_base(
    out: Path = typer.Argument(..., help="directory to write the base into"),
    config: Path = typer.Option(..., "--config", "-c", callback=config_path,
                                help="project YAML config"),
    calibrate_on: Optional[Path] = typer.Option(
        None, "--calibrate-on", help="dataset (a make-data directory, or its train.jsonl) whose "
        "training split calibrates the random base's codec"),
    codec_from: Optional[Path] = typer.Option(
        None, "--codec-from", help="or copy the calibrated codec of this base (same Mimi config)"),
    no_calibrate: bool = typer.Option(
        False, "--no-calibrate", help="keep the random codec: its codebooks are zero, every frame "
        "encodes to code 0 (for tests of that case)"),
    tokenizer: Optional[Path] = typer.Option(
        None, help="sentencepiece model for a random base [DATA/tokenizer.model with "
        "--calibrate-on DATA]"),
    hf_repo: Optional[str] = typer.Option(
        None, "--hf-repo", help="take the base from this Hugging Face repo instead of random"),
    revision: Optional[str] = typer.Option(None, help="Hugging Face revision"),
    local: Optional[Path] = typer.Option(None, "--local", help="or from a local moshi-layout dir"),
    seed: int = typer.Option(0, help="seed of the random initialisation"),
) -> None:
    """Write a base model directory in moshi's layout.

    Random from --config, with its codec calibrated on speech, or taken from a Hugging Face
    repo or a local directory.
    """
    _cpu_defaults()
    from .base import BaseModelError, init_random_base, materialize_base, resolve_base
    from .config import BaseModelRef, ConfigError, load_config
    from .data.index import DataError
    from .dims import DimensionMismatch

    codec_choices = (calibrate_on is not None) + (codec_from is not None) + no_calibrate
    if hf_repo and local:
        fail("give one of --hf-repo REPO or --local DIR, not both")
    if revision and not hf_repo:
        fail("--revision applies to --hf-repo")
    if tokenizer is not None and (hf_repo or local):
        fail("--tokenizer is for a random base: a base from --hf-repo or --local keeps its own")
    try:
        cfg = load_config(config)
        if hf_repo or local:
            if codec_choices:
                fail("--calibrate-on, --codec-from and --no-calibrate are for random bases: a "
                     "base from --hf-repo or --local keeps its own Mimi")
            ref = BaseModelRef(hf_repo=hf_repo, revision=revision,
                               local_dir=str(local) if local else None)
            resolved = resolve_base(ref)
            materialize_base(resolved, cfg, out)
            for note in resolved.notes:
                logger.info(note)
        else:
            if codec_choices != 1:
                fail("a random base needs a codec: pass --calibrate-on DATA (a dataset from "
                     "`moshi-ttt make-data DATA`) to calibrate it on speech, --codec-from BASE "
                     "to copy a calibrated one, or --no-calibrate to keep it random (every "
                     "frame then encodes to code 0); exactly one of them")
            if calibrate_on is not None and not calibrate_on.exists():
                fail(f"calibration data not found: --calibrate-on {calibrate_on} (expected a "
                     f"dataset directory from `moshi-ttt make-data`, or its train.jsonl)")
            if tokenizer is None and calibrate_on is not None and calibrate_on.is_dir():
                tokenizer = calibrate_on / "tokenizer.model"
            if tokenizer is None:
                fail("a random base needs --tokenizer (e.g. DATA/tokenizer.model from "
                     "`moshi-ttt make-data DATA`), or pass --hf-repo / --local")
            init_random_base(cfg, out, tokenizer, seed=seed, calibrate_on=calibrate_on,
                             codec_from=codec_from)
    except (ConfigError, BaseModelError, DimensionMismatch, DataError) as e:
        fail(reason(e))
    except OSError as e:  # e.g. an output directory that cannot be written
        fail(os_reason(e))
    typer.echo(str(out))


@app.command("codec-report")
def codec_report_cmd(
    base: str = typer.Argument(..., help="base directory (init-base) or hf://OWNER/REPO"),
    wavs: list[Path] = typer.Argument(..., help="audio files (every channel is a signal)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
) -> None:
    """Measure how well a base's Mimi codec carries speech.

    Codes used and perplexity per RVQ level, SNR and log-mel L1 of decode(encode(x)).
    """
    _cpu_defaults()
    from .base import BaseModelError, load_codec, resolve_base
    from .codec.report import CodecReportError, codec_report, format_report
    from .config import BaseModelRef
    from .dims import DimensionMismatch

    check_device(device)
    try:
        ref = BaseModelRef(hf_repo=base.removeprefix("hf://")) if base.startswith("hf://") \
            else BaseModelRef(local_dir=base)
        mimi = load_codec(resolve_base(ref), device)
        report = codec_report(mimi, wavs)
    except (BaseModelError, CodecReportError, DimensionMismatch) as e:
        fail(reason(e))
    typer.echo(json.dumps(report) if as_json else format_report(report))


@app.command()
def train(
    config: Path = typer.Option(..., "--config", "-c", callback=config_path,
                                help="project YAML config"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory (checkpoints, metrics)"),
    data: Optional[Path] = typer.Option(None, help="training index .jsonl (or train.data)"),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="held-out index .jsonl"),
    base: Optional[Path] = typer.Option(None, help="base directory (from init-base)"),
    hf_repo: Optional[str] = typer.Option(None, "--hf-repo", help="or a Hugging Face repo"),
    steps: Optional[int] = typer.Option(None, help="train.max_steps"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="per-process batch"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum"),
    lr: Optional[float] = typer.Option(None, help="TTT learning rate"),
    segment_seconds: Optional[float] = typer.Option(None, "--segment-seconds"),
    ckpt_every: Optional[int] = typer.Option(None, "--ckpt-every"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every"),
    stop_after: Optional[int] = typer.Option(
        None, "--stop-after", help="stop after this step (as if interrupted; resumable)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, or auto"),
    seed: Optional[int] = typer.Option(None),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT's latest checkpoint"),
) -> None:
    """Train the TTT layers of a frozen Moshi.

    Optionally LoRA or full fine-tuning too. The same command under
    `torchrun --nproc_per_node N` shards with FSDP2.
    """
    _cpu_defaults()
    from .base import BaseModelError
    from .checkpoint import CheckpointError
    from .config import BaseModelRef, ConfigError, load_config
    from .data.index import DataError
    from .dims import DimensionMismatch
    from .train.settings import TrainSettings
    from .train import distributed as dist_util
    from .train.trainer import TrainingError, train as run_training

    def refuse(msg: str) -> NoReturn:
        if dist_util.is_torchrun():  # a plain exit can abort in teardown: see exit_worker
            dist_util.exit_worker(msg, 2)
        fail(msg)

    check_device(device)
    try:
        cfg = load_config(config)
        overrides = {
            "data": str(data) if data else None, "eval_data": str(eval_data) if eval_data else None,
            "max_steps": steps, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
            "segment_seconds": segment_seconds, "ckpt_every": ckpt_every,
            "eval_every": eval_every, "device": device, "seed": seed, "stop_after": stop_after,
        }
        settings = TrainSettings.from_config(cfg.train, overrides)
        base_ref = None
        if base and hf_repo:
            refuse("give one of --base DIR or --hf-repo REPO, not both")
        if base or hf_repo:
            base_ref = BaseModelRef(local_dir=str(base) if base else None, hf_repo=hf_repo)
        last = run_training(cfg, settings, out, base_override=base_ref, resume=resume)
    except (ConfigError, BaseModelError, CheckpointError, DimensionMismatch, DataError,
            TrainingError, ValueError) as e:  # ValueError: flags TrainSettings refuses
        refuse(reason(e))
    except OSError as e:  # e.g. a run directory that cannot be written
        refuse(os_reason(e))
    if last:
        logger.info("done: step %s, loss %.4f; checkpoints in %s", last.get("step"),
                    last.get("loss", float("nan")), out / "checkpoints")


@app.command()
def demo(
    workdir: Path = typer.Option(Path("runs/demo"), "--workdir", help="where everything goes"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", callback=config_path,
                                          help="project config [configs/tiny.yaml]"),
    steps: Optional[int] = typer.Option(None, help="training steps [the config's]"),
    mode: str = typer.Option("opus", help="client audio: opus or pcm"),
    dialogues: int = typer.Option(16, help="dialogues to synthesise"),
) -> None:
    """Run the offline job: data, base, training, serving, chat.

    Synthesise data, make a tiny base, train its TTT layers, serve the checkpoint and talk to
    it with the Python client. A second run reuses what the first built.
    """
    _cpu_defaults()
    from .config import ConfigError, load_config
    from .demo import TINY, current_step, run_demo

    # Usage errors first (exit 2): they are the caller's, not a step's.
    try:
        load_config(config or TINY)
    except ConfigError as e:
        fail(reason(e))
    if mode not in ("opus", "pcm"):
        fail(f"--mode {mode!r}: expected opus or pcm")
    if dialogues < 3:
        fail(f"--dialogues must be at least 3 (two are held out for evaluation), got {dialogues}")
    at_least(steps, 1, "--steps")
    try:
        res = run_demo(workdir, config or TINY, steps, mode, dialogues)
    except Exception as e:  # noqa: BLE001 - any failure ends the demo: say in which step
        logger.debug("the demo failed", exc_info=e)
        fail(f"demo failed in step {current_step()}: {type(e).__name__}: {e} (-v shows the "
             f"traceback)", code=1)
    typer.echo(f"\noutput audio : {res['output_audio']}\ntranscript   : {res['transcript']}"
               f"\ncheckpoint   : {res['checkpoint']}\nserver log   : {res['server_log']}"
               f"\nreply codes  : distinct codes per level {res['reply_codes_used']}"
               f"\naudio loss   : {_loss_line(res['audio_loss'])}"
               f"\n/health      : {json.dumps(res['health'], indent=2)}"
               f"\ndone in {res['seconds']} s")


def _loss_line(loss: dict | None) -> str:
    if not loss:
        return "(no metrics)"
    return (f"{loss['first']:.3f} at step {loss['first_step']} -> {loss['last']:.3f} at step "
            f"{loss['last_step']}")


@app.command("make-data")
def make_data(
    out: Path = typer.Argument(..., help="directory to write the dataset into"),
    dialogues: int = typer.Option(16, help="number of dialogues"),
    seed: int = typer.Option(0),
    vocab_size: int = typer.Option(1000, "--vocab-size", help="text tokenizer vocabulary cap"),
) -> None:
    """Synthesise a small two-speaker dataset offline.

    With espeak-ng, in moshi-finetune's format, with exact word alignments and a sentencepiece
    tokenizer trained on its transcripts.
    """
    from .data.synth import SynthesisError, synthesize_dataset

    try:
        res = synthesize_dataset(out, n_dialogues=dialogues, seed=seed, vocab_size=vocab_size)
    except (SynthesisError, ValueError) as e:  # ValueError: too few dialogues, tiny vocabulary
        fail(reason(e))
    except OSError as e:  # e.g. OUT is a file
        fail(os_reason(e))
    typer.echo(str(out))
    logger.info("%s", res)


@app.command()
def serve(
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="run dir (latest checkpoint), checkpoint dir, init-base dir, "
        "or hf://OWNER/REPO[@REVISION]"),
    settings_file: Optional[Path] = typer.Option(
        None, "--settings", help="YAML with server settings (or a project config's serve:)"),
    host: Optional[str] = typer.Option(None, help="interface to bind [127.0.0.1]"),
    port: Optional[int] = typer.Option(None, help="port [8998]; 0 = any free port"),
    max_sessions: Optional[int] = typer.Option(None, "--max-sessions",
                                               help="concurrent sessions = batch rows [4]"),
    device: Optional[str] = typer.Option(None, help="auto, cuda, cuda:N or cpu [auto]"),
    dtype: Optional[str] = typer.Option(None, help="auto, bfloat16 or float32 [auto]"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="require this API key"),
    seed: Optional[int] = typer.Option(None, help="seed the sampler at start-up"),
    greedy: bool = typer.Option(False, "--greedy", help="argmax instead of sampling"),
    random_config: Optional[Path] = typer.Option(
        None, "--random-config", callback=config_path,
        help="serve this config with random weights instead of a "
        "checkpoint (benchmarks at real sizes without downloads)"),
    ssl_certfile: Optional[Path] = typer.Option(
        None, "--ssl-certfile", help="serve https/wss with this PEM certificate (chain); a "
        "browser on another machine gets the microphone only over https"),
    ssl_keyfile: Optional[Path] = typer.Option(
        None, "--ssl-keyfile", help="the certificate's PEM private key (unencrypted)"),
    ray: bool = typer.Option(False, "--ray", help="deploy on Ray Serve: one replica per GPU "
                             "(or CPU replicas), each with --max-sessions slots, behind one "
                             "address (needs moshi-ttt[ray])"),
    replicas: int = typer.Option(1, "--replicas", min=1, help="Ray Serve replicas [1]"),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="an existing Ray cluster (e.g. ray://head:10001 or auto); "
        "default: a local Ray started for this command"),
) -> None:
    """Serve a checkpoint over websockets, with a browser client.

    Moshi's protocol plus PCM and token modes at /api/chat, the browser client at /. Every dim
    is validated before the port is bound. Settings: flags > MOSHI_TTT_* environment
    variables > --settings YAML > defaults.
    """
    _cpu_defaults()
    from server.main import serve as run_server
    from server.settings import ServeSettings, SettingsError

    from .base import BaseModelError

    try:
        settings = ServeSettings.load(
            settings_file, checkpoint=checkpoint, host=host, port=port,
            max_sessions=max_sessions, device=device, dtype=dtype, api_key=api_key, seed=seed,
            use_sampling=False if greedy else None, random_config=random_config,
            ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    except SettingsError as e:
        fail(reason(e))
    if ray:
        if settings.ssl_certfile is not None:
            fail("--ray serves plain http/ws through Ray's proxy: put TLS in front of it "
                 "(a load balancer or ingress), not --ssl-certfile or ssl_certfile")
        try:
            from server.ray_serve import serve_ray
        except ImportError as e:
            fail(f"--ray needs Ray Serve ({e}): pip install 'moshi-ttt[ray]'")
    try:
        code = serve_ray(settings, replicas, ray_address) if ray else run_server(settings)
    except BaseModelError as e:  # the header check of a base dir that lacks a file
        fail(f"refusing to start: {e}")
    raise typer.Exit(code)


@app.command()
def push(
    checkpoint: Path = typer.Argument(..., metavar="RUN_OR_CHECKPOINT",
                                      help="run dir (its latest checkpoint) or checkpoint dir "
                                      "written by `moshi-ttt train`"),
    repo: str = typer.Argument(..., metavar="OWNER/REPO",
                               help="Hugging Face repository to upload to (created if missing)"),
    private: bool = typer.Option(False, "--private", help="create the repository private"),
) -> None:
    """Upload a checkpoint to the Hugging Face Hub.

    One commit with the TTT weights, the checkpoint's config (dims, base reference and
    fingerprint) and a model card (dims, parameter counts, the run's eval figures); never the
    frozen base. The checkpoint is validated against its base first. Log in with `hf auth
    login` or set HF_TOKEN. Prints the hf://OWNER/REPO@COMMIT spec that `serve --checkpoint`
    and `inspect --checkpoint` take.
    """
    _cpu_defaults()
    from .base import BaseModelError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .dims import DimensionMismatch
    from .hub import push as push_checkpoint

    try:
        spec = push_checkpoint(checkpoint, repo, private=private)
    except (CheckpointError, BaseModelError, ConfigError, DimensionMismatch,
            ValueError) as e:  # ValueError: a weight file whose header cannot be read
        fail(reason(e))
    except OSError as e:
        fail(os_reason(e))
    typer.echo(spec)


@app.command("tls-cert")
def tls_cert(
    out: Path = typer.Argument(..., help="directory to write ca.pem, cert.pem and key.pem into"),
    hosts: Optional[list[str]] = typer.Option(
        None, "--host", help="a host name or IP address clients will use to reach the server "
        "(repeatable); localhost, 127.0.0.1 and ::1 are always included"),
    days: int = typer.Option(365, help="validity in days (at most 398, what browsers accept)"),
    force: bool = typer.Option(False, "--force", help="replace existing files"),
) -> None:
    """Make a self-signed TLS certificate for serve.

    A one-off local CA (ca.pem; its private key is not kept) signs a server certificate
    (cert.pem) for the given hosts; key.pem is its private key. Clients trust the server with
    `moshi-ttt chat --ca-file DIR/ca.pem` or by importing ca.pem into the browser.
    """
    from .tls import CA_NAME, TLSError, make_self_signed

    try:
        files = make_self_signed(out, hosts or [], days=days, overwrite=force)
    except TLSError as e:
        fail(str(e))
    except OSError as e:
        fail(os_reason(e))
    host = (hosts or ["127.0.0.1"])[0]
    url_host = f"[{host}]" if ":" in host else host
    logger.info("wrote %s, %s and %s", out / CA_NAME, files.certfile, files.keyfile)
    typer.echo(f"serve:   moshi-ttt serve ... --ssl-certfile {files.certfile} --ssl-keyfile "
               f"{files.keyfile}\nchat:    moshi-ttt chat --url wss://{url_host}:8998 "
               f"--ca-file {out / CA_NAME} ...\nbrowser: https://{url_host}:8998/ (import "
               f"{out / CA_NAME} as a trusted authority, or accept the warning)")


@app.command("eval-memory")
def eval_memory(
    config: Path = typer.Option(..., "--config", "-c", callback=config_path,
                                help="project YAML config (eval.memory)"),
    quick: bool = typer.Option(False, "--quick", help="tiny task and budget: checks the "
                               "machinery in seconds, says nothing about memory"),
    steps: Optional[int] = typer.Option(None, help="optimiser steps per method"),
    seed: Optional[int] = typer.Option(None, help="run this seed only [the config's seeds]"),
    sets: Optional[list[str]] = typer.Option(
        None, "--set", help="override an eval.memory setting, e.g. --set lr=0.01 "
        "--set tasks=[text] --set train_on=dependent (repeatable)"),
    codec: Optional[Path] = typer.Option(
        None, "--codec", help="base directory whose calibrated codec encodes the speech task's "
        "words [runs/eval-memory/codec, made (make-data + init-base --calibrate-on) if missing]"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads per worker [1]"),
    workers: Optional[int] = typer.Option(
        None, min=1, help="processes running the (task, seed, method) jobs side by side [2]"),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="results JSON [runs/eval-memory/results(-quick).json]"),
) -> None:
    """Compare TTT, LoRA and the frozen base on long-range recall.

    Recall of text and of speech, beyond every attention window.
    """
    _cpu_defaults()
    from .base import BaseModelError
    from .config import ConfigError, load_config
    from .data.index import DataError
    from .data.synth import SynthesisError
    from .eval.memory import (
        EvalWorkerError, MemoryEvalSettings, format_table, make_eval_codec, reusable_eval_codec,
        run_memory_eval, write_results,
    )

    root = Path("runs/eval-memory")
    path = out or root / ("results-quick.json" if quick else "results.json")
    writable_file(path)
    try:
        cfg = load_config(config)
        settings = MemoryEvalSettings.from_config(
            cfg, quick=quick, sets=sets, steps=steps, threads=threads, workers=workers,
            seeds=[seed] if seed is not None else None)
        make_codec = None
        if "speech" in settings.tasks and codec is None:
            codec = reusable_eval_codec(cfg, root, settings.threads)
            if codec is None:  # made in a worker, beside the text task's first trainings
                make_codec = functools.partial(make_eval_codec, cfg, root)
        # the text TTT model (for eval-stability --recall-model) lies beside the results
        report = run_memory_eval(cfg, settings, codec=codec, out_dir=path.parent,
                                 make_codec=make_codec)
    except (ConfigError, ValueError, BaseModelError, DataError, SynthesisError,
            EvalWorkerError) as e:
        fail(reason(e))
    typer.echo(format_table(report))
    try:
        write_results(report, path)
    except OSError as e:  # the table above is the run's result; say where it did not go
        fail(f"the results could not be written: {os_reason(e)}")
    logger.info("results written to %s (%.0f s)", path, report["wall_seconds"])


@app.command("diagnose-ttt")
def diagnose_ttt(
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", callback=config_path,
        help="project YAML config: a random model of it, or with --checkpoint BASE its TTT "
        "on that base"),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="a run, checkpoint or base directory, or "
        "hf://OWNER/REPO[@REVISION]"),
    frames: int = typer.Option(1000, help="frames to stream (12.5 per second)"),
    data: Optional[Path] = typer.Option(
        None, "--data", help="stream this dataset's speech (a make-data directory or an index "
        ".jsonl), encoded by the checkpoint's codec; default: random tokens"),
    every: Optional[int] = typer.Option(None, help="frames between records [4 x K]"),
    seed: int = typer.Option(0, help="seed of the random model, inputs and probe queries"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Report per layer whether the TTT inner learner still learns.

    Streams frames through a TTT model and reports, per layer over time, whether its inner
    learner still depends on its input, its fast-weight norms and its step size.
    """
    _cpu_defaults()
    import torch

    from .checkpoint import CheckpointError, load_model
    from .config import ConfigError, load_config
    from .data.index import DataError
    from .dims import DimensionMismatch
    from .diagnostics import diagnose
    from .eval.diagnose import dataset_codes, format_diagnosis, random_codes
    from .hub import resolve_checkpoint
    from .model import build_ttt_lm, calibrate_ttt

    if config is None and checkpoint is None:
        fail("give --config, --checkpoint or both (a config's TTT on a base directory)")
    if frames < 1:
        fail(f"--frames must be at least 1, got {frames}")
    if every is not None and every < 1:  # 0 meant the default, a negative every frame
        fail(f"--every must be at least 1, got {every}")
    try:
        cfg = load_config(config) if config is not None else None
        if checkpoint is not None:
            # with -c, the config's TTT (fresh, seeded) on the base's weights and codec: a design
            # measured on speech before any training; a trained checkpoint's config is fixed
            loaded = load_model(resolve_checkpoint(checkpoint), "cpu", torch.float32,
                                with_codec=data is not None, cfg_override=cfg, seed=seed)
            lm, cfg, fresh = loaded.lm, loaded.cfg, loaded.ref.kind != "ttt"
            where = f"{config}'s TTT on {checkpoint}" if config is not None else str(checkpoint)
        else:
            if data is not None:
                fail("--data needs --checkpoint (a base or run whose codec encodes the speech)")
            torch.manual_seed(seed)
            lm, where, fresh = build_ttt_lm(cfg), f"random {config}", True
        codes = dataset_codes(loaded, data, frames) if data is not None else \
            random_codes(lm, frames, seed)
        if fresh and cfg.ttt.calibrated:
            calibrate_ttt(lm, codes)  # as train starts a fresh run: calibrated on its first frames
            where += " (calibrated on the streamed frames: " + ", ".join(
                w for w, on in (("q/k/v whitened", cfg.ttt.qkv_init == "whitened"),
                                ("read-out fitted to the text head",
                                 cfg.ttt.out_init == "unembedding" and bool(cfg.ttt.layers)),
                                ("output scale matched",
                                 cfg.ttt.out_init in ("matched", "unembedding"))) if on
            ) + ")"
        report = diagnose(lm, codes, every=every, seed=seed)
    except (ConfigError, CheckpointError, DimensionMismatch, DataError, ValueError) as e:
        fail(reason(e))
    report["source"] = f"{where}, {'speech of ' + str(data) if data else 'random tokens'}"
    typer.echo(json.dumps(report) if as_json else format_diagnosis(report))
    for lay in report["layers"]:
        if lay["collapsed"]:
            logger.warning("layer %d: the inner output has collapsed (input dependence %.3f of "
                           "its value at W0)", lay["layer"], lay["final_ratio"])


@app.command("eval-stability")
def eval_stability(
    config: Path = typer.Option(..., "--config", "-c", callback=config_path,
                                help="project YAML config with TTT"),
    frames: Optional[int] = typer.Option(None, help="session length [15000 = 20 min]"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="sessions at once [1]"),
    driver: Optional[str] = typer.Option(
        None, help="lmgen (the model samples, as served) or tokens (random tokens forced) [lmgen]"),
    seed: Optional[int] = typer.Option(None),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads [1]"),
    recall_model: Optional[Path] = typer.Option(
        None, "--recall-model", help="also stream sessions through the TTT model eval-memory "
        "trained (runs/eval-memory/ttt-text.pt): distractors for the whole session, content to "
        "recall at its very end"),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="report JSON [runs/eval-stability/results.json]"),
) -> None:
    """Run one long session: norms, step time, memory, late recall.

    Fast-weight norms, per-frame step time, resident memory, and recall of late content.
    """
    _cpu_defaults()
    from .config import ConfigError, load_config
    from .eval.stability import (
        StabilitySettings, check_late_recall_frames, format_late_recall, format_summary,
        late_recall, load_recall_model, run_stability, write_report,
    )

    path = out or Path("runs/eval-stability") / "results.json"
    writable_file(path)
    try:
        cfg = load_config(config)
        settings = StabilitySettings.from_config(cfg, frames=frames, batch_size=batch_size,
                                                 driver=driver, seed=seed, threads=threads)
        recall = load_recall_model(recall_model) if recall_model is not None else None
        if recall is not None:
            check_late_recall_frames(recall, settings.frames)  # before the session, not after
        report = run_stability(cfg, settings)
        if recall is not None:
            report["late_recall"] = late_recall(
                recall, settings.frames, seed=settings.seed, threads=settings.threads,
                reference_frame=settings.reference_frame)
    except (ConfigError, ValueError) as e:
        fail(reason(e))
    typer.echo(format_summary(report))
    if "late_recall" in report:
        typer.echo(format_late_recall(report["late_recall"]))
    try:
        write_report(report, path)
    except OSError as e:
        fail(f"the report could not be written: {os_reason(e)}")
    logger.info("report written to %s", path)
    finite = report["finite"] and report.get("late_recall", {}).get("finite", True)
    if not finite:
        fail("fast weights became non-finite during the session", code=1)


@app.command()
def chat(
    url: str = typer.Option("ws://127.0.0.1:8998/api/chat", "--url",
                            help="server address (ws://, wss://; no path: /api/chat)"),
    input_file: Optional[Path] = typer.Option(
        None, "--input", "-i", help="audio to send (wav or any format sphn reads; any sample "
        "rate; several channels are averaged unless --channel picks one)"),
    mic: bool = typer.Option(False, "--mic", help="talk live: microphone in, speaker out "
                             "(needs the optional 'mic' extra, sounddevice, and PortAudio)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="write the received audio (24 kHz mono wav)"),
    transcript: Optional[Path] = typer.Option(None, "--transcript",
                                              help="write the received text (even if empty)"),
    mode: str = typer.Option("opus", "--mode", help="opus (Ogg/Opus) or pcm (float32)"),
    speed: float = typer.Option(1.0, "--speed", help="send the file this many times faster "
                                "than real time"),
    fast: bool = typer.Option(False, "--fast", help="send as fast as the server answers "
                              "(bounded by --max-ahead)"),
    max_ahead: float = typer.Option(
        2.0, "--max-ahead", help="seconds of audio sent beyond the frames answered; keep it "
        "under the server's input bound (max_buffered_frames x 80 ms, 4 s by default)"),
    tail: float = typer.Option(1.0, "--tail", help="seconds of silence sent after the file, "
                               "so the model's last answers come out"),
    channel: Optional[int] = typer.Option(None, "--channel",
                                          help="use this channel (0-based) of the input"),
    duration: Optional[float] = typer.Option(None, "--duration",
                                             help="--mic: stop after this many seconds"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MOSHI_TTT_API_KEY",
                                          help="sent as the X-API-Key header"),
    timeout: float = typer.Option(10.0, "--timeout", help="seconds allowed to connect"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
    ca_file: Optional[Path] = typer.Option(
        None, "--ca-file", help="wss://: trust only this CA certificate (PEM), e.g. the ca.pem "
        "of `moshi-ttt tls-cert` [the system's trusted CAs]"),
    insecure: bool = typer.Option(False, "--insecure", help="wss://: do not check the "
                                  "server's certificate (anyone on the path can listen in)"),
    telemetry: Optional[Path] = typer.Option(
        None, "--telemetry", help="write every TTT telemetry message of the session here "
        "(JSON lines: inner loss before/after the update, drift, per layer)"),
) -> None:
    """Talk to a server: stream a file or the microphone.

    Streams to a `moshi-ttt serve` server, records the audio and text that come back, and
    reports frames, first-audio latency and per-frame round trips. Exit codes: 2 usage or
    file problem, 3 connection failed or lost, 4 refused or server error, 130 interrupted.
    """
    from client.command import ChatCommand, run_command

    raise typer.Exit(run_command(ChatCommand(
        url=url, input=input_file, mic=mic, output=output, transcript=transcript, mode=mode,
        speed=speed, fast=fast, max_ahead=max_ahead, tail=tail, channel=channel,
        duration=duration, api_key=api_key, timeout=timeout, as_json=as_json,
        ca_file=ca_file, insecure=insecure, telemetry=telemetry)))


@bench_app.command("ttt")
def bench_ttt(
    frames: int = typer.Option(256, help="frames for the parallel vs naive comparison"),
    dims: str = typer.Option("1024,4096", help="d_model values for the streaming-step comparison"),
    steps: int = typer.Option(20, help="timed streaming steps per layer"),
    rows: int = typer.Option(1, help="sessions (batch rows) in the streaming-step comparison"),
    device: str = typer.Option("auto", help="cpu, cuda or auto"),
    dtype: str = typer.Option("auto", help="float32, bfloat16 or auto (bf16 on GPU)"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", callback=json_out_path,
                                            help="also write figures here"),
) -> None:
    """Time the TTT-MLP: dual form, streaming step, state size.

    Dual form vs naive loop, hybrid vs plain layer step, per-session TTT state bytes.
    """
    _cpu_defaults()
    from .bench_ttt import run_bench

    d_models = int_list(dims, "--dims", multiple_of=128)  # heads = d_model / 128
    at_least(frames, 1, "--frames")
    at_least(steps, 1, "--steps")
    at_least(rows, 1, "--rows")
    check_device(device)
    if dtype not in ("auto", "float32", "bfloat16"):
        fail(f"--dtype {dtype!r}: expected auto, float32 or bfloat16")
    res = run_bench(frames=frames, dims=d_models, steps=steps, device=device, dtype=dtype,
                    rows=rows)
    if json_out:
        json_out.write_text(json.dumps(res, indent=2))


@bench_app.command("serve")
def bench_serve(
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="checkpoint to serve (a directory or hf://OWNER/REPO"
        "[@REVISION])"),
    random_config: Optional[Path] = typer.Option(
        None, "--random-config", callback=config_path,
        help="or a config served with random weights (e.g. the 7B)"),
    sessions: str = typer.Option("1,4", help="session counts, one server each"),
    capacity: Optional[int] = typer.Option(
        None, "--capacity", help="slots of each server (default: the session count, a full "
        "server); larger than the counts to measure partial occupancy"),
    seconds: float = typer.Option(15.0, help="seconds of real-time streaming per count"),
    mode: str = typer.Option("pcm", help="pcm (server runs the codec) or tokens (LM only)"),
    device: str = typer.Option("auto", help="server device"),
    dtype: str = typer.Option("auto", help="server dtype"),
    batch_wait_ms: Optional[float] = typer.Option(None, "--batch-wait-ms"),
    batch_clock: Optional[str] = typer.Option(
        None, "--batch-clock", help="the server's batch_clock: window or tick (default: the "
        "server's, window)"),
    telemetry_every: Optional[int] = typer.Option(
        None, "--telemetry-every", help="the server's telemetry_every_frames (0: no TTT "
        "telemetry; default: the server's, 12)"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", callback=json_out_path,
                                            help="also write figures here"),
) -> None:
    """Load a fresh server with real-time synthetic clients.

    N clients against a fresh `moshi-ttt serve` per session count: step latency p50/p99,
    real-time factor, round trip, late frames, memory before/after.
    """
    from server.loadtest import run_bench

    if (checkpoint is None) == (random_config is None):
        fail("give exactly one of --checkpoint or --random-config")
    if mode not in ("pcm", "tokens"):
        fail(f"--mode must be pcm or tokens (the load clients send raw frames), got {mode!r}")
    from .hub import HubError, resolve_checkpoint

    if checkpoint is not None:
        try:  # hf:// fetched here once: every server of the run reads the same snapshot
            checkpoint = resolve_checkpoint(checkpoint)
        except HubError as e:
            fail(str(e))
    for path, what in ((checkpoint, "checkpoint path"), (random_config, "config file")):
        if path is not None and not path.exists():  # before a server is started for it
            fail(f"{what} not found: {path}")
    counts = int_list(sessions, "--sessions")
    if capacity is not None and capacity < max(counts):
        fail(f"--capacity {capacity} is below the largest session count {max(counts)}")
    if seconds <= 0:
        fail(f"--seconds must be > 0, got {seconds:g}")
    check_device(device)
    model = ["--checkpoint", str(checkpoint)] if checkpoint else \
        ["--random-config", str(random_config)]
    extra = ["--device", device, "--dtype", dtype]
    env_wait = {"MOSHI_TTT_BATCH_WAIT_MS": str(batch_wait_ms)} if batch_wait_ms is not None \
        else {}
    if batch_clock is not None:
        from server.settings import BATCH_CLOCKS

        if batch_clock not in BATCH_CLOCKS:
            fail(f"--batch-clock must be {' or '.join(BATCH_CLOCKS)}, got {batch_clock!r}")
        env_wait["MOSHI_TTT_BATCH_CLOCK"] = batch_clock
    if telemetry_every is not None:
        at_least(telemetry_every, 0, "--telemetry-every")
        env_wait["MOSHI_TTT_TELEMETRY_EVERY_FRAMES"] = str(telemetry_every)
    os.environ.update(env_wait)
    try:
        run_bench(model, counts, seconds, mode, extra, json_out, capacity)
    except RuntimeError as e:
        fail(reason(e))


@bench_app.command("step")
def bench_step(
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="checkpoint to time (a directory or hf://OWNER/REPO"
        "[@REVISION])"),
    random_config: Optional[Path] = typer.Option(
        None, "--random-config", callback=config_path,
        help="or a config with random weights (e.g. the 7B)"),
    sessions: str = typer.Option("1,4", help="batch rows (all active), one engine each; "
                                 "with --capacity: sessions on that engine"),
    capacity: Optional[int] = typer.Option(
        None, help="time the sessions on an engine of this many rows against an engine of "
                   "exactly as many rows as sessions (instead of telemetry on vs off)"),
    runs: int = typer.Option(25, help="interleaved runs of 48 steps of each side"),
    device: str = typer.Option("auto", help="cpu, cuda or auto"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", callback=json_out_path,
                                            help="also write figures here"),
) -> None:
    """Time the engine's step: telemetry on vs off, or spare rows.

    The codec and LM step, back to back, with the telemetry read every 12 steps: what TTT
    telemetry costs, or (--capacity C) what N sessions cost on a server of C rows against
    one of N rows, without the client noise of `bench serve`.
    """
    _cpu_defaults()
    from server.stepbench import run as run_steps

    from .checkpoint import load_model, random_model
    from .hub import HubError, resolve_checkpoint

    if (checkpoint is None) == (random_config is None):
        fail("give exactly one of --checkpoint or --random-config")
    if checkpoint is not None:
        try:
            checkpoint = resolve_checkpoint(checkpoint)
        except HubError as e:
            fail(str(e))
    counts = int_list(sessions, "--sessions")
    at_least(runs, 1, "--runs")
    if capacity is not None:
        at_least(capacity, 1, "--capacity")
        if max(counts) > capacity:
            fail(f"--capacity {capacity} is below the largest session count {max(counts)}")
    check_device(device)
    import torch

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device

    def loaded():
        if checkpoint is not None:
            return load_model(checkpoint, dev)
        return random_model(random_config, dev)
    try:
        run_steps(loaded, counts, runs, json_out, capacity)
    except (ValueError, RuntimeError) as e:
        fail(reason(e))


@bench_app.command("train")
def bench_train(
    config: Path = typer.Option(..., "--config", "-c", callback=config_path,
                                help="project YAML config"),
    steps: int = typer.Option(4, help="training steps (the first is not counted)"),
    frames: int = typer.Option(1250, help="frames per sequence (1250 = 100 s)"),
    batch: int = typer.Option(1, help="sequences per step"),
    device: str = typer.Option("auto", help="cpu, cuda or auto"),
    checkpointing: bool = typer.Option(True, help="activation checkpointing"),
    method: str = typer.Option(
        "ttt", "--method", help="ttt (the config's TTT layers), lora (no TTT, LoRA rank 128 on "
        "the main transformer, as moshi-finetune) or both (each in its own process, then the "
        "ratio)"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", callback=json_out_path,
                                            help="also write figures here"),
) -> None:
    """Time the trainer's step at a config's real size.

    Random weights and tokens: tokens/s, s/step, peak memory, next to the memory plan on
    paper. `--method both` compares TTT with LoRA at the same batch and length.
    """
    _cpu_defaults()
    from .bench_train import METHODS, compare
    from .bench_train import run_bench as run_train_bench
    from .config import ConfigError, load_config

    for value, flag in ((steps, "--steps"), (frames, "--frames"), (batch, "--batch")):
        at_least(value, 1, flag)
    check_device(device)
    if method not in (*METHODS, "both"):
        fail(f"--method {method!r}: expected ttt, lora or both")
    try:
        cfg = load_config(config)
    except ConfigError as e:
        fail(reason(e))
    if method != "both":
        run_train_bench(cfg, steps, frames, batch, device, checkpointing, json_out, method)
        return
    # each in a fresh process: peak memory (RSS on CPU) is the process's own
    import subprocess
    import sys
    import tempfile

    results = {}
    with tempfile.TemporaryDirectory(prefix="moshi-ttt-bench-") as tmp:
        for m in METHODS:
            out = Path(tmp) / f"{m}.json"
            cmd = [sys.executable, "-m", "moshi_ttt.cli", "bench", "train", "-c", str(config),
                   "--steps", str(steps), "--frames", str(frames), "--batch", str(batch),
                   "--device", device, "--method", m, "--json-out", str(out),
                   "--checkpointing" if checkpointing else "--no-checkpointing"]
            if subprocess.run(cmd).returncode != 0:
                fail(f"bench train --method {m} failed (see above)")
            results[m] = json.loads(out.read_text())
    compare(results, json_out)

def one_line_paragraphs(text: str) -> str:
    """Each paragraph of a docstring on one line. Typer's rich help keeps a docstring's line
    breaks, which cut command summaries and sentences at the source's line length; as single
    lines, rich wraps them to the terminal instead."""
    paragraphs = cleandoc(text).split("\n\n")
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs)


# After every command is registered: typer builds its click commands from these when run.
for _group in (app, bench_app):
    for _info in _group.registered_commands:
        _doc = _info.help or (_info.callback.__doc__ if _info.callback else None)
        if _doc:
            _info.help = one_line_paragraphs(_doc)


def run() -> None:  # pragma: no cover - console entry point alias
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

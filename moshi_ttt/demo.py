"""`moshi-ttt demo` (`make demo`): the whole train-then-serve job, offline, on the tiny config.

    1. make-data   a two-speaker dataset synthesised with espeak-ng, a tokenizer, a sample wav
    2. init-base   a random-initialised tiny Moshi in moshi's file layout, its codec calibrated
                   on the dataset's training speech
    3. train       the TTT layers, briefly (CPU minutes), into a resumable run directory
    4. serve       `moshi-ttt serve --checkpoint RUN` on a free loopback port
    5. chat        the Python client streams the sample wav and records the answer

Each step reuses what an earlier run left complete (the dataset's manifest, the base's files, the
run's latest checkpoint at the target step), so a second `make demo` goes straight to serving;
`demo.json` in the workdir records which config and dataset size the base and the run were made
for, and a demo with other ones makes them again instead of serving the old ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from .resources import packaged_config

logger = logging.getLogger(__name__)

TINY = packaged_config("tiny.yaml")  # shipped in the package: a wheel install finds it too
_progress = {"step": "[0/5] start"}


def _step(n: int, what: str) -> None:
    _progress["step"] = f"[{n}/5] {what}"
    logger.info("%s", _progress["step"])


def current_step() -> str:
    """The step announced last: what `moshi-ttt demo` names when the demo fails."""
    return _progress["step"]


def prepare(workdir: Path, config: Path = TINY, steps: int | None = None,
            dialogues: int = 16) -> dict[str, Path]:
    """Steps 1-3: data, base, trained run (each reused when already complete)."""
    from .base import CODEC_CALIBRATION_NAME, PROJECT_CONFIG_NAME, init_random_base
    from .checkpoint import find_checkpoint, latest_checkpoint
    from .config import BaseModelRef, load_config
    from .data.synth import synthesize_dataset
    from .train.settings import TrainSettings
    from .train.trainer import train

    cfg = load_config(config)
    logger.info("config %s", config)
    data, base, run = workdir / "data", workdir / "base", workdir / "run"

    _step(1, f"dataset in {data}")
    logger.info("%s", synthesize_dataset(data, n_dialogues=dialogues, seed=0))

    workdir.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(workdir, cfg, dialogues, {"base": base, "run": run})

    _step(2, f"random tiny base in {base}, its codec calibrated on {data / 'train.jsonl'}")
    # moshi_ttt.yaml is written last by init-base: a complete base. One without a calibration
    # record predates codec calibration; it and the run trained on it are made again.
    if (base / PROJECT_CONFIG_NAME).is_file() and (base / CODEC_CALIBRATION_NAME).is_file():
        find_checkpoint(base)
        logger.info("reusing %s", base)
    else:
        if run.exists():
            logger.info("removing %s: it was trained on an earlier base", run)
            shutil.rmtree(run)
        init_random_base(cfg, base, data / "tokenizer.model", seed=0, calibrate_on=data)

    settings = TrainSettings.from_config(cfg.train, {
        "data": str(data / "train.jsonl"), "eval_data": str(data / "eval.jsonl"),
        "max_steps": steps})
    _step(3, f"train the TTT layers for {settings.max_steps} steps into {run}")
    last = latest_checkpoint(run) if (run / "checkpoints").is_dir() else None
    if last is not None and find_checkpoint(last).step >= settings.max_steps:
        logger.info("reusing %s", last)
    else:
        train(cfg, settings, run, base_override=BaseModelRef(local_dir=str(base)),
              resume=True)
    return {"data": data, "base": base, "run": run, "checkpoint": latest_checkpoint(run)}


STAMP_NAME = "demo.json"


def _stale_parts(workdir: Path, cfg: Any, dialogues: int) -> tuple[list[str], dict[str, str]]:
    """Which of base and run were made for another config or dataset size than this demo's
    (none when the workdir has no record yet: a base made beforehand with `init-base`, or a
    workdir that predates the record, is trusted as before), and this demo's record, which the
    caller writes once the stale parts are removed. The base depends on the model and codec
    sections and the data; the run on the whole config and the data."""
    whole = cfg.model_dump(mode="json")
    keys = {"base": _digest({k: whole.get(k) for k in ("lm", "mimi", "codec_calibration")},
                            dialogues),
            "run": _digest(whole, dialogues)}
    stamp = workdir / STAMP_NAME
    try:
        old = json.loads(stamp.read_text())
    except FileNotFoundError:
        old = dict(keys)
    except (OSError, ValueError):  # unreadable: nothing is known of what is there
        old = {}
    stale = [part for part, key in keys.items() if not isinstance(old, dict)
             or old.get(part) != key]
    return stale, keys


def remove_stale_parts(workdir: Path, cfg: Any, dialogues: int, paths: dict[str, Path]) -> None:
    """Remove the parts (`paths`: "base", "run") made for another config or dataset, then
    record this demo's: a demo stopped in between finds them stale again, never trusted."""
    stale, stamp = _stale_parts(workdir, cfg, dialogues)
    for part in stale:
        if paths[part].exists():
            logger.info("removing %s: it was made for another config or dataset", paths[part])
            shutil.rmtree(paths[part])
    (workdir / STAMP_NAME).write_text(json.dumps(stamp, indent=1))


def _digest(obj: Any, dialogues: int) -> str:
    raw = json.dumps({"config": obj, "dialogues": dialogues}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def run_demo(workdir: Path, config: Path = TINY, steps: int | None = None,
             mode: str = "opus", dialogues: int = 16) -> dict[str, Any]:
    from client.command import ChatCommand, run_command
    from server.loadtest import ServerProcess, fetch_health

    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(workdir, config, steps, dialogues)

    _step(4, f"serve {paths['run']}")
    out_wav, out_txt = workdir / "out.wav", workdir / "out.txt"
    with ServerProcess(["--checkpoint", str(paths["run"])], 2, ["--seed", "0"],
                       workdir / "server.log") as srv:
        _, health = fetch_health(srv.port)
        url = f"ws://127.0.0.1:{srv.port}/api/chat"
        _step(5, f"talk to it: {paths['data'] / 'sample_user.wav'} -> {url}")
        code = run_command(ChatCommand(url=url, input=paths["data"] / "sample_user.wav",
                                       output=out_wav, transcript=out_txt, mode=mode))
    if code != 0:
        raise RuntimeError(f"the chat client failed (exit {code}); server log: "
                           f"{workdir / 'server.log'}")
    result = {"output_audio": str(out_wav), "transcript": str(out_txt),
              "checkpoint": str(paths["checkpoint"]), "server_log": str(workdir / "server.log"),
              "reply_codes_used": reply_codes(paths["base"], out_wav),
              "audio_loss": audio_loss(paths["run"]),
              "health": health, "seconds": round(time.perf_counter() - t0, 1)}
    return result


def reply_codes(base: Path, wav: Path) -> list[int]:
    """Distinct codes per RVQ level of the reply, re-encoded with the base's codec: a reply
    that is one repeated code (an uncalibrated codec, a silent model) shows as 1s."""
    from .base import load_codec, resolve_base
    from .codec.report import codec_report
    from .config import BaseModelRef

    report = codec_report(load_codec(resolve_base(BaseModelRef(local_dir=str(base)))), [wav])
    return [lv["codes_used"] for lv in report["levels"]]


def audio_loss(run: Path) -> dict[str, float] | None:
    """The training loss of Moshi's audio codebooks at the first and the last logged step."""
    import json

    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "audio" in r]
    if not rows:
        return None
    return {"first_step": rows[0]["step"], "first": round(rows[0]["audio"], 4),
            "last_step": rows[-1]["step"], "last": round(rows[-1]["audio"], 4)}

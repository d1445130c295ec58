"""`moshi-ttt train` as a user runs it: one plain process, or under torchrun (shared by the CPU
multi-process tests and the GPU ones)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args: list[str], nproc: int | None, timeout: float = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`moshi-ttt train ARGS`; under `torchrun --nproc_per_node NPROC` unless `nproc` is None."""
    env = {**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "moshi_ttt.cli", "train", *args]
    if nproc is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *cmd[1:]]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def output(r: subprocess.CompletedProcess) -> str:
    return r.stdout + r.stderr


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

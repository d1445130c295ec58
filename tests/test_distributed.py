"""`torchrun --nproc_per_node 2 moshi-ttt train` (FSDP2, gloo on CPU) equals one process on the
same global batch: same losses, same trained weights."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import CONFIGS, REPO
from fixtures import make_tiny_base, write_random_dataset

LOSS_TOL = 1e-5  # fp32 on CPU; the sums are reduced in a different order across processes
WEIGHT_TOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base = make_tiny_base(root)
    data = write_random_dataset(root / "data", n_files=4, seconds=6.0)
    cfg = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    cfg["train"] = dict(segment_seconds=2.0, max_steps=3, ckpt_every=100, warmup_steps=1,
                        lr=3e-3, activation_checkpointing=True, device="cpu")
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root, base, data


def _train(root, base, data, out, nproc, batch):
    env = {**os.environ, "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1"}
    args = ["-m", "moshi_ttt.cli", "train", "-c", str(root / "cfg.yaml"), "--out", str(out),
            "--data", str(data), "--base", str(base), "--batch-size", str(batch)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_process_fsdp_equals_one_process(setup, tmp_path):
    root, base, data = setup
    one = _train(root, base, data, tmp_path / "one", nproc=1, batch=2)
    two = _train(root, base, data, tmp_path / "two", nproc=2, batch=1)
    assert [r["step"] for r in two] == [1, 2, 3]
    assert all(r["frames"] == one[0]["frames"] for r in two)  # same global batch size
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= LOSS_TOL, (a["step"], a["loss"], b["loss"])
    wa = load_file(str(tmp_path / "one/checkpoints/step_000003/ttt.safetensors"))
    wb = load_file(str(tmp_path / "two/checkpoints/step_000003/ttt.safetensors"))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= WEIGHT_TOL
    from moshi_ttt.checkpoint import load_model

    fresh = load_model(base, with_codec=False).lm.state_dict()  # training moved the TTT weights
    k = "transformer.layers.1.ttt.inner.w1"
    assert (wa[k] - fresh[k]).abs().max() > 10 * WEIGHT_TOL

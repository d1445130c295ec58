"""Shared fixtures. moshi compiles some functions lazily; on CPU that only costs time."""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("NO_CUDA_GRAPH", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: on a shared 2-core box two spinning threads per process
    cost more than they give (modules opt in with `pytestmark`)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def tiny_cfg():
    from moshi_ttt.config import load_config

    return load_config(CONFIGS / "tiny.yaml")

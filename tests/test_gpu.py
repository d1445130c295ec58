"""GPU-only checks (skipped where torch sees no CUDA device; run on a GPU host with
`pytest tests/test_gpu.py`). On GPU, moshi's LMGen replays the main transformer's step as a CUDA
graph: Python never runs again after capture, so the TTT block's streaming state must advance,
commit and honour exec/reset masks purely through in-place device ops."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from moshi.models.lm import LMGen
from moshi.utils.compile import no_cuda_graph

from moshi_ttt.model import build_ttt_lm, ttt_blocks
from moshi_ttt.streaming import reset_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (run on the GPU host)")


def _lm(cfg, dtype):
    torch.manual_seed(0)
    lm = build_ttt_lm(cfg, device="cuda", dtype=dtype)
    for a in ttt_blocks(lm):  # a visible TTT contribution
        torch.nn.init.constant_(a.block.gate_alpha, 0.5)
        torch.nn.init.normal_(a.block.inner.w1, std=0.3)
        torch.nn.init.normal_(a.block.inner.w2, std=0.3)
    return lm.eval()


def _stream(lm, user, graphs: bool, reset_at: int, masked: range):
    """Greedy LMGen over `user` [B, 8, T]; row 1 reset at `reset_at`, row 0 masked in `masked`.
    Returns every step's text logits and tokens."""
    logits, tokens = [], []
    gen = LMGen(lm, use_sampling=False, support_out_of_sync=True,
                on_text_logits_hook=lambda l: logits.append(l.float().clone()))
    B, _, T = user.shape
    with (nullcontext() if graphs else no_cuda_graph()), gen.streaming(B):
        for t in range(T):
            if t == reset_at:
                reset_rows(gen, torch.tensor([False, True], device="cuda"))
            gen.set_exec_mask(torch.tensor([t not in masked, True], device="cuda"))
            tokens.append(gen.step(user[:, :, t:t + 1]).clone())
        moved = [float((a.block._streaming_state.w.w1 - a.block.inner.w1.detach()).abs().max())
                 for a in ttt_blocks(lm)]
    return torch.stack(logits), torch.stack(tokens), moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager_streaming(tiny_cfg, dtype):
    K = tiny_cfg.ttt.mini_batch_size
    T = 3 * K + 5
    lm = _lm(tiny_cfg, dtype)
    user = torch.randint(0, 2048, (2, 8, T), device="cuda",
                         generator=torch.Generator("cuda").manual_seed(1))
    kw = dict(reset_at=K + 3, masked=range(20, 24))
    g_logits, g_tokens, g_moved = _stream(lm, user, True, **kw)
    e_logits, e_tokens, e_moved = _stream(lm, user, False, **kw)
    assert torch.equal(g_tokens, e_tokens)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (g_logits - e_logits).abs().max() <= tol
    assert all(m > 0 for m in g_moved) and g_moved == pytest.approx(e_moved, rel=1e-3)


def test_compiled_scan_equals_eager_forward_and_backward():
    """On GPU the dual form is compiled (moshi's lazy torch.compile); it must compute the same
    outputs and gradients as eager execution, partial last mini-batch included."""
    from moshi.utils.compile import no_compile

    from moshi_ttt.ttt_mlp import FastWeights, ttt_scan

    H, HD, F, T = 4, 32, 128, 3 * 16 + 5
    g = torch.Generator("cuda").manual_seed(0)

    def r(*s, std=1.0):
        return torch.randn(*s, device="cuda", generator=g) * std
    params = [r(1, H, HD, F, std=0.1), r(1, H, 1, F, std=0.1), r(1, H, F, HD, std=0.1),
              r(1, H, 1, HD, std=0.1)]
    xq, xk = (torch.nn.functional.normalize(r(2, H, T, HD), dim=-1) for _ in range(2))
    xv, lr = r(2, H, T, HD), torch.full((2, H, T), 0.1 / HD, device="cuda")
    lnw, lnb = torch.ones(H, HD, device="cuda"), torch.zeros(H, HD, device="cuda")

    def run():
        ps = [p.clone().requires_grad_() for p in params]
        z, _ = ttt_scan(FastWeights(*(p.expand(2, *p.shape[1:]) for p in ps)), xq, xk, xv, lr,
                        16, lnw, lnb, 1e-6)
        z.square().sum().backward()
        return z.detach(), [p.grad for p in ps]
    z_c, g_c = run()
    with no_compile():
        z_e, g_e = run()
    assert (z_c - z_e).abs().max() <= 1e-4
    for a, b in zip(g_c, g_e):
        assert (a - b).abs().max() <= 1e-3 * (1 + b.abs().max())


def test_torchrun_nccl_trains_resumes_and_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node 1` on one GPU runs the multi-GPU code path (FSDP2, a
    cpu:gloo,cuda:nccl group, reductions of CUDA tensors over NCCL, rank-0 broadcast of the
    weights and of the optimiser state on resume, evaluation, checkpoints): 2 steps with a stop
    and --resume in between, against one plain process on the same GPU."""
    import math

    import yaml

    from moshi_ttt.base import init_random_base
    from moshi_ttt.checkpoint import load_model, latest_checkpoint
    from moshi_ttt.config import load_config

    from conftest import CONFIGS
    from fixtures import make_tokenizer, write_random_dataset
    from torchrun import metrics, output, run_train

    # A random codec is enough for the plumbing (and needs no calibration run on the host).
    base = init_random_base(load_config(CONFIGS / "tiny.yaml"), tmp_path / "base",
                            make_tokenizer(tmp_path / "tok" / "tokenizer.model"), seed=0)
    data = write_random_dataset(tmp_path / "data", n_files=4, seconds=6.0)
    evald = write_random_dataset(tmp_path / "data", n_files=2, seconds=4.0, seed=1, name="eval")
    cfg = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    cfg["train"] = dict(segment_seconds=2.0, batch_size=2, max_steps=2, ckpt_every=1,
                        eval_every=1, eval_batches=1, warmup_steps=1, lr=3e-3,
                        activation_checkpointing=True, device="cuda")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))

    def args(out, *extra):
        return ["-c", str(tmp_path / "cfg.yaml"), "--out", str(out), "--data", str(data),
                "--eval-data", str(evald), "--base", str(base), *extra]
    env = {"NO_CUDA_GRAPH": "1"}
    plain = run_train(args(tmp_path / "plain"), None, env=env)
    assert plain.returncode == 0, output(plain)[-6000:]
    first = run_train(args(tmp_path / "tr", "--stop-after", "1"), 1, env=env)
    assert first.returncode == 0, output(first)[-6000:]
    assert "device cuda:0, 1 process(es)" in output(first)
    second = run_train(args(tmp_path / "tr", "--resume"), 1, env=env)
    assert second.returncode == 0, output(second)[-6000:]

    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "tr")
    assert [r["step"] for r in b] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["eval/loss"]) for r in a + b)
    assert not any(r["skipped"] for r in a + b)
    # bf16 on GPU; the same weights and batches: step 1 is before any update
    assert abs(a[0]["loss"] - b[0]["loss"]) <= 1e-3 * abs(a[0]["loss"])
    assert abs(a[1]["loss"] - b[1]["loss"]) <= 1e-2 * abs(a[1]["loss"])
    assert latest_checkpoint(tmp_path / "tr").name == "step_000002"
    m = load_model(tmp_path / "tr", device="cuda", dtype=torch.bfloat16, with_codec=False)
    assert m.checkpoint_info["step"] == 2


def _bucketed_run(graphs: bool):
    """A capacity-4 engine on CUDA: 4 audio sessions for 20 frames (4-row steps), two leave and
    the last one moves into row 1 (2-row steps, 20 frames), then only row 0 talks (1-row
    steps, 10 frames). Returns every step's tokens [n, 9] and audio [n, 1920]."""
    import numpy as np

    from moshi_ttt.checkpoint import random_model
    from moshi_ttt.protocol import FRAME_SIZE, NUM_CODEBOOKS
    from server.engine import Engine, EngineConfig

    from conftest import CONFIGS

    m = random_model(CONFIGS / "tiny.yaml", device="cuda")
    with torch.no_grad():
        for a in ttt_blocks(m.lm):
            a.block.gate_alpha.fill_(0.5)
    with (nullcontext() if graphs else no_cuda_graph()):
        eng = Engine(m.lm, m.mimi, EngineConfig(capacity=4, use_sampling=False))
        eng.warmup(2)  # under graphs: each bucket captures its own
        pcm = torch.from_numpy((np.random.default_rng(0).standard_normal(
            (50, 4, 1, FRAME_SIZE)) * 0.2).astype(np.float32)).cuda()
        codes = torch.zeros(4, NUM_CODEBOOKS, 1, dtype=torch.long, device="cuda")
        outs = []

        def step(t, n, rows):
            ready = torch.ones(n, dtype=torch.bool, device="cuda")
            out, audio, bad, _ = eng._step_tensors(pcm[t][rows], codes[:n], ready, ready, ready)
            assert not bool(bad.any())
            outs.append((out.cpu(), audio.cpu()))
        for t in range(20):
            step(t, 4, [0, 1, 2, 3])
        eng._reset(torch.tensor([False, True, True, False], device="cuda"))
        eng.rows.move_row(3, 1)
        eng._reset(torch.tensor([False, False, False, True], device="cuda"))
        for t in range(20, 40):
            step(t, 2, [0, 3])
        eng._reset(torch.tensor([False, True, False, False], device="cuda"))
        for t in range(40, 50):
            step(t, 1, [0])
        torch.cuda.synchronize()
    return outs


def test_bucketed_steps_and_row_moves_under_cuda_graphs_equal_eager(monkeypatch):
    """Each bucket of rows replays its own CUDA graphs over views of the full state; moving a
    row copies into the graphs' fixed addresses. Tokens equal eager execution's, audio to
    rounding."""
    monkeypatch.setenv("NO_CUDA_GRAPH", "0")  # conftest turns graphs off for the other tests
    graphed = _bucketed_run(True)
    eager = _bucketed_run(False)
    assert [o.shape[0] for o, _ in graphed] == [4] * 20 + [2] * 20 + [1] * 10
    for (go, ga), (eo, ea) in zip(graphed, eager):
        assert torch.equal(go, eo)
        assert (ga - ea).abs().max() <= 1e-4
    assert (graphed[-1][0] >= 0).all()

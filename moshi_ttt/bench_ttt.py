"""`moshi-ttt bench ttt`: what TTT costs, measured. Prints figures; asserts nothing.

(a) dual-form forward+backward over T frames vs the naive frame-by-frame loop (`ttt_reference`),
    at the 7B head geometry (32 heads x 128, MLP 512);
(b) one streaming step of a hybrid (attention -> TTT -> FFN) layer vs moshi's plain layer, at the
    7B layer shape for each d_model asked (heads = d_model / 128, FFN 4.125 x, context 3000);
(c) bytes of per-session state at the 7B config: TTT fast weights + mini-batch buffer, next to
    moshi's KV cache.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from typing import Any

import torch
from moshi.modules.transformer import StreamingTransformerLayer
from moshi.modules.rope import RotaryEmbedding

from .block import TTTBlock
from .config import TTTConfig
from .layer import HybridTransformerLayer, forget_streaming_children
from .ttt_mlp import FastWeights, ttt_scan
from .ttt_reference import naive_ttt

logger = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_dual_vs_naive(frames: int, device: torch.device, heads: int = 32, head_dim: int = 128,
                        expansion: int = 4, K: int = 16) -> dict[str, Any]:
    hidden = expansion * head_dim
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*s, std=1.0):
        return (torch.randn(*s, generator=g) * std).to(device)

    w0 = [r(1, heads, head_dim, hidden, std=0.02), r(1, heads, 1, hidden, std=0.0),
          r(1, heads, hidden, head_dim, std=0.02), r(1, heads, 1, head_dim, std=0.0)]
    xq = torch.nn.functional.normalize(r(1, heads, frames, head_dim), dim=-1)
    xk = torch.nn.functional.normalize(r(1, heads, frames, head_dim), dim=-1)
    xv = r(1, heads, frames, head_dim)
    lr = torch.full((1, heads, frames), 0.1 / head_dim, device=device)
    ln_w, ln_b = torch.ones(heads, head_dim, device=device), torch.zeros(heads, head_dim,
                                                                          device=device)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in w0]
        z = fn(FastWeights(*leaves))
        z.square().mean().backward()

    dual = _time(lambda: run(lambda w: ttt_scan(w, xq, xk, xv, lr, K, ln_w, ln_b, 1e-6)[0]),
                 device)
    naive = _time(lambda: run(lambda w: naive_ttt(w, xq, xk, xv, lr, K, ln_w, ln_b, 1e-6,
                                                  differentiable=True)), device, repeats=1)
    return {"frames": frames, "heads": heads, "head_dim": head_dim, "mini_batch": K,
            "dual_fwd_bwd_s": dual, "naive_fwd_bwd_s": naive, "speedup": naive / dual}


def _layer_kwargs(d_model: int, device, dtype) -> dict[str, Any]:
    return dict(d_model=d_model, num_heads=d_model // 128, dim_feedforward=int(4.125 * d_model),
                causal=True, context=3000, rope=RotaryEmbedding(interleave=True, max_period=10000),
                norm="rms_norm_f32", gating="silu", device=device, dtype=dtype)


def bench_layer_step(d_model: int, steps: int, device: torch.device,
                     dtype: torch.dtype, batch: int = 1) -> dict[str, Any]:
    torch.manual_seed(0)
    plain = StreamingTransformerLayer(**_layer_kwargs(d_model, device, dtype)).eval()
    x = torch.randn(batch, 1, d_model, device=device, dtype=dtype)

    def per_step(layer) -> float:
        with torch.no_grad(), layer.streaming(batch):
            ttt = [m for m in layer.modules() if isinstance(m, TTTBlock)]
            if any(m._streaming_state is None for m in ttt):
                raise RuntimeError("the TTT block is not streaming: the step would time its "
                                   "parallel form on one frame")
            for _ in range(3):
                layer(x)
            _sync(device)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                layer(x)
                _sync(device)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t_plain = per_step(plain)
    block = TTTBlock(d_model, d_model // 128, TTTConfig(), norm="rms_norm_f32",
                     device=device, dtype=dtype).eval()
    t_block = per_step(block)  # the TTT block alone: its own share, free of the layer's noise
    hybrid = HybridTransformerLayer.from_layer(plain, block).eval()
    # the plain layer cached its streaming children (without the block) when it streamed above
    forget_streaming_children(hybrid)
    t_hybrid = per_step(hybrid)
    del hybrid, plain
    return {"d_model": d_model, "batch": batch, "plain_step_ms": t_plain * 1e3,
            "hybrid_step_ms": t_hybrid * 1e3, "ttt_block_step_ms": t_block * 1e3,
            "ratio": t_hybrid / t_plain}


def state_bytes_7b() -> dict[str, Any]:
    from .config import load_config
    from .model import build_ttt_lm, ttt_blocks
    from .resources import packaged_config

    # the packaged config: a wheel install has no top-level configs/ next to the package
    cfg = load_config(packaged_config("moshi-7b.yaml"))
    lm = build_ttt_lm(cfg, device="meta", dtype=torch.bfloat16)
    ttt = fast = 0
    for a in ttt_blocks(lm):
        st = a.block._init_streaming_state(1)
        ttt += st.nbytes()
        fast += sum(t.numel() * t.element_size() for t in st.w.as_tuple())
    main = lm.transformer.layers[0].self_attn
    kv = 2 * len(lm.transformer.layers) * main.context * main.embed_dim * 2  # bf16 K and V
    return {"ttt_state_bytes": ttt, "fast_weight_bytes": fast, "kv_cache_bytes_bf16": kv,
            "ttt_layers": len(cfg.ttt.layers)}


def run_bench(frames: int, dims: list[int], steps: int, device: str = "auto",
              dtype: str = "auto", rows: int = 1) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        dtype, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    machine = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
               f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    con = Console()
    con.print(f"[bold]moshi-ttt bench ttt[/] on {machine}, torch {torch.__version__}, "
              f"layer dtype {dt}")
    res: dict[str, Any] = {"machine": machine, "torch": torch.__version__, "dtype": str(dt)}

    a = bench_dual_vs_naive(frames, dev)
    res["dual_vs_naive"] = a
    con.print(f"(a) TTT-MLP over {a['frames']} frames, {a['heads']} heads x {a['head_dim']}, "
              f"K={a['mini_batch']}, fp32 forward+backward: dual form "
              f"{a['dual_fwd_bwd_s'] * 1e3:.1f} ms, naive frame loop "
              f"{a['naive_fwd_bwd_s'] * 1e3:.1f} ms -> speed-up x{a['speedup']:.1f}")

    t = Table(title=f"(b) one streaming step (B={rows}), 7B layer shape")
    for col in ("d_model", "plain ms", "hybrid ms", "hybrid / plain", "TTT block alone ms"):
        t.add_column(col, justify="right")
    res["layer_step"] = []
    for d in dims:
        b = bench_layer_step(d, steps, dev, dt, batch=rows)
        res["layer_step"].append(b)
        t.add_row(str(d), f"{b['plain_step_ms']:.2f}", f"{b['hybrid_step_ms']:.2f}",
                  f"{b['ratio']:.2f}", f"{b['ttt_block_step_ms']:.2f}")
    con.print(t)

    c = state_bytes_7b()
    res["state_7b"] = c
    con.print(f"(c) per-session state at the 7B config: TTT {c['ttt_state_bytes'] / 2**20:.1f} MiB "
              f"({c['ttt_layers']} layers; fast weights {c['fast_weight_bytes'] / 2**20:.1f} MiB "
              f"fp32, rest mini-batch buffer) vs KV cache "
              f"{c['kv_cache_bytes_bf16'] / 2**20:.1f} MiB (bf16, full context)")
    return res

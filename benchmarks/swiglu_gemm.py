"""The 16-bit FFN's first half, `silu(x·w1ᵀ) ⊙ (x·w3ᵀ)`, alone (GPU): the fused Triton GEMM of
`newbie_core/swiglu_gemm.py` at each tile configuration (its pointer and TMA forms) and autotuned, against what a compiled bf16 DiT runs
without it (two cuBLAS GEMMs + inductor's gate kernel; and one w1‖w3 GEMM + the gate), on the full-size DiT's
shape (CFG batch 2 × (4096 image + 256 caption) tokens, 2304 → 9216), per call and per step (×38 FeedForwards
with that many rows). Error: relative L2 against the fp32 products.

    python benchmarks/swiglu_gemm.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from newbie_core import swiglu_gemm  # noqa: E402
from newbie_core.bench.measure import mean_seconds  # noqa: E402
from newbie_core.bench.report import slug, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Time and compare; write `swiglu-gemm-<gpu>.json/.md`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--rows", type=int, default=2 * (4096 + 256))
    p.add_argument("--dim", type=int, default=2304)
    p.add_argument("--hidden", type=int, default=9216)
    p.add_argument("--ffns", type=int, default=38, help="FeedForwards per DiT step (per-step figure)")
    args = p.parse_args(argv)
    if not (torch.cuda.is_available() and swiglu_gemm.AVAILABLE):
        sys.exit("needs a CUDA GPU and Triton")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    m, k, n = args.rows, args.dim, args.hidden
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w1, w3 = (torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k ** -0.5 for _ in range(2))
    w13 = torch.cat([w1, w3])
    exact = F.silu(x.float() @ w1.float().T) * (x.float() @ w3.float().T)

    def two(x):
        return F.silu(F.linear(x, w1)) * F.linear(x, w3)

    def one(x):
        a, b = F.linear(x, w13).chunk(2, dim=-1)
        return F.silu(a) * b

    ways = [("compiled: two cuBLAS GEMMs + gate kernel (the DiT without it)", torch.compile(two, fullgraph=True)),
            ("compiled: one w1‖w3 cuBLAS GEMM + gate kernel", torch.compile(one, fullgraph=True)),
            ("fused op, autotuned (as the DiT calls it)", lambda x: swiglu_gemm.swiglu_gemm(x, w1, w3))]
    for tma in (False, True):
        for cfg in swiglu_gemm.CONFIGS:
            def fused(x, cfg=cfg, tma=tma):
                h = torch.empty(m, n, device=dev, dtype=x.dtype)
                swiglu_gemm.launch(x, w1, w3, h, config=cfg, tma=tma)
                return h
            ways.append((f"fused kernel{' (TMA)' if tma else ''} {'×'.join(map(str, cfg[:3]))}, {cfg[3]} stages, "
                         f"{cfg[4]} warps", fused))
    rows = []
    for name, fn in ways:
        try:
            out = fn(x).float()
            ms = 1e3 * mean_seconds(lambda: fn(x), dev, runs=30)
        except Exception as e:  # a tile configuration this GPU cannot hold (shared memory): report, go on
            rows.append({"way": name, "error": f"{type(e).__name__}: {str(e)[:160]}"})
            print(name, rows[-1]["error"], flush=True)
            continue
        rows.append({"way": name, "ms": round(ms, 4), "tflops": round(2 * m * k * 2 * n / ms / 1e9, 1),
                     "ms_per_step": round(ms * args.ffns, 2),
                     "rel_l2_vs_fp32": float((out - exact).norm() / exact.norm())})
        print(rows[-1], flush=True)
    res = {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__, "m_k_n": [m, k, n], "results": rows}
    md = [f"# SwiGLU first half (x·w1ᵀ, x·w3ᵀ, gate) — {res['device_name']}, torch {res['torch']}", "",
          f"x [{m}, {k}] bf16, w1/w3 [{n}, {k}] (one DiT FeedForward, CFG batch 2 at 1024²); per step: ×{args.ffns}. "
          "TFLOP/s counts the two products only.", "",
          "| way | ms / call | TFLOP/s | ms / step | rel. L2 vs fp32 |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['way']} | {r['error']} | | | |")
        else:
            md.append(f"| {r['way']} | {r['ms']} | {r['tflops']} | {r['ms_per_step']} | {r['rel_l2_vs_fp32']:.2e} |")
    write_results(args.out, f"swiglu-gemm-{slug(res['device_name'])}", res, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The fp8 FFN's SwiGLU gate + row quantisation alone (GPU): the fused Triton kernel of `newbie_core/fp8_gate.py` at
several warp counts against inductor's own fusion of the same expression (what a compiled fp8 DiT ran before),
on the full-size DiT's shape (CFG batch 2 × (4096 image + 256 caption) tokens, 9216 hidden channels), per call
and per step (×38: the 36 main layers and the 2 image refiners run this many rows; the caption refiners few).

    python benchmarks/fp8_gate_kernel.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from newbie_core import fp8_gate  # noqa: E402
from newbie_core.bench.measure import mean_seconds  # noqa: E402
from newbie_core.bench.report import slug, write_results  # noqa: E402
from newbie_core.fp8 import FP8_MAX, _quantize_rows_eager  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Time and compare; write `fp8-gate-kernel-<gpu>.json/.md`."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--rows", type=int, default=2 * (4096 + 256))
    p.add_argument("--cols", type=int, default=9216)
    p.add_argument("--ffns", type=int, default=38, help="FeedForwards per DiT step (per-step figure)")
    args = p.parse_args(argv)
    if not (torch.cuda.is_available() and fp8_gate.AVAILABLE):
        sys.exit("needs a CUDA GPU and Triton")
    import triton

    def _ms(fn) -> float:
        return 1e3 * mean_seconds(fn, torch.device("cuda"), runs=50)

    torch.manual_seed(0)
    a = torch.randn(args.rows, 2 * args.cols, device="cuda", dtype=torch.bfloat16).chunk(2, dim=-1)
    a, b = a[0], a[1]  # views of one [M, 2N] GEMM output, as the fused w1‖w3 layout gives them; strides 2N
    ref_q, ref_s = _quantize_rows_eager(F.silu(a.float()) * b.float())
    inductor = torch.compile(lambda x, y: _quantize_rows_eager(F.silu(x) * y), fullgraph=True, dynamic=False)
    rows = [{"way": "inductor (silu·b then row quantisation, compiled)", "ms": _ms(lambda: inductor(a, b))}]
    block = triton.next_power_of_2(args.cols)
    for warps in (8, 16, 32):
        q = torch.empty(args.rows, args.cols, device="cuda", dtype=torch.float8_e4m3fn)
        s = torch.empty(args.rows, 1, device="cuda", dtype=torch.float32)

        def run(warps=warps, q=q, s=s):
            fp8_gate._gate_quant_kernel[(args.rows,)](a, b, q, s, args.cols, a.stride(0), b.stride(0), q.stride(0),
                                                      FP8_LIMIT=FP8_MAX, BLOCK=block, num_warps=warps)
        ms = _ms(run)
        same = (q.view(torch.uint8) == ref_q.view(torch.uint8)).float().mean().item()
        rows.append({"way": f"fused kernel, {warps} warps", "ms": ms, "fp8_bytes_equal": round(same, 6),
                     "scale_max_rel_diff": float(((s - ref_s).abs() / ref_s).max())})
    q, s = fp8_gate.swiglu_quant_fp8(a, b)
    rows.append({"way": "fused op as the DiT calls it (auto warps)", "ms": _ms(lambda: fp8_gate.swiglu_quant_fp8(a, b))})
    moved = a.numel() * 2 * 2 + q.numel() + s.numel() * 4  # bytes read (a, b bf16) + written (q, scales)
    for r in rows:
        r["ms"] = round(r["ms"], 4)
        r["GB_per_s"] = round(moved / r["ms"] / 1e6, 1)
        r["ms_per_step"] = round(r["ms"] * args.ffns, 2)
    res = {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__, "rows_x_cols": [args.rows, args.cols],
           "results": rows}
    md = [f"# fp8 SwiGLU gate + row quantisation — {res['device_name']}, torch {res['torch']}", "",
          f"[{args.rows}, {args.cols}] bf16 gate inputs (one DiT FeedForward, CFG batch 2 at 1024²); per step: ×{args.ffns}.",
          "", "| way | ms / call | GB/s | ms / step | fp8 bytes equal to eager | scale max rel. diff |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['way']} | {r['ms']} | {r['GB_per_s']} | {r['ms_per_step']} | {r.get('fp8_bytes_equal', '–')} | "
                  f"{r.get('scale_max_rel_diff', '–')} |")
    write_results(args.out, f"fp8-gate-kernel-{slug(res['device_name'])}", res, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

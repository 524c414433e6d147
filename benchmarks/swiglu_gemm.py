"""The 16-bit FFN's first half, `silu(x·w1ᵀ) ⊙ (x·w3ᵀ)`, as one Triton GEMM with the gate in its epilogue,
against what a compiled bf16 DiT runs (two cuBLAS GEMMs + inductor's gate kernel; or one w1‖w3 GEMM + the gate),
on the full-size DiT's shape (CFG batch 2 × (4096 image + 256 caption) tokens, 2304 → 9216), per call and per
step (×38 FeedForwards with that many rows). Error: relative L2 against the fp32 products.

The kernel computes both products' output tile from one load of `x` (two fp32 accumulators, the weights as they
are) and writes only `h`, sparing the 320 MB of `a`, `b` written and 480 MB moved again per block; pointer and
TMA forms, each tile configuration and autotuned. Measured on an H100 (results/swiglu-gemm-nvidia-h100-80gb-
hbm3.md) it is slower than cuBLAS + gate (Triton's dual GEMM reaches ~550-576 TFLOP/s where cuBLAS runs ~750),
so the product does not use it; the kernels live here, with the run that refuted them (its logic is checked in
Triton's CPU interpreter, tests/core/test_swiglu_gemm_bench.py).

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

CONFIGS = ((128, 128, 64, 4, 8), (128, 128, 64, 3, 8), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
           (128, 128, 32, 5, 8), (256, 64, 64, 3, 8))
GROUP_M = 8  # programs walk GROUP_M row tiles per column tile: tiles of x and of the weights stay in L2

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the benchmark needs a GPU; the test imports it where Triton imports
    triton = None
else:

    @triton.jit
    def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
        """This program's (row tile, column tile): GROUP row tiles walked per column tile (grouped order)."""
        pid = tl.program_id(0)
        per_group = GROUP * tl.cdiv(N, BLOCK_N)
        first_m = (pid // per_group) * GROUP
        group_rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP)
        return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows

    @triton.jit
    def swiglu_gemm_kernel(x_ptr, w1_ptr, w3_ptr, h_ptr, M, N, K, stride_xm, stride_w1n, stride_w3n, stride_hm,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP: tl.constexpr, EVEN_K: tl.constexpr):
        """One [BLOCK_M, BLOCK_N] tile of `h = silu(x·w1ᵀ) ⊙ (x·w3ᵀ)`; x [M,K], w1/w3 [N,K], h [M,N]."""
        pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        rows = (offs_m % M).to(tl.int64)  # rows/columns past the edge re-read valid ones; their results are not stored
        cols = (offs_n % N).to(tl.int64)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
        w1_ptrs = w1_ptr + cols[None, :] * stride_w1n + offs_k[:, None]  # [BLOCK_K, BLOCK_N]: wᵀ tiles
        w3_ptrs = w3_ptr + cols[None, :] * stride_w3n + offs_k[:, None]
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                x = tl.load(x_ptrs)
                w1 = tl.load(w1_ptrs)
                w3 = tl.load(w3_ptrs)
            else:
                left = K - k * BLOCK_K
                x = tl.load(x_ptrs, mask=offs_k[None, :] < left, other=0.0)
                w1 = tl.load(w1_ptrs, mask=offs_k[:, None] < left, other=0.0)
                w3 = tl.load(w3_ptrs, mask=offs_k[:, None] < left, other=0.0)
            acc1 = tl.dot(x, w1, acc1)
            acc3 = tl.dot(x, w3, acc3)
            x_ptrs += BLOCK_K
            w1_ptrs += BLOCK_K
            w3_ptrs += BLOCK_K
        h = acc1 * tl.sigmoid(acc1) * acc3
        out = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :]
        tl.store(out, h.to(h_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit
    def swiglu_gemm_tma_kernel(x_ptr, w1_ptr, w3_ptr, h_ptr, M, N, K, stride_xm, stride_w1n, stride_w3n, stride_hm,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               GROUP: tl.constexpr, EVEN_K: tl.constexpr):
        """`swiglu_gemm_kernel` with its tiles loaded by Hopper's tensor memory accelerator (device-made tensor
        descriptors: edges padded with zeros by the hardware)."""
        pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP)
        x_desc = tl.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BLOCK_M, BLOCK_K])
        w1_desc = tl.make_tensor_descriptor(w1_ptr, [N, K], [stride_w1n, 1], [BLOCK_N, BLOCK_K])
        w3_desc = tl.make_tensor_descriptor(w3_ptr, [N, K], [stride_w3n, 1], [BLOCK_N, BLOCK_K])
        h_desc = tl.make_tensor_descriptor(h_ptr, [M, N], [stride_hm, 1], [BLOCK_M, BLOCK_N])
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            x = x_desc.load([off_m, k * BLOCK_K])
            acc1 = tl.dot(x, w1_desc.load([off_n, k * BLOCK_K]).T, acc1)
            acc3 = tl.dot(x, w3_desc.load([off_n, k * BLOCK_K]).T, acc3)
        h = acc1 * tl.sigmoid(acc1) * acc3
        h_desc.store([off_m, off_n], h.to(h_ptr.dtype.element_ty))

    swiglu_gemm_autotuned = triton.autotune(
        [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_stages=s, num_warps=w)
         for m, n, k, s, w in CONFIGS], key=["M", "N", "K"])(swiglu_gemm_kernel)

    def _scratch(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device="cuda")

    def launch(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, h: torch.Tensor, config=None,
               tma: bool = False) -> None:
        """Run the kernel into `h`: autotuned over `CONFIGS`, or one `config` tuple of them (`tma`: the TMA
        form, which needs 16-byte aligned row strides)."""
        m, k = x.shape
        n = w1.shape[0]
        args = (x, w1, w3, h, m, n, k, x.stride(0), w1.stride(0), w3.stride(0), h.stride(0))
        if config is None:
            grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
            swiglu_gemm_autotuned[grid](*args, GROUP=GROUP_M, EVEN_K=k % 64 == 0)  # every BLOCK_K divides 64
            return
        if tma:  # the descriptors are made on the device, in scratch memory from this allocator
            triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=x.device))
        bm, bn, bk, stages, warps = config
        (swiglu_gemm_tma_kernel if tma else swiglu_gemm_kernel)[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
            *args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=GROUP_M, EVEN_K=k % bk == 0,
            num_stages=stages, num_warps=warps)



def swiglu_gemm(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, config=None, tma: bool = False) -> torch.Tensor:
    """`silu(x·w1ᵀ) ⊙ (x·w3ᵀ)` for `x [M,K]`, `w1, w3 [N,K]` (rows contiguous): `[M,N]` in x's dtype."""
    h = torch.empty((x.shape[0], w1.shape[0]), device=x.device, dtype=x.dtype)
    launch(x, w1, w3, h, config=config, tma=tma)
    return h

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
    if not (torch.cuda.is_available() and triton is not None):
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
            ("fused kernel, autotuned over the configurations below", lambda x: swiglu_gemm(x, w1, w3))]
    for tma in (False, True):
        for cfg in CONFIGS:
            ways.append((f"fused kernel{' (TMA)' if tma else ''} {'×'.join(map(str, cfg[:3]))}, {cfg[3]} stages, "
                         f"{cfg[4]} warps", lambda x, cfg=cfg, tma=tma: swiglu_gemm(x, w1, w3, cfg, tma)))
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

"""The 16-bit DiT's SwiGLU `silu(x·w1ᵀ) ⊙ (x·w3ᵀ)` as one GEMM kernel with the gate in its epilogue (Triton).

Plainly (eager, or compiled by inductor) each FeedForward runs two cuBLAS GEMMs that write `a = x·w1ᵀ` and
`b = x·w3ᵀ` ([tokens, 9216] each, bf16) and a pointwise kernel that reads both back to write `h = silu(a)·b`:
per block of the 1024² CFG pair 320 MB written and 480 MB moved again, ~3.9 ms of a 0.12 s compiled bf16 step
on an H200 (benchmarks/results/compile-modes-nvidia-h200.md). Here one program computes the same output tile of
both products from one load of `x` (two fp32 accumulators) and writes only `h`: the two weights stay as they are
(no fused copy), and the gate is computed from the fp32 accumulators (one rounding, at the end; the plain path
rounds `a` and `b` to bf16 first).

Registered as a torch custom op over the kernel (`torch.library.triton_op`), so eager models call it and
`torch.compile(fullgraph=True)` compiles it into the graph. Used only where Triton imports, the input is a CUDA
fp16/bf16 tensor and both weights are resident in its dtype on its device with nothing to apply per call
(`Fp8Linear.weight_ready`: not fp8, not cast per call by ComfyUI's partial load, no LoRA patch). OFF by default
until measured faster on the GPU (`NEWBIE_SWIGLU_GEMM=1` or `set_enabled(True)` turns it on); its logic is
checked on CPU-only machines in Triton's interpreter (tests/core/test_swiglu_gemm.py).
"""
from __future__ import annotations

import importlib.util
import os
import re

import torch

_state = {"enabled": os.environ.get("NEWBIE_SWIGLU_GEMM", "0").strip().lower() in ("1", "true", "yes", "on")}
AVAILABLE = False
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): BLOCK_N is per product (the tile of x·[w1‖w3]ᵀ is twice
# as wide). Hopper-sized: 2 fp32 accumulators of BLOCK_M×BLOCK_N over 4·num_warps·32 lanes.
CONFIGS = ((128, 128, 64, 4, 8), (128, 128, 64, 3, 8), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
           (128, 128, 32, 5, 8), (256, 64, 64, 3, 8))
GROUP_M = 8  # programs walk GROUP_M row tiles per column tile: tiles of x and of the weights stay in L2

if importlib.util.find_spec("triton") is not None and hasattr(torch.library, "triton_op"):  # pragma: no cover - GPU
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def swiglu_gemm_kernel(x_ptr, w1_ptr, w3_ptr, h_ptr, M, N, K, stride_xm, stride_w1n, stride_w3n, stride_hm,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP: tl.constexpr, EVEN_K: tl.constexpr):
        """One [BLOCK_M, BLOCK_N] tile of `h = silu(x·w1ᵀ) ⊙ (x·w3ᵀ)`; x [M,K], w1/w3 [N,K], h [M,N]."""
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP * tiles_n
        first_m = (pid // per_group) * GROUP
        group_rows = tl.minimum(tiles_m - first_m, GROUP)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
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
        descriptors: edges padded with zeros by the hardware); benchmarked against the pointer form."""
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP * tiles_n
        first_m = (pid // per_group) * GROUP
        group_rows = tl.minimum(tiles_m - first_m, GROUP)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
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

    def launch(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, h: torch.Tensor, config=None, kernel=None,
               tma: bool = False) -> None:
        """Run the kernel into `h`: autotuned over `CONFIGS`, or one `config` tuple of them (benchmarks; `tma`:
        the TMA form, which needs 16-byte aligned row strides)."""
        if tma:
            triton.set_allocator(_scratch if x.is_cuda else lambda size, alignment, stream: torch.empty(size, dtype=torch.int8))
            kernel = swiglu_gemm_tma_kernel
        m, k = x.shape
        n = w1.shape[0]
        args = (x, w1, w3, h, m, n, k, x.stride(0), w1.stride(0), w3.stride(0), h.stride(0))
        if config is None:
            (kernel or swiglu_gemm_autotuned)[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
                *args, GROUP=GROUP_M, EVEN_K=k % 64 == 0)  # every config's BLOCK_K divides 64
            return
        bm, bn, bk, stages, warps = config
        (kernel or swiglu_gemm_kernel)[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
            *args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP=GROUP_M, EVEN_K=k % bk == 0,
            num_stages=stages, num_warps=warps)

    # one op name per copy of this module (ComfyUI imports the pack beside a plain `newbie_core`; see fp8_gate)
    @triton_op("newbie::" + re.sub(r"\W", "_", __name__) + "_swiglu_gemm", mutates_args=())
    def _swiglu_gemm(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
        h = torch.empty((x.shape[0], w1.shape[0]), device=x.device, dtype=x.dtype)
        launch(x, w1, w3, h, kernel=wrap_triton(swiglu_gemm_autotuned))
        return h

    AVAILABLE = True


def set_enabled(on: bool) -> None:
    """Use the fused SwiGLU GEMM where it applies, or the plain path everywhere (the default)."""
    _state["enabled"] = bool(on)


def is_enabled() -> bool:
    """Whether the fused SwiGLU GEMM is used where it applies (`set_enabled`, NEWBIE_SWIGLU_GEMM)."""
    return _state["enabled"]


def swiglu_gemm(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """`silu(x·w1ᵀ) ⊙ (x·w3ᵀ)` for `x [M,K]` and `w1, w3 [N,K]` (CUDA, one 16-bit dtype, rows contiguous):
    `[M,N]` in x's dtype — the Triton kernel."""
    if not AVAILABLE:
        raise RuntimeError("the fused SwiGLU GEMM needs Triton")
    return _swiglu_gemm(x, w1, w3)


def applies(x: torch.Tensor, w1: torch.nn.Module, w3: torch.nn.Module) -> bool:
    """True when the FeedForward `w1`/`w3` pair can run as the fused kernel for input `x`: on, Triton present,
    x a CUDA fp16/bf16 tensor with its last dimension contiguous, both layers bias-free with their weight usable
    as is (`weight_ready`)."""
    return (_state["enabled"] and AVAILABLE and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and x.stride(-1) == 1 and getattr(w1, "bias", None) is None and getattr(w3, "bias", None) is None
            and _weight_ready(w1, x) and _weight_ready(w3, x) and w1.weight.shape == w3.weight.shape
            and w1.weight.stride(-1) == 1 and w3.weight.stride(-1) == 1)


def _weight_ready(layer: torch.nn.Module, x: torch.Tensor) -> bool:
    ready = getattr(layer, "weight_ready", None)
    return bool(ready(x)) if ready is not None else False

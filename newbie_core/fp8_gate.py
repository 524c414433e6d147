"""The fp8 DiT's SwiGLU gate and the per-token fp8 quantisation of its output in one pass (one Triton kernel).

In a fp8 DiT each FeedForward computes `w2(silu(w1·x) ⊙ w3·x)`, and `w2`'s fp8 matmul first quantises its input
row by row (`fp8._quantize_rows`). Compiled, inductor fuses gate and quantisation into one kernel, but as a
*looped* reduction over the 9216-wide rows: it reads both gate inputs twice (once for the row's absolute
maximum, once to scale and cast), ~10 ms of a 0.10 s step on an H200. Here one program owns one row: it loads
`a = w1·x` and `b = w3·x` once, keeps `h = silu(a)·b` in registers (fp32), takes the row's maximum and writes
the fp8 row and its scale. Same rule as `fp8._quantize_rows_eager` (scale = amax/448, clamped to ≥ 1e-12;
round to nearest even with saturation at ±448).

Registered as a torch custom op over a Triton kernel (`torch.library.triton_op`), so eager models call it and
`torch.compile(fullgraph=True)` compiles it into the graph. Used only where Triton imports and the `w2` layer
holds a fp8 weight with fp8 matmuls on (`Fp8Linear.fp8_input_ready`): resident, or brought per call by ComfyUI's
partial load (its layers cast in `forward_fp8_input`), so both hosts and every load compute alike; everywhere else
(CPU, LoRA patches applied per call) the plain path runs.

ON by default where it applies. Measured on an H100 (torch 2.11, Triton 3.6; benchmarks/results/
fp8-gate-kernel-nvidia-h100-80gb-hbm3.md, compile-modes-nvidia-h100-80gb-hbm3.md): 0.154 ms per call against
inductor's 0.258 (fp8 bytes equal to the eager rule but for 1 in 10^6, one step apart), and the compiled fp8 DiT
step 0.0993–0.1003 s against 0.1032 (two runs). NEWBIE_FP8_FUSED_GATE=0 (or `set_enabled(False)`) turns it off.
The kernel's logic is also checked on CPU-only machines in Triton's interpreter (tests/core/test_fp8_gate.py).
"""
from __future__ import annotations

import importlib.util
import os
import re

import torch
import torch.nn.functional as F

from .fp8 import FP8_MAX, Fp8Linear

_state = {"enabled": os.environ.get("NEWBIE_FP8_FUSED_GATE", "1").strip().lower() not in ("0", "false", "no", "off")}
AVAILABLE = False

if importlib.util.find_spec("triton") is not None and hasattr(torch.library, "triton_op"):  # pragma: no cover - GPU
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _gate_quant_kernel(a_ptr, b_ptr, q_ptr, s_ptr, n_cols, stride_a, stride_b, stride_q,
                           FP8_LIMIT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        a = tl.load(a_ptr + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
        h = a * tl.sigmoid(a) * b
        scale = tl.maximum(tl.max(tl.abs(h), axis=0) / FP8_LIMIT, 1e-12)
        q = tl.clamp(h / scale, -FP8_LIMIT, FP8_LIMIT)
        tl.store(q_ptr + row * stride_q + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + row, scale)

    # one op name per copy of this module: ComfyUI imports the pack under its folder's name, beside a plain
    # `newbie_core` (the benchmarks, the tests), and older torch refuses to define one op name twice
    @triton_op("newbie::" + re.sub(r"\W", "_", __name__) + "_swiglu_quant_fp8", mutates_args=())
    def _swiglu_quant_fp8(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = a.shape
        q = torch.empty((rows, cols), device=a.device, dtype=torch.float8_e4m3fn)
        s = torch.empty((rows, 1), device=a.device, dtype=torch.float32)
        block = triton.next_power_of_2(cols)
        wrap_triton(_gate_quant_kernel)[(rows,)](a, b, q, s, cols, a.stride(0), b.stride(0), q.stride(0),
                                                 FP8_LIMIT=FP8_MAX, BLOCK=block,
                                                 num_warps=max(4, min(32, block // 512)))
        return q, s

    AVAILABLE = True


def set_enabled(on: bool) -> None:
    """Use the fused gate where it applies (the default), or the plain path everywhere."""
    _state["enabled"] = bool(on)


def is_enabled() -> bool:
    """Whether the fused gate is used where it applies (`set_enabled`, NEWBIE_FP8_FUSED_GATE)."""
    return _state["enabled"]


def swiglu_quant_fp8(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`silu(a) ⊙ b` quantised per row: `(h8 [M,N] e4m3fn, scale [M,1] fp32)` for 2-D CUDA tensors `a`, `b`
    (last dimension contiguous) — the Triton kernel."""
    if not AVAILABLE:
        raise RuntimeError("the fused fp8 SwiGLU gate needs Triton")
    return _swiglu_quant_fp8(a, b)


def swiglu(a: torch.Tensor, b: torch.Tensor, w2: torch.nn.Module) -> torch.Tensor:
    """`w2(silu(a) ⊙ b)`: the fused gate + quantisation feeding `w2`'s fp8 matmul where it applies, else the
    plain expression (same rule, rounding aside: the fused form keeps the gate in fp32 until the fp8 cast)."""
    if (_state["enabled"] and AVAILABLE and isinstance(w2, Fp8Linear) and a.is_cuda
            and a.dtype in (torch.bfloat16, torch.float16) and a.shape == b.shape and a.stride(-1) == 1
            and b.stride(-1) == 1 and w2.fp8_input_ready(a)):
        rows = a.numel() // a.shape[-1]
        h8, scale = swiglu_quant_fp8(a.reshape(rows, a.shape[-1]), b.reshape(rows, b.shape[-1]))
        return w2.forward_fp8_input(h8, scale, a.dtype).view(*a.shape[:-1], w2.out_features)
    return w2(F.silu(a) * b)

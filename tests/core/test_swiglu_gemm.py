"""The 16-bit FeedForward's fused SwiGLU GEMM (newbie_core/swiglu_gemm.py): the Triton kernel computes
`silu(x·w1ᵀ) ⊙ (x·w3ᵀ)` for every tile configuration (edges, uneven K, strided rows), the fused FFN matches the
plain one eager and compiled, and every layer whose weight is not usable as is keeps the plain path."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from newbie_core import swiglu_gemm
from newbie_core.dit_blocks import FeedForward
from newbie_core.fp8 import Fp8Linear
from newbie_core.precision import cast_module, parse_precision
from triton_interp import HAS_TRITON, NO_TRITON, run_interpreted

GPU = torch.cuda.is_available() and swiglu_gemm.AVAILABLE
needs_gpu = pytest.mark.skipif(not GPU, reason="the fused SwiGLU GEMM needs Triton and a CUDA GPU")


def _ffn(dim: int, hidden: int, device: str, dtype: torch.dtype) -> FeedForward:
    torch.manual_seed(0)
    ff = FeedForward(dim, hidden, torch.nn, dtype=torch.float32)
    ff.w1, ff.w2, ff.w3 = (Fp8Linear.from_linear(m) for m in (ff.w1, ff.w2, ff.w3))
    for m in (ff.w1, ff.w2, ff.w3):
        m.weight.data = torch.randn_like(m.weight) * dim ** -0.5
    return ff.to(device, dtype)


@pytest.fixture
def switched_on():
    before = swiglu_gemm.is_enabled()
    swiglu_gemm.set_enabled(True)
    yield
    swiglu_gemm.set_enabled(before)


def test_off_by_default_and_switched_on_by_the_environment():
    code = "from newbie_core import swiglu_gemm; print(swiglu_gemm.is_enabled())"
    repo = str(Path(__file__).resolve().parents[2])
    for value, expected in ((None, "False"), ("1", "True"), ("on", "True"), ("0", "False")):
        env = {k: v for k, v in os.environ.items() if k != "NEWBIE_SWIGLU_GEMM"}
        if value is not None:
            env["NEWBIE_SWIGLU_GEMM"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=repo, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == expected, (value, out.stdout, out.stderr[-1000:])


def test_only_resident_16_bit_weights_in_the_inputs_dtype_are_ready(switched_on):
    ff = _ffn(64, 128, "cpu", torch.bfloat16)
    x = torch.randn(2, 40, 64, dtype=torch.bfloat16)
    assert ff.w1.weight_ready(x) and ff.w3.weight_ready(x)
    assert not ff.w1.weight_ready(x.float())  # another dtype: cast per call
    assert not swiglu_gemm.applies(x, ff.w1, ff.w3)  # on the CPU the plain path runs ...
    plain = ff.w2(F.silu(ff.w1(x)) * ff.w3(x))
    assert torch.equal(ff(x), plain)  # ... bit for bit
    cast_module(ff, parse_precision("fp8_e4m3fn", "dit"))
    assert not ff.w1.weight_ready(x)  # fp8 weights with scales: never read as is


INTERPRETED = textwrap.dedent("""
    import json, torch, torch.nn.functional as F
    from newbie_core import swiglu_gemm as sg
    out = []
    torch.manual_seed(0)
    # (M, N, K): partial edge tiles in M and N, K not a multiple of BLOCK_K; x a strided view (rows 2K apart)
    for (m, n, k) in ((37, 72, 80), (131, 136, 64)):
        for dtype in (torch.float16, torch.float32):  # bf16 dots are wrong in Triton 3.9's interpreter itself
            x = torch.randn(m, 2 * k, dtype=dtype)[:, :k]
            w1, w3 = (torch.randn(n, k, dtype=dtype) * k ** -0.5 for _ in range(2))
            ref = F.silu(x.double() @ w1.double().T) * (x.double() @ w3.double().T)
            for cfg in sg.CONFIGS:
                for tma in (False, True):
                    h = torch.full((m, n), float("nan"), dtype=dtype)
                    sg.launch(x, w1, w3, h, config=cfg, tma=tma)
                    out.append([m, n, k, str(dtype), list(cfg) + [tma],
                                ((h.double() - ref).abs().max() / ref.abs().max()).item()])
    print(json.dumps(out))
""")


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
@pytest.mark.skipif(GPU, reason="a GPU runs the kernel itself (test_kernel_matches_the_plain_products_on_the_gpu)")
def test_kernel_logic_in_tritons_cpu_interpreter():
    """Every tile configuration of the kernel, pointer and TMA forms, on the CPU (TRITON_INTERPRET=1): every
    output written (no NaN left), edges and the masked (or zero-padded) last K step right."""
    rows = run_interpreted(INTERPRETED, timeout=600)
    assert len(rows) == 2 * 2 * 2 * len(swiglu_gemm.CONFIGS)
    for m, n, k, dtype, cfg, err in rows:
        assert err < (2e-3 if dtype == "torch.float16" else 1e-5), (m, n, k, dtype, cfg, err)


@needs_gpu
def test_kernel_matches_the_plain_products_on_the_gpu():  # pragma: no cover - GPU
    torch.manual_seed(1)
    for m, n, k in ((8704, 9216, 2304), (37, 200, 72)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w1, w3 = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for _ in range(2))
        exact = F.silu(x.float() @ w1.float().T) * (x.float() @ w3.float().T)
        plain = (F.silu(x @ w1.T) * (x @ w3.T)).float()  # bf16 products, rounded before the gate
        fused = swiglu_gemm.swiglu_gemm(x, w1, w3).float()
        err_fused = ((fused - exact).norm() / exact.norm()).item()
        err_plain = ((plain - exact).norm() / exact.norm()).item()
        assert err_fused <= err_plain * 1.01 + 1e-6, (m, n, k, err_fused, err_plain)  # one rounding, not three
        assert err_fused < 5e-3


@needs_gpu
@torch.no_grad()
def test_fused_feedforward_matches_the_plain_one_eager_and_compiled(switched_on):  # pragma: no cover - GPU
    ff = _ffn(256, 1024, "cuda", torch.bfloat16)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    assert swiglu_gemm.applies(x, ff.w1, ff.w3)
    swiglu_gemm.set_enabled(False)
    plain = ff(x).float()
    swiglu_gemm.set_enabled(True)
    fused = ff(x).float()
    compiled = torch.compile(ff, fullgraph=True, dynamic=False)(x).float()
    assert ((fused - plain).norm() / plain.norm()).item() < 1e-2
    assert ((compiled - fused).norm() / fused.norm()).item() < 1e-3

"""The fp8 FeedForward's fused SwiGLU gate + row quantisation (newbie_core/fp8_gate.py): the Triton kernel follows
`fp8._quantize_rows_eager`'s rule, the fused FFN matches the plain one, it compiles with fullgraph, and every
layer that cannot take a pre-quantised input (CPU, no fp8 matmuls, weights elsewhere) keeps the plain path."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from newbie_core import fp8_gate
from newbie_core.dit_blocks import FeedForward
from newbie_core.fp8 import Fp8Linear, _quantize_rows_eager, enable_fp8_matmul, fp8_matmul_supported
from newbie_core.precision import cast_module, parse_precision
from triton_interp import HAS_TRITON, NO_TRITON, run_interpreted

GPU = torch.cuda.is_available() and fp8_matmul_supported("cuda") and fp8_gate.AVAILABLE
needs_gpu = pytest.mark.skipif(not GPU, reason="the fused fp8 gate needs Triton and a CUDA GPU of capability >= 8.9")


def _ffn(dim: int, hidden: int, device: str, fp8_matmul: bool) -> FeedForward:
    torch.manual_seed(0)
    ff = FeedForward(dim, hidden, torch.nn, dtype=torch.float32)
    ff.w1, ff.w2, ff.w3 = (Fp8Linear.from_linear(m) for m in (ff.w1, ff.w2, ff.w3))
    for m in (ff.w1, ff.w2, ff.w3):
        m.weight.data = torch.randn_like(m.weight) * 0.05
    ff = ff.to(device)
    cast_module(ff, parse_precision("fp8_e4m3fn", "dit"))
    enable_fp8_matmul(ff, fp8_matmul)
    return ff


def test_layers_that_cannot_take_a_quantised_input_run_the_plain_expression():
    ff = _ffn(64, 128, "cpu", fp8_matmul=True)
    x = torch.randn(2, 40, 64, dtype=torch.bfloat16)
    a, b = ff.w1(x), ff.w3(x)
    plain = ff.w2(F.silu(a) * b)
    assert torch.equal(ff(x), plain)  # CPU: the dequantised path, bit for bit
    assert ff.w2.fp8_input_ready(a)  # the layer itself could (fp8, resident, fp8 matmuls on) ...
    assert not ff.w2.fp8_input_ready(a[:, :7])  # ... not for fewer rows than the tensor cores pay off at
    enable_fp8_matmul(ff, False)
    assert not ff.w2.fp8_input_ready(a)  # nor without fp8 matmuls
    cast_module(ff, parse_precision("bf16", "dit"))
    assert not ff.w2.fp8_input_ready(a)  # nor without a fp8 weight


INTERPRETED = textwrap.dedent("""
    import json, torch, torch.nn.functional as F
    from newbie_core import fp8_gate
    from newbie_core.fp8 import _quantize_rows_eager
    torch.manual_seed(1)
    a, b = (torch.randn(37, 600, dtype=torch.bfloat16) * 3).chunk(2, dim=-1)  # strided views; 300 of 512 lanes
    a[5] = 0
    q, s = fp8_gate.swiglu_quant_fp8(a, b)
    rq, rs = _quantize_rows_eager(F.silu(a.float()) * b.float())
    diff = q.float() != rq.float()
    # a second copy of the package (as ComfyUI imports the pack beside a plain newbie_core) defines its own op
    import importlib.util, pathlib, sys
    root = pathlib.Path(fp8_gate.__file__).parent
    spec = importlib.util.spec_from_file_location("nbcopy", root / "__init__.py", submodule_search_locations=[str(root)])
    sys.modules["nbcopy"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["nbcopy"])
    import nbcopy.fp8_gate as copy
    q2, s2 = copy.swiglu_quant_fp8(a, b)
    print(json.dumps({"available": fp8_gate.AVAILABLE, "copy": copy.AVAILABLE and torch.equal(s, s2)
                      and torch.equal(q.view(torch.uint8), q2.view(torch.uint8)), "shape": list(q.shape), "dtype": str(q.dtype),
                      "scale_rel": ((s - rs).abs() / rs).max().item(), "zero_row_scale": s[5].item(),
                      "equal": 1 - diff.float().mean().item(), "ref": rq.float()[diff].tolist(),
                      "got": q.float()[diff].tolist()}))
""")


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
@pytest.mark.skipif(GPU, reason="a GPU runs the kernel itself (test_kernel_follows_the_row_quantisation_rule); "
                                "the interpreter stands in for it on CPU-only machines")
def test_kernel_logic_in_tritons_cpu_interpreter():
    """The kernel itself on the CPU (TRITON_INTERPRET=1): rows, strides, masked lanes, the scale, a zero row.
    (On a GPU machine torch 2.11's `wrap_triton` refuses the interpreter's kernel objects; the GPU tests run.)"""
    r = run_interpreted(INTERPRETED)
    assert r["available"] and r["copy"] and r["shape"] == [37, 300] and r["dtype"] == "torch.float8_e4m3fn"
    assert r["scale_rel"] < 1e-6 and r["zero_row_scale"] == pytest.approx(1e-12)
    assert r["equal"] > 0.95, r["equal"]
    flaws = [(f, g) for f, g in zip(r["ref"], r["got"]) if not _interpreter_cast_flaw(f, g)]
    assert not flaws, flaws[:5]


def _interpreter_cast_flaw(ref: float, got: float) -> bool:
    """Where Triton's interpreter (3.9) rounds fp32 → e4m3fn wrongly and the GPU's cvt.rn does not: a value just
    below a power of two that rounds up to it loses the carry into the exponent (7.99 → 4, not 8), and subnormals
    (below 2^-6) are truncated (one 2^-9 step towards zero)."""
    a, b = abs(ref), abs(got)
    carry = b * 2 == a and a == 2.0 ** round(torch.tensor(a).log2().item())
    subnormal = a <= 2.0 ** -6 and a - b == 2.0 ** -9
    return math.copysign(1, ref) == math.copysign(1, got) and (carry or subnormal)


@needs_gpu
def test_kernel_follows_the_row_quantisation_rule():  # pragma: no cover - GPU
    torch.manual_seed(1)
    a = torch.randn(300, 9216, device="cuda", dtype=torch.bfloat16) * 3
    b = torch.randn(300, 9216, device="cuda", dtype=torch.bfloat16)
    a[7] = 0  # an all-zero row: scale clamped, no NaN
    q, s = fp8_gate.swiglu_quant_fp8(a, b)
    ref_q, ref_s = _quantize_rows_eager(F.silu(a.float()) * b.float())
    assert q.dtype == torch.float8_e4m3fn and s.shape == (300, 1)
    assert torch.allclose(s, ref_s, rtol=1e-5, atol=0)
    same = (q.view(torch.uint8) == ref_q.view(torch.uint8)).float().mean().item()
    assert same > 0.999, same  # the rest one fp8 step apart (sigmoid's last fp32 bit)
    assert ((q.float() - ref_q.float()).abs() <= 32).all()  # never more than one step at the top of the range
    assert not torch.isnan(q.float()).any() and s[7].item() == pytest.approx(1e-12)


def test_the_fused_gate_is_on_unless_switched_off():
    """On by default (measured faster on the GPU); NEWBIE_FP8_FUSED_GATE=0 switches it off at import."""
    code = "from newbie_core import fp8_gate; print(fp8_gate.is_enabled())"
    repo = str(Path(__file__).resolve().parents[2])
    for value, expected in ((None, "True"), ("0", "False"), ("off", "False"), ("1", "True")):
        env = {k: v for k, v in os.environ.items() if k != "NEWBIE_FP8_FUSED_GATE"}
        if value is not None:
            env["NEWBIE_FP8_FUSED_GATE"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=repo, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == expected, (value, out.stdout, out.stderr[-1000:])


@needs_gpu
@torch.no_grad()  # as the product samples (the fp8 matmul has no backward)
def test_fused_feedforward_matches_the_plain_one_eager_and_compiled():  # pragma: no cover - GPU
    ff = _ffn(256, 1024, "cuda", fp8_matmul=True)
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    before = fp8_gate.is_enabled()
    fp8_gate.set_enabled(False)
    try:
        plain = ff(x).float()
        fp8_gate.set_enabled(True)
        fused = ff(x).float()
        compiled = torch.compile(ff, fullgraph=True, dynamic=False)(x).float()
    finally:
        fp8_gate.set_enabled(before)
    assert ((fused - plain).norm() / plain.norm()).item() < 0.02
    assert ((compiled - fused).norm() / fused.norm()).item() < 1e-3

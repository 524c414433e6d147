"""benchmarks/swiglu_gemm.py's fused SwiGLU GEMM kernels (measured slower than cuBLAS + gate, so benchmark-only):
`silu(x·w1ᵀ) ⊙ (x·w3ᵀ)` right for every tile configuration, pointer and TMA forms, in Triton's CPU interpreter."""
from __future__ import annotations

import pytest

from triton_interp import HAS_TRITON, NO_TRITON, run_interpreted

INTERPRETED = """
import json, sys, torch, torch.nn.functional as F
sys.path.insert(0, "benchmarks")
import swiglu_gemm as sg
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
                out.append([m, n, k, str(dtype), list(cfg) + [tma], ((h.double() - ref).abs().max() / ref.abs().max()).item()])
print(json.dumps(out))
"""


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_kernels_in_tritons_cpu_interpreter():
    """Every output written (no NaN left), edges and the masked (or zero-padded) last K step right."""
    rows = run_interpreted(INTERPRETED, timeout=600)
    assert len(rows) == 2 * 2 * 2 * 6
    for m, n, k, dtype, cfg, err in rows:
        assert err < (2e-3 if dtype == "torch.float16" else 1e-5), (m, n, k, dtype, cfg, err)

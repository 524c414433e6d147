"""benchmarks/compile_modes.py: its CPU plumbing mode compiles the tiny DiT and the w1‖w3 fusion keeps the output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_compile_modes_benchmark_quick_mode(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_modes.py"), "--quick", "--device", "cpu",
                           "--precisions", "bf16", "--variants", "default,fused_swiglu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (result,) = [json.loads(p.read_text()) for p in tmp_path.glob("compile-modes-*.json")]
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"default", "fused_swiglu"}
    assert rows["default"]["seconds"] > 0 and "profile" in rows["default"]
    # one [2·hidden, dim] GEMM computes the same products as w1 and w3 apart
    assert rows["fused_swiglu"]["rel_l2_diff"] < 1e-2

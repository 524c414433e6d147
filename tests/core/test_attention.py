"""SDPA kernel choice: forced kernels (`kernel=`), the "auto" backend's kernel priority on CUDA
(`sdpa_preferred`), and the benchmark that measures them (CPU: the same numbers through every path)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from newbie_core import attention as attn_mod
from newbie_core.attention import KeyPrefix, apply_rope, attention, rope_cos_sin, sdpa_attention, sdpa_preferred

ROOT = Path(__file__).resolve().parents[2]


def _qkv(seed=0, b=2, s=13):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, 16, generator=g) for h in (6, 2, 2)]  # GQA: 3 query heads per KV head


@pytest.mark.parametrize("kernel", ["flash", "flash_expanded", "math"])
def test_forced_cpu_kernels_give_the_default_result(kernel):
    q, k, v = _qkv()
    mask = torch.arange(13)[None] < torch.tensor([13, 6])[:, None]
    for m in (None, mask):
        ref = sdpa_attention(q, k, v, m)
        torch.testing.assert_close(sdpa_attention(q, k, v, m, kernel=kernel), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(attention(q, k, v, m, backend="sdpa", kernel=kernel), ref, rtol=1e-5, atol=1e-5)


def test_a_kernel_that_cannot_run_raises_and_an_unknown_one_is_refused():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError):  # cuDNN has no CPU kernel: torch says no viable backend
        sdpa_attention(q, k, v, kernel="cudnn")
    with pytest.raises(ValueError, match="unknown SDPA kernel 'fastest'"):
        sdpa_attention(q, k, v, kernel="fastest")


@pytest.mark.parametrize("expand", [False, True])
def test_preferred_kernel_priority_falls_back_to_a_kernel_that_takes_the_inputs(expand, monkeypatch):
    """On the CPU cuDNN is unavailable: the priority list falls through to a CPU kernel, same numbers, with the
    mask and with K/V expanded or not."""
    monkeypatch.setattr(attn_mod, "AUTO_CUDA_EXPAND_KV", expand)
    q, k, v = _qkv(1)
    mask = torch.arange(13)[None] < torch.tensor([4, 13])[:, None]
    for m in (None, mask):
        torch.testing.assert_close(sdpa_preferred(q, k, v, m), sdpa_attention(q, k, v, m), rtol=1e-5, atol=1e-5)


def test_auto_on_cuda_tensors_goes_through_the_kernel_priority(monkeypatch):
    """The dispatch: "auto" sends CUDA tensors (no flash-attn) to `sdpa_preferred`, per caption-length run for
    a KeyPrefix; "sdpa" and CPU tensors never go there."""
    calls = []

    def spy(q, k, v, key_mask=None):
        calls.append(q.shape[2])
        return sdpa_attention(q, k, v, key_mask)

    monkeypatch.setattr(attn_mod, "sdpa_preferred", spy)
    monkeypatch.setattr(attn_mod, "_flash_module", False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    q, k, v = _qkv(2, b=2, s=10)
    out = attention(q, k, v, KeyPrefix((10, 4)), backend="auto")
    assert calls == [10, 4] and out.shape == q.shape
    attention(q, k, v, None, backend="sdpa")
    assert calls == [10, 4]


def test_rope_forms_agree():
    torch.manual_seed(0)
    cos, sin = (t[:, :, None] for t in rope_cos_sin(torch.randint(0, 40, (2, 30, 3)), (32, 32, 32)))
    x = torch.randn(2, 30, 3, 96)
    assert torch.equal(apply_rope(x, cos, sin, "real"), apply_rope(x, cos, sin, "complex"))


def test_attention_kernel_benchmark_quick_mode(tmp_path):
    """benchmarks/attention_kernels.py end to end on the CPU: every kernel either measured or its error
    recorded; the DiT rows ("sdpa", "auto", the fastest kernel; eager and compiled) match each other."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention_kernels.py"), "--quick",
                           "--device", "cpu", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (res,) = [json.loads(p.read_text()) for p in tmp_path.glob("attention-kernels-*.json")]
    assert set(attn_mod.SDPA_KERNELS) <= set(res["kernels"])
    assert res["kernels"]["math"]["rel_l2_diff"] == 0.0 and "error" in res["kernels"]["cudnn"]
    assert res["auto_policy"] == {"kernels": list(attn_mod.AUTO_CUDA_KERNELS),
                                  "expand_kv": attn_mod.AUTO_CUDA_EXPAND_KV}
    eager = [r for name, r in res["dit"].items() if name.endswith("_eager")]
    assert len(eager) == 3 and all(r["rel_l2_diff"] == 0.0 for r in eager)
    assert all(r["rel_l2_diff"] < 0.05 for r in res["dit"].values())  # compiled: fused bf16 arithmetic


def test_flash_attn_availability_can_be_asked_first_inside_a_fullgraph_compile():
    """The "auto" backend asks whether flash-attn is usable inside the DiT's forward; a compiled DiT whose very
    first call is compiled (CLI --compile) must not try the import while tracing (an import failure breaks the
    fullgraph compile when flash-attn is not installed). Fresh process: nothing asked before."""
    code = ("import torch\nfrom newbie_core.attention import flash_attn_available\n"
            "f = torch.compile(lambda x: x + float(flash_attn_available()), fullgraph=True, backend='eager')\n"
            "print(float(f(torch.zeros(1))[0]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    import importlib.util

    assert proc.stdout.split()[-1] == ("0.0" if importlib.util.find_spec("flash_attn") is None else "1.0")


def test_cfg_pair_benchmark_quick_mode(tmp_path):
    """benchmarks/cfg_pair_attention.py end to end on the CPU: every variant measured or its error recorded,
    eager and compiled (the CUDA-only kernels record errors here). On the GPU it showed why the CFG pair keeps two
    cuDNN calls: cuDNN's ragged call over both samples took 41 ms against 0.74 (results/cfg-pair-attention-*)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cfg_pair_attention.py"), "--quick", "--device",
                           "cpu", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (res,) = [json.loads(p.read_text()) for p in tmp_path.glob("cfg-pair-attention-*.json")]
    assert res["lengths"] == [80, 70] and len(res["variants"]) == 8
    for name, row in res["variants"].items():
        for mode in ("eager", "compiled"):
            assert (f"{mode}_ms" in row) != (f"{mode}_error" in row), (name, mode, row)
    assert "NotImplementedError" in res["variants"]["ragged_cudnn"]["eager_error"]  # cuDNN: CUDA only

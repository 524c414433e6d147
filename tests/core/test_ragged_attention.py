"""The CFG pair's attention in one ragged call (`attention.ragged_attention`): packing the real tokens (views
when every sample but the last is unpadded, gathered otherwise), unpacking with zero pad rows, and when the
DiT's "auto" attention takes it. cuDNN's ragged kernel is CUDA-only: the CPU tests pass a reference kernel
that attends within each packed sequence, so they check the packing against `prefix_attention`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from newbie_core import attention as attn_mod
from newbie_core.attention import KeyPrefix, attention, prefix_attention, ragged_attention, sdpa_attention


def reference_ragged(q, k, v, offsets, longest, scale):
    """Per-sequence math attention over packed [T,H,D] rows at `offsets` (GQA by repeating K/V heads)."""
    outs = []
    cum = offsets.tolist()
    for a, b in zip(cum, cum[1:]):
        assert b - a <= longest
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H,n,D]
        rep = qs.shape[0] // ks.shape[0]
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(0, 1))
    return torch.cat(outs)


def _qkv(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    # [B,S,H,D] transposed to heads-first views, as the DiT lays them out
    return [torch.randn(b, s, h, 16, generator=g).transpose(1, 2) for h in (6, 2, 2)]


def _offsets(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("lengths", [(13, 6), (6, 13), (13, 13, 4, 4), (13, 9, 13)])
@pytest.mark.parametrize("expand", [False, True])
def test_ragged_gives_the_per_length_result_with_zero_pad_rows(lengths, expand):
    q, k, v = _qkv(len(lengths), 13)
    prefix = KeyPrefix(lengths, _offsets(lengths))
    out = ragged_attention(q, k, v, prefix, kernel=reference_ragged, expand_kv=expand)
    ref = prefix_attention(q, k, v, prefix, lambda a, b, c: sdpa_attention(a, b, c))
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for i, n in enumerate(lengths):
        assert torch.count_nonzero(out[i, :, n:]) == 0, f"sample {i}'s pad query rows must be zeros"


def test_longest_first_packs_views_and_shorter_first_gathers():
    """Views when every sample but the last is unpadded: the kernel gets slices of q's own storage."""
    q, k, v = _qkv(2, 13)
    seen = []

    def spy(qp, kp, vp, offsets, longest, scale):
        seen.append((qp.untyped_storage().data_ptr() == q.untyped_storage().data_ptr(), qp.shape[0], longest))
        return reference_ragged(qp, kp, vp, offsets, longest, scale)

    ragged_attention(q, k, v, KeyPrefix((13, 6), _offsets((13, 6))), kernel=spy, expand_kv=False)
    ragged_attention(q, k, v, KeyPrefix((6, 13), _offsets((6, 13))), kernel=spy, expand_kv=False)
    assert seen == [(True, 19, 13), (False, 19, 13)]


def test_key_prefix_offsets_only_on_cuda_and_equality_ignores_them():
    p = KeyPrefix((10, 4))
    assert p.to("cpu") is p and p.offsets is None
    assert KeyPrefix((10, 4), _offsets((10, 4))) == p


def test_when_auto_attention_takes_the_ragged_path(monkeypatch):
    """Only when switched on, on CUDA half tensors with cuDNN as the kernel, and for lengths that differ."""
    calls = []
    monkeypatch.setattr(attn_mod, "ragged_attention", lambda q, k, v, p: calls.append(p.lengths) or q)
    monkeypatch.setattr(attn_mod, "_flash_module", False)
    monkeypatch.setattr(attn_mod, "sdpa_preferred", lambda q, k, v, m=None: sdpa_attention(q, k, v, m))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(2, 10))
    pre = KeyPrefix((10, 4), _offsets((10, 4)))
    attn_mod.set_ragged(False)
    attention(q, k, v, pre, backend="auto")
    assert calls == []
    try:
        attn_mod.set_ragged(True)
        attention(q, k, v, pre, backend="auto")
        assert calls == [(10, 4)]
        attention(q, k, v, pre, backend="sdpa")  # torch's own kernel choice: not necessarily cuDNN
        attention(q.float(), k.float(), v.float(), pre, backend="auto")  # cuDNN takes half types only
        attention(q, k, v, KeyPrefix((10, 4)), backend="auto")  # no offsets (CPU-built prefix)
        attention(q, k, v, KeyPrefix((10, 10), _offsets((10, 10))), backend="auto")  # one length: one call anyway
        assert calls == [(10, 4)]
        attention(q, k, v, pre, backend="sdpa", kernel="cudnn")
        assert calls == [(10, 4), (10, 4)]
    finally:
        attn_mod.set_ragged(False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN's ragged attention needs a CUDA GPU")
@pytest.mark.parametrize("lengths", [(4352, 4136), (4136, 4352)])
def test_cudnn_ragged_matches_two_calls_on_the_gpu(lengths):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, max(lengths), h, 96, generator=g).cuda().bfloat16().transpose(1, 2) for h in (24, 8, 8))
    prefix = KeyPrefix(lengths).to("cuda")
    ref = attention(q, k, v, prefix, backend="sdpa", kernel="cudnn")
    out = ragged_attention(q, k, v, prefix)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    fused = torch.compile(lambda a, b, c: ragged_attention(a, b, c, prefix), fullgraph=True)
    torch.testing.assert_close(fused(q, k, v), ref, rtol=2e-2, atol=2e-2)


def test_cfg_pair_benchmark_quick_mode(tmp_path):
    """benchmarks/cfg_pair_attention.py end to end on the CPU: every variant measured or its error recorded,
    eager and compiled (the CUDA-only kernels record errors here)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "cfg_pair_attention.py"), "--quick", "--device",
                           "cpu", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (res,) = [json.loads(p.read_text()) for p in tmp_path.glob("cfg-pair-attention-*.json")]
    assert res["lengths"] == [80, 70] and len(res["variants"]) == 8
    for name, row in res["variants"].items():
        for mode in ("eager", "compiled"):
            assert (f"{mode}_ms" in row) != (f"{mode}_error" in row), (name, mode, row)
    assert "NotImplementedError" in res["variants"]["ragged_cudnn"]["eager_error"]  # cuDNN: CUDA only

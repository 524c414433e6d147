"""fp8 weight storage: scaled quantisation keeps small weights, layer class swaps are reversible, CPU fallback."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from newbie_core import ops
from newbie_core.fp8 import (FP8, Fp8StorageLinear, dequantize_weight, enable_fp8_matmul, fp8_linear,
                             fp8_matmul_supported, quantize_linear_weight, quantize_weight, set_linear_storage)


def test_per_channel_scales_keep_small_weights_that_a_plain_cast_loses():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.logspace(-4, 0, 64)[:, None]  # rows from 1e-4 to 1 in magnitude
    w8, scale = quantize_weight(w)
    assert w8.dtype == FP8 and scale.shape == (64,)
    rel = ((dequantize_weight(w8, scale, torch.float32) - w).norm(dim=1) / w.norm(dim=1))
    plain = ((w.to(FP8).float() - w).norm(dim=1) / w.norm(dim=1))
    assert rel.max() < 0.05
    assert plain[0] > 0.5, "a plain cast flushes 1e-4-sized weights (the reason for scales)"


def test_linear_class_swap_covers_torch_and_our_ops_and_is_reversible():
    m = nn.Sequential(nn.Linear(4, 4), ops.Linear(4, 4), nn.LayerNorm(4))
    set_linear_storage(m, True)
    assert type(m[0]) is Fp8StorageLinear and type(m[1]) is Fp8StorageLinear
    m[0].weight.data = quantize_linear_weight(m[0], m[0].weight.data)
    assert enable_fp8_matmul(m) == 2
    set_linear_storage(m, False)
    assert type(m[0]) is nn.Linear and type(m[1]) is ops.Linear
    assert "weight_scale" not in m[0].__dict__ and "fp8_matmul" not in m[0].__dict__


def test_fp8_layer_on_cpu_dequantises_even_with_fp8_matmul_enabled():
    torch.manual_seed(1)
    lin = nn.Linear(32, 48)
    x = torch.randn(40, 32, dtype=torch.bfloat16)
    ref = lin(x.float())
    set_linear_storage(lin, True)
    lin.weight.data = quantize_linear_weight(lin, lin.weight.data)
    enable_fp8_matmul(lin)
    assert not fp8_matmul_supported("cpu")
    out = lin(x)
    expect = F.linear(x, dequantize_weight(lin.weight, lin.weight_scale, torch.bfloat16), lin.bias.bfloat16())
    assert torch.equal(out, expect)
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.05


@pytest.mark.skipif(not fp8_matmul_supported("cuda" if torch.cuda.is_available() else "cpu"),
                    reason="fp8 tensor-core matmul needs a CUDA GPU of capability >= 9.0")
def test_fp8_tensor_core_matmul_matches_the_dequantised_path():
    torch.manual_seed(2)
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    w8, s = quantize_weight(torch.randn(512, 256, device="cuda") * 0.02)
    b = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x, dequantize_weight(w8, s, torch.bfloat16), b).float()
    out = fp8_linear(x, w8, s, b).float()
    assert ((out - ref).norm() / ref.norm()) < 0.05

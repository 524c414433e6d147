"""fp8 weight storage: scaled quantisation keeps small weights; Fp8Linear is a real module (the scale is a
non-persistent buffer that follows .to(), stays out of state_dict and survives a reload); CPU fallback."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from newbie_core import ops
from newbie_core.fp8 import (FP8, Fp8Linear, dequantize_weight, enable_fp8_matmul, fp8_linear, fp8_matmul_supported,
                             make_fp8_capable, quantize_weight)
from newbie_core.precision import cast_module, parse_precision

FP8_PREC = parse_precision("fp8_e4m3fn", "dit")


def test_per_channel_scales_keep_small_weights_that_a_plain_cast_loses():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.logspace(-4, 0, 64)[:, None]  # rows from 1e-4 to 1 in magnitude
    w8, scale = quantize_weight(w)
    assert w8.dtype == FP8 and scale.shape == (64,)
    rel = ((dequantize_weight(w8, scale, torch.float32) - w).norm(dim=1) / w.norm(dim=1))
    plain = ((w.to(FP8).float() - w).norm(dim=1) / w.norm(dim=1))
    assert rel.max() < 0.05
    assert plain[0] > 0.5, "a plain cast flushes 1e-4-sized weights (the reason for scales)"


def test_small_weights_are_not_flushed_by_cast_module():
    torch.manual_seed(3)
    lin = ops.Linear(32, 16)
    lin.weight.data = torch.randn(16, 32) * 1e-4
    lin.bias.data = torch.zeros(16)
    cast_module(lin, FP8_PREC)
    assert lin.weight.dtype == FP8 and (lin.weight.float() != 0).float().mean() > 0.95


def test_make_fp8_capable_replaces_plain_linears_keeping_their_parameters():
    m = nn.Sequential(nn.Linear(4, 4), ops.Linear(4, 4), nn.LayerNorm(4))
    w0 = m[0].weight
    assert make_fp8_capable(m) == 1  # ops.Linear already is one
    assert type(m[0]) is Fp8Linear and isinstance(m[1], Fp8Linear) and m[0].weight is w0
    assert m[0].weight_scale is None and enable_fp8_matmul(m) == 2


def test_fp8_linear_matches_the_dequantised_reference_and_the_scale_is_a_real_buffer():
    torch.manual_seed(1)
    lin = Fp8Linear(32, 48)
    lin.weight.data, lin.bias.data = torch.randn(48, 32) * 0.05, torch.randn(48) * 0.1
    keys = set(lin.state_dict())
    cast_module(lin, FP8_PREC)
    assert set(lin.state_dict()) == keys == {"weight", "bias"}, "the scale is not a file key"
    assert "weight_scale" in dict(lin.named_buffers())
    x = torch.randn(40, 32, dtype=torch.bfloat16)
    expect = F.linear(x, dequantize_weight(lin.weight, lin.weight_scale, torch.bfloat16), lin.bias.bfloat16())
    assert torch.equal(lin(x), expect)
    moved = copy.deepcopy(lin).to(torch.device("meta"))
    assert moved.weight_scale.device.type == "meta", ".to() moves the scale with the weight"


def test_scale_survives_a_state_dict_reload():
    torch.manual_seed(2)
    lin = Fp8Linear(16, 16)
    lin.weight.data, lin.bias.data = torch.randn(16, 16), torch.randn(16)
    cast_module(lin, FP8_PREC)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    before, scale = lin(x), lin.weight_scale.clone()
    lin.load_state_dict(lin.state_dict())
    assert torch.equal(lin.weight_scale, scale) and torch.equal(lin(x), before)


def test_fp8_layer_on_cpu_dequantises_even_with_fp8_matmul_enabled():
    torch.manual_seed(1)
    lin = nn.Linear(32, 48)
    x = torch.randn(40, 32, dtype=torch.bfloat16)
    ref = lin(x.float())
    make_fp8_capable(wrapper := nn.Sequential(lin))
    lin = wrapper[0]
    cast_module(lin, FP8_PREC)
    enable_fp8_matmul(lin)
    assert not fp8_matmul_supported("cpu")
    out = lin(x)
    expect = F.linear(x, dequantize_weight(lin.weight, lin.weight_scale, torch.bfloat16), lin.bias.bfloat16())
    assert torch.equal(out, expect)
    assert (out.float() - ref).abs().max() / ref.abs().max() < 0.05


def test_cast_back_from_fp8_drops_the_scale():
    lin = Fp8Linear(8, 8)
    lin.weight.data, lin.bias.data = torch.randn(8, 8), torch.randn(8)
    cast_module(lin, FP8_PREC)
    cast_module(lin, parse_precision("bf16", "dit"))
    assert lin.weight.dtype == torch.bfloat16 and lin.weight_scale is None


@pytest.mark.skipif(not fp8_matmul_supported("cuda" if torch.cuda.is_available() else "cpu"),
                    reason="fp8 tensor-core matmul needs a CUDA GPU of capability >= 8.9")
def test_fp8_tensor_core_matmul_matches_the_dequantised_path():
    torch.manual_seed(2)
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    w8, s = quantize_weight(torch.randn(512, 256, device="cuda") * 0.02)
    b = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x, dequantize_weight(w8, s, torch.bfloat16), b).float()
    out = fp8_linear(x, w8, s, b).float()
    assert ((out - ref).norm() / ref.norm()) < 0.05

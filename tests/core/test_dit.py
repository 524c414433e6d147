"""NextDiT structure, padding invariance, size errors, dtype handling; attention and RoPE helpers."""
from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

from newbie_core import attention as attn_mod
from newbie_core.attention import KeyPrefix, apply_rope, attention, rope_cos_sin, sdpa_attention
from newbie_core.dit import DiTConfig, NextDiT, load_dit
from newbie_core.errors import InputError
from newbie_core.ops import TorchOps
from newbie_core.tiny.dit import TINY_DIT_CONFIG, write_tiny_dit

C = TINY_DIT_CONFIG


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    return write_tiny_dit(tmp_path_factory.mktemp("tinydit"), seed=0)


@pytest.fixture(scope="module")
def dit(tiny_paths):
    return load_dit(tiny_paths["dit_hf"], dtype=torch.float32)


def _inputs(b=2, seq=6, h=8, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 16, h, w, generator=g), torch.rand(b, generator=g),
            torch.randn(b, seq, C.cap_feat_dim, generator=g), torch.randn(b, C.clip_text_dim, generator=g))


# ------------------------------------------------------------------------------------------ structure
def test_full_parameter_count_on_meta():
    with torch.device("meta"):
        m = NextDiT(DiTConfig.full(), device="meta")
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert count(m) == 3_486_636_096
    assert len(m.state_dict()) == 535
    expected = {"layers": 3_143_252_736, "noise_refiner": 174_625_152, "context_refiner": 155_732_352,
                "cap_embedder": 5_903_104, "time_text_embed": 2_098_176, "final_layer": 2_509_120,
                "t_embedder": 1_312_768, "clip_text_pooled_proj": 1_050_624, "x_embedder": 149_760,
                "norm_final": 2_304}
    assert {k: count(getattr(m, k)) for k in expected} == expected
    assert count(m.layers[0]) == 87_312_576 and count(m.context_refiner[0]) == 77_866_176
    sd = m.state_dict()
    assert sd["layers.0.attention.qkv.weight"].shape == (3840, 2304)
    assert sd["layers.35.adaLN_modulation.1.weight"].shape == (9216, 1024)
    assert "context_refiner.0.adaLN_modulation.1.weight" not in sd
    assert sd["time_text_embed.1.weight"].shape == (1024, 2048)


def test_builds_in_fp8_without_init():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no fp8 dtype")
    m = NextDiT(C, dtype=torch.float8_e4m3fn)  # real (CPU) tensors: no nn.init call may touch them
    assert m.layers[0].attention.qkv.weight.dtype == torch.float8_e4m3fn


def test_injected_operations_and_attention_are_used(tiny_paths):
    built, calls = [], []

    class Lin(TorchOps.Linear):
        def __init__(self, *a, **k):
            built.append(a)
            super().__init__(*a, **k)

    ops = types.SimpleNamespace(Linear=Lin, LayerNorm=TorchOps.LayerNorm)

    def my_attention(q, k, v, key_mask=None):
        calls.append((q.shape, k.shape, key_mask is None))
        return sdpa_attention(q, k, v, key_mask)

    m = load_dit(tiny_paths["dit_hf"], dtype=torch.float32, operations=ops, attention=my_attention)
    ref = load_dit(tiny_paths["dit_hf"], dtype=torch.float32)
    assert not m.packed_attention, "an unknown attention callable gets a boolean mask, never a KeyPrefix"
    ref.packed_attention = False
    x, t, cf, p = _inputs()
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    torch.testing.assert_close(m(x, t, cf, mask, p), ref(x, t, cf, mask, p), rtol=0, atol=0)
    assert len(built) == sum(isinstance(mod, torch.nn.Linear) for mod in m.modules())
    n_blocks = C.n_layers + 2 * C.n_refiner_layers
    assert len(calls) == n_blocks
    assert calls[0][0][1] == C.n_heads and calls[0][1][1] == C.n_kv_heads  # GQA reaches the kernel unrepeated


# ------------------------------------------------------------------------------- padding / layout
def test_caption_padding_does_not_change_output(dit):
    x, t, cf, p = _inputs(b=2, seq=9)
    short = 5
    alone = dit(x[:1], t[:1], cf[:1, :short], torch.ones(1, short), p[:1])
    # batched with a longer caption: row 0 right-padded to 9 (garbage features in the pads)
    mask = torch.tensor([[1] * short + [0] * 4, [1] * 9])
    batched = dit(x, t, cf, mask, p)
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=1e-5)
    # extra right padding appended to one caption
    more = torch.cat([cf, torch.randn(2, 3, C.cap_feat_dim)], 1)
    mask_more = torch.cat([mask, torch.zeros(2, 3, dtype=mask.dtype)], 1)
    torch.testing.assert_close(dit(x, t, more, mask_more, p), batched, rtol=0, atol=1e-5)


def test_layout_precompute_and_unpadded_fast_path(dit):
    x, t, cf, p = _inputs()
    full = torch.ones(2, 6, dtype=torch.long)
    lay = dit.prepare(full, 8, 10)
    assert lay.cap_mask is None and lay.joint_mask is None  # no mask → fast kernels
    torch.testing.assert_close(dit(x, t, cf, full, p, layout=lay), dit(x, t, cf, full, p), rtol=0, atol=0)
    padded = torch.tensor([[1] * 6, [1] * 2 + [0] * 4])
    lay = dit.prepare(padded, 8, 10)
    assert lay.joint_mask == KeyPrefix((6 + 20, 2 + 20)) and lay.joint_rope[0].shape == (2, 26, 1, C.head_dim // 2)
    with pytest.raises(InputError, match="prepare"):
        dit(x[:, :, :, :8], t, cf, padded, p, layout=lay)


def test_packed_real_tokens_equal_the_masked_padded_batch(dit):
    """Packing each sample's real tokens first (KeyPrefix, no mask) computes what a key mask computes."""
    x, t, cf, p = _inputs()
    padded = torch.tensor([[1] * 6, [1] * 2 + [0] * 4])
    packed = dit(x, t, cf, padded, p)
    dit.packed_attention = False
    try:
        lay = dit.prepare(padded, 8, 10)
        assert lay.joint_mask.dtype == torch.bool and lay.joint_order is None
        masked = dit(x, t, cf, padded, p, layout=lay)
    finally:
        dit.packed_attention = True
    torch.testing.assert_close(packed, masked, rtol=0, atol=2e-6)


def test_empty_caption_row_is_finite(dit):
    x, t, cf, p = _inputs()
    out = dit(x, t, cf, torch.tensor([[1] * 6, [0] * 6]), p)
    assert torch.isfinite(out).all()


def test_dtype_handling(tiny_paths, dit):
    x, t, cf, p = _inputs()
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    ref = dit(x, t, cf, mask, p)
    bf = load_dit(tiny_paths["dit_comfyui"], dtype=torch.bfloat16)
    out = bf(x, t, cf, mask, p)  # fp32 inputs, bf16 weights → computes in bf16, returns fp32
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.25 and (out - ref).abs().mean() < 0.03
    assert bf(x.bfloat16(), t, cf, mask, p).dtype == torch.bfloat16
    if hasattr(torch, "float8_e4m3fn"):
        f8 = load_dit(tiny_paths["dit_hf"], dtype=torch.float8_e4m3fn)
        out8 = f8(x, t, cf, mask, p)  # fp8 storage, bf16 compute
        assert out8.dtype == torch.float32 and torch.isfinite(out8).all()
        assert (out8 - ref).abs().mean() < 0.2


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("h,w,msg", [(9, 8, "72 px .* multiple of 16; use 64 px"),
                                     (8, 1024, "width 8192 px .* at most 8176 px")])
def test_bad_sizes_raise_input_error(dit, h, w, msg):
    with pytest.raises(InputError, match=msg):
        dit.prepare(torch.ones(1, 4), h, w)


def test_caption_too_long_and_bad_mask(dit):
    with pytest.raises(InputError, match="1024 tokens"):
        dit.prepare(torch.ones(1, 1024), 8, 8)
    with pytest.raises(InputError, match="right-padded"):
        dit.prepare(torch.tensor([[0, 1, 1]]), 8, 8)
    x, t, cf, p = _inputs(h=6)
    with pytest.raises(InputError, match="multiple of 16"):
        dit(x[..., :5, :], t, cf, torch.ones(2, 6), p)


# --------------------------------------------------------------------------------- attention / RoPE
def _reference_attention(q, k, v, key_mask=None):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        s = s.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    return s.softmax(-1) @ v


def test_gqa_attention_equals_repeated_kv():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 11, 16, generator=g) for h in (6, 2, 2))
    torch.testing.assert_close(attention(q, k, v), _reference_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_key_mask_equals_unpadded_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 9, 16, generator=g) for h in (4, 2, 2))
    lens = [9, 5]
    mask = torch.arange(9)[None] < torch.tensor(lens)[:, None]
    out = attention(q, k, v, mask)
    for i, n in enumerate(lens):
        ref = _reference_attention(q[i:i + 1, :, :n], k[i:i + 1, :, :n], v[i:i + 1, :, :n])
        torch.testing.assert_close(out[i:i + 1, :, :n], ref, rtol=1e-5, atol=1e-5)


def test_flash_backend_logic_with_fake_kernel(monkeypatch):
    """The no-sync varlen packing, checked with a fake flash-attn built on per-sequence SDPA."""
    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        out = torch.full_like(q, float("nan"))  # rows past the real tokens are never written
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            out[a:b] = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                scale=softmax_scale, enable_gqa=True).transpose(0, 1)
        return out

    def dense(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        return sdpa_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    monkeypatch.setattr(attn_mod, "_flash_module", types.SimpleNamespace(flash_attn_varlen_func=varlen,
                                                                          flash_attn_func=dense))
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, h, 7, 8, generator=g) for h in (4, 2, 2))
    mask = torch.arange(7)[None] < torch.tensor([7, 3, 5])[:, None]
    out = attention(q, k, v, mask, backend="flash")
    ref = sdpa_attention(q, k, v, mask)
    torch.testing.assert_close(out * mask[:, None, :, None], ref * mask[:, None, :, None], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(attention(q, k, v, backend="flash"), sdpa_attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_eager_complex_multiply_and_compiled_real_formula_give_the_same_numbers(dtype, monkeypatch):
    """apply_rope runs one complex multiply in eager mode and the real formula under torch.compile (inductor
    fuses only the latter): identical results, for contiguous and strided inputs."""
    torch.manual_seed(0)
    pos = torch.randint(0, 40, (2, 50, 3))
    cos, sin = (t[:, :, None] for t in rope_cos_sin(pos, (32, 32, 32)))
    x = torch.randn(2, 50, 3, 96).to(dtype)
    strided = torch.randn(2, 50, 6, 96).to(dtype)[:, :, ::2]  # a view, as a split of fused heads can be
    eager = [apply_rope(t, cos, sin) for t in (x, strided)]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled_formula = [apply_rope(t, cos, sin) for t in (x, strided)]
    for a, b in zip(eager, compiled_formula):
        assert a.dtype == dtype and torch.equal(a, b)


def test_rope_matches_complex_rotation():
    pos = torch.tensor([[[0, 0, 0], [3, 1, 2], [17, 5, 9]]])
    cos, sin = rope_cos_sin(pos, (4, 6, 6))
    assert cos.shape == (1, 3, 8) and cos.dtype == torch.float32
    x = torch.randn(1, 3, 2, 16)
    freqs = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[:, :, None]
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(1, 3, 2, 8, 2)) * freqs).flatten(3)
    torch.testing.assert_close(apply_rope(x, cos[:, :, None], sin[:, :, None]), ref, rtol=1e-6, atol=1e-6)
    # axis 0 uses theta^(-2k/4): the 2nd pair of position 3 rotates by 3/100
    assert torch.allclose(torch.atan2(sin[0, 1, 1], cos[0, 1, 1]), torch.tensor(0.03))

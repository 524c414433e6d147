"""Building blocks of the NewBie Next-DiT (spec §1.3): attention, SwiGLU FFN, transformer block, final layer.

Module and parameter names equal the official checkpoint keys (spec §1.7). Every weight-holding layer is
built through the injected `operations` namespace (see `newbie_core.ops`); no weight is initialised.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from . import fp8_gate
from .attention import apply_rope
from .ops import RMSNorm as _DefaultRMSNorm

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), fp32, broadcastable to [B,S,H,Dh/2]


def rms_norm_class(operations):
    """The RMSNorm class to use: `operations.RMSNorm` when the namespace has one, else ours."""
    return getattr(operations, "RMSNorm", None) or _DefaultRMSNorm


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of raw t (cos first, 256 wide, max period 1e4) followed by a 2-layer MLP."""

    def __init__(self, hidden: int, operations, freq_dim: int = 256, dtype=None, device=None) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            operations.Linear(freq_dim, hidden, bias=True, dtype=dtype, device=device),
            nn.SiLU(),
            operations.Linear(hidden, hidden, bias=True, dtype=dtype, device=device),
        )

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`t [B]` (any float dtype, used as-is, not ×1000) → `[B, hidden]` in `dtype`."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(dtype))


class FeedForward(nn.Module):
    """SwiGLU: `w2(silu(w1·x) ⊙ w3·x)`, no biases."""

    def __init__(self, dim: int, hidden: int, operations, dtype=None, device=None) -> None:
        super().__init__()
        self.w1 = operations.Linear(dim, hidden, bias=False, dtype=dtype, device=device)
        self.w2 = operations.Linear(hidden, dim, bias=False, dtype=dtype, device=device)
        self.w3 = operations.Linear(dim, hidden, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated FFN (fp8 with fp8 matmuls: gate and `w2`'s input quantisation fused, `fp8_gate`)."""
        return fp8_gate.swiglu(self.w1(x), self.w3(x), self.w2)


class JointAttention(nn.Module):
    """GQA self-attention: fused qkv, RMSNorm on q and k, 3-axis RoPE, injected attention kernel."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, qk_norm_eps: float, operations,
                 attention_fn: Callable, dtype=None, device=None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.qkv = operations.Linear(dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False,
                                     dtype=dtype, device=device)
        self.out = operations.Linear(n_heads * self.head_dim, dim, bias=False, dtype=dtype, device=device)
        norm = rms_norm_class(operations)
        self.q_norm = norm(self.head_dim, eps=qk_norm_eps, dtype=dtype, device=device)
        self.k_norm = norm(self.head_dim, eps=qk_norm_eps, dtype=dtype, device=device)
        self.attention_fn = attention_fn

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, rope: Rope) -> torch.Tensor:
        """`x [B,S,D]`, key_mask `[B,S]` bool or None, rope (cos, sin) → `[B,S,D]`."""
        b, s, _ = x.shape
        hd, hq, hkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.qkv(x).split([hq * hd, hkv * hd, hkv * hd], dim=-1)
        q = apply_rope(self.q_norm(q.view(b, s, hq, hd)), *rope)
        k = apply_rope(self.k_norm(k.view(b, s, hkv, hd)), *rope)
        v = v.view(b, s, hkv, hd)
        o = self.attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_mask)
        return self.out(o.transpose(1, 2).reshape(b, s, hq * hd))


class JointTransformerBlock(nn.Module):
    """Sandwich-norm block; modulated (main layers, noise refiner) or not (context refiner), spec §1.3."""

    def __init__(self, cfg, modulation: bool, operations, attention_fn: Callable, dtype=None, device=None) -> None:
        super().__init__()
        dim = cfg.dim
        norm = rms_norm_class(operations)
        self.attention = JointAttention(dim, cfg.n_heads, cfg.n_kv_heads, cfg.qk_norm_eps, operations,
                                        attention_fn, dtype=dtype, device=device)
        self.feed_forward = FeedForward(dim, cfg.ffn_hidden_dim, operations, dtype=dtype, device=device)
        self.attention_norm1 = norm(dim, eps=cfg.norm_eps, dtype=dtype, device=device)
        self.ffn_norm1 = norm(dim, eps=cfg.norm_eps, dtype=dtype, device=device)
        self.attention_norm2 = norm(dim, eps=cfg.norm_eps, dtype=dtype, device=device)
        self.ffn_norm2 = norm(dim, eps=cfg.norm_eps, dtype=dtype, device=device)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(
                nn.SiLU(), operations.Linear(cfg.adaln_dim, 4 * dim, bias=True, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, rope: Rope,
                c: torch.Tensor | None = None) -> torch.Tensor:
        """`x [B,S,D]`; `c [B,A]` is the AdaLN vector (required iff the block is modulated)."""
        if self.modulation:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(4, dim=-1)
            a = self.attention(self.attention_norm1(x) * (1 + scale_msa), key_mask, rope)
            x = x + gate_msa.tanh() * self.attention_norm2(a)
            f = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
            return x + gate_mlp.tanh() * self.ffn_norm2(f)
        x = x + self.attention_norm2(self.attention(self.attention_norm1(x), key_mask, rope))
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class FinalLayer(nn.Module):
    """`linear(LayerNorm_noaffine(x)·(1+scale))`, `scale = Linear(SiLU(c))`."""

    def __init__(self, dim: int, adaln_dim: int, out_features: int, operations, dtype=None, device=None) -> None:
        super().__init__()
        self.norm_final = operations.LayerNorm(dim, elementwise_affine=False, eps=1e-6, dtype=dtype, device=device)
        self.linear = operations.Linear(dim, out_features, bias=True, dtype=dtype, device=device)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), operations.Linear(adaln_dim, dim, bias=True, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """`x [B,S,D]`, `c [B,A]` → `[B,S,p²·C]`."""
        scale = self.adaLN_modulation(c).unsqueeze(1)
        return self.linear(self.norm_final(x) * (1 + scale))

"""Default injectable operations for the DiT: Linear, LayerNorm and RMSNorm in plain PyTorch.

The DiT builds every weight-holding layer through an `operations` namespace so that ComfyUI can pass
`comfy.ops.*` classes (same signatures) instead. These defaults follow the same rules as those:

- no weight initialisation (a state dict always overwrites the weights, fp8 init would crash, and
  building on `device="meta"` must be free); weights are uninitialised memory until loaded;
- weights are cast to the input's dtype and device at call time when they differ (fp8 storage with
  bf16 compute, or weights kept on another device by a low-VRAM loader).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fp8 import Fp8Linear


def _cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """`t` in `like`'s dtype and device (no copy when they already match)."""
    if t is None:
        return None
    if t.dtype != like.dtype or t.device != like.device:
        return t.to(device=like.device, dtype=like.dtype, non_blocking=True)
    return t


class Linear(Fp8Linear):
    """`nn.Linear` without weight init; computes in the input's dtype on its device whatever the weight's
    storage (same dtype, fp8 with per-channel scales, or weights left elsewhere by a low-VRAM loader)."""


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` without weight init; casts affine parameters (if any) to the input like `Linear`."""

    def reset_parameters(self) -> None:
        """Do nothing: weights (if any) come from a state dict."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Layer norm over the last `normalized_shape` dims."""
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x), _cast(self.bias, x), self.eps)


class RMSNorm(nn.Module):
    """RMSNorm: `x·rsqrt(mean(x²)+eps) × weight`, the mean computed in fp32.

    For 16-bit inputs `fused` (default) uses one `F.rms_norm` kernel: fp32 inside, one rounding at the end
    (eager DiT steps ≈ 20 % faster: six norms per block). `fused = False` is the official code's exact
    sequence — normalise in fp32, round to the input dtype, then × weight (two roundings) — which
    `ReferenceOps` injects for the benchmark's naive baseline; in fp32 both agree to float rounding. The
    weight is cast to the input's dtype and device at call time (it may be stored in fp8 or live on another
    device). Signature matches `comfy.ops.*.RMSNorm` / `torch.nn.RMSNorm`.
    """

    fused = True

    def __init__(self, normalized_shape: int, eps: float | None = 1e-6, elementwise_affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.normalized_shape = (int(normalized_shape),)
        self.eps = 1e-6 if eps is None else float(eps)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension of `x` (computed in fp32) and scale by the weight."""
        if self.fused and x.dtype in (torch.bfloat16, torch.float16) and hasattr(F, "rms_norm"):
            w = None if self.weight is None else _cast(self.weight, x)
            return F.rms_norm(x, self.normalized_shape, w, self.eps)
        xf = x.float()
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        if self.weight is None:
            return out
        return out * _cast(self.weight, out)

    def extra_repr(self) -> str:
        """Shape and eps for `print(module)`."""
        return f"{self.normalized_shape}, eps={self.eps}"


class TorchOps:
    """The default `operations` namespace: plain-PyTorch `Linear`, `LayerNorm`, `RMSNorm`."""

    Linear = Linear
    LayerNorm = LayerNorm
    RMSNorm = RMSNorm


class ReferenceRMSNorm(RMSNorm):
    """The official code's RMSNorm arithmetic (normalise in fp32, round, then × weight: two roundings)."""

    fused = False


class ReferenceOps(TorchOps):
    """`TorchOps` with the official two-rounding RMSNorm: the benchmark's naive baseline injects it."""

    RMSNorm = ReferenceRMSNorm

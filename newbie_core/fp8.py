"""fp8 (e4m3fn) weight storage with per-output-channel scales, and fp8 tensor-core matmuls where the GPU has them.

Storage: each Linear weight `W [N,K]` is kept as `W8 = round(W / s)` in float8_e4m3fn with one fp32 scale per
output channel, `s = amax(|W[n,:]|) / 448` (448 = the largest e4m3fn value). A plain cast without scales would
flush the many weights below 2^-9 to zero; the scales keep every row in fp8's full range. Halves the memory of
bf16 weights (plus 4 bytes per output channel).

Compute, per call, in the input's dtype (bf16):
- where the GPU has fp8 tensor cores with row-wise scaling (CUDA capability ≥ 9.0: H100/H200/B200) and the
  layer opts in (`enable_fp8_matmul`), the activations are quantised per token (row-wise scale, one fused
  kernel) and multiplied with `torch._scaled_mm` (fp8 × fp8 → bf16, fp32 accumulate): about 1.6× the bf16
  matmul rate;
- elsewhere (CPU, older GPUs, tiny row counts) the weight is dequantised to bf16 (`W8 · s`) and F.linear runs.
Layers become fp8-capable by an in-place class swap (`set_linear_storage`), so any model (our DiT, transformers'
Gemma) gains fp8 without being rebuilt; `quantize_linear_weight` fills a swapped layer.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0
_MIN_ROWS = 16  # below this many tokens (AdaLN vectors, pooled projections) the dequantised path is cheaper


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel fp8 quantisation: `(W8 [N,K] e4m3fn, scale [N] fp32)` with `W ≈ W8 · scale[:, None]`.

    The same row-wise rule as the activations' (`_quantize_rows_eager`): each output channel is a row of W.
    """
    w8, scale = _quantize_rows_eager(w)
    return w8, scale.squeeze(1)


def dequantize_weight(w8: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`W8 · scale` in `dtype` (a plain cast when `scale` is None: unscaled fp8 files)."""
    w = w8.to(dtype)
    return w if scale is None else w * scale.to(dtype)[:, None]


def _quantize_rows_eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise fp8 quantisation of a 2-D activation: `(x8 [M,K], scale [M,1] fp32)`."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


_compiled_quantize = None


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_quantize_rows_eager` as one fused kernel (torch.compile) in eager models; inlined when compiling."""
    global _compiled_quantize
    if torch.compiler.is_compiling():
        return _quantize_rows_eager(x)
    if _compiled_quantize is None:
        try:
            _compiled_quantize = torch.compile(_quantize_rows_eager, dynamic=True, fullgraph=True)
        except Exception as e:  # pragma: no cover - no triton / inductor
            log.info("fp8: fused activation quantisation unavailable (%s); using the eager version", e)
            _compiled_quantize = _quantize_rows_eager
    return _compiled_quantize(x)


def fp8_matmul_supported(device: torch.device | str | None) -> bool:
    """True where `torch._scaled_mm` with row-wise scales runs: CUDA devices of capability ≥ 9.0."""
    dev = torch.device(device) if device is not None else None
    if FP8 is None or dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return False
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(dev) >= (9, 0)


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ (W8·s)ᵀ + b` on fp8 tensor cores: x quantised per row, fp32 accumulation, output in x's dtype."""
    shape = x.shape
    x8, x_scale = _quantize_rows(x.reshape(-1, shape[-1]))
    out = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1),
                           bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
    return out.view(*shape[:-1], w8.shape[0])


class Fp8StorageLinear(nn.Linear):
    """nn.Linear whose weight may be stored in fp8 (with `weight_scale`) and is used in the input's dtype.

    `weight_scale` ([N] fp32 or None) and `fp8_matmul` (bool) are plain attributes set by
    `quantize_linear_weight` / `enable_fp8_matmul`. Weights on another device than the input are moved per call.
    """

    weight_scale: torch.Tensor | None = None
    fp8_matmul: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - nn.Linear.forward
        w, scale = self.weight, self.weight_scale
        if w.device != x.device:
            w = w.to(x.device, non_blocking=True)
            scale = None if scale is None else scale.to(x.device, non_blocking=True)
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
        if w.dtype == x.dtype:
            return F.linear(x, w, bias)
        if (self.fp8_matmul and scale is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
                and x.shape[-1] % 16 == 0 and w.shape[0] % 16 == 0 and x.numel() // x.shape[-1] >= _MIN_ROWS):
            return fp8_linear(x, w, scale, bias)
        return F.linear(x, dequantize_weight(w, scale, x.dtype), bias)


def linear_modules(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """All nn.Linear submodules (name, module) of `module` (subclasses included)."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def set_linear_storage(module: nn.Module, fp8: bool) -> None:
    """Make every Linear in `module` accept fp8 weights (fp8=True), or restore each layer's own class.

    The swap is in place: `nn.Linear` and our `ops.Linear` become `Fp8StorageLinear` (the original class is
    remembered); other Linear subclasses (ComfyUI's ops, LoRA wrappers) are left alone.
    """
    from .ops import Linear as OpsLinear

    for _, m in linear_modules(module):
        if fp8 and type(m) in (nn.Linear, OpsLinear):
            m.__dict__["_plain_class"] = type(m)
            m.__class__ = Fp8StorageLinear
        elif not fp8 and type(m) is Fp8StorageLinear:
            m.__class__ = m.__dict__.pop("_plain_class", nn.Linear)
            m.__dict__.pop("weight_scale", None)
            m.__dict__.pop("fp8_matmul", None)


def quantize_linear_weight(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """Quantise `weight` (the layer's weight, already on its device) to fp8 and store its scale on `layer`.

    Returns the fp8 tensor for the caller to install as `layer.weight`.
    """
    w8, scale = quantize_weight(weight)
    layer.__dict__["weight_scale"] = scale
    return w8


def enable_fp8_matmul(module: nn.Module, on: bool = True) -> int:
    """Let the fp8-stored Linears of `module` use fp8 tensor-core matmuls; returns how many layers opted in."""
    n = 0
    for _, m in linear_modules(module):
        if isinstance(m, Fp8StorageLinear):
            m.__dict__["fp8_matmul"] = bool(on)
            n += 1
    return n

"""fp8 (e4m3fn) weight storage with per-output-channel scales, and fp8 tensor-core matmuls where the GPU has them.

Storage: each Linear weight `W [N,K]` is kept as `W8 = round(W / s)` in float8_e4m3fn with one fp32 scale per
output channel, `s = amax(|W[n,:]|) / 448` (448 = the largest e4m3fn value). A plain cast without scales would
flush the many weights below 2^-9 to zero; the scales keep every row in fp8's full range. Halves the memory of
bf16 weights (plus 4 bytes per output channel).

`Fp8Linear` is a real module: the scale is its non-persistent buffer `weight_scale` (None while the weight is
not fp8), so `.to()`, ModelPatcher and block streaming move it with the weight, and `state_dict()` stays the
file's keys. Our DiT is built with it (`ops.Linear`); other models (transformers' Gemma) get it by module
replacement (`make_fp8_capable`, the same Parameter objects). `precision.convert_tensor` is the one routine that
turns a weight into what a stage stores (fp8 + scale, or a cast).

Compute, per call, in the input's dtype (bf16):
- where the GPU has fp8 tensor cores with row-wise scaling (CUDA capability ≥ 8.9 with torch's row-wise
  `_scaled_mm`: H100/H200/B200, Ada) and the layer opts in (`enable_fp8_matmul`), the activations are quantised
  per token (row-wise scale, one fused kernel) and multiplied with `torch._scaled_mm` (fp8 × fp8 → bf16, fp32
  accumulate);
- elsewhere (CPU, older GPUs, tiny row counts) the weight is dequantised to the input dtype (`W8 · s`).
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
    return w if scale is None else w * scale.to(w.device, dtype)[:, None]


def _quantize_rows_eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise fp8 quantisation of a 2-D tensor: `(x8 [M,K], scale [M,1] fp32)`."""
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
    """True where `torch._scaled_mm` with row-wise scales runs: CUDA devices of capability ≥ 8.9."""
    dev = torch.device(device) if device is not None else None
    if FP8 is None or dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return False
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(dev) >= (8, 9)


def scaled_matmul(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """`(x8·x_scale) @ (W8·w_scale)ᵀ + b` for a row-quantised input `x8 [M,K]` (`x_scale [M,1]`) on fp8 tensor
    cores: one `torch._scaled_mm`, fp32 accumulation, output [M,N] in `out_dtype`."""
    return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1),
                            bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)


def fp8_matmul_shapes_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Shapes the fp8 tensor-core matmul takes (and pays off at): both dims multiples of 16, enough rows."""
    return x.shape[-1] % 16 == 0 and weight.shape[0] % 16 == 0 and x.numel() // x.shape[-1] >= _MIN_ROWS


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ (W8·s)ᵀ + b` on fp8 tensor cores: x quantised per row, fp32 accumulation, output in x's dtype."""
    shape = x.shape
    x8, x_scale = _quantize_rows(x.reshape(-1, shape[-1]))
    return scaled_matmul(x8, x_scale, w8, w_scale, bias, x.dtype).view(*shape[:-1], w8.shape[0])


def linear_forward(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                   fp8_matmul: bool = False) -> torch.Tensor:
    """`x @ Wᵀ + b` in `x`'s dtype on `x`'s device, whatever the weight's storage: the same dtype (plain
    F.linear), fp8 with a per-channel `scale` (tensor cores where `fp8_matmul` and the shapes allow, else
    dequantised), or another dtype/device (cast per call, e.g. weights left on the CPU by a low-VRAM loader)."""
    if weight.device != x.device:
        weight = weight.to(x.device, non_blocking=True)
    if scale is not None and scale.device != x.device:
        scale = scale.to(x.device, non_blocking=True)
    if bias is not None and (bias.device != x.device or bias.dtype != x.dtype):
        bias = bias.to(x.device, x.dtype, non_blocking=True)
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    if scale is None:
        return F.linear(x, weight.to(x.dtype), bias)
    if fp8_matmul and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and fp8_matmul_shapes_ok(x, weight):
        return fp8_linear(x, weight, scale, bias)
    return F.linear(x, dequantize_weight(weight, scale, x.dtype), bias)


class Fp8Linear(nn.Linear):
    """`nn.Linear` whose weight may be stored in fp8 with a per-output-channel scale, used in the input's dtype.

    `weight_scale` is a non-persistent buffer ([N] fp32, None unless the weight is fp8): it follows `.to()` and
    every device manager, and stays out of `state_dict()`. `fp8_matmul` (set by `enable_fp8_matmul`) opts the
    layer into fp8 tensor-core matmuls. No weight initialisation: weights always come from a file.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight_scale", None, persistent=False)
        self.fp8_matmul = False

    def reset_parameters(self) -> None:  # noqa: D401 - skip init on purpose
        """Do nothing: weights come from a state dict."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ Wᵀ + b` (see `linear_forward`)."""
        return linear_forward(x, self.weight, self.weight_scale, self.bias, self.fp8_matmul)

    def fp8_input_ready(self, x: torch.Tensor, resident: bool = True) -> bool:
        """True when this layer can take its input already quantised (`forward_fp8_input`): a fp8 weight with
        scales, fp8 matmuls on, shapes the tensor cores take, and (`resident`) the weight on `x`'s device. A host
        whose layers bring their fp8 weight per call (ComfyUI's partial load) passes `resident=False` and casts in
        its `forward_fp8_input`; one that patches weights per call (LoRA) says no then."""
        return (self.fp8_matmul and self.weight_scale is not None and self.weight.dtype == FP8
                and (not resident or self.weight.device == x.device) and fp8_matmul_shapes_ok(x, self.weight))

    def forward_fp8_input(self, x8: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """`x @ Wᵀ + b` for an input already quantised per row (`x8 [M,K]` e4m3fn, `x_scale [M,1]`): one scaled
        matmul, output [M,N] in `out_dtype`. Only where `fp8_input_ready`."""
        return scaled_matmul(x8, x_scale, self.weight, self.weight_scale, self.bias, out_dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in `dtype` (fp8 weights multiplied by their scales)."""
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    def store_fp8(self, weight: torch.Tensor) -> None:
        """Quantise `weight` (any float dtype, on the device it should live on) into this layer: fp8 + scales."""
        w8, scale = quantize_weight(weight)
        self.weight = nn.Parameter(w8, requires_grad=False)
        self.weight_scale = scale

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Fp8Linear":
        """An Fp8Linear sharing `lin`'s Parameter objects (no copy); plain layers can then hold fp8 weights."""
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        new.weight, new.bias = lin.weight, lin.bias
        new.train(lin.training)
        return new


def linear_modules(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """All nn.Linear submodules (name, module) of `module` (subclasses included)."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]


def make_fp8_capable(module: nn.Module) -> int:
    """Replace every plain `nn.Linear` inside `module` by an `Fp8Linear` holding the same Parameters (done once,
    at load time, for models we do not build ourselves such as transformers' Gemma). Returns how many."""
    n = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, Fp8Linear.from_linear(child))
            n += 1
        else:
            n += make_fp8_capable(child)
    return n


def enable_fp8_matmul(module: nn.Module, on: bool = True) -> int:
    """Let the Fp8Linears of `module` use fp8 tensor-core matmuls; returns how many layers opted in."""
    n = 0
    for _, m in linear_modules(module):
        if isinstance(m, Fp8Linear):
            m.fp8_matmul = bool(on)
            n += 1
    return n

"""Attention dispatch (SDPA with GQA and a key-padding mask; flash-attn when importable) and 3-axis RoPE.

`attention(q, k, v, key_mask=None)` is the DiT's default attention function; ComfyUI may inject another
callable with the same signature. Shapes: q `[B,Hq,S,Dh]`, k/v `[B,Hkv,S,Dh]` (Hq a multiple of Hkv,
query head i uses kv head i // (Hq/Hkv)), key_mask `[B,S]` (True = real token), a `KeyPrefix` (sample i
attends to its first n_i tokens: the DiT packs real tokens first, so no mask reaches the kernel) or None;
scale 1/sqrt(Dh); non-causal. Returns `[B,Hq,S,Dh]`. Rows of padded *queries* are unspecified (never read).

Backends (the `backend` argument, from the loader's choice): "auto" = flash-attn when the `flash_attn` package imports, the
tensors are on CUDA and fp16/bf16, else SDPA (on CUDA with torch's kernels in the priority AUTO_CUDA_KERNELS:
cuDNN first); "sdpa" (torch's own choice); "flash" (error if flash-attn is missing). `kernel=` forces one SDPA
kernel (benchmarks/attention_kernels.py).
flash-attn is never required. No path here syncs with the host (compile friendly).

RoPE (spec §1.4): per axis of width d, `freq_k = theta^(-2k/d)`; angles are computed in float64 and
rounded to fp32 (as the official table), cos/sin in fp32; rotation of adjacent pairs (2i, 2i+1) as
complex numbers in fp32 (eager: a complex multiply as the official code; compiled: the real formula),
cast back to the input dtype.
"""
from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "flash")
# SDPA kernels that can be forced (`kernel=`): torch's backend, with native GQA or with K/V expanded to every
# query head ("_expanded": some kernels take GQA only that way). None = let torch choose.
SDPA_KERNELS = ("flash", "flash_expanded", "cudnn", "cudnn_expanded", "efficient", "efficient_expanded", "math")
# "auto" on CUDA without flash-attn: torch's SDPA kernels in this priority (torch takes the first that accepts
# the inputs), K/V expanded to every query head first when AUTO_CUDA_EXPAND_KV. "sdpa" leaves the choice to
# torch, which inside a ComfyUI process is not cuDNN. Measured on an H200 (torch 2.11, the DiT's shapes,
# benchmarks/results/attention-kernels-nvidia-h200.md): cuDNN 0.69 ms with native GQA, 0.80 expanded, torch's
# flash 1.11; inside ComfyUI 0.4.0 the DiT step is 0.147 s with cuDNN first against 0.157 with "sdpa"
# (benchmarks/results/comfy-dit-placement-nvidia-h200-comfyui-0.4.0.md).
AUTO_CUDA_KERNELS = ("cudnn", "flash", "efficient", "math")
AUTO_CUDA_EXPAND_KV = False
_flash_module = None  # None = not tried yet, False = unavailable
_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def _can_prioritise() -> bool:
    import inspect

    try:
        from torch.nn.attention import sdpa_kernel
    except ImportError:
        return False
    return "set_priority" in inspect.signature(sdpa_kernel).parameters


_SDPA_CAN_PRIORITISE = _can_prioritise()
# Settled here when flash-attn is not installed (the common case): `attention` asks inside compiled graphs, where
# trying the import would break a fullgraph compile of the DiT; an installed package is imported on first use.
if importlib.util.find_spec("flash_attn") is None:
    _flash_module = False


def _flash():
    global _flash_module
    if _flash_module is None:
        try:
            import flash_attn  # noqa: F401

            _flash_module = flash_attn
        except Exception as e:  # ImportError, or a broken CUDA build raising at import
            logger.debug("flash-attn not usable: %s", e)
            _flash_module = False
    return _flash_module


def flash_attn_available() -> bool:
    """True when the `flash_attn` package imports."""
    return bool(_flash())


@dataclass(frozen=True)
class KeyPrefix:
    """Key padding as per-sample prefix lengths: sample i's real tokens are its first `lengths[i]` positions.

    Python ints, fixed per generation (computed once by `NextDiT.prepare`), so compiled graphs see constants
    and kernels run without any mask.
    """

    lengths: tuple[int, ...]


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: KeyPrefix,
                     unmasked: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Attention where sample i uses only its first n_i tokens: one unmasked kernel call per run of equal n.

    Padded query rows come back as zeros. Slices are views (no copies) when equal lengths are adjacent,
    which is how the CFG batch is laid out ([cond]*B + [uncond]*B).
    """
    s = q.shape[2]
    outs, start = [], 0
    lengths = prefix.lengths
    while start < len(lengths):
        end, n = start, lengths[start]
        while end < len(lengths) and lengths[end] == n:
            end += 1
        o = unmasked(q[start:end, :, :n], k[start:end, :, :n], v[start:end, :, :n])
        outs.append(F.pad(o, (0, 0, 0, s - n)) if n < s else o)
        start = end
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def supports_key_prefix(fn: Callable) -> bool:
    """True when an attention callable accepts a `KeyPrefix` key mask: ours (or a partial of it), or any
    callable marked `fn.supports_key_prefix = True`. Others get a boolean mask from the DiT."""
    import functools

    inner = fn.func if isinstance(fn, functools.partial) else fn
    return inner is attention or bool(getattr(fn, "supports_key_prefix", False))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: torch.Tensor | KeyPrefix | None = None, backend: str | None = None,
              kernel: str | None = None) -> torch.Tensor:
    """Non-causal multi-head attention with GQA and an optional key-padding mask (see module doc).

    `kernel` (one of `SDPA_KERNELS`) forces torch's SDPA kernel on the SDPA path; None lets torch choose."""
    if isinstance(key_mask, KeyPrefix):
        return prefix_attention(q, k, v, key_mask, lambda a, b, c: attention(a, b, c, None, backend, kernel))
    backend = backend or "auto"
    if backend not in BACKENDS:  # never a silent fallback to SDPA
        from .errors import InputError

        raise InputError(f"Unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend == "flash" or (backend == "auto" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
                              and flash_attn_available()):
        if not flash_attn_available():
            raise ImportError("attention backend 'flash' needs the flash-attn package; use 'sdpa'.")
        return flash_attention(q, k, v, key_mask)
    if backend == "auto" and kernel is None and q.is_cuda:
        return sdpa_preferred(q, k, v, key_mask)
    return sdpa_attention(q, k, v, key_mask, kernel)


def sdpa_preferred(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA with the kernel priority `AUTO_CUDA_KERNELS` (the "auto" backend on CUDA); torch's own choice where
    this torch cannot set a priority."""
    from torch.nn.attention import sdpa_kernel

    if not _SDPA_CAN_PRIORITISE:
        return sdpa_attention(q, k, v, key_mask)
    if AUTO_CUDA_EXPAND_KV:
        k, v = _expand_kv(q, k, v)
    with sdpa_kernel([_sdpa_backend(n) for n in AUTO_CUDA_KERNELS], set_priority=True):
        return sdpa_attention(q, k, v, key_mask)


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V repeated to every query head (GQA as plain multi-head attention, for kernels that need it)."""
    if k.shape[1] == q.shape[1]:
        return k, v
    rep = q.shape[1] // k.shape[1]
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def _sdpa_backend(kernel: str):
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "math": "MATH"}
    return getattr(SDPBackend, names[kernel.removesuffix("_expanded")])


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_mask: torch.Tensor | None = None, kernel: str | None = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention` with a boolean `[B,1,1,S]` key mask and native GQA; `kernel`
    (one of `SDPA_KERNELS`) forces one of torch's kernels (RuntimeError when it cannot take these inputs)."""
    if kernel is not None:
        if kernel not in SDPA_KERNELS:
            raise ValueError(f"unknown SDPA kernel {kernel!r}; one of {', '.join(SDPA_KERNELS)}")
        from torch.nn.attention import sdpa_kernel

        if kernel.endswith("_expanded"):
            k, v = _expand_kv(q, k, v)
        with sdpa_kernel([_sdpa_backend(kernel)]):
            return sdpa_attention(q, k, v, key_mask)
    b, hq, _, dh = q.shape
    mask = None if key_mask is None else key_mask.to(torch.bool).view(b, 1, 1, key_mask.shape[-1])
    scale = 1.0 / math.sqrt(dh)
    if k.shape[1] != hq:
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        rep = hq // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """flash-attn kernels (native GQA). With a key mask: `flash_attn_varlen_func` without a host sync.

    Real tokens are gathered to the front in row order (argsort, fixed size), `cu_seqlens` comes from
    the mask on the device, and `max_seqlen` is the padded length S (an upper bound), so nothing is read
    back to the host. Padded query rows come back as zeros.
    """
    fa = _flash()
    b, hq, s, dh = q.shape
    scale = 1.0 / math.sqrt(dh)
    qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,S,H,D]
    if key_mask is None:
        return fa.flash_attn_func(qs, ks, vs, dropout_p=0.0, softmax_scale=scale, causal=False).transpose(1, 2)
    n = b * s
    mask = key_mask.to(torch.bool).reshape(n)
    idx = torch.arange(n, device=q.device)
    order = torch.argsort(torch.where(mask, idx, idx + n))
    cu = F.pad(torch.cumsum(key_mask.to(torch.bool).sum(1, dtype=torch.int32), 0, dtype=torch.int32), (1, 0))
    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n, t.shape[2], dh).index_select(0, order)

    out = fa.flash_attn_varlen_func(flat(qs), flat(ks), flat(vs), cu, cu, s, s, dropout_p=0.0,
                                    softmax_scale=scale, causal=False)
    out = torch.where((idx < cu[-1]).view(n, 1, 1), out, out.new_zeros(()))
    out = torch.empty_like(out).index_copy_(0, order, out)
    return out.view(b, s, hq, dh).transpose(1, 2)


# ----------------------------------------------------------------------------------------------- RoPE


def rope_frequencies(axes_dims: Sequence[int], theta: float = 10000.0) -> list[torch.Tensor]:
    """Per-axis float64 frequencies `theta^(-2k/d)`, k < d/2 (CPU tensors)."""
    return [1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)) for d in axes_dims]


def rope_cos_sin(positions: torch.Tensor, axes_dims: Sequence[int], theta: float = 10000.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer `positions [..., n_axes]`: fp32 `[..., sum(axes_dims)/2]` each.

    Computed on the CPU in float64 (angle = position·freq, rounded to fp32, then cos/sin in fp32) to
    match the official precomputed table bit for bit; move the result to the device once.
    """
    pos = positions.detach().to("cpu", torch.float64)
    angles = torch.cat([pos[..., i:i + 1] * f for i, f in enumerate(rope_frequencies(axes_dims, theta))], dim=-1)
    angles = angles.float()
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, form: str | None = None) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of the last dim of `x` by the angles behind `cos`/`sin`.

    `cos`/`sin` have last dim `x.shape[-1]/2` and broadcast against `x.shape[:-1]`. Computed in fp32,
    returned in `x`'s dtype. Eager: one complex multiply, the official code's own operation (3 kernels
    instead of the real formula's 9); under torch.compile: the real formula, which inductor fuses into one
    kernel (it leaves complex operations unfused). Both give the same numbers on the CPU (tests/core/test_dit.py);
    a GPU's complex kernel may round differently by an fp32 ulp (as the official code's does). `form`
    ("complex" or "real") forces one (benchmarks).
    """
    xf = x.float().unflatten(-1, (-1, 2))
    if form == "real" or (form is None and torch.compiler.is_compiling()):
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(xf.contiguous()) * torch.complex(cos, sin))
    return out.flatten(-2).to(x.dtype)

"""Precision policy: which dtype each stage stores its weights in and computes in, fp8 storage, NaN checks.

One place decides dtypes. A stage precision is one of

    bf16         weights and compute in bfloat16 (the default; what the model was trained and released in)
    fp16         weights and compute in float16 (norms, RoPE and softmax stay fp32 inside the models)
    fp32         weights and compute in float32 (slow, the numerical reference)
    fp8_e4m3fn   Linear weights stored in float8 e4m3fn with per-channel scales (`fp8.py`), bf16 compute
                 (DiT and Gemma only: it halves their memory; Jina and the VAE fall back to bf16)

`Precision.storage` is the dtype weights occupy on the device, `Precision.compute` the activation dtype.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputError, NumericalError
from .fp8 import FP8, Fp8StorageLinear, linear_modules, quantize_linear_weight, set_linear_storage  # noqa: F401

log = logging.getLogger(__name__)

STAGES = ("dit", "text", "vae")
PRECISION_NAMES = ("bf16", "fp16", "fp32", "fp8_e4m3fn")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
            "fp8": "fp8_e4m3fn", "float8_e4m3fn": "fp8_e4m3fn", "default": "bf16", "auto": "auto"}


@dataclass(frozen=True)
class Precision:
    """A resolved stage precision: the name a user chose, the storage dtype and the compute dtype."""

    name: str
    storage: torch.dtype
    compute: torch.dtype

    @property
    def is_fp8(self) -> bool:
        """True when weights are stored in float8 and dequantised per layer."""
        return FP8 is not None and self.storage == FP8


def parse_precision(name: str, stage: str = "dit", device: torch.device | str | None = None) -> Precision:
    """Resolve a user-facing precision name for one stage (`dit`, `text`, `gemma`, `jina` or `vae`).

    `auto` means bf16 where the device computes bf16 well, else fp32 (the VAE on older GPUs, CPUs for tests).
    fp8 is weight storage only and applies to the DiT and Gemma; for Jina and the VAE it resolves to bf16.
    """
    key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key == "auto":
        key = "bf16" if device_supports_bf16(device) else "fp32"
    if key not in PRECISION_NAMES:
        raise InputError(f"Unknown {stage} precision {name!r}: choose one of {', '.join(PRECISION_NAMES)} (or auto).")
    if key == "fp8_e4m3fn":
        if FP8 is None:
            raise InputError("This torch has no float8_e4m3fn; choose bf16 (torch >= 2.1 is needed for fp8).")
        if stage in ("jina", "vae"):
            log.info("fp8 storage is for the DiT and Gemma; the %s runs in bf16", stage)
            return Precision("bf16", torch.bfloat16, torch.bfloat16)
        return Precision(key, FP8, torch.bfloat16)
    return Precision(key, _DTYPES[key], _DTYPES[key])


def parse_precision_spec(spec: str | None) -> dict[str, str]:
    """Parse the CLI form `dit=bf16,text=fp8_e4m3fn,vae=fp32` into {stage: name}; missing stages default.

    Defaults: dit bf16, text bf16, vae auto (bf16 on GPUs that do bf16, fp32 elsewhere).
    """
    out = {"dit": "bf16", "text": "bf16", "vae": "auto"}
    for part in filter(None, (spec or "").split(",")):
        if "=" not in part:
            raise InputError(f"--precision part {part!r} is not STAGE=NAME (e.g. dit=bf16,text=bf16,vae=fp32).")
        stage, name = (s.strip() for s in part.split("=", 1))
        if stage not in STAGES:
            raise InputError(f"--precision stage {stage!r} is unknown: use {', '.join(STAGES)}.")
        parse_precision(name, stage)  # validate early
        out[stage] = name
    return out


def device_supports_bf16(device: torch.device | str | None) -> bool:
    """True where bf16 compute is native: CUDA devices with bf16 support (Ampere+); False on CPU/MPS."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return False


def target_dtype(param_name: str, tensor: torch.Tensor, precision: Precision, fp8_params: set[str]) -> torch.dtype:
    """The dtype a weight takes on the device: fp8 for Linear weights under fp8, else the compute dtype.

    Non-floating tensors (token ids, counters) keep their dtype.
    """
    if not tensor.is_floating_point():
        return tensor.dtype
    if precision.is_fp8 and param_name in fp8_params:
        return precision.storage
    return precision.compute


def check_finite(x: torch.Tensor, stage: str, precision: Precision | str | None = None) -> torch.Tensor:
    """Raise NumericalError naming the stage (and a safer precision) if `x` holds NaN or inf; else return x."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        name = precision.name if isinstance(precision, Precision) else (precision or "?")
        hint = ("fp16 overflows in this model family; use bf16 (or fp32)" if name == "fp16"
                else "try fp32 for this stage, or bf16 if it ran in fp8")
        raise NumericalError(
            f"The {stage} stage produced NaN/inf values in {name}: {hint}. Nothing was saved from this run."
        )
    return x


def cast_module(module: nn.Module, precision: Precision) -> nn.Module:
    """Cast `module` in place to `precision` (fp8: Linear weights quantised to fp8 with scales, the rest bf16).

    For hosts that manage devices themselves (ComfyUI's ModelPatcher) and need no pristine copy;
    the CLI pipeline uses `memory.StagedModel` instead. Non-persistent buffers (RoPE tables) keep their dtype.
    """
    fp8_params = {f"{n}.weight" for n, _ in linear_modules(module)}
    set_linear_storage(module, precision.is_fp8)
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            skip = getattr(mod, "_non_persistent_buffers_set", set())
            for pname, p in mod._parameters.items():
                if p is not None and p.is_floating_point():
                    full = f"{mod_name}.{pname}" if mod_name else pname
                    dtype = target_dtype(full, p, precision, fp8_params)
                    p.data = (quantize_linear_weight(mod, p.data.to(precision.compute)) if dtype == FP8
                              else p.data.to(dtype))
            for bname, b in list(mod._buffers.items()):
                if b is not None and b.is_floating_point() and bname not in skip:
                    mod._buffers[bname] = b.to(precision.compute)
    return module

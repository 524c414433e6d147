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
from .fp8 import FP8, Fp8Linear, quantize_weight

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


def convert_tensor(mod: nn.Module, name: str, tensor: torch.Tensor, precision: Precision,
                   device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The one conversion rule: what a stage stores for `mod.<name>` (a parameter or buffer) = `tensor`.

    Returns {attribute: tensor} on `device` (None: where it is). An `Fp8Linear` weight under fp8 becomes
    `{"weight": W8, "weight_scale": s}` (per-channel scales, quantised from the compute dtype); other floating
    tensors take the compute dtype; integer tensors and non-persistent buffers (RoPE tables) keep theirs.
    Used by `memory.StagedModel` (CLI host), `cast_module` (ComfyUI host) and so by streaming.
    """
    persistent = name in mod._parameters or name not in getattr(mod, "_non_persistent_buffers_set", set())
    if not tensor.is_floating_point() or not persistent:
        return {name: tensor if device is None else tensor.to(device=device)}
    if precision.is_fp8 and name == "weight" and isinstance(mod, Fp8Linear):
        w8, scale = quantize_weight(tensor.to(device=device, dtype=precision.compute))
        return {"weight": w8, "weight_scale": scale}
    return {name: tensor.to(device=device, dtype=precision.compute)}


def set_tensor(mod: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    """Install `tensor` as `mod.<name>`: a parameter's data, or a buffer (None clears a buffer)."""
    if name in mod._parameters:
        mod._parameters[name].data = tensor
    else:
        mod._buffers[name] = tensor


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


def cast_module(module: nn.Module, precision: Precision, work_device: torch.device | str | None = None) -> nn.Module:
    """Cast `module` in place to `precision` through `convert_tensor` (fp8: Linear weights quantised with scales).

    For hosts that manage devices themselves (ComfyUI's ModelPatcher) and need no pristine copy; the CLI
    host keeps pristine weights in `memory.StagedModel`, which applies the same rule per stage. `work_device`:
    convert each tensor there and bring the result back (the CLI quantises on its compute device; doing the
    same keeps both hosts' fp8 weights identical, and a GPU quantises fast).
    """
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, Fp8Linear) and mod.weight_scale is not None:  # back to full precision first
                mod.weight.data, mod.weight_scale = mod.dequantized_weight(precision.compute), None
            for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
                if t is not None:
                    src = t.data if work_device is None else t.data.to(work_device)
                    for attr, new in convert_tensor(mod, name, src, precision).items():
                        set_tensor(mod, attr, new if work_device is None else new.to(t.device))
    return module

"""Adding LoRA deltas to DiT weights: W' = W + Σ strength · scale · ΔW, in fp32, on the full-precision weight.

Two entry points:
- `patch_state_dict` — before a model is built (`load_dit(..., loras=...)`, the CLI pipeline's pristine CPU
  copy): the file's weights are patched in fp32 and cast once to the requested dtype, so fp8 is later quantised
  from the patched weights and streamed blocks carry them;
- `apply_loras` / `remove_loras` — on an already-loaded `NextDiT`: patched weights replace the parameters and
  the original Parameter objects are kept, so removal (or strength 0) restores them bit for bit.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable, Mapping, Sequence, Union

import torch
from torch import nn

from ..errors import InputError
from .formats import LoraFile, read_lora
from .patches import LoraReport, PatchSet, Term, build_patches
from .mapping import TargetIndex

log = logging.getLogger(__name__)
LoraSpec = Union[str, os.PathLike, LoraFile, PatchSet]
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ORIGINALS = "_newbie_lora_originals"


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`PATH[:STRENGTH]` (the CLI's --lora) → (path, strength); a Windows drive colon is not a strength."""
    path, sep, tail = text.rpartition(":")
    if sep and path and not tail.startswith(("\\", "/")):
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def load_patch_sets(loras: Iterable[tuple[LoraSpec, float]], index: TargetIndex) -> list[tuple[PatchSet, float]]:
    """Read and map each (file or LoraFile or PatchSet, strength); the reports carry the strengths."""
    out = []
    for spec, strength in loras:
        if isinstance(spec, PatchSet):
            ps = spec
        else:
            ps = build_patches(spec if isinstance(spec, LoraFile) else read_lora(spec), index)
        ps.report.strength = float(strength)
        log.info("LoRA %s", ps.report.summary())
        out.append((ps, float(strength)))
    return out


def grouped(sets: Sequence[tuple[PatchSet, float]]) -> dict[str, list[tuple[Term, float]]]:
    """{weight key: [(term, strength), …]} over several patch sets (their deltas add)."""
    out: dict[str, list[tuple[Term, float]]] = {}
    for ps, strength in sets:
        for key, terms in ps.terms.items():
            out.setdefault(key, []).extend((t, strength) for t in terms)
    return out


def merged_weight(weight: torch.Tensor, entries: Sequence[tuple[Term, float]],
                  out_dtype: torch.dtype | None = None, compute_device=None) -> torch.Tensor:
    """`weight` + Σ strength · scale · ΔW computed in fp32, returned in `out_dtype` (default: the weight's) on the
    weight's device. `compute_device`: where the fp32 sum is computed (e.g. a GPU while the weight stays on the CPU).

    When every strength is 0 the weight itself is returned (cast only if `out_dtype` differs): bitwise identity.
    """
    out_dtype = out_dtype or weight.dtype
    live = [(t, s) for t, s in entries if s != 0.0]
    if not live:
        return weight if weight.dtype == out_dtype else weight.to(out_dtype)
    if weight.dtype not in _FLOATS:
        raise InputError(f"LoRAs are added to full-precision weights, but this weight is {weight.dtype}. Apply the "
                         f"LoRA before converting the DiT to fp8 (load_dit(..., loras=...) or the pipeline's loras=).")
    w = weight.to(device=compute_device or weight.device, dtype=torch.float32, copy=True)
    for term, strength in live:
        view = w if term.rows is None else w.narrow(0, term.rows[0], term.rows[1])
        view.add_(term.delta(device=w.device), alpha=strength * term.scale)
    return w.to(dtype=out_dtype).to(weight.device)


def patch_state_dict(sd: Mapping[str, torch.Tensor], config, loras: Iterable[tuple[LoraSpec, float]],
                     dtype: torch.dtype | None = None, inplace: bool = False, compute_device=None
                     ) -> tuple[dict[str, torch.Tensor], list[LoraReport]]:
    """An official-layout DiT state dict with the LoRAs merged (patched weights cast to `dtype` when given);
    untouched tensors are the same objects. `inplace`: replace the entries of `sd` itself (a dict the caller
    owns), so each original weight can be freed as soon as its patched copy exists — the peak stays one weight
    above the model instead of two models. `compute_device`: see `merged_weight`. Returns (state dict, one
    report per LoRA)."""
    sets = load_patch_sets(loras, TargetIndex.for_state_dict(sd, config))
    out = sd if inplace else dict(sd)
    for key, entries in grouped(sets).items():
        out[key] = merged_weight(out[key], entries, dtype, compute_device)
    return out, [ps.report for ps, _ in sets]


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, name = key.rpartition(".")
    return model.get_submodule(path), name


def remove_loras(model: nn.Module) -> None:
    """Put back the original weights `apply_loras` replaced (the same tensors: bit for bit)."""
    originals: dict = model.__dict__.pop(_ORIGINALS, {})
    for key, param in originals.items():
        mod, name = _owner(model, key)
        setattr(mod, name, param)
    model.__dict__["lora_reports"] = []


def apply_loras(model: nn.Module, loras: Iterable[tuple[LoraSpec, float]]) -> list[LoraReport]:
    """Set the LoRAs of a loaded DiT to `loras` [(path or LoraFile or PatchSet, strength), …].

    Replaces any LoRAs applied before (each call starts from the original weights); deltas of several LoRAs add;
    `apply_loras(model, [])` equals `remove_loras(model)`. Weights must be full precision (not fp8). Returns one
    report per LoRA, also kept as `model.lora_reports`.
    """
    remove_loras(model)
    sets = load_patch_sets(loras, TargetIndex.for_model(model))
    originals: dict[str, torch.Tensor] = {}
    for key, entries in grouped(sets).items():
        mod, name = _owner(model, key)
        param = getattr(mod, name)
        data = param.data
        new = merged_weight(data, entries)
        if new is data:
            continue
        originals[key] = param
        setattr(mod, name, nn.Parameter(new, requires_grad=False))
    model.__dict__[_ORIGINALS] = originals
    reports = [ps.report for ps, _ in sets]
    model.__dict__["lora_reports"] = reports
    return reports

"""LoRA file → patch set: every module mapped to a DiT weight, its scale fixed, its ΔW computable in fp32.

Published formulas (ΔW is added as `strength · scale · ΔW`):
- LoRA (PEFT lora_B·lora_A, kohya lora_up·lora_down): ΔW = up @ down, scale = alpha / r (r = rows of down;
  PEFT `use_rslora`: alpha / √r);
- LoKr (LyCORIS): ΔW = kron(w1, w2), each factor stored whole or as a product `_a @ _b`; scale = alpha / r with r
  the inner width of the factorised w2 (else w1); when neither factor is factorised alpha is not used (scale 1);
- LoHa (LyCORIS): ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b), scale = alpha / r (r = rows of w1_b);
- diff: ΔW stored whole, scale 1.
A module without any alpha (no `.alpha`, no metadata, no adapter_config.json) gets scale 1 (alpha = r).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelFileError
from .formats import LoraFile, Module, looks_like, pattern_alpha
from .mapping import Rows, TargetIndex

log = logging.getLogger(__name__)


@dataclass
class Term:
    """One adapted weight slice: the file module it came from, its kind, tensors, scale and row range."""

    source: str
    kind: str
    tensors: dict[str, torch.Tensor]
    scale: float
    rows: Rows
    shape: tuple[int, int]

    def delta(self, device=None) -> torch.Tensor:
        """ΔW (without scale or strength) in fp32, shaped like the rows it adapts."""
        t = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
        if self.kind == "lora":
            d = t["up"].flatten(1) @ t["down"].flatten(1)
        elif self.kind == "lokr":
            w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]
            w2 = t["w2"] if "w2" in t else t["w2_a"] @ t["w2_b"]
            d = torch.kron(w1, w2)
        elif self.kind == "loha":
            d = (t["w1_a"] @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"])
        else:
            d = t["diff"]
        return d.reshape(self.shape)


@dataclass
class LoraReport:
    """What loading one LoRA file did: the format, alpha source, matched and unmatched modules."""

    file: str
    format: str
    alpha_source: str
    matched: int
    unmatched: list[str] = field(default_factory=list)
    strength: float = 1.0

    def summary(self) -> str:
        """One line for logs / node text; names up to 5 unmatched modules."""
        head = (f"{self.file}: {self.format}, strength {self.strength:g}, {self.matched} modules matched, "
                f"alpha from {self.alpha_source}")
        if self.unmatched:
            more = f" (+{len(self.unmatched) - 5} more)" if len(self.unmatched) > 5 else ""
            head += f"; {len(self.unmatched)} NOT matched: {', '.join(self.unmatched[:5])}{more}"
        return head


@dataclass
class PatchSet:
    """Terms of one file grouped by official weight key, and its report."""

    terms: dict[str, list[Term]]
    report: LoraReport


_REQUIRED = {"lora": ({"up", "down"},), "diff": ({"diff"},), "loha": ({"w1_a", "w1_b", "w2_a", "w2_b"},),
             "lokr": ()}


def _complete(mod: Module) -> bool:
    t = mod.tensors
    if mod.kind == "lokr":
        return ("w1" in t or {"w1_a", "w1_b"} <= set(t)) and ("w2" in t or {"w2_a", "w2_b"} <= set(t))
    return mod.kind in _REQUIRED and all(req <= set(t) for req in _REQUIRED[mod.kind])


def _rank(mod: Module) -> int | None:
    t = mod.tensors
    if mod.kind == "lora":
        return t["down"].shape[0]
    if mod.kind == "loha":
        return t["w1_b"].shape[0]
    if mod.kind == "lokr":
        if "w2_b" in t:
            return t["w2_b"].shape[0]
        if "w1_b" in t:
            return t["w1_b"].shape[0]
    return None


def _delta_shape(mod: Module) -> tuple[int, ...]:
    t = mod.tensors
    if mod.kind == "lora":
        return (t["up"].shape[0], math.prod(t["down"].shape[1:]))
    if mod.kind == "loha":
        return (t["w1_a"].shape[0], t["w1_b"].shape[1])
    if mod.kind == "lokr":
        s1 = t["w1"].shape if "w1" in t else (t["w1_a"].shape[0], t["w1_b"].shape[1])
        s2 = t["w2"].shape if "w2" in t else (t["w2_a"].shape[0], t["w2_b"].shape[1])
        return (s1[0] * s2[0], s1[1] * s2[1])
    return tuple(t["diff"].shape)


def _format_name(lora: LoraFile, kinds: set[str]) -> str:
    family = {"PEFT": "PEFT (official NewBie trainer, LoRA mode)", "LyCORIS": "LyCORIS",
              "kohya": "kohya (lora_unet_)", "ComfyUI": "ComfyUI (diffusion_model.)",
              "diffusers": "diffusers (transformer.)"}.get(lora.family, lora.family)
    kind = "/".join(sorted({"lora": "LoRA", "lokr": "LoKr", "loha": "LoHa", "diff": "full diff"}[k] for k in kinds))
    return f"{family} {kind}".strip()


def build_patches(lora: LoraFile, index: TargetIndex) -> PatchSet:
    """Map every module of `lora` onto the DiT described by `index`.

    Raises ModelFileError when nothing matches (naming the file and what its keys look like) or when a matched
    module's ΔW shape differs from the weight rows it targets (naming the key and both shapes). Modules that
    match no weight are listed in the report (and logged as a warning), not fatal.
    """
    terms: dict[str, list[Term]] = {}
    unmatched: list[str] = []
    sources: set[str] = set()
    kinds: set[str] = set()
    for mod in lora.modules:
        target = index.resolve(mod.name, mod.dotted) if mod.kind else None
        if target is None or not _complete(mod) or mod.unsupported:
            why = "" if target is None else (" (unsupported parts: " + ", ".join(mod.unsupported) + ")"
                                             if mod.unsupported else " (incomplete)")
            unmatched.append(mod.stem + why)
            continue
        shape = _delta_shape(mod)
        if tuple(shape) != tuple(target.shape):
            where = f" rows {target.rows[0]}..{sum(target.rows) - 1} of" if target.rows else ""
            raise ModelFileError(
                f"LoRA {lora.path}: module {mod.stem} has ΔW shape {tuple(shape)} but the DiT's{where} "
                f"{target.key} is {tuple(target.shape)}. The LoRA was trained for a different model size.")
        rank = _rank(mod)
        alpha = mod.alpha if mod.alpha is not None else lora.alpha
        per_module = pattern_alpha(lora, mod.name) if mod.alpha is None and lora.alpha_pattern else None
        if mod.alpha is not None:
            sources.add("'.alpha' tensors")
        elif per_module is not None:
            alpha = per_module
            sources.add("adapter_config.json alpha_pattern")
        elif lora.alpha is not None:
            sources.add(lora.alpha_source)
        if alpha is None or rank is None:
            scale = 1.0
            if mod.kind in ("lora", "loha") or rank is not None:
                sources.add("no alpha in the file (scale 1: alpha = rank)")
        else:
            scale = alpha / (math.sqrt(rank) if lora.rslora else rank)
        kinds.add(mod.kind)
        terms.setdefault(target.key, []).append(
            Term(mod.stem, mod.kind, dict(mod.tensors), float(scale), target.rows, tuple(target.shape)))
    matched = sum(len(v) for v in terms.values())
    unmatched += lora.stray_keys
    if not matched:
        keys = [m.stem for m in lora.modules] + lora.stray_keys
        raise ModelFileError(
            f"LoRA {lora.path} has no key that matches the NewBie DiT: it looks like {looks_like(keys)} "
            f"(e.g. {', '.join(keys[:3]) or 'no tensors'}). Use a LoRA trained for NewBie-image-Exp0.1.")
    report = LoraReport(Path(lora.path).name, _format_name(lora, kinds), " + ".join(sorted(sources)) or "n/a",
                        matched, unmatched)
    if unmatched:
        log.warning("LoRA %s: %d of %d modules matched no DiT weight: %s", lora.path, len(unmatched),
                    len(unmatched) + matched, ", ".join(unmatched[:10]))
    return PatchSet(terms, report)


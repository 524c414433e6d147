"""Tiny LoRA / LoKr files for the tiny DiT, written by the published key formats (tests and `make-tiny`).

Formats (`fmt`): "peft" (official trainer, LoRA mode: `base_model.model.*.lora_A/B`, alpha in metadata),
"kohya" (`lora_unet_*.lora_down/up` + `.alpha`), "comfy" (`diffusion_model.*.lora_A/B` + `.alpha`), "lokr"
(official trainer, LoKr mode: `lycoris_*.lokr_w1` + factorised `lokr_w2_a/_b` + `.alpha`, metadata
`adapter_type=lyco_lokr`), "diffusers" (`transformer.*` on diffusers names, q/k/v split, no alpha).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..dit import DiTConfig, NextDiT
from ..lora.mapping import TargetIndex
from .dit import TINY_DIT_CONFIG

FORMATS = ("peft", "kohya", "comfy", "lokr", "diffusers")


def _factor(n: int, want: int = 4) -> int:
    return want if n % want == 0 and n > want else 1


def tiny_lora_tensors(fmt: str, config: DiTConfig = TINY_DIT_CONFIG, rank: int = 4, alpha: float = 2.0,
                      seed: int = 0, only: tuple[str, ...] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a random LoRA in format `fmt` over every Linear of a DiT with `config`
    (or the official module names in `only`). Factors are N(0, 0.1²)-ish so ΔW is clearly non-zero."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown tiny LoRA format {fmt!r}; one of {FORMATS}")
    with torch.device("meta"):
        model = NextDiT(config, device="meta")
    index = TargetIndex.for_model(model)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    tensors: dict[str, torch.Tensor] = {}
    meta = {}
    names = [n for n, t in index.dotted.items() if t.rows is None and n == t.key[: -len(".weight")]]
    if only is not None:
        names = [n for n in names if n in only]
    if fmt == "diffusers":
        diff = [n for n, t in index.dotted.items() if n != t.key[: -len(".weight")]
                and (only is None or t.key[: -len(".weight")] in only)]
        names = diff
    for name in sorted(names):
        out, inp = index.dotted[name].shape
        if fmt == "lokr":
            a, b = _factor(out), _factor(inp)
            stem = "lycoris_" + name.replace(".", "_")
            tensors[f"{stem}.lokr_w1"] = rnd(a, b)
            tensors[f"{stem}.lokr_w2_a"] = rnd(out // a, rank)
            tensors[f"{stem}.lokr_w2_b"] = rnd(rank, inp // b)
            tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
            continue
        down, up = rnd(rank, inp), rnd(out, rank)
        if fmt == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            tensors.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                            f"{stem}.alpha": torch.tensor(float(alpha))})
        elif fmt == "comfy":
            stem = "diffusion_model." + name
            tensors.update({f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up,
                            f"{stem}.alpha": torch.tensor(float(alpha))})
        else:
            stem = ("base_model.model." if fmt == "peft" else "transformer.") + name
            tensors.update({f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up})
    if fmt == "peft":
        meta = {"lora_alpha": str(alpha), "r": str(rank)}
    elif fmt == "lokr":
        meta = {"adapter_type": "lyco_lokr", "lora_rank": str(rank), "lora_alpha": str(alpha)}
    return tensors, meta


def write_tiny_lora(path: str | Path, fmt: str = "peft", config: DiTConfig = TINY_DIT_CONFIG, rank: int = 4,
                    alpha: float = 2.0, seed: int = 0, only: tuple[str, ...] | None = None) -> Path:
    """Write `tiny_lora_tensors(...)` as a safetensors file at `path`; returns the path."""
    from safetensors.torch import save_file

    tensors, meta = tiny_lora_tensors(fmt, config, rank, alpha, seed, only)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path

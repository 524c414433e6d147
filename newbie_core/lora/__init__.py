"""LoRA, LoKr and LoHa adapters for the NewBie DiT (pure PyTorch; both hosts use it).

    from newbie_core.lora import apply_loras, remove_loras
    reports = apply_loras(dit, [("style.safetensors", 0.8), ("char_lokr.safetensors", 1.0)])
    print(reports[0].summary())     # format, alpha source, matched / unmatched modules
    remove_loras(dit)               # the original weights again, bit for bit

`newbie_core.load_dit(path, loras=[(file, strength)])` merges before the dtype conversion. Modules:
`formats` (reading files, families, alpha sources), `mapping` (names → DiT weights and qkv rows),
`patches` (ΔW formulas, scales, the report), `apply` (W + Σ strength·scale·ΔW).
"""
from __future__ import annotations

from .apply import apply_loras, merged_weight, parse_lora_arg, patch_state_dict, remove_loras
from .formats import LoraFile, read_lora
from .mapping import Target, TargetIndex
from .patches import LoraReport, PatchSet, Term, build_patches

__all__ = ["apply_loras", "remove_loras", "patch_state_dict", "merged_weight", "parse_lora_arg", "read_lora",
           "LoraFile", "TargetIndex", "Target", "build_patches", "PatchSet", "Term", "LoraReport"]

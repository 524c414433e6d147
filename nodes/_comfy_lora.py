"""ComfyUI internals for LoRA: patches go through ComfyUI's own ModelPatcher (clone + add_patches), so its
partial loading, fp8 handling and unpatching (backups restored bit for bit) apply; the ΔW formulas and the name
mapping are newbie_core.lora's. Part of `_comfy`."""
from __future__ import annotations

import torch

import comfy.lora
import comfy.weight_adapter

from ..newbie_core.lora import LoraReport, PatchSet, TargetIndex, build_patches, read_lora
from ._comfy_dit import NewBieBaseModel


DM = "diffusion_model."
# File-side prefixes core LoraLoaderModelOnly gets mapped for our MODEL (besides ComfyUI's generic ones).
LORA_PREFIXES = (("base_model.model.", True), ("base_model.model.transformer.", True), ("transformer.", True),
                 ("diffusion_model.", True), ("", True), ("lycoris_", False), ("lora_unet_", False),
                 ("lora_transformer_", False))


class NewBieLoraAdapter(comfy.weight_adapter.WeightAdapterBase):
    """A ComfyUI weight patch computing newbie_core's ΔW: weight += strength · scale · ΔW (fp32 intermediate)."""

    name = "newbie_lora"

    def __init__(self, terms):
        self.terms = list(terms)
        self.loaded_keys = {t.source for t in self.terms}
        self.weights = [w for t in self.terms for w in t.tensors.values()]

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        """Add the deltas to `weight` (already narrowed to the q/k/v rows by ComfyUI when `offset` is set)."""
        if strength == 0.0:
            return weight
        for term in self.terms:
            delta = term.delta(device=weight.device).mul_(strength * term.scale)
            weight += function(delta.to(weight.dtype))
        return weight


def _dit_index(patcher) -> TargetIndex:
    return TargetIndex.for_model(patcher.model.diffusion_model)


def lora_patches(patch_set: PatchSet) -> dict:
    """ComfyUI `add_patches` dict: `diffusion_model.<key>` (or (key, (0, first row, rows)) for q/k/v) → adapter."""
    out: dict = {}
    for key, terms in patch_set.terms.items():
        by_rows: dict = {}
        for t in terms:
            by_rows.setdefault(t.rows, []).append(t)
        for rows, ts in by_rows.items():
            out[DM + key if rows is None else (DM + key, (0, rows[0], rows[1]))] = NewBieLoraAdapter(ts)
    return out


def add_lora(patcher, path, strength: float) -> tuple[object, LoraReport]:
    """A clone of the DiT MODEL with one LoRA/LoKr file added at `strength`, and the file's report."""
    patch_set = build_patches(read_lora(path), _dit_index(patcher))
    patch_set.report.strength = float(strength)
    new = patcher.clone()
    if strength != 0.0:
        new.add_patches(lora_patches(patch_set), float(strength))
    return new, patch_set.report


def lora_key_map(model) -> dict:
    """Every LoRA module name our DiT answers to (PEFT, LyCORIS, kohya, diffusers incl. split q/k/v) → ComfyUI key."""
    index = TargetIndex.for_model(model.diffusion_model)
    return {name: (DM + t.key if t.rows is None else (DM + t.key, (0, t.rows[0], t.rows[1])))
            for name, t in index.aliases(LORA_PREFIXES).items()}


def _install_lora_key_map() -> None:
    """Let core LoraLoaderModelOnly map our formats: wrap comfy.lora.model_lora_keys_unet (once) so that for a
    NewBie MODEL it adds `lora_key_map`. ComfyUI has no per-model hook for this; other models are untouched."""
    original = comfy.lora.model_lora_keys_unet
    if getattr(original, "newbie_wrapped", False):
        return

    def model_lora_keys_unet(model, key_map={}):  # noqa: B006 - ComfyUI's own signature
        key_map = original(model, key_map)
        hook = getattr(model, "newbie_lora_key_map", None)  # an attribute, not isinstance: any copy of the pack
        if callable(hook):
            key_map.update(hook())
        return key_map

    model_lora_keys_unet.newbie_wrapped = True
    comfy.lora.model_lora_keys_unet = model_lora_keys_unet


NewBieBaseModel.newbie_lora_key_map = lora_key_map
_install_lora_key_map()

"""ComfyUI calls whose behaviour or signature changed after 0.3.64 (the oldest supported version). Each helper
works on both sides of the change; tests/nodes/test_comfy_guards.py has a test per guard (run on every host).
Part of `_comfy`."""
from __future__ import annotations

import inspect

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops

# ComfyUI ≥ 0.4: the per-call weight cast takes `offloadable=` (its async offload stream) and pairs with
# `uncast_bias_weight`; 0.3.x casts synchronously.
CAST_TAKES_OFFLOADABLE = "offloadable" in inspect.signature(comfy.ops.cast_bias_weight).parameters
# Feature test, not a version test: ComfyUI ≥ 0.4 pins offloaded weights and casts them on an offload stream
# (the benchmarks report it; the pack's own placement does not depend on it).
COMFY_ASYNC_OFFLOAD = CAST_TAKES_OFFLOADABLE and hasattr(mm, "pin_memory")
# ComfyUI 0.3.x's low-VRAM patches dequantise through convert_weight / set_weight; 0.4's patch what they are given.
LOWVRAM_PATCH_CONVERTS = "convert_func(" in inspect.getsource(comfy.model_patcher.LowVramPatch.__call__)

def dynamic_vram() -> bool:
    """True when the running ComfyUI manages VRAM dynamically (comfy-aimdo, upstream 0.5+ unless started with
    --disable-dynamic-vram). 0.3.64 and 0.4.0 have no such mode."""
    import sys

    mem = sys.modules.get("comfy.memory_management")
    return bool(getattr(mem, "aimdo_enabled", False))


def text_encoder_load_device() -> torch.device:
    """ComfyUI's device for the text encoders, with two guards.

    * `--lowvram` without dynamic VRAM (0.3.64, 0.4.0): ComfyUI picks the CPU there because its encoders could
      only load whole. Ours encode on the GPU instead: released after the stage they stream their blocks from
      the pinned copy within the free memory (`_comfy_lowvram.should_stream`), as upstream's own encoders do
      under dynamic VRAM (H200 + 0.3.64 --lowvram: a fp8 Gemma encoded on the CPU in 6.9 s; on the GPU's
      pinned path, bf16 Gemma takes 0.35 s in the default mode).
      `--novram` keeps ComfyUI's choice; the loaders' `device` input overrides both.
    * Under dynamic VRAM `text_encoder_device()` returns the GPU even in --lowvram/--novram, because ComfyUI's
      own encoders stream there. Ours are plain ModelPatchers that ComfyUI loads whole (Gemma ≈ 7.3 GiB in
      bf16), so in those modes they encode on the offload device (the CPU)."""
    device = mm.text_encoder_device()
    low = mm.vram_state in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM)
    if dynamic_vram():
        return mm.text_encoder_offload_device() if low else device
    gpu = mm.get_torch_device()
    if mm.vram_state == mm.VRAMState.LOW_VRAM and gpu.type == "cuda":
        return gpu
    return device


def free_memory(device, patcher=None) -> int:
    """Free bytes on `device` as ComfyUI counts them.

    Guard: newer ComfyUI documents `model_management.get_free_memory` as inexact under dynamic VRAM (idle models
    stay resident until something needs the room) and offers `ModelPatcher.get_free_memory`, which counts that
    room as free. Older versions (0.3.64, 0.4.0) only have the module function."""
    if patcher is not None and hasattr(patcher, "get_free_memory"):
        return patcher.get_free_memory(device)
    return mm.get_free_memory(device)


def cast_bias_weight(layer, x, **kwargs):
    """`comfy.ops.cast_bias_weight` on any version, as (weight, bias, offload stream or None): ComfyUI ≥ 0.4 casts
    on its offload stream (`offloadable=True`; pass the stream to `comfy.ops.uncast_bias_weight` after use)."""
    if CAST_TAKES_OFFLOADABLE:
        return comfy.ops.cast_bias_weight(layer, x, offloadable=True, **kwargs)
    weight, bias = comfy.ops.cast_bias_weight(layer, x, **kwargs)
    return weight, bias, None


class _OwnPinnedBudget:
    """Where ComfyUI keeps no pinned-memory budget (0.3.64), the pack keeps its own under the names ComfyUI ≥ 0.4
    uses for its module globals, with the rule 0.4 adopted: 95 % of RAM on Linux, 45 % on Windows (CUDA there
    refuses beyond about half)."""

    TOTAL_PINNED_MEMORY = 0

    @property
    def MAX_PINNED_MEMORY(self) -> int:  # noqa: N802 - ComfyUI's name
        return _own_pinned_limit()


_OWN_PINNED = _OwnPinnedBudget()


def _own_pinned_limit() -> int:
    import platform

    import psutil

    return int(psutil.virtual_memory().total * (0.45 if platform.system() == "Windows" else 0.95))


def _pinned_budget():
    """ComfyUI's own pinned-memory budget (≥ 0.4: `model_management` itself), else the pack's."""
    return mm if hasattr(mm, "MAX_PINNED_MEMORY") else _OWN_PINNED


def reserve_pinned(nbytes: int) -> bool:
    """Whether the pack may page-lock `nbytes` more host memory, counted in ComfyUI's own pinned-memory budget
    where it has one (≥ 0.4: `MAX_PINNED_MEMORY`, 95 % of RAM on Linux, 45 % on Windows, 0 with
    `--disable-pinned-memory`), so ComfyUI's pins and ours never lock more than it allows. 0.3.64 has no
    budget: the pack counts its own pins against the same share of RAM. A True answer has counted the bytes;
    give them back with `release_pinned`."""
    budget = _pinned_budget()
    if budget.MAX_PINNED_MEMORY <= 0 or budget.TOTAL_PINNED_MEMORY + nbytes > budget.MAX_PINNED_MEMORY:
        return False
    budget.TOTAL_PINNED_MEMORY += nbytes
    return True


def release_pinned(nbytes: int) -> None:
    """Give back bytes counted by `reserve_pinned`."""
    budget = _pinned_budget()
    budget.TOTAL_PINNED_MEMORY = max(0, budget.TOTAL_PINNED_MEMORY - nbytes)

"""The only module that touches ComfyUI internals: model patchers, model folders, progress, previews, memory.

A ComfyUI API change should be a one-file fix here. Everything model-related comes from `newbie_core`.
"""
from __future__ import annotations

import gc
import logging
import os
import weakref
from pathlib import Path

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
import folder_paths
import latent_preview

from ..newbie_core import checkpoints
from ..newbie_core.dit import NextDiT
from ..newbie_core.files import missing_file_error
from ..newbie_core.memory import empty_device_cache, is_out_of_memory
from ..newbie_core.precision import Precision
from ..newbie_core.recovery import cleans_up_on_failure, out_of_memory_error, release_failure

log = logging.getLogger("newbie")
DEVICE_CHOICES = ["default", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
_PACK_PATCHERS: "weakref.WeakValueDictionary[int, comfy.model_patcher.ModelPatcher]" = weakref.WeakValueDictionary()


# ----------------------------------------------------------------------------------------------- files
def model_choices(folder_key: str, want_folders: bool = False) -> list[str]:
    """File names in a ComfyUI model folder (and, if asked, sub-folders holding a HF model: config.json)."""
    names = list(folder_paths.get_filename_list(folder_key))
    if want_folders:
        for base in folder_paths.get_folder_paths(folder_key):
            if os.path.isdir(base):
                for entry in sorted(os.listdir(base)):
                    if os.path.isfile(os.path.join(base, entry, "config.json")):
                        names.append(entry + "/")
    return names or ["(no files found)"]


def resolve_model(folder_key: str, name: str, expected: str) -> Path:
    """Full path of `name` in `folder_key`, or a ModelFileError naming the folders searched and the fix."""
    if name.endswith("/"):
        for base in folder_paths.get_folder_paths(folder_key):
            cand = Path(base) / name.rstrip("/")
            if (cand / "config.json").is_file():
                return cand
    else:
        path = folder_paths.get_full_path(folder_key, name)
        if path is not None:
            return Path(path)
    searched = ", ".join(folder_paths.get_folder_paths(folder_key))
    candidates = [c for c in model_choices(folder_key, want_folders=True) if c != "(no files found)"]
    raise missing_file_error(name, f"the ComfyUI '{folder_key}' folder(s) ({searched})", candidates,
                             f"Put {expected} there, then refresh (R) and pick it.")


def device_for(choice: str, default: torch.device) -> torch.device:
    """The device a loader's `device` input names ('default' = ComfyUI's choice for that model kind)."""
    return default if choice in ("default", "", None) else torch.device(choice)


# ------------------------------------------------------------------------------------------------ DiT
class ComfyNewBieDiT(NextDiT):
    """NextDiT called the ComfyUI way (σ: 1 noise → 0 data; predicts noise − x0) for core samplers.

    Our own sampler node calls `velocity` (the official convention) directly.
    """

    def __init__(self, newbie_config=None, image_model=None, dtype=None, device=None, operations=None,
                 attention=None, **kwargs):
        super().__init__(newbie_config, operations=operations, attention=attention, dtype=dtype, device=device)
        self.dtype = dtype

    def velocity(self, *args, **kwargs) -> torch.Tensor:
        """The official forward: velocity (data − noise) at t (0 = noise)."""
        return NextDiT.forward(self, *args, **kwargs)

    def forward(self, x, timesteps, context=None, attention_mask=None, clip_text_pooled=None, transformer_options={}, **kwargs):
        """ComfyUI convention: t = 1 − σ, output negated (spec §1.6)."""
        mask = attention_mask if attention_mask is not None else torch.ones(context.shape[:2], device=x.device)
        return -self.velocity(x, 1.0 - timesteps, context, mask.to(x.device), clip_text_pooled)


class NewBieModelConfig(comfy.supported_models.Lumina2):
    """Model config for ComfyUI: Flux latents, shift 6, multiplier 1 (as core Lumina2)."""

    unet_config = {"image_model": "newbie"}
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]

    def get_model(self, state_dict, prefix="", device=None):
        """Build the BaseModel around our DiT."""
        return NewBieBaseModel(self, device=device)


class NewBieBaseModel(comfy.model_base.BaseModel):
    """BaseModel whose diffusion_model is our NextDiT; passes the caption mask and the Jina pooled vector."""

    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device, unet_model=ComfyNewBieDiT)

    def extra_conds(self, **kwargs):
        """Caption mask and pooled vector from CONDITIONING to the DiT (core samplers)."""
        out = super().extra_conds(**kwargs)
        if kwargs.get("attention_mask") is not None:
            out["attention_mask"] = comfy.conds.CONDRegular(kwargs["attention_mask"])
        if kwargs.get("pooled_output") is not None:
            out["clip_text_pooled"] = comfy.conds.CONDRegular(kwargs["pooled_output"])
        if kwargs.get("cross_attn") is not None:
            out["c_crossattn"] = comfy.conds.CONDRegular(kwargs["cross_attn"])
        return out


def comfyui_attention(q, k, v, key_mask=None):
    """Our attention signature on ComfyUI's `optimized_attention_masked` (honours --use-sage-attention etc.).

    q `[B,Hq,S,D]`, k/v `[B,Hkv,S,D]`; ComfyUI's kernels have no GQA, so K/V are repeated here.
    """
    from comfy.ldm.modules.attention import optimized_attention_masked

    from ..newbie_core.attention import KeyPrefix, prefix_attention

    if isinstance(key_mask, KeyPrefix):  # packed real tokens: unmasked kernel calls per caption length
        return prefix_attention(q, k, v, key_mask, lambda a, b, c: comfyui_attention(a, b, c, None))
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return optimized_attention_masked(q, k, v, q.shape[1], mask=mask, skip_reshape=True, skip_output_reshape=True)


comfyui_attention.supports_key_prefix = True


def resolve_attention(name: str):
    """The DiT loader's attention choice as a callable: ComfyUI's attention, or newbie_core's backends."""
    if name == "comfyui":
        return comfyui_attention
    from functools import partial

    from ..newbie_core.attention import attention

    return partial(attention, backend=name)


@cleans_up_on_failure
def load_dit_patcher(path: Path, precision: Precision, attention: str, device: str = "default"):
    """Load the DiT as a ComfyUI MODEL: comfy.ops operations (fp8 storage, low-VRAM streaming), ModelPatcher."""
    sd, metadata, name = checkpoints.read_dit_state_dict(path)
    sd = checkpoints.to_official(sd, source=name)
    config = checkpoints.dit_config_from_state_dict(sd, metadata=metadata)
    load_device = device_for(device, mm.get_torch_device())
    offload_device = mm.unet_offload_device()
    compute = precision.compute if precision.storage != precision.compute else None
    model_config = NewBieModelConfig({"image_model": "newbie", "newbie_config": config, "dtype": precision.storage,
                                      "attention": resolve_attention(attention)})
    model_config.set_inference_dtype(precision.storage, compute)
    model = model_config.get_model({}, device="meta")  # only the DiT is built on meta; weights are assigned below
    dm = model.diffusion_model
    dm.compute_dtype = precision.compute
    sd = {k: v.to(precision.storage) if v.is_floating_point() else v for k, v in sd.items()}
    checkpoints.check_keys(dm, sd, source=name)
    dm.load_state_dict(sd, strict=True, assign=True)
    model.to(offload_device)
    model.device = offload_device
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    register(patcher, f"DiT ({Path(path).name})")
    return patcher


# ------------------------------------------------------------------------------------- other patchers
class ModuleHolder(torch.nn.Module):
    """Holds a transformers/diffusers module for a ModelPatcher (theirs have a read-only `device` property)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module


def module_patcher(module: torch.nn.Module, kind: str, label: str, device: str = "default"):
    """A plain ModelPatcher for a text encoder or the VAE, so ComfyUI's memory manager sees it."""
    load = {"text": text_encoder_load_device, "vae": mm.vae_device}[kind]()
    offload = {"text": mm.text_encoder_offload_device, "vae": mm.vae_offload_device}[kind]()
    module.to(offload)
    holder = ModuleHolder(module)
    patcher = comfy.model_patcher.ModelPatcher(holder, load_device=device_for(device, load), offload_device=offload)
    register(patcher, label)
    return patcher


def vae_device() -> torch.device:
    """ComfyUI's device for VAEs."""
    return mm.vae_device()


def recast(patcher, module: torch.nn.Module, precision: Precision) -> None:
    """Cast a patcher's module to `precision` (unloading it first) and refresh ComfyUI's size estimate."""
    from ..newbie_core.precision import cast_module

    current = {p.dtype for p in module.parameters() if p.is_floating_point()}
    if current == {precision.storage}:
        return
    unload(patcher)
    cast_module(module, precision)
    patcher.size = 0
    patcher.model_size()


def register(patcher, label: str) -> None:
    """Remember a patcher the pack created (for the purge node's report)."""
    patcher.newbie_label = label
    _PACK_PATCHERS[id(patcher)] = patcher


def load_to_device(patchers: list, memory_required: int = 0, full: bool = False) -> None:
    """Ask ComfyUI to place these models on their load device (evicting others only as needed)."""
    mm.load_models_gpu(patchers, memory_required=memory_required, force_full_load=full)


def unload(patcher, clear_cache: bool = True) -> None:
    """Move one model back to its offload device through ComfyUI's memory manager; then empty the device cache
    unless `clear_cache` is False (the next model of the same node reuses the freed blocks)."""
    for i, loaded in enumerate(list(mm.current_loaded_models)):
        if loaded.model is patcher:
            loaded.model_unload()
            mm.current_loaded_models.remove(loaded)
            break
    if clear_cache:
        empty_device_cache(patcher.load_device)


def clear_device_cache(device) -> None:
    """Collect garbage and return the cached blocks of `device` (once, after a node unloaded its models)."""
    empty_device_cache(device)


def intermediate_device() -> torch.device:
    """Where node outputs live (CPU unless --gpu-only)."""
    return mm.intermediate_device()


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
    mm.throw_exception_if_processing_interrupted()


def sampler_progress(patcher, total: int):
    """A per-step callback: progress bar tick (a cancel point) and a latent preview of x0 (model space)."""
    if getattr(patcher.model, "latent_format", None) is None:
        patcher.model.latent_format = comfy.latent_formats.Flux()
    preview = latent_preview.prepare_callback(patcher, total)

    def on_step(info) -> None:
        preview(info.step, info.denoised, info.x, info.total)

    return on_step


def progress_bar(total: int):
    """ComfyUI progress bar (every update is also a cancel point)."""
    return comfy.utils.ProgressBar(total)


# ------------------------------------------------------------------------------------------- memory
# What a ComfyUI user can change when a stage runs out of memory.
LOW_VRAM_HINTS = {
    "text encoding": "Lower-memory options: NewBie Text Encoder Loader precision fp8_e4m3fn, a shorter prompt, "
                     "or start ComfyUI with --lowvram.",
    "DiT sampling": "Lower-memory options: NewBie DiT Loader precision fp8_e4m3fn (half the memory), a smaller "
                    "width/height or batch_size 1, a NewBie Memory Purge before the sampler, or start ComfyUI "
                    "with --lowvram (streams the DiT's weights).",
    "VAE decode": "Lower-memory options: tiled on in NewBie VAE Decode (a full decode already retries in tiles "
                  "down to 128 px), a smaller image, a NewBie Memory Purge before the decode, or start ComfyUI "
                  "with --lowvram.",
}


def fail_cleanly(exc: BaseException, stage: str, device) -> None:
    """Called by a node whose stage failed (any exception, cancel included): free what the failure still holds;
    after an out-of-memory also unload every model through ComfyUI, then raise the StageOutOfMemoryError that
    lists the lower-memory options. Otherwise returns and the caller re-raises `exc` unchanged."""
    oom = is_out_of_memory(exc)
    if oom:
        mm.unload_all_models()
    release_failure(exc, device)
    if oom:
        mm.soft_empty_cache(True)
        raise out_of_memory_error(stage, device, LOW_VRAM_HINTS[stage]) from exc


def purge_all() -> None:
    """Unload every model through ComfyUI, collect garbage, then empty the device caches (that order)."""
    mm.unload_all_models()
    gc.collect()
    empty_device_cache()
    mm.soft_empty_cache(True)


def memory_snapshot() -> dict:
    """Free/total device memory and process RAM, in MiB."""
    import psutil

    dev = mm.get_torch_device()
    out = {"device": str(dev), "ram_used_mib": psutil.Process().memory_info().rss / 2**20,
           "ram_free_mib": psutil.virtual_memory().available / 2**20}
    if dev.type != "cpu":
        out["vram_free_mib"] = free_memory(dev) / 2**20
        out["vram_total_mib"] = mm.get_total_memory(dev) / 2**20
        out["vram_allocated_mib"] = torch.cuda.memory_allocated(dev) / 2**20 if dev.type == "cuda" else 0.0
    return out


def pack_models() -> list[dict]:
    """Every model this pack holds: label, device, dtypes, size, whether ComfyUI has it loaded."""
    loaded = {id(m.model) for m in mm.current_loaded_models}
    rows = []
    for p in list(_PACK_PATCHERS.values()):
        tensors = list(p.model.parameters()) + list(p.model.buffers())
        devices = sorted({str(t.device) for t in tensors})
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in p.model.parameters() if t.is_floating_point()})
        size = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        rows.append({"model": p.newbie_label, "devices": devices, "dtypes": dtypes, "size_mib": round(size, 1),
                     "loaded_by_comfyui": id(p) in loaded})
    return rows


# ------------------------------------------------------------------------------------ version guards
# ComfyUI calls whose behaviour or signature changed after 0.3.64 (the oldest supported version). Each helper
# works on both sides of the change; tests/nodes/test_comfy_guards.py has a test per guard (run on every host).
def dynamic_vram() -> bool:
    """True when the running ComfyUI manages VRAM dynamically (comfy-aimdo, upstream 0.5+ unless started with
    --disable-dynamic-vram). 0.3.64 and 0.4.0 have no such mode."""
    import sys

    mem = sys.modules.get("comfy.memory_management")
    return bool(getattr(mem, "aimdo_enabled", False))


def text_encoder_load_device() -> torch.device:
    """ComfyUI's device for the text encoders.

    Guard: under dynamic VRAM `text_encoder_device()` returns the GPU even in --lowvram/--novram mode, because
    ComfyUI's own encoders stream their weights there. Ours are plain ModelPatchers that load whole (Gemma
    ≈ 7.3 GiB in bf16), so in those modes we keep the rule of 0.3.64: encode on the offload device (the CPU)."""
    device = mm.text_encoder_device()
    if dynamic_vram() and mm.vram_state in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM):
        return mm.text_encoder_offload_device()
    return device


def free_memory(device, patcher=None) -> int:
    """Free bytes on `device` as ComfyUI counts them.

    Guard: newer ComfyUI documents `model_management.get_free_memory` as inexact under dynamic VRAM (idle models
    stay resident until something needs the room) and offers `ModelPatcher.get_free_memory`, which counts that
    room as free. Older versions (0.3.64, 0.4.0) only have the module function."""
    if patcher is not None and hasattr(patcher, "get_free_memory"):
        return patcher.get_free_memory(device)
    return mm.get_free_memory(device)


def pick_operations(weight_dtype, compute_dtype, load_device=None, model_config=None):
    """`comfy.ops.pick_operations` on any version: the operations class (Linear, Conv, ...) for these dtypes.

    Guard: 0.3.64 takes `scaled_fp8=`; 0.4.0 and later take `model_config=` instead (and dropped `scaled_fp8`).
    The pack never uses scaled fp8, so only `model_config` is passed, and only where it is accepted."""
    import inspect

    import comfy.ops

    kwargs = {"load_device": load_device}
    if "model_config" in inspect.signature(comfy.ops.pick_operations).parameters:
        kwargs["model_config"] = model_config
    return comfy.ops.pick_operations(weight_dtype, compute_dtype, **kwargs)

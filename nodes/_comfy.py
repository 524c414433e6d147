"""ComfyUI internals: model folders, patchers, the ComfyUI host of the stages, progress, previews, memory.

`nodes/_comfy*.py` are the only modules that touch ComfyUI internals (this one, `_comfy_dit` for the DiT's model
class / operations / patcher / loader, `_comfy_lora`, `_comfy_compat` for calls that changed after 0.3.64); the
nodes import all of it through this module. Everything model-related comes from `newbie_core`.
"""
from __future__ import annotations

import gc
import logging
import os
import weakref
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.supported_models
import comfy.utils
import folder_paths
import latent_preview

from ..newbie_core.loading import keep_on_host
from ..newbie_core.memory import empty_device_cache, file_identity, is_out_of_memory
from ..newbie_core.pipeline import compile_dit
from ..newbie_core.precision import Precision, parse_precision
from ..newbie_core.recovery import STAGE_NAMES, low_vram_hint, out_of_memory_error, release_failure
from ..newbie_core.model_names import resolve_model_name
from ..newbie_core.validate import parse_device
from . import _comfy_lowvram as lowvram
from ._comfy_compat import dynamic_vram, free_memory, text_encoder_load_device  # noqa: F401  (re-exported guards)

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
    """Full path of `name` in `folder_key` (models folder + extra_model_paths), through newbie_core's one name
    resolver (refuses absolute paths, `..` and links out; see newbie_core.model_names), or a ModelFileError."""
    bases = folder_paths.get_folder_paths(folder_key)
    return resolve_model_name(name, bases, f"the ComfyUI '{folder_key}' folder(s) ({', '.join(bases)})",
                              lambda: model_choices(folder_key, want_folders=True),
                              f"Put {expected} there, then refresh (R) and pick it.",
                              also_inside=[folder_paths.models_dir])


def model_fingerprint(folder_key: str, name: str) -> str:
    """Content fingerprint of a model name's file(s) (header bytes, size, mtime_ns), for the loaders'
    `fingerprint_inputs`: a file replaced under the same name re-runs the loader. A name that cannot be resolved
    gives a constant ("unresolved"): the loader then runs and raises its clear error."""
    from ..newbie_core.errors import NewBieError
    from ..newbie_core.files import fingerprint_or_none

    try:
        return fingerprint_or_none(resolve_model(folder_key, name, "the model")) or "unreadable"
    except NewBieError:
        return "unresolved"


def device_for(choice: str, default: torch.device) -> torch.device:
    """The device a loader's `device` input names ('default' = ComfyUI's choice for that model kind), checked
    against this machine by newbie_core (a POSTed 'cuda:7' or 'garbage' is an InputError, not a KeyError later)."""
    device = parse_device(choice)
    return default if device is None else device


# ------------------------------------------------------------------------------------- other patchers
class ModuleHolder(torch.nn.Module):
    """Holds a transformers/diffusers module for a ModelPatcher (theirs have a read-only `device` property)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module


def module_patcher(module: torch.nn.Module, kind: str, label: str, device: str = "default",
                   cpu_only: tuple[str, ...] = ()):
    """A plain ModelPatcher for a text encoder or the VAE, so ComfyUI's memory manager sees it. `cpu_only`
    submodules (newbie_core.loading.CPU_ONLY: Gemma's embedding table) are held outside the patched tree:
    never moved to the device and not counted in the model's size, as in the CLI host."""
    load = {"text": text_encoder_load_device, "vae": mm.vae_device}[kind]()
    offload = {"text": mm.text_encoder_offload_device, "vae": mm.vae_offload_device}[kind]()
    keep_on_host(module, cpu_only)
    module.to(offload)
    holder = ModuleHolder(module)
    patcher = comfy.model_patcher.ModelPatcher(holder, load_device=device_for(device, load), offload_device=offload)
    lowvram.follow_buffers(patcher)  # rotary tables follow a partial load
    register(patcher, label)
    return patcher


def make_partially_loadable(patcher) -> None:
    """Make every layer of a text encoder's or the VAE's patcher castable by ComfyUI (after any precision cast,
    which may replace layers), so ComfyUI can leave part of it on the CPU; refreshes the size estimate."""
    lowvram.make_castable(patcher.model, NewBieOps.Linear)
    patcher.size = lowvram.true_size(patcher.model)


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
    patcher.size = lowvram.true_size(patcher.model)


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
def fail_cleanly(exc: BaseException, stage: str, device) -> None:
    """Called by a node whose stage failed (any exception, cancel included): free what the failure still holds;
    after an out-of-memory also unload every model through ComfyUI, then raise the StageOutOfMemoryError that
    lists the lower-memory options (`stage`: text, dit or vae). Otherwise returns; the caller re-raises `exc`."""
    oom = is_out_of_memory(exc)
    if oom:
        mm.unload_all_models()
    release_failure(exc, device)
    if oom:
        mm.soft_empty_cache(True)
        raise out_of_memory_error(STAGE_NAMES[stage], device, low_vram_hint(stage, "comfyui")) from exc


# --------------------------------------------------------------------------------------------- host
_COMPILED: dict = {"dit": None, "forward": None}  # this host's one compiled-DiT slot (weakly holds its DiT)


class ComfyHost:
    """The ComfyUI host of `newbie_core.stages`: each role's ModelPatcher is placed by ComfyUI's memory
    manager (`load_models_gpu`: evicts other models only as needed, partial loading under --lowvram);
    progress bar + latent preview every sampler interval; ComfyUI's interrupt; the pack's messages on failure.

    Built per node call from what the node received: `text_encoders` (NEWBIE_TEXT_ENCODERS), `model` (MODEL),
    `vae` (NEWBIE_VAE) with the decode's `vae_precision`. Unless `keep_loaded` (the node's option), the text
    encoders and the DiT are released after their stage, as in the CLI: on a CUDA ComfyUI without dynamic VRAM
    they run from the engine's pinned copy (next use uploads from it), so the whole graph peaks at its largest
    stage, not DiT + VAE decode. Kept models (every model under --highvram/--gpu-only), a LoRA-patched or
    compiled DiT and the VAE stay loaded for ComfyUI to evict when it needs the memory.
    """

    name = "comfyui"

    def __init__(self, text_encoders=None, model=None, vae=None, vae_precision: Precision | None = None,
                 keep_loaded: bool = False):
        self.enc, self.model, self.vae, self.vae_precision = text_encoders, model, vae, vae_precision
        # --highvram / --gpu-only: ComfyUI keeps every model on the GPU, whatever the node's option
        self.keep_loaded = keep_loaded or mm.vram_state == mm.VRAMState.HIGH_VRAM
        self.output_device = mm.intermediate_device()

    def _role(self, role: str):
        if role == "gemma":
            return self.enc.gemma_patcher, self.enc.gemma
        if role == "jina":
            return self.enc.jina_patcher, self.enc.jina
        if role == "dit":
            return self.model, self.model.model.diffusion_model
        return self.vae.patcher, self.vae.vae

    def device_of(self, role: str) -> torch.device:
        """The patcher's load device."""
        return self._role(role)[0].load_device

    def precision(self, role: str) -> Precision:
        """The loader's precision (the decode node's for the VAE)."""
        if role in ("gemma", "jina"):
            return parse_precision(self.enc.precision, role)
        if role == "dit":
            return parse_precision(self.model.model_options.get("newbie_precision", "bf16"), "dit")
        return self.vae_precision

    def peek(self, role: str):
        """The role's module as loaded (on its offload device)."""
        return self._role(role)[1]

    @contextmanager
    def placed(self, role: str, clear_cache: bool = True, memory_required: int = 0):
        """Load the role's patcher through ComfyUI, which may load any model partially (every layer is castable);
        the DiT, Gemma and Jina run on the engine's pinned path instead where `lowvram.should_stream` says so
        (models released after the stage, i.e. not keep_loaded; a DiT that does not fit; `newbie_stream` = on).
        On ComfyUI's path the text encoders are unloaded afterwards unless keep_loaded; the DiT stays (LoRA
        patches and compiled graphs are ComfyUI's to keep)."""
        patcher, wrapper = self._role(role)
        if role == "vae":
            recast(patcher, wrapper.model, self.vae_precision)
        elif lowvram.should_stream(patcher, memory_required, released_after=not self.keep_loaded):
            root = wrapper if role == "dit" else patcher.model
            budget = patcher.model_options.get("newbie_stream_budget")  # resident bytes: the loader's cap
            with lowvram.streamed(patcher, root, role, memory_required, budget):
                if role != "dit":
                    wrapper.run_device = patcher.load_device
                yield wrapper
            return
        if role != "dit":
            make_partially_loadable(patcher)
        load_to_device([patcher], memory_required=memory_required, full=False)
        if role != "dit":
            wrapper.run_device = patcher.load_device  # the layers may be partly on the CPU (partial load)
        try:
            yield wrapper
        finally:
            if role in ("gemma", "jina") and not self.keep_loaded:
                unload(patcher, clear_cache=clear_cache)

    def dit_forward(self, dit):
        """The DiT's official forward; compiled (the engine's one way) when the loader's compile is on."""
        if not self.model.model_options.get("newbie_compile"):
            return dit.velocity
        held = _COMPILED["dit"]() if _COMPILED["dit"] is not None else None
        if held is not dit:
            _COMPILED["dit"], _COMPILED["forward"] = weakref.ref(dit), compile_dit(dit.velocity)
        return _COMPILED["forward"]

    def step_callback(self, intervals: int):
        """Progress bar tick + latent preview per interval (each a cancel point)."""
        return sampler_progress(self.model, intervals)

    def check_interrupt(self) -> None:
        """ComfyUI's Cancel."""
        check_interrupt()

    def measure(self, stage: str):
        """ComfyUI times nodes itself."""
        return nullcontext(None)

    def text_identity(self) -> tuple:
        """Encoder content fingerprints taken when they were loaded, precision and the Jina token limit (a replaced
        file or another limit: a new key)."""
        return (self.enc.fingerprints or tuple(file_identity(f) for f in self.enc.files), self.enc.precision,
                getattr(self.enc.jina, "max_length", 512))

    def fail(self, stage: str, exc: BaseException):
        """Free what the failure holds; after an out-of-memory unload every model and explain; re-raise."""
        fail_cleanly(exc, stage, self.device_of({"text": "gemma"}.get(stage, stage)))
        raise exc


def purge_all() -> None:
    """Unload every model through ComfyUI, collect garbage, then empty the device caches (that order)."""
    mm.unload_all_models()
    for p in list(_PACK_PATCHERS.values()):
        lowvram.unpin(p)  # page-locked block copies (DiT, Gemma, Jina) go back to ordinary memory
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


# The rest of the ComfyUI glue, in modules of their own (imported last: they use the helpers above).
from ._comfy_dit import (ComfyNewBieDiT, NewBieBaseModel, NewBieModelConfig, NewBieOps, NewBiePatcher,  # noqa: E402,F401
                         load_dit_patcher, resolve_attention)
from ._comfy_lora import add_lora, lora_key_map  # noqa: E402,F401

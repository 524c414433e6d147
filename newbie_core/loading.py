"""Read each model role from disk onto the CPU, in the file's own dtype (the pristine copy a StagedModel keeps)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .files import open_safetensors, weight_files
from .model_paths import ModelPaths


def file_dtype(path: str | Path) -> torch.dtype:
    """The dtype of the first floating tensor stored at `path` (file or folder), read from the header only."""
    table = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    for f in weight_files(path):
        if f.suffix not in (".safetensors", ".sft"):
            continue
        sf = open_safetensors(f)  # a damaged file: ModelFileError naming it, not a raw SafetensorError
        for k in sf.keys():
            dt = sf.get_slice(k).get_dtype()
            if dt in table:
                return table[dt]
    return torch.bfloat16


# Blocks streamed in low-VRAM mode, in execution order, per role (ModuleList attribute names).
STREAMED_BLOCKS = {"dit": ("context_refiner", "noise_refiner", "layers"), "gemma": ("layers",), "jina": ("layers",)}
# Submodules that never go to the device: Gemma's 262k×2560 embedding table (1.25 GiB in bf16) is only a lookup.
CPU_ONLY = {"gemma": ("embed_tokens",)}


@dataclass
class LoadedRole:
    """A model role read from disk: the wrapper the pipeline calls, the nn.Module holding every weight,
    its source path, the submodules kept on the CPU and the block lists low-VRAM mode streams."""

    wrapper: object
    module: nn.Module
    source: str
    cpu_only: tuple[str, ...] = ()
    stream: tuple[str, ...] = ()


def load_role(role: str, paths: ModelPaths, attention: str = "auto", loras=()) -> LoadedRole:
    """Load `role` (dit, gemma, jina, vae) on the CPU in its file dtype.

    `loras` (DiT only): [(file, strength), …] merged in fp32 into the weights read from disk, so the pristine
    copy a StagedModel keeps is the patched one (fp8 is quantised and blocks are streamed from it)."""
    src = getattr(paths, role)
    extra = dict(source=str(src), cpu_only=CPU_ONLY.get(role, ()), stream=STREAMED_BLOCKS.get(role, ()))
    if role == "dit":
        from .dit import load_dit

        dit = load_dit(src, dtype=file_dtype(_dit_file(src)), device="cpu", attention=attention, loras=loras)
        return LoadedRole(dit, dit, **extra)
    if role == "gemma":
        from .text.gemma import load_gemma

        enc = load_gemma(src, dtype=file_dtype(src), device="cpu")
        return LoadedRole(enc, enc.model, **extra)
    if role == "jina":
        from .text.jina import load_jina

        enc = load_jina(src, dtype=file_dtype(src), device="cpu", max_length=getattr(paths, "jina_max_length", 512))
        return LoadedRole(enc, enc.model, **extra)
    if role == "vae":
        from .vae import load_vae

        vae = load_vae(src, dtype=file_dtype(src), device="cpu")
        return LoadedRole(vae, vae.model, **extra)
    raise ValueError(f"unknown model role {role!r}")


def _dit_file(src: str | Path) -> Path:
    p = Path(src)
    if p.is_dir() and (p / "transformer").is_dir():
        return p / "transformer"
    return p


class HostResident(nn.Module):
    """Holds a submodule OUTSIDE the module tree, so device managers that walk `named_modules()` (ComfyUI's
    ModelPatcher) neither move nor count it: the `CPU_ONLY` rule for hosts without `StagedModel`. Attribute
    reads (`.weight`, `.embed_scale`) and calls go to the held module."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.__dict__["held"] = module

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["held"], name)

    def forward(self, *args, **kwargs):
        """The held module's forward."""
        return self.__dict__["held"](*args, **kwargs)


def keep_on_host(module: nn.Module, names: tuple[str, ...]) -> None:
    """Replace each named submodule of `module` by a `HostResident` holding it (it stays where it is: the CPU)."""
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, child, HostResident(owner.get_submodule(child)))

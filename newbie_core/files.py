"""Reading weight files: safetensors (single or sharded folders) and, only when asked, `.pth` with weights_only.

Nothing here executes code from a file: safetensors is data only, and `.pth` goes through
`torch.load(weights_only=True)`. Every failure raises ModelFileError naming the path and the fix.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch

from .errors import ModelFileError

WEIGHT_SUFFIXES = (".safetensors", ".sft", ".pth", ".pt", ".bin", ".ckpt")


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError on damage
        raise ModelFileError(
            f"{path} is damaged or is not a safetensors file ({e}). Re-download it; "
            f"a partial download is the usual cause."
        ) from e


def read_safetensors(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read tensors (all, or only `keys`) from one safetensors file onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"Model file not found: {path}. Check the path, or put the file there.")
    f = _open_safetensors(path)
    wanted = list(f.keys()) if keys is None else [k for k in keys if k in f.keys()]
    out = {}
    try:
        for k in wanted:
            out[k] = f.get_tensor(k)
    except Exception as e:
        raise ModelFileError(f"{path} is damaged (reading tensor {k!r} failed: {e}). Re-download it.") from e
    return out


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The free-form `__metadata__` of a safetensors file ({} when absent)."""
    return dict(_open_safetensors(Path(path)).metadata() or {})


def list_keys(path: str | os.PathLike) -> list[str]:
    """Tensor names in a safetensors file (or in every shard of a folder) without reading any data."""
    return [k for f in weight_files(path) for k in _open_safetensors(f).keys()]


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files behind `path`: the file itself, or every shard of a HF-style folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ModelFileError(f"Model path not found: {path}. Check the path, or put the model there.")
    for index_name in ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except Exception as e:
                raise ModelFileError(f"{index} is damaged ({e}). Re-download the folder.") from e
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise ModelFileError(f"{path} is incomplete: shard(s) {', '.join(missing)} listed in {index_name} are missing.")
            return [path / s for s in shards]
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".sft"))
    if not files:
        raise ModelFileError(f"No .safetensors weights in folder {path}.")
    return files


def read_state_dict(path: str | os.PathLike, allow_pickle_free_pth: bool = True) -> dict[str, torch.Tensor]:
    """Load a whole state dict from a file or a (sharded) folder onto the CPU.

    `.pth/.pt/.bin/.ckpt` files are read with `torch.load(weights_only=True)`, which refuses to run code.
    """
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        if f.suffix in (".safetensors", ".sft"):
            out.update(read_safetensors(f))
        elif allow_pickle_free_pth and f.suffix in WEIGHT_SUFFIXES:
            try:
                sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ModelFileError(
                    f"{f} could not be read as a weights-only checkpoint ({e}). Use a .safetensors file; "
                    f"pickled checkpoints that need code are refused."
                ) from e
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            out.update({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})
        else:
            raise ModelFileError(f"{f}: unsupported weight file type {f.suffix!r}; expected .safetensors.")
    return out


def strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under `prefix`, with it removed (other keys dropped)."""
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def describe_state_dict(keys: Iterable[str]) -> str:
    """A short guess at what a checkpoint is, for "this is not the model you think" errors."""
    keys = list(keys)
    ks = set(keys)
    def has(sub: str) -> bool:
        return any(sub in k for k in keys)
    if has("cap_embedder.1.weight") and has("clip_text_pooled_proj"):
        return "a NewBie-image DiT"
    if has("cap_embedder.1.weight") or has("time_caption_embed.caption_embedder"):
        return "a Lumina-2 style Next-DiT without NewBie's CLIP projection (Lumina Image 2.0 / NetaYume?)"
    if has("double_blocks.") and has("single_blocks."):
        return "a FLUX transformer"
    if has("input_blocks.") and has("label_emb"):
        return "an SDXL UNet checkpoint"
    if has("input_blocks.") or has("model.diffusion_model.input_blocks"):
        return "a Stable Diffusion UNet checkpoint"
    if has("joint_blocks."):
        return "an SD3 transformer"
    if has("decoder.up.") or has("decoder.up_blocks.") or has("encoder.down."):
        return "a VAE"
    if has("self_attn.q_proj") and (has("pre_feedforward_layernorm") or has("q_norm")):
        return "a Gemma-3 text model"
    if has("mixer.Wqkv") or has("emb_ln"):
        return "a Jina CLIP / XLM-RoBERTa text model"
    if has("text_model.encoder.layers") or has("transformer.resblocks"):
        return "a CLIP text encoder"
    if "spiece_model" in ks:
        return "a text encoder with an embedded tokenizer"
    return f"an unrecognised checkpoint ({len(keys)} tensors, e.g. {', '.join(sorted(keys)[:3])})"

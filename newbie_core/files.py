"""Reading weight files: safetensors (single or sharded folders) and, only when asked, `.pth` with weights_only.

Nothing here executes code from a file: safetensors is data only, and `.pth` goes through
`torch.load(weights_only=True)`. Every failure raises ModelFileError naming the path and the fix.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable

import torch

from .errors import ModelFileError

WEIGHT_SUFFIXES = (".safetensors", ".sft", ".pth", ".pt", ".bin", ".ckpt")


def diagnose_weight_file(path: str | os.PathLike) -> str:
    """Why a weight file cannot be opened, in words: empty, a Git LFS pointer, a web page, truncated, bad header.

    Reads only the first bytes and the safetensors header; used to phrase "damaged file" errors.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(1024)
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    if size == 0:
        return "it is empty (0 bytes)"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer (a small text file), not the weights: the download skipped the LFS data"
    if head.lstrip()[:1] == b"<" or head.lstrip()[:9].lower() == b"<!doctype":
        return "it is a web page (HTML), not weights: the download saved an error or login page"
    if size < 8:
        return f"it is truncated ({size} bytes)"
    n = int.from_bytes(head[:8], "little")
    if n <= 0 or n > 100 * 1024**2:
        return "its safetensors header is damaged (impossible header length)"
    if 8 + n > size:
        return f"it is truncated inside its header ({size:,} bytes on disk, the header alone needs {8 + n:,})"
    try:
        with open(path, "rb") as fh:
            fh.seek(8)
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except Exception:
        return "its safetensors header is damaged (not valid JSON)"
    expected = 8 + n + end
    if size < expected:
        return (f"it is truncated: {size:,} of {expected:,} bytes ({100 * size / expected:.0f} %) are on disk, "
                f"the rest of the tensor data is missing")
    if size > expected:
        return f"it has {size - expected:,} unexpected bytes after the tensor data"
    return _UNREADABLE


_UNREADABLE = "safetensors cannot read it"


def damaged_file_error(path: str | os.PathLike, detail: str = "") -> "ModelFileError":
    """ModelFileError for a weight file that exists but cannot be read: what is wrong and to re-download it.
    `detail` (the reader's own error) is shown only when the file itself looks intact."""
    why = diagnose_weight_file(path)
    extra = f" ({detail})" if detail and why == _UNREADABLE else ""
    return ModelFileError(f"{path} is damaged: {why}{extra}. Re-download it; an interrupted or partial "
                          f"download is the usual cause. Nothing was loaded from it.")


def open_safetensors(path: Path):
    """A safetensors handle (header read, data memory-mapped); a damaged file raises ModelFileError saying why."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError on damage
        raise damaged_file_error(path, str(e)) from e


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to `n` names from `candidates` that look like `name` (typos, other case, other extension)."""
    cands = list(dict.fromkeys(str(c) for c in candidates))
    lower = {c.lower(): c for c in cands}
    found = [lower[name.lower()]] if name.lower() in lower and lower[name.lower()] != name else []
    stem = Path(name.rstrip("/")).stem.lower()  # compare stems: a shared ".safetensors" is no likeness
    by_stem = {Path(c.rstrip("/")).stem.lower(): c for c in cands}
    found += [by_stem[m] for m in difflib.get_close_matches(stem, list(by_stem), n=n, cutoff=0.6)]
    return [c for c in dict.fromkeys(found) if c != name][:n]


def missing_file_error(name: str, where: str, candidates: Iterable[str], fix: str = "") -> "ModelFileError":
    """ModelFileError for a model that is not where it was looked for: `where` (the folders searched), up to
    three close matches from `candidates`, and `fix` (what to do)."""
    similar = close_matches(name, candidates)
    hint = f" Close matches: {', '.join(repr(s) for s in similar)}." if similar else ""
    return ModelFileError(f"'{name}' was not found in {where}.{hint}{(' ' + fix) if fix else ''}")


def require_exists(path: str | os.PathLike, what: str, fix: str) -> Path:
    """`path` as a Path if it exists; else a ModelFileError naming `what`, the folder searched, close matches
    among its files and `fix`."""
    path = Path(path)
    if not path.exists():
        raise missing_file_error(path.name, f"folder {path.parent} ({what})", _folder_names(path.parent), fix)
    return path


def _folder_names(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in WEIGHT_SUFFIXES + (".sft",) or p.is_dir())
    except OSError:
        return []


def read_safetensors(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read tensors (all, or only `keys`) from one safetensors file onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise missing_file_error(path.name, f"folder {path.parent}", _folder_names(path.parent),
                                 "Check the path, or put the file there.")
    f = open_safetensors(path)
    wanted = list(f.keys()) if keys is None else [k for k in keys if k in f.keys()]
    out = {}
    try:
        for k in wanted:
            out[k] = f.get_tensor(k)
    except Exception as e:
        out.clear()  # drop what was read: a half-read file must not stay in memory through the traceback
        raise damaged_file_error(path, f"reading tensor {k!r} failed: {e}") from e
    return out


def read_under_prefix(path: str | os.PathLike, find_prefix: Callable[[list[str]], str],
                      keep: Callable[[str], bool] | None = None, extra: tuple[str, ...] = (),
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One model's tensors inside a (sharded) file or folder, reading nothing else.

    `find_prefix(all keys)` picks the model's key prefix (and raises, naming what the file looks like, when
    there is none); keys under it that pass `keep(key)` are read with the prefix stripped. `extra` names
    tensors read as they are when present (an embedded tokenizer). Returns (state dict, {extra key: tensor}).
    """
    per_file = {f: list_keys(f) for f in weight_files(path)}
    prefix = find_prefix([k for ks in per_file.values() for k in ks])
    sd: dict[str, torch.Tensor] = {}
    found: dict[str, torch.Tensor] = {}
    for f, ks in per_file.items():
        wanted = [k for k in ks if k.startswith(prefix) and k not in extra and (keep is None or keep(k))]
        for k, v in read_safetensors(f, wanted + [k for k in extra if k in ks]).items():
            if k in extra:
                found[k] = v
            else:
                sd[k[len(prefix):]] = v
    return sd, found


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The free-form `__metadata__` of a safetensors file ({} when absent)."""
    return dict(open_safetensors(Path(path)).metadata() or {})


def list_keys(path: str | os.PathLike) -> list[str]:
    """Tensor names in a safetensors file (or in every shard of a folder) without reading any data."""
    return [k for f in weight_files(path) for k in open_safetensors(f).keys()]


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files behind `path`: the file itself, or every shard of a HF-style folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise missing_file_error(path.name, f"folder {path.parent}", _folder_names(path.parent),
                                 "Check the path, or put the file there.")
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
    if len(files) > 1 and not all(_SHARD.search(f.name) for f in files):
        # e.g. model.safetensors next to a single-file copy: reading both would merge two models' tensors
        raise ModelFileError(
            f"{path} holds {len(files)} weight files ({', '.join(f.name for f in files)}) and no "
            f"*.safetensors.index.json saying they are shards of one model. Refusing to guess: keep one of them "
            f"in the folder (move the others away), or point at the file you want instead of the folder.")
    return files


_SHARD = re.compile(r"-\d{5}-of-\d{5}\.(safetensors|sft)$")  # model-00001-of-00002.safetensors


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a whole state dict from a file or a (sharded) folder onto the CPU.

    `.pth/.pt/.bin/.ckpt` files are read with `torch.load(weights_only=True)`, which refuses to run code.
    """
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        if f.suffix in (".safetensors", ".sft"):
            out.update(read_safetensors(f))
        elif f.suffix in WEIGHT_SUFFIXES:
            try:
                sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise _refused_pickle(f, e) from e
            if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                sd = sd["state_dict"]
            out.update({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})
        else:
            raise ModelFileError(f"{f}: unsupported weight file type {f.suffix!r}; expected .safetensors.")
    return out


def _refused_pickle(path: Path, exc: Exception) -> ModelFileError:
    """The error for a `.pth/.ckpt/...` that `torch.load(weights_only=True)` refused or could not read."""
    text = str(exc)
    if "Weights only load failed" in text:
        what = next((ln.strip() for ln in text.splitlines() if "WeightsUnpickler error" in ln), "code in the pickle")
        return ModelFileError(f"{path} is a pickle checkpoint that needs code to load ({what}). It was refused and "
                              f"nothing in it was run: model files are read as data only. Use a .safetensors file.")
    return ModelFileError(f"{path} is damaged: it cannot be read as a weights-only checkpoint ({text.splitlines()[0]}). "
                          f"Re-download it, or use a .safetensors file.")


def describe_state_dict(keys: Iterable[str]) -> str:
    """A short guess at what a checkpoint is, from its key names only (for "this is not the model you think" errors).

    Knows NewBie / Lumina-2 DiTs, FLUX and SD3 transformers (original and diffusers layouts), SD/SDXL UNets,
    VAEs, Gemma 3 / other LLMs, T5, CLIP and Jina text encoders, and LoRA files.
    """
    keys = list(keys)
    ks = set(keys)

    def has(*subs: str) -> bool:
        return any(sub in k for k in keys for sub in subs)
    if has(".lora_A.", ".lora_B.", "lora_up.", "lora_down.", "lora_unet_", "lora_te_"):
        return "a LoRA (low-rank adapter weights, not a full model)"
    if has("cap_embedder.1.weight") and has("clip_text_pooled_proj"):
        return "a NewBie-image DiT"
    if has("cap_embedder.1.weight") or has("time_caption_embed.caption_embedder"):
        return "a Lumina-2 style Next-DiT without NewBie's CLIP projection (Lumina Image 2.0 / NetaYume?)"
    if has("double_blocks.") and has("single_blocks."):
        return "a FLUX transformer"
    if has("single_transformer_blocks."):
        return "a FLUX transformer (diffusers layout)"
    if has("input_blocks.") and has("label_emb"):
        return "an SDXL UNet checkpoint"
    if has("input_blocks.") or has("down_blocks.0.attentions.0.transformer_blocks"):
        return "a Stable Diffusion UNet checkpoint"
    if has("joint_blocks.") or (has("transformer_blocks.") and has("pos_embed.") and has("context_embedder")):
        return "an SD3 transformer"
    if has("decoder.up.") or has("decoder.up_blocks.") or has("encoder.down."):
        return "a VAE"
    if has("self_attn.q_proj") and (has("pre_feedforward_layernorm") or has("q_norm")):
        return "a Gemma-3 text model"
    if has("mixer.Wqkv") or has("emb_ln"):
        return "a Jina CLIP / XLM-RoBERTa text model"
    if has("SelfAttention.q.weight") or has("encoder.block.0.layer.0"):
        return "a T5 text encoder"
    if has("text_model.encoder.layers") or has("transformer.resblocks"):
        return "a CLIP text encoder"
    if has("self_attn.q_proj"):
        return "a Llama/Qwen-style language model (not Gemma 3)"
    if "spiece_model" in ks:
        return "a text encoder with an embedded tokenizer"
    return f"an unrecognised checkpoint ({len(keys)} tensors, e.g. {', '.join(sorted(keys)[:3])})"


_FINGERPRINT_MAX_FILES = 256
_FINGERPRINT_MAX_HEADER = 16 * 1024**2


def content_fingerprint(path: str | os.PathLike) -> str:
    """A cheap content fingerprint of a model file or folder: for each file, its size, mtime_ns and (safetensors)
    a hash of its header bytes (tensor names, dtypes, shapes, offsets, metadata); for a folder, every file in it
    (at most 256, sorted; config and tokenizer files included). Reads no tensor data: microseconds to a few ms.

    Taken when a model is LOADED and put into the embedding-cache identity, and returned by the loader nodes'
    `fingerprint_inputs`, so a file replaced under the same name is never served stale. Raises OSError when
    `path` cannot be read."""
    import hashlib

    root = Path(path)
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())[:_FINGERPRINT_MAX_FILES]
    if not files:
        raise FileNotFoundError(str(root))
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root) if f != root else f.name}|{st.st_size}|{st.st_mtime_ns}|".encode())
        if f.suffix in (".safetensors", ".sft") and st.st_size >= 8:
            with open(f, "rb") as fh:
                head = fh.read(8)
                n = int.from_bytes(head, "little")
                h.update(head + fh.read(min(n, _FINGERPRINT_MAX_HEADER)))
    return h.hexdigest()[:32]


def fingerprint_or_none(path: str | os.PathLike | None) -> str | None:
    """`content_fingerprint(path)`, or None when there is no path or it cannot be read."""
    if path is None:
        return None
    try:
        return content_fingerprint(path)
    except OSError:
        return None


def loaded_fingerprint(staged, path: str | os.PathLike | None) -> str | None:
    """The fingerprint a loaded model carries (taken when it was read), else that of `path` now (not loaded yet)."""
    fp = getattr(staged, "fingerprint", None)
    return fp if fp is not None else fingerprint_or_none(path)

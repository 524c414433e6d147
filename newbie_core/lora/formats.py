"""Reading LoRA / LyCORIS files: safetensors only, grouped per adapted module, with the alpha source found.

A file is read into `LoraFile`: one `Module` per adapted layer (its name as written in the file, its kind —
lora, lokr, loha or diff — and its tensors) and the scale rule's inputs. Key families understood:

- PEFT (the official NewBie trainer, LoRA mode): `base_model.model.<module>.lora_A.weight` / `lora_B.weight`;
- LyCORIS (the official trainer, LoKr mode, and others): `lycoris_<module with _>.lokr_w1|w2[_a|_b]`,
  `.hada_w1_a…` (LoHa), `.lora_up/.lora_down`, each with an optional `.alpha`;
- kohya / ComfyUI: `lora_unet_<module with _>.lora_up.weight` / `lora_down.weight` / `.alpha`,
  `diffusion_model.<module>.lora_A/B` or `lora_up/down`;
- diffusers: `transformer.<diffusers module>.lora_A/B` (split `attn.to_q/to_k/to_v`).

Alpha, in this order: a module's `.alpha` tensor; the safetensors metadata (`lora_alpha`, `ss_network_alpha`);
an `adapter_config.json` beside the file (or in the folder holding `adapter_model.safetensors`); else none
(scale 1, i.e. alpha = rank). Pickle files (.pt/.ckpt/.bin) are refused: they can run code when loaded.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelFileError
from ..files import open_safetensors

# Tensor-name suffix → (adapter kind, tensor role). Longest first so `.lokr_w1_a` wins over `.lokr_w1`.
_SUFFIXES = [
    (".lora_A.weight", "lora", "down"), (".lora_B.weight", "lora", "up"),
    (".lora_down.weight", "lora", "down"), (".lora_up.weight", "lora", "up"),
    (".lora.down.weight", "lora", "down"), (".lora.up.weight", "lora", "up"),
    (".lokr_w1_a", "lokr", "w1_a"), (".lokr_w1_b", "lokr", "w1_b"), (".lokr_w2_a", "lokr", "w2_a"),
    (".lokr_w2_b", "lokr", "w2_b"), (".lokr_w1", "lokr", "w1"), (".lokr_w2", "lokr", "w2"),
    (".lokr_t2", "lokr", "t2"),
    (".hada_w1_a", "loha", "w1_a"), (".hada_w1_b", "loha", "w1_b"), (".hada_w2_a", "loha", "w2_a"),
    (".hada_w2_b", "loha", "w2_b"), (".hada_t1", "loha", "t1"), (".hada_t2", "loha", "t2"),
    (".diff", "diff", "diff"),
    (".alpha", None, "alpha"), (".dora_scale", None, "dora_scale"), (".lora_mid.weight", None, "mid"),
]
# Module-name prefixes, longest first: (prefix, family, dotted?).
PREFIXES = [
    ("base_model.model.transformer.", "PEFT", True), ("base_model.model.", "PEFT", True),
    ("model.diffusion_model.", "ComfyUI", True), ("diffusion_model.", "ComfyUI", True),
    ("transformer.", "diffusers", True), ("unet.", "diffusers", True),
    ("lycoris_", "LyCORIS", False), ("lora_unet_", "kohya", False), ("lora_transformer_", "OneTrainer", False),
]
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")


@dataclass
class Module:
    """One adapted layer as stored: `name` without its prefix, `kind` (lora/lokr/loha/diff), `tensors` by role,
    `alpha` (None when the file has no `.alpha` for it), the original key stem and any unusable roles."""

    name: str
    dotted: bool
    kind: str | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: float | None = None
    stem: str = ""
    unsupported: list[str] = field(default_factory=list)


@dataclass
class LoraFile:
    """A LoRA/LyCORIS file read from disk: its modules, the family its prefixes show, the fallback alpha."""

    path: str
    modules: list[Module]
    family: str
    metadata: dict[str, str]
    alpha: float | None = None        # file-wide alpha (metadata or adapter_config.json), or None
    alpha_source: str = ""            # where `alpha` came from
    rslora: bool = False              # PEFT use_rslora: scale = alpha / sqrt(r)
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # PEFT per-module alphas (adapter_config.json)
    stray_keys: list[str] = field(default_factory=list)  # tensors matching no known suffix


def split_key(key: str) -> tuple[str, str | None, str] | None:
    """(module stem, kind, role) of a tensor name, or None when the suffix is unknown."""
    for suffix, kind, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], kind, role
    return None


def strip_prefix(stem: str) -> tuple[str, str, bool]:
    """(module name, family, dotted) with the known prefix removed; ('', 'unknown', True) keeps the stem."""
    for prefix, family, dotted in PREFIXES:
        if stem.startswith(prefix):
            return stem[len(prefix):], family, dotted
    return stem, "plain", True


def _find_file(path: Path) -> tuple[Path, Path | None]:
    """(safetensors file, adapter_config.json or None) for a file or a PEFT adapter folder."""
    if path.is_dir():
        cand = path / "adapter_model.safetensors"
        if not cand.is_file():
            found = sorted(path.glob("*.safetensors"))
            if len(found) != 1:
                raise ModelFileError(f"LoRA folder {path} holds no adapter_model.safetensors "
                                     f"({len(found)} other .safetensors files). Point at the LoRA file itself.")
            cand = found[0]
        path = cand
    if not path.is_file():
        raise ModelFileError(f"LoRA file {path} does not exist. Put the .safetensors file in models/loras "
                             f"(ComfyUI) or pass its full path.")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelFileError(f"LoRA file {path} is a pickle ({path.suffix}); pickles can run code when loaded, so "
                             f"only .safetensors LoRAs are read. Convert it to safetensors first.")
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ModelFileError(f"LoRA file {path} is not a .safetensors file; only safetensors LoRAs are read.")
    cfg = path.parent / "adapter_config.json"
    return path, (cfg if cfg.is_file() else None)


def _float(meta: dict, *names: str) -> float | None:
    for n in names:
        if n in meta:
            try:
                return float(meta[n])
            except (TypeError, ValueError):
                continue
    return None


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA / LyCORIS safetensors file (or PEFT adapter folder) into a `LoraFile` on the CPU."""
    file, cfg_path = _find_file(Path(path))
    sf = open_safetensors(file)
    meta = dict(sf.metadata() or {})
    modules: dict[str, Module] = {}
    stray, families = [], []
    for key in sf.keys():
        parts = split_key(key)
        if parts is None:
            stray.append(key)
            continue
        stem, kind, role = parts
        mod = modules.get(stem)
        if mod is None:
            name, family, dotted = strip_prefix(stem)
            families.append(family)
            mod = modules[stem] = Module(name=name, dotted=dotted, stem=stem)
        t = sf.get_tensor(key)
        if role == "alpha":
            mod.alpha = float(t.float().reshape(-1)[0])
        elif kind is None or role in ("t1", "t2"):
            mod.unsupported.append(key)
        else:
            if mod.kind not in (None, kind):
                mod.unsupported.append(key)
                continue
            mod.kind = kind
            mod.tensors[role] = t
    alpha, source, rslora, pattern = None, "", False, {}
    meta_alpha = _float(meta, "lora_alpha", "ss_network_alpha", "alpha")
    if meta_alpha is not None:
        alpha, source = meta_alpha, f"safetensors metadata (alpha {meta_alpha:g})"
    elif cfg_path is not None:
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise ModelFileError(f"{cfg_path} beside LoRA {file} is not valid JSON ({e}).") from e
        if cfg.get("lora_alpha") is not None:
            alpha = float(cfg["lora_alpha"])
            source = f"{cfg_path.name} (lora_alpha {alpha:g}, r {cfg.get('r')})"
        rslora = bool(cfg.get("use_rslora", False))
        pattern = {str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()}
    rslora = rslora or str(meta.get("use_rslora", "")).lower() == "true"
    family = max(set(families), key=families.count) if families else "unknown"
    return LoraFile(str(file), list(modules.values()), family, meta, alpha, source, rslora=rslora,
                    alpha_pattern=pattern, stray_keys=stray)


def pattern_alpha(lora: LoraFile, module: str) -> float | None:
    """The PEFT `alpha_pattern` entry for a module name (PEFT's rule: the pattern matches a name suffix)."""
    for pattern, alpha in lora.alpha_pattern.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return alpha
    return None


def looks_like(keys: list[str]) -> str:
    """A short guess at which model family a LoRA's key names belong to (for the no-match error)."""
    text = " ".join(keys[:400])

    def has(*subs: str) -> bool:
        return any(s in text for s in subs)
    if has("lora_te1_", "lora_te2_", "input_blocks", "down_blocks", "up_blocks", "middle_block", "mid_block"):
        return "an SD1.5/SDXL LoRA (UNet/CLIP keys such as lora_unet_down_blocks_…)"
    if has("double_blocks", "single_blocks", "single_transformer_blocks"):
        return "a FLUX LoRA"
    if has("joint_blocks"):
        return "an SD3 LoRA"
    if has("transformer_blocks", "img_mlp", "txt_mlp"):
        return "a Qwen-Image / HiDream / SD3-style transformer LoRA"
    if has("blocks.") and has("self_attn", "cross_attn"):
        return "a video-model (Wan / Hunyuan) LoRA"
    if has("lora_te_", "text_model", "self_attn"):
        return "a text-encoder LoRA"
    if re.search(r"layers[._]\d+[._](attention|feed_forward|attn)", text):
        return "a Next-DiT (Lumina-2 / NewBie) LoRA whose layer names do not exist in this model"
    return "no known LoRA family" if keys else "an empty file"

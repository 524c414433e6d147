"""NewBie DiT checkpoint key layouts (spec §2) and the DiT config inferred from tensor shapes.

Layouts:
- official / HF `transformer/diffusion_pytorch_model.safetensors`: the keys of `NextDiT`, no prefix;
- ComfyUI: the same keys under `model.diffusion_model.` (an all-in-one file may also hold
  `text_encoders.*` and `vae.*`; only the DiT part is taken);
- diffusers (`Lumina2Transformer2DModel` + pooled projection): `layers.0.attn.to_q.weight` etc., with the
  fused qkv split into to_q / to_k / to_v and `norm_final` dropped.

RoPE axes are not stored in real files. Rule used by `dit_config_from_state_dict` (unless the file's
safetensors metadata carries `newbie.axes_dims` / `newbie.axes_lens` / `newbie.rope_theta`):
axes 1 and 2 get `2·ceil(head_dim/6)` each, axis 0 the rest — 96 → [32,32,32] (the official model),
16 → [4,6,6] (the tiny test model); axes_lens [1024,512,512], theta 1e4.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from .dit_config import DiTConfig
from .errors import ModelFileError
from .files import (describe_state_dict, list_keys, read_safetensors, read_state_dict, require_exists,
                    safetensors_metadata, weight_files)

COMFY_PREFIX = "model.diffusion_model."
_OTHER_PREFIXES = ("diffusion_model.",)
EXPECTED = ("NewBie-Image-Exp0.1.safetensors from NewBie-AI/NewBie-image-Exp0.1 "
            "(transformer/diffusion_pytorch_model.safetensors)")
DIFFUSERS_MARKER = "layers.0.attn.to_q.weight"
BLOCK_GROUPS = ("layers", "noise_refiner", "context_refiner")

# (official, diffusers) key pairs; per-block suffixes, then top-level prefixes.
_BLOCK_MAP = [
    ("attention.out.", "attn.to_out.0."),
    ("attention.q_norm.", "attn.norm_q."),
    ("attention.k_norm.", "attn.norm_k."),
    ("feed_forward.w1.", "feed_forward.linear_1."),
    ("feed_forward.w2.", "feed_forward.linear_2."),
    ("feed_forward.w3.", "feed_forward.linear_3."),
    ("adaLN_modulation.1.", "norm1.linear."),
    ("attention_norm1.", "norm1.norm."),
    ("attention_norm2.", "norm2."),
    ("ffn_norm1.", "ffn_norm1."),
    ("ffn_norm2.", "ffn_norm2."),
]
_TOP_MAP = [
    ("cap_embedder.", "time_caption_embed.caption_embedder."),
    ("t_embedder.mlp.0.", "time_caption_embed.timestep_embedder.linear_1."),
    ("t_embedder.mlp.2.", "time_caption_embed.timestep_embedder.linear_2."),
    ("clip_text_pooled_proj.", "time_caption_embed.clip_text_pooled_proj."),
    ("time_text_embed.", "time_caption_embed.time_text_embed."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear_1."),
    ("final_layer.linear.", "norm_out.linear_2."),
    ("x_embedder.", "x_embedder."),
]
_BLOCK_RE = re.compile(r"^(layers|noise_refiner|context_refiner)\.(\d+)\.(.*)$")
NEWBIE_REQUIRED = ("x_embedder.weight", "cap_embedder.1.weight", "layers.0.attention.qkv.weight",
                   "clip_text_pooled_proj.1.weight", "time_text_embed.1.weight", "final_layer.linear.weight")


def detect_layout(keys) -> str | None:
    """'comfyui' (prefixed), 'diffusers', 'official', or None when no DiT keys are recognised."""
    keys = set(keys)
    if any(k.startswith(COMFY_PREFIX) for k in keys):
        return "comfyui"
    if DIFFUSERS_MARKER in keys:
        return "diffusers"
    if "x_embedder.weight" in keys or "layers.0.attention.qkv.weight" in keys:
        return "official"
    return None


def _swap(key: str, table, src: int) -> str | None:
    for pair in table:
        if key.startswith(pair[src]):
            return pair[1 - src] + key[len(pair[src]):]
    return None


def official_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys → diffusers keys (qkv split by `attention.out` width; `norm_final` dropped)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k == "norm_final.weight":
            continue
        m = _BLOCK_RE.match(k)
        if m:
            group, i, rest = m.groups()
            pre = f"{group}.{i}."
            if rest == "attention.qkv.weight":
                q_rows = sd[f"{pre}attention.out.weight"].shape[1]
                kv_rows = (v.shape[0] - q_rows) // 2
                q, kk, vv = v.split([q_rows, kv_rows, kv_rows], dim=0)
                out.update({f"{pre}attn.to_q.weight": q, f"{pre}attn.to_k.weight": kk, f"{pre}attn.to_v.weight": vv})
                continue
            if group == "context_refiner" and rest.startswith("attention_norm1."):
                new = "norm1." + rest[len("attention_norm1."):]
            else:
                new = _swap(rest, _BLOCK_MAP, 0)
            if new is None:
                raise ModelFileError(f"Unknown DiT key {k!r}: cannot convert it to the diffusers layout.")
            out[pre + new] = v
            continue
        new = _swap(k, _TOP_MAP, 0)
        if new is None:
            raise ModelFileError(f"Unknown DiT key {k!r}: cannot convert it to the diffusers layout.")
        out[new] = v
    return out


def diffusers_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers keys → official keys (to_q/k/v concatenated into qkv; `norm_final` left to the caller)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        m = _BLOCK_RE.match(k)
        if m:
            group, i, rest = m.groups()
            pre = f"{group}.{i}."
            if rest in ("attn.to_k.weight", "attn.to_v.weight"):
                continue
            if rest == "attn.to_q.weight":
                out[f"{pre}attention.qkv.weight"] = torch.cat(
                    [v, sd[f"{pre}attn.to_k.weight"], sd[f"{pre}attn.to_v.weight"]], dim=0)
                continue
            new = "attention_norm1." + rest[len("norm1."):] if rest == "norm1.weight" else _swap(rest, _BLOCK_MAP, 1)
            out[pre + (new if new is not None else rest)] = v
            continue
        new = _swap(k, _TOP_MAP, 1)
        out[new if new is not None else k] = v
    return out


def official_to_comfyui(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys → ComfyUI keys (`model.diffusion_model.` prefix)."""
    return {COMFY_PREFIX + k: v for k, v in sd.items()}


def _not_newbie(keys, source: str) -> ModelFileError:
    keys = list(keys)
    what = describe_state_dict(keys) if keys else "an empty checkpoint (no DiT tensors)"
    return ModelFileError(f"{source} is not a NewBie-image DiT: it looks like {what}. "
                          f"Expected {EXPECTED}.")


def _lumina_error(source: str) -> ModelFileError:
    return ModelFileError(
        f"{source} looks like a Lumina Image 2.0 style Next-DiT (e.g. Lumina-Image-2.0 / NetaYume): it has no "
        f"CLIP pooled projection (clip_text_pooled_proj / time_text_embed), so it is not NewBie-image-Exp0.1. "
        f"Expected {EXPECTED}.")


def check_dit_keys(keys, source: str = "state dict") -> None:
    """Raise ModelFileError (what the file looks like, what was expected) when the key names alone show that
    a checkpoint is no NewBie DiT. Header-only: called before any tensor is read, so a wrong 6 GB file costs
    nothing. Files that pass are checked in full by `to_official`."""
    keys = list(keys)
    stripped = {k[len(COMFY_PREFIX):] if k.startswith(COMFY_PREFIX) else k for k in keys}
    stripped |= {k[len(p):] for k in keys for p in _OTHER_PREFIXES if k.startswith(p)}
    if not any(m in stripped for m in ("x_embedder.weight", "layers.0.attention.qkv.weight", DIFFUSERS_MARKER)):
        raise _not_newbie(keys, source)
    has_cap = "cap_embedder.1.weight" in stripped or "time_caption_embed.caption_embedder.1.weight" in stripped
    clip = ("time_text_embed.", "time_caption_embed.time_text_embed.")
    if has_cap and not any("clip_text_pooled_proj" in k or k.startswith(clip) for k in stripped):
        raise _lumina_error(source)


def to_official(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """Any supported layout → official keys, validated as a NewBie DiT (raises ModelFileError otherwise).

    Takes only the `model.diffusion_model.` part of ComfyUI (all-in-one) files; converts diffusers keys;
    adds the unused `norm_final.weight` (ones) when a layout dropped it.
    """
    original = list(sd.keys())
    layout = detect_layout(original)
    if layout == "comfyui":
        sd = {k[len(COMFY_PREFIX):]: v for k, v in sd.items() if k.startswith(COMFY_PREFIX)}
    else:
        for pre in _OTHER_PREFIXES:
            if any(k.startswith(pre + "x_embedder.") for k in sd):
                sd = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
                break
    if DIFFUSERS_MARKER in sd:
        sd = diffusers_to_official(sd)
    sd = dict(sd)
    if "cap_embedder.1.weight" in sd and not ("clip_text_pooled_proj.1.weight" in sd or "time_text_embed.1.weight" in sd):
        raise _lumina_error(source)
    missing = [k for k in NEWBIE_REQUIRED if k not in sd]
    if missing:
        if not sd or "x_embedder.weight" not in sd:
            raise _not_newbie(original, source)
        raise ModelFileError(f"{source} is an incomplete NewBie DiT: missing {', '.join(missing[:5])}. "
                             f"Re-download {EXPECTED}.")
    if "norm_final.weight" not in sd:
        w = sd["cap_embedder.1.weight"]
        sd["norm_final.weight"] = torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
    return sd


def default_axes_dims(head_dim: int) -> list[int]:
    """RoPE axis widths for a head width (module docstring rule): 96 → [32,32,32], 16 → [4,6,6]."""
    d12 = 2 * math.ceil(head_dim / 6)
    d0 = head_dim - 2 * d12
    if head_dim % 2 or d0 <= 0:
        raise ModelFileError(f"Cannot split head width {head_dim} into 3 even RoPE axes.")
    return [d0, d12, d12]


def _count(sd, group: str) -> int:
    idx = {int(m.group(2)) for k in sd if (m := _BLOCK_RE.match(k)) and m.group(1) == group}
    return max(idx) + 1 if idx else 0


def dit_config_from_state_dict(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                               in_channels: int = 16):
    """The `DiTConfig` implied by tensor shapes (spec §2 "Config from shapes"); `sd` in any layout.

    The patch size comes from `x_embedder` width / `in_channels` (16, the FLUX latent). RoPE settings
    come from `metadata` (`newbie.axes_dims` etc., written by the tiny-model writer) or the module rule.
    """

    if DIFFUSERS_MARKER in sd or any(k.startswith(COMFY_PREFIX) for k in sd):
        sd = to_official(sd)
    try:
        dim, cap_feat_dim = sd["cap_embedder.1.weight"].shape
        p2c = sd["x_embedder.weight"].shape[1]
        head_dim = sd["layers.0.attention.q_norm.weight"].shape[0]
        qkv_rows = sd["layers.0.attention.qkv.weight"].shape[0]
        ffn = sd["layers.0.feed_forward.w1.weight"].shape[0]
        adaln = sd["layers.0.adaLN_modulation.1.weight"].shape[1]
        clip_dim = sd["clip_text_pooled_proj.0.weight"].shape[0]
        out_rows = sd["final_layer.linear.weight"].shape[0]
    except KeyError as e:
        raise ModelFileError(f"NewBie DiT state dict lacks {e.args[0]!r}; cannot infer its config. "
                             f"Expected {EXPECTED}.") from e
    except (ValueError, IndexError, TypeError):  # a tensor of the wrong rank where a matrix belongs
        shapes = {k: tuple(sd[k].shape) for k in ("cap_embedder.1.weight", "x_embedder.weight") if k in sd}
        raise ModelFileError(f"NewBie DiT tensors have impossible shapes ({shapes}); the file is damaged or not a "
                             f"NewBie DiT. Expected {EXPECTED}.") from None
    if min(dim, cap_feat_dim, p2c, head_dim, qkv_rows, ffn, adaln, clip_dim, out_rows) <= 0 or dim % head_dim:
        raise ModelFileError(f"NewBie DiT tensors have impossible shapes (width {dim}, head width {head_dim}); the "
                             f"file is damaged. Expected {EXPECTED}.")
    patch = math.isqrt(p2c // in_channels)
    n_heads = dim // head_dim
    n_kv = (qkv_rows // head_dim - n_heads) // 2
    n_noise, n_ctx = _count(sd, "noise_refiner"), _count(sd, "context_refiner")
    if patch * patch * in_channels != p2c or out_rows != p2c or n_noise != n_ctx:
        raise ModelFileError(f"Unsupported DiT shapes: x_embedder width {p2c}, final width {out_rows}, "
                             f"{n_noise} noise / {n_ctx} context refiner blocks.")
    from .validate import metadata_value

    meta = metadata or {}
    # Optional metadata (written by make-tiny): unparsable or inconsistent values fall back to the defaults.
    ints3 = lambda v: isinstance(v, list) and len(v) == 3 and all(isinstance(i, int) and 0 < i <= 1 << 20 for i in v)
    axes_dims = metadata_value(meta, "newbie.axes_dims", None,
                               lambda v: ints3(v) and sum(v) == head_dim and all(i % 2 == 0 for i in v)) \
        or default_axes_dims(head_dim)
    axes_lens = metadata_value(meta, "newbie.axes_lens", [1024, 512, 512], ints3)
    theta = metadata_value(meta, "newbie.rope_theta", 10000.0, lambda v: math.isfinite(v) and v > 1.0, parse=float)
    return DiTConfig(patch_size=patch, in_channels=in_channels, dim=dim, n_layers=_count(sd, "layers"),
                     n_refiner_layers=n_noise, n_heads=n_heads, n_kv_heads=n_kv, ffn_hidden_dim=ffn,
                     cap_feat_dim=cap_feat_dim, clip_text_dim=clip_dim, adaln_dim=adaln,
                     axes_dims=axes_dims, axes_lens=axes_lens, rope_theta=theta)


def check_keys(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
    """Raise ModelFileError listing a few missing / unexpected keys of `sd` (official layout) for `model`, or naming
    a tensor whose shape or dtype (int8, bool, …) does not fit the architecture (before `load_state_dict`)."""
    from .validate import check_state_dict

    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        raise ModelFileError(f"{source} does not match the NewBie DiT layout: {'; '.join(parts)} keys. "
                             f"Expected {EXPECTED}.")
    check_state_dict(model, sd, source)


def read_dit_state_dict(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """Read the DiT tensors behind a file or folder: (state dict, safetensors metadata, display name).

    A folder may be the HF NewBie root (its `transformer/` is used) or a (sharded) weights folder.
    From a file holding `model.diffusion_model.*` keys only those tensors are read (all-in-one files).
    """
    path = Path(source)
    require_exists(path, "the DiT", f"Expected {EXPECTED}.")
    if path.is_dir() and (path / "transformer").is_dir():
        path = path / "transformer"
    files = weight_files(path)
    name = str(path)
    st = [f for f in files if f.suffix in (".safetensors", ".sft")]
    if len(st) != len(files):
        return read_state_dict(path), {}, name
    keys = list_keys(path)
    check_dit_keys(keys, name)  # a wrong file is refused from its header, before any tensor is read
    want = [k for k in keys if k.startswith(COMFY_PREFIX)] or None
    sd: dict[str, torch.Tensor] = {}
    for f in st:
        sd.update(read_safetensors(f, want))
    if not sd:
        raise _not_newbie(keys, name)
    return sd, safetensors_metadata(st[0]), name

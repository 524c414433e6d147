"""Tiny random-weight NewBie DiT in the three real key layouts (HF/official, ComfyUI, diffusers).

The tiny config keeps every structural feature of the real model: GQA (4 query / 2 KV heads), q/k norm,
3-axis RoPE (head_dim 16 → axes [4,6,6], recovered by `dit_config_from_state_dict`'s rule), refiners
(1 noise + 1 context, so the inferred count differs from the full model's 2), caption / CLIP widths of
the tiny Gemma / Jina. Weights are seeded and scaled so that gates and modulation are clearly non-zero.
Files are written in fp32 (CPU tests run in fp32) without RoPE metadata, like the real files.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import COMFY_DIT_NAME, TINY_GEMMA_HIDDEN, TINY_JINA_HIDDEN
from ..dit import DiTConfig, NextDiT

TINY_DIT_CONFIG = DiTConfig(
    patch_size=2, in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=2,
    ffn_hidden_dim=DiTConfig.ffn_hidden(64, multiple_of=16), norm_eps=1e-5,
    cap_feat_dim=TINY_GEMMA_HIDDEN, clip_text_dim=TINY_JINA_HIDDEN, adaln_dim=min(64, 1024),
    axes_dims=(4, 6, 6), axes_lens=(1024, 512, 512), rope_theta=10000.0,
)


def tiny_dit_state_dict(seed: int = 0, config: DiTConfig = TINY_DIT_CONFIG) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights with official keys: Linear W ~ N(0, 1/fan_in), biases N(0, 0.05²),
    norm weights 1 + N(0, 0.1²). Deterministic for a given seed (keys are generated in sorted order)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in NextDiT(config, device="meta").state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for k in sorted(shapes):
        shape = shapes[k]
        r = torch.randn(shape, generator=g, dtype=torch.float32)
        if len(shape) == 2:
            sd[k] = r / shape[1] ** 0.5
        elif k.endswith(".bias"):
            sd[k] = r * 0.05
        else:
            sd[k] = 1.0 + 0.1 * r
    return sd


def hf_transformer_config(config: DiTConfig = TINY_DIT_CONFIG) -> dict:
    """A `transformer/config.json` in the spirit of the HF NewBie folder (informational only)."""
    return {"_class_name": "NextDiT_CLIP", "patch_size": config.patch_size, "in_channels": config.in_channels,
            "dim": config.dim, "n_layers": config.n_layers, "n_refiner_layers": config.n_refiner_layers,
            "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "norm_eps": config.norm_eps,
            "qk_norm": True, "cap_feat_dim": config.cap_feat_dim, "clip_text_dim": config.clip_text_dim,
            "axes_dims": list(config.axes_dims), "axes_lens": list(config.axes_lens)}


def write_tiny_dit(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny DiT under `root` in three layouts; returns {"dit_hf", "dit_comfyui", "dit_diffusers"}.

    - `root/hf/transformer/diffusion_pytorch_model.safetensors` (+ config.json): official keys;
    - `root/comfyui/diffusion_models/NewBie-Image-Exp0.1.safetensors`: `model.diffusion_model.` prefix;
    - `root/diffusers/transformer/diffusion_pytorch_model.safetensors`: diffusers keys.
    """
    from safetensors.torch import save_file

    from ..checkpoints import official_to_comfyui, official_to_diffusers

    root = Path(root)
    sd = tiny_dit_state_dict(seed)
    out = {
        "dit_hf": root / "hf" / "transformer" / "diffusion_pytorch_model.safetensors",
        "dit_comfyui": root / "comfyui" / "diffusion_models" / COMFY_DIT_NAME,
        "dit_diffusers": root / "diffusers" / "transformer" / "diffusion_pytorch_model.safetensors",
    }
    layouts = {"dit_hf": sd, "dit_comfyui": official_to_comfyui(sd), "dit_diffusers": official_to_diffusers(sd)}
    for name, path in out.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in layouts[name].items()}, str(path), metadata={"format": "pt"})
    (out["dit_hf"].parent / "config.json").write_text(json.dumps(hf_transformer_config(), indent=2))
    return out

"""Tiny FLUX-like VAE (test-environment §4): seeded random weights in the diffusers and the BFL file layouts.

Same architecture family as the FLUX.1-dev VAE (16 latent channels, 4 down/up blocks = ×8, mid attention,
no quant convs) at 86k parameters, so a 64×64 image encodes to (1, 16, 8, 8).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..vae import LATENT_SCALE, LATENT_SHIFT, NORM_GROUPS_METADATA_KEY, diffusers_to_bfl_vae

TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": LATENT_SCALE,
    "shift_factor": LATENT_SHIFT,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}


def build_tiny_vae(seed: int = 3):
    """The tiny AutoencoderKL (fp32) with weights drawn from a private generator seeded with `seed`.

    Conv/linear weights are N(0, 1/fan_in) (activations stay O(1)); norm scales 1 + N(0, 0.1²); biases N(0, 0.02²).
    """
    from diffusers import AutoencoderKL

    model = AutoencoderKL.from_config(TINY_VAE_CONFIG)
    gen = torch.Generator("cpu").manual_seed(int(seed))
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            else:
                fan_in = math.prod(p.shape[1:]) if p.ndim > 1 else p.shape[0]
                p.copy_(noise / math.sqrt(fan_in))
    return model.eval().requires_grad_(False)


def write_tiny_vae(root: str | Path, seed: int = 3) -> dict[str, Path]:
    """Write the tiny VAE as `root/hf/vae/` (diffusers save_pretrained, safetensors) and as
    `root/comfyui/vae/ae.safetensors` (BFL key names; `norm_num_groups` in the metadata).

    Returns {"vae_hf": folder, "vae_comfyui": file}.
    """
    from safetensors.torch import save_file

    from . import COMFY_VAE_NAME

    root = Path(root)
    model = build_tiny_vae(seed)
    hf_dir = root / "hf" / "vae"
    hf_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(hf_dir, safe_serialization=True)

    comfy_file = root / "comfyui" / "vae" / COMFY_VAE_NAME
    comfy_file.parent.mkdir(parents=True, exist_ok=True)
    bfl = {k: v.detach().contiguous().clone() for k, v in diffusers_to_bfl_vae(model.state_dict()).items()}
    save_file(bfl, str(comfy_file), metadata={"format": "pt", NORM_GROUPS_METADATA_KEY: str(TINY_VAE_CONFIG["norm_num_groups"])})
    return {"vae_hf": hf_dir, "vae_comfyui": comfy_file}

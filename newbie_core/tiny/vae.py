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


FLUX_ARCH_SUBDIR = "flux_architecture_random"


def write_flux_architecture_vae(root: str | Path, seed: int = 0) -> dict[str, Path]:
    """`make-tiny --flux-vae`: a VAE with the exact FLUX.1-dev architecture (block_out_channels 128/256/512/512,
    2 layers per block, 32 norm groups, 16 latent channels; 83.8 M parameters) and seeded random weights, in BFL
    key names and bf16 (168 MB, a few seconds), as `root/comfyui/vae/flux_architecture_random/ae.safetensors`.

    ComfyUI's core Load VAE builds the full FLUX architecture whatever the file holds, so it cannot read the tiny
    VAE; this file lets the interop workflow (core VAE nodes) run end to end without the real 335 MB download.
    Returns {"vae_flux_arch": file}."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    config = dict(TINY_VAE_CONFIG, block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
                  sample_size=1024)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoencoderKL.from_config(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("bias"):
            sd[key] = torch.zeros(shape, dtype=torch.bfloat16)
        elif "norm" in key and key.endswith("weight"):
            sd[key] = torch.ones(shape, dtype=torch.bfloat16)
        else:  # N(0, 1/fan_in): activations stay O(1) through the 30-odd layers
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            sd[key] = (torch.randn(shape, generator=gen) / math.sqrt(fan_in)).to(torch.bfloat16)
    path = Path(root) / "comfyui" / "vae" / FLUX_ARCH_SUBDIR / "ae.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in diffusers_to_bfl_vae(sd).items()}, str(path))
    return {"vae_flux_arch": path}

"""`newbie make-tiny`: a complete set of tiny random-weight models in the real file layouts.

Tests and the no-weights demo use only this path. Each family has its own writer module; this module
fixes the shared widths (the DiT's caption/CLIP widths must match the tiny encoders) and lays out:

    ROOT/hf/                    the HF NewBie-image-Exp0.1 folder layout
        transformer/            DiT, official keys (no prefix) + config.json
        text_encoder/           Gemma3 (HF layout, with tokenizer files)
        clip_model/             Jina CLIP v2 (HF layout, LoRA tensors unmerged, with tokenizer files)
        vae/                    FLUX VAE, diffusers layout
    ROOT/diffusers/transformer/ DiT in diffusers (Lumina2Transformer2DModel-style) keys
    ROOT/comfyui/               ComfyUI models/ folder: single files under the names users download
        diffusion_models/NewBie-Image-Exp0.1.safetensors      (model.diffusion_model. prefix)
        text_encoders/gemma_3_4b_it_bf16.safetensors          (with embedded tokenizer)
        text_encoders/jina_clip_v2_bf16.safetensors           (LoRA pre-merged)
        vae/ae.safetensors                                    (BFL key names)
        loras/newbie_example_lokr.safetensors                 (a LyCORIS LoKr, official trainer layout)
        vae/flux_architecture_random/ae.safetensors           (only with flux_vae=True / --flux-vae:
                                                               full FLUX architecture, random, for core Load VAE)
"""
from __future__ import annotations

from pathlib import Path

# Widths shared between the tiny encoders and the tiny DiT.
TINY_GEMMA_HIDDEN = 64  # = DiT cap_feat_dim
TINY_JINA_HIDDEN = 32  # = DiT clip_text_dim

# File names users download (also used by the bundled workflows and the integration tests).
COMFY_DIT_NAME = "NewBie-Image-Exp0.1.safetensors"
COMFY_GEMMA_NAME = "gemma_3_4b_it_bf16.safetensors"
COMFY_JINA_NAME = "jina_clip_v2_bf16.safetensors"
COMFY_VAE_NAME = "ae.safetensors"
COMFY_LORA_NAME = "newbie_example_lokr.safetensors"  # the bundled LoRA workflow's placeholder for a user's LoRA


def make_tiny(root: str | Path, seed: int = 0, flux_vae: bool = False) -> dict[str, Path]:
    """Write every tiny model under `root` (see the module docstring) and return {name: path}.

    `flux_vae`: also write a random VAE of the full FLUX architecture (168 MB) as
    comfyui/vae/flux_architecture_random/ae.safetensors, for ComfyUI's core Load VAE (interop workflow)."""
    from .dit import write_tiny_dit
    from .text import write_tiny_gemma, write_tiny_jina
    from .vae import write_tiny_vae

    root = Path(root)
    paths: dict[str, Path] = {}
    paths.update(write_tiny_dit(root, seed=seed))
    paths.update(write_tiny_gemma(root, seed=seed + 1))
    paths.update(write_tiny_jina(root, seed=seed + 2))
    paths.update(write_tiny_vae(root, seed=seed + 3))
    from .lora import write_tiny_lora

    paths["lora_comfyui"] = write_tiny_lora(root / "comfyui" / "loras" / COMFY_LORA_NAME, "lokr", alpha=8.0, seed=seed + 4)
    if flux_vae:
        from .vae import write_flux_architecture_vae

        paths.update(write_flux_architecture_vae(root, seed=seed + 5))
    return paths

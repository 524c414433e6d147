"""Model files in ComfyUI's layout for the in-ComfyUI benchmark: random full-size weights (DiT, Gemma3-4B, Jina v2
text tower, FLUX VAE) or, in quick mode, the tiny test models, written under the names the bundled workflows
use (models/diffusion_models, models/text_encoders, models/vae). The same writer serves both sizes, so the quick
mode checks the layout the GPU run relies on.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from newbie_core.tiny import COMFY_DIT_NAME, COMFY_GEMMA_NAME, COMFY_JINA_NAME, COMFY_VAE_NAME, make_tiny


def jina_comfy_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`JinaEmbeddingsV3Model` parameter names → ComfyUI's single-file (remote-code) names: the inverse of
    `newbie_core.text.jina.to_hf_names` (q/k/v fused back into `mixer.Wqkv`)."""
    import re

    out, qkv = {}, {}
    sub = {"self_attn.o_proj.": "mixer.out_proj.", "post_attention_layernorm.": "norm1.",
           "post_mlp_layernorm.": "norm2.", "mlp.": "mlp."}
    for k, v in sd.items():
        m = re.match(r"layers\.(\d+)\.(.*)", k)
        if k.startswith("embeddings.LayerNorm."):
            out["emb_ln." + k[len("embeddings.LayerNorm."):]] = v
        elif m and m.group(2).startswith("self_attn.") and m.group(2).split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            _, proj, leaf = m.group(2).split(".", 2)
            qkv.setdefault((m.group(1), leaf), {})[proj] = v
        elif m:
            rest = m.group(2)
            new = next((n + rest[len(o):] for o, n in sub.items() if rest.startswith(o)), rest)
            out[f"encoder.layers.{m.group(1)}.{new}"] = v
        else:
            out[k] = v
    for (i, leaf), parts in qkv.items():
        out[f"encoder.layers.{i}.mixer.Wqkv.{leaf}"] = torch.cat([parts[p] for p in ("q_proj", "k_proj", "v_proj")])
    return out


def model_files(models_dir: Path, quick: bool, device: torch.device) -> dict[str, Path]:
    """Write (once; kept when present) the four files under `models_dir`; returns {role: path}."""
    from newbie_core.bench.models import build_models
    from newbie_core.tiny.vae import NORM_GROUPS_METADATA_KEY
    from newbie_core.vae import diffusers_to_bfl_vae

    paths = {"dit": models_dir / "diffusion_models" / COMFY_DIT_NAME,
             "gemma": models_dir / "text_encoders" / COMFY_GEMMA_NAME,
             "jina": models_dir / "text_encoders" / COMFY_JINA_NAME, "vae": models_dir / "vae" / COMFY_VAE_NAME}
    if all(p.is_file() for p in paths.values()):
        return paths
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    models, tiny_paths = build_models(device, quick)
    tiny = make_tiny(models_dir / "_tiny")  # tokenizer blobs (spiece_model) of the ComfyUI single files
    spiece = {r: load_file(str(tiny[f"{r}_comfyui"]))["spiece_model"] for r in ("gemma", "jina")}

    def sd(module):
        return {k: v.detach().contiguous() for k, v in module.state_dict().items()}

    save_file(sd(models["dit"][1]), str(paths["dit"]))
    for role in ("gemma", "jina"):
        tensors = sd(models[role][1])
        single = {"model." + k: v for k, v in (jina_comfy_names(tensors) if role == "jina" else tensors).items()}
        single["spiece_model"] = spiece[role]
        save_file(single, str(paths[role]))
    vae = models["vae"][1]
    save_file({k: v.contiguous() for k, v in diffusers_to_bfl_vae(sd(vae)).items()}, str(paths["vae"]),
              metadata={"format": "pt", NORM_GROUPS_METADATA_KEY: str(vae.config.norm_num_groups)})
    del models
    return paths

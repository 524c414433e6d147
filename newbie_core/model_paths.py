"""Where the four models of a NewBie set live: found from one folder, or given one by one."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFileError

# (role, HF subfolder, ComfyUI models/ subfolder, ComfyUI file-name hints)
_ROLES = (
    ("dit", "transformer", "diffusion_models", ("newbie",)),
    ("gemma", "text_encoder", "text_encoders", ("gemma",)),
    ("jina", "clip_model", "text_encoders", ("jina",)),
    ("vae", "vae", "vae", ("ae.", "flux", "vae")),
)


@dataclass
class ModelPaths:
    """Paths (file or folder) of the DiT, Gemma3, Jina CLIP v2 and VAE weights."""

    dit: Path
    gemma: Path
    jina: Path
    vae: Path

    @classmethod
    def from_dir(cls, root: str | Path) -> "ModelPaths":
        """Find the four models under `root`.

        Accepted: the HF NewBie-image-Exp0.1 folder (transformer/, text_encoder/, clip_model/, vae/); a ComfyUI
        `models/` folder (diffusion_models/, text_encoders/, vae/ with the usual file names); or a `newbie
        make-tiny` output folder (its hf/ subfolder).
        """
        root = Path(root)
        if not root.is_dir():
            raise ModelFileError(f"Model folder not found: {root}.")
        if (root / "hf" / "transformer").is_dir():
            root = root / "hf"
        found: dict[str, Path] = {}
        for role, hf_sub, comfy_sub, hints in _ROLES:
            # HF subfolders; `vae/` exists in both layouts, so only a diffusers config marks it as HF
            is_hf = (root / hf_sub / "config.json").is_file() if role == "vae" else (root / hf_sub).is_dir()
            if is_hf:
                found[role] = root / hf_sub
                continue
            folder = root / comfy_sub
            files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
            match = [f for f in files if any(h in f.name.lower() for h in hints)]
            if match:
                found[role] = match[0]
        missing = [r for r, *_ in _ROLES if r not in found]
        if missing:
            raise ModelFileError(
                f"{root} is missing the {', '.join(missing)} model(s). Expected the HF NewBie-image-Exp0.1 layout "
                f"(transformer/, text_encoder/, clip_model/, vae/) or a ComfyUI models/ folder "
                f"(diffusion_models/NewBie-Image-Exp0.1.safetensors, text_encoders/gemma_3_4b_it_bf16.safetensors, "
                f"text_encoders/jina_clip_v2_bf16.safetensors, vae/ae.safetensors)."
            )
        return cls(**found)

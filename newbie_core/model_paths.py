"""Where the four models of a NewBie set live: found from one folder, or given one by one."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ModelFileError

# (role, HF subfolder, ComfyUI models/ subfolders in the order ComfyUI lists them, file/folder-name hints).
# Besides today's names (diffusion_models/, text_encoders/) ComfyUI still maps the legacy `unet/` and `clip/`
# folders to the same kinds, and guides for NewBie's own and older ComfyUI nodes put the DiT there (or an
# all-in-one file in checkpoints/) and the text encoders there, as files or as HF folders (gemma-3-4b-it/,
# jina-clip-v2/).
_ROLES = (
    ("dit", "transformer", ("diffusion_models", "unet", "checkpoints"), ("newbie",)),
    ("gemma", "text_encoder", ("text_encoders", "clip"), ("gemma",)),
    ("jina", "clip_model", ("text_encoders", "clip"), ("jina",)),
    ("vae", "vae", ("vae",), ("flux", "ae.", "vae")),
)
_WEIGHTS = (".safetensors", ".sft")
JINA_MAX_LENGTHS = {512: "the HF pipeline's value (default)", 2048: "the official demo's value"}


def _rank(name: str, hints: tuple[str, ...]) -> int | None:
    """How well a file/folder name fits a role: the index of the first hint it contains (lower = better)."""
    low = name.lower()
    if low == "ae.safetensors":  # the FLUX VAE's own file name beats every other VAE in vae/
        return -1
    return next((i for i, h in enumerate(hints) if h in low), None)


def _candidates(root: Path, folders: tuple[str, ...], hints: tuple[str, ...]) -> list[Path]:
    """Weight files (and HF folders with config.json) in the ComfyUI `folders` that fit the role best."""
    ranked: dict[Path, tuple[int, Path]] = {}
    for sub in folders:
        folder = root / sub
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            is_model = (entry.is_file() and entry.suffix.lower() in _WEIGHTS) or (entry / "config.json").is_file()
            rank = _rank(entry.name, hints) if is_model else None
            if rank is not None:
                ranked.setdefault(entry.resolve(), (rank, entry))  # a symlinked copy is the same model
    if not ranked:
        return []
    best = min(r for r, _ in ranked.values())
    return [p for r, p in ranked.values() if r == best]


def _ambiguous(role: str, found: list[Path]) -> ModelFileError:
    names = ", ".join(str(p) for p in found)
    return ModelFileError(
        f"More than one {role} model fits in this models folder: {names}. Refusing to guess which one to load: "
        f"pass --{role} with the one you want (the rest of --model-dir still applies), or move the others away.")


@dataclass
class ModelPaths:
    """Paths (file or folder) of the DiT, Gemma3, Jina CLIP v2 and VAE weights.

    `jina_max_length` travels with them as the one loading option of the text encoders: the Jina token limit
    (512 as in the HF pipeline, or 2048 as in the official demo; see JINA_MAX_LENGTHS).
    """

    dit: Path
    gemma: Path
    jina: Path
    vae: Path
    jina_max_length: int = 512

    @classmethod
    def from_dir(cls, root: str | Path, given: dict[str, Path] | None = None) -> "ModelPaths":
        """Find the four models under `root`.

        Accepted: the HF NewBie-image-Exp0.1 folder (transformer/, text_encoder/, clip_model/, vae/); a ComfyUI
        `models/` folder (diffusion_models/ or unet/ or checkpoints/, text_encoders/ or clip/, vae/; single files
        with the usual names, or HF folders such as text_encoders/gemma-3-4b-it/); or a `newbie make-tiny` output
        folder (its hf/ subfolder). Two files that fit one role equally well are refused, naming both.
        `given` {role: path} overrides (and skips the search for) those roles, as the CLI's --dit etc. do.
        """
        root = Path(root)
        if not root.is_dir():
            raise ModelFileError(f"Model folder not found: {root}.")
        if (root / "hf" / "transformer").is_dir():
            root = root / "hf"
        found: dict[str, Path] = {r: Path(p) for r, p in (given or {}).items()}
        for role, hf_sub, comfy_subs, hints in _ROLES:
            if role in found:
                continue
            # HF subfolders; `vae/` exists in both layouts, so only a diffusers config marks it as HF
            is_hf = (root / hf_sub / "config.json").is_file() if role == "vae" else (root / hf_sub).is_dir()
            if is_hf:
                found[role] = root / hf_sub
                continue
            match = _candidates(root, comfy_subs, hints)
            if len(match) > 1:
                raise _ambiguous(role, match)
            if match:
                found[role] = match[0]
        missing = [r for r, *_ in _ROLES if r not in found]
        if missing:
            raise ModelFileError(
                f"{root} is missing the {', '.join(missing)} model(s). Expected the HF NewBie-image-Exp0.1 layout "
                f"(transformer/, text_encoder/, clip_model/, vae/) or a ComfyUI models/ folder "
                f"(diffusion_models/NewBie-Image-Exp0.1.safetensors, text_encoders/gemma_3_4b_it_bf16.safetensors, "
                f"text_encoders/jina_clip_v2_bf16.safetensors, vae/ae.safetensors; unet/ and clip/ work too)."
            )
        return cls(**found)

"""The pack's own socket types and the values that travel through them."""
from __future__ import annotations

from dataclasses import dataclass

from comfy_api.latest import io

NEWBIE_TEXT_ENCODERS = io.Custom("NEWBIE_TEXT_ENCODERS")
NEWBIE_VAE = io.Custom("NEWBIE_VAE")


@dataclass
class TextEncoders:
    """Gemma3 + Jina CLIP v2 wrappers (newbie_core) and the ComfyUI patchers that place them on a device."""

    gemma: object
    jina: object
    gemma_patcher: object
    jina_patcher: object
    precision: str
    files: tuple[str, str]
    fingerprints: tuple = ()  # content fingerprints taken when loaded (newbie_core.files.content_fingerprint)


@dataclass
class LoadedVAE:
    """The FLUX VAE wrapper (newbie_core) and its ComfyUI patcher."""

    vae: object
    patcher: object
    precision: str

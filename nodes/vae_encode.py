"""NewBie VAE Encode: IMAGE → LATENT (unscaled FLUX latents) with a chosen precision, tiled on request and
automatically after OOM. For img2img, inpainting (with Set Latent Noise Mask) and hires-fix."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..newbie_core import stages
from ..newbie_core.precision import parse_precision
from . import _comfy
from .types import NEWBIE_VAE


class NewBieVAEEncode(io.ComfyNode):
    """Encode images with the NewBie (FLUX) VAE."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieVAEEncode", display_name="NewBie VAE Encode", category="NewBie/latent",
            description="Encodes IMAGE to LATENT (unscaled FLUX latents, the posterior mean, as core VAE Encode) "
                        "for NewBie DiT Sampler with denoise < 1. The image is centre-cropped to a multiple of "
                        "16 px. Falls back to tiled encoding automatically when the full encode runs out of memory.",
            inputs=[
                NEWBIE_VAE.Input("vae", tooltip="From NewBie VAE Loader."),
                io.Image.Input("pixels", tooltip="Images to start from (Load Image, a decoded image, ...)."),
                io.Combo.Input("precision", options=["auto", "bf16", "fp32"], default="auto",
                               tooltip="auto: the loader's precision. fp32: slower, exact."),
                io.Boolean.Input("tiled", default=False,
                                 tooltip="Encode in 512 px tiles (much less memory, slightly slower)."),
            ],
            outputs=[io.Latent.Output(tooltip="Unscaled FLUX latents (LATENT) for NewBie DiT Sampler or core "
                                              "latent nodes (Set Latent Noise Mask, Upscale Latent).")],
        )

    @classmethod
    def execute(cls, vae, pixels, precision, tiled) -> io.NodeOutput:
        name = vae.precision if precision == "auto" else precision
        prec = parse_precision(name, "vae", vae.patcher.load_device)
        host = _comfy.ComfyHost(vae=vae, vae_precision=prec)
        latents, used_tiled = stages.encode_image(host, pixels[..., :3].movedim(-1, 1), tiled)
        note = f"encoded {tuple(latents.shape[-2:])} latents in {prec.name}" + (
            "; tiled" if tiled else "; out of memory → encoded in tiles" if used_tiled else "")
        return io.NodeOutput({"samples": latents}, ui=ui.PreviewText(note))

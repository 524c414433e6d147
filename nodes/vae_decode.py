"""NewBie VAE Decode: LATENT → IMAGE with a chosen precision, tiled on request and automatically after OOM."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..newbie_core import stages
from ..newbie_core.precision import parse_precision
from ..newbie_core.validate import check_latent
from . import _comfy
from .types import NEWBIE_VAE


class NewBieVAEDecode(io.ComfyNode):
    """Decode FLUX latents with the NewBie VAE."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieVAEDecode", display_name="NewBie VAE Decode", category="NewBie/latent",
            description="Decodes LATENT (unscaled FLUX latents, as core nodes use) to IMAGE. Falls back to tiled "
                        "decoding automatically when the full decode runs out of memory.",
            inputs=[
                NEWBIE_VAE.Input("vae", tooltip="From NewBie VAE Loader."),
                io.Latent.Input("samples", tooltip="From NewBie DiT Sampler (or any FLUX-latent LATENT)."),
                io.Combo.Input("precision", options=["auto", "bf16", "fp32"], default="auto",
                               tooltip="auto: the loader's precision. fp32: slower, no bf16 banding."),
                io.Boolean.Input("tiled", default=False,
                                 tooltip="Decode in 512 px tiles (much less memory, slightly slower)."),
            ],
            outputs=[io.Image.Output(tooltip="Decoded images for Save Image / Preview Image.")],
        )

    @classmethod
    def execute(cls, vae, samples, precision, tiled) -> io.NodeOutput:
        name = vae.precision if precision == "auto" else precision
        prec = parse_precision(name, "vae", vae.patcher.load_device)
        latents = check_latent(samples.get("samples") if isinstance(samples, dict) else None, "samples", 16)
        host = _comfy.ComfyHost(vae=vae, vae_precision=prec)
        images, used_tiled = stages.decode(host, latents, tiled)
        out = images.permute(0, 2, 3, 1)
        note = f"decoded {tuple(out.shape[1:3])} in {prec.name}" + (
            "; tiled" if tiled else "; out of memory → decoded in tiles" if used_tiled else "")
        return io.NodeOutput(out, ui=ui.PreviewText(note))

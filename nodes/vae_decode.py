"""NewBie VAE Decode: LATENT → IMAGE with a chosen precision, tiled on request and automatically after OOM."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..newbie_core.precision import check_finite, parse_precision
from ..newbie_core.vae import scale_latents
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
        try:
            latents = check_latent(samples.get("samples") if isinstance(samples, dict) else None, "samples", 16)
            out, used_tiled = run_decode(vae, latents, prec, tiled)
        except BaseException as e:  # OOM even in small tiles, NaN, cancel: free it all; OOM → unload + hint
            _comfy.fail_cleanly(e, "VAE decode", vae.patcher.load_device)
            raise
        note = f"decoded {tuple(out.shape[1:3])} in {prec.name}" + (
            "; tiled" if tiled else "; out of memory → decoded in tiles" if used_tiled else "")
        return io.NodeOutput(out, ui=ui.PreviewText(note))


def run_decode(vae, samples, prec, tiled: bool):
    """Decode (tiled on request; after an out-of-memory in a full decode automatically) and check for NaN/inf.
    Returns (IMAGE [B,H,W,3] on the intermediate device, whether tiles were used)."""
    _comfy.recast(vae.patcher, vae.vae.model, prec)
    _comfy.load_to_device([vae.patcher], full=True)
    latents = scale_latents(samples.float()).to(vae.patcher.load_device, prec.compute)
    if tiled:
        images, used_tiled = vae.vae.decode(latents, tiled=True), True
    else:
        images, used_tiled = vae.vae.decode_with_fallback(latents)
    check_finite(images, "VAE decode", prec)
    return images.float().permute(0, 2, 3, 1).to(_comfy.intermediate_device()), used_tiled

"""NewBie DiT Sampler: the official flow-matching sampler (euler / midpoint / dpm++ 2M, CFG with cfg_trunc and
renorm) on the NewBie MODEL; progress, previews and cancel every step; outputs a core LATENT."""
from __future__ import annotations

from comfy_api.latest import io

from ..newbie_core import stages
from ..newbie_core.errors import InputError
from ..newbie_core.sampling import SOLVERS
from ..newbie_core.vae import VAE_SCALE_FACTOR
from ..newbie_core.validate import MAX_BATCH, check_int, check_latent, check_number, check_sampler_settings
from . import _comfy
from .text_encode import from_conditioning


class NewBieDiTSampler(io.ComfyNode):
    """Sample NewBie latents with the official sampler settings."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieDiTSampler", display_name="NewBie DiT Sampler", category="NewBie/sampling",
            description="Official NewBie sampling (t: 0 noise → 1 data, velocity prediction, fp32 ODE state). "
                        "Outputs unscaled VAE latents, so core VAE Decode works too.",
            inputs=[
                io.Model.Input("model", tooltip="From NewBie DiT Loader."),
                io.Conditioning.Input("positive", tooltip="From NewBie Text Encode."),
                io.Conditioning.Input("negative", tooltip="From NewBie Text Encode."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed (CPU generator: the same picture on any device)."),
                io.Int.Input("steps", default=18, min=2, max=200,
                             tooltip="Time-grid points as in the official demo: N points = N−1 intervals; euler "
                                     "runs the model N−1 times, midpoint 2(N−1), dpmpp_2m N."),
                io.Float.Input("cfg", default=5.0, min=1.0, max=30.0, step=0.1, tooltip="Guidance scale."),
                io.Float.Input("shift", default=6.0, min=0.1, max=30.0, step=0.1,
                               tooltip="Time shift (6 = official)."),
                io.Combo.Input("solver", options=list(SOLVERS), default="midpoint",
                               tooltip="; ".join(f"{k}: {v.description}" for k, v in SOLVERS.items()) + "."),
                io.Float.Input("cfg_trunc", default=0.25, min=0.0, max=100.0, step=0.01,
                               tooltip="Guide only while t < cfg_trunc (t: 0 = noise). 0.25 = demo (first ~2/3 "
                                       "of the steps guided; later steps run without the negative: faster). "
                                       "≥ 1 guides every step."),
                io.Float.Input("renorm", default=0.0, min=0.0, max=10.0, step=0.05,
                               tooltip="If > 0, cap the guided velocity's norm at renorm × the positive's."),
                io.Int.Input("width", default=1024, min=16, max=4096, step=16, tooltip="Multiple of 16."),
                io.Int.Input("height", default=1024, min=16, max=4096, step=16, tooltip="Multiple of 16."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per run."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional: take width, height and batch from this latent instead; with "
                                        "denoise < 1 start from its image (img2img), and honour its noise_mask "
                                        "(inpainting) and batch_index."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="As core KSampler: the fraction of the schedule that runs, starting from the "
                                       "latent's image. 1 = from pure noise; 0.3-0.6 = img2img / hires-fix."),
                io.Boolean.Input("keep_loaded", default=False, optional=True,
                                 tooltip="Keep the DiT on the GPU after sampling (ComfyUI evicts it when it needs "
                                         "the memory): the next prompt skips its upload, but VAE decoding then "
                                         "runs beside it (basic graph, bf16: 9.1 GiB peak instead of ~7.2). Off: "
                                         "released after sampling as in the CLI, re-uploaded from a pinned copy "
                                         "per prompt."),
            ],
            outputs=[io.Latent.Output(tooltip="Unscaled FLUX latents (LATENT), for NewBie or core VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, seed, steps, cfg, shift, solver, cfg_trunc, renorm, width,
                height, batch_size, latent=None, denoise=1.0, keep_loaded=False) -> io.NodeOutput:
        check_sampler_settings(steps, cfg, shift, cfg_trunc, renorm, solver)  # NaN/inf, unknown solver: named
        check_int(batch_size, "batch_size", 1, MAX_BATCH)
        check_number(denoise, "denoise", 0.0, 1.0)
        if latent is not None:
            batch_size, _, lh, lw = check_latent(latent.get("samples") if isinstance(latent, dict) else None).shape
            height, width = lh * VAE_SCALE_FACTOR, lw * VAE_SCALE_FACTOR
        if not isinstance(getattr(model.model, "diffusion_model", None), _comfy.ComfyNewBieDiT):
            raise InputError("This MODEL is not a NewBie DiT: load NewBie-Image-Exp0.1 with NewBie DiT Loader "
                             "and connect that to the sampler.")
        cond, uncond = from_conditioning(positive, "positive"), from_conditioning(negative, "negative")
        settings = stages.GenerationSettings(width=width, height=height, steps=steps, cfg=cfg, shift=shift,
                                             solver=solver, cfg_trunc=cfg_trunc, renorm=renorm, seed=seed,
                                             batch=batch_size, denoise=denoise)
        host = _comfy.ComfyHost(model=model, keep_loaded=keep_loaded)
        samples = stages.sample(host, cond, uncond, settings, latent=latent)
        return io.NodeOutput({"samples": samples})

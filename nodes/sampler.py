"""NewBie DiT Sampler: the official flow-matching sampler (euler / midpoint / dpm++ 2M, CFG with cfg_trunc and
renorm) on the NewBie MODEL; progress, previews and cancel every step; outputs a core LATENT."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..newbie_core.errors import InputError
from ..newbie_core.precision import check_finite
from ..newbie_core.pipeline import check_conditioning, guided_velocity
from ..newbie_core.sampling import SOLVERS, make_noise, sample, validate_size
from ..newbie_core.validate import MAX_BATCH, check_int, check_latent, check_sampler_settings
from ..newbie_core.vae import LATENT_CHANNELS, VAE_SCALE_FACTOR, unscale_latents
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
                               tooltip="midpoint: official demo (2 evaluations per step); euler: 1; dpmpp_2m: "
                                       "DPM-Solver++ 2M as the official 'dpm'."),
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
                                tooltip="Optional: take width, height and batch from this latent instead."),
            ],
            outputs=[io.Latent.Output(tooltip="Unscaled FLUX latents (LATENT), for NewBie or core VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, seed, steps, cfg, shift, solver, cfg_trunc, renorm, width,
                height, batch_size, latent=None) -> io.NodeOutput:
        check_sampler_settings(steps, cfg, shift, cfg_trunc, renorm, solver)  # NaN/inf, unknown solver: named
        check_int(batch_size, "batch_size", 1, MAX_BATCH)
        if latent is not None:
            batch_size, _, lh, lw = check_latent(latent.get("samples") if isinstance(latent, dict) else None).shape
            height, width = lh * VAE_SCALE_FACTOR, lw * VAE_SCALE_FACTOR
        validate_size(width, height)
        cond, uncond = from_conditioning(positive, "positive"), from_conditioning(negative, "negative")
        b, h, w = batch_size, height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR

        dm = getattr(model.model, "diffusion_model", None)
        if not isinstance(dm, _comfy.ComfyNewBieDiT):
            raise InputError("This MODEL is not a NewBie DiT: load NewBie-Image-Exp0.1 with NewBie DiT Loader "
                             "and connect that to the sampler.")
        dm.check_size(h, w)
        check_conditioning(dm.config, cond, uncond)  # text encoders of another width: say so before loading
        try:
            samples = run_sampler(model, dm, cond, uncond, (seed, b, h, w), steps, cfg, shift, solver, cfg_trunc,
                                  renorm)
        except BaseException as e:  # OOM, cancel, NaN: free everything the run holds; OOM → unload + hint
            _comfy.fail_cleanly(e, "DiT sampling", model.load_device)
            raise
        return io.NodeOutput({"samples": samples})


def run_sampler(model, dm, cond, uncond, shape, steps, cfg, shift, solver, cfg_trunc, renorm) -> torch.Tensor:
    """Seeded noise of `shape` (seed, batch, latent h, latent w) → load the DiT through ComfyUI, sample, check for
    NaN/inf; unscaled latents on the intermediate device.

    Its own frame on purpose: when it fails, every tensor of the run is one of its locals, which the caller's
    clean-up frees at once (newbie_core.recovery)."""
    seed, b, h, w = shape
    noise = make_noise(seed, b, h, w, LATENT_CHANNELS)
    _comfy.load_to_device([model], memory_required=activation_bytes(dm, b, h, w, cond, uncond))
    device, compute = model.load_device, dm.compute_dtype or torch.bfloat16
    forward = compiled_velocity(dm) if model.model_options.get("newbie_compile") else dm.velocity
    guided = guided_velocity(forward, dm, cond, uncond, b, device, compute, h, w, cfg, cfg_trunc, renorm)
    intervals = steps if solver == "dpmpp_2m" else steps - 1
    on_step = _comfy.sampler_progress(model, intervals)
    x = sample(guided, noise.to(device), steps, solver, shift, callback=on_step)
    check_finite(x, "DiT sampling", model.model_options.get("newbie_precision"))
    return unscale_latents(x.float()).to(_comfy.intermediate_device())


def activation_bytes(dm, b: int, h: int, w: int, cond, uncond) -> int:
    """Rough activation memory for a CFG step, for ComfyUI's eviction decision (weights are counted by it)."""
    tokens = 2 * b * (max(cond.cap_feats.shape[1], uncond.cap_feats.shape[1]) + (h // 2) * (w // 2))
    return int(tokens * dm.config.dim * 2 * 12)


def compiled_velocity(dm):
    """torch.compile of the DiT's official forward, built once per model (static shapes, no host syncs)."""
    if getattr(dm, "_newbie_compiled", None) is None:
        dm._newbie_compiled = torch.compile(dm.velocity, dynamic=False)
    return dm._newbie_compiled


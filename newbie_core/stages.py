"""The three stages, written once for every host: text encoding, DiT sampling, VAE decoding.

    embs, cached = encode(host, cache, [positive, negative], system_prompt)
    latents = sample(host, cond, uncond, GenerationSettings(...))     # unscaled FLUX latents (core LATENT)
    images, used_tiles = decode(host, latents, tiled=False)           # [B,3,H,W] in [0,1]

A `host.Host` places each model role on its device for the stage (the CLI's StagedModel or ComfyUI's
ModelPatcher), reports progress and cancels, and turns a failure into the host's message. Stage boundaries
carry the same tensors in both hosts — embeddings on the CPU, unscaled latents, images in [0,1] — so the same
settings give the same image bit for bit whichever host ran them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .errors import ModelFileError
from .img2img import crop_to_multiple, sampler_start
from .precision import check_finite
from .sampling import GuidedVelocity, StepInfo, intervals
from .sizes import validate_size
from .sampling import sample as integrate
from .text.encode import PromptEmbeddings, concat_embeddings, encode_cached
from .vae import VAE_SCALE_FACTOR, scale_latents, unscale_latents


@dataclass
class GenerationSettings:
    """Sampling settings. Defaults follow the official demo.py (18 grid points, midpoint, CFG 5, shift 6).

    `steps` counts grid points as in the official code: N steps → N−1 intervals; euler evaluates the model
    once per interval, midpoint twice (`sampling.SOLVERS`). `cfg_trunc`: guidance only while t < cfg_trunc
    (t: 0 noise → 1 data); ≥ 1 guides every step. `renorm` > 0 caps the guided velocity's norm at renorm × the
    cond velocity's norm.
    """

    width: int = 1024
    height: int = 1024
    steps: int = 18
    cfg: float = 5.0
    shift: float = 6.0
    solver: str = "midpoint"
    cfg_trunc: float = 0.25
    renorm: float = 0.0
    seed: int = 0
    batch: int = 1
    denoise: float = 1.0  # img2img (ComfyUI's meaning, see sampling.sample); 1 = from pure noise


# ------------------------------------------------------------------------------------------------- text
def encode(host, cache, prompts: list[str], system_prompt: str) -> tuple[list[PromptEmbeddings], int]:
    """Encode `prompts` (batch 1 each, results on the CPU) through the embedding `cache`; returns
    (embeddings, how many came from the cache). Gemma and Jina are placed one after the other, so they are
    never resident together; the device cache is emptied once, after Jina."""
    try:
        embs, encoded = encode_cached(prompts, system_prompt, cache, host.text_identity(),
                                      lambda: _placed_checked(host, "gemma", clear_cache=False),
                                      lambda: _placed_checked(host, "jina"),
                                      precision=host.precision("gemma"), around=lambda: host.measure("text"))
    except BaseException as e:  # OOM, cancel, NaN: the host frees what the failure holds and explains it
        host.fail("text", e)
    return embs, len(prompts) - encoded


def _placed_checked(host, role: str, clear_cache: bool = True):
    host.check_interrupt()  # a cancel point before each encoder loads
    return host.placed(role, clear_cache=clear_cache)


# ---------------------------------------------------------------------------------------------- sampling
def sample(host, cond: PromptEmbeddings, uncond: PromptEmbeddings, settings: GenerationSettings,
           on_step: Callable[[StepInfo], None] | None = None, latent: dict | None = None) -> torch.Tensor:
    """Sample from seeded CPU noise with the official sampler; returns unscaled latents [B,16,H/8,W/8] (fp32,
    on `host.output_device`), the format of ComfyUI's LATENT. Size, caption width and the DiT's position
    table are checked before the DiT is placed on its device.

    `latent`: a core LATENT dict (unscaled `samples`, optional `noise_mask`, `batch_index`) to start from:
    img2img with `settings.denoise` < 1, inpainting with a mask (`img2img.sampler_start`); its size and batch
    replace the settings'. An all-zero latent only gives the size."""
    if latent is not None:
        b, _, lh, lw = latent["samples"].shape
        settings = replace(settings, batch=b, height=lh * VAE_SCALE_FACTOR, width=lw * VAE_SCALE_FACTOR)
    validate_size(settings.width, settings.height)
    with host.measure("dit") as rec:
        try:
            x = _sample_placed(host, cond, uncond, settings, on_step, latent)
        except BaseException as e:
            host.fail("dit", e)
        if rec is not None:
            rec.notes.append(f"{settings.steps} steps {settings.solver}, cfg {settings.cfg}")
    return x


def _sample_placed(host, cond, uncond, settings: GenerationSettings, on_step, latent: dict | None) -> torch.Tensor:
    # Its own frame: on failure every tensor of the run (noise, embedding copies, latents) is a local here, and
    # the host's `fail` frees them all (recovery.release_failure) before the error leaves the stage.
    b, h, w = settings.batch, settings.height // VAE_SCALE_FACTOR, settings.width // VAE_SCALE_FACTOR
    empty = {"samples": torch.zeros(b, 1, h, w)}  # text-to-image: only the size
    start = sampler_start(latent if latent is not None else empty, settings.seed, settings.denoise)
    noise = start.noise
    dit = host.peek("dit")
    dit.check_size(h, w)
    check_conditioning(dit.config, cond, uncond)  # encoders of another width: say so before loading
    with host.placed("dit", memory_required=activation_bytes(dit.config, b, h, w, cond, uncond)) as dit:
        device, precision = host.device_of("dit"), host.precision("dit")
        velocity = guided_velocity(host.dit_forward(dit), dit, cond, uncond, b, device, precision.compute, h, w,
                                   settings.cfg, settings.cfg_trunc, settings.renorm)
        callback = _chain(host.step_callback(intervals(settings.steps, settings.solver)), on_step)
        x = integrate(velocity, noise.to(device), settings.steps, settings.solver, settings.shift, callback,
                      init=start.init, denoise=settings.denoise, noise_mask=start.noise_mask)
        check_finite(x, "DiT sampling", precision)
        out = unscale_latents(x.float()).cpu()
        if start.noise_mask is not None:  # where nothing is regenerated the input comes back bit for bit
            out = torch.where(start.noise_mask == 0, latent["samples"].float().cpu(), out)
        return out.to(host.output_device)


def _chain(*callbacks):
    callbacks = [c for c in callbacks if c is not None]
    if not callbacks:
        return None

    def call(info: StepInfo) -> None:
        for c in callbacks:
            c(info)
    return call


def guided_velocity(forward: Callable, dit, cond: PromptEmbeddings, uncond: PromptEmbeddings, batch: int,
                    device: torch.device, dtype: torch.dtype, height: int, width: int,
                    cfg: float, cfg_trunc: float, renorm: float) -> GuidedVelocity:
    """The CFG velocity the sampler integrates: the [cond] and [cond; uncond] batches are built, placed on
    `device` in `dtype` and given their DiT layouts (`dit.prepare`, one host sync) once per generation.

    `forward(x, t, cap_feats, cap_mask, pooled, layout=...)` is the DiT's official forward (or a compiled one);
    `height`/`width` are latent sizes. Raises ModelFileError when the embeddings do not fit the DiT.
    """
    check_conditioning(dit.config, cond, uncond)
    batches = {}
    for guided, items in ((False, [cond] * batch), (True, [cond] * batch + [uncond] * batch)):
        emb = concat_embeddings(items)
        mask = emb.cap_mask.to(device)
        batches[guided] = (emb.cap_feats.to(device, dtype), mask, emb.pooled.to(device, dtype),
                           dit.prepare(mask, height, width))

    def model_call(x: torch.Tensor, t: torch.Tensor, guided: bool) -> torch.Tensor:
        feats, mask, pooled, layout = batches[guided]
        return forward(x.to(device, dtype), t.to(device), feats, mask, pooled, layout=layout).float()

    return GuidedVelocity(model_call, cfg, cfg_trunc, renorm)


def check_conditioning(config, *embeddings: PromptEmbeddings) -> None:
    """Raise ModelFileError when prompt embeddings do not fit a DiT `config`: the caption features must be
    `cap_feat_dim` wide (Gemma's hidden size) and the pooled vector `clip_text_dim` wide (Jina's)."""
    for e in embeddings:
        width = int(e.cap_feats.shape[-1])
        if width != config.cap_feat_dim:
            raise ModelFileError(
                f"The prompt features are {width} wide, but this DiT expects {config.cap_feat_dim} (its caption "
                f"width = the hidden size of the Gemma it was trained with; NewBie-Image-Exp0.1: Gemma3-4B-it, 2560). "
                f"The text encoders do not belong to this DiT: load gemma_3_4b_it_bf16.safetensors (or NewBie's "
                f"text_encoder/ folder) in the text encoder loader.")
        pooled = None if e.pooled is None else int(e.pooled.shape[-1])
        if pooled is not None and pooled != config.clip_text_dim:
            raise ModelFileError(
                f"The pooled text vector is {pooled} wide, but this DiT expects {config.clip_text_dim} (Jina CLIP v2: "
                f"1024). The second text encoder does not belong to this DiT: load jina_clip_v2_bf16.safetensors "
                f"(or NewBie's clip_model/ folder).")


def activation_bytes(config, b: int, h: int, w: int, cond: PromptEmbeddings, uncond: PromptEmbeddings) -> int:
    """Rough activation memory of a CFG step (bytes), for a host's eviction decision (weights count apart)."""
    tokens = 2 * b * (max(cond.cap_feats.shape[1], uncond.cap_feats.shape[1]) + (h // 2) * (w // 2))
    return int(tokens * config.dim * 2 * 12)


# -------------------------------------------------------------------------------------------------- VAE
def encode_image(host, images: torch.Tensor, tiled: bool = False) -> tuple[torch.Tensor, bool]:
    """Images [B,3,H,W] in [0,1] (centre-cropped to multiples of 16 px) → unscaled latents (core LATENT
    `samples`, fp32 on `host.output_device`) for img2img. Tiled on request; a full encode that runs out of
    memory is retried in tiles. Returns (latents, used tiles)."""
    with host.measure("vae") as rec:
        try:
            z, used_tiled = _encode_placed(host, crop_to_multiple(images), tiled)
        except BaseException as e:
            host.fail("vae_encode", e)
        if rec is not None:
            rec.notes.append("encode" + (" (tiled)" if used_tiled else ""))
    return z, used_tiled


def _encode_placed(host, images: torch.Tensor, tiled: bool) -> tuple[torch.Tensor, bool]:
    precision = host.precision("vae")
    with host.placed("vae") as vae:
        if tiled:
            z, used_tiled = vae.encode(images, tiled=True), True
        else:
            z, used_tiled = vae.encode_with_fallback(images)
        check_finite(z, "VAE encode", precision)
        return unscale_latents(z.float()).to(host.output_device), used_tiled


def decode(host, latents: torch.Tensor, tiled: bool = False) -> tuple[torch.Tensor, bool]:
    """Decode unscaled latents (core LATENT) to images [B,3,H,W] in [0,1] (fp32, on `host.output_device`).
    Tiled on request; a full decode that runs out of memory is retried in tiles. Returns (images, used tiles)."""
    with host.measure("vae") as rec:
        try:
            images, used_tiled = _decode_placed(host, latents, tiled)
        except BaseException as e:
            host.fail("vae", e)
        if rec is not None and used_tiled:
            rec.notes.append("tiled" if tiled else "out of memory in full decode: decoded in tiles instead")
    return images, used_tiled


def _decode_placed(host, latents: torch.Tensor, tiled: bool) -> tuple[torch.Tensor, bool]:
    precision = host.precision("vae")
    with host.placed("vae") as vae:
        z = scale_latents(latents.float()).to(host.device_of("vae"))  # fp32: the VAE casts after unscaling
        if tiled:
            images, used_tiled = vae.decode(z, tiled=True), True
        else:
            images, used_tiled = vae.decode_with_fallback(z)
        check_finite(images, "VAE decode", precision)
        return images.float().to(host.output_device), used_tiled


# --------------------------------------------------------------------------------------- prompt enhance
def enhance_prompt(host, cache, idea: str, settings, identity: tuple,
                   on_token: Callable[[int, int], None] | None = None, head_on_cpu: bool = False):
    """Prompt enhancement (`text.enhance.enhance`) with the host's Gemma, placed like the text stage and
    released after (unless the host keeps models loaded); a failure is the text stage's (`host.fail`)."""
    from .text.enhance import enhance

    try:
        with host.measure("enhance"):
            return enhance(idea, settings, lambda: _placed_checked(host, "gemma"), identity, cache, on_token,
                           head_on_cpu=head_on_cpu)
    except BaseException as e:  # OOM, cancel: the host frees what the failure holds and explains it
        host.fail("text", e)

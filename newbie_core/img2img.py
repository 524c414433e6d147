"""img2img / inpainting inputs: a LATENT's content, noise_mask and batch_index → what `sampling.sample` takes.

Follows ComfyUI's core KSampler: noise from `torch.manual_seed(seed)` for the whole batch, or per `batch_index`
(one [1,C,H,W] draw per index up to the largest, as `comfy.sample.prepare_noise`); the noise mask resized
bilinearly to the latent size and repeated over channels and batch (`comfy.utils.reshape_mask`); an all-zero
latent of another channel count (core `EmptyLatentImage`, 4 channels) counts as empty, as
`fix_empty_latent_channels` does. Pure PyTorch, no ComfyUI import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import InputError
from .sizes import SIZE_MULTIPLE, VAE_FACTOR
from .vae import LATENT_CHANNELS, scale_latents


@dataclass
class SamplerStart:
    """Where sampling starts: seeded noise, the input latent in model space (None: text-to-image) and the mask."""

    noise: torch.Tensor
    init: Optional[torch.Tensor]
    noise_mask: Optional[torch.Tensor]


def prepare_noise(seed: int, shape: tuple, batch_index: Optional[list] = None) -> torch.Tensor:
    """Seeded fp32 CPU noise of `shape`; with `batch_index` one draw per index (ComfyUI's `prepare_noise`), so
    a latent taken out of a batch (Latent From Batch) gets the same noise it had inside that batch."""
    if isinstance(seed, bool) or int(seed) != seed:
        raise InputError(f"seed must be an integer (got {seed!r}).")
    gen = torch.Generator("cpu").manual_seed(int(seed) % (2**64))
    if not batch_index:
        return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    inds = [int(i) for i in batch_index]
    if len(inds) != shape[0] or min(inds) < 0:
        raise InputError(f"The latent's batch_index {inds} does not fit its batch of {shape[0]}.")
    wanted = sorted(set(inds))
    draws = {}
    for i in range(wanted[-1] + 1):
        noise = torch.randn((1, *shape[1:]), generator=gen, dtype=torch.float32)
        if i in wanted:
            draws[i] = noise
    return torch.cat([draws[i] for i in inds], dim=0)


def prepare_mask(mask: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A noise mask ([H,W], [B,H,W] or [B,1,H,W], any resolution; 1 = regenerate, 0 = keep) resized bilinearly
    to the latent `shape` [B,C,h,w] and repeated over channels and batch (ComfyUI's `reshape_mask`)."""
    if not isinstance(mask, torch.Tensor) or mask.ndim < 2:
        raise InputError("The latent's noise_mask is not a [H,W] / [B,H,W] / [B,1,H,W] tensor.")
    m = mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    m = torch.nn.functional.interpolate(m, size=tuple(shape[2:]), mode="bilinear")
    m = m.repeat(1, shape[1], 1, 1)[:, : shape[1]]
    b = shape[0]
    if m.shape[0] > b:
        m = m[:b]
    elif m.shape[0] < b:
        m = m.repeat(math.ceil(b / m.shape[0]), 1, 1, 1)[:b]
    return m.clamp(0.0, 1.0)


def crop_to_multiple(images: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """Centre-crop images [B,C,H,W] to multiples of `multiple` px (16: what the sampler takes), as core VAE
    Encode crops to multiples of 8. Raises InputError for an image smaller than `multiple`."""
    h, w = images.shape[-2:]
    nh, nw = h // multiple * multiple, w // multiple * multiple
    if nh == 0 or nw == 0:
        raise InputError(f"The image is {w}×{h} px; NewBie needs at least {multiple}×{multiple}.")
    top, left = (h - nh) // 2, (w - nw) // 2
    return images[..., top: top + nh, left: left + nw]


def is_empty(samples: torch.Tensor) -> bool:
    """An all-zero latent (EmptyLatentImage / EmptySD3LatentImage): it gives only a size."""
    return int(torch.count_nonzero(samples)) == 0


def sampler_start(latent: dict, seed: int, denoise: float) -> SamplerStart:
    """From a core LATENT dict (`samples` unscaled FLUX latents [B,16,h,w], optional `noise_mask`,
    `batch_index`): the noise, the input latent in model space, and the mask for `sampling.sample`.

    An all-zero latent without a mask is text-to-image (only its size is used; any channel count). Raises
    InputError for content latents that are not 16-channel FLUX latents and for denoise < 1 on an empty one."""
    samples = latent["samples"]
    if samples.ndim != 4:
        raise InputError(f"The latent has shape {tuple(samples.shape)}; NewBie needs image latents [B,16,h,w].")
    mask, empty = latent.get("noise_mask"), is_empty(samples)
    shape = (samples.shape[0], LATENT_CHANNELS, samples.shape[2], samples.shape[3])
    noise = prepare_noise(seed, shape, latent.get("batch_index"))
    if samples.shape[1] != LATENT_CHANNELS and not empty:
        raise InputError(
            f"The latent has {samples.shape[1]} channels; NewBie works on 16-channel FLUX latents. Encode the "
            f"image with NewBie VAE Encode (or core VAE Encode with the FLUX ae.safetensors VAE).")
    if empty and mask is None:
        if float(denoise) < 1.0:
            raise InputError("denoise < 1 needs an image to start from, but the latent is empty (all zeros, e.g. "
                             "Empty Latent Image). Encode an image with NewBie VAE Encode, or set denoise to 1.")
        return SamplerStart(noise, None, None)
    init = scale_latents(samples.float().cpu()) if samples.shape[1] == LATENT_CHANNELS else torch.zeros(shape)
    return SamplerStart(noise, init, None if mask is None else prepare_mask(mask.cpu(), shape))


def init_latent(latents: torch.Tensor, noise_mask: Optional[torch.Tensor], batch: int, height: int,
                width: int) -> dict:
    """A core LATENT dict for `stages.sample` from an encoded init image (unscaled latents, batch 1 or `batch`)
    and an optional mask (any size; 1 = regenerate): the image repeated over the batch, its size checked
    against the generation size (pixels)."""
    want = (height // VAE_FACTOR, width // VAE_FACTOR)
    if tuple(latents.shape[-2:]) != want:
        raise InputError(f"The init image is {latents.shape[-1] * VAE_FACTOR}×{latents.shape[-2] * VAE_FACTOR} px but "
                         f"the generation {width}×{height}: give the init image at the generation size.")
    if latents.shape[0] != batch:
        latents = latents[:1].repeat(batch, 1, 1, 1)
    return {"samples": latents.float()} if noise_mask is None else {"samples": latents.float(), "noise_mask": noise_mask}

"""FLUX.1-dev VAE through diffusers' `AutoencoderKL` (spec §5): loading, latent scale/shift, tiled decode, OOM fallback.

Accepted inputs (nothing is ever fetched from the hub):
- a diffusers folder: `vae/` (config.json + diffusion_pytorch_model.safetensors) or a repo root containing `vae/`;
- the original BFL single file `ae.safetensors` (keys `encoder.down.0.block.0.norm1.weight`, …), bare or under
  `first_stage_model.` / `vae.` (ComfyUI all-in-one); the AutoencoderKL config is built from tensor shapes and the
  keys are converted with diffusers' own `convert_ldm_vae_checkpoint`. A single file in diffusers key layout
  also works (converted to BFL names first).

GroupNorm group counts are not visible in tensor shapes: a single file may name them in its safetensors metadata
(`norm_num_groups`, written by the tiny test models); otherwise FLUX's 32 is used.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from .errors import InputError, ModelFileError
from .files import describe_state_dict, list_keys, read_safetensors, read_state_dict, require_exists, safetensors_metadata
from .memory import empty_device_cache, is_out_of_memory
from .recovery import cleans_up_on_failure
from .tiles import ramp_weights, shared_span, tile_starts

logger = logging.getLogger(__name__)

LATENT_SCALE = 0.3611
LATENT_SHIFT = 0.1159
LATENT_CHANNELS = 16
VAE_SCALE_FACTOR = 8  # pixels per latent pixel (FLUX VAE: 4 blocks, 3 down/upsamplings)
NORM_GROUPS_METADATA_KEY = "norm_num_groups"
EXPECTED = "ae.safetensors from black-forest-labs/FLUX.1-dev, or the vae/ folder of NewBie-AI/NewBie-image-Exp0.1"
_SAFETENSORS = (".safetensors", ".sft")


def scale_latents(z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents → the scaled latents the DiT and sampler use: `(z − 0.1159)·0.3611`."""
    return (z - LATENT_SHIFT) * LATENT_SCALE


def unscale_latents(z: torch.Tensor) -> torch.Tensor:
    """Scaled latents → raw VAE latents: `z / 0.3611 + 0.1159`."""
    return z / LATENT_SCALE + LATENT_SHIFT


def _bfl_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_to_bfl_vae(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to the original BFL/LDM layout (inverse of
    diffusers' `convert_ldm_vae_checkpoint`; attention projections become 1×1 conv weights)."""
    ups = [int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))]
    n_up = max(ups) + 1 if ups else 0
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = key
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{_bfl_resnet(m[3])}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_bfl_resnet(m[3])}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_bfl_resnet(m[3])}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{_ATTN_NAMES[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and m[3] == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        out[new] = value
    return out


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() in _SAFETENSORS


def _find_prefix(keys: list[str], marker: str) -> str | None:
    """The prefix under which `marker` (an encoder key) and its decoder twin occur, '' preferred."""
    ks = set(keys)
    twin = marker.replace("encoder.", "decoder.", 1).replace("down_blocks.0.resnets.0.norm1", "conv_in")
    prefixes = sorted((k[: -len(marker)] for k in keys if k.endswith(marker)), key=len)
    for p in prefixes:
        if (p == "" or p.endswith(".")) and (p + twin) in ks:
            return p
    return None


def _wrong_family(path: Path, keys, what: str | None = None) -> ModelFileError:
    looks = what or describe_state_dict(keys)
    return ModelFileError(f"{path} is not a FLUX VAE: it looks like {looks}. Expected {EXPECTED}.")


def _config_from_bfl(path: Path, sd: dict[str, torch.Tensor], groups: int) -> dict:
    n = 0
    while f"encoder.down.{n}.block.0.conv1.weight" in sd:
        n += 1
    lpb = 0
    while f"encoder.down.0.block.{lpb}.conv1.weight" in sd:
        lpb += 1
    need = ["encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight", "decoder.conv_out.weight"]
    missing = [k for k in need if k not in sd]
    if n == 0 or lpb == 0 or missing:
        raise ModelFileError(f"{path} is an incomplete VAE (missing {', '.join(missing) or 'encoder.down.* blocks'}). "
                             f"Re-download it; expected {EXPECTED}.")
    channels = [int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(n)]
    latent = int(sd["decoder.conv_in.weight"].shape[1])
    if latent != LATENT_CHANNELS:
        raise _wrong_family(path, sd, f"a VAE with {latent} latent channels (SD/SDXL-style?); NewBie needs the 16-channel FLUX VAE")
    if any(c % groups for c in channels):
        raise ModelFileError(f"{path}: VAE channel widths {channels} do not split into {groups} norm groups; "
                             f"this is not a FLUX VAE. Expected {EXPECTED}.")
    return {
        "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "act_fn": "silu",
        "latent_channels": latent,
        "norm_num_groups": groups,
        "sample_size": 1024,
        "scaling_factor": LATENT_SCALE,
        "shift_factor": LATENT_SHIFT,
        "force_upcast": True,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
    }


def _build(path: Path, config: dict, sd: dict[str, torch.Tensor], dtype, device):
    from diffusers import AutoencoderKL

    from .validate import check_state_dict

    with torch.device("meta"):
        model = AutoencoderKL.from_config(config)
    check_state_dict(model, sd, str(path))  # int8/bool or mis-shaped weights: named, before the cast hides them
    sd = {k: v.to(dtype) for k, v in sd.items()}
    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ModelFileError(
            f"{path}: the VAE weights do not match its layout (missing: {', '.join(result.missing_keys[:4]) or '-'}; "
            f"unexpected: {', '.join(result.unexpected_keys[:4]) or '-'}). The file is damaged or not a FLUX VAE; "
            f"expected {EXPECTED}.")
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise ModelFileError(f"{path}: the VAE weights are incomplete. Expected {EXPECTED}.")
    return model.to(device).eval().requires_grad_(False)


# Class names a config.json may be named back with (known diffusers/transformers classes); any other value of a
# foreign file is never repeated in a message (messages reach HTTP clients through /history).
KNOWN_CLASSES = frozenset({
    "Lumina2Transformer2DModel", "FluxTransformer2DModel", "SD3Transformer2DModel", "UNet2DConditionModel",
    "NextDiT_CLIP", "AutoencoderTiny", "AutoencoderDC", "AutoencoderKLQwenImage", "AutoencoderKLWan",
    "AutoencoderKLHunyuanVideo", "AutoencoderKLCogVideoX", "AutoencoderKLLTXVideo", "CLIPTextModel",
    "CLIPTextModelWithProjection", "T5EncoderModel", "Gemma3ForConditionalGeneration", "Gemma3ForCausalLM"})


def _load_folder(folder: Path, dtype, device):
    cfg_path = folder / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except Exception as e:  # the message names the error kind only, never the file's text
        raise ModelFileError(f"{cfg_path} is damaged ({type(e).__name__}). Re-download the folder; "
                             f"expected {EXPECTED}.") from None
    # Fields of a foreign config.json are never repeated back (a message can reach any HTTP client).
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        what = f"a {cls}" if cls in KNOWN_CLASSES else "another kind of model (its config.json names no AutoencoderKL)"
        raise ModelFileError(f"{folder} holds {what}, not a VAE (AutoencoderKL). Expected {EXPECTED}.")
    latent = config.get("latent_channels")
    if not isinstance(latent, int) or isinstance(latent, bool) or latent != LATENT_CHANNELS:
        shown = f"{latent} latent channels" if isinstance(latent, int) and 0 <= latent < 4096 else "no valid latent_channels"
        raise _wrong_family(folder, [], f"a VAE with {shown} (SD/SDXL-style?); NewBie needs the 16-channel FLUX VAE")
    main = folder / "diffusion_pytorch_model.safetensors"
    sd = read_state_dict(main if main.is_file() else folder)
    return _build(folder, config, sd, dtype, device)


def _load_single_file(path: Path, dtype, device):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    keys = list_keys(path) if _is_safetensors(path) else list(read_state_dict(path).keys())
    prefix = _find_prefix(keys, "encoder.conv_in.weight")
    diffusers_layout = prefix is not None and any(k.startswith(prefix + "encoder.down_blocks.") for k in keys)
    if prefix is None:
        raise _wrong_family(path, keys)
    wanted = [k for k in keys if k.startswith(prefix) and k[len(prefix):].split(".")[0] in
              ("encoder", "decoder", "quant_conv", "post_quant_conv")]
    sd_all = read_safetensors(path, wanted) if _is_safetensors(path) else read_state_dict(path)
    sd = {k[len(prefix):]: sd_all[k] for k in wanted}
    if diffusers_layout:
        sd = diffusers_to_bfl_vae(sd)
    meta = safetensors_metadata(path) if _is_safetensors(path) else {}
    from .validate import metadata_value

    groups = metadata_value(meta, NORM_GROUPS_METADATA_KEY, 32, lambda v: isinstance(v, int) and 0 < v <= 1024,
                            source=str(path), parse=int)
    config = _config_from_bfl(path, sd, groups)
    converted = convert_ldm_vae_checkpoint(sd, config)
    return _build(path, config, converted, dtype, device)


@cleans_up_on_failure
def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             tile_size: int = 64, tile_overlap: int = 16) -> "FluxVAE":
    """Load the FLUX VAE from a diffusers folder (`vae/` or its repo root) or a BFL-layout single file.

    Weights are cast to `dtype` and placed on `device`. Raises ModelFileError for a missing path, a damaged
    file, or a checkpoint of another family (naming what it looks like and what is expected).
    """
    path = Path(path)
    if path.is_dir():
        if (path / "vae" / "config.json").is_file():  # a repo root (NewBie-image-Exp0.1, FLUX.1-dev)
            return FluxVAE(_load_folder(path / "vae", dtype, device), tile_size, tile_overlap)
        if (path / "config.json").is_file():
            return FluxVAE(_load_folder(path, dtype, device), tile_size, tile_overlap)
        singles = [p for p in (path / "ae.safetensors", path / "ae.sft") if p.is_file()]
        if singles:
            return FluxVAE(_load_single_file(singles[0], dtype, device), tile_size, tile_overlap)
        raise ModelFileError(f"{path} is a folder without a VAE (no config.json, vae/ subfolder or ae.safetensors). "
                             f"Expected {EXPECTED}.")
    if not path.is_file():
        require_exists(path, "the VAE", f"Expected {EXPECTED}.")
    return FluxVAE(_load_single_file(path, dtype, device), tile_size, tile_overlap)


class FluxVAE:
    """The FLUX VAE: `.model` is the diffusers AutoencoderKL; decode/encode run where its parameters are.

    `tile_size` / `tile_overlap` (latent pixels; default 64 / 16 = 512 px tiles with 25 % overlap) set the
    tiled decode, which feather-blends tiles decoded by `.model.decoder`.
    """

    def __init__(self, model, tile_size: int = 64, tile_overlap: int = 16):
        """Wrap a loaded AutoencoderKL."""
        if not (0 <= tile_overlap < tile_size):
            raise ValueError(f"tile_overlap ({tile_overlap}) must be in [0, tile_size={tile_size}).")
        self.model = model
        self.tile_size = int(tile_size)
        self.tile_overlap = int(tile_overlap)
        self.upscale = 2 ** (len(model.config.block_out_channels) - 1)

    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    @property
    def device(self) -> torch.device:
        """Where decoding runs: `run_device` when a host set one (partial loading), else where the weights are."""
        return getattr(self, "run_device", None) or self._param().device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' current dtype (the decode dtype)."""
        return self._param().dtype

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        """Scaled latents [B,16,h,w] → images [B,3,8h,8w], float32 in [0,1], on the VAE's device."""
        if tiled:
            return self._decode_tiled_scaled(latents, self.tile_size)
        z = self._prepare(latents)
        return ((self.model.decode(z).sample.float() + 1.0) / 2.0).clamp_(0.0, 1.0)

    def _prepare(self, latents: torch.Tensor) -> torch.Tensor:
        channels = self.model.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != channels:
            raise InputError(f"VAE decode needs latents of shape [B,{channels},h,w]; got {tuple(latents.shape)}.")
        return unscale_latents(latents.to(device=self.device, dtype=torch.float32)).to(self.dtype)

    def _decode_tiled(self, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        tile = tile or self.tile_size
        overlap = self.tile_overlap * tile // self.tile_size  # keep the overlap fraction when tiles shrink
        f = self.upscale
        b, _, h, w = z.shape
        out = torch.zeros(b, self.model.config.out_channels, h * f, w * f, dtype=torch.float32, device=z.device)
        weight = torch.zeros(1, 1, h * f, w * f, dtype=torch.float32, device=z.device)
        ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
        for yi, y in enumerate(ys):
            for xi, x in enumerate(xs):
                part = z[:, :, y: y + tile, x: x + tile]
                if self.model.post_quant_conv is not None:
                    part = self.model.post_quant_conv(part)
                dec = self.model.decoder(part).float()
                th, tw = dec.shape[-2:]
                wy = ramp_weights(th, *(f * n for n in shared_span(ys, yi, tile, h)), z.device)
                wx = ramp_weights(tw, *(f * n for n in shared_span(xs, xi, tile, w)), z.device)
                wt = wy[:, None] * wx[None, :]
                out[:, :, y * f: y * f + th, x * f: x * f + tw] += dec * wt
                weight[:, :, y * f: y * f + th, x * f: x * f + tw] += wt
                del dec, part
        return out / weight

    @torch.no_grad()
    def encode(self, images: torch.Tensor, tiled: bool = False, tile: int | None = None) -> torch.Tensor:
        """Images [B,3,H,W] in [0,1] (H, W multiples of 8) → scaled latents (float32, the posterior mean, as
        ComfyUI's VAE Encode), on the VAE's device. `tiled`: encode `tile`-latent-pixel tiles (default
        `tile_size`, i.e. 512 px) with feather-blended overlaps, for less memory."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] % self.upscale or images.shape[-2] % self.upscale:
            raise InputError(f"VAE encode needs images [B,3,H,W] with H and W multiples of {self.upscale}; "
                             f"got {tuple(images.shape)}.")
        x = (images.to(device=self.device, dtype=torch.float32) * 2.0 - 1.0).to(self.dtype)
        if not tiled:
            return scale_latents(self._encode_mean(x).float())
        tile, f = tile or self.tile_size, self.upscale
        overlap, h, w = self.tile_overlap * tile // self.tile_size, x.shape[-2] // f, x.shape[-1] // f
        out = torch.zeros(x.shape[0], self.model.config.latent_channels, h, w, dtype=torch.float32, device=self.device)
        weight = torch.zeros(1, 1, h, w, dtype=torch.float32, device=self.device)
        ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
        for yi, y in enumerate(ys):
            for xi, x0 in enumerate(xs):
                z = self._encode_mean(x[:, :, y * f: (y + tile) * f, x0 * f: (x0 + tile) * f]).float()
                th, tw = z.shape[-2:]
                wt = ramp_weights(th, *shared_span(ys, yi, tile, h), self.device)[:, None] * \
                    ramp_weights(tw, *shared_span(xs, xi, tile, w), self.device)[None, :]
                out[:, :, y: y + th, x0: x0 + tw] += z * wt
                weight[:, :, y: y + th, x0: x0 + tw] += wt
        return scale_latents(out / weight)

    def _encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model.encoder(x)
        if self.model.quant_conv is not None:
            h = self.model.quant_conv(h)
        return h.chunk(2, dim=1)[0]  # the posterior's mean (the other half is its log-variance)

    def encode_with_fallback(self, images: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Encode in one piece; on out-of-memory retry tiled, halving the tile down to 16 latent pixels while
        it still runs out. Returns (scaled latents, used_tiled)."""
        try:
            return self.encode(images), False
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            logger.warning("VAE encode of %s ran out of memory; retrying tiled.", tuple(images.shape))
        tile = self.tile_size
        while True:
            empty_device_cache(self.device)
            try:
                return self.encode(images, tiled=True, tile=tile), True
            except Exception as e:
                if not is_out_of_memory(e) or tile // 2 < 16:
                    raise
                logger.warning("Tiled VAE encode ran out of memory at %d px tiles; trying %d px.",
                               tile * self.upscale, tile // 2 * self.upscale)
            tile //= 2

    def decode_with_fallback(self, latents: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Decode in one piece; on out-of-memory free the failed attempt's memory and decode tiled
        (halving the tile down to 16 latent pixels while it still runs out). Returns (images, used_tiled)."""
        try:
            return self.decode(latents), False
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            logger.warning("VAE decode of %s ran out of memory; retrying tiled (%d px tiles).",
                           tuple(latents.shape), self.tile_size * self.upscale)
        # Outside the except block: the exception and the frames holding the failed attempt's tensors are gone.
        tile = self.tile_size
        while True:
            empty_device_cache(self.device)
            try:
                return self._decode_tiled_scaled(latents, tile), True
            except Exception as e:
                if not is_out_of_memory(e) or tile // 2 < 16:
                    raise
                logger.warning("Tiled VAE decode ran out of memory at %d px tiles; trying %d px.",
                               tile * self.upscale, tile // 2 * self.upscale)
            tile //= 2

    @torch.no_grad()
    def _decode_tiled_scaled(self, latents: torch.Tensor, tile: int) -> torch.Tensor:
        return ((self._decode_tiled(self._prepare(latents), tile) + 1.0) / 2.0).clamp_(0.0, 1.0)

"""ComfyUI internals for the DiT: the MODEL class (BaseModel + our NextDiT called the ComfyUI way), the
operations ComfyUI builds it with (`NewBieOps`: the engine's Fp8Linear made partially loadable and patchable),
the ModelPatcher subclass that keeps fp8 scales with their weights, and the loader. Part of `_comfy`."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import comfy.conds
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.supported_models
import comfy.utils

from ..newbie_core import checkpoints
from ..newbie_core import ops as core_ops
from ..newbie_core.dit import NextDiT
from ..newbie_core.fp8 import (Fp8Linear, dequantize_weight, enable_fp8_matmul, fp8_matmul_supported, linear_forward,
                               quantize_weight, scaled_matmul)
from ..newbie_core.precision import Precision, cast_module
from ..newbie_core.recovery import cleans_up_on_failure
from ..newbie_core.validate import check_attention
from . import _comfy_lowvram as lowvram
from ._comfy import device_for, register
from ._comfy_compat import LOWVRAM_PATCH_CONVERTS, cast_bias_weight


class ComfyNewBieDiT(NextDiT):
    """NextDiT called the ComfyUI way (σ: 1 noise → 0 data; predicts noise − x0) for core samplers.

    Our own sampler node calls `velocity` (the official convention) directly.
    """

    def __init__(self, newbie_config=None, image_model=None, dtype=None, device=None, operations=None,
                 attention=None, **kwargs):
        super().__init__(newbie_config, operations=operations, attention=attention, dtype=dtype, device=device)
        self.dtype = dtype

    def velocity(self, *args, **kwargs) -> torch.Tensor:
        """The official forward: velocity (data − noise) at t (0 = noise)."""
        return NextDiT.forward(self, *args, **kwargs)

    def forward(self, x, timesteps, context=None, attention_mask=None, clip_text_pooled=None, transformer_options={}, **kwargs):
        """ComfyUI convention: t = 1 − σ, output negated (spec §1.6)."""
        mask = attention_mask if attention_mask is not None else torch.ones(context.shape[:2], device=x.device)
        return -self.velocity(x, 1.0 - timesteps, context, mask.to(x.device), clip_text_pooled)


class NewBieModelConfig(comfy.supported_models.Lumina2):
    """Model config for ComfyUI: Flux latents, shift 6, multiplier 1 (as core Lumina2)."""

    unet_config = {"image_model": "newbie"}
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]

    def get_model(self, state_dict, prefix="", device=None):
        """Build the BaseModel around our DiT."""
        return NewBieBaseModel(self, device=device)


class CONDCaption(comfy.conds.CONDRegular):
    """One prompt's caption features `[B,L,D]` or caption mask `[B,L]`. Captions of other lengths batch together,
    right-padded with zeros (mask 0: a pad, which the DiT leaves out), so a core sampler runs the positive and
    the negative prompt in one DiT call per step, as the pack's own sampler does, not one call per prompt."""

    def can_concat(self, other):  # noqa: D102
        a, b = self.cond, other.cond
        return a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:] and a.device == b.device

    def concat(self, others):  # noqa: D102
        conds = [self.cond, *(o.cond for o in others)]
        n = max(c.shape[1] for c in conds)
        return torch.cat([torch.nn.functional.pad(c, (0, 0) * (c.ndim - 2) + (0, n - c.shape[1])) for c in conds])


class NewBieBaseModel(comfy.model_base.BaseModel):
    """BaseModel whose diffusion_model is our NextDiT; passes the caption mask and the Jina pooled vector."""

    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device, unet_model=ComfyNewBieDiT)

    def extra_conds(self, **kwargs):
        """Caption mask and pooled vector from CONDITIONING to the DiT (core samplers). With a mask, captions of
        different lengths batch together (CONDCaption); without one every token is real, so they cannot."""
        out = super().extra_conds(**kwargs)
        masked = kwargs.get("attention_mask") is not None
        if masked:
            out["attention_mask"] = CONDCaption(kwargs["attention_mask"])
        if kwargs.get("pooled_output") is not None:
            out["clip_text_pooled"] = comfy.conds.CONDRegular(kwargs["pooled_output"])
        if kwargs.get("cross_attn") is not None:
            out["c_crossattn"] = (CONDCaption if masked else comfy.conds.CONDRegular)(kwargs["cross_attn"])
        return out


def comfyui_attention(q, k, v, key_mask=None):
    """Our attention signature on ComfyUI's `optimized_attention_masked` (honours --use-sage-attention etc.).

    q `[B,Hq,S,D]`, k/v `[B,Hkv,S,D]`; ComfyUI's kernels have no GQA, so K/V are repeated here.
    """
    from comfy.ldm.modules.attention import optimized_attention_masked

    from ..newbie_core.attention import KeyPrefix, prefix_attention

    if isinstance(key_mask, KeyPrefix):  # packed real tokens: unmasked kernel calls per caption length
        return prefix_attention(q, k, v, key_mask, lambda a, b, c: comfyui_attention(a, b, c, None))
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return optimized_attention_masked(q, k, v, q.shape[1], mask=mask, skip_reshape=True, skip_output_reshape=True)


comfyui_attention.supports_key_prefix = True


def resolve_attention(name: str):
    """The DiT loader's attention choice as a callable: ComfyUI's attention, or newbie_core's backends.
    Unknown names raise InputError (they used to fall back to SDPA silently)."""
    name = check_attention(name, extra=("comfyui",))
    if name == "comfyui":
        return comfyui_attention
    from functools import partial

    from ..newbie_core.attention import attention

    return partial(attention, backend=name)




def _cast_for_call(layer, x):
    """ComfyUI's per-call weight cast for a partially loaded layer (its offload stream where ComfyUI has one).
    fp8 weights arrive still in fp8 (their scale is applied by `linear_forward`); others in the input's dtype."""
    dtype = layer.weight.dtype if layer.weight_scale is not None else None
    return cast_bias_weight(layer, x, dtype=dtype, bias_dtype=x.dtype)


class NewBieOps(comfy.ops.disable_weight_init):
    """ComfyUI operations for our DiT: the engine's `Fp8Linear` (same forward as the CLI: per-channel fp8
    scales, fp8 tensor-core matmuls) made partially loadable by ComfyUI (`comfy_cast_weights`, patches), and the
    engine's RMSNorm, so both hosts compute the same numbers."""

    class Linear(Fp8Linear, comfy.ops.disable_weight_init.Linear):
        """`Fp8Linear` + ComfyUI's cast/patch hooks (`convert_weight`/`set_weight`: ModelPatcher dequantises a
        fp8 weight before adding a patch such as a LoRA, and re-quantises it after with the layer's scales)."""

        def forward(self, x):  # noqa: D102
            if self.comfy_cast_weights or self.weight_function or self.bias_function:
                return self.forward_comfy_cast_weights(x)
            return Fp8Linear.forward(self, x)

        def fp8_input_ready(self, x, resident=True):
            """Also while ComfyUI casts this layer per call (partial load: the fp8 weight arrives still in fp8, so
            the fused fp8 gate feeds it as it feeds a resident one and partial and full loads compute alike);
            never while a patch (LoRA) applies per call."""
            if self.weight_function or self.bias_function:
                return False
            return Fp8Linear.fp8_input_ready(self, x, resident=resident and not self.comfy_cast_weights)

        def forward_fp8_input(self, x8, x_scale, out_dtype):
            """The pre-quantised input's scaled matmul, with the weight brought per call (on ComfyUI's offload
            stream where it has one) while the layer is partially loaded."""
            if not self.comfy_cast_weights:
                return Fp8Linear.forward_fp8_input(self, x8, x_scale, out_dtype)
            weight, bias, stream = cast_bias_weight(self, x8, dtype=self.weight.dtype, bias_dtype=out_dtype)
            out = scaled_matmul(x8, x_scale, weight, self.weight_scale.to(x8.device, non_blocking=True), bias,
                                out_dtype)
            if stream is not None:
                comfy.ops.uncast_bias_weight(self, weight, bias, stream)
            return out

        def forward_comfy_cast_weights(self, x):  # noqa: D102
            if self.weight_scale is not None and self.weight_function and not LOWVRAM_PATCH_CONVERTS:
                return self._patched_fp8_forward(x)
            weight, bias, stream = _cast_for_call(self, x)
            scale = self.weight_scale if weight.dtype == self.weight.dtype else None  # a patch returns it dequantised
            out = linear_forward(x, weight, scale, bias, self.fp8_matmul)
            if stream is not None:
                comfy.ops.uncast_bias_weight(self, weight, bias, stream)
            return out

        def _patched_fp8_forward(self, x):
            """ComfyUI ≥ 0.4 applies a partially loaded layer's patches (LoRA) to the weight it is given, without
            `convert_weight`: hand it the dequantised weight in the compute dtype."""
            weight = dequantize_weight(self.weight.to(x.device, non_blocking=True), self.weight_scale, x.dtype)
            for f in self.weight_function:
                weight = f(weight)
            bias = None if self.bias is None else self.bias.to(x.device, x.dtype, non_blocking=True)
            for f in self.bias_function:
                bias = f(bias)
            return F.linear(x, weight, bias)

        def convert_weight(self, weight, inplace=False, **kwargs):
            """The weight ModelPatcher patches: dequantised (W8·s) when stored in fp8."""
            if self.weight_scale is None:
                return weight
            s = self.weight_scale.to(weight.device, weight.dtype)[:, None]
            return weight.mul_(s) if inplace else weight * s

        def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
            """Store a patched full-precision weight: under fp8 re-quantised with fresh per-channel scales (the
            old ones are backed up and restored by `NewBiePatcher`). `return_weight` (ComfyUI 0.3's per-call
            low-VRAM patch): the patched weight itself, full precision, for this call only."""
            if return_weight:
                return weight
            if self.weight_scale is None:
                new = weight.to(self.weight.dtype)
            else:
                new, scale = quantize_weight(weight)
                self.weight_scale = scale.to(self.weight_scale.device)
            if inplace_update:
                self.weight.data.copy_(new)
            else:
                self.weight = torch.nn.Parameter(new, requires_grad=False)

    RMSNorm = core_ops.RMSNorm


class NewBiePatcher(comfy.model_patcher.ModelPatcher):
    """ComfyUI's ModelPatcher, plus: an fp8 layer's per-channel scales are backed up when a patch (LoRA) first
    re-quantises its weight and restored with the weight on unpatch, so unpatching stays bitwise (ComfyUI itself
    backs up only the weight). Clones keep the class; the backup lives on the shared model."""

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):  # noqa: D102
        if key in self.patches and key not in self.backup:
            layer = comfy.utils.get_attr(self.model, key.rsplit(".", 1)[0])
            if getattr(layer, "weight_scale", None) is not None:
                self.model.__dict__.setdefault("newbie_scale_backup", {})[key] = layer.weight_scale.clone()
        return super().patch_weight_to_device(key, device_to=device_to, inplace_update=inplace_update)

    def unpatch_model(self, device_to=None, unpatch_weights=True):  # noqa: D102
        restore = list(self.backup) if unpatch_weights else []
        out = super().unpatch_model(device_to=device_to, unpatch_weights=unpatch_weights)
        saved = self.model.__dict__.get("newbie_scale_backup", {})
        for key in restore:
            if key in saved:
                layer = comfy.utils.get_attr(self.model, key.rsplit(".", 1)[0])
                layer.weight_scale = saved.pop(key).to(layer.weight.device)
        return out


@cleans_up_on_failure
def load_dit_patcher(path: Path, precision: Precision, attention: str, device: str = "default"):
    """Load the DiT as a ComfyUI MODEL: `NewBieOps` layers (partial loading, patches), weights converted by the
    engine's one rule (`cast_module`: fp8 with per-channel scales), a ModelPatcher."""
    sd, metadata, name = checkpoints.read_dit_state_dict(path)
    sd = checkpoints.to_official(sd, source=name)
    config = checkpoints.dit_config_from_state_dict(sd, metadata=metadata)
    load_device = device_for(device, mm.get_torch_device())
    offload_device = mm.unet_offload_device()
    compute = precision.compute if precision.storage != precision.compute else None
    model_config = NewBieModelConfig({"image_model": "newbie", "newbie_config": config, "dtype": precision.storage,
                                      "attention": resolve_attention(attention)})
    model_config.custom_operations = NewBieOps
    model_config.set_inference_dtype(precision.storage, compute)
    model = model_config.get_model({}, device="meta")  # only the DiT is built on meta; weights are assigned below
    dm = model.diffusion_model
    dm.compute_dtype = precision.compute
    checkpoints.check_keys(dm, sd, source=name)
    dm.load_state_dict(sd, strict=True, assign=True)
    del sd
    cast_module(dm, precision, work_device=load_device)  # quantised where the CLI quantises: the same fp8 weights
    lowvram.make_castable(dm, NewBieOps.Linear)  # the norms too: ComfyUI casts them on its offload stream
    if precision.is_fp8 and fp8_matmul_supported(load_device):
        enable_fp8_matmul(dm)
    model.to(offload_device)
    model.device = offload_device
    patcher = NewBiePatcher(model, load_device=load_device, offload_device=offload_device,
                            size=lowvram.true_size(model))
    lowvram.follow_buffers(patcher, every=True)
    register(patcher, f"DiT ({Path(path).name})")
    return patcher

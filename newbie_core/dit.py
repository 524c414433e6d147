"""The NewBie-image-Exp0.1 diffusion transformer (`NextDiT_CLIP`, spec §1) and its loader.

Joint-sequence design: the official code drops caption pads and puts the image right after the last real
caption token. Here the joint sequence is `cat([caption (B,L,D), image (B,N,D)])` with the key mask
`cat([cap_mask, ones])` and RoPE positions caption j → (j,0,0), image patch (r,c) → (cap_len_i, r, c).
Masked keys never influence other tokens and attention is permutation-invariant given the positions, so
this equals the official compaction; padded caption rows are computed but never read. Shapes are
static and the per-step path never syncs with the host: everything that depends only on
(cap_mask, latent size) is precomputed once by `NextDiT.prepare` into a `DiTLayout`.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn as nn

from .attention import attention as default_attention
from .attention import KeyPrefix, rope_cos_sin, supports_key_prefix
from .dit_blocks import FinalLayer, JointTransformerBlock, TimestepEmbedder, rms_norm_class
from .dit_config import DiTConfig  # noqa: F401  (public: newbie_core.dit.DiTConfig)
from .errors import InputError
from .ops import TorchOps
from .recovery import cleans_up_on_failure
from .sizes import VAE_FACTOR, nearest_valid_size

logger = logging.getLogger(__name__)

@dataclass
class DiTLayout:
    """Everything that depends only on (cap_mask, latent size): masks and RoPE cos/sin tables.

    Masks are None when no caption is padded (then attention gets no mask: fast kernels). With padded
    captions and packing on, the joint sequence of sample i is reordered to [its real caption tokens, image
    tokens, caption pads] (`joint_order`), so its real tokens are a prefix and `joint_mask` is a `KeyPrefix`;
    `img_index` then says where each sample's image rows are. Attention is permutation-equivariant given
    the RoPE positions (permuted alike), so this is exactly the official computation.
    RoPE tensors are fp32 with a singleton head axis: cap `[1,L,1,Dh/2]`, img `[B,N,1,Dh/2]`,
    joint `[B,L+N,1,Dh/2]`.
    """

    batch: int
    cap_len: int
    height: int
    width: int
    cap_mask: torch.Tensor | None
    joint_mask: torch.Tensor | KeyPrefix | None
    cap_rope: tuple[torch.Tensor, torch.Tensor]
    img_rope: tuple[torch.Tensor, torch.Tensor]
    joint_rope: tuple[torch.Tensor, torch.Tensor]
    joint_order: torch.Tensor | None = None
    img_index: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "DiTLayout":
        """This layout on `device` (self when already there)."""
        device = torch.device(device)
        if self.cap_rope[0].device == device:
            return self

        def mv(t):
            return t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t

        return dataclasses.replace(
            self, cap_mask=mv(self.cap_mask), joint_mask=mv(self.joint_mask), joint_order=mv(self.joint_order),
            img_index=mv(self.img_index),
            cap_rope=tuple(map(mv, self.cap_rope)), img_rope=tuple(map(mv, self.img_rope)),
            joint_rope=tuple(map(mv, self.joint_rope)))


class NextDiT(nn.Module):
    """NewBie-image-Exp0.1 DiT (official `NextDiT_CLIP`), inference only. Keys = official state dict.

    `operations`: namespace with `Linear`, `LayerNorm` (and optionally `RMSNorm`) classes, default
    `TorchOps`. `attention`: callable `(q, k, v, key_mask) -> out` (default `attention.attention`).
    `dtype`/`device`: where the (uninitialised) weights are created; `device="meta"` is free.

    Compute dtype: the attribute `compute_dtype` when set (ComfyUI: its manual-cast dtype); otherwise the
    dtype the weights are stored in *now* (read from `x_embedder.weight`, so it follows weights moved by
    a staged loader), except fp8/other storage dtypes, which compute in the input's dtype when that is
    16-bit, else bf16. Inputs are cast to it; the device always comes from the input `x`.
    """

    def __init__(self, config: DiTConfig, operations=None, attention: Callable | None = None,
                 dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        ops = operations or TorchOps
        attn = attention or default_attention
        self.config = cfg = config
        kw = dict(dtype=dtype, device=device)
        p2c = cfg.patch_size ** 2 * cfg.in_channels
        norm = rms_norm_class(ops)
        self.x_embedder = ops.Linear(p2c, cfg.dim, bias=True, **kw)
        self.noise_refiner = nn.ModuleList(
            JointTransformerBlock(cfg, True, ops, attn, **kw) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(
            JointTransformerBlock(cfg, False, ops, attn, **kw) for _ in range(cfg.n_refiner_layers))
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim, ops, **kw)
        self.cap_embedder = nn.Sequential(norm(cfg.cap_feat_dim, eps=cfg.norm_eps, **kw),
                                          ops.Linear(cfg.cap_feat_dim, cfg.dim, bias=True, **kw))
        self.layers = nn.ModuleList(JointTransformerBlock(cfg, True, ops, attn, **kw) for _ in range(cfg.n_layers))
        self.norm_final = norm(cfg.dim, eps=cfg.norm_eps, **kw)  # in the checkpoint, unused (as official)
        self.final_layer = FinalLayer(cfg.dim, cfg.adaln_dim, cfg.patch_size ** 2 * cfg.out_channels, ops, **kw)
        self.time_text_embed = nn.Sequential(
            nn.SiLU(), ops.Linear(cfg.adaln_dim + cfg.clip_text_dim, cfg.adaln_dim, bias=True, **kw))
        self.clip_text_pooled_proj = nn.Sequential(
            norm(cfg.clip_text_dim, eps=cfg.qk_norm_eps, **kw),
            ops.Linear(cfg.clip_text_dim, cfg.clip_text_dim, bias=True, **kw))
        self.compute_dtype: torch.dtype | None = None
        # Pack real tokens first (KeyPrefix, unmasked kernels) when the attention callable understands it;
        # False: a boolean key mask over the padded batch (the plain way).
        self.packed_attention = supports_key_prefix(attn)

    def resolve_compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the forward computes in for input `x` (see the class docstring)."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        wdt = self.x_embedder.weight.dtype
        if wdt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            return wdt
        return x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16

    # ------------------------------------------------------------------------------------ layout
    def check_size(self, height: int, width: int, cap_len: int | None = None) -> None:
        """Raise InputError unless the latent size (and caption length) fit the patch and RoPE tables."""
        cfg, p = self.config, self.config.patch_size
        step = p * VAE_FACTOR
        for name, n, lim in (("height", height, cfg.axes_lens[1]), ("width", width, cfg.axes_lens[2])):
            px = n * VAE_FACTOR
            if n % p:
                near = nearest_valid_size(px, step)
                raise InputError(f"Image {name} {px} px (latent {n}) is not a multiple of {step}; "
                                 f"use {near} px.")
            if n // p >= lim:
                raise InputError(f"Image {name} {px} px (latent {n}) is too large for the model's position "
                                 f"table ({lim} patches); use at most {(lim - 1) * step} px.")
        if cap_len is not None and cap_len >= cfg.axes_lens[0]:
            raise InputError(f"Caption has {cap_len} tokens (padded); the model supports at most "
                             f"{cfg.axes_lens[0] - 1}. Shorten the prompt or lower the token limit.")

    def prepare(self, cap_mask: torch.Tensor, height: int, width: int) -> DiTLayout:
        """Precompute the masks and RoPE tables for `cap_mask [B,L]` and a latent of `height`×`width`.

        `height`/`width` are the latent's spatial size (`x.shape[-2:]`, pixels / 8). Reads `cap_mask`
        back to the host once (call it once per generation, pass the result as `layout=`). Raises
        InputError for bad sizes or a caption mask that is not right-padded.
        """
        cfg = self.config
        b, seq = cap_mask.shape
        self.check_size(height, width, seq)
        device = cap_mask.device
        m = cap_mask.detach().to("cpu").bool()
        lens = m.sum(1)
        if not torch.equal(m, torch.arange(seq)[None] < lens[:, None]):
            raise InputError("cap_mask must be right-padded (1 for every real token, then 0 for pads).")
        hp, wp = height // cfg.patch_size, width // cfg.patch_size
        n = hp * wp
        rows = torch.arange(hp).repeat_interleave(wp)
        cols = torch.arange(wp).repeat(hp)
        img_pos = torch.stack([lens[:, None].expand(b, n), rows.expand(b, n), cols.expand(b, n)], -1)
        j = torch.arange(seq)
        cap_pos = torch.stack([j, torch.zeros_like(j), torch.zeros_like(j)], -1)[None]
        cap_c, cap_s = (t.unsqueeze(2) for t in rope_cos_sin(cap_pos, cfg.axes_dims, cfg.rope_theta))
        img_c, img_s = (t.unsqueeze(2) for t in rope_cos_sin(img_pos, cfg.axes_dims, cfg.rope_theta))
        joint = (torch.cat([cap_c.expand(b, -1, -1, -1), img_c], 1), torch.cat([cap_s.expand(b, -1, -1, -1), img_s], 1))
        padded = not bool(m.all())
        cap_mask_t = m if padded else None
        order = img_index = None
        if not padded:
            joint_mask = None
        elif self.packed_attention:  # real tokens first, pads last: a KeyPrefix, no mask (see DiTLayout)
            order = torch.stack([torch.cat([torch.arange(int(k)), seq + torch.arange(n), torch.arange(int(k), seq)])
                                 for k in lens])
            joint = tuple(t.gather(1, order[:, :, None, None].expand_as(t)) for t in joint)
            img_index = lens[:, None] + torch.arange(n)[None]
            joint_mask = KeyPrefix(tuple(int(k) + n for k in lens))
        else:
            joint_mask = torch.cat([m, torch.ones(b, n, dtype=torch.bool)], 1)
        layout = DiTLayout(b, seq, height, width, cap_mask_t, joint_mask, (cap_c, cap_s), (img_c, img_s), joint,
                           order, img_index)
        return layout.to(device)

    # ----------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, cap_feats: torch.Tensor, cap_mask: torch.Tensor,
                clip_text_pooled: torch.Tensor | None = None, layout: DiTLayout | None = None) -> torch.Tensor:
        """Velocity (data − noise) for scaled latents `x [B,C,H',W']` at `t [B]` (0 = noise, 1 = data).

        `cap_feats [B,L,cap_feat_dim]`, `cap_mask [B,L]` (1 = token, right-padded), `clip_text_pooled
        [B,clip_text_dim]` or None (then the AdaLN vector is the time embedding alone, as official).
        `layout`: from `prepare(cap_mask, H', W')`; built here (one host sync) when None.
        Returns a tensor shaped like `x`, in `x`'s dtype.
        """
        cfg, p = self.config, self.config.patch_size
        b, ch, h, w = x.shape
        seq = cap_feats.shape[1]
        if layout is None:
            layout = self.prepare(cap_mask, h, w)
        elif (layout.batch, layout.cap_len, layout.height, layout.width) != (b, seq, h, w):
            raise InputError(f"layout was prepared for batch {layout.batch}, caption {layout.cap_len}, latent "
                             f"{layout.height}x{layout.width}; got {b}, {seq}, {h}x{w}. Call prepare() again.")
        layout = layout.to(x.device)
        dt = self.resolve_compute_dtype(x)

        t = t.to(x.device).reshape(-1)
        t_emb = self.t_embedder(t.expand(b) if t.numel() == 1 else t, dt)
        if clip_text_pooled is not None:
            pooled = self.clip_text_pooled_proj(clip_text_pooled.to(x.device, dt))
            c = self.time_text_embed(torch.cat([t_emb, pooled], dim=-1))
        else:
            c = t_emb

        cap = self.cap_embedder(cap_feats.to(x.device, dt))
        for block in self.context_refiner:
            cap = block(cap, layout.cap_mask, layout.cap_rope)
        if layout.cap_mask is not None:  # pad rows are never read; keep them finite (an empty caption → NaN)
            cap = torch.where(layout.cap_mask[..., None], cap, cap.new_zeros(()))

        patches = x.to(dt).view(b, ch, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
        img = self.x_embedder(patches)
        for block in self.noise_refiner:
            img = block(img, None, layout.img_rope, c)

        hidden = torch.cat([cap, img], dim=1)
        if layout.joint_order is not None:
            hidden = hidden.gather(1, layout.joint_order[..., None].expand(-1, -1, hidden.shape[-1]))
        for block in self.layers:
            hidden = block(hidden, layout.joint_mask, layout.joint_rope, c)

        if layout.img_index is not None:
            rows = hidden.gather(1, layout.img_index[..., None].expand(-1, -1, hidden.shape[-1]))
        else:
            rows = hidden[:, seq:]
        out = self.final_layer(rows, c)  # per-token: only the image rows are needed
        co = cfg.out_channels
        out = out.view(b, h // p, w // p, p, p, co).permute(0, 5, 1, 3, 2, 4).reshape(b, co, h, w)
        return out.to(x.dtype)


@cleans_up_on_failure
def load_dit(source, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", operations=None,
             attention: Callable | None = None, loras=()) -> NextDiT:
    """Load the NewBie DiT from a file, a folder or a state dict; eval mode, no grads.

    `attention`: a callable `(q, k, v, key_mask)` or a backend name ("auto", "sdpa", "flash").
    `source`: a `.safetensors` file (official, ComfyUI `model.diffusion_model.` prefix, a ComfyUI
    all-in-one file — only the DiT tensors are read — or diffusers keys); a folder (the HF NewBie root
    with `transformer/`, or the `transformer/` folder itself, sharded or not); or a state dict.
    Weights are cast to `dtype` and placed on `device`; the model is built on the meta device and the
    tensors are assigned (no second copy). Raises ModelFileError for missing or wrong files.
    `loras`: [(LoRA/LoKr file, strength), …] merged into the weights in fp32 before the cast to `dtype`
    (see `newbie_core.lora`); the per-file reports are kept as `model.lora_reports`.
    """
    from . import checkpoints

    if isinstance(attention, str):
        import functools

        from .validate import check_attention

        attention = functools.partial(default_attention, backend=check_attention(attention))
    metadata: dict[str, str] = {}
    if isinstance(source, Mapping):
        sd, name = dict(source), "state dict"
    else:
        sd, metadata, name = checkpoints.read_dit_state_dict(source)
    sd = checkpoints.to_official(sd, source=name)
    config = checkpoints.dit_config_from_state_dict(sd, metadata=metadata)
    with torch.device("meta"):
        model = NextDiT(config, operations=operations, attention=attention, dtype=dtype, device="meta")
    checkpoints.check_keys(model, sd, source=name)
    reports = []
    if loras:
        from .lora import patch_state_dict

        sd, reports = patch_state_dict(sd, config, loras, dtype=dtype, inplace=True)  # sd: our own dict
    sd = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        from .errors import ModelFileError

        raise ModelFileError(f"{name}: tensor shapes do not fit the inferred DiT config ({e}).") from e
    model.eval().requires_grad_(False)
    model.lora_reports = reports
    logger.info("Loaded NewBie DiT from %s: %s layers, dim %s, dtype %s", name, config.n_layers, config.dim, dtype)
    return model

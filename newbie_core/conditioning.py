"""Core CONDITIONING ↔ PromptEmbeddings, for our sampler and for ComfyUI's own NewBie model.

CONDITIONING is ComfyUI's list of `[tensor, dict]` entries. Layouts accepted by `embeddings_from_conditioning`:
- ours and upstream ComfyUI's native NewBie text encoder (`model_base.Lumina2.extra_conds`): the Gemma features as
  the tensor, `attention_mask` [1,L], the Jina vector as `pooled_output` [1,1024];
- the E-Anlia/ComfyUI-NewBie fork (0.4.0, `model_base.NewBieImage.extra_conds`): `cap_feats` (else the tensor),
  `cap_mask`, `clip_text_pooled`.
Core conditioning nodes give a defined result or a clear error (README "Interop"): Conditioning Concat (features
longer than the mask: the appended tokens are real, the mask is extended; the padding of the first prompt moves
behind them, as the DiT needs right-padded captions), Conditioning Zero Out (zero features
and pooled vector: accepted), Conditioning Combine (several entries) and Set Timestep Range / Area / Mask
(ComfyUI's scheduling of conditionings) are refused with the core-sampler alternative. Pure PyTorch.
"""
from __future__ import annotations

import torch

from .errors import InputError
from .text.encode import PromptEmbeddings

# Keys whose meaning our sampler would silently drop: refuse them, naming the node that sets them.
UNSUPPORTED_KEYS = {
    "area": "Conditioning (Set Area)", "mask": "Conditioning (Set Mask)", "control": "Apply ControlNet",
    "gligen": "GLIGEN", "hooks": "a hook / LoRA-on-conditioning node", "strength": "Conditioning (Set Area/Mask)",
}
CORE_PATH = ("core KSampler (with ModelSamplingAuraFlow shift 6) on the NewBie MODEL, which schedules "
             "conditionings the ComfyUI way")


def embeddings_from_conditioning(cond: list, what: str) -> PromptEmbeddings:
    """PromptEmbeddings from core CONDITIONING (see the module docstring); a missing mask means every token is real.
    Raises InputError for an empty/unsupported CONDITIONING, naming the node that made it and the alternative."""
    if not cond:
        raise InputError(f"The {what} conditioning is empty; connect NewBie Text Encode.")
    if len(cond) > 1:
        raise InputError(
            f"The {what} conditioning has {len(cond)} entries (Conditioning Combine, or a timestep-range split): "
            f"NewBie DiT Sampler runs one prompt per side. Use Conditioning Concat to join prompts, or {CORE_PATH}.")
    feats, extra = cond[0][0], dict(cond[0][1])
    start, end = float(extra.get("start_percent", 0.0)), float(extra.get("end_percent", 1.0))
    if (start, end) != (0.0, 1.0):
        raise InputError(f"The {what} conditioning is limited to steps {start:.2f}-{end:.2f} (Conditioning Set "
                         f"Timestep Range); NewBie DiT Sampler applies a conditioning to every step. Use {CORE_PATH}.")
    bad = [f"{k} ({UNSUPPORTED_KEYS[k]})" for k in UNSUPPORTED_KEYS if extra.get(k) is not None]
    if bad:
        raise InputError(f"The {what} conditioning carries {', '.join(bad)}, which NewBie DiT Sampler does not "
                         f"apply. Use {CORE_PATH}.")
    feats = extra.get("cap_feats", feats)
    if not isinstance(feats, torch.Tensor) or feats.ndim != 3:
        raise InputError(f"The {what} conditioning holds no [1,L,D] text features; connect NewBie Text Encode.")
    mask = _first(extra, "attention_mask", "cap_mask")
    mask = torch.ones(feats.shape[:2], dtype=torch.long) if mask is None else mask.reshape(feats.shape[0], -1)
    if mask.shape[1] < feats.shape[1]:  # Conditioning Concat: appended tokens are real ones
        mask = torch.cat([mask, torch.ones(feats.shape[0], feats.shape[1] - mask.shape[1], dtype=mask.dtype,
                                           device=mask.device)], dim=1)
    elif mask.shape[1] != feats.shape[1]:
        raise InputError(f"The {what} conditioning's attention mask ({mask.shape[1]} tokens) does not match its "
                         f"features ({feats.shape[1]} tokens).")
    if bool((mask[:, 1:] > mask[:, :-1]).any()):  # pads before real tokens (a padded prompt concatenated):
        order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)  # real tokens first, order kept
        feats = torch.gather(feats, 1, order[..., None].expand(-1, -1, feats.shape[-1]).to(feats.device))
        mask = torch.gather(mask, 1, order.to(mask.device))
    pooled = _first(extra, "pooled_output", "clip_text_pooled")
    if pooled is None:
        raise InputError(f"The {what} conditioning has no pooled_output (the Jina vector): encode it with "
                         f"NewBie Text Encode (or ComfyUI's NewBie CLIP loader) rather than another CLIP node.")
    return PromptEmbeddings(cap_feats=feats, cap_mask=mask.long() if mask.dtype == torch.bool else mask,
                            pooled=pooled.reshape(feats.shape[0], -1))


def conditioning_extras(mask: torch.Tensor, pooled: torch.Tensor) -> dict:
    """The dict of our CONDITIONING entry: upstream's keys (`attention_mask`, `pooled_output`) plus the 0.4.0 fork's
    `clip_text_pooled`, which its native NewBieImage model reads instead of `pooled_output`."""
    return {"attention_mask": mask, "pooled_output": pooled, "clip_text_pooled": pooled}


def _first(d: dict, *keys):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None

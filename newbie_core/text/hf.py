"""Building transformers text models from state dicts without random init or remote code (Gemma and Jina)."""
from __future__ import annotations

import torch

from ..errors import ModelFileError

SPIECE_KEY = "spiece_model"
_DERIVED = (".inv_freq", "position_ids", "_cos_cached", "_sin_cached", "lora_dropout_mask")


def build_hf_model(model_cls, config, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, device, what: str):
    """Instantiate a transformers model on the meta device and fill it with `state_dict` (no random init).

    `state_dict` is consumed (cast to `dtype` in place). Non-persistent buffers (RoPE tables, embedding
    scales) are then computed by the model's own `_init_weights`. Raises ModelFileError listing
    missing/unexpected tensors.
    """
    from ..validate import check_state_dict

    with torch.device("meta"):
        model = model_cls(config)
    check_state_dict(model, state_dict, what)  # int8/bool or mis-shaped weights: named, before any cast
    for k in list(state_dict):  # cast in place: the caller's dict is consumed, peak memory stays ~1 copy
        if k.endswith(_DERIVED):  # caches some savers include; recomputed below
            del state_dict[k]
        elif state_dict[k].is_floating_point():
            state_dict[k] = state_dict[k].to(dtype)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ModelFileError(
            f"{what}: the weights do not fit the model built from its config "
            f"(missing {sorted(result.missing_keys)[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}). "
            f"The file is incomplete or is another model."
        )
    for p in model.parameters():
        p._is_hf_initialized = True  # transformers' init functions skip flagged tensors
    for mod in model.modules():
        names = [n for n in getattr(mod, "_non_persistent_buffers_set", ()) if getattr(mod, n, None) is not None]
        if names:
            for n in names:
                setattr(mod, n, torch.empty_like(getattr(mod, n), device="cpu"))
            model._init_weights(mod)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: tensors left uninitialised after loading: {left[:5]}")
    model.eval().requires_grad_(False)
    return model.to(device)

"""newbie_core: a faithful, staged NewBie-image-Exp0.1 inference engine in pure PyTorch (no ComfyUI imports).

Public API (stable):

    load_dit(source, dtype=torch.bfloat16, device="cpu")      -> NextDiT; dit(x, t, cap_feats, cap_mask, pooled)
    load_dit(source, ..., loras=[(path, strength), ...])     -> the same with LoRA/LoKr files merged
    apply_loras(dit, [(path, strength)]) / remove_loras(dit)  -> patch / restore an already loaded DiT
    load_gemma(path, dtype, device) / load_jina(path, ...)    -> text encoders (.encode(texts))
    load_vae(path, dtype, device)                             -> FluxVAE (.decode(scaled_latents))
    Pipeline(ModelPaths.from_dir(dir)).generate(prompt, ...)  -> images, latents, per-stage ledger
    make_tiny(dir)                                            -> tiny random-weight models in the real layouts

Names are imported lazily so `import newbie_core` stays cheap (ComfyUI imports the pack at start-up).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_dit": "dit", "NextDiT": "dit", "DiTConfig": "dit",
    "load_gemma": "text.gemma", "load_jina": "text.jina", "encode_prompts": "text.encode",
    "PromptEmbeddings": "text.encode", "SYSTEM_PROMPTS": "text.prompts",
    "load_vae": "vae", "FluxVAE": "vae",
    "Pipeline": "pipeline", "GenerationSettings": "pipeline", "GenerationResult": "pipeline",
    "ModelPaths": "model_paths", "make_tiny": "tiny",
    "sample": "sampling", "GuidedVelocity": "sampling", "make_noise": "sampling",
    "parse_precision": "precision", "Precision": "precision",
    "NewBieError": "errors", "ModelFileError": "errors", "InputError": "errors", "NumericalError": "errors",
    "StageOutOfMemoryError": "errors", "apply_loras": "lora", "remove_loras": "lora",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'newbie_core' has no attribute {name!r}")

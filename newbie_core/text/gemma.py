"""Gemma3-4B-it per-token caption features (spec §3.1) via transformers' `Gemma3TextModel`.

Features are `hidden_states[-2]`: the un-normed output of the second-to-last decoder layer
(transformers 5.x: `[0]` = embeddings, `[-1]` = final normed state). Only the text path is built
and read; vision-tower tensors in a multimodal checkpoint are never loaded from disk.

Accepted files:
- HF folder (NewBie's `text_encoder/`, a google/gemma-3-4b-it save): `config.json` (multimodal, with
  `text_config`, or a plain `gemma3_text` one), (sharded) safetensors with keys under
  `language_model.model.` (transformers 4.x) or `model.language_model.` (5.x), tokenizer files.
- ComfyUI single file (`gemma_3_4b_it_bf16.safetensors`): keys `model.embed_tokens.weight`,
  `model.layers.N.…`, `model.norm.weight` (names as in ComfyUI's `Gemma3_4B`, which equal HF's) and
  the SentencePiece tokenizer as a uint8 tensor `spiece_model`. The config comes from tensor shapes.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ModelFileError
from ..fp8 import make_fp8_capable
from .hf import SPIECE_KEY, build_hf_model
from ..files import describe_state_dict, read_under_prefix, require_exists
from .prompts import GEMMA_SPEC, TextTokenizer, tokenize_batch
from ..recovery import cleans_up_on_failure

logger = logging.getLogger(__name__)

_PROBE = "layers.0.self_attn.q_norm.weight"  # Gemma 3 has q/k norms; Gemma 2 and Llama do not
# Values of google/gemma-3-4b-it that tensor shapes cannot tell (its config.json + Gemma3TextConfig defaults).
GEMMA3_4B_EXTRA = {
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "sliding_window": 1024,
    "sliding_window_pattern": 6,
    "query_pre_attn_scalar": 256,
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
}
GEMMA3_4B_SHAPES = {"vocab_size": 262_208, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256}


def _text_prefix(keys: list[str], path: Path) -> str:
    """The key prefix of the Gemma text decoder (e.g. "language_model.model.", "model.language_model.", "model.")."""
    ks = set(keys)
    prefixes = sorted(
        (k[: -len(_PROBE)] for k in keys if k.endswith(_PROBE) and k[: -len(_PROBE)] + "embed_tokens.weight" in ks),
        key=lambda p: ("vision" in p, len(p)),
    )
    if prefixes:
        return prefixes[0]
    if any(k.endswith("layers.0.self_attn.q_proj.weight") for k in keys):
        looks = "a Gemma 2 / Llama-style language model (no q_norm/k_norm)"
    else:
        looks = describe_state_dict(keys)
    raise ModelFileError(
        f"{path} does not look like Gemma3-4B-it: it looks like {looks}. Expected a Gemma 3 text model "
        f"(keys like 'model.layers.0.self_attn.q_norm.weight' or 'language_model.model.layers.0…'): "
        f"NewBie's text_encoder/ folder or ComfyUI's gemma_3_4b_it_bf16.safetensors."
    )


def _read_text_weights(path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Gemma text tensors (prefix stripped, lm_head/vision skipped, not even read) + embedded tokenizer."""
    prefix = ""

    def find(keys: list[str]) -> str:
        nonlocal prefix
        prefix = _text_prefix(keys, path)
        return prefix

    def keep(key: str) -> bool:  # an unprefixed file also holds the other towers' tensors
        return bool(prefix) or not key.startswith(("vision", "multi_modal", "lm_head"))

    sd, extra = read_under_prefix(path, find, keep=keep, extra=(SPIECE_KEY,))
    return sd, extra.get(SPIECE_KEY)


def gemma_config_from_shapes(sd: dict[str, torch.Tensor]):
    """A `Gemma3TextConfig` from tensor shapes; the 4B model's rope/window values when the shapes are the 4B's."""
    from transformers import Gemma3TextConfig

    vocab, hidden = sd["embed_tokens.weight"].shape
    head_dim = sd["layers.0.self_attn.q_norm.weight"].shape[0]
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    shapes = {
        "vocab_size": int(vocab), "hidden_size": int(hidden), "head_dim": int(head_dim), "num_hidden_layers": n_layers,
        "intermediate_size": int(sd["layers.0.mlp.gate_proj.weight"].shape[0]),
        "num_attention_heads": int(sd["layers.0.self_attn.q_proj.weight"].shape[0] // head_dim),
        "num_key_value_heads": int(sd["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim),
    }
    if all(shapes[k] == v for k, v in GEMMA3_4B_SHAPES.items() if k != "vocab_size"):
        extra = dict(GEMMA3_4B_EXTRA)
    else:
        # Not the 4B model: Gemma3TextConfig defaults, with the attention scale tied to head_dim as in ComfyUI.
        extra = {"query_pre_attn_scalar": int(head_dim)}
        logger.warning("Gemma weights are not Gemma3-4B-sized (%s); using Gemma3TextConfig defaults for "
                       "RoPE and the sliding window.", shapes)
    return Gemma3TextConfig(**shapes, **extra)


def _config_from_json(folder: Path, sd: dict[str, torch.Tensor]):
    from transformers import Gemma3TextConfig

    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except Exception as e:
        raise ModelFileError(f"{cfg_path} is damaged ({e}). Re-download the Gemma folder.") from e
    text = cfg.get("text_config", cfg)
    text = {k: v for k, v in text.items() if k not in ("architectures", "torch_dtype", "dtype", "transformers_version")}
    config = Gemma3TextConfig(**text)
    vocab, hidden = sd["embed_tokens.weight"].shape
    if config.hidden_size != hidden or config.vocab_size != vocab:
        raise ModelFileError(
            f"{cfg_path} says hidden {config.hidden_size}, vocab {config.vocab_size}, but the weights have "
            f"hidden {hidden}, vocab {vocab}. The config and weights come from different models."
        )
    return config


def _find_tokenizer(path: Path, spiece: torch.Tensor | None) -> TextTokenizer:
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        for d in (folder, folder.parent / "tokenizer"):
            if (d / "tokenizer.json").is_file():
                return TextTokenizer.from_tokenizer_json(d / "tokenizer.json")
            if (d / "tokenizer.model").is_file():
                return TextTokenizer.from_sentencepiece((d / "tokenizer.model").read_bytes(), str(d / "tokenizer.model"))
    if spiece is not None:
        return TextTokenizer.from_sentencepiece(spiece, f"{path} (embedded spiece_model)")
    side = path.with_name(path.stem + ".tokenizer.json")
    if side.is_file():
        return TextTokenizer.from_tokenizer_json(side)
    raise ModelFileError(
        f"No Gemma tokenizer found for {path}. The file has no embedded 'spiece_model' tensor and there is no "
        f"tokenizer.json. Put google/gemma-3-4b-it's tokenizer.json "
        f"{'in ' + str(folder) if path.is_dir() else 'next to it as ' + side.name}, or use ComfyUI's "
        f"gemma_3_4b_it_bf16.safetensors, which embeds its tokenizer."
    )


def _resolve(path: Path) -> Path:
    require_exists(path, "the Gemma text encoder", "Check the path, or download "
                   "gemma_3_4b_it_bf16.safetensors into ComfyUI/models/text_encoders/.")
    if path.is_dir() and not (path / "config.json").is_file() and (path / "text_encoder").is_dir():
        return path / "text_encoder"  # the NewBie repo root was given
    return path


@dataclass
class GemmaTextEncoder:
    """A loaded Gemma3 text path: `.model` (nn.Module holding every weight), `.tokenizer`, `.hidden_size`."""

    model: torch.nn.Module
    tokenizer: TextTokenizer
    hidden_size: int
    source: str = ""

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(input_ids, attention_mask)` [B, L] int64: `<bos>` + text, no EOS, pad 0, ≤512, L a multiple of 8."""
        return tokenize_batch(self.tokenizer, GEMMA_SPEC, texts)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token features `[B, L, D]` (hidden_states[-2], model dtype) and mask `[B, L]` int64 (1 = real)."""
        return self.encode_ids(*self.tokenize(texts))

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode` for already tokenized input; runs where the decoder layers are (`model.norm`'s device).

        The embedding table may live elsewhere (kept on the CPU by the staged pipeline): the lookup then
        runs there and only the `[B, L, D]` embeddings move, in the layers' dtype, scaled as Gemma does.
        """
        model = self.model
        # `run_device`: set by a host that may leave the layers partially on the CPU (ComfyUI's partial loading)
        device, dtype = getattr(self, "run_device", None) or model.norm.weight.device, model.norm.weight.dtype
        ids, mask = input_ids.to(device), attention_mask.to(device)
        table = model.embed_tokens
        if table.weight.device == device and table.weight.dtype == dtype:
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        else:
            emb = F.embedding(input_ids.to(table.weight.device), table.weight).to(device, dtype)
            emb = emb * table.embed_scale.to(device, dtype)
            out = model(inputs_embeds=emb, attention_mask=mask, output_hidden_states=True, use_cache=False)
        return out.hidden_states[-2], mask


@cleans_up_on_failure
def load_gemma(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> GemmaTextEncoder:
    """Load Gemma3-4B-it's text path from a HF folder or a ComfyUI single file (see the module docstring)."""
    from transformers import Gemma3TextModel

    path = _resolve(Path(path))
    sd, spiece = _read_text_weights(path)
    config = _config_from_json(path, sd) if path.is_dir() and (path / "config.json").is_file() else gemma_config_from_shapes(sd)
    config._attn_implementation = "sdpa"
    tokenizer = _find_tokenizer(path, spiece)
    tokenizer.check_specials(GEMMA_SPEC)
    sd.pop("lm_head.weight", None)
    model = build_hf_model(Gemma3TextModel, config, sd, dtype, device, f"Gemma ({path})")
    make_fp8_capable(model)  # fp8 storage (per-channel scales) available to every host
    logger.info("Loaded Gemma3 text encoder from %s (%d layers, hidden %d, %s).", path,
                config.num_hidden_layers, config.hidden_size, dtype)
    return GemmaTextEncoder(model=model, tokenizer=tokenizer, hidden_size=config.hidden_size, source=str(path))

"""Jina CLIP v2 text tower → pooled caption vector (spec §3.2) via transformers' `JinaEmbeddingsV3Model`.

The remote-code JinaCLIP runs its XLM-R + RoPE backbone with the `retrieval.query` LoRA switched on
and mean-pools the last hidden state over all non-pad tokens (`<s>` and `</s>` included); no
projection, no L2 normalisation. Here the LoRA is merged into the weights at load time, exactly as the
remote `LoRAParametrization.lora_forward` applies it (scaling = lora_alpha / lora_rank, 4/4 = 1):
  Linear    W' = W + (B[t] @ A[t]) * scaling      A [n, r, in],    B [n, out, r]
  Embedding W' = W + (A[t] @ B[t]) * scaling      A [n, vocab, r], B [n, r, dim]
with t the index of "retrieval.query" in `lora_adaptations` (0 in jina-clip-v2, whose only adapter it is).

Accepted files:
- HF jina-clip-v2 folder (NewBie's `clip_model/`): `config.json` of the remote-code JinaCLIP, weights with
  keys `text_model.transformer.{embeddings.word_embeddings, embeddings.token_type_embeddings, emb_ln,
  encoder.layers.N.{mixer.Wqkv, mixer.out_proj, norm1, mlp.fc1, mlp.fc2, norm2}}`, LoRA-wrapped weights as
  `….parametrizations.weight.original` + `….parametrizations.weight.0.lora_A/lora_B`; `vision_model.*`
  is never read. Tokenizer: `tokenizer.json` (XLM-R) or `sentencepiece.bpe.model`.
- ComfyUI `jina_clip_v2_bf16.safetensors`: the same backbone names under `model.`, LoRA pre-merged, and
  the XLM-R SentencePiece model as the uint8 tensor `spiece_model` (ComfyUI PR #11415).
Other prefixes (`roberta.`, none) are found by locating `emb_ln.weight`.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import InputError, ModelFileError
from ..files import describe_state_dict, read_under_prefix, require_exists
from .hf import SPIECE_KEY, build_hf_model
from ..recovery import cleans_up_on_failure
from .prompts import JINA_SPEC, TextTokenizer, tokenize_batch

logger = logging.getLogger(__name__)

LORA_TASK = "retrieval.query"
# jina-embeddings-v3's adapter order, used when a checkpoint has several adapters but no config says which.
JINA_V3_TASKS = ["retrieval.query", "retrieval.passage", "separation", "classification", "text-matching"]
_ORIG = ".parametrizations.weight.original"
_LORA = ".parametrizations.weight.0.lora_"


def _jina_model_class():
    try:
        from transformers import JinaEmbeddingsV3Config, JinaEmbeddingsV3Model
    except ImportError as e:
        import transformers

        raise ModelFileError(
            f"Jina CLIP v2 needs transformers' JinaEmbeddingsV3Model (transformers >= 5.x with "
            f"`models/jina_embeddings_v3`); the installed transformers {transformers.__version__} lacks it. "
            f"Upgrade: pip install -U 'transformers>=5'."
        ) from e
    return JinaEmbeddingsV3Config, JinaEmbeddingsV3Model


def _find(cfg, key: str):
    """First value of `key` anywhere in a nested config dict (None when absent)."""
    if isinstance(cfg, dict):
        if key in cfg:
            return cfg[key]
        for v in cfg.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def _backbone_prefix(keys: list[str], path: Path) -> str:
    cands = sorted((k[: -len("emb_ln.weight")] for k in keys if k.endswith("emb_ln.weight")),
                   key=lambda p: ("vision" in p, len(p)))
    ks = set(keys)
    for p in cands:
        if any(k.startswith(p + "encoder.layers.0.mixer.Wqkv") for k in ks):
            return p
    raise ModelFileError(
        f"{path} does not look like Jina CLIP v2: it looks like {describe_state_dict(keys)}. Expected the "
        f"Jina XLM-RoBERTa text tower (keys like 'model.emb_ln.weight', 'model.encoder.layers.0.mixer.Wqkv.weight' "
        f"or 'text_model.transformer.…'): NewBie's clip_model/ folder or ComfyUI's jina_clip_v2_bf16.safetensors."
    )


def _read(path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    sd, extra = read_under_prefix(path, lambda keys: _backbone_prefix(keys, path), extra=(SPIECE_KEY,))
    return sd, extra.get(SPIECE_KEY)


def merge_lora(sd: dict[str, torch.Tensor], task_index: int = 0, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """Replace `X.parametrizations.weight.{original,0.lora_A,0.lora_B}` by a merged `X.weight` (fp32 math).

    `alpha` None means scaling 1 (lora_alpha == lora_rank, as in jina-clip-v2). Keys without LoRA pass through.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if _LORA in k:
            continue
        if not k.endswith(_ORIG):
            out[k] = v
            continue
        base = k[: -len(_ORIG)]
        a, b = sd.get(base + _LORA + "A"), sd.get(base + _LORA + "B")
        w = v.float()
        if a is not None and b is not None:
            t = task_index if a.shape[0] > task_index else 0
            at, bt = a[t].float(), b[t].float()
            if tuple(at.shape[:1]) == (w.shape[0],) and bt.shape[1] == w.shape[1]:  # embedding: A [vocab, r] B [r, dim]
                delta, rank = at @ bt, at.shape[1]
            elif bt.shape[0] == w.shape[0] and at.shape[1] == w.shape[1]:  # linear: B [out, r] A [r, in]
                delta, rank = bt @ at, at.shape[0]
            else:
                raise ModelFileError(f"LoRA tensors of {base} have shapes {tuple(a.shape)}/{tuple(b.shape)} that do "
                                     f"not fit its weight {tuple(w.shape)}; the checkpoint is damaged.")
            w = w + delta * ((alpha / rank) if alpha is not None else 1.0)
        out[base + ".weight"] = w.to(v.dtype)
    return out


def to_hf_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remote-code/ComfyUI backbone names (merged) → `JinaEmbeddingsV3Model` parameter names."""
    out: dict[str, torch.Tensor] = {}
    ren = {"embeddings.word_embeddings.": "embeddings.word_embeddings.",
           "embeddings.token_type_embeddings.": "embeddings.token_type_embeddings.",
           "emb_ln.": "embeddings.LayerNorm."}
    sub = {"mixer.out_proj.": "self_attn.o_proj.", "norm1.": "post_attention_layernorm.",
           "norm2.": "post_mlp_layernorm.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
    for k, v in sd.items():
        if k.startswith("pooler."):
            continue  # NewBie mean-pools; the CLS pooler is unused
        if k.startswith("encoder.layers."):
            _, _, i, rest = k.split(".", 3)
            if rest.startswith("mixer.Wqkv."):
                leaf = rest[len("mixer.Wqkv."):]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"layers.{i}.self_attn.{name}.{leaf}"] = part.contiguous()
                continue
            for old, new in sub.items():
                if rest.startswith(old):
                    out[f"layers.{i}.{new}{rest[len(old):]}"] = v
                    break
            else:
                out[k] = v  # unknown: reported as unexpected by the loader
            continue
        for old, new in ren.items():
            if k.startswith(old):
                out[new + k[len(old):]] = v
                break
        else:
            out[k] = v
    return out


def _heads(hidden: int, cfg: dict) -> int:
    n = _find(cfg, "num_attention_heads")
    if n:
        return int(n)
    if hidden % 64 == 0:
        return hidden // 64  # XLM-R head_dim 64 (jina: 1024 → 16 heads)
    return hidden // 16 if hidden % 16 == 0 else 1


def jina_config_from_weights(sd: dict[str, torch.Tensor], cfg: dict | None = None):
    """A `JinaEmbeddingsV3Config` from HF-named tensor shapes (+ rotary base / eps from `cfg` if given)."""
    Config, _ = _jina_model_class()
    cfg = cfg or {}
    vocab, hidden = sd["embeddings.word_embeddings.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    return Config(
        vocab_size=int(vocab), hidden_size=int(hidden), num_hidden_layers=layers,
        num_attention_heads=_heads(int(hidden), cfg),
        intermediate_size=int(sd["layers.0.mlp.fc1.weight"].shape[0]),
        type_vocab_size=int(sd["embeddings.token_type_embeddings.weight"].shape[0]),
        layer_norm_eps=float(_find(cfg, "layer_norm_eps") or 1e-5), hidden_act="gelu",
        rope_parameters={"rope_type": "default", "rope_theta": float(_find(cfg, "rotary_emb_base") or 20000.0)},
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )


def _tokenizer(path: Path, spiece: torch.Tensor | None) -> TextTokenizer:
    if path.is_dir():
        # the folder itself, else a sibling clip_tokenizer/ (the diffusers-style NewBie layout registers
        # `tokenizer` for Gemma and `clip_tokenizer` for Jina; a sibling tokenizer/ is Gemma's, never used here)
        for d in (path, path.parent / "clip_tokenizer"):
            if (d / "tokenizer.json").is_file():
                return TextTokenizer.from_tokenizer_json(d / "tokenizer.json")
            if (d / "sentencepiece.bpe.model").is_file():  # original XLM-R spm: fairseq id offset
                return TextTokenizer.from_sentencepiece((d / "sentencepiece.bpe.model").read_bytes(),
                                                        str(d / "sentencepiece.bpe.model"), id_offset=1)
    elif spiece is not None:
        tok = TextTokenizer.from_sentencepiece(spiece, f"{path} (embedded spiece_model)")
        sp = tok._backend
        first = [sp.id_to_piece(i) for i in range(min(4, sp.get_piece_size()))]
        if first[:3] == ["<unk>", "<s>", "</s>"]:  # an unmodified XLM-R model: apply HF's fairseq offset
            tok.id_offset = 1
        return tok
    else:
        side = path.with_name(path.stem + ".tokenizer.json")
        if side.is_file():
            return TextTokenizer.from_tokenizer_json(side)
    where = (f"into {path} (or a sibling clip_tokenizer/ folder)" if path.is_dir()
             else f"next to it as {path.with_name(path.stem + '.tokenizer.json')}")
    raise ModelFileError(
        f"No Jina (XLM-RoBERTa) tokenizer found for {path}: it has no embedded 'spiece_model' tensor and no "
        f"tokenizer.json. Copy tokenizer.json from jinaai/jina-clip-v2 (or FacebookAI/xlm-roberta-large) {where}, "
        f"or use ComfyUI's jina_clip_v2_bf16.safetensors (woctordho/comfyui-jina-clip-v2), which embeds it."
    )


# Jina's token limit is a choice, not a fact of the model: NewBie's HF pipeline cuts at 512 (the default here),
# the official demo/finetune scripts at 2048; jina-clip-v2 itself takes up to 8192 positions.
JINA_MAX_LENGTH_RANGE = (8, 8192)


def check_jina_max_length(n: int) -> int:
    """`n` as the Jina token limit, or an InputError naming the allowed range and the two usual values."""
    lo, hi = JINA_MAX_LENGTH_RANGE
    if not isinstance(n, int) or isinstance(n, bool) or not lo <= n <= hi:
        raise InputError(f"Jina max length {n!r} is outside {lo}..{hi}. Use 512 (the HF pipeline's value, default) "
                         f"or 2048 (the official demo's value).")
    return n


@dataclass
class JinaTextEncoder:
    """A loaded Jina CLIP v2 text tower: `.model` (JinaEmbeddingsV3Model, LoRA merged), `.tokenizer`, `.hidden_size`,
    `.max_length` (token limit: 512 as the HF pipeline, 2048 as the official demo)."""

    model: torch.nn.Module
    tokenizer: TextTokenizer
    hidden_size: int
    source: str = ""
    max_length: int = JINA_SPEC.max_length

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(input_ids, attention_mask)` [B, L] int64: `<s>` text `</s>`, pad 1, at most `max_length` tokens."""
        spec = JINA_SPEC if self.max_length == JINA_SPEC.max_length else replace(JINA_SPEC, max_length=self.max_length)
        return tokenize_batch(self.tokenizer, spec, texts)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Pooled text vectors `[B, D]` (model dtype): masked mean over all non-pad tokens, no projection/norm."""
        return self.encode_ids(*self.tokenize(texts))

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`encode` for already tokenized input; runs on the device of the model's embeddings."""
        device = getattr(self, "run_device", None) or self.model.get_input_embeddings().weight.device
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return masked_mean(hidden, mask).to(hidden.dtype)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden [B, L, D]` over positions where `mask [B, L]` is 1, computed in fp32."""
    m = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


@cleans_up_on_failure
def load_jina(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
              merge: bool = True, max_length: int = JINA_SPEC.max_length) -> JinaTextEncoder:
    """Load the Jina CLIP v2 text tower from a HF folder or ComfyUI single file (see the module docstring).

    `merge=False` ignores the LoRA tensors (the plain backbone; only for tests and comparisons).
    `max_length`: the token limit of `tokenize` (512 = HF pipeline, default; 2048 = official demo).
    """
    check_jina_max_length(max_length)
    _, Model = _jina_model_class()
    path = Path(path)
    require_exists(path, "the Jina CLIP v2 text encoder", "Check the path, or download "
                   "jina_clip_v2_bf16.safetensors into ComfyUI/models/text_encoders/.")
    if path.is_dir() and not (path / "config.json").is_file() and (path / "clip_model").is_dir():
        path = path / "clip_model"  # the NewBie repo root was given
    sd, spiece = _read(path)
    cfg: dict = {}
    if path.is_dir() and (path / "config.json").is_file():
        try:
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except Exception as e:
            raise ModelFileError(f"{path / 'config.json'} is damaged ({e}). Re-download the folder.") from e
        if _find(cfg, "add_projections") or (_find(cfg, "pooler_type") not in (None, "mean_pooler")):
            logger.warning("%s: config asks for projections/%s pooling; NewBie uses the un-projected mean pool.",
                           path, _find(cfg, "pooler_type"))
    tasks = _find(cfg, "lora_adaptations") or JINA_V3_TASKS
    task = _find(cfg, "default_lora_task") or LORA_TASK
    alpha = _find(cfg, "lora_alpha")
    has_lora = any(_LORA in k for k in sd)
    if not merge:
        sd = {(k[: -len(_ORIG)] + ".weight" if k.endswith(_ORIG) else k): v for k, v in sd.items() if _LORA not in k}
    elif has_lora:
        sd = merge_lora(sd, tasks.index(task) if task in tasks else 0, float(alpha) if alpha is not None else None)
        logger.info("Merged Jina LoRA adapter %r into the weights.", task)
    elif any(k.endswith(_ORIG) for k in sd):
        sd = merge_lora(sd)
        logger.warning("%s has LoRA-parametrized weights but no lora_A/lora_B tensors; using the base weights.", path)
    sd = to_hf_names(sd)
    config = jina_config_from_weights(sd, cfg)
    config._attn_implementation = "sdpa"
    tokenizer = _tokenizer(path, spiece)
    tokenizer.check_specials(JINA_SPEC)
    model = build_hf_model(functools.partial(Model, add_pooling_layer=False), config, sd, dtype, device,
                           f"Jina CLIP v2 ({path})")
    logger.info("Loaded Jina CLIP v2 text tower from %s (%d layers, hidden %d, %s).", path,
                config.num_hidden_layers, config.hidden_size, dtype)
    return JinaTextEncoder(model=model, tokenizer=tokenizer, hidden_size=config.hidden_size, source=str(path),
                           max_length=max_length)

"""Tiny random-weight Gemma3 and Jina CLIP v2 text encoders in the real file layouts, with offline tokenizers.

Layouts written (fp32 tensors, seeded):
    ROOT/hf/text_encoder/      gemma-3-4b-it-style save: multimodal config.json with text_config, two safetensors
                               shards + index, text keys under `language_model.model.`, a few fake vision tensors,
                               tokenizer.json / tokenizer.model / tokenizer_config.json (Gemma ids)
    ROOT/hf/clip_model/        jina-clip-v2-style save: remote-code config.json, model.safetensors with
                               `text_model.transformer.*` keys, LoRA UNMERGED (parametrizations.weight.original +
                               non-zero lora_A/lora_B), fake vision tensors, XLM-R-style tokenizer files
    ROOT/comfyui/text_encoders/gemma_3_4b_it_bf16.safetensors   `model.*` keys + embedded `spiece_model`
    ROOT/comfyui/text_encoders/jina_clip_v2_bf16.safetensors    `model.*` keys, LoRA pre-merged, + `spiece_model`

Tokenizers are SentencePiece models trained on a small in-memory corpus with the real special ids
(Gemma `<pad>`=0 `<eos>`=1 `<bos>`=2 `<unk>`=3; XLM-R `<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3), converted to a
`tokenizers` tokenizer.json the way transformers' converters do (Gemma: byte-fallback BPE; XLM-R: Unigram).
The tiny Gemma uses Gemma3TextConfig's defaults for RoPE and the sliding window, which is what the
loader assumes for a non-4B ComfyUI file, so both layouts give identical features at any length.
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import COMFY_GEMMA_NAME, COMFY_JINA_NAME, TINY_GEMMA_HIDDEN, TINY_JINA_HIDDEN

_WORDS = (
    "1girl 2girls 1boy solo multiple_girls girl boy cat dog hair eyes blue red pink black white long short smile "
    "happy open_mouth closed_mouth standing sitting holding school uniform serafuku skirt shirt thighhighs shoes "
    "background simple_background outdoors indoors sky tree flower anime style digital_art quality high_resolution "
    "detailed masterpiece character gender appearance clothing expression action position center_left center_right "
    "general tags count atmosphere cheerful objects briefcase other you are an assistant designed to generate "
    "high-quality images based on xml format prompts prompt start the of and with highest degree image-text "
    "alignment textual user a an in on at lowres bad anatomy worst blurry"
).split()
_MARKUP = ["<character_1>", "</character_1>", "<n>", "</n>", "<gender>", "</gender>", "<general_tags>",
           "</general_tags>", "<style>", "</style>", "<Prompt Start>", ", ", ". ", "_", "(", ")", "1", "2", "3"]
GEMMA_CFG = dict(hidden_size=TINY_GEMMA_HIDDEN, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16)
JINA_CFG = dict(hidden_size=TINY_JINA_HIDDEN, intermediate_size=64, num_hidden_layers=2, lora_rank=4, lora_alpha=4)


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 14))) for _ in range(400)]
    lines += ["".join(rng.choice(_MARKUP) + rng.choice(_WORDS) for _ in range(6)) for _ in range(100)]
    return lines


def _train_spm(seed: int, **kw) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus(seed)), model_writer=buf, minloglevel=2,
                                   num_threads=1, character_coverage=1.0, hard_vocab_limit=False, **kw)
    return buf.getvalue()


def _proto(model: bytes):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(model)
    return m


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """All (left, right) pairs whose concatenation is a piece, ordered by the merged piece's rank."""
    merges = []
    for piece, rank in vocab.items():
        for i in range(1, len(piece)):
            a, b = piece[:i], piece[i:]
            if a in vocab and b in vocab:
                merges.append((rank, vocab[a], vocab[b], a, b))
    return [(a, b) for *_, a, b in sorted(merges)]


def _gemma_tokenizer_json(model: bytes):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    m = _proto(model)
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(vocab), unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<pad>", "<eos>", "<bos>", "<unk>")])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)])
    return tok


def _xlmr_tokenizer_json(model: bytes):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    m = _proto(model)
    vocab = [(p.piece, p.score if p.type == 1 else 0.0) for p in m.pieces] + [("<mask>", 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Precompiled(m.normalizer_spec.precompiled_charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    return tok, len(vocab)


def _spiece_tensor(model: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(model), dtype=torch.uint8).clone()


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def tiny_gemma_state_dict(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Random Gemma3TextModel tensors (HF names, no prefix) for GEMMA_CFG and `vocab`."""
    g = torch.Generator().manual_seed(seed)
    c = GEMMA_CFG
    d, hd, f = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd

    def w(*shape, std=None):
        return torch.randn(*shape, generator=g) * (std if std is not None else shape[-1] ** -0.5)

    sd = {"embed_tokens.weight": w(vocab, d, std=0.5), "norm.weight": w(d, std=0.1)}
    for i in range(c["num_hidden_layers"]):
        p = f"layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": w(q, d), p + "self_attn.k_proj.weight": w(kv, d),
                   p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, q),
                   p + "self_attn.q_norm.weight": w(hd, std=0.1), p + "self_attn.k_norm.weight": w(hd, std=0.1),
                   p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight": w(d, f)})
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            sd[p + n + ".weight"] = w(d, std=0.1)
    return sd


def write_tiny_gemma(root: Path, seed: int = 1) -> dict[str, Path]:
    """Write the tiny Gemma3 as a HF gemma-3-4b-it-style folder and a ComfyUI single file; return their paths."""
    root = Path(root)
    spm_model = _train_spm(seed, vocab_size=420, model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                           pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
                           byte_fallback=True, add_dummy_prefix=False, normalization_rule_name="identity",
                           remove_extra_whitespaces=False, split_digits=True)
    n_pieces = len(_proto(spm_model).pieces)
    vocab = n_pieces + 8  # like the real model: embedding rows beyond the tokenizer's ids
    sd = tiny_gemma_state_dict(vocab, seed)

    hf = root / "hf" / "text_encoder"
    hf.mkdir(parents=True, exist_ok=True)
    text_cfg = {"model_type": "gemma3_text", "vocab_size": vocab, **GEMMA_CFG}
    _write_json(hf / "config.json", {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text_cfg,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8, "num_hidden_layers": 1},
        "boi_token_index": 5, "eoi_token_index": 6, "image_token_index": n_pieces, "mm_tokens_per_image": 4,
        "torch_dtype": "float32", "transformers_version": "4.50.0.dev0",
    })
    g = torch.Generator().manual_seed(seed + 100)
    vision = {"vision_tower.vision_model.embeddings.patch_embedding.weight": torch.randn(8, 3, 2, 2, generator=g),
              "multi_modal_projector.mm_input_projection_weight": torch.randn(8, GEMMA_CFG["hidden_size"], generator=g)}
    full = {"language_model.model." + k: v.contiguous() for k, v in sd.items()}
    names = sorted(full)
    shard1 = {k: full[k] for k in names if k.startswith("language_model.model.embed_tokens") or ".layers.0." in k}
    shard1.update(vision)
    shard2 = {k: full[k] for k in names if k not in shard1}
    files = {"model-00001-of-00002.safetensors": shard1, "model-00002-of-00002.safetensors": shard2}
    for name, tensors in files.items():
        save_file(tensors, str(hf / name), metadata={"format": "pt"})
    _write_json(hf / "model.safetensors.index.json", {
        "metadata": {"total_size": sum(t.numel() * 4 for s in files.values() for t in s.values())},
        "weight_map": {k: name for name, tensors in files.items() for k in tensors}})
    _gemma_tokenizer_json(spm_model).save(str(hf / "tokenizer.json"))
    (hf / "tokenizer.model").write_bytes(spm_model)
    _write_json(hf / "tokenizer_config.json", {
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>",
        "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 131072})

    comfy = root / "comfyui" / "text_encoders"
    comfy.mkdir(parents=True, exist_ok=True)
    single = {"model." + k: v.contiguous() for k, v in sd.items()}
    single["spiece_model"] = _spiece_tensor(spm_model)
    save_file(single, str(comfy / COMFY_GEMMA_NAME))
    return {"gemma_hf": hf, "gemma_comfyui": comfy / COMFY_GEMMA_NAME}


def tiny_jina_state_dict(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Random remote-code-named Jina backbone tensors (no prefix) with UNMERGED, non-zero LoRA A/B."""
    g = torch.Generator().manual_seed(seed)
    c = JINA_CFG
    d, f, r = c["hidden_size"], c["intermediate_size"], c["lora_rank"]

    def w(*shape, std=None):
        return torch.randn(*shape, generator=g) * (std if std is not None else shape[-1] ** -0.5)

    sd: dict[str, torch.Tensor] = {}

    def lora_linear(name, out_f, in_f, bias=True):
        sd[name + ".parametrizations.weight.original"] = w(out_f, in_f)
        sd[name + ".parametrizations.weight.0.lora_A"] = w(1, r, in_f, std=0.3)
        sd[name + ".parametrizations.weight.0.lora_B"] = w(1, out_f, r, std=0.3)
        if bias:
            sd[name + ".bias"] = w(out_f, std=0.05)

    def lora_embedding(name, rows):
        sd[name + ".parametrizations.weight.original"] = w(rows, d, std=0.5)
        sd[name + ".parametrizations.weight.0.lora_A"] = w(1, rows, r, std=0.3)
        sd[name + ".parametrizations.weight.0.lora_B"] = w(1, r, d, std=0.3)

    lora_embedding("embeddings.word_embeddings", vocab)
    lora_embedding("embeddings.token_type_embeddings", 1)
    sd["emb_ln.weight"], sd["emb_ln.bias"] = 1 + w(d, std=0.1), w(d, std=0.05)
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        lora_linear(p + "mixer.Wqkv", 3 * d, d)
        lora_linear(p + "mixer.out_proj", d, d)
        lora_linear(p + "mlp.fc1", f, d)
        lora_linear(p + "mlp.fc2", d, f)
        for n in ("norm1", "norm2"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = 1 + w(d, std=0.1), w(d, std=0.05)
    return sd


def premerge_jina(sd: dict[str, torch.Tensor], scaling: float = 1.0) -> dict[str, torch.Tensor]:
    """ComfyUI-style pre-merged copy of `tiny_jina_state_dict` (Linear W+B@A, Embedding W+A@B)."""
    out = {}
    for k, v in sd.items():
        if ".lora_" in k:
            continue
        if k.endswith(".parametrizations.weight.original"):
            base = k[: -len(".parametrizations.weight.original")]
            a = sd[base + ".parametrizations.weight.0.lora_A"][0]
            b = sd[base + ".parametrizations.weight.0.lora_B"][0]
            delta = a @ b if "embeddings" in base else b @ a
            out[base + ".weight"] = (v + scaling * delta).contiguous()
        else:
            out[k] = v.contiguous()
    return out


def write_tiny_jina(root: Path, seed: int = 2) -> dict[str, Path]:
    """Write the tiny Jina CLIP v2 as a HF jina-clip-v2-style folder and a ComfyUI single file; return their paths."""
    root = Path(root)
    spm_model = _train_spm(seed, vocab_size=300, model_type="unigram", bos_id=0, pad_id=1, eos_id=2, unk_id=3,
                           bos_piece="<s>", pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>")
    tok, vocab = _xlmr_tokenizer_json(spm_model)
    sd = tiny_jina_state_dict(vocab, seed)
    c = JINA_CFG

    hf = root / "hf" / "clip_model"
    hf.mkdir(parents=True, exist_ok=True)
    _write_json(hf / "config.json", {
        "architectures": ["JinaCLIPModel"], "model_type": "jina_clip", "add_projections": False,
        "projections_dtype": "float32", "truncate_dim": None,
        "auto_map": {"AutoConfig": "jinaai/jina-clip-implementation--configuration_clip.JinaCLIPConfig",
                     "AutoModel": "jinaai/jina-clip-implementation--modeling_clip.JinaCLIPModel"},
        "text_config": {
            "embed_dim": c["hidden_size"], "hf_model_name_or_path": "jinaai/jina-embeddings-v3",
            "hf_model_config_kwargs": {"load_trained_adapters": False, "lora_adaptations": ["retrieval.query"],
                                       "lora_alpha": c["lora_alpha"], "lora_rank": c["lora_rank"],
                                       "lora_dropout_p": 0.0, "use_flash_attn": False},
            "default_lora_task": "retrieval.query", "pooler_type": "mean_pooler", "proj_type": None, "proj_bias": False},
        "vision_config": {"embed_dim": c["hidden_size"], "width": 8, "layers": 1, "patch_size": 2},
        "torch_dtype": "float32"})
    g = torch.Generator().manual_seed(seed + 100)
    tensors = {"text_model.transformer." + k: v.contiguous() for k, v in sd.items()}
    tensors.update({"vision_model.patch_embed.proj.weight": torch.randn(8, 3, 2, 2, generator=g),
                    "vision_model.cls_token": torch.randn(1, 1, 8, generator=g), "logit_scale": torch.tensor(4.6)})
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(hf / "tokenizer.json"))
    _write_json(hf / "tokenizer_config.json", {
        "tokenizer_class": "XLMRobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
        "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>", "model_max_length": 8194})

    comfy = root / "comfyui" / "text_encoders"
    comfy.mkdir(parents=True, exist_ok=True)
    single = {"model." + k: v for k, v in premerge_jina(sd, c["lora_alpha"] / c["lora_rank"]).items()}
    single["spiece_model"] = _spiece_tensor(spm_model)
    save_file(single, str(comfy / COMFY_JINA_NAME))
    return {"jina_hf": hf, "jina_comfyui": comfy / COMFY_JINA_NAME}

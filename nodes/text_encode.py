"""NewBie Text Encode: positive + negative prompts → core CONDITIONING, through the prompt-embedding cache."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from comfy_api.latest import io, ui

from ..newbie_core.memory import EmbeddingCache, file_identity
from ..newbie_core.text.encode import PromptEmbeddings, encode_cached
from ..newbie_core.text.prompts import SYSTEM_PROMPTS, looks_like_xml, resolve_system_prompt
from ..newbie_core.text.xml_prompt import validate_xml_prompt
from . import _comfy
from .types import NEWBIE_TEXT_ENCODERS

# One cache for the whole server: a prompt seen before (as positive or negative) skips the encoders.
EMBEDDING_CACHE = EmbeddingCache(max_entries=128)
PRESETS = ["auto", "xml", "tags", "demo", "none", "custom"]


def to_conditioning(emb: PromptEmbeddings) -> list:
    """Core CONDITIONING: [[cap_feats [1,L,D], {"attention_mask": [1,L], "pooled_output": [1,Dclip]}]]."""
    dev = _comfy.intermediate_device()
    return [[emb.cap_feats.to(dev), {"attention_mask": emb.cap_mask.to(dev), "pooled_output": emb.pooled.to(dev)}]]


def from_conditioning(cond: list, what: str) -> PromptEmbeddings:
    """PromptEmbeddings from core CONDITIONING (first entry); a missing mask means every token is real."""
    if not cond:
        raise ValueError(f"The {what} conditioning is empty; connect NewBie Text Encode.")
    feats, extra = cond[0][0], cond[0][1]
    mask = extra.get("attention_mask")
    if mask is None:
        mask = torch.ones(feats.shape[:2], dtype=torch.long)
    pooled = extra.get("pooled_output")
    if pooled is None:
        raise ValueError(f"The {what} conditioning has no pooled_output (the Jina vector): encode it with "
                         f"NewBie Text Encode rather than a core CLIP node.")
    return PromptEmbeddings(cap_feats=feats, cap_mask=mask.reshape(feats.shape[:2]), pooled=pooled.reshape(feats.shape[0], -1))


class NewBieTextEncode(io.ComfyNode):
    """Encode positive and negative prompts with Gemma3 (+ system prompt) and Jina CLIP v2."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieTextEncode", display_name="NewBie Text Encode", category="NewBie/conditioning",
            description="Gemma3 per-token features (with the system prompt) + Jina CLIP v2 pooled vector (raw "
                        "prompt), as in the official model. Repeated prompts come from a cache without loading "
                        "the encoders; the encoders are unloaded after encoding unless keep_loaded is on.",
            inputs=[
                NEWBIE_TEXT_ENCODERS.Input("text_encoders", tooltip="From NewBie Text Encoder Loader."),
                io.String.Input("positive", multiline=True, default="",
                                tooltip="Danbooru tags, natural language, or the XML character format."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="Negative prompt. Empty = the official empty negative (no system prompt)."),
                io.Combo.Input("system_prompt", options=PRESETS, default="auto",
                               tooltip="Gemma system prompt. auto: the XML preset for XML prompts, else the tags "
                                       "preset (both from training). custom: use custom_system_prompt."),
                io.String.Input("custom_system_prompt", multiline=True, default="", optional=True,
                                tooltip="Used when system_prompt is 'custom' (prefixed to non-empty prompts)."),
                io.Boolean.Input("keep_loaded", default=False,
                                 tooltip="Keep the encoders on the device after encoding (faster prompt edits, "
                                         "more VRAM)."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive", tooltip="Positive conditioning."),
                     io.Conditioning.Output(display_name="negative", tooltip="Negative conditioning.")],
        )

    @classmethod
    def execute(cls, text_encoders, positive, negative, system_prompt, keep_loaded,
                custom_system_prompt="") -> io.NodeOutput:
        system = custom_system_prompt if system_prompt == "custom" else resolve_system_prompt(system_prompt, positive)
        for text in (positive, negative):  # malformed XML: an error with line and column, not a silent bad image
            if looks_like_xml(text) or (system == SYSTEM_PROMPTS["xml"] and text.lstrip().startswith("<")):
                validate_xml_prompt(text)
        embs, from_cache = encode_prompts_cached(text_encoders, [positive, negative], system, keep_loaded)
        note = f"{from_cache} of 2 prompts from cache; Gemma tokens: {[int(e.cap_mask.sum()) for e in embs]}"
        note += "".join(f"\n{which}: {n}" for which, e in zip(("positive", "negative"), embs) for n in e.notes)
        return io.NodeOutput(to_conditioning(embs[0]), to_conditioning(embs[1]), ui=ui.PreviewText(note))


@contextmanager
def on_device(patcher, encoder, keep_loaded: bool):
    """`encoder` with its weights placed by ComfyUI; unloaded afterwards (also on failure) unless keep_loaded.
    A cancel point. The device cache is not emptied here: once per encoding is enough (encode_prompts_cached)."""
    _comfy.check_interrupt()
    _comfy.load_to_device([patcher], full=True)
    try:
        yield encoder
    finally:
        if not keep_loaded:
            _comfy.unload(patcher, clear_cache=False)


def encode_prompts_cached(enc, prompts: list[str], system: str, keep_loaded: bool) -> tuple[list[PromptEmbeddings], int]:
    """Encode prompts through EMBEDDING_CACHE (newbie_core's cached encoding); returns (embeddings, from cache)."""
    # a replaced file or another Jina token limit → a new key
    identity = (tuple(file_identity(f) for f in enc.files), enc.precision, getattr(enc.jina, "max_length", 512))
    device = enc.gemma_patcher.load_device
    try:
        embs, encoded = encode_cached(prompts, system, EMBEDDING_CACHE, identity,
                                      lambda: on_device(enc.gemma_patcher, enc.gemma, keep_loaded),
                                      lambda: on_device(enc.jina_patcher, enc.jina, keep_loaded),
                                      precision=enc.precision)
    except BaseException as e:  # OOM, cancel, NaN: free what the failure holds; OOM → unload + hint
        _comfy.fail_cleanly(e, "text encoding", device)
        raise
    if encoded and not keep_loaded:
        _comfy.clear_device_cache(device)  # one garbage collection + cache clear per cache miss, not one per model
    return embs, len(prompts) - encoded

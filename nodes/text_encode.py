"""NewBie Text Encode: positive + negative prompts → core CONDITIONING, through the prompt-embedding cache."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..newbie_core import stages
from ..newbie_core.conditioning import conditioning_extras, embeddings_from_conditioning
from ..newbie_core.memory import EmbeddingCache
from ..newbie_core.text.encode import PromptEmbeddings
from ..newbie_core.text.prompts import SYSTEM_PROMPTS, looks_like_xml, resolve_system_prompt
from ..newbie_core.text.xml_prompt import validate_xml_prompt
from ..newbie_core.validate import check_choice
from . import _comfy
from .types import NEWBIE_TEXT_ENCODERS

# One cache for the whole server: a prompt seen before (as positive or negative) skips the encoders.
EMBEDDING_CACHE = EmbeddingCache(max_entries=128)
PRESETS = ["auto", "xml", "tags", "demo", "none", "custom"]


def to_conditioning(emb: PromptEmbeddings) -> list:
    """Core CONDITIONING: [[cap_feats [1,L,D], {"attention_mask": [1,L], "pooled_output": [1,Dclip], ...}]]
    (newbie_core.conditioning.conditioning_extras: also the key ComfyUI-NewBie 0.4.0's native model reads)."""
    dev = _comfy.intermediate_device()
    return [[emb.cap_feats.to(dev), conditioning_extras(emb.cap_mask.to(dev), emb.pooled.to(dev))]]


def from_conditioning(cond: list, what: str) -> PromptEmbeddings:
    """PromptEmbeddings from core CONDITIONING: ours, upstream ComfyUI's native NewBie encoder's, the 0.4.0 fork's;
    core conditioning nodes' results defined or refused (newbie_core.conditioning)."""
    return embeddings_from_conditioning(cond, what)


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
                                 tooltip="Keep the encoders on the device after encoding (ComfyUI manages them "
                                         "like its own models; ~7 GB more VRAM while sampling). Off: they are "
                                         "uploaded from a pinned copy per prompt (encoding took 0.35 s on an H200)."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive", tooltip="Positive conditioning."),
                     io.Conditioning.Output(display_name="negative", tooltip="Negative conditioning.")],
        )

    @classmethod
    def execute(cls, text_encoders, positive, negative, system_prompt, keep_loaded,
                custom_system_prompt="") -> io.NodeOutput:
        check_choice(system_prompt, "system_prompt", PRESETS)  # any other string would silently become custom text
        system = custom_system_prompt if system_prompt == "custom" else resolve_system_prompt(system_prompt, positive)
        for text in (positive, negative):  # malformed XML: an error with line and column, not a silent bad image
            if looks_like_xml(text) or (system == SYSTEM_PROMPTS["xml"] and text.lstrip().startswith("<")):
                validate_xml_prompt(text)
        host = _comfy.ComfyHost(text_encoders=text_encoders, keep_loaded=keep_loaded)
        embs, from_cache = stages.encode(host, EMBEDDING_CACHE, [positive, negative], system)
        note = f"{from_cache} of 2 prompts from cache; Gemma tokens: {[int(e.cap_mask.sum()) for e in embs]}"
        note += "".join(f"\n{which}: {n}" for which, e in zip(("positive", "negative"), embs) for n in e.notes)
        return io.NodeOutput(to_conditioning(embs[0]), to_conditioning(embs[1]), ui=ui.PreviewText(note))

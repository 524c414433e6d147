"""NewBie Prompt Enhance: the loaded Gemma3-4B-it writes the NewBie XML prompt (newbie_core/text/enhance.py)."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..newbie_core import stages
from ..newbie_core.memory import file_identity
from ..newbie_core.text.enhance import EnhanceSettings, PromptCache
from ..newbie_core.text.enhance_prompts import IDEA, MODES
from ..newbie_core.text.lm import SamplingSettings
from . import _comfy
from .types import NEWBIE_TEXT_ENCODERS

# One cache for the whole server: a repeated request returns its prompt without placing Gemma on the device.
PROMPT_CACHE = PromptCache(max_entries=128)


class NewBiePromptEnhance(io.ComfyNode):
    """Turn an idea, a tag list or an XML prompt into a linted NewBie XML prompt with the text encoders' Gemma."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBiePromptEnhance", display_name="NewBie Prompt Enhance", category="NewBie/prompt",
            description="Gemma3-4B-it (already loaded for text encoding; no download, no API) writes the prompt in "
                        "NewBie's XML format. The reply is checked by the pack's XML linter; on an error Gemma gets "
                        "one chance to repair it, and if that fails too the text comes out with the line/column "
                        "error in the report. Repeated requests come from a cache without loading Gemma.",
            inputs=[
                NEWBIE_TEXT_ENCODERS.Input("text_encoders", tooltip="From NewBie Text Encoder Loader (only Gemma is "
                                                                    "used; its precision and device apply)."),
                io.String.Input("idea", multiline=True, default="",
                                tooltip="An idea in words, a Danbooru tag list, or an XML prompt (see mode)."),
                io.Combo.Input("mode", options=list(MODES), default=IDEA,
                               tooltip="idea → xml: write the prompt from a description. tags → xml: sort a tag list "
                                       "into the XML fields. refine xml: fix and tidy an XML prompt. xml → tags: "
                                       "flatten an XML prompt into one tag list (no model needed)."),
                io.Int.Input("max_new_tokens", default=512, min=16, max=4096, step=16,
                             tooltip="Longest reply in tokens; a two-character prompt takes about 250."),
                io.Float.Input("temperature", default=0.7, min=0.0, max=2.0, step=0.05,
                               tooltip="Randomness of the wording. 0 = greedy: the same prompt every time, seed unused."),
                io.Float.Input("top_p", default=0.9, min=0.05, max=1.0, step=0.05,
                               tooltip="Sample only from the most likely tokens that make up this probability mass."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=True,
                             tooltip="Sampling seed: the same seed and settings give the same prompt."),
                io.Boolean.Input("keep_loaded", default=False,
                                 tooltip="Keep Gemma on the device afterwards (faster when NewBie Text Encode follows "
                                         "at once; more VRAM during sampling unless ComfyUI evicts it)."),
                io.Int.Input("characters", default=0, min=0, max=8, optional=True,
                             tooltip="How many characters the prompt must describe (0 = Gemma decides). The linter "
                                     "checks the count."),
                io.Boolean.Input("compiled_decode", default=False, optional=True,
                                 tooltip="Static KV cache with a compiled decode step: about 6× the tokens/s on a GPU "
                                         "(H200: 159 vs 23 per second in bf16) after a one-time compile of about a "
                                         "minute. Off: no compile, slower generation."),
            ],
            outputs=[io.String.Output(display_name="prompt", tooltip="The prompt; connect to NewBie Text Encode's "
                                                                     "positive (system_prompt auto or xml)."),
                     io.String.Output(display_name="report", tooltip="Tokens/s, whether a repair was needed, and the "
                                                                     "linter's result with line and column.")],
        )

    @classmethod
    def execute(cls, text_encoders, idea, mode, max_new_tokens, temperature, top_p, seed, keep_loaded,
                characters=0, compiled_decode=False) -> io.NodeOutput:
        enc = text_encoders
        sampling = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                    cache="static" if compiled_decode else "dynamic")
        settings = EnhanceSettings(mode=mode, characters=characters, sampling=sampling)
        # the content fingerprint taken when Gemma was loaded (a replaced file or another precision → a new key)
        identity = (enc.fingerprints[0] if enc.fingerprints else file_identity(enc.files[0]), enc.precision)
        bar = _comfy.progress_bar(max_new_tokens)

        def on_token(done: int, limit: int) -> None:  # every token: a cancel point and a progress tick
            _comfy.check_interrupt()
            bar.update_absolute(done, limit)

        host = _comfy.ComfyHost(text_encoders=enc, keep_loaded=keep_loaded)
        result = stages.enhance_prompt(host, PROMPT_CACHE, idea, settings, identity, on_token)
        report = result.report()
        return io.NodeOutput(result.prompt, report, ui=ui.PreviewText(f"{report}\n\n{result.prompt}"))

"""NewBie Memory Purge: a passthrough that unloads every model, clears caches and reports memory and models."""
from __future__ import annotations

import json

from comfy_api.latest import io, ui

from . import _comfy
from .text_encode import EMBEDDING_CACHE


def _fmt(snap: dict) -> str:
    parts = [f"RAM used {snap['ram_used_mib']:.0f} MiB"]
    if "vram_free_mib" in snap:
        parts.append(f"VRAM free {snap['vram_free_mib']:.0f}/{snap['vram_total_mib']:.0f} MiB")
    return ", ".join(parts)


class NewBieMemoryPurge(io.ComfyNode):
    """Unload all models (through ComfyUI), collect garbage, empty device caches; pass the input through."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieMemoryPurge", display_name="NewBie Memory Purge", category="NewBie/utils",
            description="Always runs. Unloads every model through ComfyUI's model management, then collects "
                        "garbage and empties the device cache (in that order), and reports memory before → after "
                        "plus every model this pack holds (device, dtype, size). The prompt-embedding cache (RAM "
                        "only, at most 128 prompts) is kept, so the next run skips the text encoders; its size is "
                        "in the report.",
            inputs=[io.AnyType.Input("anything", optional=True,
                                     tooltip="Any value; passed through unchanged. Wire it between stages to "
                                             "purge after one finishes.")],
            outputs=[io.AnyType.Output(display_name="anything", tooltip="The input, unchanged."),
                     io.String.Output(display_name="report", tooltip="The purge report as text (JSON models list).")],
        )

    @classmethod
    def fingerprint_inputs(cls, anything=None):
        """Never cached: a purge must run every time."""
        return float("nan")

    @classmethod
    def execute(cls, anything=None) -> io.NodeOutput:
        before = _comfy.memory_snapshot()
        _comfy.purge_all()
        after = _comfy.memory_snapshot()
        models = _comfy.pack_models()
        cache = {"entries": len(EMBEDDING_CACHE), "mib": round(EMBEDDING_CACHE.nbytes() / 2**20, 2),
                 "max_entries": EMBEDDING_CACHE.max_entries}
        # The first three lines are all the node shows at its default size: the summary goes there.
        loaded = sum(1 for m in models if m["loaded_by_comfyui"])
        lines = [f"after: {_fmt(after)}",
                 f"NewBie models: {len(models)} held, {loaded} loaded; prompt cache kept: {cache['entries']} prompts",
                 f"before: {_fmt(before)}", "models held by NewBie nodes:"]
        lines += [f"  {m['model']}: {', '.join(m['dtypes'])} on {', '.join(m['devices'])}, {m['size_mib']} MiB"
                  + (" (loaded)" if m["loaded_by_comfyui"] else "") for m in models] or ["  (none)"]
        lines.append(f"prompt-embedding cache (kept, RAM only): {cache['entries']} of {cache['max_entries']} "
                     f"prompts, {cache['mib']} MiB")
        text = "\n".join(lines)
        report = json.dumps({"before": before, "after": after, "models": models, "embedding_cache": cache})
        return io.NodeOutput(anything, report, ui=ui.PreviewText(text))

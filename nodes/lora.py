"""LoRA nodes: add LoRA / LoKr files (PEFT, LyCORIS, kohya, ComfyUI, diffusers keys) to a NewBie DiT MODEL.

Chainable and undoable: each node returns a patched clone of its input MODEL (ComfyUI's ModelPatcher); bypassing
it or changing the strength gives back the original weights bit for bit. Formats, alpha rules: newbie_core.lora.
"""
from __future__ import annotations

from comfy_api.latest import io, ui

from . import _comfy

MULTI_SLOTS = 5
NONE = "None"
LORA_TIP = ("A LoRA/LoKr .safetensors from models/loras trained for NewBie-image (official trainer PEFT or LyCORIS "
            "LoKr, kohya lora_unet_, ComfyUI diffusion_model., diffusers transformer. keys).")
STRENGTH_TIP = ("Multiplier on the LoRA's delta (after its alpha/rank scale). 1 = as trained, 0 = off, "
                "negative values invert it.")


def _strength(default: float = 1.0, name: str = "strength"):
    return io.Float.Input(name, default=default, min=-10.0, max=10.0, step=0.05, tooltip=STRENGTH_TIP)


def _check_model(model) -> None:
    from ..newbie_core.errors import InputError

    if not isinstance(getattr(model, "model", None), _comfy.NewBieBaseModel):
        raise InputError("NewBie LoRA Loader needs the MODEL of a NewBie DiT Loader; for other models use core "
                         "'LoraLoaderModelOnly'.")


def apply_chain(model, items: list[tuple[str, float]]) -> tuple[object, list[str]]:
    """Add each (lora_name, strength) in turn; returns the patched MODEL and one report line per file."""
    _check_model(model)
    lines = []
    for name, strength in items:
        path = _comfy.resolve_model("loras", name, "a NewBie-image LoRA / LoKr .safetensors file")
        model, report = _comfy.add_lora(model, path, strength)
        lines.append(report.summary())
    return model, lines


class NewBieLoraLoader(io.ComfyNode):
    """One LoRA/LoKr file on the NewBie DiT; chain several nodes for several files (their deltas add)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieLoraLoader", display_name="NewBie LoRA Loader", category="NewBie/loaders",
            description="Adds a LoRA or LoKr to the NewBie DiT: W + strength · (alpha/rank) · ΔW, added in fp32 to "
                        "the full-precision weight (fp8 re-quantised). Reports the format, the alpha source and how "
                        "many layers matched; a file for another model family is an error naming it.",
            inputs=[
                io.Model.Input("model", tooltip="The NewBie DiT MODEL (from NewBie DiT Loader or another LoRA node)."),
                io.Combo.Input("lora_name", options=_comfy.model_choices("loras"), tooltip=LORA_TIP),
                _strength(),
            ],
            outputs=[io.Model.Output(tooltip="The DiT with the LoRA; the input MODEL is left unchanged.")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        patched, lines = apply_chain(model, [(lora_name, strength)])
        return io.NodeOutput(patched, ui=ui.PreviewText("\n".join(lines)))


class NewBieLoraLoaderMulti(io.ComfyNode):
    """Up to five LoRA/LoKr files on the NewBie DiT in one node ('None' slots are skipped)."""

    @classmethod
    def define_schema(cls):
        choices = [NONE] + [c for c in _comfy.model_choices("loras") if c != "(no files found)"]
        inputs = [io.Model.Input("model", tooltip="The NewBie DiT MODEL (from NewBie DiT Loader).")]
        for i in range(1, MULTI_SLOTS + 1):
            inputs += [io.Combo.Input(f"lora_{i}", options=choices, default=NONE,
                                      tooltip=f"LoRA slot {i}; 'None' skips it. " + LORA_TIP),
                       _strength(name=f"strength_{i}")]
        return io.Schema(
            node_id="NewBieLoraLoaderMulti", display_name="NewBie LoRA Loader (Multi)", category="NewBie/loaders",
            description="Adds up to five LoRA/LoKr files to the NewBie DiT; their deltas add. Same rules as "
                        "NewBie LoRA Loader.",
            inputs=inputs,
            outputs=[io.Model.Output(tooltip="The DiT with every chosen LoRA; the input MODEL is left unchanged.")],
        )

    @classmethod
    def execute(cls, model, **slots) -> io.NodeOutput:
        items = [(slots[f"lora_{i}"], slots[f"strength_{i}"]) for i in range(1, MULTI_SLOTS + 1)
                 if slots.get(f"lora_{i}", NONE) != NONE]
        patched, lines = apply_chain(model, items)
        return io.NodeOutput(patched, ui=ui.PreviewText("\n".join(lines) or "no LoRA chosen"))

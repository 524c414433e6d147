"""XML prompt builder nodes: a character block, the general-tags block, and an assembler that validates."""
from __future__ import annotations

from comfy_api.latest import io

from ..newbie_core.text.xml_prompt import assemble_xml_prompt, character_block, general_tags_block, validate_xml_prompt

CHARACTER_TIPS = {
    "name": "Character name tag, e.g. hatsune_miku (empty for an original character).",
    "gender": "1girl, 1boy, ...",
    "appearance": "Hair, eyes, body: comma-separated danbooru tags.",
    "clothing": "Outfit tags.",
    "expression": "Face and mood tags (smile, blush, ...).",
    "action": "Pose and action tags.",
    "interaction": "What the character does with others (optional).",
    "position": "Where in the picture: left, center_left, center, center_right, right, ...",
}
GENERAL_TIPS = {
    "count": "Number of characters, e.g. 2girls.", "artists": "Artist tags.", "style": "Style tags.",
    "background": "Background tags.", "environment": "Place and setting.", "perspective": "Camera and framing.",
    "atmosphere": "Mood tags.", "lighting": "Lighting tags.", "quality": "Quality tags (masterpiece, best_quality).",
    "objects": "Objects in the scene.", "other": "Anything else.",
}


class NewBieXMLCharacter(io.ComfyNode):
    """Build one <character_N> block."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieXMLCharacter", display_name="NewBie XML Character", category="NewBie/prompt",
            description="One <character_N> block of the NewBie XML prompt format (<n> and <gender> always written).",
            inputs=[io.Int.Input("index", default=1, min=1, max=8, tooltip="N in <character_N>.")]
            + [io.String.Input(k, default="1girl" if k == "gender" else "", multiline=k not in ("name", "gender", "position"),
                               tooltip=tip) for k, tip in CHARACTER_TIPS.items()],
            outputs=[io.String.Output(display_name="character", tooltip="The XML block; connect to NewBie XML Assemble.")],
        )

    @classmethod
    def execute(cls, index, name, gender, appearance, clothing, expression, action, interaction, position) -> io.NodeOutput:
        return io.NodeOutput(character_block(index, name, gender, appearance, clothing, expression, action,
                                             interaction, position, indent="  "))


class NewBieXMLGeneralTags(io.ComfyNode):
    """Build the <general_tags> block."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieXMLGeneralTags", display_name="NewBie XML General Tags", category="NewBie/prompt",
            description="The <general_tags> block; empty fields are left out.",
            inputs=[io.String.Input(k, default="", tooltip=tip) for k, tip in GENERAL_TIPS.items()],
            outputs=[io.String.Output(display_name="general_tags", tooltip="The XML block.")],
        )

    @classmethod
    def execute(cls, **fields) -> io.NodeOutput:
        return io.NodeOutput(general_tags_block(indent="  ", **fields))


class NewBieXMLAssemble(io.ComfyNode):
    """Join character blocks and general tags into one prompt and validate it."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieXMLAssemble", display_name="NewBie XML Assemble", category="NewBie/prompt",
            description="Joins the blocks (README form: no root tag) and checks the XML; a malformed block is "
                        "reported with its line and column.",
            inputs=[io.String.Input(f"character_{i}", force_input=True, optional=True,
                                    tooltip=f"Block from NewBie XML Character (character {i}).") for i in range(1, 5)]
            + [io.String.Input("general_tags", force_input=True, optional=True,
                               tooltip="Block from NewBie XML General Tags."),
               io.String.Input("extra", multiline=True, default="", optional=True,
                               tooltip="Extra XML or tags appended at the end (validated too).")],
            outputs=[io.String.Output(display_name="prompt", tooltip="The XML prompt; connect to NewBie Text Encode's positive.")],
        )

    @classmethod
    def execute(cls, character_1=None, character_2=None, character_3=None, character_4=None, general_tags=None,
                extra="") -> io.NodeOutput:
        chars = [c for c in (character_1, character_2, character_3, character_4) if c]
        prompt = assemble_xml_prompt(chars, general_tags)
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra.strip()}" if prompt else extra.strip()
        validate_xml_prompt(prompt)
        return io.NodeOutput(prompt)

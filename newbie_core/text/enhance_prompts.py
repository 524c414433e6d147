"""What Gemma is told when it writes NewBie prompts: the instructions, one worked example per mode, the
user message of each mode and the repair request, and Gemma's chat format as token ids.

The schema is the README form of spec §6 (`<character_N>` blocks with `<n>`, `<gender>`, …, then one
`<general_tags>` block; comma-separated Danbooru tags with underscores; no root, no escaping), with the
field names and order of `xml_prompt.CHARACTER_FIELDS` / `GENERAL_FIELDS`.
"""
from __future__ import annotations

from ..errors import InputError
from .xml_prompt import CHARACTER_FIELDS, GENERAL_FIELDS

IDEA, TAGS, REFINE, TO_TAGS = "idea → xml", "tags → xml", "refine xml", "xml → tags"
MODES = (IDEA, TAGS, REFINE, TO_TAGS)
_ALIASES = {"idea": IDEA, "idea->xml": IDEA, "tags": TAGS, "tags->xml": TAGS, "refine": REFINE,
            "refine-xml": REFINE, "xml->tags": TO_TAGS, "to-tags": TO_TAGS, "xml-to-tags": TO_TAGS}

INSTRUCTIONS = f"""You write image prompts for NewBie-image, an anime text-to-image model trained on prompts in this XML format:

<character_1>
<n>name</n>
<gender>1girl</gender>
<appearance>tags</appearance>
<clothing>tags</clothing>
<expression>tags</expression>
<action>tags</action>
<position>center</position>
</character_1>

<general_tags>
<count>1girl, solo</count>
<style>tags</style>
<background>tags</background>
<quality>tags</quality>
</general_tags>

Rules:
- One <character_N> block per character, numbered from 1, then one <general_tags> block. No other top-level tags, no root tag, no XML declaration, no attributes, no comments.
- Character fields, in this order: {", ".join(CHARACTER_FIELDS)}. <n> and <gender> are always written; leave out a field that would be empty.
- general_tags fields, in this order, only those that apply: {", ".join(GENERAL_FIELDS)}.
- Every value is a list of Danbooru tags separated by ", ": lower case, underscores instead of spaces (long_hair, school_uniform, looking_at_viewer). Never write sentences.
- <n> is the character's Danbooru name tag (hatsune_miku), or original for a new character. <gender> is 1girl, 1boy or 1other. <interaction> holds what two characters do together. <position> is where the character stands: center, center_left, center_right, left, right, foreground or background.
- <count> counts the characters (1girl, 2girls, 1boy, 1girl_1boy, multiple_girls) and adds solo for one character.
- Reply with the XML only: no explanation, no code fence."""

_EXAMPLES = {
    IDEA: (
        "a girl with long silver hair reading a book in a library at night, warm lamp light",
        """<character_1>
<n>original</n>
<gender>1girl</gender>
<appearance>long_hair, silver_hair, blue_eyes</appearance>
<clothing>white_shirt, cardigan, pleated_skirt</clothing>
<expression>calm, closed_mouth</expression>
<action>reading, holding_book, sitting</action>
<position>center</position>
</character_1>

<general_tags>
<count>1girl, solo</count>
<style>anime_style</style>
<background>library, bookshelf, indoors, night</background>
<atmosphere>quiet, cozy</atmosphere>
<lighting>lamp_light, warm_lighting</lighting>
<quality>masterpiece, best_quality</quality>
<objects>book, desk_lamp</objects>
</general_tags>"""),
    TAGS: (
        "2girls, hatsune_miku, kagamine_rin, aqua_hair, twintails, blonde_hair, short_hair, holding_hands, smile, "
        "stage, concert, spotlight, masterpiece",
        """<character_1>
<n>hatsune_miku</n>
<gender>1girl</gender>
<appearance>aqua_hair, twintails</appearance>
<expression>smile</expression>
<interaction>holding_hands</interaction>
<position>center_left</position>
</character_1>

<character_2>
<n>kagamine_rin</n>
<gender>1girl</gender>
<appearance>blonde_hair, short_hair</appearance>
<expression>smile</expression>
<interaction>holding_hands</interaction>
<position>center_right</position>
</character_2>

<general_tags>
<count>2girls</count>
<background>stage, concert</background>
<lighting>spotlight</lighting>
<quality>masterpiece</quality>
</general_tags>"""),
    REFINE: (
        """<character_1>
<n>original</n>
<gender>1boy</gender>
<appearance>black hair, short hair, red eyes</appearance>
<clothing>black coat</clothing>
<action>standing in the rain, holding umbrella</action>

<general_tags>
<count>1boy</count>
<background>city street, rain, night</background>
</general_tags>""",
        """<character_1>
<n>original</n>
<gender>1boy</gender>
<appearance>black_hair, short_hair, red_eyes</appearance>
<clothing>black_coat</clothing>
<expression>serious</expression>
<action>standing, holding_umbrella</action>
<position>center</position>
</character_1>

<general_tags>
<count>1boy, solo</count>
<background>city, street, night, rain</background>
<atmosphere>melancholic</atmosphere>
<quality>masterpiece, best_quality</quality>
</general_tags>"""),
}


def parse_mode(name: str) -> str:
    """The canonical mode name for `name` (one of MODES, or a CLI alias such as "idea", "tags", "refine",
    "to-tags"); InputError listing the choices otherwise."""
    key = str(name).strip()
    if key in MODES:
        return key
    key = key.lower().replace(" ", "").replace("→", "->").replace("_", "-")
    if key in _ALIASES:
        return _ALIASES[key]
    raise InputError(f"Unknown prompt enhance mode {name!r}: choose one of {', '.join(MODES)} "
                     f"(command line: idea, tags, refine, to-tags).")


def user_message(mode: str, text: str, characters: int = 0) -> str:
    """The request for one mode; `characters` > 0 asks for exactly that many `<character_N>` blocks."""
    hint = ""
    if characters > 0:
        hint = (f"\nThe image shows exactly {characters} character{'s' if characters > 1 else ''}: write "
                + ("<character_1>" if characters == 1 else f"<character_1> to <character_{characters}>") + ".")
    if mode == IDEA:
        ask = ("Write the NewBie XML prompt for this image idea. Keep everything the idea says; add the usual "
               "details (hair, eyes, clothing, background) only where it leaves them open.")
        return f"{ask}{hint}\n\nIdea: {text.strip()}"
    if mode == TAGS:
        ask = ("Sort these Danbooru tags into the NewBie XML prompt. Put every tag in the field it belongs to (a "
               "tag that fits several characters goes to each of them); add only <n>, <gender>, <count> and "
               "<position> values.")
        return f"{ask}{hint}\n\nTags: {text.strip()}"
    if mode == REFINE:
        ask = ("Improve this NewBie XML prompt: fix its structure, write every value as Danbooru tags, move tags "
               "into the right fields, keep its content.")
        return f"{ask}{hint}\n\n{text.strip()}"
    raise InputError(f"Mode {mode!r} does not ask Gemma.")


def conversation(mode: str, text: str, characters: int = 0) -> list[tuple[str, str]]:
    """`[(role, text)…]` for Gemma: instructions + the mode's example as a first exchange, then the request."""
    example_in, example_out = _EXAMPLES[mode]
    first = f"{INSTRUCTIONS}\n\n{user_message(mode, example_in)}"
    return [("user", first), ("model", example_out), ("user", user_message(mode, text, characters))]


def repair_turns(reply: str, error: str) -> list[tuple[str, str]]:
    """The turns that ask Gemma to fix its own reply: the reply, then the linter's error."""
    return [("model", reply),
            ("user", f"That prompt has an error:\n{error}\n\nWrite the whole prompt again without this error. "
                     f"Reply with the XML only.")]


_SPECIALS = ("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>")


def chat_ids(tokenizer, turns: list[tuple[str, str]], bos_id: int = 2) -> list[int]:
    """Token ids of Gemma's chat format, ending with the opened model turn:
    `<bos><start_of_turn>user\\n…<end_of_turn>\\n<start_of_turn>model\\n…<end_of_turn>\\n<start_of_turn>model\\n`.

    The turn markers are inserted as their special ids (whatever the tokenizer backend does with them in
    text); a tokenizer without them (the tiny test models) gets them as plain text. Marker strings inside
    the user's text are removed, so an idea cannot close a turn.
    """
    start, end = tokenizer.token_to_id("<start_of_turn>"), tokenizer.token_to_id("<end_of_turn>")

    def marker(token_id, text):
        return [token_id] if token_id is not None else tokenizer.encode([text])[0]

    def text_ids(text):
        for s in _SPECIALS:
            text = text.replace(s, "")
        return tokenizer.encode([text])[0] if text else []

    ids = [bos_id]
    for role, text in turns:
        ids += marker(start, "<start_of_turn>") + text_ids(f"{role}\n{text}") + marker(end, "<end_of_turn>")
        ids += text_ids("\n")
    return ids + marker(start, "<start_of_turn>") + text_ids("model\n")


def stop_ids(tokenizer, eos_id: int = 1) -> list[int]:
    """Tokens that end Gemma's reply: `<end_of_turn>` (when the tokenizer has it) and `<eos>`."""
    end = tokenizer.token_to_id("<end_of_turn>")
    return [eos_id] + ([end] if end is not None else [])

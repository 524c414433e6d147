"""NewBie XML prompts (spec §6): build character / general-tag blocks, assemble them, validate them.

README form (no root tag), blocks separated by a blank line:

    <character_1>
    <n>name</n>
    <gender>1girl</gender>
    <appearance>blue_hair, long_hair</appearance>
    ...
    </character_1>

    <general_tags>
    <count>1girl, solo</count>
    <style>anime_style</style>
    ...
    </general_tags>

Values are comma-separated danbooru tags, kept as typed (underscores, `:`, `\\(` included); they are
not XML-escaped, because the model was trained on the raw text. The validator therefore tolerates a
bare `&` and a `<` that cannot start a tag (e.g. the `>_<` emoticon tag), and reports real structural
errors (unclosed or mismatched tags, malformed tags) as InputError with line, column and the line text.
Use the XML system prompt (`prompts.SYSTEM_PROMPTS["xml"]`) with these prompts.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from ..errors import InputError

# <n> and <gender> are always written (README, official builder); the others only when non-empty.
CHARACTER_FIELDS = ("n", "gender", "appearance", "clothing", "expression", "action", "interaction", "position")
# README fields plus the official ComfyUI builder's extra ones, in the builder's order.
GENERAL_FIELDS = ("count", "body_type", "artists", "style", "background", "environment", "perspective",
                  "atmosphere", "lighting", "quality", "objects", "other", "extra_tags")

# Validation is linear in the prompt length (no backtracking regex: the old tag pattern took minutes on
# "<a>b</a> <c" + 3,000 spaces, holding the GIL, so ComfyUI answered no request) and refuses prompts longer
# than MAX_XML_CHARS (256 Ki characters, ~100x the longest real prompt; Gemma reads at most a few thousand
# tokens) before any work.
MAX_XML_CHARS = 256 * 1024
_NAME_AT = re.compile(r"[A-Za-z_][\w.\-]*")  # anchored with .match(): linear in the name's length
_SPACE = frozenset(" \t\n\r\f\v")
_BARE_LT = re.compile(r"<(?![A-Za-z_/!?])")
_BARE_AMP = re.compile(r"&(?!(?:[A-Za-z]+|#\d+|#x[0-9A-Fa-f]+);)")


def format_tags(value) -> str:
    """A tag value as text: lists/tuples joined with ", ", surrounding whitespace and newlines tidied."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v).strip() for v in value if str(v).strip())
    return " ".join(str(value).split())


def _block(tag: str, fields: list[tuple[str, str]], indent: str) -> str:
    lines = [f"<{tag}>"] + [f"{indent}<{k}>{v}</{k}>" for k, v in fields] + [f"</{tag}>"]
    return "\n".join(lines)


def character_block(index: int, name: str = "", gender: str = "1girl", appearance="", clothing="", expression="",
                    action="", interaction="", position="", indent: str = "") -> str:
    """One `<character_N>` block; `<n>` and `<gender>` always present, other fields only when non-empty."""
    if int(index) < 1:
        raise InputError(f"Character numbers start at 1 (got {index}).")
    values = {"n": format_tags(name), "gender": format_tags(gender) or "1girl", "appearance": appearance,
              "clothing": clothing, "expression": expression, "action": action, "interaction": interaction,
              "position": position}
    fields = [(k, format_tags(values[k])) for k in CHARACTER_FIELDS]
    fields = [(k, v) for k, v in fields if v or k in ("n", "gender")]
    return _block(f"character_{int(index)}", fields, indent)


def general_tags_block(indent: str = "", **values) -> str:
    """The `<general_tags>` block from keyword fields (see GENERAL_FIELDS); empty fields are left out."""
    unknown = sorted(set(values) - set(GENERAL_FIELDS))
    if unknown:
        raise InputError(f"Unknown general_tags field(s) {unknown}; allowed: {', '.join(GENERAL_FIELDS)}.")
    fields = [(k, format_tags(values.get(k))) for k in GENERAL_FIELDS]
    return _block("general_tags", [(k, v) for k, v in fields if v], indent)


def assemble_xml_prompt(characters=(), general_tags: str | None = None, caption: str = "", style_prefix: str = "",
                        root: str | None = None) -> str:
    """Join blocks into one prompt.

    Default: the README form (blocks separated by a blank line, no root). `root="image"` wraps the blocks
    (after a `<caption>`) in `<image>…</image>` like the official ComfyUI assembler; `style_prefix` puts a
    `<style>…</style>` line and a blank line on top (the official assembler's default was "style of mikozin").
    """
    blocks = [b.strip() for b in list(characters) + [general_tags] if b and b.strip()]
    if root:
        inner = ([f"<caption>{format_tags(caption)}</caption>"] if caption or root == "image" else []) + blocks
        body = f"<{root}>\n" + "\n".join(inner) + f"\n</{root}>"
    else:
        body = "\n\n".join(([f"<caption>{format_tags(caption)}</caption>"] if caption else []) + blocks)
    if style_prefix and style_prefix.strip():
        body = f"<style>{format_tags(style_prefix)}</style>\n\n" + body
    return body


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _error(prompt: str, line: int, col: int, what: str) -> InputError:
    """The error with line and column (also in words, and a `here: …▶…` excerpt: ComfyUI's error dialog collapses
    the spaces that align the ^ caret under the quoted line)."""
    lines = prompt.splitlines() or [""]
    line = max(1, min(line, len(lines)))
    text = lines[line - 1]
    col = max(1, min(col, len(text) + 1))
    at = repr(text[col - 1]) if col <= len(text) else "the end of the line"
    if len(text) > 200:  # a long line: quote 200 characters around the column
        start = max(0, col - 100)
        text, col = text[start:start + 200], col - start
    near = f"{'…' if col > 21 else ''}{text[max(0, col - 21):col - 1]}▶{text[col - 1:col + 19]}{'…' if col + 19 < len(text) else ''}"
    return InputError(f"XML prompt error at line {line}, column {col}: {what} (column {col} = the {_ordinal(col)} "
                      f"character of line {line}, at {at})\n  {text}\n  {' ' * (col - 1)}^\n  here: {near}")


def _line_col(prompt: str, offset: int) -> tuple[int, int]:
    line = prompt.count("\n", 0, offset) + 1
    return line, offset - (prompt.rfind("\n", 0, offset) + 1) + 1


def scan_tags(prompt: str):
    """Yield (start, closing, name, self_closing) for each tag `<name ...>`, `</name>`, `<name/>` in one
    left-to-right pass: every character is looked at a bounded number of times (the scan for a tag's end stops
    at the next '<', where the next candidate starts)."""
    n, i = len(prompt), prompt.find("<")
    while i != -1:
        j = i + 1
        closing = j < n and prompt[j] == "/"
        if closing:
            j += 1
        m = _NAME_AT.match(prompt, j)
        end = -1
        if m:
            j = m.end()
            if j < n and prompt[j] == ">":
                end = j
            elif j + 1 < n and prompt[j] == "/" and prompt[j + 1] == ">":
                end = j + 1
            elif j < n and prompt[j] in _SPACE:
                nxt_gt, nxt_lt = prompt.find(">", j), prompt.find("<", j)
                if nxt_gt != -1 and (nxt_lt == -1 or nxt_gt < nxt_lt):
                    end = nxt_gt
        if end == -1:
            i = prompt.find("<", i + 1)
            continue
        yield i, closing, m.group(0), prompt[end - 1] == "/" and end - 1 > m.start()
        i = prompt.find("<", end + 1)


def validate_xml_prompt(prompt: str) -> ET.Element:
    """Check an XML-style prompt; return its parsed tree under a synthetic `<prompt>` root.

    Raises InputError naming line, column and the offending line for unclosed, mismatched or malformed tags.
    """
    if not isinstance(prompt, str):
        raise InputError(f"The XML prompt must be text (got {type(prompt).__name__}).")
    if len(prompt) > MAX_XML_CHARS:
        raise InputError(f"The XML prompt is {len(prompt):,} characters long; XML prompts are checked up to "
                         f"{MAX_XML_CHARS:,} characters. Shorten it (the text encoder reads only the first few "
                         f"thousand tokens anyway).")
    stack: list[tuple[str, int]] = []
    for start, closing, name, selfclose in scan_tags(prompt):
        if selfclose:
            continue
        if not closing:
            stack.append((name, start))
            continue
        if not stack:
            raise _error(prompt, *_line_col(prompt, start), f"</{name}> closes a tag that was never opened.")
        open_name, open_at = stack.pop()
        if open_name != name:
            cl, cc = _line_col(prompt, start)
            raise _error(prompt, *_line_col(prompt, open_at),
                         f"<{open_name}> is not closed before </{name}> (line {cl}, column {cc}); "
                         f"add </{open_name}> or fix the tag name.")
    if stack:
        name, at = stack[-1]
        raise _error(prompt, *_line_col(prompt, at), f"<{name}> is never closed (add </{name}>).")
    # Structural errors the scan above cannot see (bad attributes, stray '<', …) come from the real parser.
    lenient = _BARE_AMP.sub("&amp;", _BARE_LT.sub("&lt;", prompt))
    wrapped = "<prompt>\n" + lenient + "\n</prompt>"
    try:
        return ET.fromstring(wrapped)
    except ET.ParseError as e:
        line, col = e.position
        msg = str(e).split(":")[0]
        last_lt = prompt.rfind("<")
        if line - 1 > prompt.count("\n") + 1 and last_lt != -1 and prompt.find(">", last_lt) == -1:
            # the parser only noticed in the wrapper's closing tag: point at the '<' that was never finished
            raise _error(prompt, *_line_col(prompt, last_lt), "this '<' starts a tag that is never finished with '>' "
                         "(finish the tag, or remove the '<')") from None
        raise _error(prompt, line - 1, col + 1, msg) from None


def parse_xml_prompt(prompt: str) -> dict:
    """`{"characters": [{field: text}...], "general_tags": {field: text}, "other": {tag: text}}` of a valid prompt."""
    root = validate_xml_prompt(prompt)
    nodes = list(root)
    if len(nodes) == 1 and nodes[0].tag == "image":
        nodes = list(nodes[0])
    out: dict = {"characters": [], "general_tags": {}, "other": {}}
    for el in nodes:
        fields = {c.tag: (c.text or "").strip() for c in el}
        if re.fullmatch(r"character_\d+", el.tag):
            out["characters"].append(fields)
        elif el.tag == "general_tags":
            out["general_tags"] = fields
        else:
            out["other"][el.tag] = (el.text or "").strip() if not len(el) else fields
    return out

"""Prompt enhancement: an idea, a tag list or an XML prompt → a NewBie XML prompt written by the loaded Gemma.

    result = enhance("two knights on a bridge at dawn", EnhanceSettings(), session, identity, cache)
    result.prompt   # the XML (or tags); result.valid / result.error (line and column); result.report()

`session()` is the host's: a context manager yielding the `GemmaTextEncoder` placed on its device for the
text stage (ComfyUI: `load_models_gpu` on its patcher; CLI: the pipeline's StagedModel), released on exit.
Gemma sees `enhance_prompts.conversation` in its chat format and writes until `<end_of_turn>` or
`max_new_tokens` (`lm.generate_ids`). The reply is extracted (code fences and chatter around the XML
dropped), then linted: `xml_prompt.validate_xml_prompt` for the syntax, `lint_structure` for the schema
(known blocks and fields, `<n>`/`<gender>`, characters numbered 1..N, the requested count). On an error Gemma
is shown it once and asked to rewrite; if the rewrite fails too, the text is returned with the error
(`valid` False): never a silently broken prompt. `xml → tags` needs no model: the XML is parsed and its tags
joined. Results are cached under (text, mode, settings, seed when sampling, model identity); a hit
never enters `session`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import OrderedDict
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..errors import InputError
from .enhance_prompts import IDEA, MODES, REFINE, TAGS, TO_TAGS, chat_ids, conversation, parse_mode, repair_turns, stop_ids
from .lm import SamplingSettings, generate_ids, generation_head
from .xml_prompt import CHARACTER_FIELDS, GENERAL_FIELDS, parse_xml_prompt, validate_xml_prompt

log = logging.getLogger(__name__)
__all__ = ["EnhanceSettings", "EnhanceResult", "PromptCache", "enhance", "extract_reply", "lint", "xml_to_tags", "MODES",
           "IDEA", "TAGS", "REFINE", "TO_TAGS"]

_BLOCK = r"character_\d+|general_tags|caption|style|image"
_OPEN = re.compile(rf"<({_BLOCK})>")
_CLOSE = re.compile(rf"</({_BLOCK})\s*>")
_FENCE = re.compile(r"```[\w-]*\n?(.*?)(?:```|$)", re.S)
_ANY_TAG = re.compile(r"</?[A-Za-z_][\w.-]*\s*/?>")


@dataclass(frozen=True)
class EnhanceSettings:
    """One enhancement request's settings: mode (see MODES), character count hint (0 = Gemma decides),
    token sampling, and whether one repair round is allowed."""

    mode: str = IDEA
    characters: int = 0
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    repair: bool = True

    def key(self) -> tuple:
        """The part of the cache key these settings make (the seed only counts when sampling)."""
        s = self.sampling
        seed = None if s.greedy else int(s.seed)
        sampling = (int(s.max_new_tokens), 0.0 if s.greedy else float(s.temperature), float(s.top_p), int(s.top_k), seed)
        return (parse_mode(self.mode), int(self.characters), sampling, bool(self.repair))


@dataclass
class EnhanceResult:
    """The prompt written (ready for NewBie Text Encode), whether it passed the linter, the linter's error
    (line/column) if not, what happened on the way, and the generation's measurements."""

    prompt: str
    valid: bool
    mode: str
    error: str = ""
    repaired: bool = False
    first_error: str = ""
    new_tokens: int = 0
    seconds: float = 0.0
    first_token_s: float = 0.0
    tokens_per_s: float = 0.0
    cut: bool = False
    from_cache: bool = False
    used_model: bool = True

    def report(self) -> str:
        """A few lines for the node's report output / the CLI's stderr."""
        lines = []
        if self.from_cache:
            lines.append("from the prompt cache (Gemma not loaded)")
        if not self.used_model:
            lines.append(f"{self.mode}: converted without Gemma")
        elif not self.from_cache:
            lines.append(f"{self.mode}: {self.new_tokens} new tokens in {self.seconds:.2f} s "
                         f"(first token after {self.first_token_s:.2f} s, then {self.tokens_per_s:.1f} tokens/s)")
        if self.cut:
            lines.append("the reply reached max_new_tokens and was cut: raise max_new_tokens")
        if self.repaired:
            lines.append(f"Gemma's first reply failed the linter and was repaired ({_first_line(self.first_error)})")
        if self.valid:
            lines.append(f"lint: ok ({_summary(self.prompt, self.mode)})")
        else:
            again = " after one repair round" if self.first_error else ""
            lines.append(f"lint: FAILED{again}; the text is returned as written. Fix it by hand, run again with "
                         f"another seed, or raise max_new_tokens.\n{self.error}")
        return "\n".join(lines)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _summary(prompt: str, mode: str) -> str:
    if mode == TO_TAGS:
        return f"{len([t for t in prompt.split(',') if t.strip()])} tags"
    parsed = parse_xml_prompt(prompt)
    n = len(parsed["characters"])
    return f"{n} character{'s' if n != 1 else ''}" + (", general_tags" if parsed["general_tags"] else "")


# ------------------------------------------------------------------------------------------------ reply → prompt
def extract_reply(text: str, mode: str) -> str:
    """The prompt inside Gemma's reply: the first code fence's content if any, then (XML modes) from the first
    block tag to the last block's closing tag; trailing spaces removed from every line."""
    t = text.strip()
    fence = _FENCE.search(t)
    if fence:
        t = fence.group(1).strip()
    if parse_mode(mode) != TO_TAGS:
        first, closes = _OPEN.search(t), list(_CLOSE.finditer(t))
        if first:
            end = closes[-1].end() if closes and closes[-1].end() > first.start() else len(t)
            t = t[first.start():end]
    else:
        t = " ".join(t.split())
    return "\n".join(line.rstrip() for line in t.strip().splitlines())


def _error_at(prompt: str, offset: int, what: str) -> str:
    """The linter's message shape (xml_prompt's): line, column, the line and a caret."""
    offset = max(0, min(offset, len(prompt)))
    line = prompt.count("\n", 0, offset) + 1
    col = offset - (prompt.rfind("\n", 0, offset) + 1) + 1
    text = (prompt.splitlines() or [""])[line - 1] if prompt else ""
    return f"XML prompt error at line {line}, column {col}: {what}\n  {text}\n  {' ' * (col - 1)}^"


def _find_tag(prompt: str, name: str, start: int) -> int:
    """Offset of the next `<name` opening tag (not a longer name) from `start`; `start` when none."""
    m = re.compile(rf"<{re.escape(name)}(?![\w.-])").search(prompt, start)
    return m.start() if m else start


def lint_structure(prompt: str, characters: int = 0) -> str:
    """Schema errors of a syntactically valid XML prompt ("" when none): unknown blocks or fields, text outside
    a field, a character without `<n>`/`<gender>`, characters not numbered 1..N, a count other than
    `characters` (> 0), more than one `<general_tags>`, no block at all."""
    root = validate_xml_prompt(prompt)
    blocks = list(root)
    if len(blocks) == 1 and blocks[0].tag == "image":
        blocks = list(blocks[0])
    if not any(b.tag == "general_tags" or re.fullmatch(r"character_\d+", b.tag) for b in blocks):
        return _error_at(prompt, 0, "no <character_1> or <general_tags> block: this is not a NewBie XML prompt.")
    cursor, n_chars, seen_general = 0, 0, False
    for b in blocks:
        at = _find_tag(prompt, b.tag, cursor)
        cursor = at + 1
        if (b.text or "").strip():
            return _error_at(prompt, at, f"text outside a field in <{b.tag}>: put it inside a field tag.")
        if re.fullmatch(r"character_\d+", b.tag):
            n_chars += 1
            if b.tag != f"character_{n_chars}":
                return _error_at(prompt, at, f"<{b.tag}> should be <character_{n_chars}> (characters are numbered "
                                             f"1, 2, … in order).")
            allowed, missing = CHARACTER_FIELDS, [f for f in ("n", "gender") if b.find(f) is None]
            if missing:
                return _error_at(prompt, at, f"<{b.tag}> has no <{missing[0]}> field.")
        elif b.tag == "general_tags":
            if seen_general:
                return _error_at(prompt, at, "a second <general_tags> block: merge them into one.")
            seen_general, allowed = True, GENERAL_FIELDS
        elif b.tag in ("caption", "style"):
            continue
        else:
            return _error_at(prompt, at, f"unknown block <{b.tag}>: use <character_N> and <general_tags>.")
        for f in b:
            f_at = _find_tag(prompt, f.tag, at + 1)
            if f.tag not in allowed:
                return _error_at(prompt, f_at, f"unknown field <{f.tag}> in <{b.tag}>; allowed: {', '.join(allowed)}.")
            if len(f):
                return _error_at(prompt, f_at, f"<{f.tag}> holds tags, not other XML tags.")
    if characters > 0 and n_chars != characters:
        return _error_at(prompt, 0, f"{n_chars} character block(s), but {characters} were asked for.")
    return ""


def lint(prompt: str, mode: str, characters: int = 0) -> str:
    """The linter's error for a reply in `mode` ("" when the prompt is fine): XML syntax and schema for the
    XML modes; for `xml → tags`, no XML tag may remain."""
    if not prompt.strip():
        return _error_at(prompt, 0, "the reply is empty.")
    if parse_mode(mode) == TO_TAGS:
        tag = _ANY_TAG.search(prompt)
        return _error_at(prompt, tag.start(), f"{tag.group(0)} is an XML tag; a tag list has none.") if tag else ""
    try:
        return lint_structure(prompt, characters)
    except InputError as e:
        return str(e)


def xml_to_tags(prompt: str) -> str:
    """A valid NewBie XML prompt as one comma-separated tag list: count, then each character's fields in
    order (the name when it is not `original`), then the general tags; duplicates dropped."""
    if not _ANY_TAG.search(prompt):
        raise InputError("xml → tags needs a NewBie XML prompt (with <character_1> or <general_tags>); this text "
                         "has no XML tags.")
    parsed = parse_xml_prompt(prompt)  # InputError with line/column when the XML is broken
    general = parsed["general_tags"]
    values = [general.get("count", "")]
    for c in parsed["characters"]:
        values += [c.get(f, "") for f in CHARACTER_FIELDS if not (f == "n" and c.get(f, "").strip() == "original")]
    values += [general.get(f, "") for f in GENERAL_FIELDS if f != "count"]
    values += [v for v in parsed["other"].values() if isinstance(v, str)]
    tags = OrderedDict((t.strip(), None) for v in values for t in v.split(",") if t.strip())
    return ", ".join(tags)


# ------------------------------------------------------------------------------------------------------- cache
class PromptCache:
    """LRU cache of enhancement results; with `path`, also kept in a JSON file (the CLI's, across runs)."""

    def __init__(self, max_entries: int = 128, path: str | os.PathLike | None = None):
        self.max_entries, self.path = max_entries, Path(path) if path else None
        self._items: OrderedDict[str, dict] = OrderedDict()
        self.hits = self.misses = 0
        if self.path and self.path.is_file():
            try:
                self._items.update(json.loads(self.path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as e:
                log.warning("prompt cache %s is unreadable (%s); starting a new one", self.path, e)

    @staticmethod
    def make_key(text: str, settings: EnhanceSettings, identity: tuple) -> str:
        """A stable key for (text, settings, model identity)."""
        return hashlib.sha256(repr((text, settings.key(), tuple(identity))).encode("utf-8")).hexdigest()

    def get(self, key: str) -> EnhanceResult | None:
        """The cached result for `key`, or None."""
        if key not in self._items:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return EnhanceResult(**self._items[key])

    def put(self, key: str, result: EnhanceResult) -> None:
        """Store `result` (and rewrite the JSON file when there is one)."""
        self._items[key] = asdict(result)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)
        if self.path:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self._items), encoding="utf-8")
                tmp.replace(self.path)
            except OSError as e:
                log.warning("could not write the prompt cache %s (%s)", self.path, e)

    def __len__(self) -> int:
        return len(self._items)


# ------------------------------------------------------------------------------------------------- enhancement
def _ask(view, tokenizer, turns, sampling: SamplingSettings, on_token):
    gen = generate_ids(view, chat_ids(tokenizer, turns), sampling, stop_ids(tokenizer), pad_id=0, on_token=on_token)
    text = tokenizer.decode([i for i in gen.ids if i < tokenizer.vocab_size])  # rows past the vocabulary: never text
    return gen, text


def enhance(text: str, settings: EnhanceSettings, session: Callable[[], AbstractContextManager],
            identity: tuple = (), cache: PromptCache | None = None,
            on_token: Callable[[int, int], None] | None = None, head_on_cpu: bool = False) -> EnhanceResult:
    """Enhance `text` in `settings.mode` (module docstring). `identity` names the model (files, precision) for
    the cache key; `on_token(done, limit)` is called per new token and may raise to cancel; `head_on_cpu`:
    keep the LM head where the embedding table is (streaming/low-VRAM hosts)."""
    mode = parse_mode(settings.mode)
    text = "" if text is None else str(text)
    if not text.strip():
        raise InputError("The idea is empty: write an idea, a tag list or an XML prompt to enhance.")
    s = settings.sampling
    if settings.characters < 0 or s.max_new_tokens < 1 or s.temperature < 0 or not 0 < s.top_p <= 1:
        raise InputError(f"Prompt enhance settings out of range (characters {settings.characters}, max_new_tokens "
                         f"{s.max_new_tokens}, temperature {s.temperature}, top_p {s.top_p}): characters ≥ 0, "
                         f"max_new_tokens ≥ 1, temperature ≥ 0 (0 = greedy), 0 < top_p ≤ 1.")
    if mode == TO_TAGS:
        return EnhanceResult(prompt=xml_to_tags(text), valid=True, mode=mode, used_model=False)
    key = PromptCache.make_key(text, settings, identity)
    if cache is not None and (hit := cache.get(key)) is not None:
        return replace(hit, from_cache=True)
    turns = conversation(mode, text, settings.characters)
    t0 = time.perf_counter()
    with session() as gemma, generation_head(gemma.model, head_on_cpu) as view:
        gen, raw = _ask(view, gemma.tokenizer, turns, settings.sampling, on_token)
        reply = extract_reply(raw, mode)
        first_error = error = lint(reply, mode, settings.characters)
        gens = [gen]
        if error and settings.repair:
            gen, raw = _ask(view, gemma.tokenizer, turns + repair_turns(reply, error), settings.sampling, on_token)
            gens.append(gen)
            repaired = extract_reply(raw, mode)
            second_error = lint(repaired, mode, settings.characters)
            if repaired.strip():  # an empty rewrite keeps the first reply and its error
                reply, error = repaired, second_error
    tokens = sum(len(g.ids) for g in gens)
    decode_s = sum(g.seconds - g.first_token_s for g in gens)
    result = EnhanceResult(
        prompt=reply, valid=not error, mode=mode, error=error, repaired=bool(first_error) and not error,
        first_error=first_error, new_tokens=tokens, seconds=time.perf_counter() - t0,
        first_token_s=gens[0].first_token_s, tokens_per_s=(tokens - len(gens)) / decode_s if decode_s > 0 else 0.0,
        cut=not gen.stopped)
    if cache is not None:
        cache.put(key, result)
    return result

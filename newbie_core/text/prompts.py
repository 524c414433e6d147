"""Prompt rules (spec §3.3, §3.4) and the tokenizer settings shared by both text encoders.

System prompts go to Gemma only, as plain `system + prompt` (no separator, no chat template). An empty
prompt (the usual negative) gets no system prompt at all, so Gemma sees exactly `[<bos>]`.

The tokenizer half of this module turns text into padded id batches the same way for every file
layout: `TextTokenizer` wraps either a HF `tokenizer.json` or the SentencePiece model that ComfyUI
single files embed as `spiece_model`, and `tokenize_batch` adds the special tokens, truncates (with a
warning that says where the prompt was cut) and right-pads.

Tokenizer settings (documented choices):
- Gemma: `<bos>`=2 prepended, no EOS, pad 0, max_length 512, padded to a multiple of 8 (demo.py, finetune.py).
- Jina:  `<s>`=0 … `</s>`=2, pad 1, max_length 512 (the HF pipeline's value; demo/finetune use 2048,
  but NewBie's DiT was trained on Gemma captions cut at 512 and the pooled vector barely changes).
  Truncation keeps `</s>` as the last token, as HF's `truncation=True` does.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import InputError, ModelFileError

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# System prompts (spec §3.3), verbatim, trailing spaces included.
# ---------------------------------------------------------------------------------------------------
SYSTEM_PROMPTS: dict[str, str] = {
    # training, XML captions
    "xml": "You are an assistant designed to generate high-quality anime images based on xml format prompts. <Prompt Start> ",
    # training, other captions (tags / natural language)
    "tags": (
        "You are an assistant designed to generate high-quality anime images with the highest degree of "
        "image-text alignment based on textual prompts. <Prompt Start> "
    ),
    # demo.py default (no separator after it)
    "demo": "You are an assistant designed to generate high-quality images based on user prompts.",
    # HF pipeline / ComfyUI nodes
    "none": "",
}
AUTO = "auto"

def looks_like_xml(prompt: str) -> bool:
    """True when the prompt contains at least one matched `<tag>…</tag>` pair (NewBie's XML caption form).

    One linear pass over the tags (a backtracking `<(n)>.*?</\\1>` search was quadratic on many unclosed tags)."""
    from .xml_prompt import scan_tags

    if not prompt:
        return False
    opened: set[str] = set()
    for _, closing, name, self_closing in scan_tags(prompt):
        if closing and name in opened:
            return True
        if not closing and not self_closing:
            opened.add(name)
    return False


def auto_preset(prompt: str) -> str:
    """The training system-prompt preset for this prompt: "xml" for XML captions, otherwise "tags"."""
    return "xml" if looks_like_xml(prompt) else "tags"


def resolve_system_prompt(system_prompt: str | None, prompt: str = "") -> str:
    """Turn a preset name ("xml", "tags", "demo", "none", "auto") or a custom text into the system text.

    None means "none". Any string that is not a preset name is used verbatim as a custom system prompt.
    """
    if system_prompt is None:
        return ""
    key = system_prompt.strip().lower()
    if key == AUTO:
        return SYSTEM_PROMPTS[auto_preset(prompt)]
    if key in SYSTEM_PROMPTS:
        return SYSTEM_PROMPTS[key]
    return system_prompt


def gemma_text(prompt: str, system_prompt: str | None) -> str:
    """The exact text Gemma encodes (spec §3.4).

    An empty (or whitespace-only) prompt gets NO system prompt and becomes "" (Gemma then sees only
    `<bos>`); any other prompt becomes `system + prompt`. `system_prompt` may be a preset name or text.
    """
    if prompt is None or prompt.strip() == "":
        return ""
    return resolve_system_prompt(system_prompt, prompt) + prompt


# ---------------------------------------------------------------------------------------------------
# Tokenizer settings and a layout-independent tokenizer
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerSpec:
    """Special ids and length rules of one text encoder's tokenizer."""

    name: str
    bos_id: int
    eos_id: int | None
    pad_id: int
    max_length: int
    pad_to_multiple_of: int | None
    bos_token: str
    eos_token: str | None
    pad_token: str


GEMMA_SPEC = TokenizerSpec("Gemma", 2, None, 0, 512, 8, "<bos>", None, "<pad>")
JINA_SPEC = TokenizerSpec("Jina", 0, 2, 1, 512, None, "<s>", "</s>", "<pad>")


_FAIRSEQ_SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}


class TextTokenizer:
    """Text → token ids without special tokens, from a `tokenizer.json` or a SentencePiece model.

    `id_offset` = 1 reproduces HF's fairseq mapping for an original XLM-R `sentencepiece.bpe.model`
    (spm ids shifted by one, spm `<unk>`=0 → 3); 0 uses the ids as stored.
    """

    def __init__(self, backend, kind: str, source: str, id_offset: int = 0):
        self._backend = backend
        self.kind = kind  # "tokenizers" | "sentencepiece"
        self.source = source
        self.id_offset = id_offset

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> "TextTokenizer":
        """Load a HF fast-tokenizer `tokenizer.json`."""
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise ModelFileError(f"{path} is not a readable tokenizer.json ({e}). Re-download it.") from e
        return cls(tok, "tokenizers", str(path))

    @classmethod
    def from_sentencepiece(cls, model: bytes | torch.Tensor, source: str, id_offset: int = 0) -> "TextTokenizer":
        """Load a SentencePiece model from bytes or a uint8 tensor (ComfyUI's embedded `spiece_model`)."""
        import sentencepiece as spm

        if isinstance(model, torch.Tensor):
            model = model.cpu().numpy().tobytes()
        try:
            sp = spm.SentencePieceProcessor(model_proto=model)
        except Exception as e:
            raise ModelFileError(f"The tokenizer embedded in {source} is damaged ({e}). Re-download the file.") from e
        return cls(sp, "sentencepiece", source, id_offset)

    def _spm_to_id(self, i: int) -> int:
        if not self.id_offset:
            return i
        return i + self.id_offset if i > 2 else (3, 0, 2)[i]  # fairseq: spm <unk>=0 → 3, <s>=1 → 0, </s>=2 → 2

    def _id_to_spm(self, i: int) -> int:
        if not self.id_offset:
            return i
        return {0: 1, 1: 0, 2: 2, 3: 0}.get(i, i - self.id_offset)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without any special tokens."""
        if self.kind == "tokenizers":
            return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]
        return [[self._spm_to_id(i) for i in self._backend.encode(t)] for t in texts]

    def decode(self, ids: list[int]) -> str:
        """Text of a list of ids (special tokens skipped)."""
        if self.kind == "tokenizers":
            return self._backend.decode(list(ids), skip_special_tokens=True)
        return self._backend.decode([self._id_to_spm(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None when the vocabulary lacks it."""
        if self.kind == "tokenizers":
            return self._backend.token_to_id(token)
        if self.id_offset and token in _FAIRSEQ_SPECIALS:
            return _FAIRSEQ_SPECIALS[token]
        i = self._backend.piece_to_id(token)
        if i == self._backend.unk_id() and token != self._backend.id_to_piece(i):
            return None
        return self._spm_to_id(i)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (max id + 1)."""
        if self.kind == "tokenizers":
            return self._backend.get_vocab_size(with_added_tokens=True)
        return self._backend.get_piece_size() + self.id_offset

    def check_specials(self, spec: TokenizerSpec) -> None:
        """Raise ModelFileError when the tokenizer's special ids differ from the model's (wrong tokenizer)."""
        wanted = {spec.bos_token: spec.bos_id, spec.pad_token: spec.pad_id}
        if spec.eos_token is not None:
            wanted[spec.eos_token] = spec.eos_id
        for tok, want in wanted.items():
            got = self.token_to_id(tok)
            if got != want:
                raise ModelFileError(
                    f"The tokenizer from {self.source} maps {tok!r} to {got}, but {spec.name} needs {want}. "
                    f"This is not the {spec.name} tokenizer; use the tokenizer files that came with the model."
                )

    def __repr__(self) -> str:
        return f"TextTokenizer({self.kind}, {self.source!r})"


def _tail_words(tok: TextTokenizer, ids: list[int], n: int = 8) -> str:
    text = tok.decode(ids[-n:]).strip().replace("\n", " ")
    return text[-60:]


@contextmanager
def capture_truncation_warnings() -> Iterator[list[str]]:
    """Collect, as a list of messages, the truncation warnings `tokenize_batch` logs inside the block
    (hosts show them next to the result, not only in a log)."""
    found: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(record.getMessage())

    handler = _Collect(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield found
    finally:
        logger.removeHandler(handler)


def tokenize_batch(tok: TextTokenizer, spec: TokenizerSpec, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and attention mask ([B, L] int64, right padded) for `texts`, following `spec`.

    Adds `bos` (and `eos`), truncates to `spec.max_length` (logging a WARNING with the token count and
    the last words kept), pads to the longest sequence rounded up to `spec.pad_to_multiple_of`.
    """
    if isinstance(texts, str):
        raise InputError("tokenize_batch expects a list of prompts, not a single string.")
    rows: list[list[int]] = []
    for i, ids in enumerate(tok.encode(texts)):
        full = [spec.bos_id] + list(ids) + ([spec.eos_id] if spec.eos_id is not None else [])
        if len(full) > spec.max_length:
            if spec.eos_id is not None:
                kept = full[: spec.max_length - 1] + [spec.eos_id]
                content = kept[1:-1]
            else:
                kept = full[: spec.max_length]
                content = kept[1:]
            which = f"{spec.name} prompt" + (f" {i + 1}" if len(texts) > 1 else "")
            logger.warning(
                "%s is %d tokens long; only the first %d are used. It was cut after: \"…%s\". "
                "Shorten the prompt or move the important part to the front.",
                which, len(full), spec.max_length, _tail_words(tok, content),
            )
            full = kept
        rows.append(full)
    length = max(len(r) for r in rows) if rows else 0
    if spec.pad_to_multiple_of:
        length = int(math.ceil(length / spec.pad_to_multiple_of) * spec.pad_to_multiple_of)
    input_ids = torch.full((len(rows), length), spec.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return input_ids, mask

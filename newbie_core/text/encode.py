"""Prompt → DiT conditioning: Gemma per-token features + mask and the Jina pooled vector (spec §3).

Gemma sees `gemma_text(prompt, system_prompt)` (system prompt only for non-empty prompts); Jina always
sees the raw prompt. An empty prompt gives Gemma `[<bos>]` (cap_len 1) and Jina `[<s>, </s>]`.
Prompts encoded separately (e.g. cached cond and uncond) are joined for the CFG batch with
`concat_embeddings`, which right-pads to a common length with masked zeros.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..precision import check_finite
from ..validate import check_text
from .prompts import capture_truncation_warnings, gemma_text


@dataclass
class PromptEmbeddings:
    """DiT text conditioning for a batch of prompts.

    cap_feats [B, L, D] (Gemma hidden_states[-2]), cap_mask [B, L] int64 (1 = real token, right padded),
    pooled [B, Dclip] (Jina mean pool; None when encoded without Jina), per-prompt token counts
    (special tokens included, after truncation), and `notes`: warnings for the user (e.g. where a too long
    prompt was cut), kept with cached embeddings so they are shown every time.
    """

    cap_feats: torch.Tensor
    cap_mask: torch.Tensor
    pooled: torch.Tensor | None
    gemma_token_counts: tuple[int, ...] = ()
    jina_token_counts: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def batch_size(self) -> int:
        """Number of prompts B."""
        return int(self.cap_feats.shape[0])

    @property
    def cap_lens(self) -> list[int]:
        """Real caption length of each prompt (sum of cap_mask)."""
        return [int(n) for n in self.cap_mask.sum(dim=1).tolist()]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "PromptEmbeddings":
        """A copy on `device`, floating tensors cast to `dtype` (the mask stays int64)."""
        def mv(t):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
        return replace(self, cap_feats=mv(self.cap_feats), cap_mask=mv(self.cap_mask), pooled=mv(self.pooled))



def encode_prompts(gemma, jina, prompts: list[str], system_prompt: str | None = "") -> PromptEmbeddings:
    """Encode `prompts` with Gemma (system prompt rules of spec §3.4) and Jina (raw prompt, no system prompt).

    `system_prompt` is a preset name ("xml", "tags", "demo", "none", "auto") or custom text. `jina` may be
    None (pooled is then None).
    """
    if isinstance(prompts, str):
        raise InputError("encode_prompts expects a list of prompts, e.g. [positive, negative].")
    prompts = [check_text(p, f"prompt {i + 1}") for i, p in enumerate(prompts)]
    if not prompts:
        raise InputError("encode_prompts got no prompts.")
    ids, mask = gemma.tokenize([gemma_text(p, system_prompt) for p in prompts])
    feats, mask = gemma.encode_ids(ids, mask)
    pooled, jina_counts = None, ()
    if jina is not None:
        jids, jmask = jina.tokenize(prompts)
        pooled = jina.encode_ids(jids, jmask)
        jina_counts = tuple(int(n) for n in jmask.sum(dim=1).tolist())
    return PromptEmbeddings(
        cap_feats=feats, cap_mask=mask, pooled=pooled,
        gemma_token_counts=tuple(int(n) for n in mask.sum(dim=1).tolist()), jina_token_counts=jina_counts,
    )


def concat_embeddings(items: list[PromptEmbeddings]) -> PromptEmbeddings:
    """Stack several PromptEmbeddings along the batch, right-padding captions to the longest (mask 0, zeros).

    Tensors are moved to the device and float dtype of the first item. Used to build `[cond, uncond]`.
    """
    items = list(items)
    if not items:
        raise InputError("concat_embeddings got nothing to join.")
    first = items[0]
    dims = {int(e.cap_feats.shape[-1]) for e in items}
    if len(dims) != 1:
        raise InputError(f"Cannot join prompt embeddings of different widths {sorted(dims)}: they come from "
                         f"different text encoders. Encode all prompts with the same Gemma.")
    if len({e.pooled is None for e in items}) != 1:
        raise InputError("Cannot join prompt embeddings with and without a Jina pooled vector.")
    dev, dt = first.cap_feats.device, first.cap_feats.dtype
    length = max(int(e.cap_feats.shape[1]) for e in items)
    feats, masks, pooled = [], [], []
    for e in items:
        pad = length - int(e.cap_feats.shape[1])
        feats.append(F.pad(e.cap_feats.to(dev, dt), (0, 0, 0, pad)))
        masks.append(F.pad(e.cap_mask.to(dev, torch.long), (0, pad)))
        if e.pooled is not None:
            pooled.append(e.pooled.to(dev, first.pooled.dtype))
    return PromptEmbeddings(
        cap_feats=torch.cat(feats), cap_mask=torch.cat(masks), pooled=torch.cat(pooled) if pooled else None,
        gemma_token_counts=sum((e.gemma_token_counts for e in items), ()),
        jina_token_counts=sum((e.jina_token_counts for e in items), ()),
    )


def encode_cached(prompts: list[str], system_prompt: str, cache, identity: tuple,
                  gemma_session: Callable[[], AbstractContextManager], jina_session: Callable[[], AbstractContextManager],
                  precision=None, around: Callable[[], AbstractContextManager] = nullcontext,
                  ) -> tuple[list[PromptEmbeddings], int]:
    """Encode prompts (batch 1 each, results on the CPU) through `cache`; returns (embeddings, number encoded).

    Cache key: (prompt, the text Gemma sees, *identity) — identity names the encoder files and precision.
    Only when some prompt is missing: `around()` is entered (e.g. a ledger stage), then `gemma_session()` and
    `jina_session()` one after the other; each yields its encoder placed on a device and may release it on
    exit, so the two encoders are never resident together. NaN/inf in the features raise NumericalError.
    """
    names = ("positive prompt", "negative prompt") if len(prompts) == 2 else [f"prompt {i + 1}" for i in range(len(prompts))]
    prompts = [check_text(p, n) for p, n in zip(prompts, names)]  # lone surrogates etc.: named with their position
    system_prompt = check_text(system_prompt, "system prompt")
    keys = [(p, gemma_text(p, system_prompt), *identity) for p in prompts]
    out: list[PromptEmbeddings | None] = [cache.get(k) for k in keys]
    todo = [i for i, e in enumerate(out) if e is None]
    if todo:
        notes: dict[int, list[str]] = {i: [] for i in todo}
        with around():
            with gemma_session() as gemma:
                feats = []
                for i in todo:
                    with capture_truncation_warnings() as warned:
                        feats.append(gemma.encode([gemma_text(prompts[i], system_prompt)]))
                    notes[i] += warned
            with jina_session() as jina:
                pooled = []
                for i in todo:
                    with capture_truncation_warnings() as warned:
                        pooled.append(jina.encode([prompts[i]]))
                    notes[i] += warned
            for i, (f, m), p in zip(todo, feats, pooled):
                emb = PromptEmbeddings(cap_feats=check_finite(f, "text (Gemma)", precision).float().cpu(),
                                       cap_mask=m.cpu(), pooled=check_finite(p, "text (Jina)", precision).float().cpu(),
                                       notes=tuple(notes[i]))
                cache.put(keys[i], emb)
                out[i] = emb
    return out, len(todo)  # type: ignore[return-value]

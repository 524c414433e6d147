"""Text generation with the loaded Gemma3 text encoder: a causal-LM view that shares its weights.

Gemma3-4B-it's LM head is its (tied) embedding table, so the `Gemma3TextModel` the pack loads for text
encoding can also write text. `causal_lm_view` returns transformers' own `Gemma3ForCausalLM` whose decoder
layers, final norm and RoPE tables are the encoder's modules (no second copy); only its embedding lookup
and head are set per call by `generation_head`, from the encoder's embedding table:

- table already on the compute device in the compute dtype (ComfyUI places the whole model): both use it;
- table kept elsewhere (the CLI keeps the 262k×2560 table on the CPU, `loading.CPU_ONLY`) or in another
  dtype: a device copy in the compute dtype is made for this generation only (1.25 GiB in bf16) and
  dropped afterwards, also on failure or cancel;
- `head_on_cpu` (the low-VRAM/streaming mode): no device copy; the lookup and the head matmul run where
  the table is and only the `[1, 2560]` hidden state and the logits row cross.

Decoding is transformers' `generate` (dynamic KV cache by default; `static` uses its compiled static-cache
path on CUDA). A StoppingCriteria calls the host's `on_token(done, limit)` after every token: raising there
(ComfyUI's interrupt, `InterruptedByUser`) stops the run within one token. Sampling is seeded inside a forked
RNG scope (the global generators are restored afterwards); temperature 0 is greedy. Non-finite first-token
logits (fp16 overflow) raise NumericalError.
"""
from __future__ import annotations

import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import check_finite

_VIEWS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick tokens: temperature 0 = greedy; `top_k` 0 = off. `cache`: "dynamic" | "static"."""

    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 64
    seed: int = 0
    cache: str = "dynamic"

    @property
    def greedy(self) -> bool:
        """True when tokens are picked by argmax (temperature 0)."""
        return self.temperature <= 0


@dataclass
class Generation:
    """What `generate_ids` returns: the new token ids (stop token excluded), whether a stop token ended it,
    seconds until the first new token and in total."""

    ids: list[int]
    stopped: bool
    first_token_s: float
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second after the first one (the decode rate)."""
        n = len(self.ids) - 1
        return n / (self.seconds - self.first_token_s) if n > 0 and self.seconds > self.first_token_s else 0.0


class TableEmbedding(nn.Module):
    """Gemma's scaled embedding lookup on a given table; output moved to the layers' device and dtype."""

    def __init__(self, table: torch.Tensor, scale: torch.Tensor, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.table, self.scale, self.device, self.dtype = table, scale, device, dtype  # plain attributes

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # noqa: D102
        emb = F.embedding(input_ids.to(self.table.device), self.table)
        emb = emb * self.scale.to(emb.device, self.table.dtype)  # the order Gemma3TextScaledWordEmbedding uses
        return emb.to(self.device, self.dtype)


class TiedHead(nn.Module):
    """The LM head `h @ tableᵀ` computed where the table is; logits returned on the hidden state's device."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table  # a plain attribute: not a parameter of the view, never cast or moved by hosts

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # noqa: D102
        t = self.table
        return F.linear(hidden.to(t.device, t.dtype), t).to(hidden.device)


def _causal_lm_class():
    from transformers import Gemma3ForCausalLM

    class GemmaLMView(Gemma3ForCausalLM):
        """Gemma3ForCausalLM over shared modules; device/dtype are the compute ones (not the first weight's,
        which may be an fp8 Linear or a CPU-kept table)."""

        compute_device = torch.device("cpu")
        compute_dtype = torch.float32

        @property
        def device(self) -> torch.device:  # noqa: D102
            return self.compute_device

        @property
        def dtype(self) -> torch.dtype:  # noqa: D102
            return self.compute_dtype

    return GemmaLMView


def causal_lm_view(text_model: nn.Module) -> nn.Module:
    """A `Gemma3ForCausalLM` sharing `text_model`'s layers, norm and RoPE (built once per model on the meta
    device, ~0.3 s); its `embed_tokens`/`lm_head` are set per generation by `generation_head`."""
    view = _VIEWS.get(text_model)
    if view is None:
        with torch.device("meta"):
            view = _causal_lm_class()(text_model.config)
        for name, child in text_model.named_children():
            if name != "embed_tokens":
                setattr(view.model, name, child)
        view.model.embed_tokens = view.lm_head = nn.Identity()  # set per generation
        view.eval().requires_grad_(False)
        _VIEWS[text_model] = view
    return view


@contextmanager
def generation_head(text_model: nn.Module, head_on_cpu: bool = False) -> Iterator[nn.Module]:
    """The causal-LM view of `text_model`, its embedding lookup and tied head placed for one generation
    (see the module docstring); the head and any device copy of the table are dropped on exit."""
    view = causal_lm_view(text_model)
    device, dtype = text_model.norm.weight.device, text_model.norm.weight.dtype
    emb = text_model.embed_tokens
    table = emb.weight.detach()
    if not head_on_cpu and (table.device != device or table.dtype != dtype):
        table = table.to(device, dtype)  # generation-only copy of the head (the encoder keeps its table)
    view.compute_device, view.compute_dtype = device, dtype
    view.model.embed_tokens = TableEmbedding(table, emb.embed_scale, device, dtype)
    view.lm_head = TiedHead(table)
    try:
        yield view
    finally:
        view.model.embed_tokens = view.lm_head = nn.Identity()
        view.__dict__.pop("_cache", None)  # a static KV cache older transformers keep on the model
        del table


class _TokenHook:
    """A StoppingCriteria: counts new tokens, notes the first one's time, calls the host's hook (may raise)."""

    def __init__(self, prompt_len: int, limit: int, on_token: Callable[[int, int], None] | None, sync: bool):
        self.prompt_len, self.limit, self.on_token, self.sync = prompt_len, limit, on_token, sync
        self.first_at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        if self.first_at is None:
            if self.sync and input_ids.is_cuda:
                torch.cuda.synchronize(input_ids.device)
            self.first_at = time.perf_counter()
        if self.on_token is not None:
            self.on_token(min(int(input_ids.shape[1]) - self.prompt_len, self.limit), self.limit)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _FirstLogitsFinite:
    """A LogitsProcessor: the first token's logits must be finite (fp16 overflow shows there); checked once,
    so decoding keeps running without a host sync per token."""

    def __init__(self, dtype: torch.dtype):
        self.name, self.checked = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32"), False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.checked:
            self.checked = True
            check_finite(scores, "prompt enhance (Gemma)", self.name)
        return scores


def _generation_config(s: SamplingSettings, stop_ids: list[int], pad_id: int):
    from transformers import GenerationConfig

    kw = dict(max_new_tokens=int(s.max_new_tokens), min_new_tokens=0, eos_token_id=list(stop_ids) or None,
              pad_token_id=pad_id, use_cache=True, num_beams=1)
    if s.cache == "static":
        kw["cache_implementation"] = "static"
    if s.greedy:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kw.update(do_sample=True, temperature=float(s.temperature), top_p=float(s.top_p), top_k=int(s.top_k) or None)
    return GenerationConfig(**kw)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's generators for the block and restore the previous states afterwards (sampling is
    reproducible per seed without disturbing other code's random streams)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(int(seed))
        yield


@torch.no_grad()
def generate_ids(view: nn.Module, prompt_ids: list[int], settings: SamplingSettings, stop_ids: list[int],
                 pad_id: int = 0, on_token: Callable[[int, int], None] | None = None, sync: bool = False) -> Generation:
    """Continue `prompt_ids` with `view` (from `generation_head`) through transformers' `generate`.

    Stops at any of `stop_ids` or after `settings.max_new_tokens`. `on_token(done, limit)` runs after every new
    token; an exception raised there ends the run (cancel within one token). `sync`: synchronise the device
    for exact first-token timing (benchmarks).
    """
    from transformers import LogitsProcessorList, StoppingCriteriaList

    device = view.device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    hook = _TokenHook(len(prompt_ids), int(settings.max_new_tokens), on_token, sync)
    config = _generation_config(settings, stop_ids, pad_id)
    t0 = time.perf_counter()
    with seeded(settings.seed, device):
        out = view.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                            logits_processor=LogitsProcessorList([_FirstLogitsFinite(view.dtype)]),
                            stopping_criteria=StoppingCriteriaList([hook]))
    new = out[0, len(prompt_ids):].tolist()
    seconds = time.perf_counter() - t0
    stopped = bool(new) and new[-1] in stop_ids
    if stopped:
        new = new[:-1]
    first = (hook.first_at - t0) if hook.first_at is not None else seconds
    return Generation(ids=new, stopped=stopped, first_token_s=first, seconds=seconds)

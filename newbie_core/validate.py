"""Checks of untrusted values, shared by the nodes and the CLI: every failure is one NewBieError naming the input
and the fix (never a raw KeyError / RuntimeError from deep inside torch or a tokenizer).

ComfyUI 0.3.64 does not check V3 combo values against their options, and any widget value can be POSTed to
/prompt, so combo-like strings (device, attention, precision, solver) are checked here, not only by the UI.
"""
from __future__ import annotations

import json
import logging
import math
import re
from typing import Any, Callable, Iterable, Mapping

import torch

from .errors import InputError, ModelFileError

log = logging.getLogger("newbie")

# Upper bounds shared by the nodes' widgets and the CLI (a typo must not run for hours).
MAX_STEPS = 200
MAX_BATCH = 64
MAX_PROMPT_CHARS = 1_000_000  # far beyond what the encoders read; refuses multi-megabyte pastes up front


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "…'"


# ------------------------------------------------------------------------------------------------ numbers
def check_number(value: Any, name: str, lo: float | None = None, hi: float | None = None) -> float:
    """`value` as a finite float within [lo, hi]; NaN, ±inf, bools, non-numbers and values out of range raise
    InputError naming `name` and the allowed range."""
    try:
        if isinstance(value, (bool, str, bytes)):  # a number typed as text is a client bug, not a setting
            raise TypeError
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number (got {_shown(value)}).") from None
    rng = (f" between {lo:g} and {hi:g}" if lo is not None and hi is not None else
           f" ≥ {lo:g}" if lo is not None else f" ≤ {hi:g}" if hi is not None else "")
    if not math.isfinite(x):
        raise InputError(f"{name} must be a finite number{rng} (got {x}). NaN and infinity are not settings.")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise InputError(f"{name} must be{rng} (got {x:g}).")
    return x


def check_int(value: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int within [lo, hi] (bools and non-integral floats refused), else InputError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise InputError(f"{name} must be a whole number (got {_shown(value)}).")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        lim = f"between {lo} and {hi}" if lo is not None and hi is not None else (f"≥ {lo}" if lo is not None else f"≤ {hi}")
        raise InputError(f"{name} must be {lim} (got {v}).")
    return v


def check_sampler_settings(steps: Any, cfg: Any, shift: Any, cfg_trunc: Any, renorm: Any, solver: Any) -> str:
    """Every sampler setting at once (the ranges of the sampler node's widgets); returns the solver name."""
    from .sampling import SOLVERS

    check_int(steps, "steps", 2, MAX_STEPS)
    check_number(cfg, "cfg", 0.0, 100.0)
    check_number(shift, "shift", 1e-3, 100.0)
    check_number(cfg_trunc, "cfg_trunc", 0.0, 100.0)
    check_number(renorm, "renorm", 0.0, 100.0)
    return check_choice(solver, "solver", SOLVERS)


# ------------------------------------------------------------------------------------------------ choices
def check_choice(value: Any, name: str, options: Iterable[str]) -> str:
    """`value` if it is one of `options` (exact, after stripping spaces), else InputError listing them."""
    options = list(options)
    text = value.strip() if isinstance(value, str) else value
    if text not in options:
        raise InputError(f"Unknown {name} {_shown(value)}: choose one of {', '.join(options)}.")
    return text


def check_attention(name: Any, extra: Iterable[str] = ()) -> str:
    """An attention backend name (auto, sdpa, flash, plus host-specific `extra`); 'flash' needs flash-attn.
    Unknown names are refused (they used to fall back to SDPA silently)."""
    from .attention import BACKENDS, flash_attn_available

    name = check_choice(name, "attention", list(BACKENDS) + list(extra))
    if name == "flash" and not flash_attn_available():
        raise InputError("attention 'flash' needs the flash-attn package (pip install flash-attn); choose auto or sdpa.")
    return name


# ------------------------------------------------------------------------------------------------ devices
_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu)(?::(\d{1,3}))?$")


def available_devices() -> list[str]:
    """Device strings this machine can use: cpu, then cuda / cuda:N, mps, xpu when present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        out += ["xpu"] + [f"xpu:{i}" for i in range(xpu.device_count())]
    return out


def parse_device(value: Any, name: str = "device") -> torch.device | None:
    """A device string checked against this machine: None / '' / 'default' / 'auto' → None (the host chooses);
    'cuda:N' beyond the GPU count, CUDA on a build or machine without it, and unknown names raise InputError
    listing what this machine has."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "default", "auto")):
        return None
    if isinstance(value, torch.device):
        value = str(value)
    text = value.strip().lower() if isinstance(value, str) else ""
    have = available_devices()
    m = _DEVICE.match(text)
    if not m:
        raise InputError(f"Unknown {name} {_shown(value)}: use one of {', '.join(have)} (or default).")
    kind, index = m.group(1), m.group(2)
    if kind == "cuda":
        if not torch.backends.cuda.is_built():
            raise InputError(f"{name} {_shown(value)}: this PyTorch was built without CUDA. Use cpu, or install "
                             f"a CUDA build of PyTorch. This machine has: {', '.join(have)}.")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"{name} {_shown(value)}: no CUDA GPU is visible on this machine (driver missing, "
                             f"CUDA_VISIBLE_DEVICES empty?). Use cpu. This machine has: {', '.join(have)}.")
        if index is not None and int(index) >= count:
            raise InputError(f"{name} {_shown(value)}: this machine has {count} CUDA GPU(s), numbered "
                             f"0..{count - 1}. Use one of {', '.join(have)}.")
    elif kind == "cpu":
        if index not in (None, "0"):
            raise InputError(f"{name} {_shown(value)}: there is one CPU device; use cpu.")
    elif text not in have and kind not in have:
        raise InputError(f"{name} {_shown(value)} is not available on this machine; use one of {', '.join(have)}.")
    return torch.device(text)


# ------------------------------------------------------------------------------------------------ tensors
def check_latent(samples: Any, name: str = "latent", channels: int | None = None) -> torch.Tensor:
    """An image latent [B,C,h,w] (a 5-D video latent, a 3-D tensor or a non-tensor raises InputError)."""
    if not isinstance(samples, torch.Tensor):
        raise InputError(f"The {name} is not a tensor (got {type(samples).__name__}); connect an image LATENT.")
    if samples.ndim != 4 or (channels is not None and samples.shape[1] != channels):
        want = f"[batch, {channels}, height/8, width/8]" if channels else "[batch, channels, height/8, width/8]"
        hint = " (a video latent: NewBie makes still images)" if samples.ndim == 5 else ""
        raise InputError(f"The {name} has shape {tuple(samples.shape)}{hint}; NewBie needs an image latent {want}. "
                         f"Use Empty Latent Image / a NewBie or FLUX latent.")
    if samples.shape[0] < 1 or samples.shape[2] < 1 or samples.shape[3] < 1:
        raise InputError(f"The {name} is empty (shape {tuple(samples.shape)}).")
    return samples


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Before `load_state_dict`: every tensor of `sd` that `model` (may be on meta) also has must have its shape,
    and a floating weight must be stored as floating point (not int8 / bool). Raises ModelFileError naming the
    key, what the architecture expects and what the file holds."""
    expected = model.state_dict()
    for key, t in sd.items():
        want = expected.get(key)
        if want is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ModelFileError(f"{source}: {key} is not a tensor. The file is damaged or not this model.")
        if tuple(t.shape) != tuple(want.shape):
            raise ModelFileError(f"{source}: tensor {key} has shape {tuple(t.shape)}, but the architecture expects "
                                 f"{tuple(want.shape)}. The file is damaged or belongs to another model size.")
        if want.is_floating_point() and not t.is_floating_point():
            raise ModelFileError(f"{source}: tensor {key} is stored as {str(t.dtype).replace('torch.', '')}, but "
                                 f"the architecture expects floating point weights (bf16/fp16/fp32/fp8). The file is "
                                 f"damaged or a quantised format this loader does not read; use the original file.")


# ------------------------------------------------------------------------------------------------ text
def check_text(text: Any, name: str = "prompt") -> str:
    """A prompt as a clean str: bytes must be UTF-8; lone surrogates (invalid UTF-16 halves pasted in) and NUL are
    refused with their position; longer than MAX_PROMPT_CHARS is refused. None → ''."""
    if text is None:
        return ""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"The {name} is not valid UTF-8 (byte {e.start} is not part of a character). "
                             f"Re-save it as UTF-8.") from None
    if not isinstance(text, str):
        raise InputError(f"The {name} must be text (got {type(text).__name__}).")
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(f"The {name} is {len(text):,} characters long (limit {MAX_PROMPT_CHARS:,}); shorten it.")
    bad = re.search(r"[\ud800-\udfff\x00]", text)
    if bad:
        pos = bad.start()
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        what = "a NUL character" if bad.group() == "\x00" else "half of a character (a lone surrogate, U+%04X)" % ord(bad.group())
        raise InputError(f"The {name} contains {what} at character {pos + 1} (line {line}, column {col}); it cannot "
                         f"be encoded. Delete that character or re-type the text.")
    return text


# ------------------------------------------------------------------------------------------------ metadata
def metadata_value(meta: Mapping[str, str] | None, key: str, default: Any, check: Callable[[Any], bool],
                   source: str = "file", parse: Callable[[str], Any] = json.loads) -> Any:
    """`meta[key]` parsed (JSON by default) and accepted by `check`, else `default`: an absent key silently, an
    unparsable or invalid one with a logged warning naming the file and key (optional metadata never stops a
    load; the defaults reproduce the official model)."""
    if not meta or key not in meta:
        return default
    try:
        value = parse(meta[key])
        if check(value):
            return value
    except Exception:
        pass
    log.warning("%s: metadata %s is not valid; using the default %r", source, key, default)
    return default

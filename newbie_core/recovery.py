"""What a failed stage leaves behind: nothing. Used by the pipeline and the ComfyUI nodes alike.

A long-running host (ComfyUI with hours of queued work) must survive any failure of ours without leaking memory.
An exception keeps every frame it passed through alive in its traceback, and with them their local variables: a
half-read state dict, the device copies of the embeddings, the sampler's latents. ComfyUI holds the exception while
it reports it (and the frames form reference cycles that only a garbage collection breaks), so those tensors would
outlive the failure. Here the finished frames' locals are cleared, which keeps the message and the traceback text.

- `release_failure(exc, device)`: clear the traceback's locals, collect garbage, empty the device cache.
- `cleans_up_on_failure`: decorator for loaders: a load that fails part-way leaves nothing in memory.
- `out_of_memory_error(stage, device, hint)`: the StageOutOfMemoryError users see (it names the options left).
"""
from __future__ import annotations

import functools
import gc
import traceback
from typing import Callable, TypeVar

import torch

from .errors import StageOutOfMemoryError
from .memory import empty_device_cache

F = TypeVar("F", bound=Callable)


def clear_traceback_locals(exc: BaseException | None) -> None:
    """Clear the local variables of every finished frame in `exc`'s traceback and in its chained exceptions.

    Frames still running (the caller's) are left alone; messages and traceback lines are unaffected.
    """
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        stack += [e.__cause__, e.__context__]


def release_failure(exc: BaseException, device: torch.device | str | None = None) -> None:
    """After a failed stage: drop what its frames held, collect garbage, return cached blocks of `device`."""
    clear_traceback_locals(exc)
    empty_device_cache(device)  # gc.collect() first, then the allocator's cache


def cleans_up_on_failure(fn: F) -> F:
    """Decorator: when `fn` raises, the tensors its frames read or built are freed before the error propagates."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            clear_traceback_locals(e)
            gc.collect()
            raise
    return wrapper  # type: ignore[return-value]


def out_of_memory_error(stage: str, device: torch.device | str, hint: str) -> StageOutOfMemoryError:
    """The error for an out-of-memory in `stage` once everything was released: what happened and `hint`."""
    return StageOutOfMemoryError(f"Out of memory in the {stage} stage on {device}; all models were released and "
                                 f"the device cache was cleared, so the next run starts clean. {hint}")


# The one out-of-memory hint table. Stage keys as the pipeline names them; `{...}` fields are spelled per host
# (`HOST_OPTIONS`), so the CLI names its flags and ComfyUI its node inputs and start options.
STAGE_NAMES = {"text": "text encoding", "dit": "DiT sampling", "vae": "VAE decode", "vae_encode": "VAE encode"}
LOW_VRAM_HINTS = {
    "text": "Lower-memory options: {text_fp8}, {text_lowvram}, or a shorter prompt.",
    "dit": "Lower-memory options: {dit_fp8}, {dit_lowvram}, a smaller image{size_extra}, batch 1{purge}.",
    "vae": "Lower-memory options: {vae_tiled}, a smaller image{purge}{vae_lowvram}.",
    "vae_encode": "Lower-memory options: {vae_encode_tiled}, a smaller image{vae_lowvram}.",
}
HOST_OPTIONS = {
    "cli": {
        "text_fp8": "fp8_e4m3fn text precision (--precision text=fp8_e4m3fn)",
        "text_lowvram": "the low-VRAM mode (--lowvram: streams the encoder's layers, under 2 GiB)",
        "dit_fp8": "fp8_e4m3fn DiT precision (--precision dit=fp8_e4m3fn, under 4 GiB)",
        "dit_lowvram": "the low-VRAM mode (--lowvram: streams DiT blocks, under 2 GiB at 1024²)",
        "size_extra": "", "purge": "",
        "vae_tiled": "tiled decoding (--tiled-decode, also part of --lowvram)", "vae_lowvram": "",
        "vae_encode_tiled": "tiled encoding (--tiled-decode also tiles the init image's encode; part of --lowvram)",
    },
    "comfyui": {
        "text_fp8": "NewBie Text Encoder Loader precision fp8_e4m3fn",
        "text_lowvram": "start ComfyUI with --lowvram",
        "dit_fp8": "NewBie DiT Loader precision fp8_e4m3fn (half the memory)",
        "dit_lowvram": "start ComfyUI with --lowvram (streams the DiT's weights)",
        "size_extra": " (width/height)", "purge": ", a NewBie Memory Purge before this node",
        "vae_tiled": "tiled on in NewBie VAE Decode (a full decode already retries in tiles down to 128 px)",
        "vae_lowvram": ", or start ComfyUI with --lowvram",
        "vae_encode_tiled": "tiled on in NewBie VAE Encode (a full encode already retries in tiles down to 128 px)",
    },
}


def low_vram_hint(stage: str, host: str) -> str:
    """The lower-memory options for `stage` (text, dit, vae) in the spelling of `host` (cli, comfyui)."""
    return LOW_VRAM_HINTS[stage].format(**HOST_OPTIONS[host])

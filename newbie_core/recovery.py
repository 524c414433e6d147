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

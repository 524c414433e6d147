"""Device memory: the one place that clears caches, moves weights between stages and keeps the stage ledger.

(Being filled in: StagedWeights, the ledger and the embedding cache land here.)
"""
from __future__ import annotations

import gc

import torch


def empty_device_cache(device: torch.device | str | None = None) -> None:
    """Collect garbage, then return cached blocks of `device` (all accelerators when None) to the driver.

    Order matters: dropping references and collecting first lets the allocator actually free the blocks.
    """
    gc.collect()
    dev = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (dev is None or dev.type == "cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    if getattr(torch, "mps", None) is not None and torch.backends.mps.is_available() and (dev is None or dev.type == "mps"):
        torch.mps.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the out-of-memory errors of every backend (CUDA, MPS, CPU allocator)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)

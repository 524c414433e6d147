"""The host interface: what the stages (`stages.py`) need from whoever runs them.

Two hosts implement it: the CLI / Python API host (`pipeline.Pipeline`: `memory.StagedModel` weights, block
streaming, a ledger) and the ComfyUI host (`nodes/_comfy.py`: ModelPatcher + `load_models_gpu`, progress bar,
previews, interrupt). The stages never know which one they run in, so every feature is written once.

Model roles: `gemma`, `jina` (the text stage), `dit`, `vae`. Stage keys: `text`, `dit`, `vae`.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, NoReturn, Protocol

import torch

from .precision import Precision
from .sampling import StepInfo


class Host(Protocol):
    """Places models, reports progress, cancels and explains failures for the stages."""

    name: str  # "cli" or "comfyui": picks the spelling of the lower-memory options (recovery.low_vram_hint)
    output_device: torch.device  # where stage results (embeddings, latents, images) are left

    def device_of(self, role: str) -> torch.device:
        """The device `role` computes on."""

    def precision(self, role: str) -> Precision:
        """The precision `role` runs in."""

    def peek(self, role: str):
        """The role's model as loaded, not placed (for checks before a stage loads it)."""

    def placed(self, role: str, clear_cache: bool = True, memory_required: int = 0) -> AbstractContextManager:
        """A context yielding the role's model (encoder, DiT or VAE wrapper) ready on its device; afterwards
        the host releases it (unless it keeps models loaded) and, with `clear_cache`, empties the device cache.
        `memory_required`: bytes of activations the stage needs besides the weights (for eviction decisions)."""

    def dit_forward(self, dit) -> Callable:
        """The DiT's official forward to call: the module itself, or the host's one compiled version of it."""

    def step_callback(self, intervals: int) -> Callable[[StepInfo], None] | None:
        """Called after every sampler interval (progress, preview); raising there cancels the run."""

    def check_interrupt(self) -> None:
        """Raise if the user asked to cancel (a cancel point between model loads)."""

    def measure(self, stage: str) -> AbstractContextManager:
        """A context measuring `stage` (wall time, peak memory), yielding a record with a `notes` list or None."""

    def text_identity(self) -> tuple:
        """What identifies the text encoders for the embedding cache (file fingerprints, precision)."""

    def fail(self, stage: str, exc: BaseException) -> NoReturn:
        """Release everything the failed stage holds and raise: out of memory becomes StageOutOfMemoryError
        with this host's lower-memory options; anything else is re-raised unchanged."""

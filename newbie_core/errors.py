"""User-facing error types.

Every error a user can cause is raised as one of these, with a message that names the file or input
and says how to fix it. ComfyUI shows the message on the node; the CLI prints it without a traceback.
"""
from __future__ import annotations

import torch


class NewBieError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""


class ModelFileError(NewBieError, FileNotFoundError):
    """A model file or folder is missing, damaged, or is not the model that was expected."""


class InputError(NewBieError, ValueError):
    """A bad generation input: size, prompt, XML, sampler setting."""


class NumericalError(NewBieError, FloatingPointError):
    """A stage produced NaN or inf (usually fp16 overflow)."""


class StageOutOfMemoryError(NewBieError, torch.OutOfMemoryError):
    """A stage ran out of device memory; models were released and the message lists lower-memory options.

    A torch.OutOfMemoryError subclass, so hosts (ComfyUI) apply their own out-of-memory handling too.
    """


class InterruptedByUser(NewBieError):
    """Generation was cancelled between two sampler steps."""

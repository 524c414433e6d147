"""Fault injection for the reliability tests: forced out-of-memory, NaN/inf, cancel at a chosen DiT step, damaged and
malicious files, no network, tracking of the tensors a load read. Test code only: nothing here ships in the product.

In-process context managers. The model faults patch classes of a `newbie_core` package (`core`): by default the
top-level `newbie_core` the core tests import; pass the pack's own copy (`pack.newbie_core` in tests/nodes, the
server's module in tests/integration/fault_pack) to reach the code a host really runs. Each yields a `Fault`
whose counters show what happened (`calls` seen, `fired` injections).

    with oom_at_dit_step(2) as f:          # DiT forward call 2 raises torch.OutOfMemoryError (once)
        pipe.generate(...)
    assert f.fired == 1

Only the standard library and torch are imported, so the fault pack can load this file inside a ComfyUI server.
"""
from __future__ import annotations

import importlib
import socket
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import torch

OOM_MESSAGE = "CUDA out of memory. Tried to allocate 20.00 GiB (injected by tests/faults.py)"


@dataclass
class Fault:
    """What an armed fault saw: `calls` of the patched function, `fired` injections, `log` free-form notes."""

    calls: int = 0
    fired: int = 0
    log: list = field(default_factory=list)


def _core(core: ModuleType | str | None) -> str:
    """The package name of the newbie_core copy to patch."""
    if core is None:
        return "newbie_core"
    return core if isinstance(core, str) else core.__name__


def _mod(core, sub: str) -> ModuleType:
    return importlib.import_module(f"{_core(core)}.{sub}")


@contextmanager
def _patched(owner, name: str, make: Callable[[Callable], Callable]) -> Iterator[None]:
    real = getattr(owner, name)
    setattr(owner, name, make(real))
    try:
        yield
    finally:
        setattr(owner, name, real)


# ------------------------------------------------------------------------------------------- DiT
@contextmanager
def oom_at_dit_step(step: int, times: int = 1, core=None) -> Iterator[Fault]:
    """DiT forward call number `step` (1-based; = sampler step n with euler and guidance on every step, where each
    step is one batched CFG call) raises torch.OutOfMemoryError; `times` injections in all, other calls run."""
    fault = Fault()

    def make(real):
        def forward(self, *args, **kwargs):
            fault.calls += 1
            if fault.calls >= step and fault.fired < times:
                fault.fired += 1
                raise torch.OutOfMemoryError(OOM_MESSAGE)
            return real(self, *args, **kwargs)
        return forward

    with _patched(_mod(core, "dit").NextDiT, "forward", make):
        yield fault


@contextmanager
def call_at_dit_step(step: int, action: Callable[[], None], core=None) -> Iterator[Fault]:
    """Run `action()` inside DiT forward call `step` (after the call computed its output), once. Used to send a
    real `POST /interrupt` while a given sampler step runs."""
    fault = Fault()

    def make(real):
        def forward(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            fault.calls += 1
            if fault.calls == step:
                fault.fired += 1
                action()
            return out
        return forward

    with _patched(_mod(core, "dit").NextDiT, "forward", make):
        yield fault


# ------------------------------------------------------------------------------------------- VAE
@contextmanager
def oom_in_vae_decode(first_n_calls: int = 1, tiles_too: bool = False, core=None) -> Iterator[Fault]:
    """The first `first_n_calls` full (untiled) VAE decodes raise torch.OutOfMemoryError; with `tiles_too`
    every tiled decode does as well (so the automatic tiled retry fails too)."""
    fault = Fault()
    vae = _mod(core, "vae").FluxVAE

    def make_full(real):
        def decode(self, latents, tiled=False):
            if not tiled:
                fault.calls += 1
                if fault.fired < first_n_calls:
                    fault.fired += 1
                    raise torch.OutOfMemoryError(OOM_MESSAGE)
            elif tiles_too:
                raise torch.OutOfMemoryError(OOM_MESSAGE)
            return real(self, latents, tiled=tiled)
        return decode

    def make_tiled(real):
        def decode_tiled(self, z, tile=None):
            if tiles_too:
                fault.log.append(tile)
                raise torch.OutOfMemoryError(OOM_MESSAGE)
            return real(self, z, tile)
        return decode_tiled

    with _patched(vae, "decode", make_full), _patched(vae, "_decode_tiled", make_tiled):
        yield fault


# ------------------------------------------------------------------------------------------- NaN
@contextmanager
def nan_in_stage(stage: str, value: float = float("nan"), core=None) -> Iterator[Fault]:
    """Make one stage's output non-finite, as an fp16 overflow would: "dit" (every DiT forward), "vae" (the
    decoded images, full or tiled), "text" (the Gemma features)."""
    fault = Fault()

    def poison(real):
        def wrapped(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            fault.calls += 1
            fault.fired += 1
            if isinstance(out, tuple):  # Gemma: (features, mask)
                return (torch.full_like(out[0], value),) + tuple(out[1:])
            return torch.full_like(out, value)
        return wrapped

    if stage == "dit":
        with _patched(_mod(core, "dit").NextDiT, "forward", poison):
            yield fault
    elif stage == "vae":
        vae = _mod(core, "vae").FluxVAE
        with _patched(vae, "decode", poison), _patched(vae, "_decode_tiled_scaled", poison):
            yield fault
    elif stage == "text":
        with _patched(_mod(core, "text.gemma").GemmaTextEncoder, "encode_ids", poison):
            yield fault
    else:
        raise ValueError(f"unknown stage {stage!r}: dit, vae or text")


# ------------------------------------------------------------------------------------------- files
@contextmanager
def track_tensors_read(fail_after: int | None = None, core=None) -> Iterator[list]:
    """Weak references to every tensor read from a safetensors file inside the block (through
    `files.open_safetensors`). With `fail_after=n` the read of tensor n+1 raises OSError (an I/O error or a file
    cut while it was read), so a load fails part-way with n tensors already in memory."""
    refs: list = []
    files = _mod(core, "files")

    class Handle:
        def __init__(self, handle):
            self._h = handle

        def get_tensor(self, key):
            if fail_after is not None and len(refs) >= fail_after:
                raise OSError(5, "Input/output error (injected by tests/faults.py)")
            t = self._h.get_tensor(key)
            refs.append(weakref.ref(t))
            return t

        def __getattr__(self, name):
            return getattr(self._h, name)

    with _patched(files, "open_safetensors", lambda real: (lambda path: Handle(real(path)))):
        yield refs


def truncated_copy(src: str | Path, dst: str | Path, keep: float | int) -> Path:
    """Copy `src` to `dst` keeping only the first `keep` bytes (an int) or fraction of the file (a float < 1)."""
    data = Path(src).read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else int(keep)
    Path(dst).write_bytes(data[:n])
    return Path(dst)


def lfs_pointer(dst: str | Path) -> Path:
    """A Git LFS pointer file where the weights should be (a clone without `git lfs pull`)."""
    Path(dst).write_text("version https://git-lfs.github.com/spec/v1\n"
                         "oid sha256:4d7a2146e2a6b5b9d0b7a7c0f3b1d7e1c1c0a7e5f0e0b1a2c3d4e5f60718293a\nsize 7171264832\n")
    return Path(dst)


class _Exploit:
    """Pickled as `exec(code)`: whoever unpickles it with code execution allowed runs `code`."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def malicious_pth(path: str | Path, marker: str | Path) -> Path:
    """A `.pth` holding real tensors plus a pickle that creates the file `marker` when it is unpickled with code
    execution allowed (`torch.load(weights_only=False)`): the check that no file's code ever runs."""
    code = f"open({str(marker)!r}, 'w').write('code from a model file ran')"
    torch.save({"encoder.conv_in.weight": torch.zeros(2, 2), "payload": _Exploit(code)}, str(path))
    return Path(path)


# ------------------------------------------------------------------------------------------- network
@contextmanager
def no_network() -> Iterator[Fault]:
    """Every socket connect and DNS lookup raises OSError and is recorded in `fault.log` (so code that swallows
    the error is still caught). Local socketpairs (no connect) keep working."""
    fault = Fault()

    def refuse(what):
        def blocked(*args, **kwargs):
            fault.calls += 1
            fault.log.append(f"{what}{args[1:] if what.startswith('socket.') else args}")
            raise OSError(101, f"network access blocked by tests/faults.py ({what})")
        return blocked

    with _patched(socket.socket, "connect", lambda r: refuse("socket.connect")), \
            _patched(socket.socket, "connect_ex", lambda r: refuse("socket.connect_ex")), \
            _patched(socket, "getaddrinfo", lambda r: refuse("getaddrinfo")), \
            _patched(socket, "create_connection", lambda r: refuse("create_connection")):
        yield fault

"""Low-VRAM layer streaming: a model's repeated blocks stay in (pinned) CPU memory and each is copied to the
device just before it runs, on a side stream, one block ahead, so the copy overlaps the previous block's compute.

    streamer = LayerStreamer(layers, device="cuda", resident=4)   # layers in execution order
    ...model forward as usual...                                  # hooks swap each block in and out
    streamer.detach()

Only a few fixed device buffers ("slots", each the size of the largest block) are allocated once, so the
device holds `(prefetch + 1) · block + resident blocks` of weights whatever the model size, and the caching
allocator never fragments. `resident` blocks (chosen from a memory budget by `resident_for_budget`) are copied
once and stay. The compute device always comes from the inputs: the hooks bind each block's tensors to views
of its slot before it runs and back to the host copies after, so no code ever reads a device off a weight
that may be elsewhere (the failure mode of placing inputs "where the first weight is").

A block's tensors (parameters, persistent and non-persistent buffers, fp8 `weight_scale`s) are read from the
block as it is when the streamer is built: the caller first points them at the host copies it wants streamed
(`memory.StagedModel` does: pinned pristine tensors, or converted pinned copies for other precisions).
On CPU devices the same code runs with synchronous copies (tests exercise the bookkeeping there).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

ALIGN = 256  # bytes; every tensor starts at an aligned offset inside a slot


@dataclass
class _Entry:
    """One tensor of a block: where it lives on the module and where it sits inside a slot."""

    module: nn.Module
    name: str
    kind: str  # "p" parameter, "b" buffer
    host: torch.Tensor
    offset: int

    @property
    def nbytes(self) -> int:
        return self.host.numel() * self.host.element_size()

    def view_in(self, base: torch.Tensor) -> torch.Tensor:
        """This tensor's place inside a slot (a uint8 buffer), as a tensor of its dtype and shape."""
        return base[self.offset:self.offset + self.nbytes].view(self.host.dtype).view(self.host.shape)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def block_tensors(block: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """Every tensor a block owns: (module, name, kind, tensor) for parameters and buffers (fp8 scales too)."""
    out = []
    for mod in block.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                out.append((mod, name, "p", p.data))
        for name, b in mod._buffers.items():
            if b is not None:
                out.append((mod, name, "b", b))
    return out


def block_nbytes(block: nn.Module) -> int:
    """Bytes a block occupies inside a slot (aligned tensors)."""
    return sum(_align(t.numel() * t.element_size()) for *_, t in block_tensors(block))


def resident_for_budget(block_bytes: Sequence[int], budget: int | None, prefetch: int = 1) -> int:
    """How many leading blocks can stay on the device within `budget` bytes of block weights.

    The streaming slots (`prefetch + 1` of the largest block) are paid first; `None` keeps everything streamed.
    Never negative, never more than the number of blocks.
    """
    if budget is None or not block_bytes:
        return 0
    left = budget - (prefetch + 1) * max(block_bytes)
    n = 0
    for b in block_bytes:
        if left < b:
            break
        left -= b
        n += 1
    return n


def _bind(entries: list[_Entry], base: torch.Tensor | None) -> None:
    """Point each entry's module tensor at its view inside `base` (a slot), or at its host copy (None)."""
    for e in entries:
        t = e.host if base is None else e.view_in(base)
        if e.kind == "p":
            e.module._parameters[e.name].data = t
        else:
            e.module._buffers[e.name] = t


class LayerStreamer:
    """Streams `layers` (in execution order) to `device` through `prefetch + 1` slots; see the module docstring."""

    def __init__(self, layers: Sequence[nn.Module], device: torch.device | str, resident: int = 0,
                 prefetch: int = 1) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.layers = list(layers)
        self.resident = max(0, min(int(resident), len(self.layers)))
        self.prefetch = max(1, int(prefetch))
        self.entries: list[list[_Entry]] = []
        self._sizes: list[int] = []  # slot bytes per block (= block_nbytes)
        for layer in self.layers:
            entries, size = [], 0
            for mod, name, kind, t in block_tensors(layer):
                entries.append(_Entry(mod, name, kind, t, size))
                size = _align(size + t.numel() * t.element_size())
            self.entries.append(entries)
            self._sizes.append(size)
        self._resident_bufs = []
        for i in range(self.resident):
            buf = torch.empty(self._sizes[i], dtype=torch.uint8, device=self.device)
            self._copy(buf, i, stream=None)
            _bind(self.entries[i], buf)
            self._resident_bufs.append(buf)
        self.streamed = list(range(self.resident, len(self.layers)))
        self._pos = {i: k for k, i in enumerate(self.streamed)}
        n_slots = min(self.prefetch + 1, len(self.streamed))
        slot_bytes = max((self._sizes[i] for i in self.streamed), default=0)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(n_slots)]
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda and self.slots else None
        self._slot_of: dict[int, int] = {}
        self._owner: list[int | None] = [None] * n_slots
        self._free_event: list[torch.cuda.Event | None] = [None] * n_slots
        self._ready: dict[int, torch.cuda.Event] = {}
        self._next = 0
        self._hooks = []
        for i in self.streamed:
            layer = self.layers[i]
            self._hooks.append(layer.register_forward_pre_hook(functools.partial(self._before, i)))
            self._hooks.append(layer.register_forward_hook(functools.partial(self._after, i)))
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------------------------ accounting
    @property
    def device_bytes(self) -> int:
        """Bytes of device memory this streamer holds (slots + resident blocks)."""
        return sum(s.numel() for s in self.slots) + sum(b.numel() for b in self._resident_bufs)

    # ------------------------------------------------------------------------------------ copies
    def _copy(self, dst: torch.Tensor, i: int, stream) -> None:
        for e in self.entries[i]:
            e.view_in(dst).copy_(e.host, non_blocking=stream is not None)

    def _fetch(self, i: int, protect: int | None = None) -> None:
        """Start copying block `i` into the least recently used slot, never the one holding block `protect`."""
        s = self._next
        if protect is not None and self._owner[s] == protect and protect != i:
            s = (s + 1) % len(self.slots)
        self._next = (s + 1) % len(self.slots)
        old = self._owner[s]
        if old is not None:
            self._slot_of.pop(old, None)
            self._ready.pop(old, None)
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                if self._free_event[s] is not None:
                    self.copy_stream.wait_event(self._free_event[s])
                self._copy(self.slots[s], i, self.copy_stream)
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
            self._ready[i] = ev
        else:
            self._copy(self.slots[s], i, None)
        self._slot_of[i], self._owner[s] = s, i

    # ------------------------------------------------------------------------------------ hooks
    def _before(self, i: int, module, args):
        if i not in self._slot_of:
            self._fetch(i)
        s = self._slot_of[i]
        if i in self._ready:
            torch.cuda.current_stream(self.device).wait_event(self._ready[i])
        _bind(self.entries[i], self.slots[s])
        k = self._pos[i]
        for d in range(1, len(self.slots)):
            j = self.streamed[(k + d) % len(self.streamed)]
            if j not in self._slot_of:
                self._fetch(j, protect=i)
        return None

    def _after(self, i: int, module, args, output):
        s = self._slot_of.get(i)
        if s is not None and self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._free_event[s] = ev
        _bind(self.entries[i], None)
        return None

    def detach(self) -> None:
        """Remove the hooks, point every block back at its host tensors and free the device buffers."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for es in self.entries:
            _bind(es, None)
        self.slots, self._resident_bufs = [], []
        self._slot_of.clear()
        self._ready.clear()


class PinnedArena:
    """One page-locked host buffer of exactly the requested size holding copies of many CPU tensors.

    Page-locked ("pinned") memory lets host→device copies run at full bus speed and asynchronously (needed for
    the copy/compute overlap above). The buffer is an ordinary CPU allocation registered with CUDA
    (`cudaHostRegister`), not the caching host allocator, which rounds each block up to a power of two.
    Without CUDA (or with `pin=False`: the host's pinned-memory budget is spent) the arena is plain memory:
    copies from it work, synchronously. `close()` unregisters it (also on garbage collection) and then calls
    `on_close` once, if the buffer was registered (a host's pinned-memory accounting).

    `adopt(i, view)`, when given, is called right after tensor i is copied so the caller points the tensor's
    owner at its view at once; `tensors` must then be a list the caller keeps no other reference to: the arena
    drops each entry once copied. Each original is then freed as soon as it is copied, instead of the whole
    model existing twice in host memory until the end (tests/core/test_streaming.py measures it on the CPU:
    +290 MiB transient for 288 MiB of weights without it, none with it). The buffer's pages are committed as
    they are written.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], pin: bool = True,
                 on_close: Callable[[], None] | None = None,
                 adopt: Callable[[int, torch.Tensor], None] | None = None) -> None:
        offsets, size = [], 0
        for t in tensors:
            offsets.append(size)
            size = _align(size + t.numel() * t.element_size())
        self.buffer = torch.empty(max(size, 1), dtype=torch.uint8)
        self.views = []
        for i, off in enumerate(offsets):
            t = tensors[i]
            v = self.buffer[off:off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            v.copy_(t)
            self.views.append(v)
            if adopt is not None:
                tensors[i] = t = None  # the last reference but the owner's, which `adopt` replaces
                adopt(i, v)
        self.registered = False
        if pin and torch.cuda.is_available():
            err = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), self.buffer.numel(), 0)
            self.registered = int(getattr(err, "value", err)) == 0
        self._on_close = on_close if self.registered else None

    def absorb(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """The arena's views for `tensors` (the same tensors, in the order the arena was built from), after
        copying in every one that no longer lives in the arena: a host that moved weights to the device and back
        (ComfyUI's partial load, then unload) leaves fresh pageable copies, which would silently halve the
        streaming bandwidth. Only the moved tensors are copied. None when the layout differs (other tensors,
        shapes or dtypes): build a new arena then."""
        if len(tensors) != len(self.views) or any(
                t.shape != v.shape or t.dtype != v.dtype for t, v in zip(tensors, self.views)):
            return None
        with torch.no_grad():
            for t, v in zip(tensors, self.views):
                if t.data_ptr() != v.data_ptr():
                    v.copy_(t)
        return self.views

    def close(self) -> None:
        """Unregister the buffer from CUDA (the memory itself is freed with the last view)."""
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.registered = False
        if self._on_close is not None:
            self._on_close, done = None, self._on_close
            done()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass

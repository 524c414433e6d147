"""Device memory: the one place that moves weights between stages, clears caches and keeps the stage ledger.

`StagedModel` keeps a model's weights on the CPU (as read from disk, "pristine") and puts a cast copy on the
device only while its stage runs. Changing precision re-casts from the pristine copy, never re-reading disk.
`Ledger` records wall time and memory per stage. `EmbeddingCache` lets a repeated prompt skip the encoders.
"""
from __future__ import annotations

import gc
import logging
import os
import resource
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .precision import Precision, convert_tensor, set_tensor
from .streaming import LayerStreamer, PinnedArena, block_nbytes, resident_for_budget

log = logging.getLogger(__name__)
GiB = 1024**3
MiB = 1024**2


def empty_device_cache(device: torch.device | str | None = None, collect: bool = True) -> None:
    """Collect garbage, then return cached blocks of `device` (all accelerators when None) to the driver.

    Order matters: dropping references and collecting first lets the allocator actually free the blocks.
    `collect=False` skips the garbage collection (0.2–0.5 s in a process holding large models or compiled
    graphs) where the caller has dropped its references itself, e.g. `StagedModel.release`.
    """
    if collect:
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


def default_device() -> torch.device:
    """CUDA if present, else MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def rss_bytes() -> int:
    """Resident set size of this process now (bytes); 0 where /proc is unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StagedModel:
    """A model whose pristine weights stay on the CPU; `acquire` places a cast copy on a device for one stage.

    The wrapped module object is kept; only its tensors are swapped, so wrappers holding it (a tokenizer-owning
    encoder, a diffusers VAE) keep working. While released, its parameters alias the pristine CPU tensors.
    `cpu_only` names submodules that always stay on the CPU in pristine dtype (e.g. a huge embedding table).
    `stream` names the ModuleLists of repeated blocks, in execution order, that low-VRAM mode streams
    (`acquire(..., streaming=True)`): only a few blocks are on the device at a time (see `streaming.py`).
    """

    def __init__(self, name: str, module: nn.Module, source: str = "", cpu_only: tuple[str, ...] = (),
                 stream: tuple[str, ...] = ()):
        self.name, self.module, self.source = name, module.eval().requires_grad_(False), source
        self.cpu_only, self.stream = cpu_only, stream
        self._pristine: dict[str, torch.Tensor] = {k: t.detach() for k, t in self._tensors()}
        self.streamer: LayerStreamer | None = None
        self._key: tuple | None = None  # (device, precision, streaming, budget) while placed; None = idle
        self._arena: PinnedArena | None = None

    @property
    def device(self) -> torch.device:
        """Where the weights are now (the CPU while idle)."""
        return self._key[0] if self._key else torch.device("cpu")

    @property
    def precision(self) -> Precision | None:
        """The precision the weights are placed in, or None while idle (pristine CPU copy)."""
        return self._key[1] if self._key else None

    def _tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for full, mod, pname, is_param in self._slots():
            yield full, (mod._parameters if is_param else mod._buffers)[pname]

    def _slots(self) -> Iterator[tuple[str, nn.Module, str, bool]]:
        for mod_name, mod in self.module.named_modules():
            for kind, table in (("p", mod._parameters), ("b", mod._buffers)):
                for pname, p in table.items():
                    if p is not None:
                        yield (f"{mod_name}.{pname}" if mod_name else pname), mod, pname, kind == "p"

    def _is_cpu_only(self, full_name: str) -> bool:
        return any(full_name == c or full_name.startswith(c + ".") for c in self.cpu_only)

    def stream_blocks(self) -> list[nn.Module]:
        """The blocks low-VRAM mode streams, in execution order."""
        return [b for name in self.stream for b in self.module.get_submodule(name)]

    @property
    def pristine_dtype(self) -> torch.dtype:
        """The dtype the weights were loaded in (the file's dtype)."""
        return next((t.dtype for t in self._pristine.values() if t.is_floating_point()), torch.float32)

    def pin(self) -> None:
        """Move the pristine CPU copy into page-locked memory (fast, asynchronous uploads); CUDA only, once."""
        if self._arena is not None or not torch.cuda.is_available():
            return
        if self.device.type != "cpu":
            self.release()
        names = list(self._pristine)
        owners = {full: (mod, pname) for full, mod, pname, _ in self._slots()}

        def adopt(i: int, view: torch.Tensor) -> None:  # the copy replaces the original at once (freed)
            self._pristine[names[i]] = view
            if names[i] in owners:
                set_tensor(*owners[names[i]], view)

        self._arena = PinnedArena([self._pristine[k] for k in names], adopt=adopt)
        self._point_at_pristine()

    def _point_at_pristine(self) -> None:
        """Every tensor back to its pristine CPU copy; tensors derived per stage (fp8 scales) are dropped."""
        with torch.no_grad():
            for full, mod, pname, _ in list(self._slots()):
                set_tensor(mod, pname, self._pristine.get(full))

    def _place(self, full: str, mod: nn.Module, pname: str, device: torch.device, precision: Precision,
               to_host: bool) -> dict[str, torch.Tensor]:
        """The tensor `full` as this stage stores it (`precision.convert_tensor`: on `device` in its target
        dtype, fp8 with its scale). `to_host`: the converted tensors go to pinned CPU memory instead (a
        streamed block); a tensor that needs no conversion is then the pristine one itself."""
        src = self._pristine[full]
        if self._is_cpu_only(full):
            return {pname: src}
        if to_host and not (precision.is_fp8 or (src.is_floating_point() and src.dtype != precision.compute)):
            return {pname: src}
        out = convert_tensor(mod, pname, src, precision, device)  # converted on the device (fast quantisation)
        if to_host:
            out = {k: (v.cpu().pin_memory() if v.is_cuda else v.cpu()) for k, v in out.items()}
        return out

    def acquire(self, device: torch.device | str, precision: Precision, streaming: bool = False,
                budget: int | None = None) -> nn.Module:
        """Place the weights on `device` in `precision` and return the module (a no-op if already placed so).

        `streaming`: the `stream` blocks stay in CPU memory and are streamed per call; `budget` (bytes of
        block weights allowed on the device) keeps that many leading blocks resident (None: all streamed).
        """
        device = torch.device(device)
        streaming = bool(streaming and self.stream)
        key = (device, precision, streaming, budget if streaming else None)
        if self._key == key:
            return self.module
        if self._key is not None:
            self.release()
        if device.type == "cuda":
            self.pin()
        streamed = tuple(f"{n}." for n in self.stream) if streaming else ()
        with torch.no_grad():
            for full, mod, pname, _ in list(self._slots()):
                if full in self._pristine:
                    to_host = bool(streamed) and full.startswith(streamed)
                    for attr, t in self._place(full, mod, pname, device, precision, to_host).items():
                        set_tensor(mod, attr, t)
        if streaming:
            blocks = self.stream_blocks()
            self.streamer = LayerStreamer(blocks, device, resident_for_budget([block_nbytes(b) for b in blocks], budget))
        self._key = key
        return self.module

    def release(self, clear_cache: bool = True) -> None:
        """Point every tensor back at the pristine CPU copy, dropping the device copy, and clear caches
        (`clear_cache=False`: leave the freed blocks cached, e.g. for the next model of the same stage)."""
        if self.streamer is not None:
            self.streamer.detach()
            self.streamer = None
        old_device, self._key = self.device, None
        self._point_at_pristine()
        if clear_cache and old_device.type != "cpu":
            empty_device_cache(old_device, collect=False)  # every device copy was just unreferenced

    def nbytes(self, on_device_only: bool = False) -> int:
        """Bytes the weights occupy now (on their current device and dtype)."""
        return sum(t.numel() * t.element_size() for _, t in self._tensors()
                   if not (on_device_only and t.device.type == "cpu"))

    def describe(self) -> dict[str, Any]:
        """Where and how this model is held: name, device, dtype(s), size in MiB, source file."""
        dtypes = sorted({str(t.dtype).replace("torch.", "") for _, t in self._tensors() if t.is_floating_point()})
        info = {"name": self.name, "device": str(self.device), "dtypes": dtypes,
                "precision": self.precision.name if self.precision else f"{self.pristine_dtype} (idle, CPU copy)",
                "bytes": self.nbytes(), "size_mib": round(self.nbytes() / MiB, 1), "source": self.source}
        if self.streamer is not None:
            info["streaming"] = {"blocks": len(self.streamer.layers), "resident": self.streamer.resident,
                                 "device_mib": round(self.streamer.device_bytes / MiB, 1)}
        return info


@dataclass
class StageRecord:
    """One stage's measurements: wall seconds, device, peak allocated/reserved bytes (CUDA), RSS (CPU)."""

    stage: str
    seconds: float
    device: str
    peak_allocated: int = 0
    peak_reserved: int = 0
    rss_before: int = 0
    rss_after: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (bytes as MiB)."""
        return {"stage": self.stage, "seconds": round(self.seconds, 4), "device": self.device,
                "peak_allocated_mib": round(self.peak_allocated / MiB, 1),
                "peak_reserved_mib": round(self.peak_reserved / MiB, 1),
                "rss_before_mib": round(self.rss_before / MiB, 1), "rss_after_mib": round(self.rss_after / MiB, 1),
                "notes": list(self.notes)}


class Ledger:
    """Per-stage wall time and memory, printed by the CLI and returned by the API."""

    def __init__(self) -> None:
        self.records: list[StageRecord] = []

    @contextmanager
    def stage(self, name: str, device: torch.device | str) -> Iterator[StageRecord]:
        """Measure the enclosed block as stage `name` on `device`; yields the record (to attach notes)."""
        device = torch.device(device)
        cuda = device.type == "cuda" and torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        rec = StageRecord(name, 0.0, str(device), rss_before=rss_bytes())
        t0 = time.perf_counter()
        try:
            yield rec
        finally:
            if cuda:
                torch.cuda.synchronize(device)
                rec.peak_allocated = torch.cuda.max_memory_allocated(device)
                rec.peak_reserved = torch.cuda.max_memory_reserved(device)
            rec.seconds = time.perf_counter() - t0
            rec.rss_after = rss_bytes()
            self.records.append(rec)

    def table(self) -> str:
        """A fixed-width text table of every stage."""
        head = f"{'stage':<10}{'seconds':>9}  {'device':<8}{'peak alloc':>12}{'peak resv':>12}{'RSS after':>12}  notes"
        lines = [head, "-" * len(head)]
        for r in self.records:
            gpu = r.device.startswith("cuda")
            alloc = f"{r.peak_allocated / MiB:>9.1f}MiB" if gpu else f"{'n/a':>12}"
            resv = f"{r.peak_reserved / MiB:>9.1f}MiB" if gpu else f"{'n/a':>12}"
            lines.append(f"{r.stage:<10}{r.seconds:>9.3f}  {r.device:<8}{alloc}{resv}{r.rss_after / MiB:>9.1f}MiB"
                         f"  {'; '.join(r.notes)}")
        return "\n".join(lines)

    def as_list(self) -> list[dict[str, Any]]:
        """Every record as a dict."""
        return [r.as_dict() for r in self.records]


class EmbeddingCache:
    """LRU cache of prompt embeddings (on the CPU), keyed by (text, system prompt, encoder files, precision)."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> Any | None:
        """The cached value for `key` (marking it recently used), or None."""
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        return None

    def put(self, key: tuple, value: Any) -> None:
        """Store `value`, evicting the least recently used entry beyond `max_entries`."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def nbytes(self) -> int:
        """RAM held by the cached tensors (every tensor attribute of each entry)."""
        tensors = (t for v in self._items.values() for t in getattr(v, "__dict__", {}).values())
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def clear(self) -> None:
        """Drop every entry."""
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def file_identity(path: str | os.PathLike | None) -> tuple:
    """(resolved path, size, mtime) of a file or folder: part of cache keys, changes when the file does."""
    if path is None:
        return ("<none>",)
    p = os.path.realpath(os.fspath(path))
    try:
        st = os.stat(p)
        return (p, st.st_size, int(st.st_mtime))
    except OSError:
        return (p,)

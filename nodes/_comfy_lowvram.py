"""ComfyUI-internal glue for low VRAM (a part of `_comfy`, split out for size): every pack model partially
loadable by ComfyUI's ModelPatcher, and the engine's pinned-memory block streaming for the DiT and the text
encoders where it is faster than ComfyUI's partial loading (`should_stream`).

* `make_castable(module)`: every module holding parameters becomes a ComfyUI "castable" op (`comfy_cast_weights`,
  `weight_function`/`bias_function`) by class swap, keeping the very same Parameters: the engine's `Fp8Linear`
  becomes `NewBieOps.Linear`, anything else (transformers' Linear/Embedding/LayerNorm/RMSNorm, the VAE's
  Conv2d/GroupNorm) a subclass of its own class whose forward runs unchanged on weights ComfyUI cast to the
  input's device in their own dtype, so a partially loaded model computes the fully loaded numbers bit for bit.
* `ParamlessBuffers`: buffers of parameter-less modules (rotary tables) follow the model on a partial load
  (ComfyUI only moves modules it lists, i.e. those with parameters).
* `streamed_dit(patcher, ...)`: the DiT's blocks streamed by `newbie_core.streaming.LayerStreamer` (pinned host
  copies, prefetch on a side stream) with the budget ComfyUI's memory manager leaves after evicting others.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

import comfy.model_management as mm
import comfy.ops

from ..newbie_core.fp8 import Fp8Linear
from ..newbie_core.loading import STREAMED_BLOCKS
from ..newbie_core.streaming import LayerStreamer, PinnedArena, block_nbytes, resident_for_budget
from ._comfy_compat import cast_bias_weight, dynamic_vram, release_pinned, reserve_pinned

log = logging.getLogger("newbie")
_SUBCLASSES: dict[tuple, type] = {}


class _Proxy:
    """What `comfy.ops.cast_bias_weight` reads off a layer, for modules without a `bias` attribute."""

    def __init__(self, m):
        self.weight, self.bias = m.weight, getattr(m, "bias", None)
        self.weight_function, self.bias_function = m.weight_function, m.bias_function


class CastableMixin(comfy.ops.CastWeightBiasOp):
    """Makes any parameter-holding module castable by ComfyUI: when ComfyUI leaves its weights on the offload
    device (`comfy_cast_weights`) or patches them per call (`weight_function`, LoRA under low VRAM), the
    module's own forward runs on per-call device copies in the parameters' own dtype."""

    def forward(self, *args, **kwargs):  # noqa: D102
        if not (self.comfy_cast_weights or self.weight_function or self.bias_function):
            return super().forward(*args, **kwargs)
        x = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor))
        originals = dict(self._parameters)
        stream = None
        casted = {}
        if originals.get("weight") is not None:
            w = originals["weight"]
            b = originals.get("bias")
            kw = dict(dtype=w.dtype, device=x.device, bias_dtype=None if b is None else b.dtype)
            weight, bias, stream = cast_bias_weight(_Proxy(self), x, **kw)
            casted["weight"] = weight
            if b is not None:
                casted["bias"] = bias
        for name, p in originals.items():
            if p is not None and name not in casted:
                casted[name] = mm.cast_to(p, None, x.device)
        try:
            self._parameters.update(casted)  # plain tensors for this call; the Parameters come back below
            return super().forward(*args, **kwargs)
        finally:
            self._parameters.update(originals)
            if stream is not None:
                comfy.ops.uncast_bias_weight(self, casted.get("weight"), casted.get("bias"), stream)


def _castable_class(m: torch.nn.Module) -> type:
    """The castable subclass of `type(m)`. ComfyUI ≥ 0.4 reads `.weight` and `.bias` of every castable layer:
    a class whose instances have none (RMSNorm: no bias) gets a `None` class attribute for it."""
    cls = type(m)
    missing = tuple(n for n in ("weight", "bias") if not hasattr(m, n))
    if (cls, missing) not in _SUBCLASSES:
        attrs = {"__module__": __name__, **{n: None for n in missing}}
        _SUBCLASSES[(cls, missing)] = type(f"Castable{cls.__name__}", (CastableMixin, cls), attrs)
    return _SUBCLASSES[(cls, missing)]


def make_castable(module: torch.nn.Module, linear_class: type | None = None) -> int:
    """Swap the class of every module of `module` holding parameters for a ComfyUI-castable one (same object,
    same Parameters, same forward). `Fp8Linear`s become `linear_class` (NewBieOps.Linear). Idempotent; returns
    how many modules changed."""
    n = 0
    for m in _weight_modules(module):
        if isinstance(m, comfy.ops.CastWeightBiasOp):
            continue
        if type(m) is Fp8Linear and linear_class is not None:
            m.__class__ = linear_class
        else:
            m.__class__ = _castable_class(m)
        n += 1
    return n


def true_size(module: torch.nn.Module) -> int:
    """Bytes a full load puts on the device: parameters and every buffer, non-persistent ones included (rotary
    caches, fp8 scales), which ComfyUI's own estimate (`module_size`: the state dict) leaves out."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _weight_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules holding parameters of their own and none in children: what ComfyUI's partial load lists."""
    out = []
    for m in module.modules():
        own = sum(1 for _ in m.parameters(recurse=False))
        if own and own == sum(1 for _ in m.parameters()):
            out.append(m)
    return out


def all_castable(module: torch.nn.Module) -> bool:
    """Whether every parameter of `module` sits in a module ComfyUI can leave offloaded and cast per call
    (and no parameter sits in a non-leaf module, which ComfyUI's partial load would never move)."""
    listed = _weight_modules(module)
    covered = sum(sum(1 for _ in m.parameters()) for m in listed)
    return covered == sum(1 for _ in module.parameters()) and all(
        isinstance(m, comfy.ops.CastWeightBiasOp) for m in listed)


def follow_buffers(patcher, every: bool = False) -> None:
    """After each ComfyUI load, move the buffers of parameter-less modules (rotary tables; not listed by a
    partial load) to where the model was loaded; a full load already moved them. `every`: all buffers (the
    DiT's fp8 `weight_scale`s, a few MiB), so a layer ComfyUI left offloaded does not copy its scale from
    pageable memory outside the offload stream at every call."""
    from comfy.patcher_extension import CallbacksMP

    def on_load(p, device_to, lowvram_model_memory, force_patch_weights, full_load):
        if device_to is None:
            return
        for m in p.model.modules():
            if every or not any(True for _ in m.parameters(recurse=False)):
                for name, b in list(m._buffers.items()):
                    if b is not None and b.device != torch.device(device_to):
                        m._buffers[name] = b.to(device_to)

    patcher.add_callback(CallbacksMP.ON_LOAD, on_load)


# ----------------------------------------------------------------------------------- DiT block streaming
def stream_mode(patcher) -> str:
    """`model_options["newbie_stream"]`: auto (default: `should_stream`'s rule), on, off."""
    return patcher.model_options.get("newbie_stream", "auto")


def should_stream(patcher, memory_required: int, released_after: bool = False) -> bool:
    """Whether this placement of a model (DiT, Gemma, Jina) runs on the engine's pinned path (`streamed`: blocks
    uploaded from one pinned host copy, as many resident as the free memory allows, the rest streamed one ahead).

    On a CUDA device, unless ComfyUI manages VRAM dynamically (then every allocation is ComfyUI's to plan):
    * `released_after` (a model whose node has keep_loaded off: text encoders, and the DiT since it is released
      after sampling as in the CLI): always. It uploads from pinned memory and releases by pointing the
      weights back at that copy, where ComfyUI's unload copies every weight back into fresh pageable memory
      (seconds for Gemma, at every prompt).
    * otherwise when the model does not fit (or ComfyUI runs --lowvram/--novram), on every ComfyUI version: on
      an H200 the engine streams a DiT under 2 GiB at 1.02–1.04× its full-load step, ComfyUI's partial load at
      1.5–1.7× (0.3.64) and 1.23–1.33× (0.4.0 with its async offload; its own native model 1.15× at 3 GiB).
    `model_options["newbie_stream"]` (auto/on/off) overrides; LoRA-patched and compiled models keep ComfyUI's
    path. A model whose home (offload device) is the GPU (`--highvram` DiT, `--gpu-only`) is never streamed from
    a host copy; under those flags `ComfyHost` releases nothing after its stage either."""
    mode = stream_mode(patcher)
    if mode == "off" or patcher.patches or patcher.model_options.get("newbie_compile"):
        return False  # ComfyUI applies patches (LoRA) itself; compiled graphs keep the resident path
    if getattr(patcher, "offload_device", torch.device("cpu")).type != "cpu":
        return False  # its weights live on the device (--highvram DiT, --gpu-only): nothing to stream from
    if mode == "on":
        return True
    dev = patcher.load_device
    if dev.type != "cuda" or dynamic_vram():
        return False
    if released_after:
        return True
    fits = mm.get_free_memory(dev) + patcher.loaded_size() > patcher.model_size() + memory_required \
        + mm.minimum_inference_memory()
    return not (fits and mm.vram_state not in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM))


def _blocks(root, role: str) -> list[torch.nn.Module]:
    """The role's streamed blocks in execution order (`loading.STREAMED_BLOCKS`: DiT refiners + layers, the text
    encoders' decoder/encoder layers, found wherever transformers nests them)."""
    out = []
    for name in STREAMED_BLOCKS[role]:
        lists = [m for n, m in root.named_modules() if n == name or n.endswith("." + name)]
        if lists:
            out.extend(lists[0])
    return out


def _pin_blocks(patcher, blocks) -> None:
    """Point the blocks' tensors at one pinned arena (kept with the model, so pinned once per load). Tensors
    ComfyUI moved since (a partial load and unload makes fresh pageable copies) are copied back into their
    pinned places (`PinnedArena.absorb`): checking only one tensor once let most of a DiT stream from pageable
    memory at half the bandwidth after ComfyUI had partially loaded it. A new arena takes each tensor over as
    it copies it (`adopt`), so the model never exists twice in host memory."""
    if not torch.cuda.is_available():
        return
    owners = [(m, n, k) for b in blocks for m, n, k, _ in _tensors(b)]

    def point(i: int, view: torch.Tensor) -> None:
        m, n, k = owners[i]
        if k == "p":
            m._parameters[n].data = view
        else:
            m._buffers[n] = view

    def current() -> list[torch.Tensor]:
        return [m._parameters[n].data if k == "p" else m._buffers[n] for m, n, k in owners]

    arena = getattr(patcher, "newbie_arena", None)
    views = arena.absorb(current()) if arena is not None else None
    if views is not None:
        for i, v in enumerate(views):
            point(i, v)
    else:
        unpin(patcher)
        tensors = current()  # emptied by the arena as it adopts each one
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        counted = reserve_pinned(nbytes)
        arena = PinnedArena(tensors, pin=counted, on_close=lambda: release_pinned(nbytes), adopt=point)
        if counted and not arena.registered:
            release_pinned(nbytes)  # CUDA refused the registration
        if not arena.registered:
            log.warning("NewBie: %.2f GiB of weights stream from ordinary memory, slower (ComfyUI's pinned-memory "
                        "budget is spent, --disable-pinned-memory, or CUDA refused to pin).", nbytes / 2**30)
    patcher.newbie_arena = arena


def _tensors(block):
    from ..newbie_core.streaming import block_tensors

    return block_tensors(block)


def unpin(patcher) -> None:
    """Release the page-locked registration of a model's pinned block copies (Memory Purge); weights stay."""
    arena = getattr(patcher, "newbie_arena", None)
    if arena is not None:
        arena.close()
        patcher.newbie_arena = None


def streamed_dit(patcher, memory_required: int, budget: int | None = None):
    """`streamed` for the DiT of a MODEL patcher."""
    return streamed(patcher, patcher.model.diffusion_model, "dit", memory_required, budget)


@contextmanager
def streamed(patcher, dm: torch.nn.Module, role: str, memory_required: int = 0, budget: int | None = None):
    """Run `dm` (the patcher's model: DiT, Gemma or Jina) with its blocks streamed: ComfyUI first unloads this
    model and frees `memory_required` plus two blocks (evicting other models as it would), the rest of the model
    (embedders, final layers) is placed on the device, and as many leading blocks as the free memory allows (at
    most `budget` bytes) stay resident. Everything on the device is released when the stage ends, so ComfyUI's
    accounting never misses memory we hold."""
    dev = patcher.load_device
    from ._comfy import unload

    unload(patcher, clear_cache=False)
    blocks = _blocks(dm, role)
    sizes = [block_nbytes(b) for b in blocks]
    mm.free_memory(memory_required + 2 * max(sizes) + mm.minimum_inference_memory(), dev)
    if dev.type == "cuda":  # a cap (the loader's stream_vram_gb) never beyond what is free
        free = max(0, mm.get_free_memory(dev) - memory_required - mm.minimum_inference_memory())
        budget = free if budget is None else min(budget, free)
    _pin_blocks(patcher, blocks)
    in_blocks = {(id(m), n) for b in blocks for m, n, _, _ in _tensors(b)}
    moved = []
    for m in dm.modules():
        for kind, table in (("p", m._parameters), ("b", m._buffers)):
            for name, t in table.items():
                if t is not None and (id(m), name) not in in_blocks and t.device != dev:
                    host = t.data if kind == "p" else t
                    moved.append((m, kind, name, host))
                    if kind == "p":
                        t.data = host.to(dev)
                    else:
                        table[name] = host.to(dev)
    resident = resident_for_budget(sizes, budget)
    streamer = LayerStreamer(blocks, dev, resident=resident)
    log.info("NewBie %s: %d of %d blocks resident, the rest streamed (%.2f GiB on %s)", role, resident, len(blocks),
             streamer.device_bytes / 2**30, dev)
    try:
        yield dm
    finally:
        streamer.detach()
        for m, kind, name, host in moved:
            if kind == "p":
                m._parameters[name].data = host
            else:
                m._buffers[name] = host

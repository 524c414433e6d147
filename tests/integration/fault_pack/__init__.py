"""Test-only ComfyUI custom node pack: arms the faults of tests/faults.py inside a running server.

Never shipped and never loaded by users: tests/integration/test_reliability_server.py symlinks it into the
custom_nodes/ of its own server, next to the pack under test. It registers no nodes, only routes:

    POST /newbie_test/arm     {"fault": "oom_dit", "step": 2}          DiT forward call `step` raises OutOfMemory
                              {"fault": "oom_vae", "calls": 1}         the first full VAE decode(s) raise it
                              {"fault": "nan", "stage": "dit"}         a stage outputs NaN (dit / vae / text)
                              {"fault": "interrupt_dit", "step": 3}    a real POST /interrupt during DiT call `step`
                              {"fault": "spy_open"}                    record every path opened (builtins.open,
                                                                       os.open, safetensors.safe_open): state "opened"
    POST /newbie_test/disarm  undo every armed fault
    GET  /newbie_test/state   {"armed", "fired", "calls", "loaded": [pack models ComfyUI holds], "cuda_allocated",
                               "live_latents": [shapes of live 4-D tensors with 16 channels (latents) after a gc]}

Faults patch the classes of the pack under test (its own `newbie_core`, found in sys.modules), never the product
files, and each fires as often as armed, then the code runs normally again.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import sys
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import torch
from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS: dict = {}
PACK_NAME = "newbie_staged"

_spec = importlib.util.spec_from_file_location("newbie_test_faults", Path(__file__).resolve().parents[2] / "faults.py")
faults = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = faults  # dataclasses look their module up there
_spec.loader.exec_module(faults)

_armed = ExitStack()
_state: dict = {"armed": [], "faults": []}


def _pack_core() -> str:
    """sys.modules name of the pack's newbie_core (ComfyUI names a pack module after its full path)."""
    for name in sys.modules:
        if name.endswith(f"{PACK_NAME}.newbie_core") or name == f"custom_nodes.{PACK_NAME}.newbie_core":
            return name
    raise RuntimeError(f"the pack {PACK_NAME!r} is not loaded")


def _post_interrupt() -> None:
    srv = PromptServer.instance
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/interrupt", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()


class _SpyOpen:
    """Records the paths opened through builtins.open, os.open and safetensors.safe_open while armed."""

    def __init__(self):
        self.fired, self.calls, self.opened, self._undo = 0, 0, [], []

    def __enter__(self):
        import builtins
        import os

        import safetensors

        for mod, name in ((builtins, "open"), (os, "open"), (safetensors, "safe_open")):
            real = getattr(mod, name)

            def spy(f, *a, _real=real, **k):
                self.calls += 1
                self.opened.append(os.fspath(f) if isinstance(f, (str, os.PathLike)) else repr(f))
                return _real(f, *a, **k)
            setattr(mod, name, spy)
            self._undo.append((mod, name, real))
        return self

    def __exit__(self, *exc):
        for mod, name, real in self._undo:
            setattr(mod, name, real)


def _arm(spec: dict):
    core, kind = _pack_core(), spec["fault"]
    if kind == "spy_open":
        return _SpyOpen()
    if kind == "oom_dit":
        return faults.oom_at_dit_step(int(spec["step"]), core=core)
    if kind == "oom_vae":
        return faults.oom_in_vae_decode(int(spec.get("calls", 1)), bool(spec.get("tiles_too", False)), core=core)
    if kind == "nan":
        return faults.nan_in_stage(spec["stage"], core=core)
    if kind == "interrupt_dit":
        return faults.call_at_dit_step(int(spec["step"]), _post_interrupt, core=core)
    raise ValueError(f"unknown fault {kind!r}")


routes = PromptServer.instance.routes


@routes.post("/newbie_test/arm")
async def arm(request):
    spec = await request.json()
    try:
        fault = _armed.enter_context(_arm(spec))
    except Exception as e:  # noqa: BLE001 - report to the test
        return web.json_response({"error": str(e)}, status=400)
    _state["armed"].append(spec)
    _state["faults"].append(fault)
    return web.json_response({"armed": _state["armed"]})


@routes.post("/newbie_test/disarm")
async def disarm(request):
    _armed.close()
    _state["armed"], _state["faults"] = [], []
    return web.json_response({"armed": []})


@routes.get("/newbie_test/state")
async def state(request):
    gc.collect()
    comfy = sys.modules[_pack_core().rsplit(".", 1)[0] + ".nodes._comfy"]
    latents = [list(t.shape) for t in gc.get_objects()
               if isinstance(t, torch.Tensor) and t.ndim == 4 and t.shape[1] == 16 and not t.is_meta]
    return web.json_response(json.loads(json.dumps({
        "armed": _state["armed"],
        "fired": [f.fired for f in _state["faults"]], "calls": [f.calls for f in _state["faults"]],
        "loaded": [m["model"] for m in comfy.pack_models() if m["loaded_by_comfyui"]],
        "cuda_allocated": torch.cuda.memory_allocated() if torch.cuda.is_available() else None,
        "live_latents": latents,
        "opened": [p for f in _state["faults"] for p in getattr(f, "opened", [])],
    })))

"""ComfyUI's executor in-process, measured: import ComfyUI with a run's flags (and a simulated smaller card),
queue API prompts through `execution.PromptExecutor`, and record per-node wall time and peak VRAM, whole-graph
peaks, and what `/free` and NewBie Memory Purge leave. Used by benchmarks/comfy_workflow_bench.py."""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GiB, MiB = 2**30, 2**20


class BenchServer:
    """What PromptExecutor needs of a PromptServer; records each node's start (the 'executing' messages) and the
    peak VRAM of the interval before it (the previous node's run), resetting the peak counters there."""

    def __init__(self, device: torch.device):
        self.client_id, self.last_node_id, self.sockets_metadata = None, None, {}
        self.device, self.events, self.messages = device, [], []

    def send_sync(self, event, data, sid=None):  # noqa: D102
        if event == "executing":
            self.events.append((time.perf_counter(), data.get("node"), _take_peaks(self.device)))
        elif event in ("execution_error", "execution_success", "execution_interrupted"):
            self.messages.append((event, data))

    def queue_updated(self):  # noqa: D102
        pass


def sync(device):
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _take_peaks(device) -> tuple[float, float]:
    """Peak allocated and reserved GiB since the last call (or the prompt's start); resets both counters."""
    sync(device)
    if device.type != "cuda":
        return 0.0, 0.0
    peaks = torch.cuda.max_memory_allocated(device) / GiB, torch.cuda.max_memory_reserved(device) / GiB
    torch.cuda.reset_peak_memory_stats(device)
    return peaks


def allocated_gib(device) -> float:
    """GiB the torch allocator holds on the device now (0 off CUDA)."""
    return torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else 0.0


def rss_mib() -> float:
    """This process's resident memory in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / MiB


def start_comfyui(args) -> tuple:
    """Import ComfyUI from $COMFYUI_DIR with this run's flags, register the model folder, load this pack."""
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir or not (Path(comfy_dir) / "comfy").is_dir():
        sys.exit("Set COMFYUI_DIR to a ComfyUI source tree (copy it into the repo as an ignored folder to carry it).")
    sys.path.insert(0, comfy_dir)
    import comfy.options

    comfy.options.enable_args_parsing()
    sys.argv = [sys.argv[0]] + shlex.split(args.comfy_args) + (["--cpu"] if args.device == "cpu" else [])
    import comfy.model_management as mm
    import folder_paths

    if args.card_gib and mm.get_torch_device().type == "cuda":
        simulate_card(mm, args.card_gib)
    import execution
    import nodes

    out_dir = Path(tempfile.mkdtemp(prefix="newbie-comfy-out-"))
    folder_paths.set_output_directory(str(out_dir))
    for key in ("diffusion_models", "text_encoders", "vae"):
        folder_paths.add_model_folder_path(key, str(Path(args.models_dir) / key), is_default=True)
    if not asyncio.run(nodes.load_custom_node(str(ROOT))):
        sys.exit("the pack failed to load into ComfyUI (see the log above)")
    asyncio.run(nodes.init_builtin_extra_nodes())  # comfy_extras: the core-KSampler graph's ModelSamplingAuraFlow
    return mm, execution, nodes


def simulate_card(mm, gib: float) -> None:
    """A `gib` card: the allocator is capped (set_per_process_memory_fraction) and ComfyUI's memory manager is
    told the same (free = cap − active, total = cap), so it plans loads as it would on that card."""
    dev = mm.get_torch_device()
    cap = int(gib * GiB)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / torch.cuda.get_device_properties(dev).total_memory))
    real_free, real_total = mm.get_free_memory, mm.get_total_memory

    def free(dev=None, torch_free_too=False):
        r = real_free(dev, torch_free_too)
        sim = max(0, cap - torch.cuda.memory_stats(dev or mm.get_torch_device()).get("active_bytes.all.current", 0))
        return (min(r[0], sim), r[1]) if torch_free_too else min(r, sim)

    def total(dev=None, torch_total_too=False):
        r = real_total(dev, torch_total_too)
        return (min(r[0], cap), r[1]) if torch_total_too else min(r, cap)

    mm.get_free_memory, mm.get_total_memory, mm.total_vram = free, total, cap / MiB


def object_info(nodes) -> dict:
    """/object_info as the server builds it, for the node types the converter needs."""
    out = {}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if hasattr(cls, "GET_NODE_INFO_V1"):
            out[name] = cls.GET_NODE_INFO_V1()
        else:
            inp = cls.INPUT_TYPES()
            out[name] = {"input": inp, "input_order": {k: list(v) for k, v in inp.items()},
                         "category": getattr(cls, "CATEGORY", "")}
    return out


def new_executor(execution, server):
    """PromptExecutor with the default (classic) cache, as main.py builds it (0.3: cache_size; 0.4: cache_args)."""
    import inspect

    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
    return execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_size=0)


def run_prompt(executor, server, api, device, mm) -> dict:
    """Queue one prompt through PromptExecutor; per-node wall seconds, peaks, success."""
    import execution

    valid = asyncio.run(execution.validate_prompt("bench", api, None))
    if not valid[0]:
        return {"ok": False, "error": str(valid[1]), "node_errors": str(valid[3])[:2000]}
    server.events, server.messages = [], []
    for i in range(torch.cuda.device_count() if device.type == "cuda" else 0):
        torch.cuda.reset_peak_memory_stats(i)
    t0 = time.perf_counter()
    executor.execute(api, f"bench-{time.time_ns()}", {"client_id": "bench"}, valid[2])
    end_peaks = _take_peaks(device)  # synchronises first: the last node's queued GPU work counts as its own
    t1 = time.perf_counter()
    times, node_peaks = {}, {}
    ev = server.events + [(t1, None, end_peaks)]
    for (ta, node, _), (tb, _, peaks) in zip(ev, ev[1:]):  # each event holds the peaks of the interval before it
        if node is not None:
            key = f"{node}:{api[node]['class_type']}"
            times[key], node_peaks[key] = round(tb - ta, 4), round(peaks[0], 3)
    err = [m for m in server.messages if m[0] != "execution_success"]
    out = {"ok": executor.success and not err, "wall_s": round(t1 - t0, 3), "node_s": times}
    if err:
        out["error"] = str(err[0][1].get("exception_message", err[0]))[:2000]
    if device.type == "cuda":
        every = [p for _, _, p in ev]  # whole graph (from the reset above): the largest interval peak
        out.update(peak_alloc_gib=round(max(a for a, _ in every), 3), peak_resv_gib=round(max(r for _, r in every), 3),
                   node_peak_alloc_gib=node_peaks)
        if torch.cuda.device_count() > 1:
            # the sampling device's counter was reset per node: its whole-graph peak is the one above
            out["peak_alloc_gib_per_gpu"] = [out["peak_alloc_gib"] if i == device.index else
                                             round(torch.cuda.max_memory_allocated(i) / GiB, 3)
                                             for i in range(torch.cuda.device_count())]
    return out


def after_free(executor, mm, device, pack_sampler) -> dict:
    """What `/free` (unload models + free the node cache) and NewBie Memory Purge leave: allocated/reserved VRAM
    and RSS after each (the models' CPU copies stay while the loader outputs are cached)."""
    out = {}
    mm.unload_all_models()  # the /free path (main.py): unload, then reset the executor's caches
    executor.reset()
    import gc

    gc.collect()
    mm.soft_empty_cache(True)
    out["free_alloc_gib"], out["free_rss_mib"] = round(allocated_gib(device), 3), round(rss_mib())
    if device.type == "cuda":
        out["free_resv_gib"] = round(torch.cuda.memory_reserved(device) / GiB, 3)
    purge = sys.modules[pack_sampler.__name__.rsplit(".", 1)[0] + ".memory_purge"].NewBieMemoryPurge
    purge.execute()
    out["purge_alloc_gib"], out["purge_rss_mib"] = round(allocated_gib(device), 3), round(rss_mib())
    return out

"""Timing, memory and parity measurements used by `newbie bench`: one DiT step, one whole generation."""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..memory import GiB, empty_device_cache
from ..pipeline import GenerationSettings, Pipeline


def sync(device: torch.device) -> None:
    """Wait for the device (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peaks(device: torch.device) -> dict[str, float]:
    """Peak allocated/reserved GiB since `reset_peak`, and allocated now."""
    if device.type != "cuda":
        return {"peak_alloc_gib": 0.0, "peak_resv_gib": 0.0, "alloc_now_gib": 0.0}
    return {"peak_alloc_gib": torch.cuda.max_memory_allocated(device) / GiB,
            "peak_resv_gib": torch.cuda.max_memory_reserved(device) / GiB,
            "alloc_now_gib": torch.cuda.memory_allocated(device) / GiB}


def parity(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Max absolute difference and relative L2 difference of `out` against `ref`."""
    o, r = out.float().cpu(), ref.float().cpu()
    return {"max_abs_diff": float((o - r).abs().max()), "rel_l2_diff": float((o - r).norm() / r.norm().clamp(min=1e-12))}


def dit_inputs(dit, device: torch.device, batch: int = 2, latent_hw: tuple[int, int] = (128, 128),
               cap_len: int = 256, uncond_len: int = 40, seed: int = 0) -> tuple:
    """The reference baseline's DiT inputs: latent [B,16,h,w], t = 0.5, `cap_len` caption tokens, the second
    (CFG) sample with only `uncond_len` real ones; random pooled vector. Returns (args, layout)."""
    g = torch.Generator().manual_seed(seed)
    cfg = dit.config
    h, w = latent_hw
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g).to(device, torch.bfloat16)
    feats = torch.randn(batch, cap_len, cfg.cap_feat_dim, generator=g).to(device, torch.bfloat16)
    mask = torch.ones(batch, cap_len, dtype=torch.long)
    if batch > 1:
        mask[batch // 2:, uncond_len:] = 0
    mask = mask.to(device)
    pooled = torch.randn(batch, cfg.clip_text_dim, generator=g).to(device, torch.bfloat16)
    t = torch.full((batch,), 0.5, device=device)
    return (x, t, feats, mask, pooled), dit.prepare(mask, h, w)


def mean_seconds(fn: Callable, device: torch.device, runs: int) -> float:
    """Mean seconds of `fn()` over `runs` calls after one warm-up call (a kernel alone: the benchmarks' timer)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / runs


@torch.no_grad()
def dit_step(forward: Callable, inputs: tuple, device: torch.device, runs: int = 5, warmup: int = 2) -> dict:
    """Mean seconds of `forward(*args, layout=layout)` over `runs` after `warmup` calls; peak memory; output.

    The first call's time is reported too (compilation happens there).
    """
    args, layout = inputs
    reset_peak(device)
    t0 = time.perf_counter()
    out = forward(*args, layout=layout)
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        forward(*args, layout=layout)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(runs):
        out = forward(*args, layout=layout)
    sync(device)
    return {"seconds": (time.perf_counter() - t0) / runs, "first_call_s": first, **peaks(device), "out": out.detach()}


def run_generation(pipe: Pipeline, settings: GenerationSettings, prompt: str, negative: str = "") -> dict:
    """One whole generation (text → DiT → VAE): wall seconds, per-stage seconds and peaks (GiB), latents."""
    device = pipe.device
    pipe.cache.clear()  # every mode pays its text stage
    reset_peak(device)
    t0 = time.perf_counter()
    res = pipe.generate(prompt, negative, settings)
    sync(device)
    seconds = time.perf_counter() - t0
    stages = {r.stage: {"seconds": round(r.seconds, 4), "peak_alloc_gib": round(r.peak_allocated / GiB, 3),
                        "peak_resv_gib": round(r.peak_reserved / GiB, 3), "notes": r.notes}
              for r in res.ledger.records}
    return {"seconds": round(seconds, 3), "stages": stages,
            "peak_alloc_gib": max(s["peak_alloc_gib"] for s in stages.values()),
            "peak_resv_gib": max(s["peak_resv_gib"] for s in stages.values()),
            "latents": res.latents}


def purge(pipe: Pipeline) -> None:
    """What the memory-purge node does between generations: release every model, clear the device cache."""
    pipe.release_all()
    empty_device_cache(pipe.device)

"""The benchmark sequence: DiT step variants, then whole generations per mode, extra points, VRAM growth.

Modes (spec of the performance issue): naive (everything resident in bf16, eager, one masked SDPA call over
the padded CFG batch, the official RMSNorm sequence: the reference code's arithmetic, injected by
`reference_dit`) is the in-run baseline; staged bf16 (the default); fp8 weights (DiT + Gemma, scaled fp8
matmuls where the GPU has them); low-VRAM (streamed blocks, tiled decode); compile (staged bf16, DiT compiled).
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ..attention import attention
from ..dit import NextDiT
from ..fp8 import enable_fp8_matmul, fp8_matmul_supported
from ..memory import GiB
from ..ops import ReferenceOps
from ..pipeline import GenerationSettings, Pipeline
from ..precision import parse_precision
from .measure import dit_inputs, dit_step, parity, purge, run_generation

log = logging.getLogger(__name__)
PROMPT = ("1girl, solo, long hair, blue eyes, school uniform, cherry blossoms, smile, looking at viewer, "
          "outdoors, spring, detailed background, masterpiece, best quality")
# Tolerances are measured, not picked: "within bf16 tolerance" means a fast path differs from the eager bf16
# result by at most twice as much as eager bf16 itself differs from an fp32 run of the same weights (both
# are bf16 approximations of the fp32 result). Floors keep the check meaningful on tiny --quick models.
MIN_BF16_TOL = 5e-3
MODES = ("naive", "staged_bf16", "fp8", "lowvram", "compile")


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask=None) -> torch.Tensor:
    """The reference code's attention: one SDPA call over the padded batch with a boolean key mask (no
    `supports_key_prefix`, so the DiT gives it the mask instead of packing real tokens first)."""
    return attention(q, k, v, key_mask, backend="sdpa")


def reference_dit(dit: NextDiT) -> NextDiT:
    """The naive baseline's DiT: a NextDiT built with the reference code's arithmetic injected (`ReferenceOps`:
    the official two-rounding RMSNorm; `masked_sdpa`) that holds the very same Parameter objects as `dit`, so
    placing `dit`'s weights (its StagedModel) places these too. Nothing of `dit` is changed."""
    ref = NextDiT(dit.config, operations=ReferenceOps, attention=masked_sdpa, device="meta")
    ref.load_state_dict(dit.state_dict(keep_vars=True), assign=True)
    ref.compute_dtype = dit.compute_dtype
    return ref.eval().requires_grad_(False)


def _step(record: dict, name: str, forward, inputs, device, ref=None, tol=None, runs=5) -> dict:
    r = dit_step(forward, inputs, device, runs=runs)
    out = r.pop("out")
    if ref is not None:
        r.update(parity(out, ref))
        r["tolerance"] = tol
        r["within_tolerance"] = tol is None or r["rel_l2_diff"] <= tol
    record[name] = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}
    log.warning("dit step %-28s %.4f s  peak %.2f GiB", name, r["seconds"], r["peak_alloc_gib"])
    return {"out": out, **r}


def dit_steps(staged: dict, device: torch.device, quick: bool, budgets_gib: list[float]) -> dict:
    """Every DiT variant at the baseline's inputs (CFG batch 2, 1024², 256 caption tokens)."""
    dit_w, dit = staged["dit"]
    hw = (16, 16) if quick else (128, 128)
    cap = 24 if quick else 256
    rec: dict = {}
    bf16, fp8 = parse_precision("bf16", "dit"), parse_precision("fp8_e4m3fn", "dit")
    naive_w = reference_dit(dit_w)
    dit.acquire(device, bf16)
    plain = dit_inputs(naive_w, device, latent_hw=hw, cap_len=cap, uncond_len=min(40, cap // 2))
    ref = _step(rec, "naive_eager_bf16", naive_w, plain, device)["out"]
    dit.release()
    dit.acquire(device, parse_precision("fp32", "dit"))
    args32 = tuple(a.float() if a.is_floating_point() else a for a in plain[0])
    ref32 = _step(rec, "eager_fp32_reference", naive_w, (args32, plain[1]), device, runs=1)["out"]
    bf16_err = parity(ref, ref32)["rel_l2_diff"]
    rec["naive_eager_bf16"].update(parity(ref, ref32))
    tol = max(2 * bf16_err, MIN_BF16_TOL)
    rec["tolerances"] = {"bf16_vs_fp32_rel_l2": bf16_err, "bf16_fast_path_tol": tol}
    dit.release()
    dit.acquire(device, bf16)
    inputs = dit_inputs(dit_w, device, latent_hw=hw, cap_len=cap, uncond_len=min(40, cap // 2))
    _step(rec, "eager_bf16", dit_w, inputs, device, ref, tol)
    _step(rec, "batch1_eager_bf16", dit_w, dit_inputs(dit_w, device, batch=1, latent_hw=hw, cap_len=cap), device)
    compiled = torch.compile(dit_w, fullgraph=True, dynamic=False)
    _step(rec, "compiled_bf16", compiled, inputs, device, ref, tol)
    dit.release()

    dit.acquire(device, fp8)
    storage = _step(rec, "fp8_storage_eager", dit_w, inputs, device, ref, None)
    fp8_ref = storage["out"]
    # fp8 matmuls also quantise activations: allowed to add at most the error weight quantisation already has.
    fp8_tol = max(storage["rel_l2_diff"], tol)
    rec["tolerances"]["fp8_matmul_vs_fp8_storage_tol"] = fp8_tol
    if fp8_matmul_supported(device):
        enable_fp8_matmul(dit.module)
        _step(rec, "fp8_matmul_eager", dit_w, inputs, device, fp8_ref, fp8_tol)
        torch._dynamo.reset()
        _step(rec, "fp8_matmul_compiled", torch.compile(dit_w, fullgraph=True, dynamic=False), inputs, device,
              fp8_ref, fp8_tol)
    dit.release()

    for b in budgets_gib:
        budget = None if b == 0 else int(b * GiB)
        dit.acquire(device, bf16, streaming=True, budget=budget)
        name = f"lowvram_stream_budget_{b:g}GiB"
        _step(rec, name, dit_w, inputs, device, ref, tol, runs=3)
        rec[name].update(resident_blocks=dit.streamer.resident, blocks=len(dit.streamer.layers))
        dit.release()
    torch._dynamo.reset()
    return rec


def new_pipeline(staged: dict, device: torch.device, **kw) -> Pipeline:
    """A Pipeline over the benchmark's shared models (nothing read from disk)."""
    pipe = Pipeline(paths=None, device=device, **kw)
    for role, (wrapper, model) in staged.items():
        pipe.adopt(role, wrapper, model)
    return pipe


def generations(staged: dict, device: torch.device, settings: GenerationSettings) -> dict:
    """One whole generation per mode; parity of the final latents against the naive pipeline."""
    out: dict = {}
    warm = new_pipeline(staged, device, precision={"vae": "bf16"})  # first-call kernel plans, not measured
    run_generation(warm, replace(settings, steps=2), PROMPT)
    purge(warm)
    ref32 = new_pipeline(staged, device, precision={"dit": "fp32", "vae": "bf16"})
    ref32_latents = run_generation(ref32, settings, PROMPT)["latents"]
    purge(ref32)
    # (1) naive: all three models resident in bf16 before the run (Gemma's embedding table too), eager.
    saved = {r: m.cpu_only for r, (_, m) in staged.items()}
    for _, m in staged.values():
        m.cpu_only = ()
    try:
        naive_models = {**staged, "dit": (reference_dit(staged["dit"][0]), staged["dit"][1])}
        pipe = new_pipeline(naive_models, device, keep_loaded=True, precision={"vae": "bf16"})
        for role in naive_models:
            with pipe.placed(role):  # keep_loaded: every model stays resident for the whole run
                pass
        naive = run_generation(pipe, settings, PROMPT)
        purge(pipe)
    finally:
        for r, (_, m) in staged.items():
            m.cpu_only = saved[r]
    ref = naive.pop("latents")
    naive.update(parity(ref, ref32_latents))
    tol = max(2 * naive["rel_l2_diff"], MIN_BF16_TOL)
    out["naive"] = naive
    variants = {
        "staged_bf16": dict(),
        "fp8": dict(precision={"dit": "fp8_e4m3fn", "text": "fp8_e4m3fn", "vae": "bf16"}),
        "lowvram": dict(lowvram=True),
        "compile": dict(compile=True),
    }
    for name, kw in variants.items():
        kw.setdefault("precision", {"vae": "bf16"})
        pipe = new_pipeline(staged, device, **kw)
        if name == "compile":  # compile once (reported), then time a warm generation
            first = run_generation(pipe, settings, PROMPT)
        r = run_generation(pipe, settings, PROMPT)
        if name == "compile":
            r["first_generation_s"] = first["seconds"]
        r.update(parity(r.pop("latents"), ref))
        r["ratio_to_naive_time"] = round(r["seconds"] / naive["seconds"], 3)
        r["ratio_to_naive_peak"] = round(r["peak_alloc_gib"] / max(naive["peak_alloc_gib"], 1e-9), 3)
        if name != "fp8":  # fp8 changes the weights: its difference is reported, not bounded
            r["tolerance"] = tol
            r["within_tolerance"] = r["rel_l2_diff"] <= tol
        out[name] = r
        purge(pipe)
        log.warning("generation %-12s %.2f s  peak %.2f GiB", name, r["seconds"], r["peak_alloc_gib"])
    torch._dynamo.reset()
    return out


def extra_points(staged: dict, device: torch.device, settings: GenerationSettings, quick: bool) -> dict:
    """Default staged bf16 at 1024×1536 and at batch 2."""
    out = {}
    tall = (256, 384) if quick else (1024, 1536)
    for name, s in (("1024x1536", replace(settings, width=tall[0], height=tall[1])),
                    ("batch2", replace(settings, batch=2))):
        pipe = new_pipeline(staged, device, precision={"vae": "bf16"})
        r = run_generation(pipe, s, PROMPT)
        r.pop("latents")
        out[name] = r
        purge(pipe)
    return out


def vram_growth(staged: dict, device: torch.device, settings: GenerationSettings, n: int) -> dict:
    """`n` consecutive generations (a new prompt each, so the text stage runs) with a purge after each."""
    pipe = new_pipeline(staged, device, precision={"vae": "bf16"})
    after = []
    for i in range(n):
        run_generation(pipe, replace(settings, seed=i), f"{PROMPT}, variation {i}")
        purge(pipe)
        after.append(torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0)
    return {"generations": n, "steps_each": settings.steps, "allocated_after_purge_mib": [round(a, 1) for a in after],
            "growth_mib": round(max(after) - after[0], 1)}

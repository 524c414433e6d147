"""The DiT step inside ComfyUI under VRAM budgets, each way the pack can run it, next to ComfyUI's own NewBie model.

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/comfy_dit_placement.py --out benchmarks/results
    COMFYUI_DIR=... python benchmarks/comfy_dit_placement.py --quick --out /tmp/x      # CPU plumbing check

Rows (bf16, CFG batch 2, 1024², 256 caption tokens, full-size random weights):
* `comfyui-partial`: our DiT partially loaded by ComfyUI (`patch_model(lowvram_model_memory=budget)`), the rest
  cast per layer by ComfyUI (on 0.4: pinned memory + its offload stream);
* `engine-stream`: our DiT with the engine's pinned block streaming (`nodes/_comfy_lowvram.streamed_dit`, what the
  sampler runs automatically where ComfyUI has no async offload), `budget` bytes of blocks resident;
* `native` (only where the running ComfyUI has its own NewBie model: the E-Anlia/ComfyUI-NewBie 0.4.0 fork): that
  model loaded from the same file by `comfy.sd.load_diffusion_model`, partially loaded the same way.
Every row gives s/step, peak allocated GiB and, for ours, the relative difference to the full load.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from comfy_partial_load import import_comfy_glue, write_random_dit  # noqa: E402

GiB = 2**30


def native_step(path: Path, inputs: tuple, device, budget: int, runs: int) -> dict:
    """ComfyUI's own NewBie model (the fork's `NewBieImage`) from the same file, one CFG step at `budget`."""
    import comfy.model_base
    import comfy.sd

    from newbie_core.bench.measure import dit_step

    if not hasattr(comfy.model_base, "NewBieImage"):
        return {"skipped": "this ComfyUI has no native NewBie model"}
    patcher = comfy.sd.load_diffusion_model(str(path))
    patcher.patch_model(device_to=device, lowvram_model_memory=budget)
    dm = patcher.model.diffusion_model
    (x, t, feats, mask, pooled), _ = inputs

    # ComfyUI's attention wants a float mask it can broadcast over heads and queries: (B, 1, L), additive.
    additive = torch.zeros(mask.shape[0], 1, mask.shape[1], dtype=feats.dtype, device=mask.device)
    additive.masked_fill_(~mask.bool()[:, None, :], torch.finfo(feats.dtype).min)

    def forward(*_a, layout=None):
        return dm(x, t, feats, feats.shape[1], attention_mask=additive, clip_text_pooled=pooled)

    try:
        r = dit_step(forward, inputs, device, runs=runs)
    finally:
        patcher.unpatch_model(device_to=patcher.offload_device, unpatch_weights=True)
    r.pop("out")
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budgets", default="3,1,0.25", help="GiB of DiT weights on the GPU")
    p.add_argument("--attention", default="auto,sdpa,comfyui",
                   help="the loader's attention choices: the first for every row, the others a full-load row each")
    args = p.parse_args()
    glue = import_comfy_glue()
    import comfy.model_management as mm

    from newbie_core.bench.measure import dit_inputs, dit_step, parity
    from newbie_core.bench.report import device_label, slug, write_results
    from newbie_core.precision import parse_precision

    low = sys.modules[glue.__name__.rsplit(".", 1)[0] + "._comfy_lowvram"]
    device = mm.get_torch_device()
    path = write_random_dit(args.quick, device, Path(tempfile.mkdtemp(prefix="newbie-placement-")))
    attentions = args.attention.split(",")
    patcher = glue.load_dit_patcher(path, parse_precision("bf16", "dit"), attentions[0])
    dit = patcher.model.diffusion_model
    hw, cap = ((16, 16), 24) if args.quick else ((128, 128), 256)
    inputs = dit_inputs(dit, device, latent_hw=hw, cap_len=cap, uncond_len=min(40, cap // 2))
    runs = 1 if args.quick else 5
    scale = 2**16 if args.quick else GiB
    rows = []

    def record(way, budget, r, ref=None):
        out = r.pop("out", None)
        row = {"way": way, "budget_gib": budget, **{k: round(v, 4) for k, v in r.items() if isinstance(v, float)}}
        if ref is not None and out is not None:
            row.update(parity(out, ref))
        rows.append(row)
        print(row, flush=True)

    patcher.patch_model(device_to=device, lowvram_model_memory=0)
    full = dit_step(dit.velocity, inputs, device, runs=runs)
    ref = full["out"]
    record(f"comfyui-full ({attentions[0]})", "full", full)
    patcher.unpatch_model(device_to=patcher.offload_device, unpatch_weights=True)
    for name in attentions[1:]:  # the same file, another attention choice: full load only
        other = glue.load_dit_patcher(path, parse_precision("bf16", "dit"), name)
        other.patch_model(device_to=device, lowvram_model_memory=0)
        record(f"comfyui-full ({name})", "full", dit_step(other.model.diffusion_model.velocity, inputs, device,
                                                          runs=runs), ref)
        other.unpatch_model(device_to=other.offload_device, unpatch_weights=True)
        del other
        mm.soft_empty_cache()
    for b in [float(x) for x in args.budgets.split(",")]:
        patcher.patch_model(device_to=device, lowvram_model_memory=int(b * scale))
        record("comfyui-partial", b, dit_step(dit.velocity, inputs, device, runs=runs), ref)
        patcher.unpatch_model(device_to=patcher.offload_device, unpatch_weights=True)
        mm.soft_empty_cache()
        with low.streamed_dit(patcher, 0, budget=int(b * scale)) as dm:
            record("engine-stream", b, dit_step(dm.velocity, inputs, device, runs=runs), ref)
        mm.soft_empty_cache()
    if not args.quick:
        for b in ["full", 3.0]:
            try:
                r = native_step(path, inputs, device, 0 if b == "full" else int(b * GiB), runs)
                rows.append({"way": "native", "budget_gib": b, **r})
            except Exception as e:  # a fork's API may differ: say so in the results, keep ours
                rows.append({"way": "native", "budget_gib": b, "error": f"{type(e).__name__}: {e}"[:300]})
            print(rows[-1], flush=True)
            mm.soft_empty_cache()
    import comfyui_version

    gpu = device_label(device)
    version = getattr(comfyui_version, "__version__", "?")
    stem = f"comfy-dit-placement-{slug(f'{gpu}-comfyui-{version}')}" + ("-quick" if args.quick else "")
    async_offload = sys.modules[glue.__name__.rsplit(".", 1)[0] + "._comfy_compat"].COMFY_ASYNC_OFFLOAD
    result = {"gpu": gpu, "comfyui": version, "async_offload": async_offload, "torch": torch.__version__,
              "attention": attentions, "rows": rows}
    lines = [f"DiT step inside ComfyUI {version} (async offload: {async_offload}), bf16, CFG batch 2, "
             f"1024², {gpu}; our rows use attention `{attentions[0]}` unless named", "", "| way | budget GiB | s / step | × full | peak alloc GiB | rel. diff vs full |",
             "|---|---|---|---|---|---|"]
    base = rows[0]["seconds"]
    for r in rows:
        s = r.get("seconds")
        lines.append(f"| {r['way']} | {r['budget_gib']} | {'–' if s is None else f'{s:.4f}'} | "
                     f"{'–' if s is None else f'{s / base:.2f}'} | {r.get('peak_alloc_gib', '–')} | "
                     f"{r.get('rel_l2_diff', r.get('error', r.get('skipped', '–')))} |")
    write_results(args.out, stem, result, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

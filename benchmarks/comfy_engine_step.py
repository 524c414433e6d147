"""One engine, two hosts, on the GPU: the DiT step inside ComfyUI next to the CLI's, and fp8 quality.

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/comfy_engine_step.py --out benchmarks/results
    COMFYUI_DIR=... python benchmarks/comfy_engine_step.py --quick --out /tmp/x     # CPU plumbing check

In one process, on one full-size random-weight DiT file (bf16, official layout):
- the CLI host's DiT (`newbie_core.load_dit` + `memory.StagedModel`) and the ComfyUI host's (`nodes/_comfy`
  `load_dit_patcher` → ModelPatcher fully loaded by `load_models_gpu`, forward from `ComfyHost.dit_forward`)
  time one CFG step at the reference baseline's inputs (batch 2, 1024², 256 caption tokens) for bf16, fp8
  (per-channel scales + fp8 tensor-core matmuls where the GPU has them) and compiled bf16 / fp8;
- the final latent of a whole sampling run (euler, CFG, random embeddings) in bf16, in our fp8 and in a plain
  e4m3 cast of every weight (what ComfyUI's `fp8_e4m3fn` weight dtype does), the two fp8 runs compared with bf16.
Writes `comfy-engine-step-<gpu>.json` and `.md`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_partial_load import import_comfy_glue, write_random_dit  # noqa: E402


def plain_fp8_cast(dm) -> None:
    """ComfyUI's `fp8_e4m3fn` weight dtype: every floating weight cast to e4m3 without scales (norms and biases
    included), upcast per call."""
    from newbie_core.fp8 import FP8

    with torch.no_grad():
        for p in dm.parameters():
            if p.is_floating_point():
                p.data = p.data.to(FP8)


def save(args, device, hw, cap, rows: list[dict], quality: dict | None) -> str:
    """Write the JSON + markdown report of what has been measured so far; returns the markdown."""
    from newbie_core.bench.report import device_label, slug, write_results

    gpu = device_label(device)
    import comfyui_version  # noqa: PLC0415 - from $COMFYUI_DIR

    result = {"gpu": gpu, "torch": torch.__version__, "comfyui": comfyui_version.__version__,
              "inputs": {"latent_hw": hw, "cap_len": cap, "batch": 2}, "dit_step": rows,
              "fp8_final_latent_vs_bf16": quality, "sampling": {"steps": args.steps, "solver": "euler", "cfg": 4.0}}
    stem = f"comfy-engine-step-{slug(gpu)}-comfyui-{comfyui_version.__version__}" + ("-quick" if args.quick else "")
    lines = [f"DiT step, CLI host vs ComfyUI host (ComfyUI {comfyui_version.__version__}), {gpu}, CFG batch 2, "
             f"latent {hw[0]}×{hw[1]}, {cap} caption tokens", "",
             "| variant | CLI s/step | ComfyUI s/step | ratio | CLI peak GiB | ComfyUI peak GiB | ComfyUI vs CLI rel. L2 |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['cli_s']:.4f} | {r['comfyui_s']:.4f} | {r['ratio']:.3f} | {r['cli_peak_gib']:.2f} | "
              f"{r['comfyui_peak_gib']:.2f} | {r['comfyui_vs_cli_rel_l2']:.1e} |" for r in rows]
    if quality is None:
        lines += ["", "fp8 final latent vs bf16: not measured (the run ended before that part)."]
    else:
        lines += ["", f"fp8 final latent vs bf16 ({args.steps - 1} euler steps, CFG 4):", "",
                  "| weights | rel. L2 vs bf16 | max abs |", "|---|---|---|"]
        lines += [f"| {k} | {v['rel_l2_diff']:.4f} | {v['max_abs_diff']:.3f} |" for k, v in quality.items()]
    write_results(args.out, stem, result, "\n".join(lines) + "\n")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=29, help="grid points of the fp8 quality run (29 → 28 euler steps)")
    args = p.parse_args()
    glue = import_comfy_glue()
    import comfy.model_management as mm

    from newbie_core import load_dit
    from newbie_core.bench.measure import dit_inputs, dit_step, parity
    from newbie_core.fp8 import enable_fp8_matmul, fp8_matmul_supported
    from newbie_core.memory import StagedModel
    from newbie_core.pipeline import compile_dit
    from newbie_core.precision import parse_precision
    from newbie_core.sampling import GuidedVelocity, make_noise, sample

    device = mm.get_torch_device()
    tmp = Path(tempfile.mkdtemp(prefix="newbie-engine-bench-"))
    path = write_random_dit(args.quick, device, tmp)
    hw, cap = ((16, 16), 24) if args.quick else ((128, 128), 256)
    runs = 1 if args.quick else 5
    rows = []

    cli_dit = load_dit(path, dtype=torch.bfloat16, device="cpu")
    staged = StagedModel("dit", cli_dit)
    inputs = dit_inputs(cli_dit, device, latent_hw=hw, cap_len=cap, uncond_len=min(40, cap // 2))
    variants = [("bf16", False), ("fp8_e4m3fn", False), ("bf16", True), ("fp8_e4m3fn", True)]
    for prec_name, compiled in variants:
        if compiled and device.type != "cuda" and not args.quick:
            continue
        prec = parse_precision(prec_name, "dit")
        label = prec_name + (" compiled" if compiled else "")
        # CLI host
        staged.acquire(device, prec)
        if prec.is_fp8 and fp8_matmul_supported(device):
            enable_fp8_matmul(cli_dit)
        torch._dynamo.reset()
        cli = dit_step(compile_dit(cli_dit) if compiled else cli_dit, inputs, device, runs=runs)
        staged.release()
        mm.soft_empty_cache()
        # ComfyUI host
        patcher = glue.load_dit_patcher(path, prec, "auto")
        patcher.model_options["newbie_compile"] = compiled
        patcher.model_options["newbie_precision"] = prec_name
        mm.load_models_gpu([patcher], force_full_load=True)
        host = glue.ComfyHost(model=patcher)
        dm = patcher.model.diffusion_model
        torch._dynamo.reset()
        own = (inputs[0], dm.prepare(inputs[0][3], *hw))  # the pack's own layout class (a second module copy)
        com = dit_step(host.dit_forward(dm), own, device, runs=runs)
        same = parity(com.pop("out"), cli.pop("out"))
        mm.unload_all_models()
        del patcher, host, dm
        mm.soft_empty_cache()
        row = {"variant": label, "cli_s": round(cli["seconds"], 5), "comfyui_s": round(com["seconds"], 5),
               "ratio": round(com["seconds"] / cli["seconds"], 3), "cli_peak_gib": round(cli["peak_alloc_gib"], 3),
               "comfyui_peak_gib": round(com["peak_alloc_gib"], 3), "comfyui_vs_cli_rel_l2": same["rel_l2_diff"]}
        rows.append(row)
        print(row, flush=True)
        save(args, device, hw, cap, rows, None)  # a run cut off later keeps what it measured
    torch._dynamo.reset()

    # fp8 quality: a whole sampling run per weight format, on the ComfyUI host's DiT
    (x0, _, feats, mask, pooled), _ = inputs
    b = 1
    noise = make_noise(0, b, hw[0], hw[1], 16)
    finals = {}
    for kind in ("bf16", "ours_fp8", "plain_e4m3_cast"):
        prec = parse_precision("fp8_e4m3fn" if kind == "ours_fp8" else "bf16", "dit")
        patcher = glue.load_dit_patcher(path, prec, "auto")
        dm = patcher.model.diffusion_model
        if kind == "plain_e4m3_cast":
            plain_fp8_cast(dm)
        mm.load_models_gpu([patcher], force_full_load=True)
        layouts = {False: dm.prepare(mask[:b], *hw), True: dm.prepare(mask, *hw)}

        def call(x, t, guided, dm=dm, layouts=layouts):
            n = 2 * b if guided else b
            return dm.velocity(x.to(device, torch.bfloat16), t.to(device), feats[:n], mask[:n], pooled[:n],
                               layout=layouts[guided]).float()

        finals[kind] = sample(GuidedVelocity(call, 4.0, 1.0, 0.0), noise.to(device), args.steps, "euler", 6.0).cpu()
        mm.unload_all_models()
        del patcher, dm
        mm.soft_empty_cache()
    quality = {k: parity(finals[k], finals["bf16"]) for k in ("ours_fp8", "plain_e4m3_cast")}
    print(quality, flush=True)

    print(save(args, device, hw, cap, rows, quality))
    return 0


if __name__ == "__main__":
    sys.exit(main())

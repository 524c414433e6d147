"""ComfyUI's own partial loading of the NewBie DiT at many VRAM budgets: the in-ComfyUI low-VRAM path.

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/comfy_partial_load.py --out benchmarks/results
    COMFYUI_DIR=... python benchmarks/comfy_partial_load.py --quick --out /tmp/x     # CPU plumbing check

Inside ComfyUI, low VRAM is ComfyUI's job: the DiT Loader node builds our DiT with `comfy.ops` operations
(`nodes/_comfy.load_dit_patcher`), so a ModelPatcher can keep part of the weights on the CPU and cast them in
per layer. This script loads a full-size random-weight DiT file exactly that way, then for each budget lets
the patcher load that many bytes (`ModelPatcher.patch_model(lowvram_model_memory=...)`, what
`load_models_gpu` does when VRAM is short) and times one CFG step at the reference baseline's inputs.
Every budget must run (the device comes from the input, never from whichever weight is resident) and give
the fully loaded output (the same arithmetic: exactly). `--precision fp8_e4m3fn` does the same for the fp8 DiT,
whose layers cast per call still take the fused gate's pre-quantised input on fp8 GPUs. Writes
`comfy-partial-load-<gpu>[-fp8_e4m3fn-comfyui-<version>].json` and `.md`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def import_comfy_glue():
    """Import ComfyUI from $COMFYUI_DIR and our `nodes/_comfy.py` as ComfyUI would (a package), without
    running the node registration (`nodes/__init__.py` needs the server's comfy_api)."""
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir or not (Path(comfy_dir) / "comfy").is_dir():
        sys.exit("Set COMFYUI_DIR to a ComfyUI source tree.")
    sys.path.insert(0, comfy_dir)
    sys.path.insert(0, str(ROOT))
    import comfy.options

    comfy.options.enable_args_parsing()  # ComfyUI reads its flags at import: none, or --cpu without CUDA
    sys.argv = [sys.argv[0]] + ([] if torch.cuda.is_available() else ["--cpu"])
    for name, path in (("newbie_pack", ROOT), ("newbie_pack.nodes", ROOT / "nodes")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules[name] = pkg
    return importlib.import_module("newbie_pack.nodes._comfy")


def write_random_dit(quick: bool, device: torch.device, folder: Path) -> Path:
    """A DiT file in the official layout: tiny (quick) or full size with random bf16 weights."""
    from safetensors.torch import save_file

    from newbie_core.bench.models import random_dit_state_dict
    from newbie_core.dit import DiTConfig
    from newbie_core.tiny import make_tiny

    if quick:
        return make_tiny(folder)["dit_comfyui"]
    path = folder / "newbie_dit_random.safetensors"
    save_file(random_dit_state_dict(DiTConfig.full(), device), str(path))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budgets", default="0.25,0.5,1,1.5,2,2.5,3,3.5,4,4.5,5,5.5,6",
                   help="GiB of DiT weights ComfyUI may load (the rest streams per layer)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp8_e4m3fn"],
                   help="DiT weight storage (fp8: per-channel scales, fp8 matmuls where the GPU has them)")
    args = p.parse_args()
    glue = import_comfy_glue()
    import comfy.model_management as mm

    from newbie_core.bench.measure import dit_inputs, dit_step, parity
    from newbie_core.bench.report import device_label, slug, write_results
    from newbie_core.precision import parse_precision

    device = mm.get_torch_device()
    tmp = Path(tempfile.mkdtemp(prefix="newbie-comfy-bench-"))
    path = write_random_dit(args.quick, device, tmp)
    patcher = glue.load_dit_patcher(path, parse_precision(args.precision, "dit"), "sdpa")
    dit = patcher.model.diffusion_model
    hw, cap = ((16, 16), 24) if args.quick else ((128, 128), 256)
    inputs = dit_inputs(dit, device, latent_hw=hw, cap_len=cap, uncond_len=min(40, cap // 2))
    runs = 1 if args.quick else 3

    patcher.patch_model(device_to=device, lowvram_model_memory=0)  # 0 = everything on the device
    full = dit_step(dit.velocity, inputs, device, runs=runs)
    ref = full.pop("out")
    patcher.unpatch_model(device_to=patcher.offload_device, unpatch_weights=True)
    mm.soft_empty_cache()
    rows = [{"budget_gib": "full", **{k: round(v, 4) for k, v in full.items()}}]
    for b in [float(x) for x in args.budgets.split(",")]:
        budget = int(b * GiB) if not args.quick else int(b * 2**16)
        patcher.patch_model(device_to=device, lowvram_model_memory=budget)
        r = dit_step(dit.velocity, inputs, device, runs=runs)
        row = {"budget_gib": b, "loaded_gib": round(patcher.model.model_loaded_weight_memory / GiB, 3),
               "loaded_bytes": patcher.model.model_loaded_weight_memory, "model_bytes": patcher.model_size(),
               **{k: round(v, 4) for k, v in r.items() if k != "out"}, **parity(r["out"], ref)}
        rows.append(row)
        print(row, flush=True)
        patcher.unpatch_model(device_to=patcher.offload_device, unpatch_weights=True)
        mm.soft_empty_cache()
    gpu = device_label(device)
    version = getattr(importlib.import_module("comfyui_version"), "__version__", "?")
    stem = (f"comfy-partial-load-{slug(gpu)}" + ("" if args.precision == "bf16" else f"-{args.precision}-comfyui-{version}")
            + ("-quick" if args.quick else ""))
    result = {"gpu": gpu, "torch": torch.__version__, "comfyui": version, "precision": args.precision, "rows": rows}
    lines = [f"ComfyUI {version} partial loading of the NewBie DiT ({args.precision}, CFG batch 2, 1024², 256 caption "
             f"tokens), {gpu}", "",
             "| budget (GiB) | loaded (GiB) | s / step | peak alloc (GiB) | rel. diff vs full load |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget_gib']} | {r.get('loaded_gib', '–')} | {r['seconds']:.4f} | {r['peak_alloc_gib']:.2f} | "
                     f"{r.get('rel_l2_diff', 0):.1e} |")
    write_results(args.out, stem, result, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

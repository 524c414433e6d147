"""`newbie bench`: the GPU benchmark of the performance issue, in one process on one GPU.

    newbie bench --out benchmarks/results            # full size, random weights, needs a CUDA GPU (~5 min)
    newbie bench --quick --device cpu --out /tmp/b   # tiny models: a smoke test of the benchmark itself

Measures at 1024×1024, CFG 4, batch 1, 28 Euler steps (29 grid points, guidance on every step):
DiT seconds per CFG step for every variant at the reference baseline's inputs; whole generations for the
naive, staged bf16, fp8, low-VRAM and compile modes (peak allocated/reserved VRAM per stage, end-to-end
seconds, ratios to naive, final-latent parity); 1024×1536 and batch-2 points; VRAM after a purge over
20 consecutive generations. Writes `bench-<gpu>.json`, `.md` and `.png` into `--out`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="newbie bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON, markdown and PNG results")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny models and sizes (CPU smoke test of the benchmark)")
    p.add_argument("--steps", type=int, default=29, help="grid points (29 → 28 Euler steps)")
    p.add_argument("--gens", type=int, default=20, help="consecutive generations for the VRAM-growth check")
    p.add_argument("--gen-steps", type=int, default=6, help="grid points per generation in the growth check")
    p.add_argument("--budgets", default="0,1,2,4", help="low-VRAM block budgets to sweep, GiB (0 = stream all)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: steps,modes,points,growth")
    return p


def environment(device: torch.device) -> dict:
    """GPU name, torch/CUDA versions, date: recorded with every result."""
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its results; returns non-zero when a parity check failed."""
    from ..pipeline import GenerationSettings
    from . import runner
    from .models import build_models, staged_models
    from .report import check_parity, slug, write_reports

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    side = 256 if args.quick else 1024
    settings = GenerationSettings(width=side, height=side, steps=4 if args.quick else args.steps, cfg=4.0,
                                  shift=6.0, solver="euler", cfg_trunc=1.0, renorm=0.0, seed=0, batch=1)
    result = {"environment": environment(device), "quick": args.quick,
              "settings": {**vars(settings), "note": "steps = grid points; euler → steps-1 CFG evaluations"}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{slug(result['environment']['gpu'])}" + ("-quick" if args.quick else "")

    def save() -> None:  # after every part, so a cut-off run keeps what it measured
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))

    models, _ = build_models(device, args.quick)
    staged = staged_models(models)
    result["model_sizes_gib"] = {r: round(m.nbytes() / 2**30, 3) for r, (_, m) in staged.items()}
    if "steps" not in skip:
        budgets = [float(b) for b in args.budgets.split(",") if b != ""]
        result["dit_step"] = runner.dit_steps(staged, device, args.quick, budgets)
        save()
    if "modes" not in skip:
        result["generation"] = runner.generations(staged, device, settings)
        save()
    if "points" not in skip:
        result["points"] = runner.extra_points(staged, device, settings, args.quick)
        save()
    if "growth" not in skip:
        result["vram_growth"] = runner.vram_growth(staged, device, GenerationSettings(
            width=side, height=side, steps=args.gen_steps, solver="euler", cfg=4.0, cfg_trunc=1.0), args.gens)
    save()
    write_reports(result, out / f"{stem}.md", out / f"{stem}.png")
    print(f"wrote {out / stem}.json/.md/.png")
    failed = check_parity(result)
    for f in failed:
        print(f"PARITY FAILED: {f}")
    return 1 if failed else 0

"""The `newbie` command: `generate` an image, `enhance` a prompt, `make-tiny` test models, `bench` the GPU paths.

    newbie generate --prompt "1girl, smile" --out out.png [--model-dir DIR] [--precision dit=bf16,vae=fp32]
    newbie enhance "IDEA" [--mode idea|tags|refine|to-tags] [--seed N]   (cli_enhance.py)
    newbie make-tiny DIR

Without a model, `generate` builds tiny random-weight models in a temporary folder and says so: the
picture is noise-like, but every stage runs through the same code as with real weights.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import cli_img2img
from .cli_enhance import add_enhance_parser, add_generate_options, cmd_enhance, enhance_for_generate
from .errors import NewBieError

log = logging.getLogger("newbie")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every default shown, except "None" (options whose help says what happens when they are absent)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="text → image through the staged pipeline",
                       formatter_class=_Help)
    p.add_argument("--prompt", required=True, help="the caption (plain tags, natural language or XML)")
    p.add_argument("--negative", default="", help="negative prompt (empty = the official empty negative)")
    p.add_argument("--out", required=True, help="output PNG; with --batch N, files get _0.._N-1 suffixes; an existing "
                                                "file is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace existing output file(s)")
    p.add_argument("--model-dir", help="HF NewBie-image-Exp0.1 folder or a ComfyUI models/ folder")
    for role in ("dit", "gemma", "jina", "vae"):
        p.add_argument(f"--{role}", help=f"explicit {role} file or folder (overrides --model-dir)")
    p.add_argument("--width", type=int, default=None, help="multiple of 16, at most 8176 (default 1024, or the init image's)")
    p.add_argument("--height", type=int, default=None, help="multiple of 16, at most 8176 (default 1024, or the init image's)")
    p.add_argument("--steps", type=int, default=18, help="time-grid points as in the official demo (N → N-1 intervals), 2..200")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--shift", type=float, default=6.0, help="time shift")
    from .sampling import SOLVERS  # the one solver registry (node options, step counts)

    p.add_argument("--solver", default="midpoint", choices=list(SOLVERS),
                   help="; ".join(f"{k}: {v.description}" for k, v in SOLVERS.items()))
    p.add_argument("--cfg-trunc", type=float, default=0.25, help="guide only while t < this (t: 0 noise → 1 data)")
    p.add_argument("--renorm", type=float, default=0.0, help="cap guided velocity norm at this × cond norm (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (CPU generator: the same image on any device)")
    p.add_argument("--batch", type=int, default=1, help="images per run, 1..64")
    p.add_argument("--system-prompt", default="auto",
                   help="auto (xml for XML prompts, else tags) | xml | tags | demo | none | any custom text")
    p.add_argument("--jina-max-length", type=int, default=512, metavar="N",
                   help="Jina token limit: 512 (HF pipeline, default) or 2048 (official demo)")
    p.add_argument("--precision", default="", help="per stage, e.g. dit=bf16,text=fp8_e4m3fn,vae=fp32")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, mps (None: the best available)")
    p.add_argument("--tiled-decode", action="store_true", help="decode the VAE in tiles (less memory)")
    p.add_argument("--lowvram", action="store_true",
                   help="stream DiT/text-encoder blocks from CPU memory and decode in tiles (under 2 GiB of VRAM)")
    p.add_argument("--vram-budget", type=float, default=None, metavar="GIB",
                   help="with --lowvram: GiB of blocks that may stay on the GPU (faster; None: stream all)")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT (first image pays ~30 s)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="LoRA/LoKr .safetensors (PEFT, LyCORIS, kohya, ComfyUI or diffusers keys) merged into the "
                        "DiT at STRENGTH (default 1); repeat for several (their deltas add)")
    p.add_argument("--json", action="store_true", help="print the ledger as JSON instead of a table")
    add_generate_options(p)
    cli_img2img.add_arguments(p)


def cmd_generate(args) -> int:
    """Check every argument, `--out` and the four model headers (cli_checks), then run one generation and write
    PNG(s); prints the stage ledger. Tiny fallback models live in a temporary folder removed on every exit path."""
    from . import cli_checks

    img2img = cli_img2img.prepare(args)  # --init-image/--mask read first: they fill width, height, denoise
    cli_checks.check_generate_args(args)
    cli_checks.check_out(args.out, args.batch, getattr(args, "overwrite", False))
    with cli_checks.model_paths_for(args) as (paths, tiny):
        max_patches, patch = cli_checks.check_model_headers(paths)
        cli_checks.check_size_limits(args.width, args.height, max_patches, patch)
        return _generate(args, paths, tiny, img2img)


def _generate(args, paths, tiny: bool, img2img: dict) -> int:
    from . import cli_checks
    from .image_io import save_png
    from .pipeline import GenerationSettings, Pipeline
    from .precision import parse_precision_spec
    from .text.prompts import resolve_system_prompt

    from .lora import parse_lora_arg

    budget = None if args.vram_budget is None else int(args.vram_budget * 2**30)
    pipe = Pipeline(paths, device=args.device, precision=parse_precision_spec(args.precision),
                    lowvram=args.lowvram, vram_budget=budget, compile=args.compile,
                    loras=[parse_lora_arg(a) for a in args.lora])
    lora_reports = pipe.lora_reports()  # reads and checks the LoRA files before any stage runs
    for r in lora_reports:
        print(f"LoRA {r.summary()}", file=sys.stderr)
    settings = GenerationSettings(width=args.width, height=args.height, steps=args.steps, cfg=args.cfg,
                                  shift=args.shift, solver=args.solver, cfg_trunc=args.cfg_trunc,
                                  renorm=args.renorm, seed=args.seed, batch=args.batch, denoise=args.denoise)
    if args.enhance:  # Gemma writes the prompt first (printed); the text stage then reuses its placement
        args.prompt = enhance_for_generate(pipe, args, tiny)
    system = resolve_system_prompt(args.system_prompt, args.prompt)
    result = pipe.generate(args.prompt, args.negative, settings, system_prompt=system,
                           tiled_decode=args.tiled_decode, **img2img)
    meta = {"prompt": args.prompt, "negative": args.negative, "settings": vars(settings),
            "precision": cli_checks.ran_precisions(pipe), "random_weights": tiny,
            "loras": [{"file": r.file, "strength": r.strength} for r in lora_reports]}
    written = save_png(result.images, args.out, meta)
    if args.json:
        print(json.dumps({"outputs": [str(w) for w in written], "ledger": cli_checks.ledger_rows(result, pipe),
                          "notes": result.notes, "models": cli_checks.describe_models_ran(pipe),
                          "loras": [vars(r) for r in lora_reports]}, indent=2))
    else:
        print(cli_checks.ledger_table(result, pipe))
        for w in written:
            print(f"wrote {w}" + ("  (random tiny weights)" if tiny else ""))
    return 0


def cmd_make_tiny(args) -> int:
    """Write the tiny model set and print where each file went."""
    from .tiny import make_tiny

    for name, path in make_tiny(Path(args.dir), seed=args.seed, flux_vae=args.flux_vae).items():
        print(f"{name:<16} {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `newbie` console command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Growable segments instead of fixed ones: reserved VRAM stays near allocated (what decides fitting an
    # 8 GB card). Read when CUDA first allocates, so setting it here is early enough; a user's value wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if argv[:1] == ["bench"]:  # its own options (see `newbie bench --help`)
        from .bench import main as bench_main  # noqa: PLC0415 - heavy, GPU only

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="newbie", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _generate_parser(sub)
    t = sub.add_parser("make-tiny", help="write tiny random-weight models in the real file layouts",
                       formatter_class=_Help)
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    t.add_argument("--flux-vae", action="store_true",
                   help="also write a random VAE of the full FLUX architecture (168 MB) for ComfyUI's core Load VAE: "
                        "comfyui/vae/flux_architecture_random/ae.safetensors (the interop workflow)")
    sub.add_parser("bench", help="GPU benchmark: newbie bench --help")
    add_enhance_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "generate":
            return cmd_generate(args)
        if args.cmd == "enhance":
            return cmd_enhance(args)
        return cmd_make_tiny(args)
    except NewBieError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `newbie` command: `generate` an image, `make-tiny` test models, `bench` the GPU paths.

    newbie generate --prompt "1girl, smile" --out out.png [--model-dir DIR] [--precision dit=bf16,vae=fp32]
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
import tempfile
from pathlib import Path

from .errors import NewBieError

log = logging.getLogger("newbie")


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="text → image through the staged pipeline")
    p.add_argument("--prompt", required=True, help="the caption (plain tags, natural language or XML)")
    p.add_argument("--negative", default="", help="negative prompt (empty = the official empty negative)")
    p.add_argument("--out", required=True, help="output PNG; with --batch N, files get _0.._N-1 suffixes")
    p.add_argument("--model-dir", help="HF NewBie-image-Exp0.1 folder or a ComfyUI models/ folder")
    for role in ("dit", "gemma", "jina", "vae"):
        p.add_argument(f"--{role}", help=f"explicit {role} file or folder (overrides --model-dir)")
    p.add_argument("--width", type=int, default=1024, help="multiple of 16 (default 1024)")
    p.add_argument("--height", type=int, default=1024, help="multiple of 16 (default 1024)")
    p.add_argument("--steps", type=int, default=18, help="time-grid points as in the official demo (N → N-1 intervals)")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    p.add_argument("--shift", type=float, default=6.0, help="time shift (default 6)")
    p.add_argument("--solver", default="midpoint", choices=["euler", "midpoint", "dpmpp_2m"])
    p.add_argument("--cfg-trunc", type=float, default=0.25, help="guide only while t < this (t: 0 noise → 1 data)")
    p.add_argument("--renorm", type=float, default=0.0, help="cap guided velocity norm at this × cond norm (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--system-prompt", default="auto",
                   help="auto (xml for XML prompts, else tags) | xml | tags | demo | none | any custom text")
    p.add_argument("--jina-max-length", type=int, default=512, metavar="N",
                   help="Jina token limit: 512 (HF pipeline, default) or 2048 (official demo)")
    p.add_argument("--precision", default="", help="per stage, e.g. dit=bf16,text=fp8_e4m3fn,vae=fp32")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, mps (default: best available)")
    p.add_argument("--tiled-decode", action="store_true", help="decode the VAE in tiles (less memory)")
    p.add_argument("--lowvram", action="store_true",
                   help="stream DiT/text-encoder blocks from CPU memory and decode in tiles (under 2 GiB of VRAM)")
    p.add_argument("--vram-budget", type=float, default=None, metavar="GIB",
                   help="with --lowvram: GiB of blocks that may stay on the GPU (faster; default: stream all)")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT (first image pays ~30 s)")
    p.add_argument("--json", action="store_true", help="print the ledger as JSON instead of a table")


def _resolve_paths(args):
    from .model_paths import ModelPaths
    from .text.jina import check_jina_max_length
    from .tiny import make_tiny

    max_length = check_jina_max_length(getattr(args, "jina_max_length", 512))
    explicit = {r: getattr(args, r) for r in ("dit", "gemma", "jina", "vae") if getattr(args, r)}
    if args.model_dir:
        paths = ModelPaths.from_dir(args.model_dir, given={r: Path(v) for r, v in explicit.items()})
        paths.jina_max_length = max_length
        return paths, False
    if len(explicit) == 4:
        return ModelPaths(**{k: Path(v) for k, v in explicit.items()}, jina_max_length=max_length), False
    if explicit:
        raise NewBieError("Give all of --dit --gemma --jina --vae, or --model-dir (optionally overriding some).")
    tiny_dir = Path(tempfile.mkdtemp(prefix="newbie-tiny-"))
    make_tiny(tiny_dir)
    print(f"No model given: using built-in TINY RANDOM-WEIGHT models written to {tiny_dir} "
          f"(the image will be noise; pass --model-dir for real weights).", file=sys.stderr)
    paths = ModelPaths.from_dir(tiny_dir)
    paths.jina_max_length = max_length
    return paths, True


def cmd_generate(args) -> int:
    """Run one generation and write PNG(s); prints the stage ledger."""
    from .image_io import save_png
    from .pipeline import GenerationSettings, Pipeline
    from .precision import parse_precision_spec
    from .text.prompts import resolve_system_prompt

    paths, tiny = _resolve_paths(args)
    budget = None if args.vram_budget is None else int(args.vram_budget * 2**30)
    pipe = Pipeline(paths, device=args.device, precision=parse_precision_spec(args.precision),
                    lowvram=args.lowvram, vram_budget=budget, compile=args.compile)
    settings = GenerationSettings(width=args.width, height=args.height, steps=args.steps, cfg=args.cfg,
                                  shift=args.shift, solver=args.solver, cfg_trunc=args.cfg_trunc,
                                  renorm=args.renorm, seed=args.seed, batch=args.batch)
    system = resolve_system_prompt(args.system_prompt, args.prompt)
    result = pipe.generate(args.prompt, args.negative, settings, system_prompt=system,
                           tiled_decode=args.tiled_decode)
    meta = {"prompt": args.prompt, "negative": args.negative, "settings": vars(settings),
            "precision": pipe.precision_names, "random_weights": tiny}
    written = save_png(result.images, args.out, meta)
    if args.json:
        print(json.dumps({"outputs": [str(w) for w in written], "ledger": result.ledger.as_list(),
                          "notes": result.notes, "models": pipe.describe_models()}, indent=2))
    else:
        print(result.ledger.table())
        for w in written:
            print(f"wrote {w}" + ("  (random tiny weights)" if tiny else ""))
    return 0


def cmd_make_tiny(args) -> int:
    """Write the tiny model set and print where each file went."""
    from .tiny import make_tiny

    for name, path in make_tiny(Path(args.dir), seed=args.seed).items():
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
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _generate_parser(sub)
    t = sub.add_parser("make-tiny", help="write tiny random-weight models in the real file layouts")
    t.add_argument("dir")
    t.add_argument("--seed", type=int, default=0)
    sub.add_parser("bench", help="GPU benchmark: newbie bench --help")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "generate":
            return cmd_generate(args)
        return cmd_make_tiny(args)
    except NewBieError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

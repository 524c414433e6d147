"""`newbie enhance IDEA` and `newbie generate --enhance`: Gemma writes the NewBie XML prompt (text/enhance.py).

    newbie enhance "a knight and a witch on a bridge at dawn" --model-dir DIR [--mode idea|tags|refine|to-tags]
                   [--characters N] [--seed N] [--temperature T] [--top-p P] [--max-new-tokens N]
    newbie generate --prompt "IDEA" --enhance [--enhance-mode ...] --out out.png ...

The prompt goes to stdout, the report (tokens/s, lint result) to stderr. `enhance` exits with 3 when the
prompt failed the linter even after the repair round (the text is still printed); `generate --enhance`
prints the prompt it used and a warning in that case, and generates with it. Results are cached in
`$XDG_CACHE_HOME/newbie/enhance_cache.json` (`--no-cache` skips it): a repeated request never loads Gemma.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

EXIT_LINT_FAILED = 3
_MODE_HELP = "idea (idea → xml, default) | tags (tags → xml) | refine (refine xml) | to-tags (xml → tags)"


def cache_path() -> Path:
    """Where the CLI keeps its prompt cache across runs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "newbie" / "enhance_cache.json"


def _sampling_options(p, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}mode", default="idea", help=_MODE_HELP)
    p.add_argument(f"--{prefix}characters", type=int, default=0, help="number of characters to write (0 = Gemma decides)")
    p.add_argument(f"--{prefix}max-new-tokens", type=int, default=512, help="longest reply in tokens (default 512)")
    p.add_argument(f"--{prefix}temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument(f"--{prefix}top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument(f"--{prefix}static-cache", action="store_true",
                   help="static KV cache, compiled on CUDA (slow first call, faster tokens)")


def add_enhance_parser(sub) -> None:
    """The `newbie enhance` subcommand's options."""
    p = sub.add_parser("enhance", help="idea / tags / XML → a NewBie XML prompt written by Gemma")
    p.add_argument("idea", help="an idea in words, a Danbooru tag list, or an XML prompt (see --mode)")
    _sampling_options(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (ignored when --temperature 0)")
    p.add_argument("--model-dir", help="HF NewBie-image-Exp0.1 folder or a ComfyUI models/ folder")
    p.add_argument("--gemma", help="the Gemma file or folder (overrides --model-dir)")
    p.add_argument("--precision", default="", help="text=bf16|fp16|fp32|fp8_e4m3fn (as for generate)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, mps (default: best available)")
    p.add_argument("--lowvram", action="store_true", help="stream Gemma's layers; the LM head runs on the CPU")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the prompt cache")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")


def add_generate_options(p) -> None:
    """`generate --enhance` and its settings (the seed is generate's --seed unless --enhance-seed)."""
    p.add_argument("--enhance", action="store_true", help="let Gemma turn --prompt into a NewBie XML prompt first")
    _sampling_options(p, "enhance-")
    p.add_argument("--enhance-seed", type=int, default=None, help="seed for the enhancement (default: --seed)")


def _settings(mode, characters, max_new_tokens, temperature, top_p, seed, static):
    from .text.enhance import EnhanceSettings
    from .text.enhance_prompts import parse_mode
    from .text.lm import SamplingSettings

    sampling = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                cache="static" if static else "dynamic")
    return EnhanceSettings(mode=parse_mode(mode), characters=characters, sampling=sampling)


def run_enhance(pipe, idea: str, settings, gemma_path, keep: bool = False, use_cache: bool = True):
    """Enhance `idea` with the pipeline's Gemma (cache keyed on the Gemma file and text precision)."""
    from .memory import file_identity
    from . import stages
    from .text.enhance import PromptCache

    cache = PromptCache(path=cache_path()) if use_cache else None
    identity = (file_identity(gemma_path), pipe.precision_names["text"])
    was = pipe.keep_loaded
    pipe.keep_loaded = was or keep  # generate --enhance: the text stage that follows reuses the placement
    try:
        return stages.enhance_prompt(pipe, cache, idea, settings, identity, head_on_cpu=pipe.lowvram)
    finally:
        pipe.keep_loaded = was


def _gemma_path(args) -> tuple[Path, bool]:
    from .model_paths import ModelPaths
    from .tiny import make_tiny

    if args.gemma:
        return Path(args.gemma), False
    if args.model_dir:
        return ModelPaths.from_dir(args.model_dir).gemma, False
    tiny_dir = Path(tempfile.mkdtemp(prefix="newbie-tiny-"))
    print(f"No model given: using the built-in TINY RANDOM-WEIGHT Gemma written to {tiny_dir} (its text is "
          f"gibberish; pass --model-dir or --gemma for the real model).", file=sys.stderr)
    make_tiny(tiny_dir)
    return ModelPaths.from_dir(tiny_dir).gemma, True


def cmd_enhance(args) -> int:
    """`newbie enhance`: print the prompt (stdout) and the report (stderr); exit 3 when the lint failed."""
    from .model_paths import ModelPaths
    from .pipeline import Pipeline
    from .precision import parse_precision_spec
    from .text.enhance import TO_TAGS, enhance

    settings = _settings(args.mode, args.characters, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                         args.static_cache)
    if settings.mode == TO_TAGS:  # no model involved
        result, tiny = enhance(args.idea, settings, session=None), False
    else:
        gemma, tiny = _gemma_path(args)
        pipe = Pipeline(ModelPaths(dit=None, gemma=gemma, jina=None, vae=None), device=args.device,
                        precision=parse_precision_spec(args.precision), lowvram=args.lowvram)
        result = run_enhance(pipe, args.idea, settings, gemma, use_cache=not args.no_cache and not tiny)
    if args.json:
        from dataclasses import asdict

        print(json.dumps({**asdict(result), "report": result.report(), "random_weights": tiny}, indent=2))
    else:
        print(result.prompt)
        print(result.report(), file=sys.stderr)
    return 0 if result.valid else EXIT_LINT_FAILED


def enhance_for_generate(pipe, args, tiny: bool = False) -> str:
    """`generate --enhance`: the enhanced prompt (printed, with the report); a lint failure is a warning."""
    settings = _settings(args.enhance_mode, args.enhance_characters, args.enhance_max_new_tokens,
                         args.enhance_temperature, args.enhance_top_p,
                         args.seed if args.enhance_seed is None else args.enhance_seed, args.enhance_static_cache)
    result = run_enhance(pipe, args.prompt, settings, pipe.paths.gemma, keep=True, use_cache=not tiny)
    print(f"prompt used (enhanced, {settings.mode}):\n{result.prompt}", file=sys.stderr)
    print(result.report(), file=sys.stderr)
    if not result.valid:
        print("warning: the enhanced prompt failed the linter (see above); generating with it as written.",
              file=sys.stderr)
    return result.prompt


"""`newbie generate` checks everything it can BEFORE it loads anything (each refusal: one `error:` line, exit 2,
well under 2 s, no temporary folder left behind).

Order: numbers and limits (steps ≤ 200, batch ≤ 64, size ≤ the DiT's RoPE table), choices (precision, device),
prompt text (UTF-8, XML linted with the nodes' linter), `--out`, then the four model files' headers (names,
dtypes, shapes; no tensor data) — so a wrong VAE is found before 8 GB of DiT and Gemma are read.

`--out` rule: the name must end in .png; its folder must exist or be creatable, and be writable; an existing
FILE is refused unless `--overwrite` is given (with `--batch N`, each `stem_i.png` is checked); an existing
directory is always refused.

Without models, tiny random-weight models are written to a fresh temporary folder that is removed on every exit
path (success, error, Ctrl-C): `model_paths_for` is a context manager.
"""
from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import InputError, ModelFileError, NewBieError
from .validate import MAX_BATCH, MAX_STEPS, check_int, check_number, check_text, parse_device

log = logging.getLogger("newbie")
DEFAULT_MAX_PATCHES = 512  # axes_lens[1], [2] of NewBie-image-Exp0.1 (RoPE position table)
ROLES = ("dit", "gemma", "jina", "vae")


def warn(message: str) -> None:
    """A one-line warning on stderr (the CLI's only channel besides errors)."""
    print(f"warning: {message}", file=sys.stderr)


def max_size_px(max_patches: int = DEFAULT_MAX_PATCHES, patch: int = 2) -> int:
    """The largest width/height the DiT's position table takes: (patches − 1) × patch × 8 (8176 for NewBie)."""
    return (max_patches - 1) * patch * 8


def check_size_limits(width, height, max_patches: int = DEFAULT_MAX_PATCHES, patch: int = 2) -> None:
    """Width/height: whole multiples of 16, ≥ 16 and ≤ the RoPE limit; InputError naming the nearest valid size."""
    from .sizes import validate_size

    top = max_size_px(max_patches, patch)
    for name, v in (("width", width), ("height", height)):
        v = check_int(v, f"--{name}", 1)
        if v > top:
            raise InputError(f"--{name} {v} is larger than the model's position table allows ({top} px at most); "
                             f"NewBie was trained up to ~2048 px. Use e.g. --{name} 1024.")
    validate_size(width, height)


def check_generate_args(args) -> dict[str, str]:
    """Every argument that needs no model file: numbers, limits, choices, device, prompts (XML linted), warnings.
    Returns the parsed precision spec. Raises NewBieError (exit 2)."""
    from .precision import parse_precision_spec
    from .sampling import SOLVERS
    from .text.prompts import looks_like_xml, resolve_system_prompt
    from .text.xml_prompt import validate_xml_prompt
    from .validate import check_choice, check_sampler_settings

    check_int(args.steps, "--steps", 2, MAX_STEPS)
    check_int(args.batch, "--batch", 1, MAX_BATCH)
    check_int(args.seed, "--seed", 0, 2**64 - 1)
    check_size_limits(args.width, args.height)
    check_choice(args.solver, "--solver", SOLVERS)
    check_sampler_settings(args.steps, args.cfg, args.shift, args.cfg_trunc, args.renorm, args.solver)
    precision = parse_precision_spec(args.precision)
    device = parse_device(args.device, "--device")
    if args.vram_budget is not None:
        check_number(args.vram_budget, "--vram-budget", 0.0, 4096.0)
        if not args.lowvram:
            warn("--vram-budget only applies with --lowvram; it is ignored.")
    if args.lowvram:
        from .memory import default_device

        if (device or default_device()).type == "cpu":
            warn("--lowvram streams blocks to a GPU; on the CPU it changes nothing except tiled decoding.")
    prompt = check_text(args.prompt, "--prompt")
    negative = check_text(args.negative, "--negative")
    system = resolve_system_prompt(args.system_prompt, prompt)
    check_text(system, "--system-prompt")
    from .text.prompts import SYSTEM_PROMPTS

    for name, text in (("--prompt", prompt), ("--negative", negative)):
        if looks_like_xml(text) or (system == SYSTEM_PROMPTS["xml"] and text.lstrip().startswith("<")):
            try:
                validate_xml_prompt(text)
            except InputError as e:
                raise InputError(f"{name}: {e}") from None
    return precision


def output_paths(out: str, batch: int) -> list[Path]:
    """The PNG files `--out` names for a batch (image_io.save_png's rule: `stem_i.png` when batch > 1)."""
    p = Path(out)
    return [p] if batch == 1 else [p.with_name(f"{p.stem}_{i}{p.suffix}") for i in range(batch)]


def check_out(out: str, batch: int, overwrite: bool = False) -> list[Path]:
    """Check `--out` before any work (module docstring rule); returns the files that will be written."""
    p = Path(out)
    if p.is_dir():
        raise InputError(f"--out {out!r} is a directory; give a file name inside it, e.g. {p / 'out.png'}.")
    if p.suffix.lower() != ".png":
        raise InputError(f"--out {out!r} must name a .png file (e.g. --out out.png).")
    parent = p.parent if str(p.parent) else Path(".")
    probe = parent
    while not probe.exists():  # the nearest existing ancestor must be a writable folder (missing ones are created)
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"--out {out!r}: {probe} is a file, so the folder {parent} cannot be created.")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".newbie-write-test-"):
            pass
    except OSError as e:
        raise InputError(f"--out {out!r}: cannot write into {probe} ({e.strerror or e}). Choose a folder you can "
                         f"write to.") from None
    files = output_paths(out, batch)
    existing = [f for f in files if f.exists()]
    dirs = [f for f in existing if f.is_dir()]
    if dirs:
        raise InputError(f"--out: {dirs[0]} is a directory; choose another file name.")
    if existing and not overwrite:
        raise InputError(f"--out: {existing[0]} already exists{' (and more)' if len(existing) > 1 else ''}; "
                         f"pass --overwrite to replace it, or choose another name.")
    return files


@contextmanager
def model_paths_for(args) -> Iterator[tuple[object, bool]]:
    """(ModelPaths, tiny?) for `generate`: explicit files / --model-dir (explicit names may be plain names inside
    a ComfyUI models folder, through the nodes' resolver), or tiny models in a temporary folder that is removed
    when the block exits, however it exits."""
    from .model_paths import ModelPaths
    from .tiny import make_tiny

    from .text.jina import check_jina_max_length

    max_length = check_jina_max_length(getattr(args, "jina_max_length", 512))
    explicit = {r: getattr(args, r) for r in ROLES if getattr(args, r, None)}
    if args.model_dir or len(explicit) == 4:
        resolved = {r: _explicit_path(r, v, args.model_dir) for r, v in explicit.items()}
        paths = ModelPaths.from_dir(args.model_dir, given=resolved) if args.model_dir else ModelPaths(**resolved)
        for role, value in resolved.items():
            setattr(paths, role, value)
        paths.jina_max_length = max_length
        yield paths, False
        return
    if explicit:
        raise NewBieError("Give all of --dit --gemma --jina --vae, or --model-dir (optionally overriding some).")
    tiny_dir = Path(tempfile.mkdtemp(prefix="newbie-tiny-"))
    try:
        make_tiny(tiny_dir)
        print("No model given: using built-in TINY RANDOM-WEIGHT models in a temporary folder (removed at exit; "
              "the image will be noise; pass --model-dir for real weights).", file=sys.stderr)
        paths = ModelPaths.from_dir(tiny_dir)
        paths.jina_max_length = max_length
        yield paths, True
    finally:
        shutil.rmtree(tiny_dir, ignore_errors=True)


_COMFY_SUB = {"dit": "diffusion_models", "gemma": "text_encoders", "jina": "text_encoders", "vae": "vae"}


def _explicit_path(role: str, value: str, model_dir: str | None) -> Path:
    """An explicit --dit/--gemma/--jina/--vae: a path as given, or (with --model-dir) a name inside its ComfyUI
    subfolder, resolved by the same resolver as the loader nodes (no absolute paths, `..`, links out)."""
    p = Path(value)
    if p.exists() or not model_dir:
        if not p.exists():
            raise ModelFileError(f"--{role} {value!r} does not exist. Check the path.")
        return p
    from .model_names import resolve_model_name

    base = Path(model_dir) / _COMFY_SUB[role]
    return resolve_model_name(value, [base], f"{base} (--{role} names a file there)",
                              lambda: sorted(x.name for x in base.iterdir()) if base.is_dir() else [],
                              f"Check the name, or give a full path with --{role}.")


def check_model_headers(paths) -> tuple[int, int]:
    """Read the four models' headers only (key names, dtypes, shapes; folder configs) and refuse a wrong, damaged
    or missing file before the first stage. Returns the DiT's (max patches, patch size) for the size limit."""
    from .checkpoints import COMFY_PREFIX, check_dit_keys
    from .files import list_keys, open_safetensors, weight_files

    dit = Path(paths.dit)
    dit = dit / "transformer" if dit.is_dir() and (dit / "transformer").is_dir() else dit
    keys = _keys(dit, list_keys)
    check_dit_keys(keys, str(dit))
    max_patches, patch = DEFAULT_MAX_PATCHES, 2
    for f in weight_files(dit):
        if f.suffix not in (".safetensors", ".sft"):
            continue
        sf = open_safetensors(f)
        key = next((k for k in sf.keys() if k in ("x_embedder.weight", COMFY_PREFIX + "x_embedder.weight")), None)
        if key is not None:
            from .validate import metadata_value

            width = sf.get_slice(key).get_shape()[-1]
            patch = max(1, int(round((width / 16) ** 0.5)))
            lens = metadata_value(sf.metadata() or {}, "newbie.axes_lens", None,
                                  lambda v: isinstance(v, list) and len(v) == 3
                                  and all(isinstance(i, int) and 1 < i <= 1 << 20 for i in v))
            if lens:
                max_patches = min(lens[1], lens[2])
            break
    from .text.gemma import _resolve as gemma_folder, _text_prefix
    from .text.jina import _backbone_prefix

    gemma = gemma_folder(Path(paths.gemma))
    _text_prefix(_keys(gemma, list_keys), gemma)
    jina = Path(paths.jina)
    jina = jina / "clip_model" if jina.is_dir() and not (jina / "config.json").is_file() and (jina / "clip_model").is_dir() else jina
    _backbone_prefix(_keys(jina, list_keys), jina)
    _check_vae_header(Path(paths.vae), list_keys)
    return max_patches, patch


def _keys(path: Path, list_keys) -> list[str]:
    from .files import require_exists

    require_exists(path, "a model", "Check the path.")
    return list_keys(path)


def _check_vae_header(path: Path, list_keys) -> None:
    from .vae import _find_prefix, _wrong_family

    if path.is_dir():
        for sub in (path / "vae", path):
            if (sub / "config.json").is_file():
                path = sub
                break
        else:
            singles = [p for p in (path / "ae.safetensors", path / "ae.sft") if p.is_file()]
            if not singles:
                raise ModelFileError(f"{path} is a folder without a VAE (no config.json, vae/ subfolder or "
                                     f"ae.safetensors). Expected the FLUX.1-dev VAE (ae.safetensors).")
            path = singles[0]
    keys = _keys(path, list_keys)
    if _find_prefix(keys, "encoder.conv_in.weight") is None:
        raise _wrong_family(path, keys)


def ran_precisions(pipe) -> dict[str, str]:
    """The precision each stage RAN in (resolved on the pipeline's device; 'auto' spelled out), for the ledger."""
    out = {}
    for stage, role in (("text", "gemma"), ("dit", "dit"), ("vae", "vae")):
        try:
            p = pipe.precision(role)
            out[stage] = p.name if p.storage == p.compute else f"{p.name} (computed in {str(p.compute).replace('torch.', '')})"
        except NewBieError:
            out[stage] = str(pipe.precision_names.get(stage))
    return out


def describe_models_ran(pipe) -> list[dict]:
    """`pipe.describe_models()` with each model's stage precision (`ran_in`) next to its idle CPU dtype."""
    ran = ran_precisions(pipe)
    stage_of = {"gemma": "text", "jina": "text", "dit": "dit", "vae": "vae"}
    rows = pipe.describe_models()
    for row in rows:
        row["ran_in"] = ran.get(stage_of.get(row.get("name"), ""), "?")
    return rows


def ledger_rows(result, pipe) -> list[dict]:
    """The ledger as dicts, each with the precision its stage ran in."""
    ran = ran_precisions(pipe)
    return [{**r, "precision": ran.get(r["stage"], "?")} for r in result.ledger.as_list()]


def ledger_table(result, pipe) -> str:
    """The ledger table plus one line naming the precision each stage ran in."""
    ran = ran_precisions(pipe)
    return result.ledger.table() + "\nprecision: " + ", ".join(f"{s} {p}" for s, p in ran.items())


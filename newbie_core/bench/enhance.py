"""Prompt-enhance generation speed: random full-size Gemma3-4B weights, batch 1, the product's placement and decoder.

    python -m newbie_core.bench.enhance --out benchmarks/results            # CUDA GPU, full size (~3 min)
    python -m newbie_core.bench.enhance --quick --device cpu --out /tmp/e   # tiny config: a CPU smoke test

The model is built on the device with random weights (transformers' own init; speed does not depend on the
values), kept on the CPU in bf16 as if read from the file, and placed for each mode by the product's
`memory.StagedModel` exactly as the CLI places it. Generation is `text.lm.generate_ids` (transformers'
`generate`) on a prompt of `--prompt-tokens` random ids (about the length of the enhancement conversation),
writing exactly `--new-tokens` tokens (no stop token: random weights would stop anywhere).

Modes: storage bf16 or fp8_e4m3fn × the embedding table on the device (ComfyUI's layout: the head shares it)
or kept on the CPU (the CLI's `CPU_ONLY` layout: a bf16 head copy is made for the generation) × dynamic or
static KV cache (static = transformers' compiled decode step; its first call compiles and is reported apart).
Per mode: new tokens/s after the first token (median of `--repeats`), first-token latency (prefill + head copy),
peak VRAM allocated/reserved from placement to the end of generation. Writes `enhance-<gpu>.json` and `.md`.
Needs torch and transformers only (no diffusers).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

from .report import slug, write_results

GiB = 2**30
# google/gemma-3-4b-it's text path (spec §3.1); the tiny one is the test models' (newbie_core/tiny/text.py).
FULL = dict(vocab_size=262_208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
            num_key_value_heads=4, head_dim=256)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m newbie_core.bench.enhance", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and markdown results")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny config, few tokens (CPU smoke test)")
    p.add_argument("--prompt-tokens", type=int, default=768, help="prompt length in tokens (default 768)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens written per run (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per mode (median)")
    p.add_argument("--modes", default="", help="comma list of mode names to run (default: all)")
    return p


def build_model(device: torch.device, quick: bool, seed: int = 0):
    """A random-weight Gemma3TextModel built on `device`, returned on the CPU in bf16 (the 'file' copy)."""
    from transformers import Gemma3TextConfig, Gemma3TextModel

    from ..fp8 import make_fp8_capable
    from ..text.gemma import GEMMA3_4B_EXTRA

    cfg = Gemma3TextConfig(**TINY) if quick else Gemma3TextConfig(**FULL, **GEMMA3_4B_EXTRA)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = Gemma3TextModel(cfg).to(torch.bfloat16)
    model = model.to("cpu").eval().requires_grad_(False)
    make_fp8_capable(model)  # as load_gemma does: fp8 storage applies to Fp8Linear layers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def modes(quick: bool) -> list[dict]:
    """Every measured combination (name, precision, where the table lives, KV cache)."""
    out = []
    for precision in ("bf16", "fp8_e4m3fn"):
        for table in ("device", "cpu"):
            for cache in ("dynamic", "static"):
                if cache == "static" and (quick or table == "cpu"):
                    continue  # static: compiled on CUDA only; one table layout is enough for the comparison
                out.append({"name": f"{precision} table-{table} {cache}", "precision": precision, "table": table,
                            "cache": cache})
    return out


def _peak(device: torch.device) -> tuple[float, float]:
    if device.type != "cuda":
        return 0.0, 0.0
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / GiB, torch.cuda.max_memory_reserved(device) / GiB


def measure_mode(model, mode: dict, device: torch.device, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """Place the model for `mode`, generate `repeats` times (+ one warm-up), release; the mode's numbers."""
    from ..memory import StagedModel, empty_device_cache
    from ..precision import parse_precision
    from ..text.lm import SamplingSettings, generate_ids, generation_head

    empty_device_cache(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    staged = StagedModel("gemma", model, "random Gemma3", ("embed_tokens",) if mode["table"] == "cpu" else ())
    precision = parse_precision(mode["precision"], "gemma", device)
    t0 = time.perf_counter()
    staged.acquire(device, precision)
    place_s = time.perf_counter() - t0
    weights_gib = staged.nbytes(on_device_only=True) / GiB
    settings = SamplingSettings(max_new_tokens=new_tokens, temperature=0, cache=mode["cache"])
    runs, warm = [], None
    try:
        for i in range(repeats + 1):
            with generation_head(model) as view:
                g = generate_ids(view, prompt, settings, stop_ids=[], sync=True)
            assert len(g.ids) == new_tokens, f"{mode['name']}: {len(g.ids)} tokens, expected {new_tokens}"
            if i == 0:
                warm = g
            else:
                runs.append(g)
        alloc, reserved = _peak(device)
    finally:
        staged.release()
    return {**mode, "tokens_per_s": round(statistics.median(r.tokens_per_s for r in runs), 2),
            "first_token_s": round(statistics.median(r.first_token_s for r in runs), 4),
            "seconds_per_run": round(statistics.median(r.seconds for r in runs), 3),
            "first_call_s": round(warm.seconds, 2), "place_s": round(place_s, 3),
            "weights_on_device_gib": round(weights_gib, 3), "peak_allocated_gib": round(alloc, 3),
            "peak_reserved_gib": round(reserved, 3)}


def environment(device: torch.device) -> dict:
    """Device name, library versions, date."""
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def markdown(result: dict) -> str:
    """The results as a markdown table with the setup above it."""
    env, cfg = result["environment"], result["config"]
    lines = [f"# Prompt enhance: Gemma3-4B generation on {env['device']}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, {env['date']}. "
             f"{'TINY config (smoke test). ' if cfg['quick'] else 'Random full-size Gemma3-4B weights. '}"
             f"Batch 1, prompt {cfg['prompt_tokens']} tokens, {cfg['new_tokens']} new tokens per run, greedy, "
             f"median of {cfg['repeats']} runs after one warm-up.", "",
             "| mode | new tokens/s | first token (s) | first call (s) | weights on device (GiB) | peak alloc (GiB) "
             "| peak reserved (GiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["modes"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.1f} | {r['first_token_s']:.3f} | {r['first_call_s']:.2f} | "
                     f"{r['weights_on_device_gib']:.2f} | {r['peak_allocated_gib']:.2f} | {r['peak_reserved_gib']:.2f} |")
    lines += ["", "table-device: the embedding table is on the device and is the head (ComfyUI's layout). table-cpu: "
              "the table stays on the CPU (the CLI's), a bf16 head copy is made per generation (in the first-token "
              "time). static: transformers' static KV cache with its compiled decode step (first call compiles). "
              "Target: ≥ 100 new tokens/s in bf16 within the text stage's 7.5 GiB."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every mode, write `enhance-<device>.json` and `.md`; returns 1 when a mode failed."""
    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.repeats = min(args.prompt_tokens, 48), min(args.new_tokens, 8), 1
    model = build_model(device, args.quick)
    g = torch.Generator().manual_seed(0)
    prompt = [2] + torch.randint(4, model.config.vocab_size - 64, (args.prompt_tokens - 1,), generator=g).tolist()
    wanted = set(filter(None, args.modes.split(",")))
    results = []
    for mode in modes(args.quick):
        if wanted and mode["name"] not in wanted:
            continue
        try:
            results.append(measure_mode(model, mode, device, prompt, args.new_tokens, args.repeats))
        except Exception as e:  # noqa: BLE001 - one failing mode is reported, the others still run
            results.append({**mode, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(results[-1]), flush=True)
    env = environment(device)
    result = {"environment": env, "config": {"quick": args.quick, "prompt_tokens": args.prompt_tokens,
                                             "new_tokens": args.new_tokens, "repeats": args.repeats},
              "modes": results}
    path = write_results(args.out, f"enhance-{slug(env['device']) or 'cpu'}", result, markdown(result))
    print(f"wrote {path} and .md")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())

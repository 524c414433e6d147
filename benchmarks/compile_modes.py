"""Where the compiled DiT step's time goes, and which compile settings shorten it (bf16 and scaled fp8).

    python benchmarks/compile_modes.py --out benchmarks/results
    python benchmarks/compile_modes.py --quick --device cpu --out /tmp/x   # CPU plumbing check

The full-size random-weight DiT (CFG batch 2, 1024²: 4096 image + 256 caption tokens), compiled with
`fullgraph=True, dynamic=False` as the pack does; per variant: s/step, peak VRAM, relative difference to the
`default` compile of the same precision (inductor's own fusions everywhere: the fused fp8 gate kernel off, as in
the runs before it became the pack's default; every other variant also runs with it off). Variants: CUDA graphs (`mode="reduce-overhead"`, `cudagraphs`),
inductor's coordinate-descent tuning of its own kernels, inductor's multi-kernel (`multi_kernel`: persistent
reductions up to 16× longer rows, e.g. the norms over 2304 channels, each benchmarked against the looped form),
`max-autotune-no-cudagraphs` (GEMM autotuning against inductor's Triton templates, which can take a
following pointwise op such as the SwiGLU product into their epilogue; `_tma`: with the persistent TMA template;
`--autotune`), `gate_kernel` (fp8: the SwiGLU gate + row
quantisation in one Triton kernel, `newbie_core/fp8_gate.py`, instead of inductor's looped fusion: the pack's
default since it was measured here), and SwiGLU with w1‖w3 in one GEMM (the two weights concatenated once; fp8: one activation quantisation and one
scaled matmul instead of two). A torch profile of the default compile (and of the kernel variants) splits GPU time
into GEMMs, attention and the rest. Writes
`compile-modes-<gpu>.json` and `.md`.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from newbie_core import fp8_gate  # noqa: E402
from newbie_core.bench.measure import dit_inputs, dit_step, parity  # noqa: E402
from newbie_core.bench.report import benchmark_parser, device_label, slug, write_results  # noqa: E402


PROFILED = ("default", "gate_kernel", "max_autotune", "max_autotune_tma", "fused_max_autotune")


def fuse_swiglu(dit) -> int:
    """Give every FeedForward one [2·hidden, dim] weight (w1 over w3; fp8: scales too) and a forward that runs
    it as one GEMM. Returns how many were fused."""
    from newbie_core.dit_blocks import FeedForward
    from newbie_core.fp8 import linear_forward

    n = 0
    for ff in dit.modules():
        if isinstance(ff, FeedForward):
            w1, w3 = ff.w1.weight, ff.w3.weight
            if w1.dtype.itemsize == 1:
                w13 = torch.cat([w1.view(torch.uint8), w3.view(torch.uint8)]).view(w1.dtype)
            else:
                w13 = torch.cat([w1, w3])
            ff.w13 = w13
            s1, s3 = ff.w1.weight_scale, ff.w3.weight_scale
            ff.w13_scale = None if s1 is None else torch.cat([s1, s3])
            ff.forward = functools.partial(_fused_forward, ff, linear_forward)
            n += 1
    return n


def _fused_forward(ff, linear_forward, x: torch.Tensor) -> torch.Tensor:
    h = linear_forward(x, ff.w13, ff.w13_scale, None, ff.w1.fp8_matmul)
    a, b = h.chunk(2, dim=-1)
    return fp8_gate.swiglu(a, b, ff.w2)


def gpu_time_split(fwd, inputs, device) -> dict:
    """One profiled step: GPU ms in GEMMs, attention and everything else, and the top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    args, layout = inputs
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        fwd(*args, layout=layout)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    split = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    kernels = []
    for e in prof.key_averages():
        # GPU kernels only: a Triton kernel also shows as a CPU launch event carrying the same device time
        if e.device_type != DeviceType.CUDA:
            continue
        us = e.device_time_total
        name = e.key.lower()
        kind = ("attention" if any(s in name for s in ("fmha", "flash", "cudnn", "attention", "sdpa"))
                else "gemm" if name.startswith("triton_tem") or any(s in name for s in ("gemm", "nvjet", "xmma",
                                                                                       "cutlass"))
                else "other")
        split[kind] += us / 1e3
        kernels.append((round(us / 1e3, 3), e.count, e.key[:90]))
    split["all kernels"] = sum(split.values())
    kernels.sort(reverse=True)
    return {"ms": {k: round(v, 2) for k, v in split.items()}, "top": kernels[:12]}


def build(device, quick: bool, precision: str):
    """The random-weight DiT in `precision` ("bf16" or "fp8_e4m3fn", fp8 matmuls where the GPU has them)."""
    from newbie_core.bench.models import random_dit_state_dict
    from newbie_core.dit import DiTConfig, load_dit
    from newbie_core.fp8 import enable_fp8_matmul, fp8_matmul_supported
    from newbie_core.precision import cast_module, parse_precision
    from newbie_core.tiny.dit import TINY_DIT_CONFIG

    cfg = TINY_DIT_CONFIG if quick else DiTConfig.full()
    sd = random_dit_state_dict(cfg, device)
    dit = load_dit(sd, dtype=torch.bfloat16, device=device, attention="auto")
    if precision != "bf16":
        cast_module(dit, parse_precision(precision, "dit"))
        if fp8_matmul_supported(device):
            enable_fp8_matmul(dit)
    return dit


def main(argv: list[str] | None = None) -> int:
    """Time every variant and write the report."""
    p = benchmark_parser(__doc__)
    p.add_argument("--precisions", default="bf16,fp8_e4m3fn")
    p.add_argument("--variants", default="default,gate_kernel,coordinate_descent,fused_swiglu,fused_coordinate_descent")
    p.add_argument("--autotune", action="store_true", help="also max-autotune-no-cudagraphs (minutes of tuning)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    runs = 2 if args.quick else 10
    hw, cap = ((16, 16), 24) if args.quick else ((128, 128), 256)
    variants = args.variants.split(",") + (["max_autotune", "max_autotune_tma", "fused_max_autotune"]
                                           if args.autotune else [])
    res = {"device_name": device_label(device),
           "torch": torch.__version__, "rows": []}
    name = f"compile-modes-{slug(res['device_name'])}" + ("-quick" if args.quick else "")
    import torch._inductor.config as inductor_config

    default_gate = fp8_gate.is_enabled()
    for precision in args.precisions.split(","):
        dit = build(device, args.quick, precision)
        inputs = dit_inputs(dit, device, latent_hw=hw, cap_len=cap, uncond_len=min(40, cap // 2))
        ref = None
        fused = False
        for variant in variants:
            if variant.startswith("fused") and not fused:
                fuse_swiglu(dit)
                fused = True
            if not variant.startswith("fused") and fused:
                continue  # unfused variants run first
            mode = ("max-autotune-no-cudagraphs" if "max_autotune" in variant
                    else "reduce-overhead" if variant == "cudagraphs" else None)
            settings = ({"coordinate_descent_tuning": True} if variant.endswith("coordinate_descent")
                        else {"triton.multi_kernel": 1} if variant.endswith("multi_kernel")
                        else {"triton.enable_persistent_tma_matmul": True} if variant.endswith("_tma") else {})
            torch._dynamo.reset()
            patch = inductor_config.patch(settings) if settings else contextlib.nullcontext()
            fp8_gate.set_enabled(variant == "gate_kernel")
            try:
                with patch:
                    fwd = torch.compile(dit, fullgraph=True, dynamic=False, mode=mode)
                    r = dit_step(fwd, inputs, device, runs=runs)
                    out = r.pop("out")
                    ref = out if ref is None else ref
                    row = {"precision": precision, "variant": variant, **{k: round(v, 5) for k, v in r.items()},
                           **parity(out, ref)}
                    if variant in PROFILED:
                        row["profile"] = gpu_time_split(fwd, inputs, device)
            finally:
                fp8_gate.set_enabled(default_gate)
            res["rows"].append(row)
            print(f"{precision:>10} {variant:>26}: {row['seconds']:.4f} s/step (first {row['first_call_s']:.0f} s) "
                  f"peak {row['peak_alloc_gib']:.2f} GiB diff {row['rel_l2_diff']:.2e}", flush=True)
            if "profile" in row:
                print(row["profile"], flush=True)
            write_results(args.out, name, res, markdown(res))
        del dit, inputs, ref
        torch._dynamo.reset()
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    """The report."""
    lines = [f"# Compiled DiT step — {res['device_name']}, torch {res['torch']}", "",
             "CFG batch 2, 1024², 256 caption tokens; `torch.compile(fullgraph=True, dynamic=False)`.", "",
             "| precision | variant | s / step | first call s | peak alloc GiB | rel. diff vs default |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['precision']} | {r['variant']} | {r['seconds']:.4f} | {r['first_call_s']:.0f} | "
                     f"{r['peak_alloc_gib']:.2f} | {r['rel_l2_diff']:.1e} |")
    for r in res["rows"]:
        if "profile" in r:
            ms = r["profile"]["ms"]
            lines.append(f"\nGPU time of one {r['precision']} {r['variant']} step: GEMMs {ms['gemm']} ms, attention "
                         f"{ms['attention']} ms, other kernels {ms['other']} ms.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

"""Which attention kernel and RoPE form is fastest for the DiT's own shapes, on this GPU, eager and compiled.

    python benchmarks/attention_kernels.py --out benchmarks/results
    python benchmarks/attention_kernels.py --quick --device cpu --out /tmp/x   # CPU plumbing check

Part 1, kernels alone at the baseline's shapes (CFG batch 2, 1024²: 4096 image + 256 caption tokens, 24 query /
8 KV heads of 96): every SDPA backend this torch has (flash, cuDNN, memory-efficient), with native GQA and with
K/V expanded to 24 heads, each against the math result; RoPE as a complex multiply and as the real formula.
Part 2, the full-size random-weight DiT step (bf16, eager and torch.compile) with the "sdpa" backend (torch's
kernel choice), "auto" (the pack's kernel priority, `AUTO_CUDA_KERNELS`) and the fastest kernel of part 1. Writes `attention-kernels-<gpu>.json` and `.md`.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from newbie_core.attention import AUTO_CUDA_EXPAND_KV, AUTO_CUDA_KERNELS, SDPA_KERNELS, apply_rope, attention  # noqa: E402,E501
from newbie_core.bench.measure import dit_inputs, dit_step, mean_seconds, parity  # noqa: E402
from newbie_core.bench.report import benchmark_parser, device_label, slug, write_results  # noqa: E402


def kernels(device: torch.device, quick: bool, runs: int) -> dict:
    """Each SDPA kernel alone at the DiT's shapes; error against the math kernel in fp32."""
    b, hq, hkv, dh = 2, 24, 8, 96
    s = 80 if quick else 4352
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # [B,S,H,D] then transposed, as the DiT lays them out (non-contiguous heads-first views)
    q, k, v = (torch.randn(b, s, h, dh, generator=g).to(device, dtype).transpose(1, 2) for h in (hq, hkv, hkv))
    ref = attention(q.float(), k.float(), v.float(), None, backend="sdpa", kernel="math")
    out = {}
    for kernel in SDPA_KERNELS:
        try:
            o = attention(q, k, v, None, backend="sdpa", kernel=kernel)
        except RuntimeError as e:  # a kernel this GPU/torch lacks for these shapes
            out[kernel] = {"error": str(e).splitlines()[0][:160]}
            continue
        sec = mean_seconds(lambda: attention(q, k, v, None, backend="sdpa", kernel=kernel), device, runs)
        flops = 4 * b * hq * s * s * dh
        out[kernel] = {"ms": round(sec * 1e3, 3), "tflops": round(flops / sec / 1e12, 1), **parity(o, ref)}
    cos, sin = (torch.randn(b, s, 1, dh // 2, generator=g).to(device) for _ in range(2))
    x = torch.randn(b, s, hq, dh, generator=g).to(device, dtype)
    out["rope_complex_eager"] = {"ms": round(mean_seconds(lambda: apply_rope(x, cos, sin), device, runs) * 1e3, 3)}
    out["rope_real_eager"] = {"ms": round(mean_seconds(lambda: apply_rope(x, cos, sin, "real"), device, runs) * 1e3, 3)}
    out["rope_real_eager"].update(parity(apply_rope(x, cos, sin, "real"), apply_rope(x, cos, sin)))
    real = torch.compile(apply_rope, fullgraph=True, dynamic=False)
    out["rope_real_compiled"] = {"ms": round(mean_seconds(lambda: real(x, cos, sin), device, runs) * 1e3, 3)}
    out["rope_real_compiled"].update(parity(real(x, cos, sin), apply_rope(x, cos, sin)))
    return out


def dit_steps(device: torch.device, quick: bool, runs: int, kernels_: list[str]) -> dict:
    """The DiT step (bf16, CFG batch 2) with the "sdpa" backend (torch's kernel choice), "auto" (the pack's
    priority) and each kernel in `kernels_`, eager and compiled; relative difference to the first row."""
    from newbie_core.bench.models import random_dit_state_dict
    from newbie_core.dit import DiTConfig, load_dit
    from newbie_core.tiny.dit import TINY_DIT_CONFIG

    cfg = TINY_DIT_CONFIG if quick else DiTConfig.full()
    sd = random_dit_state_dict(cfg, device)
    hw, cap = ((16, 16), 24) if quick else ((128, 128), 256)
    out, ref = {}, None
    for kernel in ["sdpa", "auto", *kernels_]:
        fn = (functools.partial(attention, backend=kernel) if kernel in ("sdpa", "auto")
              else functools.partial(attention, backend="sdpa", kernel=kernel))
        dit = load_dit(sd, dtype=torch.bfloat16, device=device, attention=fn)
        inputs = dit_inputs(dit, device, latent_hw=hw, cap_len=cap, uncond_len=min(40, cap // 2))
        for mode in ("eager", "compiled"):
            fwd = torch.compile(dit, fullgraph=True, dynamic=False) if mode == "compiled" else dit
            r = dit_step(fwd, inputs, device, runs=runs)
            o = r.pop("out")
            ref = o if ref is None else ref
            r.update(parity(o, ref))
            out[f"{kernel}_{mode}"] = {k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()}
            print(f"dit {kernel:>10} {mode:>8}: {r['seconds']:.4f} s/step", flush=True)
            torch._dynamo.reset()
        del dit
    return out


def markdown(res: dict) -> str:
    """The report."""
    pol = res["auto_policy"]
    lines = [f"# Attention kernels for the DiT's shapes — {res['device_name']}, torch {res['torch']}", "",
             f"`auto` rows: kernel priority {', '.join(pol['kernels'])}, K/V {'expanded' if pol['expand_kv'] else 'native GQA'}.",
             "",
             "| kernel (2×24×4352×96, 8 KV heads) | ms | TFLOP/s | rel. diff vs math fp32 |", "|---|---|---|---|"]
    for name, r in res["kernels"].items():
        if "error" in r:
            lines.append(f"| {name} | – | – | {r['error']} |")
        else:
            lines.append(f"| {name} | {r['ms']} | {r.get('tflops', '–')} | {r.get('rel_l2_diff', '–')} |")
    lines += ["", "| DiT step (bf16, CFG batch 2, 1024²) | s / step | peak alloc GiB | rel. diff vs sdpa eager |",
              "|---|---|---|---|"]
    for name, r in res["dit"].items():
        lines.append(f"| {name} | {r['seconds']:.4f} | {r['peak_alloc_gib']:.2f} | {r['rel_l2_diff']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run both parts and write the report."""
    p = benchmark_parser(__doc__)
    p.add_argument("--dit-kernels", type=int, default=1, help="also time the DiT with the N fastest kernels")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    runs = 2 if args.quick else 20
    res = {"device_name": device_label(device),
           "torch": torch.__version__,
           "auto_policy": {"kernels": list(AUTO_CUDA_KERNELS), "expand_kv": AUTO_CUDA_EXPAND_KV}}
    res["kernels"] = kernels(device, args.quick, runs)
    print(markdown({**res, "dit": {}}), flush=True)
    usable = [k for k in SDPA_KERNELS if "error" not in res["kernels"][k] and k != "math"]
    fastest = sorted(usable, key=lambda k: res["kernels"][k]["ms"])[:args.dit_kernels]
    res["dit"] = dit_steps(device, args.quick, 2 if args.quick else 5, fastest)
    md = markdown(res)
    print(md)
    write_results(args.out, f"attention-kernels-{slug(res['device_name'])}", res, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

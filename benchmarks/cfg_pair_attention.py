"""One attention call for the CFG pair's two caption lengths, or two? Kernels alone, at the DiT's shapes.

    python benchmarks/cfg_pair_attention.py --out benchmarks/results
    python benchmarks/cfg_pair_attention.py --quick --device cpu --out /tmp/x   # CPU plumbing check

The DiT packs each sample's real tokens first, so the CFG pair (cond: 4096 image + 256 caption tokens, uncond:
4096 + 40) runs today as two unmasked cuDNN calls per block (`attention.prefix_attention`). Candidates timed
against that: cuDNN's ragged (THD) call over both samples at once (`aten._cudnn_attention_forward` with
cumulative sequence lengths; the longer sample first makes the packed buffer a view of the padded one, the
shorter first gathers), with native GQA and with K/V expanded; the padded batch with a boolean key mask (cuDNN, memory-efficient); and the
unmasked batch of two (not a correct result, the lower bound). Each is also compiled (fullgraph) to see that it
traces. Rel. diff: real query rows against the two-call result. Writes `cfg-pair-attention-<gpu>.json` / `.md`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from newbie_core.attention import KeyPrefix, _expand_kv, attention, sdpa_attention  # noqa: E402
from newbie_core.bench.measure import mean_seconds, parity  # noqa: E402
from newbie_core.bench.report import benchmark_parser, device_label, slug, write_results  # noqa: E402


def ragged_cudnn(q, k, v, lengths: tuple[int, ...], offsets: torch.Tensor, expand: bool = False) -> torch.Tensor:
    """Every sample in ONE cuDNN ragged call (`aten._cudnn_attention_forward` with cumulative lengths): the real
    rows packed (views of the padded buffer when every sample but the last is unpadded, gathered otherwise),
    the output unpacked to [B,H,S,D] with zero pad rows."""
    b, hq, s, dh = q.shape
    if expand:
        k, v = _expand_kv(q, k, v)
    total, view = sum(lengths), all(n == s for n in lengths[:-1])

    def packed(t):
        rows = t.transpose(1, 2)
        return rows.reshape(b * s, t.shape[1], dh)[:total] if view else torch.cat([rows[i, :n] for i, n in
                                                                                  enumerate(lengths)])

    out = torch.ops.aten._cudnn_attention_forward(packed(q), packed(k), packed(v), None, offsets, offsets, s, s,
                                                  False, 0.0, False, False, scale=dh ** -0.5)[0]
    starts = [sum(lengths[:i]) for i in range(b)]
    out = torch.stack([torch.nn.functional.pad(out[a:a + n], (0, 0, 0, 0, 0, s - n)) for a, n in zip(starts, lengths)])
    return out.transpose(1, 2)


def ragged(lengths: tuple[int, ...], device, expand: bool = False, swapped: bool = False):
    """The ragged call as a variant; `swapped`: the shorter sample first (the gathering path), outputs swapped back."""
    lens = lengths[::-1] if swapped else lengths
    offsets = torch.tensor([0, lens[0], lens[0] + lens[1]], dtype=torch.int32, device=device)
    if swapped:
        return lambda q, k, v: ragged_cudnn(q.flip(0), k.flip(0), v.flip(0), lens, offsets, expand).flip(0)
    return lambda q, k, v: ragged_cudnn(q, k, v, lens, offsets, expand)


def variants(lengths: tuple[int, int], device: torch.device) -> dict:
    """name -> callable(q, k, v)."""
    mask = torch.arange(lengths[0], device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]

    def masked(kernel):
        return lambda q, k, v: sdpa_attention(q, k, v, mask, kernel=kernel)

    return {
        "two_calls_cudnn": lambda q, k, v: attention(q, k, v, KeyPrefix(lengths), backend="sdpa", kernel="cudnn"),
        "ragged_cudnn": ragged(lengths, device),
        "ragged_cudnn_expanded": ragged(lengths, device, expand=True),
        "ragged_cudnn_gathered (short first)": ragged(lengths, device, swapped=True),
        "masked_cudnn": masked("cudnn"),
        "masked_cudnn_expanded": masked("cudnn_expanded"),
        "masked_efficient_expanded": masked("efficient_expanded"),
        "batch2_unmasked_cudnn (wrong, bound)": lambda q, k, v: attention(q, k, v, None, backend="sdpa",
                                                                         kernel="cudnn"),
    }


def run(device: torch.device, quick: bool, runs: int) -> dict:
    """Time every variant eager and compiled; parity on real query rows against the two-call result."""
    b, hq, hkv, dh = 2, 24, 8, 96
    img, cap, uncond = (64, 16, 6) if quick else (4096, 256, 40)
    lengths = (img + cap, img + uncond)
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(b, lengths[0], h, dh, generator=g).to(device, dtype).transpose(1, 2) for h in (hq, hkv, hkv))
    fns = variants(lengths, device)
    ref = fns["two_calls_cudnn"](q, k, v) if device.type == "cuda" else attention(q, k, v, KeyPrefix(lengths))
    real = [ref[0, :, :lengths[0]], ref[1, :, :lengths[1]]]
    out = {}
    for name, fn in fns.items():
        row = {}
        for mode in ("eager", "compiled"):
            f = torch.compile(fn, fullgraph=True, dynamic=False) if mode == "compiled" else fn
            try:
                o = f(q, k, v)
                row[f"{mode}_ms"] = round(mean_seconds(lambda: f(q, k, v), device, runs) * 1e3, 3)
            except Exception as e:  # a kernel this GPU/torch lacks for these inputs, or a trace failure
                row[f"{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                continue
            if mode == "eager":
                row.update(parity(torch.cat([o[0, :, :lengths[0]], o[1, :, :lengths[1]]], 1),
                                  torch.cat(real, 1)))
            torch._dynamo.reset()
        out[name] = row
        print(name, row, flush=True)
    return {"lengths": list(lengths), "shape": [b, hq, hkv, dh], "variants": out}


def markdown(res: dict) -> str:
    """The report."""
    lines = [f"# CFG pair attention — {res['device_name']}, torch {res['torch']}", "",
             f"q 2×24×S×96, 8 KV heads; real lengths {res['lengths']} (cond, uncond). Mean of {res['runs']} calls.",
             "", "| variant | eager ms | compiled ms | rel. diff vs two calls (real rows) |", "|---|---|---|---|"]
    for name, r in res["variants"].items():
        e = r.get("eager_ms", r.get("eager_error", "–"))
        c = r.get("compiled_ms", r.get("compiled_error", "–"))
        lines.append(f"| {name} | {e} | {c} | {r.get('rel_l2_diff', '–')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run and write the report."""
    p = benchmark_parser(__doc__)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    runs = 2 if args.quick else 50
    res = {"device_name": device_label(device),
           "torch": torch.__version__, "runs": runs, **run(device, args.quick, runs)}
    md = markdown(res)
    print(md)
    write_results(args.out, f"cfg-pair-attention-{slug(res['device_name'])}", res, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LoRA / LoKr merging on the full-size NewBie DiT: time, memory and exactness of `newbie_core.lora`.

    python benchmarks/lora_full_size.py --out benchmarks/results                    # GPU: full-size config
    python benchmarks/lora_full_size.py --quick --device cpu --out /tmp/lora-bench  # tiny config, CPU check

Random bf16 weights with the official shapes (3.5 B parameters; q 2304 rows, k/v 768 rows of the GQA qkv),
rank-32 LoRAs over every Linear in three formats (PEFT, LyCORIS LoKr, diffusers with split q/k/v). Measures
`patch_state_dict` (what `load_dit(..., loras=)` and the CLI do before the first stage) with the fp32 sum on the
CPU and on the device, and checks: every module matched; patched weights equal an fp64 reference rounded to
bf16 (fraction of differing elements, max difference in bf16 ulps); a to_k-only file changes only rows
2304..3071 of each qkv. Writes lora-full-size-<device>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from newbie_core.bench.models import random_dit_state_dict  # noqa: E402
from newbie_core.dit import DiTConfig  # noqa: E402
from newbie_core.lora import patch_state_dict, read_lora  # noqa: E402
from newbie_core.tiny.dit import TINY_DIT_CONFIG  # noqa: E402
from newbie_core.tiny.lora import write_tiny_lora  # noqa: E402


def reference(sd, path, key, config):
    """fp64 W + scale·ΔW for one key from the file's own tensors (PEFT / kohya-style LoRA only)."""
    lora = read_lora(path)
    base = key[: -len(".weight")]
    (mod,) = [m for m in lora.modules if m.name == base]
    alpha = mod.alpha if mod.alpha is not None else lora.alpha
    delta = mod.tensors["up"].double() @ mod.tensors["down"].double()
    return sd[key].double() + alpha / mod.tensors["down"].shape[0] * delta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny config (CPU plumbing check)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    config = TINY_DIT_CONFIG if args.quick else DiTConfig.full()
    rank = 4 if args.quick else args.rank
    t0 = time.perf_counter()
    sd = random_dit_state_dict(config, device)
    rows = {"config": "tiny" if args.quick else "full", "params": sum(v.numel() for v in sd.values()),
            "random_weights_s": round(time.perf_counter() - t0, 2), "formats": {}}
    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    for fmt in ("peft", "lokr", "diffusers"):
        path = write_tiny_lora(tmp / f"{fmt}.safetensors", fmt, config=config, rank=rank, alpha=rank / 2)
        row = {"file_mib": round(path.stat().st_size / 2**20, 1)}
        for where, compute in (("cpu", None), ("device", device)):
            if where == "device" and device.type == "cpu":
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            out, (rep,) = patch_state_dict(sd, config, [(path, 1.0)], dtype=torch.bfloat16, compute_device=compute)
            row[f"merge_{where}_s"] = round(time.perf_counter() - t0, 2)
            if device.type == "cuda" and compute is not None:
                row["device_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            row.update(matched=rep.matched, unmatched=len(rep.unmatched), alpha=rep.alpha_source)
        if fmt == "peft":  # exactness against fp64, for every patched key
            diff_frac, max_ulp = 0.0, 0.0
            for key in [k for k in out if k.endswith(".weight") and out[k] is not sd[k]]:
                ref = reference(sd, path, key, config)
                got = out[key].double()
                ulp = torch.ldexp(torch.ones_like(ref), torch.frexp(ref)[1] - 8)  # bf16: 8 significant bits
                diff_frac = max(diff_frac, (got != ref.to(torch.bfloat16).double()).double().mean().item())
                max_ulp = max(max_ulp, ((got - ref).abs() / ulp).max().item())
            row.update(max_fraction_not_nearest_bf16=diff_frac, max_error_bf16_ulp=round(max_ulp, 3))
        del out
        rows["formats"][fmt] = row
    # to_k only: rows q .. q+kv of every qkv change, nothing else
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    kfile = write_tiny_lora(tmp / "k.safetensors", "diffusers", config=config, rank=rank,
                            only=tuple(k[: -len(".weight")] for k in sd if k.endswith("attention.qkv.weight")))
    from safetensors.torch import load_file, save_file

    save_file({k: v for k, v in load_file(str(kfile)).items() if ".attn.to_k." in k}, str(kfile))
    out, _ = patch_state_dict(sd, config, [(kfile, 1.0)], dtype=torch.bfloat16)
    spans = set()
    for key in [k for k in out if k.endswith("attention.qkv.weight")]:
        changed = (out[key] != sd[key]).any(dim=1).nonzero().flatten()
        spans.add((int(changed.min()), int(changed.max()) + 1))
    rows["to_k_only_rows_changed"] = sorted(spans)
    rows["to_k_expected_rows"] = [q, q + kv]
    ok = (spans == {(q, q + kv)} and all(r["unmatched"] == 0 for r in rows["formats"].values())
          and rows["formats"]["peft"]["max_error_bf16_ulp"] < 0.51)  # fp32 sum, one rounding to bf16
    rows["ok"] = bool(ok)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device).replace(" ", "-") if device.type == "cuda" else "cpu"
    (out_dir / f"lora-full-size-{name}{'-quick' if args.quick else ''}.json").write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

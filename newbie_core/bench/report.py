"""Benchmark results → a markdown table (for the README) and a PNG bar chart (drawn with Pillow)."""
from __future__ import annotations

import json
import re
from pathlib import Path

TARGETS = {"staged_bf16": 7.5, "fp8": 4.0, "lowvram": 2.0}  # GiB, peak allocated, whole pipeline


def slug(label: str) -> str:
    """`label` (a GPU name, a ComfyUI version) as a lower-case file-name part: runs of anything but letters,
    digits and dots become one dash."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", label).strip("-").lower()


def device_label(device) -> str:
    """The GPU's name for a CUDA `device` (a benchmark result's device field), else "cpu"."""
    import torch

    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def benchmark_parser(doc: str):
    """The kernel benchmarks' command line: `--out` (results folder), `--quick` (tiny shapes, a CPU plumbing
    check) and `--device`; described by the first line of `doc`."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda")
    return p


def write_results(out_dir: str | Path, stem: str, result, markdown_text: str) -> Path:
    """Write a benchmark's `<stem>.json` and `<stem>.md` under `out_dir` (created); returns the JSON's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    (out / f"{stem}.md").write_text(markdown_text, encoding="utf-8")
    return out / f"{stem}.json"


def check_parity(result: dict) -> list[str]:
    """Names of every measurement whose parity check failed."""
    failed = []
    for section in ("dit_step", "generation"):
        for name, r in (result.get(section) or {}).items():
            if r.get("within_tolerance") is False:
                failed.append(f"{section}.{name}: rel L2 {r.get('rel_l2_diff')} > {r.get('tolerance', 'tolerance')}")
    return failed


def _f(x, nd=3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def markdown(result: dict) -> str:
    """The results as markdown tables: DiT step variants, whole generations, extra points, VRAM growth."""
    env = result["environment"]
    lines = [f"**{env['gpu']}**, torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, "
             f"{env['date']}. Random full-size weights; memory in GiB (2^30 B) from torch's allocator.", ""]
    steps = result.get("dit_step") or {}
    if steps:
        naive = steps["naive_eager_bf16"]["seconds"]
        lines += ["| DiT step (CFG batch 2, 1024², 256 caption tokens) | s / step | × naive | peak alloc | rel. diff |",
                  "|---|---|---|---|---|"]
        for name, r in steps.items():
            if "seconds" not in r:
                continue
            diff = r.get("rel_l2_diff")
            lines.append(f"| {name} | {_f(r['seconds'], 4)} | {_f(r['seconds'] / naive, 2)} | "
                         f"{_f(r['peak_alloc_gib'], 2)} | {'–' if diff is None else f'{diff:.1e}'} |")
        lines.append("")
    gens = result.get("generation") or {}
    if gens:
        lines += ["| mode (1024², CFG 4, 28 steps) | end-to-end s | × naive | text peak | DiT peak | VAE peak | "
                  "peak (resv) | latent rel. diff (naive: vs fp32) |", "|---|---|---|---|---|---|---|---|"]
        naive_s = gens["naive"]["seconds"]
        for name, r in gens.items():
            st = r["stages"]
            diff = r.get("rel_l2_diff")
            lines.append(
                f"| {name} | {_f(r['seconds'], 2)} | {_f(r['seconds'] / naive_s, 2)} | "
                f"{_f(st.get('text', {}).get('peak_alloc_gib'), 2)} | {_f(st['dit']['peak_alloc_gib'], 2)} | "
                f"{_f(st['vae']['peak_alloc_gib'], 2)} | {_f(r['peak_alloc_gib'], 2)} ({_f(r['peak_resv_gib'], 2)}) | "
                f"{'–' if diff is None else f'{diff:.1e}'} |")
        lines.append("")
    points = result.get("points") or {}
    for name, r in points.items():
        lines.append(f"- staged bf16 at {name}: {_f(r['seconds'], 2)} s, peak {_f(r['peak_alloc_gib'], 2)} GiB "
                     f"(DiT stage {_f(r['stages']['dit']['peak_alloc_gib'], 2)} GiB)")
    growth = result.get("vram_growth")
    if growth:
        lines.append(f"- {growth['generations']} consecutive generations with a purge after each: allocated VRAM "
                     f"growth {growth['growth_mib']} MiB")
    return "\n".join(lines) + "\n"


def bar_panel(draw, x0: int, y0: int, title: str, rows: list[tuple[str, float, float | None]], color,
              vmax: float | None = None, width: int = 360, row_h: int = 44, label_x: int | None = None,
              fmt: str = "{:.2f}") -> None:
    """One horizontal bar chart on a Pillow `draw`: `title` at (x0, y0), then a bar per (label, value, target)
    row (a red line at the target when given); labels at `label_x` (None: no labels). `vmax`: the full bar."""
    draw.text((x0, y0), title, fill="black")
    vmax = vmax or max([v for _, v, _ in rows] + [t for *_, t in rows if t is not None] + [1e-9])
    for i, (label, value, target) in enumerate(rows):
        y = y0 + 24 + row_h * i
        if label_x is not None:
            draw.text((label_x, y + 8), label, fill="black")
        w = int(width * value / vmax)
        draw.rectangle([x0, y, x0 + w, y + row_h - 16], fill=color)
        draw.text((x0 + w + 4, y + 8), fmt.format(value), fill="black")
        if target is not None:
            tx = x0 + int(width * target / vmax)
            draw.line([tx, y - 2, tx, y + row_h - 14], fill=(200, 0, 0), width=2)


def chart(result: dict, path: Path) -> None:
    """Two bar charts side by side: peak VRAM per mode (with targets) and end-to-end seconds per mode."""
    from PIL import Image, ImageDraw

    gens = result.get("generation") or {}
    img = Image.new("RGB", (1000, 70 + 44 * max(1, len(gens))), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"NewBie staged — {result['environment']['gpu']} — 1024², CFG 4, 28 steps", fill="black")
    bar_panel(d, 130, 32, "peak allocated VRAM (GiB)",
              [(n, r["peak_alloc_gib"], TARGETS.get(n)) for n, r in gens.items()], (70, 110, 200), label_x=10)
    bar_panel(d, 570, 32, "end-to-end seconds", [(n, r["seconds"], None) for n, r in gens.items()], (220, 130, 50))
    img.save(path)


def write_reports(result: dict, md_path: Path, png_path: Path) -> None:
    """Write the markdown table and the PNG chart."""
    md_path.write_text(markdown(result))
    chart(result, png_path)

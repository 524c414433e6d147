"""The in-ComfyUI results of one GPU as one PNG: the DiT step under VRAM budgets (× its full load, per ComfyUI
version and way) and each workflow's whole-graph peak per memory setting (with the issue's targets).

    python benchmarks/comfy_charts.py --results benchmarks/results --gpu nvidia-h200

Reads `comfy-dit-placement-<gpu>-comfyui-<version>.json` and `comfy-workflows-<gpu>-comfyui-<version>*.json`
(what `comfy_dit_placement.py` and `comfy_workflow_bench.py` write) and writes `comfy-<gpu>.png` beside them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]
from newbie_core.bench.report import bar_panel  # noqa: E402

PEAK_TARGETS = {"newbie_basic_t2i": 7.5, "newbie_low_vram": 4.0}  # GiB, whole graph (issue 11)
STEP_TARGET = 1.3  # × full load, DiT under 2 GiB


def placement_rows(results: Path, gpu: str) -> list[tuple[str, float, float | None]]:
    """(label, s/step ÷ full load, target) for every budgeted row of every placement result of `gpu`."""
    rows = []
    for path in sorted(results.glob(f"comfy-dit-placement-{gpu}-comfyui-*.json")):
        r = json.loads(path.read_text())
        full = next(x["seconds"] for x in r["rows"] if x["budget_gib"] == "full" and "seconds" in x)
        for x in r["rows"]:
            if "seconds" in x and x["way"] != "comfyui-full":  # that one is 1 by definition
                target = STEP_TARGET if x["budget_gib"] != "full" and float(x["budget_gib"]) < 2 else None
                budget = "full load" if x["budget_gib"] == "full" else f"{x['budget_gib']} GiB"
                rows.append((f"{r['comfyui']} {x['way']} {budget}", x["seconds"] / full, target))
    return rows


def workflow_rows(results: Path, gpu: str) -> list[tuple[str, float, float | None]]:
    """(label, whole-graph peak GiB, target) per workflow and memory setting for `gpu`."""
    rows = []
    for path in sorted(results.glob(f"comfy-workflows-{gpu}-comfyui-*.json")):
        if "before" in path.name:
            continue  # superseded runs stay as records, not in the chart
        for r in json.loads(path.read_text()):
            setting = r.get("comfy_args") or (f"{r['card_gib']:g} GB card" if r.get("card_gib") else "default")
            if r.get("keep_loaded"):
                setting += ", keep_loaded"
            for name, w in r["workflows"].items():
                if "peak_alloc_gib" in w:
                    rows.append((f"{r['comfyui']} {setting} {name.removeprefix('newbie_')}", w["peak_alloc_gib"],
                                 PEAK_TARGETS.get(name)))
    return rows


def draw(results: Path, gpu: str) -> Path:
    """Write `comfy-<gpu>.png` under `results`; returns its path."""
    from PIL import Image, ImageDraw

    steps, peaks = placement_rows(results, gpu), workflow_rows(results, gpu)
    n = max(len(steps), len(peaks), 1)
    img = Image.new("RGB", (1180, 80 + 26 * n), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"NewBie inside ComfyUI - {gpu} - 1024x1024, bf16 unless the workflow says otherwise; red: target",
               fill="black")
    bar_panel(d, 250, 36, "DiT s/step / full load (under a VRAM budget)", steps, (70, 110, 200), row_h=26,
              width=260, label_x=10, vmax=max([s for _, s, _ in steps] + [STEP_TARGET]))
    bar_panel(d, 850, 36, "workflow peak allocated GiB", peaks, (220, 130, 50), row_h=26, width=240, label_x=560)
    out = results / f"comfy-{gpu}.png"
    img.save(out)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--gpu", default="nvidia-h200", help="the device part of the result file names")
    args = p.parse_args()
    print(draw(Path(args.results), args.gpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())

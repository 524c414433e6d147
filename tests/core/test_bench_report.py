"""The benchmark's report: parity failures are caught, tables and chart are written from the JSON."""
from newbie_core.bench.report import check_parity, markdown, write_reports


def _result(ok: bool) -> dict:
    step = {"seconds": 0.2, "peak_alloc_gib": 7.0}
    gen = {"seconds": 6.0, "peak_alloc_gib": 7.1, "peak_resv_gib": 7.3,
           "stages": {s: {"seconds": 1.0, "peak_alloc_gib": 2.0, "peak_resv_gib": 2.0} for s in ("text", "dit", "vae")}}
    return {"environment": {"gpu": "Test GPU", "torch": "x", "cuda": "y", "transformers": "z", "date": "d"},
            "dit_step": {"naive_eager_bf16": dict(step), "tolerances": {"bf16_fast_path_tol": 0.04},
                         "compiled_bf16": dict(step, seconds=0.12, rel_l2_diff=0.01 if ok else 0.09, tolerance=0.04,
                                               within_tolerance=ok)},
            "generation": {"naive": dict(gen), "lowvram": dict(gen, peak_alloc_gib=1.0, rel_l2_diff=0.02)},
            "vram_growth": {"generations": 20, "growth_mib": 0.0}}


def test_parity_failures_are_reported_by_name():
    assert check_parity(_result(True)) == []
    failed = check_parity(_result(False))
    assert len(failed) == 1 and failed[0].startswith("dit_step.compiled_bf16")


def test_markdown_and_chart_are_written(tmp_path):
    md = markdown(_result(True))
    assert "| compiled_bf16 | 0.1200 | 0.60 |" in md and "tolerances" not in md
    assert "| lowvram | 6.00 | 1.00 |" in md and "growth 0.0 MiB" in md
    write_reports(_result(True), tmp_path / "r.md", tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comfy_chart_reads_both_benchmarks_results_and_marks_the_targets(tmp_path):
    """benchmarks/comfy_charts.py: one bar per budgeted/native placement row (÷ the full load, the 1.3× target
    only under 2 GiB) and per workflow peak (targets for the basic and low-VRAM workflows); superseded runs
    are left out; the PNG is written."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "comfy_charts", Path(__file__).resolve().parents[2] / "benchmarks" / "comfy_charts.py")
    charts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(charts)
    rows = [{"way": "comfyui-full", "budget_gib": "full", "seconds": 0.2},
            {"way": "engine-stream", "budget_gib": 3.0, "seconds": 0.2},
            {"way": "engine-stream", "budget_gib": 1.0, "seconds": 0.5},
            {"way": "native", "budget_gib": "full", "seconds": 0.1},
            {"way": "native", "budget_gib": 3.0, "skipped": "no native model"}]
    (tmp_path / "comfy-dit-placement-gpu-comfyui-9.9.json").write_text(json.dumps({"comfyui": "9.9", "rows": rows}))
    run = {"comfyui": "9.9", "comfy_args": "", "card_gib": 8, "workflows": {
        "newbie_basic_t2i": {"peak_alloc_gib": 7.0}, "newbie_low_vram": {"peak_alloc_gib": 3.9},
        "newbie_lora": {"ok": False}}}
    (tmp_path / "comfy-workflows-gpu-comfyui-9.9-card8gb.json").write_text(json.dumps([run]))
    (tmp_path / "comfy-workflows-gpu-comfyui-9.9-before-x.json").write_text(json.dumps([run]))
    assert charts.placement_rows(tmp_path, "gpu") == [("9.9 engine-stream 3.0 GiB", 1.0, None),
                                                      ("9.9 engine-stream 1.0 GiB", 2.5, 1.3),
                                                      ("9.9 native full load", 0.5, None)]
    assert charts.workflow_rows(tmp_path, "gpu") == [("9.9 8 GB card basic_t2i", 7.0, 7.5),
                                                     ("9.9 8 GB card low_vram", 3.9, 4.0)]
    png = charts.draw(tmp_path, "gpu")
    assert png.name == "comfy-gpu.png" and png.read_bytes()[:4] == b"\x89PNG"

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

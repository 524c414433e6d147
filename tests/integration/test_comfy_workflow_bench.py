"""The in-ComfyUI workflow benchmark (benchmarks/comfy_workflow_bench.py) runs end to end in its quick CPU mode:
the bundled workflows through ComfyUI's own PromptExecutor, in-process, on the tiny models written in ComfyUI's
layout by the same writer the full-size GPU run uses; the basic workflow's latent equals the CLI's (fp32)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

from comfy_server import REPO_ROOT


def test_workflow_benchmark_quick_mode_runs_end_to_end(comfy_dir, tmp_path):
    env = dict(os.environ, COMFYUI_DIR=str(comfy_dir))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "comfy_workflow_bench.py"), "--quick",
                           "--device", "cpu", "--out", str(tmp_path), "--queue", "2"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = [json.loads(p.read_text()) for p in tmp_path.glob("comfy-workflows-*-quick.json")]
    run = result[0]
    assert run["device"] == "cpu" and run["comfyui"] not in ("?", None)
    flows = run["workflows"]
    assert {"newbie_basic_t2i", "newbie_low_vram", "newbie_precision_swap", "newbie_xml_multi_character",
            "newbie_comfyui_template_ksampler"} <= set(flows)
    assert "native_ksampler" not in flows  # the native model's detection wants the full-size DiT: GPU runs only
    for name, w in flows.items():
        assert w["ok"], (name, w)
        # our sampler's step callback, or ComfyUI's progress hook for the core-KSampler graph
        sampler = ":KSampler" if name == "newbie_comfyui_template_ksampler" else ":NewBieDiTSampler"
        assert any(k.endswith(sampler) for k in w["node_s"]) and w["dit_s_per_step"] > 0, (name, w)
        assert w["kept_loaded"] == [], (name, w)  # the bundled workflows release their models after each stage
    # Same engine, same files: the ComfyUI run equals the CLI's. Checked in fp32 (run["parity_fp32"]), where a real
    # difference (another setting, precision or prompt: >= 1e-2 on these models) stands far above the rounding of
    # another summation order. In bf16 one CPU gave 0.025 once (not reproduced in 40 runs here): bf16 rounding of a
    # different GEMM kernel is as large as switching the whole DiT to fp32 (0.025), so bf16 is only checked for
    # gross errors (no system prompt: 0.38); each figure says which stage differs.
    basic = flows["newbie_basic_t2i"]
    if basic["latent_rel_l2_vs_cli"] != 0.0:  # shown in the CI summary, so the next occurrence says where it came from
        figures = {k: v for k, v in basic.items() if "rel_l2" in k}
        warnings.warn(f"bf16 latent of the basic workflow differs from the CLI's: {figures}")
    assert basic["cli_repeat_rel_l2"] == 0.0  # the CLI's sampling repeats itself exactly
    parity = run["parity_fp32"]
    assert parity["ok"] and parity["precision"] == {"dit": "fp32", "text": "fp32", "vae": "fp32"}, parity
    for key in ("text_rel_l2_vs_cli", "latent_rel_l2_vs_cli_same_text", "latent_rel_l2_vs_cli"):
        assert parity[key] < 1e-4, (key, parity)
        assert basic[key] < 0.1, (key, basic)
    assert run["after_free"]["free_alloc_gib"] == 0.0 and "purge_rss_mib" in run["after_free"]
    assert run["queue"]["n"] == 2 and len(run["queue"]["rss_mib"]) == 2
    assert (tmp_path / next(tmp_path.glob("*-quick.json")).name.replace(".json", ".md")).is_file()


def test_native_graph_is_the_core_ksampler_graph_on_comfyuis_own_loader():
    """`native_ksampler`: the same graph with the DiT loaded by UNETLoader from the same file; nothing else differs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("comfy_workflow_bench", REPO_ROOT / "benchmarks" / "comfy_workflow_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    api = {"1": {"class_type": "NewBieDiTLoader", "inputs": {"dit_name": "dit.safetensors", "precision": "bf16"}},
           "2": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "steps": 28}}}
    native = bench.native_prompt(api)
    assert native["1"] == {"class_type": "UNETLoader", "inputs": {"unet_name": "dit.safetensors", "weight_dtype": "default"}}
    assert native["2"] == api["2"] and api["1"]["class_type"] == "NewBieDiTLoader"  # the input is left as it was


def test_workflow_benchmark_keep_loaded_runs_the_graph_with_every_model_kept(comfy_dir, tmp_path):
    """--keep-loaded: the comparison row with keep_loaded on in Text Encode and the Sampler (named in the file)."""
    env = dict(os.environ, COMFYUI_DIR=str(comfy_dir))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "comfy_workflow_bench.py"), "--quick",
                           "--device", "cpu", "--out", str(tmp_path), "--queue", "0", "--no-cli", "--keep-loaded",
                           "--workflows", "newbie_basic_t2i"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("comfy-workflows-*-keeploaded-quick.json")
    run = json.loads(path.read_text())[0]
    basic = run["workflows"]["newbie_basic_t2i"]
    assert run["keep_loaded"] is True and basic["ok"]
    assert basic["kept_loaded"] == ["NewBieDiTSampler", "NewBieTextEncode"]
    assert "keep_loaded on" in path.with_suffix(".md").read_text()


def test_dit_placement_benchmark_quick_mode_matches_the_full_load(comfy_dir, tmp_path):
    """ComfyUI's partial load and the engine's block streaming give the full-load DiT output at every budget."""
    env = dict(os.environ, COMFYUI_DIR=str(comfy_dir))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "comfy_dit_placement.py"), "--quick",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = [json.loads(p.read_text()) for p in tmp_path.glob("comfy-dit-placement-*-quick.json")]
    ways = [r["way"] for r in result["rows"]]
    assert ways.count("engine-stream") == ways.count("comfyui-partial") == 3
    assert ways[:3] == ["comfyui-full (auto)", "comfyui-full (sdpa)", "comfyui-full (comfyui)"]
    assert result["attention"] == ["auto", "sdpa", "comfyui"]
    # every row against the first: the pack's attention on the CPU is the same SDPA call whatever the choice or
    # placement; ComfyUI's own attention (other arithmetic: KV heads expanded, another layout) is only close in bf16
    rest = {r["way"] + str(r["budget_gib"]): r["rel_l2_diff"] for r in result["rows"][1:]}
    comfy_attention = rest.pop("comfyui-full (comfyui)full")
    assert set(rest.values()) == {0.0}, rest
    assert 0.0 <= comfy_attention < 0.1


def test_engine_step_benchmark_quick_mode_compares_both_hosts(comfy_dir, tmp_path):
    """benchmarks/comfy_engine_step.py: the CLI host's and the ComfyUI host's DiT give the same eager output in
    bf16 and fp8; the report holds every variant and the fp8 quality part (saved after each part)."""
    env = dict(os.environ, COMFYUI_DIR=str(comfy_dir))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "comfy_engine_step.py"), "--quick",
                           "--steps", "4", "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = [json.loads(p.read_text()) for p in tmp_path.glob("comfy-engine-step-*-quick.json")]
    rows = {r["variant"]: r for r in result["dit_step"]}
    assert set(rows) == {"bf16", "fp8_e4m3fn", "bf16 compiled", "fp8_e4m3fn compiled"}
    assert rows["bf16"]["comfyui_vs_cli_rel_l2"] == rows["fp8_e4m3fn"]["comfyui_vs_cli_rel_l2"] == 0.0
    q = result["fp8_final_latent_vs_bf16"]
    assert 0 < q["ours_fp8"]["rel_l2_diff"] < q["plain_e4m3_cast"]["rel_l2_diff"]


def test_partial_load_benchmark_quick_mode_fp8_matches_the_full_load(comfy_dir, tmp_path):
    """benchmarks/comfy_partial_load.py --precision fp8_e4m3fn: ComfyUI loads part of the fp8 DiT and casts the
    rest per layer; every budget gives the fully loaded output exactly (the GPU run of the same script checks the
    fused gate's cast-per-call path)."""
    env = dict(os.environ, COMFYUI_DIR=str(comfy_dir))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "comfy_partial_load.py"), "--quick",
                           "--precision", "fp8_e4m3fn", "--budgets", "1,4", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("comfy-partial-load-*-fp8_e4m3fn-comfyui-*-quick.json")
    result = json.loads(path.read_text())
    assert result["precision"] == "fp8_e4m3fn"
    full, *partial = result["rows"]
    assert full["budget_gib"] == "full" and len(partial) == 2
    for row in partial:
        assert 0 < row["loaded_bytes"] < row["model_bytes"], row  # a real partial load
        assert row["rel_l2_diff"] == 0.0 and row["max_abs_diff"] == 0.0, row
    assert partial[0]["loaded_bytes"] < partial[1]["loaded_bytes"]

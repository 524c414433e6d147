"""Both CONDITIONING directions against the ComfyUI-NewBie 0.4.0 fork (native NewBie model), run in its own Python.

The fork's tree: $NEWBIE_COMFYUI_040, else the second ComfyUI host (scripts/find_comfyui.py); its venv's Python:
$NEWBIE_PYTHON_040, else that host's venv made by scripts/setup.sh (.venv-comfyui-<version>). Skipped cleanly when
either is absent. The probe (fork_probe.py) runs in a subprocess because a test session may already have imported
another ComfyUI (0.3.64) in-process.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _second_host() -> tuple[Path, Path]:
    """(fork tree, its venv's python): the environment's, else scripts/setup.sh's second host."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_newbie_find_comfyui", REPO / "scripts" / "find_comfyui.py")
    finder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finder)
    tree = Path(os.environ.get("NEWBIE_COMFYUI_040") or finder.find_second_comfyui() or "/work/ComfyUI-0.4.0")
    default_py = REPO / finder.second_venv_name(tree) / "bin" / "python" if tree.is_dir() else REPO / ".venv-040"
    return tree, Path(os.environ.get("NEWBIE_PYTHON_040") or default_py)


FORK, PYTHON = _second_host()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not (FORK / "comfy" / "ldm" / "newbie").is_dir():
        pytest.skip(f"no ComfyUI-NewBie 0.4.0 tree at {FORK} (set NEWBIE_COMFYUI_040)")
    if not PYTHON.is_file():
        pytest.skip(f"no Python for the 0.4.0 fork at {PYTHON} (set NEWBIE_PYTHON_040)")
    out = tmp_path_factory.mktemp("fork040") / "report.json"
    proc = subprocess.run([str(PYTHON), str(Path(__file__).with_name("fork_probe.py")), str(FORK), str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_it_is_the_fork_with_its_native_newbie_model(report):
    assert report["comfyui_version"].startswith("0.4")
    assert report["native_class"] == "NewBieImage" and report["native_dit_class"] == "NewBieNextDiT_CLIP"
    # our tiny DiT's official keys fit it; the fork adds an image-pooled embedder NewBie-Exp0.1 has no weights for
    assert not report["unexpected_keys"]
    assert report["missing_keys"] and all(k.startswith("clip_img_pooled_embedder.") for k in report["missing_keys"])


def test_our_conditioning_drives_the_native_model(report):
    """Same weights, same core sampler: the native model with our CONDITIONING gives our model's result; without
    the clip_text_pooled key (upstream's pooled_output only) the fork's model ignores the Jina vector."""
    assert report["finite"]
    assert report["native_vs_ours_rel"] < 1e-4
    assert report["native_without_clip_text_pooled_rel"] > 1e-3


def test_native_conditioning_layouts_drive_our_sampler(report):
    assert report["sampler_fork_layout_equal"] and report["sampler_upstream_layout_equal"]

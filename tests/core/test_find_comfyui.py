"""scripts/find_comfyui.py: the ComfyUI trees ("hosts") the tests and scripts/setup.sh use."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "find_comfyui.py"


@pytest.fixture()
def finder():
    spec = importlib.util.spec_from_file_location("_find_comfyui_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_tree(path: Path, version: str | None) -> Path:
    (path / "comfy").mkdir(parents=True)
    (path / "main.py").write_text("")
    (path / "nodes.py").write_text("")
    if version:
        (path / "comfyui_version.py").write_text(f'# generated\n__version__ = "{version}"\n')
    return path


def test_version_and_venv_name(finder, tmp_path):
    tree = fake_tree(tmp_path / "c", "0.4.0")
    assert finder.comfyui_version(tree) == "0.4.0"
    assert finder.second_venv_name(tree) == ".venv-comfyui-0.4.0"
    assert finder.comfyui_version(fake_tree(tmp_path / "old", None)) == "unknown"


def test_second_host_from_env(finder, tmp_path, monkeypatch):
    one, two = fake_tree(tmp_path / "one", "0.3.64"), fake_tree(tmp_path / "two", "0.4.0")
    monkeypatch.setenv("COMFYUI_DIR", str(one))
    monkeypatch.setenv("COMFYUI_DIR_2", str(two))
    assert (finder.find_comfyui(), finder.find_second_comfyui()) == (one.resolve(), two.resolve())
    monkeypatch.setenv("COMFYUI_DIR_2", str(one))  # the same tree twice is one host
    assert finder.find_second_comfyui() is None
    monkeypatch.setenv("COMFYUI_DIR_2", "")  # explicitly none
    assert finder.find_second_comfyui() is None
    monkeypatch.setenv("COMFYUI_DIR_2", str(tmp_path / "nothing-here"))
    assert finder.find_second_comfyui() is None


def test_command_line(tmp_path):
    one, two = fake_tree(tmp_path / "one", "0.3.64"), fake_tree(tmp_path / "two", "0.4.0")
    env = {"COMFYUI_DIR": str(one), "COMFYUI_DIR_2": str(two), "PATH": "/usr/bin:/bin"}

    def run(*args):
        return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True)

    assert run().stdout.strip() == str(one.resolve())
    assert run("--second").stdout.strip() == str(two.resolve())
    assert run("--venv").stdout.strip() == ".venv-comfyui-0.4.0"
    env["COMFYUI_DIR_2"] = ""
    assert run("--second").returncode == 1

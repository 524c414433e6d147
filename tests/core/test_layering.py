"""newbie_core is pure PyTorch: no module of it imports ComfyUI (checked on every module, by import and by source)."""
from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import newbie_core

COMFY_NAMES = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "latent_preview", "nodes", "server", "execution")


def all_modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages(newbie_core.__path__, "newbie_core.")]


def test_no_module_source_imports_comfyui():
    root = Path(newbie_core.__file__).parent
    offenders = []
    files = sorted(root.rglob("*.py"))
    assert len(files) > 30
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{f.relative_to(root)}: {n}" for n in names if n.split(".")[0] in COMFY_NAMES]
    assert offenders == []


def test_importing_every_module_loads_no_comfyui():
    """Every module imported in a fresh interpreter: none of ComfyUI's top-level modules appears."""
    mods = [m for m in all_modules() if not m.endswith("__main__")]
    assert "newbie_core.stages" in mods and "newbie_core.host" in mods
    code = (f"import importlib, sys\nfor m in {mods!r}:\n    importlib.import_module(m)\n"
            f"print(sorted(k for k in sys.modules if k.split('.')[0] in {COMFY_NAMES!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"

"""Find the ComfyUI source trees the tests run against ("hosts"), or print nothing (exit 1) when there is none.

Host 1 (the tree the tests import in-process and start servers from), looked up in order: $COMFYUI_DIR; the
ComfyUI tree this pack sits in (ComfyUI/custom_nodes/<pack>); then the conventional places a developer keeps
one ($HOME/ComfyUI, /work/ComfyUI).
Host 2 (optional, a newer ComfyUI; its node and server tests run again under its own venv): $COMFYUI_DIR_2, else
$HOME/ComfyUI-0.4.0 or /work/ComfyUI-0.4.0. Set COMFYUI_DIR_2= (empty) to run one host only.

    python scripts/find_comfyui.py            # host 1's path
    python scripts/find_comfyui.py --second   # host 2's path
    python scripts/find_comfyui.py --venv     # the venv name scripts/setup.sh gives host 2 (.venv-comfyui-<version>)

Shared by scripts/setup.sh and the tests (tests/integration/comfy_server.py, tests/nodes/conftest.py, tests/hosts.py).
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path


def is_comfyui_tree(path: Path) -> bool:
    """True when `path` looks like a ComfyUI source tree (main.py, nodes.py, comfy/)."""
    return (path / "main.py").is_file() and (path / "nodes.py").is_file() and (path / "comfy").is_dir()


def comfyui_version(path: str | os.PathLike) -> str:
    """The version a ComfyUI tree declares in its comfyui_version.py ("unknown" when it has none)."""
    try:
        text = (Path(path) / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    m = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    return m.group(1) if m else "unknown"


def find_comfyui() -> Path | None:
    """Host 1: the first ComfyUI tree found in the documented places, or None."""
    env = os.environ.get("COMFYUI_DIR")
    if env:
        return Path(env).resolve() if is_comfyui_tree(Path(env)) else None
    pack = Path(__file__).resolve().parent.parent
    candidates = [pack.parent.parent] if pack.parent.name == "custom_nodes" else []
    candidates += [Path.home() / "ComfyUI", Path("/work/ComfyUI")]
    for c in candidates:
        if is_comfyui_tree(c):
            return c.resolve()
    return None


def find_second_comfyui() -> Path | None:
    """Host 2: $COMFYUI_DIR_2 (empty = none), else ~/ComfyUI-0.4.0 or /work/ComfyUI-0.4.0; None when absent or
    when it is the same tree as host 1."""
    env = os.environ.get("COMFYUI_DIR_2")
    if env is not None:
        candidates = [Path(env)] if env else []
    else:
        candidates = [Path.home() / "ComfyUI-0.4.0", Path("/work/ComfyUI-0.4.0")]
    first = find_comfyui()
    for c in candidates:
        if is_comfyui_tree(c) and (first is None or c.resolve() != first):
            return c.resolve()
    return None


def second_venv_name(tree: str | os.PathLike) -> str:
    """The venv folder (under the repository root) that scripts/setup.sh makes for a second host tree."""
    return f".venv-comfyui-{comfyui_version(tree)}"


if __name__ == "__main__":
    arg = sys.argv[1] if len(sys.argv) > 1 else ""
    if arg == "--version-of":  # the version a given tree declares (for messages)
        print(comfyui_version(sys.argv[2]), end=" ")
        sys.exit(0)
    found = find_comfyui() if arg == "" else find_second_comfyui()
    if found is None:
        sys.exit(1)
    print(second_venv_name(found) if arg == "--venv" else found)

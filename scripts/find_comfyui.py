"""Print the path of a ComfyUI source tree, or nothing (exit 1) if none is found.

Looked up, in order: $COMFYUI_DIR; the ComfyUI tree this pack sits in (ComfyUI/custom_nodes/<pack>);
then the conventional places a developer keeps one ($HOME/ComfyUI, /work/ComfyUI).
Shared by scripts/setup.sh and the integration tests (tests/integration/comfy_server.py).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def is_comfyui_tree(path: Path) -> bool:
    """True when `path` looks like a ComfyUI source tree (main.py, nodes.py, comfy/)."""
    return (path / "main.py").is_file() and (path / "nodes.py").is_file() and (path / "comfy").is_dir()


def find_comfyui() -> Path | None:
    """Return the first ComfyUI tree found in the documented places, or None."""
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


if __name__ == "__main__":
    found = find_comfyui()
    if found is None:
        sys.exit(1)
    print(found)

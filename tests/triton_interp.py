"""Triton's CPU interpreter for the kernel tests on machines without a GPU (test code only).

Triton comes importable, or installed aside (`pip install --target DIR triton`) in $NEWBIE_TRITON_SITE or where
scripts/setup.sh puts it (.triton-interp). `run_interpreted(code)` runs a snippet with TRITON_INTERPRET=1 in a
fresh interpreter (the flag is read at import) and returns the JSON its last output line holds.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_SETUP_SITE = REPO / ".triton-interp"
TRITON_SITE = os.environ.get("NEWBIE_TRITON_SITE", "") or (str(_SETUP_SITE) if (_SETUP_SITE / "triton").is_dir() else "")
HAS_TRITON = bool(TRITON_SITE) or importlib.util.find_spec("triton") is not None
NO_TRITON = "needs Triton (importable, or a target dir named by NEWBIE_TRITON_SITE)"


def run_interpreted(code: str, timeout: int = 300):
    """Run `code` under Triton's interpreter in the repo root (importable); the JSON of its last stdout line."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [TRITON_SITE, str(REPO)])))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])

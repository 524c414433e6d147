"""The prompt-enhance GPU benchmark's CPU smoke mode: runs without diffusers, measures every requested mode through
the product's placement and decoder, and writes JSON + markdown named after the device."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BLOCK_DIFFUSERS = "import sys; sys.modules['diffusers'] = None; import runpy; "


def test_quick_cpu_run_without_diffusers(tmp_path):
    modes = "bf16 table-device dynamic,fp8_e4m3fn table-cpu dynamic"
    code = (BLOCK_DIFFUSERS + "sys.argv = ['enhance', '--quick', '--device', 'cpu', '--out', %r, '--modes', %r]; "
            "runpy.run_module('newbie_core.bench.enhance', run_name='__main__')") % (str(tmp_path), modes)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (js,) = tmp_path.glob("enhance-*.json")
    result = json.loads(js.read_text())
    assert [m["name"] for m in result["modes"]] == modes.split(",")
    for m in result["modes"]:
        assert "error" not in m and m["tokens_per_s"] > 0 and 0 < m["first_token_s"] < m["seconds_per_run"]
    assert result["config"]["quick"] and result["environment"]["device"]
    md = js.with_suffix(".md").read_text()
    assert result["environment"]["device"] in md.splitlines()[0] and "| bf16 table-device dynamic |" in md

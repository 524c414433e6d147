"""Packaging that keeps a ComfyUI install safe: no torch in what ComfyUI-Manager / the registry install, torch in
the `torch` extra that scripts/setup.sh installs; workflows/ kept (the template folder ComfyUI serves)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[2]


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r.strip(), maxsplit=1)[0].lower() for r in reqs if r.strip()}


def test_base_dependencies_and_requirements_txt_never_name_torch():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [ln for ln in (REPO / "requirements.txt").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for where, names in (("[project].dependencies", _names(meta["dependencies"])), ("requirements.txt", _names(reqs))):
        assert not names & {"torch", "torchvision", "torchaudio"}, f"{where} would replace ComfyUI's torch: {names}"
    assert _names(meta["optional-dependencies"]["torch"]) == {"torch"}


def test_setup_installs_the_torch_extra():
    script = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert re.search(r'-e "\.\[[^\]]*\btorch\b[^\]]*\]"', script), "setup.sh must install the [torch] extra"


def test_workflows_folder_is_kept():
    files = list((REPO / "workflows").glob("*.json"))
    assert len(files) >= 5 and (REPO / "workflows" / "newbie_basic_t2i.json") in files

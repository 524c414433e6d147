"""Shared fixtures: one tiny model set per test session, written through the product's own make-tiny path."""
from __future__ import annotations

import pytest

pytest_plugins = ["hosts"]  # tests/hosts.py: the node and integration tests also run on a second ComfyUI host


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{name: path} of the tiny model set (HF layout under root/hf, ComfyUI single files under root/comfyui)."""
    from newbie_core.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    paths = make_tiny(root)
    paths["root"] = root
    return paths

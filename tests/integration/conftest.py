"""Integration fixtures: one real ComfyUI server per test session (see comfy_server.py).

- `comfy_server`: the server with this pack symlinked into custom_nodes/, no models. Core-only tests use it.
- `comfy`: the same server with the tiny random-weight models of `newbie_core.tiny.make_tiny` placed in
  models/ under the names users download (folder lists refresh on the fly, so no second server is needed).

Without a ComfyUI tree ($COMFYUI_DIR, the tree this pack sits in, ~/ComfyUI, /work/ComfyUI) every test here
is skipped with one summary line.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from comfy_server import ComfyServer, find_comfyui, pack_node_ids

NO_COMFY = "no ComfyUI tree: set COMFYUI_DIR=... (see README)"
COMFY_DIR = find_comfyui()


def pytest_runtest_setup(item):
    # Raised from a hook (not a fixture), so pytest reports this line for every test: ONE summary line.
    # (A module-level skip here would break `pytest tests/integration`, where this is an initial conftest.)
    if COMFY_DIR is None:
        pytest.skip(NO_COMFY)


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    return COMFY_DIR


@pytest.fixture(scope="session")
def comfy_server(comfy_dir):
    srv = ComfyServer(comfy_dir)
    try:
        srv.start()
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture(scope="session")
def pack_ids(comfy_server) -> dict:
    """pack_node_ids() of the pack under test, computed once per session (it imports the pack in a subprocess)."""
    return pack_node_ids(comfy_server.comfy_dir, comfy_server.pack_dir)


def tiny_model_files(root: Path) -> dict[str, Path]:
    """{"<models folder>/<file>": source} for the ComfyUI single files make_tiny writes under root/comfyui."""
    from newbie_core.tiny import COMFY_DIT_NAME, COMFY_GEMMA_NAME, COMFY_JINA_NAME, COMFY_LORA_NAME, COMFY_VAE_NAME

    c = root / "comfyui"
    return {
        f"diffusion_models/{COMFY_DIT_NAME}": c / "diffusion_models" / COMFY_DIT_NAME,
        f"text_encoders/{COMFY_GEMMA_NAME}": c / "text_encoders" / COMFY_GEMMA_NAME,
        f"text_encoders/{COMFY_JINA_NAME}": c / "text_encoders" / COMFY_JINA_NAME,
        f"vae/{COMFY_VAE_NAME}": c / "vae" / COMFY_VAE_NAME,
        f"loras/{COMFY_LORA_NAME}": c / "loras" / COMFY_LORA_NAME,
    }


@pytest.fixture(scope="session")
def comfy_tiny_files(request, tmp_path_factory) -> dict[str, Path]:
    """{"<models folder>/<file>": path} of the tiny ComfyUI single files.

    Reuses the session's shared tiny set (tests/conftest.py `tiny_models`, which has a "root") when there is one,
    else calls make_tiny itself."""
    try:
        try:
            root = Path(request.getfixturevalue("tiny_models")["root"])
        except (pytest.FixtureLookupError, KeyError, TypeError):
            from newbie_core.tiny import make_tiny

            root = tmp_path_factory.mktemp("tiny_comfy")
            make_tiny(root)
        files = tiny_model_files(root)
    except ImportError as e:
        pytest.fail(f"newbie_core.tiny.make_tiny is not usable yet ({e}); the integration tests that need "
                    f"tiny models cannot run until it is finished", pytrace=False)
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        pytest.fail(f"make_tiny({root}) did not write the ComfyUI single files: {missing}", pytrace=False)
    return files


@pytest.fixture(scope="session")
def comfy(comfy_server, comfy_tiny_files) -> ComfyServer:
    """The session server, with the tiny models in models/diffusion_models, text_encoders and vae."""
    comfy_server.place_models(comfy_tiny_files)
    return comfy_server

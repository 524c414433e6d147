"""Node-level tests: each node's `execute` called in-process, inside an in-process ComfyUI (CPU), on the tiny models.

Fixtures:
- `comfyui`: ComfyUI set up in this process once per session (`args.cpu = True` before `comfy.model_management`).
  A namespace with `mm` (comfy.model_management), `folder_paths` and `dir` (the ComfyUI tree).
- `pack`: this repository imported as a package the way ComfyUI's `load_custom_node` does, under a fixed module
  name whatever the checkout folder is called (CI clones into temp dirs with '-' or '.' in the name). Its
  `pack.nodes.*` and `pack.newbie_core.*` are the modules the nodes really use (monkeypatch those, not the
  top-level `newbie_core`, which is a second copy).
- `comfy_models`: the tiny model set (tests/conftest.py `tiny_models`) registered as ComfyUI's only
  `diffusion_models`, `text_encoders` and `vae` folders; {role: name as the loaders' combos show it}.
- `loaders`: calls the loader nodes with the tiny files.
- `dit`, `text_encoders`, `vae`: session-wide loaded tiny models (loader outputs), for tests that only use them.

Without a ComfyUI tree ($COMFYUI_DIR, the tree this pack sits in, ~/ComfyUI, /work/ComfyUI) every test here
is skipped with one summary line.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK_MODULE = "newbie_staged_pack_under_test"  # fixed: the checkout folder name may be no identifier at all
NO_COMFY = "no ComfyUI tree: set COMFYUI_DIR=... (see README)"


def _find_comfyui() -> Path | None:
    spec = importlib.util.spec_from_file_location("_newbie_find_comfyui", REPO / "scripts" / "find_comfyui.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.find_comfyui()


COMFY_DIR = _find_comfyui()


def pytest_runtest_setup(item):
    # Raised from a hook (not a fixture), so pytest reports this line for every test: ONE summary line.
    if COMFY_DIR is None:
        pytest.skip(NO_COMFY)


# ------------------------------------------------------------------------------------------- ComfyUI
@pytest.fixture(scope="session")
def comfyui():
    """ComfyUI in this process, CPU only (imported once; importing it again is a no-op)."""
    if str(COMFY_DIR) not in sys.path:
        sys.path.insert(0, str(COMFY_DIR))
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported, or it asserts CUDA
    import comfy.model_management as mm
    import folder_paths
    import nodes  # noqa: F401  (ComfyUI's nodes.py, as a server has it imported)

    assert mm.get_torch_device().type == "cpu", "comfy.model_management was imported before args.cpu was set"
    return types.SimpleNamespace(mm=mm, folder_paths=folder_paths, dir=COMFY_DIR)


def import_pack(name: str = PACK_MODULE):
    """Import the repository as package `name` from its __init__.py (ComfyUI's load_custom_node way)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        importlib.import_module(f"{name}.nodes")  # the nodes import newbie_core relatively (`..newbie_core`)
    except BaseException:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        raise
    return module


@pytest.fixture(scope="session")
def pack(comfyui):
    """The pack package; `pack.nodes.<module>` and `pack.newbie_core.<module>` are loaded."""
    module = import_pack()
    for sub in ("loaders", "text_encode", "sampler", "vae_decode", "memory_purge", "xml_prompt", "_comfy", "lora"):
        importlib.import_module(f"{PACK_MODULE}.nodes.{sub}")
    return module


# ---------------------------------------------------------------------------------------- model files
@pytest.fixture(scope="session")
def comfy_models(comfyui, tiny_models):
    """Register the tiny files as ComfyUI's model folders; return {role: name the loaders accept}.

    The three folder keys point only at the tiny set for the session (restored afterwards), so a developer's
    own models in the ComfyUI tree neither show up nor get loaded. HF folders (`text_encoder/`, `clip_model/`,
    `vae/`) sit under hf/, which is registered for `text_encoders` and `vae` too.
    """
    from newbie_core.tiny import COMFY_DIT_NAME, COMFY_GEMMA_NAME, COMFY_JINA_NAME, COMFY_VAE_NAME

    fp = comfyui.folder_paths
    root = Path(tiny_models["root"])
    c, hf = root / "comfyui", root / "hf"
    new = {"diffusion_models": [c / "diffusion_models"], "text_encoders": [c / "text_encoders", hf],
           "vae": [c / "vae", hf]}
    saved = {k: fp.folder_names_and_paths[k] for k in new}
    for key, dirs in new.items():
        fp.folder_names_and_paths[key] = ([str(d) for d in dirs], saved[key][1])
        fp.filename_list_cache.pop(key, None)
    try:
        yield {"dit": COMFY_DIT_NAME, "gemma": COMFY_GEMMA_NAME, "jina": COMFY_JINA_NAME, "vae": COMFY_VAE_NAME,
               "gemma_folder": "text_encoder/", "jina_folder": "clip_model/", "vae_folder": "vae/", "root": root}
    finally:
        for key, value in saved.items():
            fp.folder_names_and_paths[key] = value
            fp.filename_list_cache.pop(key, None)


class Loaders:
    """Call the three loader nodes' `execute` with the tiny files (names as the combos list them)."""

    def __init__(self, pack, names):
        self.pack, self.names = pack, names

    def dit(self, precision="bf16", attention="sdpa", name=None, **optional):
        """NewBieDiTLoader → MODEL (a ModelPatcher); `optional`: the loader's optional inputs (streaming, …)."""
        return self.pack.nodes.loaders.NewBieDiTLoader.execute(
            dit_name=name or self.names["dit"], precision=precision, attention=attention, compile=False,
            device="default", **optional).args[0]

    def text_encoders(self, precision="bf16", gemma=None, jina=None):
        """NewBieTextEncoderLoader → TextEncoders."""
        return self.pack.nodes.loaders.NewBieTextEncoderLoader.execute(
            gemma_name=gemma or self.names["gemma"], jina_name=jina or self.names["jina"], precision=precision,
            device="default").args[0]

    def vae(self, precision="fp32", name=None):
        """NewBieVAELoader → LoadedVAE."""
        return self.pack.nodes.loaders.NewBieVAELoader.execute(
            vae_name=name or self.names["vae"], precision=precision, device="default").args[0]


@pytest.fixture(scope="session")
def loaders(pack, comfy_models) -> Loaders:
    """Loader-node helper (see Loaders)."""
    return Loaders(pack, comfy_models)


@pytest.fixture(scope="session")
def dit(loaders):
    """The tiny DiT in fp32 (CPU computes bf16 slowly and the comparisons are tighter in fp32)."""
    return loaders.dit(precision="fp32")


@pytest.fixture(scope="session")
def text_encoders(loaders):
    """The tiny Gemma + Jina pair, fp32."""
    return loaders.text_encoders(precision="fp32")


@pytest.fixture(scope="session")
def vae(loaders):
    """The tiny VAE, fp32 (tests that change its precision load their own)."""
    return loaders.vae(precision="fp32")


@pytest.fixture(autouse=True)
def _clean_comfy_state():
    """After each test: no model left loaded, no interrupt pending (tests must not leak into each other)."""
    yield
    mm = sys.modules.get("comfy.model_management")
    if mm is not None:
        mm.interrupt_current_processing(False)
        mm.unload_all_models()

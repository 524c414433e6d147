"""Node schemas and registration: descriptions, categories, tooltips, ids, the V3 entry point, source rules."""
from __future__ import annotations

import ast
import asyncio
import inspect
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def node_classes(pack):
    return list(pack.nodes.NODES)


def all_comfy_nodes_defined(pack) -> set:
    """Every io.ComfyNode subclass defined in the pack's nodes/ modules (registered or not)."""
    from comfy_api.latest import io

    found = set()
    prefix = pack.__name__ + ".nodes"
    for name, module in list(sys.modules.items()):
        if name == prefix or name.startswith(prefix + "."):
            for obj in vars(module).values():
                if inspect.isclass(obj) and issubclass(obj, io.ComfyNode) and obj is not io.ComfyNode \
                        and obj.__module__.startswith(prefix):
                    found.add(obj)
    return found


def test_every_node_has_description_category_tooltips_and_id(node_classes):
    assert len(node_classes) == 14
    ids = []
    for cls in node_classes:
        schema = cls.GET_SCHEMA()
        where = schema.node_id
        ids.append(schema.node_id)
        assert schema.node_id.startswith("NewBie"), where
        assert schema.node_id == cls.__name__, where  # ids are stable: saved workflows refer to them
        assert schema.display_name and schema.display_name.startswith("NewBie "), where
        assert schema.description and len(schema.description.strip()) > 20, where
        assert schema.category and schema.category.startswith("NewBie/"), where
        for inp in schema.inputs:
            assert inp.tooltip and inp.tooltip.strip(), f"{where}.{inp.id} has no tooltip"
        assert schema.outputs, where
        for out in schema.outputs:
            assert out.tooltip and out.tooltip.strip(), f"{where} output {out.display_name or out.io_type} has no tooltip"
    assert len(set(ids)) == len(ids)


def test_node_info_serializes_like_object_info(node_classes):
    """/object_info calls GET_NODE_INFO_V1; a failure there is only logged by the server and the node vanishes."""
    for cls in node_classes:
        info = cls.GET_NODE_INFO_V1()
        json.dumps(info)
        assert info["name"] == cls.GET_SCHEMA().node_id and info["category"].startswith("NewBie/")
        for group in info["input"].values():
            for name, spec in group.items():
                if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict):
                    assert spec[1].get("tooltip"), f"{info['name']}.{name} has no tooltip in /object_info"


def test_execute_signature_matches_the_schema_inputs(node_classes):
    """ComfyUI calls execute(**inputs): every schema input must be accepted by name (optional ones defaulted)."""
    for cls in node_classes:
        schema = cls.GET_SCHEMA()
        params = inspect.signature(cls.execute).parameters
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for inp in schema.inputs:
            assert takes_kwargs or inp.id in params, f"{schema.node_id}.execute does not take {inp.id}"
            if inp.optional and inp.id in params:
                assert params[inp.id].default is not inspect.Parameter.empty, \
                    f"{schema.node_id}: optional input {inp.id} has no default in execute"
        required = [n for n, p in params.items() if p.default is inspect.Parameter.empty
                    and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
        ids = {i.id for i in schema.inputs}
        assert set(required) <= ids, f"{schema.node_id}.execute requires {set(required) - ids}, not in the schema"


def test_top_level_exports_comfy_entrypoint_and_no_v1_mappings(pack, node_classes):
    assert callable(pack.comfy_entrypoint)
    # NODE_CLASS_MAPPINGS (even {}) would make ComfyUI take the V1 path and never call comfy_entrypoint
    assert not hasattr(pack, "NODE_CLASS_MAPPINGS")
    assert not hasattr(pack, "NODE_DISPLAY_NAME_MAPPINGS")
    result = pack.comfy_entrypoint()
    extension = asyncio.run(result) if inspect.isawaitable(result) else result
    from comfy_api.latest import ComfyExtension

    assert isinstance(extension, ComfyExtension)
    node_list = extension.get_node_list()
    node_list = asyncio.run(node_list) if inspect.isawaitable(node_list) else node_list
    assert isinstance(node_list, list)
    assert set(node_list) == set(node_classes) == all_comfy_nodes_defined(pack)
    assert sorted(pack.nodes.node_ids()) == sorted(c.GET_SCHEMA().node_id for c in node_list)


def test_comfyui_load_custom_node_registers_every_node(comfyui, pack, node_classes, tmp_path):
    """ComfyUI's own loader (nodes.load_custom_node) on this checkout, under a folder name with '-' and '.'."""
    import nodes as comfy_nodes

    link = tmp_path / "ComfyUI-NewBie.staged"
    link.symlink_to(REPO, target_is_directory=True)
    expected = sorted(c.GET_SCHEMA().node_id for c in node_classes)
    before = dict(comfy_nodes.NODE_CLASS_MAPPINGS)
    web_before = dict(comfy_nodes.EXTENSION_WEB_DIRS)
    dirs_before = dict(comfy_nodes.LOADED_MODULE_DIRS)
    mod_name = str(link).replace(".", "_x_")
    try:
        ok = asyncio.run(comfy_nodes.load_custom_node(str(link), ignore=set(before)))
        assert ok is True
        added = sorted(set(comfy_nodes.NODE_CLASS_MAPPINGS) - set(before))
        assert added == expected
        for node_id in added:
            cls = comfy_nodes.NODE_CLASS_MAPPINGS[node_id]
            assert cls.RELATIVE_PYTHON_MODULE == "custom_nodes.ComfyUI-NewBie.staged"
        assert any(Path(d).name == "web" for d in comfy_nodes.EXTENSION_WEB_DIRS.values())
    finally:
        for key in set(comfy_nodes.NODE_CLASS_MAPPINGS) - set(before):
            del comfy_nodes.NODE_CLASS_MAPPINGS[key]
        for table, saved in ((comfy_nodes.EXTENSION_WEB_DIRS, web_before), (comfy_nodes.LOADED_MODULE_DIRS, dirs_before)):
            table.clear()
            table.update(saved)
        for key in [k for k in sys.modules if k == mod_name or k.startswith(mod_name + ".")]:
            del sys.modules[key]


# ------------------------------------------------------------------------------------------ source rules
def py_files(folder: str) -> list[Path]:
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, folder
    return files


def test_nodes_never_call_torch_cuda_empty_cache():
    """Device caches are emptied through newbie_core.memory / ComfyUI (gc first, every backend), never directly."""
    pattern = re.compile(r"\bcuda\s*\.\s*empty_cache\b|\bempty_cache\s*=|from\s+torch\.cuda\s+import[^\n]*empty_cache")
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in py_files("nodes")
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert offenders == []


COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "comfy_config", "folder_paths", "nodes",
                 "server", "latent_preview", "execution", "node_helpers"}


def test_newbie_core_never_imports_comfyui():
    """newbie_core runs without ComfyUI (CLI, tests); only nodes/ may import ComfyUI modules."""
    offenders = []
    for path in py_files("newbie_core"):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value)]
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}" for n in names
                          if n.split(".")[0] in COMFY_MODULES]
    assert offenders == []

"""Harness smoke tests against a real ComfyUI server; they need core nodes only (no tiny models, no pack nodes)."""
from __future__ import annotations

import struct

import pytest

from comfy_server import PromptError
from workflow_convert import ui_to_api

SMOKE_GRAPH = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 16711680}},
    "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 1.0}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "t"}},
}


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_core_graph_runs_and_png_is_served(comfy_server):
    with comfy_server.listen() as ws:
        pid = comfy_server.queue_prompt(SMOKE_GRAPH, client_id=ws.client_id)
        events = ws.wait_done(pid, timeout=30)
    types = [t for t, _ in events]
    assert types[0] == "execution_start" and types[-2:] == ["execution_success", "executing"], types
    assert [d["node"] for t, d in events if t == "executing"] == ["1", "2", "3", None]
    assert [d["node"] for t, d in events if t == "executed"] == ["3"]  # only output nodes send `executed`
    entry = comfy_server.wait_for(pid, timeout=10)
    images = comfy_server.output_images(entry)
    assert len(images) == 1 and images[0]["type"] == "output"
    assert png_size(comfy_server.view(**images[0])) == (64, 48)


def test_invalid_prompt_reports_node_errors(comfy_server):
    bad = {**SMOKE_GRAPH, "1": {"class_type": "EmptyImage", "inputs": {**SMOKE_GRAPH["1"]["inputs"], "width": 0}}}
    with pytest.raises(PromptError) as err:
        comfy_server.queue_prompt(bad)
    kinds = [e["type"] for e in err.value.node_errors["1"]["errors"]]
    assert kinds == ["value_smaller_than_min"]


def _node(nid, typ, inputs=(), outputs=(), widgets=None, mode=0):
    return {"id": nid, "type": typ, "mode": mode, "inputs": list(inputs), "outputs": list(outputs),
            "widgets_values": widgets if widgets is not None else []}


def _in(name, typ, link=None, widget=False):
    return {"name": name, "type": typ, "link": link, **({"widget": {"name": name}} if widget else {})}


# A txt2img graph as frontend 1.27 saves it, plus every special case of workflow_convert:
# KSampler seed + control_after_generate value, a Note, a Reroute on the VAE, a PrimitiveNode driving the
# negative text (converted widget), a bypassed ImageBlur (passes IMAGE through), a muted PreviewImage.
UI_TXT2IMG = {
    "last_node_id": 14, "last_link_id": 13, "version": 0.4,
    "nodes": [
        _node(3, "KSampler", [_in("model", "MODEL", 1), _in("positive", "CONDITIONING", 4),
                              _in("negative", "CONDITIONING", 5), _in("latent_image", "LATENT", 6)],
              [{"name": "LATENT", "type": "LATENT", "links": [7]}],
              [42, "randomize", 20, 7.0, "euler", "normal", 1.0]),
        _node(4, "CheckpointLoaderSimple", [], [{"name": "MODEL", "type": "MODEL", "links": [1]},
                                                {"name": "CLIP", "type": "CLIP", "links": [2, 3]},
                                                {"name": "VAE", "type": "VAE", "links": [8]}], ["model.safetensors"]),
        _node(5, "EmptyLatentImage", [], [{"name": "LATENT", "type": "LATENT", "links": [6]}], [512, 512, 1]),
        _node(6, "CLIPTextEncode", [_in("clip", "CLIP", 2)], [{"name": "CONDITIONING", "type": "CONDITIONING",
                                                              "links": [4]}], ["a cat"]),
        _node(7, "CLIPTextEncode", [_in("clip", "CLIP", 3), _in("text", "STRING", 12, widget=True)],
              [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [5]}], ["stale widget value"]),
        _node(8, "VAEDecode", [_in("samples", "LATENT", 7), _in("vae", "VAE", 9)],
              [{"name": "IMAGE", "type": "IMAGE", "links": [10, 13]}]),
        _node(9, "SaveImage", [_in("images", "IMAGE", 11)], [], ["ComfyUI"]),
        _node(10, "Note", [], [], ["remember: 28 steps"]),
        _node(11, "Reroute", [_in("", "*", 8)], [{"name": "", "type": "VAE", "links": [9]}]),
        _node(12, "PrimitiveNode", [], [{"name": "STRING", "type": "STRING", "links": [12],
                                         "widget": {"name": "text"}}], ["from primitive"]),
        _node(13, "ImageBlur", [_in("image", "IMAGE", 10)], [{"name": "IMAGE", "type": "IMAGE", "links": [11]}],
              [3, 1.0], mode=4),
        _node(14, "PreviewImage", [_in("images", "IMAGE", 13)], [], [], mode=2),
    ],
    "links": [[1, 4, 0, 3, 0, "MODEL"], [2, 4, 1, 6, 0, "CLIP"], [3, 4, 1, 7, 0, "CLIP"],
              [4, 6, 0, 3, 1, "CONDITIONING"], [5, 7, 0, 3, 2, "CONDITIONING"], [6, 5, 0, 3, 3, "LATENT"],
              [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 11, 0, "*"], [9, 11, 0, 8, 1, "VAE"],
              [10, 8, 0, 13, 0, "IMAGE"], [11, 13, 0, 9, 0, "IMAGE"], [12, 12, 0, 7, 1, "STRING"],
              [13, 8, 0, 14, 0, "IMAGE"]],
    "groups": [], "config": {}, "extra": {}, "version": 0.4,
}


def test_workflow_convert_txt2img(comfy_server):
    api = ui_to_api(UI_TXT2IMG, comfy_server.object_info())
    assert api == {
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 42, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "model.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "from primitive", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


def test_converted_ui_workflow_runs(comfy_server):
    ui = {"nodes": [
        _node(1, "EmptyImage", [], [{"name": "IMAGE", "type": "IMAGE", "links": [1]}], [64, 48, 1, 16711680]),
        _node(2, "ImageBlur", [_in("image", "IMAGE", 1)], [{"name": "IMAGE", "type": "IMAGE", "links": [2]}],
              [3, 1.0]),
        _node(3, "SaveImage", [_in("images", "IMAGE", 2)], [], ["t"]),
    ], "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]]}
    api = ui_to_api(ui, comfy_server.object_info())
    assert api == SMOKE_GRAPH
    entry = comfy_server.run(api, timeout=30)
    assert len(comfy_server.output_images(entry)) == 1


def test_pack_nodes_registered(comfy_server, pack_ids):
    found = pack_ids
    if found["status"] in ("no_init", "no_entrypoint"):
        pytest.skip(f"pack node list not importable yet ({found['status']}: the repo-root __init__.py "
                    f"must export comfy_entrypoint)")
    assert found["status"] != "v1_trap", ("__init__.py defines NODE_CLASS_MAPPINGS: ComfyUI then registers "
                                          "V1-style and never calls comfy_entrypoint")
    ids = found["ids"]
    assert ids, "comfy_entrypoint returned no nodes"
    failed = [ln for ln in comfy_server.log_text().splitlines()
              if "IMPORT FAILED" in ln and comfy_server.pack_name in ln]
    assert not failed, "\n".join(failed) + "\n" + comfy_server.log_tail(60)
    info = comfy_server.object_info()
    missing = [i for i in ids if i not in info]
    assert not missing, f"not in /object_info: {missing}\n{comfy_server.log_tail(60)}"
    module = f"custom_nodes.{comfy_server.pack_name}"
    wrong = {i: info[i]["python_module"] for i in ids if info[i]["python_module"] != module}
    assert not wrong, f"registered by another module (id clash?): {wrong}"

"""Every bundled workflow (workflows/*.json, UI format as frontend 1.27 saves it) runs inside a real ComfyUI server.

Each one is converted with `workflow_convert.ui_to_api` against the server's /object_info (so the widget order is
checked against the live node definitions), shrunk for CI (sampler width/height/steps), queued, and must end with
`success`, with every node executed and every saved/previewed image a PNG of the shrunk size.
The workflows themselves keep the settings real users need (1024×1024, 18 steps, ...).
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from comfy_server import REPO_ROOT, ComfyServer
from workflow_convert import UPLOAD_KEYS, _has_control, ui_to_api, widget_inputs

WORKFLOW_DIR = REPO_ROOT / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
EXPECTED_WORKFLOWS = {"newbie_basic_t2i", "newbie_xml_multi_character", "newbie_low_vram", "newbie_precision_swap",
                      "newbie_interop_core_nodes", "newbie_prompt_enhance", "newbie_lora", "newbie_img2img",
                      "newbie_inpaint", "newbie_hires_fix", "newbie_comfyui_template_ksampler"}
# Nodes that set the image size without being samplers (shrunk too) and the latent upscalers (scale the size).
SIZE_NODES = {"EmptyLatentImage", "EmptySD3LatentImage"}
EXAMPLE_IMAGE = "newbie_example.png"  # the Load Image placeholder of the img2img / inpaint workflows
NOTE_TYPES = {"Note", "MarkdownNote"}
# The names users download (newbie_core/tiny/__init__.py); the only model names a workflow may use.
MODEL_FILES = {
    "NewBie-Image-Exp0.1.safetensors": "diffusion_models",
    "gemma_3_4b_it_bf16.safetensors": "text_encoders",
    "jina_clip_v2_bf16.safetensors": "text_encoders",
    "ae.safetensors": "vae",
    "newbie_example_lokr.safetensors": "loras",
}
MODEL_INPUTS = {"dit_name", "gemma_name", "jina_name", "vae_name", "lora_name"}
TEST_SIZE, TEST_STEPS = 64, 3
TEST_NEW_TOKENS = 16  # NewBie Prompt Enhance's reply length in CI (the tiny Gemma writes gibberish anyway)


# ----------------------------------------------------------------------------------------------- helpers
def load_workflow(name_or_path: str | Path) -> dict:
    path = Path(name_or_path)
    if not path.is_absolute():
        path = WORKFLOW_DIR / (path.name if path.suffix == ".json" else f"{path.name}.json")
    return json.loads(path.read_text(encoding="utf-8"))


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def is_sampler(class_type: str, object_info: dict) -> bool:
    """A node whose category is a sampling one (NewBie/sampling, core sampling, sampling/custom_sampling...)."""
    return "sampling" in object_info[class_type].get("category", "").lower().split("/")


def shrink(api: dict, object_info: dict, size: int = TEST_SIZE, steps: int = TEST_STEPS) -> list[tuple[int, int]]:
    """Make a converted graph CI-sized: constant width/height/steps inputs of every sampler node are overridden,
    and so is every text generator's max_new_tokens.

    Returns the (width, height) of each patched sampler (the expected image sizes)."""
    sizes = []
    for node in api.values():
        if isinstance(node["inputs"].get("max_new_tokens"), int):
            node["inputs"]["max_new_tokens"] = TEST_NEW_TOKENS
        if not (is_sampler(node["class_type"], object_info) or node["class_type"] in SIZE_NODES):
            continue
        inputs = node["inputs"]
        for name, value in (("width", size), ("height", size), ("steps", steps)):
            if isinstance(inputs.get(name), int):
                inputs[name] = value
        if isinstance(inputs.get("width"), int) and isinstance(inputs.get("height"), int):
            sizes.append((inputs["width"], inputs["height"]))
    for node in api.values():  # Upscale Latent By: its result's size too (latent pixels scaled, rounded as core)
        if node["class_type"] == "LatentUpscaleBy":
            f = node["inputs"]["scale_by"]
            sizes += [(round(w / 8 * f) * 8, round(h / 8 * f) * 8) for w, h in list(sizes)]
    return sizes


def workflow_api(comfy: ComfyServer, name: str, object_info: dict | None = None) -> tuple[dict, list]:
    """Load, convert and shrink a bundled workflow: (api graph, expected image sizes)."""
    info = object_info or comfy.object_info()
    api = ui_to_api(load_workflow(name), info)
    return api, shrink(api, info)


def nodes_of(api: dict, class_type: str) -> list[str]:
    return [nid for nid, n in api.items() if n["class_type"] == class_type]


# A real-architecture FLUX VAE for core VAELoader (see test_workflow_runs' docstring).
FLUX_VAE_SUBDIR = "flux_architecture_random"


@pytest.fixture(scope="session")
def flux_arch_vae(comfy, tmp_path_factory) -> str:
    """Write a VAE with the exact FLUX.1-dev architecture (diffusers config of black-forest-labs/FLUX.1-dev/vae:
    block_out_channels 128/256/512/512, 2 layers per block, 32 norm groups, 16 latent channels; 83.8 M parameters)
    and seeded random weights, in BFL key names and bf16 (168 MB, ~2 s), into models/vae/<subdir>/ae.safetensors:
    the product's `newbie make-tiny DIR --flux-vae` writer (newbie_core.tiny.vae.write_flux_architecture_vae).

    Returns the name core VAELoader lists for it. The tiny models/vae/ae.safetensors stays for the NewBie VAE loader.
    """
    from newbie_core.tiny.vae import write_flux_architecture_vae

    path = write_flux_architecture_vae(tmp_path_factory.mktemp("flux_arch_vae"))["vae_flux_arch"]
    comfy.place_models({f"vae/{FLUX_VAE_SUBDIR}/ae.safetensors": path}, copy=False)  # read by core VAELoader only
    return f"{FLUX_VAE_SUBDIR}/ae.safetensors"


@pytest.fixture(scope="session", autouse=True)
def example_image(comfy_server):
    """A 64×64 RGBA picture in the server's input/ folder under the img2img/inpaint workflows' placeholder name;
    its alpha is 0 in the centre, so Load Image's MASK (1 − alpha) marks the centre for repainting."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (TEST_SIZE, TEST_SIZE, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[16:48, 16:48, 3] = 0
    Image.fromarray(rgba, "RGBA").save(comfy_server.base / "input" / EXAMPLE_IMAGE)
    return EXAMPLE_IMAGE


# ----------------------------------------------------------------------------------------------- tests
def test_bundled_workflow_set():
    from newbie_core.tiny import COMFY_DIT_NAME, COMFY_GEMMA_NAME, COMFY_JINA_NAME, COMFY_LORA_NAME, COMFY_VAE_NAME

    assert {p.stem for p in WORKFLOWS} == EXPECTED_WORKFLOWS
    assert set(MODEL_FILES) == {COMFY_DIT_NAME, COMFY_GEMMA_NAME, COMFY_JINA_NAME, COMFY_VAE_NAME, COMFY_LORA_NAME}
    # ComfyUI serves only the first of example_workflows/, example/, examples/, workflow/, workflows/ that exists.
    others = [d for d in ("example_workflows", "example", "examples", "workflow") if (REPO_ROOT / d).is_dir()]
    assert not others, f"{others} would shadow workflows/ in /api/workflow_templates"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_well_formed(comfy, path):
    """Frontend-1.27 shape, a note naming the files, only registered node types, only the real model names,
    links consistent on both ends, widgets_values exactly as long as the node's widgets (+ control values)."""
    wf = load_workflow(path)
    info = comfy.object_info()
    assert wf["version"] == 0.4 and isinstance(wf.get("extra", {}).get("ds"), dict)
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config"):
        assert key in wf, key
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes)
    assert wf["last_link_id"] >= max((ln[0] for ln in wf["links"]), default=0)

    notes = [n for n in wf["nodes"] if n["type"] in NOTE_TYPES]
    assert notes, "every workflow explains itself in a Note/MarkdownNote"
    note_text = "\n".join(str(v) for n in notes for v in n["widgets_values"])
    used_models = {n["widgets_values"][i] for n in wf["nodes"] if n["type"] not in NOTE_TYPES
                   for i, v in enumerate(n.get("widgets_values") or []) if str(v).endswith(".safetensors")}
    assert used_models and used_models <= set(MODEL_FILES), f"unknown model names {used_models - set(MODEL_FILES)}"
    for name in used_models:
        assert name in note_text and f"models/{MODEL_FILES[name]}" in note_text, f"the note must say where {name} goes"

    links = {ln[0]: ln for ln in wf["links"]}
    assert len(links) == len(wf["links"]), "duplicate link ids"
    for lid, src, src_slot, dst, dst_slot, _typ in wf["links"]:
        assert lid in nodes[src]["outputs"][src_slot]["links"], f"link {lid} missing on its source"
        assert nodes[dst]["inputs"][dst_slot]["link"] == lid, f"link {lid} missing on its target"
    for n in wf["nodes"]:
        typ = n["type"]
        assert n["mode"] == 0, f"node {n['id']} ({typ}) is muted/bypassed"
        for key in ("pos", "size", "flags", "order", "properties"):
            assert key in n, f"node {n['id']}: {key}"
        if typ in NOTE_TYPES:
            continue
        assert typ in info, f"node {n['id']}: {typ} is not registered"
        assert n["properties"].get("Node name for S&R") == typ
        for inp in n.get("inputs") or []:
            assert inp["link"] is None or inp["link"] in links, f"node {n['id']} input {inp['name']}: dangling link"
        for out in n.get("outputs") or []:
            assert all(lid in links for lid in out["links"] or []), f"node {n['id']}: dangling output link"
        widgets = widget_inputs(info[typ])
        expected = len(widgets) + sum(_has_control(w, t, o) for w, t, o in widgets) + \
            sum(bool(o.get(key)) for _, _, o in widgets for key in UPLOAD_KEYS)  # Load Image's "image" button
        assert len(n["widgets_values"]) == expected, f"node {n['id']} ({typ}): {len(n['widgets_values'])} widget " \
                                                     f"values, expected {expected} ({[w[0] for w in widgets]})"
        for inp in n.get("inputs") or []:
            if inp.get("widget"):
                assert inp["widget"]["name"] in {w[0] for w in widgets}, f"node {n['id']}: {inp['widget']}"
    # Every combo value (incl. model names) is one the server offers; widgets map without leftovers.
    api = ui_to_api(wf, info)
    for nid, node in api.items():
        spec = {**info[node["class_type"]]["input"].get("required", {}),
                **info[node["class_type"]]["input"].get("optional", {})}
        for name, value in node["inputs"].items():
            typ = spec[name][0]
            options = typ if isinstance(typ, list) else spec[name][1].get("options") if typ == "COMBO" else None
            if options is not None and not isinstance(value, list):
                assert value in options, f"node {nid}: {name}={value!r} not in {options}"
            if name in MODEL_INPUTS:
                assert value in MODEL_FILES, f"node {nid}: {name}={value!r}"
    # Realistic defaults: the users run these as shipped.
    for node in api.values():
        if (is_sampler(node["class_type"], info) or node["class_type"] in SIZE_NODES) and "width" in node["inputs"]:
            assert (node["inputs"]["width"], node["inputs"]["height"]) == (1024, 1024)


def test_basic_workflow_uses_the_official_settings(comfy):
    api = ui_to_api(load_workflow("newbie_basic_t2i"), comfy.object_info())  # as shipped, not shrunk
    (sampler,) = [n["inputs"] for n in api.values() if n["class_type"] == "NewBieDiTSampler"]
    assert {k: sampler[k] for k in ("width", "height", "steps", "solver", "cfg", "cfg_trunc", "shift")} == {
        "width": 1024, "height": 1024, "steps": 18, "solver": "midpoint", "cfg": 5.0, "cfg_trunc": 0.25, "shift": 6.0}
    chain = [api[nid]["class_type"] for nid in sorted(api, key=int)]
    for typ in ("NewBieDiTLoader", "NewBieTextEncoderLoader", "NewBieVAELoader", "NewBieTextEncode",
                "NewBieDiTSampler", "NewBieVAEDecode", "SaveImage"):
        assert typ in chain


def test_xml_workflow_feeds_the_assembled_prompt_into_positive(comfy):
    """The assembler's STRING goes into Text Encode's `positive` widget through a widget input (1.27 format):
    the converted graph must carry the link, not the stale widgets_values entry."""
    wf = load_workflow("newbie_xml_multi_character")
    (enc,) = [n for n in wf["nodes"] if n["type"] == "NewBieTextEncode"]
    (pos_input,) = [i for i in enc["inputs"] if i["name"] == "positive"]
    assert pos_input["widget"] == {"name": "positive"} and pos_input["link"] is not None
    api = ui_to_api(wf, comfy.object_info())
    (asm,) = nodes_of(api, "NewBieXMLAssemble")
    (enc_id,) = nodes_of(api, "NewBieTextEncode")
    assert api[enc_id]["inputs"]["positive"] == [asm, 0]
    assert api[enc_id]["inputs"]["system_prompt"] == "xml"
    chars = [api[c]["inputs"] for c in nodes_of(api, "NewBieXMLCharacter")]
    assert sorted(c["index"] for c in chars) == [1, 2]
    assert sorted(k for k, v in api[asm]["inputs"].items() if isinstance(v, list)) == [
        "character_1", "character_2", "general_tags"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs(comfy, path, request):
    """Convert, shrink, run; every node executes; every output image is a PNG of the shrunk size.

    Interop workflow (core VAELoader + core VAEDecode on our LATENT): core `VAELoader` cannot load the tiny
    test VAE, because `comfy.sd.VAE` hard-codes the KL widths (ch 128, ch_mult 1/2/4/4) and reads only
    z_channels from the file. So that the real core VAELoader → VAEDecode path runs on the LATENT of our sampler,
    the test writes a VAE with the *real* FLUX.1-dev architecture and random weights (fixture `flux_arch_vae`:
    168 MB bf16, written once per session, ~2 s; loading and a 64×64 decode take ~3 s more) under
    models/vae/flux_architecture_random/ and points the converted graph's VAELoader at it. Nothing of core's
    path is replaced or mocked; only the weights are random. The tiny models/vae/ae.safetensors stays in place
    for NewBie VAE Loader.
    """
    info = comfy.object_info()
    api, sizes = workflow_api(comfy, path.stem, info)
    assert sizes, "no sampler with width/height found to shrink"
    for nid in nodes_of(api, "VAELoader"):
        api[nid]["inputs"]["vae_name"] = request.getfixturevalue("flux_arch_vae")
    with comfy.listen() as ws:
        pid = comfy.queue_prompt(api, client_id=ws.client_id)
        events = ws.wait_done(pid, timeout=180)
    entry = comfy.wait_for(pid, timeout=10)
    assert entry["status"]["status_str"] == "success"
    ran = {d["node"] for t, d in events if t == "executing" and d.get("node") is not None}
    cached = {n for t, d in events if t == "execution_cached" for n in d.get("nodes", [])}
    assert set(api) <= ran | cached, f"nodes that never ran: {set(api) - ran - cached}"
    images = comfy.output_images(entry)
    n_out = len(nodes_of(api, "SaveImage")) + len(nodes_of(api, "PreviewImage"))
    assert n_out >= 1 and len(images) >= n_out
    for img in images:
        assert png_size(comfy.view(**img)) in sizes, img
    outputs = entry["outputs"]
    if "NewBieVAEDecode" in {n["class_type"] for n in api.values()}:
        (dec,) = nodes_of(api, "NewBieVAEDecode")
        note = outputs[dec]["text"][0]
        assert any(f"decoded ({h}, {w})" in note for w, h in sizes), note
        if api[dec]["inputs"]["tiled"]:
            assert "tiled" in note
        if api[dec]["inputs"]["precision"] == "fp32":
            assert "fp32" in note
    for purge in nodes_of(api, "NewBieMemoryPurge"):
        assert "models held by NewBie nodes" in outputs[purge]["text"][0]


def test_template_workflow_uses_comfyuis_newbie_template_settings(comfy):
    api = ui_to_api(load_workflow("newbie_comfyui_template_ksampler"), comfy.object_info())  # as shipped
    (ks,) = [n["inputs"] for n in api.values() if n["class_type"] == "KSampler"]
    assert {k: ks[k] for k in ("steps", "cfg", "sampler_name", "scheduler", "denoise")} == {
        "steps": 20, "cfg": 5.5, "sampler_name": "res_multistep", "scheduler": "simple", "denoise": 1.0}
    (ms,) = [n["inputs"] for n in api.values() if n["class_type"] == "ModelSamplingAuraFlow"]
    assert ms["shift"] == 6.0 and api[ks["model"][0]]["class_type"] == "ModelSamplingAuraFlow"
    assert api[ms["model"][0]]["class_type"] == "NewBieDiTLoader"
    assert api[ks["positive"][0]]["class_type"] == "NewBieTextEncode"
    assert api[ks["latent_image"][0]]["class_type"] == "EmptySD3LatentImage"


@pytest.mark.parametrize("name, chain, denoise", [
    ("newbie_img2img", ["LoadImage", "NewBieVAEEncode"], [0.6]),
    ("newbie_inpaint", ["LoadImage", "NewBieVAEEncode", "SetLatentNoiseMask"], [0.85]),
    ("newbie_hires_fix", ["NewBieDiTSampler", "LatentUpscaleBy"], [1.0, 0.5]),
])
def test_img2img_workflows_feed_the_sampler_latent(comfy, name, chain, denoise):
    api = ui_to_api(load_workflow(name), comfy.object_info())
    samplers = sorted(nodes_of(api, "NewBieDiTSampler"), key=int)
    assert [api[s]["inputs"]["denoise"] for s in samplers] == denoise
    last = api[samplers[-1]]["inputs"]
    src, seen = last["latent"][0], []
    while src is not None:  # walk the latent back to where it starts
        node = api[src]
        seen.append(node["class_type"])
        link = node["inputs"].get("samples") or node["inputs"].get("pixels") or node["inputs"].get("latent")
        src = link[0] if isinstance(link, list) else None
    assert list(reversed(seen)) == chain
    if name == "newbie_hires_fix":
        (up,) = nodes_of(api, "LatentUpscaleBy")
        assert api[up]["inputs"]["scale_by"] == 1.5

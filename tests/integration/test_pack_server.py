"""The pack inside a real ComfyUI server: registration, node metadata, templates, cancel, the prompt-embedding
cache, the purge report and model-file errors. One session server (`comfy`, tiny models under the real names)."""
from __future__ import annotations

import json
import uuid

import pytest

from comfy_server import PACK_NAME, PromptError
from test_workflows import WORKFLOWS, load_workflow, nodes_of, workflow_api

PACK_NODE_IDS = ["NewBieDiTLoader", "NewBieTextEncoderLoader", "NewBieVAELoader", "NewBieTextEncode",
                 "NewBieDiTSampler", "NewBieVAEDecode", "NewBieVAEEncode", "NewBieMemoryPurge", "NewBieXMLCharacter",
                 "NewBieXMLGeneralTags", "NewBieXMLAssemble", "NewBiePromptEnhance", "NewBieLoraLoader",
                 "NewBieLoraLoaderMulti"]
DIT, GEMMA, JINA, VAE = ("NewBie-Image-Exp0.1.safetensors", "gemma_3_4b_it_bf16.safetensors",
                         "jina_clip_v2_bf16.safetensors", "ae.safetensors")


def pipeline(positive="1girl, smile", negative="lowres", seed=0, steps=3, size=64, solver="euler",
             cfg_trunc=1.0, te_precision="fp32", dit_name=DIT, dit_precision="fp32", cfg=4.0) -> dict:
    """Loaders → Text Encode (node "4") → Sampler ("5") → VAE Decode → PreviewImage ("7"), fp32 unless asked."""
    return {
        "1": {"class_type": "NewBieDiTLoader", "inputs": {"dit_name": dit_name, "precision": dit_precision,
                                                          "attention": "auto", "compile": False, "device": "default"}},
        "2": {"class_type": "NewBieTextEncoderLoader", "inputs": {"gemma_name": GEMMA, "jina_name": JINA,
                                                                  "precision": te_precision, "device": "default"}},
        "3": {"class_type": "NewBieVAELoader", "inputs": {"vae_name": VAE, "precision": "fp32", "device": "default"}},
        "4": {"class_type": "NewBieTextEncode", "inputs": {"text_encoders": ["2", 0], "positive": positive,
                                                           "negative": negative, "system_prompt": "auto",
                                                           "keep_loaded": False}},
        "5": {"class_type": "NewBieDiTSampler", "inputs": {
            "model": ["1", 0], "positive": ["4", 0], "negative": ["4", 1], "seed": seed, "steps": steps, "cfg": cfg,
            "shift": 6.0, "solver": solver, "cfg_trunc": cfg_trunc, "renorm": 0.0, "width": size, "height": size,
            "batch_size": 1}},
        "6": {"class_type": "NewBieVAEDecode", "inputs": {"vae": ["3", 0], "samples": ["5", 0], "precision": "auto",
                                                          "tiled": False}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


# ------------------------------------------------------------------------------------------ registration
def test_every_pack_node_is_registered(comfy, pack_ids):
    found = pack_ids
    assert found["status"] == "ok", found
    assert sorted(found["ids"]) == sorted(PACK_NODE_IDS)
    info = comfy.object_info()
    missing = [i for i in PACK_NODE_IDS if i not in info]
    assert not missing, f"not in /object_info: {missing}\n{comfy.log_tail(60)}"
    module = f"custom_nodes.{PACK_NAME}"
    wrong = {i: info[i]["python_module"] for i in PACK_NODE_IDS if info[i]["python_module"] != module}
    assert not wrong, wrong
    failed = [ln for ln in comfy.log_text().splitlines() if "IMPORT FAILED" in ln or "comfy_entrypoint" in ln]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("node_id", PACK_NODE_IDS)
def test_node_metadata(comfy, node_id):
    """A description, a NewBie/<area> category, and a tooltip on every input and output."""
    info = comfy.object_info(node_id)
    assert info["description"].strip(), "no description"
    assert info["category"].startswith("NewBie/") and len(info["category"]) > len("NewBie/")
    assert info["display_name"].startswith("NewBie ")
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            assert str(opts.get("tooltip", "")).strip(), f"input {name!r} has no tooltip"
    tips = info.get("output_tooltips") or []
    assert len(tips) == len(info["output"]) and all(t and t.strip() for t in tips), f"output tooltips: {tips}"


# ------------------------------------------------------------------------------------------ templates
def test_workflow_templates_are_listed_and_served(comfy):
    listed = comfy.http.get(comfy.url + "/workflow_templates", timeout=30).json()
    assert sorted(listed.get(PACK_NAME, [])) == sorted(p.stem for p in WORKFLOWS), listed
    for path in WORKFLOWS:
        r = comfy.http.get(f"{comfy.url}/api/workflow_templates/{PACK_NAME}/{path.name}", timeout=30)
        assert r.status_code == 200, f"{path.name}: HTTP {r.status_code}"
        assert r.json() == load_workflow(path)


# ------------------------------------------------------------------------------------------ cancel
def test_cancel_mid_sampling_then_server_still_works(comfy):
    graph = pipeline(positive=f"cancel test {uuid.uuid4().hex}", steps=200, size=256, solver="euler")
    pid, events = comfy.cancel_after_progress(graph, "5", "sampler")
    types = [t for t, _ in events]
    assert "execution_interrupted" in types and "execution_success" not in types, types
    ticks = [d for t, d in events if t == "progress" and d.get("node") == "5"]
    assert ticks and max(d["value"] for d in ticks) < ticks[0]["max"], "sampling ran to the end"
    assert ticks[0]["max"] == 199  # euler: steps - 1 intervals
    (interrupted,) = [d for t, d in events if t == "execution_interrupted"]
    assert interrupted["node_id"] == "5" and interrupted["node_type"] == "NewBieDiTSampler"
    entry = comfy.wait_for(pid, timeout=10, check=False)
    assert entry["status"]["status_str"] == "error"
    # healthy afterwards: the next prompt (same models, small size) succeeds and nothing is queued
    entry = comfy.run(pipeline(positive=f"after cancel {uuid.uuid4().hex}", seed=1), timeout=60)
    assert len(comfy.output_images(entry)) == 1
    assert comfy.queue() == {"queue_running": [], "queue_pending": []}


# ------------------------------------------------------------------------------------------ embedding cache
def test_repeated_prompt_text_comes_from_the_embedding_cache(comfy):
    a, b, c = (f"{w}, {uuid.uuid4().hex}" for w in ("1girl, red_hair", "lowres, blurry", "1boy, hat"))
    first = comfy.run(pipeline(positive=a, negative=b, seed=1), timeout=60)
    assert first["outputs"]["4"]["text"][0].startswith("0 of 2 prompts from cache"), first["outputs"]["4"]
    # B was the negative before; now it is the positive (other seed too, so everything downstream re-runs)
    second = comfy.run(pipeline(positive=b, negative=c, seed=2), timeout=60)
    assert second["outputs"]["4"]["text"][0].startswith("1 of 2 prompts from cache"), second["outputs"]["4"]
    third = comfy.run(pipeline(positive=c, negative=a, seed=3), timeout=60)
    assert third["outputs"]["4"]["text"][0].startswith("2 of 2 prompts from cache"), third["outputs"]["4"]


# ------------------------------------------------------------------------------------------ purge report
def test_purge_report_lists_models_with_dtypes_and_devices(comfy):
    """After the precision-swap workflow (DiT bf16, text encoders fp32, VAE decode fp32) the purge node's text
    lists each pack model with its dtype and device."""
    api, _ = workflow_api(comfy, "newbie_precision_swap")
    entry = comfy.run(api, timeout=120)
    (purge,) = nodes_of(api, "NewBieMemoryPurge")
    text = entry["outputs"][purge]["text"][0]
    lines = text.splitlines()
    assert lines[0].startswith("after:") and lines[1].startswith("NewBie models:") and lines[2].startswith("before:"), text

    def line(label):
        found = [ln for ln in lines if ln.strip().startswith(label)]
        assert found, f"{label} not in report:\n{text}"
        return found[-1]

    assert f"Gemma3 ({GEMMA})" in line("Gemma3") and "float32" in line("Gemma3")
    assert "float32" in line("Jina CLIP v2")
    assert "bfloat16" in line("DiT") and DIT in line("DiT")
    assert "float32" in line("VAE")
    assert all(" on cpu" in line(lbl) for lbl in ("Gemma3", "Jina CLIP v2", "DiT", "VAE"))
    assert "(loaded)" not in text, "the purge unloads everything"


# ------------------------------------------------------------------------------------------ model-file errors
@pytest.mark.parametrize("case", ["typo", "broken_symlink"])
def test_wrong_dit_file_gives_an_error_naming_folder_and_file(comfy, case):
    """A DiT name that cannot be loaded fails in NewBie DiT Loader with a message naming the ComfyUI folder, the
    file and the file to put there.

    typo: a name not in models/diffusion_models. ComfyUI 0.3.64 validates only V1 list combos at POST /prompt
    (execution.py: `isinstance(input_type, list)`), not V3 "COMBO" inputs, so the prompt is accepted (no 400) and
    the loader's own error is what the user sees. broken_symlink: a listed name whose file cannot be opened
    (common with shared model stores) passes validation on any version and fails the same way."""
    name = f"NewBie-{case}-{uuid.uuid4().hex[:8]}.safetensors"
    link = comfy.base / "models" / "diffusion_models" / name
    if case == "broken_symlink":
        link.symlink_to(comfy.base / "nowhere" / name)
    try:
        try:
            entry = comfy.run(pipeline(dit_name=name), timeout=60, check=False)
        except PromptError as e:  # a newer ComfyUI that validates V3 combos: HTTP 400 naming input and file
            assert case == "typo", e
            errors = e.node_errors["1"]["errors"]
            assert errors[0]["type"] == "value_not_in_list" and name in errors[0]["details"], errors
            return
    finally:
        if link.is_symlink():
            link.unlink()
    assert entry["status"]["status_str"] == "error"
    (err,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert err["node_type"] == "NewBieDiTLoader", json.dumps(err)[:2000]
    msg = err["exception_message"]
    assert f"'{name}'" in msg and "'diffusion_models'" in msg and DIT in msg, msg
    assert str(comfy.base / "models" / "diffusion_models") in msg, "the message names the folder searched"

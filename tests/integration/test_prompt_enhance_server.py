"""NewBie Prompt Enhance in a real ComfyUI server: the bundled idea → enhance → encode → sample → decode workflow
runs, its prompt reaches Text Encode, the report carries the linter's verdict, a repeated request comes from the
prompt cache, and Cancel during generation stops the node with the server still healthy."""
from __future__ import annotations

import uuid

from test_workflows import TEST_NEW_TOKENS, nodes_of, png_size, workflow_api


def enhance_graph(comfy, idea: str, max_new_tokens: int = TEST_NEW_TOKENS) -> tuple[dict, str, str]:
    api, _ = workflow_api(comfy, "newbie_prompt_enhance")
    (enh,) = nodes_of(api, "NewBiePromptEnhance")
    (enc,) = nodes_of(api, "NewBieTextEncode")
    api[enh]["inputs"].update(idea=idea, max_new_tokens=max_new_tokens)
    return api, enh, enc


def test_enhance_workflow_feeds_text_encode_and_reports_the_lint(comfy):
    api, enh, enc = enhance_graph(comfy, f"a knight on a bridge {uuid.uuid4().hex}")
    assert api[enc]["inputs"]["positive"] == [enh, 0], "the enhanced prompt goes into Text Encode's positive"
    entry = comfy.run(api, timeout=240)
    assert entry["status"]["status_str"] == "success"
    shown = entry["outputs"][enh]["text"][0]
    assert "new tokens" in shown and "lint:" in shown
    # the tiny random Gemma writes no valid XML: the report says where the linter stopped
    assert "lint: FAILED after one repair round" in shown and "line 1, column 1" in shown, shown
    images = comfy.output_images(entry)
    assert len(images) == 1 and png_size(comfy.view(**images[0])) == (64, 64)
    # keep_loaded is not part of the prompt-cache key: ComfyUI re-runs the node, the prompt comes from the cache
    api[enh]["inputs"]["keep_loaded"] = True
    again = comfy.run(api, timeout=120)
    assert "from the prompt cache (Gemma not loaded)" in again["outputs"][enh]["text"][0]


def test_cancel_during_generation_then_server_still_works(comfy):
    api, enh, _ = enhance_graph(comfy, f"cancel me {uuid.uuid4().hex}", max_new_tokens=2000)
    _, events = comfy.cancel_after_progress(api, enh, "token", wait=180)
    types = [t for t, _ in events]
    assert "execution_interrupted" in types and "execution_success" not in types, types
    (interrupted,) = [d for t, d in events if t == "execution_interrupted"]
    assert interrupted["node_type"] == "NewBiePromptEnhance"
    ticks = [d["value"] for t, d in events if t == "progress" and d.get("node") == enh]
    assert max(ticks) < 2000, "generation ran to the end"
    api2, enh2, _ = enhance_graph(comfy, f"after cancel {uuid.uuid4().hex}")
    assert comfy.run(api2, timeout=240)["status"]["status_str"] == "success"
    assert comfy.queue() == {"queue_running": [], "queue_pending": []}

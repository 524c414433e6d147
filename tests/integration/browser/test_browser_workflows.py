"""The bundled workflows in ComfyUI's real web frontend (1.27, headless Chromium), against the session's CPU server
with tiny random-weight models under the real file names.

Per workflow, what a user does: drop the file on the canvas; nothing may be reported missing or rejected; press
Run; the prompt must finish and the saved image must show inside the Save/Preview Image node. Before pressing Run
the test edits the sampler's width/height/steps widgets down to CI size (the shipped 1024 px / 18 steps stay in
the files), and points core VAE Loader at a real-architecture FLUX VAE (the tiny VAE only fits our own loader; see
test_workflows.test_workflow_runs). A screenshot of every finished workflow goes to the artifact folder.
Also: the workflows are listed in the template browser under the pack's name and open from there, the pack's web
extension loads and shows node reports, and the load checks do catch a missing node and a rejected value.
"""
from __future__ import annotations

import copy
import json
from urllib.parse import parse_qs, urlparse

import pytest

from comfy_server import PACK_NAME
from frontend import ComfyPage
from test_workflows import SIZE_NODES, TEST_SIZE, WORKFLOWS, example_image, flux_arch_vae  # noqa: F401  (session fixtures, reused)

BROWSER_SIZE, BROWSER_STEPS = 128, 4  # not the HTTP tests' 64 px / 3 steps: no run is served from their cache
VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
IMAGE_NODES = {"SaveImage", "PreviewImage"}
REPORTING_NODES = {"NewBieTextEncode", "NewBieVAEDecode", "NewBieVAEEncode", "NewBieMemoryPurge"}  # ui.text → web/js/newbie.js


def _shrink(ui: ComfyPage, vae_name: str, seed: int) -> None:
    """Edit the CI-size values (and a seed of its own) into the page's widgets, as a user would type them."""
    for node in ui.nodes():
        names = {w["name"] for w in node["widgets"]}
        if "sampling" in (node["category"] or "").lower().split("/") and {"width", "height", "steps"} <= names:
            ui.set_widgets(node["id"], {"width": BROWSER_SIZE, "height": BROWSER_SIZE, "steps": BROWSER_STEPS,
                                        **({"seed": seed} if "seed" in names else {})})
        elif "sampling" in (node["category"] or "").lower().split("/") and "steps" in names:  # core KSampler
            ui.set_widgets(node["id"], {"steps": BROWSER_STEPS, **({"seed": seed} if "seed" in names else {})})
        if node["type"] in SIZE_NODES:  # Empty(SD3)LatentImage
            ui.set_widgets(node["id"], {"width": BROWSER_SIZE, "height": BROWSER_SIZE})
        if node["type"] == "VAELoader":
            ui.set_widgets(node["id"], {"vae_name": vae_name})


def _expected_size(workflow: dict) -> int:
    """The saved image's side: the example picture's for a Load Image workflow, else the shrunk size; ×1.5 after
    Upscale Latent By (hires-fix)."""
    types = {n["type"] for n in workflow["nodes"]}
    size = TEST_SIZE if "LoadImage" in types else BROWSER_SIZE
    return round(size / 8 * 1.5) * 8 if "LatentUpscaleBy" in types else size


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_runs_and_shows_its_image(ui, path, flux_arch_vae, example_image, artifacts_dir):  # noqa: F811
    text = path.read_text(encoding="utf-8")
    workflow = json.loads(text)
    ui.drop_workflow(path.name, text)
    ui.fit_view()  # the whole graph on screen: nodes off-canvas are not drawn and would not load their images
    report = ui.load_report(workflow)
    assert not report.problems(), "\n".join(report.problems())

    _shrink(ui, flux_arch_vae, seed=1000 + WORKFLOWS.index(path))
    run = ui.run_from_button()
    errors = [d for t, d in run.events if t == "execution_error"]
    assert run.status == "execution_success", f"{run.status}: {json.dumps(errors)[:3000]}\n" \
                                              f"{ui.server.log_tail()}"
    ran = {str(d) for t, d in run.events if t == "executing" and d is not None}
    cached = {str(n) for t, d in run.events if t == "execution_cached" for n in d.get("nodes", [])}
    real = {str(n["id"]) for n in workflow["nodes"] if n["type"] not in VIRTUAL}
    assert real <= ran | cached, f"nodes that neither ran nor came from the cache: {real - ran - cached}"

    entry = ui.server.history(run.prompt_id)
    assert entry and entry["status"]["status_str"] == "success"
    image_nodes = [n["id"] for n in workflow["nodes"] if n["type"] in IMAGE_NODES]
    assert image_nodes, "every bundled workflow ends in a Save/Preview Image node"
    shown = ui.wait_for_node_images(image_nodes)
    for nid in image_nodes:
        saved = {img["filename"] for img in entry["outputs"][str(nid)]["images"]}
        for img in shown[nid]:
            url = urlparse(img["src"])
            assert url.path.endswith("/view") and parse_qs(url.query)["filename"][0] in saved, img
            assert (img["width"], img["height"]) == (_expected_size(workflow),) * 2, img

    # The pack's web extension shows each reporting node's text on the node: the text of this run (/history).
    # Nodes served from ComfyUI's cache do not execute, send nothing and show nothing (the text encode is shared by
    # several workflows); the decode always runs, as the seed is new for every workflow.
    reporting = [n for n in workflow["nodes"] if n["type"] in REPORTING_NODES and str(n["id"]) in ran]
    assert {"NewBieVAEDecode", "NewBieMemoryPurge"} & {n["type"] for n in workflow["nodes"]} <= \
           {n["type"] for n in reporting}, f"decode/purge did not run: ran {sorted(ran)}"
    for n in reporting:
        expected = "\n".join(entry["outputs"][str(n["id"])]["text"])
        assert ui.node_report_text(n["id"]) == expected, f"node {n['id']} ({n['type']})"
    assert not ui.console_errors(), ui.console_errors()

    ui.fit_view()  # again: the report widgets made some nodes taller
    shot = ui.screenshot(artifacts_dir / f"{path.stem}.png")
    assert shot.stat().st_size > 20_000  # a rendered graph, not a blank page


def test_workflows_are_in_the_template_browser_and_open_from_it(ui, artifacts_dir):
    """Workflow menu → Browse Templates: a category named after the pack (its folder under custom_nodes) in the
    "Custom Nodes" group (frontend 1.27, ComfyUI 0.3.64) or the "Extensions" group (frontend 1.34, ComfyUI 0.4.0),
    one card per workflow; clicking a card loads that workflow."""
    ui.command("Comfy.BrowseTemplates")
    dialog = ui.page.locator(".p-dialog, [role='dialog']").filter(has_text=PACK_NAME).first
    dialog.wait_for(timeout=30_000)
    text = dialog.inner_text().lower()
    assert "custom nodes" in text or "extensions" in text, text[:500]
    dialog.get_by_text(PACK_NAME, exact=True).first.click()
    for path in WORKFLOWS:
        card = dialog.locator(f"[data-testid='template-workflow-{path.stem}']")
        card.wait_for(timeout=10_000)
        assert path.stem.replace("_", " ") in card.inner_text().replace("_", " "), card.inner_text()
    ui.screenshot(artifacts_dir / "template_browser.png")

    basic = WORKFLOWS[[p.stem for p in WORKFLOWS].index("newbie_basic_t2i")]
    dialog.locator(f"[data-testid='template-workflow-{basic.stem}']").click()
    ui.page.wait_for_function("() => app.graph._nodes.some(n => n.type === 'NewBieDiTSampler')", timeout=30_000)
    dialog.wait_for(state="hidden", timeout=10_000)
    report = ui.load_report(json.loads(basic.read_text(encoding="utf-8")))
    assert not report.problems(), "\n".join(report.problems())


def test_pack_web_extension_loads(ui):
    """web/js/newbie.js is served under /extensions/<pack>/ and registers without import errors."""
    names = ui.page.evaluate("() => app.extensions.map(e => e.name)")
    failures = [c for c in ui.console if "Error loading extension" in c]
    assert "NewBie.ShowReport" in names and not failures, failures


def test_load_checks_catch_a_missing_node_and_a_rejected_value(ui, artifacts_dir):
    """The checks above can fail: an unknown node type and a model file the server does not have are reported
    (the frontend's missing-nodes dialog, the placeholder node, the combo value outside the server's list)."""
    workflow = json.loads(WORKFLOWS[0].read_text(encoding="utf-8"))
    broken = copy.deepcopy(workflow)
    loader = next(n for n in broken["nodes"] if n["type"] == "NewBieVAELoader")
    loader["widgets_values"][0] = "not_downloaded.safetensors"
    decode = next(n for n in broken["nodes"] if n["type"] == "NewBieVAEDecode")
    decode["type"] = decode["properties"]["Node name for S&R"] = "NewBieNoSuchNode"
    ui.drop_workflow("broken.json", json.dumps(broken))
    ui.page.locator(".p-dialog").filter(has_text="NewBieNoSuchNode").wait_for(timeout=10_000)
    report = ui.load_report(broken)
    assert report.unregistered == ["NewBieNoSuchNode"]
    assert any("NewBieNoSuchNode" in n for n in report.nodes_with_errors), report.nodes_with_errors
    assert any("not_downloaded.safetensors" in r for r in report.combo_rejections), report.combo_rejections
    assert any("NewBieNoSuchNode" in d for d in report.dialogs), report.dialogs

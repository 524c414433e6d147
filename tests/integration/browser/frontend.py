"""Drive ComfyUI's real web frontend (1.27) in headless Chromium through Playwright, for the browser tests.

    page = ComfyPage.open(browser, server)               # a fresh tab on the server's web UI, app ready
    page.drop_workflow("newbie_basic_t2i.json", text)     # the user's drag-and-drop: a File in a DataTransfer
    report = page.load_report(workflow_json)              # missing node types, rejected widget values, dialogs
    page.set_widgets(6, {"steps": 3})                     # what a user types into a widget
    run = page.run_from_button()                          # clicks Run, waits for the end of that prompt
    page.output_images()                                  # the <img> elements the frontend loaded into nodes

Only the frontend's own paths are used: the document `drop` handler (→ app.handleFile → app.loadGraphData),
the Run button (data-testid="queue-button" → app.queuePrompt → POST /prompt), the api's websocket events,
the images the frontend loads from /view for SaveImage/PreviewImage nodes, and commands (Comfy.Canvas.FitView,
Comfy.BrowseTemplates) through the command store.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser")
# Flags from shared/spec/test-environment.md §5 (Playwright adds --headless and its own defaults).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1920, "height": 1080}
# Settings the page reads at start: no first-run template dialog, and full-detail node drawing at any zoom so a
# fitted screenshot of a whole workflow stays legible (LOD switches to bare boxes below 8 px fonts by default),
# no minimap over the graph.
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "LiteGraph.Canvas.MinFontSizeForLOD": 0,
               "Comfy.Minimap.Visible": False}
# Console errors that every page load of ComfyUI 0.3.64 / frontend 1.27.10 produces in a bare base directory,
# none related to the graph: optional user files (user.css, userdata listings, comfy.templates.json) answer 404,
# the page tries to reach the internet (ERR_NAME_NOT_RESOLVED on this offline machine), and at start-up the
# Comfy.Canvas.NavigationMode setting's onChange sets Comfy.Canvas.LeftMouseClickBehavior before that setting is
# registered (settingStore onChange reads `setting.id` of undefined, inside addSetting).
BENIGN_CONSOLE = ("Failed to load resource: the server responded with a status of 404",
                  "net::ERR_NAME_NOT_RESOLVED", "net::ERR_INTERNET_DISCONNECTED")
BENIGN_PAGE_ERRORS = (("Cannot read properties of undefined (reading 'id')", "addSetting"),)

_RECORDER_JS = """() => {
  if (window.__newbie) return;
  window.__newbie = {events: []};
  for (const t of ['execution_start', 'execution_cached', 'executing', 'executed', 'execution_success',
                   'execution_error', 'execution_interrupted'])
    app.api.addEventListener(t, e => window.__newbie.events.push([t, e.detail ?? null]));
}"""

_NODES_JS = """() => app.graph._nodes.map(n => ({
  id: n.id, type: n.type, has_errors: !!n.has_errors,
  registered: n.type in LiteGraph.registered_node_types,
  category: LiteGraph.registered_node_types[n.type]?.category ?? null,
  widgets: (n.widgets || []).map(w => ({name: w.name, type: w.type, value: w.value,
    options: Array.isArray(w.options?.values) ? w.options.values : null})),
}))"""

_OVERLAYS_JS = """() => {
  const visible = el => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length);
  const text = el => (el.innerText || '').trim().replace(/\\s+/g, ' ').slice(0, 300);
  return {
    dialogs: [...document.querySelectorAll('.p-dialog, [role="dialog"]')].filter(visible).map(text),
    toasts: [...document.querySelectorAll('.p-toast-message')].filter(visible).map(el => ({
      severity: (el.className.match(/p-toast-message-(\\w+)/) || [])[1] || '?', text: text(el)})),
  };
}"""


def find_chromium() -> str | None:
    """Path of a system Chromium ($NEWBIE_CHROMIUM, else `chromium` / `chromium-browser` on PATH), or None."""
    import os

    env = os.environ.get("NEWBIE_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


@dataclass
class LoadReport:
    """What the frontend made of a dropped workflow. `problems()` lists everything a user would see as broken."""

    workflow_types: dict[int, str]           # node id -> type, from the JSON
    unregistered: list[str]                  # JSON types unknown to the page (LiteGraph.registered_node_types)
    nodes_with_errors: list[str]             # page nodes flagged has_errors (missing-node placeholders ...)
    widget_mismatches: list[str]             # page widget value != the JSON's widgets_values entry
    combo_rejections: list[str]              # combo value not among the options the server offers
    missing_nodes: list[int]                 # JSON node ids that are not in the page graph
    links: tuple[int, int]                   # (links in the JSON, links in the page graph)
    dialogs: list[str]                       # visible dialog texts (missing nodes/models, load errors)
    toasts: list[dict]                       # visible toasts (workflow validation warnings, load errors)

    def problems(self) -> list[str]:
        out = [f"node type not registered in the page: {t}" for t in self.unregistered]
        out += [f"node flagged with errors: {n}" for n in self.nodes_with_errors]
        out += self.widget_mismatches + self.combo_rejections
        out += [f"node {i} ({self.workflow_types[i]}) not in the loaded graph" for i in self.missing_nodes]
        if self.links[0] != self.links[1]:
            out.append(f"links: {self.links[0]} in the file, {self.links[1]} in the page")
        out += [f"dialog open: {d}" for d in self.dialogs]
        out += [f"toast ({t['severity']}): {t['text']}" for t in self.toasts]
        return out


@dataclass
class RunResult:
    prompt_id: str
    status: str                               # execution_success | execution_error | execution_interrupted
    events: list[tuple[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class ComfyPage:
    """One browser tab on a ComfyUI server's web UI. Console and page errors are collected in `console`."""

    def __init__(self, page, server):
        self.page, self.server = page, server
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e} | {(e.stack or '')[:1500]}"))

    # ------------------------------------------------------------------------------------------ open / state
    @classmethod
    def open(cls, browser, server, timeout_s: float = 60.0) -> "ComfyPage":
        """New context + tab on server.url, waits until the Vue app, the graph and LiteGraph are up."""
        ctx = browser.new_context(viewport=VIEWPORT)
        self = cls(ctx.new_page(), server)
        self.page.goto(server.url + "/", timeout=timeout_s * 1000)
        self.page.wait_for_function("window.app?.vueAppReady && window.app.graph && window.LiteGraph "
                                    "&& document.querySelector('[data-testid=queue-button]')",
                                    timeout=timeout_s * 1000)
        self.page.evaluate(_RECORDER_JS)
        return self

    def close(self) -> None:
        self.page.context.close()

    def console_errors(self) -> list[str]:
        """Console errors and uncaught page errors, minus the benign ones every bare-server page load shows."""
        return [c for c in self.console if (c.startswith("error:") or c.startswith("pageerror:"))
                and not any(b in c for b in BENIGN_CONSOLE)
                and not any(all(part in c for part in b) for b in BENIGN_PAGE_ERRORS)]

    def command(self, command_id: str) -> None:
        """Run a frontend command (what menu entries and keybindings do)."""
        self.page.evaluate("id => app.extensionManager.command.execute(id)", command_id)

    def fit_view(self) -> None:
        self.command("Comfy.Canvas.FitView")
        self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def screenshot(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path

    # ------------------------------------------------------------------------------------------ load
    def drop_workflow(self, filename: str, text: str, timeout_s: float = 30.0) -> None:
        """Drop a workflow file onto the canvas, as dragging it from a file manager does.

        The document's drop handler (app.ts #addDropHandler) passes the File to app.handleFile, which opens it
        as a new workflow tab named after the file. Waits until that tab is active and its graph is configured."""
        before = self.page.evaluate("() => app.graph._nodes.length")
        transfer = self.page.evaluate_handle(
            """([name, text]) => { const dt = new DataTransfer();
                 dt.items.add(new File([text], name, {type: 'application/json'})); return dt; }""", [filename, text])
        self.page.dispatch_event("#graph-canvas", "drop", {"dataTransfer": transfer})
        stem = filename.rsplit(".", 1)[0]
        try:
            self.page.wait_for_function(
                """([stem, n]) => app.extensionManager.workflow.activeWorkflow?.filename === stem
                     && app.graph._nodes.length === n""",
                arg=[stem, len(json.loads(text)["nodes"])], timeout=timeout_s * 1000)
        except Exception as e:  # noqa: BLE001  (a Playwright timeout: say what the page shows instead)
            now = self.page.evaluate("() => [app.extensionManager.workflow.activeWorkflow?.filename, "
                                     "app.graph._nodes.length]")
            raise AssertionError(f"dropping {filename} did not open it (active workflow, nodes: {now}, "
                                 f"before: {before}); overlays: {self.overlays()}; console: "
                                 f"{self.console_errors()[-10:]}") from e
        self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def nodes(self) -> list[dict]:
        """[{id, type, has_errors, registered, category, widgets: [{name, type, value, options}]}] of the graph."""
        return self.page.evaluate(_NODES_JS)

    def overlays(self) -> dict:
        """{"dialogs": [text], "toasts": [{severity, text}]}: what is visibly open over the canvas."""
        return self.page.evaluate(_OVERLAYS_JS)

    def load_report(self, workflow: dict) -> LoadReport:
        """Compare the page graph with the workflow file it was loaded from (see LoadReport)."""
        page_nodes = {n["id"]: n for n in self.nodes()}
        registered = set(self.page.evaluate("() => Object.keys(LiteGraph.registered_node_types)"))
        types = {n["id"]: n["type"] for n in workflow["nodes"]}
        mismatches, rejections = [], []
        for jn in workflow["nodes"]:
            pn = page_nodes.get(jn["id"])
            values = jn.get("widgets_values")
            if pn is None or not isinstance(values, list):
                continue
            label = f"node {jn['id']} ({jn['type']})"
            widgets = pn["widgets"]
            if len(widgets) < len(values):
                mismatches.append(f"{label}: {len(values)} widget values in the file, {len(widgets)} widgets "
                                  f"in the page {[w['name'] for w in widgets]}")
            for w, v in zip(widgets, values):
                if not _same(w["value"], v):
                    mismatches.append(f"{label} widget {w['name']}: file {v!r}, page {w['value']!r}")
            for w in widgets:
                if w["type"] == "combo" and w["options"] is not None and w["value"] not in w["options"]:
                    rejections.append(f"{label} widget {w['name']}: {w['value']!r} is not an option the server "
                                      f"offers {w['options'][:8]}")
        overlays = self.overlays()
        return LoadReport(
            workflow_types=types,
            unregistered=sorted({t for t in types.values() if t not in registered}),
            nodes_with_errors=[f"{n['id']} ({n['type']})" for n in page_nodes.values() if n["has_errors"]],
            widget_mismatches=mismatches, combo_rejections=rejections,
            missing_nodes=sorted(i for i in types if i not in page_nodes),
            links=(len(workflow.get("links", [])), self.page.evaluate("() => app.graph.links.size ?? "
                                                                      "Object.keys(app.graph.links).length")),
            dialogs=overlays["dialogs"], toasts=overlays["toasts"])

    # ------------------------------------------------------------------------------------------ edit / run
    def set_widgets(self, node_id: int, values: dict[str, Any]) -> None:
        """Set widget values on a node (as typing into them does) and mark the graph changed."""
        missing = self.page.evaluate(
            """([id, values]) => { const n = app.graph.getNodeById(id); const missing = [];
                 for (const [k, v] of Object.entries(values)) {
                   const w = n.widgets?.find(w => w.name === k);
                   if (!w) { missing.push(k); continue; }
                   w.value = v; w.callback?.(v, app.canvas, n);
                 }
                 app.graph.setDirtyCanvas(true, true); return missing; }""", [node_id, values])
        assert not missing, f"node {node_id} has no widget(s) {missing}"

    def run_from_button(self, timeout_s: float = 180.0) -> RunResult:
        """Click the Run button and wait until the server reports the end of the prompt it queued.

        Raises AssertionError with the node errors / dialogs when the prompt is rejected, and with the server
        log tail on a timeout."""
        n_before = self.page.evaluate("() => window.__newbie.events.length")
        t0 = time.monotonic()
        self.page.click("[data-testid='queue-button']")
        try:
            self.page.wait_for_function(
                """n => window.__newbie.events.slice(n).some(e => e[0] === 'execution_start')
                     || Object.keys(app.lastNodeErrors ?? {}).length > 0
                     || document.querySelector('.p-dialog')""", arg=n_before, timeout=30_000)
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"Run did not start a prompt within 30 s; server log:\n"
                                 f"{self.server.log_tail()}") from e
        errors = self.page.evaluate("() => app.lastNodeErrors")
        started = self.page.evaluate("n => window.__newbie.events.slice(n).find(e => e[0] === 'execution_start')",
                                     n_before)
        if started is None:
            raise AssertionError(f"the prompt was rejected: node errors {json.dumps(errors)[:3000]}; "
                                 f"overlays {self.overlays()}")
        pid = started[1]["prompt_id"]
        try:
            # The end of a prompt: its execution_success/_error/_interrupted, then `executing` null (queue idle).
            self.page.wait_for_function(
                """([n, pid]) => { const ev = window.__newbie.events.slice(n);
                     const end = ev.findIndex(e => ['execution_success', 'execution_error',
                       'execution_interrupted'].includes(e[0]) && e[1]?.prompt_id === pid);
                     return end >= 0 && ev.slice(end).some(e => e[0] === 'executing' && e[1] === null); }""",
                arg=[n_before, pid], timeout=timeout_s * 1000, polling=200)
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"prompt {pid} did not finish within {timeout_s:.0f} s; events "
                                 f"{[ev[0] for ev in self.events(n_before)]}; server log:\n"
                                 f"{self.server.log_tail()}") from e
        events = self.events(n_before)
        status = next(t for t, d in events if t in ("execution_success", "execution_error", "execution_interrupted")
                      and (d or {}).get("prompt_id") == pid)
        return RunResult(pid, status, events, time.monotonic() - t0)

    def events(self, start: int = 0) -> list[tuple[str, Any]]:
        return [tuple(e) for e in self.page.evaluate("n => window.__newbie.events.slice(n)", start)]

    def node_outputs(self) -> dict:
        """app.nodeOutputs: what the frontend received in `executed` messages, by node id."""
        return self.page.evaluate("() => JSON.parse(JSON.stringify(app.nodeOutputs))")

    def wait_for_node_images(self, node_ids: list[int], timeout_s: float = 30.0) -> dict[int, list[dict]]:
        """Wait until every node in node_ids shows its images, return {id: [{src, width, height}]}.

        These are the <img> elements the frontend itself loads from /view and draws inside the node (node.imgs);
        nodes outside the visible canvas are not drawn and load nothing, hence fit_view() before running."""
        js = """ids => ids.every(id => { const imgs = app.graph.getNodeById(id)?.imgs;
                  return imgs?.length && imgs.every(i => i.complete && i.naturalWidth > 0); })"""
        try:
            self.page.wait_for_function(js, arg=node_ids, timeout=timeout_s * 1000)
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"no image shown in node(s) {node_ids} within {timeout_s:.0f} s; frontend "
                                 f"outputs: {self.node_outputs()}") from e
        return {int(k): v for k, v in self.page.evaluate(
            """ids => Object.fromEntries(ids.map(id => [id, app.graph.getNodeById(id).imgs.map(i =>
                 ({src: i.src, width: i.naturalWidth, height: i.naturalHeight}))]))""", node_ids).items()}

    def node_report_text(self, node_id: int) -> str | None:
        """The text the pack's web extension (web/js/newbie.js) shows on a node after it ran, or None."""
        return self.page.evaluate(
            "id => app.graph.getNodeById(id)?.widgets?.find(w => w.name === 'newbie_report')?.value ?? null",
            node_id)

"""Convert a UI-format (litegraph) workflow, as saved by the ComfyUI frontend, into the API format of POST /prompt.

    api = ui_to_api(json.load(open("workflows/x.json")), server.object_info())

UI format: ``nodes[]`` (``id``, ``type``, ``mode``, ``inputs[]`` with ``name``/``link``/``widget``, ``outputs[]``,
``widgets_values``) and ``links[]`` as ``[id, from_node, from_slot, to_node, to_slot, type]``.
API format: ``{"<id>": {"class_type": type, "inputs": {name: value | ["<src id>", src_slot]}}}``.

Rules (what frontend 1.27's graphToPrompt does, for the cases our workflows use):

1. Skipped nodes: ``Note``, ``MarkdownNote``, ``Reroute``, ``PrimitiveNode`` (virtual, frontend-only), and nodes
   with ``mode`` 2 (muted/"never") or 4 (bypassed). Links out of a muted node are dropped; a bypassed node
   passes through: a link from its output k is followed back to its first input of the same type (the one at
   slot k preferred), as the frontend does. Reroutes are followed to their source.
2. Widget values: ``widgets_values`` is a list in widget order. Walk ``/object_info[type].input_order``
   (required, then optional; hidden never) and take one value per *widget input*: a combo (type is a list, or
   "COMBO" for V3 nodes), INT, FLOAT, STRING or BOOLEAN, unless it has ``forceInput`` (socket only).
   Socket-only types (MODEL, IMAGE, ...) take no value.
3. Extra frontend-only widget values, consumed and dropped:
   - ``control_after_generate`` ("fixed"/"increment"/"decrement"/"randomize") follows any INT or combo whose
     object_info options have ``control_after_generate`` true, and, when the option is absent, any INT named
     ``seed`` or ``noise_seed`` (legacy convention the frontend keeps);
   - an upload button value ("image"/"video"/"audio") follows a combo with ``image_upload``/... true.
   A dict ``widgets_values`` (some custom nodes) is read by name.
4. Links win over widget values: an input with ``link`` set (sockets, or widgets converted to inputs)
   becomes ``[src_id, src_slot]``; when the source is a PrimitiveNode, its ``widgets_values[0]`` is inlined.
Subgraphs (frontend >= 1.24 ``definitions.subgraphs``) are not supported: ValueError.
"""
from __future__ import annotations

from typing import Any

VIRTUAL_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED, BYPASSED = 2, 4
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
LEGACY_SEED_NAMES = ("seed", "noise_seed")
UPLOAD_KEYS = {"image_upload": "image", "video_upload": "video", "audio_upload": "audio"}


def _spec(info: dict, name: str) -> tuple[Any, dict]:
    for section in ("required", "optional"):
        if name in info["input"].get(section, {}):
            spec = info["input"][section][name]
            return spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    raise KeyError(name)


def _is_widget(typ: Any, opts: dict) -> bool:
    if opts.get("forceInput"):
        return False
    typ = opts.get("widgetType", typ)
    return isinstance(typ, list) or typ in WIDGET_TYPES


def _has_control(name: str, typ: Any, opts: dict) -> bool:
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return typ == "INT" and name in LEGACY_SEED_NAMES


def widget_inputs(info: dict) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of the inputs that own a slot in widgets_values, in order."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    out = []
    for name in order.get("required", []) + order.get("optional", []):
        typ, opts = _spec(info, name)
        if _is_widget(typ, opts):
            out.append((name, typ, opts))
    return out


def map_widgets(info: dict, values: list | dict | None, node_label: str = "?") -> dict[str, Any]:
    """Map a node's widgets_values onto input names (rules 2 and 3)."""
    widgets = widget_inputs(info)
    if isinstance(values, dict):
        return {n: values[n] for n, _, _ in widgets if n in values}
    values = list(values or [])
    out, i = {}, 0
    for name, typ, opts in widgets:
        if i >= len(values):
            break  # older workflows may lack trailing (newer, optional) widgets
        out[name] = values[i]
        i += 1
        if _has_control(name, typ, opts) and i < len(values) and isinstance(values[i], str):
            i += 1
        for key, marker in UPLOAD_KEYS.items():
            if opts.get(key) and i < len(values) and values[i] == marker:
                i += 1
    if i < len(values):
        raise ValueError(f"node {node_label}: {len(values) - i} unmapped widget value(s) {values[i:]!r} "
                         f"(widgets: {[w[0] for w in widgets]})")
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """Convert a UI workflow to an API graph using /object_info of the server that will run it."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise ValueError("subgraphs are not supported by this converter")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for ln in workflow.get("links", []):
        if isinstance(ln, dict):  # some exporters write link objects
            ln = [ln["id"], ln["origin_id"], ln["origin_slot"], ln["target_id"], ln["target_slot"], ln.get("type")]
        links[ln[0]] = ln

    def resolve(link_id: int, depth: int = 0) -> tuple[str, Any] | None:
        """('link', [id, slot]) | ('value', v) | None (dropped)."""
        if depth > 64:
            raise ValueError("link cycle through reroutes/bypassed nodes")
        _, src_id, src_slot, *_ = links[link_id]
        src = nodes[src_id]
        typ, mode = src["type"], src.get("mode", 0)
        if typ == "PrimitiveNode":
            return ("value", (src.get("widgets_values") or [None])[0])
        if typ == "Reroute":
            up = (src.get("inputs") or [{}])[0].get("link")
            return resolve(up, depth + 1) if up is not None else None
        if mode == MUTED:
            return None
        if mode == BYPASSED:
            out_type = (src.get("outputs") or [])[src_slot].get("type") if src.get("outputs") else None
            cands = [(k, inp) for k, inp in enumerate(src.get("inputs") or [])
                     if inp.get("link") is not None and inp.get("type") == out_type]
            cands.sort(key=lambda c: c[0] != src_slot)
            return resolve(cands[0][1]["link"], depth + 1) if cands else None
        return ("link", [str(src_id), src_slot])

    api: dict[str, dict] = {}
    for nid, node in nodes.items():
        typ = node["type"]
        if typ in VIRTUAL_TYPES or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        if typ not in object_info:
            raise KeyError(f"node {nid}: type {typ!r} is not registered on the server")
        info = object_info[typ]
        inputs = map_widgets(info, node.get("widgets_values"), f"{nid} ({typ})")
        for inp in node.get("inputs") or []:
            name = (inp.get("widget") or {}).get("name", inp["name"])
            if inp.get("link") is None:
                continue
            got = resolve(inp["link"])
            if got is not None:
                inputs[name] = got[1]
            elif not inp.get("widget"):
                inputs.pop(name, None)  # socket fed by a muted node: left unconnected
        api[str(nid)] = {"class_type": typ, "inputs": inputs}
    return api

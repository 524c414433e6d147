// Shows the text a NewBie node reports (ui.text: purge report, cache hits, decode notes) on the node itself.
// ComfyUI's frontend draws `text` only on its own Preview Any node; this small extension does it for ours.
//
// Only the documented extension API: `app` from scripts/app.js, registerExtension + beforeRegisterNodeDef, the
// node's onExecuted callback and its addDOMWidget (or plain addWidget) method. No ComfyWidgets, no scripts/ui.js,
// no extensions/core/* (the imports newer frontends flag as deprecated), no reaching into widget internals.
// Everything is feature-detected and guarded: on a frontend without one of these the report is simply not drawn
// (it is still the purge node's second output and in the server log), and nothing else breaks.
import { app } from "../../../scripts/app.js";

const WIDGET = "newbie_report";

function reportWidget(node) {
  const existing = node.widgets?.find((w) => w.name === WIDGET);
  if (existing) return existing;
  let widget = null;
  if (typeof node.addDOMWidget === "function") {
    const box = document.createElement("textarea");
    box.readOnly = true;
    box.rows = 4;
    box.style.cssText = "width:100%;box-sizing:border-box;opacity:0.75;font-size:11px;resize:vertical";
    widget = node.addDOMWidget(WIDGET, "newbie_report", box, {
      serialize: false,
      getValue: () => box.value,
      setValue: (v) => { box.value = v; },
    });
  } else if (typeof node.addWidget === "function") {
    widget = node.addWidget("text", WIDGET, "", () => {}, { serialize: false });
  }
  if (widget) widget.serialize = false; // never saved into the workflow's widgets_values
  return widget;
}

app.registerExtension({
  name: "NewBie.ShowReport",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("NewBie")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (!text) return;
      try {
        const widget = reportWidget(this);
        if (!widget) return;
        widget.value = Array.isArray(text) ? text.join("\n") : String(text);
        this.setSize?.([this.size[0], Math.max(this.size[1], this.computeSize?.()[1] ?? 0)]);
        this.setDirtyCanvas?.(true, true);
      } catch (err) {
        console.warn("[NewBie] could not show the node report:", err);
      }
    };
  },
});

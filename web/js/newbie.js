// Shows the text a NewBie node reports (ui.text: purge report, cache hits, decode notes) on the node itself.
// ComfyUI's frontend draws `text` only on its own Preview Any node; this small extension does it for ours.
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

app.registerExtension({
  name: "NewBie.ShowReport",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("NewBie")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (!text) return;
      let widget = this.widgets?.find((w) => w.name === "newbie_report");
      if (!widget) {
        widget = ComfyWidgets["STRING"](this, "newbie_report", ["STRING", { multiline: true }], app).widget;
        widget.inputEl.readOnly = true;
        widget.inputEl.style.opacity = 0.75;
        widget.serialize = false;
      }
      widget.value = Array.isArray(text) ? text.join("\n") : String(text);
      requestAnimationFrame(() => {
        this.setSize([this.size[0], this.computeSize()[1]]);
        app.graph.setDirtyCanvas(true, false);
      });
    };
  },
});

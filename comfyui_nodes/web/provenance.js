// provenance-guard: draws the verdict and the closest matches on the Provenance Check node after it runs.
// Text from the index (captions, urls) is untrusted: it is only ever set as textContent, links only for
// http(s) urls, opened in a new tab. On a front end without DOM widgets, the node is just tinted.
import { app } from "../../scripts/app.js";

const COLORS = { pass: "#2e7d32", warn: "#b26a00", block: "#b71c1c", unchecked: "#616161" };

function el(tag, text, style) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (style) Object.assign(e.style, style);
  return e;
}

function safeLink(url) {
  const a = el("a", url.length > 80 ? url.slice(0, 79) + "…" : url);
  if (/^https?:\/\//i.test(url)) {
    a.href = url;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
  }
  a.style.color = "#8ab4f8";
  return a;
}

function render(payload) {
  const root = el("div", null, { font: "12px sans-serif", color: "#ddd", overflowY: "auto", maxHeight: "260px",
                                 padding: "4px" });
  (payload.images || []).forEach((img, i) => {
    const head = el("div", `image ${i}: ${String(img.verdict).toUpperCase()}` +
      (img.max_score === null || img.max_score === undefined ? "" : `  max ${Number(img.max_score).toFixed(4)}`),
      { fontWeight: "bold", color: COLORS[img.verdict] || "#ddd", marginTop: "4px" });
    root.appendChild(head);
    if (img.error) root.appendChild(el("div", img.error, { color: "#ef9a9a" }));
    const list = el("ol", null, { margin: "2px 0 2px 18px", padding: "0" });
    (img.matches || []).forEach((m) => {
      const li = el("li");
      li.appendChild(el("span", `${Number(m.score).toFixed(4)} ${m.verdict} `));
      if (m.url) li.appendChild(safeLink(String(m.url)));
      if (m.caption) li.appendChild(el("div", m.caption, { color: "#aaa", whiteSpace: "normal" }));
      list.appendChild(li);
    });
    root.appendChild(list);
  });
  return root;
}

app.registerExtension({
  name: "provenance-guard.ProvenanceCheck",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== "ProvenanceCheck") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const payload = message?.provenance?.[0];
      if (!payload) return;
      this.bgcolor = COLORS[payload.verdict] || this.bgcolor;
      if (typeof this.addDOMWidget !== "function") return;
      const content = render(payload);
      if (this._provenanceWidget) {
        this._provenanceWidget.element.replaceChildren(content);
      } else {
        const holder = el("div");
        holder.appendChild(content);
        this._provenanceWidget = this.addDOMWidget("provenance_report", "provenance", holder, { serialize: false });
      }
      this.setDirtyCanvas?.(true, true);
    };
  },
});

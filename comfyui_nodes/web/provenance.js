// provenance-guard: draws the verdict and the closest matches on the Provenance Check node after it runs,
// and for a match verified on pixels the generated and the training image side by side.
// Text from the index (captions, urls) is untrusted: it is only ever set as textContent, links only for
// http(s) urls, opened in a new tab. On a front end without DOM widgets, the node is just tinted.
import { app } from "../../scripts/app.js";

// Node tint (dark) and text colour (light) per verdict: text drawn on the tinted node must stay readable.
const COLORS = { pass: "#2e7d32", warn: "#b26a00", block: "#b71c1c", unchecked: "#616161" };
const TEXT = { pass: "#a5d6a7", warn: "#ffe082", block: "#ffcdd2", unchecked: "#e0e0e0" };
const LINE_PX = 16;
const MAX_PX = 420;
const EVIDENCE_PX = 120;

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
  // Fills the height the node gives the widget and scrolls beyond it: nothing spills out of the node.
  const root = el("div", null, { font: `12px/${LINE_PX}px sans-serif`, color: "#eee", overflowY: "auto",
                                 height: "100%", padding: "4px", boxSizing: "border-box" });
  (payload.images || []).forEach((img, i) => {
    const head = el("div", `image ${i}: ${String(img.verdict).toUpperCase()}` +
      (img.max_score === null || img.max_score === undefined ? "" : `  max ${Number(img.max_score).toFixed(4)}`),
      { fontWeight: "bold", color: TEXT[img.verdict] || "#eee", marginTop: "4px" });
    root.appendChild(head);
    if (img.error) root.appendChild(el("div", img.error, { color: "#ffcdd2" }));
    const mem = memorizationLine(img.memorization);
    if (mem) root.appendChild(el("div", mem, { color: "#ddd" }));
    const list = el("ol", null, { margin: "2px 0 2px 18px", padding: "0" });
    (img.matches || []).forEach((m) => {
      const li = el("li");
      li.appendChild(el("span", `${Number(m.score).toFixed(4)} ${m.verdict} `));
      if (m.url) li.appendChild(safeLink(String(m.url)));
      if (m.caption) li.appendChild(el("div", m.caption, { color: "#ccc", whiteSpace: "normal" }));
      if (m.verification) {
        li.appendChild(el("div", m.verification.summary,
                          { color: m.verification.status === "copy" ? "#a5d6a7" : "#bbb", whiteSpace: "normal" }));
      }
      // The generated image and the training image side by side, made by the pack (a data: URI, never a url).
      if (typeof m.evidence === "string" && m.evidence.startsWith("data:image/jpeg;base64,")) {
        const img = el("img", null, { display: "block", maxWidth: "100%", maxHeight: `${EVIDENCE_PX}px`,
                                      margin: "2px 0" });
        img.src = m.evidence;
        img.alt = "evidence: the training image (and, unless strict, your image beside it)";
        li.appendChild(img);
      }
      list.appendChild(li);
    });
    root.appendChild(list);
  });
  return root;
}

// The sampler's memorization signal (Memorization Monitor) in a few words, or "" when none was recorded.
function memorizationLine(m) {
  if (!m || typeof m !== "object") return "";
  if (m.memorization_score === null || m.memorization_score === undefined) {
    return m.reason ? `memorization: ${m.verdict} (${m.reason})` : "";
  }
  const threshold = m.threshold === null || m.threshold === undefined ? "" : ` (threshold ${m.threshold})`;
  return `memorization: ${Number(m.memorization_score).toFixed(4)} ${m.verdict}${threshold}`;
}

// The widget's height before the browser lays it out, from the text (about CHARS_PER_LINE characters fit
// a line of a default-width node), capped so a long batch scrolls inside the node instead of growing it.
const CHARS_PER_LINE = 42;
function reportHeight(payload) {
  const lines = (text) => Math.max(1, Math.ceil(String(text).length / CHARS_PER_LINE));
  let total = 0;
  let pixels = 0;
  (payload.images || []).forEach((img) => {
    total += 1 + (img.error ? lines(img.error) : 0) + (memorizationLine(img.memorization) ? 1 : 0);
    (img.matches || []).forEach((m) => {
      total += lines(`${m.score} ${m.verdict} ${m.url || ""}`) + (m.caption ? lines(m.caption) : 0);
      if (m.verification) total += lines(m.verification.summary || "");
      if (m.evidence) pixels += EVIDENCE_PX + 4;
    });
  });
  return Math.min(MAX_PX, total * LINE_PX + pixels + 16);
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
      this._provenanceHeight = reportHeight(payload);
      if (this._provenanceWidget) {
        this._provenanceWidget.element.replaceChildren(content);
      } else {
        const holder = el("div", null, { height: "100%" });
        holder.appendChild(content);
        this._provenanceWidget = this.addDOMWidget("provenance_report", "provenance", holder, {
          serialize: false, getMinHeight: () => this._provenanceHeight });
      }
      // Grow the node to hold the report (never shrink what the user sized); older front ends skip this.
      if (typeof this.computeSize === "function" && typeof this.setSize === "function") {
        const want = this.computeSize();
        this.setSize([Math.max(this.size[0], want[0]), Math.max(this.size[1], want[1])]);
      }
      this.setDirtyCanvas?.(true, true);
    };
  },
});

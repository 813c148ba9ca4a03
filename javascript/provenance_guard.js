// provenance-guard (A1111/Forge): the panel in the Provenance Guard accordion lists each image's verdict and closest training
// images. It is drawn from the generation's own info (the hidden generation_info textbox the webui fills for
// this browser's run: extra_generation_params["Provenance results"]), so it always belongs to the gallery
// above it and never to another user's or an API client's run. Every text goes in as text (textContent),
// never as HTML: LAION captions carry markup; only http(s) links become links.
(function () {
    const TABS = ["txt2img", "img2img"];
    const drawn = {};

    function generationInfo(tab) {
        const el = gradioApp().querySelector(`#generation_info_${tab} textarea`);
        return el ? el.value : "";
    }

    function resultsOf(text) {
        try {
            const info = JSON.parse(text);
            const raw = info && info.extra_generation_params && info.extra_generation_params["Provenance results"];
            return raw ? JSON.parse(raw) : null;
        } catch (e) {
            return null;
        }
    }

    function el(tag, className, text) {
        const node = document.createElement(tag);
        if (className) node.className = className;
        if (text !== undefined && text !== null) node.textContent = String(text);
        return node;
    }

    function httpUrl(url) {
        try {
            const parsed = new URL(String(url));
            return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
        } catch (e) {
            return null;
        }
    }

    function score(value) {
        return typeof value === "number" ? value.toFixed(4) : "-";
    }

    function render(panel, results) {
        panel.textContent = "";
        if (!Array.isArray(results) || !results.length) return;
        const box = el("div", "provenance-guard-panel");
        results.forEach(function (r) {
            const item = el("div", `pg-result pg-${r.verdict}`);
            item.appendChild(el("b", null, `image ${r.index + 1}: ${String(r.verdict).toUpperCase()}`));
            item.appendChild(el("span", null, ` max similarity ${score(r.max_score)}`));
            if (r.error) item.appendChild(el("div", "pg-error", r.error));
            const mem = r.memorization;
            if (mem && typeof mem === "object" && mem.memorization_score !== null && mem.memorization_score !== undefined) {
                item.appendChild(el("div", "pg-memorization",
                                    `memorization ${Number(mem.memorization_score).toFixed(4)} ${mem.verdict}`));
            } else if (mem && typeof mem === "object" && mem.reason) {
                item.appendChild(el("div", "pg-memorization", `memorization ${mem.verdict}: ${mem.reason}`));
            }
            (r.warnings || []).forEach(function (w) { item.appendChild(el("div", "pg-warning", w)); });
            const list = el("ol");
            (r.matches || []).forEach(function (m) {
                const li = el("li", `pg-${m.verdict}`);
                li.appendChild(el("b", null, score(m.score)));
                li.appendChild(el("span", "pg-verdict", ` ${m.verdict} `));
                const href = httpUrl(m.url);
                if (href) {
                    const a = el("a", null, m.url);
                    a.href = href;
                    a.target = "_blank";
                    a.rel = "noopener noreferrer";
                    li.appendChild(a);
                } else if (m.url) {
                    li.appendChild(el("span", null, m.url));
                }
                if (m.caption) li.appendChild(el("q", null, m.caption));
                li.appendChild(el("small", null, ` ${m.bundle}#${m.row_id}`));
                if (m.verification) li.appendChild(el("div", `pg-check pg-check-${m.verification.status}`,
                                                      m.verification.summary));
                // The generated and the training image side by side: a data: URI the extension made, never a url.
                if (typeof m.evidence === "string" && m.evidence.startsWith("data:image/jpeg;base64,")) {
                    const img = el("img", "pg-evidence");
                    img.src = m.evidence;
                    img.alt = "evidence: the training image (and, unless strict, your image beside it)";
                    li.appendChild(img);
                }
                list.appendChild(li);
            });
            if (list.childNodes.length) item.appendChild(list);
            box.appendChild(item);
        });
        panel.appendChild(box);
    }

    function refresh(tab) {
        const panel = gradioApp().querySelector(`#provenance_guard_panel_${tab}`);
        if (!panel) return;
        const text = generationInfo(tab);
        if (text === drawn[tab]) return; // the info area changed (a run started, an image was picked): same run
        drawn[tab] = text;
        render(panel, resultsOf(text));
    }

    onUiLoaded(function () {
        TABS.forEach(function (tab) {
            drawn[tab] = generationInfo(tab);
            const generate = gradioApp().getElementById(`${tab}_generate`);
            if (generate) {
                generate.addEventListener("click", function () {
                    const panel = gradioApp().querySelector(`#provenance_guard_panel_${tab}`);
                    if (panel) panel.textContent = ""; // a new run: the last run's matches go
                });
            }
        });
    });
    onAfterUiUpdate(function () {
        TABS.forEach(refresh);
    });
})();

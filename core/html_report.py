"""The batch gate's report.html: one self-contained file (no external asset; images inlined as data URIs,
a Content-Security-Policy that forbids loading anything) with one row per flagged image — its thumbnail,
verdict, prompt, and its matches (score, caption, url; for a match verified on pixels the generated image
and the training image side by side with the matched region outlined and the matched points joined; else
the training image's thumbnail when it is on this machine) — and a filter by verdict. Every text from
images and indices is escaped.
"""
from __future__ import annotations

import base64
import html
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from .policy import fmt_threshold
from .report import match_html, short
from .result import CheckResult

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
VERDICT_ORDER = ("block", "warn", "unchecked", "pass")


@dataclass
class ReportRow:
    result: CheckResult
    image: Optional[Union[str, Path]] = None
    match_images: dict[tuple[str, int], Path] = field(default_factory=dict)


def thumbnail(image, size: int = 160) -> Optional[str]:
    """A JPEG data URI of an image file or PIL image, at most size pixels on its longer side."""
    from PIL import Image

    try:
        img = Image.open(image) if not isinstance(image, Image.Image) else image
        img = img.convert("RGB")
        img.thumbnail((size, size))
    except (OSError, ValueError, SyntaxError):
        return None
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def local_reference(bundle, match) -> Optional[Path]:
    """The training/reference image of a match when it is on this machine."""
    from .references import local_path

    return local_path(bundle, match)


def render(rows: list[ReportRow], checked: int, title: str = "provenance-guard report",
           include_passing: bool = False) -> str:
    counts = Counter(r.result.verdict for r in rows)
    shown = [r for r in rows if include_passing or r.result.verdict != "pass"]
    shown.sort(key=lambda r: (VERDICT_ORDER.index(r.result.verdict) if r.result.verdict in VERDICT_ORDER else 9,
                              -(r.result.max_score or -2)))
    body = []
    for row in shown:
        r = row.result
        thumb = thumbnail(row.image) if row.image else None
        image_cell = (f'<img src="{thumb}" alt="">' if thumb else "") + \
            f'<div class="path">{html.escape(str(row.image or r.image.get("source", "")))}</div>'
        score = "-" if r.max_score is None else f"{r.max_score:.4f}"
        verdict = html.escape(r.verdict)
        matches = "".join(match_html(m, thumbnail(row.match_images[(m.bundle_id, m.row_id)], 96)
                                     if (m.bundle_id, m.row_id) in row.match_images and not
                                     (m.verification and m.verification.evidence) else None)
                          for m in r.matches[:5])
        error = f'<div class="error">{html.escape(short(r.error, 400))}</div>' if r.error else ""
        prompt = html.escape(short(r.generation.prompt, 400)) if r.generation and r.generation.prompt else ""
        body.append(f'<tr class="v-{verdict}" data-verdict="{verdict}"><td>{image_cell}</td>'
                    f'<td class="verdict">{verdict.upper()}<br><span>{score}</span>{error}</td>'
                    f'<td><ol>{matches}</ol></td><td class="prompt">{prompt}</td></tr>')
    buttons = [f'<button data-filter="all" class="on">all shown ({len(shown)})</button>'] + [
        f'<button data-filter="{v}">{v} ({counts.get(v, 0)})</button>' for v in VERDICT_ORDER
        if counts.get(v) and (include_passing or v != "pass")]
    summary = ", ".join(f"{counts[v]} {v}" for v in VERDICT_ORDER if counts.get(v))
    bundles = sorted({f"{t.bundle_id} v{t.bundle_version} (warn {fmt_threshold(t.warn)}, block {fmt_threshold(t.block)})"
                      for r in rows for t in r.result.thresholds})
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>{html.escape(title)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }} .meta {{ color: #555; margin-bottom: 12px; }}
button {{ margin: 0 4px 12px 0; padding: 4px 10px; border: 1px solid #bbb; background: #f6f6f6; border-radius: 4px;
         cursor: pointer; }} button.on {{ background: #333; color: #fff; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ border-bottom: 1px solid #ddd; padding: 8px;
         vertical-align: top; text-align: left; }}
td img {{ max-width: 160px; display: block; }} .path {{ font-size: 11px; color: #666; word-break: break-all; }}
.verdict {{ font-weight: 700; white-space: nowrap; }} .verdict span {{ font-weight: 400; }}
tr.v-block .verdict {{ color: #c62828; }} tr.v-warn .verdict {{ color: #ef6c00; }}
tr.v-unchecked .verdict {{ color: #616161; }} tr.v-pass .verdict {{ color: #2e7d32; }}
ol {{ margin: 0; padding-left: 18px; }} li {{ margin-bottom: 6px; }} li img {{ max-height: 64px; float: left;
         margin-right: 8px; }} li::after {{ content: ""; display: block; clear: both; }}
q {{ color: #555; }} .error {{ color: #c62828; font-weight: 400; max-width: 240px; }}
li img.pg-evidence {{ max-height: none; max-width: 480px; float: none; display: block; margin: 4px 0; }}
.pg-check {{ font-size: 12px; color: #333; }} .pg-check-copy {{ color: #2e7d32; }}
.pg-check-different {{ color: #616161; }} .pg-check-unavailable {{ color: #999; }}
.prompt {{ max-width: 320px; color: #333; }} small {{ color: #888; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="meta">{checked} image(s) checked: {html.escape(summary or "none")}.
Bundles: {html.escape("; ".join(bundles) or "-")}.</div>
<div>{"".join(buttons)}</div>
<table><thead><tr><th>image</th><th>verdict</th><th>closest training images</th><th>prompt</th></tr></thead>
<tbody>{"".join(body) or '<tr><td colspan="4">No image was flagged.</td></tr>'}</tbody></table>
<script>
document.querySelectorAll("button[data-filter]").forEach(function (b) {{
  b.addEventListener("click", function () {{
    document.querySelectorAll("button[data-filter]").forEach(function (x) {{ x.classList.remove("on"); }});
    b.classList.add("on");
    var f = b.getAttribute("data-filter");
    document.querySelectorAll("tbody tr[data-verdict]").forEach(function (tr) {{
      tr.style.display = (f === "all" || tr.getAttribute("data-verdict") === f) ? "" : "none";
    }});
  }});
}});
</script>
</body></html>
"""


def write(path: Union[str, Path], rows: list[ReportRow], checked: int, **kw) -> Path:
    from .record import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, render(rows, checked, **kw).encode("utf-8"))
    return path

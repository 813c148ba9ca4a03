"""The batch gate's report.html (``provenance-guard check --report``): one self-contained file, viewable
offline, that stays small for large batches.

This module owns the page: what goes on it, how it is sorted, how big it may grow, and reading the prompt
an image carries for it. The wording and escaping of one match (match_html, safe_href, short) stay in
core/report.py, shared with the hosts.

- A summary table first: one row per listed image (file name, verdict, max score, top match, prompt),
  sorted worst first on the server (block, then unchecked — a check that could not run is a failure —
  then warn, then pass; by score within a verdict), so it reads without JavaScript; a small inline script
  re-sorts it by verdict or score when a header is clicked and filters by verdict.
- Then one section per listed image: matches at or above the warn threshold (their verdict is warn or
  block, or their score reaches the warn threshold of their bundle) with thumbnails — the checked image,
  and the training image when it is on this machine or its pixel evidence when it was verified; matches
  below warn are one collapsed line each, no picture. An image with no match at or above warn has no
  picture at all.
- Thumbnails are small JPEG data URIs (THUMB_SIZE px on the longer side, JPEG_QUALITY), decoded under the
  same pixel and byte caps as checked images (core.images.open_image); once the pictures reach
  IMAGE_BUDGET bytes, further ones are replaced by a line saying so (the worst images come first).
- Prompts: the check's generation record, else the image's own provenance record (PNG chunk or sidecar),
  else the host's infotext (A1111 ``parameters``, ComfyUI ``prompt`` graph). Every one is hostile data:
  read under size caps (compressed chunks inflate to at most Pillow's 1 MiB text-chunk limit, through
  core.record.png_text_chunks), never raising; an absent, damaged or oversized one shows "—".
- Everything from images and indices is escaped; only http(s) URLs are linked. A Content-Security-Policy
  allows no fetch at all: images only as data: URIs, the one inline style and script by their hashes.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union
from collections.abc import Callable

from .policy import BLOCK, PASS, UNCHECKED, VIEWS_MEANING, WARN, fmt_threshold
from .report import match_html, safe_href, short, verification_line
from .result import CheckResult, Match

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .bundle import Bundle
    from .references import ReferenceOptions

# Server-side order, worst first. An unchecked image is a failure (nothing is known about it; the batch exits
# with its own code for it), so it comes right after the blocks, before the warns.
VERDICT_ORDER = (BLOCK, UNCHECKED, WARN, PASS)
SEVERITY = {BLOCK: 3, UNCHECKED: 2, WARN: 1, PASS: 0}  # what a click on the verdict header sorts by

TOP = 5                    # matches listed per image
THUMB_SIZE = 160           # px, longer side of every thumbnail
EVIDENCE_BOX = (480, 160)  # px, the side-by-side pixel evidence of a verified match is fitted into this
JPEG_QUALITY = 70
IMAGE_BUDGET = 3 << 20     # bytes of pictures (data URIs) in one report; past it, a line instead
MAX_EVIDENCE_CHARS = 8 << 20  # a larger evidence picture is left out unread
MAX_SOURCE_BYTES = 256 << 10  # the most text of one chunk or sidecar read for a prompt; larger ones are skipped
MAX_PROMPT_CHARS = 32_768  # a longer "prompt" is not one: shown as "—"
NONE = "—"

ImageSource = Union[str, os.PathLike, bytes, "Image.Image"]


@dataclass
class ReportRow:
    """One checked image: its result, its file (None: not listed with pictures) and the training images of
    its matches found on this machine, by (bundle id, row id)."""

    result: CheckResult
    image: str | Path | None = None
    match_images: dict[tuple[str, int], Path] = field(default_factory=dict)
    credentials: str | None = None  # the image's Content Credentials, in one line (check --require/--sign)


# pictures ---------------------------------------------------------------------------------------------------

def thumbnail(image: ImageSource, size: int = THUMB_SIZE, quality: int = JPEG_QUALITY,
              box: tuple[int, int] | None = None) -> str | None:
    """A JPEG data URI of an image (a file, encoded bytes or a PIL image) at most size px on its longer side
    (or within box, width x height), upright (EXIF orientation applied), transparency flattened on white;
    None when it cannot be read. Files and bytes are decoded under the pixel cap and decode budget of checked
    images (core.images.open_image)."""
    from PIL import Image, ImageOps

    from .images import open_image

    try:
        img = image if isinstance(image, Image.Image) else open_image(image)
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001 - a damaged EXIF block leaves the image as stored
            pass
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        img = img.convert("RGB")
        img.thumbnail(box or (size, size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality, optimize=True)
    except Exception:  # noqa: BLE001 - an unreadable picture is left out of the report, never the report
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def local_reference(bundle: Bundle, match: Match, options: ReferenceOptions | None = None) -> Path | None:
    """The training/reference image of a match when it is on this machine: in the bundle's image folder (or
    the folder options.root names), else, when reference fetching is on, the copy a verification fetched
    into the reference cache. Nothing is fetched here."""
    from .references import ENV_CACHE, ReferenceCache, local_path

    path = local_path(bundle, match, options.root if options else None)
    if path is not None or options is None or not options.fetch:
        return path
    url = match.url if isinstance(match.url, str) else ""
    if not url.lower().startswith(("http://", "https://")):
        return None
    folder = Path(options.cache_dir or os.environ.get(ENV_CACHE)
                  or "~/.cache/provenance-guard/references").expanduser()
    cached = ReferenceCache(folder, options.cache_bytes).path(url)
    return cached if cached.is_file() else None


def _evidence(uri: str) -> str | None:
    """A verified match's side-by-side picture (a data: URI the check made) re-encoded to fit EVIDENCE_BOX, or
    None when it is not a picture."""
    head, _, data = uri.partition(",")
    if not head.startswith("data:image/") or not head.endswith(";base64") or len(uri) > MAX_EVIDENCE_CHARS:
        return None
    try:
        raw = base64.b64decode(data)
    except ValueError:
        return None
    return thumbnail(raw, box=EVIDENCE_BOX)


class _Budget:
    """Bytes of pictures the page may still take, and how many were left out once they were spent."""

    def __init__(self, limit: int):
        self.limit = self.left = limit
        self.left_out = 0

    def picture(self, draw: Callable[[Any], str | None], source: Any) -> tuple[str | None, str]:
        """(data URI, "") of what draw(source) makes while the budget has room for it; (None, a line saying so) once
        the budget is spent (nothing more is drawn then); (None, "") when draw makes nothing."""
        if self.left > 0:
            uri = draw(source)
            if uri is None:
                return None, ""
            if len(uri) <= self.left:
                self.left -= len(uri)
                return uri, ""
            self.left = 0
        self.left_out += 1
        return None, (f'<div class="left-out">picture left out: the report\'s picture budget '
                      f'({self.limit / 2**20:g} MiB) is spent</div>')


# text ---------------------------------------------------------------------------------------------------------

# Control characters and bidirectional overrides: a file name or prompt could otherwise reorder the text
# around it. Tabs and line breaks stay (short() folds them into spaces).
_INVISIBLE = dict.fromkeys([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0), 0x200E,
                            0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)])


def _text(value: Any, width: int) -> str:
    """value as escaped HTML text of at most width characters, control and bidi characters removed."""
    text = str(value if value is not None else "").translate(_INVISIBLE)
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates (from JSON) cannot be written
    return html.escape(short(text, width))


def _score(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else NONE


def _sort_score(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -9.0


# prompts ------------------------------------------------------------------------------------------------------

def _prompt_text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip() and len(value) <= MAX_PROMPT_CHARS:
        return value.strip()
    return None


def _record_prompt(text: str) -> str | None:
    """The prompt in one of our provenance records (a check-result, or a check-batch whose entries agree)."""
    data = json.loads(text)
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("records"), list):
        found = {_generation_prompt(r) for r in data["records"][:256]} - {None}
        return found.pop() if len(found) == 1 else None
    return _generation_prompt(data)


def _generation_prompt(record: Any) -> str | None:
    generation = record.get("generation") if isinstance(record, dict) else None
    return _prompt_text(generation.get("prompt")) if isinstance(generation, dict) else None


def a1111_prompt(text: str) -> str | None:
    """The prompt of A1111/Forge infotext: the text before "Negative prompt:" and the "Steps: ..." line."""
    text = text.replace("\r\n", "\n")
    if text.startswith(("Negative prompt:", "Steps:")):
        return None
    cut = len(text)
    for marker in ("\nNegative prompt:", "\nSteps:"):
        at = text.find(marker)
        if at != -1:
            cut = min(cut, at)
    return _prompt_text(text[:cut])


def _comfyui_prompt(text: str) -> str | None:
    from .record import parse_comfyui_prompt

    graph = json.loads(text)
    return _prompt_text(parse_comfyui_prompt(graph).prompt) if isinstance(graph, dict) else None


def _read_capped(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SOURCE_BYTES + 1)
    except OSError:
        return None
    return data.decode("utf-8") if len(data) <= MAX_SOURCE_BYTES else None


def image_prompt(image: str | Path) -> tuple[str | None, str]:
    """(prompt, where it was read) of an image file: its provenance record (PNG chunk, then sidecar), else
    A1111's ``parameters`` text, else ComfyUI's ``prompt`` graph. Never raises: whatever is damaged,
    hostile or over MAX_SOURCE_BYTES is skipped, and (None, "") means nothing usable was found."""
    from .record import RECORD_KEY, png_text_chunks, sidecar_path

    path = Path(image)
    try:
        chunks = png_text_chunks(path)  # bounded: inflates at most 1 MiB a chunk, 16 MiB of text in all
    except Exception:  # noqa: BLE001 - an unreadable file has no prompt
        chunks = {}
    sources = (("provenance record", lambda: chunks.get(RECORD_KEY), _record_prompt),
               ("provenance sidecar", lambda: _read_capped(sidecar_path(path)), _record_prompt),
               ("A1111 parameters", lambda: chunks.get("parameters"), a1111_prompt),
               ("ComfyUI graph", lambda: chunks.get("prompt"), _comfyui_prompt))
    for where, read, parse in sources:
        try:
            text = read()
            if isinstance(text, str) and len(text) <= MAX_SOURCE_BYTES:
                prompt = parse(text)
                if prompt:
                    return prompt, where
        except Exception:  # noqa: BLE001 - a damaged or hostile record gives no prompt, never an error
            continue
    return None, ""


def row_prompt(row: ReportRow) -> tuple[str | None, str]:
    """The prompt shown for a row: the check's generation record, else what the image file carries."""
    generation = row.result.generation
    prompt = _prompt_text(getattr(generation, "prompt", None))
    if prompt:
        return prompt, "generation record"
    return image_prompt(row.image) if row.image is not None else (None, "")


# the page -----------------------------------------------------------------------------------------------------

def at_or_above_warn(result: CheckResult, m: Match) -> bool:
    """Whether a match reaches warn: its verdict is warn or block (after any verification), or its score
    reaches the warn threshold of its bundle."""
    if m.verdict in (WARN, BLOCK):
        return True
    warn = next((t.warn for t in result.thresholds if t.bundle_id == m.bundle_id), None)
    return isinstance(warn, (int, float)) and isinstance(m.score, (int, float)) and m.score >= warn


def _rank(verdict: str) -> int:
    return VERDICT_ORDER.index(verdict) if verdict in VERDICT_ORDER else VERDICT_ORDER.index(UNCHECKED)


def _name(row: ReportRow, n: int) -> tuple[str, str]:
    """(file name, full path) of a row's image."""
    source = str(row.image if row.image is not None else row.result.image.get("source") or "")
    return (Path(source).name or source or f"image {n + 1}"), source


def _below_line(m: Match) -> str:
    """A match below warn: one line, no picture."""
    href = safe_href(m.url)
    url = _text(m.url, 70)
    link = f'<a href="{href}" target="_blank" rel="noopener noreferrer">{url}</a>' if href else url
    check = verification_line(m)
    return (f'<li class="pg-{_text(m.verdict, 20)}"><b>{_score(m.score)}</b> {_text(m.verdict, 20)} {link} '
            f'<q>{_text(m.caption, 90)}</q> <small>{_text(m.bundle_id, 60)}#{_text(m.row_id, 20)}</small>'
            + (f" <small>{_text(check, 160)}</small>" if check else "") + "</li>")


def _detail(n: int, row: ReportRow, name: str, source: str, prompt: tuple[str | None, str],
            budget: _Budget) -> str:
    r = row.result
    verdict = _text(r.verdict, 20)
    listed = r.matches[:TOP]
    flagged = [m for m in listed if at_or_above_warn(r, m)]
    below = [m for m in listed if not at_or_above_warn(r, m)]
    unlisted = sum(at_or_above_warn(r, m) for m in r.matches[TOP:])
    parts = [f'<section class="detail v-{verdict}" id="pg-d{n}" data-verdict="{verdict}">',
             (f'<h2><span class="verdict">{verdict.upper()}</span> <span class="score">max {_score(r.max_score)}'
              f'</span> {_text(name, 120)} <a class="up" href="#pg-summary" title="back to the summary">&#8593;</a>'
              f'</h2><div class="path">{_text(source, 400)}</div>')]
    text, where = prompt
    shown = f"<small>({_text(where, 40)})</small> {_text(text, 600)}" if text else NONE
    parts.append(f'<div class="prompt"><b>prompt</b> {shown}</div>')
    if r.error:
        parts.append(f'<div class="error">{_text(r.error, 400)}</div>')
    notes = [w for w in r.warnings if not (r.error and r.error in w)][:5]
    if notes:
        parts.append("<ul class=\"notes\">" + "".join(f"<li>{_text(w, 300)}</li>" for w in notes) + "</ul>")
    if flagged:
        figure = ""
        if row.image is not None:
            own, figure = budget.picture(thumbnail, row.image)
            if own:
                figure = (f'<figure><img src="{own}" alt="the checked image"><figcaption>checked image</figcaption>'
                          f'</figure>')
        items = []
        for m in flagged:
            v = m.verification
            ref, note = None, ""
            if v is not None and v.evidence:
                evidence, note = budget.picture(_evidence, v.evidence)
                m = replace(m, verification=replace(v, evidence=evidence))
            elif (m.bundle_id, m.row_id) in row.match_images:
                ref, note = budget.picture(thumbnail, row.match_images[(m.bundle_id, m.row_id)])
            item = match_html(m, ref)
            items.append(item[:-len("</li>")] + note + "</li>" if note and item.endswith("</li>") else item)
        parts.append(f'<div class="flagged">{figure}<ol class="matches">{"".join(items)}</ol></div>')
    if unlisted:
        parts.append(f'<div class="left-out">{unlisted} more match(es) at or above warn not listed '
                     f'(the JSON results list them all)</div>')
    if below:
        top = max((m.score for m in below if isinstance(m.score, (int, float))), default=None)
        more = "more " if flagged else ""
        parts.append(f'<details><summary>{len(below)} {more}match{"es" if len(below) != 1 else ""} below warn '
                     f'(max {_score(top)})</summary><ol class="below">{"".join(_below_line(m) for m in below)}'
                     f'</ol></details>')
    parts.append("</section>")
    return "".join(parts)


def _summary_row(n: int, row: ReportRow, name: str, source: str, prompt: str | None,
                 credentials: bool = False) -> str:
    r = row.result
    verdict = _text(r.verdict, 20)
    top = r.top
    top_cell = (f'<span title="{_text(top.caption, 200)}">{_text(top.bundle_id, 60)}#{_text(top.row_id, 20)}</span>'
                if top else NONE)
    return (f'<tr class="v-{verdict}" data-verdict="{verdict}" data-severity="{SEVERITY.get(r.verdict, 2)}" '
            f'data-score="{_sort_score(r.max_score):.6f}" data-order="{n}">'
            f'<td class="name"><a href="#pg-d{n}" title="{_text(source, 400)}">{_text(name, 80)}</a></td>'
            f'<td class="verdict">{verdict.upper()}</td><td class="num">{_score(r.max_score)}</td>'
            f'<td>{top_cell}</td><td class="prompt">{_text(prompt, 90) if prompt else NONE}</td>'
            + (f'<td class="cred">{_text(row.credentials, 160) if row.credentials else NONE}</td>'
               if credentials else "")
            + '</tr>')


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; } .meta { color: #555; margin-bottom: 12px; }
[hidden] { display: none !important; }
.filter button { margin: 0 4px 12px 0; padding: 4px 10px; border: 1px solid #bbb; background: #f6f6f6;
  border-radius: 4px; cursor: pointer; } .filter button.on { background: #333; color: #fff; }
table { border-collapse: collapse; width: 100%; margin-bottom: 24px; }
td, th { border-bottom: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: left; }
th button { font: inherit; font-weight: 700; border: 0; background: none; padding: 0; cursor: pointer; }
th[aria-sort=descending] button::after { content: " \\25BE"; }
th[aria-sort=ascending] button::after { content: " \\25B4"; }
td.num { font-variant-numeric: tabular-nums; } td.name { word-break: break-all; }
.verdict { font-weight: 700; white-space: nowrap; }
.v-block .verdict { color: #c62828; } .v-warn .verdict { color: #ef6c00; }
.v-unchecked .verdict { color: #6a1b9a; } .v-pass .verdict { color: #2e7d32; }
.prompt { color: #333; } td.prompt { max-width: 360px; }
section.detail { border-top: 1px solid #ccc; padding: 8px 0 12px; }
section.detail h2 { font-size: 15px; margin: 0; font-weight: 400; } .score { color: #555; }
a.up { text-decoration: none; color: #888; }
.path { font-size: 11px; color: #666; word-break: break-all; }
.error { color: #c62828; } .notes { margin: 4px 0; color: #555; } .left-out { color: #888; font-style: italic; }
.flagged { display: flex; gap: 12px; align-items: flex-start; margin-top: 6px; }
figure { margin: 0; } figure img { display: block; max-width: 160px; } figcaption { font-size: 11px; color: #666; }
ol { margin: 0; padding-left: 18px; } li { margin-bottom: 6px; }
ol.matches li img { max-height: 160px; max-width: 160px; float: left; margin-right: 8px; }
ol.matches li::after { content: ""; display: block; clear: both; }
ol.matches li img.pg-evidence { max-height: none; max-width: 480px; float: none; display: block; margin: 4px 0; }
details { margin-top: 4px; color: #555; } summary { cursor: pointer; } ol.below li { margin-bottom: 2px; }
q { color: #555; } small { color: #888; }
.pg-check { font-size: 12px; color: #333; } .pg-check-copy { color: #2e7d32; }
.pg-check-different { color: #616161; } .pg-check-unavailable { color: #999; }
"""

SCRIPT = """
(function () {
  "use strict";
  var each = function (list, fn) { Array.prototype.forEach.call(list, fn); };
  var body = document.getElementById("pg-rows");
  var rows = Array.prototype.slice.call(body.querySelectorAll("tr[data-verdict]"));
  var heads = document.querySelectorAll("th[data-sort]");
  var num = function (tr, key) { var v = parseFloat(tr.getAttribute("data-" + key)); return isNaN(v) ? -9 : v; };
  each(heads, function (th) {
    th.querySelector("button").addEventListener("click", function () {
      var key = th.getAttribute("data-sort");
      var dir = th.getAttribute("aria-sort") === "descending" ? 1 : -1;
      rows.sort(function (a, b) {
        return dir * (num(a, key) - num(b, key)) || num(a, "order") - num(b, "order");
      });
      each(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", dir < 0 ? "descending" : "ascending");
      rows.forEach(function (tr) { body.appendChild(tr); });
    });
  });
  var bar = document.getElementById("pg-filter");
  var buttons = bar.querySelectorAll("button[data-filter]");
  var items = document.querySelectorAll("[data-verdict]");
  bar.hidden = false;
  each(buttons, function (b) {
    b.addEventListener("click", function () {
      var f = b.getAttribute("data-filter");
      each(buttons, function (x) {
        x.classList.toggle("on", x === b);
        x.setAttribute("aria-pressed", String(x === b));
      });
      each(items, function (el) { el.hidden = !(f === "all" || el.getAttribute("data-verdict") === f); });
    });
  });
})();
"""


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def content_security_policy() -> str:
    """Nothing is fetched: images only as data: URIs, the page's own style and script by their hashes."""
    return (f"default-src 'none'; img-src data:; style-src {_hash(STYLE)}; script-src {_hash(SCRIPT)}; "
            f"base-uri 'none'; form-action 'none'")


VIEWS_LABEL = {"whole": "whole image", "multi": f"multi-view ({VIEWS_MEANING['multi']})"}


def render(rows: list[ReportRow], checked: int, title: str = "provenance-guard report",
           include_passing: bool = False, image_budget: int = IMAGE_BUDGET) -> str:
    """The page for a batch: rows are every checked image; the ones listed are those not passing (all of
    them with include_passing)."""
    counts = Counter(r.result.verdict for r in rows)
    shown = [r for r in rows if include_passing or r.result.verdict != PASS]
    named = [(row,) + _name(row, n) for n, row in enumerate(shown)]
    named.sort(key=lambda x: (_rank(x[0].result.verdict), -_sort_score(x[0].result.max_score), x[1], x[2]))
    budget = _Budget(image_budget)
    summary, details = [], []
    for n, (row, name, source) in enumerate(named):
        try:
            prompt = row_prompt(row)
        except Exception:  # noqa: BLE001 - belt and braces: a prompt never costs the report
            prompt = (None, "")
        summary.append(_summary_row(n, row, name, source, prompt[0], any(r.credentials for r in rows)))
        details.append(_detail(n, row, name, source, prompt, budget))
    buttons = [(f'<button type="button" data-filter="all" class="on" aria-pressed="true">all listed '
                f'({len(shown)})</button>')] + [
        f'<button type="button" data-filter="{v}" aria-pressed="false">{v} ({counts.get(v, 0)})</button>'
        for v in VERDICT_ORDER if counts.get(v) and (include_passing or v != PASS)]
    tally = ", ".join(f"{counts[v]} {v}" for v in VERDICT_ORDER if counts.get(v))
    bundles = sorted({f"{t.bundle_id} v{t.bundle_version} (warn {fmt_threshold(t.warn)}, "
                      f"block {fmt_threshold(t.block)})" for r in rows for t in r.result.thresholds})
    used = sorted({VIEWS_LABEL.get(r.result.views, r.result.views) for r in rows if r.result.views})
    queried = f" Queried as: {_text(' and '.join(used), 200)}." if used else ""
    listed = "every image" if include_passing else "the images not passing (--report-all lists every image)"
    left_out = (f" {budget.left_out} picture(s) left out: the picture budget ({image_budget / 2**20:g} MiB) was "
                f"spent on the worst images first." if budget.left_out else "")
    empty = '<tr><td colspan="5">No image was flagged.</td></tr>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{content_security_policy()}">
<meta name="referrer" content="no-referrer">
<title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="meta">{checked} image(s) checked: {html.escape(tally or "none")}. Listed: {listed}, worst first.
Pictures only for matches at or above warn.{left_out}
Bundles: {_text("; ".join(bundles) or NONE, 2000)}.{queried}</div>
<div class="filter" id="pg-filter" hidden>{"".join(buttons)}</div>
<table id="pg-summary"><thead><tr><th>image</th>
<th data-sort="severity" aria-sort="descending"><button type="button">verdict</button></th>
<th data-sort="score"><button type="button">max score</button></th><th>top match</th><th>prompt</th>{
    "<th>credentials</th>" if any(r.credentials for r in rows) else ""}</tr></thead>
<tbody id="pg-rows">{"".join(summary) or empty}</tbody></table>
{"".join(details)}
<script>{SCRIPT}</script>
</body></html>
"""


def write(path: str | Path, rows: list[ReportRow], checked: int, **kw: Any) -> Path:
    """Write the report atomically; returns its path."""
    from .record import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, render(rows, checked, **kw).encode("utf-8", "replace"))
    return path

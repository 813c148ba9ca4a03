"""What a person reads about a result: one-line summaries, the message a blocked image carries, and the
matches as escaped HTML. Every host (ComfyUI node, A1111 extension, batch report) uses these, so the
wording and the escaping live in one place. Captions and URLs come from the index (LAION captions hold
HTML): the HTML helpers escape every one of them and only link http(s) URLs.
"""
from __future__ import annotations

import html
from typing import Optional
from urllib.parse import urlparse

from .policy import BLOCK, UNCHECKED, WARN, reaches
from .result import CheckResult, Match


def is_flagged(result: CheckResult, level: str = BLOCK) -> bool:
    """True when the result's verdict reaches level (a fail-closed failure is a block)."""
    return reaches(result.verdict, level)


def short(text: Optional[str], width: int = 80) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def match_line(m: Match) -> str:
    return f"{m.score:.4f} {m.verdict} {m.bundle_id}#{m.row_id} {short(m.url, 70)} {short(m.caption, 70)!r}"


def summary_line(result: CheckResult, label: str = "") -> str:
    head = f"{label}: " if label else ""
    if result.verdict == UNCHECKED:
        return f"{head}UNCHECKED — {short(result.error, 160)}"
    score = "-" if result.max_score is None else f"{result.max_score:.4f}"
    top = f"; closest {match_line(result.top)}" if result.top else ""
    return f"{head}{result.verdict.upper()} (max {score}){top}"


def block_message(result: CheckResult) -> str:
    """The notice a blocked image carries: what happened and what to try."""
    if result.error:
        return (f"Blocked: the image could not be checked ({short(result.error, 200)}) and the fail mode is closed. "
                f"Fix the check or set the fail mode to open.")
    top = result.top
    where = f" — closest training image: {short(top.caption, 100)!r} ({short(top.url, 100)}) in {top.bundle_id}" if top else ""
    threshold = next((t.block for t in result.thresholds if top and t.bundle_id == top.bundle_id), None)
    limit = f" (block threshold {threshold:.2f})" if threshold is not None else ""
    return (f"Blocked: too close to a known training image, similarity {result.max_score:.3f}{limit}{where}. "
            f"Try another seed, a different prompt or less img2img strength.")


def text_report(results: list[CheckResult], top: int = 3) -> str:
    """Plain-text report of a batch (what a node's STRING output or a log shows)."""
    lines = []
    for n, r in enumerate(results):
        lines.append(summary_line(r, f"image {n}"))
        for m in r.matches[:top]:
            lines.append(f"    {match_line(m)}")
        lines += [f"    ! {w}" for w in r.warnings]
    return "\n".join(lines)


def safe_href(url: Optional[str]) -> Optional[str]:
    """The URL when it is http(s) (never javascript:, data: ...), escaped for an attribute; else None."""
    if not url:
        return None
    try:
        scheme = urlparse(str(url).strip()).scheme.lower()
    except ValueError:
        return None
    return html.escape(str(url).strip(), quote=True) if scheme in ("http", "https") else None


def match_html(m: Match, thumbnail: Optional[str] = None) -> str:
    """One match as an HTML list item; every text escaped, links open in a new tab."""
    href = safe_href(m.url)
    url = html.escape(short(m.url, 90))
    link = f'<a href="{href}" target="_blank" rel="noopener noreferrer">{url}</a>' if href else url
    thumb = f'<img src="{html.escape(thumbnail, quote=True)}" alt="" loading="lazy">' if thumbnail else ""
    return (f'<li class="pg-{html.escape(m.verdict)}">{thumb}<b>{m.score:.4f}</b> '
            f'<span class="pg-verdict">{html.escape(m.verdict)}</span> {link} '
            f'<q>{html.escape(short(m.caption, 160))}</q> <small>{html.escape(m.bundle_id)}#{m.row_id}</small></li>')


def result_html(result: CheckResult, top: int = 5) -> str:
    """A result as an HTML fragment (verdict, score, matches), fully escaped."""
    score = "-" if result.max_score is None else f"{result.max_score:.4f}"
    head = (f'<div class="pg-result pg-{html.escape(result.verdict)}"><b>{html.escape(result.verdict.upper())}</b> '
            f'max similarity {score}')
    if result.error:
        head += f' <span class="pg-error">{html.escape(short(result.error, 300))}</span>'
    items = "".join(match_html(m) for m in result.matches[:top])
    return head + (f"<ol>{items}</ol>" if items else "") + "</div>"


def worst_of(results: list[CheckResult]) -> str:
    order = {UNCHECKED: -1, "pass": 0, WARN: 1, BLOCK: 2}
    return max((r.verdict for r in results), key=lambda v: order.get(v, -1), default="pass")


def placeholder_image(width: int, height: int, message: str):
    """A black image of the given size carrying message as text (what a blocked image is replaced by)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (max(1, int(width)), max(1, int(height))), "black")
    draw = ImageDraw.Draw(img)
    size = max(10, min(img.width, img.height) // 28)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        font = ImageFont.load_default()
    chars = max(12, int(img.width / (size * 0.6)) - 2)
    y = size
    for line in textwrap.wrap(" ".join(str(message).split()), chars)[: max(1, img.height // (size + 4) - 1)]:
        draw.text((size // 2, y), line, fill=(230, 230, 230), font=font)
        y += size + 4
    return img

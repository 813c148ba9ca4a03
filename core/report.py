"""What a person reads about a result: one-line summaries, the message a blocked image carries, and the
matches as escaped HTML. Every host (ComfyUI node, A1111 extension, batch report) uses these, so the
wording and the escaping live in one place. Captions and URLs come from the index (LAION captions hold
HTML): the HTML helpers escape every one of them and only link http(s) URLs.
"""
from __future__ import annotations

import html
from urllib.parse import urlparse

from .policy import BLOCK, UNCHECKED, WARN, fmt_threshold, reaches
from .result import CheckResult, Match


def is_flagged(result: CheckResult, level: str = BLOCK) -> bool:
    """True when the result's verdict reaches level (a fail-closed failure is a block)."""
    return reaches(result.verdict, level)


def short(text: str | None, width: int = 80) -> str:
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


def _raised_by_prompt(result: CheckResult) -> bool:
    """A block no match reached: the prompt side raised it (memorization signal, duplicated caption)."""
    return not (result.top is not None and result.top.verdict == BLOCK) and result.prompt is not None


def block_message(result: CheckResult) -> str:
    """The notice a blocked image carries: what happened and what to try."""
    if result.error:
        return (f"Blocked: the image could not be checked ({short(result.error, 200)}) and the fail mode is closed. "
                f"Fix the check or set the fail mode to open.")
    top = result.top
    if _raised_by_prompt(result):
        return ("Blocked: the prompt looks memorized (the sampler's memorization signal or a duplicated training "
                "caption). Try a different prompt.")
    where = f" — closest training image: {short(top.caption, 100)!r} ({short(top.url, 100)}) in {top.bundle_id}" if top else ""
    threshold = next((t.block for t in result.thresholds if top and t.bundle_id == top.bundle_id), None)
    limit = f" (block threshold {fmt_threshold(threshold)})" if threshold is not None else ""
    score = f", similarity {result.max_score:.3f}" if isinstance(result.max_score, (int, float)) else ""
    return (f"Blocked: too close to a known training image{score}{limit}{where}. "
            f"Try another seed, a different prompt, or (img2img) another input image or more denoising.")


def result_payload(result: CheckResult, top: int = 5) -> dict:
    """A result as the host UIs draw it (ComfyUI's node, the webuis' panel): raw strings, which the
    front-ends insert as text; a verified match carries its side-by-side evidence as a data: URI."""
    matches = []
    for m in result.matches[:top]:
        item = {"score": round(m.score, 4), "verdict": m.verdict, "url": m.url, "caption": m.caption,
                "bundle": m.bundle_id, "row_id": m.row_id}
        if m.verification is not None:
            item["verification"] = {"status": m.verification.status, "summary": verification_line(m)}
            if m.verification.evidence:
                item["evidence"] = m.verification.evidence
        matches.append(item)
    return {"verdict": result.verdict, "max_score": result.max_score, "error": result.error,
            "warnings": list(result.warnings), "matches": matches,
            "memorization": result.prompt.to_json() if result.prompt is not None else None}


def text_report(results: list[CheckResult], top: int = 3) -> str:
    """Plain-text report of a batch (what a node's STRING output or a log shows)."""
    lines = []
    for n, r in enumerate(results):
        lines.append(summary_line(r, f"image {n}"))
        for m in r.matches[:top]:
            lines.append(f"    {match_line(m)}")
        memo = memorization_line(r)
        if memo:
            lines.append(f"    {memo}")
        lines += [f"    ! {w}" for w in r.warnings]
    return "\n".join(lines)


def memorization_line(result: CheckResult) -> str | None:
    """'memorization 1.0030 flag (threshold 0.0010, sd1)', or None when no score was measured."""
    p = result.prompt
    if p is None or p.memorization_score is None:
        return None
    against = f"threshold {p.threshold:.4f}" if p.threshold is not None else "no threshold for this model"
    return f"memorization {p.memorization_score:.4f} {p.verdict} ({against}{', ' + p.family if p.family else ''})"


def safe_href(url: str | None) -> str | None:
    """The URL when it is http(s) (never javascript:, data: ...), escaped for an attribute; else None."""
    if not url:
        return None
    try:
        scheme = urlparse(str(url).strip()).scheme.lower()
    except ValueError:
        return None
    return html.escape(str(url).strip(), quote=True) if scheme in ("http", "https") else None


def verification_line(m: Match) -> str:
    """What the pixel comparison found, in a few words ("" when none ran)."""
    v = m.verification
    if v is None:
        return ""
    if v.status == "unavailable":
        return f"not verified on pixels: {short(v.reason, 160)}"
    how = f"{v.inliers} matched points" if v.method == "sift" else f"correlation {v.ncc:.2f}" if v.ncc is not None else v.method
    changed = f"; the score alone said {m.clip_verdict}" if m.clip_verdict else ""
    return f"pixels: {v.status} ({how}{', mirrored' if v.mirrored else ''}){changed}"


def match_html(m: Match, thumbnail: str | None = None) -> str:
    """One match as an HTML list item; every text escaped, links open in a new tab; a verified match shows
    its side-by-side evidence (a data: URI made here, never a URL from the index)."""
    href = safe_href(m.url)
    url = html.escape(short(m.url, 90))
    link = f'<a href="{href}" target="_blank" rel="noopener noreferrer">{url}</a>' if href else url
    thumb = f'<img src="{html.escape(thumbnail, quote=True)}" alt="" loading="lazy">' if thumbnail else ""
    check = ""
    v = m.verification
    if v is not None:
        evidence = (f'<img class="pg-evidence" src="{html.escape(v.evidence, quote=True)}" alt="generated image and '
                    f'training image side by side">' if v.evidence and v.evidence.startswith("data:image/") else "")
        check = (f'<div class="pg-check pg-check-{html.escape(v.status)}">{html.escape(verification_line(m))}</div>'
                 + evidence)
    return (f'<li class="pg-{html.escape(m.verdict)}">{thumb}<b>{m.score:.4f}</b> '
            f'<span class="pg-verdict">{html.escape(m.verdict)}</span> {link} '
            f'<q>{html.escape(short(m.caption, 160))}</q> <small>{html.escape(m.bundle_id)}#{m.row_id}</small>'
            f'{check}</li>')


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


# What a batch's one-line summary leads with: an unchecked image outranks passing ones.
_SUMMARY_ORDER = {BLOCK: 3, WARN: 2, UNCHECKED: 1, "pass": 0}


def batch_summary(results: list[CheckResult]) -> str:
    """A batch in a few words: its most serious verdict and how many images have it ("block 1 of 3")."""
    if not results:
        return ""
    top = max((r.verdict for r in results), key=lambda v: _SUMMARY_ORDER.get(v, -1))
    return f"{top} {sum(r.verdict == top for r in results)} of {len(results)}"


SHORT_BLOCK_NOTICES = ("Blocked: too close to a known training image", "Blocked")
SHORT_FAILURE_NOTICES = ("Blocked: provenance check could not run", "Provenance check could not run",
                         "Check could not run", "Not checked")
SHORT_PROMPT_NOTICES = ("Blocked: the prompt looks memorized", "Prompt looks memorized", "Blocked")


def short_notices(result: CheckResult) -> tuple[str, ...]:
    """The shorter notices a small placeholder falls back to, saying the real reason: a check that could
    not run is never called "too close to a known training image"."""
    if result.error:
        return SHORT_FAILURE_NOTICES
    if _raised_by_prompt(result):
        return SHORT_PROMPT_NOTICES
    return SHORT_BLOCK_NOTICES


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 (the webuis pin 9.5) has one fixed-size bitmap font
        return ImageFont.load_default()


_PLAIN = str.maketrans({"\u2014": "-", "\u2013": "-", "\u2026": "...", "\u2018": "'", "\u2019": "'",
                        "\u201c": '"', "\u201d": '"', "\u00a0": " "})


def _drawable(text: str, font) -> str:
    """text as the font can draw it: the bitmap default font of Pillow < 10.1 knows latin-1 only (a dash in
    a message, or a caption in another script, would raise UnicodeEncodeError)."""
    from PIL import ImageFont

    if isinstance(font, ImageFont.ImageFont):  # the bitmap font, not FreeType
        return text.translate(_PLAIN).encode("latin-1", "replace").decode("latin-1")
    return text


def _wrap(draw, text: str, font, width: int) -> list[str] | None:
    """Words of text in lines no wider than width pixels, or None when a single word does not fit."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if draw.textlength(trial, font=font) <= width:
            line = trial
            continue
        if not line or draw.textlength(word, font=font) > width:
            return None
        lines.append(line)
        line = word
    if line:
        lines.append(line)
    return lines


def fit_notice(width: int, height: int, message: str,
               shorter: tuple[str, ...] = SHORT_BLOCK_NOTICES) -> tuple[int, list[str]]:
    """(font size, lines) of the longest notice that fits a width x height image whole, at the largest
    size that fits: the full message, else each of ``shorter`` in turn; (0, []) when nothing fits."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    margin = max(1, min(width, height) // 24)
    inner_w, inner_h = width - 2 * margin, height - 2 * margin
    largest = max(6, min(width, height) // 16)
    for text in (" ".join(str(message).split()),) + tuple(shorter):
        size = largest
        while size >= 6:
            font = _font(size)
            lines = _wrap(draw, _drawable(text, font), font, inner_w)
            line_h = size + max(1, size // 4)
            if lines and len(lines) * line_h <= inner_h:
                return size, lines
            size = size - 1 if size <= 12 else int(size * 0.85)
    return 0, []


def placeholder_image(width: int, height: int, message: str, shorter: tuple[str, ...] = SHORT_BLOCK_NOTICES):
    """A black image of the given size carrying message as text (what a blocked image is replaced by). The
    notice is fitted to the size: whole words only, else the first of ``shorter`` that fits (pass
    short_notices(result), so the short form keeps the real reason)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (max(1, int(width)), max(1, int(height))), "black")
    try:
        size, lines = fit_notice(img.width, img.height, message, shorter)
        if lines:
            draw = ImageDraw.Draw(img)
            font = _font(size)
            margin = max(1, min(img.width, img.height) // 24)
            y = margin
            for line in lines:
                draw.text((margin, y), line, fill=(230, 230, 230), font=font)
                y += size + max(1, size // 4)
    except Exception:  # noqa: BLE001 - whatever a font cannot draw, the image stays withheld (black)
        return Image.new("RGB", img.size, "black")
    return img

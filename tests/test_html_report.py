"""The batch report (core/html_report.py): a summary table sorted worst first, pictures only for matches at
or above warn (small JPEG data URIs, under a byte budget), prompts read from the image under size caps,
every text escaped, a CSP that lets nothing load, and a size that stays small for a batch of 50."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image, ImageOps, PngImagePlugin

from provenance_guard.cli import main as cli
from provenance_guard.core import html_report
from provenance_guard.core.html_report import ReportRow, render
from provenance_guard.core.policy import verdict_for
from provenance_guard.core.record import sidecar_path, write_record
from provenance_guard.core.result import BundleThresholds, CheckResult, GenerationRecord, Match
from provenance_guard.demo import REFERENCES, UNRELATED, sample_image

from test_record import COMFY_PROMPT

WARN, BLOCK = 0.9, 0.95
DASH = "—"


def result(verdict: str, scores=(), source: str = "", prompt=None, error=None, captions=None, urls=None,
           verdicts=None) -> CheckResult:
    matches = [Match(score=s, exact=True, bundle_id="refs", bundle_version="1", row_id=i,
                     url=(urls or {}).get(i, f"https://example.org/{i}.jpg"),
                     caption=(captions or {}).get(i, f"caption {i}"),
                     verdict=(verdicts or {}).get(i, verdict_for(s, WARN, BLOCK))) for i, s in enumerate(scores)]
    return CheckResult(verdict=verdict, max_score=max(scores) if scores else None, matches=matches, model="tiny",
                       thresholds=[BundleThresholds("refs", "1", WARN, BLOCK)], fail_mode="open",
                       image={"source": source}, generation=GenerationRecord(prompt=prompt) if prompt else None,
                       error=error, warnings=[f"image not checked (fail mode open): {error}"] if error else [])


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def summary_rows(page: str) -> list[tuple[str, str]]:
    """(verdict, row html) of each row of the summary table, in page order."""
    body = page.split('<tbody id="pg-rows">', 1)[1].split("</tbody>", 1)[0]
    return re.findall(r'<tr class="v-([^"]*)"[^>]*>(.*?)</tr>', body)


def cell(row: str, cls: str) -> str:
    return re.search(rf'<td class="{cls}">(.*?)</td>', row).group(1)


def name_of(row: str) -> str:
    return re.search(r'<td class="name"><a [^>]*>(.*?)</a>', row).group(1)


def section(page: str, name: str) -> str:
    """The detail section of the image whose file name is name."""
    for part in page.split("<section ")[1:]:
        body = part.split("</section>", 1)[0]
        if f"</span> {name} <a" in body:
            return body
    raise AssertionError(f"no section for {name}")


def jpeg_uris(fragment: str) -> list[bytes]:
    return [base64.b64decode(u) for u in re.findall(r'src="data:image/jpeg;base64,([^"]+)"', fragment)]


# the summary table ---------------------------------------------------------------------------------------------

def test_summary_has_one_row_per_image_sorted_worst_first_without_javascript(tmp_path):
    rows = [ReportRow(result("pass", (0.41, 0.2), source="p.png")),
            ReportRow(result("warn", (0.93, 0.5), source="w.png")),
            ReportRow(result("block", (0.96, 0.3), source="b-low.png")),
            ReportRow(result("unchecked", (), source="u.png", error="cannot decode")),
            ReportRow(result("block", (0.99, 0.95), source="b-high.png")),
            ReportRow(result("warn", (0.94,), source="w-high.png"))]
    page = render(rows, checked=6, include_passing=True)
    got = [(v, name_of(r)) for v, r in summary_rows(page)]
    # block by score, then unchecked (a failure: right after the blocks), then warn by score, then pass
    assert got == [("block", "b-high.png"), ("block", "b-low.png"), ("unchecked", "u.png"), ("warn", "w-high.png"),
                   ("warn", "w.png"), ("pass", "p.png")]
    assert cell(summary_rows(page)[0][1], "num") == "0.9900" and cell(summary_rows(page)[2][1], "num") == DASH
    assert "refs#0" in summary_rows(page)[0][1]  # the top match
    # Without --report-all the passing image is counted, not listed; the sections follow the same order.
    page = render(rows, checked=6)
    assert [name_of(r) for _, r in summary_rows(page)] == ["b-high.png", "b-low.png", "u.png", "w-high.png", "w.png"]
    assert page.count('<section class="detail') == 5 and "1 pass" in page
    assert page.index('id="pg-d0"') < page.index('id="pg-d4"')
    assert re.findall(r'data-severity="(\d)"', page) == ["3", "3", "2", "1", "1"]
    assert render([], checked=0).count("No image was flagged.") == 1


# pictures ----------------------------------------------------------------------------------------------------

def test_matches_below_warn_are_one_collapsed_line_without_pictures(tmp_path):
    out = save(sample_image("camera"), tmp_path / "out.png")
    ref = save(sample_image("coins"), tmp_path / "ref.png")
    refs = {("refs", i): ref for i in range(5)}
    scores = (0.41, 0.3, 0.1, -0.2, -0.37)
    page = render([ReportRow(result("pass", scores, source=str(out)), out, refs)], checked=1, include_passing=True)
    passing = section(page, "out.png")
    assert "<img" not in passing and "data:image" not in passing
    assert "<details><summary>5 matches below warn (max 0.4100)</summary>" in passing
    assert passing.count("<li") == 5 and "-0.3700" in passing
    # A blocked image: the block match has pictures, the pass matches below it stay one line each, no picture.
    page = render([ReportRow(result("block", (0.97,) + scores[1:], source=str(out)), out, refs)], checked=1)
    blocked = section(page, "out.png")
    above, below = blocked.split("<details>")
    assert len(jpeg_uris(above)) == 2  # the checked image and the training image
    assert "<img" not in below and "4 more matches below warn (max 0.3000)" in below


def test_a_block_match_gets_small_jpeg_thumbnails(tmp_path):
    out = save(sample_image("astronaut").resize((640, 400)), tmp_path / "out.png")
    ref = save(sample_image("astronaut").convert("RGBA"), tmp_path / "ref.png")
    page = render([ReportRow(result("block", (0.99, 0.2), source=str(out)), out, {("refs", 0): ref})], checked=1)
    pictures = [Image.open(io.BytesIO(data)) for data in jpeg_uris(section(page, "out.png"))]
    assert [p.format for p in pictures] == ["JPEG", "JPEG"]
    assert pictures[0].size == (160, 100) and pictures[1].size == (160, 160)
    assert all(p.mode == "RGB" for p in pictures)
    assert sum(len(d) for d in jpeg_uris(page)) < 40_000  # small: ~10 kB each at quality 70


def test_verified_matches_follow_their_verdict_and_their_evidence_is_made_small(tmp_path):
    from provenance_guard.core.verify import Verification

    buf = io.BytesIO()
    sample_image("astronaut").convert("RGB").resize((1200, 400)).save(buf, "JPEG", quality=95)
    big = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    out = save(sample_image("astronaut"), tmp_path / "out.png")
    # A copy verified on pixels blocks below the warn score (escalate); a block found different is a warn
    # (confirm): both are at or above warn, so both have pictures; a pass match's evidence is never shown.
    r = result("block", (0.97, 0.5, 0.3), source=str(out), verdicts={0: "warn", 1: "block"})
    for m in r.matches:
        m.verification = Verification(status="copy", method="sift", inliers=40, evidence=big)
    page = render([ReportRow(r, out)], checked=1)
    above, below = section(page, "out.png").split("<details>")
    evidence = [base64.b64decode(u) for u in re.findall(r'class="pg-evidence" src="data:image/jpeg;base64,([^"]+)"',
                                                         above)]
    assert len(evidence) == 2 and all(Image.open(io.BytesIO(e)).size == (480, 160) for e in evidence)
    assert all(len(e) < len(buf.getvalue()) / 3 for e in evidence)
    assert "<img" not in below and "1 more match below warn (max 0.3000)" in below and "pixels: copy" in below
    # Evidence that is not a picture the check made is left out.
    r.matches[0].verification.evidence = "javascript:alert(1)"
    assert "javascript" not in render([ReportRow(r, out)], checked=1)


def test_thumbnails_are_upright_and_unreadable_images_are_left_out(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: a viewer shows it portrait
    rotated = save(Image.new("RGB", (200, 100), "red"), tmp_path / "rot.jpg", exif=exif)
    data = base64.b64decode(html_report.thumbnail(rotated).split(",", 1)[1])
    assert Image.open(io.BytesIO(data)).size == (80, 160)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert html_report.thumbnail(tmp_path / "broken.png") is None
    assert html_report.thumbnail(tmp_path / "missing.png") is None


def test_the_picture_budget_caps_the_page_and_says_so(tmp_path):
    photos = [sample_image(name).convert("RGB").resize((240, 240)) for name in REFERENCES]
    refs = {("refs", i): save(photo, tmp_path / f"ref{i}.jpg") for i, photo in enumerate(photos)}
    rows = []
    for n in range(50):
        out = save(photos[n % 6].rotate(n), tmp_path / f"out{n:02d}.jpg")
        rows.append(ReportRow(result("block", (0.999, 0.99, 0.98, 0.97, 0.96), source=str(out)), out, refs))
    page = render(rows, checked=50, image_budget=200_000)
    assert sum(len(u) for u in re.findall(r'src="(data:[^"]+)"', page)) <= 200_000
    assert len(page.encode()) < 200_000 + 150_000  # the rest is text
    assert "picture left out: the report's picture budget" in page and "picture(s) left out" in page
    # The worst images come first, so the first ones keep their pictures.
    assert len(jpeg_uris(section(page, "out00.jpg"))) == 6


# escaping --------------------------------------------------------------------------------------------------------

def test_hostile_captions_and_urls_are_escaped_and_not_linked(tmp_path):
    evil = "<script>alert(1)</script>"
    captions = {0: evil, 1: evil + '"><img src=x onerror=alert(2)>'}
    urls = {0: "javascript:alert(1)", 1: " JavaScript:alert(2)", 2: "https://example.org/ok.jpg?a=1&b=<2>"}
    name = 'a<b>"\u202e.png'
    rows = [ReportRow(result("block", (0.97, 0.5, 0.4), source=name, captions=captions, urls=urls,
                             prompt="</td><script>alert(3)</script>"))]
    page = render(rows, checked=1)
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "onerror=alert(2)>" not in page and 'href="javascript' not in page.lower()
    assert 'href=" javascript' not in page.lower()
    assert page.count("<script>") == 1  # the page's own
    assert 'href="https://example.org/ok.jpg?a=1&amp;b=&lt;2&gt;"' in page  # http(s) is linked, escaped
    assert "a&lt;b&gt;&quot;.png" in page and "\u202e" not in page  # bidi override removed
    assert "&lt;/td&gt;&lt;script&gt;alert(3)" in page


def test_csp_allows_only_the_inline_style_and_script_by_hash():
    page = render([ReportRow(result("block", (0.97,), source="x.png"))], checked=1)
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page).group(1)
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)

    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    assert f"script-src {digest(script)}" in csp and f"style-src {digest(style)}" in csp
    assert "default-src 'none'" in csp and "img-src data:" in csp and "unsafe-inline" not in csp
    assert not re.search(r"<[^>]*\s(style|on[a-z]+)=", page)  # no style attributes, no inline handlers


# prompts ---------------------------------------------------------------------------------------------------------

def test_prompts_from_infotext_own_record_sidecar_and_comfyui(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "<b>cat</b> & dog,\nsecond line\nNegative prompt: ugly hands\n"
                                "Steps: 20, Sampler: Euler a, Seed: 1")
    a1111 = save(sample_image("camera"), tmp_path / "a1111.png", pnginfo=info)
    own = save(sample_image("coins"), tmp_path / "own.png")
    write_record(own, result("block", (0.97,), prompt="<i>owl</i> at night"))
    jpeg = save(sample_image("astronaut"), tmp_path / "side.jpg")
    write_record(jpeg, result("block", (0.97,), prompt="sidecar prompt"), png=False, sidecar=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(COMFY_PROMPT))
    comfy = save(sample_image("moon"), tmp_path / "comfy.png", pnginfo=info)
    plain = save(sample_image("moon"), tmp_path / "plain.png")
    rows = [ReportRow(result("block", (0.97,), source=str(p)), p) for p in (a1111, own, jpeg, comfy, plain)]
    page = render(rows, checked=5)
    prompts = {name_of(r): cell(r, "prompt") for _, r in summary_rows(page)}
    assert prompts == {"a1111.png": "&lt;b&gt;cat&lt;/b&gt; &amp; dog, second line",
                       "own.png": "&lt;i&gt;owl&lt;/i&gt; at night", "side.jpg": "sidecar prompt",
                       "comfy.png": "beautiful scenery nature glass bottle", "plain.png": DASH}
    assert "ugly hands" not in page and "Steps: 20" not in page
    assert "(A1111 parameters)" in section(page, "a1111.png") and "(ComfyUI graph)" in section(page, "comfy.png")
    assert f"<b>prompt</b> {DASH}" in section(page, "plain.png")
    # The check's own generation record wins over what the file carries.
    row = ReportRow(result("block", (0.97,), source=str(a1111), prompt="from the check"), a1111)
    assert cell(summary_rows(render([row], checked=1))[0][1], "prompt") == "from the check"


def test_hostile_or_oversized_text_chunks_show_a_dash(tmp_path):
    def png(name: str, *chunks: tuple[str, str, bool]) -> Path:
        info = PngImagePlugin.PngInfo()
        for key, value, zipped in chunks:
            info.add_text(key, value, zip=zipped)
        return save(Image.new("RGB", (32, 32), "gray"), tmp_path / name, pnginfo=info)

    files = [
        png("huge.png", ("parameters", "A" * (400 << 10) + "\nSteps: 20", False)),          # over the read cap
        png("bomb.png", ("parameters", "B" * (8 << 20), True)),                               # inflates to 8 MiB
        png("badjson.png", ("provenance", '{"generation": {"prompt": ', False)),
        png("notstr.png", ("provenance", json.dumps({"generation": {"prompt": ["x"]}}), False)),
        png("nested.png", ("prompt", "[" * 200_000, False)),
        png("graph.png", ("prompt", json.dumps({"1": {"class_type": "KSampler", "inputs": {"positive": ["1", 0]}}}),
                          False)),
        png("onlyneg.png", ("parameters", "Negative prompt: x\nSteps: 1", False)),
    ]
    badutf = tmp_path / "badutf.png"
    data = (save(Image.new("RGB", (32, 32)), tmp_path / "base.png")).read_bytes()
    body = b"parameters\0\0\0\0\0\xff\xfe\xfd"
    chunk = len(body).to_bytes(4, "big") + b"iTXt" + body + zlib.crc32(b"iTXt" + body).to_bytes(4, "big")
    badutf.write_bytes(data[:33] + chunk + data[33:])
    files.append(badutf)
    big_sidecar = save(Image.new("RGB", (32, 32)), tmp_path / "bigside.jpg")
    sidecar_path(big_sidecar).write_text(json.dumps({"generation": {"prompt": "x" * (2 << 20)}}))
    files.append(big_sidecar)
    rows = [ReportRow(result("block", (0.97,), source=str(p)), p) for p in files]
    rows.append(ReportRow(result("block", (0.97,), source="long.png", prompt="y" * 100_000)))
    rows.append(ReportRow(result("block", (0.97,), source=str(tmp_path / "gone.png")), tmp_path / "gone.png"))
    page = render(rows, checked=len(rows))
    prompts = {name_of(r): cell(r, "prompt") for _, r in summary_rows(page)}
    assert len(prompts) == len(rows) and set(prompts.values()) == {DASH}, prompts
    text = re.sub(r'src="data:[^"]*"', "", page)
    assert "AAAA" not in text and "BBBB" not in text and "yyyy" not in text


def test_image_prompt_reads_a1111_text_before_negative_and_steps():
    assert html_report.a1111_prompt("a cat\r\nNegative prompt: dog\nSteps: 1") == "a cat"
    assert html_report.a1111_prompt("a cat\nSteps: 1, Seed: 2") == "a cat"
    assert html_report.a1111_prompt("only a prompt") == "only a prompt"
    assert html_report.a1111_prompt("Steps: 1") is None


# references ------------------------------------------------------------------------------------------------------

def test_local_reference_reads_the_fetch_cache_only_when_fetching_is_on(tmp_path):
    from provenance_guard.core.references import ReferenceCache, ReferenceOptions

    bundle = SimpleNamespace(id="b", manifest=SimpleNamespace(build={}))
    match = Match(score=0.99, exact=True, bundle_id="b", bundle_version="1", row_id=0, url="https://x.org/a.jpg")
    cached = ReferenceCache(tmp_path, 1 << 20).path(match.url)
    cached.parent.mkdir(parents=True)
    save(Image.new("RGB", (8, 8)), cached, format="PNG")
    assert html_report.local_reference(bundle, match) is None
    assert html_report.local_reference(bundle, match, ReferenceOptions(cache_dir=str(tmp_path))) is None
    assert html_report.local_reference(bundle, match, ReferenceOptions(fetch=True, cache_dir=str(tmp_path))) == cached
    other = Match(score=0.99, exact=True, bundle_id="b", bundle_version="1", row_id=1, url="javascript:x")
    assert html_report.local_reference(bundle, other, ReferenceOptions(fetch=True, cache_dir=str(tmp_path))) is None


# a batch of 50 through the command ---------------------------------------------------------------------------

REPORT_BUDGET = 900_000  # bytes for 50 images (the report before this change: ~2.8 MB with --report-all)


@pytest.mark.slow
def test_a_50_image_report_stays_small(tmp_path, built_bundle):
    folder = tmp_path / "batch"
    folder.mkdir()
    names = list(REFERENCES) + list(UNRELATED) + ["moon", "page", "clock", "text", "cell", "brick", "grass"]
    edits = (lambda im: im, ImageOps.mirror, lambda im: im.crop((8, 8, im.width - 8, im.height - 8)),
             ImageOps.autocontrast)
    for n in range(50):
        img = edits[n // len(names) % len(edits)](sample_image(names[n % len(names)]).convert("RGB"))
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", f"photo {n} <b>{names[n % len(names)]}</b>\nSteps: 20, Seed: {n}")
        img.resize((256, round(256 * img.height / img.width))).save(folder / f"{n:02d}.png", pnginfo=info)
    report = tmp_path / "report.html"
    cli(["check", str(folder), "--index", str(built_bundle), "--report", str(report), "--report-all",
         "--no-progress", "--json"])
    page = report.read_text()
    rows = summary_rows(page)
    assert len(rows) == 50 and "50 image(s) checked" in page
    order = [html_report.VERDICT_ORDER.index(v) for v, _ in rows]
    assert order == sorted(order) and {"block", "pass"} <= {v for v, _ in rows}
    assert report.stat().st_size < REPORT_BUDGET, report.stat().st_size
    # Pass images have no pictures; every listed image shows its prompt.
    for verdict, row in rows:
        if verdict == "pass":
            assert "<img" not in section(page, name_of(row))
        assert cell(row, "prompt").startswith("photo ")


def test_the_page_sorts_and_filters_in_a_browser_without_csp_errors(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).is_file():
        pytest.skip("no Chromium at /usr/bin/chromium")
    out = save(sample_image("camera"), tmp_path / "cam.png")
    rows = [ReportRow(result("warn", (0.93,), source="w.png")),
            ReportRow(result("block", (0.96,), source=str(out)), out, {("refs", 0): out}),
            ReportRow(result("pass", (0.5,), source="p.png")), ReportRow(result("block", (0.99,), source="b.png"))]
    page_file = html_report.write(tmp_path / "r.html", rows, checked=4, include_passing=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            messages: list[str] = []
            page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
            page.goto(page_file.as_uri())

            def order() -> list[str]:
                return page.eval_on_selector_all("#pg-rows tr", "rs => rs.map(r => r.dataset.score.slice(0, 4))")

            assert order() == ["0.99", "0.96", "0.93", "0.50"]
            assert page.evaluate("document.images.length") == 2 and page.evaluate(
                "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            page.click("th[data-sort=score] button")  # highest first
            page.click("th[data-sort=score] button")  # then lowest first
            assert order() == ["0.50", "0.93", "0.96", "0.99"]
            page.click("th[data-sort=severity] button")  # worst first again
            assert order() == ["0.99", "0.96", "0.93", "0.50"]
            page.click("button[data-filter=warn]")
            assert page.eval_on_selector_all("[data-verdict]", "es => es.filter(e => !e.hidden).length") == 2
            assert messages == []  # a CSP violation would be logged here
        finally:
            browser.close()

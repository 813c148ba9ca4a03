"""The webuis driven as a person drives them: headless Chromium (playwright) on a real A1111 and a real Forge.

What API-only tests miss: A1111 (gradio 3.41) refreshes every setting on page load with
``gr.update(value=..., **component_args)``; one keyword a component's update() does not take makes that refresh
answer HTTP 500, every field shows "Error", and "Apply settings" then writes the stale values back. Per host
(parametrised a1111 / forge, each with its own webui start; tests/test_a1111_e2e.py's host and installed fixtures
install the extension under a test name and remove only that):

1. test_settings_page_loads_clean: load the page, open Settings > Provenance Guard (under the Postprocessing
   category): no HTTP 5xx response during the load, no field showing "Error", no page error from our javascript.
2. test_settings_apply_sticks: a webui setting is changed through the API after the UI was built (samples_save
   false), then on the page the fail mode (closed) and the action (block) are changed and "Apply settings" clicked;
   after a reload both stuck (in the page, in GET /sdapi/v1/options for A1111, in the temporary settings file for
   Forge, whose GET omits extension settings) and samples_save kept its value (a failed page-load refresh would
   have written the value the UI was built with back).
3. test_txt2img_panel_after_block: txt2img with the script's accordion open, the check enabled on a bundle path
   that does not exist under fail mode closed: the image is blocked (a black placeholder) and the panel under the
   gallery (javascript/provenance_guard.js) says so.

Screenshots go into the test's temporary folder (the paths are printed). The settings file is a temporary copy;
the host's own config.json is never written. Skips (with the reason) when playwright, Chromium (CHROMIUM, default
/usr/bin/chromium) or the host variables are missing.

Run: .venv/bin/python -m pytest tests/test_webui_browser_e2e.py -v -s
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from provenance_guard.demo import sample_image, write_references
from test_a1111_e2e import (  # noqa: F401  (host and installed are fixtures used by name)
    BUILD_TIMEOUT,
    BUNDLE_NAME,
    OPTION_KEYS,
    Webui,
    _build_bundle,
    _http,
    _load_package_code,
    _output,
    _port_open,
    _run,
    _stop,
    host,
    installed,
    start_webui,
)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SECTION = "Provenance Guard"
CATEGORY = "Postprocessing"
PG = "provenance_guard"
# Where a copy of each host's screenshots goes when PG_E2E_SCREENS names a folder (for a person to look at).
SCREENS = os.environ.get("PG_E2E_SCREENS")
LOAD_TIMEOUT_MS = 120_000
GENERATE_TIMEOUT_MS = 300_000


# helpers ---------------------------------------------------------------------------------------------------------

def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; no browser download needed)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    return sync_playwright


class Watch:
    """What a page did: responses >= 500, failed requests, page errors, console errors."""

    def __init__(self, page):
        self.server_errors: list[str] = []
        self.failed: list[str] = []
        self.page_errors: list[str] = []
        self.console: list[str] = []
        page.on("response", self._response)
        page.on("requestfailed", lambda r: self.failed.append(f"{r.method} {r.url}: {r.failure}"))
        page.on("pageerror", lambda e: self.page_errors.append(f"{e.name}: {e.message}\n{e.stack or ''}"))
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text} @ {m.location}")
                if m.type == "error" else None)

    def _response(self, r) -> None:
        if r.status >= 500:
            try:
                body = r.text()[:1500]
            except Exception as exc:  # noqa: BLE001 - a body that cannot be read is reported as such
                body = f"(body unreadable: {exc})"
            self.server_errors.append(f"{r.status} {r.request.method} {r.url}: {body}")

    def ours(self) -> list[str]:
        """Page and console errors that come from this extension's javascript."""
        return [e for e in self.page_errors + self.console if "provenance" in e.lower()]

    def reset(self) -> None:
        for items in (self.server_errors, self.failed, self.page_errors, self.console):
            items.clear()


def _shot(page, w: Webui, name: str, full: bool = True) -> Path:
    path = w.host.tmp / "screens" / f"{w.host.name}_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=full)
    if SCREENS:
        Path(SCREENS).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(SCREENS) / path.name)
    print(f"\n[{w.host.name}] screenshot {path}")
    return path


def _load(page, w: Webui) -> None:
    """Open the webui and wait until its UI is built and the page-load updates (the settings refresh) are done."""
    page.goto(w.base + "/", wait_until="domcontentloaded", timeout=LOAD_TIMEOUT_MS)
    page.wait_for_selector("#tabs", timeout=LOAD_TIMEOUT_MS)
    page.wait_for_function("() => typeof opts !== 'undefined' && opts._categories !== undefined"
                           " && document.querySelector('#setting_provenance_guard_fail_mode') !== null",
                           timeout=LOAD_TIMEOUT_MS)
    try:
        page.wait_for_load_state("networkidle", timeout=30_000)
    except Exception:  # noqa: BLE001 - a queue connection may keep the network busy: the settle wait below covers it
        pass
    page.wait_for_timeout(2000)


def _top_tab(page, name: str) -> None:
    page.locator("#tabs > .tab-nav button, #tabs > div > button").filter(  # Forge says "Txt2img"
        has_text=re.compile(rf"^\s*{name}\s*$", re.IGNORECASE)).first.click()


def _open_section(page) -> None:
    _top_tab(page, "Settings")
    button = page.locator("#settings button").filter(has_text=re.compile(rf"^\s*{SECTION}\s*$")).first
    button.wait_for(state="visible", timeout=30_000)
    button.click()
    page.locator(f"#column_settings_{PG}").wait_for(state="visible", timeout=30_000)
    page.wait_for_timeout(500)


def _error_fields(page) -> list[str]:
    """Visible leaf elements reading "Error" (gradio's status tracker on a component whose update failed) or error
    toasts, with the id of the component they sit in."""
    return page.evaluate("""() => {
        const out = [];
        for (const el of document.querySelectorAll('body *')) {
            if (el.children.length || el.offsetParent === null) continue;
            if ((el.textContent || '').trim() !== 'Error') continue;
            const owner = el.closest('[id]');
            out.push(owner ? owner.id : el.tagName);
        }
        for (const el of document.querySelectorAll('.toast-body.error, .toast-wrap .error')) {
            if (el.offsetParent !== null) out.push('toast: ' + (el.textContent || '').trim().slice(0, 300));
        }
        return out;
    }""")


def _radio(page, elem_id: str) -> str | None:
    """The label of the checked choice of a gradio Radio."""
    return page.evaluate("""(id) => {
        const box = document.getElementById(id);
        if (!box) return null;
        const input = box.querySelector('input[type=radio]:checked');
        if (!input) return null;
        const label = input.closest('label');
        return ((label ? label.textContent : input.value) || '').trim();
    }""", elem_id)


def _pick(page, elem_id: str, choice: str) -> None:
    page.locator(f"#{elem_id} label").filter(has_text=re.compile(rf"^\s*{re.escape(choice)}\s*$")).first.click()
    assert _radio(page, elem_id) == choice, f"#{elem_id}: clicking {choice!r} left {_radio(page, elem_id)!r}"


def _settings_file(w: Webui) -> dict:
    path = w.state["settings_file"]
    return json.loads(path.read_text()) if path.is_file() else {}


def _options(w: Webui) -> dict:
    status, options = _http(f"{w.base}/sdapi/v1/options", timeout=30)
    assert status == 200, options
    return options


def _all_options(w: Webui) -> dict:
    """Every setting's value: GET /sdapi/v1/options with the extension's settings from the settings file where the
    GET omits them (Forge)."""
    options = _options(w)
    saved = _settings_file(w)
    for key in OPTION_KEYS:
        if key not in options:
            options[key] = saved.get(key, "(not in the file)")
    return options


def _pg_value(w: Webui, key: str):
    """An extension setting as the webui stored it: GET /sdapi/v1/options (A1111), the settings file (Forge's GET
    omits extension settings; the webui writes the file at every change)."""
    options = _options(w)
    if key in options:
        return options[key]
    assert w.host.name == "forge", f"A1111's GET /sdapi/v1/options lacks {key}"
    return _settings_file(w).get(key)


# fixtures --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo_bundle(host, installed):  # noqa: F811 (the fixtures imported above)
    """The reference photos' bundle (scikit-image photos, the astronaut among them) in models/provenance under
    the test's name (host.bundle, marked; the host fixture removes it), built with the host's python through the
    installed clone before the webui starts, so that the accordion's bundle list holds it."""
    proc = _run([host.python, "-c", _load_package_code(host.ext) +
                 "from provenance_guard.demo import make_tiny_model\n"
                 f"print(make_tiny_model(Path({str(host.tmp / 'tiny-clip')!r})))"],
                host.tmp, host.env, BUILD_TIMEOUT, "make_tiny_model")
    assert proc.returncode == 0, f"make_tiny_model failed with the host's python:\n{_output(proc)}"
    spec = proc.stdout.strip().splitlines()[-1]
    refs = host.tmp / "refs"
    write_references(refs)
    _build_bundle(host, refs, spec, overwrite=False)
    return host.bundle


@pytest.fixture(scope="module")
def bwebui(host, installed, photo_bundle):  # noqa: F811 (the fixtures imported above)
    """One webui start per host for the browser tests, with the reference photos' bundle in its list (the
    txt2img panel test names a missing bundle path instead: a missing bundle is what that panel shows)."""
    w = start_webui(host, tag="browser-webui")
    try:
        yield w
    finally:
        _stop(w)
        deadline = time.time() + 30
        while _port_open(w.port) and time.time() < deadline:
            time.sleep(0.5)
        assert not _port_open(w.port), f"port {w.port} still answers after the webui was stopped"


@pytest.fixture(scope="module")
def browser(bwebui):
    sync_playwright = _playwright()
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, no_viewport=False)
    p = context.new_page()
    p.set_default_timeout(60_000)
    try:
        yield p
    finally:
        context.close()


# tests -----------------------------------------------------------------------------------------------------------

def test_settings_page_loads_clean(bwebui: Webui, page):
    w = bwebui
    watch = Watch(page)
    t0 = time.time()
    _load(page, w)
    _open_section(page)
    load_s = time.time() - t0
    shot = _shot(page, w, "settings")
    w.state["settings_shot"] = shot
    problems = []
    if watch.server_errors:
        problems.append("HTTP 5xx during the page load (the settings refresh fails as a whole when one component's "
                        "update() gets a keyword it does not take):\n" + "\n".join(watch.server_errors))
    errors = _error_fields(page)
    if errors:
        problems.append(f"{len(errors)} fields show 'Error' after the page load: {errors}")
    if watch.ours():
        problems.append("errors from the extension's javascript:\n" + "\n".join(watch.ours()))
    assert not problems, f"[{w.host.name}] Settings page (see {shot}):\n" + "\n".join(problems)
    # the section sits under the Postprocessing category (settings.js puts a category heading before the first
    # section of each category; sections of a category follow it), with every one of its fields drawn
    heading = page.evaluate("""(section) => {
        const button = [...document.querySelectorAll('#settings button')]
            .find(b => (b.textContent || '').trim() === section);
        if (!button) return 'no section button';
        for (let el = button.previousElementSibling; el; el = el.previousElementSibling) {
            if (el.classList.contains('settings-category')) return el.textContent.trim();
        }
        return 'no category heading before it';
    }""", SECTION)
    assert heading == CATEGORY, f"[{w.host.name}] the {SECTION!r} section is under {heading!r}, not {CATEGORY!r}"
    missing = [k for k in OPTION_KEYS if not page.locator(f"#setting_{k}").count()]
    assert not missing, f"[{w.host.name}] Settings lacks the fields {missing}"
    text = page.locator(f"#column_settings_{PG}").inner_text()
    assert "If a check cannot run" in text and "Strict" in text, text[:2000]
    print(f"\n[{w.host.name}] settings page {load_s:.1f}s; other page errors: {watch.page_errors[:3]}; "
          f"console errors: {watch.console[:3]}; failed requests: {watch.failed[:3]}")


def test_settings_apply_sticks(bwebui: Webui, page):
    w = bwebui
    # changed through the API after the UI was built: the page must show it (the page-load refresh) and Apply
    # must not write the value the UI was built with back
    status, body = _http(f"{w.base}/sdapi/v1/options", {"samples_save": False}, timeout=30)
    assert status == 200, body
    assert _options(w)["samples_save"] is False
    watch = Watch(page)
    _load(page, w)
    _open_section(page)
    options_before = _all_options(w)
    fail_id, action_id = f"setting_{PG}_fail_mode", f"setting_{PG}_action"
    before = {"fail_mode": _radio(page, fail_id), "action": _radio(page, action_id)}
    assert before == {"fail_mode": "open", "action": "warn"}, f"[{w.host.name}] the page shows {before}"
    _pick(page, fail_id, "closed")
    _pick(page, action_id, "block")
    page.locator("#settings_submit").click()
    result = page.locator("#settings_result").first  # gradio 3 gives the wrapper and the HTML the same id
    try:
        page.wait_for_function("() => /settings? changed|Nothing to change|Error/i.test("
                               "(document.querySelector('#settings_result') || {}).textContent || '')",
                               timeout=60_000)
    except Exception:  # noqa: BLE001 - reported by the assertions below with what the page shows
        pass
    said = result.inner_text().strip()
    _shot(page, w, "settings_applied")
    # (A1111 lists every setting missing from a fresh settings file as "changed": compare the values instead)
    options_after = _all_options(w)
    # The webui writes the loaded checkpoint's hash once its background load finishes, whenever that is.
    webui_own = {"sd_checkpoint_hash", "sd_model_checkpoint"}
    moved = {k: (options_before[k], options_after.get(k)) for k in options_before
             if options_after.get(k) != options_before[k] and k not in webui_own}
    assert set(moved) == {f"{PG}_fail_mode", f"{PG}_action"}, \
        f"[{w.host.name}] Apply changed (before, after) {moved}; only the fail mode and the action were changed on " \
        f"the page. HTTP 5xx: {watch.server_errors}"
    assert re.search(r"\d+ settings? changed", said) and PG + "_fail_mode" in said and PG + "_action" in said, \
        f"[{w.host.name}] 'Apply settings' answered {said[:3000]!r}"
    assert not watch.server_errors, "\n".join(watch.server_errors)
    # the webui holds the new values, and only those changed
    assert _pg_value(w, f"{PG}_fail_mode") == "closed" and _pg_value(w, f"{PG}_action") == "block", \
        f"[{w.host.name}] after Apply the webui holds fail mode {_pg_value(w, f'{PG}_fail_mode')!r}, action " \
        f"{_pg_value(w, f'{PG}_action')!r}"
    saved = _settings_file(w)
    assert saved.get(f"{PG}_fail_mode") == "closed" and saved.get(f"{PG}_action") == "block", \
        f"[{w.host.name}] the settings file {w.state['settings_file']} holds " \
        f"{ {k: saved.get(k) for k in (PG + '_fail_mode', PG + '_action')} }"
    assert _options(w)["samples_save"] is False and saved.get("samples_save") is False, \
        f"[{w.host.name}] samples_save (set false through the API, not touched on the page) is now " \
        f"{_options(w)['samples_save']!r} (file: {saved.get('samples_save')!r})"
    # a reload shows what was applied
    watch.reset()
    _load(page, w)
    _open_section(page)
    after = {"fail_mode": _radio(page, fail_id), "action": _radio(page, action_id)}
    _shot(page, w, "settings_reloaded")
    assert after == {"fail_mode": "closed", "action": "block"}, f"[{w.host.name}] after a reload the page shows {after}"
    assert not watch.server_errors, "\n".join(watch.server_errors)
    assert not _error_fields(page), _error_fields(page)
    _top_tab(page, "Settings")
    samples = page.locator("#setting_samples_save input[type=checkbox]")
    if samples.count():  # "Always save all generated images" lives in another section: its checkbox is in the DOM
        assert samples.first.is_checked() is False, f"[{w.host.name}] the page shows samples_save checked"
    assert not watch.ours(), "\n".join(watch.ours())


def _fill(page, selector: str, value: str) -> None:
    box = page.locator(selector).first
    box.fill(value)
    box.press("Tab")


def test_txt2img_panel_after_block(bwebui: Webui, page):
    w = bwebui
    watch = Watch(page)
    _load(page, w)
    _top_tab(page, "txt2img")
    # the script's accordion (a gradio Accordion labelled "Provenance Guard" in the txt2img column)
    page.locator("#txt2img_script_container .label-wrap, #txt2img_settings .label-wrap").filter(
        has_text=re.compile(rf"^\s*{SECTION}")).first.click()
    ids = {k: f"script_txt2img_{PG}_{k}" for k in ("enabled", "bundle_path", "fail_mode", "action")}
    page.locator(f"#{ids['enabled']} input[type=checkbox]").wait_for(state="visible", timeout=30_000)
    page.locator(f"#{ids['enabled']} input[type=checkbox]").check()
    _fill(page, f"#{ids['bundle_path']} textarea, #{ids['bundle_path']} input", "/nonexistent/provenance-bundle")
    _pick(page, ids["fail_mode"], "closed")
    _fill(page, "#txt2img_prompt textarea", "astronaut")
    for name, value in (("width", "64"), ("height", "64"), ("steps", "2")):
        _fill(page, f"#txt2img_{name} input[type=number]", value)
    page.locator("#txt2img_generate").click()
    panel = page.locator(f"#{PG}_panel_txt2img .provenance-guard-panel")
    panel.wait_for(state="visible", timeout=GENERATE_TIMEOUT_MS)
    page.wait_for_timeout(1500)
    text = panel.inner_text()
    panel.scroll_into_view_if_needed()
    shot = _shot(page, w, "panel")
    assert "image 1: BLOCK" in text, f"[{w.host.name}] the panel says {text!r} (see {shot})"
    assert "could not" in text.lower() or "no such" in text.lower() or "nonexistent" in text, \
        f"[{w.host.name}] the panel does not give the missing bundle as the reason: {text!r}"
    # the gallery shows the black placeholder (the picture the page loads, not its scaled rendering)
    src = page.evaluate("() => { const i = document.querySelector('#txt2img_gallery img'); return i ? i.src : null; }")
    assert src, f"[{w.host.name}] no image in the txt2img gallery"
    response = page.request.get(src)
    assert response.ok, f"[{w.host.name}] the gallery image {src} answered {response.status}"
    with Image.open(io.BytesIO(response.body())) as img:
        dark = float((np.asarray(img.convert("RGB")).max(axis=2) < 48).mean())
        size = img.size
    assert dark >= 0.6, f"[{w.host.name}] the gallery image ({size}) is not the black placeholder " \
                        f"(dark share {dark:.2f})"
    assert not watch.server_errors, "\n".join(watch.server_errors)
    assert not watch.ours(), f"[{w.host.name}] errors from the extension's javascript:\n" + "\n".join(watch.ours())
    print(f"\n[{w.host.name}] panel: {text[:300]!r}")


def test_img2img_inpaint_panel_shows_block_evidence(bwebui: Webui, page, tmp_path):
    """img2img, Inpaint upload, as a person does it: a real photo (scikit-image's astronaut, one of the bundle's
    reference photos) uploaded with a mask over a small corner, masked content "original", the Provenance Guard
    accordion open with the bundle picked from its list and action block. The webui pastes the unmasked photo
    back over the generated image (the inpaint overlay), so the final image is the reference photo but for the
    corner: the final-image check blocks it (verified a copy on pixels), the gallery shows the placeholder and
    the panel under it says BLOCK with the evidence picture (the image and the training image side by side).
    Screenshot: <host>_img2img_panel.png (copied into PG_E2E_SCREENS when set)."""
    w = bwebui
    size, corner = 256, 24
    photo, mask = tmp_path / "astronaut.png", tmp_path / "mask.png"
    sample_image("astronaut").convert("RGB").resize((size, size), Image.LANCZOS).save(photo)
    m = Image.new("RGB", (size, size), "black")
    m.paste((255, 255, 255), (size - corner, size - corner, size, size))
    m.save(mask)
    watch = Watch(page)
    _load(page, w)
    _top_tab(page, "img2img")
    page.locator("#mode_img2img .tab-nav button, #mode_img2img > div > button").filter(
        has_text=re.compile(r"^\s*Inpaint upload\s*$", re.IGNORECASE)).first.click()
    page.locator("#img_inpaint_base input[type=file]").first.set_input_files(str(photo))
    page.locator("#img_inpaint_mask input[type=file]").first.set_input_files(str(mask))
    page.wait_for_timeout(1000)
    _fill(page, "#img2img_prompt textarea", "astronaut")
    for name, value in (("width", str(size)), ("height", str(size)), ("steps", "10"), ("mask_blur", "0"),
                        ("denoising_strength", "0.1")):
        _fill(page, f"#img2img_{name} input[type=number]", value)
    page.locator("#img2img_script_container .label-wrap, #img2img_settings .label-wrap").filter(
        has_text=re.compile(rf"^\s*{SECTION}")).first.click()
    ids = {k: f"script_img2img_{PG}_{k}" for k in ("enabled", "bundle", "action", "fail_mode")}
    page.locator(f"#{ids['enabled']} input[type=checkbox]").wait_for(state="visible", timeout=30_000)
    page.locator(f"#{ids['enabled']} input[type=checkbox]").check()
    page.locator(f"#{ids['bundle']} input").first.click()
    page.locator(f"ul.options li[aria-label='{BUNDLE_NAME}']").first.click()  # gradio 3.41 and 4.x
    page.keyboard.press("Escape")
    picked = page.locator(f"#{ids['bundle']} input").first.input_value()
    assert picked == BUNDLE_NAME, f"[{w.host.name}] the bundle list shows {picked!r}"
    _pick(page, ids["action"], "block")
    page.locator("#img2img_generate").click()
    panel = page.locator(f"#{PG}_panel_img2img .provenance-guard-panel")
    panel.wait_for(state="visible", timeout=GENERATE_TIMEOUT_MS)
    page.wait_for_function(f"""() => {{ const i = document.querySelector('#{PG}_panel_img2img img.pg-evidence');
                                       return i && i.complete && i.naturalWidth > 0; }}""", timeout=30_000)
    page.wait_for_timeout(1500)
    text = panel.inner_text()
    natural = page.evaluate(f"""() => {{ const i = document.querySelector('#{PG}_panel_img2img img.pg-evidence');
                                        return [i.naturalWidth, i.naturalHeight]; }}""")
    page.locator(f"#{ids['enabled']}").scroll_into_view_if_needed()
    shot = _shot(page, w, "img2img_panel")
    assert "image 1: BLOCK" in text and "astronaut" in text, f"[{w.host.name}] the panel says {text!r} (see {shot})"
    assert "copy" in text, f"[{w.host.name}] the block was not verified a copy on pixels: {text!r}"
    # the evidence: two square pictures side by side (with a gap) under the label strip
    assert natural[0] > 1.8 * (natural[1] - 16), f"[{w.host.name}] the evidence picture is {natural}: not two pictures"
    src = page.evaluate("() => { const i = document.querySelector('#img2img_gallery img'); return i ? i.src : null; }")
    assert src, f"[{w.host.name}] no image in the img2img gallery"
    response = page.request.get(src)
    assert response.ok, f"[{w.host.name}] the gallery image {src} answered {response.status}"
    with Image.open(io.BytesIO(response.body())) as img:
        dark = float((np.asarray(img.convert("RGB")).max(axis=2) < 48).mean())
    assert dark >= 0.6, f"[{w.host.name}] the gallery image is not the black placeholder (dark share {dark:.2f})"
    assert not watch.server_errors, "\n".join(watch.server_errors)
    assert not watch.ours(), f"[{w.host.name}] errors from the extension's javascript:\n" + "\n".join(watch.ours())
    print(f"\n[{w.host.name}] img2img panel: {text[:300]!r}; evidence {natural}")

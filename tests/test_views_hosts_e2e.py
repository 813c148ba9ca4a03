"""The views setting (whole | multi: core.policy.VIEWS) in the real hosts, driven as a person drives them.

A1111 and Forge (the host, installed and webui fixtures of tests/test_a1111_e2e.py: the extension installed under
a test name, a tiny CLIP, a bundle of scikit-image photos, one webui start per host; each host runs when its
variables are set), in headless Chromium and through /sdapi/v1:
1. test_views_setting_loads_applies_and_sticks: Settings > Provenance Guard shows "Query views" at "whole" with no
   HTTP 5xx and no field reading "Error"; "multi" is picked and "Apply settings" clicked; the webui holds it (GET
   /sdapi/v1/options, the temporary settings file) and nothing else moved; after a reload the page shows it.
2. test_inpaint_with_views_multi_blocks_a_copy_in_a_quarter: an inpaint (as in tests/test_a1111_e2e.py: the
   webui pastes the unmasked init image back) of an image holding a reference photo in its top-left quarter, with
   the script's 12th argument views "multi": the final image is blocked, its top match found by the "top-left"
   view and verified a copy there; the same call with views "whole" does not find it through a view, and an older
   caller's 11 arguments follow the setting.

ComfyUI (COMFYUI_DIR, COMFYUI_PYTHON; the pack loaded through extra_model_paths.yaml as in
tests/test_comfyui_e2e.py):
3. test_comfyui_views_input_runs_a_workflow: /object_info lists views as the last optional input, default
   "whole"; a workflow without it (saved before it existed) runs as whole; with views "multi" the same image's
   saved record names the "top-left" view.
4. test_comfyui_front_end_widget_and_result: in ComfyUI's front end a workflow without the input loads with the
   views widget at "whole"; set to "multi" on the widget and queued, the node shows the BLOCK verdict naming the
   reference (screenshot comfyui_views_node.png).
5. test_comfyui_enforced_views: user/provenance_guard.json with "views": "multi" puts multi into every check
   enforcement inserts (the copy in a quarter is blocked, nothing saved); "views": "many" refuses every prompt.
6. test_comfyui_txt2img_with_views_multi (needs COMFYUI_CHECKPOINT): a txt2img graph's check with views "multi"
   runs and saves its images with their records.

Screenshots go into the tests' temporary folders (and PG_E2E_SCREENS when set). Every host process and browser the
tests start is stopped by its fixture.

Run: source /work/hosts/a1111/ENV.sh; source /work/hosts/forge/ENV.sh; source /work/hosts/comfyui/ENV.sh;
     .venv/bin/python -m pytest -q -p no:cacheprovider -rs tests/test_views_hosts_e2e.py
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from provenance_guard.a1111_extension.settings import DEFAULTS
from provenance_guard.core.record import png_text_chunks, read_record
from provenance_guard.demo import DEMO_BLOCK, DEMO_WARN, sample_image
from test_a1111_e2e import (  # noqa: F401  (host, installed and webui are fixtures used by name)
    PROMPT,
    SCRIPT_TITLE,
    SEED,
    Webui,
    _assert_no_hook_errors,
    _b64_png,
    _generate,
    _per_image,
    _record_of,
    _set_options,
    host,
    installed,
    webui,
)
from test_webui_browser_e2e import (
    CHROMIUM,
    PG,
    Watch,
    _error_fields,
    _load,
    _open_section,
    _options,
    _pg_value,
    _pick,
    _playwright,
    _radio,
    _settings_file,
    _shot,
)

VIEWS_ID = f"setting_{PG}_views"
SIZE = 256  # the composite: a reference photo in its top-left quarter, an unrelated photo around it


def composite(reference: str = "astronaut", background: str = "coins", size: int = SIZE) -> Image.Image:
    """A generated-looking image that holds a training image in its top-left quarter (coins is no reference)."""
    out = sample_image(background).convert("RGB").resize((size, size), Image.LANCZOS)
    out.paste(sample_image(reference).convert("RGB").resize((size // 2, size // 2), Image.LANCZOS), (0, 0))
    return out


# A1111 and Forge --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(webui):  # noqa: F811 - the fixture imported from test_a1111_e2e
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


def _all_values(w: Webui) -> dict:
    """GET /sdapi/v1/options, with the extension's settings from the settings file where the GET omits them."""
    options = _options(w)
    for key, value in _settings_file(w).items():
        if key.startswith(PG) and key not in options:
            options[key] = value
    return options


def test_views_setting_loads_applies_and_sticks(webui: Webui, page):  # noqa: F811
    w = webui
    watch = Watch(page)
    try:
        _load(page, w)
        _open_section(page)
        shot = _shot(page, w, "views_settings")
        assert not watch.server_errors, "HTTP 5xx during the page load:\n" + "\n".join(watch.server_errors)
        assert not _error_fields(page), f"[{w.host.name}] fields show 'Error' (see {shot}): {_error_fields(page)}"
        assert page.locator(f"#{VIEWS_ID}").count(), f"[{w.host.name}] no views field in Settings (see {shot})"
        text = page.locator(f"#{VIEWS_ID}").inner_text()
        assert "Query views" in text and "multi" in text, text
        assert _radio(page, VIEWS_ID) == "whole", f"[{w.host.name}] views shows {_radio(page, VIEWS_ID)!r}"
        before = _all_values(w)
        _pick(page, VIEWS_ID, "multi")
        page.locator("#settings_submit").click()
        with contextlib.suppress(Exception):  # the assertions below say what the page shows
            page.wait_for_function("() => /settings? changed|Nothing to change|Error/i.test("
                                   "(document.querySelector('#settings_result') || {}).textContent || '')",
                                   timeout=60_000)
        said = page.locator("#settings_result").first.inner_text().strip()
        _shot(page, w, "views_applied")
        assert re.search(r"\d+ settings? changed", said) and f"{PG}_views" in said, f"Apply answered {said[:2000]!r}"
        assert _pg_value(w, f"{PG}_views") == "multi" and _settings_file(w).get(f"{PG}_views") == "multi", \
            f"[{w.host.name}] after Apply the webui holds views {_pg_value(w, f'{PG}_views')!r}"
        after = _all_values(w)
        webui_own = {"sd_checkpoint_hash", "sd_model_checkpoint"}
        # Forge's GET omits the extension's settings and its file holds them only once something is applied:
        # one that was in neither before held its default
        defaults = {f"{PG}_{k}": v for k, v in DEFAULTS.items()}
        moved = {k for k in set(before) | set(after)
                 if before.get(k, defaults.get(k)) != after.get(k) and k not in webui_own}
        assert moved == {f"{PG}_views"}, f"[{w.host.name}] Apply changed {sorted(moved)}; only views was changed"
        watch.reset()
        _load(page, w)
        _open_section(page)
        shot = _shot(page, w, "views_reloaded")
        assert _radio(page, VIEWS_ID) == "multi", f"[{w.host.name}] after a reload views shows " \
                                                  f"{_radio(page, VIEWS_ID)!r} (see {shot})"
        assert not watch.server_errors and not _error_fields(page), (watch.server_errors, _error_fields(page))
        assert not watch.ours(), "\n".join(watch.ours())
    finally:
        _set_options(w, {f"{PG}_views": "whole"})


def _inpaint(w: Webui, args: list, seed: int) -> dict:
    """Inpaint the composite's bottom-right corner (inpainting_fill original, not full res): the webui pastes the
    rest of the init image back, so the final image holds the reference in its top-left quarter; the final-image
    hook checks those pixels. Returns the one result, its record and the call's output."""
    init = composite()
    mask = Image.new("L", init.size, 0)
    mask.paste(255, (SIZE - 24, SIZE - 24, SIZE, SIZE))
    payload = {"init_images": [_b64_png(init)], "mask": _b64_png(mask), "prompt": PROMPT, "steps": 10,
               "denoising_strength": 0.1, "inpainting_fill": 1, "inpaint_full_res": False, "mask_blur": 0,
               "width": SIZE, "height": SIZE, "batch_size": 1, "seed": seed, "save_images": False,
               "alwayson_scripts": {SCRIPT_TITLE: {"args": args}}}
    out = _generate(w, "img2img", payload)
    _assert_no_hook_errors(out, f"inpaint with args {args}")
    _, images, results = _per_image(out, 1, w)
    return {"result": results[0], "record": _record_of(images[0][0]), "image": images[0][1]}


def test_inpaint_with_views_multi_blocks_a_copy_in_a_quarter(webui: Webui):  # noqa: F811
    w = webui
    bundle = str(w.host.bundle)
    base = [True, "", bundle, True, DEMO_WARN, DEMO_BLOCK, "block", "closed", "confirm+escalate", False, ""]
    multi = _inpaint(w, base + ["multi"], SEED + 70)
    top = (multi["record"].get("matches") or [{}])[0]
    w.state["views_multi"] = {"verdict": multi["result"]["verdict"], "top": top.get("url"), "view": top.get("view"),
                              "status": (top.get("verification") or {}).get("status"), "score": top.get("score")}
    print(f"\n[{w.host.name}] views multi: {w.state['views_multi']}")
    assert multi["result"]["error"] is None, multi["result"]
    assert top.get("url") == "astronaut.png" and top.get("view") == "top-left", \
        f"[{w.host.name}] views multi: the top match is {json.dumps(top)[:1500]}"
    assert (top.get("verification") or {}).get("status") == "copy", json.dumps(top.get("verification"))[:800]
    assert multi["result"]["verdict"] == "block" and multi["record"]["verdict"] == "block", multi["result"]
    whole = _inpaint(w, base + ["whole"], SEED + 71)
    wtop = (whole["record"].get("matches") or [{}])[0]
    w.state["views_whole"] = {"verdict": whole["result"]["verdict"], "top": wtop.get("url"), "score": wtop.get("score")}
    print(f"[{w.host.name}] views whole: {w.state['views_whole']}")
    assert not any(m.get("view") for m in whole["record"].get("matches") or []), whole["record"]["matches"]
    assert wtop.get("url") != "astronaut.png" or wtop["score"] < top["score"], (wtop, top)
    try:  # an older caller (11 arguments) gets the setting
        _set_options(w, {f"{PG}_views": "multi"})
        older = _inpaint(w, base, SEED + 72)
        otop = (older["record"].get("matches") or [{}])[0]
        assert otop.get("view") == "top-left" and older["result"]["verdict"] == "block", otop
    finally:
        _set_options(w, {f"{PG}_views": "whole"})


# ComfyUI ----------------------------------------------------------------------------------------------------------

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
needs_comfyui = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")


def _comfy():
    import test_comfyui_e2e as comfy

    return comfy


@pytest.fixture(scope="module")
def comfyui_views(tmp_path_factory, built_bundle, tiny_model):
    """A ComfyUI with studio-refs in its models/provenance and the composite uploaded."""
    if not COMFYUI_DIR:
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout to run")
    comfy = _comfy()
    tmp = tmp_path_factory.mktemp("comfy-views")
    (tmp / "models" / "provenance").mkdir(parents=True)
    shutil.copytree(built_bundle, tmp / "models" / "provenance" / "studio-refs")
    comfy._pack_yaml(tmp, tmp / "models" / "provenance", comfy.CHECKPOINT.parent if comfy.CHECKPOINT else None)
    with comfy._running_comfyui(tmp) as base:
        path = tmp / "composite.png"
        composite().save(path)
        yield base, tmp, comfy._upload(base, path)


def _check_graph(image: str, prefix: str, on_match: str = "warn", **inputs) -> dict:
    """LoadImage -> Provenance Check (every input of a workflow saved before views existed, plus ``inputs``) ->
    Save Image."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ProvenanceCheck", "inputs": {
            "images": ["1", 0], "bundle": "studio-refs", "on_match": on_match, "fail_mode": "closed",
            "use_bundle_thresholds": True, "warn": 0.9, "block": 0.95, "top_k": 3, "model_override": "",
            "bundle_path": "", "verify": "confirm+escalate", "fetch_references": False, "references": "",
            "prompt_action": "warn", "strict": False, "bundle_url": "", **inputs}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


@needs_comfyui
def test_comfyui_views_input_runs_a_workflow(comfyui_views):
    base, tmp, name = comfyui_views
    comfy = _comfy()
    info = comfy._request(f"{base}/object_info/ProvenanceCheck")["ProvenanceCheck"]
    optional = info["input"]["optional"]
    assert list(optional)[-1] == "views", list(optional)  # last: saved workflows give widget values by position
    assert optional["views"][0] == ["whole", "multi"] and optional["views"][1]["default"] == "whole", optional["views"]
    tops = {}
    for views in (None, "multi"):
        prefix = f"views_{views or 'saved_before'}"
        history = comfy._queue(base, _check_graph(name, prefix, **({} if views is None else {"views": views})))
        assert history["status"]["status_str"] == "success", history["status"]
        saved = comfy._saved(history, "3", tmp / "output")
        assert len(saved) == 1, history["outputs"]
        record = read_record(saved[0])
        assert record is not None and record.checked and "provenance" in png_text_chunks(saved[0].read_bytes())
        tops[views] = record.matches[0]
        report = history["outputs"]["2"]["provenance"][0]
        print(f"\n[comfyui] views {views or '(left out)'}: {report['images'][0]['verdict']}, top "
              f"{tops[views].url} {tops[views].score:.4f} view {tops[views].view} "
              f"({tops[views].verification.status if tops[views].verification else None})")
    assert tops[None].view is None  # left out: whole, as before the input existed
    assert tops["multi"].view == "top-left" and tops["multi"].url == "astronaut.png", tops["multi"]
    assert tops["multi"].verification is not None and tops["multi"].verification.status == "copy"


@needs_comfyui
def test_comfyui_front_end_widget_and_result(comfyui_views, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    comfy = _comfy()
    chromium = comfy._chromium()
    if chromium is None:
        pytest.skip("no Chromium: install one or set CHROMIUM")
    base, _, name = comfyui_views
    graph = _check_graph(name, "views_browser", on_match="block")
    screens = Path(os.environ.get("PG_E2E_SCREENS") or tmp_path)
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.on("pageerror", lambda e: errors.append(f"pageerror: {e}\n{e.stack or ''}"))
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text} @ {m.location.get('url')}")
                    if m.type == "error" else None)
            page.goto(base)
            page.wait_for_function("window.app && window.app.graph && window.app.extensions?.length", timeout=120_000)
            page.evaluate("async (g) => { await window.app.loadApiJson(g, 'views'); }", graph)
            widgets = page.evaluate("""() => Object.fromEntries(window.app.graph.getNodeById(2).widgets
                .map(w => [w.name, w.value]))""")
            assert widgets.get("views") == "whole", widgets  # a workflow without the input: the default
            options = page.evaluate("""() => window.app.graph.getNodeById(2).widgets
                .find(w => w.name === 'views').options.values""")
            assert options == ["whole", "multi"], options
            page.evaluate("""() => { const w = window.app.graph.getNodeById(2).widgets.find(w => w.name === 'views');
                w.value = 'multi'; w.callback?.(w.value); }""")
            sent = page.evaluate("async () => (await window.app.graphToPrompt()).output['2'].inputs.views")
            assert sent == "multi", sent
            page.evaluate("async () => { await window.app.queuePrompt(0); }")
            page.wait_for_function("() => window.app.graph.getNodeById(2)?._provenanceWidget", timeout=240_000)
            node = page.evaluate("""() => { const n = window.app.graph.getNodeById(2);
                return {text: n._provenanceWidget.element.innerText, bgcolor: n.bgcolor}; }""")
            for _ in range(3):
                page.keyboard.press("Escape")
                page.wait_for_timeout(300)
            page.evaluate("""() => { const n = window.app.graph.getNodeById(2), c = window.app.canvas;
                c.ds.offset[0] = -n.pos[0] + 400; c.ds.offset[1] = -n.pos[1] + 150; c.ds.scale = 1;
                c.setDirty(true, true); c.draw(true, true); }""")
            page.wait_for_timeout(1000)
            screens.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screens / "comfyui_views_node.png"))
            print(f"\n[comfyui] node after views multi: {node['text'][:300]!r}; screenshot "
                  f"{screens / 'comfyui_views_node.png'}")
        finally:
            browser.close()
    ours = [e for e in errors if "provenance" in e.lower()]
    assert not ours, ours
    assert node["text"].startswith("image 0: BLOCK") and "astronaut.png" in node["text"], node
    assert node["bgcolor"] == "#b71c1c", node


def _enforced_comfyui(tmp_path_factory, built_bundle, config: dict):
    comfy = _comfy()
    tmp = tmp_path_factory.mktemp("comfy-views-enforced")
    (tmp / "models" / "provenance").mkdir(parents=True)
    shutil.copytree(built_bundle, tmp / "models" / "provenance" / "studio-refs")
    comfy._pack_yaml(tmp, tmp / "models" / "provenance")
    (tmp / "user").mkdir()
    (tmp / "user" / "provenance_guard.json").write_text(json.dumps(config))
    return tmp, comfy._running_comfyui(tmp, env_drop=("PROVENANCE_GUARD_ENFORCE",))


@needs_comfyui
def test_comfyui_enforced_views(tmp_path_factory, built_bundle):
    comfy = _comfy()
    tmp, running = _enforced_comfyui(tmp_path_factory, built_bundle, {"enforce": {"bundle": "studio-refs",
                                                                                   "views": "multi"}})
    with running as base:
        path = tmp / "composite.png"
        composite().save(path)
        graph = {"1": {"class_type": "LoadImage", "inputs": {"image": comfy._upload(base, path)}},
                 "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "enforced"}}}
        history = comfy._queue(base, graph)
        assert history["status"]["status_str"] == "success", history["status"]
        checks = comfy._enforced_checks(history)
        assert list(checks) == ["provenance-guard-enforce-2-images"], sorted(history["outputs"])
        image = checks["provenance-guard-enforce-2-images"]["images"][0]
        assert image["verdict"] == "block" and image["matches"][0]["url"] == "astronaut.png", image
        assert not list((tmp / "output").rglob("enforced*")), "the copy was saved under enforcement"
        prompt = comfy._request(f"{base}/history")  # the graph as it ran: the inserted check carries views multi
        ran = next(iter(prompt.values()))["prompt"][2]
        assert ran["provenance-guard-enforce-2-images"]["inputs"]["views"] == "multi", ran
    tmp, running = _enforced_comfyui(tmp_path_factory, built_bundle, {"enforce": {"bundle": "studio-refs",
                                                                                   "views": "many"}})
    with running as base:
        graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                 "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "refused"}}}
        with pytest.raises(urllib.error.HTTPError) as caught:
            comfy._request(f"{base}/prompt", json.dumps({"prompt": graph, "client_id": "e2e"}).encode(),
                           {"Content-Type": "application/json"})
        assert caught.value.code == 400
        details = json.loads(caught.value.read().decode("utf-8", "replace"))["error"]["details"]
        assert '"views" must be one of' in details and "Every prompt is refused" in details, details
        assert not list((tmp / "output").glob("refused_*.png"))


@needs_comfyui
def test_comfyui_txt2img_with_views_multi(comfyui_views):
    comfy = _comfy()
    if comfy.CHECKPOINT is None:
        pytest.skip("no SD1.5 checkpoint: set COMFYUI_CHECKPOINT")
    base, tmp, _ = comfyui_views
    graph = comfy._txt2img("studio-refs", "warn", "views_t2i")
    graph["7"]["inputs"]["views"] = "multi"
    history = comfy._queue(base, graph, timeout=600)
    assert history["status"]["status_str"] == "success", history["status"]
    report = history["outputs"]["7"]["provenance"][0]
    pngs = comfy._saved(history, "8", tmp / "output")
    assert len(report["images"]) == 2 and len(pngs) == 2, history["outputs"]
    for png in pngs:
        record = read_record(png)
        assert record is not None and record.checked and record.verdict in ("pass", "warn", "block"), png
        assert record.verify is None or record.verify.get("mode") == "confirm"  # the node's default verify
    assert np.asarray(Image.open(pngs[0])).shape[:2] == (64, 64)
    print(f"\n[comfyui] txt2img with views multi: {[i['verdict'] for i in report['images']]}, tops "
          f"{[(i['matches'][0]['url'], i['matches'][0]['score']) for i in report['images']]}")

"""End to end against a real ComfyUI on 127.0.0.1 (--cpu), driven through its HTTP API.

Skipped unless COMFYUI_DIR names a ComfyUI tree. COMFYUI_PYTHON is the interpreter to run it with (one
that has ComfyUI's requirements.txt and this pack's requirements.txt installed; default: COMFYUI_DIR/.venv,
else this interpreter). The pack is loaded through extra_model_paths.yaml (custom_nodes and the
provenance models folder), as a studio would mount it.

The txt2img tests also need an SD1.5 checkpoint: COMFYUI_CHECKPOINT names the .safetensors file (default:
COMFYUI_DIR/models/checkpoints/random-sd15.safetensors, e.g. random weights); its folder is added to the
same extra_model_paths.yaml as `checkpoints`. Without one they are skipped. Studio enforcement is checked
in separately started ComfyUIs (PROVENANCE_GUARD_ENFORCE; a malformed user/provenance_guard.json).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from static_site import static_site, wait_for

from provenance_guard.core.record import png_text_chunks, read_record
from provenance_guard.demo import sample_image

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python() -> str:
    explicit = os.environ.get("COMFYUI_PYTHON")
    if explicit:
        return explicit
    venv = Path(COMFYUI_DIR) / ".venv" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


def _request(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30):
    req = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def _upload(base: str, path: Path) -> str:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\ntrue\r\n--{boundary}--\r\n".encode()
    out = _request(f"{base}/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return out["name"]


def _checkpoint() -> Path | None:
    """The SD1.5 checkpoint the txt2img tests run on, or None."""
    explicit = os.environ.get("COMFYUI_CHECKPOINT")
    path = Path(explicit) if explicit else Path(COMFYUI_DIR) / "models" / "checkpoints" / "random-sd15.safetensors"
    return path if path.is_file() else None


CHECKPOINT = _checkpoint() if COMFYUI_DIR else None
needs_checkpoint = pytest.mark.skipif(
    CHECKPOINT is None, reason="no SD1.5 checkpoint: set COMFYUI_CHECKPOINT to an SD1.5 .safetensors file (or put "
                               "random-sd15.safetensors into COMFYUI_DIR/models/checkpoints)")


@contextmanager
def _running_comfyui(tmp: Path, env_extra: dict | None = None, env_drop: tuple = (), args: tuple = ()):
    """ComfyUI on 127.0.0.1 with --base-directory tmp (its extra_model_paths.yaml must exist) and any further
    command-line args; yields base url. Output goes to tmp/comfyui.log."""
    port = _free_port()
    log = open(tmp / "comfyui.log", "wb")  # noqa: SIM115 - the server's log, closed when it stops
    env = dict(os.environ, PROVENANCE_GUARD_DEVICE="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               **(env_extra or {}))
    for name in env_drop:
        env.pop(name, None)
    proc = subprocess.Popen(
        [_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(tmp),
         "--extra-model-paths-config", str(tmp / "extra_model_paths.yaml"), "--disable-auto-launch",
         "--database-url", "sqlite:///:memory:", *args],
        cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                _request(f"{base}/object_info/ProvenanceCheck", timeout=5)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("ComfyUI did not start:\n" + (tmp / "comfyui.log").read_text(errors="replace")[-4000:])
                time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()


def _pack_yaml(tmp: Path, provenance: Path, checkpoints: Path | None = None) -> None:
    """extra_model_paths.yaml loading the pack (custom_nodes) and the bundles (and checkpoints) from tmp."""
    (tmp / "nodes").mkdir(exist_ok=True)
    (tmp / "custom_nodes").mkdir(exist_ok=True)  # ComfyUI's own folder under --base-directory
    if not (tmp / "nodes" / "provenance-guard").exists():
        os.symlink(ROOT, tmp / "nodes" / "provenance-guard")
    text = f"provenance_e2e:\n  base_path: {tmp}\n  custom_nodes: nodes\n  provenance: {provenance}\n"
    if checkpoints is not None:
        text += f"  checkpoints: {checkpoints}\n"
    (tmp / "extra_model_paths.yaml").write_text(text)


# Both ComfyUIs send latent previews unless something turns them off (enforcement must).
PREVIEWS = ("--preview-method", "latent2rgb")


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory, built_bundle, tiny_model):
    tmp = tmp_path_factory.mktemp("comfy")
    (tmp / "models" / "provenance").mkdir(parents=True)
    shutil.copytree(built_bundle, tmp / "models" / "provenance" / "studio-refs")
    _pack_yaml(tmp, tmp / "models" / "provenance", CHECKPOINT.parent if CHECKPOINT else None)
    with _running_comfyui(tmp, args=PREVIEWS) as base:
        yield base, tmp


def _queue(base: str, graph: dict, timeout: float = 300) -> dict:
    try:
        prompt_id = _request(f"{base}/prompt", json.dumps({"prompt": graph, "client_id": "e2e"}).encode(),
                             {"Content-Type": "application/json"})["prompt_id"]
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"POST /prompt answered {exc.code}: {exc.read().decode('utf-8', 'replace')}") from None
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _request(f"{base}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.5)
    raise AssertionError(f"the prompt did not finish within {timeout} s")


def _graph(image: str, on_match: str, prefix: str) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ProvenanceCheck", "inputs": {
            "images": ["1", 0], "bundle": "studio-refs", "on_match": on_match, "fail_mode": "open",
            "use_bundle_thresholds": True, "warn": 0.9, "block": 0.95, "top_k": 3, "model_override": "",
            "bundle_path": ""}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def test_real_comfyui_checks_blocks_and_records(comfyui, tmp_path):
    base, tmp = comfyui
    info = _request(f"{base}/object_info/ProvenanceCheck")["ProvenanceCheck"]
    assert info["category"] == "provenance" and "studio-refs" in info["input"]["required"]["bundle"][0]
    scripts = [e for e in _request(f"{base}/extensions") if e.endswith("/provenance.js")]
    assert len(scripts) == 1  # the front-end extension is served from WEB_DIRECTORY
    with urllib.request.urlopen(base + scripts[0], timeout=10) as resp:
        assert b"provenance-guard.ProvenanceCheck" in resp.read()
    copy, other = tmp_path / "copy.png", tmp_path / "other.png"
    sample_image("astronaut").convert("RGB").save(copy)
    sample_image("camera").convert("RGB").save(other)
    copy_name, other_name = _upload(base, copy), _upload(base, other)

    history = _queue(base, _graph(other_name, "block", "unrelated"))
    assert history["status"]["status_str"] == "success"
    saved = history["outputs"]["3"]["images"]
    assert len(saved) == 1
    png = tmp / "output" / saved[0]["subfolder"] / saved[0]["filename"]
    chunks = png_text_chunks(png.read_bytes())
    assert {"prompt", "provenance"} <= set(chunks)
    record = read_record(png)
    assert record.verdict == "pass" and record.matches
    report = history["outputs"]["2"]["provenance"][0]
    assert report["verdict"] == "pass" and report["images"][0]["matches"]

    history = _queue(base, _graph(copy_name, "block", "copy"))
    assert history["status"]["status_str"] == "success"  # the prompt ends cleanly ...
    assert "3" not in history["outputs"] or not history["outputs"]["3"].get("images")  # ... nothing saved
    assert not list((tmp / "output").glob("copy_*.png"))
    report = history["outputs"]["2"]["provenance"][0]
    assert report["verdict"] == "block" and report["images"][0]["matches"][0]["url"] == "astronaut.png"


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def test_front_end_draws_escaped_report_on_the_node(comfyui, tmp_path, tiny_model):
    """The pack's web extension in ComfyUI's own front end, in headless Chromium: after a run the node is
    tinted by verdict and shows the matches inside its bounds; captions with HTML stay text, only http(s)
    urls become links (new tab). Needs playwright (pip) and a Chromium (CHROMIUM=... or on PATH)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium: install one or set CHROMIUM")
    import pyarrow as pa

    from provenance_guard.core.bundle import BundleWriter
    from provenance_guard.core.embed import get_embedder

    base, tmp = comfyui
    vecs = get_embedder(tiny_model, device="cpu").embed([sample_image("astronaut"), sample_image("camera")])
    with BundleWriter(tmp / "models" / "provenance" / "html-refs", model=tiny_model, dim=vecs.shape[1],
                      warn=0.985, block=0.995) as w:
        w.add(vecs, pa.table({"url": ["https://example.com/a.jpg?<b>1</b>", "javascript:window.__pwned=2"],
                              "caption": ['<img src=x onerror="window.__pwned=1">astronaut', "<script>x</script>"]}))
        w.finish()
    copy = tmp_path / "copy.png"
    sample_image("astronaut").convert("RGB").save(copy)
    graph = _graph(_upload(base, copy), "block", "browser")
    graph["2"]["inputs"]["bundle"] = "html-refs"

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(base)
            page.wait_for_function("window.app && window.app.graph && window.app.extensions?.length", timeout=120_000)
            assert "provenance-guard.ProvenanceCheck" in page.evaluate("window.app.extensions.map(e => e.name)")
            page.evaluate("async (g) => { await window.app.loadApiJson(g, 'provenance'); }", graph)
            page.evaluate("async () => { await window.app.queuePrompt(0); }")
            page.wait_for_function("() => window.app.graph.getNodeById(2)?._provenanceWidget", timeout=120_000)
            node = page.evaluate("""() => {
                const n = window.app.graph.getNodeById(2), el = n._provenanceWidget.element;
                const box = el.getBoundingClientRect(), inner = el.firstChild;
                return {bgcolor: n.bgcolor, text: el.innerText, pwned: window.__pwned ?? null,
                        tags: [...el.querySelectorAll('img, script')].length,
                        links: [...el.querySelectorAll('a')].map(a => [a.getAttribute('href'), a.target]),
                        fits: inner.scrollHeight <= box.height + 1 || inner.scrollHeight > inner.clientHeight};
            }""")
        finally:
            browser.close()
    assert node["bgcolor"] == "#b71c1c" and node["text"].startswith("image 0: BLOCK")
    assert '<img src=x onerror="window.__pwned=1">astronaut' in node["text"] and "<script>x</script>" in node["text"]
    assert node["pwned"] is None and node["tags"] == 0
    assert node["links"] == [["https://example.com/a.jpg?<b>1</b>", "_blank"], [None, ""]]
    assert node["fits"]  # shown whole or scrollable inside the node, never spilling over it


# --- the check's bundle_url: a published bundle pulled once, in the background ---------------------------------

def test_bundle_url_pulls_once_in_the_background_then_checks(comfyui, references, tiny_model, tmp_path):
    """bundle_url names a bundle published with `index publish` on a static server (this process, loopback).
    Fail mode closed: while the pull runs (the server holds its answers) each run blocks the image with a
    "downloading" message (never an unchecked pass, never a cached failure); once the bundle is installed in
    models/provenance the check gives its real verdict against it (a copy of a reference blocked, an unrelated
    photo saved), and later runs reuse it without asking the server anything, in a restarted ComfyUI too."""
    from provenance_guard.demo import DEMO_BLOCK, DEMO_WARN
    from provenance_guard.index_builder.images import build_from_images

    base, tmp = comfyui
    name = "pulled-refs"
    site_root = tmp_path / "site"
    published = site_root / "bundles" / name
    build_from_images(references, published, tiny_model, warn=DEMO_WARN, block=DEMO_BLOCK, progress=False,
                      bundle_id="e2e-pulled")
    proc = subprocess.run([sys.executable, "-m", "provenance_guard", "index", "publish", str(published)],
                          cwd=ROOT.parent, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"index publish: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert (published / "provenance-bundle.json").is_file(), proc.stdout
    installed = tmp / "models" / "provenance" / name
    assert not installed.exists()

    copy, other = tmp_path / "pulled_copy.png", tmp_path / "pulled_other.png"
    sample_image("astronaut").convert("RGB").save(copy)
    sample_image("camera").convert("RGB").save(other)
    copy_name, other_name = _upload(base, copy), _upload(base, other)

    with static_site(site_root) as (root_url, site):
        url = f"{root_url}/bundles/{name}/"

        def graph(image: str, prefix: str) -> dict:
            g = _graph(image, "block", prefix)
            # the list keeps a bundle of its own (studio-refs, id test-refs): bundle_url overrides it
            g["2"]["inputs"].update(fail_mode="closed", bundle_url=url)
            return g

        t0 = time.time()
        for n in (1, 2):  # the server holds every answer: the pull cannot finish
            history = _queue(base, graph(copy_name, f"pulling{n}"), timeout=120)
            assert history["status"]["status_str"] == "success", history["status"]
            assert not (history["outputs"].get("3") or {}).get("images"), history["outputs"].get("3")
            report = history["outputs"]["2"]["provenance"][0]
            image = report["images"][0]
            assert report["verdict"] == "block" and image["verdict"] == "block", report
            assert "downloading" in (image["error"] or "") and url in image["error"], image
            assert not image["matches"], image
        assert not list((tmp / "output").glob("pulling*")), "an image that was not checked was saved"
        assert site["released"] or not installed.exists(), "installed before the server answered"
        wait_for("no request reached the server while the check said it was downloading",
                  lambda: bool(site["requests"]), 30)
        held_s = time.time() - t0

        site["gate"].set()
        record = tmp / "models" / "provenance" / f".{name}.source.json"
        wait_for("the pull did not install the bundle", lambda: (installed / "manifest.json").is_file()
                  and record.is_file(), 120)
        time.sleep(1)  # the background job takes the installed folder just after writing the record

        history = _queue(base, graph(copy_name, "pulled_copy"), timeout=240)
        assert history["status"]["status_str"] == "success", history["status"]
        report = history["outputs"]["2"]["provenance"][0]
        image = report["images"][0]
        assert image["error"] is None and report["verdict"] == "block", report
        top = image["matches"][0]
        assert top["url"] == "astronaut.png" and top["bundle"] == "e2e-pulled" and top["score"] >= DEMO_BLOCK, top
        assert not (history["outputs"].get("3") or {}).get("images")
        assert not list((tmp / "output").glob("pulled_copy*"))
        announced = [ln for ln in _log(tmp).splitlines() if ln.startswith("provenance-guard: checking with ")
                     and ln.rstrip().endswith(os.sep + name)]
        assert len(announced) == 1, [ln for ln in _log(tmp).splitlines() if "checking with" in ln]

        asked = list(site["requests"])
        paths = [p for _, p in asked]
        assert len(paths) == len(set(paths)), f"a file was asked for twice: {asked}"
        assert paths[0] == f"/bundles/{name}/provenance-bundle.json", asked
        listed = json.loads((published / "provenance-bundle.json").read_text())["files"]
        assert sorted(paths[1:]) == sorted(f"/bundles/{name}/{f}" for f in listed), asked

        history = _queue(base, graph(other_name, "pulled_other"), timeout=240)  # a new image: the check runs
        assert history["status"]["status_str"] == "success", history["status"]
        report = history["outputs"]["2"]["provenance"][0]
        assert report["verdict"] == "pass" and report["images"][0]["error"] is None, report
        assert report["images"][0]["matches"][0]["bundle"] == "e2e-pulled", report
        saved = _saved(history, "3", tmp / "output")
        assert len(saved) == 1 and read_record(saved[0]).verdict == "pass", saved
        assert site["requests"] == asked, f"a later run asked the server again: {site['requests'][len(asked):]}"

        # another ComfyUI (a restart) on the same models/provenance folder finds the pulled bundle by the record
        # the pull left beside it: it checks at once, without the network
        again = tmp_path / "restarted"
        again.mkdir()
        _pack_yaml(again, tmp / "models" / "provenance")
        t0 = time.time()
        with _running_comfyui(again) as base2:
            history = _queue(base2, graph(_upload(base2, copy), "restarted_copy"), timeout=240)
            assert history["status"]["status_str"] == "success", history["status"]
            report = history["outputs"]["2"]["provenance"][0]
            assert report["verdict"] == "block" and report["images"][0]["error"] is None, report
            assert report["images"][0]["matches"][0]["bundle"] == "e2e-pulled", report
            restarted_s = time.time() - t0
        assert "downloading the bundle" not in _log(again), _log(again)[-3000:]
        assert site["requests"] == asked, f"the restarted ComfyUI asked the server: {site['requests'][len(asked):]}"
    print(f"\n[comfyui bundle_url] {len(asked)} requests ({', '.join(p for _, p in asked)}); "
          f"two runs while held {held_s:.1f}s; restarted ComfyUI checked in {restarted_s:.1f}s")


# --- txt2img on a real SD1.5 checkpoint, blocking a regenerated known image, studio enforcement --------------

# With a random-weight SD1.5 the two images of a batch are both noise-like, and the tiny test CLIP scores them
# close to each other: 0.964 for seed 7 (0.983 for 424242, 0.988 for 123 = above warn 0.985). Seed 7 keeps
# the other image of the batch clearly below warn against a bundle that holds the first one.
SEED = 7
KNOWN_BUNDLE = "known-refs"
# faiss logs its CPU-feature loading at INFO; open_clip logs model loading through the root logger at INFO.
FAISS_CHATTER = re.compile(r"AVX512|AVX2")
OPEN_CLIP_CHATTER = re.compile(
    r"Loaded .*model config|Loading (full )?pretrained|Parsing (model|tokenizer) identifier|Attempting to load "
    r"(config|image tower|text tower)|Found CLIP weights|Instantiating model architecture|Final image preprocessing "
    r"configuration|creation process complete|Using default SimpleTokenizer|Found preferred checkpoint file")


def _txt2img(bundle: str, on_match: str, prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT.name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "astronaut", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": SEED,
            "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "ProvenanceCheck", "inputs": {
            "images": ["6", 0], "bundle": bundle, "on_match": on_match, "fail_mode": "open",
            "use_bundle_thresholds": True, "warn": 0.9, "block": 0.95, "top_k": 3, "model_override": "",
            "bundle_path": ""}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).copy()


def _same(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def _saved(history: dict, node: str, folder: Path) -> list[Path]:
    images = (history["outputs"].get(node) or {}).get("images") or []
    return [folder / i["subfolder"] / i["filename"] for i in images]


def _log(tmp: Path) -> str:
    return (tmp / "comfyui.log").read_text(errors="replace")


def _assert_generation(gen) -> None:
    assert gen is not None, "the record has no generation"
    got = {k: getattr(gen, k) for k in ("prompt", "negative_prompt", "seed", "steps", "cfg", "sampler", "scheduler",
                                        "model", "source")}
    assert got == {"prompt": "astronaut", "negative_prompt": "blurry", "seed": SEED, "steps": 2, "cfg": 7.0,
                   "sampler": "euler", "scheduler": "normal", "model": CHECKPOINT.name, "source": "comfyui"}


@pytest.fixture(scope="module")
def txt2img(comfyui):
    """The txt2img graph (batch 2) checked against studio-refs with on_match warn: its history and PNGs."""
    if CHECKPOINT is None:
        pytest.skip("no SD1.5 checkpoint")
    base, tmp = comfyui
    history = _queue(base, _txt2img("studio-refs", "warn", "t2i"), timeout=480)
    return history, _saved(history, "8", tmp / "output")


@needs_checkpoint
def test_txt2img_record_carries_generation_from_the_graph(comfyui, txt2img):
    _, tmp = comfyui
    history, pngs = txt2img
    assert history["status"]["status_str"] == "success", history["status"]
    assert len(pngs) == 2, history["outputs"]
    report = history["outputs"]["7"]["provenance"][0]
    assert len(report["images"]) == 2
    for png in pngs:
        chunks = png_text_chunks(png.read_bytes())
        assert {"prompt", "provenance"} <= set(chunks), sorted(chunks)
        record = read_record(png)  # a batch record: the entry whose pixels are this PNG's
        assert record is not None, f"no record for {png.name}'s pixels in {chunks['provenance'][:400]}"
        assert record.verdict in ("pass", "warn", "block") and record.checked, record.to_json()
        assert record.thresholds and record.thresholds[0].bundle_id == "test-refs"
        _assert_generation(record.generation)
    assert not _same(_pixels(pngs[0]), _pixels(pngs[1]))  # two different images, each with its own record

    log = _log(tmp)
    assert not [ln for ln in log.splitlines() if FAISS_CHATTER.search(ln)], "faiss CPU-feature lines in the log"
    chatter = [ln for ln in log.splitlines() if OPEN_CLIP_CHATTER.search(ln)]
    assert not chatter, f"open_clip INFO lines in the log: {chatter}"
    announced = [ln for ln in log.splitlines() if ln.startswith("provenance-guard: checking with ")
                 and ln.rstrip().endswith(os.sep + "studio-refs")]
    assert len(announced) == 1, [ln for ln in log.splitlines() if "checking with" in ln]


@pytest.fixture(scope="module")
def known_bundle(comfyui, txt2img, references, tiny_model, tmp_path_factory):
    """A fresh bundle (the reference photos plus image 0 of the txt2img batch), built with the pack's own
    builder, in the models/provenance folder the ComfyUI sees, as KNOWN_BUNDLE."""
    from provenance_guard.index_builder.images import build_from_images

    _, tmp = comfyui
    _, pngs = txt2img
    assert len(pngs) == 2
    refs = tmp_path_factory.mktemp("known-refs-src")
    shutil.copytree(references, refs, dirs_exist_ok=True)
    shutil.copyfile(pngs[0], refs / "known.png")
    out = tmp / "models" / "provenance" / KNOWN_BUNDLE
    build_from_images(refs, out, tiny_model, warn=0.985, block=0.995, progress=False, bundle_id="e2e-known")
    return {"path": out, "known": pngs[0], "other": pngs[1]}


@needs_checkpoint
def test_regenerated_known_image_is_blocked_and_the_other_saved(comfyui, known_bundle):
    base, tmp = comfyui
    info = _request(f"{base}/object_info/ProvenanceCheck")["ProvenanceCheck"]
    assert KNOWN_BUNDLE in info["input"]["required"]["bundle"][0]
    known, other = _pixels(known_bundle["known"]), _pixels(known_bundle["other"])

    history = _queue(base, _txt2img(KNOWN_BUNDLE, "block", "regen"), timeout=480)
    assert history["status"]["status_str"] == "success", history["status"]
    report = history["outputs"]["7"]["provenance"][0]
    verdicts = [i["verdict"] for i in report["images"]]
    assert verdicts == ["block", "pass"], report
    top = report["images"][0]["matches"][0]
    assert top["url"] == "known.png" and top["score"] >= 0.995, top

    pngs = _saved(history, "8", tmp / "output")
    on_disk = sorted((tmp / "output").glob("regen_*.png"))
    assert sorted(pngs) == on_disk and len(pngs) == 1, (pngs, on_disk)
    for png in on_disk:
        assert not _same(_pixels(png), known), f"{png.name} holds the known image"
    assert _same(_pixels(pngs[0]), other)
    assert "provenance" in png_text_chunks(pngs[0].read_bytes())
    record = read_record(pngs[0])
    assert record is not None and record.verdict == "pass", None if record is None else record.to_json()
    assert record.thresholds[0].bundle_id == "e2e-known"
    _assert_generation(record.generation)


@pytest.fixture(scope="module")
def enforced(known_bundle, tmp_path_factory):
    """A second ComfyUI with PROVENANCE_GUARD_ENFORCE naming KNOWN_BUNDLE (same bundles folder and checkpoint),
    started with latent previews on (--preview-method latent2rgb), which enforcement must turn off."""
    tmp = tmp_path_factory.mktemp("comfy-enforced")
    _pack_yaml(tmp, known_bundle["path"].parent, CHECKPOINT.parent)
    with _running_comfyui(tmp, {"PROVENANCE_GUARD_ENFORCE": KNOWN_BUNDLE}, args=PREVIEWS) as base:
        yield base, tmp


@needs_checkpoint
def test_studio_enforcement_blocks_known_image_in_graph_without_check(enforced, known_bundle, tmp_path):
    base, tmp = enforced
    assert "provenance-guard: studio enforcement on" in _log(tmp)
    known_file, other_file = tmp_path / "known.png", tmp_path / "other.png"
    shutil.copyfile(known_bundle["known"], known_file)
    shutil.copyfile(known_bundle["other"], other_file)
    known_name, other_name = _upload(base, known_file), _upload(base, other_file)
    graph = {  # no ProvenanceCheck anywhere
        "1": {"class_type": "LoadImage", "inputs": {"image": known_name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "enforced_known"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": other_name}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "enforced_other"}},
    }
    history = _queue(base, graph, timeout=240)
    assert history["status"]["status_str"] == "success", history["status"]
    outputs = history["outputs"]
    assert not (outputs.get("2") or {}).get("images"), outputs.get("2")
    assert not (outputs.get("3") or {}).get("images"), outputs.get("3")
    # the inserted checks ran, and said why
    checks = {k: v["provenance"][0]["verdict"] for k, v in outputs.items() if k.startswith("provenance-guard-enforce-")}
    assert checks == {"provenance-guard-enforce-2-images": "block", "provenance-guard-enforce-3-images": "block",
                      "provenance-guard-enforce-5-images": "pass"}, sorted(outputs)
    # nothing anywhere on disk holds the known image; the unrelated one is saved with its record
    known = _pixels(known_bundle["known"])
    written = sorted((tmp / "output").rglob("*.png")) + sorted((tmp / "temp").rglob("*.png"))
    for png in written:
        assert not _same(_pixels(png), known), f"{png} holds the known image"
    saved = _saved(history, "5", tmp / "output")
    assert len(saved) == 1 and _same(_pixels(saved[0]), _pixels(known_bundle["other"]))
    record = read_record(saved[0])
    assert record is not None and record.verdict == "pass" and record.thresholds[0].bundle_id == "e2e-known"


# --- what enforcement guards beyond IMAGE links: video, webm, masks, latents; decoy checks; previews; evidence --

def _sampled(seed: int = SEED) -> dict:
    """Nodes 1-6 of the txt2img graph: a batch of 2 decoded by node 6 (VAEDecode). With SEED, image 0 of the
    batch is the known image of KNOWN_BUNDLE and image 1 the unrelated one."""
    graph = {k: v for k, v in _txt2img(KNOWN_BUNDLE, "block", "unused").items() if k in "123456"}
    graph["5"]["inputs"]["seed"] = seed
    return graph


def _pick(graph: dict, node: str, index: int) -> list:
    """Add an ImageFromBatch taking image ``index`` of node 6's batch as ``node``; its link."""
    graph[node] = {"class_type": "ImageFromBatch", "inputs": {"image": ["6", 0], "batch_index": index, "length": 1}}
    return [node, 0]


def _enforced_checks(history: dict) -> dict:
    """The inserted checks' reports by node id."""
    return {k: v["provenance"][0] for k, v in history["outputs"].items()
            if k.startswith("provenance-guard-enforce-") and v.get("provenance")}


def _files(folder: Path, pattern: str = "*") -> set[Path]:
    return {p for p in folder.rglob(pattern) if p.is_file()} if folder.is_dir() else set()


def _mad(a, b) -> float:
    """Mean absolute difference of two same-size uint8 pictures (inf when the sizes differ)."""
    import numpy as np

    return float(np.abs(a.astype(int) - b.astype(int)).mean()) if a.shape == b.shape else float("inf")


def _frames(path: Path) -> list:
    """Every frame of a video file as RGB uint8 arrays (OpenCV's FFmpeg backend)."""
    cv2 = pytest.importorskip("cv2")
    cap = cv2.VideoCapture(str(path))
    frames = []
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    return frames


def _refused(base: str, graph: dict) -> tuple[int, str]:
    """POST /prompt expected to be refused: (status, every string of the JSON answer joined, decoded)."""
    body = json.dumps({"prompt": graph, "client_id": "e2e"}).encode()
    try:
        answer = _request(f"{base}/prompt", body, {"Content-Type": "application/json"})
    except urllib.error.HTTPError as exc:
        raw = exc.read().decode("utf-8", "replace")
        try:
            data = json.loads(raw)
        except ValueError:
            return exc.code, raw
        strings: list[str] = []

        def walk(x):
            if isinstance(x, str):
                strings.append(x)
            elif isinstance(x, dict):
                [walk(v) for v in x.values()]
            elif isinstance(x, list):
                [walk(v) for v in x]
        walk(data)
        return exc.code, "\n".join(strings)
    raise AssertionError(f"POST /prompt was accepted, not refused: {answer}")


def _video_matches(path: Path, known, other) -> list[str]:
    """Per frame: 'known' or 'other', whichever the (lossy) frame is closer to."""
    return ["known" if _mad(f, known) < _mad(f, other) else "other" for f in _frames(path)]


@needs_checkpoint
def test_enforcement_checks_the_frames_of_a_video_before_save_video(enforced, known_bundle):
    """VAEDecode -> CreateVideo -> SaveVideo: the VIDEO is traced to the IMAGE link it is made from, where the
    enforced check goes (provenance-guard-enforce-<CreateVideo>-images). Three branches of one generation: the
    known image alone (no video written), the unrelated one alone (written), the whole batch (written, without
    the known frame)."""
    base, tmp = enforced
    known, other = _pixels(known_bundle["known"]), _pixels(known_bundle["other"])
    graph = _sampled()
    for create, save, source, prefix in (("21", "22", _pick(graph, "20", 0), "video/enf_known"),
                                         ("31", "32", _pick(graph, "30", 1), "video/enf_other"),
                                         ("41", "42", ["6", 0], "video/enf_batch")):
        graph[create] = {"class_type": "CreateVideo", "inputs": {"images": source, "fps": 8.0}}
        graph[save] = {"class_type": "SaveVideo", "inputs": {"video": [create, 0], "filename_prefix": prefix,
                                                             "format": "mp4", "codec": "h264"}}
    before = _files(tmp / "output" / "video")
    history = _queue(base, graph, timeout=480)
    assert history["status"]["status_str"] == "success", history["status"]
    checks = _enforced_checks(history)
    assert {k: [i["verdict"] for i in v["images"]] for k, v in checks.items()} == {
        "provenance-guard-enforce-21-images": ["block"], "provenance-guard-enforce-31-images": ["pass"],
        "provenance-guard-enforce-41-images": ["block", "pass"]}, sorted(history["outputs"])
    top = checks["provenance-guard-enforce-21-images"]["images"][0]["matches"][0]
    assert top["url"] == "known.png" and top["score"] >= 0.995, top
    # the memorization monitor enforcement puts in front of the sampler reaches the check's payload
    memo = [i.get("memorization") for i in checks["provenance-guard-enforce-41-images"]["images"]]
    assert all(isinstance(m, dict) and isinstance(m.get("memorization_score"), float) for m in memo), memo

    written = sorted(_files(tmp / "output" / "video") - before)
    names = [p.name for p in written]
    assert not [n for n in names if n.startswith("enf_known")], f"a video of the blocked image was written: {names}"
    for path in written:
        assert path.suffix == ".mp4", names
        assert "known" not in _video_matches(path, known, other), f"{path.name} has a frame of the known image"
    other_videos = [p for p in written if p.name.startswith("enf_other")]
    batch_videos = [p for p in written if p.name.startswith("enf_batch")]
    assert len(other_videos) == 1 and _video_matches(other_videos[0], known, other) == ["other"], names
    assert len(batch_videos) == 1 and _video_matches(batch_videos[0], known, other) == ["other"], names


@needs_checkpoint
def test_enforcement_checks_images_before_save_webm(enforced, known_bundle):
    base, tmp = enforced
    known, other = _pixels(known_bundle["known"]), _pixels(known_bundle["other"])
    graph = _sampled()
    for save, source, prefix in (("51", _pick(graph, "50", 0), "webm/enf_known"),
                                 ("53", _pick(graph, "52", 1), "webm/enf_other")):
        graph[save] = {"class_type": "SaveWEBM", "inputs": {"images": source, "filename_prefix": prefix,
                                                            "codec": "vp9", "fps": 8.0, "crf": 10.0}}
    before = _files(tmp / "output")
    history = _queue(base, graph, timeout=480)
    assert history["status"]["status_str"] == "success", history["status"]
    checks = _enforced_checks(history)
    assert {k: [i["verdict"] for i in v["images"]] for k, v in checks.items()} == {
        "provenance-guard-enforce-51-images": ["block"], "provenance-guard-enforce-53-images": ["pass"]}, checks
    written = sorted(_files(tmp / "output") - before)
    names = [p.name for p in written]
    assert not [n for n in names if n.startswith("enf_known")], f"a webm of the blocked image was written: {names}"
    webms = [p for p in written if p.suffix == ".webm"]
    assert [p.name.startswith("enf_other") for p in webms] == [True], names
    assert _video_matches(webms[0], known, other) == ["other"]


@needs_checkpoint
def test_enforcement_checks_the_image_a_mask_preview_is_made_from(enforced, known_bundle):
    """ImageToMask -> MaskPreview: the MASK is traced to the IMAGE it is made from; MaskPreview writes the
    channel to temp/ as a grey PNG, which must never hold the known image's red channel."""
    import numpy as np

    base, tmp = enforced
    known, other = _pixels(known_bundle["known"]), _pixels(known_bundle["other"])
    graph = _sampled()
    for mask, preview, source in (("61", "62", _pick(graph, "60", 0)), ("64", "65", _pick(graph, "63", 1))):
        graph[mask] = {"class_type": "ImageToMask", "inputs": {"image": source, "channel": "red"}}
        graph[preview] = {"class_type": "MaskPreview", "inputs": {"mask": [mask, 0]}}
    before = _files(tmp / "temp")
    history = _queue(base, graph, timeout=480)
    assert history["status"]["status_str"] == "success", history["status"]
    checks = _enforced_checks(history)
    assert {k: [i["verdict"] for i in v["images"]] for k, v in checks.items()} == {
        "provenance-guard-enforce-61-image": ["block"], "provenance-guard-enforce-64-image": ["pass"]}, checks
    assert not (history["outputs"].get("62") or {}).get("images"), history["outputs"].get("62")
    red = {name: np.repeat(img[..., :1], 3, axis=2) for name, img in (("known", known), ("other", other))}
    written = sorted(_files(tmp / "temp") - before)
    held = {p.name: [n for n, ch in red.items() if _mad(_pixels(p), ch) < 2] for p in written}
    assert not [p for p, h in held.items() if "known" in h], f"temp/ holds the known image's channel: {held}"
    assert [h for h in held.values() if h] == [["other"]], held  # the unrelated image's mask is previewed


def _voxel_mesh() -> dict:
    return {"1": {"class_type": "VoxelToMesh", "inputs": {"voxel": ["9", 0], "algorithm": "basic", "threshold": 0.6}},
            "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "2": {"class_type": "SaveGLB", "inputs": {"mesh": ["1", 0], "filename_prefix": "mesh/enf"}}}


REFUSED_GRAPHS = {
    # pixels before decoding cannot be checked
    "save-latent": (lambda: {**_sampled(), "7": {"class_type": "SaveLatent", "inputs": {
        "samples": ["5", 0], "filename_prefix": "latents/enf"}}}, ("refused this prompt", "LATENT")),
    # a loaded video holds no image this graph can check
    "load-video": (lambda: {"1": {"class_type": "LoadVideo", "inputs": {"file": "clip.mp4"}},
                            "2": {"class_type": "SaveVideo", "inputs": {"video": ["1", 0], "filename_prefix": "video/lv",
                                                                        "format": "auto", "codec": "auto"}}},
                   ("refused this prompt", "VIDEO", "made from no image")),
    # a type enforcement does not know (MESH) names the two settings that classify it
    "unknown-type": (_voxel_mesh, ("refused this prompt", "MESH", "image_types", "data_types")),
}


@needs_checkpoint
@pytest.mark.parametrize("case", list(REFUSED_GRAPHS))
def test_enforcement_refuses_what_it_cannot_check(enforced, case):
    base, tmp = enforced
    make, words = REFUSED_GRAPHS[case]
    before = _files(tmp / "output")
    code, text = _refused(base, make())
    assert code == 400, text
    for word in words:
        assert word in text, f"{word!r} not in the refusal: {text}"
    queue = _request(f"{base}/queue")
    assert not queue["queue_running"] and not queue["queue_pending"], queue
    assert _files(tmp / "output") == before
    assert not _files(tmp / "output" / "latents")


def _user_check(image: list, **inputs) -> dict:
    """A user's Provenance Check with every input given (enforcement's defaults unless overridden)."""
    return {"class_type": "ProvenanceCheck", "inputs": {
        "images": image, "bundle": KNOWN_BUNDLE, "on_match": "block", "fail_mode": "closed",
        "use_bundle_thresholds": True, "warn": 0.9, "block": 0.95, "top_k": 5, "model_override": "", "bundle_path": "",
        "bundle_url": "", "verify": "confirm+escalate", "fetch_references": False, "references": "", "prompt_action": "warn",
        "strict": True, **inputs}}


@pytest.fixture(scope="module")
def decoy(tmp_path_factory, known_bundle, references):
    """A references folder that holds every row's file name of KNOWN_BUNDLE (the reference photos and
    known.png), each an unrelated photo: a check pointed at it verifies the known image against the wrong
    pixels."""
    from provenance_guard.demo import UNRELATED

    folder = tmp_path_factory.mktemp("decoy-refs")
    names = ["known.png"] + sorted(p.name for p in references.glob("*.png"))
    for i, name in enumerate(names):
        sample_image(UNRELATED[i % len(UNRELATED)]).convert("RGB").save(folder / name)
    return folder


@needs_checkpoint
def test_decoy_references_check_does_not_stand_in_for_the_enforced_one(comfyui, enforced, known_bundle, decoy,
                                                                       tmp_path):
    known = _pixels(known_bundle["known"])
    path = tmp_path / "known.png"
    shutil.copyfile(known_bundle["known"], path)

    def graph(name: str, prefix: str) -> dict:
        return {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
                "2": _user_check(["1", 0], references=str(decoy)),
                "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}}

    # control, without enforcement: the decoy makes the user's check let the known image through
    plain, plain_tmp = comfyui
    history = _queue(plain, graph(_upload(plain, path), "decoy_plain"), timeout=240)
    assert history["status"]["status_str"] == "success", history["status"]
    user = history["outputs"]["2"]["provenance"][0]["images"][0]
    saved = _saved(history, "3", plain_tmp / "output")
    assert user["verdict"] != "block" and len(saved) == 1 and _same(_pixels(saved[0]), known), (
        "the decoy no longer fools a check without enforcement, so this test proves nothing", user)

    # under enforcement: an enforced check goes in front of the decoy check's Save Image; a user's check with
    # exactly enforcement's settings (references left empty) is the enforced check, with nothing added
    base, tmp = enforced
    g = graph(_upload(base, path), "decoy_enforced")
    g["4"] = _user_check(["1", 0])
    g["5"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "honest_enforced"}}
    history = _queue(base, g, timeout=240)
    assert history["status"]["status_str"] == "success", history["status"]
    checks = _enforced_checks(history)
    assert list(checks) == ["provenance-guard-enforce-3-images"], sorted(history["outputs"])
    assert checks["provenance-guard-enforce-3-images"]["images"][0]["verdict"] == "block", checks
    assert history["outputs"]["4"]["provenance"][0]["images"][0]["verdict"] == "block"
    for save in ("3", "5"):
        assert not (history["outputs"].get(save) or {}).get("images"), history["outputs"].get(save)
    assert not list((tmp / "output").rglob("decoy_enforced*")), "the known image was saved"
    assert not list((tmp / "output").rglob("honest_enforced*")), "the known image was saved"
    for png in _files(tmp / "output", "*.png") | _files(tmp / "temp", "*.png"):
        assert not _same(_pixels(png), known), f"{png} holds the known image"


def _ws_run(base: str, graph: dict, timeout: float = 480) -> tuple[int, list[dict], dict]:
    """Queue graph as a websocket client: (binary frames received, JSON messages, history)."""
    from websockets.sync.client import connect

    client = uuid.uuid4().hex
    host = base.split("://", 1)[1]
    binary, messages = 0, []
    with connect(f"ws://{host}/ws?clientId={client}", proxy=None, max_size=None) as ws:
        body = json.dumps({"prompt": graph, "client_id": client}).encode()
        try:
            prompt_id = _request(f"{base}/prompt", body, {"Content-Type": "application/json"})["prompt_id"]
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"POST /prompt answered {exc.code}: {exc.read().decode('utf-8', 'replace')}") from None
        deadline = time.time() + timeout
        while True:
            assert time.time() < deadline, f"the prompt did not finish within {timeout} s"
            frame = ws.recv(timeout=deadline - time.time())
            if isinstance(frame, bytes):
                binary += 1
                continue
            msg = json.loads(frame)
            messages.append(msg)
            data = msg.get("data") or {}
            if data.get("prompt_id") == prompt_id and (
                    msg["type"] in ("execution_success", "execution_error", "execution_interrupted")
                    or (msg["type"] == "executing" and data.get("node") is None)):
                break
    # ComfyUI sends execution_success before it writes the history: wait for the entry.
    while True:
        history = _request(f"{base}/history/{prompt_id}")
        if prompt_id in history:
            return binary, messages, history[prompt_id]
        assert time.time() < deadline, f"the prompt's history did not appear within {timeout} s"
        time.sleep(0.2)


@needs_checkpoint
def test_enforcement_turns_latent_previews_off(comfyui, enforced):
    """Both ComfyUIs run with --preview-method latent2rgb. A fresh seed, so the sampler really runs: without
    enforcement its steps reach the websocket as binary preview frames; under enforcement none arrive."""
    def graph() -> dict:
        g = _sampled(seed=SEED + 1000)
        g["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}
        return g

    plain, _ = comfyui
    binary, messages, history = _ws_run(plain, graph())
    assert history["status"]["status_str"] == "success", history["status"]
    assert binary > 0, "no preview frames without enforcement: the control shows nothing"

    base, tmp = enforced
    binary, messages, history = _ws_run(base, graph())
    assert history["status"]["status_str"] == "success", history["status"]
    progress = [m for m in messages if m["type"] == "progress" and m["data"].get("node") == "5"]
    assert progress, "the sampler did not run (cached?): no progress messages from node 5"
    assert binary == 0, f"{binary} binary (latent preview) frames reached the browser under enforcement"
    assert "latent previews turned off" in _log(tmp)


def _evidence(match: dict):
    import base64
    import io

    from PIL import Image

    uri = match.get("evidence")
    assert isinstance(uri, str) and uri.startswith("data:image/jpeg;base64,"), sorted(match)
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


LABEL_PX = 16


def _pictures(evidence, training) -> float:
    """How many pictures of the training image's aspect fit the evidence's width, beside its label strip."""
    aspect = training.width / training.height
    return evidence.width / (aspect * (evidence.height - LABEL_PX))


@needs_checkpoint
def test_evidence_is_strict_under_enforcement_and_side_by_side_without(comfyui, enforced, known_bundle, tmp_path):
    from PIL import Image

    path = tmp_path / "known.png"
    shutil.copyfile(known_bundle["known"], path)
    training = Image.open(known_bundle["known"])

    def graph(name: str) -> dict:
        check = _graph(name, "warn", "evidence")["2"]
        check["inputs"].update(bundle=KNOWN_BUNDLE, verify="confirm")  # strict left at its default (false)
        return {"1": {"class_type": "LoadImage", "inputs": {"image": name}}, "2": check,
                "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}

    plain, _ = comfyui
    history = _queue(plain, graph(_upload(plain, path)), timeout=240)
    top = history["outputs"]["2"]["provenance"][0]["images"][0]["matches"][0]
    assert top["url"] == "known.png", top
    pictures = _pictures(_evidence(top), training)
    assert 1.9 < pictures < 2.2, f"without enforcement the evidence should show two pictures, not {pictures:.2f}"

    base, _ = enforced
    history = _queue(base, graph(_upload(base, path)), timeout=240)
    assert history["status"]["status_str"] == "success", history["status"]
    reports = {"user's check": history["outputs"]["2"]["provenance"][0], **_enforced_checks(history)}
    assert "provenance-guard-enforce-3-images" in reports, sorted(history["outputs"])
    for who, report in reports.items():
        top = report["images"][0]["matches"][0]
        assert top["url"] == "known.png", (who, top)
        evidence = _evidence(top)
        pictures = _pictures(evidence, training)
        assert abs(pictures - 1) < 0.03, (
            f"{who}: the evidence under enforcement is {evidence.size}, {pictures:.2f} pictures wide: it shows more "
            f"than the training image (the blocked output beside it?)")


def test_browser_draws_verdict_and_strict_evidence_on_the_node(enforced, known_bundle, tmp_path):
    """The front end of the enforced ComfyUI in headless Chromium: a graph with a Provenance Check queued
    through window.app; provenance.js tints the node and draws the verdict and the evidence picture, with no
    page error from provenance.js. Screenshot: comfyui_node.png in the test's folder (or SCREENS_DIR)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium: install one or set CHROMIUM")
    base, _ = enforced
    path = tmp_path / "known.png"
    shutil.copyfile(known_bundle["known"], path)
    name = _upload(base, path)
    graph = _graph(name, "block", "browser")
    graph["2"]["inputs"].update(bundle=KNOWN_BUNDLE, verify="confirm")
    screens = Path(os.environ.get("SCREENS_DIR") or tmp_path)
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
            assert "provenance-guard.ProvenanceCheck" in page.evaluate("window.app.extensions.map(e => e.name)")
            page.evaluate("async (g) => { await window.app.loadApiJson(g, 'provenance'); }", graph)
            page.evaluate("async () => { await window.app.queuePrompt(0); }")
            page.wait_for_function("() => window.app.graph.getNodeById(2)?._provenanceWidget", timeout=240_000)
            page.wait_for_function("""() => { const i = window.app.graph.getNodeById(2)._provenanceWidget.element
                                                .querySelector('img'); return i && i.complete && i.naturalWidth > 0; }""",
                                   timeout=30_000)
            node = page.evaluate("""() => {
                const n = window.app.graph.getNodeById(2), el = n._provenanceWidget.element;
                const img = el.querySelector('img');
                return {bgcolor: n.bgcolor, text: el.innerText, natural: [img.naturalWidth, img.naturalHeight],
                        shown: [img.getBoundingClientRect().width, img.getBoundingClientRect().height],
                        src: img.src.slice(0, 23), pos: n.pos, size: n.size};
            }""")
            # close the dialogs (templates; the "Execution Blocked" error ComfyUI shows for the blocker's message),
            # bring the node into view and draw it, then photograph the page
            for _ in range(3):
                page.keyboard.press("Escape")
                page.wait_for_timeout(300)
            page.evaluate("""() => { const n = window.app.graph.getNodeById(2), c = window.app.canvas;
                c.ds.offset[0] = -n.pos[0] + 400; c.ds.offset[1] = -n.pos[1] + 150; c.ds.scale = 1;
                c.setDirty(true, true); c.draw(true, true); }""")
            page.wait_for_timeout(1000)
            screens.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screens / "comfyui_node.png"))
        finally:
            browser.close()
    ours = [e for e in errors if "provenance.js" in e]
    assert not ours, ours
    assert node["bgcolor"] == "#b71c1c" and node["text"].startswith("image 0: BLOCK"), node
    assert "known.png" in node["text"], node["text"]
    assert node["src"] == "data:image/jpeg;base64," and node["shown"][0] > 0 and node["shown"][1] > 0, node
    # strict evidence: one picture (the training image, square here) over a 16 px label strip
    w, h = node["natural"]
    assert abs(w / (h - LABEL_PX) - 1) < 0.03, node


# Config files without a usable "enforce" object: each must refuse every prompt (they once turned enforcement
# off silently). The pack reads the file once, at load: one ComfyUI start per shape.
BAD_CONFIGS = {
    "enforce-string": ('{"enforce": "studio"}', '"enforce" must be an object'),
    "misspelt-key": ('{"enforcement": {"bundle": "studio-refs"}}', 'holds no "enforce" object'),
    "empty-object": ("{}", 'holds no "enforce" object'),
    "empty-enforce": ('{"enforce": {}}', '"bundle" must name the bundle'),
    "null-enforce": ('{"enforce": null}', 'holds no "enforce" object'),
}


@pytest.mark.parametrize("shape", list(BAD_CONFIGS))
def test_malformed_studio_config_refuses_every_prompt(tmp_path_factory, built_bundle, shape):
    """user/provenance_guard.json is read from folder_paths.get_user_directory(), which with --base-directory
    is <base>/user (folder_paths.py: user_directory = os.path.join(base_path, "user"))."""
    text, why = BAD_CONFIGS[shape]
    tmp = tmp_path_factory.mktemp("comfy-malformed")
    (tmp / "models" / "provenance").mkdir(parents=True)
    shutil.copytree(built_bundle, tmp / "models" / "provenance" / "studio-refs")
    _pack_yaml(tmp, tmp / "models" / "provenance")
    (tmp / "user").mkdir()
    (tmp / "user" / "provenance_guard.json").write_text(text)
    with _running_comfyui(tmp, env_drop=("PROVENANCE_GUARD_ENFORCE",)) as base:
        graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                 "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "refused"}}}
        body = json.dumps({"prompt": graph, "client_id": "e2e"}).encode()
        with pytest.raises(urllib.error.HTTPError) as caught:
            _request(f"{base}/prompt", body, {"Content-Type": "application/json"})
        assert caught.value.code == 400
        text = caught.value.read().decode("utf-8", "replace")
        assert "Provenance Guard studio enforcement is configured but cannot run" in text, text
        details = json.loads(text)["error"]["details"]
        assert why in details and "Every prompt is refused" in details, details
        assert json.loads(text)["node_errors"], text
        queue = _request(f"{base}/queue")
        assert not queue["queue_running"] and not queue["queue_pending"], queue
        assert _request(f"{base}/history") == {}
        assert not list((tmp / "output").glob("refused_*.png"))
        log = _log(tmp)
    assert "Provenance Guard studio enforcement is configured but cannot run" in log

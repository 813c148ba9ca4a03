"""End to end against a real ComfyUI on 127.0.0.1 (--cpu), driven through its HTTP API.

Skipped unless COMFYUI_DIR names a ComfyUI tree. COMFYUI_PYTHON is the interpreter to run it with (one
that has ComfyUI's requirements.txt and this pack's requirements.txt installed; default: COMFYUI_DIR/.venv,
else this interpreter). The pack is loaded through extra_model_paths.yaml (custom_nodes and the
provenance models folder), as a studio would mount it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory, built_bundle, tiny_model):
    tmp = tmp_path_factory.mktemp("comfy")
    (tmp / "nodes").mkdir()
    (tmp / "custom_nodes").mkdir()  # ComfyUI's own folder under --base-directory; the pack comes via the yaml
    os.symlink(ROOT, tmp / "nodes" / "provenance-guard")
    (tmp / "models" / "provenance").mkdir(parents=True)
    shutil.copytree(built_bundle, tmp / "models" / "provenance" / "studio-refs")
    (tmp / "extra_model_paths.yaml").write_text(
        f"provenance_e2e:\n  base_path: {tmp}\n  custom_nodes: nodes\n  provenance: models/provenance\n")
    port = _free_port()
    log = open(tmp / "comfyui.log", "wb")
    env = dict(os.environ, PROVENANCE_GUARD_DEVICE="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(tmp),
         "--extra-model-paths-config", str(tmp / "extra_model_paths.yaml"), "--disable-auto-launch",
         "--database-url", "sqlite:///:memory:"],
        cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            _request(f"{base}/object_info/ProvenanceCheck", timeout=5)
            break
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("ComfyUI did not start:\n" + (tmp / "comfyui.log").read_text(errors="replace")[-4000:])
            time.sleep(1)
    yield base, tmp
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _queue(base: str, graph: dict, timeout: float = 300) -> dict:
    prompt_id = _request(f"{base}/prompt", json.dumps({"prompt": graph, "client_id": "e2e"}).encode(),
                         {"Content-Type": "application/json"})["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _request(f"{base}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.5)
    raise AssertionError("the prompt did not finish")


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

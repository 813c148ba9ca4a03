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
def _running_comfyui(tmp: Path, env_extra: dict | None = None, env_drop: tuple = ()):
    """ComfyUI on 127.0.0.1 with --base-directory tmp (its extra_model_paths.yaml must exist); yields base url.
    Output goes to tmp/comfyui.log."""
    port = _free_port()
    log = open(tmp / "comfyui.log", "wb")
    env = dict(os.environ, PROVENANCE_GUARD_DEVICE="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               **(env_extra or {}))
    for name in env_drop:
        env.pop(name, None)
    proc = subprocess.Popen(
        [_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(tmp),
         "--extra-model-paths-config", str(tmp / "extra_model_paths.yaml"), "--disable-auto-launch",
         "--database-url", "sqlite:///:memory:"],
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


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory, built_bundle, tiny_model):
    tmp = tmp_path_factory.mktemp("comfy")
    (tmp / "models" / "provenance").mkdir(parents=True)
    shutil.copytree(built_bundle, tmp / "models" / "provenance" / "studio-refs")
    _pack_yaml(tmp, tmp / "models" / "provenance", CHECKPOINT.parent if CHECKPOINT else None)
    with _running_comfyui(tmp) as base:
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
    """A second ComfyUI with PROVENANCE_GUARD_ENFORCE naming KNOWN_BUNDLE (same bundles folder)."""
    tmp = tmp_path_factory.mktemp("comfy-enforced")
    _pack_yaml(tmp, known_bundle["path"].parent)
    with _running_comfyui(tmp, {"PROVENANCE_GUARD_ENFORCE": KNOWN_BUNDLE}) as base:
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


def test_malformed_studio_config_refuses_every_prompt(tmp_path_factory, built_bundle):
    """user/provenance_guard.json is read from folder_paths.get_user_directory(), which with --base-directory
    is <base>/user (folder_paths.py: user_directory = os.path.join(base_path, "user"))."""
    tmp = tmp_path_factory.mktemp("comfy-malformed")
    (tmp / "models" / "provenance").mkdir(parents=True)
    shutil.copytree(built_bundle, tmp / "models" / "provenance" / "studio-refs")
    _pack_yaml(tmp, tmp / "models" / "provenance")
    (tmp / "user").mkdir()
    (tmp / "user" / "provenance_guard.json").write_text('{"enforce": "studio"}')
    with _running_comfyui(tmp, env_drop=("PROVENANCE_GUARD_ENFORCE",)) as base:
        graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                 "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "refused"}}}
        body = json.dumps({"prompt": graph, "client_id": "e2e"}).encode()
        with pytest.raises(urllib.error.HTTPError) as caught:
            _request(f"{base}/prompt", body, {"Content-Type": "application/json"})
        assert caught.value.code == 400
        text = caught.value.read().decode("utf-8", "replace")
        assert "Provenance Guard studio enforcement is configured but cannot run" in text, text
        assert json.loads(text)["node_errors"], text
        queue = _request(f"{base}/queue")
        assert not queue["queue_running"] and not queue["queue_pending"], queue
        assert _request(f"{base}/history") == {}
        assert not list((tmp / "output").glob("refused_*.png"))
        log = _log(tmp)
    assert "Provenance Guard studio enforcement is configured but cannot run" in log

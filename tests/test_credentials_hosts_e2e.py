"""Content Credentials end to end in the real hosts: A1111 and Forge (through /sdapi/v1) and ComfyUI (through
its HTTP API), CPU, offline, loopback only. Each part is skipped unless its host's variables are set, as in
tests/test_a1111_e2e.py (A1111_DIR/A1111_PYTHON, FORGE_DIR/FORGE_PYTHON; the webui, extension install and
bundle fixtures are that file's) and tests/test_comfyui_e2e.py (COMFYUI_DIR, COMFYUI_PYTHON, COMFYUI_CHECKPOINT).
The host's python needs c2pa-python (install.py installs it into the webuis; for ComfyUI, requirements.txt).

What is asserted: the files the host saved carry valid Content Credentials signed by the test's key (trusted
under its root), the check assertion's verdict is the host's own verdict for that image (the API's
"Provenance results" / the node's record), the host's metadata written before the signature (A1111's
infotext, Forge's stealth infotext in RGBA, ComfyUI's prompt and workflow chunks, our record chunk) is still
there, a blocked image is signed as block, never pass, and "required" without a usable key fails closed.

Run: source /work/hosts/*/ENV.sh; .venv/bin/python -m pytest -q -p no:cacheprovider -rs
tests/test_credentials_hosts_e2e.py
"""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import uuid
from pathlib import Path

import pytest
from PIL import Image
from provenance_guard.core.record import png_text_chunks, read_record
from provenance_guard.demo import sample_image
from test_a1111_e2e import (  # noqa: F401  (host, installed and webui are fixtures used by name)
    PROMPT,
    SCRIPT_TITLE,
    SEED,
    Webui,
    _assert_clean_log,
    _assert_no_hook_errors,
    _b64_png,
    _files,
    _generate,
    _is_placeholder,
    _parse_infotext,
    _per_image,
    _saved_samples,
    _script_args,
    _set_options,
    host,
    installed,
    webui,
)

cr = pytest.importorskip("provenance_guard.core.credentials")
pytest.importorskip("c2pa", reason="c2pa-python is not installed here (pip install '.[c2pa]')")

CREDENTIAL_DEFAULTS = {"provenance_guard_credentials": "off", "provenance_guard_credentials_folder": "",
                       "provenance_guard_credentials_prompts": True}


def _host_has_c2pa(python: str, cwd: Path, env: dict) -> bool:
    import subprocess

    proc = subprocess.run([python, "-c", "import c2pa"], cwd=str(cwd), env=env, capture_output=True, timeout=120)
    return proc.returncode == 0


def _ingredients(path: Path) -> list[dict]:
    import c2pa

    mime = cr.mime_of(path)
    with open(path, "rb") as f, c2pa.Reader(mime, f) as reader:
        return (reader.get_active_manifest() or {}).get("ingredients") or []


# A1111 and Forge ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def signing_webui(webui: Webui):  # noqa: F811 - the fixture imported from test_a1111_e2e
    """The test's webui with a studio key made for it; the credential settings go back to off afterwards."""
    if not _host_has_c2pa(webui.host.python, webui.host.tmp, webui.host.env):
        pytest.skip(f"the {webui.host.name} python has no c2pa-python (install.py installs it; a failed install "
                    f"leaves credentials off)")
    keys = webui.host.tmp / "studio-keys"
    if not (keys / "signer.key").is_file():
        cr.init_credentials(keys, organization="E2E Studio")
    yield webui, keys
    _set_options(webui, CREDENTIAL_DEFAULTS)


def _sign_on(w: Webui, keys: Path, mode: str = "on", prompts: bool = True) -> None:
    _set_options(w, {"provenance_guard_credentials": mode, "provenance_guard_credentials_folder": str(keys),
                     "provenance_guard_credentials_prompts": prompts})


def test_webui_signs_each_saved_image_with_its_verdict_after_the_infotext(signing_webui):
    w, keys = signing_webui
    _sign_on(w, keys)
    payload = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "batch_size": 2, "seed": SEED,
               "save_images": True, "alwayson_scripts": _script_args(str(w.host.bundle), "warn")}
    out = _generate(w, "txt2img", payload)
    _assert_no_hook_errors(out, "txt2img with Content Credentials on")
    parsed, _, results = _per_image(out, 2, w)
    saved = _saved_samples(w, out["new_files"], "txt2img")
    assert sorted(saved) == [SEED, SEED + 1], out["new_files"]
    root = (keys / "root.pem").read_bytes()
    for i, seed in enumerate((SEED, SEED + 1)):
        path = saved[seed]
        status = cr.verify_file(path, root)
        assert status.state == "trusted", f"{path}: {status.state} {status.problems}\n{w.log_tail()}"
        assert status.check["verdict"] == results[i]["verdict"] == parsed[i]["Provenance"], \
            (status.check, results[i]["verdict"], parsed[i])
        assert abs(status.check["max_score"] - results[i]["max_score"]) < 1e-4, (status.check, results[i])
        assert status.generation["seed"] == seed and status.generation["prompt"] == PROMPT, status.generation
        assert status.source_type == cr.SOURCE_TYPE
        chunks = png_text_chunks(path)  # written by the webui before the signature: still there
        fields = _parse_infotext(chunks.get("parameters", ""))
        assert fields.get("Seed") == str(seed) and fields.get("Provenance") == results[i]["verdict"], chunks
        assert read_record(path).verdict == results[i]["verdict"]
        if w.host.name == "forge":
            with Image.open(path) as img:
                assert img.mode == "RGBA", f"{path}: Forge's stealth infotext saves RGBA, got {img.mode}"
        expected = "Forge" if w.host.name == "forge" else "AUTOMATIC1111"
        assert expected in json.dumps(_active_actions(path)), _active_actions(path)
    # what the extension did not check is never signed (a grid the webui saved of the batch)
    grids = [p for p in out["new_files"] if "grids" in str(p) and p.suffix.lower() == ".png"]
    for grid in grids:
        assert cr.verify_file(grid).state == "absent", grid
    w.state["credentials"] = {"verdicts": [r["verdict"] for r in results], "grids": len(grids)}


def test_webui_required_saves_a_grid_as_a_placeholder_and_signs_the_images(signing_webui):
    """Required: nothing real is left unsigned. The batch's images are signed; the grid the webui saves
    carries no check of its own and is saved as a placeholder."""
    w, keys = signing_webui
    _sign_on(w, keys, mode="required")
    _set_options(w, {"grid_save": True})
    payload = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "batch_size": 2, "seed": SEED,
               "save_images": True, "alwayson_scripts": _script_args(str(w.host.bundle), "warn")}
    out = _generate(w, "txt2img", payload)
    _assert_no_hook_errors(out, "txt2img with Content Credentials required")
    saved = _saved_samples(w, out["new_files"], "txt2img")
    for path in saved.values():
        assert cr.verify_file(path).state == "valid", path
    grids = [p for p in out["new_files"] if "grids" in str(p) and p.suffix.lower() == ".png"]
    assert grids, out["new_files"]
    for grid in grids:
        with Image.open(grid) as img:
            assert _is_placeholder(img), f"{grid}: a grid was saved unsigned while credentials are required"
    _set_options(w, CREDENTIAL_DEFAULTS)


def _active_actions(path: Path) -> list:
    import c2pa

    with open(path, "rb") as f, c2pa.Reader(cr.mime_of(path), f) as reader:
        manifest = reader.get_active_manifest() or {}
    return [a for a in manifest.get("assertions") or [] if str(a.get("label", "")).startswith("c2pa.actions")]


def test_webui_signs_a_blocked_placeholder_as_block_and_leaves_prompts_out_when_asked(signing_webui):
    w, keys = signing_webui
    _sign_on(w, keys, prompts=False)
    # thresholds every image reaches: blocked, replaced by the placeholder
    args = [True, "", str(w.host.bundle), False, -1.0, -0.5, "block", "open", "off", False]
    payload = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "batch_size": 1, "seed": SEED + 7,
               "save_images": True, "alwayson_scripts": {SCRIPT_TITLE: {"args": args}}}
    out = _generate(w, "txt2img", payload)
    _assert_no_hook_errors(out, "txt2img block with Content Credentials on")
    _, _, results = _per_image(out, 1, w)
    assert results[0]["verdict"] == "block", results
    (path,) = _saved_samples(w, out["new_files"], "txt2img").values()
    with Image.open(path) as img:
        assert _is_placeholder(img), path
    status = cr.verify_file(path)
    assert status.state == "valid" and status.check["verdict"] == "block", (status.state, status.check)
    assert "prompt" not in (status.generation or {}) and "negative_prompt" not in (status.generation or {})


def test_webui_img2img_signs_the_input_as_the_parent_ingredient(signing_webui):
    w, keys = signing_webui
    _sign_on(w, keys)
    init = sample_image("coffee").convert("RGB").resize((64, 64))
    payload = {"init_images": [_b64_png(init)], "prompt": PROMPT, "steps": 2, "denoising_strength": 0.5,
               "width": 64, "height": 64, "batch_size": 1, "seed": SEED, "save_images": True,
               "alwayson_scripts": _script_args(str(w.host.bundle), "warn")}
    out = _generate(w, "img2img", payload)
    _assert_no_hook_errors(out, "img2img with Content Credentials on")
    _, _, results = _per_image(out, 1, w)
    (path,) = _saved_samples(w, out["new_files"], "img2img").values()
    status = cr.verify_file(path, (keys / "root.pem").read_bytes())
    assert status.state == "trusted" and status.check["verdict"] == results[0]["verdict"], status.to_json()
    (ingredient,) = _ingredients(path)
    assert ingredient["relationship"] == "parentOf", ingredient
    assert any(a.get("action") == "c2pa.edited" for act in _active_actions(path)
               for a in act["data"]["actions"])


def test_webui_required_without_a_key_saves_nothing_real(signing_webui):
    w, keys = signing_webui
    _sign_on(w, keys.parent / "no-such-keys", mode="required")
    payload = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "batch_size": 1, "seed": SEED,
               "save_images": True, "alwayson_scripts": _script_args(str(w.host.bundle), "warn")}
    out = _generate(w, "txt2img", payload)
    _assert_no_hook_errors(out, "txt2img with Content Credentials required and no key")
    _, images, results = _per_image(out, 1, w)
    r = results[0]
    assert r["verdict"] == "block" and "Content Credentials are required" in (r["error"] or ""), r
    assert "Content Credentials signing key folder" in r["error"], r["error"]
    (path,) = _saved_samples(w, out["new_files"], "txt2img").values()
    with Image.open(path) as img:
        assert _is_placeholder(img), f"{path}: credentials required without a key, yet an image was saved"
    assert _is_placeholder(images[0][1])
    _set_options(w, CREDENTIAL_DEFAULTS)
    _assert_clean_log(w, "after the Content Credentials calls")


# ComfyUI -----------------------------------------------------------------------------------------------------

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
needs_comfyui = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run")


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("comfy-keys")
    cr.init_credentials(folder, organization="Comfy E2E Studio")
    return folder


@pytest.fixture(scope="module")
def comfy_signing(tmp_path_factory, built_bundle, keys_dir):
    """A ComfyUI whose user/provenance_guard.json turns Content Credentials on with the test's key."""
    import test_comfyui_e2e as ce

    if not COMFYUI_DIR:
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout to run")
    tmp = tmp_path_factory.mktemp("comfy-credentials")
    if not _host_has_c2pa(ce._python(), tmp, dict(os.environ)):
        pytest.skip("the ComfyUI python has no c2pa-python (pip install -r requirements.txt there)")
    (tmp / "models" / "provenance").mkdir(parents=True)
    shutil.copytree(built_bundle, tmp / "models" / "provenance" / "studio-refs")
    (tmp / "user").mkdir()
    (tmp / "user" / "provenance_guard.json").write_text(json.dumps(
        {"credentials": {"mode": "on", "folder": str(keys_dir), "prompts": True}}))
    ce._pack_yaml(tmp, tmp / "models" / "provenance", ce.CHECKPOINT.parent if ce.CHECKPOINT else None)
    with ce._running_comfyui(tmp) as base:
        yield base, tmp


WORKFLOW = {"last_node_id": 3, "nodes": [{"id": 2, "type": "ProvenanceCheck"}], "extra": {"e2e": True}}


def _queue(base: str, graph: dict, timeout: float = 480) -> dict:
    """POST /prompt with a workflow in extra_pnginfo (as the UI sends it), without a client id (an API
    caller: no "executed" message is sent), and wait for the history."""
    import test_comfyui_e2e as ce

    body = {"prompt": graph, "extra_data": {"extra_pnginfo": {"workflow": WORKFLOW}}}
    try:
        prompt_id = ce._request(f"{base}/prompt", json.dumps(body).encode(),
                                {"Content-Type": "application/json"})["prompt_id"]
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"POST /prompt answered {exc.code}: {exc.read().decode('utf-8', 'replace')}") from None
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = ce._request(f"{base}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.5)
    raise AssertionError(f"the prompt did not finish within {timeout} s")


def _check_node(images: list, on_match: str = "warn") -> dict:
    return {"class_type": "ProvenanceCheck", "inputs": {
        "images": images, "bundle": "studio-refs", "on_match": on_match, "fail_mode": "open",
        "use_bundle_thresholds": True, "warn": 0.9, "block": 0.95, "top_k": 3, "model_override": "",
        "bundle_path": ""}}


def _assert_signed(path: Path, keys: Path, graph: dict) -> cr.CredentialStatus:
    chunks = png_text_chunks(path)
    assert {"prompt", "workflow", "provenance"} <= set(chunks), sorted(chunks)
    stored = json.loads(chunks["prompt"])  # ComfyUI's copy of the graph (it adds its own keys, is_changed)
    assert {k: (v["class_type"], v["inputs"]) for k, v in stored.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in graph.items()}
    assert json.loads(chunks["workflow"]) == WORKFLOW
    status = cr.verify_file(path, (keys / "root.pem").read_bytes())
    assert status.state == "trusted", f"{path}: {status.state} {status.problems}"
    record = read_record(path)
    assert record is not None and status.check["verdict"] == record.verdict, (status.check, record.verdict)
    assert status.check["max_score"] == pytest.approx(record.max_score, abs=1e-5)
    return status


@needs_comfyui
def test_comfyui_txt2img_save_image_files_are_signed_with_their_checks(comfy_signing, keys_dir):
    import test_comfyui_e2e as ce

    if ce.CHECKPOINT is None:
        pytest.skip("no SD1.5 checkpoint: set COMFYUI_CHECKPOINT")
    base, tmp = comfy_signing
    graph = ce._txt2img("studio-refs", "warn", "cc-t2i")
    history = _queue(base, graph)
    assert history["status"]["status_str"] == "success", history["status"]
    pngs = ce._saved(history, "8", tmp / "output")
    report = history["outputs"]["7"]["provenance"][0]
    assert len(pngs) == 2 and len(report["images"]) == 2, history["outputs"]
    for png, node_result in zip(pngs, report["images"], strict=True):
        status = _assert_signed(png, keys_dir, graph)
        assert status.check["verdict"] == node_result["verdict"], (status.check, node_result)
        assert status.generation["prompt"] == "astronaut" and status.generation["seed"] == ce.SEED
        assert status.source_type == cr.SOURCE_TYPE


@needs_comfyui
def test_comfyui_a_loaded_image_is_the_parent_and_the_explicit_node_signs(comfy_signing, keys_dir, tmp_path):
    import test_comfyui_e2e as ce

    base, tmp = comfy_signing
    picture = tmp_path / f"loaded-{uuid.uuid4().hex[:6]}.png"
    sample_image("camera").convert("RGB").resize((96, 96)).save(picture)
    name = ce._upload(base, picture)
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": name}}, "2": _check_node(["1", 0]),
             "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "cc-loaded"}},
             "4": {"class_type": "ProvenanceSaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "cc-explicit",
                                                                   "include_prompts": False}}}
    history = _queue(base, graph)
    assert history["status"]["status_str"] == "success", history["status"]
    verdict = history["outputs"]["2"]["provenance"][0]["images"][0]["verdict"]
    (loaded,) = ce._saved(history, "3", tmp / "output")
    status = _assert_signed(loaded, keys_dir, graph)
    assert status.check["verdict"] == verdict
    (ingredient,) = _ingredients(loaded)
    assert ingredient["relationship"] == "parentOf" and ingredient["title"] == Path(name).name, ingredient
    (explicit,) = ce._saved(history, "4", tmp / "output")
    status = _assert_signed(explicit, keys_dir, graph)
    assert status.check["verdict"] == verdict and "prompt" not in (status.generation or {})


@needs_comfyui
def test_comfyui_save_video_mp4_is_signed_with_its_frames_check(comfy_signing, keys_dir, tmp_path):
    """LoadImage -> Provenance Check -> CreateVideo -> SaveVideo (MP4): the video file is signed with its
    frames' check (every frame checked), as C2PA binds MP4."""
    import test_comfyui_e2e as ce

    base, tmp = comfy_signing
    picture = tmp_path / f"video-{uuid.uuid4().hex[:6]}.png"
    sample_image("astronaut").convert("RGB").resize((64, 64)).save(picture)
    name = ce._upload(base, picture)
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": name}}, "2": _check_node(["1", 0]),
             "3": {"class_type": "CreateVideo", "inputs": {"images": ["2", 0], "fps": 8.0}},
             "4": {"class_type": "SaveVideo", "inputs": {"video": ["3", 0], "filename_prefix": "cc-video",
                                                         "format": "auto", "codec": "auto"}}}
    history = _queue(base, graph)
    assert history["status"]["status_str"] == "success", history["status"]
    verdict = history["outputs"]["2"]["provenance"][0]["images"][0]["verdict"]
    (video,) = ce._saved(history, "4", tmp / "output")
    assert video.suffix == ".mp4", video
    status = cr.verify_file(video, (keys_dir / "root.pem").read_bytes())
    assert status.state == "trusted", (status.state, status.problems)
    assert status.check["verdict"] == verdict and status.source_type == cr.SOURCE_TYPE


@needs_comfyui
def test_comfyui_pixels_no_check_saw_are_not_signed_and_the_log_is_clean(comfy_signing):
    import test_comfyui_e2e as ce

    base, tmp = comfy_signing
    picture = tmp / "never-checked.png"
    sample_image("coins").convert("RGB").resize((80, 80)).save(picture)
    name = ce._upload(base, picture)
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "cc-plain"}}}
    history = _queue(base, graph)
    assert history["status"]["status_str"] == "success", history["status"]
    (plain,) = ce._saved(history, "2", tmp / "output")
    assert cr.verify_file(plain).state == "absent"
    log = ce._log(tmp)
    assert "saved without Content Credentials" in log, log[-3000:]
    ours = [t[:3000] for t in log.split("Traceback (most recent call last)")[1:] if "provenance" in t[:3000].lower()]
    assert not ours, "\n-----\n".join(ours)


@needs_comfyui
def test_comfyui_required_without_a_key_refuses_prompts_that_save(tmp_path_factory, built_bundle):
    import test_comfyui_e2e as ce

    tmp = tmp_path_factory.mktemp("comfy-required")
    if not _host_has_c2pa(ce._python(), tmp, dict(os.environ)):
        pytest.skip("the ComfyUI python has no c2pa-python")
    (tmp / "models" / "provenance").mkdir(parents=True)
    shutil.copytree(built_bundle, tmp / "models" / "provenance" / "studio-refs")
    (tmp / "user").mkdir()
    (tmp / "user" / "provenance_guard.json").write_text(json.dumps(
        {"credentials": {"mode": "required", "folder": str(tmp / "no-keys")}}))
    ce._pack_yaml(tmp, tmp / "models" / "provenance")
    with ce._running_comfyui(tmp, env_drop=(cr.ENV_CREDENTIALS,)) as base:
        picture = tmp / "in.png"
        sample_image("camera").convert("RGB").resize((64, 64)).save(picture)
        name = ce._upload(base, picture)
        graph = {"1": {"class_type": "LoadImage", "inputs": {"image": name}}, "2": _check_node(["1", 0]),
                 "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "cc-req"}}}
        with pytest.raises(AssertionError, match="400.*Content Credentials are required but cannot be written"):
            _queue(base, graph)
    assert not list((tmp / "output").glob("cc-req*")) if (tmp / "output").is_dir() else True

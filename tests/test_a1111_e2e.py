"""End to end in a real Automatic1111 webui and a real Forge (CPU, offline, loopback only).

Parametrised by host; each host runs only when its variables are set:
- a1111: A1111_DIR (the webui folder) and A1111_PYTHON (its venv's python); optional A1111_HF_HOME (an HF cache
  holding the CLIP tokenizer; HF_HOME is otherwise left unset for the webui).
- forge: FORGE_DIR and FORGE_PYTHON.

Per host, one webui start serves every test (module-scoped fixtures):
1. The extension is installed as "Install from URL" would, under a test name: the repository's tracked and
   untracked-but-not-ignored files are copied into WEBUI/extensions/provenance-guard-e2e-test (with a marker file
   saying the test made it), and its install.py is run the way the webui's start runs it
   (launch_utils.run_extension_installer). A user's own installed copy (any other extension folder holding
   scripts/provenance_guard.py) is never touched: it is listed in the temporary settings' disabled_extensions, so
   the webui loads the copy under test. A test folder without the marker (not made by this test) stops the run;
   only the marked folders (the extension and the test bundle) are removed at the end.
2. A tiny random-weight CLIP (demo.make_tiny_model) and a bundle of unrelated reference photos are built with the
   HOST's python, through the installed clone (`python WEBUI/extensions/provenance-guard-e2e-test index build
   --images refs ...`, a relative --images path run from the refs folder's parent, as a user types it), into
   WEBUI/models/provenance/.
3. The webui is started with --skip-prepare-environment and --api on a free loopback port, with its settings and
   UI-config files in a temporary folder (so the host's own config.json is untouched), and driven through
   /sdapi/v1/txt2img and /sdapi/v1/img2img: warn mode, block mode on a regenerated known image, fail closed with a
   missing bundle, img2img and inpaint (the overlay must not paint the original back) on the known image; the
   bundle's recorded images folder (absolute), the records' source and `provenance-guard record show`, strict
   evidence pictures, API callers' left-out arguments following Settings at each call, unusable safety settings
   counting as their safe values, and the memorization signal at CFG 7 and CFG 1.
4. It is stopped (its process group) and the port must be free. Files it wrote under WEBUI/outputs, and
   WEBUI/params.txt, are moved into the test's temporary folder (for a look after a failure).

Run: .venv/bin/python -m pytest tests/test_a1111_e2e.py -x -v
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from static_site import static_site, wait_for
from PIL import Image
from provenance_guard.core.record import png_text_chunks, read_record
from provenance_guard.core.report import block_message
from provenance_guard.core.result import CheckResult
from provenance_guard.demo import DEMO_BLOCK, DEMO_WARN, write_references

ROOT = Path(__file__).resolve().parents[1]
EXT_NAME = "provenance-guard-e2e-test"   # never "provenance-guard": that may be the user's own installed copy
BUNDLE_NAME = "e2e-provenance-refs"
# A folder the test made holds this file; a test-named folder without it belongs to someone else and is left alone.
MARKER = ".made-by-provenance-guard-e2e-test"
HOST_LABELS = {"a1111": "Automatic1111 webui", "forge": "Forge webui"}  # what `record show` says wrote the record
SCRIPT_TITLE = "Provenance Guard"
HOSTS = {"a1111": ("A1111_DIR", "A1111_PYTHON"), "forge": ("FORGE_DIR", "FORGE_PYTHON")}
OPTION_KEYS = [f"provenance_guard_{k}" for k in
               ("enabled", "bundle", "bundle_path", "use_bundle_thresholds", "warn", "block", "action", "fail_mode",
                "verify", "fetch_references", "references", "memorization", "strict")]
# The settings' defaults (a1111_extension/settings.py), written back after a test changed them through the API.
OPTION_DEFAULTS = {"provenance_guard_enabled": False, "provenance_guard_bundle": "", "provenance_guard_bundle_path": "",
                   "provenance_guard_use_bundle_thresholds": True, "provenance_guard_action": "warn",
                   "provenance_guard_fail_mode": "open", "provenance_guard_verify": "confirm",
                   "provenance_guard_fetch_references": False, "provenance_guard_memorization": True,
                   "provenance_guard_strict": False}
# The script's API args (a1111_extension/script.py ARG_NAMES): 10 since pixel verification; callers sending the
# first 8 get verify and fetch_references from the settings (test_fail_closed_missing_bundle sends 8).
VERIFY_MODES = ("confirm", "off", "escalate", "confirm+escalate")
SEED = 20261128
PROMPT = "astronaut"  # longer prompts can give NaNs with random SD weights

# bounds (seconds): every wait fails with the log tail when it runs out
INSTALL_TIMEOUT = 900      # pip installs faiss-cpu and pyarrow from the local index on the first run
BUILD_TIMEOUT = 300
START_TIMEOUT = 300
REQUEST_TIMEOUT = 420      # the first generation also waits for the checkpoint to load
STOP_TIMEOUT = 30

VERDICTS = ("pass", "warn", "block", "unchecked")
# The inpaint call's own thresholds (see test_inpaint_overlay_keeps_placeholder): below the ~0.89-0.92 its
# pre-overlay image scores against the known image; the unrelated photos score <= ~0.78 against noise images
# (a block by one of them would do as well).
INPAINT_WARN = 0.7
INPAINT_BLOCK = 0.8


# helpers ---------------------------------------------------------------------------------------------------------

@dataclass
class Host:
    name: str
    webui: Path
    python: str
    tmp: Path
    env: dict
    started: float = field(default_factory=time.time)
    # other extension folders holding this extension (a user's own copy): disabled in the temporary settings
    other_copies: list = field(default_factory=list)

    @property
    def ext(self) -> Path:
        return self.webui / "extensions" / EXT_NAME

    @property
    def bundle(self) -> Path:
        return self.webui / "models" / "provenance" / BUNDLE_NAME


@dataclass
class Webui:
    host: Host
    base: str
    port: int
    proc: subprocess.Popen
    log: Path
    refs: Path
    model_spec: str
    state: dict = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError as exc:
            return f"(log unreadable: {exc})"


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only: never via a proxy


def _http(url: str, payload: Any = None, timeout: float = 30) -> tuple[int, Any]:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        body = exc.read()
        status = exc.code
    try:
        return status, json.loads(body or b"null")
    except ValueError:
        return status, body.decode(errors="replace")


def _claim(path: Path, what: str, create: bool) -> None:
    """Make path the test's own: a folder the test made before (it holds MARKER) is removed; anything else there
    (a user's folder that happens to have the test name) stops the run untouched. create: make it, marked."""
    if path.is_symlink() or path.exists():
        if path.is_symlink() or not path.is_dir() or not (path / MARKER).is_file():
            pytest.fail(f"{what} {path} exists and was not made by this test (no {MARKER} in it): it is left "
                        f"alone and the test does not run; move it away if it is not needed")
        shutil.rmtree(path)
    if create:
        path.mkdir(parents=True)
        (path / MARKER).write_text("made by tests/test_a1111_e2e.py; removed at the end of the test\n")


def _release(path: Path) -> None:
    """Remove path only when the test made it (it holds MARKER)."""
    if not path.is_symlink() and path.is_dir() and (path / MARKER).is_file():
        shutil.rmtree(path, ignore_errors=True)


def _other_copies(webui: Path) -> list[str]:
    """Extension folders other than the test's holding this extension (a user's installed copy, any name)."""
    root = webui / "extensions"
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir()
                  if d.name != EXT_NAME and (d / "scripts" / "provenance_guard.py").is_file())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float, what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        err = (exc.stderr or b"")
        err = err.decode(errors="replace") if isinstance(err, bytes) else err
        pytest.fail(f"{what} did not finish within {timeout}s: {cmd}\n"
                    f"--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}")


def _output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def _load_package_code(ext: Path) -> str:
    """Python code (for the host's interpreter) that loads the hyphenated extension folder as provenance_guard."""
    return ("import importlib.util, sys\n"
            "from pathlib import Path\n"
            f"ext = Path({str(ext)!r})\n"
            "spec = importlib.util.spec_from_file_location('provenance_guard', ext / '__init__.py', "
            "submodule_search_locations=[str(ext)])\n"
            "module = importlib.util.module_from_spec(spec)\n"
            "sys.modules['provenance_guard'] = module\n"
            "spec.loader.exec_module(module)\n")


def _parse_infotext(text: str) -> dict[str, str]:
    """The parameters line of an A1111 infotext -> {key: value} (quoted values unquoted)."""
    line = text.strip().split("\n")[-1]
    out = {}
    for key, value in re.findall(r'\s*([\w ][\w \-/]*?):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def _decode(b64: str) -> tuple[bytes, Image.Image]:
    raw = base64.b64decode(b64)
    img = Image.open(io.BytesIO(raw))
    img.load()
    return raw, img


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def _b64_png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal pixels (a mean difference of at most 2 levels: equal up to rounding)."""
    return a.shape == b.shape and float(np.abs(a - b).mean()) <= 2.0


def _contains(big: np.ndarray, small: np.ndarray) -> bool:
    """Whether small appears (as _same) anywhere in big: a grid holding the image as one of its cells."""
    if big.shape == small.shape:
        return _same(big, small)
    h, w = small.shape[:2]
    if big.shape[0] < h or big.shape[1] < w:
        return False
    for y in range(big.shape[0] - h + 1):
        for x in range(big.shape[1] - w + 1):
            if abs(int(big[y, x, 0]) - int(small[0, 0, 0])) > 8:
                continue
            if _same(big[y:y + h, x:x + w], small):
                return True
    return False


def _dark_share(img: Image.Image) -> float:
    return float((np.asarray(img.convert("RGB")).max(axis=2) < 48).mean())


def _is_placeholder(img: Image.Image) -> bool:
    """The extension's placeholder: black with a short light notice; generated images here are mid-grey noise."""
    return _dark_share(img) >= 0.6


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()


def _script_args(bundle_path: str, action: str, fail_mode: str = "open", verify: str | None = "confirm",
                 fetch_references: bool = False) -> dict:
    """The script's args; verify None sends only the first 8 (an older caller: the settings' defaults apply)."""
    args = [True, "", bundle_path, True, DEMO_WARN, DEMO_BLOCK, action, fail_mode]
    if verify is not None:
        assert verify in VERIFY_MODES, verify
        args += [verify, fetch_references]
    return {SCRIPT_TITLE: {"args": args}}


def _data_uri(value: Any) -> bool:
    return isinstance(value, str) and re.match(r"data:image/[a-z]+;base64,[A-Za-z0-9+/]{100,}={0,2}$", value) is not None


def _top_verification_expected(host: Host) -> bool:
    """Whether the check verifies every image's top match on pixels whatever its score (core/check.py: a bundle of
    at most SMALL_BUNDLE_ROWS rows whose manifest records a local images folder)."""
    from provenance_guard.core.check import SMALL_BUNDLE_ROWS

    manifest = json.loads((host.bundle / "manifest.json").read_text())
    sources = (manifest.get("build") or {}).get("sources") or []
    local = any(isinstance(s, dict) and s.get("kind") == "images" and s.get("path") and Path(s["path"]).is_dir()
                for s in sources)
    return int(manifest["count"]) <= SMALL_BUNDLE_ROWS and local


def _traceback_blocks(log: str) -> list[str]:
    """Every traceback in a log, with the lines that follow it (the exception and the webui's context)."""
    lines = log.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:
            start = max(0, i - 3)
            end = i + 1
            while end < len(lines) and end - i < 120 and (lines[end].startswith((" ", "\t")) or
                                                          lines[end].startswith(("Traceback", "During handling",
                                                                                 "The above exception")) or
                                                          not lines[end].strip() or end - i < 2):
                end += 1
            blocks.append("\n".join(lines[start:min(len(lines), end + 2)]))
    return blocks


def _assert_clean_log(w: Webui, when: str) -> None:
    log = w.log.read_text(errors="replace")
    bad = [b for b in _traceback_blocks(log) if "provenance" in b.lower()]
    if bad:
        pytest.fail(f"{when}: the webui log holds {len(bad)} traceback(s) that mention provenance_guard:\n" +
                    "\n-----\n".join(bad)[-8000:])
    assert "bad options item type" not in log, f"{when}: 'bad options item type' in the log:\n{w.log_tail()}"
    errors = [line for line in log.splitlines()
              if ("Error loading script" in line or "Error running" in line or "*** Error" in line)
              and "provenance" in line.lower()]
    assert not errors, f"{when}: the webui reported errors about the extension:\n" + "\n".join(errors) + \
        f"\n--- log tail\n{w.log_tail()}"


def _generate(w: Webui, route: str, payload: dict) -> dict:
    """POST a generation; returns {resp, info, images: [(bytes, PIL)], new_files: [Path]}."""
    before = _files(w.host.webui / "outputs")
    log_at = w.log.stat().st_size
    t0 = time.time()
    status, resp = _http(f"{w.base}/sdapi/v1/{route}", payload, timeout=REQUEST_TIMEOUT)
    took = time.time() - t0
    assert status == 200 and isinstance(resp, dict), \
        f"{route} answered {status}: {str(resp)[:3000]}\n--- webui log tail\n{w.log_tail()}"
    info = json.loads(resp["info"])
    images = [_decode(b) for b in resp.get("images") or []]
    new_files = sorted(_files(w.host.webui / "outputs") - before)
    args = (payload.get("alwayson_scripts") or {}).get(SCRIPT_TITLE, {}).get("args") or []
    w.state.setdefault("timings", []).append((route, args[6] if len(args) > 6 else "settings", round(took, 1)))
    with open(w.log, "rb") as f:
        f.seek(log_at)
        log = f.read().decode(errors="replace")
    return {"resp": resp, "info": info, "images": images, "new_files": new_files, "log": log}


def _set_options(w: Webui, values: dict) -> None:
    """POST /sdapi/v1/options (Forge's GET omits extension settings, its POST takes them)."""
    status, body = _http(f"{w.base}/sdapi/v1/options", values, timeout=60)
    assert status == 200, f"POST /sdapi/v1/options {values} answered {status}: {str(body)[:2000]}\n{w.log_tail()}"


def _stored_options(w: Webui) -> dict:
    """The settings as the webui holds them: GET /sdapi/v1/options, with the temporary settings file's values for
    the extension's keys (Forge's GET omits them; the webui writes the file at every POST)."""
    status, options = _http(f"{w.base}/sdapi/v1/options", timeout=30)
    assert status == 200, options
    path = w.state.get("settings_file")
    saved = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    for key in OPTION_KEYS:
        if key not in options and key in saved:
            options[key] = saved[key]
    return options


def _record_of(raw: bytes) -> dict:
    """The provenance record in a response image's PNG chunk."""
    chunk = png_text_chunks(raw).get("provenance")
    assert chunk, f"the response image has no 'provenance' chunk: {sorted(png_text_chunks(raw))}"
    return json.loads(chunk)


def _top_match(r: dict) -> dict:
    return (r.get("matches") or [None])[0] or {}


def _evidence(uri: str) -> Image.Image:
    assert _data_uri(uri) and uri.startswith("data:image/jpeg;base64,"), f"not a JPEG data URI: {str(uri)[:120]!r}"
    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    img.load()
    return img.convert("RGB")


def _assert_no_hook_errors(out: dict, what: str) -> None:
    """The webui swallows exceptions raised in script hooks (it prints them and goes on): a traceback that
    mentions the extension during this call is a failure of the extension even when the response looks fine."""
    bad = [b for b in _traceback_blocks(out["log"]) if "provenance" in b.lower()]
    if bad:
        pytest.fail(f"{what}: the extension raised inside a webui hook during this call:\n" +
                    "\n-----\n".join(bad)[-6000:])


def _per_image(out: dict, count: int, w: Webui) -> tuple[list[dict], list[tuple[bytes, Image.Image]], list[dict]]:
    """The per-image infotexts (parsed), response images and the parsed "Provenance results", checked for shape."""
    info = out["info"]
    first = int(info.get("index_of_first_image") or 0)
    infotexts = info.get("infotexts") or []
    images = out["images"]
    extra = info.get("extra_generation_params") or {}
    assert len(infotexts) == first + count, \
        f"expected {count} image infotexts after index_of_first_image={first}, got {len(infotexts)}: {infotexts}"
    assert len(images) >= first + count, f"expected {first + count} images, got {len(images)}"
    parsed = [_parse_infotext(t) for t in infotexts[first:first + count]]
    assert "Provenance results" in extra, \
        f"no 'Provenance results' in extra_generation_params: {json.dumps(extra)[:2000]}\n--- log\n{w.log_tail()}"
    results = json.loads(extra["Provenance results"])
    assert isinstance(results, list) and len(results) == count, \
        f"'Provenance results' is not a list of {count}: {extra['Provenance results'][:2000]}"
    assert [r["index"] for r in results] == list(range(count)), [r.get("index") for r in results]
    for i, (fields, r) in enumerate(zip(parsed, results, strict=True)):
        assert fields.get("Provenance") in VERDICTS, \
            f"image {i}: infotext has no per-image 'Provenance' verdict: {infotexts[first + i]!r}"
        assert fields["Provenance"] == r["verdict"], \
            f"image {i}: infotext says {fields['Provenance']!r}, Provenance results say {r['verdict']!r}"
    summary = extra.get("Provenance")
    m = re.fullmatch(r"(pass|warn|block|unchecked) (\d+) of (\d+)", str(summary))
    assert m, f"top-level 'Provenance' is not a batch summary like 'pass 2 of 2': {summary!r}"
    worst = max((r["verdict"] for r in results), key=lambda v: {"pass": 0, "unchecked": 1, "warn": 2, "block": 3}[v])
    assert m.group(1) == worst and int(m.group(2)) == sum(r["verdict"] == worst for r in results) \
        and int(m.group(3)) == count, f"top-level {summary!r} does not summarise {[r['verdict'] for r in results]}"
    if first:  # the grid's infotext carries the batch summary
        grid_fields = _parse_infotext(infotexts[0])
        assert grid_fields.get("Provenance") == summary, \
            f"the grid infotext's Provenance {grid_fields.get('Provenance')!r} != {summary!r}"
    return parsed, images[first:first + count], results


def _saved_samples(w: Webui, new_files: list[Path], kind: str) -> dict[int, Path]:
    """New PNGs in outputs/<kind>-images, by seed (from their 'parameters' chunk)."""
    by_seed: dict[int, Path] = {}
    for path in new_files:
        if path.suffix.lower() != ".png" or f"{kind}-images" not in path.parts:
            continue
        params = png_text_chunks(path).get("parameters", "")
        seed = _parse_infotext(params).get("Seed")
        assert seed is not None, f"{path}: no Seed in its parameters chunk: {params!r}"
        assert int(seed) not in by_seed, f"two saved images for seed {seed}: {by_seed[int(seed)]}, {path}"
        by_seed[int(seed)] = path
    return by_seed


def _check_saved(w: Webui, path: Path, verdict: str) -> dict:
    """A saved PNG's provenance chunk: present, verdict as expected; its parameters carry the same verdict."""
    chunks = png_text_chunks(path)
    assert "provenance" in chunks, f"{path} has no 'provenance' text chunk; chunks: {sorted(chunks)}"
    record = json.loads(chunks["provenance"])
    assert record.get("verdict") == verdict, \
        f"{path}: provenance chunk verdict {record.get('verdict')!r} != {verdict!r}"
    assert _parse_infotext(chunks.get("parameters", "")).get("Provenance") == verdict, \
        f"{path}: parameters chunk lacks 'Provenance: {verdict}': {chunks.get('parameters')!r}"
    if w.host.name == "forge":
        with Image.open(path) as img:
            assert img.mode == "RGBA", f"{path}: Forge saves PNGs with stealth infotext as RGBA, got {img.mode}"
        back = read_record(path)
        assert back is not None and back.verdict == verdict, \
            f"{path}: read_record gave {back.verdict if back else None!r}, expected {verdict!r}"
    return record


# fixtures --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(HOSTS))
def host(request, tmp_path_factory):
    name = request.param
    dir_var, py_var = HOSTS[name]
    webui_dir, python = os.environ.get(dir_var), os.environ.get(py_var)
    if not (webui_dir and python):
        pytest.skip(f"set {dir_var} (the webui folder) and {py_var} (its venv's python) to run the {name} "
                    f"end-to-end test" + (" (A1111_HF_HOME optional: an HF cache with the CLIP tokenizer)"
                                          if name == "a1111" else ""))
    webui = Path(webui_dir).absolute()
    assert (webui / "launch.py").is_file(), f"{dir_var}={webui_dir} is not a webui folder (no launch.py)"
    python = os.path.abspath(python)  # not resolved: a venv's python is a symlink that must stay one
    assert os.access(python, os.X_OK), f"{py_var}={python} is not executable"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "HF_HOME", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", PROVENANCE_GUARD_DEVICE="cpu",
               PYTHONDONTWRITEBYTECODE="1")
    if name == "a1111" and os.environ.get("A1111_HF_HOME"):
        env["HF_HOME"] = os.environ["A1111_HF_HOME"]
    h = Host(name, webui, python, tmp_path_factory.mktemp(f"{name}-e2e"), env, other_copies=_other_copies(webui))

    outputs = webui / "outputs"
    outputs_before = _files(outputs)
    params_txt = webui / "params.txt"
    params_before = params_txt.read_bytes() if params_txt.is_file() else None
    provenance_models = webui / "models" / "provenance"
    provenance_models_existed = provenance_models.is_dir()
    _claim(h.bundle, "the test bundle folder", create=False)  # checked first: a refusal leaves nothing made
    _claim(h.ext, "the test extension folder", create=True)
    try:
        yield h
    finally:
        _release(h.ext)
        _release(h.bundle)
        if not provenance_models_existed and provenance_models.is_dir() and not any(provenance_models.iterdir()):
            provenance_models.rmdir()
        # what the webui wrote during the session moves into the test's folder
        keep = h.tmp / "outputs"
        for path in sorted(_files(outputs) - outputs_before):
            dst = keep / path.relative_to(outputs)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), dst)
        if outputs.is_dir():
            for d in sorted((p for p in outputs.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                if not any(d.iterdir()) and not any(f.is_relative_to(d) for f in outputs_before):
                    d.rmdir()
            if not outputs_before and not any(outputs.iterdir()):
                outputs.rmdir()
        if params_before is None:
            if params_txt.is_file():
                shutil.move(str(params_txt), h.tmp / "params.txt")
        elif params_txt.is_file() and params_txt.read_bytes() != params_before:
            params_txt.write_bytes(params_before)


@pytest.fixture(scope="module")
def installed(host: Host) -> dict:
    """Install from URL: copy the repository's files, run install.py as the webui's start does."""
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                             capture_output=True, timeout=60, check=True).stdout.decode().split("\0")
    copied = 0
    for rel in listing:
        if not rel or rel.split("/")[0] in (".venv", ".git"):
            continue
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree, or a submodule
            continue
        dst = host.ext / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        copied += 1
    assert copied and (host.ext / "install.py").is_file() and (host.ext / "scripts" / "provenance_guard.py").is_file()
    # what the host has before install.py runs: a difference from the expected pins that was already there
    # comes from the host's own installers (the webuis ship opencv-python), not from install.py
    before = _run([host.python, "-c", DISTS_CODE], host.tmp, host.env, 120, "the version check before install.py")
    assert before.returncode == 0, _output(before)
    t0 = time.time()
    code = f"from modules import launch_utils; launch_utils.run_extension_installer({str(host.ext)!r})"
    proc = _run([host.python, "-c", code], host.webui, host.env, INSTALL_TIMEOUT, "the extension's install.py")
    took = time.time() - t0
    check = ("import json, numpy, pyarrow, faiss, open_clip, cv2\n"
             "from importlib.metadata import version\n"
             "arr = pyarrow.array(numpy.arange(3, dtype=numpy.float32))\n"
             "print(json.dumps({'numpy': numpy.__version__, 'pyarrow': pyarrow.__version__, "
             "'faiss': faiss.__version__, 'open_clip': version('open_clip_torch'), 'cv2': cv2.__version__, "
             "'arrow_sum': float(arr.to_numpy().sum())}))")
    imports = _run([host.python, "-c", check], host.tmp, host.env, 300, "the import check")
    after = _run([host.python, "-c", DISTS_CODE], host.tmp, host.env, 120, "the version check after install.py")
    assert after.returncode == 0, _output(after)
    return {"install": proc, "install_s": took, "imports": imports, "files": copied,
            "before": json.loads(before.stdout.strip().splitlines()[-1]),
            "after": json.loads(after.stdout.strip().splitlines()[-1])}


@pytest.fixture(scope="module")
def webui(host: Host, installed: dict):
    """Tiny model + bundle (host python, through the clone), then one webui start for every test."""
    ext = host.ext
    model_dir = host.tmp / "tiny-clip"
    proc = _run([host.python, "-c", _load_package_code(ext) +
                 "from provenance_guard.demo import make_tiny_model\n"
                 f"print(make_tiny_model(Path({str(model_dir)!r})))"],
                host.tmp, host.env, BUILD_TIMEOUT, "make_tiny_model")
    assert proc.returncode == 0, f"make_tiny_model failed with the host's python:\n{_output(proc)}"
    spec = proc.stdout.strip().splitlines()[-1]
    assert spec.startswith("local-dir:"), spec

    refs = host.tmp / "refs"
    write_references(refs)  # scikit-image photos, written with this (test) interpreter
    _build_bundle(host, refs, spec, overwrite=False)

    w = start_webui(host, refs, spec)
    try:
        yield w
    finally:
        _stop(w)


def start_webui(host: Host, refs: Path | None = None, spec: str = "", tag: str = "webui") -> Webui:
    """Start the host's webui on a free loopback port with its settings and UI-config files copied into the test's
    folder (host.tmp/<tag>-config.json: the host's own config.json is never written), a user's own copies of the
    extension disabled there, and wait until it answers (and its start-up callbacks ran). The caller stops it
    (_stop) whatever happens; a start that fails is stopped here."""
    settings = host.tmp / f"{tag}-config.json"
    if (host.webui / "config.json").is_file():
        shutil.copy2(host.webui / "config.json", settings)
    if host.other_copies:  # a user's installed copy would be loaded too (and import first): off in this run
        data = json.loads(settings.read_text()) if settings.is_file() else {}
        data["disabled_extensions"] = sorted(set(data.get("disabled_extensions") or []) | set(host.other_copies))
        settings.write_text(json.dumps(data, indent=4))
    ui_config = host.tmp / f"{tag}-ui-config.json"
    if (host.webui / "ui-config.json").is_file():
        shutil.copy2(host.webui / "ui-config.json", ui_config)
    port = _free_port()
    args = [host.python, "-u", "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--api",
            "--port", str(port), "--skip-version-check", "--no-download-sd-model",
            "--ui-settings-file", str(settings), "--ui-config-file", str(ui_config)]
    if host.name == "a1111":
        args += ["--use-cpu", "all", "--precision", "full", "--no-half"]
    else:
        args += ["--always-cpu", "--skip-python-version-check"]
    log = host.tmp / f"{tag}.log"
    with open(log, "wb") as logf:
        p = subprocess.Popen(args, cwd=str(host.webui), env=host.env, stdout=logf, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    w = Webui(host, f"http://127.0.0.1:{port}", port, p, log, refs or host.tmp / "refs", spec)
    w.state["start_cmd"] = " ".join(args)
    w.state["settings_file"] = settings
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            answered = False
            # Nothing is sent before "Startup time:" is logged: a request that reaches A1111 after its UI server
            # listens but before the API is added crashes it ("Cannot add middleware after an application has
            # started"), and Forge answers ~2 s before its on_app_started callbacks have run.
            if "Startup time:" in log.read_text(errors="replace"):
                try:
                    status, _ = _http(f"{w.base}/sdapi/v1/options", timeout=10)
                    answered = status == 200
                except (OSError, urllib.error.URLError):
                    pass
            if answered:
                break
            if p.poll() is not None:
                pytest.fail(f"the {host.name} webui exited with {p.returncode} before answering:\n{w.log_tail()}")
            if time.time() > deadline:
                pytest.fail(f"the {host.name} webui did not answer on port {port} (with 'Startup time:' in its log) "
                            f"within {START_TIMEOUT}s (Forge builds its UI in a daemon thread: an exception there "
                            f"leaves the process alive and nothing listening):\n{w.log_tail()}")
            time.sleep(1)
    except BaseException:
        _stop(w)
        raise
    w.state["startup_s"] = round(time.time() - w.started_at, 1)
    return w


# The host's distributions install.py must leave as they were (pip's view: importlib.metadata).
HOST_DISTS = ("numpy", "torch", "torchvision", "open_clip_torch", "opencv-python", "opencv-python-headless",
              "opencv-contrib-python", "opencv-contrib-python-headless", "pillow", "gradio", "transformers")
DISTS_CODE = ("import json\nfrom importlib import metadata\nout = {}\n"
              f"for d in {HOST_DISTS!r}:\n"
              "    try:\n        out[d] = metadata.version(d)\n"
              "    except metadata.PackageNotFoundError:\n        out[d] = None\n"
              "print(json.dumps(out))")


def _build_bundle(host: Host, refs: Path, spec: str, overwrite: bool) -> None:
    """index build with the host's python through the installed clone, as a user types it: a relative --images
    path, run from the refs folder's parent (the manifest must record the folder absolute, or the webui, whose
    working directory is its own folder, cannot find the reference images to verify matches)."""
    rel = os.path.relpath(refs, refs.parent)
    cmd = [host.python, str(host.ext), "index", "build", "--images", rel, "--out", str(host.bundle),
           "--model", spec, "--warn", str(DEMO_WARN), "--block", str(DEMO_BLOCK), "--device", "cpu",
           "--no-progress", "--id", BUNDLE_NAME] + (["--overwrite"] if overwrite else [])
    proc = _run(cmd, refs.parent, host.env, BUILD_TIMEOUT, "index build")
    assert proc.returncode == 0, f"index build with the host's python failed:\n{' '.join(cmd)}\n{_output(proc)}"
    assert (host.bundle / "manifest.json").is_file(), f"no manifest.json in {host.bundle}:\n{_output(proc)}"
    (host.bundle / MARKER).write_text("made by tests/test_a1111_e2e.py; removed at the end of the test\n")


def _stop(w: Webui) -> None:
    if w.proc.poll() is None:
        try:
            os.killpg(w.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            w.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(w.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            w.proc.wait(timeout=STOP_TIMEOUT)
    else:  # the leader is gone; children of its group may not be
        try:
            os.killpg(w.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# tests -----------------------------------------------------------------------------------------------------------

def test_test_folders_never_take_a_users_folder(tmp_path: Path):
    """No host needed: the test's extension and bundle folders are claimed only when the test made them (MARKER);
    a folder with the test name that the test did not make stops the run and stays as it was; a user's copy of the
    extension under any other name is found (and disabled in the temporary settings, never touched)."""
    webui = tmp_path / "webui"
    ext = webui / "extensions" / EXT_NAME
    (ext / "scripts").mkdir(parents=True)
    (ext / "scripts" / "provenance_guard.py").write_text("# someone's own folder\n")
    with pytest.raises(pytest.fail.Exception, match="was not made by this test"):
        _claim(ext, "the test extension folder", create=True)
    assert (ext / "scripts" / "provenance_guard.py").read_text() == "# someone's own folder\n"
    _release(ext)  # not marked: left alone
    assert ext.is_dir()
    user = webui / "extensions" / "provenance-guard"
    (user / "scripts").mkdir(parents=True)
    (user / "scripts" / "provenance_guard.py").write_text("# the user's installed copy\n")
    assert _other_copies(webui) == ["provenance-guard"]
    (ext / MARKER).write_text("")  # a leftover of an earlier run: replaced
    _claim(ext, "the test extension folder", create=True)
    assert sorted(p.name for p in ext.iterdir()) == [MARKER]
    _release(ext)
    assert not ext.exists() and (user / "scripts" / "provenance_guard.py").is_file()


def test_install_from_url(host: Host, installed: dict):
    proc = installed["install"]
    out = _output(proc)
    assert proc.returncode == 0, f"run_extension_installer failed:\n{out}"
    # run_extension_installer catches install.py's failure and only reports it: look for its report too
    assert "Error running install.py" not in proc.stdout + proc.stderr, f"install.py failed:\n{out}"
    imports = installed["imports"]
    assert imports.returncode == 0, f"after install.py, the host cannot import pyarrow/faiss/open_clip/numpy/cv2:\n" \
                                    f"{_output(imports)}\n--- install.py\n{out}"
    versions = json.loads(imports.stdout.strip().splitlines()[-1])
    before, after = installed["before"], installed["after"]
    # install.py only adds what is missing: every distribution the host had keeps its version (what differs from
    # the pins below but was already so before install.py came from the host's own installers)
    changed = {d: (before[d], after[d]) for d in HOST_DISTS if before[d] is not None and before[d] != after[d]}
    assert not changed, f"install.py changed the host's packages (before, after): {changed}\n{out}"
    added_cv = [d for d in HOST_DISTS if d.startswith("opencv") and before[d] is None and after[d] is not None]
    had_cv = [d for d in HOST_DISTS if d.startswith("opencv") and before[d] is not None]
    assert not (added_cv and had_cv), f"install.py added {added_cv} beside the host's {had_cv} (two OpenCV " \
                                      f"distributions share the cv2 folder):\n{out}"
    assert versions["numpy"] == after["numpy"] == before["numpy"], (versions, before, after)
    assert versions["arrow_sum"] == 3.0, versions
    # the webuis pin these; a different host version is the host's own (install.py left it, checked above)
    if before["numpy"] != "1.26.2" or before["open_clip_torch"] != "2.20.0" or not str(versions["cv2"]).startswith("4.11."):
        print(f"\n[{host.name}] note: the host's own numpy/open_clip/OpenCV differ from the webuis' pins "
              f"(1.26.2, 2.20.0, 4.11): {before}")
    print(f"\n[{host.name}] install.py {installed['install_s']:.1f}s, {installed['files']} files; {versions}; "
          f"added by install.py: {sorted(d for d in HOST_DISTS if before[d] is None and after[d] is not None)}")


def test_startup_clean_and_settings(webui: Webui):
    w = webui
    _assert_clean_log(w, "start-up")
    status, scripts = _http(f"{w.base}/sdapi/v1/scripts", timeout=30)
    assert status == 200, scripts
    for tab in ("txt2img", "img2img"):
        assert SCRIPT_TITLE.lower() in [s.lower() for s in scripts.get(tab, [])], \
            f"the script is not loaded in {tab}: {scripts}\n{w.log_tail()}"
    if w.host.name == "a1111":
        status, options = _http(f"{w.base}/sdapi/v1/options", timeout=30)
        assert status == 200, options
        missing = [k for k in OPTION_KEYS if k not in options]
        assert not missing, f"GET /sdapi/v1/options lacks {missing}\n{w.log_tail()}"
        assert options["provenance_guard_action"] in ("warn", "block"), options["provenance_guard_action"]
    else:  # Forge's GET omits extension settings (its model is built before on_ui_settings runs); POST works
        status, body = _http(f"{w.base}/sdapi/v1/options", {"provenance_guard_action": "warn"}, timeout=30)
        assert status == 200, \
            f"POST /sdapi/v1/options provenance_guard_action answered {status}: {body}\n{w.log_tail()}"
    print(f"\n[{w.host.name}] webui answered after {w.state['startup_s']}s")


def test_txt2img_warn(webui: Webui):
    w = webui
    payload = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "batch_size": 2, "seed": SEED,
               "save_images": True, "alwayson_scripts": _script_args(str(w.host.bundle), "warn")}
    out = _generate(w, "txt2img", payload)
    _assert_no_hook_errors(out, "txt2img warn")
    parsed, images, results = _per_image(out, 2, w)
    verdicts = [f["Provenance"] for f in parsed]
    # unrelated references (scikit-image photos) and random-weight SD noise: nothing comes close
    assert verdicts == ["pass", "pass"], f"expected pass for both images against unrelated photos: {results}"
    assert out["info"]["extra_generation_params"]["Provenance"] == "pass 2 of 2"
    for i, (fields, r) in enumerate(zip(parsed, results, strict=True)):
        assert r["error"] is None and r["max_score"] is not None, f"image {i} was not checked: {r}"
        assert fields.get("Provenance similarity") and fields.get("Provenance bundle", "").startswith(BUNDLE_NAME), \
            f"image {i}: infotext lacks similarity/bundle: {fields}"
        assert abs(float(fields["Provenance similarity"]) - r["max_score"]) < 1e-3, (fields, r)
    # verify "confirm": a small bundle with local reference images gets every image's top match compared on
    # pixels, whatever its score; random-SD noise against unrelated photos is "different"
    if _top_verification_expected(w.host):
        for i, r in enumerate(results):
            top = (r.get("matches") or [None])[0]
            assert top is not None, f"image {i}: no matches in its Provenance results entry: {r}"
            v = top.get("verification") or {}
            assert v.get("status") == "different", \
                f"image {i}: the top match was not verified as 'different' on pixels: {json.dumps(top)[:1500]}"
            assert _data_uri(top.get("evidence")), f"image {i}: the verified top match has no evidence data URI: " \
                                                   f"{str(top.get('evidence'))[:200]!r}"
    w.state["warn_verification"] = [((r.get("matches") or [{}])[0].get("verification") or {}).get("status")
                                    for r in results]
    w.state["warn_results"] = results
    for i, (raw, img) in enumerate(images):
        assert not _is_placeholder(img), f"warn mode: image {i} is dark ({_dark_share(img):.2f}); the random " \
                                         f"checkpoint should give mid-grey noise"
        chunk = png_text_chunks(raw).get("provenance")
        assert chunk and json.loads(chunk)["verdict"] == verdicts[i], \
            f"response image {i}: provenance chunk {chunk and chunk[:200]!r}"
    saved = _saved_samples(w, out["new_files"], "txt2img")
    seeds = [SEED, SEED + 1]
    assert sorted(saved) == seeds, f"saved samples by seed: {saved}; new files: {out['new_files']}"
    w.state["warn_saved"] = [saved[seed] for seed in seeds]
    w.state["warn_response_records"] = [_record_of(raw) for raw, _ in images]
    for i, seed in enumerate(seeds):
        record = _check_saved(w, saved[seed], verdicts[i])
        assert (record.get("generation") or {}).get("seed") == seed, record.get("generation")
        with Image.open(saved[seed]) as img:
            if not _same(_rgb(img), _rgb(images[i][1])):
                pytest.fail(f"{saved[seed]} differs from response image {i}")
    # the known image for the next tests: image 0 (seed SEED) becomes a reference
    known = images[0][1].convert("RGB")
    known.save(w.refs / "known-generated.png")
    (w.refs / "known-generated.txt").write_text("a generated image that is now a known training image")
    w.state["known"] = known


def test_bundle_records_absolute_images_folder(webui: Webui):
    """The bundle was built with a relative --images path run from the refs folder's parent (_build_bundle): its
    manifest must record the folder absolute, so that the webui (whose working directory is its own folder) finds
    the reference images and verifies matches on their pixels."""
    w = webui
    manifest = json.loads((w.host.bundle / "manifest.json").read_text())
    sources = [s for s in ((manifest.get("build") or {}).get("sources") or [])
               if isinstance(s, dict) and s.get("kind") == "images"]
    assert sources, f"the manifest records no images source: {json.dumps(manifest.get('build'))[:1500]}"
    path = str(sources[0].get("path") or "")
    rel = os.path.relpath(w.refs, w.refs.parent)
    assert os.path.isabs(path), \
        f"built with --images {rel} from {w.refs.parent}, the manifest records the relative path {path!r}: the " \
        f"webui resolves it against its own folder ({w.host.webui}) and finds no reference images"
    assert Path(path).resolve() == w.refs.resolve(), f"the manifest records {path!r}, not {w.refs}"
    results = w.state.get("warn_results") or pytest.fail("needs test_txt2img_warn's results")
    for i, r in enumerate(results):
        top = _top_match(r)
        v = top.get("verification") or {}
        assert v.get("status") not in (None, "unavailable"), \
            f"image {i}: its top match was not verified on pixels inside the webui (bundle built with a relative " \
            f"--images path): {json.dumps(top)[:1500]}"


def test_record_source_and_record_show(webui: Webui):
    """Records say which host wrote them (generation.source "a1111" or "forge"), in the response images and the
    saved files, and `provenance-guard record show` names the host."""
    w = webui
    name = w.host.name
    saved = w.state.get("warn_saved") or pytest.fail("needs test_txt2img_warn's saved files")
    for i, record in enumerate(w.state["warn_response_records"]):
        assert (record.get("generation") or {}).get("source") == name, \
            f"response image {i}: its record's generation.source is " \
            f"{(record.get('generation') or {}).get('source')!r}, not {name!r}"
    for path in saved:
        record = json.loads(png_text_chunks(path)["provenance"])
        assert (record.get("generation") or {}).get("source") == name, \
            f"{path}: generation.source {(record.get('generation') or {}).get('source')!r}, not {name!r}"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    cmd = [sys.executable, "-m", "provenance_guard", "record", "show", str(saved[0])]
    proc = _run(cmd, ROOT.parent, env, 120, "record show")
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{_output(proc)}"
    expected = f"written by:  {HOST_LABELS[name]} ({name})"
    assert expected in proc.stdout, f"record show does not say {expected!r}:\n{proc.stdout}"
    assert "verdict:     pass" in proc.stdout, proc.stdout
    proc = _run(cmd + ["--json"], ROOT.parent, env, 120, "record show --json")
    assert proc.returncode == 0, _output(proc)
    shown = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (shown.get("generation") or {}).get("source") == name and shown.get("verdict") == "pass", \
        f"record show --json: {proc.stdout[:2000]}"
    w.state["record_show"] = expected


def _known(w: Webui) -> Image.Image:
    if "known" not in w.state:
        pytest.fail("needs test_txt2img_warn's image")
    return w.state["known"]


def _assert_not_leaked(w: Webui, known: np.ndarray, images, files: list[Path], what: str) -> None:
    for n, (_, img) in enumerate(images):
        if _contains(_rgb(img), known):
            pytest.fail(f"{what}: response image {n} holds the blocked image")
    for path in files:
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
            continue
        with Image.open(path) as img:
            if _contains(_rgb(img), known):
                pytest.fail(f"{what}: saved file {path} holds the blocked image")


def test_txt2img_block_known_image(webui: Webui):
    w = webui
    known = _known(w)
    t0 = time.time()
    _build_bundle(w.host, w.refs, w.model_spec, overwrite=True)
    w.state["rebuild_s"] = round(time.time() - t0, 1)
    payload = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "batch_size": 2, "n_iter": 2, "seed": SEED,
               "save_images": True, "alwayson_scripts": _script_args(str(w.host.bundle), "block")}
    out = _generate(w, "txt2img", payload)
    parsed, images, results = _per_image(out, 4, w)
    verdicts = [f["Provenance"] for f in parsed]
    assert results[0]["verdict"] == "block" and results[0]["max_score"] >= DEMO_BLOCK, \
        f"the regenerated known image (seed {SEED}) was not blocked: {results[0]}"
    assert results[0]["top"] and "known-generated" in (results[0]["top"]["url"] or ""), results[0]["top"]
    # the block is verified on the known image's pixels (verify "confirm" keeps it a block) with its evidence
    top = (results[0].get("matches") or [None])[0]
    assert top is not None and "known-generated" in (top.get("url") or ""), \
        f"image 0's first match in its Provenance results entry is not the known image: {json.dumps(top)[:1500]}"
    assert (top.get("verification") or {}).get("status") == "copy", \
        f"image 0's top match was not verified as a copy on pixels: {json.dumps(top)[:1500]}"
    assert _data_uri(top.get("evidence")), \
        f"image 0's verified top match has no evidence data URI: {str(top.get('evidence'))[:200]!r}"
    w.state["block_evidence"] = top.get("evidence")  # strict off (the default): both pictures
    w.state["block_verification"] = [((r.get("matches") or [{}])[0].get("verification") or {}).get("status")
                                     for r in results]
    # the other seeds' noise may come near the known noise image (warn) with this tiny random CLIP, not to block
    assert verdicts[0] == "block" and "block" not in verdicts[1:], \
        f"per-image infotexts should say block for image 0 only: {verdicts}; results: {results}"
    assert out["info"]["extra_generation_params"]["Provenance"] == "block 1 of 4"
    w.state["block_verdicts"] = verdicts
    k = _rgb(known)
    placeholder = images[0][1]
    assert _is_placeholder(placeholder), f"the blocked image is not a black placeholder " \
                                         f"(dark share {_dark_share(placeholder):.2f})"
    for i in range(1, 4):
        assert not _is_placeholder(images[i][1]), f"image {i} was not blocked ({verdicts[i]}) but is dark"
    _assert_not_leaked(w, k, out["images"], out["new_files"], "block")
    _assert_no_hook_errors(out, "txt2img block")
    saved = _saved_samples(w, out["new_files"], "txt2img")
    assert sorted(saved) == [SEED + i for i in range(4)], saved
    for i in range(4):
        _check_saved(w, saved[SEED + i], verdicts[i])
    with Image.open(saved[SEED]) as img:
        assert _is_placeholder(img), f"the saved file of the blocked image is not the placeholder: {saved[SEED]}"
    # grids (A1111 and Forge save one with save_images and grid_save on) were checked by _assert_not_leaked above
    w.state["block_grids"] = [p.name for p in out["new_files"] if any("grids" in part for part in p.parts)]


EVIDENCE_LABEL_H = 16  # core/verify.py evidence_picture: the label strip above the pictures
EVIDENCE_GAP = 8       # between "your image" and "training image"


def test_strict_evidence_shows_training_image_only(webui: Webui):
    """Setting provenance_guard_strict: a blocked image's evidence picture holds the training image alone (its
    width/height ratio under the 16 px label strip), none of the blocked output's pixels; with strict off (the
    block test above) it is the two pictures side by side."""
    w = webui
    known = _known(w)
    kw, kh = known.size
    loose_uri = w.state.get("block_evidence") or pytest.fail("needs test_txt2img_block_known_image's evidence")
    loose = _evidence(loose_uri)
    pic_h = loose.height - EVIDENCE_LABEL_H
    one = pic_h * kw / kh  # the generated image is the known image's size: both pictures scale alike
    assert abs(loose.width - (2 * one + EVIDENCE_GAP)) <= 2, \
        f"strict off: the evidence is {loose.size}, not two {kw}x{kh} pictures side by side at height {pic_h}"
    payload = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "batch_size": 1, "seed": SEED,
               "save_images": True, "alwayson_scripts": _script_args(str(w.host.bundle), "block")}
    _set_options(w, {"provenance_guard_strict": True})
    try:
        stored = _stored_options(w).get("provenance_guard_strict")
        assert stored is True, f"POST /sdapi/v1/options provenance_guard_strict true did not stick: {stored!r}"
        out = _generate(w, "txt2img", payload)
    finally:
        _set_options(w, {"provenance_guard_strict": False})
    _assert_no_hook_errors(out, "strict block")
    _, images, results = _per_image(out, 1, w)
    r = results[0]
    assert r["verdict"] == "block", f"the regenerated known image was not blocked under strict: {r}"
    assert _is_placeholder(images[0][1]), "strict: the blocked image is not the placeholder"
    top = _top_match(r)
    assert (top.get("verification") or {}).get("status") == "copy", f"strict: top match {json.dumps(top)[:1500]}"
    strict = _evidence(top.get("evidence"))
    pic_h = strict.height - EVIDENCE_LABEL_H
    w.state["strict_evidence"] = {"strict": strict.size, "loose": loose.size}
    assert abs(strict.width - pic_h * kw / kh) <= 1, \
        f"strict: the evidence picture is {strict.size}: it must be the {kw}x{kh} training image alone at height " \
        f"{pic_h} under the {EVIDENCE_LABEL_H} px label (~{round(pic_h * kw / kh)} wide); the loose one, with the " \
        f"blocked output beside it, is {loose.size}"
    # it is the training image: as the right-hand picture of the loose evidence (the same reference, same scale)
    s = np.asarray(strict, dtype=np.int16)[EVIDENCE_LABEL_H:]
    right = np.asarray(loose, dtype=np.int16)[EVIDENCE_LABEL_H:, loose.width - strict.width:]
    diff = float(np.median(np.abs(s - right)))
    assert diff <= 12, f"strict: the evidence picture is not the training image (median difference {diff} from the " \
                       f"loose evidence's training image)"
    _assert_not_leaked(w, _rgb(known), out["images"], out["new_files"], "strict block")


PULLED_NAME = "e2e-provenance-pulled"  # the published copy's folder name: where the webui's pull installs it


def test_bundle_url_pulls_once_then_checks(webui: Webui):
    """The script's 11th argument, bundle_url (bundle and bundle_path left empty): a bundle holding the known
    image, built and published (`index build`, `index publish`, the host's python through the clone) and served
    by a static server in this process (loopback). Fail mode closed, action block: while the pull runs (the
    server holds its answers) the image is withheld with a "downloading" message; once the webui's background
    pull installed the bundle in models/provenance, the known image is blocked against it (verified a copy) and
    an unrelated one is not, and those later calls ask the server nothing. Only what this test's pull made in
    models/provenance (the bundle folder, its .source.json record, lock and work folder) is removed after."""
    w = webui
    known = _rgb(_known(w))
    root = w.host.webui / "models" / "provenance"
    installed = root / PULLED_NAME
    record = root / f".{PULLED_NAME}.source.json"
    made = [installed, record, root / f".{PULLED_NAME}.lock", root / f".{PULLED_NAME}.pull"]
    for path in made:
        if path.is_symlink() or path.exists():
            pytest.fail(f"{path} exists and was not made by this test: it is left alone and the test does not run; "
                        f"move it away if it is not needed")
    site_root = w.host.tmp / "site"
    published = site_root / "bundles" / PULLED_NAME
    published.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(w.refs, w.refs.parent)
    for what, cmd in (("index build", [w.host.python, str(w.host.ext), "index", "build", "--images", rel, "--out",
                                       str(published), "--model", w.model_spec, "--warn", str(DEMO_WARN), "--block",
                                       str(DEMO_BLOCK), "--device", "cpu", "--no-progress", "--id", PULLED_NAME]),
                      ("index publish", [w.host.python, str(w.host.ext), "index", "publish", str(published)])):
        proc = _run(cmd, w.refs.parent, w.host.env, BUILD_TIMEOUT, what)
        assert proc.returncode == 0, f"{what} with the host's python failed:\n{' '.join(cmd)}\n{_output(proc)}"
    assert (published / "provenance-bundle.json").is_file()

    def call(seed: int, url: str, what: str) -> tuple[dict, dict]:
        args = [True, "", "", True, DEMO_WARN, DEMO_BLOCK, "block", "closed", "confirm", False, url]
        out = _generate(w, "txt2img", _small(seed, save_images=True, alwayson_scripts={SCRIPT_TITLE: {"args": args}}))
        _assert_no_hook_errors(out, what)
        _, _, results = _per_image(out, 1, w)
        return out, results[0]

    timings = {}
    try:
        with static_site(site_root) as (root_url, site):
            url = f"{root_url}/bundles/{PULLED_NAME}/"
            t0 = time.time()
            out, r = call(SEED, url, "bundle_url while downloading")  # the server holds every answer
            timings["held_call_s"] = round(time.time() - t0, 1)
            assert r["verdict"] == "block" and "downloading" in (r["error"] or "") and url in r["error"], \
                f"while the bundle downloads, fail mode closed must withhold the image saying so: {r}"
            assert r["max_score"] is None and not r["matches"], r
            assert _is_placeholder(out["images"][0][1]), "while downloading: the image is not the placeholder"
            _assert_not_leaked(w, known, out["images"], out["new_files"], "bundle_url while downloading")
            saved = _saved_samples(w, out["new_files"], "txt2img")
            assert list(saved) == [SEED], saved
            assert _check_saved(w, saved[SEED], "block").get("error"), saved[SEED]
            wait_for("no request reached the server while the check said it was downloading",
                      lambda: bool(site["requests"]), 30)
            assert site["released"] or not installed.exists(), "installed before the server answered"

            t0 = time.time()
            site["gate"].set()
            wait_for("the webui's pull did not install the bundle", lambda: (installed / "manifest.json").is_file()
                      and record.is_file(), 120)
            timings["pull_s"] = round(time.time() - t0, 1)
            (installed / MARKER).write_text("installed by the webui's pull for tests/test_a1111_e2e.py; removed at "
                                            "the end of the test\n")
            time.sleep(1)  # the background job takes the installed folder just after writing the record

            out, r = call(SEED, url, "bundle_url pulled, the known image")
            assert r["error"] is None and r["verdict"] == "block" and r["max_score"] >= DEMO_BLOCK, \
                f"the known image was not blocked against the pulled bundle: {r}"
            top = _top_match(r)
            assert "known-generated" in (top.get("url") or "") and top.get("bundle") == PULLED_NAME, top
            assert (top.get("verification") or {}).get("status") == "copy", json.dumps(top)[:1500]
            assert _is_placeholder(out["images"][0][1])
            _assert_not_leaked(w, known, out["images"], out["new_files"], "bundle_url pulled")
            asked = list(site["requests"])
            paths = [p for _, p in asked]
            assert len(paths) == len(set(paths)) and paths[0] == f"/bundles/{PULLED_NAME}/provenance-bundle.json", \
                asked
            listed = json.loads((published / "provenance-bundle.json").read_text())["files"]
            assert sorted(paths[1:]) == sorted(f"/bundles/{PULLED_NAME}/{f}" for f in listed), asked

            out, r = call(SEED + 1, url, "bundle_url pulled, another image")
            assert r["error"] is None and r["verdict"] != "block" and _top_match(r).get("bundle") == PULLED_NAME, r
            assert not _is_placeholder(out["images"][0][1])
            assert site["requests"] == asked, f"a later call asked the server again: {site['requests'][len(asked):]}"
    finally:
        if installed.is_dir() and not installed.is_symlink():
            (installed / MARKER).write_text("")
            _release(installed)
        for path in made[1:]:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_file() or path.is_symlink():
                path.unlink()
    w.state["bundle_url"] = {**timings, "requests": len(asked)}


def test_fail_closed_missing_bundle(webui: Webui):
    w = webui
    payload = {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "batch_size": 2, "seed": SEED + 10,
               "save_images": True,
               # 8 args, as an older API caller sends: verify and fetch_references come from the settings
               "alwayson_scripts": _script_args("/nonexistent", "warn", "closed", verify=None)}
    out = _generate(w, "txt2img", payload)
    parsed, _, results = _per_image(out, 2, w)
    for i, (fields, r) in enumerate(zip(parsed, results, strict=True)):
        assert fields["Provenance"] == "block", f"image {i}: fail closed should block, infotext says {fields}"
        assert r["error"], f"image {i}: a missing bundle should be recorded as the error: {r}"
    for i, (_, img) in enumerate(out["images"]):  # the grid too: it is made of placeholders
        assert _is_placeholder(img), f"fail closed: returned image {i} is not a placeholder " \
                                     f"(dark share {_dark_share(img):.2f})"
    _assert_no_hook_errors(out, "fail closed")
    saved = _saved_samples(w, out["new_files"], "txt2img")
    assert sorted(saved) == [SEED + 10, SEED + 11], saved
    for path in saved.values():
        record = _check_saved(w, path, "block")
        with Image.open(path) as img:
            assert _is_placeholder(img), f"fail closed: {path} is not a placeholder"
        # the placeholder's notice comes from the record (core/report.block_message): on these 64 px images it
        # must say the check could not run, not "too close to a known training image"
        assert record.get("error") and record.get("max_score") is None and not record.get("matches"), \
            f"{path}: a check that could not run must be recorded as a failure: error {record.get('error')!r}, " \
            f"max_score {record.get('max_score')!r}, {len(record.get('matches') or [])} matches"
        notice = block_message(CheckResult.from_json(record))
        assert notice.startswith("Blocked: the image could not be checked"), f"{path}: the notice is {notice!r}"
    for i, r in enumerate(results):
        assert r["max_score"] is None and not r["matches"], f"image {i}: fail closed is not a failure: {r}"
    assert out["info"]["extra_generation_params"]["Provenance"] == "block 2 of 2"


MISSING_BUNDLE = "/nonexistent/provenance-guard-e2e-bundle"


def _small(seed: int, **kw) -> dict:
    return {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64, "batch_size": 1, "seed": seed,
            "save_images": False, **kw}


def _warnings_with(r: dict, *words: str) -> list[str]:
    return [x for x in r.get("warnings") or [] if all(word in x for word in words)]


def test_unusable_safety_settings_count_as_safe(webui: Webui):
    """Safety settings that are none of their choices (edited into config.json or posted through the API) count as
    their safe value: fail mode "sometimes" as closed (a missing bundle blocks, never unchecked), verify "bogus" as
    confirm+escalate, action "blok" as block; each run says so in the record's warnings."""
    w = webui
    bad = {"provenance_guard_fail_mode": "sometimes", "provenance_guard_verify": "bogus",
           "provenance_guard_action": "blok"}
    try:
        _set_options(w, {**bad, "provenance_guard_enabled": True, "provenance_guard_bundle": "",
                         "provenance_guard_bundle_path": MISSING_BUNDLE})
        stored = _stored_options(w)
        assert {k: stored.get(k) for k in bad} == bad, \
            f"the webui did not store the unusable values (the test needs them): {[stored.get(k) for k in bad]}"
        # a caller that leaves the script's arguments out: the settings decide
        out = _generate(w, "txt2img", _small(SEED + 30, save_images=True))
        _assert_no_hook_errors(out, "unusable settings, missing bundle")
        parsed, images, results = _per_image(out, 1, w)
        r = results[0]
        assert r["verdict"] == "block" and parsed[0]["Provenance"] == "block", \
            f"fail mode 'sometimes' must count as closed: a missing bundle must block, got {r['verdict']!r}: {r}"
        assert r["error"] and r["max_score"] is None, f"the missing bundle is not the record's error: {r}"
        for key, safe in (("fail_mode", "closed"), ("verify", "confirm+escalate"), ("action", "block")):
            assert _warnings_with(r, f"provenance_guard_{key}", f"counts as '{safe}'"), \
                f"no warning that provenance_guard_{key} counts as '{safe}': {r['warnings']}"
        assert _is_placeholder(images[0][1]), \
            f"the blocked image is not the placeholder (dark share {_dark_share(images[0][1]):.2f})"
        saved = _saved_samples(w, out["new_files"], "txt2img")
        assert list(saved) == [SEED + 30], saved
        record = _check_saved(w, saved[SEED + 30], "block")
        assert record.get("error") and record.get("fail_mode") == "closed", \
            f"{saved[SEED + 30]}: error {record.get('error')!r}, fail mode {record.get('fail_mode')!r}"
        with Image.open(saved[SEED + 30]) as img:
            assert _is_placeholder(img), f"{saved[SEED + 30]} is not the placeholder"
        # a caller's own unusable fail mode counts as closed too
        args = [True, "", MISSING_BUNDLE, True, DEMO_WARN, DEMO_BLOCK, "warn", "sometimes", "confirm", False]
        out = _generate(w, "txt2img", _small(SEED + 31, alwayson_scripts={SCRIPT_TITLE: {"args": args}}))
        _, images, results = _per_image(out, 1, w)
        r = results[0]
        assert r["verdict"] == "block" and _is_placeholder(images[0][1]), \
            f"the script argument fail_mode 'sometimes' must count as closed: {r}"
        assert _warnings_with(r, "counts as 'closed'"), r["warnings"]
        # with a usable bundle, verify "bogus" runs as confirm+escalate (the record's verify mode)
        _set_options(w, {"provenance_guard_bundle_path": str(w.host.bundle)})
        out = _generate(w, "txt2img", _small(SEED + 32))
        _, images, results = _per_image(out, 1, w)
        r = results[0]
        assert r["error"] is None, f"not checked against {w.host.bundle}: {r}"
        mode = (_record_of(images[0][0]).get("verify") or {}).get("mode")
        assert mode == "confirm+escalate", f"verify 'bogus' ran as {mode!r}, not 'confirm+escalate'"
    finally:
        _set_options(w, OPTION_DEFAULTS)


def test_api_left_out_args_follow_settings(webui: Webui):
    """The webui's API fills the script arguments a caller leaves out from values cached at its start
    (init_default_script_args): those must mean "as in Settings at this call", so POST /sdapi/v1/options changes
    the next generation of a caller that sends fewer arguments or none; null means the same; sent values win."""
    w = webui
    bundle = str(w.host.bundle)
    seed = [SEED + 40]

    def run(args: list | None, what: str) -> tuple[str | None, dict]:
        payload = _small(seed[0])
        seed[0] += 1
        if args is not None:
            payload["alwayson_scripts"] = {SCRIPT_TITLE: {"args": args}}
        out = _generate(w, "txt2img", payload)
        _assert_no_hook_errors(out, what)
        extra = out["info"].get("extra_generation_params") or {}
        assert "Provenance results" in extra, \
            f"{what}: no check ran (enabled is true in Settings): {json.dumps(extra)[:1500]}"
        _, images, results = _per_image(out, 1, w)
        assert results[0]["error"] is None, f"{what}: not checked: {results[0]}"
        return (_record_of(images[0][0]).get("verify") or {}).get("mode"), results[0]

    try:
        _set_options(w, {"provenance_guard_enabled": True, "provenance_guard_bundle": "",
                         "provenance_guard_bundle_path": bundle, "provenance_guard_use_bundle_thresholds": True,
                         "provenance_guard_action": "warn", "provenance_guard_fail_mode": "open",
                         "provenance_guard_verify": "confirm"})
        mode, _ = run(None, "no script args, verify confirm in Settings")
        assert mode == "confirm", f"no script args with verify 'confirm' in Settings: the record's verify is {mode!r}"
        _set_options(w, {"provenance_guard_verify": "off"})
        mode, r = run(None, "no script args, verify off in Settings")
        assert mode is None and not (_top_match(r).get("verification")), \
            f"after POST /sdapi/v1/options verify 'off', a caller sending no script args still got verify {mode!r} " \
            f"(the API's cached defaults won over Settings): {json.dumps(_top_match(r))[:800]}"
        mode, _ = run([True, "", bundle], "3 script args")
        assert mode is None, f"a caller sending 3 args got verify {mode!r}, Settings say 'off'"
        mode, _ = run([True, "", bundle, True, DEMO_WARN, DEMO_BLOCK, "warn", "open", None, None], "null verify")
        assert mode is None, f"a caller sending null for verify got {mode!r}, Settings say 'off'"
        mode, _ = run([True, "", bundle, True, DEMO_WARN, DEMO_BLOCK, "warn", "open", "confirm", False],
                      "explicit verify")
        assert mode == "confirm", f"a caller sending verify 'confirm' (Settings 'off') got {mode!r}: sent values win"
        _set_options(w, {"provenance_guard_verify": "escalate"})
        mode, _ = run(None, "no script args, verify escalate in Settings")
        assert mode == "escalate", f"Settings changed to 'escalate': a caller sending no args got {mode!r}"
    finally:
        _set_options(w, OPTION_DEFAULTS)


def _checkpoint_override(w: Webui, name: str) -> dict:
    """override_settings choosing the checkpoint whose title holds name (Forge's nonzero-sd15)."""
    status, models = _http(f"{w.base}/sdapi/v1/sd-models", timeout=30)
    assert status == 200, models
    titles = [m.get("title") for m in models if name in (m.get("title") or "")]
    assert titles, f"no checkpoint named like {name!r}: {[m.get('title') for m in models]}"
    return {"override_settings": {"sd_model_checkpoint": titles[0]}}


def test_memorization_signal(webui: Webui):
    """The memorization signal (on by default) read from the sampler's CFG predictions: at CFG 7 a score (in
    Forge, on nonzero-sd15 whose UNet output depends on the prompt, above 0; A1111's random checkpoint ignores the
    prompt, so its score may be 0), in the infotext ("Provenance memorization: <score> <verdict>"), the API's
    "Provenance results" and the saved record; at CFG 1 unavailable, saying why. No hook may raise on the way
    (checked last, so that a failure also shows what the records said)."""
    w = webui
    extra = _checkpoint_override(w, "nonzero-sd15") if w.host.name == "forge" else {}
    scores = w.state["memorization"] = {}
    outs = {}
    for cfg in (7.0, 1.0):
        payload = _small(SEED + 50, steps=6, cfg_scale=cfg, save_images=True,
                         alwayson_scripts=_script_args(str(w.host.bundle), "warn"), **extra)
        out = outs[cfg] = _generate(w, "txt2img", payload)
        parsed, _, results = _per_image(out, 1, w)
        m = results[0].get("memorization")
        text = parsed[0].get("Provenance memorization")
        assert isinstance(m, dict), f"CFG {cfg}: no 'memorization' object in Provenance results: {results[0]}"
        scores[cfg] = (m.get("memorization_score"), m.get("verdict"), m.get("steps"), text)
        saved = _saved_samples(w, out["new_files"], "txt2img")
        assert list(saved) == [SEED + 50], saved
        record = _check_saved(w, saved[SEED + 50], results[0]["verdict"])
        stored = record.get("prompt") or {}
        if cfg > 1:
            score = m.get("memorization_score")
            assert isinstance(score, (int, float)) and m.get("steps", 0) >= 1, \
                f"CFG 7: no memorization score: {m} (infotext {text!r})"
            if w.host.name == "forge":
                assert score > 0, \
                    f"Forge, CFG 7, nonzero-sd15: the memorization score must be above 0 (the UNet output depends on " \
                    f"the prompt), got {m}"
            else:
                assert score >= 0, m
            assert m.get("verdict") in ("unrated", "pass", "flag"), m
            assert text and re.fullmatch(r"\d+\.\d{4} (unrated|pass|flag)( \(threshold [^)]*\))?", text), \
                f"CFG 7: infotext 'Provenance memorization' is {text!r}"
            assert abs(float(text.split()[0]) - score) < 1e-3, (text, m)
            assert stored.get("memorization_score") is not None and \
                abs(stored["memorization_score"] - score) < 1e-5, f"{saved[SEED + 50]}: record prompt {stored}"
        else:
            assert m.get("memorization_score") is None and m.get("verdict") == "unavailable", \
                f"CFG 1: the memorization signal must be unavailable: {m}"
            assert "without classifier-free guidance" in (m.get("reason") or ""), \
                f"CFG 1: the reason does not say why: {m}"
            assert text == "unavailable", f"CFG 1: infotext 'Provenance memorization' is {text!r}"
            assert stored.get("verdict") == "unavailable", f"{saved[SEED + 50]}: record prompt {stored}"
    for cfg, out in outs.items():
        # Forge sets p.uc = None at CFG 1 (modules/processing.py: "if self.cfg_scale == 1: self.uc = None"), so its
        # on_cfg_denoiser params carry text_uncond None: the extension's cfg_denoiser callback must take that
        _assert_no_hook_errors(out, f"memorization at CFG {cfg} ({w.host.name}; on_cfg_denoiser's text_uncond is "
                                    f"None in Forge at CFG 1)")


def test_img2img_known_image(webui: Webui):
    w = webui
    known = _known(w)
    payload = {"init_images": [_b64_png(known)], "prompt": PROMPT, "steps": 20, "denoising_strength": 0.05,
               "width": 64, "height": 64, "batch_size": 1, "seed": SEED, "save_images": True,
               "alwayson_scripts": _script_args(str(w.host.bundle), "block")}
    out = _generate(w, "img2img", payload)
    _, images, results = _per_image(out, 1, w)
    r = results[0]
    assert r["error"] is None and r["max_score"] is not None, f"img2img image was not checked: {r}"
    img = images[0][1]
    w.state["img2img"] = {"verdict": r["verdict"], "max_score": r["max_score"]}
    if r["verdict"] == "block":
        assert _is_placeholder(img), f"img2img: blocked but the returned image is not the placeholder: {r}"
    _assert_not_leaked(w, _rgb(known), out["images"], out["new_files"], "img2img")
    _assert_no_hook_errors(out, "img2img")
    saved = _saved_samples(w, out["new_files"], "img2img")
    assert list(saved) == [SEED], saved
    _check_saved(w, saved[SEED], r["verdict"])


@pytest.mark.parametrize("verify", ["off", "confirm"])
def test_inpaint_overlay_keeps_placeholder(webui: Webui, verify: str):
    """Inpaint the known image's left half (inpainting_fill 1 = original, inpaint_full_res false) with action
    block: the webui pastes the kept right half of the init image back over the generated image (apply_overlay)
    after the batch check. When the batch check blocks, what comes back must be the placeholder, not the
    blacked-out image with the original's right half painted back.

    The random-weight VAE does not reproduce the init image (and its encoder samples, so img2img is not even
    repeatable), so the image the batch check sees scores only ~0.89-0.92 against the known image with the tiny
    CLIP: this call sets its own thresholds (warn INPAINT_WARN, block INPAINT_BLOCK) so that it is blocked.

    verify "off" keeps that path (the score alone decides the batch check). Under verify "confirm" the batch
    check's block may be verified "different" on pixels (the VAE changed them) and become a warn; then the
    final-image hook re-checks the composited pixels (the original's right half back), which must be blocked
    and replaced by the placeholder all the same."""
    w = webui
    known = _known(w)
    mask = Image.new("L", known.size, 0)
    half = known.width // 2
    mask.paste(255, (0, 0, half, known.height))  # inpaint the left half; the right half is kept
    args = [True, "", str(w.host.bundle), False, INPAINT_WARN, INPAINT_BLOCK, "block", "open", verify, False]
    payload = {"init_images": [_b64_png(known)], "mask": _b64_png(mask), "prompt": PROMPT, "steps": 20,
               "denoising_strength": 0.05, "inpainting_fill": 1, "inpaint_full_res": False, "mask_blur": 0,
               "width": 64, "height": 64, "batch_size": 1, "seed": SEED, "save_images": True,
               "alwayson_scripts": {SCRIPT_TITLE: {"args": args}}}
    out = _generate(w, "img2img", payload)
    _, images, results = _per_image(out, 1, w)
    r = results[0]
    w.state.setdefault("inpaint", {})[verify] = {"verdict": r["verdict"], "max_score": r["max_score"],
                                                 "warnings": r["warnings"], "top": (r["top"] or {}).get("url")}
    assert r["verdict"] == "block" and r["max_score"] >= INPAINT_BLOCK, \
        f"the inpaint of the known image was not blocked at block={INPAINT_BLOCK}: {r}"
    img = images[0][1]
    k = _rgb(known)
    for what, path in [("the returned image", None)] + [(f"saved {p}", p) for p in out["new_files"]
                                                        if p.suffix.lower() == ".png"]:
        pic = img if path is None else Image.open(path)
        got = _rgb(pic)
        if got.shape == k.shape and _same(got[:, half:], k[:, half:]):
            pytest.fail(f"inpaint: {what} holds the init image's kept right half: the overlay painted the original "
                        f"back over the blocked image (dark share {_dark_share(pic):.2f}; a placeholder is >= 0.6)")
    assert _is_placeholder(img), \
        f"inpaint: the returned image is not the placeholder: dark share {_dark_share(img):.2f}"
    _assert_not_leaked(w, k, out["images"], out["new_files"], "inpaint")
    _assert_no_hook_errors(out, "inpaint")
    saved = _saved_samples(w, out["new_files"], "img2img")
    assert list(saved) == [SEED], saved
    _check_saved(w, saved[SEED], "block")
    with Image.open(saved[SEED]) as s:
        assert _is_placeholder(s), f"inpaint: the saved file is not the placeholder: {saved[SEED]}"


def test_stop_and_log_clean(webui: Webui):
    w = webui
    _stop(w)
    deadline = time.time() + STOP_TIMEOUT
    while _port_open(w.port):
        if time.time() > deadline:
            pytest.fail(f"port {w.port} still answers {STOP_TIMEOUT}s after the webui's process group was stopped")
        time.sleep(0.5)
    try:
        os.killpg(w.proc.pid, 0)
        pytest.fail(f"processes of the webui's group {w.proc.pid} are still alive after the stop")
    except ProcessLookupError:
        pass
    print(f"\n[{w.host.name}] {time.time() - w.host.started:.0f}s in all, webui up {time.time() - w.started_at:.0f}s; "
          f"start {w.state.get('startup_s')}s; "
          f"rebuild {w.state.get('rebuild_s')}s; calls {w.state.get('timings')}; "
          f"block {w.state.get('block_verdicts')}; verification warn {w.state.get('warn_verification')} "
          f"block {w.state.get('block_verification')}; "
          f"img2img {w.state.get('img2img')}; inpaint {w.state.get('inpaint')}; "
          f"memorization (score, verdict, steps, infotext) by CFG {w.state.get('memorization')}; "
          f"evidence sizes {w.state.get('strict_evidence')}; bundle_url {w.state.get('bundle_url')}; "
          f"{w.state.get('record_show')!r}")
    _assert_clean_log(w, "after the generations")

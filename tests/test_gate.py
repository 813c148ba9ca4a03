"""The batch gate: a folder walked recursively, generation parameters read, exit codes for CI, a
self-contained escaped HTML report, JSON Lines results and the append-only audit log."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import PngImagePlugin

from provenance_guard.cli import main as cli
from provenance_guard.core.bundle import BundleWriter, Bundle
from provenance_guard.demo import sample_image

from test_record import A1111_TEXT, COMFY_PROMPT


def _tree(root: Path, outputs) -> Path:
    folder, made = outputs
    (root / "day1" / "batch").mkdir(parents=True)
    for name in made:
        shutil.copy(folder / name, root / ("day1/batch" if "copy" in name else "day1") / name)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_TEXT)
    sample_image("rocket").convert("RGB").save(root / "a1111.png", pnginfo=info)
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(COMFY_PROMPT))
    sample_image("coins").save(root / "day1" / "comfy.png", pnginfo=info)
    return root


@pytest.mark.slow
def test_gate_over_a_tree(tmp_path, built_bundle, outputs, capsys):
    root = _tree(tmp_path / "out", outputs)
    report, jsonl, audit = tmp_path / "report.html", tmp_path / "results.jsonl", tmp_path / "audit.jsonl"
    argv = ["check", str(root), "--recursive", "--index", str(built_bundle), "--fail-on", "block",
            "--report", str(report), "--jsonl", str(jsonl), "--audit-log", str(audit), "--no-progress"]
    assert cli(argv) == 1
    assert "10 image(s): 4 reached 'block'" in capsys.readouterr().out
    results = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(results) == 10 and all(len(r["image"]["sha256"]) == 64 for r in results)
    by_name = {Path(r["image"]["source"]).name: r for r in results}
    assert by_name["a1111.png"]["generation"]["seed"] == 1234567890
    assert by_name["comfy.png"]["generation"]["prompt"] == "beautiful scenery nature glass bottle"
    lines = audit.read_text().splitlines()
    assert len(lines) == 10
    entry = json.loads(lines[0])
    assert {"image_sha256", "time", "user", "host", "bundles", "verdict", "top_match"} <= set(entry)
    assert entry["bundles"][0]["id"] == "test-refs" and entry["bundles"][0]["block"] == 0.995
    # A second run appends; nothing is rewritten.
    first = audit.read_bytes()
    assert cli(argv) == 1
    assert audit.read_bytes().startswith(first) and len(audit.read_text().splitlines()) == 20
    # Only warn and block matter to --fail-on warn; nothing flagged: exit 0.
    assert cli(["check", str(root / "day1" / "comfy.png"), "--index", str(built_bundle), "--fail-on", "warn",
                "--no-progress"]) == 0


def test_report_is_self_contained_and_escaped(tmp_path, built_bundle, tiny_model):
    b = Bundle.open(built_bundle)
    evil = tmp_path / "evil"
    with BundleWriter(evil, model=b.model, dim=b.dim, warn=0.985, block=0.995) as w:
        w.add(b.vector([0]), [{"url": "javascript:alert(1)", "caption": "<img src=x onerror=alert(1)><script>x</script>"}])
        w.finish()
    img = tmp_path / "imgs"
    img.mkdir()
    sample_image("astronaut").save(img / "a<b>.png")
    sample_image("camera").save(img / "cam.png")
    report = tmp_path / "r.html"
    assert cli(["check", str(img), "--index", str(evil), "--index", str(built_bundle), "--report", str(report),
                "--no-progress"]) == 1
    page = report.read_text()
    assert "<script>x</script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "onerror=alert(1)>" not in page and 'href="javascript' not in page
    assert "a&lt;b&gt;.png" in page
    # Self-contained: no external fetch of any kind; images are data URIs; a CSP forbids the rest.
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page
    assert "default-src 'none'" in page and page.count('src="data:image/jpeg;base64,') >= 2
    # One row per flagged image (the camera passed), with the reference thumbnail found locally.
    assert page.count('<tr class="v-') == 1 and 'data-filter="block"' in page
    assert "astronaut.png" in page


def test_report_lists_passing_images_on_request(tmp_path, built_bundle, outputs):
    folder, made = outputs
    report = tmp_path / "all.html"
    cli(["check", str(folder), "--index", str(built_bundle), "--report", str(report), "--report-all",
         "--no-progress"])
    page = report.read_text()
    assert page.count('<tr class="v-') == len(made) and 'data-filter="pass"' in page

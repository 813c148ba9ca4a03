"""The provenance-guard command: exit codes, table, --json, records, build, demo; and a cheap import."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import PngImagePlugin

from provenance_guard.cli import main as cli, terminal_safe
from provenance_guard.core.record import read_record
from provenance_guard.demo import sample_image

from test_record import A1111_TEXT

ROOT = Path(__file__).resolve().parents[1]


def test_import_loads_neither_torch_nor_faiss():
    code = ("import sys, provenance_guard, provenance_guard.core, provenance_guard.cli;"
            "from provenance_guard import core; core.__all__;"
            "bad = [m for m in ('torch', 'faiss', 'open_clip', 'pyarrow', 'numpy') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_check_exit_codes_and_table(built_bundle, outputs, capsys):
    folder, made = outputs
    unrelated = [str(folder / n) for n, what in made.items() if what == "unrelated photo"]
    assert cli(["check", *unrelated, "--index", str(built_bundle)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "warn >= 0.985, block >= 0.995 (exact cosine)" in out
    assert cli(["check", str(folder), "--index", str(built_bundle)]) == 1
    out = capsys.readouterr().out
    assert "chelsea_copy.png  BLOCK  max 1.0000" in out and "chelsea.png" in out
    assert "8 image(s): 3 reached 'block', 0 could not be checked" in out
    # --fail-on warn with a low warn threshold flags the unrelated images too.
    assert cli(["check", *unrelated, "--index", str(built_bundle), "--warn", "0.1", "--fail-on", "warn"]) == 1


def test_check_json_lines_follow_schema(built_bundle, outputs, capsys):
    import jsonschema

    schema = json.loads((ROOT / "core/schema/check-result.v1.json").read_text())
    folder, made = outputs
    assert cli(["check", str(folder), "--index", str(built_bundle), "--json", "--top-k", "2"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(made)
    for line in lines:
        data = json.loads(line)
        jsonschema.validate(data, schema)
        assert len(data["matches"]) == 2 and Path(data["image"]["source"]).name in made


def test_unreadable_image_exit_3(built_bundle, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    good = tmp_path / "good.png"
    sample_image("coins").save(good)
    assert cli(["check", str(good), str(bad), "--index", str(built_bundle)]) == 3
    out = capsys.readouterr().out
    assert "UNCHECKED" in out and "1 could not be checked" in out
    assert cli(["check", str(bad), "--index", str(built_bundle), "--fail-mode", "closed"]) == 3


@pytest.mark.parametrize("argv,words", [
    (["check", "{img}", "--index", "{tmp}/missing"], "does not exist or is not a folder"),
    (["check", "{img}", "--index", "{bundle}", "--warn", "2"], None),
    (["check", "{img}", "--index", "{bundle}", "--warn", "0.9", "--block", "0.5"], "above block"),
    (["check", "{img}", "--index", "{bundle}", "--model", "ViT-B"], "no weights"),
    (["index", "build", "--images", "{tmp}/none", "--out", "{tmp}/b"], "no such folder"),
    # inputs named on the command line that cannot be checked: said before any model loads
    (["check", "{tmp}/nope.png", "--index", "{bundle}"], "nope.png: no such file or folder"),
    (["check", "{tmp}/empty", "--index", "{bundle}"], "a folder without .png"),
    (["check", "{tmp}/notes.txt", "--index", "{bundle}"], "not a .png, .jpg"),
    (["check", "{img}", "--index", "{tmp}/refz"], "did you mean"),
])
def test_usage_and_config_errors_exit_2(argv, words, built_bundle, tmp_path, capsys, monkeypatch):
    import shutil

    img = tmp_path / "i.png"
    sample_image("coins").save(img)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    shutil.copytree(built_bundle, tmp_path / "refs")  # a bundle one letter away from "refz"
    monkeypatch.setattr("provenance_guard.core.embed.get_embedder",
                        lambda *a, **k: pytest.fail("a model was loaded before the usage mistake was said"))
    argv = [a.format(img=img, tmp=tmp_path, bundle=built_bundle) for a in argv]
    with pytest.raises(SystemExit) if words is None else _nullcontext() as raised:
        code = cli(argv)
    if words is None:
        assert raised.value.code == 2
    else:
        assert code == 2 and words in capsys.readouterr().err


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def test_check_writes_records_with_generation_params(built_bundle, tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_TEXT)
    path = tmp_path / "00001-1234567890.png"
    sample_image("rocket").convert("RGB").save(path, pnginfo=info)
    assert cli(["check", str(path), "--index", str(built_bundle), "--write-record", "both"]) == 1
    rec = read_record(path)
    assert rec.verdict == "block" and rec.matches[0].url == "rocket.png"
    assert rec.generation.seed == 1234567890 and rec.generation.prompt.startswith("masterpiece")
    assert rec.image["source"] == str(path)
    assert (tmp_path / "00001-1234567890.png.provenance.json").is_file()


def test_build_reports_skipped_files(tiny_model, tmp_path, capsys):
    src = tmp_path / "imgs" / "nested"
    src.mkdir(parents=True)
    sample_image("coins").save(src / "a.png")
    sample_image("moon").save(src / "b.webp")
    (src / "broken.jpg").write_bytes(b"nope")
    (src / "notes.md").write_text("ignored")
    assert cli(["index", "build", "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "b"),
                "--model", tiny_model, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 rows" in out and "skipped" in out and "broken.jpg" in out
    assert json.loads((tmp_path / "b/manifest.json").read_text())["build"]["skipped"]


def test_terminal_safe_strips_control_characters():
    assert terminal_safe("a\x1b[31mred\x07\nb") == "a [31mred b"
    assert terminal_safe("x" * 100, 10) == "x" * 9 + "…"


def test_demo_runs_the_main_job(tmp_path):
    """The README's first command: exit 0 means copies were blocked and unrelated photos passed."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "provenance_guard", "demo", "--out", str(tmp_path / "d"),
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "as expected" in proc.stdout and "BLOCK" in proc.stdout and "PASS" in proc.stdout
    assert read_record(tmp_path / "d/outputs/astronaut_jpeg70.jpg").verdict == "block"


@pytest.mark.parametrize("source,label", [("forge", "Forge webui (forge)"), ("a1111", "Automatic1111 webui (a1111)"),
                                          ("comfyui", "ComfyUI (comfyui)")])
def test_record_show_prints_the_stored_record_and_its_host(built_bundle, tmp_path, capsys, source, label):
    from provenance_guard.core.check import Checker
    from provenance_guard.core.record import write_record
    from provenance_guard.core.result import GenerationRecord

    image = tmp_path / "out.png"
    sample_image("astronaut").save(image)
    (result,) = Checker(built_bundle, device="cpu").check(
        [image], records=[GenerationRecord(prompt="an astronaut <b>", seed=7, source=source)])
    write_record(image, result)
    assert cli(["record", "show", str(image)]) == 0
    out = capsys.readouterr().out
    assert f"written by:  {label}" in out and "verdict:     block" in out and "astronaut.png" in out
    assert "prompt:      an astronaut <b>" in out and "seed:        7" in out
    assert cli(["record", "show", "--json", str(image)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == "block" and data["generation"]["source"] == source


def test_record_show_says_what_is_missing_and_exits_2(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    sample_image("camera").save(plain)
    broken = tmp_path / "broken.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("provenance", "{not json")
    sample_image("camera").save(broken, pnginfo=info)
    assert cli(["record", "show", str(plain), str(broken), str(tmp_path / "gone.png")]) == 2
    err = capsys.readouterr().err
    assert "plain.png: no provenance record" in err and "broken.png: its record cannot be read" in err
    assert "gone.png: no such file" in err and "Traceback" not in err


def test_help_is_plain_text_with_defaults_descriptions_and_exit_codes(capsys):
    import re

    for argv in (["--help"], ["check", "--help"], ["index", "build", "--help"], ["serve", "--help"],
                 ["index", "embed", "--help"], ["record", "show", "--help"]):
        with pytest.raises(SystemExit) as done:
            cli(argv)
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert "``" not in text, argv
        assert re.search(r"^  --[a-z]", text, re.M), argv
    import argparse

    from provenance_guard.cli import build_parser

    def undescribed(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from undescribed(child, path + [name])
            elif action.option_strings and not action.help and action.dest != "help":
                yield " ".join(path + [action.option_strings[0]])

    assert list(undescribed(build_parser(), [])) == []  # every option says what it does
    with pytest.raises(SystemExit):
        cli(["check", "--help"])
    text = capsys.readouterr().out
    assert "exit codes:" in text and "(default: 32)" in text and "--no-progress" in text
    with pytest.raises(SystemExit):
        cli(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "port to listen on" in text and "(default: 1234)" in text and "largest request body" in text


def test_demo_without_scikit_image_names_what_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    assert cli(["demo", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "pip install scikit-image" in err and "[demo]" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("record,why", [
    ({"verdict": "block\x1b[2J\x1b]0;owned\x07", "max_score": 0.5, "fail_mode": "open",
      "generation": {"prompt": "a \x1b[31mred\x1b[0m cat", "source": "a1111"}}, None),
    ({"verdict": "pass", "max_score": "abc", "fail_mode": "open"}, "cannot be read"),
    ({"verdict": "pass", "max_score": 0.1, "fail_mode": "open", "generation": {"source": ["a"]}}, ""),
    ({"verdict": "pass", "max_score": 0.1, "fail_mode": "open", "prompt": {"memorization_score": "x"}},
     "cannot be read"),
])
def test_record_show_is_safe_with_a_hostile_record(tmp_path, capsys, record, why):
    image = tmp_path / "x.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("provenance", json.dumps({"schema": "provenance-guard/check-result", "schema_version": 1,
                                             "matches": [], **record}))
    sample_image("camera").save(image, pnginfo=info)
    code = cli(["record", "show", str(image)])
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and "\x07" not in out + err and "Traceback" not in err
    if why:
        assert code == 2 and why in err
    elif why is None:
        assert code == 0 and "written by:  Automatic1111 webui (a1111) (as the record says)" in out
    else:
        assert code == 0 and "written by:  ['a']" in out  # printed as text, never a crash


def test_check_views_default_follows_verify_and_finds_an_inset_copy(built_bundle, tmp_path, capsys):
    """check --views: multi by default when --verify is on (the studio gate), whole with --verify off; a
    reference inset into a larger image is found through the view that holds it."""
    from provenance_guard.index_builder.edits import inset

    copy = tmp_path / "inset.png"
    inset(sample_image("astronaut").convert("RGB"), 0.4).save(copy)

    def top_view(*extra):
        cli(["check", str(copy), "--index", str(built_bundle), "--json", *extra])
        return json.loads(capsys.readouterr().out.splitlines()[0])["matches"][0]

    assert top_view("--verify", "off").get("view") is None  # whole: one query
    found = top_view()  # --verify confirm+escalate by default: multi
    assert found.get("view") is not None and found["url"] == "astronaut.png"
    assert top_view("--views", "whole").get("view") is None
    assert top_view("--verify", "off", "--views", "multi").get("view") is not None
    with pytest.raises(SystemExit) as raised:
        cli(["check", str(copy), "--index", str(built_bundle), "--views", "many"])
    assert raised.value.code == 2


def test_calibrate_measures_the_views_the_checks_query_with(built_bundle, tmp_path, capsys):
    """index calibrate --views: multi by default (a check's default with verification), whole on request. The
    multi-view query gives every wrong row more chances, so its wrong pairs score at least as high and its
    thresholds sit at least as high; the manifest says which queries its thresholds are for."""
    import shutil

    from provenance_guard.core.bundle import Bundle
    from provenance_guard.core.errors import ConfigError
    from provenance_guard.index_builder.calibrate import calibrate

    made = {}
    for views in ("whole", "multi"):
        bundle = tmp_path / views
        shutil.copytree(built_bundle, bundle)
        argv = ["index", "calibrate", str(bundle), "--sample", "2", "--target-fpr", "0.05", "--device", "cpu",
                "--plot", str(tmp_path / f"{views}.png")]
        assert cli(argv + (["--views", "whole"] if views == "whole" else [])) == 0
        assert f"for {views}-view queries" in capsys.readouterr().out
        made[views] = Bundle.open(bundle).manifest
        assert made[views].build["calibration"]["views"] == views
        assert made[views].build["history"][-1]["views"] == views
    assert made["multi"].block >= made["whole"].block - 1e-6 and made["multi"].warn >= made["whole"].warn - 1e-6
    assert made["multi"].build["calibration"]["wrong_pairs"] == made["whole"].build["calibration"]["wrong_pairs"]
    with pytest.raises(ConfigError, match="give whole or multi"):
        calibrate(tmp_path / "whole", views="many", device="cpu")
    with pytest.raises(SystemExit) as raised:
        cli(["index", "calibrate", str(tmp_path / "whole"), "--views", "many"])
    assert raised.value.code == 2

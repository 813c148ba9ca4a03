"""The views mode in the result: CheckResult.views ("whole" | "multi") in its JSON (and the schema), the
provenance record written into and read back from the image, `record show`, and the HTML report's header."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from provenance_guard.cli import main as cli
from provenance_guard.core.check import Checker
from provenance_guard.core.html_report import ReportRow, render
from provenance_guard.core.policy import Policy
from provenance_guard.core.record import read_record, write_record
from provenance_guard.core.result import CheckResult
from provenance_guard.demo import sample_image

SCHEMA = json.loads((Path(__file__).parents[1] / "core/schema/check-result.v1.json").read_text())


@pytest.fixture(scope="module")
def checker(built_bundle):
    return Checker(built_bundle, device="cpu")


@pytest.mark.parametrize("views", ["whole", "multi"])
def test_the_result_and_its_record_say_which_queries_ran(checker, tmp_path, views, capsys):
    import jsonschema

    (r,) = checker.check([sample_image("astronaut")], policy=Policy(views=views))
    assert r.views == views
    data = json.loads(r.dumps())
    jsonschema.validate(data, SCHEMA)
    assert data["views"] == views and CheckResult.from_json(data).views == views
    image = tmp_path / "out.png"
    sample_image("astronaut").convert("RGB").save(image)
    write_record(image, r, png=True, sidecar=True)
    assert read_record(image).views == views
    assert cli(["record", "show", str(image)]) in (0, 1)
    shown = capsys.readouterr().out
    assert f"  views:       {views} (the whole image" in shown


def test_embeddings_are_whole_image_queries_and_failures_ran_none(checker, built_bundle):
    from provenance_guard.core.bundle import Bundle

    row = Bundle.open(built_bundle).vector([0])
    (r,) = checker.check_embeddings(row, policy=Policy(views="multi"))
    assert r.views == "whole"
    (failed,) = checker.check([b"not an image"], policy=Policy(views="multi"))
    assert failed.error and failed.views is None and "views" not in failed.to_json()
    old = {k: v for k, v in json.loads(r.dumps()).items() if k != "views"}  # a record from before the field
    assert CheckResult.from_json(old).views is None


def test_the_html_report_names_the_queries(checker):
    rows = []
    for views in ("multi", "whole"):
        (r,) = checker.check([sample_image("astronaut")], policy=Policy(views=views))
        rows.append(ReportRow(result=r))
    page = render(rows[:1], checked=1)
    assert "Queried as: multi-view (the whole image, its 2 x 2 grid and its centre)." in page
    assert "Queried as: multi-view (the whole image, its 2 x 2 grid and its centre) and whole image." in render(
        rows, checked=2)

"""Lint as the field does: ruff with the project's rules (pyproject.toml: pyflakes, bugbear, complexity,
simplify, pyupgrade), every file parsed as Python 3.10 (the webuis recommend it; these machines have 3.11
only, so syntax that 3.10 lacks would pass every other test)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> str:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install '.[dev]')")
    return ruff


def test_ruff_finds_nothing_under_the_projects_rules():
    out = subprocess.run([_ruff(), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"),
                          "--output-format", "concise", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr


def test_the_rules_are_the_projects_own(tmp_path):
    """The check above reads pyproject.toml, not a ruff.toml found above the clone: a file with a bugbear
    finding fails it."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f(x=[]):\n    return x\n")
    out = subprocess.run([_ruff(), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "B006" in out.stdout

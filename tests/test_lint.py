"""The code must run on Python 3.10 (the webuis recommend it; these machines have 3.11 only): ruff parses
every file as 3.10 and reports syntax that version lacks, plus undefined names."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_file_is_python_3_10():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install '.[dev]')")
    out = subprocess.run([ruff, "check", "--no-cache", "--target-version", "py310", "--select", "E9,F63,F7,F82",
                          "--exclude", ".venv*,bench/.venv-*", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr

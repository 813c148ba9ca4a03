"""Shared fixtures: a tiny open_clip model saved as a local-dir model, scikit-image reference photos,
and a bundle built from them through the same builder the CLI uses. No network, CPU only."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never reach the network: a weights download must fail fast through the offline path.
os.environ.setdefault("PROVENANCE_GUARD_DEVICE", "cpu")
# Builds record the reference folders this user built bundles from (core.references): never in the real
# config folder of whoever runs the tests. Subprocesses (the CLI, servers, hosts) inherit the variable.
_CONFIG_DIR = tempfile.mkdtemp(prefix="provenance-guard-test-config-")
os.environ["PROVENANCE_GUARD_CONFIG_DIR"] = _CONFIG_DIR
atexit.register(shutil.rmtree, _CONFIG_DIR, True)

from provenance_guard import demo  # noqa: E402

# Thresholds for the tiny random-weight model, from the gap measured in test_check.py::test_score_gap:
# edits of a reference (JPEG q70, half size) stay >= 0.999 while distinct photos stay <= ~0.98.
TEST_WARN = demo.DEMO_WARN
TEST_BLOCK = demo.DEMO_BLOCK


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return demo.make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def references(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("refs")
    demo.write_references(folder)
    return folder


@pytest.fixture(scope="session")
def outputs(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("outputs")
    return folder, demo.write_outputs(folder)


@pytest.fixture(scope="session")
def built_bundle(tmp_path_factory, tiny_model, references) -> Path:
    from provenance_guard.index_builder.images import build_from_images

    out = tmp_path_factory.mktemp("bundles") / "refs"
    build_from_images(references, out, tiny_model, warn=TEST_WARN, block=TEST_BLOCK, progress=False,
                      bundle_id="test-refs")
    return out


@pytest.fixture
def bundle_copy(built_bundle, tmp_path) -> Path:
    """A private copy of the built bundle that a test may damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(built_bundle, dst)
    return dst

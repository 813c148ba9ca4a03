"""The model fingerprint: a bundle knows the weights that made its vectors by what they do (fixed probe
images), so a check with other weights of the same architecture and dimension is refused before any image,
in the CLI (exit 2), the library (hosts: the fail mode) and the server (503)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from provenance_guard.cli import main as cli
from provenance_guard.core.bundle import Bundle
from provenance_guard.core.check import Checker
from provenance_guard.core.fingerprint import KEY, MIN_COSINE, ModelMismatchError, check_model, probe_pixels
from provenance_guard.core.policy import Policy
from provenance_guard.demo import make_tiny_model, sample_image


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> str:
    """The same tiny architecture and dimension, other random weights."""
    return make_tiny_model(tmp_path_factory.mktemp("other") / "tiny-clip", seed=1)


def test_a_bundle_built_from_images_stores_its_models_fingerprint(built_bundle, tiny_model):
    fp = Bundle.open(built_bundle).manifest.build[KEY]
    assert fp["probe_version"] == 1 and fp["model"] == tiny_model and len(fp["probes"]) == len(probe_pixels())
    assert len(fp["probes"][0]) == fp["dim"] == Bundle.open(built_bundle).dim
    assert [p.tensor.shape for p in probe_pixels()] == [p.tensor.shape for p in probe_pixels()]  # fixed probes


def test_other_weights_are_refused_before_any_image(built_bundle, other_weights, outputs, capsys):
    folder, _ = outputs
    assert cli(["check", str(folder / "chelsea_copy.png"), "--index", str(built_bundle), "--model", other_weights]) == 2
    out, err = capsys.readouterr()
    assert "is not the one whose weights made its vectors" in err and "probe images" in err
    assert "chelsea_copy" not in out  # nothing was checked
    assert cli(["check", str(folder / "chelsea_copy.png"), "--index", str(built_bundle)]) == 1  # its own: a block


def test_hosts_get_the_refusal_as_the_fail_mode(built_bundle, other_weights):
    checker = Checker(built_bundle, model=other_weights, device="cpu")
    (closed,) = checker.check([sample_image("astronaut")], policy=Policy(fail_mode="closed"))
    assert closed.verdict == "block" and "not the one whose weights" in closed.error
    (opened,) = checker.check([sample_image("astronaut")], policy=Policy(fail_mode="open"))
    assert opened.verdict == "unchecked" and not opened.matches


def test_a_bundle_without_a_fingerprint_gets_one_where_the_weights_are(built_bundle, tiny_model, other_weights,
                                                                       tmp_path, capsys):
    bundle = tmp_path / "b"
    shutil.copytree(built_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["build"][KEY]  # as a bundle built from LAION embedding shards
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    Checker(bundle, model=other_weights, device="cpu").embedders()  # known by name only: not refused
    assert cli(["index", "fingerprint", str(bundle), "--device", "cpu"]) == 0
    assert "model fingerprint of" in capsys.readouterr().out
    with pytest.raises(ModelMismatchError):
        Checker(bundle, model=other_weights, device="cpu").embedders()
    assert cli(["index", "fingerprint", str(bundle), "--model", other_weights, "--device", "cpu"]) == 2
    assert "already has a fingerprint, of other weights" in capsys.readouterr().err


def test_a_damaged_or_foreign_fingerprint(built_bundle, tmp_path):
    from provenance_guard.core.embed import get_embedder

    bundle = tmp_path / "b"
    shutil.copytree(built_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    embedder = get_embedder(manifest["embedding"]["model"], "cpu")
    manifest["build"][KEY]["probes"][0][0] = float("nan")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelMismatchError, match="damaged"):
        check_model(Bundle.open(bundle), embedder)
    manifest["build"][KEY] = {"probe_version": 99, "probes": []}  # a later version's: the name decides
    manifest["bundle"]["version"] = "other"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    check_model(Bundle.open(bundle), embedder)
    assert 0.9 < MIN_COSINE < 1.0


@pytest.mark.slow
def test_the_server_refuses_to_start_and_answers_503_for_weights_that_are_not_the_bundles(
        built_bundle, other_weights, tmp_path):
    """Other weights than the fingerprint's: at start the server will not listen (exit 2, one line); a new
    version published under a running server that names other weights is answered 503, never searched."""
    import base64
    import io
    import subprocess
    import sys

    import requests
    from test_server import CLEAN_EXIT, start, stop

    bundle = tmp_path / "refs"
    shutil.copytree(built_bundle, bundle)
    good = (bundle / "manifest.json").read_text()
    manifest = json.loads(good)
    manifest["embedding"]["model"] = other_weights  # a bundle naming other weights than its fingerprint's
    bad = json.dumps(manifest)
    (bundle / "manifest.json").write_text(bad)
    out = subprocess.run([sys.executable, "-m", "provenance_guard", "serve", "--index", f"refs={bundle}", "--port",
                          "0"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PROVENANCE_GUARD_DEVICE="cpu"))
    assert out.returncode == 2 and "not the ones its vectors were made with" in out.stderr, out.stderr[-2000:]
    assert "--embeddings-only" in out.stderr and "Traceback" not in out.stderr

    (bundle / "manifest.json").write_text(good)
    proc, base = start(bundle)
    try:
        (bundle / "manifest.json").write_text(bad)  # a new version, followed from the next request on
        buf = io.BytesIO()
        sample_image("astronaut").save(buf, "PNG")
        image = base64.b64encode(buf.getvalue()).decode()
        r = requests.post(f"{base}/knn-service", json={"image": image, "indice_name": "refs"}, timeout=120)
        assert r.status_code == 503 and "not the one its vectors were made with" in r.json()["error"], r.text[:300]
        r = requests.post(f"{base}/v1/check", json={"images": [image]}, timeout=120)
        assert r.status_code == 503, r.text[:300]
        vector = Bundle.open(built_bundle).vector([0])[0].tolist()  # no model involved: still answered
        assert requests.post(f"{base}/knn-service", json={"embedding_input": vector, "indice_name": "refs"},
                             timeout=60).ok
    finally:
        assert stop(proc) in CLEAN_EXIT


def test_bundles_whose_fingerprints_differ_are_not_merged(tiny_model, other_weights, references, tmp_path):
    from provenance_guard.core.errors import ConfigError
    from provenance_guard.index_builder.images import build_from_images
    from provenance_guard.index_builder.maintain import merge_bundles

    build_from_images(references, tmp_path / "a", tiny_model, progress=False)
    build_from_images(references, tmp_path / "b", other_weights, progress=False)
    for path in (tmp_path / "b",):  # the same model name, other weights (as a bundle copied from elsewhere)
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["embedding"]["model"] = tiny_model
        (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="other weights made their vectors"):
        merge_bundles(tmp_path / "a", tmp_path / "b", tmp_path / "m")
    merge_bundles(tmp_path / "a", tmp_path / "a", tmp_path / "same")
    assert Bundle.open(tmp_path / "same").manifest.build[KEY]["probes"]  # the same weights: kept


def test_a_model_that_embeds_nan_never_matches(built_bundle):
    import numpy as np

    from provenance_guard.core.fingerprint import mismatch

    class NaNModel:
        spec = None
        dim = Bundle.open(built_bundle).dim

        def embed_pixels(self, pixels, batch_size=32):
            return np.full((len(pixels), self.dim), np.nan, dtype=np.float32)

    stored = Bundle.open(built_bundle).manifest.build[KEY]
    assert mismatch(stored, NaNModel()) is not None

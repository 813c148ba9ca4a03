"""The check pipeline on real photos: copies found and blocked, unrelated images pass, fail modes, threads,
several bundles, thresholds, and the JSON schema of the result."""
from __future__ import annotations

import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TEST_BLOCK, TEST_WARN
from provenance_guard.core.check import Checker, model_override_problem
from provenance_guard.core.errors import ConfigError
from provenance_guard.core.policy import Policy
from provenance_guard.core.result import CheckResult, GenerationRecord
from provenance_guard.demo import REFERENCES, UNRELATED, sample_image

REF_NAMES = list(REFERENCES)


def jpeg(img: Image.Image, quality: int = 70) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def half(img: Image.Image) -> Image.Image:
    return img.resize((img.width // 2, img.height // 2), Image.LANCZOS)


@pytest.fixture(scope="module")
def checker(built_bundle):
    return Checker(built_bundle, device="cpu")


def test_score_gap(checker):
    """The test thresholds sit in the gap of the tiny random-weight model: edits of a reference keep a
    cosine >= 0.999 with it, distinct photos stay below TEST_WARN. Thresholds are chosen from this gap,
    not from real CLIP (whose defaults are 0.90/0.95)."""
    refs = [sample_image(n).convert("RGB") for n in REF_NAMES]
    edits = [jpeg(r) for r in refs] + [half(r) for r in refs]
    results = checker.check(edits)
    scores = [r.max_score for r in results]
    assert min(scores) >= 0.999
    unrelated = checker.check([sample_image(n) for n in UNRELATED])
    assert max(r.max_score for r in unrelated) < TEST_WARN < TEST_BLOCK < 0.999


def test_exact_copy_is_top1_and_blocked(checker):
    for name in REF_NAMES:
        (r,) = checker.check([sample_image(name).convert("RGB")])
        assert r.verdict == "block" and r.matches[0].row_id == sorted(REF_NAMES).index(name)
        assert r.max_score >= 0.999 and r.matches[0].exact
        assert r.matches[0].url == f"{name}.png" and r.matches[0].caption == REFERENCES[name]
        assert r.matches[0].bundle_id == "test-refs"


@pytest.mark.parametrize("edit", [jpeg, half], ids=["jpeg-q70", "resized-half"])
def test_edited_copies_are_top1(checker, edit):
    results = checker.check([edit(sample_image(n).convert("RGB")) for n in REF_NAMES])
    assert [r.matches[0].url for r in results] == [f"{n}.png" for n in REF_NAMES]
    assert all(r.verdict == "block" for r in results)


def test_unrelated_images_pass(checker):
    results = checker.check([sample_image(n) for n in UNRELATED])
    assert [r.verdict for r in results] == ["pass"] * len(UNRELATED)
    for r in results:
        assert len(r.matches) == len(REF_NAMES)  # top-k capped at the bundle size, best first
        assert [m.score for m in r.matches] == sorted((m.score for m in r.matches), reverse=True)
        assert r.thresholds[0].warn == TEST_WARN and r.thresholds[0].block == TEST_BLOCK


def test_policy_overrides_thresholds_and_top_k(checker):
    (r,) = checker.check([sample_image("camera")], policy=Policy(warn=0.0, block=0.999, top_k=2))
    assert r.verdict == "warn" and len(r.matches) == 2
    (r,) = checker.check([sample_image("camera")], policy=Policy(block=-1.0))
    assert r.verdict == "block" and r.thresholds[0].warn == -1.0
    with pytest.raises(ConfigError, match="warn threshold 0.9 is above block"):
        Policy(warn=0.9, block=0.5)
    with pytest.raises(ConfigError, match="fail mode"):
        Policy(fail_mode="maybe")


def test_batch_is_one_forward_pass(checker, monkeypatch):
    emb = checker.embedders()[checker.model_for(checker.open()[0])]
    calls = []
    real = emb.model.encode_image
    monkeypatch.setattr(emb.model, "encode_image", lambda x: calls.append(len(x)) or real(x))
    checker.check([sample_image(n) for n in REF_NAMES + list(UNRELATED)])
    assert calls == [len(REF_NAMES) + len(UNRELATED)]


def test_comfyui_tensor_batch(checker):
    imgs = [sample_image(n).convert("RGB").resize((96, 96)) for n in ("astronaut", "camera")]
    batch = torch.from_numpy(np.stack([np.asarray(i) for i in imgs]).astype(np.float32) / 255.0)
    results = checker.check(batch)
    assert [r.verdict for r in results] == ["block", "pass"]


def test_generation_record_is_carried(checker):
    rec = GenerationRecord(prompt="an astronaut", seed=42, steps=20, cfg=7.0, sampler="Euler a", model="sd15")
    (r,) = checker.check([sample_image("astronaut")], records=[rec])
    assert r.generation.prompt == "an astronaut" and r.to_json()["generation"]["seed"] == 42


def test_result_json_follows_schema_and_round_trips(checker):
    import jsonschema

    schema = json.loads((Path(__file__).parents[1] / "core/schema/check-result.v1.json").read_text())
    results = checker.check([sample_image("astronaut"), sample_image("camera")],
                            records=[GenerationRecord(prompt="p", seed=1, source="caller"), None])
    for r in results:
        data = json.loads(r.dumps())
        jsonschema.validate(data, schema)
        assert data["schema"] == "provenance-guard/check-result" and data["schema_version"] == 1
        back = CheckResult.from_json(data)
        assert back.verdict == r.verdict and back.matches[0].row_id == r.matches[0].row_id
        assert set(data["timings_ms"]) >= {"embed", "search", "metadata", "total"}


def test_unreadable_image_follows_fail_mode(checker, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    ok, broken = checker.check([sample_image("astronaut"), bad])
    assert ok.verdict == "block" and broken.verdict == "unchecked" and broken.error
    (closed,) = checker.check([bad], policy=Policy(fail_mode="closed"))
    assert closed.verdict == "block" and "blocked (fail mode closed)" in closed.warnings[0]


@pytest.mark.parametrize("mode,verdict", [("open", "unchecked"), ("closed", "block")])
def test_broken_bundle_follows_fail_mode(bundle_copy, mode, verdict):
    (bundle_copy / "index.faiss").unlink()
    c = Checker(bundle_copy, device="cpu", policy=Policy(fail_mode=mode))
    (r,) = c.check([sample_image("camera")])
    assert r.verdict == verdict and "index.faiss is missing" in r.error
    assert r.to_json()["verdict"] == verdict


def test_repaired_bundle_is_picked_up(built_bundle, bundle_copy):
    shutil.move(bundle_copy / "index.faiss", bundle_copy / "index.faiss.away")
    c = Checker(bundle_copy, device="cpu")
    assert c.check([sample_image("camera")])[0].verdict == "unchecked"
    shutil.move(bundle_copy / "index.faiss.away", bundle_copy / "index.faiss")
    assert c.check([sample_image("astronaut")])[0].verdict == "block"


def test_model_failure_follows_fail_mode(bundle_copy, tmp_path):
    def edit(d):
        d["embedding"]["model"] = f"local-dir:{tmp_path / 'gone'}"

    data = json.loads((bundle_copy / "manifest.json").read_text())
    edit(data)
    (bundle_copy / "manifest.json").write_text(json.dumps(data))
    (r,) = Checker(bundle_copy, device="cpu", policy=Policy(fail_mode="closed")).check([sample_image("coins")])
    assert r.verdict == "block" and "open_clip_config.json is missing" in r.error


def test_eight_threads_give_the_same_results_as_one(built_bundle):
    images = [sample_image(n).convert("RGB") for n in REF_NAMES + list(UNRELATED)]
    c = Checker(built_bundle, device="cpu")
    expected = [(r.verdict, [m.row_id for m in r.matches], [round(m.score, 5) for m in r.matches])
                for r in c.check(images)]
    shared = Checker(built_bundle, device="cpu")  # opened lazily by whichever thread comes first
    got: dict[int, list] = {}
    errors = []
    barrier = threading.Barrier(8)

    def work(t: int) -> None:
        try:
            barrier.wait()
            out = []
            for i in range(t, t + len(images)):  # each thread its own order, all overlapping
                (r,) = shared.check([images[i % len(images)]])
                out.append((i % len(images), (r.verdict, [m.row_id for m in r.matches],
                                              [round(m.score, 5) for m in r.matches])))
            got[t] = out
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for out in got.values():
        for idx, value in out:
            assert value == expected[idx]


def test_several_bundles_merge_by_score_and_name_their_bundle(built_bundle, tiny_model, tmp_path):
    from provenance_guard.index_builder.images import build_from_images

    studio = tmp_path / "studio-refs"
    studio.mkdir()
    sample_image("camera").save(studio / "camera.png")
    build_from_images(studio, tmp_path / "studio", tiny_model, bundle_id="studio", progress=False,
                      warn=TEST_WARN, block=TEST_BLOCK)
    c = Checker([built_bundle, tmp_path / "studio"], device="cpu")
    cam, astro = c.check([sample_image("camera"), sample_image("astronaut")])
    assert cam.matches[0].bundle_id == "studio" and cam.verdict == "block"
    assert astro.matches[0].bundle_id == "test-refs"
    assert {m.bundle_id for m in cam.matches} == {"studio", "test-refs"}
    assert [t.bundle_id for t in cam.thresholds] == ["test-refs", "studio"]
    assert [m.score for m in cam.matches] == sorted((m.score for m in cam.matches), reverse=True)


def test_model_override_rules():
    assert model_override_problem("ViT-L-14/openai", "ViT-L-14/openai") is None
    assert model_override_problem("ViT-L-14/openai", "ViT-L-14-quickgelu//m/vitl14.pt") is None
    assert model_override_problem("ViT-L-14/openai", "local-dir:/m/vitl14") is None
    assert "architecture" in model_override_problem("ViT-L-14/openai", "ViT-B-32/openai")
    assert "pretrained" in model_override_problem("ViT-L-14/openai", "ViT-L-14/laion2b_s32b_b82k")


def test_model_override_refused_when_it_is_another_model(bundle_copy):
    data = json.loads((bundle_copy / "manifest.json").read_text())
    data["embedding"]["model"] = "ViT-L-14/openai"
    (bundle_copy / "manifest.json").write_text(json.dumps(data))
    c = Checker(bundle_copy, model="ViT-B-32/openai", device="cpu")
    with pytest.raises(ConfigError, match="cannot check bundle test-refs: architecture ViT-B-32"):
        c.open()
    assert c.check([sample_image("camera")])[0].verdict == "unchecked"


def test_dimension_mismatch_at_check_time(built_bundle, tmp_path):
    """A local model of another width pointed at the bundle: the 32-d embeddings meet 64-d rows."""
    import open_clip
    from safetensors.torch import save_file

    from provenance_guard.demo import tiny_model_cfg

    cfg = tiny_model_cfg()
    cfg["embed_dim"] = 32
    folder = tmp_path / "narrow"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file(open_clip.model.CLIP(**cfg).state_dict(), str(folder / "open_clip_model.safetensors"))
    c = Checker(built_bundle, model=f"local-dir:{folder}", device="cpu")
    (r,) = c.check([sample_image("camera")])
    assert r.verdict == "unchecked" and "32-d embeddings but bundle test-refs" in r.error


def test_check_embeddings(built_bundle, checker):
    vec = checker.embedders()[checker.model_for(checker.open()[0])].embed([sample_image("rocket")])
    (r,) = Checker(built_bundle, device="cpu").check_embeddings(vec)
    assert r.verdict == "block" and r.matches[0].url == "rocket.png"


def test_check_embeddings_scales_rows_and_refuses_other_shapes(built_bundle, checker):
    """Embeddings of any length score the same cosines (rows are scaled to unit length); an array that is not
    one row per image, or a row of zeros, is a failed check with one message, not an exception."""
    vec = checker.embedders()[checker.model_for(checker.open()[0])].embed([sample_image("rocket")])
    c = Checker(built_bundle, device="cpu")
    (unit_r,) = c.check_embeddings(vec)
    (long_r,) = c.check_embeddings(7.5 * vec[0])  # one 1-d row, not unit length
    assert [m.row_id for m in long_r.matches] == [m.row_id for m in unit_r.matches]
    assert max(abs(a.score - b.score) for a, b in zip(long_r.matches, unit_r.matches, strict=True)) < 1e-5
    (cube,) = c.check_embeddings(vec[None, :, :])
    assert cube.verdict == "unchecked" and "one row per image" in cube.error
    zero, nan = c.check_embeddings(np.stack([np.zeros_like(vec[0]), np.full_like(vec[0], np.nan)]))
    assert zero.verdict == nan.verdict == "unchecked" and "zero or holds a number that is not finite" in zero.error


def test_row_squares_sum_each_row_as_float32_whatever_the_array_layout():
    from provenance_guard.core.search import row_squares

    x = np.random.default_rng(5).standard_normal((6, 768)).astype(np.float32)
    x[1, 3], x[2, 0], x[3] = np.nan, np.inf, 0.0
    want = [float(v) for v in (x.astype(np.float64) ** 2).sum(axis=1)]
    for layout in (x, np.asfortranarray(x), x.astype(np.float64), x.astype(">f4"), np.repeat(x, 2, axis=1)[:, ::2]):
        got = row_squares(layout)
        assert len(got) == 6 and np.isnan(got[1]) and got[2] == float("inf") and got[3] == 0.0
        assert np.allclose([got[i] for i in (0, 4, 5)], [want[i] for i in (0, 4, 5)], rtol=1e-6)
    assert row_squares(np.zeros((2, 0), np.float32)) == [0.0, 0.0]
    with pytest.raises(ValueError, match="2-d"):
        row_squares(x[0])

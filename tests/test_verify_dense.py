"""The verifiers for what keypoints alone miss, on real scikit-image photos: dense localisation of a flat
reference inside a larger output (an inset, a letterbox with a blurred fill, a tile of a collage), the
reference stretched to the output's shape where a similarity keeps too few matches (a page squeezed into a
square tile), and the dense comparison's keystone and blur alignments; and for each, an unrelated image in the
same place is not a copy."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from provenance_guard.core.verify import COPY, DIFFERENT, PARTIAL, VerifyThresholds, Verification, compare, locate
from provenance_guard.core.verify import generated_features, reference_features
from provenance_guard.demo import sample_image
from provenance_guard.index_builder.edits import inset, pad_each_side


def photo(name: str) -> Image.Image:
    return sample_image(name).convert("RGB")


def texture(seed: int, size: int) -> Image.Image:
    """A smooth random field with grain: an unrelated, featureful tile."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(np.clip(rng.normal(128, 50, (size // 16 + 1, size // 16 + 1, 3)), 0, 255).astype(np.uint8))
    grain = rng.normal(0, 10, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(base.resize((size, size), Image.BICUBIC), np.float32) + grain, 0,
                                   255).astype(np.uint8))


def collage(first: Image.Image, side: int = 384) -> Image.Image:
    """first stretched into the top-left tile of a 2 x 2 grid, three unrelated tiles beside it."""
    out = Image.new("RGB", (2 * side, 2 * side))
    for n, tile in enumerate([first.resize((side, side))] + [texture(s, side) for s in (11, 12, 13)]):
        out.paste(tile, ((n % 2) * side, (n // 2) * side))
    return out


FLAT = ["colorwheel", "clock"]  # no keypoints to speak of: 0 and 2 at 512 px
OTHER_FLAT = {"colorwheel": "clock", "clock": "colorwheel"}


@pytest.mark.parametrize("name", FLAT)
@pytest.mark.parametrize("edit", ["inset40", "inset25", "pad25_blur", "collage"])
def test_a_flat_reference_is_localised_inside_a_larger_output(name, edit):
    make = {"inset40": lambda i: inset(i, 0.4), "inset25": lambda i: inset(i, 0.25),
            "pad25_blur": lambda i: pad_each_side(i, 0.5, "blur"), "collage": collage}[edit]
    copy = make(photo(name))
    v = compare(copy, photo(name))
    assert v.status == COPY, v
    assert v.method in ("locate", "dense") and (v.method != "locate" or v.located >= 0.97)
    if v.method == "locate":
        assert v.coverage["reference"] == 1.0 and 0.05 < v.coverage["generated"] < 0.6
        assert "found whole inside a larger image" in v.reason
    # The same output with an unrelated flat image in the same place: the background alone is no copy.
    decoy = make(photo(OTHER_FLAT[name]))
    assert compare(decoy, photo(name)).status == DIFFERENT
    assert compare(make(photo("coins")), photo(name)).status == DIFFERENT


def test_localisation_finds_the_place_and_size():
    ref = photo("colorwheel")
    background = texture(3, 900)
    background.paste(ref.resize((300, 300)), (450, 120))
    score, box = locate(generated_features(background), reference_features(ref))
    x, y, w, h = box
    assert score > 0.97 and abs(x - 450) <= 12 and abs(y - 120) <= 12 and abs(w - 300) <= 24 and abs(h - 300) <= 24


def test_localisation_is_not_asked_of_references_with_keypoints_and_is_kept_for_calibration():
    v = compare(inset(photo("coins"), 0.4), photo("astronaut"))
    assert v.located is None  # astronaut has keypoints: SIFT decides
    back = Verification.from_json(compare(inset(photo("clock"), 0.4), photo("clock")).to_json())
    assert back.status == COPY and back.located is not None and back.located >= 0.97


@pytest.mark.parametrize("name", ["page", "text"])
def test_a_reference_stretched_into_a_tile_is_matched_stretched_to_its_shape(name):
    """page and text are tall or wide: squeezed into a square tile, the similarity keeps too few matches."""
    v = compare(collage(photo(name)), photo(name))
    assert v.status in (COPY, PARTIAL) and v.inliers >= VerifyThresholds().min_inliers, v
    assert v.status == COPY and v.coverage["reference"] >= 0.5
    other = {"page": "text", "text": "page"}[name]
    assert compare(collage(photo(other)), photo(name)).status == DIFFERENT


def keystone(img: Image.Image, amount: float = 0.12) -> Image.Image:
    """The top edge pulled in on each side (a print photographed from below)."""
    import cv2

    a = np.asarray(img)
    h, w = a.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = np.float32([[amount * w, 0], [(1 - amount) * w, 0], [w, h], [0, h]])
    return Image.fromarray(cv2.warpPerspective(a, cv2.getPerspectiveTransform(src, dst), (w, h)))


def test_a_flat_image_under_perspective_is_aligned_by_a_keystone():
    v = compare(keystone(photo("clock")), photo("clock"))
    assert v.status == COPY and v.method == "dense" and "edge" in v.reason, v
    assert compare(keystone(photo("colorwheel")), photo("clock")).status == DIFFERENT


def test_a_blurred_output_is_compared_with_the_reference_blurred_as_much():
    blurred = photo("text").filter(ImageFilter.GaussianBlur(3))
    v = compare(blurred, photo("text"))
    assert v.status == COPY and v.method == "dense", v
    assert compare(photo("page").filter(ImageFilter.GaussianBlur(3)), photo("text")).status == DIFFERENT


def test_calibration_judges_localisation_under_its_own_cut():
    """index calibrate re-judges stored scores: a pair found by localisation counts as flagged at locate_ncc, and
    the cut it writes is read back by the next check."""
    from provenance_guard.index_builder.calibrate import Pair, _flagged_pixels

    v = compare(inset(photo("clock"), 0.4), photo("clock"))
    pair = Pair.of("true", "inset40", 0.5, v)
    cut = {"min_inliers": 8, "dense_ncc": 0.92, "locate_ncc": 0.97}
    assert pair.located == v.located and _flagged_pixels(pair, cut)
    assert not _flagged_pixels(pair, {**cut, "locate_ncc": 1.0})
    assert VerifyThresholds.from_json({"locate_ncc": 0.99}).locate_ncc == 0.99
    assert VerifyThresholds.from_json({}).locate_ncc == 0.97 and "locate_ncc" in VerifyThresholds().to_json()

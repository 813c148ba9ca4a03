"""Copy verification on the training image's pixels: the verifiers on edited and unrelated pairs, the policy
table, reference pixels (local folders, re-attached folders, fetched URLs with their cache), the check
pipeline with verification, and calibration writing thresholds the next check uses."""
from __future__ import annotations

import http.server
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from provenance_guard.cli import main as cli
from provenance_guard.core.bundle import Bundle
from provenance_guard.core.check import Checker
from provenance_guard.core.policy import Policy, apply_verification
from provenance_guard.core.references import ReferenceOptions, ReferenceResolver
from provenance_guard.core.result import Match
from provenance_guard.core.verify import COPY, DIFFERENT, PARTIAL, UNAVAILABLE, Verification, compare, unavailable
from provenance_guard.demo import sample_image
from provenance_guard.index_builder.edits import EDITS, centre_crop


def photo(name: str) -> Image.Image:
    return sample_image(name).convert("RGB")


@pytest.mark.parametrize("edit", ["jpeg50", "half", "crop25", "crop50", "flip", "rotate10", "bright1.4",
                                  "grayscale", "pad20", "text", "flip_crop25"])
def test_local_features_see_through_copy_edits(edit):
    v = compare(EDITS[edit](photo("astronaut")), photo("astronaut"))
    assert v.status == COPY and v.method == "sift" and v.inliers >= 8, v
    assert v.coverage["generated"] >= 0.3 and v.transform is not None and v.mirrored == (edit.startswith("flip"))


@pytest.mark.parametrize("edit", ["jpeg50", "crop25", "flip", "rotate10", "pad20", "text", "blur3"])
def test_dense_comparison_where_keypoints_are_too_few(edit):
    """A colour wheel has no keypoints at all: the dense comparison decides."""
    v = compare(EDITS[edit](photo("colorwheel")), photo("colorwheel"))
    assert v.status == COPY and v.method == "dense" and v.ncc >= 0.92 and v.tiled_l2 is not None, v


@pytest.mark.parametrize("pair", [("astronaut", "chelsea"), ("camera", "coffee"), ("colorwheel", "clock"),
                                  ("rocket", "page"), ("grass", "gravel")])
def test_different_photos_are_different(pair):
    a, b = pair
    for edit in ("jpeg50", "rotate10"):
        assert compare(EDITS[edit](photo(a)), photo(b)).status == DIFFERENT


def test_a_small_copied_part_is_partial():
    canvas = photo("coffee").resize((1024, 1024))
    canvas.paste(centre_crop(photo("astronaut"), 0.5).resize((240, 240)), (40, 40))
    v = compare(canvas, photo("astronaut"))
    assert v.status == PARTIAL and v.coverage["generated"] < 0.3 and v.inliers >= 8


def _padded(image: Image.Image, sides: tuple, fill) -> Image.Image:
    """image on a canvas with borders of the given shares of its own size (left, top, right, bottom)."""
    from PIL import ImageFilter

    w, h = image.size
    left, top, right, bottom = (int(round(f * (w if i % 2 == 0 else h))) for i, f in enumerate(sides))
    size = (w + left + right, h + top + bottom)
    canvas = (image.resize(size).filter(ImageFilter.GaussianBlur(30)) if fill == "blur"
              else Image.new("RGB", size, fill))
    canvas.paste(image, (left, top))
    return canvas


@pytest.mark.parametrize("fill", ["black", "white", (90, 140, 200), "blur"])
@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field"])
def test_a_copy_inside_borders_is_a_copy(name, fill):
    """25% borders on each side (the copy is a quarter of the output): uniform borders in any colour and a
    blurred fill are not content, so coverage is judged on what is inside them."""
    ref = photo(name)
    v = compare(_padded(ref, (0.5, 0.5, 0.5, 0.5), fill), ref)
    assert v.status == COPY, v


def test_borders_are_found_per_side_and_a_textured_dark_edge_is_content():
    from provenance_guard.core.verify import content_box

    ref = photo("astronaut")  # 512 x 512
    gray = np.asarray(_padded(ref, (0.25, 0.0, 0.1, 0.4), "black").convert("L"))
    assert content_box(gray) == (128, 0, 640, 512)  # left 128, right 51, bottom 205 px of border
    gray = np.asarray(_padded(ref, (0.0, 0.3, 0.0, 0.0), (250, 250, 250)).convert("L"))
    assert content_box(gray) == (0, 154, 512, 666)
    dark = np.asarray(photo("coffee")).astype(np.float32)
    dark[:100] = dark[:100] * 0.15 + np.random.default_rng(0).normal(0, 3, dark[:100].shape)  # a shadow, with grain
    gray = np.asarray(Image.fromarray(np.clip(dark, 0, 255).astype(np.uint8)).convert("L"))
    assert content_box(gray) == (0, 0, 600, 400)


def test_the_training_image_whole_inside_a_larger_image_is_a_copy_and_the_background_alone_is_not():
    """An inset at 40% of the output's area on an unrelated photo: the reference is found whole (its matched
    region spans most of it), so it is a copy however little of the output it covers; the same background
    with another photo inset is not."""
    canvas = photo("coffee").resize((1024, 1024))
    inset = canvas.copy()
    inset.paste(photo("astronaut").resize((648, 648)), (300, 200))
    v = compare(inset, photo("astronaut"))
    assert v.status == COPY and v.coverage["reference"] >= 0.5, v
    other = canvas.copy()
    other.paste(photo("chelsea").resize((648, 430)), (300, 200))
    assert compare(other, photo("astronaut")).status == DIFFERENT


def test_verification_round_trips_through_json():
    v = compare(EDITS["flip"](photo("astronaut")), photo("astronaut"))
    again = Verification.from_json(json.loads(json.dumps(v.to_json())))
    assert (again.status, again.method, again.inliers, again.mirrored) == (v.status, v.method, v.inliers, True)
    assert "evidence" not in v.to_json()


def _match(verdict: str, status) -> Match:
    m = Match(score=0.97, exact=True, bundle_id="b", bundle_version="1", row_id=3, verdict=verdict)
    m.verification = None if status is None else (unavailable("no pixels") if status == UNAVAILABLE
                                                  else Verification(status=status))
    return m


@pytest.mark.parametrize("mode,verdict,status,expect", [
    ("confirm", "block", DIFFERENT, "warn"),
    ("confirm", "block", COPY, "block"),
    ("confirm", "block", UNAVAILABLE, "block"),
    ("confirm", "warn", COPY, "warn"),
    ("confirm", "pass", COPY, "pass"),
    ("escalate", "pass", COPY, "block"),
    ("escalate", "warn", COPY, "block"),
    ("escalate", "block", DIFFERENT, "block"),
    ("escalate", "warn", PARTIAL, "warn"),
    ("escalate", "warn", UNAVAILABLE, "warn"),
    ("confirm+escalate", "block", DIFFERENT, "warn"),
    ("confirm+escalate", "pass", COPY, "block"),
    ("confirm+escalate", "block", UNAVAILABLE, "block"),
    ("off", "block", DIFFERENT, "block"),
    ("confirm", "block", None, "block"),
])
def test_policy_table(mode, verdict, status, expect):
    m = _match(verdict, status)
    apply_verification(m, mode)
    assert m.verdict == expect
    assert m.clip_verdict == (verdict if expect != verdict else None)


# the pipeline ---------------------------------------------------------------------------------------------------

def test_check_verifies_candidates_against_the_local_references(built_bundle, outputs):
    folder, _ = outputs
    checker = Checker(built_bundle, device="cpu")
    (copy, unrelated) = checker.check([folder / "astronaut_jpeg70.jpg", folder / "camera.png"],
                                      policy=Policy(verify="confirm+escalate"))
    v = copy.top.verification
    assert copy.verdict == "block" and v.status == COPY and v.reference.endswith("astronaut.png")
    assert v.evidence.startswith("data:image/jpeg;base64,")
    assert copy.to_json()["matches"][0]["verification"]["status"] == COPY and copy.verify["mode"] == "confirm+escalate"
    # The top match of this small local bundle is always verified, whatever its score.
    assert unrelated.verdict == "pass" and unrelated.top.verification.status == DIFFERENT


def test_escalate_blocks_a_copy_the_score_misses_and_confirm_clears_a_lookalike(built_bundle, tmp_path):
    """A 50 % crop of a reference: the tiny CLIP scores it below block; its pixels say copy."""
    crop = tmp_path / "crop.png"
    centre_crop(photo("rocket"), 0.5).save(crop)
    checker = Checker(built_bundle, device="cpu")
    (plain,) = checker.check([crop])
    (verified,) = checker.check([crop], policy=Policy(verify="escalate"))
    assert plain.verdict != "block" and verified.verdict == "block"
    assert verified.top.clip_verdict == plain.top.verdict and verified.top.verification.status == COPY
    # confirm: a block whose reference was compared and found different becomes warn.
    (lookalike,) = checker.check([photo("coins")], policy=Policy(verify="confirm", warn=-1.0, block=-1.0))
    assert lookalike.top.clip_verdict == "block" and lookalike.top.verdict == "warn"
    assert any("not a copy" in w for w in lookalike.warnings)


def test_a_moved_reference_folder_is_unverified_until_reattached(built_bundle, references, tmp_path, outputs):
    import shutil

    folder, _ = outputs
    moved = tmp_path / "moved"
    shutil.copytree(references, moved)
    bundle = tmp_path / "bundle"
    shutil.copytree(built_bundle, bundle)
    data = json.loads((bundle / "manifest.json").read_text())
    data["build"]["sources"][0]["path"] = str(tmp_path / "gone")
    (bundle / "manifest.json").write_text(json.dumps(data))
    (r,) = Checker(bundle, device="cpu").check([folder / "chelsea_copy.png"], policy=Policy(verify="confirm"))
    assert r.top.verification.status == UNAVAILABLE and "--references" in r.top.verification.reason
    assert r.verdict == "block" and any("unverified" in w for w in r.warnings)  # unavailable changes nothing
    (r,) = Checker(bundle, device="cpu", references=ReferenceOptions(root=str(moved))).check(
        [folder / "chelsea_copy.png"], policy=Policy(verify="confirm"))
    assert r.top.verification.status == COPY


def test_a_reference_path_out_of_the_folder_is_not_followed(built_bundle, references):
    from provenance_guard.core.bundle import Bundle

    bundle = Bundle.open(built_bundle)
    m = Match(score=1.0, exact=True, bundle_id=bundle.id, bundle_version=bundle.version, row_id=0,
              metadata={"path": "../../../../etc/passwd"})
    ref = ReferenceResolver().resolve(bundle, m)
    assert not ref.available and "not in the bundle's image folder" in ref.reason


# fetched references -----------------------------------------------------------------------------------------------

class Origin:
    """A loopback image host: the reference, a dead link, a slow one, an oversized one, a redirect to a
    refused address, a page that is no image. Counts requests per path."""

    def __init__(self, image: bytes):
        hits = self.hits = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                hits[self.path] = hits.get(self.path, 0) + 1
                if self.path == "/rocket.png":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    self.wfile.write(image)
                elif self.path == "/slow.png":
                    self.send_response(200)
                    self.end_headers()
                    try:
                        for _ in range(60):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            threading.Event().wait(0.5)
                    except OSError:
                        pass
                elif self.path == "/huge.png":
                    self.send_response(200)
                    self.send_header("Content-Length", str(1 << 36))
                    self.end_headers()
                elif self.path == "/redirect.png":
                    self.send_response(301)
                    self.send_header("Location", "http://10.0.0.1/rocket.png")
                    self.end_headers()
                elif self.path == "/page.png":
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(b"<html>not an image</html>")
                else:
                    self.send_response(404)
                    self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture(scope="module")
def origin():
    buf = io.BytesIO()
    photo("rocket").save(buf, "PNG")
    o = Origin(buf.getvalue())
    yield o
    o.httpd.shutdown()


@pytest.fixture
def laion_bundle(tmp_path, built_bundle, origin):
    """A LAION-style bundle: the test references' vectors, rows naming URLs on the loopback host only."""
    from provenance_guard.core.bundle import Bundle, BundleWriter

    b = Bundle.open(built_bundle)
    rows = b.rows(list(range(b.count)))
    paths = ["/rocket.png" if r["path"] == "rocket.png" else f"/{p}" for r, p in
             zip(rows, ["dead.png", "slow.png", "huge.png", "redirect.png", "page.png", "x.png"], strict=True)]
    with BundleWriter(tmp_path / "laion", model=b.model, dim=b.dim, warn=b.manifest.warn, block=b.manifest.block) as w:
        w.add(b.vector(list(range(b.count))), [{"url": origin.base + p, "caption": r["caption"]}
                                                for r, p in zip(rows, paths, strict=True)])
        w.finish()
    return tmp_path / "laion", {r["path"][:-4]: origin.base + p for r, p in zip(rows, paths, strict=True)}


def test_fetched_references_verify_and_dead_links_only_leave_it_unverified(laion_bundle, origin, tmp_path):
    bundle, urls = laion_bundle
    options = ReferenceOptions(fetch=True, allow_loopback=True, cache_dir=str(tmp_path / "cache"))
    checker = Checker(bundle, device="cpu", references=options)
    policy = Policy(verify="confirm+escalate")
    (r,) = checker.check([EDITS["jpeg50"](photo("rocket"))], policy=policy)
    assert r.top.url.endswith("/rocket.png") and r.top.verification.status == COPY and r.verdict == "block"
    assert len(list((tmp_path / "cache").rglob("*"))) == 2  # one shard folder, one cached file
    checker.check([EDITS["crop10"](photo("rocket"))], policy=policy)
    assert origin.hits["/rocket.png"] == 1  # the second check read the cache
    # Every other reference is dead, slow, too big, redirected to a private address or no image: unverified,
    # never an error and never a block by itself.
    from provenance_guard.core.bundle import Bundle

    opened = Bundle.open(bundle)
    resolver = ReferenceResolver(ReferenceOptions(fetch=True, allow_loopback=True, cache_dir=str(tmp_path / "c2")))
    for url in urls.values():
        if url.endswith("/rocket.png"):
            continue
        m = Match(score=0.5, exact=True, bundle_id=opened.id, bundle_version=opened.version, row_id=0, url=url)
        ref = resolver.resolve(opened, m)
        assert not ref.available, url
        assert "could not be fetched" in ref.reason or "not a usable image" in ref.reason, (url, ref.reason)
        # what a record says: a few words, never the fetcher's internals (addresses, exception text)
        assert "resolves to" not in ref.reason and "127.0.0.1" not in ref.reason.replace(url, ""), ref.reason
        if "redirect" in url:
            assert "could not be fetched (refused address)" in ref.reason, ref.reason
    assert "10.0.0.1" not in json.dumps(origin.hits)


def test_fetching_is_off_unless_asked(laion_bundle):
    bundle, _ = laion_bundle
    (r,) = Checker(bundle, device="cpu").check([photo("rocket")], policy=Policy(verify="confirm"))
    assert r.top.verification.status == UNAVAILABLE and "--fetch-references" in r.top.verification.reason


def test_the_reference_cache_keeps_its_size_by_evicting_the_least_recently_used(tmp_path):
    import os
    import time

    from provenance_guard.core.references import ReferenceCache

    cache = ReferenceCache(tmp_path, limit=2500)
    for n in range(3):
        cache.put(f"https://x/{n}", bytes(1000))
        os.utime(cache.path(f"https://x/{n}"), (time.time() + n, time.time() + n))
    assert cache.get("https://x/0") is None and cache.get("https://x/2") is not None
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) <= 2500


# the command -----------------------------------------------------------------------------------------------------

def test_check_verify_end_to_end(built_bundle, outputs, tmp_path, capsys):
    folder, _ = outputs
    report = tmp_path / "report.html"
    assert cli(["check", str(folder / "astronaut_jpeg70.jpg"), str(folder / "camera.png"), "--index",
                str(built_bundle), "--verify", "confirm+escalate", "--json", "--report", str(report),
                "--report-all"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["matches"][0]["verification"]["status"] == COPY and lines[0]["verify"]["mode"] == "confirm+escalate"
    html = report.read_text()
    assert "pixels: copy (" in html and 'class="pg-evidence" src="data:image/jpeg;base64,' in html


def test_calibrate_writes_thresholds_the_next_check_uses(built_bundle, tmp_path, capsys):
    import shutil

    from provenance_guard.core.bundle import Bundle

    bundle = tmp_path / "refs"
    shutil.copytree(built_bundle, bundle)
    negatives = tmp_path / "negatives"
    negatives.mkdir()
    for name in ("camera", "coins", "moon", "page", "clock"):
        photo(name).save(negatives / f"{name}.png")
    before = Bundle.open(bundle).manifest
    assert cli(["index", "calibrate", str(bundle), "--negatives", str(negatives), "--sample", "6",
                "--target-fpr", "0.01", "--plot", str(tmp_path / "plot.png"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    after = Bundle.open(bundle).manifest
    assert after.bundle_version != before.bundle_version
    cal = after.build["calibration"]
    assert cal["true_pairs"] == 6 * len(EDITS) and cal["wrong_pairs"] >= 6 * len(EDITS)
    assert after.build["history"][-1]["op"] == "calibrate"
    assert f"warn >= {after.warn:.4f}, block >= {after.block:.4f}" in out and "crop50" in out and "at most" in out
    assert after.verification["min_inliers"] >= 4 and 0.5 <= after.verification["dense_ncc"] <= 0.99
    assert Image.open(tmp_path / "plot.png").size == (640, 320)
    # The next check reads the calibrated thresholds (and cut-offs) from the new manifest.
    (r,) = Checker(bundle, device="cpu").check([photo("astronaut")])
    assert (r.thresholds[0].warn, r.thresholds[0].block) == (after.warn, after.block)
    assert Bundle.open(bundle).verify_thresholds.min_inliers == after.verification["min_inliers"]


def test_calibrate_refuses_a_bundle_without_pixels_and_says_what_to_give(laion_bundle, capsys):
    bundle, _ = laion_bundle
    assert cli(["index", "calibrate", str(bundle), "--sample", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no reference pixels" in err and "--positives DIR" in err and "--references DIR" in err


def test_calibrate_from_known_copy_pairs(laion_bundle, tmp_path, capsys):
    bundle, _ = laion_bundle
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for name in ("astronaut", "coffee", "rocket"):
        photo(name).save(pairs / f"{name}.ref.png")
        EDITS["crop10"](photo(name)).save(pairs / f"{name}.gen.png")
    assert cli(["index", "calibrate", str(bundle), "--positives", str(pairs), "--target-fpr", "0.1",
                "--device", "cpu"]) == 0
    assert "positive" in capsys.readouterr().out


def _picture(uri: str):
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


def test_evidence_is_labelled_and_strict_evidence_holds_no_checked_pixels(built_bundle, outputs):
    """Strict (studio enforcement, the webuis' strict setting): the training image and its matched region
    only, never the checked image (which may be the blocked copy)."""
    folder, _ = outputs
    checker = Checker(built_bundle, device="cpu")
    (plain,) = checker.check([folder / "astronaut_jpeg70.jpg"], policy=Policy(verify="confirm"))
    (strict,) = checker.check([folder / "astronaut_jpeg70.jpg"], policy=Policy(verify="confirm", strict=True))
    both, alone = _picture(plain.top.verification.evidence), _picture(strict.top.verification.evidence)
    assert strict.verdict == plain.verdict == "block"
    assert alone.height == both.height == 216  # 200 px pictures under a 16 px label strip
    reference = photo("astronaut")
    assert abs(alone.width - round(reference.width * 200 / reference.height)) <= 1  # one picture
    assert both.width > alone.width + 100  # two pictures side by side
    generated = np.asarray(Image.open(folder / "astronaut_jpeg70.jpg").convert("RGB").resize((alone.width, 200)),
                           dtype=np.float32)
    left = np.asarray(both.crop((0, 16, alone.width, 216)), dtype=np.float32)
    assert np.corrcoef(left.ravel(), generated.ravel())[0, 1] > 0.8  # without strict: the checked image shows
    with pytest.raises(Exception, match="strict"):
        Policy(strict="yes")


def test_messages_name_the_hosts_own_option():
    """A host names its own field where the command line would name a flag."""
    options = ReferenceOptions(root_hint="Settings > Provenance Guard > \"Folder\"", fetch_hint="the node's input")
    resolver = ReferenceResolver(options)
    bundle = type("B", (), {"manifest": type("M", (), {"build": {}})()})()
    local = Match(score=0.9, exact=True, bundle_id="b", bundle_version="1", row_id=1, url="x.png",
                  metadata={"path": "x.png"})
    remote = Match(score=0.9, exact=True, bundle_id="b", bundle_version="1", row_id=2,
                   url="https://example.org/x.png")
    assert "Settings > Provenance Guard" in resolver.resolve(bundle, local).reason
    assert "--references" not in resolver.resolve(bundle, local).reason
    assert "the node's input" in resolver.resolve(bundle, remote).reason


def test_a_relative_images_folder_is_recorded_absolute(tmp_path, tiny_model, references, monkeypatch):
    """A webui reads the bundle from its own working directory: the folder must not depend on the builder's."""
    import shutil

    from provenance_guard.index_builder.images import build_from_images

    shutil.copytree(references, tmp_path / "refs")
    monkeypatch.chdir(tmp_path)
    build_from_images("refs", tmp_path / "bundle", tiny_model, progress=False)
    source = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["build"]["sources"][0]
    assert source["path"] == str((tmp_path / "refs").resolve())
    monkeypatch.chdir("/")
    (r,) = Checker(tmp_path / "bundle", device="cpu").check([tmp_path / "refs" / "astronaut.png"],
                                                            policy=Policy(verify="confirm"))
    assert r.top.verification.status == COPY


def test_calibrate_refuses_too_few_pairs_and_nan_scores_without_writing(tmp_path, tiny_model, references, capsys,
                                                                         monkeypatch):
    import shutil

    from provenance_guard.index_builder import calibrate
    from provenance_guard.index_builder.images import build_from_images

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(references / "astronaut.png", one / "astronaut.png")
    bundle = tmp_path / "bundle"
    build_from_images(one, bundle, tiny_model, progress=False)
    before = (bundle / "manifest.json").read_bytes()
    assert cli(["index", "calibrate", str(bundle), "--device", "cpu", "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "at least 3 copy pairs and 3 pairs of different images" in err and "gave" in err
    assert (bundle / "manifest.json").read_bytes() == before and not (tmp_path / "p.png").exists()

    nan = [calibrate.Pair("true", "crop", float("nan"))] * 5 + [calibrate.Pair("wrong", "other", 0.1)] * 5
    monkeypatch.setattr(calibrate, "_pairs_from_bundle", lambda *a, **k: list(nan))
    assert cli(["index", "calibrate", str(bundle), "--device", "cpu", "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "not finite" in err and "Traceback" not in err
    assert (bundle / "manifest.json").read_bytes() == before and not (tmp_path / "p.png").exists()


def test_a_folder_a_bundle_names_is_read_only_when_this_user_built_it_from_there(built_bundle, references, tmp_path,
                                                                                  outputs, monkeypatch):
    """A bundle from someone else names "/" (or any folder) as its source: nothing there is read, verified or
    shown unless this machine's user built the bundle from it, or names it."""
    import shutil

    from provenance_guard.core.references import built_here, config_dir

    folder, _ = outputs
    bundle = tmp_path / "bundle"
    shutil.copytree(built_bundle, bundle)
    assert built_here(Bundle.open(bundle), references)  # built here by the fixture: its folder is read
    (r,) = Checker(bundle, device="cpu").check([folder / "chelsea_copy.png"], policy=Policy(verify="confirm"))
    assert r.top.verification.status == COPY
    outside = tmp_path / "outside"  # what a hostile manifest points at: files named like the bundle's rows
    shutil.copytree(references, outside)
    data = json.loads((bundle / "manifest.json").read_text())
    data["build"]["sources"][0]["path"] = str(outside)
    (bundle / "manifest.json").write_text(json.dumps(data))
    (r,) = Checker(bundle, device="cpu").check([folder / "chelsea_copy.png"], policy=Policy(verify="confirm"))
    v = r.top.verification
    assert v.status == UNAVAILABLE and "not read" in v.reason and "--references" in v.reason
    assert v.evidence is None and str(outside) not in r.dumps()
    (r,) = Checker(bundle, device="cpu", references=ReferenceOptions(root=str(outside))).check(
        [folder / "chelsea_copy.png"], policy=Policy(verify="confirm"))
    assert r.top.verification.status == COPY  # named by the user: read
    # the record lives outside the bundle, in this user's config folder (a test folder here)
    assert (config_dir() / "reference-folders.json").is_file() and str(config_dir()) != str(bundle)
    monkeypatch.setenv("PROVENANCE_GUARD_CONFIG_DIR", str(tmp_path / "another-user"))
    assert not built_here(Bundle.open(built_bundle), references)  # another user's record does not count


def test_a_multi_view_query_finds_and_verifies_a_copy_inside_a_larger_image(built_bundle, tmp_path):
    """A training image inset at 40% of the output's area on an unrelated background: the whole-image query
    does not reach block, the multi-view query finds it through the view that holds it, verifies it against
    that view and blocks; an unrelated image with the same background is not blocked either way."""
    from provenance_guard.index_builder.edits import inset

    copy = inset(photo("astronaut"), 0.4)
    background = inset(photo("camera"), 0.4)
    policy = Policy(verify="confirm+escalate")
    checker = Checker(built_bundle, device="cpu")
    whole = checker.check([copy, background], policy=policy)
    multi = checker.check([copy, background], policy=Policy(verify="confirm+escalate", views="multi"))
    assert multi[0].verdict == "block" and multi[0].top.url == "astronaut.png", multi[0].top
    assert multi[0].top.view is not None and multi[0].top.verification.status == COPY
    assert multi[0].to_json()["matches"][0]["view"] == multi[0].top.view
    assert whole[1].verdict != "block" and multi[1].verdict != "block"
    with pytest.raises(Exception, match="give whole or multi"):
        Policy(views="many")


def test_mutual_ratio_matches_equal_a_full_sort_of_the_distances():
    """core.verify._mutual_matches (two passes of max over one matrix product) gives exactly the pairs a full
    sort of every distance gives: each other's nearest, both under Lowe's ratio, ties (duplicate descriptors)
    rejected, as the argpartition it replaced did."""
    from provenance_guard.core import verify as v

    def reference(a, b):
        dist = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * (a @ b.T)))

        def nearest(d):
            order = np.argsort(d, axis=1, kind="stable")[:, :2]
            two = np.take_along_axis(d, order, axis=1)
            return np.where(two[:, 0] < v.RATIO * two[:, 1], order[:, 0], -1)

        forward, backward = nearest(dist), nearest(dist.T)
        q = np.nonzero(forward >= 0)[0]
        mutual = q[backward[forward[q]] == q]
        return mutual, forward[mutual]

    rng = np.random.default_rng(3)
    for n_a, n_b in ((40, 60), (300, 200), (2, 2)):
        raw = rng.random((n_a + n_b, 128)).astype(np.float32) ** 4
        unit = np.sqrt(raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)  # RootSIFT-like rows
        a, b = unit[:n_a].copy(), unit[n_a:].copy()
        b[: n_b // 4] = a[: n_b // 4] + rng.normal(0, 0.01, (n_b // 4, 128)).astype(np.float32)  # true matches
        b[-1] = b[-2]  # a tie on b's side
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        got, want = v._mutual_matches(a, b), reference(a, b)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), (n_a, n_b)
        if n_a > 2:
            assert len(got[0]) >= n_b // 4 - 2  # the planted pairs are found

"""``index calibrate``: thresholds measured on the bundle itself instead of taken from de-duplication practice.

For a bundle with reference pixels (built from a folder of images, or re-attached with --references), a
random sample of its references goes through the copy edits of edits.py. Each edited image is embedded with
the bundle's model and searched in the bundle: its exact cosine with its own reference is a true-pair score,
the best score of any other row a wrong-pair score; each is compared on pixels with its own reference (true)
and with the best wrong match's reference (wrong). Images of --negatives DIR (known not to be copies) add
wrong pairs: their best match in the bundle. A bundle without pixels is calibrated from --positives DIR, pairs
of known copies named NAME.gen.* and NAME.ref.*, and --negatives.

Queries are made the way checks make them (``views``, core.check.view_queries): with "multi" (the default,
as a check with verification runs) each image is searched with its whole and its parts, a score is the best
any of its views gives the row, and the pair is compared on pixels with the view that gave it; with "whole"
the image alone. A multi-view query gives every wrong row more chances, so its thresholds sit higher.

Thresholds are chosen at the target false-positive rate over the wrong pairs (block at it, warn at ten times
it, at most 5 %), and so are the verifier's cut-offs. The table printed gives the true-positive rate per edit
at the chosen thresholds for the score, the pixels and both, and the false-positive rate with its count of
negatives and a 95 % upper bound. The thresholds, the cut-offs, the curve and the sample sizes go into the
manifest (a new version, with a history entry), and a PNG plot of the two score distributions beside it.
"""
from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ConfigError
from ..core.images import IMAGE_SUFFIXES, find_images
from ..core.policy import VIEWS
from .edits import EDITS


@dataclass
class Pair:
    """One scored pair: a query image against a reference."""

    kind: str              # "true" or "wrong"
    edit: str              # the edit, or "negative" / "positive" for user folders
    score: float | None  # exact cosine (None: the reference row was not found in the bundle)
    status: str = "unavailable"
    method: str = ""
    inliers: int = 0
    ncc: float | None = None
    coverage: float = 0.0
    dense_applicable: bool = False
    located: float | None = None  # dense localisation's NCC (flat references only)

    @classmethod
    def of(cls, kind: str, edit: str, score: float | None, v) -> Pair:
        if v is None:
            return cls(kind, edit, score)
        return cls(kind, edit, score, v.status, v.method, v.inliers, v.ncc, v.coverage.get("generated", 0.0),
                   v.dense_applicable, v.located)


@dataclass
class Calibration:
    bundle: Path
    version: str
    warn: float
    block: float
    verification: dict
    target_fpr: float
    true_pairs: int
    wrong_pairs: int
    fpr: float
    fpr_upper95: float
    tpr: dict[str, dict[str, float]] = field(default_factory=dict)  # edit -> {clip, pixels, combined}
    curve: list[dict[str, float]] = field(default_factory=list)
    plot: Path | None = None
    notes: list[str] = field(default_factory=list)
    views: str = "multi"

    def lines(self) -> list[str]:
        out = [f"calibrated {self.bundle} (version {self.version}) for {self.views}-view queries at a target "
               f"false-positive rate of {self.target_fpr:g}: warn >= {self.warn:.4f}, block >= {self.block:.4f}; "
               f"pixels: copy from {self.verification['min_inliers']} matched points or a correlation of "
               f"{self.verification['dense_ncc']:.3f}",
               f"{self.true_pairs} true pairs, {self.wrong_pairs} wrong pairs; false positives (combined) "
               f"{self.fpr:.4f}, at most {self.fpr_upper95:.4f} with 95 % confidence",
               f"{'edit':<16}{'score':>8}{'pixels':>8}{'both':>8}"]
        for edit, row in self.tpr.items():
            out.append(f"{edit:<16}{row['clip']:>8.3f}{row['pixels']:>8.3f}{row['combined']:>8.3f}")
        out += [f"note: {n}" for n in self.notes]
        if self.plot:
            out.append(f"plot: {self.plot}")
        return out


# Fewer pairs than these say nothing a threshold could rest on: calibrate refuses to write (a one-class
# bundle has no wrong pairs at all, and its thresholds would be -1: every image would block).
MIN_TRUE_PAIRS = 3
MIN_WRONG_PAIRS = 3


def threshold_at(wrong: list[float], fpr: float) -> float:
    """The smallest threshold at which at most fpr of the wrong scores reach it."""
    ordered = sorted(wrong, reverse=True)
    allowed = int(fpr * len(ordered))
    return ordered[allowed] + 1e-6 if allowed < len(ordered) else -1.0


def upper95(failures: int, n: int) -> float:
    """One-sided 95 % upper bound of a rate seen failures times in n (Clopper-Pearson; 3/n at zero)."""
    if n == 0:
        return 1.0
    if failures == 0:
        return 1.0 - 0.05 ** (1.0 / n)
    lo, hi = failures / n, 1.0
    for _ in range(60):  # bisection on the binomial tail P(X <= failures; p) = 0.05
        mid = (lo + hi) / 2
        tail = sum(math.comb(n, k) * mid ** k * (1 - mid) ** (n - k) for k in range(failures + 1))
        lo, hi = (mid, hi) if tail > 0.05 else (lo, mid)
    return hi


def _flagged_pixels(p: Pair, cut: dict) -> bool:
    """What verify() decides under the cut-offs: copy/partial from enough matched points, else from the dense
    comparison where it may decide, else from dense localisation (a flat reference inside a larger output)."""
    if p.status == "unavailable":
        return False
    return (p.inliers >= cut["min_inliers"] or (p.dense_applicable and p.ncc is not None and p.ncc >= cut["dense_ncc"])
            or (p.located is not None and p.located >= cut["locate_ncc"]))


class _Queries:
    """Images as a check queries them under ``views`` (core.check.view_queries): every view embedded in one
    batch, and each view's verifier features made once, when a pair first needs them."""

    def __init__(self, embedder, images: list, views: str):
        from ..core.check import view_queries
        from ..core.images import to_pixels

        self.images = images
        pixels = to_pixels(images)
        for p in pixels:
            if isinstance(p, Exception):
                raise p
        self.parts = view_queries(pixels, views)
        self.vectors = embedder.embed_pixels([v for image_views in self.parts for _, v in image_views])
        self._start = [0]
        for image_views in self.parts:
            self._start.append(self._start[-1] + len(image_views))
        self._features: dict = {}

    def search(self, bundle, k: int):
        """Each image's matches over all its views, each row at its best view's score (m.view names it)."""
        from ..core.check import fold_views
        from ..core.search import search

        return fold_views(search(bundle, self.vectors, k).matches, self.parts, k)

    def best(self, n: int, vector) -> tuple[float, str | None]:
        """The best cosine any view of image n gives a row (its unit vector), and that view's name."""
        import numpy as np

        scores = self.vectors[self._start[n]:self._start[n + 1]] @ np.asarray(vector, dtype=np.float32)
        at = int(np.argmax(scores))
        return float(scores[at]), self.parts[n][at][0]

    def features(self, n: int, view: str | None):
        """The verifier's features of image n's view (None: the whole image, as given)."""
        from PIL import Image

        from ..core.verify import generated_features

        if (n, view) not in self._features:
            part = dict(self.parts[n]).get(view) if view is not None else None
            image = self.images[n] if part is None else Image.fromarray(part.tensor.cpu().numpy())
            self._features[(n, view)] = generated_features(image)
        return self._features[(n, view)]


def _pairs_from_bundle(bundle, embedder, resolver, sample: int, rng: random.Random, thresholds,
                       views: str = "multi") -> list[Pair]:
    from ..core.result import Match
    from ..core.verify import reference_features, verify

    rows = list(range(bundle.count))
    rng.shuffle(rows)
    out, used = [], 0
    for row in rows:
        if used >= sample:
            break
        meta = bundle.rows([row])[0]
        if meta.get("removed"):
            continue
        match = Match(score=1.0, exact=True, bundle_id=bundle.id, bundle_version=bundle.version, row_id=row,
                      url=meta.get("url"), metadata=meta)
        ref = resolver.resolve(bundle, match)
        if not ref.available:
            continue
        used += 1
        ref_features = reference_features(ref.image)
        edited = {name: fn(ref.image) for name, fn in EDITS.items()}
        queries = _Queries(embedder, list(edited.values()), views)
        found = queries.search(bundle, 10)
        own = bundle.vector([row])[0]
        for n, (name, matches) in enumerate(zip(edited, found, strict=True)):
            score, view = queries.best(n, own)
            v = verify(queries.features(n, view), ref_features, thresholds, measure_all=True)
            out.append(Pair.of("true", name, score, v))
            wrong = next((m for m in matches if m.row_id != row), None)
            if wrong is None:
                continue
            wrong_ref = resolver.resolve(bundle, wrong)
            w = (verify(queries.features(n, wrong.view), reference_features(wrong_ref.image), thresholds,
                        measure_all=True) if wrong_ref.available else None)
            out.append(Pair.of("wrong", name, wrong.score, w))
    if used == 0:
        return []
    return out


def _pairs_from_folder(bundle, embedder, resolver, folder: Path, thresholds, views: str = "multi") -> list[Pair]:
    """--negatives: each image's best match in the bundle (over its views) is a wrong pair."""
    from ..core.images import open_image
    from ..core.verify import reference_features, verify

    out = []
    for path in find_images(folder):
        queries = _Queries(embedder, [open_image(path).convert("RGB")], views)
        (matches,) = queries.search(bundle, 1)
        if not matches:
            continue
        ref = resolver.resolve(bundle, matches[0])
        w = (verify(queries.features(0, matches[0].view), reference_features(ref.image), thresholds,
                    measure_all=True) if ref.available else None)
        out.append(Pair.of("wrong", "negative", matches[0].score, w))
    return out


def _pairs_from_positives(embedder, folder: Path, thresholds, views: str = "multi") -> list[Pair]:
    """--positives: NAME.gen.* and NAME.ref.* are a known copy (true pair); a gen with another ref is wrong.
    A gen's score with a ref is the best any of its views gives (the ref is stored whole, as in a bundle)."""
    from ..core.images import open_image
    from ..core.verify import reference_features, verify

    def pairs_of(kind: str) -> dict[str, Path]:
        return {p.name.split(f".{kind}.")[0]: p for p in folder.iterdir()
                if f".{kind}." in p.name and p.suffix.lower() in IMAGE_SUFFIXES}

    gens, refs = pairs_of("gen"), pairs_of("ref")
    names = sorted(set(gens) & set(refs))
    if not names:
        raise ConfigError(f"--positives {folder}: no pairs NAME.gen.png + NAME.ref.png (any of "
                          f"{', '.join(IMAGE_SUFFIXES)}) found")
    g_img = {n: open_image(gens[n]).convert("RGB") for n in names}
    r_img = {n: open_image(refs[n]).convert("RGB") for n in names}
    gens_q = _Queries(embedder, [g_img[n] for n in names], views)
    r_vec = dict(zip(names, embedder.embed([r_img[n] for n in names]), strict=True))
    r_feat = {n: reference_features(r_img[n]) for n in names}
    out = []
    for i, n in enumerate(names):
        score, view = gens_q.best(i, r_vec[n])
        v = verify(gens_q.features(i, view), r_feat[n], thresholds, measure_all=True)
        out.append(Pair.of("true", "positive", score, v))
        other = names[(i + 1) % len(names)]
        if other != n:
            score, view = gens_q.best(i, r_vec[other])
            w = verify(gens_q.features(i, view), r_feat[other], thresholds, measure_all=True)
            out.append(Pair.of("wrong", "positive", score, w))
    return out


def calibrate(bundle_path: str | Path, *, negatives: str | None = None, positives: str | None = None,
              target_fpr: float = 0.001, sample: int = 50, references: str | None = None, device: str = "auto",
              plot: str | None = None, seed: int = 0, wait: bool = True, views: str = "multi") -> Calibration:
    """Measure and write a bundle's thresholds (see the module docstring). views: the queries the checks
    that use them make, "multi" (a check's default with verification on) or "whole"."""
    from ..core.bundle import Bundle
    from ..core.embed import get_embedder
    from ..core.references import ReferenceOptions, ReferenceResolver
    from ..core.verify import VerifyThresholds, opencv_missing
    from .maintain import update_manifest

    if not 0.0 < target_fpr < 0.5:
        raise ConfigError(f"--target-fpr {target_fpr}: give a rate between 0 and 0.5, e.g. 0.001")
    if views not in VIEWS:
        raise ConfigError(f"--views {views!r}: give whole or multi (the queries the checks make)")
    missing = opencv_missing()
    if missing:
        raise ConfigError(f"calibration compares pixels: {missing}")
    bundle_path = Path(bundle_path).expanduser()
    bundle = Bundle.open(bundle_path)
    embedder = get_embedder(bundle.model, device)
    resolver = ReferenceResolver(ReferenceOptions(root=references))
    thresholds = VerifyThresholds()  # measure_all: every score is kept, to be judged under the cut-offs chosen below
    rng = random.Random(seed)
    pairs = _pairs_from_bundle(bundle, embedder, resolver, sample, rng, thresholds, views)
    if positives:
        pairs += _pairs_from_positives(embedder, Path(positives).expanduser(), thresholds, views)
    if not any(p.kind == "true" for p in pairs):
        raise ConfigError(f"bundle {bundle.id} has no reference pixels on this machine (a bundle built from "
                          f"embeddings has URLs only); give --references DIR (the folder its images were built "
                          f"from), or --positives DIR holding known copy pairs NAME.gen.png + NAME.ref.png, "
                          f"with --negatives DIR of images known not to be copies")
    if negatives:
        pairs += _pairs_from_folder(bundle, embedder, resolver, Path(negatives).expanduser(), thresholds, views)
    true = [p for p in pairs if p.kind == "true"]
    wrong = [p for p in pairs if p.kind == "wrong"]
    bad = [p for p in pairs if p.score is not None and not math.isfinite(p.score)]
    if bad:
        raise ConfigError(f"{len(bad)} of {len(pairs)} pair scores are not finite (NaN or inf): the bundle's vectors "
                          f"or the model's embeddings are broken; nothing was written. Check the bundle with "
                          f"'provenance-guard index verify' and rebuild it with its model")
    scored_true = sum(1 for p in true if p.score is not None)
    scored_wrong = sum(1 for p in wrong if p.score is not None)
    if scored_true < MIN_TRUE_PAIRS or scored_wrong < MIN_WRONG_PAIRS:
        raise ConfigError(f"calibration needs at least {MIN_TRUE_PAIRS} copy pairs and {MIN_WRONG_PAIRS} pairs of "
                          f"different images; this bundle gave {scored_true} and {scored_wrong}, so no threshold "
                          f"was written. Add references (a bundle of one image has no pairs of different images), "
                          f"--negatives DIR of images known not to be copies, or --positives DIR of copy pairs")
    notes = []
    if len(wrong) < 1.0 / target_fpr:
        notes.append(f"{len(wrong)} wrong pairs cannot resolve a rate of {target_fpr:g} (that needs "
                     f"{math.ceil(1 / target_fpr)}): the thresholds sit just above every wrong pair seen; add "
                     f"--negatives or a larger --sample for a finer estimate")
    scores = [p.score for p in wrong if p.score is not None]
    block = max(threshold_at(scores, target_fpr), -1.0)
    warn = min(block, max(threshold_at(scores, min(0.05, 10 * target_fpr)), -1.0))
    block, warn = min(1.0, block), min(1.0, warn)
    default = VerifyThresholds()
    cut = {"min_inliers": max(default.min_inliers // 2, math.ceil(threshold_at(
               [float(p.inliers) for p in wrong if p.status != "unavailable"], target_fpr))),
           "min_coverage": default.min_coverage, "min_reference_coverage": default.min_reference_coverage,
           "dense_ncc": round(min(0.99, max(0.5, threshold_at(
               [p.ncc for p in wrong if p.ncc is not None and p.dense_applicable], target_fpr))), 4),
           # never below the default, measured on far more wrong pairs than a bundle's sample gives
           "locate_ncc": round(min(0.995, max(default.locate_ncc, threshold_at(
               [p.located for p in wrong if p.located is not None], target_fpr))), 4)}

    def combined(p: Pair) -> bool:  # confirm + escalate
        px = _flagged_pixels(p, cut)
        different = p.status != "unavailable" and not px
        return px or (p.score is not None and p.score >= block and not different)

    def rate(rows, fn) -> float:
        return sum(1 for r in rows if fn(r)) / max(1, len(rows))

    tpr = {}
    for edit in dict.fromkeys(p.edit for p in true):
        rows = [p for p in true if p.edit == edit]
        tpr[edit] = {"clip": rate(rows, lambda p: p.score is not None and p.score >= block),
                     "pixels": rate(rows, lambda p: _flagged_pixels(p, cut)), "combined": rate(rows, combined)}
    tpr["all"] = {"clip": rate(true, lambda p: p.score is not None and p.score >= block),
                  "pixels": rate(true, lambda p: _flagged_pixels(p, cut)), "combined": rate(true, combined)}
    false_positives = sum(1 for p in wrong if combined(p))
    curve = []
    for i in range(21):
        t = -1.0 + 2.0 * i / 20 if scores else 0.0
        t = max(min(scores, default=-1.0), t)
        curve.append({"threshold": round(t, 4),
                      "tpr": round(rate(true, lambda p, t=t: p.score is not None and p.score >= t), 4),
                      "fpr": round(rate(wrong, lambda p, t=t: p.score is not None and p.score >= t), 4)})
    plot_path = Path(plot).expanduser() if plot else bundle_path.parent / f"{bundle_path.name}.calibration.png"
    bundle.close()

    def change(m, _folder):
        m.warn, m.block = round(warn, 6), round(block, 6)
        m.verification = dict(cut)
        m.build["calibration"] = {
            "target_fpr": target_fpr, "true_pairs": len(true), "wrong_pairs": len(wrong),
            "false_positives": false_positives, "fpr_upper95": round(upper95(false_positives, len(wrong)), 6),
            "tpr": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in tpr.items()}, "curve": curve,
            "sample": sample, "negatives": negatives, "positives": positives, "views": views,
        }
        return {"op": "calibrate", "warn": m.warn, "block": m.block, "target_fpr": target_fpr, "views": views,
                "true_pairs": len(true), "wrong_pairs": len(wrong)}

    # The plot first: a failure drawing it leaves the manifest as it was.
    draw_plot(plot_path, [p.score for p in true if p.score is not None], scores, warn, block, bundle.id)
    report = update_manifest(bundle_path, change, wait=wait)
    return Calibration(bundle_path, report.version, warn, block, cut, target_fpr, len(true), len(wrong),
                       rate(wrong, combined), upper95(false_positives, len(wrong)), tpr, curve, plot_path, notes,
                       views)


def draw_plot(path: Path, true: list[float], wrong: list[float], warn: float, block: float, title: str) -> None:
    """Histograms of true-pair (green) and wrong-pair (red) scores with the chosen thresholds (PNG)."""
    from PIL import Image, ImageDraw

    from ..core.record import atomic_write

    width, height, margin = 640, 320, 40
    lo = min(true + wrong + [warn, block])
    hi = 1.0
    lo = max(-1.0, lo - 0.05 * (hi - lo + 1e-6))
    bins = 50

    def counts(values):
        out = [0] * bins
        for v in values:
            out[min(bins - 1, max(0, int((v - lo) / (hi - lo + 1e-12) * bins)))] += 1
        return out

    ct, cw = counts(true), counts(wrong)
    top = max(ct + cw + [1])
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    plot_w, plot_h = width - 2 * margin, height - 2 * margin
    bar = plot_w / bins
    for n, (a, b) in enumerate(zip(ct, cw, strict=True)):
        x = margin + n * bar
        for count, colour, shift in ((b, (211, 47, 47), 0), (a, (46, 125, 50), bar / 2)):
            h = plot_h * count / top
            draw.rectangle((x + shift, margin + plot_h - h, x + shift + bar / 2 - 1, margin + plot_h), fill=colour)
    for value, colour, label in ((warn, (239, 108, 0), "warn"), (block, (0, 0, 0), "block")):
        x = margin + (value - lo) / (hi - lo + 1e-12) * plot_w
        draw.line((x, margin, x, margin + plot_h), fill=colour, width=2)
        text = f"{label} {value:.3f}"
        tx = x + 3 if x + 80 < width else x - 3 - draw.textlength(text)
        draw.text((tx, margin + 2 + (12 if label == "warn" else 0)), text, fill=colour)
    draw.line((margin, margin + plot_h, margin + plot_w, margin + plot_h), fill=(0, 0, 0))
    draw.text((margin, margin + plot_h + 6), f"{lo:.3f}", fill=(0, 0, 0))
    draw.text((margin + plot_w - 20, margin + plot_h + 6), "1.00", fill=(0, 0, 0))
    draw.text((margin, 10), f"{title}: exact cosine of true pairs (green, {len(true)}) and wrong pairs "
                            f"(red, {len(wrong)})", fill=(0, 0, 0))
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())


def print_report(report: Calibration) -> None:
    for line in report.lines():
        print(line, file=sys.stdout)

"""``index calibrate``: thresholds measured on the bundle itself instead of taken from de-duplication practice.

For a bundle with reference pixels (built from a folder of images, or re-attached with --references), a
random sample of its references goes through the copy edits of edits.py. Each edited image is embedded with
the bundle's model and searched in the bundle: its exact cosine with its own reference is a true-pair score,
the best score of any other row a wrong-pair score; each is compared on pixels with its own reference (true)
and with the best wrong match's reference (wrong). Images of --negatives DIR (known not to be copies) add
wrong pairs: their best match in the bundle. A bundle without pixels is calibrated from --positives DIR, pairs
of known copies named NAME.gen.* and NAME.ref.*, and --negatives.

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
from typing import Optional, Union

from ..core.errors import ConfigError
from ..core.images import IMAGE_SUFFIXES, find_images
from .edits import EDITS


@dataclass
class Pair:
    """One scored pair: a query image against a reference."""

    kind: str              # "true" or "wrong"
    edit: str              # the edit, or "negative" / "positive" for user folders
    score: Optional[float]  # exact cosine (None: the reference row was not found in the bundle)
    status: str = "unavailable"
    method: str = ""
    inliers: int = 0
    ncc: Optional[float] = None
    coverage: float = 0.0
    dense_applicable: bool = False

    @classmethod
    def of(cls, kind: str, edit: str, score: Optional[float], v) -> "Pair":
        if v is None:
            return cls(kind, edit, score)
        return cls(kind, edit, score, v.status, v.method, v.inliers, v.ncc, v.coverage.get("generated", 0.0),
                   v.dense_applicable)


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
    plot: Optional[Path] = None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"calibrated {self.bundle} (version {self.version}) at a target false-positive rate of "
               f"{self.target_fpr:g}: warn >= {self.warn:.4f}, block >= {self.block:.4f}; pixels: copy from "
               f"{self.verification['min_inliers']} matched points or a correlation of "
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
    comparison where it may decide."""
    if p.status == "unavailable":
        return False
    return p.inliers >= cut["min_inliers"] or (p.dense_applicable and p.ncc is not None and p.ncc >= cut["dense_ncc"])


def _pairs_from_bundle(bundle, embedder, resolver, sample: int, rng: random.Random, thresholds) -> list[Pair]:
    import numpy as np

    from ..core.result import Match
    from ..core.search import search
    from ..core.verify import generated_features, reference_features, verify

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
        vectors = embedder.embed(list(edited.values()))
        found = search(bundle, vectors, 10).matches
        own = bundle.vector([row])[0]
        for (name, image), vector, matches in zip(edited.items(), vectors, found):
            gen = generated_features(image)
            v = verify(gen, ref_features, thresholds, measure_all=True)
            out.append(Pair.of("true", name, float(np.dot(vector, own)), v))
            wrong = next((m for m in matches if m.row_id != row), None)
            if wrong is None:
                continue
            wrong_ref = resolver.resolve(bundle, wrong)
            w = (verify(gen, reference_features(wrong_ref.image), thresholds, measure_all=True)
                 if wrong_ref.available else None)
            out.append(Pair.of("wrong", name, wrong.score, w))
    if used == 0:
        return []
    return out


def _pairs_from_folder(bundle, embedder, resolver, folder: Path, thresholds) -> list[Pair]:
    """--negatives: each image's best match in the bundle is a wrong pair."""
    from ..core.images import open_image
    from ..core.search import search
    from ..core.verify import generated_features, reference_features, verify

    out = []
    for path in find_images(folder):
        image = open_image(path).convert("RGB")
        (matches,) = search(bundle, embedder.embed([image]), 1).matches
        if not matches:
            continue
        ref = resolver.resolve(bundle, matches[0])
        w = (verify(generated_features(image), reference_features(ref.image), thresholds, measure_all=True)
             if ref.available else None)
        out.append(Pair.of("wrong", "negative", matches[0].score, w))
    return out


def _pairs_from_positives(embedder, folder: Path, thresholds) -> list[Pair]:
    """--positives: NAME.gen.* and NAME.ref.* are a known copy (true pair); a gen with another ref is wrong."""
    import numpy as np

    from ..core.images import open_image
    from ..core.verify import generated_features, reference_features, verify

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
    g_vec = dict(zip(names, embedder.embed([g_img[n] for n in names])))
    r_vec = dict(zip(names, embedder.embed([r_img[n] for n in names])))
    r_feat = {n: reference_features(r_img[n]) for n in names}
    out = []
    for i, n in enumerate(names):
        gen = generated_features(g_img[n])
        v = verify(gen, r_feat[n], thresholds, measure_all=True)
        out.append(Pair.of("true", "positive", float(np.dot(g_vec[n], r_vec[n])), v))
        other = names[(i + 1) % len(names)]
        if other != n:
            w = verify(gen, r_feat[other], thresholds, measure_all=True)
            out.append(Pair.of("wrong", "positive", float(np.dot(g_vec[n], r_vec[other])), w))
    return out


def calibrate(bundle_path: Union[str, Path], *, negatives: Optional[str] = None, positives: Optional[str] = None,
              target_fpr: float = 0.001, sample: int = 50, references: Optional[str] = None, device: str = "auto",
              plot: Optional[str] = None, seed: int = 0, wait: bool = True) -> Calibration:
    from ..core.bundle import Bundle
    from ..core.embed import get_embedder
    from ..core.references import ReferenceOptions, ReferenceResolver
    from ..core.verify import VerifyThresholds, opencv_missing
    from .maintain import update_manifest

    if not 0.0 < target_fpr < 0.5:
        raise ConfigError(f"--target-fpr {target_fpr}: give a rate between 0 and 0.5, e.g. 0.001")
    missing = opencv_missing()
    if missing:
        raise ConfigError(f"calibration compares pixels: {missing}")
    bundle_path = Path(bundle_path).expanduser()
    bundle = Bundle.open(bundle_path)
    embedder = get_embedder(bundle.model, device)
    resolver = ReferenceResolver(ReferenceOptions(root=references))
    thresholds = VerifyThresholds()  # measure_all: every score is kept, to be judged under the cut-offs chosen below
    rng = random.Random(seed)
    pairs = _pairs_from_bundle(bundle, embedder, resolver, sample, rng, thresholds)
    if positives:
        pairs += _pairs_from_positives(embedder, Path(positives).expanduser(), thresholds)
    if not any(p.kind == "true" for p in pairs):
        raise ConfigError(f"bundle {bundle.id} has no reference pixels on this machine (a bundle built from "
                          f"embeddings has URLs only); give --references DIR (the folder its images were built "
                          f"from), or --positives DIR holding known copy pairs NAME.gen.png + NAME.ref.png, "
                          f"with --negatives DIR of images known not to be copies")
    if negatives:
        pairs += _pairs_from_folder(bundle, embedder, resolver, Path(negatives).expanduser(), thresholds)
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
               [p.ncc for p in wrong if p.ncc is not None and p.dense_applicable], target_fpr))), 4)}

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
                      "tpr": round(rate(true, lambda p: p.score is not None and p.score >= t), 4),
                      "fpr": round(rate(wrong, lambda p: p.score is not None and p.score >= t), 4)})
    plot_path = Path(plot).expanduser() if plot else bundle_path.parent / f"{bundle_path.name}.calibration.png"
    bundle.close()

    def change(m, _folder):
        m.warn, m.block = round(warn, 6), round(block, 6)
        m.verification = dict(cut)
        m.build["calibration"] = {
            "target_fpr": target_fpr, "true_pairs": len(true), "wrong_pairs": len(wrong),
            "false_positives": false_positives, "fpr_upper95": round(upper95(false_positives, len(wrong)), 6),
            "tpr": {k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in tpr.items()}, "curve": curve,
            "sample": sample, "negatives": negatives, "positives": positives,
        }
        return {"op": "calibrate", "warn": m.warn, "block": m.block, "target_fpr": target_fpr,
                "true_pairs": len(true), "wrong_pairs": len(wrong)}

    # The plot first: a failure drawing it leaves the manifest as it was.
    draw_plot(plot_path, [p.score for p in true if p.score is not None], scores, warn, block, bundle.id)
    report = update_manifest(bundle_path, change, wait=wait)
    return Calibration(bundle_path, report.version, warn, block, cut, target_fpr, len(true), len(wrong),
                       rate(wrong, combined), upper95(false_positives, len(wrong)), tpr, curve, plot_path, notes)


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
    for n, (a, b) in enumerate(zip(ct, cw)):
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

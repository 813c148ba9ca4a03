"""Stage 4b, verify: is a candidate really a copy? The generated image is compared with the training image
itself, on pixels, with no learned weights.

Three verifiers behind one call (``verify(generated, reference)``), chosen by what the images allow:
- local features (``method: "sift"``): RootSIFT keypoints on both images (longer side at most 512 px, and
  256 px for blurred or small ones), Lowe's ratio test, one-to-one (mutual) matches, and RANSAC for a
  similarity transform, tried on the image and on its mirror. Crops, padding, scaling, rotation, flips,
  brightness, grayscale, JPEG and text overlays keep dozens to hundreds of consistent matches; two different
  photos rarely keep more than 4 (measured: bench/q1_detection.py). Where both keep too few and the
  reference's shape differs from the output's, the reference stretched to the output's shape is tried too (a
  tile of a grid: a tall page squeezed into a square cell).
- dense (``method: "dense"``), where keypoints are too few to decide (flat or smooth images: a colour wheel
  has none) or the generated image is blurred: both images at 64 x 64 gray, the reference under a small
  search of centre crops (0, 10, 25, 50 %), mirror, rotation (-10, 0, 10 degrees) and keystone (an edge
  pulled in or pushed out: a print photographed at an angle), and, for a blurred output only, the reference
  blurred as much; the generated image as it is, with uniform borders (padding) removed and inside its
  borders (a blurred fill too, core.verify.content_box); the normalised cross-correlation (NCC) of the best
  alignment over the whole image and its large sub-regions (a caption bar covers part of an image), and
  Carlini et al.'s tiled L2 (the largest RMS difference over 4 x 4 tiles, on [0, 1]) at that alignment.
- dense localisation (``method: "locate"``), for a reference too flat for keypoints that the two above did
  not find: the reference scaled down as a whole and slid over the output (OpenCV's matchTemplate, NCC, at
  many sizes, in its own shape and stretched to the output's, then refined in width and height), so an inset,
  a letterboxed copy or a tile of a collage is found; a copy at ``locate_ncc``.

The outcome, ``Verification``: status ``copy`` (enough consistent matches covering a good share of the
generated image, or a dense match), ``partial`` (consistent matches over a small part of it), ``different``,
or ``unavailable`` (no reference pixels, or OpenCV missing). Thresholds are ``VerifyThresholds`` (defaults
measured on scikit-image photos; ``provenance-guard index calibrate`` writes a bundle's own). Features of
references are cached per process (``ReferenceFeatures``), so a reference is analysed once.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from PIL import Image

COPY, PARTIAL, DIFFERENT, UNAVAILABLE = "copy", "partial", "different", "unavailable"
SIDE = 512            # longer side for keypoints
SMALL_SIDE = 256      # second pass: blur at full size is detail lost at this size
DENSE = 64            # dense comparison size
FEW_KEYPOINTS = 64    # below this on either image, local features cannot decide alone
MAX_FEATURES = 1500
RATIO = 0.8
RANSAC_PX = 8.0
# NCC regions of the 64 x 64 views: whole, top/bottom/left/right two thirds, centre (free of rotation corners).
_REGIONS = ((0, 64, 0, 64), (0, 43, 0, 64), (21, 64, 0, 64), (0, 64, 0, 43), (0, 64, 21, 64), (12, 52, 12, 52))
_CROPS = (0.0, 0.1, 0.25, 0.5)
_ANGLES = (-10.0, 0.0, 10.0)
_KEYSTONES = (0.1, -0.1, 0.2, -0.2)  # share of an edge's length each of its corners moves along it
_BLURS = (1.0, 2.0)  # Gaussian sigmas, in pixels of the 64 x 64 view
# Dense localisation of a flat reference inside a larger output: the output at LOCATE_SIDE, the reference
# resized from LOCATE_REF to every size from LOCATE_MAX down to LOCATE_MIN of the output's side (steps of
# LOCATE_STEP; in its own shape, and stretched to the output's: a tile of a grid), then refined in width and
# height by LOCATE_REFINE around the best place.
STRETCH_MIN = 1.25  # a reference whose shape differs this much from the output's is also tried stretched to it
LOCATE_SIDE = 192
LOCATE_REF = 384
LOCATE_MAX, LOCATE_MIN, LOCATE_STEP = 0.92, 0.22, 1.08
LOCATE_REFINE = (0.94, 0.97, 1.0, 1.03, 1.06)


@dataclass(frozen=True)
class VerifyThresholds:
    """Cut-offs of the verifiers. min_inliers: the smallest number of geometrically consistent matches that
    makes a copy (two different photos keep at most 4 of the scikit-image set); min_coverage: the share of
    the generated image's content (its area inside uniform or featureless borders) those matches must span
    for ``copy`` rather than ``partial``; min_reference_coverage: the share of the reference they may span
    instead (the reference found whole inside a larger output is a copy); dense_ncc: the correlation at
    which a dense match is a copy; locate_ncc: the correlation at which a reference too flat for keypoints,
    found by dense localisation inside a larger output, is a copy."""

    min_inliers: int = 8
    min_coverage: float = 0.3
    dense_ncc: float = 0.92
    min_reference_coverage: float = 0.5
    locate_ncc: float = 0.97

    @classmethod
    def from_json(cls, data: dict | None) -> VerifyThresholds:
        data = data or {}
        default = cls()
        return cls(min_inliers=int(data.get("min_inliers", default.min_inliers)),
                   min_coverage=float(data.get("min_coverage", default.min_coverage)),
                   dense_ncc=float(data.get("dense_ncc", default.dense_ncc)),
                   min_reference_coverage=float(data.get("min_reference_coverage",
                                                         default.min_reference_coverage)),
                   locate_ncc=float(data.get("locate_ncc", default.locate_ncc)))

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Verification:
    """The pixel comparison of a generated image with one reference. coverage: share of each image's area
    spanned by the matched region (0..1); transform: 2x3 matrix mapping generated-image pixels onto the
    reference's (mirrored first when ``mirrored``); tiled_l2 and ncc: the dense scores at the
    best alignment; located: the NCC of dense localisation (a flat reference searched inside the output)."""

    status: str
    method: str = ""
    inliers: int = 0
    inlier_ratio: float = 0.0
    coverage: dict[str, float] = field(default_factory=dict)
    transform: list[list[float]] | None = None
    mirrored: bool = False
    tiled_l2: float | None = None
    ncc: float | None = None
    ms: float = 0.0
    reason: str = ""
    reference: str | None = None  # where the reference pixels came from (a path or a URL)
    region: list[list[float]] | None = None  # the generated image's outline on the reference (x, y pairs)
    lines: list[list[float]] = field(default_factory=list)  # inlier pairs: gx, gy, rx, ry
    evidence: str | None = None  # side-by-side picture (JPEG data URI) for people; not part of the record
    dense_applicable: bool = False  # whether the dense comparison may decide (few keypoints, or blur)
    located: float | None = None  # the NCC of the reference localised inside the output (flat references)

    def to_json(self) -> dict[str, Any]:
        out = {"status": self.status, "method": self.method or None, "inliers": self.inliers,
               "inlier_ratio": round(self.inlier_ratio, 4),
               "coverage": {k: round(v, 4) for k, v in self.coverage.items()},
               "transform": [[round(x, 5) for x in row] for row in self.transform] if self.transform else None,
               "mirrored": self.mirrored, "tiled_l2": None if self.tiled_l2 is None else round(self.tiled_l2, 4),
               "ncc": None if self.ncc is None else round(self.ncc, 4), "ms": round(self.ms, 2)}
        if self.reason:
            out["reason"] = self.reason
        if self.reference:
            out["reference"] = self.reference
        if self.located is not None:
            out["located"] = round(self.located, 4)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Verification:
        return cls(status=data.get("status", UNAVAILABLE), method=data.get("method") or "",
                   inliers=int(data.get("inliers") or 0), inlier_ratio=float(data.get("inlier_ratio") or 0.0),
                   coverage=dict(data.get("coverage") or {}), transform=data.get("transform"),
                   mirrored=bool(data.get("mirrored")), tiled_l2=data.get("tiled_l2"), ncc=data.get("ncc"),
                   ms=float(data.get("ms") or 0.0), reason=data.get("reason", ""), reference=data.get("reference"),
                   located=data.get("located"))


def unavailable(reason: str, reference: str | None = None) -> Verification:
    return Verification(status=UNAVAILABLE, reason=reason, reference=reference)


def opencv_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("cv2") is None:
        return "OpenCV is not installed (pip install opencv-python-headless), so pixels cannot be compared"
    return None


# features ------------------------------------------------------------------------------------------------------

@dataclass
class _Keypoints:
    points: np.ndarray          # N x 2, in full-image pixel coordinates
    descriptors: np.ndarray | None

    def __len__(self) -> int:
        return 0 if self.descriptors is None else len(self.descriptors)


@dataclass
class Features:
    """What the verifiers need of one image, computed once: its size, RootSIFT keypoints at two scales (and
    of its mirror, for generated images) and its 64 x 64 dense views."""

    width: int
    height: int
    sift: _Keypoints
    sift_small: _Keypoints
    mirror: _Keypoints | None = None
    mirror_small: _Keypoints | None = None
    dense: Any = None          # generated: list of view stacks; reference: one stack per alignment
    alignments: list = field(default_factory=list)  # reference: (crop, mirrored, angle) per stack
    content: tuple | None = None  # generated: (x0, y0, x1, y1) inside its borders (content_box)
    locate: Any = None  # gray at LOCATE_SIDE (generated, float32) or LOCATE_REF (reference, uint8): localisation
    stretched: dict = field(default_factory=dict)  # reference: aspect -> its keypoints stretched to it (_stretched)


_LOCAL = threading.local()


def _sift():
    import cv2

    detector = getattr(_LOCAL, "sift", None)
    if detector is None:  # cv2 detectors are not to be shared between threads
        detector = _LOCAL.sift = cv2.SIFT_create(nfeatures=MAX_FEATURES)
    return detector


def _gray(image: Image.Image) -> np.ndarray:
    import numpy as np

    return np.ascontiguousarray(np.asarray(image.convert("L")))


def _keypoints(gray: np.ndarray, side: int) -> _Keypoints:
    import cv2
    import numpy as np

    scale = min(1.0, side / max(gray.shape))
    small = gray if scale >= 1.0 else cv2.resize(gray, (max(1, round(gray.shape[1] * scale)),
                                                        max(1, round(gray.shape[0] * scale))),
                                                 interpolation=cv2.INTER_AREA)
    kps, des = _sift().detectAndCompute(small, None)
    if des is None or not len(kps):
        return _Keypoints(np.zeros((0, 2), np.float32), None)
    des = np.sqrt(des / (des.sum(axis=1, keepdims=True) + 1e-7)).astype(np.float32)  # RootSIFT
    points = np.array([k.pt for k in kps], dtype=np.float32) / scale
    return _Keypoints(points, des)


def _normalised(a: np.ndarray) -> np.ndarray:
    import numpy as np

    a = a.astype(np.float32)
    a = a - a.mean()
    n = float(np.linalg.norm(a))
    return a / n if n > 1e-6 else np.zeros_like(a)


def _views(gray: np.ndarray) -> np.ndarray:
    """The normalised regions of a 64 x 64 view, one row each (zero rows for flat regions)."""
    import cv2
    import numpy as np

    return _regions(cv2.resize(gray, (DENSE, DENSE), interpolation=cv2.INTER_AREA).astype(np.float32))


def _regions(small: np.ndarray):
    """(rows, small): the normalised _REGIONS of a 64 x 64 view, one row each, and the view."""
    import numpy as np

    rows = [_normalised(small[a:b, c:d]).ravel() for a, b, c, d in _REGIONS]
    width = max(len(r) for r in rows)
    return np.stack([np.pad(r, (0, width - len(r))) for r in rows]), small


def _unpadded(gray: np.ndarray) -> np.ndarray:
    """gray without uniform borders (padding in any flat colour)."""
    h, w = gray.shape
    top, bottom, left, right = 0, h, 0, w

    def flat(v) -> bool:
        return float(v.std()) < 3.0

    while top < bottom - 8 and flat(gray[top, left:right]):
        top += 1
    while bottom - 1 > top + 8 and flat(gray[bottom - 1, left:right]):
        bottom -= 1
    while left < right - 8 and flat(gray[top:bottom, left]):
        left += 1
    while right - 1 > left + 8 and flat(gray[top:bottom, right - 1]):
        right -= 1
    return gray[top:bottom, left:right]


BORDER_MAX = 0.45  # no side's border is taken beyond this share of the image
FLAT_STD = 3.0  # a uniform line: grey levels vary less than this
FILL_GRADIENT = 0.6  # a featureless fill (a blurred stretch of the image): mean step between neighbours
FILL_STD = 40.0


def content_box(gray: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of gray inside its borders: on each side, the run of lines that are uniform (padding
    in any colour) or featureless (a blurred fill: neighbouring pixels all but equal), up to BORDER_MAX of
    the image. A dark or plain region with any texture (noise, grain, edges) is content."""
    import numpy as np

    h, w = gray.shape
    g = gray.astype(np.float32)

    def border(lines: np.ndarray) -> np.ndarray:
        """Per line (rows of ``lines``): whether it is border."""
        std = lines.std(axis=1)
        along = np.abs(np.diff(lines, axis=1)).mean(axis=1) if lines.shape[1] > 1 else np.zeros(len(lines))
        return (std < FLAT_STD) | ((along < FILL_GRADIENT) & (std < FILL_STD))

    def run(flags: np.ndarray, across: np.ndarray, limit: int) -> int:
        n = 0
        while n < limit and flags[n] and (n == 0 or across[n - 1] < FILL_GRADIENT * 4):
            n += 1
        return n if n >= max(2, limit // 45) else 0  # a line or two of edge noise is no border

    rows, cols = border(g), border(g.T)
    row_steps = np.abs(np.diff(g, axis=0)).mean(axis=1)  # between line n and n+1
    col_steps = np.abs(np.diff(g, axis=1)).mean(axis=0)
    lim_h, lim_w = int(h * BORDER_MAX), int(w * BORDER_MAX)
    top = run(rows, row_steps, lim_h)
    bottom = run(rows[::-1], row_steps[::-1], lim_h)
    left = run(cols, col_steps, lim_w)
    right = run(cols[::-1], col_steps[::-1], lim_w)
    return left, top, w - right, h - bottom


def _resized(gray: np.ndarray, side: int) -> np.ndarray:
    """gray (float32) with its longer side at most ``side`` pixels."""
    import cv2
    import numpy as np

    scale = min(1.0, side / max(gray.shape))
    if scale >= 1.0:
        return gray.astype(np.float32)
    return cv2.resize(gray, (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale))),
                      interpolation=cv2.INTER_AREA).astype(np.float32)


def generated_features(image: Image.Image) -> Features:
    import numpy as np

    gray = _gray(image)
    mirror = gray[:, ::-1].copy()
    box = content_box(gray)
    views = [_views(gray), _views(_unpadded(gray))]
    inner = gray[box[1]:box[3], box[0]:box[2]]
    if inner.shape != gray.shape and min(inner.shape) >= 16:  # a blurred fill is a border too
        views.append(_views(np.ascontiguousarray(inner)))
    return Features(gray.shape[1], gray.shape[0], _keypoints(gray, SIDE), _keypoints(gray, SMALL_SIDE),
                    _keypoints(mirror, SIDE), _keypoints(mirror, SMALL_SIDE), dense=views, content=box,
                    locate=_resized(gray, LOCATE_SIDE))


def reference_features(image: Image.Image) -> Features:
    import cv2
    import numpy as np

    gray = _gray(image)
    h, w = gray.shape
    stacks, alignments = [], []
    for crop in _CROPS:
        dy, dx = int(h * crop / 2), int(w * crop / 2)
        part = np.ascontiguousarray(gray[dy:h - dy, dx:w - dx])
        for mirrored in (False, True):
            base = np.ascontiguousarray(part[:, ::-1]) if mirrored else part
            for angle in _ANGLES:
                if angle:
                    m = cv2.getRotationMatrix2D((base.shape[1] / 2, base.shape[0] / 2), angle, 1.0)
                    view = cv2.warpAffine(base, m, (base.shape[1], base.shape[0]), flags=cv2.INTER_LINEAR,
                                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
                else:
                    view = base
                stacks.append(_views(view))
                alignments.append((crop, mirrored, angle, None))
    # A print photographed at an angle: each edge pulled in or pushed out (keystone), corners filled black.
    small = _resized(gray, 256)
    sh, sw = small.shape
    corners = np.float32([[0, 0], [sw, 0], [sw, sh], [0, sh]])
    for edge, (a, b) in {"top": (0, 1), "right": (1, 2), "bottom": (2, 3), "left": (3, 0)}.items():
        for amount in _KEYSTONES:
            moved = corners.copy()
            for corner, other in ((a, b), (b, a)):
                moved[corner] += (corners[other] - corners[corner]) * amount
            m = cv2.getPerspectiveTransform(corners, moved)
            view = cv2.warpPerspective(small, m, (sw, sh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                       borderValue=0)
            stacks.append(_views(view))
            alignments.append((0.0, False, 0.0, f"{edge} edge {'pulled in' if amount > 0 else 'pushed out'} "
                                                f"{abs(amount):.0%}"))
    # A blurred output: the whole reference blurred as much (compared only with outputs found blurred).
    base = stacks[alignments.index((0.0, False, 0.0, None))][1]
    for sigma in _BLURS:
        stacks.append(_regions(cv2.GaussianBlur(base, (0, 0), sigma)))
        alignments.append((0.0, False, 0.0, f"blurred (sigma {sigma:g} at {DENSE} px)"))
    return Features(w, h, _keypoints(gray, SIDE), _keypoints(gray, SMALL_SIDE), dense=stacks,
                    alignments=alignments, locate=_resized(gray, LOCATE_REF).round().astype(np.uint8))


class ReferenceFeatures:
    """Reference features cached per process (least recently used first out), keyed by where the pixels came
    from and their digest, so a reference compared with many generated images is analysed once."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._cache: OrderedDict[str, Features] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, image: Image.Image) -> Features:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        features = reference_features(image)
        with self._lock:
            self._cache[key] = features
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return features


REFERENCE_FEATURES = ReferenceFeatures()


# comparing -------------------------------------------------------------------------------------------------------

def _nearest(sims: np.ndarray, axis: int) -> np.ndarray:
    """For each row (axis 1) or column (axis 0) of a matrix of dot products between unit descriptors: the index
    of its nearest descriptor on the other side when it passes Lowe's ratio test (distance below RATIO times
    the second nearest's), else -1. Unit vectors' distances are sqrt(2 - 2 dot): the nearest and the second
    nearest are the largest and second-largest dot products, found with two passes of max (no sort)."""
    import numpy as np

    nearest = sims.argmax(axis=axis)
    lines = np.arange(len(nearest))
    at = (lines, nearest) if axis == 1 else (nearest, lines)
    first = sims[at]
    rest = sims.copy()
    rest[at] = -np.inf
    second = rest.max(axis=axis)
    d1 = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * first))
    d2 = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * second))
    return np.where(d1 < RATIO * d2, nearest, -1)


def _mutual_matches(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The one-to-one ratio-test matches between two sets of unit descriptors (rows, at least 2 each): the
    indices into a, and their partners in b, of the pairs that are each other's nearest, both passing the
    ratio test. One matrix product serves both directions."""
    import numpy as np

    sims = a @ b.T
    forward, backward = _nearest(sims, 1), _nearest(sims, 0)
    q = np.nonzero(forward >= 0)[0]
    mutual = q[backward[forward[q]] == q]
    return mutual, forward[mutual]


def _match(a: _Keypoints, b: _Keypoints):
    """(inliers, matches, 2x3 transform a->b, inlier points of a, of b) of a RANSAC similarity fit over the
    mutual ratio-test matches."""
    import cv2
    import numpy as np

    if len(a) < 4 or len(b) < 4:
        return 0, 0, None, None, None
    mutual, partner = _mutual_matches(a.descriptors, b.descriptors)
    if len(mutual) < 4:
        return 0, len(mutual), None, None, None
    src = a.points[mutual]
    dst = b.points[partner]
    pairs = mutual
    matrix, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX)
    if matrix is None or mask is None:
        return 0, len(pairs), None, None, None
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if not 0.05 < scale < 20.0:
        return 0, len(pairs), None, None, None
    keep = mask.ravel().astype(bool)
    return int(keep.sum()), len(pairs), matrix, src[keep], dst[keep]


def _coverage(points: np.ndarray, width: int, height: int, box: tuple | None = None) -> float:
    """The share of the image (of ``box`` inside it, when given: its content) that the points' bounding box
    spans."""
    if points is None or len(points) < 3:
        return 0.0
    x0, y0, x1, y1 = box or (0, 0, width, height)
    lo, hi = points.min(axis=0), points.max(axis=0)
    w = max(0.0, min(hi[0], x1) - max(lo[0], x0))
    h = max(0.0, min(hi[1], y1) - max(lo[1], y0))
    return float(min(1.0, w * h / max(1, (x1 - x0) * (y1 - y0))))


def _tiled_l2(a: np.ndarray, b: np.ndarray) -> float:
    """Carlini et al.'s tiled L2: the largest RMS difference over 4 x 4 tiles of two 64 x 64 gray views on
    [0, 1] (after matching their mean and contrast, which brightness edits change)."""
    import numpy as np

    a = (a - a.mean()) / (a.std() + 1e-6) * 0.25
    b = (b - b.mean()) / (b.std() + 1e-6) * 0.25
    worst = 0.0
    step = DENSE // 4
    for y in range(0, DENSE, step):
        for x in range(0, DENSE, step):
            worst = max(worst, float(np.sqrt(np.mean((a[y:y + step, x:x + step] - b[y:y + step, x:x + step]) ** 2))))
    return worst


def _dense(gen: Features, ref: Features, blurred: bool = True):
    """(best NCC, its alignment, tiled L2 there). blurred: whether the generated image is, so the reference's
    blurred alignments may be compared."""
    import numpy as np

    best, where, pair = -1.0, None, None
    for view, small in gen.dense:
        for (stack, ref_small), alignment in zip(ref.dense, ref.alignments, strict=True):
            if not blurred and alignment[3] and alignment[3].startswith("blurred"):
                continue
            score = float(np.max(np.einsum("rk,rk->r", view, stack)))
            if score > best:
                best, where, pair = score, alignment, (small, ref_small)
    return best, where, (_tiled_l2(pair[0] / 255.0, pair[1] / 255.0) if pair else None)


def _stretched(ref: Features, aspect: float):
    """(keypoints, fx, fy) of the reference stretched to ``aspect`` (width / height: the output's shape, as a
    reference resized into a tile of a grid is), fx and fy its pixels per reference pixel; None where the
    reference has that shape already (within STRETCH_MIN) or holds no pixels. Cached on the reference."""
    import cv2

    own = ref.width / ref.height
    if ref.locate is None or max(aspect / own, own / aspect) < STRETCH_MIN:
        return None
    key = round(aspect, 2)
    hit = ref.stretched.get(key)
    if hit is None:
        side = max(ref.locate.shape)
        size = (side, max(1, round(side / aspect))) if aspect >= 1 else (max(1, round(side * aspect)), side)
        image = cv2.resize(ref.locate, size, interpolation=cv2.INTER_AREA)
        hit = (_keypoints(image, SIDE), size[0] / ref.width, size[1] / ref.height)
        if len(ref.stretched) < 8:
            ref.stretched[key] = hit
    return hit


def _template_match(image: np.ndarray, reference: np.ndarray, width: int, height: int,
                    window: tuple[int, int, int, int] | None = None) -> tuple[float, int, int]:
    """(best NCC, x, y) of ``reference`` resized to width x height slid over ``image`` (or its ``window``:
    x0, y0, x1, y1); NCC -1 where it does not fit or the resized reference is flat."""
    import cv2

    x0, y0, x1, y1 = window or (0, 0, image.shape[1], image.shape[0])
    if width < 12 or height < 12 or width > x1 - x0 or height > y1 - y0:
        return -1.0, 0, 0
    template = cv2.resize(reference, (width, height), interpolation=cv2.INTER_AREA).astype(image.dtype)
    if float(template.std()) < 2.0:
        return -1.0, 0, 0
    scores = cv2.matchTemplate(image[y0:y1, x0:x1], template, cv2.TM_CCOEFF_NORMED)
    _, best, _, (x, y) = cv2.minMaxLoc(scores)
    return float(best), x0 + x, y0 + y


def locate(gen: Features, ref: Features) -> tuple[float, tuple[int, int, int, int] | None]:
    """Dense localisation: where the reference, scaled down as a whole, sits inside the generated image (an
    inset, a letterboxed copy, a tile of a collage). Returns (NCC, (x, y, width, height) in the generated image's
    pixels) of the best place, found on a multi-scale search of normalised cross-correlation (OpenCV's
    matchTemplate) at LOCATE_SIDE and refined in width and height; (-1, None) when nothing fits."""
    image, reference = gen.locate, ref.locate
    if image is None or reference is None:
        return -1.0, None
    h, w = image.shape
    rh, rw = reference.shape
    shapes = [(rw, rh)]
    if abs((rw / rh) / (w / h) - 1.0) > 0.05:
        shapes.append((w, h))  # the reference stretched into a cell of the output's shape
    best = (-1.0, 0, 0, 0, 0)
    for sw, sh in shapes:
        share = LOCATE_MAX
        while share >= LOCATE_MIN:
            scale = share * min(w / sw, h / sh)
            tw, th = round(sw * scale), round(sh * scale)
            score, x, y = _template_match(image, reference, tw, th)
            if score > best[0]:
                best = (score, x, y, tw, th)
            share /= LOCATE_STEP
    if best[0] < 0:
        return -1.0, None
    _, bx, by, bw, bh = best
    margin_x, margin_y = round(bw * 0.08) + 3, round(bh * 0.08) + 3
    window = (max(0, bx - margin_x), max(0, by - margin_y), min(w, bx + bw + margin_x), min(h, by + bh + margin_y))
    for fx in LOCATE_REFINE:
        for fy in LOCATE_REFINE:
            tw, th = round(bw * fx), round(bh * fy)
            score, x, y = _template_match(image, reference, tw, th, window)
            if score > best[0]:
                best = (score, x, y, tw, th)
    score, x, y, tw, th = best
    factor = gen.width / w
    return score, (round(x * factor), round(y * factor), round(tw * factor), round(th * factor))


def _local(gen: Features, ref: Features, thresholds: VerifyThresholds, measure_all: bool):
    """(inliers, matches, transform generated -> reference, inlier points of the generated image, of the
    reference, mirrored) of the best local-feature fit: the image and its mirror, at both sizes, and the reference
    stretched to the output's shape where the others keep too few."""
    import numpy as np

    best = (0, 0, None, None, None, False)
    for own, own_small, mirrored in ((gen.sift, gen.sift_small, False), (gen.mirror, gen.mirror_small, True)):
        if own is None:
            continue
        found = _match(own, ref.sift)
        if found[0] < thresholds.min_inliers or measure_all:
            small = _match(own_small, ref.sift_small)
            found = small if small[0] > found[0] else found
        if found[0] > best[0]:
            best = found + (mirrored,)
    if best[0] < thresholds.min_inliers:  # a reference stretched to the output's shape (a tile of a grid)?
        stretched = _stretched(ref, gen.width / gen.height)
        if stretched is not None:
            keypoints, fx, fy = stretched
            found = _match(gen.sift, keypoints)
            if found[0] > best[0] and found[2] is not None:
                inliers, candidates, matrix, src, dst = found
                back = np.array([[1 / fx, 0.0], [0.0, 1 / fy]])  # stretched pixels -> the reference's
                matrix = np.hstack([back @ matrix[:, :2], back @ matrix[:, 2:]])
                best = (inliers, candidates, matrix, src, dst / np.array([fx, fy], np.float32), False)
    return best


def _judge_local(out: Verification, best: tuple, gen: Features, ref: Features, thresholds: VerifyThresholds) -> None:
    """Status, coverage, region and evidence lines of a local-feature fit with enough inliers."""
    import numpy as np

    inliers, _, matrix, src, dst, mirrored = best
    if matrix is None or inliers < thresholds.min_inliers:
        return
    box = gen.content
    if mirrored and box is not None:  # src points are in the mirrored image's coordinates
        box = (gen.width - box[2], box[1], gen.width - box[0], box[3])
    cover_gen = _coverage(src, gen.width, gen.height, box)
    cover_ref = _coverage(dst, ref.width, ref.height)
    out.coverage = {"generated": cover_gen, "reference": cover_ref}
    out.transform = matrix.tolist()
    whole = cover_ref >= thresholds.min_reference_coverage
    out.status = COPY if cover_gen >= thresholds.min_coverage or whole else PARTIAL
    if whole and cover_gen < thresholds.min_coverage:
        out.reason = (f"{cover_ref:.0%} of the training image found inside a larger image "
                      f"({cover_gen:.0%} of it)")
    corners = np.array([[0, 0], [gen.width, 0], [gen.width, gen.height], [0, gen.height]], np.float32)
    if mirrored:
        corners[:, 0] = gen.width - corners[:, 0]
    out.region = (corners @ matrix[:, :2].T + matrix[:, 2]).tolist()
    step = max(1, len(src) // 40)
    out.lines = [[float(gen.width - a[0] if mirrored else a[0]), float(a[1]), float(b[0]), float(b[1])]
                 for a, b in zip(src[::step], dst[::step], strict=True)]


def _judge_dense(out: Verification, gen: Features, ref: Features, thresholds: VerifyThresholds,
                 measure_all: bool) -> None:
    """The dense comparison, where keypoints are too few to decide (flat images) or the generated image's
    detail is blurred away."""
    blurred = len(gen.sift) < len(gen.sift_small) * 2
    out.dense_applicable = min(len(gen.sift), len(ref.sift)) < FEW_KEYPOINTS or blurred
    decides = out.status == DIFFERENT and out.dense_applicable
    if not (decides or measure_all):
        return
    ncc, alignment, tiled = _dense(gen, ref, blurred)
    out.ncc, out.tiled_l2 = ncc, tiled
    if not decides:
        return
    out.method = "dense"
    if ncc >= thresholds.dense_ncc and alignment is not None:
        crop, flipped, angle, warp = alignment
        out.status, out.mirrored = COPY, flipped
        x0, y0 = ref.width * crop / 2, ref.height * crop / 2
        out.region = [[x0, y0], [ref.width - x0, y0], [ref.width - x0, ref.height - y0], [x0, ref.height - y0]]
        out.coverage = {"generated": 1.0, "reference": (1 - crop) ** 2}
        out.reason = f"aligned by a {int(crop * 100)}% centre crop{', mirrored' if flipped else ''}" + (
            f", rotated {angle:+.0f} degrees" if angle else "") + (f", {warp}" if warp else "")


def _judge_located(out: Verification, gen: Features, ref: Features, thresholds: VerifyThresholds,
                   measure_all: bool) -> None:
    """Dense localisation of a reference too flat for keypoints, found whole inside a larger output (an inset,
    a letterbox, a tile), where nothing else found it."""
    if out.status == COPY or len(ref.sift) >= FEW_KEYPOINTS or not (measure_all or out.status == DIFFERENT):
        return
    score, box = locate(gen, ref)
    out.located = score
    if box is None or score < thresholds.locate_ncc or out.status != DIFFERENT:
        return
    x, y, bw, bh = box
    share = bw * bh / max(1, gen.width * gen.height)
    out.status, out.method, out.mirrored = COPY, "locate", False
    out.coverage = {"generated": share, "reference": 1.0}
    out.region = [[0.0, 0.0], [float(ref.width), 0.0], [float(ref.width), float(ref.height)], [0.0, float(ref.height)]]
    out.transform = [[ref.width / bw, 0.0, -x * ref.width / bw], [0.0, ref.height / bh, -y * ref.height / bh]]
    out.reason = (f"the training image found whole inside a larger image ({share:.0%} of it, at x {x}, y {y}) by "
                  f"dense localisation (NCC {score:.3f})")


def verify(gen: Features, ref: Features, thresholds: VerifyThresholds = VerifyThresholds(),
           reference: str | None = None, measure_all: bool = False) -> Verification:
    """Compare a generated image's features with a reference's; see the module docstring. measure_all (for
    calibration) runs every measurement, so the scores can be judged again under other cut-offs: the small
    pass, the dense comparison (with ``dense_applicable`` saying whether it may decide) and, for a flat
    reference, dense localisation (``located``)."""
    t0 = time.perf_counter()
    best = _local(gen, ref, thresholds, measure_all)
    inliers, candidates = best[0], best[1]
    out = Verification(status=DIFFERENT, method="sift", inliers=inliers,
                       inlier_ratio=inliers / candidates if candidates else 0.0, mirrored=best[5],
                       reference=reference)
    _judge_local(out, best, gen, ref, thresholds)
    _judge_dense(out, gen, ref, thresholds, measure_all)
    _judge_located(out, gen, ref, thresholds, measure_all)
    out.ms = (time.perf_counter() - t0) * 1e3
    return out


def compare(generated: Image.Image, reference: Image.Image, thresholds: VerifyThresholds = VerifyThresholds(),
            reference_key: str | None = None) -> Verification:
    """verify() from two PIL images (the reference's features cached under reference_key when given)."""
    t0 = time.perf_counter()
    missing = opencv_missing()
    if missing:
        return unavailable(missing, reference_key)
    gen = generated_features(generated)
    ref = REFERENCE_FEATURES.get(reference_key, reference) if reference_key else reference_features(reference)
    out = verify(gen, ref, thresholds, reference_key)
    out.ms = (time.perf_counter() - t0) * 1e3
    return out


def evidence_picture(generated: Image.Image | None, reference: Image.Image, v: Verification,
                     height: int = 200, lines: bool = True) -> str:
    """The picture a person judges by: the generated image ("your image") and the reference ("training
    image") side by side at the same height, each labelled, the matched region outlined on the reference
    and, for local-feature matches, lines joining the matched points (green for a copy, orange for partial,
    grey otherwise). With generated None (strict: the checked image may be a blocked copy) only the
    labelled reference with its matched region is drawn: none of the checked image's pixels. Returns a JPEG
    data URI."""
    import base64
    import io

    from PIL import Image, ImageDraw

    def scaled(img: Image.Image):
        factor = height / max(1, img.height)
        return img.convert("RGB").resize((max(1, round(img.width * factor)), height), Image.BILINEAR), factor

    label_h = 16
    right, fr = scaled(reference)
    left, fg = scaled(generated) if generated is not None else (None, 1.0)
    gap = 8 if left is not None else 0
    offset = left.width + gap if left is not None else 0
    canvas = Image.new("RGB", (offset + right.width, height + label_h), (255, 255, 255))
    if left is not None:
        canvas.paste(left, (0, label_h))
    canvas.paste(right, (offset, label_h))
    draw = ImageDraw.Draw(canvas)
    font = _label_font()
    if left is not None:
        draw.text((2, 2), "your image", fill=(0, 0, 0), font=font)
    draw.text((offset + 2, 2), "training image" if left is not None else "training image (matched region)",
              fill=(0, 0, 0), font=font)
    colour = {COPY: (46, 160, 67), PARTIAL: (239, 108, 0)}.get(v.status, (150, 150, 150))
    if lines and left is not None:
        for gx, gy, rx, ry in v.lines:
            draw.line((gx * fg, label_h + gy * fg, offset + rx * fr, label_h + ry * fr), fill=colour, width=1)
    if v.region:
        points = [(offset + x * fr, label_h + y * fr) for x, y in v.region]
        draw.line(points + points[:1], fill=colour, width=3)
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _label_font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1 (the webuis pin 9.5): the one bitmap font
        return ImageFont.load_default()

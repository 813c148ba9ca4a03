"""The model fingerprint: which weights made a bundle's vectors, known by what they do, not by their name.

A model spec names an architecture and where its weights are; two specs can name different weights that
give the same dimension (random ViT-B-32 weights beside OpenAI's, an OpenAI checkpoint loaded as a file
without ``-quickgelu``), and every score between their embeddings is noise. So a bundle built with a model
stores, in its manifest (``build.model_fingerprint``), the embeddings of a few fixed synthetic probe images
(made here from a seed: no files) and, when the weights were one file, that file's sha256. Before any image
is checked, the model a check loads embeds the same probes; each probe's cosine with the stored one must be
at least ``MIN_COSINE`` (fp16 or another device moves it by ~1e-3; other weights by far more), else
``ModelMismatchError``. A bundle without a fingerprint (built from LAION embedding shards, or before
fingerprints) is checked by name only; ``provenance-guard index fingerprint`` adds one where the weights are.
"""
from __future__ import annotations

import hashlib
import threading
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .bundle import Bundle

PROBE_VERSION = 1
MIN_COSINE = 0.98
KEY = "model_fingerprint"


class ModelMismatchError(ConfigError):
    """The model loaded for a check is not the one whose weights made the bundle's vectors."""


def probe_pixels() -> list:
    """Four fixed 96x96 RGB probes (a colour ramp, a checkerboard, smooth noise, rings), the same on every
    machine: a seeded generator and integer arithmetic only."""
    import numpy as np

    from .images import to_pixels

    side = 96
    y, x = np.mgrid[0:side, 0:side]
    ramp = np.stack([x * 255 // (side - 1), y * 255 // (side - 1), (x + y) * 255 // (2 * side - 2)], -1)
    checker = (((x // 12) + (y // 12)) % 2 * 200 + 30)[..., None].repeat(3, -1)
    coarse = np.random.RandomState(20261206).randint(0, 256, (12, 12, 3))
    smooth = coarse.repeat(8, 0).repeat(8, 1)
    rings = ((((x - 48) ** 2 + (y - 40) ** 2) // 60) % 3 * 100)[..., None] + np.array([40, 80, 120])
    images = [np.clip(a, 0, 255).astype(np.uint8) for a in (ramp, checker, smooth, rings)]
    return to_pixels(images)


_CACHE_LOCK = threading.Lock()


def _owner(embedder):
    """Where an embedder's fingerprint results are kept: the embedder, or what it wraps for longer than it
    lives itself (``cache_owner``: ComfyUI's loaded CLIP vision model outlives the node run's wrapper)."""
    return getattr(embedder, "cache_owner", None) or embedder


def probe_vectors(embedder) -> np.ndarray:
    """The probes' unit embeddings by this embedder (computed once per embedder)."""
    import numpy as np

    owner = _owner(embedder)
    with _CACHE_LOCK:
        cached = getattr(owner, "_provenance_probes", None)
    if cached is not None:
        return cached
    vectors = np.asarray(embedder.embed_pixels(probe_pixels()), dtype=np.float32)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    with _CACHE_LOCK:
        try:
            owner._provenance_probes = vectors
        except AttributeError:  # an object that takes no attributes: computed again next time
            pass
    return vectors


def weights_sha256(spec) -> str | None:
    """sha256 of the weights file a ``file`` spec names (None for tags, folders, hub names)."""
    from pathlib import Path

    if getattr(spec, "kind", None) != "file":
        return None
    path = Path(spec.source)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(embedder) -> dict[str, Any]:
    """What a bundle's manifest stores about the model that made its vectors."""
    vectors = probe_vectors(embedder)
    out: dict[str, Any] = {"probe_version": PROBE_VERSION, "model": str(embedder.spec.raw), "dim": int(vectors.shape[1]),
                           "probes": [[round(float(v), 6) for v in row] for row in vectors]}
    digest = weights_sha256(embedder.spec)
    if digest:
        out["weights_sha256"] = digest
    return out


def _probes(stored: Any) -> np.ndarray | None:
    """A stored fingerprint's probe embeddings as unit rows, or None when it is damaged."""
    import numpy as np

    try:
        rows = np.asarray(stored["probes"], dtype=np.float32)
    except (KeyError, TypeError, ValueError):
        return None
    if rows.ndim != 2 or not np.isfinite(rows).all():
        return None
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def _worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum(axis=1).min())


def mismatch(stored: Any, embedder) -> str | None:
    """Why the embedder's weights are not the ones a stored fingerprint describes, or None when they are (or
    when the fingerprint is of a kind this version does not read: then the name alone decides)."""
    if not isinstance(stored, dict) or stored.get("probe_version") != PROBE_VERSION:
        return None
    want = _probes(stored)
    if want is None:
        return "the bundle's model fingerprint is damaged"
    got = probe_vectors(embedder)
    if got.shape != want.shape:
        return (f"its probe embeddings are {got.shape[0]} x {got.shape[1]}, the bundle's fingerprint holds "
                f"{want.shape[0]} x {want.shape[1]}")
    worst = _worst_cosine(got, want)
    if not worst >= MIN_COSINE:  # NaN embeddings fail too
        return (f"it embeds the fixed probe images differently (cosine {worst:.3f} with the bundle's, at least "
                f"{MIN_COSINE} needed)")
    return None


def same_weights(a: Any, b: Any) -> bool:
    """Whether two stored fingerprints describe the same weights (a merge of two bundles needs that)."""
    if not (isinstance(a, dict) and isinstance(b, dict)) or a.get("probe_version") != b.get("probe_version"):
        return False
    x, y = _probes(a), _probes(b)
    return x is not None and y is not None and x.shape == y.shape and _worst_cosine(x, y) >= MIN_COSINE


_UNSEEN = object()


def _stored_key(bundle: Bundle, stored: Any) -> tuple:
    """What a decision is kept under: the bundle's id, version and its fingerprint's digest (two copies of one
    version may carry different fingerprints). The digest is computed once per opened bundle."""
    digest = getattr(bundle, "_fingerprint_digest", None)
    if digest is None:
        import json

        digest = hashlib.sha256(json.dumps(stored, sort_keys=True, default=str).encode()).hexdigest()
        try:
            bundle._fingerprint_digest = digest
        except AttributeError:
            pass
    return bundle.id, bundle.version, digest


def check_model(bundle: Bundle, embedder) -> None:
    """Raise ModelMismatchError when the bundle's fingerprint says embedder's weights are not its model's
    (DimensionMismatchError when even the dimension differs). Decided once per embedder and bundle version."""
    stored = (bundle.manifest.build or {}).get(KEY)
    if stored is None:
        return
    from .errors import DimensionMismatchError

    spec = getattr(embedder, "spec", None)
    got = probe_vectors(embedder).shape[1]
    if got != bundle.dim:
        raise DimensionMismatchError.model_for(spec.raw if spec is not None else "given", got, bundle)
    key = _stored_key(bundle, stored)
    owner = _owner(embedder)
    with _CACHE_LOCK:
        problem = (getattr(owner, "_provenance_checked", None) or {}).get(key, _UNSEEN)
    if problem is _UNSEEN:
        problem = mismatch(stored, embedder)
        with _CACHE_LOCK:
            try:
                owner._provenance_checked = {**(getattr(owner, "_provenance_checked", None) or {}), key: problem}
            except AttributeError:
                pass
    if problem:
        raise ModelMismatchError(
            f"the model loaded for bundle {bundle.id} ({spec.raw if spec is not None else 'a host model'}) is not "
            f"the one whose weights made its vectors ({bundle.model}): {problem}. Every score would be noise, so "
            f"nothing is checked: give the weights the bundle was built with (an OpenAI checkpoint given as a "
            f"file needs the -quickgelu architecture, e.g. ViT-L-14-quickgelu//path/to/weights)")

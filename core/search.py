"""Stages 3 and 4, search and re-rank: query vectors -> the closest rows of one bundle, scored exactly.

The FAISS index proposes candidates (for an approximate index, RERANK_CANDIDATES_FACTOR times as many as
asked); their stored float16 unit vectors give the exact cosine, the candidates are re-ordered by it, and
the top k are joined with their metadata. A bundle without stored vectors returns the index's own scores,
marked inexact.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .bundle import Bundle
from .config import RERANK_CANDIDATES_FACTOR
from .errors import DimensionMismatchError, IndexCorruptError
from .result import Match

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


@dataclass
class SearchOutput:
    matches: list[list[Match]]
    timings_ms: dict[str, float] = field(default_factory=dict)


def search(bundle: Bundle, queries: "np.ndarray", k: int, metadata: bool = True) -> SearchOutput:
    """Top-k matches of each query row (unit float32 vectors of the bundle's dimension), best first.
    With metadata=False the matches carry ids and scores only (join later with ``join_metadata``)."""
    import numpy as np

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != bundle.dim:
        raise DimensionMismatchError(
            f"query vectors are {queries.shape[-1]}-d but bundle {bundle.id} ({bundle.path}) holds {bundle.dim}-d "
            f"vectors of {bundle.model}; check with that model"
        )
    k = max(1, min(int(k), bundle.live_count))
    flat_index = bundle.manifest.flat
    rerank = bundle.vectors is not None and not flat_index
    # PQ mis-orders the top of the list: a few dozen extra candidates, re-scored exactly, put it right.
    candidates = min(bundle.count, k + (RERANK_CANDIDATES_FACTOR - 1) * min(k, 10)) if rerank else k
    t0 = time.perf_counter()
    scores, ids = bundle.index.search(queries, candidates, params=bundle.params)
    t1 = time.perf_counter()
    if ids.size and (int(ids.min()) < -1 or int(ids.max()) >= bundle.count):
        raise IndexCorruptError(f"bundle {bundle.id} ({bundle.path}) returned row ids outside 0..{bundle.count - 1}: "
                                f"its index is damaged; run 'provenance-guard index verify {bundle.path}' and copy "
                                f"the bundle again or rebuild it")
    # A flat index already scores the exact cosine in float32; stored float16 vectors would only blur it.
    exact = bundle.exact
    if rerank:
        scores, ids = _rerank(bundle, queries, ids, k)
    _check_scores(bundle, scores, ids, SCORE_SLACK if rerank or flat_index else APPROXIMATE_SLACK)
    if rerank or flat_index:
        scores = np.clip(scores, -1.0, 1.0)  # float sums of unit vectors stray just past 1 (1.0000001)
    t2 = time.perf_counter()
    out = [[Match(score=float(sc), exact=exact, bundle_id=bundle.id, bundle_version=bundle.version, row_id=int(i))
            for sc, i in zip(row_scores, row_ids) if i >= 0] for row_scores, row_ids in zip(scores, ids)]
    if metadata:
        join_metadata(bundle, [m for ms in out for m in ms])
    t3 = time.perf_counter()
    return SearchOutput(out, {"search": (t1 - t0) * 1e3, "rerank": (t2 - t1) * 1e3, "metadata": (t3 - t2) * 1e3})


# Cosines of unit vectors lie in [-1, 1]; float16 storage and float32 sums stray by far less than SCORE_SLACK.
# An index's own approximations (PQ, SQ) stray further (1.02 seen) but never by whole units.
SCORE_SLACK = 1e-3
APPROXIMATE_SLACK = 0.5


def _check_scores(bundle: Bundle, scores: "np.ndarray", ids: "np.ndarray", slack: float) -> None:
    """A score that is no cosine (NaN, infinite, beyond 1) means damaged index or vector bytes: a same-size
    bit flip in index.faiss once scored 1.68e26 and blocked an unrelated image. Report it, never act on it."""
    import numpy as np

    found = scores[ids >= 0]
    if found.size and not (np.isfinite(found).all() and float(np.abs(found).max()) <= 1.0 + slack):
        bad = found[~np.isfinite(found) | (np.abs(found) > 1.0 + slack)][0]
        raise IndexCorruptError(f"bundle {bundle.id} ({bundle.path}) scored a match {float(bad)!r}, which is no cosine: "
                                f"its index or re-rank vectors are damaged; run 'provenance-guard index verify "
                                f"{bundle.path}' and copy the bundle again or rebuild it")


def join_metadata(bundle: Bundle, matches: list[Match]) -> None:
    """Fill url, caption and the other columns of matches (of this bundle) from its metadata."""
    wanted = sorted({m.row_id for m in matches})
    rows = dict(zip(wanted, bundle.rows(wanted)))
    for m in matches:
        md = dict(rows[m.row_id])
        m.url, m.caption, m.metadata = md.pop("url", None), md.pop("caption", None), md


def _rerank(bundle: Bundle, queries: "np.ndarray", ids: "np.ndarray", k: int):
    """Exact cosines of each query with its candidates; returns (scores, ids), k columns, best first."""
    import numpy as np

    vecs = bundle.vector(np.where(ids >= 0, ids, 0).reshape(-1)).reshape(ids.shape[0], ids.shape[1], -1)
    dots = np.matmul(vecs, queries[:, :, None])[:, :, 0]  # BLAS; einsum's generic loop was 3x slower
    norms = np.sqrt(np.einsum("qcd,qcd->qc", vecs, vecs)) * np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.where(ids >= 0, dots / np.maximum(norms, 1e-12), -np.inf)
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(exact, order, 1), np.take_along_axis(ids, order, 1)

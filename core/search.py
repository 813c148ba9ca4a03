"""Stages 3 and 4, search and re-rank: query vectors -> the closest rows of one bundle, scored exactly.

The FAISS index proposes candidates (for an approximate index, RERANK_CANDIDATES_FACTOR times as many as
asked); their stored float16 unit vectors give the exact cosine, the candidates are re-ordered by it, and
the top k are joined with their metadata. A bundle without stored vectors returns the index's own scores,
marked inexact.
"""
from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .bundle import Bundle
from .bundle.rerank import FaissRerank
from .config import RERANK_CANDIDATES_FACTOR
from .errors import DimensionMismatchError, ImageInputError, IndexCorruptError
from .result import Match

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


@dataclass
class SearchOutput:
    matches: list[list[Match]]
    timings_ms: dict[str, float] = field(default_factory=dict)
    vectors: list[np.ndarray] | None = None  # with_vectors: each query's matches' stored rows, in order


def search(bundle: Bundle, queries: np.ndarray, k: int, metadata: bool = True,
           with_vectors: bool = False, squares: list[float] | None = None) -> SearchOutput:
    """Top-k matches of each query row (unit float32 vectors of the bundle's dimension), best first.
    With metadata=False the matches carry ids and scores only (join later with ``join_metadata``);
    with_vectors also returns the matches' stored vectors (float32), read once for the re-rank anyway.
    squares: the rows' squared norms (``row_squares``), when the caller has them already."""
    ranked, vectors, (t0, t1, t2) = _ranked(bundle, queries, k, with_vectors, squares)
    # A flat index already scores the exact cosine in float32; stored float16 vectors would only blur it.
    exact, bid, version = bundle.exact, bundle.id, bundle.version
    out = [[Match(sc, exact, bid, version, i) for sc, i in row] for row in ranked]
    if metadata:
        join_metadata(bundle, [m for ms in out for m in ms])
    t3 = time.perf_counter()
    if with_vectors and vectors is None and bundle.vectors is not None:
        vectors = [bundle.vector([m.row_id for m in ms]) for ms in out]
    return SearchOutput(out, {"search": (t1 - t0) * 1e3, "rerank": (t2 - t1) * 1e3, "metadata": (t3 - t2) * 1e3},
                        vectors if with_vectors else None)


def search_scores(bundle: Bundle, queries: np.ndarray, k: int, squares: list[float] | None = None,
                  timings: dict[str, float] | None = None) -> list[list[tuple[float, int]]]:
    """What search() finds, as (score, row id) pairs per query, best first: no Match objects and no metadata
    (the index server builds its rows from these; 80 Match objects cost a knn request ~0.1 ms).
    ``timings``: given, the search's and the re-rank's seconds are put there."""
    ranked, _, (t0, t1, t2) = _ranked(bundle, queries, k, False, squares)
    if timings is not None:
        timings["search"], timings["rerank"] = t1 - t0, t2 - t1
    return ranked


def _ranked(bundle: Bundle, queries: np.ndarray, k: int, with_vectors: bool, squares: list[float] | None):
    """search()'s work up to the Match objects: (pairs per query, stored vectors or None, the times the index
    search began and ended and the scoring ended)."""
    import numpy as np

    if not (isinstance(queries, np.ndarray) and queries.dtype == np.float32 and queries.flags.c_contiguous):
        queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != bundle.dim:
        raise DimensionMismatchError(
            f"query vectors are {queries.shape[-1]}-d but bundle {bundle.id} ({bundle.path}) holds {bundle.dim}-d "
            f"vectors of {bundle.model}; check with that model"
        )
    k = max(1, min(int(k), bundle.live_count))
    bundle.warm_up()  # a process that searches maps the rows it will read, once, in the background
    flat_index = bundle.flat
    rerank = bundle.vectors is not None and not flat_index
    # PQ mis-orders the top of the list: a few dozen extra candidates, re-scored exactly, put it right.
    candidates = min(bundle.count, k + (RERANK_CANDIDATES_FACTOR - 1) * min(k, 10)) if rerank else k
    # Once the bundle is warm, FAISS scores the candidates' float16 rows in the same call (rerank.FaissRerank).
    refine = bundle.refine if rerank else None
    q_norms = squares if squares is not None and len(squares) == len(queries) else row_squares(queries)
    if not all(math.isfinite(x) for x in q_norms):
        # FAISS would search with it anyway, and may find nothing: a silent pass for a model that overflowed
        raise ImageInputError("an embedding holds a number that is not finite (NaN or infinity): the model's "
                              "output overflowed or the embedding given is damaged; run the model in float32 "
                              "(device cpu) or give the embedding as the model produced it")
    t0 = time.perf_counter()
    if refine is not None:
        scores, ids = refine.search(queries, candidates, bundle.params)
    else:
        scores, ids = bundle.index.search(queries, candidates, params=bundle.params)
    t1 = time.perf_counter()
    # Lists from here on: a check handles tens of candidates, where each numpy call costs more than the
    # Python it replaces (the search has just evicted the caches numpy's own code runs from).
    vectors = None
    finite = False  # every score known finite, so a row's ends bound it
    if refine is not None:  # FaissRerank checked its index's ids
        ranked, finite = _exact_from_dots(refine, q_norms, scores, ids, k)
    else:
        id_rows = ids.tolist()
        found = [i for row in id_rows for i in row]
        if found and (min(found) < -1 or max(found) >= bundle.count):
            raise IndexCorruptError(f"bundle {bundle.id} ({bundle.path}) returned row ids outside "
                                    f"0..{bundle.count - 1}: its index is damaged; run 'provenance-guard index "
                                    f"verify {bundle.path}' and copy the bundle again or rebuild it")
        if rerank:
            ranked, vectors = _rerank(bundle, queries, q_norms, ids, id_rows, k, with_vectors)
        else:
            ranked = [[(sc, i) for sc, i in zip(row_scores, row_ids, strict=True) if i >= 0]
                      for row_scores, row_ids in zip(scores.tolist(), id_rows, strict=True)]
    if rerank or flat_index:  # float sums of unit vectors stray just past 1 (1.0000001): clamped, once checked
        ranked = _clamped_rows(bundle, ranked, finite)
    else:
        _check_scores(bundle, [sc for row in ranked for sc, _ in row], APPROXIMATE_SLACK)
    return ranked, vectors, (t0, t1, time.perf_counter())


def row_squares(x: np.ndarray) -> list[float]:
    """Squared norms of the rows of a 2-d float32 array (inf or nan when a row holds one), each summed by
    FAISS (``fvec_norm_L2sqr``, float32 as numpy's dot sums). Around a FAISS search every numpy call pays
    tens of microseconds of cold caches; FAISS's own code, which the search runs, paid 22-29 us a check in
    P1 where numpy's BLAS dot paid 39-48 (einsum, a product and a sum, sums over tolist() cost more)."""
    import faiss
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)  # FAISS reads each row as d consecutive floats
    if x.ndim != 2:
        raise ValueError(f"row_squares takes rows (a 2-d array), not a {x.ndim}-d array")
    d = x.shape[1]
    if not d:
        return [0.0] * len(x)
    return [faiss.fvec_norm_L2sqr(faiss.swig_ptr(row), d) for row in x]


_SCORE = operator.itemgetter(0)  # sort keys in C: a Python key function cost a call per candidate
# From this many candidates in one search (the index server's batches) scores and order come from numpy; a
# check's few dozen cost less as Python floats than numpy's calls do on caches a search has just emptied.
NUMPY_SCORING_CANDIDATES = 256

# Cosines of unit vectors lie in [-1, 1]; float16 storage and float32 sums stray by far less than SCORE_SLACK.
# An index's own approximations (PQ, SQ) stray further (1.02 seen) but never by whole units.
SCORE_SLACK = 1e-3
APPROXIMATE_SLACK = 0.5


def _check_scores(bundle: Bundle, scores: list[float], slack: float) -> None:
    """A score that is no cosine (NaN, infinite, beyond 1) means damaged index or vector bytes: a same-size
    bit flip in index.faiss once scored 1.68e26 and blocked an unrelated image. Report it, never act on it."""
    import math

    for sc in scores:
        if not (math.isfinite(sc) and abs(sc) <= 1.0 + slack):
            raise IndexCorruptError(f"bundle {bundle.id} ({bundle.path}) scored a match {sc!r}, which is no cosine: "
                                    f"its index or re-rank vectors are damaged; run 'provenance-guard index verify "
                                    f"{bundle.path}' and copy the bundle again or rebuild it")


def _clamped_rows(bundle: Bundle, ranked: list[list[tuple[float, int]]], finite: bool) -> list:
    """Each row's scores clamped to [-1, 1], each one outside it checked first (_clamped). ``finite``: every
    score is known finite and each row sorted best first, so a row whose ends lie inside is kept as it is."""
    return [row if finite and (not row or (row[0][0] <= 1.0 and row[-1][0] >= -1.0)) else
            [(sc if -1.0 <= sc <= 1.0 else _clamped(bundle, sc), i) for sc, i in row] for row in ranked]


def _clamped(bundle: Bundle, score: float) -> float:
    """An exact score just outside [-1, 1], clamped; one that is no cosine is reported (_check_scores)."""
    _check_scores(bundle, [score], SCORE_SLACK)
    return min(1.0, max(-1.0, score))


def join_metadata(bundle: Bundle, matches: list[Match]) -> None:
    """Fill url, caption and the other columns of matches (of this bundle) from its metadata."""
    wanted = sorted({m.row_id for m in matches})
    rows = dict(zip(wanted, bundle.rows(wanted), strict=True))
    first: dict[int, Match] = {}
    for m in matches:
        md = rows.pop(m.row_id, None)  # a row's dict is fresh: its first match takes it as it is
        if md is None:  # a row matched again (another query): a copy of the first match's values
            f = first[m.row_id]
            m.url, m.caption, m.metadata = f.url, f.caption, dict(f.metadata)
            continue
        m.url, m.caption, m.metadata = md.pop("url", None), md.pop("caption", None), md
        first[m.row_id] = m


def _rerank(bundle: Bundle, queries: np.ndarray, q_norms: list[float], ids: np.ndarray,
            id_rows: list[list[int]], k: int, with_vectors: bool = True):
    """Exact cosines of each query with its candidates: per query, the best k (score, id) pairs, best first,
    and (with_vectors, else None) their stored vectors (float32, the same order)."""
    import numpy as np

    n, c = len(id_rows), len(id_rows[0]) if id_rows else 0
    vecs = bundle.vector(np.maximum(ids, 0).reshape(-1)).reshape(n, c, -1)  # -1: no candidate (scored out below)
    dots = np.matmul(vecs, queries[:, :, None])[:, :, 0].tolist()  # BLAS; einsum's generic loop was 3x slower
    norms = np.einsum("qcd,qcd->qc", vecs, vecs).tolist()
    out, rows = [], []
    for n, (row_ids, row_dots, row_norms, qn) in enumerate(zip(id_rows, dots, norms, q_norms, strict=True)):
        ranked = [(d / max(math.sqrt(nv * qn), 1e-12), i, c) for c, (i, d, nv) in
                  enumerate(zip(row_ids, row_dots, row_norms, strict=True)) if i >= 0]
        ranked.sort(key=_SCORE, reverse=True)  # stable, reversed too: equal scores keep the index's order
        del ranked[k:]
        out.append([(sc, i) for sc, i, _ in ranked])
        if with_vectors:
            rows.append(vecs[n].take([c for _, _, c in ranked], axis=0))
    return out, rows if with_vectors else None


def _exact_from_dots(refine: FaissRerank, q_norms: list[float], dots: np.ndarray, ids: np.ndarray,
                     k: int) -> tuple[list[list[tuple[float, int]]], bool]:
    """Per query, the best k (exact cosine, id) pairs, best first, from FAISS's inner products with the stored
    rows and the rows' inverse norms; and whether every score is known finite (so each row's first and last
    score bound the rest: the scores of a batch then need no check one by one)."""
    if dots.size >= NUMPY_SCORING_CANDIDATES:
        ranked = _exact_from_dots_numpy(refine, q_norms, dots, ids, k)
        if ranked is not None:
            return ranked, True
    inverse = refine.inverse_norms
    out = []
    for row_ids, row_dots, qn in zip(ids.tolist(), dots.tolist(), q_norms, strict=True):
        iq = 1.0 / math.sqrt(qn) if qn > 0 else 0.0  # a zero query scores 0, as in _rerank (nan: refused above)
        ranked = [(d * inverse[i] * iq, i) for d, i in zip(row_dots, row_ids, strict=True) if i >= 0]
        ranked.sort(key=_SCORE, reverse=True)  # stable, reversed too: equal scores keep FAISS's order
        del ranked[k:]
        out.append(ranked)
    return out, False


def _exact_from_dots_numpy(refine: FaissRerank, q_norms: list[float], dots: np.ndarray, ids: np.ndarray,
                           k: int) -> list[list[tuple[float, int]]] | None:
    """_exact_from_dots for a batch (the index server's 16 queries of 100 candidates): the same float64
    products in the same order, so the same scores, and the same stable order; None when a score is not
    finite (the Python path keeps that case as it always was, for the score check to report)."""
    import numpy as np

    valid = ids >= 0
    iq = np.array([1.0 / math.sqrt(qn) if qn > 0 else 0.0 for qn in q_norms])
    inverse = np.frombuffer(refine.inverse_norms, dtype=np.float32).take(np.where(valid, ids, 0))
    scores = dots.astype(np.float64) * inverse.astype(np.float64) * iq[:, None]
    if not np.isfinite(scores[valid]).all():
        return None
    scores[~valid] = -np.inf  # after every candidate, in FAISS's order, then cut
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # stable: equal scores keep FAISS's order
    kept = np.minimum(valid.sum(axis=1), k).tolist()
    return [list(zip(sc[:n], i[:n], strict=True)) for sc, i, n in zip(np.take_along_axis(scores, order, axis=1).tolist(),
                                                       np.take_along_axis(ids, order, axis=1).tolist(), kept, strict=True)]

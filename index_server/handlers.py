"""The work behind each route, off the event loop: clip-retrieval's /knn-service and /metadata, /v1/check,
and the JSON of their answers. Each takes the process's State and a parsed request and returns what the
route sends, or raises HTTPProblem (a bad request) or a core ProvenanceError (error_status says which)."""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import threading
import time
from typing import TYPE_CHECKING, Any
from collections.abc import Callable

from fastapi.responses import Response
from pydantic import ValidationError

from ..core.errors import ConfigError, ImageInputError, ProvenanceError
from .config import HTTPProblem
from .schemas import CheckOptions, KnnRequest, MetadataRequest
from .state import IMAGE_URL_FAILED, State

if TYPE_CHECKING:  # numpy is imported lazily: nothing heavy at import time
    import numpy as np

DEDUP_COSINE = 0.94  # clip-retrieval's near-duplicate threshold for result de-duplication

# Queries per FAISS call of /knn-service. FAISS moves a flat or coarse search to BLAS only for larger batches
# (at 20 queries in older releases, 128,000 query values in 1.15), so 16 queries of at most 4,096 values
# each run the code a query runs alone. 8 and 16 cost about the same CPU per query; 16 lets a worker catch up.
KNN_BATCH = 16
KNN_BATCH_CANDIDATES = 200  # heavier /knn-service requests take the thread pool (knn_batched)
# Answers handed back to the event loop in groups of this many while the rest of the batch is worked on, so
# clients answered early send their next query during the batch. In alternating runs, groups of 4 cost a
# request 0.2-0.4 ms less CPU than one group per batch; one answer at a time woke the loop too often. A
# group's answers share their reads of vectors and metadata (_knn_rows); groups of 8 served the same.
KNN_FLUSH = 4


def _b64(data: str, what: str) -> bytes:
    try:
        if "," in data[:100] and data.lstrip().startswith("data:"):
            data = data.split(",", 1)[1]
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPProblem(400, f"{what} is not valid base64 ({exc})") from exc


def json_body(content: Any) -> bytes:
    """A response body as compact UTF-8 JSON: orjson when installed (it encodes forty results in a tenth of
    json's time), else the standard library with the same output shape."""
    try:
        import orjson
    except ImportError:
        orjson = None
    if orjson is not None:
        try:
            return orjson.dumps(content)
        except TypeError:  # a value orjson does not encode (an int beyond 64 bits): the slow path says what
            pass
    return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_body(content), status_code=status, headers=headers, media_type="application/json")


def unit_rows(rows: list, dim: int, field: str, of: str = "") -> np.ndarray:
    """Request embeddings as unit float32 rows, each of the bundle's dimension, finite and non-zero; where a
    row is refused, the first refusal is raised (unit_rows_each's HTTPProblem)."""
    import numpy as np

    each = unit_rows_each(rows, dim, field, of)
    for row in each:
        if isinstance(row, HTTPProblem):
            raise row
    return np.concatenate(each) if each else np.zeros((0, dim), dtype=np.float32)


def unit_rows_each(rows: list, dim: int, field: str, of: str = "") -> list:
    """Each request embedding checked on its own, all in one pass (one array, one division): per row its unit
    float32 row (shape (1, dim)), or the HTTPProblem that refuses it (not ``dim`` numbers; not finite and
    non-zero)."""
    import numpy as np

    from ..core.search import row_squares

    out: list = [None] * len(rows)
    fit = []
    for j, r in enumerate(rows):
        if len(r) == dim:
            fit.append(j)
        else:
            out[j] = HTTPProblem(400, f"{field} has a vector of {len(r)} numbers; the bundle holds {dim}-d "
                                      f"vectors{of}")
    if not fit:
        return out
    q = np.asarray([rows[j] for j in fit], dtype=np.float32).reshape(len(fit), dim)
    squares = row_squares(q)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # such rows are refused below
        q /= np.sqrt(np.asarray(squares, dtype=np.float32))[:, None]
    for i, (j, square) in enumerate(zip(fit, squares, strict=True)):
        out[j] = q[i:i + 1] if math.isfinite(square) and square > 0 else \
            HTTPProblem(400, f"{field} must hold finite, non-zero vectors")
    return out


def knn(state: State, body: KnnRequest, fetched: bytes | None = None) -> list[dict]:
    """clip-retrieval's /knn-service over one bundle, exact cosines. ``fetched``: the image_url's bytes,
    fetched by the route before this runs (so a slow URL holds no worker thread)."""
    bundle = _knn_bundle(state, body)
    t0 = time.perf_counter()
    if body.embedding_input is not None:
        q = _knn_embedding(bundle, body)
    elif body.text:
        q = state.model_batcher(bundle).embedder.embed_text([body.text])
        state.metrics.stage("embed", time.perf_counter() - t0)
    elif body.image or fetched is not None:
        blob = _b64(body.image, "image") if body.image else fetched
        try:
            with state.decoded([blob]) as pixels:
                t0 = time.perf_counter()
                q = state.model_batcher(bundle).embed_pixels(pixels)
                state.metrics.stage("embed", time.perf_counter() - t0)
        except HTTPProblem as exc:
            if fetched is None or exc.status != 400:
                raise
            raise HTTPProblem(400, IMAGE_URL_FAILED) from None  # a fetched non-image reads like any failure
    else:
        raise HTTPProblem(400, "give one of text, image (base64), image_url or embedding_input")
    return _answer(state, bundle, body, _searched(state, bundle, q, _knn_want(bundle, body))[0])


def _searched(state: State, bundle, q, want: int) -> list:
    """search_scores() of these queries, its stages counted."""
    from ..core.search import search_scores

    timings: dict[str, float] = {}
    ranked = search_scores(bundle, q, want, timings=timings)
    for stage, seconds in timings.items():
        state.metrics.stage(stage, seconds)
    return ranked


def knn_many(state: State, bodies: list[KnnRequest], answer: Callable[[int, Any], None] | None = None) -> list:
    """knn() of several embedding_input requests (SearchBatcher's fn): the queries of one bundle and count
    searched in one FAISS call (each query's candidates are the ones its own search finds). Per request its
    rows, or the exception its own knn() would raise; ``answer(n, rows or exception)`` is called with each
    as soon as it is ready (the batcher hands it to the waiting request while the others are worked on)."""
    out: list = [None] * len(bodies)

    def done(n: int, value) -> None:
        out[n] = value
        if answer is not None:
            answer(n, value)

    for (bundle, want), members in _knn_groups(state, bodies, done):
        _knn_group(state, bundle, want, bodies, members, done)
    return out


def _knn_groups(state: State, bodies: list[KnnRequest], done: Callable[[int, Any], None]) -> list:
    """The requests that can be searched, as ((bundle, candidates), [(request number, unit query row)]), the
    lightest first; each of the others is answered with its error through ``done``."""
    bundles: dict[tuple, Any] = {}  # one lookup (a stat of its manifest) per index and batch
    asking: dict[tuple, list[int]] = {}  # the requests of each
    for n, body in enumerate(bodies):
        try:
            key = (body.indice_name, body.modality)
            if key not in bundles:
                bundles[key] = _knn_bundle(state, body)
            asking.setdefault(key, []).append(n)
        except Exception as exc:  # noqa: BLE001 - this request's answer; the others go on
            done(n, exc)
    groups: dict[tuple, list] = {}
    for key, numbers in asking.items():
        bundle = bundles[key]
        for n, q in zip(numbers, _knn_embeddings(bundle, [bodies[n] for n in numbers]), strict=True):
            if isinstance(q, Exception):
                done(n, q)
            else:
                groups.setdefault((id(bundle), _knn_want(bundle, bodies[n])), (bundle, []))[1].append((n, q))
    return [((bundle, want), members) for (_, want), (bundle, members) in sorted(groups.items(), key=lambda g: g[0][1])]


def _knn_group(state: State, bundle, want: int, bodies: list[KnnRequest], members: list,
               done: Callable[[int, Any], None]) -> None:
    """The requests of one bundle and candidate count: searched in one FAISS call where that gives each what
    its search alone gives, and answered a few at a time (KNN_FLUSH), their reads shared."""
    import numpy as np

    ranked = None
    if len(members) > 1 and _batch_exact(bundle):
        try:
            ranked = _searched(state, bundle, np.concatenate([q for _, q in members]), want)
        except Exception:  # noqa: BLE001 - each query again on its own, so each gets its own outcome
            ranked = None
    for start in range(0, len(members), KNN_FLUSH):
        part = members[start:start + KNN_FLUSH]
        answers = None
        if ranked is not None:
            try:
                answers = _answers(state, bundle, [bodies[n] for n, _ in part], ranked[start:start + len(part)])
            except Exception:  # noqa: BLE001 - each again on its own, so each gets its own outcome
                answers = None
        for j, (n, q) in enumerate(part):
            if answers is not None:
                rows = answers[j]
            else:
                try:
                    rows = _answer(state, bundle, bodies[n], ranked[start + j] if ranked is not None else
                                   _searched(state, bundle, q, want)[0])
                except Exception as exc:  # noqa: BLE001
                    rows = exc
            done(n, rows)


def _batch_exact(bundle) -> bool:
    """Whether several queries searched in one call of this bundle's index get exactly what each gets alone.
    Not behind a transform (OPQ, PCA): FAISS applies it to the whole batch in one matrix product, whose
    rounding depends on the batch (PQ scores, and rarely the candidates, differ from a query's alone)."""
    import faiss

    return not isinstance(faiss.downcast_index(bundle.index), faiss.IndexPreTransform)


def knn_batched(body: KnnRequest) -> bool:
    """Whether /knn-service sends this request to the search batcher: embedding queries of at most
    KNN_BATCH_CANDIDATES candidates. Larger ones (up to 2,000 with num_images 1000) take the thread pool,
    so one of them never holds up the light queries batched after it."""
    return body.embedding_input is not None and _knn_candidates(body) <= KNN_BATCH_CANDIDATES


def _knn_bundle(state: State, body: KnnRequest):
    bundle = state.bundle(body.indice_name)
    if body.modality != "image":
        raise HTTPProblem(400, "this server holds image embeddings only: use modality \"image\" (text queries "
                               "are embedded with the model and searched against the images)")
    return bundle


def _knn_embedding(bundle, body: KnnRequest) -> np.ndarray:
    """The request's unit query row, as a batch checks it (_knn_embeddings), or its HTTPProblem raised."""
    q = _knn_embeddings(bundle, [body])[0]
    if isinstance(q, Exception):
        raise q
    return q


def _knn_embeddings(bundle, bodies: list[KnnRequest]) -> list:
    """_knn_embedding() of each request, or the HTTPProblem it raises, in one pass."""
    return unit_rows_each([b.embedding_input for b in bodies], bundle.dim, "embedding_input",
                          f" of index {bundle.id} ({bundle.model})")


def _knn_want(bundle, body: KnnRequest) -> int:
    """Candidates to search: with de-duplication, twice the results asked for (clip-retrieval's margin)."""
    return min(_knn_candidates(body), bundle.live_count)


def _knn_candidates(body: KnnRequest) -> int:
    num = body.num_images
    return max(num, body.num_result_ids or num) * 2 if body.deduplicate else num


def _answer(state: State, bundle, body: KnnRequest, ranked: list) -> list[dict]:
    """One query's rows (_answers() of it alone)."""
    return _answers(state, bundle, [body], [ranked])[0]


def _answers(state: State, bundle, bodies: list[KnnRequest], rankeds: list) -> list[list[dict]]:
    """_knn_rows(), its time counted in the metadata stage as one equal share per query (the histogram's sum
    and count are the same as one at a time; its spread is of groups)."""
    t0 = time.perf_counter()
    out = _knn_rows(bundle, bodies, rankeds)
    seconds = (time.perf_counter() - t0) / max(1, len(bodies))
    for _ in bodies:
        state.metrics.stage("metadata", seconds)
    return out


# Below DEDUP_COSINE by more than float32 sums of unit vectors stray (~1e-6): a pair this close goes to
# deduplicate(), so a batch decides each pair as the query alone does.
DEDUP_MARGIN = 1e-4


def _clear_first_blocks(bundle, bodies: list[KnnRequest], rankeds: list) -> list[bool]:
    """Per query, True where it de-duplicates and no two of its first num_images candidates come within
    DEDUP_MARGIN of DEDUP_COSINE, so deduplicate() would keep them all (the usual case): their vectors read in
    one call and compared in one batched product."""
    import numpy as np

    out = [False] * len(bodies)
    if bundle.vectors is None:
        return out
    which = [j for j, (body, ranked) in enumerate(zip(bodies, rankeds, strict=True)) if body.deduplicate and ranked]
    if not which:
        return out
    sizes = [min(len(rankeds[j]), bodies[j].num_images) for j in which]
    rows = bundle.vector([i for j, size in zip(which, sizes, strict=True) for _, i in rankeds[j][:size]])
    most = max(sizes)
    if min(sizes) == most:
        blocks = rows.reshape(len(which), most, rows.shape[1])
    else:  # zero rows pad the shorter blocks: their products are 0, never near
        blocks = np.zeros((len(which), most, rows.shape[1]), dtype=np.float32)
        start = 0
        for b, size in enumerate(sizes):
            blocks[b, :size] = rows[start:start + size]
            start += size
    near = np.matmul(blocks, blocks.transpose(0, 2, 1)) >= DEDUP_COSINE - DEDUP_MARGIN
    for j, found in zip(which, np.triu(near, 1).any(axis=(1, 2)).tolist(), strict=True):
        out[j] = not found
    return out


def _knn_rows(bundle, bodies: list[KnnRequest], rankeds: list) -> list[list[dict]]:
    """Queries' (score, row id) pairs, best first -> their /knn-service rows: de-duplicated, metadata joined.
    Several queries of one bundle share one read of their candidates' vectors (_clear_first_blocks) and one
    of their metadata: each of these reads paid ~20 us of fixed cost per call on the caches a search had just
    emptied. A query alone goes straight to deduplicate(), which reads its first candidates once."""
    import numpy as np

    clear = _clear_first_blocks(bundle, bodies, rankeds) if len(bodies) > 1 else [False] * len(bodies)
    kept = []
    for body, ranked, no_duplicates in zip(bodies, rankeds, clear, strict=True):
        num = body.num_images
        if body.deduplicate and bundle.vectors is not None and ranked and not no_duplicates:
            found = [i for _, i in ranked]
            ranked = deduplicate(lambda start, stop, found=found: bundle.vector(found[start:stop]), ranked, num)
        kept.append(ranked[:num])
    ids = [i for ranked in kept for _, i in ranked]
    # numpy rounds the scores in one call, to the same values (a loop of round() cost ~16 us a query)
    similarity = np.round([s for ranked in kept for s, _ in ranked], 6).tolist()
    rows = bundle.rows(ids, json_values=True, extra={"id": ids, "similarity": similarity})
    for row in rows:  # clip-retrieval's client reads both, whatever the metadata (or a removed row) holds
        row.setdefault("url", None)
        row.setdefault("caption", None)
    out, start = [], 0
    for ranked in kept:
        out.append(rows[start:start + len(ranked)])
        start += len(ranked)
    return out


def deduplicate(rows_of, matches: list, keep: int, block: int | None = None) -> list:
    """clip-retrieval's de-duplication: best first, drop a result within DEDUP_COSINE of one already kept.
    rows_of(start, stop): the stored vectors (float32) of matches[start:stop].

    Candidates are taken a block at a time (``keep`` of them by default: without duplicates the first block
    is the answer, and only its rows are read): one product against the kept vectors and one within the
    block (never n x n), then a plain loop decides, stopping once ``keep`` are kept. A loop of one matrix
    product per candidate cost a knn request ~0.5 ms; a block of all candidates, twice the products needed."""
    import numpy as np

    block = max(1, block or keep)
    kept: list[int] = []
    kept_rows = None
    for start in range(0, len(matches), block):
        rows = rows_of(start, min(start + block, len(matches)))
        rows = rows if rows.dtype == np.float32 else rows.astype(np.float32)
        near_kept = ((rows @ kept_rows.T) >= DEDUP_COSINE).any(axis=1).tolist() if kept else [False] * len(rows)
        earlier: dict[int, list[int]] = {}
        for i, j in zip(*(x.tolist() for x in np.nonzero(rows @ rows.T >= DEDUP_COSINE)), strict=True):
            if j < i:
                earlier.setdefault(i, []).append(j)
        if not kept and not earlier:  # the usual first block: no near-duplicates, all of it is kept
            kept = list(range(start, start + min(len(rows), keep)))
            if len(kept) == keep:
                return matches[start:start + keep]
            kept_rows = rows
            continue
        kept_here: list[int] = []
        for i in range(len(rows)):
            if near_kept[i] or any(j in kept_here for j in earlier.get(i, ())):
                continue
            kept.append(start + i)
            kept_here.append(i)
            if len(kept) == keep:
                return [matches[k] for k in kept]
        here = rows.take(kept_here, axis=0)
        kept_rows = here if kept_rows is None else np.concatenate([kept_rows, here])
    return [matches[k] for k in kept]


def metadata(state: State, body: MetadataRequest) -> list[dict]:
    bundle = state.bundle(body.indice_name)
    bad = [i for i in body.ids if not 0 <= i < bundle.count]
    if bad:
        raise HTTPProblem(400, f"ids {bad[:5]} are outside index {bundle.id} (0..{bundle.count - 1})")
    return [{"id": i, "metadata": row} for i, row in zip(body.ids, bundle.rows(body.ids, json_values=True), strict=True)]


def check(state: State, blobs: list[bytes], options: CheckOptions, embeddings: list | None = None) -> dict:
    """/v1/check of uploaded images, or of precomputed embeddings (``embeddings``, one row per image)."""

    from ..core.result import GenerationRecord

    count = len(embeddings) if embeddings is not None else len(blobs)
    if not count:
        raise HTTPProblem(400, "no images: send them as multipart files named images, or JSON {\"images\": [base64]}")
    if count > state.config.max_images_per_request:
        raise HTTPProblem(413, f"{count} images in one request; at most {state.config.max_images_per_request}")
    names = options.indices or list(state.bundles)
    for n in names:
        state.bundle(n)
    policy = _check_policy(state, options)
    generation = options.generation
    if isinstance(generation, str) and generation.strip():
        try:
            generation = CheckOptions.model_validate({"generation": json.loads(generation)}).generation
        except (ValueError, ValidationError) as exc:
            raise HTTPProblem(422, f"generation: {exc}") from None
    records = generation if isinstance(generation, list) else [generation] * count
    if len(records) != count:
        raise HTTPProblem(400, f"{len(records)} generation records for {count} images")
    records = [GenerationRecord.from_json(r) if isinstance(r, dict) else None for r in records]
    checker = state.checker(tuple(names))
    models = {checker.model_for(b) for b in checker.open()}
    if len(models) != 1:
        raise HTTPProblem(400, f"indices {names} use different models ({sorted(models)}); check them in two requests")
    if embeddings is not None:
        if policy.views != "whole":
            raise HTTPProblem(400, f"views {policy.views!r} needs the images: an embedding is of the whole image "
                                   f"only; send the images, or views \"whole\"")
        vectors = unit_rows(embeddings, checker.open()[0].dim, "embeddings")
        results = checker.check_embeddings(vectors, records=records, policy=policy)
        for r in results:
            r.image["source"] = "embedding"
    else:
        for b in checker.open():
            state.model_batcher(b)
        batcher = state.batcher(models.pop())
        with state.decoded(blobs) as pixels:
            results = checker.check(pixels, records=records, policy=policy, embedder=batcher)
        for blob, r in zip(blobs, results, strict=True):
            r.image["sha256"] = hashlib.sha256(blob).hexdigest()
            r.image["source"] = "upload"
    state.metrics.verdicts(r.verdict for r in results)
    for timings in {tuple(sorted(r.timings_ms.items())) for r in results}:  # once per batch the core ran
        state.metrics.stages_ms(dict(timings))
    if state.audit:
        from ..core.audit import audit_entry

        source = "server upload" if embeddings is None else "server embedding"
        state.audit.append([audit_entry(r, source=source, user=options.user) for r in results])
    return {"results": [r.to_json() for r in results]}


def _check_policy(state: State, options: CheckOptions):
    """The Policy of a /v1/check: the request's options over the server's settings. views: "whole" unless the
    request asks for "multi" (every result says which ran, so a client can tell)."""
    from ..core.policy import Policy

    try:
        return Policy(warn=state.config.warn if options.warn is None else options.warn,
                      block=state.config.block if options.block is None else options.block,
                      fail_mode=options.fail_mode or state.config.fail_mode, top_k=options.top_k,
                      verify=options.verify or state.config.verify, verify_from=state.config.verify_from,
                      views=options.views or "whole")
    except ConfigError as exc:
        raise HTTPProblem(400, str(exc)) from None


def error_status(exc: ProvenanceError) -> int:
    """The HTTP status of an error a check raised: the server's own faults (its model, its bundle, its disk)
    are 503, never blamed on the request; a bad request is 400."""
    from ..core.errors import BundleError, DiskFullError, ModelLoadError

    if isinstance(exc, (ModelLoadError, BundleError, DiskFullError)):
        return 503
    return 400 if isinstance(exc, (ConfigError, ImageInputError)) else 500


_pools = threading.local()


def _one_thread_pools(fn, *args):
    """fn(*args) on a request thread whose FAISS OpenMP pool (and the BLAS inside FAISS, which follows it) is
    one thread. OpenMP's thread count belongs to each thread: _ready_app's limit holds for the main thread
    only, and every request thread started with a pool of one thread per core. FAISS opens no parallel
    region for a single query, but it does for a batch of them (several images in one check), and there
    pools of several threads spin and contend across request threads and worker processes."""
    _faiss_one_thread()
    return fn(*args)


def _faiss_one_thread() -> None:
    """This thread's FAISS OpenMP pool set to one thread (once per thread)."""
    if not getattr(_pools, "one", False):
        import faiss

        faiss.omp_set_num_threads(1)
        _pools.one = True


def cpu_count() -> int:
    """The CPUs this process may run on (a container's share, where the platform says)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def search_threads() -> int:
    return cpu_count() + 2

"""The FastAPI application of `provenance-guard serve`.

clip-retrieval back's API:
  GET  /indices-list                 -> ["name", ...]
  POST /knn-service  {indice_name, num_images, modality, one of text | image (base64) | image_url |
                      embedding_input, deduplicate, num_result_ids, ...}
                     -> [{id, similarity, url, caption, ...every metadata column}], best first. similarity is
                        the exact cosine (clip back returns the PQ estimate: an image scored 0.94 against
                        itself there). Options this server does not implement (safety model, violence
                        detector, aesthetic mixing, mclip) are ignored: no aesthetic vector is ever mixed in.
  POST /metadata     {indice_name, ids} -> [{id, metadata}]
This server's own:
  POST /v1/check     multipart (images=files..., indices, generation, top_k, warn, block, fail_mode) or JSON
                     {images: [base64...], ...} -> {"results": [check-result v1 ...]}
  GET  /v1/indices -> {name: {id, version, model, dim, rows, warn, block, exact, warm, faiss_rerank}}
  GET  /healthz, GET /metrics (Prometheus)
Every route but /healthz needs "Authorization: Bearer <token>" when a token is set; one must be set to
listen beyond loopback. Bodies over the size limit get 413; undecodable images 400; the server's own faults
(its model, its bundle, its disk) 503. The model image and text queries need is loaded, and checked against
each bundle's fingerprint, before the port listens (``--embeddings-only`` loads none and refuses them).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import ValidationError

from ..core.errors import ConfigError, ImageInputError, ProvenanceError
from .schemas import CheckOptions, CheckRequest, KnnRequest, MetadataRequest, problem_of

if TYPE_CHECKING:  # numpy is imported lazily: nothing heavy at import time
    import numpy as np

    from .dispatch import Link

log = logging.getLogger("provenance_guard.server")
DEDUP_COSINE = 0.94  # clip-retrieval's near-duplicate threshold for result de-duplication
IMAGE_URL_FAILED = "image_url could not be fetched"


@dataclass
class ServerConfig:
    indices: dict[str, str]
    token: Optional[str] = None
    allow_image_url: bool = False
    # Tests only: lets image_url reach loopback addresses (never private or link-local ones).
    allow_loopback_fetch: bool = False
    max_request_bytes: int = 20 << 20
    max_images_per_request: int = 64
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    device: str = "auto"
    audit_log: Optional[str] = None
    warn: Optional[float] = None
    block: Optional[float] = None
    fail_mode: str = "open"
    # Decoded image memory all requests together may hold; beyond it requests wait, then get 503.
    max_decode_memory: int = 2 << 30
    admission_wait_s: float = 10.0
    openapi: bool = False
    verify: str = "confirm+escalate"
    verify_from: Optional[float] = None
    references: Any = None  # core.references.ReferenceOptions
    # Processes serving the same socket; each maps the bundles (their pages are shared) and loads its own model.
    workers: int = 1
    # The model image and text queries are embedded with: None = each bundle's own; a local file or folder
    # holding the same weights (checked by the bundle's fingerprint before the port listens).
    model: Optional[str] = None
    # Serve embedding queries only: no model is loaded, image and text queries are refused.
    embeddings_only: bool = False
    metrics_dir: Optional[str] = None  # set by serve() for workers: where they share their counts
    metrics_name: Optional[str] = None  # set by serve() for each worker: its file in metrics_dir
    extra: dict[str, Any] = field(default_factory=dict)


class HTTPProblem(Exception):
    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class DecodeBudget:
    """Admits requests by the memory their images take decoded: a request waits until its share is free,
    and after ``wait_s`` gets 503 with Retry-After; one that could never fit gets 413. Large uploads then
    queue instead of taking the server out of memory."""

    def __init__(self, limit: int, wait_s: float, workers: int = 1):
        import threading

        # With N worker processes each admits limit / N: the server's whole decode memory stays bounded.
        self.limit, self.wait_s, self.used, self.workers = limit // max(1, workers), wait_s, 0, max(1, workers)
        self._cond = threading.Condition()

    def acquire(self, cost: int) -> int:
        if cost > self.limit:
            mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
            if self.workers == 1:
                raise HTTPProblem(413, f"the images of this request take {mib(cost)} decoded, more than this server "
                                       f"admits at once ({mib(self.limit)}); send fewer or smaller images")
            raise HTTPProblem(413, f"the images of this request take {mib(cost)} decoded, more than each of this "
                                   f"server's {self.workers} worker processes admits at once ({mib(self.limit)}, its "
                                   f"share of --max-decode-mb); send fewer or smaller images, or start the server "
                                   f"with a larger --max-decode-mb or fewer --workers")
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + cost <= self.limit, timeout=self.wait_s):
                raise HTTPProblem(503, "the server is busy decoding other images; retry shortly",
                                  {"Retry-After": str(max(1, int(self.wait_s)))})
            self.used += cost
        return cost

    def release(self, cost: int) -> None:
        with self._cond:
            self.used -= cost
            self._cond.notify_all()


def decode_cost(blobs: list[bytes]) -> int:
    """Bytes decoding these images will take (their own mode plus 8-bit RGB), read from headers only;
    undecodable headers cost nothing here (decoding refuses them)."""
    import io

    from PIL import Image

    from ..core.images import decode_bytes

    total = 0
    for blob in blobs:
        try:
            with Image.open(io.BytesIO(blob)) as img:
                total += decode_bytes(img.width, img.height, img.mode) + img.width * img.height * 3
        except Exception:  # noqa: BLE001 - decoding reports the image as bad
            continue
    return total


class State:
    """Opened bundles, their checkers, and one batcher per model. A new version of a bundle published at its
    path (``index remove`` after a takedown, ``append``) is served from the next request on."""

    def __init__(self, config: ServerConfig):
        import threading

        from ..core.audit import AuditLog, signer_from_env
        from .metrics import Metrics

        self.config = config
        self._tlock = threading.Lock()
        self._stamps: dict[str, Optional[tuple]] = {}
        self.bundles = {name: self._open(name) for name in config.indices}
        self.metrics = Metrics(config.metrics_dir, config.metrics_name)
        # Signed with the studio key when $PROVENANCE_GUARD_CREDENTIALS names one (as the CLI's logs are).
        self.audit = AuditLog(config.audit_log, signer_from_env()) if config.audit_log else None
        self._batchers: dict[str, Any] = {}
        self._checkers: dict[tuple, Any] = {}
        self.budget = DecodeBudget(config.max_decode_memory, config.admission_wait_s, config.workers)
        if not config.embeddings_only:
            self._load_models()
        self.fetcher = None
        if config.allow_image_url:
            from ..core.fetch import Fetcher, FetchPolicy

            self.fetcher = Fetcher(FetchPolicy(max_bytes=config.max_request_bytes,
                                               allow_loopback=config.allow_loopback_fetch),
                                   public=IMAGE_URL_FAILED)

    def _open(self, name: str):
        from ..core.bundle import Bundle, manifest_stamp

        path = self.config.indices[name]
        self._stamps[name] = manifest_stamp(path)
        bundle = Bundle.open(path)
        bundle.mapped_reads = True
        # Warm from the start, not at the first search: until warm, requests take the slower re-rank and
        # compete with the warm-up (1-2 s of a core per million rows: pages, the index's ids, norms) for the CPU.
        bundle.warm_up()
        return bundle

    def bundle(self, name: Optional[str]):
        if name is None and len(self.bundles) == 1:
            name = next(iter(self.bundles))
        if name not in self.bundles:
            raise HTTPProblem(404, f"unknown index {name!r}; GET /indices-list names the indices served")
        self._follow(name)
        return self.bundles[name]

    def _follow(self, name: str) -> None:
        from ..core.bundle import manifest_stamp
        from ..core.errors import BundleError

        if manifest_stamp(self.config.indices[name]) == self._stamps[name]:
            return
        with self._tlock:
            if manifest_stamp(self.config.indices[name]) == self._stamps[name]:
                return
            try:
                self.bundles[name] = self._open(name)
            except BundleError as exc:  # publishing is atomic, so a damaged copy: keep the last good one, say so once
                log.error("index %s: the new version at %s does not open (%s); still serving version %s",
                          name, self.config.indices[name], exc, self.bundles[name].version)
                return
            self._checkers = {k: v for k, v in self._checkers.items() if name not in k}

    def model_spec(self, bundle) -> str:
        return self.config.model or bundle.model

    def _load_models(self) -> None:
        """Every bundle's model, loaded and checked against the bundle's fingerprint before the port listens:
        a server that cannot embed says so at start, not to its first client."""
        from ..core.check import model_override_problem

        hint = ("give its weights with --model (a local file or folder holding them), or start with "
                "--embeddings-only to serve embedding queries alone")
        for name, bundle in self.bundles.items():
            spec = self.model_spec(bundle)
            problem = model_override_problem(bundle.model, spec)
            if problem:
                raise ConfigError(f"--model {spec}: cannot embed for index {name} ({problem}); {hint}")
            try:
                self.model_batcher(bundle)
            except ConfigError as exc:  # weights not found, not readable, an unknown architecture
                raise ConfigError(f"index {name}: its model {spec} could not be loaded ({exc}); {hint}") from None
            except HTTPProblem:
                raise ConfigError(f"index {name}: the weights at {spec} are not the ones its vectors were made "
                                  f"with (its fingerprint differs); {hint}") from None

    def batcher(self, model: str):
        from ..core.embed import get_embedder
        from .batcher import EmbedBatcher

        if self.config.embeddings_only:
            raise HTTPProblem(400, "this server serves embedding queries only (it was started with "
                                   "--embeddings-only): send embedding_input / embeddings, or check images locally")
        with self._tlock:
            if model not in self._batchers:
                self._batchers[model] = EmbedBatcher(get_embedder(model, self.config.device), self.config.max_batch,
                                                     self.config.batch_wait_ms, on_batch=self.metrics.batch)
            return self._batchers[model]

    def model_batcher(self, bundle):
        """The batcher of a bundle's model, once its weights are known to be the bundle's (its fingerprint):
        other weights are a server-side fault, answered 503 before anything is searched."""
        from ..core.fingerprint import ModelMismatchError, check_model

        batcher = self.batcher(self.model_spec(bundle))
        try:
            check_model(bundle, batcher.embedder)
        except ModelMismatchError as exc:
            log.error("index %s: %s", bundle.id, exc)
            raise HTTPProblem(503, f"the server's model for index {bundle.id} is not the one its vectors were made "
                                   f"with; the operator must give the bundle's own weights") from None
        return batcher

    def checker(self, names: tuple[str, ...]):
        from ..core.check import Checker

        for n in names:
            self._follow(n)
        with self._tlock:
            if names not in self._checkers:
                self._checkers[names] = Checker([self.bundles[n] for n in names], model=self.config.model,
                                                device=self.config.device, references=self.config.references)
            return self._checkers[names]

    def close(self) -> None:
        for b in self._batchers.values():
            b.close()
        if self.fetcher is not None:
            self.fetcher.close()

    def decoded(self, blobs: list[bytes]):
        """Context: admit blobs by their decoded size, decode them, release the budget (and the freed heap)."""
        from contextlib import contextmanager

        @contextmanager
        def admitted():
            cost = self.budget.acquire(decode_cost(blobs))
            try:
                yield _pixels(blobs)
            finally:
                self.budget.release(cost)
                if cost > 64 << 20:
                    from ..core.images import release_freed_memory

                    release_freed_memory()

        return admitted()


def _b64(data: str, what: str) -> bytes:
    try:
        if "," in data[:100] and data.lstrip().startswith("data:"):
            data = data.split(",", 1)[1]
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPProblem(400, f"{what} is not valid base64 ({exc})") from exc


def _pixels(blobs: list[bytes]):
    from ..core.images import to_pixels

    pixels = to_pixels(blobs)
    for n, p in enumerate(pixels):
        if isinstance(p, ImageInputError):
            raise HTTPProblem(400, f"image {n}: {p}")
    return pixels


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


def json_response(content: Any, status: int = 200, headers: Optional[dict[str, str]] = None) -> Response:
    return Response(json_body(content), status_code=status, headers=headers, media_type="application/json")


def unit_rows(rows: list, dim: int, field: str, of: str = "") -> "np.ndarray":
    """Request embeddings as unit float32 rows, each of the bundle's dimension, finite and non-zero."""
    import numpy as np

    if any(len(r) != dim for r in rows):
        bad = next(len(r) for r in rows if len(r) != dim)
        raise HTTPProblem(400, f"{field} has a vector of {bad} numbers; the bundle holds {dim}-d vectors{of}")
    from ..core.search import row_squares

    q = np.asarray(rows, dtype=np.float32).reshape(len(rows), dim)
    squares = row_squares(q)
    if not all(math.isfinite(x) and x > 0 for x in squares):
        raise HTTPProblem(400, f"{field} must hold finite, non-zero vectors")
    return q / np.sqrt(np.asarray(squares, dtype=np.float32))[:, None]


def knn(state: State, body: KnnRequest, fetched: Optional[bytes] = None) -> list[dict]:
    """clip-retrieval's /knn-service over one bundle, exact cosines. ``fetched``: the image_url's bytes,
    fetched by the route before this runs (so a slow URL holds no worker thread)."""
    from ..core.search import search_scores

    bundle = _knn_bundle(state, body)
    if body.embedding_input is not None:
        q = _knn_embedding(bundle, body)
    elif body.text:
        q = state.model_batcher(bundle).embedder.embed_text([body.text])
    elif body.image or fetched is not None:
        blob = _b64(body.image, "image") if body.image else fetched
        try:
            with state.decoded([blob]) as pixels:
                q = state.model_batcher(bundle).embed_pixels(pixels)
        except HTTPProblem as exc:
            if fetched is None or exc.status != 400:
                raise
            raise HTTPProblem(400, IMAGE_URL_FAILED) from None  # a fetched non-image reads like any failure
    else:
        raise HTTPProblem(400, "give one of text, image (base64), image_url or embedding_input")
    want = _knn_want(bundle, body)
    return _knn_rows(bundle, body, search_scores(bundle, q, want)[0])


def knn_many(state: State, bodies: list[KnnRequest], answer: Optional[Callable[[int, Any], None]] = None) -> list:
    """knn() of several embedding_input requests (SearchBatcher's fn): the queries of one bundle and count
    searched in one FAISS call (each query's candidates are the ones its own search finds). Per request its
    rows, or the exception its own knn() would raise; ``answer(n, rows or exception)`` is called with each
    as soon as it is ready (the batcher hands it to the waiting request while the others are worked on)."""
    import numpy as np

    from ..core.search import search_scores

    out: list = [None] * len(bodies)

    def done(n: int, value) -> None:
        out[n] = value
        if answer is not None:
            answer(n, value)

    groups: dict[tuple, list] = {}
    bundles: dict[tuple, Any] = {}  # one lookup (a stat of its manifest) per index and batch
    for n, body in enumerate(bodies):
        try:
            key = (body.indice_name, body.modality)
            bundle = bundles.get(key)
            if bundle is None:
                bundle = bundles[key] = _knn_bundle(state, body)
            q = _knn_embedding(bundle, body)
            groups.setdefault((id(bundle), _knn_want(bundle, body)), []).append((n, bundle, q))
        except Exception as exc:  # noqa: BLE001 - this request's answer; the others go on
            done(n, exc)
    for (_, want), members in sorted(groups.items(), key=lambda g: g[0][1]):  # the lightest answered first
        bundle = members[0][1]
        ranked = None
        if len(members) > 1 and _batch_exact(bundle):
            try:
                ranked = search_scores(bundle, np.concatenate([q for _, _, q in members]), want)
            except Exception:  # noqa: BLE001 - each query again on its own, so each gets its own outcome
                ranked = None
        for j, (n, _, q) in enumerate(members):
            try:
                rows = _knn_rows(bundle, bodies[n], ranked[j] if ranked is not None else
                                 search_scores(bundle, q, want)[0])
            except Exception as exc:  # noqa: BLE001
                rows = exc
            done(n, rows)
    return out


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


def _knn_embedding(bundle, body: KnnRequest) -> "np.ndarray":
    return unit_rows([body.embedding_input], bundle.dim, "embedding_input",
                     f" of index {bundle.id} ({bundle.model})")


def _knn_want(bundle, body: KnnRequest) -> int:
    """Candidates to search: with de-duplication, twice the results asked for (clip-retrieval's margin)."""
    return min(_knn_candidates(body), bundle.live_count)


def _knn_candidates(body: KnnRequest) -> int:
    num = body.num_images
    return max(num, body.num_result_ids or num) * 2 if body.deduplicate else num


def _knn_rows(bundle, body: KnnRequest, ranked: list) -> list[dict]:
    """One query's (score, row id) pairs, best first -> its /knn-service rows: de-duplicated, metadata joined."""
    num = body.num_images
    if body.deduplicate and bundle.vectors is not None and ranked:
        found = [i for _, i in ranked]
        ranked = deduplicate(lambda start, stop: bundle.vector(found[start:stop]), ranked, num)
    ranked = ranked[:num]
    ids = [i for _, i in ranked]
    rows = bundle.rows(ids, json_values=True, extra={"id": ids, "similarity": [round(s, 6) for s, _ in ranked]})
    for row in rows:  # clip-retrieval's client reads both, whatever the metadata (or a removed row) holds
        row.setdefault("url", None)
        row.setdefault("caption", None)
    return rows


def deduplicate(rows_of, matches: list, keep: int, block: Optional[int] = None) -> list:
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
        for i, j in zip(*(x.tolist() for x in np.nonzero(rows @ rows.T >= DEDUP_COSINE))):
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
    return [{"id": i, "metadata": row} for i, row in zip(body.ids, bundle.rows(body.ids, json_values=True))]


def check(state: State, blobs: list[bytes], options: CheckOptions, embeddings: Optional[list] = None) -> dict:
    """/v1/check of uploaded images, or of precomputed embeddings (``embeddings``, one row per image)."""

    from ..core.policy import Policy
    from ..core.result import GenerationRecord

    count = len(embeddings) if embeddings is not None else len(blobs)
    if not count:
        raise HTTPProblem(400, "no images: send them as multipart files named images, or JSON {\"images\": [base64]}")
    if count > state.config.max_images_per_request:
        raise HTTPProblem(413, f"{count} images in one request; at most {state.config.max_images_per_request}")
    names = options.indices or list(state.bundles)
    for n in names:
        state.bundle(n)
    try:
        policy = Policy(warn=state.config.warn if options.warn is None else options.warn,
                        block=state.config.block if options.block is None else options.block,
                        fail_mode=options.fail_mode or state.config.fail_mode, top_k=options.top_k,
                        verify=options.verify or state.config.verify, verify_from=state.config.verify_from)
    except ConfigError as exc:
        raise HTTPProblem(400, str(exc))
    generation = options.generation
    if isinstance(generation, str) and generation.strip():
        try:
            generation = CheckOptions.model_validate({"generation": json.loads(generation)}).generation
        except (ValueError, ValidationError) as exc:
            raise HTTPProblem(422, f"generation: {exc}")
    records = generation if isinstance(generation, list) else [generation] * count
    if len(records) != count:
        raise HTTPProblem(400, f"{len(records)} generation records for {count} images")
    records = [GenerationRecord.from_json(r) if isinstance(r, dict) else None for r in records]
    checker = state.checker(tuple(names))
    models = {checker.model_for(b) for b in checker.open()}
    if len(models) != 1:
        raise HTTPProblem(400, f"indices {names} use different models ({sorted(models)}); check them in two requests")
    if embeddings is not None:
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
        for blob, r in zip(blobs, results):
            r.image["sha256"] = hashlib.sha256(blob).hexdigest()
            r.image["source"] = "upload"
    state.metrics.verdicts(r.verdict for r in results)
    if state.audit:
        from ..core.audit import audit_entry

        source = "server upload" if embeddings is None else "server embedding"
        state.audit.append([audit_entry(r, source=source, user=options.user) for r in results])
    return {"results": [r.to_json() for r in results]}


def error_status(exc: ProvenanceError) -> int:
    """The HTTP status of an error a check raised: the server's own faults (its model, its bundle, its disk)
    are 503, never blamed on the request; a bad request is 400."""
    from ..core.errors import BundleError, DiskFullError, ModelLoadError

    if isinstance(exc, (ModelLoadError, BundleError, DiskFullError)):
        return 503
    return 400 if isinstance(exc, (ConfigError, ImageInputError)) else 500


def create_app(config: ServerConfig) -> Guard:
    """The server's ASGI app: Guard in front of the FastAPI app (``.app``) that holds the routes."""
    from contextlib import asynccontextmanager

    state = State(config)

    pools: dict[str, Any] = {}

    def searching():
        """The thread pool of requests that only search (metadata, checks of embeddings, /knn-service embedding
        queries too heavy for knn_batches): FAISS releases the GIL,
        the rest of a search holds it, so threads beyond a few per core only queue for it (40 threads served
        a fifth fewer knn requests than 4 on 2 cores, at a higher p99). A plain executor: handing a call to
        it and back costs the event loop ~50 us, anyio's to_thread ~110 us. Requests that embed images keep
        anyio's default pool: they wait on the model's batcher, and more of them make fuller batches."""
        if "search" not in pools:
            from concurrent.futures import ThreadPoolExecutor

            pools["search"] = ThreadPoolExecutor(search_threads(), thread_name_prefix="provenance-guard-search")
        return pools["search"]

    def knn_batches():
        """The batcher of /knn-service embedding queries (batcher.SearchBatcher): one search thread per core
        this worker process has to itself, batches of at most KNN_BATCH queries."""
        if "knn" not in pools:
            from .batcher import SearchBatcher

            pools["knn"] = SearchBatcher(lambda bodies, answer: knn_many(state, bodies, answer),
                                         max(1, cpu_count() // max(1, config.workers)), KNN_BATCH,
                                         setup=_faiss_one_thread, flush=KNN_FLUSH,
                                         on_batch=state.metrics.search_batch)
        return pools["knn"]

    @asynccontextmanager
    async def lifespan(_app):
        yield
        import asyncio

        loop = asyncio.get_running_loop()
        # Closed off the event loop (a request uvicorn cancelled after its grace period may still be
        # searching), then taken out: a request in between meets the closed one (503), never a new one, and a
        # later lifespan (an app served again) starts new ones.
        if "knn" in pools:
            await loop.run_in_executor(None, pools["knn"].close,
                                       lambda: HTTPProblem(503, "the server is shutting down; retry shortly"))
        if "search" in pools:
            await loop.run_in_executor(None, pools["search"].shutdown)
        pools.clear()
        state.close()

    # No /docs or /redoc: their pages load Swagger from a CDN. --openapi serves the schema itself.
    app = FastAPI(title="provenance-guard index server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if config.openapi else None)
    app.state.pg = state

    def problem(status: int, message: str, headers: Optional[dict[str, str]] = None):
        return json_response({"error": message}, status, headers)

    # The busy routes, called straight from Guard (filled in below), which wraps the whole FastAPI app:
    # FastAPI's routing and middleware layers (error page, telemetry, body limit) cost a knn request more
    # of the event loop than the rest of its handling.
    direct: dict[tuple[str, str], Any] = {}

    async def body_bytes(request: Request) -> bytes:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > config.max_request_bytes:
                raise HTTPProblem(413, f"request body is over the limit of {config.max_request_bytes:,} bytes")
        return bytes(data)

    async def parsed(request: Request, model):
        """The body as a typed model: malformed JSON is a 400, a bad field a 422 naming it and the limit."""
        raw = await body_bytes(request)
        try:
            return model.model_validate_json(raw or b"{}")
        except ValidationError as exc:
            kinds = {e.get("type") for e in exc.errors()}
            raise HTTPProblem(400 if kinds & {"json_invalid", "recursion_loop"} else 422, problem_of(exc))

    async def guarded(fn, *args, pool=None):
        if pool is not None:
            import asyncio

            return await answered(asyncio.get_running_loop().run_in_executor(pool, _one_thread_pools, fn, *args))
        import anyio.to_thread

        return await answered(anyio.to_thread.run_sync(_one_thread_pools, fn, *args))

    async def answered(awaitable):
        """The awaited result as a JSON response, or the error it raised as a problem response."""
        try:
            return json_response(await awaitable)
        except HTTPProblem as exc:
            return problem(exc.status, exc.message, exc.headers)
        except ProvenanceError as exc:
            return problem(error_status(exc), str(exc))

    async def fetched(url: str) -> bytes:
        """image_url's bytes through the server's small fetch pool, awaited without holding a worker thread."""
        import asyncio

        from ..core.fetch import FetchBusy, FetchError

        if state.fetcher is None:
            raise HTTPProblem(400, "image_url is off on this server (start it with --allow-image-url); send the "
                                   "image as base64 in \"image\"")
        try:
            future = state.fetcher.submit(url)
            return await asyncio.wait_for(asyncio.wrap_future(future), state.fetcher.policy.deadline + 1.0)
        except FetchBusy:
            raise HTTPProblem(503, IMAGE_URL_FAILED + ": too many fetches at once; retry shortly",
                              {"Retry-After": "5"}) from None
        except (FetchError, asyncio.TimeoutError) as exc:
            log.info("image_url %r not fetched: %s", url[:200], getattr(exc, "reason", "deadline passed"))
            raise HTTPProblem(400, IMAGE_URL_FAILED) from None

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "indices": len(state.bundles)}

    @app.get("/indices-list")
    async def indices_list():
        return list(state.bundles)

    @app.get("/v1/indices")
    async def indices_info():
        return {name: {"id": b.id, "version": b.version, "model": b.model, "dim": b.dim, "rows": b.live_count,
                       "warn": b.manifest.warn, "block": b.manifest.block, "exact": b.exact,
                       "warm": b.warm, "faiss_rerank": b.refine is not None}
                for name, b in state.bundles.items()}

    @app.post("/knn-service")
    async def knn_service(request: Request):
        try:
            body = await parsed(request, KnnRequest)
            blob = await fetched(body.image_url) if body.image_url and not (
                body.embedding_input or body.text or body.image) else None
        except HTTPProblem as exc:
            return problem(exc.status, exc.message, exc.headers)
        if knn_batched(body):
            return await answered(knn_batches().submit(body))
        return await guarded(knn, state, body, blob, pool=searching() if body.embedding_input else None)

    @app.post("/metadata")
    async def metadata_route(request: Request):
        try:
            body = await parsed(request, MetadataRequest)
        except HTTPProblem as exc:
            return problem(exc.status, exc.message, exc.headers)
        return await guarded(metadata, state, body, pool=searching())

    @app.post("/v1/check")
    async def check_route(request: Request):
        try:
            ctype = request.headers.get("content-type", "")
            if ctype.startswith("multipart/form-data"):
                raw = await body_bytes(request)

                async def replay():
                    return {"type": "http.request", "body": raw, "more_body": False}

                form = await Request(request.scope, replay).form(max_files=config.max_images_per_request + 1,
                                                                  max_fields=64)
                blobs = [await f.read() for f in form.getlist("images") if hasattr(f, "read")]
                fields = {k: v for k, v in form.items() if k != "images" and isinstance(v, str)}
                try:
                    options = CheckOptions.model_validate(fields)
                except ValidationError as exc:
                    raise HTTPProblem(422, problem_of(exc))
            else:
                body = await parsed(request, CheckRequest)
                count = len(body.images or body.embeddings)
                if count > config.max_images_per_request:
                    raise HTTPProblem(413, f"{count} images in one request; at most {config.max_images_per_request}")
                if body.embeddings is not None:
                    return await guarded(check, state, [], body, body.embeddings, pool=searching())
                blobs = [_b64(x, f"images[{n}]") for n, x in enumerate(body.images)]
                options = body
        except HTTPProblem as exc:
            return problem(exc.status, exc.message, exc.headers)
        except Exception as exc:  # noqa: BLE001 - a garbled multipart body
            return problem(400, f"the form could not be read: {exc}")
        return await guarded(check, state, blobs, options)

    direct.update({("POST", "/knn-service"): knn_service, ("POST", "/metadata"): metadata_route,
                   ("POST", "/v1/check"): check_route})

    @app.get("/metrics")
    async def metrics():
        gauges = {"provenance_guard_indices": len(state.bundles),
                  "provenance_guard_models_loaded": len(state._batchers)}
        gauges.update({f'provenance_guard_index_rows{{index="{n}"}}': b.live_count for n, b in state.bundles.items()})
        return PlainTextResponse(state.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    return Guard(app, config=config, metrics=state.metrics, problem=problem, direct=direct)


class Guard:
    """Token and declared-size checks before a request reaches a route, and request metrics after it.
    Plain ASGI: starlette's BaseHTTPMiddleware would run every request through an extra task and stream."""

    def __init__(self, app, config: ServerConfig, metrics, problem, direct: Optional[dict] = None):
        self.app, self.config, self.metrics, self.problem = app, config, metrics, problem
        self.direct = direct if direct is not None else {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self.refusal(path, dict(scope["headers"]))
            if refusal is not None:
                return await refusal(scope, receive, send_status)
            route = self.direct.get((scope["method"], path))
            if route is None:
                return await self.app(scope, receive, send_status)
            try:
                response = await route(Request(scope, receive))
            except Exception:  # noqa: BLE001 - what FastAPI's error middleware would do: log it, answer 500
                log.exception("%s %s failed", scope["method"], path)
                response = self.problem(500, "internal server error")
            await response(scope, receive, send_status)
        finally:
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"  # labels stay a bounded set
            self.metrics.request(path if path in KNOWN_PATHS else "other", method, status,
                                 time.perf_counter() - t0)

    def refusal(self, path: str, headers: dict):
        token, limit = self.config.token, self.config.max_request_bytes
        if token and path != "/healthz":
            header = headers.get(b"authorization", b"")
            given = header[7:] if header.lower().startswith(b"bearer ") else b""
            if not hmac.compare_digest(given, token.encode()):
                return self.problem(401, "missing or wrong token: send \"Authorization: Bearer <token>\"")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return self.problem(413, f"request body of {int(length):,} bytes is over the limit of {limit:,}")
        return None


KNOWN_METHODS = {"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"}
KNOWN_PATHS = {"/healthz", "/indices-list", "/v1/indices", "/knn-service", "/metadata", "/v1/check", "/metrics"}


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


# Queries per FAISS call of /knn-service. FAISS moves a flat or coarse search to BLAS only for larger batches
# (at 20 queries in older releases, 128,000 query values in 1.15), so 16 queries of at most 4,096 values
# each run the code a query runs alone. 8 and 16 cost about the same CPU per query; 16 lets a worker catch up.
KNN_BATCH = 16
KNN_BATCH_CANDIDATES = 200  # heavier /knn-service requests take the thread pool (knn_batched)
# Answers handed back to the event loop in groups of this many while the rest of the batch is worked on, so
# clients answered early send their next query during the batch. In alternating runs, groups of 4 cost a
# request 0.2-0.4 ms less CPU than one group per batch; one answer at a time woke the loop too often.
KNN_FLUSH = 4


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


MAX_WORKERS = 64
STARTUP_S = 300.0  # a worker that has not opened its bundles by then is stopped as failed
WORKER_COMMAND = "serve-worker"  # the hidden CLI command a worker process runs (see serve_workers)
RESTART_MAX_S = 60.0  # a worker that keeps dying is restarted after 1, 2, 4 ... at most this many seconds
STEADY_S = 60.0  # a worker that has served this long starts its slot's back-off from 1 s again
STOP_S = 30.0  # graceful shutdown: how long all workers together get to finish their requests


def serve(config: ServerConfig, host: str, port: int, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests finish (graceful shutdown), then uvicorn
    re-raises the signal, so the process ends as killed by it, as service managers expect.

    With ``config.workers`` > 1 this process supervises that many worker processes (``serve_workers``)."""
    import uvicorn

    if not config.token and not is_loopback(host):
        raise ConfigError(f"listening on {host} (beyond this machine) needs a token: pass --token or set "
                          f"PROVENANCE_GUARD_TOKEN, and send it as 'Authorization: Bearer <token>'")
    if not 1 <= config.workers <= MAX_WORKERS:
        raise ConfigError(f"--workers {config.workers}: give 1 to {MAX_WORKERS} (one per CPU core serves the most)")
    if config.workers > 1:
        return serve_workers(config, host, port, log_level)
    app = _ready_app(config)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=15,
                                  access_log=False)).run()


class _Worker:
    """One worker process of serve_workers, as its supervisor sees it."""

    def __init__(self, proc, ready_fd: int, name: str, link: Link):
        self.proc, self.ready_fd, self.name, self.link = proc, ready_fd, name, link
        self.started = time.monotonic()
        self.ready_at: Optional[float] = None

    def poll_ready(self) -> bool:
        import os

        if self.ready_at is None and self.ready_fd >= 0:
            try:
                if os.read(self.ready_fd, 1):
                    self.ready_at = time.monotonic()
            except BlockingIOError:
                return False
            os.close(self.ready_fd)  # ready, or the worker closed its end without being ready
            self.ready_fd = -1
        return self.ready_at is not None

    def close(self) -> None:
        """The supervisor's ends of an ended worker's pipes and link."""
        import os

        self.link.close()
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if self.ready_fd >= 0:
            os.close(self.ready_fd)
            self.ready_fd = -1


def serve_workers(config: ServerConfig, host: str, port: int, log_level: str) -> None:
    """Worker processes behind one listening socket that this supervisor accepts on: each connection goes to
    the worker with the fewest open ones (``dispatch``). (One shared socket, as uvicorn's --workers has, let
    one worker accept most of a burst of keep-alive connections: 4,749 requests against 1,908 in one P4 run;
    a SO_REUSEPORT socket per worker split 32 of them 18/14.)

    Each worker is this package run again (``python <package folder> serve-worker``, the way a clone that pip
    did not install runs too), with its settings on stdin, which stays open: a worker whose stdin ends (its
    supervisor is gone, even SIGKILLed) shuts down. It opens the bundles itself (memory-mapped: their pages
    are shared through the page cache), loads its own model for image checks, and signals ready on a pipe.
    Workers sum their metrics through a private folder. A worker that fails before every worker has first
    been ready stops the server with its error (exit code 2: the same cause would stop every replacement);
    one that ends after serving is replaced, after 1, 2, 4 ... RESTART_MAX_S seconds if it keeps ending, and
    so is a replacement that cannot start. SIGINT/SIGTERM/SIGHUP: every worker finishes its in-flight
    requests, then the signal is raised again here, as single-process serving does."""
    import os
    import secrets
    import select
    import shutil
    import signal
    import subprocess
    import tempfile
    from dataclasses import asdict
    from pathlib import Path

    from . import dispatch
    from .metrics import retire

    if not dispatch.supported():
        raise ConfigError("--workers needs sockets passed between processes (Linux, macOS, BSD); run one server "
                          "per port instead")
    listener = _bind_port(host, port)
    port = listener.getsockname()[1]
    _remove_stale_metrics()
    # mode 0700: this user's workers only; the supervisor's pid in the name lets a later start remove it
    # when this process could not (SIGKILL)
    folder = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-")
    package = str(Path(__file__).resolve().parent.parent)
    flags = getattr(subprocess, "_args_from_interpreter_flags", list)()  # -I, -X ..., -W ... as this process has
    settings = {"config": {**asdict(config), "metrics_dir": folder}, "log_level": log_level}
    stopping: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:  # a background job ignores SIGINT
            previous[sig] = signal.signal(sig, lambda sig, _frame: stopping.append(sig))

    def start() -> _Worker:
        ours, theirs = dispatch.link_pair()
        try:
            read_fd, write_fd = os.pipe()
        except OSError:
            ours.close()
            theirs.close()
            raise
        os.set_blocking(read_fd, False)
        name = f"w{secrets.token_hex(6)}"
        proc = None
        try:
            # A session of its own: a terminal's Ctrl-C reaches this supervisor, which stops the workers in order.
            proc = subprocess.Popen([sys.executable, *flags, package, WORKER_COMMAND], stdin=subprocess.PIPE,
                                    pass_fds=(write_fd, theirs.fileno()), start_new_session=True)
            proc.stdin.write((json.dumps({**settings, "ready_fd": write_fd, "link_fd": theirs.fileno(),
                                          "name": name}) + "\n").encode())
            proc.stdin.flush()
        except BaseException:
            os.close(read_fd)
            ours.close()
            if proc is not None:
                proc.kill()
                proc.wait()
            raise
        finally:
            os.close(write_fd)
            theirs.close()
        return _Worker(proc, read_fd, name, dispatch.Link(ours))

    turn, accept_again, dropping = 0, 0.0, False

    def handle_connections(seconds: float) -> None:
        """Hand over connections and read the workers' closed ones for `seconds` (a signal is seen at the
        next pass: select is resumed after its handler, within `seconds`)."""
        nonlocal turn, accept_again, dropping
        deadline = time.monotonic() + seconds
        while not stopping and (left := deadline - time.monotonic()) > 0:
            ready = [w for w in workers if w is not None and w.ready_at is not None and w.link.sock is not None]
            # The listener listens once every worker has been ready (serving). While no worker is (all are
            # being replaced) connections are closed at once rather than left waiting in the backlog.
            accepting = serving and time.monotonic() >= accept_again
            watched = [w.link.sock for w in ready] + ([listener] if accepting else [])
            if not watched:
                time.sleep(min(left, 0.05))
                continue
            readable, _, _ = select.select(watched, [], [], left)
            for w in ready:
                if w.link.sock in readable:
                    w.link.read()
            if listener in readable:
                turn, dropped, error = dispatch.accept_and_hand(listener, [w.link for w in ready], turn)
                if error is not None:  # out of descriptors, say: the backlog keeps the rest for a second
                    log.warning("cannot accept connections (%s); trying again in 1 s", error)
                    accept_again = time.monotonic() + 1.0
                if dropped and not dropping:
                    log.warning("no server worker can take connections now: they are closed until one can")
                dropping = bool(dropped)

    workers: list[Optional[_Worker]] = []
    delay = [0.0] * config.workers
    restart_at = [0.0] * config.workers
    serving = False  # every worker has been ready once: from then on an ended worker is restarted
    failure = None
    try:
        for _ in range(config.workers):
            workers.append(start())
        while not stopping and failure is None:
            handle_connections(0.2)
            now = time.monotonic()
            for n, w in enumerate(workers):
                if stopping:
                    break
                if w is None:
                    if now >= restart_at[n]:
                        try:
                            workers[n] = start()
                        except OSError as exc:  # out of processes or files, the interpreter gone: later
                            delay[n] = min(RESTART_MAX_S, max(1.0, delay[n] * 2))
                            restart_at[n] = now + delay[n]
                            log.warning("cannot start a server worker (%s); trying again in %.0f s", exc, delay[n])
                    continue
                ready = w.poll_ready()
                if w.proc.poll() is None:
                    if ready and now - w.ready_at > STEADY_S:
                        delay[n] = 0.0
                    elif not ready and now - w.started > STARTUP_S:
                        log.warning("server worker %s did not start within %.0f s; stopping it", w.proc.pid, STARTUP_S)
                        w.proc.kill()
                    continue
                ready = w.poll_ready()  # a ready byte written just before it ended still counts
                w.close()
                retire(folder, w.name)  # its counts stay in the sums
                if not serving and not ready:
                    failure = f"a server worker did not start (exit code {w.proc.returncode}): see its error above"
                    break
                delay[n] = min(RESTART_MAX_S, max(1.0, delay[n] * 2))
                log.warning("server worker %s %s (exit code %s); starting another in %.0f s", w.proc.pid,
                            "ended" if ready else "did not start", w.proc.returncode, delay[n])
                workers[n], restart_at[n] = None, now + delay[n]
            if not serving and all(w is not None and w.ready_at is not None for w in workers):
                try:
                    listener.listen(2048)
                except OSError as exc:  # a server that bound the port beside this one's and listened first
                    failure = f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port"
                    break
                serving = True
                print(f"serving on http://{host}:{port} with {len(workers)} worker processes", file=sys.stderr,
                      flush=True)
    finally:
        listener.close()  # new connections are refused while the workers finish theirs
        _stop_workers([w for w in workers if w is not None])
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        shutil.rmtree(folder, ignore_errors=True)
    if stopping:
        signal.raise_signal(stopping[0])  # as uvicorn does: the process ends as the signal says
        sys.exit(128 + stopping[0])  # a handler (SIGINT's raises KeyboardInterrupt) that let the process go on
    if failure:
        raise ConfigError(failure)


METRICS_PREFIX = "provenance-guard-metrics-"


def _bind_port(host: str, port: int):
    """The supervisor's socket, bound and non-blocking, which keeps the port this server's while workers come
    and go; it listens once every worker is ready (until then clients are refused, not kept waiting). A port
    another process listens on is refused, also where BSD or macOS would let it bind beside a listener on
    another address."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        # SO_REUSEADDR on Linux: a listener conflicts, TIME_WAIT leftovers of a server that just stopped do not.
        # BSD/macOS let such a socket bind beside a listener on another address: probe without it there.
        probes = [(host, sys.platform.startswith("linux"))]
        if not sys.platform.startswith("linux") and host not in ("0.0.0.0", "::"):
            probes.append(("::" if family == socket.AF_INET6 else "0.0.0.0", False))
        for address, reuse in probes:
            try:
                with socket.socket(family, socket.SOCK_STREAM) as probe:
                    if reuse:
                        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind((address, port))
            except OSError as exc:
                raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); another server holds it: "
                                  f"choose another --port") from exc
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))  # port 0: the kernel picks a free one, read back by the caller
    except OSError as exc:
        listener.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from exc
    listener.setblocking(False)
    return listener


def _remove_stale_metrics() -> None:
    """Metrics folders of this user's supervisors that are gone (killed before they could remove them)."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    for folder in Path(tempfile.gettempdir()).glob(f"{METRICS_PREFIX}*-*"):
        pid = folder.name[len(METRICS_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or folder.stat().st_uid != os.getuid() or not folder.is_dir():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue  # alive (another user's pid) or not ours to judge


def _stop_workers(workers: list) -> None:
    """Graceful shutdown of all workers at once (SIGTERM, then STOP_S for all together), then SIGKILL."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.terminate()
    deadline = time.monotonic() + STOP_S
    for w in workers:
        try:
            w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
            w.proc.kill()
            w.proc.wait()
        w.close()


def worker_main() -> int:
    """A worker process of serve_workers (``provenance-guard serve-worker``): its settings come as one JSON
    line on stdin; the app, then ready on its pipe, then the connections its supervisor hands over its link."""
    import os
    import signal
    import socket
    import threading

    import uvicorn

    from ..core.references import ReferenceOptions
    from .dispatch import HandedServer

    usage = "provenance-guard: serve-worker: a worker process of 'provenance-guard serve --workers N', not run by hand"
    if sys.stdin.isatty():
        print(usage, file=sys.stderr)
        return 2
    try:
        settings = json.loads(_read_line(0, MAX_SETTINGS_BYTES))
        data = dict(settings["config"])
        refs = data.pop("references", None)
        data["metrics_name"] = str(settings["name"])
        config = ServerConfig(**data, references=ReferenceOptions(**refs) if refs is not None else None)
        ready_fd, link_fd = int(settings["ready_fd"]), int(settings["link_fd"])
        log_level = str(settings["log_level"])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        print(f"{usage} ({exc})", file=sys.stderr)
        return 2
    os.set_inheritable(ready_fd, False)  # nothing this worker starts keeps its supervisor waiting
    try:
        link = socket.socket(fileno=link_fd)
        if link.family != socket.AF_UNIX:
            raise OSError(f"descriptor {link_fd} is not a Unix socket")
    except OSError as exc:
        print(f"{usage} (link: {exc})", file=sys.stderr)
        return 2
    link.set_inheritable(False)

    def orphaned():
        # os.read, not sys.stdin: a thread blocked in a buffered read holds its lock, and the interpreter
        # aborts at exit when it cannot take it.
        while os.read(0, 4096):
            pass
        os.kill(os.getpid(), signal.SIGTERM)  # the supervisor is gone: finish in-flight requests, then exit

    threading.Thread(target=orphaned, name="provenance-guard-supervisor", daemon=True).start()
    try:
        app = _ready_app(config)
    except (ProvenanceError, OSError) as exc:  # the CLI's one-line message, not a worker's traceback
        print(f"provenance-guard: worker: error: {exc}", file=sys.stderr, flush=True)
        return 2
    os.write(ready_fd, b"r")
    os.close(ready_fd)
    HandedServer(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=15, access_log=False),
                 link).run()
    return 0


MAX_SETTINGS_BYTES = 16 << 20


def _read_line(fd: int, limit: int) -> bytes:
    """One line from fd, read unbuffered (stdin stays free for the thread that waits for its end)."""
    import os

    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise ValueError(f"settings over {limit:,} bytes")
    return bytes(data)


def _ready_app(config: ServerConfig):
    import gc

    from threadpoolctl import threadpool_limits

    app = create_app(config)
    # Concurrency here comes from requests, each on its own thread: numpy's and faiss's BLAS and OpenMP pools
    # of one. Pools of N spin between calls and contend across request threads (40% of the CPU of a knn
    # request on 2 cores). Libraries loaded later (torch, for /v1/check) keep their own pools for batches.
    threadpool_limits(1)
    # The opened bundles, models and libraries never become garbage: keep them out of every collection
    # (full collections over them were a tenth of the server's time under load).
    gc.freeze()
    return app

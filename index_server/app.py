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
  POST /v1/check     multipart (images=files..., indices, generation, top_k, warn, block, fail_mode, verify,
                     views) or JSON
                     {images: [base64...], ...} -> {"results": [check-result v1 ...]}
  GET  /v1/indices -> {name: {id, version, model, dim, rows, warn, block, exact, warm, faiss_rerank}}
  GET  /healthz, GET /metrics (Prometheus)
Every route but /healthz needs "Authorization: Bearer <token>" when a token is set; one must be set to
listen beyond loopback. Bodies over the size limit get 413; undecodable images 400; the server's own faults
(its model, its bundle, its disk) 503. The model image and text queries need is loaded, and checked against
each bundle's fingerprint, before the port listens (``--embeddings-only`` loads none and refuses them).
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError

from ..core.errors import ProvenanceError
from .config import HTTPProblem, ServerConfig
from .handlers import (KNN_BATCH, KNN_FLUSH, _b64, _faiss_one_thread, _one_thread_pools, check, cpu_count,
                       error_status, json_response, knn, knn_batched, knn_many, metadata, search_threads)
from .middleware import Guard
from .schemas import CheckOptions, CheckRequest, KnnRequest, MetadataRequest, problem_of
from .state import IMAGE_URL_FAILED, State

log = logging.getLogger("provenance_guard.server")


def create_app(config: ServerConfig) -> Guard:
    """The server's ASGI app: Guard in front of the FastAPI app (``.app``) that holds the routes."""
    from contextlib import asynccontextmanager

    state = State(config)
    routes = Routes(state)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await routes.close()

    # No /docs or /redoc: their pages load Swagger from a CDN. --openapi serves the schema itself.
    app = FastAPI(title="provenance-guard index server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if config.openapi else None)
    app.state.pg = state
    for method, path, route in (("GET", "/healthz", routes.healthz), ("GET", "/indices-list", routes.indices_list),
                                ("GET", "/v1/indices", routes.indices_info), ("GET", "/metrics", routes.metrics),
                                ("POST", "/knn-service", routes.knn_service), ("POST", "/metadata", routes.metadata),
                                ("POST", "/v1/check", routes.check)):
        app.add_api_route(path, route, methods=[method])
    # The busy routes are called straight from Guard, which wraps the whole FastAPI app: FastAPI's routing and
    # middleware layers (error page, telemetry, body limit) cost a knn request more of the event loop than
    # the rest of its handling.
    direct = {("POST", "/knn-service"): routes.knn_service, ("POST", "/metadata"): routes.metadata,
              ("POST", "/v1/check"): routes.check}
    return Guard(app, config=config, metrics=state.metrics, problem=problem, direct=direct)


def problem(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


class Routes:
    """The routes of one app: each reads its request, hands the work to a handler off the event loop, and
    answers its result or its error. Holds the app's thread pool and search batcher (made on first use,
    closed with the app's lifespan)."""

    def __init__(self, state: State):
        self.state, self.config = state, state.config
        self.pools: dict[str, Any] = {}

    def searching(self):
        """The thread pool of requests that only search (metadata, checks of embeddings, /knn-service embedding
        queries too heavy for knn_batches): FAISS releases the GIL, the rest of a search holds it, so threads
        beyond a few per core only queue for it (40 threads served a fifth fewer knn requests than 4 on 2
        cores, at a higher p99). A plain executor: handing a call to it and back costs the event loop ~50 us,
        anyio's to_thread ~110 us. Requests that embed images keep anyio's default pool: they wait on the
        model's batcher, and more of them make fuller batches."""
        if "search" not in self.pools:
            from concurrent.futures import ThreadPoolExecutor

            self.pools["search"] = ThreadPoolExecutor(search_threads(), thread_name_prefix="provenance-guard-search")
        return self.pools["search"]

    def knn_batches(self):
        """The batcher of /knn-service embedding queries (batcher.SearchBatcher): one search thread per core
        this worker process has to itself, batches of at most KNN_BATCH queries."""
        if "knn" not in self.pools:
            from .batcher import SearchBatcher

            state = self.state
            self.pools["knn"] = SearchBatcher(lambda bodies, answer: knn_many(state, bodies, answer),
                                              max(1, cpu_count() // max(1, self.config.workers)), KNN_BATCH,
                                              setup=_faiss_one_thread, flush=KNN_FLUSH,
                                              on_batch=state.metrics.search_batch)
        return self.pools["knn"]

    async def close(self) -> None:
        """The lifespan's end. The batcher and pool are closed off the event loop (a request uvicorn cancelled
        after its grace period may still be searching), then taken out: a request in between meets the closed
        one (503), never a new one, and a later lifespan (an app served again) starts new ones."""
        import asyncio

        loop = asyncio.get_running_loop()
        if "knn" in self.pools:
            await loop.run_in_executor(None, self.pools["knn"].close,
                                       lambda: HTTPProblem(503, "the server is shutting down; retry shortly"))
        if "search" in self.pools:
            await loop.run_in_executor(None, self.pools["search"].shutdown)
        self.pools.clear()
        self.state.close()

    # reading requests -------------------------------------------------------------------------------------
    async def body_bytes(self, request: Request) -> bytes:
        """The body, at most max_request_bytes, all of it within body_timeout_s (a trickling client gets 408
        and holds nothing longer)."""
        import anyio

        limit = self.config.max_request_bytes
        data = bytearray()
        with anyio.move_on_after(self.config.body_timeout_s) as deadline:
            async for chunk in request.stream():
                data += chunk
                if len(data) > limit:
                    raise HTTPProblem(413, f"request body is over the limit of {limit:,} bytes")
        if deadline.cancelled_caught:
            raise HTTPProblem(408, f"the request body did not arrive within {self.config.body_timeout_s:g} s",
                              {"Connection": "close"})
        return bytes(data)

    async def parsed(self, request: Request, model):
        """The body as a typed model: malformed JSON is a 400, a bad field a 422 naming it and the limit."""
        raw = await self.body_bytes(request)
        try:
            return model.model_validate_json(raw or b"{}")
        except ValidationError as exc:
            kinds = {e.get("type") for e in exc.errors()}
            raise HTTPProblem(400 if kinds & {"json_invalid", "recursion_loop"} else 422, problem_of(exc)) from None

    async def fetched(self, url: str) -> bytes:
        """image_url's bytes through the server's small fetch pool, awaited without holding a worker thread."""
        import asyncio

        from ..core.fetch import FetchBusy, FetchError

        fetcher = self.state.fetcher
        if fetcher is None:
            raise HTTPProblem(400, "image_url is off on this server (start it with --allow-image-url); send the "
                                   "image as base64 in \"image\"")
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fetcher.submit(url)), fetcher.policy.deadline + 1.0)
        except FetchBusy:
            raise HTTPProblem(503, IMAGE_URL_FAILED + ": too many fetches at once; retry shortly",
                              {"Retry-After": "5"}) from None
        except (FetchError, asyncio.TimeoutError) as exc:
            log.info("image_url %r not fetched: %s", url[:200], getattr(exc, "reason", "deadline passed"))
            raise HTTPProblem(400, IMAGE_URL_FAILED) from None

    # answering ------------------------------------------------------------------------------------------
    async def guarded(self, fn, *args, pool=None):
        """fn(*args) on a request thread (``pool``, or anyio's), answered as JSON or as its error."""
        if pool is not None:
            import asyncio

            return await self.answered(asyncio.get_running_loop().run_in_executor(pool, _one_thread_pools, fn, *args))
        import anyio.to_thread

        return await self.answered(anyio.to_thread.run_sync(_one_thread_pools, fn, *args))

    @staticmethod
    async def answered(awaitable):
        """The awaited result as a JSON response, or the error it raised as a problem response."""
        try:
            return json_response(await awaitable)
        except HTTPProblem as exc:
            return problem(exc.status, exc.message, exc.headers)
        except ProvenanceError as exc:
            return problem(error_status(exc), str(exc))

    # the routes -------------------------------------------------------------------------------------------
    async def healthz(self):
        return {"status": "ok", "indices": len(self.state.bundles)}

    async def indices_list(self):
        return list(self.state.bundles)

    async def indices_info(self):
        return {name: {"id": b.id, "version": b.version, "model": b.model, "dim": b.dim, "rows": b.live_count,
                       "warn": b.manifest.warn, "block": b.manifest.block, "exact": b.exact,
                       "warm": b.warm, "faiss_rerank": b.refine is not None}
                for name, b in self.state.bundles.items()}

    async def metrics(self):
        from .metrics import CONTENT_TYPE

        return Response(self.state.metrics.render(), media_type=CONTENT_TYPE)

    async def knn_service(self, request: Request):
        try:
            body = await self.parsed(request, KnnRequest)
            blob = await self.fetched(body.image_url) if body.image_url and not (
                body.embedding_input or body.text or body.image) else None
        except HTTPProblem as exc:
            return problem(exc.status, exc.message, exc.headers)
        if knn_batched(body):
            return await self.answered(self.knn_batches().submit(body))
        return await self.guarded(knn, self.state, body, blob,
                                  pool=self.searching() if body.embedding_input else None)

    async def metadata(self, request: Request):
        try:
            body = await self.parsed(request, MetadataRequest)
        except HTTPProblem as exc:
            return problem(exc.status, exc.message, exc.headers)
        return await self.guarded(metadata, self.state, body, pool=self.searching())

    async def check(self, request: Request):
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                blobs, options = await self.form(request)
            else:
                body = await self.parsed(request, CheckRequest)
                count = len(body.images or body.embeddings)
                if count > self.config.max_images_per_request:
                    raise HTTPProblem(413, f"{count} images in one request; at most "
                                           f"{self.config.max_images_per_request}")
                if body.embeddings is not None:
                    return await self.guarded(check, self.state, [], body, body.embeddings, pool=self.searching())
                blobs, options = [_b64(x, f"images[{n}]") for n, x in enumerate(body.images)], body
        except HTTPProblem as exc:
            return problem(exc.status, exc.message, exc.headers)
        except Exception as exc:  # noqa: BLE001 - a garbled multipart body
            return problem(400, f"the form could not be read: {exc}")
        return await self.guarded(check, self.state, blobs, options)

    async def form(self, request: Request) -> tuple[list[bytes], CheckOptions]:
        """A multipart /v1/check: its images and options (the body read under the same limits as JSON)."""
        raw = await self.body_bytes(request)

        async def replay():
            return {"type": "http.request", "body": raw, "more_body": False}

        form = await Request(request.scope, replay).form(max_files=self.config.max_images_per_request + 1,
                                                          max_fields=64)
        blobs = [await f.read() for f in form.getlist("images") if hasattr(f, "read")]
        fields = {k: v for k, v in form.items() if k != "images" and isinstance(v, str)}
        try:
            return blobs, CheckOptions.model_validate(fields)
        except ValidationError as exc:
            raise HTTPProblem(422, problem_of(exc)) from None

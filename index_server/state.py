"""What a server process holds: the opened bundles (followed when republished), one model batcher per model
(loaded and checked against each bundle's fingerprint before the port listens), the checkers, the decode
memory budget, the audit log and the image_url fetcher."""
from __future__ import annotations

import logging
import time
from typing import Any

from ..core.errors import ConfigError, ImageInputError
from .config import HTTPProblem, ServerConfig

log = logging.getLogger("provenance_guard.server")
IMAGE_URL_FAILED = "image_url could not be fetched"


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
        self._stamps: dict[str, tuple | None] = {}
        self.bundles = {name: self._open(name) for name in config.indices}
        self.metrics = Metrics(self.gauges)
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

    def gauges(self) -> dict[str, tuple]:
        """What this process serves, for /metrics: {name: (help, {labels: value}, label names)}."""
        return {"provenance_guard_indices": ("Indices served.", {(): len(self.bundles)}, ()),
                "provenance_guard_models_loaded": ("Models loaded.", {(): len(self._batchers)}, ()),
                "provenance_guard_index_rows": ("Live rows per index.",
                                                {(n,): b.live_count for n, b in self.bundles.items()}, ("index",))}

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

    def bundle(self, name: str | None):
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
        self.metrics.close()
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
                t0 = time.perf_counter()
                pixels = _pixels(blobs)
                self.metrics.stage("decode", time.perf_counter() - t0)
                yield pixels
            finally:
                self.budget.release(cost)
                if cost > 64 << 20:
                    from ..core.images import release_freed_memory

                    release_freed_memory()

        return admitted()



def _pixels(blobs: list[bytes]):
    from ..core.images import to_pixels

    pixels = to_pixels(blobs)
    for n, p in enumerate(pixels):
        if isinstance(p, ImageInputError):
            raise HTTPProblem(400, f"image {n}: {p}")
    return pixels



"""The server's Prometheus metrics, kept and written by prometheus_client.

One process: the metrics live in the app's own registry. With ``--workers N`` the server runs
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by index_server.processes before
any worker starts): each worker writes its values to its own files there, and whichever worker answers
GET /metrics sums them all (a worker that ended keeps its counts). The gauges that describe what is
served (indices, their rows, the models loaded) are read from the answering worker at scrape time.
Label values (an operator's index name among them) are escaped by the library.
"""
from __future__ import annotations

import os
from typing import Any
from collections.abc import Callable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The stages of a request: decode (images to pixels), embed (the model), search (FAISS), rerank (exact
# cosines), metadata (the rows joined to the results), verify (pixels of the training images).
STAGES = ("decode", "embed", "search", "rerank", "metadata", "verify")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """The server's counters and histograms. ``gauges``: called at each scrape, it returns the served
    state as {metric name: (help, {label tuple: value}, label names)}."""

    def __init__(self, gauges: Callable[[], dict[str, tuple]] | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self._gauges = gauges
        self._children: dict[tuple, Any] = {}
        # In multiprocess mode the values go to this worker's files; the scrape reads them all (render).
        reg = None if multiprocess() else self.registry
        self._requests = Counter("provenance_guard_requests", "HTTP requests by path, method and status.",
                                 ("path", "method", "status"), registry=reg)
        self._latency = Histogram("provenance_guard_request_seconds", "Request latency.", ("path",),
                                  buckets=LATENCY_BUCKETS, registry=reg)
        self._stages = Histogram("provenance_guard_stage_seconds", "Time per stage of a request (decode, embed, "
                                 "search, rerank, metadata, verify).", ("stage",), buckets=LATENCY_BUCKETS,
                                 registry=reg)
        self._in_progress = Gauge("provenance_guard_requests_in_progress", "Requests being served, by path.",
                                  ("path",), multiprocess_mode="livesum", registry=reg)
        self._checks = Counter("provenance_guard_checks", "Images checked, by verdict.", ("verdict",), registry=reg)
        self._batches = Counter("provenance_guard_embed_batches", "Forward passes of the model.", registry=reg)
        self._batch_images = Counter("provenance_guard_embed_batch_images", "Images through the model.",
                                     registry=reg)
        self._search_batches = Counter("provenance_guard_search_batches",
                                       "/knn-service embedding searches run together.", registry=reg)
        self._search_queries = Counter("provenance_guard_search_batch_queries",
                                       "Queries in those searches.", registry=reg)
        if gauges is not None:
            self.registry.register(_Gauges(gauges))
        if multiprocess():
            from prometheus_client import multiprocess as mp

            mp.MultiProcessCollector(self.registry)

    def _child(self, metric, *labels):
        """metric.labels(*labels), kept: the label lookup costs more than the count (the label sets are bounded:
        the known paths, methods and statuses, the stages, the verdicts)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def started(self, path: str) -> None:
        self._child(self._in_progress, path).inc()

    def request(self, path: str, method: str, status: int, seconds: float) -> None:
        """A request answered (``started`` before it)."""
        self._child(self._in_progress, path).dec()
        self._child(self._requests, path, method, str(status)).inc()
        self._child(self._latency, path).observe(seconds)

    def stage(self, name: str, seconds: float) -> None:
        self._child(self._stages, name).observe(max(0.0, seconds))

    def stages_ms(self, timings: dict[str, Any]) -> None:
        """A check's timings (core's milliseconds per stage) into the stage histogram."""
        for name in STAGES:
            ms = timings.get(name)
            if isinstance(ms, (int, float)):
                self.stage(name, ms / 1000.0)

    def verdicts(self, verdicts) -> None:
        for v in verdicts:
            self._child(self._checks, str(v)).inc()

    def batch(self, images: int) -> None:
        self._batches.inc()
        self._batch_images.inc(images)

    def search_batch(self, queries: int) -> None:
        self._search_batches.inc()
        self._search_queries.inc(queries)

    def close(self) -> None:
        """This process stops serving: its live gauges leave the sums of the others (multiprocess mode)."""
        if multiprocess():
            from prometheus_client import multiprocess as mp

            mp.mark_process_dead(os.getpid())

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _Gauges:
    """A collector of what the answering process serves, read at scrape time."""

    def __init__(self, read: Callable[[], dict[str, tuple]]):
        self.read = read

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        for name, (doc, values, labels) in self.read().items():
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            for key, value in values.items():
                family.add_metric([str(k) for k in key], float(value))
            yield family

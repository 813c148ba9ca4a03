"""Prometheus text exposition for the server, without a client library: counters, a latency histogram, summed
across the server's worker processes.

With ``--workers N`` each worker counts its own requests and writes them, at most once a second, to
``<shared folder>/<pid>.json``; whichever worker answers GET /metrics sums every worker's file with its own
live counts. A worker's file stays after it exits, so a restarted worker never makes a counter go back.
"""
from __future__ import annotations

import json
import os
import threading
from collections import defaultdict
from pathlib import Path
from typing import Optional

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FLUSH_S = 1.0
MAX_WORKER_FILES = 1024       # worker snapshots read per scrape (restarts included)
MAX_WORKER_FILE_BYTES = 1 << 20


def _labels(pairs: tuple) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in pairs)
    return "{" + inner + "}" if inner else ""


class Metrics:
    def __init__(self, folder: Optional[str] = None):
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = defaultdict(int)
        self.latency: dict[tuple, list] = {}
        self.checks: dict[tuple, int] = defaultdict(int)
        self.batches = 0
        self.batch_images = 0
        self.folder = Path(folder) if folder else None
        self._changes = self._flushed = 0
        if self.folder is not None:
            threading.Thread(target=self._flush_loop, name="provenance-guard-metrics", daemon=True).start()

    def request(self, path: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(("path", path), ("method", method), ("status", status))] += 1
            key = (("path", path),)
            hist = self.latency.setdefault(key, [[0] * len(BUCKETS), 0.0, 0])
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    hist[0][i] += 1
            hist[1] += seconds
            hist[2] += 1
            self._changes += 1

    def verdicts(self, verdicts) -> None:
        with self._lock:
            for v in verdicts:
                self.checks[(("verdict", v),)] += 1
            self._changes += 1

    def batch(self, images: int) -> None:
        with self._lock:
            self.batches += 1
            self.batch_images += images
            self._changes += 1

    # across workers -----------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": [[list(map(list, k)), v] for k, v in self.requests.items()],
                    "latency": [[list(map(list, k)), c, t, n] for k, (c, t, n) in self.latency.items()],
                    "checks": [[list(map(list, k)), v] for k, v in self.checks.items()],
                    "batches": self.batches, "batch_images": self.batch_images}

    def add(self, snap: dict) -> None:
        """Add another worker's snapshot into these counts."""
        key = lambda pairs: tuple((str(a), b) for a, b in pairs)  # noqa: E731
        with self._lock:
            for pairs, v in snap.get("requests", ()):
                self.requests[key(pairs)] += int(v)
            for pairs, counts, total, n in snap.get("latency", ()):
                if len(counts) != len(BUCKETS):
                    continue
                hist = self.latency.setdefault(key(pairs), [[0] * len(BUCKETS), 0.0, 0])
                hist[0] = [a + int(b) for a, b in zip(hist[0], counts)]
                hist[1] += float(total)
                hist[2] += int(n)
            for pairs, v in snap.get("checks", ()):
                self.checks[key(pairs)] += int(v)
            self.batches += int(snap.get("batches", 0))
            self.batch_images += int(snap.get("batch_images", 0))

    def flush(self) -> None:
        """Write this worker's counts to its file (atomically: a reader sees the old file or the new one)."""
        if self.folder is None:
            return
        changes = self._changes
        target = self.folder / f"{os.getpid()}.json"
        tmp = target.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot()))
            os.replace(tmp, target)
            self._flushed = changes
        except OSError:
            pass  # the folder went away (the server is stopping); the next flush tries again

    def _flush_loop(self) -> None:
        import time

        while True:
            time.sleep(FLUSH_S)
            if self._changes != self._flushed:
                self.flush()

    def _all_workers(self) -> "Metrics":
        total = Metrics()
        total.add(self.snapshot())
        own = f"{os.getpid()}.json"
        try:
            files = sorted(p for p in self.folder.glob("*.json") if p.name != own)[:MAX_WORKER_FILES]
        except OSError:
            files = []
        for p in files:
            try:
                if p.stat().st_size <= MAX_WORKER_FILE_BYTES:
                    total.add(json.loads(p.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # a worker's file being replaced or damaged: its counts come with the next scrape
        return total

    def render(self, gauges: dict[str, float]) -> str:
        if self.folder is not None:
            return self._all_workers().render(gauges)
        with self._lock:
            out = ["# HELP provenance_guard_requests_total HTTP requests by path, method and status.",
                   "# TYPE provenance_guard_requests_total counter"]
            out += [f"provenance_guard_requests_total{_labels(k)} {v}" for k, v in sorted(self.requests.items())]
            out += ["# HELP provenance_guard_request_seconds Request latency.",
                    "# TYPE provenance_guard_request_seconds histogram"]
            for key, (counts, total, n) in sorted(self.latency.items()):
                for b, c in zip(BUCKETS, counts):
                    out.append(f"provenance_guard_request_seconds_bucket{_labels(key + (('le', b),))} {c}")
                out.append(f"provenance_guard_request_seconds_bucket{_labels(key + (('le', '+Inf'),))} {n}")
                out.append(f"provenance_guard_request_seconds_sum{_labels(key)} {total:.6f}")
                out.append(f"provenance_guard_request_seconds_count{_labels(key)} {n}")
            out += ["# HELP provenance_guard_checks_total Images checked, by verdict.",
                    "# TYPE provenance_guard_checks_total counter"]
            out += [f"provenance_guard_checks_total{_labels(k)} {v}" for k, v in sorted(self.checks.items())]
            out += ["# TYPE provenance_guard_embed_batches_total counter",
                    f"provenance_guard_embed_batches_total {self.batches}",
                    "# TYPE provenance_guard_embed_batch_images_total counter",
                    f"provenance_guard_embed_batch_images_total {self.batch_images}"]
            typed = set()
            for name, value in sorted(gauges.items()):
                base = name.split("{", 1)[0]
                if base not in typed:
                    out.append(f"# TYPE {base} gauge")
                    typed.add(base)
                out.append(f"{name} {value}")
            return "\n".join(out) + "\n"

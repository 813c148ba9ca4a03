"""Prometheus text exposition for the server, without a client library: counters, a latency histogram, summed
across the server's worker processes.

With ``--workers N`` each worker counts its own requests and writes them, at most once a second and at
each scrape, to ``<shared folder>/<worker name>.json``. Whichever worker answers GET /metrics writes its own
file, then sums the files: every file only grows, so no counter ever goes back, whichever worker answers
(adding live counts to other workers' older files would: the next scrape, answered by another worker, could
sum less). When a worker ends, the supervisor moves its counts into ``retired.json`` (``retire``), which
lists the workers it holds, so a reader never counts one twice nor loses one in between.
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
MAX_WORKER_FILE_BYTES = 64 << 20  # the folder is the server's own (0700); labels are a bounded set
RETIRED = "retired.json"
MAX_RETIRED_NAMES = 256       # the names retired.json remembers (a reader needs the last few only)


def _labels(pairs: tuple) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in pairs)
    return "{" + inner + "}" if inner else ""


class Metrics:
    def __init__(self, folder: Optional[str] = None, name: Optional[str] = None):
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one writer of this worker's file at a time (scrape and timer)
        self.requests: dict[tuple, int] = defaultdict(int)
        self.latency: dict[tuple, list] = {}
        self.checks: dict[tuple, int] = defaultdict(int)
        self.batches = 0
        self.batch_images = 0
        self.search_batches = 0
        self.search_batch_queries = 0
        self.folder = Path(folder) if folder else None
        self.name = name or f"p{os.getpid()}"
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

    def search_batch(self, queries: int) -> None:
        with self._lock:
            self.search_batches += 1
            self.search_batch_queries += queries
            self._changes += 1

    # across workers -----------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": [[list(map(list, k)), v] for k, v in self.requests.items()],
                    "latency": [[list(map(list, k)), c, t, n] for k, (c, t, n) in self.latency.items()],
                    "checks": [[list(map(list, k)), v] for k, v in self.checks.items()],
                    "batches": self.batches, "batch_images": self.batch_images,
                    "search_batches": self.search_batches, "search_batch_queries": self.search_batch_queries}

    def add(self, snap: dict) -> None:
        """Add another worker's snapshot into these counts: all of it, or (damaged: ValueError) none of it."""
        key = lambda pairs: tuple((str(a), b) for a, b in pairs)  # noqa: E731
        try:
            requests = [(key(pairs), int(v)) for pairs, v in snap.get("requests", ())]
            latency = [(key(pairs), [int(c) for c in counts], float(total), int(n))
                       for pairs, counts, total, n in snap.get("latency", ()) if len(counts) == len(BUCKETS)]
            checks = [(key(pairs), int(v)) for pairs, v in snap.get("checks", ())]
            batches, batch_images = int(snap.get("batches", 0)), int(snap.get("batch_images", 0))
            searches = int(snap.get("search_batches", 0)), int(snap.get("search_batch_queries", 0))
            for k, *_ in requests + latency + checks:
                hash(k)
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"a damaged metrics snapshot ({exc})") from None
        with self._lock:
            for k, v in requests:
                self.requests[k] += v
            for k, counts, total, n in latency:
                hist = self.latency.setdefault(k, [[0] * len(BUCKETS), 0.0, 0])
                hist[0] = [a + b for a, b in zip(hist[0], counts)]
                hist[1] += total
                hist[2] += n
            for k, v in checks:
                self.checks[k] += v
            self.batches += batches
            self.batch_images += batch_images
            self.search_batches += searches[0]
            self.search_batch_queries += searches[1]

    def flush(self) -> None:
        """Write this worker's counts to its file (atomically: a reader sees the old file or the new one)."""
        if self.folder is None:
            return
        with self._flush_lock:
            changes = self._changes
            try:
                _write_atomic(self.folder / f"{self.name}.json", self.snapshot())
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
        self.flush()
        # Worker files first, retired.json after: a worker retired in between is then in retired.json.
        files = _read_files(self.folder)
        retired = _read_json(self.folder / RETIRED) or {}
        merged = set(_names(retired))
        total = Metrics()
        for name, snap in [("", retired.get("counts", {}))] + list(files.items()):
            if name not in merged:
                try:
                    total.add(snap)
                except ValueError:
                    continue  # a damaged file
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
                    f"provenance_guard_embed_batch_images_total {self.batch_images}",
                    "# HELP provenance_guard_search_batches_total /knn-service embedding searches run together.",
                    "# TYPE provenance_guard_search_batches_total counter",
                    f"provenance_guard_search_batches_total {self.search_batches}",
                    "# TYPE provenance_guard_search_batch_queries_total counter",
                    f"provenance_guard_search_batch_queries_total {self.search_batch_queries}"]
            typed = set()
            for name, value in sorted(gauges.items()):
                base = name.split("{", 1)[0]
                if base not in typed:
                    out.append(f"# TYPE {base} gauge")
                    typed.add(base)
                out.append(f"{name} {value}")
            return "\n".join(out) + "\n"


def _write_atomic(target: Path, data: dict) -> None:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, target)


def _read_json(path: Path) -> Optional[dict]:
    try:
        if path.stat().st_size <= MAX_WORKER_FILE_BYTES:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        pass  # gone, being replaced or damaged: its counts come with the next scrape
    return None


def _read_files(folder: Path) -> dict[str, dict]:
    try:
        paths = sorted(p for p in folder.glob("*.json") if p.name != RETIRED)[:MAX_WORKER_FILES]
    except OSError:
        return {}
    out = {}
    for p in paths:
        snap = _read_json(p)
        if snap is not None:
            out[p.stem] = snap
    return out


def _names(retired: dict) -> list:
    """The workers retired.json holds, oldest first (whatever a damaged file lists instead)."""
    names = retired.get("names")
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def retire(folder: str, name: str) -> None:
    """Move an ended worker's counts into retired.json (the supervisor's job, one call at a time), then
    remove its file: written in that order, a reader (files first, then retired.json) counts it once.
    Nothing is dropped on a damaged file: the worker's file then stays where it is, still summed."""
    import logging

    base = Path(folder)
    path, tmp = base / f"{name}.json", base / f"{name}.json.tmp"
    try:
        tmp.unlink()  # a write the worker did not finish
    except OSError:
        pass
    if not path.exists():
        return
    snap = _read_json(path)
    retired = _read_json(base / RETIRED)
    if snap is None or (retired is None and (base / RETIRED).exists()):
        logging.getLogger("provenance_guard.server").warning(
            "metrics of an ended worker not merged (%s unreadable); its file stays", path if snap is None else RETIRED)
        return
    retired = retired or {}
    names = _names(retired)
    if name not in names:
        total = Metrics()
        try:
            total.add(retired.get("counts", {}))
            total.add(snap)
        except ValueError:
            return
        try:
            _write_atomic(base / RETIRED, {"names": (names + [name])[-MAX_RETIRED_NAMES:],
                                           "counts": total.snapshot()})
        except OSError:
            return
    try:
        path.unlink()
    except OSError:
        pass

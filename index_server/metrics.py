"""Prometheus text exposition for the server, without a client library: counters, a latency histogram."""
from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(pairs: tuple) -> str:
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in pairs)
    return "{" + inner + "}" if inner else ""


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = defaultdict(int)
        self.latency: dict[tuple, list] = {}
        self.checks: dict[tuple, int] = defaultdict(int)
        self.batches = 0
        self.batch_images = 0

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

    def verdicts(self, verdicts) -> None:
        with self._lock:
            for v in verdicts:
                self.checks[(("verdict", v),)] += 1

    def batch(self, images: int) -> None:
        with self._lock:
            self.batches += 1
            self.batch_images += images

    def render(self, gauges: dict[str, float]) -> str:
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

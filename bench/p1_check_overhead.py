"""P1: what a check adds on top of the bare FAISS search.

A bundle of N random unit 768-d vectors (IVF-PQ index, float16 re-rank vectors, metadata) is built once
under bench/out/ (reused by later runs). Then, for the same query embeddings, one at a time:
  anchor = faiss index.search(q, 10) on the bundle's index (same nprobe);
  check  = Checker.check_embeddings(q): search (k x 4 candidates) + exact re-rank + metadata + verdict.
The bundle is warmed first, as a serving process's is by its second check: its search then returns the
candidates' inner products with their stored rows (core/bundle/rerank.py), and "re-rank" is their scoring.
Prints the medians, the parts, and the ratio check / anchor. Target <= 1.25 (median over >= 1,000 queries).
The cold path is reported beside it: a fresh process that opens the bundle and checks one embedding (what a
CLI check pays), timed as open, first check and second check.

    .venv/bin/python bench/p1_check_overhead.py [--rows 1000000] [--queries 1000]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

FACTORY = "IVF2048,PQ96"
NPROBE = 32
DIM = 768


def unit_batch(rng, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(path: Path, rows: int) -> None:
    import faiss
    import pyarrow as pa

    from provenance_guard.core.bundle import BundleWriter

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    index = faiss.index_factory(DIM, FACTORY, faiss.METRIC_INNER_PRODUCT)
    index.train(unit_batch(np.random.default_rng(1), min(rows, 2048 * 40)))
    print(f"  trained {FACTORY} in {time.perf_counter() - t0:.0f} s", flush=True)
    with BundleWriter(path, model="ViT-L-14/openai", dim=DIM, bundle_id="p1-random", overwrite=True) as w:
        w.no_flat_index()
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            x = unit_batch(rng, n)
            index.add(x)
            ids = np.arange(start, start + n)
            w.add(x, pa.table({"url": pa.array([f"https://example.com/img/{i}.jpg" for i in ids]),
                               "caption": pa.array([f"random caption {i}" for i in ids]),
                               "similarity": pa.array(np.full(n, 0.31, dtype=np.float32))}))
        w.finish(index, factory=FACTORY, search_params={"nprobe": NPROBE},
                 build={"sources": [{"kind": "random", "rows": rows}]})
    print(f"  built {rows:,} rows in {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    args = ap.parse_args()

    from provenance_guard.core.bundle import Bundle
    from provenance_guard.core.check import Checker

    path = HERE / "out" / f"p1-{args.rows}"
    if not (path / "manifest.json").is_file():
        print(f"building the P1 bundle at {path} (once)", flush=True)
        build(path, args.rows)
    for name in ("vectors.f16.npy", "index.faiss", "metadata.arrow"):  # a serving bundle's pages are cached
        with open(path / name, "rb") as f:
            while f.read(1 << 24):
                pass
    bundle = Bundle.open(path)
    bundle.warm_up(wait=True)  # what a serving process has done in the background by its second check
    checker = Checker(bundle)
    rng = np.random.default_rng(7)
    # Near-duplicate queries of stored rows, as a generated copy would be.
    ids = rng.integers(0, bundle.count, args.queries)
    q = bundle.vector(ids) + 0.05 * unit_batch(rng, args.queries)
    q /= np.linalg.norm(q, axis=1, keepdims=True)

    for i in range(20):  # warm caches and pages for both paths alike
        bundle.index.search(q[i:i + 1], 10)
        checker.check_embeddings(q[i:i + 1])
    bare, full, parts = [], [], {"search": [], "rerank": [], "metadata": []}
    for i in range(args.queries):
        x = q[i:i + 1]
        t0 = time.perf_counter()
        bundle.index.search(x, 10)
        t1 = time.perf_counter()
        (r,) = checker.check_embeddings(x)
        t2 = time.perf_counter()
        bare.append(t1 - t0)
        full.append(t2 - t1)
        for k in parts:
            parts[k].append(r.timings_ms[k] / 1e3)
    hit = np.mean([r.matches[0].row_id == i for r, i in
                   zip(checker.check_embeddings(q[:50]), ids[:50], strict=True)])
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{bundle.count:,} x {DIM}-d, {FACTORY}, nprobe={NPROBE}, float16 re-rank vectors; files in page cache")
    print(f"anchor  bare faiss search (k=10)          median {med(bare):.3f} ms")
    print(f"check   check_embeddings (k=10)           median {med(full):.3f} ms")
    print(f"        parts: search (k=40) {med(parts['search']):.3f} ms, re-rank {med(parts['rerank']):.3f} ms, "
          f"metadata {med(parts['metadata']):.3f} ms, rest {med(full) - sum(med(v) for v in parts.values()):.3f} ms")
    print(f"        near-duplicate top-1 = source row: {hit:.2f}")
    print(f"P1 ratio check / bare search = {med(full) / med(bare):.2f}  (target <= 1.25)")
    cold = subprocess.run([sys.executable, "-c", COLD, str(path)], capture_output=True, text=True, check=True)
    print(f"cold    fresh process: {cold.stdout.strip()}")


# Run in a fresh process (imports not timed: a CLI pays them anyway, and they are the same for any check).
COLD = """
import sys, time
import numpy as np
from provenance_guard.core.bundle import Bundle
from provenance_guard.core.check import Checker
t0 = time.perf_counter()
bundle = Bundle.open(sys.argv[1])
checker = Checker(bundle)
t1 = time.perf_counter()
q = bundle.vector([123]) + 0.01
q /= np.linalg.norm(q)
checker.check_embeddings(q)
t2 = time.perf_counter()
checker.check_embeddings(bundle.vector([4567]))
t3 = time.perf_counter()
print(f"open {(t1 - t0) * 1e3:.1f} ms, first check {(t2 - t1) * 1e3:.1f} ms, second check {(t3 - t2) * 1e3:.2f} ms")
"""


if __name__ == "__main__":
    main()

"""Metadata reads: pyarrow's public API against the hand-written Arrow buffer readers, side by side.

Builds, in a temporary folder removed afterwards, a LAION-like metadata.arrow the way the index builder does
(core.bundle.MetadataWriter, record batches of 65,536 rows, tests/laion_synth.py's columns), then times in
one process, the paths alternating round by round, P4's two metadata reads over random row ids:
  knn   — 40 rows, json_values, extra id and similarity (a /knn-service answer, index_server/app.py)
  check — 10 rows (a /v1/check's, core/search.py)
through
  hand-written — RowGather from 24 rows on, BatchCache/BatchView below (core/bundle/rows.py as of --baseline,
                 read with `git show`; skipped where git or that revision is not there)
  pyarrow      — core/bundle/rows.py now (MetadataRows: one-row slices, concat_batches, to_pylist)
  table.take   — ipc.open_file(pa.memory_map(path)).read_all() once, table.take(ids).to_pylist() a request
Every path's rows are compared with pyarrow's to_pylist first. Prints µs a request (median over rounds).

    .venv/bin/python bench/metadata_read.py [--rows 1000000] [--convention laion5b] [--rounds 7]
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
# the last revision with RowGather and BatchView
BASELINE = "ea49478"


def build(path: Path, rows: int, convention: str) -> None:
    from laion_synth import metadata

    from provenance_guard.core.bundle import MetadataWriter

    w = MetadataWriter(path)
    for start in range(0, rows, 100_000):
        w.write(metadata(start, min(100_000, rows - start), convention))
    w.close()


def load_baseline(rev: str):
    """core/bundle/rows.py of revision rev as a module of the package (its relative imports resolve), or a
    reason it is not there."""
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:core/bundle/rows.py"], check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, f"git show {rev}:core/bundle/rows.py failed ({exc})"
    if "class RowGather" not in source:
        return None, f"revision {rev} has no RowGather"
    name = "provenance_guard.core.bundle._rows_baseline"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    module.__package__ = "provenance_guard.core.bundle"
    exec(compile(source, f"{rev}:core/bundle/rows.py", "exec"), module.__dict__)  # noqa: S102 - our own file
    return module, None


def hand_written(old, reader, whole, batch_rows: int, count: int):
    """Bundle.rows as revision BASELINE read metadata: RowGather from GATHER_MIN_ROWS rows, else BatchCache."""
    cache = old.BatchCache(reader)
    gather = old.RowGather(reader, whole, batch_rows, count)

    def rows(ids: list[int], json_values: bool = False, extra: dict | None = None):
        extra = extra or {}
        if len(ids) >= old.GATHER_MIN_ROWS:
            columns = gather.columns(np.asarray(ids, dtype=np.int64), json_values) + list(extra.values())
            names = gather.names + list(extra)
            return [dict(zip(names, values, strict=False)) for values in zip(*columns, strict=False)]
        out = [cache.get(i // batch_rows).row(i % batch_rows) for i in ids]
        if json_values:
            out = [{k: old.json_value(v) for k, v in row.items()} for row in out]
        for row, values in zip(out, zip(*extra.values(), strict=False), strict=False):
            row.update(zip(extra, values, strict=False))
        return out
    return rows


def public(reader, batch_rows: int, count: int):
    """Bundle.rows as it reads metadata now."""
    from provenance_guard.core.bundle.rows import MetadataRows

    meta = MetadataRows(reader, batch_rows, count)

    def rows(ids: list[int], json_values: bool = False, extra: dict | None = None):
        extra = extra or {}
        columns = meta.columns(ids, json_values) + list(extra.values())
        names = meta.names + list(extra)
        return [dict(zip(names, values, strict=False)) for values in zip(*columns, strict=False)]
    return rows


def table_take(table):
    from provenance_guard.core.bundle.rows import json_value

    def rows(ids: list[int], json_values: bool = False, extra: dict | None = None):
        out = table.take(ids).to_pylist()
        if json_values:
            out = [{k: json_value(v) for k, v in row.items()} for row in out]
        for row, values in zip(out, zip(*(extra or {}).values(), strict=False), strict=False):
            row.update(zip(extra, values, strict=False))
        return out
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="metadata rows (P4's bundle: 1,000,000)")
    ap.add_argument("--convention", default="laion5b", choices=("laion5b", "clip-retrieval", "laion400m"))
    ap.add_argument("--requests", type=int, default=2000, help="requests of each kind per path and round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--baseline", default=BASELINE, help="git revision whose rows.py has RowGather")
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.ipc as ipc

    from provenance_guard.core.config import METADATA_BATCH_ROWS

    tmp = Path(tempfile.mkdtemp(prefix="metadata-read-"))
    try:
        path = tmp / "metadata.arrow"
        t0 = time.perf_counter()
        build(path, args.rows, args.convention)
        source = pa.memory_map(str(path), "r")
        reader = ipc.open_file(source)
        source.seek(0)
        whole = source.read_buffer()
        print(f"{args.rows:,} rows ({args.convention}: {', '.join(reader.schema.names)}), "
              f"{reader.num_record_batches} record batches, {path.stat().st_size / 1e6:.0f} MB, built in "
              f"{time.perf_counter() - t0:.0f} s; pyarrow {pa.__version__}, numpy {np.__version__}, "
              f"Python {platform.python_version()}, {platform.processor() or platform.machine()}", flush=True)
        old, why = load_baseline(args.baseline)
        paths = {"pyarrow": public(reader, METADATA_BATCH_ROWS, args.rows)}
        if old is not None:
            paths["hand-written"] = hand_written(old, reader, whole, METADATA_BATCH_ROWS, args.rows)
        else:
            print(f"hand-written readers left out: {why}")
        table = ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        paths["table.take"] = table_take(table)

        rng = np.random.default_rng(0)
        kinds = {"knn (40 rows)": (40, True), "check (10 rows)": (10, False)}
        requests = {kind: [sorted(rng.integers(0, args.rows, n).tolist(), key=lambda _: rng.random())
                           for _ in range(args.requests)] for kind, (n, _) in kinds.items()}

        def call(rows, kind, ids):
            n, json_values = kinds[kind]
            extra = {"id": ids, "similarity": [0.5] * n} if json_values else None
            return rows(ids, json_values=json_values, extra=extra)

        want = {kind: [call(paths["table.take"], kind, ids) for ids in reqs[:50]] for kind, reqs in requests.items()}
        for name, rows in paths.items():  # every path reads what pyarrow's to_pylist does (NaN compared as NaN)
            for kind, reqs in requests.items():
                got = [call(rows, kind, ids) for ids in reqs[:50]]
                assert repr(got) == repr(want[kind]), (name, kind)
        for rows in paths.values():  # warm: every record batch's pages and each path's per-batch state
            for kind, reqs in requests.items():
                for ids in reqs:
                    call(rows, kind, ids)
        times: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))
            for name in order:
                for kind, reqs in requests.items():
                    reqs = reqs[:max(20, len(reqs) // 50)] if name == "table.take" else reqs  # ~10 ms each
                    start = time.perf_counter()
                    for ids in reqs:
                        call(paths[name], kind, ids)
                    times.setdefault((name, kind), []).append((time.perf_counter() - start) / len(reqs) * 1e6)
        print(f"\nµs a request, median of {args.rounds} rounds (min-max); ratios against pyarrow's path")
        for kind in kinds:
            base = statistics.median(times[("pyarrow", kind)])
            for name in paths:
                t = times[(name, kind)]
                med = statistics.median(t)
                print(f"  {kind:16s} {name:13s} {med:9.1f} ({min(t):.1f}-{max(t):.1f})   "
                      f"pyarrow / this = {base / med:5.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

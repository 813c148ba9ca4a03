"""FAISS work of a large build: train on a bounded sample, add rows into per-shard parts, merge the parts
into on-disk inverted lists, and measure and tune recall against exact search.

Adding into a *copy* of the trained empty index per shard keeps RAM bounded by one shard's codes whatever
the total, makes every completed shard a checkpoint a killed build resumes from, and is what Ray workers
do in parallel; ``merge_parts`` then streams all parts into ``index.ivfdata`` (faiss.contrib.ondisk).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from collections.abc import Callable, Iterable

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


def train(factory: str, d: int, sample: np.ndarray):
    """A trained, empty index for factory (inner product), trained on sample (float32 unit rows).

    A pre-transform (OPQ) is trained and applied first and the raw sample released before the IVF/PQ
    stage trains, so peak memory is about the sample plus one transformed copy, not three copies."""
    import faiss

    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(ivf) if ivf is not None else None
    if isinstance(inner, faiss.IndexIVFPQ):
        # Polysemous training (a Hamming-order permutation of PQ codes) costs most of the training time and
        # only serves polysemous search, which is not used.
        inner.do_polysemous_training = False
    if index.is_trained:
        return index
    if isinstance(index, faiss.IndexPreTransform):
        x = sample
        del sample
        for i in range(index.chain.size()):
            vt = index.chain.at(i)
            if not vt.is_trained:
                vt.train(x)
            x = vt.apply(x)
        faiss.downcast_index(index.index).train(x)
        index.is_trained = True
        return index
    index.train(sample)
    return index


def training_estimate(factory: str, d: int, n: int) -> float | None:
    """About how many seconds ``train(factory, d, <n rows>)`` takes on this machine, for the progress line:
    the k-means work of each stage (points x dimensions x centroids x iterations, at FAISS's defaults),
    timed one iteration on a small sample of each stage's shape here. Within a factor of about 2; None for
    a factory it does not know."""
    import re

    import faiss
    import numpy as np

    stages: list[tuple[int, int, int, float]] = []  # (points, dims, centroids, iterations)
    dims = d
    opq = re.match(r"OPQ(\d+)(?:_(\d+))?,", factory)
    if opq:
        m = int(opq.group(1))
        dims = int(opq.group(2) or d)
        # A first PQ of 40 iterations, then 50 rounds of 4; each round also encodes and rotates the sample,
        # which measured about 2x the k-means work alone (faiss 1.15, 768-d, 2 cores).
        stages.append((min(n, 65_536), max(1, dims // m), 256, 2.0 * m * (40 + 50 * 4)))
    ivf = re.search(r"IVF(\d+)", factory)
    if ivf:
        k = int(ivf.group(1))
        stages.append((min(n, 256 * k), dims, k, 10))
    pq = re.search(r"PQ(\d+)(?:x\d+)?$", factory)
    if pq:
        m = int(pq.group(1))
        stages.append((min(n, 65_536), max(1, dims // m), 256, m * 25))
    if not stages:
        return None
    total = 0.0
    rng = np.random.default_rng(0)
    for points, dim, k, iterations in stages:
        sample_points = min(points, max(4 * k, 8_192))
        x = rng.standard_normal((sample_points, dim), dtype=np.float32)
        took = []
        for niter in (1, 3):  # the difference leaves out the set-up both share
            km = faiss.Kmeans(dim, min(k, sample_points // 4), niter=niter, verbose=False, seed=1)
            km.cp.min_points_per_centroid = 1
            t0 = time.perf_counter()
            km.train(x)
            took.append(time.perf_counter() - t0)
        per_iteration = max(took[1] - took[0], took[1] / 6) / 2
        total += per_iteration / (sample_points * dim * km.k) * points * dim * k * iterations
    return total


def add_part(trained_path: Path, vectors: Iterable[tuple[int, np.ndarray]], out_path: Path) -> int:
    """Add (first id, rows) batches to a copy of the trained index; write it to out_path atomically."""
    import faiss
    import numpy as np

    index = faiss.read_index(str(trained_path))
    rows = 0
    for first, x in vectors:
        index.add_with_ids(x, np.arange(first, first + len(x), dtype=np.int64))
        rows += len(x)
    tmp = out_path.with_suffix(".tmp")
    faiss.write_index(index, str(tmp))
    tmp.replace(out_path)
    return rows


def merge_parts(trained_path: Path, parts: list[Path], folder: Path, ivfdata_name: str, shift_ids: bool = False):
    """Merge the inverted lists of parts into folder/ivfdata_name; returns the populated index.

    Parts written by add_part are merged by streaming: one part in memory at a time, its lists written
    with pwrite into their final slots, so neither the parts nor the output are memory-mapped and the
    merge's resident memory is one part, whatever the total. Published bundles (lists already on disk, as
    in append and merge) go through faiss's merge_from_multiple."""
    if any(_is_ondisk(p) for p in parts) or shift_ids:
        return _merge_with_faiss(trained_path, parts, folder, ivfdata_name, shift_ids)
    return _merge_streaming(trained_path, parts, folder / ivfdata_name)


def _is_ondisk(part: Path) -> bool:
    return part.name == "index.faiss" and (part.parent / "index.ivfdata").is_file()


def _merge_streaming(trained_path: Path, parts: list[Path], target: Path):
    import faiss
    import numpy as np

    index = faiss.read_index(str(trained_path))
    ivf = faiss.extract_index_ivf(index)
    nlist, code_size = ivf.nlist, ivf.code_size

    def lists_of(part: Path):
        src = faiss.read_index(str(part))
        return src, faiss.extract_index_ivf(src).invlists

    sizes = np.zeros((len(parts), nlist), dtype=np.int64)
    for n, part in enumerate(parts):
        src, inv = lists_of(part)
        sizes[n] = [inv.list_size(i) for i in range(nlist)]
        del src
    totals = sizes.sum(0)
    slot = totals * (code_size + 8)
    offsets = np.concatenate([[0], np.cumsum(slot)[:-1]])
    if target.exists():
        target.unlink()  # a merge interrupted earlier
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, int(slot.sum()))
        written = np.zeros(nlist, dtype=np.int64)
        for n, part in enumerate(parts):
            src, inv = lists_of(part)
            for i in np.nonzero(sizes[n])[0]:
                count = int(sizes[n, i])
                codes = faiss.rev_swig_ptr(inv.get_codes(int(i)), count * code_size)
                ids = faiss.rev_swig_ptr(inv.get_ids(int(i)), count)
                base = int(offsets[i])
                os.pwrite(fd, codes.tobytes(), base + int(written[i]) * code_size)
                os.pwrite(fd, ids.tobytes(), base + int(totals[i]) * code_size + int(written[i]) * 8)
                written[i] += count
            del src
        os.fsync(fd)
    finally:
        os.close(fd)
    invlists = faiss.OnDiskInvertedLists()
    invlists.nlist, invlists.code_size = nlist, code_size
    invlists.filename = str(target)
    invlists.totsize = int(slot.sum())
    invlists.read_only = True
    for i in range(nlist):
        one = faiss.OnDiskOneList()
        one.size = one.capacity = int(totals[i])
        one.offset = int(offsets[i])
        invlists.lists.push_back(one)
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    index.ntotal = ivf.ntotal = int(totals.sum())
    return index


def _merge_with_faiss(trained_path: Path, parts: list[Path], folder: Path, ivfdata_name: str, shift_ids: bool):
    import faiss

    from ..core.bundle import quiet_stdout

    index = faiss.read_index(str(trained_path))
    target = folder / ivfdata_name
    if target.exists():
        target.unlink()  # a merge interrupted earlier
    sources, lists = [], []
    with quiet_stdout():
        for part in parts:
            # A part's lists are inside it (map them); a published bundle's are on disk beside it (open
            # those; MMAP together with ONDISK_SAME_DIR crashes faiss 1.15).
            flags = (faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY) if _is_ondisk(part) else faiss.IO_FLAG_MMAP
            src = faiss.read_index(str(part), flags)
            sources.append(src)
            lists.append(faiss.extract_index_ivf(src).invlists)
        ivf = faiss.extract_index_ivf(index)
        invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(target))
        vec = faiss.InvertedListsPtrVector()
        for inv in lists:
            vec.push_back(inv)
        ntotal = invlists.merge_from_multiple(vec.data(), vec.size(), shift_ids)
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    del sources
    return index


def exact_topk(queries: np.ndarray, batches: Iterable[tuple[int, np.ndarray]], k: int,
               chunk: int = 20_000) -> np.ndarray:
    """Ids of the exact top-k inner products of queries over all rows (streamed in (first id, rows) batches,
    scored chunk rows at a time so the score matrix stays small)."""
    import numpy as np

    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    for first, rows in batches:
        for start in range(0, len(rows), chunk):
            x = rows[start:start + chunk]
            s = x @ q.T  # chunk x queries
            s = np.ascontiguousarray(s.T)
            kk = min(k, s.shape[1])
            top = np.argpartition(s, s.shape[1] - kk, axis=1)[:, -kk:]
            cat_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
            cat_i = np.concatenate([best_i, top + first + start], 1)
            order = np.argsort(-cat_s, axis=1, kind="stable")[:, :k]
            best_s, best_i = np.take_along_axis(cat_s, order, 1), np.take_along_axis(cat_i, order, 1)
    return best_i


@dataclass
class Recall:
    nprobe: int | None
    near_dup_r1: float
    near_dup_r10: float
    held_out_r1: float
    held_out_r10: float
    latency_ms: float

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def _recalls(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """recall@1 and recall@10 of found against exact truth (-1 pads bundles of fewer than 10 rows)."""
    r1 = float((found[:, 0] == truth[:, 0]).mean())
    hits = total = 0
    for f, t in zip(found, truth, strict=True):
        valid = {int(i) for i in t[:10] if i >= 0}
        hits += len(valid & {int(i) for i in f[:10]})
        total += len(valid)
    return r1, hits / max(total, 1)


@dataclass
class Tuning:
    chosen: Recall
    tried: list[Recall] = field(default_factory=list)
    note: str = ""


def measure(search: Callable[[np.ndarray], np.ndarray], near: np.ndarray, near_truth: np.ndarray,
            held: np.ndarray, held_truth: np.ndarray, nprobe: int | None) -> Recall:
    """Recall of search (queries -> ids, best first, >= 10 columns) and its median latency per query."""
    found_near = search(near)
    found_held = search(held)
    times = []
    for i in range(min(50, len(held))):
        t0 = time.perf_counter()
        search(held[i:i + 1])
        times.append(time.perf_counter() - t0)
    n1, n10 = _recalls(found_near, near_truth)
    h1, h10 = _recalls(found_held, held_truth)
    return Recall(nprobe, n1, n10, h1, h10, statistics.median(times) * 1e3)


def tune_nprobe(make_search: Callable[[int | None], Callable], nlist: int, near, near_truth, held, held_truth,
                target_recall: float, target_latency_ms: float | None) -> Tuning:
    """Smallest nprobe (powers of two) whose near-duplicate recall@1 reaches target_recall, among those whose
    median latency stays within target_latency_ms when that is given. nlist 0 (no IVF): one measurement."""
    if not nlist:
        r = measure(make_search(None), near, near_truth, held, held_truth, None)
        return Tuning(r, [r], "exhaustive index: nothing to tune")
    tried: list[Recall] = []
    nprobe = 1
    while nprobe <= nlist:
        r = measure(make_search(nprobe), near, near_truth, held, held_truth, nprobe)
        if target_latency_ms is not None and r.latency_ms > target_latency_ms and tried:
            best = tried[-1]
            return Tuning(best, tried + [r], f"latency target {target_latency_ms} ms stops at nprobe={best.nprobe}; "
                                             f"near-duplicate recall@1 there is {best.near_dup_r1:.3f}")
        tried.append(r)
        if r.near_dup_r1 >= target_recall:
            return Tuning(r, tried, f"recall target {target_recall} reached at nprobe={nprobe}")
        nprobe *= 2
    best = tried[-1]
    return Tuning(best, tried, f"recall target {target_recall} not reached even scanning every list; "
                               f"near-duplicate recall@1 is {best.near_dup_r1:.3f}")

"""LAION-scale build: embedding shards -> a bundle, under a memory budget, resumable, optionally on Ray.

Phases (each with a progress bar; the report at the end gives their times):
1. scan    validate the shards (shards.py) and choose the index (choose.py);
2. train   train the empty index on a bounded random sample -> trained.index;
3. add     shard by shard: re-rank vectors into their slice of the preallocated file, rows into a copy of
           the trained index -> parts/part_NNNN.index; each finished shard is recorded in state.json, so a
           killed build resumes after the last finished shard (on Ray, shards are tasks);
4. index   merge the parts into on-disk inverted lists (IVF) or add all rows (exhaustive indices);
5. metadata  every parquet in shard order -> metadata.arrow;
6. tune    exact search over all rows for sampled queries; pick nprobe for the target recall or latency;
           record recall@1/@10 on near-duplicate and held-out queries;
7. publish manifest, then an atomic rename onto --out (an existing bundle there serves until then).

All work happens in ``.<out>.build/`` beside --out; a build whose inputs or options changed starts afresh.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..core.bundle import (INDEX_FILE, IVFDATA_FILE, METADATA_FILE, TRAINED_FILE, Bundle, Manifest,
                           MetadataWriter, RerankFileWriter, finalize, publish, rerank_file_names,
                           search_parameters, utc_now)
from ..core.config import DEFAULT_BLOCK, DEFAULT_WARN
from ..core.errors import ConfigError
from ..core.models import ModelSpec
from .choose import IndexChoice, choice_from_key, choose_index, human
from .faiss_build import Tuning, add_part, exact_topk, merge_parts, train, tune_nprobe
from .shards import Shard, iter_vectors, metadata_schema, read_metadata, read_rows, read_vectors, scan_shards

ADD_BATCH_ROWS = 100_000
# Near-duplicate recall@1 is what the product needs, so it gets enough queries to resolve 0.999.
NEAR_DUP_QUERIES = 1000
HELD_OUT_QUERIES = 200


@dataclass
class BuildOptions:
    model: str
    max_memory: int = 4 << 30
    index_key: Optional[str] = None
    rerank: Optional[str] = "float16"
    max_rerank_memory: Optional[int] = None
    target_recall: float = 0.999
    target_latency_ms: Optional[float] = None
    bundle_id: Optional[str] = None
    bundle_version: Optional[str] = None
    description: str = ""
    warn: float = DEFAULT_WARN
    block: float = DEFAULT_BLOCK
    overwrite: bool = False
    ray_address: Optional[str] = None
    progress: bool = True


@dataclass
class BuildReport:
    out: Path
    rows: int
    factory: str
    note: str
    rerank: Optional[str]
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    tuning: Optional[Tuning] = None
    resumed_shards: int = 0
    peak_rss_bytes: int = 0
    rss_by_phase: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"built {self.out}: {self.rows:,} rows, {self.factory} ({self.note}), re-rank vectors: "
               f"{self.rerank or 'none (approximate scores)'}",
               "phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items()) + f"; total {self.seconds:.1f} s",
               f"peak RSS {human(self.peak_rss_bytes)} (peak so far after " +
               ", ".join(f"{k} {human(v)}" for k, v in self.rss_by_phase.items()) + ")" +
               (f"; resumed after {self.resumed_shards} finished shards" if self.resumed_shards else "")]
        if self.tuning:
            r = self.tuning.chosen
            out.append(f"search: nprobe={r.nprobe}; near-duplicate recall@1 {r.near_dup_r1:.3f} @10 {r.near_dup_r10:.3f}; "
                       f"held-out recall@1 {r.held_out_r1:.3f} @10 {r.held_out_r10:.3f}; {r.latency_ms:.2f} ms/query "
                       f"({self.tuning.note})")
        return out


def release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise): the training sample is gone once the
    index is trained, and the merge's mapped lists should not stack on top of it in resident memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def peak_rss() -> int:
    """Peak resident memory of this process and its finished children, in bytes (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) * (1 if sys.platform == "darwin" else 1024)


# state ----------------------------------------------------------------------------------------------------

class State:
    """state.json of a build folder: what the build is (fingerprint) and which shards are finished."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any]):
        self.path = folder / "state.json"
        self.fingerprint = fingerprint
        self.done: set[int] = set()
        self.phases: dict[str, float] = {}

    @classmethod
    def load_or_reset(cls, folder: Path, fingerprint: dict[str, Any]) -> tuple["State", bool]:
        state = cls(folder, fingerprint)
        if (folder / "state.json").is_file():
            try:
                data = json.loads((folder / "state.json").read_text())
            except (OSError, json.JSONDecodeError):
                data = {}
            if data.get("fingerprint") == fingerprint:
                state.done = set(data.get("done", []))
                state.phases = dict(data.get("phases", {}))
                return state, True
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        state.save()
        return state, False

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": sorted(self.done),
                                   "phases": self.phases}))
        os.replace(tmp, self.path)


# per-shard work (also what a Ray task runs) -----------------------------------------------------------------

def part_path(work: Path, number: int) -> Path:
    return work / "parts" / f"part_{number:05d}.index"


def process_shard(shard: Shard, work: str, total_rows: int, dim: int, rerank: Optional[str], ivf: bool) -> int:
    """Write a shard's re-rank vectors into their rows and, for IVF, its part index; returns its rows."""
    import numpy as np

    work_path = Path(work)
    vectors = RerankFileWriter(work_path, total_rows, dim, rerank, create=False) if rerank else None

    def batches():
        for start in range(0, shard.rows, ADD_BATCH_ROWS):
            x = read_vectors(shard, start, start + ADD_BATCH_ROWS)
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            if vectors is not None:
                vectors.write(shard.offset + start, x)
            yield shard.offset + start, x

    try:
        if ivf:
            return add_part(work_path / TRAINED_FILE, batches(), part_path(work_path, shard.number))
        return sum(len(x) for _, x in batches())
    finally:
        if vectors is not None:
            vectors.close()


# the build ------------------------------------------------------------------------------------------------

def _sample(shards: list[Shard], rows: int, seed: int = 0):
    """rows random rows across all shards, unit float32 (reads only those rows)."""
    import numpy as np

    total = sum(s.rows for s in shards)
    ids = np.sort(np.random.default_rng(seed).choice(total, size=min(rows, total), replace=False))
    out = np.empty((len(ids), shards[0].dim), dtype=np.float32)
    pos = 0
    for s in shards:
        local = ids[(ids >= s.offset) & (ids < s.offset + s.rows)] - s.offset
        if len(local):
            out[pos:pos + len(local)] = read_rows(s, local)
            pos += len(local)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def _rerank_dtype(opts: BuildOptions, n: int, d: int) -> Optional[str]:
    """The re-rank dtype asked for, stepped down (float16 -> int8 -> none) to fit --max-rerank-memory."""
    if opts.rerank is None or opts.max_rerank_memory is None:
        return opts.rerank
    sizes = {"float16": n * d * 2, "int8": n * (d + 4)}
    for dtype in (["float16", "int8"] if opts.rerank == "float16" else ["int8"]):
        if sizes[dtype] <= opts.max_rerank_memory:
            return dtype
    return None


def _progress(total: int, desc: str, opts: BuildOptions, unit: str = "row"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not opts.progress, file=sys.stderr,
                dynamic_ncols=True)


def build_from_embeddings(source: str, out, opts: BuildOptions) -> BuildReport:
    """Build (or resume building) a bundle from LAION-layout shards at source; see the module docstring."""
    import faiss
    import numpy as np

    t_start = time.perf_counter()
    ModelSpec.parse(opts.model)
    out = Path(out).expanduser()
    if out.exists() and not opts.overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it (it keeps serving until the new "
                          f"bundle is complete)")
    shards = scan_shards(source)
    n, d = sum(s.rows for s in shards), shards[0].dim
    choice: IndexChoice = (choice_from_key(opts.index_key, n, d, opts.max_memory) if opts.index_key
                           else choose_index(n, d, opts.max_memory))
    rerank = _rerank_dtype(opts, n, d)
    work = out.parent / f".{out.name}.build"
    fingerprint = {"source": str(source), "shards": [[s.number, s.rows, s.npy] for s in shards],
                   "factory": choice.factory, "rerank": rerank, "model": opts.model, "dim": d}
    state, resumed = State.load_or_reset(work, fingerprint)
    resumed_shards = len(state.done)
    print(f"{n:,} vectors of {d}-d in {len(shards)} shards; budget {human(opts.max_memory)} -> {choice.factory} "
          f"({choice.note})" + (f"; resuming: {len(state.done)} shards already done" if resumed else ""),
          file=sys.stderr)

    rss_by_phase: dict[str, int] = {}

    def phase(name: str, t0: float) -> None:
        state.phases[name] = state.phases.get(name, 0.0) + time.perf_counter() - t0
        rss_by_phase[name] = peak_rss()
        state.save()

    # train
    t0 = time.perf_counter()
    if not (work / TRAINED_FILE).is_file():
        bar = _progress(1, f"training {choice.factory} on {choice.train_rows:,} rows", opts, unit="index")
        index = train(choice.factory, d, _sample(shards, choice.train_rows) if choice.train_rows
                      else np.zeros((0, d), np.float32))
        faiss.write_index(index, str(work / ".trained.tmp"))
        os.replace(work / ".trained.tmp", work / TRAINED_FILE)
        del index
        release_freed_memory()
        bar.update(1)
        bar.close()
        phase("train", t0)

    # add
    t0 = time.perf_counter()
    vec_name, scale_name = rerank_file_names(rerank)
    if vec_name and not (work / vec_name).is_file():
        RerankFileWriter(work, n, d, rerank).close()
    (work / "parts").mkdir(exist_ok=True)
    todo = [s for s in shards if s.number not in state.done]
    bar = _progress(n, "adding", opts)
    bar.update(sum(s.rows for s in shards if s.number in state.done))
    if todo and opts.ray_address:
        from .distributed import run_shards_on_ray

        for shard in run_shards_on_ray(opts.ray_address, todo, str(work), n, d, rerank, choice.ivf):
            state.done.add(shard.number)
            state.save()
            bar.update(shard.rows)
    else:
        for shard in todo:
            process_shard(shard, str(work), n, d, rerank, choice.ivf)
            state.done.add(shard.number)
            state.save()
            bar.update(shard.rows)
    bar.close()
    release_freed_memory()
    if todo:
        phase("add", t0)

    # index
    t0 = time.perf_counter()
    bar = _progress(1, "writing the index", opts, unit="index")
    if choice.ivf:
        index = merge_parts(work / TRAINED_FILE, [part_path(work, s.number) for s in shards], work, IVFDATA_FILE)
    else:
        index = faiss.read_index(str(work / TRAINED_FILE))
        for _, x in iter_vectors(shards, ADD_BATCH_ROWS):
            index.add(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    faiss.write_index(index, str(work / INDEX_FILE))
    del index
    shutil.rmtree(work / "parts", ignore_errors=True)
    bar.update(1)
    bar.close()
    phase("index", t0)

    # metadata
    t0 = time.perf_counter()
    bar = _progress(n, "metadata", opts)
    writer = MetadataWriter(work / METADATA_FILE, schema=metadata_schema(shards))
    for shard in shards:
        table = read_metadata(shard)
        writer.write(table)
        bar.update(table.num_rows)
    writer.close()
    bar.close()
    phase("metadata", t0)

    # tune
    t0 = time.perf_counter()
    manifest = Manifest(
        bundle_id=opts.bundle_id or out.name, bundle_version=opts.bundle_version or time.strftime(
            "%Y%m%dT%H%M%SZ", time.gmtime()), description=opts.description, model=opts.model, dim=d, count=n,
        index_factory=choice.factory, ivfdata_file=IVFDATA_FILE if choice.ivf else None,
        trained_file=TRAINED_FILE, rerank_file=vec_name, rerank_dtype=rerank or "float16",
        rerank_scale_file=scale_name, warn=opts.warn, block=opts.block,
    )
    finalize(work, manifest, hash_files=False)
    tuning = tune_bundle(work, shards, choice, opts)
    manifest.search_params = _params(choice, tuning.chosen.nprobe)
    phase("tune", t0)

    # publish
    t0 = time.perf_counter()
    state.phases["publish"] = 0.0
    report = BuildReport(out, n, choice.factory, choice.note, rerank, 0.0, dict(state.phases), tuning,
                         resumed_shards, peak_rss(), rss_by_phase)
    manifest.build = {
        "created": utc_now(), "tool": _tool(), "sources": [{"kind": "embeddings", "path": str(source),
                                                           "shards": len(shards), "rows": n}],
        "choice": {"factory": choice.factory, "note": choice.note, "budget_bytes": opts.max_memory,
                   "index_bytes": choice.bytes_needed, "train_rows": choice.train_rows},
        "recall": tuning.chosen.as_dict(), "tuning": [r.as_dict() for r in tuning.tried],
        "tuning_note": tuning.note, "target_recall": opts.target_recall, "phases_s": state.phases,
        "peak_rss_bytes": report.peak_rss_bytes, "history": [{"op": "build", "at": utc_now(), "rows": n}],
    }
    (work / "state.json").unlink()
    finalize(work, manifest)
    publish(work, out)
    report.phases["publish"] = time.perf_counter() - t0
    report.seconds = time.perf_counter() - t_start
    return report


def _tool() -> str:
    from .. import __version__

    return f"provenance-guard {__version__}"


def _params(choice: IndexChoice, nprobe: Optional[int]) -> dict[str, Any]:
    if not choice.ivf or nprobe is None:
        return {}
    params: dict[str, Any] = {"nprobe": int(nprobe)}
    if "HNSW" in choice.factory.split(",")[1 if choice.factory.startswith("OPQ") else 0]:
        params["quantizer_efSearch"] = max(64, 2 * int(nprobe))
    return params


def tune_bundle(folder: Path, shards: list[Shard], choice: IndexChoice, opts: BuildOptions) -> Tuning:
    """Measure recall of the real search path (candidates, exact re-rank) against exact search over all rows;
    pick nprobe. Queries: near duplicates (stored rows, cosine ~0.95 after noise) and held-out (the
    normalised sum of two stored rows, which is no stored row)."""
    import numpy as np

    from ..core.search import search

    bundle = Bundle.open(folder)
    rng = np.random.default_rng(1)
    ids = np.sort(rng.choice(bundle.count, size=min(NEAR_DUP_QUERIES, bundle.count), replace=False))
    base = np.concatenate([read_rows(s, ids[(ids >= s.offset) & (ids < s.offset + s.rows)] - s.offset)
                           for s in shards if np.any((ids >= s.offset) & (ids < s.offset + s.rows))])
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    noise = rng.standard_normal(base.shape).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    near = base + 0.3 * noise
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    pick = rng.permutation(len(base))[:min(HELD_OUT_QUERIES, len(base))]
    held = base[pick] + base[rng.permutation(len(base))[:len(pick)]]
    held /= np.maximum(np.linalg.norm(held, axis=1, keepdims=True), 1e-12)

    def normalised():
        for first, x in iter_vectors(shards, ADD_BATCH_ROWS):
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
            yield first, x

    bar = _progress(1, "exact search for recall", opts, unit="pass")
    truth = exact_topk(np.concatenate([near, held]), normalised(), 10)
    bar.update(1)
    bar.close()
    near_truth, held_truth = truth[:len(near)], truth[len(near):]

    def make_search(nprobe):
        bundle.params, bundle._keep = search_parameters(bundle.index, _params(choice, nprobe), bundle.removed)

        def run(q):
            found = search(bundle, q, 10).matches
            return np.array([[m.row_id for m in ms] + [-1] * (10 - len(ms)) for ms in found])
        return run

    return tune_nprobe(make_search, choice.nlist if choice.ivf else 0, near, near_truth, held, held_truth,
                       opts.target_recall, opts.target_latency_ms)

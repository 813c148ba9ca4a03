"""LAION-scale build: embedding shards -> a bundle, under a memory budget, resumable, optionally on Ray.

Phases (each with a progress bar; the report at the end gives their times):
1. scan    validate the shards (shards.py) and choose the index (choose.py);
2. train   train the empty index on a bounded random sample -> trained.index;
3. add     shard by shard: re-rank vectors into their slice of the preallocated file, rows into a copy of
           the trained index -> parts/part_NNNN.index; each finished shard is recorded in state.json, so a
           killed build resumes after the last finished shard (on Ray, shards are tasks);
4. index   merge the parts into on-disk inverted lists (IVF) or add all rows (exhaustive indices);
5. metadata  every parquet in shard order -> metadata.arrow; then the caption index (core/captions.py);
6. tune    exact search over all rows for sampled queries; pick nprobe for the target recall or latency;
           record recall@1/@10 on near-duplicate and held-out queries;
7. publish manifest, then an atomic rename onto --out (an existing bundle there serves until then).

All work happens in ``.<out>.build/`` beside --out (the bundle being made in ``bundle/``, the state in
``state.json``). Each phase writes its output whole (temporary name, rename) before it is recorded as
complete, so a build killed at any moment, SIGKILL included, resumes from its last completed phase (and
within ``add``, after its last added shard) to the same bundle; a build whose inputs or options changed starts
afresh. The build holds out's maintenance lock (core/bundle/lock.py) from start to publish, and refuses to
start without the disk space it needs.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.bundle import (INDEX_FILE, IVFDATA_FILE, METADATA_FILE, TRAINED_FILE, Bundle, BundleLock, Manifest,
                           MetadataWriter, RerankFileWriter, finalize, publish, read_manifest, rerank_file_names,
                           search_parameters, space_for, utc_now, write_caption_index)
from ..core.config import DEFAULT_BLOCK, DEFAULT_WARN
from ..core.errors import ConfigError, DiskFullError, ProvenanceError
from ..core.images import release_freed_memory
from ..core.models import ModelSpec
from ..core.progress import heartbeat
from .choose import IndexChoice, choice_from_key, choose_index, human
from .faiss_build import Recall, Tuning, add_part, exact_topk, merge_parts, train, training_estimate, tune_nprobe
from .shards import Shard, iter_vectors, metadata_schema, read_metadata, read_rows, read_vectors, scan_shards

ADD_BATCH_ROWS = 100_000
# Near-duplicate recall@1 is what the product needs, so it gets enough queries to resolve 0.999.
NEAR_DUP_QUERIES = 1000
HELD_OUT_QUERIES = 200


@dataclass
class BuildOptions:
    model: str
    max_memory: int = 4 << 30
    index_key: str | None = None
    rerank: str | None = "float16"
    max_rerank_memory: int | None = None
    target_recall: float = 0.999
    target_latency_ms: float | None = None
    bundle_id: str | None = None
    bundle_version: str | None = None
    description: str = ""
    warn: float = DEFAULT_WARN
    block: float = DEFAULT_BLOCK
    overwrite: bool = False
    ray_address: str | None = None
    progress: bool = True
    wait: bool = True


@dataclass
class BuildReport:
    out: Path
    rows: int
    factory: str
    note: str
    rerank: str | None
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    tuning: Tuning | None = None
    resumed_shards: int = 0
    peak_rss_bytes: int = 0
    rss_by_phase: dict[str, int] = field(default_factory=dict)
    text: dict = field(default_factory=dict)  # metadata rows "repaired" (invalid UTF-8, NUL, BOM), "truncated"
    budget_bytes: int = 0      # --max-memory: what the index may take in memory
    baseline_rss_bytes: int = 0  # the process before the build held anything

    def lines(self) -> list[str]:
        out = [f"built {self.out}: {self.rows:,} rows, {self.factory} ({self.note}), re-rank vectors: "
               f"{self.rerank or 'none (approximate scores)'}",
               "phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items()) + f"; total {self.seconds:.1f} s",
               f"peak RSS {human(self.peak_rss_bytes)} (peak so far after " +
               ", ".join(f"{k} {human(v)}" for k, v in self.rss_by_phase.items()) + ")" +
               (f"; resumed after {self.resumed_shards} finished shards" if self.resumed_shards else "")]
        if self.tuning:
            r = self.tuning.chosen
            probe = f"nprobe={r.nprobe}" if r.nprobe is not None else "exhaustive (every row scored)"
            out.append(f"search: {probe}; near-duplicate recall@1 {r.near_dup_r1:.3f} @10 {r.near_dup_r10:.3f}; "
                       f"held-out recall@1 {r.held_out_r1:.3f} @10 {r.held_out_r10:.3f}; {r.latency_ms:.2f} ms/query "
                       f"({self.tuning.note})")
        if self.budget_bytes and self.peak_rss_bytes > self.budget_bytes:
            out.append(f"note: the build process peaked at {human(self.peak_rss_bytes)} (of which "
                       f"{human(self.baseline_rss_bytes)} were the interpreter and its libraries at the start), over "
                       f"--max-memory {human(self.budget_bytes)}: that budget bounds the index (what searching the "
                       f"bundle holds in memory), not the build; give the build machine at least "
                       f"{human(self.peak_rss_bytes)}")
        if any(self.text.values()):
            out.append(f"captions and urls: {self.text.get('repaired', 0):,} rows repaired (invalid UTF-8, NUL or "
                       f"BOM), {self.text.get('truncated', 0):,} cut to fit")
        return out


def peak_rss() -> int:
    """Peak resident memory of this process and its finished children, in bytes (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) * (1 if sys.platform == "darwin" else 1024)


# state ----------------------------------------------------------------------------------------------------

class State:
    """A build's state file: what the build is (fingerprint), which shards are added, which phases are
    complete (each phase's output is written whole before the phase is recorded), and the tuning result."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]):
        self.path = path
        self.fingerprint = fingerprint
        self.done: set[int] = set()
        self.phases: dict[str, float] = {}
        self.completed: list[str] = []
        self.tuning: dict[str, Any] | None = None
        self.captions: str | None = None
        self.publishing = False
        self.text: dict[str, int] = {}  # url/caption rows repaired or cut in this run's metadata phase

    @classmethod
    def load(cls, path: Path, fingerprint: dict[str, Any]) -> State | None:
        """The state of this very build, or None (no state, another build's, or unreadable)."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
            return None
        state = cls(path, fingerprint)
        state.done = set(data.get("done", []))
        state.phases = dict(data.get("phases", {}))
        state.completed = list(data.get("completed", []))
        state.tuning = data.get("tuning")
        state.captions = data.get("captions")
        state.publishing = bool(data.get("publishing"))
        return state

    def complete(self, phase: str) -> None:
        if phase not in self.completed:
            self.completed.append(phase)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": sorted(self.done),
                                   "phases": self.phases, "completed": self.completed, "tuning": self.tuning,
                                   "captions": self.captions, "publishing": self.publishing}))
        os.replace(tmp, self.path)


# Test hook: a build SIGKILLs itself at the named checkpoint (after-train, after-add, after-index-written,
# after-index, after-metadata, after-captions, after-tune, before-publish, after-publish), as a crash or an
# OOM kill would.
ENV_KILL_AT = "PROVENANCE_GUARD_KILL_AT"


def checkpoint(name: str) -> None:
    if os.environ.get(ENV_KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


# per-shard work (also what a Ray task runs) -----------------------------------------------------------------

def part_path(work: Path, number: int) -> Path:
    return work / "parts" / f"part_{number:05d}.index"


def process_shard(shard: Shard, work: str, total_rows: int, dim: int, rerank: str | None, ivf: bool) -> int:
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


def _rerank_dtype(opts: BuildOptions, n: int, d: int) -> str | None:
    """The re-rank dtype asked for, stepped down (float16 -> int8 -> none) to fit --max-rerank-memory."""
    if opts.rerank is None or opts.max_rerank_memory is None:
        return opts.rerank
    sizes = {"float16": n * d * 2, "int8": n * (d + 4)}
    for dtype in (["float16", "int8"] if opts.rerank == "float16" else ["int8"]):
        if sizes[dtype] <= opts.max_rerank_memory:
            return dtype
    return None


def _progress(total: int, desc: str, opts: BuildOptions, unit: str = "row"):
    from ..core.progress import progress

    return progress(total, desc, unit=unit, enabled=opts.progress)


def build_from_embeddings(source: str, out, opts: BuildOptions) -> BuildReport:
    """Build (or resume building) a bundle from LAION-layout shards at source; see the module docstring.
    Holds out's maintenance lock throughout: a removal published meanwhile would be lost in the new bundle."""
    out = Path(out).expanduser()
    with BundleLock(out, "index build", wait=opts.wait):
        return _build(source, out, opts)


def _build(source: str, out: Path, opts: BuildOptions) -> BuildReport:

    t_start = time.perf_counter()
    baseline = peak_rss()  # the interpreter and its libraries, before the build holds anything
    ModelSpec.parse(opts.model)
    shards = scan_shards(source)
    n, d = sum(s.rows for s in shards), shards[0].dim
    choice: IndexChoice = (choice_from_key(opts.index_key, n, d, opts.max_memory) if opts.index_key
                           else choose_index(n, d, opts.max_memory))
    rerank = _rerank_dtype(opts, n, d)
    home = out.parent / f".{out.name}.build"
    work = home / "bundle"
    fingerprint = {"source": str(source), "shards": [[s.number, s.rows, s.npy] for s in shards],
                   "factory": choice.factory, "rerank": rerank, "model": opts.model, "dim": d}
    state = State.load(home / "state.json", fingerprint)
    if state is not None and state.publishing and not work.exists():
        # Killed after publishing, before cleaning up: the bundle at out is this build's.
        try:
            published = read_manifest(out).build.get("fingerprint") == fingerprint_digest(fingerprint)
        except ProvenanceError:
            published = False
        if published:
            shutil.rmtree(home, ignore_errors=True)
            return _published_report(out, n, choice, rerank, state, t_start)
        state = None
    if out.exists() and not opts.overwrite and state is None:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it (it keeps serving until the new "
                          f"bundle is complete)")
    resumed = state is not None
    needed = _bundle_size_estimate(n, d, choice, rerank)
    print(f"{n:,} vectors of {d}-d in {len(shards)} shards; budget {human(opts.max_memory)} -> {choice.factory} "
          f"({choice.note})" + (f"; resuming after {', '.join(state.completed) or 'nothing'} "
                                f"({len(state.done)} shards added)" if resumed else ""),
          file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with space_for(out.parent, 0 if resumed else needed, f"building {out}"):
            if state is None:
                shutil.rmtree(home, ignore_errors=True)
                work.mkdir(parents=True)
                state = State(home / "state.json", fingerprint)
                state.save()
            report = _phases(shards, n, d, choice, rerank, out, work, home, state, len(state.done), opts, t_start)
            report.budget_bytes, report.baseline_rss_bytes = opts.max_memory, baseline
            return report
    except DiskFullError:
        shutil.rmtree(home, ignore_errors=True)  # a full disk needs the space back more than a resume
        raise


def _bundle_size_estimate(n: int, d: int, choice: IndexChoice, rerank: str | None) -> int:
    """Bytes the build writes: the index (about twice while parts are merged), re-rank vectors, metadata."""
    index = choice.bytes_needed or n * d * 4
    vectors = {"float16": n * d * 2, "int8": n * (d + 4), None: 0}[rerank]
    return 2 * index + vectors + n * 256


def _phases(shards: list[Shard], n: int, d: int, choice: IndexChoice, rerank: str | None, out: Path, work: Path,
            home: Path, state: State, resumed_shards: int, opts: BuildOptions, t_start: float) -> BuildReport:
    import faiss
    import numpy as np

    rss_by_phase: dict[str, int] = {}

    def phase(name: str, t0: float) -> None:
        state.phases[name] = state.phases.get(name, 0.0) + time.perf_counter() - t0
        rss_by_phase[name] = peak_rss()
        state.complete(name)
        checkpoint(f"after-{name}")

    # train
    t0 = time.perf_counter()
    if "train" not in state.completed:
        expected = training_estimate(choice.factory, d, choice.train_rows) if opts.progress and choice.train_rows \
            else None
        with heartbeat(f"training {choice.factory} on {choice.train_rows:,} rows", expected,
                       opts.progress and choice.train_rows > 0):
            index = train(choice.factory, d, _sample(shards, choice.train_rows) if choice.train_rows
                          else np.zeros((0, d), np.float32))
        faiss.write_index(index, str(work / ".trained.tmp"))
        os.replace(work / ".trained.tmp", work / TRAINED_FILE)
        del index
        release_freed_memory()
        phase("train", t0)

    # add
    t0 = time.perf_counter()
    vec_name, scale_name = rerank_file_names(rerank)
    if "add" not in state.completed:
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
        phase("add", t0)

    # index
    t0 = time.perf_counter()
    if "index" not in state.completed:
        with heartbeat("writing the index", enabled=opts.progress):
            if choice.ivf:
                index = merge_parts(work / TRAINED_FILE, [part_path(work, s.number) for s in shards], work,
                                    IVFDATA_FILE)
            else:
                index = faiss.read_index(str(work / TRAINED_FILE))
                for _, x in iter_vectors(shards, ADD_BATCH_ROWS):
                    index.add(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
            faiss.write_index(index, str(work / ".index.tmp"))
            os.replace(work / ".index.tmp", work / INDEX_FILE)
            del index
        state.phases["index"] = state.phases.get("index", 0.0) + time.perf_counter() - t0
        state.complete("index")
        checkpoint("after-index-written")
    # The parts go only once the index that holds their rows is recorded as complete.
    shutil.rmtree(work / "parts", ignore_errors=True)
    rss_by_phase.setdefault("index", peak_rss())
    checkpoint("after-index")

    # metadata
    t0 = time.perf_counter()
    if "metadata" not in state.completed:
        bar = _progress(n, "metadata", opts)
        writer = MetadataWriter(work / ".metadata.tmp", schema=metadata_schema(shards))
        for shard in shards:
            table = read_metadata(shard)
            writer.write(table)
            bar.update(table.num_rows)
        writer.close()
        os.replace(work / ".metadata.tmp", work / METADATA_FILE)
        bar.close()
        state.text = dict(writer.text_stats)
        phase("metadata", t0)

    # captions (the index of the caption check before generation)
    t0 = time.perf_counter()
    manifest = Manifest(
        bundle_id=opts.bundle_id or out.name, bundle_version=opts.bundle_version or time.strftime(
            "%Y%m%dT%H%M%SZ", time.gmtime()), description=opts.description, model=opts.model, dim=d, count=n,
        index_factory=choice.factory, ivfdata_file=IVFDATA_FILE if choice.ivf else None,
        trained_file=TRAINED_FILE, rerank_file=vec_name, rerank_dtype=rerank or "float16",
        rerank_scale_file=scale_name, warn=opts.warn, block=opts.block,
    )
    if "captions" not in state.completed:
        state.captions = write_caption_index(work, manifest, _progress(n, "caption index", opts))
        phase("captions", t0)
    manifest.captions_file = state.captions

    # tune
    t0 = time.perf_counter()
    if "tune" not in state.completed:
        finalize(work, manifest, hash_files=False)
        tuning = tune_bundle(work, shards, choice, opts)
        state.tuning = {"chosen": tuning.chosen.as_dict(), "tried": [r.as_dict() for r in tuning.tried],
                        "note": tuning.note}
        phase("tune", t0)
    tuning = Tuning(Recall(**state.tuning["chosen"]), [Recall(**r) for r in state.tuning["tried"]],
                    state.tuning["note"])
    manifest.search_params = _params(choice, tuning.chosen.nprobe)

    # publish
    t0 = time.perf_counter()
    state.phases["publish"] = 0.0
    report = BuildReport(out, n, choice.factory, choice.note, rerank, 0.0, dict(state.phases), tuning,
                         resumed_shards, peak_rss(), rss_by_phase)
    report.text = dict(state.text)
    manifest.build = {
        "created": utc_now(), "tool": _tool(), "sources": [{"kind": "embeddings", "path": str(state.fingerprint["source"]),
                                                           "shards": len(shards), "rows": n}],
        "choice": {"factory": choice.factory, "note": choice.note, "budget_bytes": opts.max_memory,
                   "index_bytes": choice.bytes_needed, "train_rows": choice.train_rows},
        "recall": tuning.chosen.as_dict(), "tuning": [r.as_dict() for r in tuning.tried],
        "tuning_note": tuning.note, "target_recall": opts.target_recall, "phases_s": state.phases,
        "peak_rss_bytes": report.peak_rss_bytes, "history": [{"op": "build", "at": utc_now(), "rows": n}],
        **({"text": state.text} if any(state.text.values()) else {}),
        "fingerprint": fingerprint_digest(state.fingerprint),
    }
    finalize(work, manifest)
    state.publishing = True
    state.save()
    checkpoint("before-publish")
    publish(work, out)
    checkpoint("after-publish")
    shutil.rmtree(home, ignore_errors=True)
    report.phases["publish"] = time.perf_counter() - t0
    report.seconds = time.perf_counter() - t_start
    return report


def _published_report(out: Path, n: int, choice: IndexChoice, rerank: str | None, state: State,
                      t_start: float) -> BuildReport:
    tuning = None
    if state.tuning:
        tuning = Tuning(Recall(**state.tuning["chosen"]), [Recall(**r) for r in state.tuning["tried"]],
                        state.tuning["note"])
    return BuildReport(out, n, choice.factory, choice.note + "; it was already published", rerank,
                       time.perf_counter() - t_start, dict(state.phases), tuning, len(state.done), peak_rss(), {})


def _tool() -> str:
    from .. import __version__

    return f"provenance-guard {__version__}"


def _params(choice: IndexChoice, nprobe: int | None) -> dict[str, Any]:
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

    bar = _progress(sum(s.rows for s in shards), "exact search for recall", opts)

    def counted():
        for first, x in normalised():
            yield first, x
            bar.update(len(x))

    truth = exact_topk(np.concatenate([near, held]), counted(), 10)
    bar.close()
    near_truth, held_truth = truth[:len(near)], truth[len(near):]

    def make_search(nprobe):
        bundle.params, bundle._keep = search_parameters(bundle.index, _params(choice, nprobe), bundle.removed)

        def run(q):
            found = search(bundle, q, 10).matches
            return np.array([[m.row_id for m in ms] + [-1] * (10 - len(ms)) for ms in found])
        return run

    try:
        return tune_nprobe(make_search, choice.nlist if choice.ivf else 0, near, near_truth, held, held_truth,
                           opts.target_recall, opts.target_latency_ms)
    finally:
        bundle.close()

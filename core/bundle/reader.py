"""Opening a bundle: validation in O(1) of its size, memory-mapped reading, and the FAISS search parameters.

``Bundle.open`` reads the manifest, checks that every file it names is inside the folder and has its
recorded size, then maps index, metadata and re-rank vectors read-only. What it finds damaged is a named
error (ManifestError, BundleFileError, IndexCorruptError, DimensionMismatchError, RowCountMismatchError)
whose message names the file and the fix; ``verify`` also recomputes every file's sha256.
"""
from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Iterable

from ..errors import (BundleError, BundleFileError, DimensionMismatchError, IndexCorruptError, ManifestError,
                      RowCountMismatchError)
from .manifest import MANIFEST, RERANK_DTYPES, Manifest, bundle_file, read_manifest, sha256_file
from .rerank import FaissRerank, _advise_random, decode_rerank
from .rows import MetadataRows

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

_STDOUT_LOCK = threading.Lock()


def available_memory() -> int | None:
    """MemAvailable in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextmanager
def quiet_stdout():
    """Silence C-level writes to stdout (faiss printf()s while opening and merging on-disk inverted lists),
    which would otherwise corrupt `check --json` output or a host's console."""
    with _STDOUT_LOCK:
        sys.stdout.flush()
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, OSError, ValueError):  # stdout replaced by an object without a descriptor
            yield
            return
        saved = os.dup(fd)
        try:
            with open(os.devnull, "wb") as devnull:
                os.dup2(devnull.fileno(), fd)
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def search_parameters(index, params: dict[str, Any], removed: np.ndarray | None = None):
    """A faiss SearchParameters tree for index: the bundle's nprobe/efSearch and, when rows were removed, a
    selector that keeps them out of every result. Returns (params or None, objects to keep alive)."""
    import faiss

    keep: list[Any] = []
    sel = None
    if removed is not None and len(removed):
        batch = faiss.IDSelectorBatch(removed.astype("int64"))
        sel = faiss.IDSelectorNot(batch)
        keep += [batch, sel]

    def build(idx):
        idx = faiss.downcast_index(idx)
        if isinstance(idx, faiss.IndexPreTransform):
            inner = build(idx.index)
            p = faiss.SearchParametersPreTransform()
            p.index_params = inner
        elif isinstance(idx, faiss.IndexIVF):
            p = faiss.SearchParametersIVF()
            p.nprobe = int(params.get("nprobe", idx.nprobe))
            quantizer = faiss.downcast_index(idx.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):
                qp = faiss.SearchParametersHNSW()
                qp.efSearch = int(params.get("quantizer_efSearch", quantizer.hnsw.efSearch))
                p.quantizer_params = qp
                keep.append(qp)
        elif isinstance(idx, faiss.IndexHNSW):
            p = faiss.SearchParametersHNSW()
            p.efSearch = int(params.get("efSearch", idx.hnsw.efSearch))
        else:
            p = faiss.SearchParameters()
        if sel is not None:
            p.sel = sel
        keep.append(p)
        return p

    return build(index), keep


class Bundle:
    """An opened, validated bundle: memory-mapped index, metadata and re-rank vectors (read-only).

    Searching and reading rows are safe from many threads at once.
    """

    def __init__(self, path: Path, manifest: Manifest, index, vectors, scales, metadata_reader,
                 removed: np.ndarray):
        self.path = path
        self.manifest = manifest
        self.index = index
        self.vectors = vectors
        self.scales = scales
        self.removed = removed
        self.params, self._keep = search_parameters(index, manifest.search_params, removed)
        # a bundle's manifest never changes: read per search, these are worked out once
        self.flat, self._exact = manifest.flat, manifest.exact
        self._metadata = metadata_reader
        self._rows = MetadataRows(metadata_reader, manifest.metadata_batch_rows, manifest.count)
        self._fds: dict[str, int] = {}
        self._captions = None
        # Re-rank rows: pread by default; through the memory map in a server or once warm (see vector()).
        self.mapped_reads = False
        # float16 re-rank inside FAISS (rerank.FaissRerank), set up by warm_up once the index's ids are checked
        self.refine: FaissRerank | None = None
        self._warming: threading.Thread | None = None

    # identity -----------------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.manifest.bundle_id

    @property
    def version(self) -> str:
        return self.manifest.bundle_version

    @property
    def model(self) -> str:
        return self.manifest.model

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def count(self) -> int:
        """Row positions, removed rows included (ids stay stable)."""
        return self.manifest.count

    @property
    def live_count(self) -> int:
        return self.manifest.count - len(self.removed)

    @property
    def exact(self) -> bool:
        return self._exact

    @property
    def captions(self):
        """The caption index (core/captions.py), mapped on first use; None for bundles built without one."""
        if not self.manifest.captions_file:
            return None
        if self._captions is None:
            from ..captions import read_index

            self._captions = read_index(self.path / self.manifest.captions_file, self.count)
        return self._captions

    @property
    def verify_thresholds(self):
        """The verifier cut-offs: the bundle's calibrated ones (index calibrate), else the defaults."""
        from ..verify import VerifyThresholds

        return VerifyThresholds.from_json(self.manifest.verification)

    def __repr__(self) -> str:
        return f"Bundle({self.id!r} v{self.version}, {self.count} rows, {self.manifest.index_factory}, {self.path})"

    def close(self) -> None:
        """Release the file descriptors of re-rank reads (memory maps go with the object)."""
        fds, self._fds = getattr(self, "_fds", {}), {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        self.close()

    def warm_up(self, wait: bool = False) -> None:
        """Map the re-rank vectors' and the metadata's pages into this process, once, on a background thread.

        A fresh memory map costs a page fault on the first touch of each page: ~5 us each in a VM, two per
        re-ranked row and more per metadata row, most of a check's time after the search in a process that
        has not touched those pages yet. Read in order, one fault maps a whole run of pages (the kernel's
        fault-around), so touching every page once costs ~12 ms per 1.5 GB held in the page cache. Files
        that would not fit a quarter of the available memory are left alone (touching them would read
        them from disk and push out what else is cached); so are systems that do not report it. Once warm,
        re-rank rows are read through the map (see vector()), and float16 ones are scored inside FAISS
        (``refine``). Called at each search; cheap after the first."""
        if self._warming is not None:
            if wait:
                self._warming.join()
            return
        self._warming = threading.Thread(target=self._touch_pages, name=f"warm-{self.id}", daemon=True)
        self._warming.start()
        if wait:
            self._warming.join()

    @property
    def warm(self) -> bool:
        """True once warm_up() has finished, whether or not it mapped the files (``mapped_reads``) and set up
        the re-rank inside FAISS (``refine``)."""
        return self._warming is not None and not self._warming.is_alive()

    def _touch_pages(self) -> None:
        import numpy as np

        try:
            maps = [np.frombuffer(arr._mmap, dtype=np.uint8) for arr in (self.vectors, self.scales)
                    if arr is not None and getattr(arr, "_mmap", None) is not None]
            pages = getattr(self._metadata, "_pg_pages", None)
            if pages is not None:
                maps.append(np.frombuffer(pages, dtype=np.uint8))
            available = available_memory()
            if available is None or sum(m.nbytes for m in maps) > available // 4:
                return
            for view in maps:
                int(view[::4096].sum())  # one byte per page: the fault maps its neighbours too
            self.mapped_reads = True
            if self.scales is None and not self.flat:
                self.refine = FaissRerank.build(self.index, self.vectors, self.count)
        except Exception:  # noqa: BLE001 - a hint only: reads stay correct without it
            return

    # opening ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        """Open and validate a bundle folder; raises a BundleError subclass naming the file and the fix."""
        path = Path(path).expanduser()
        manifest = read_manifest(path)
        cls._check_files(path, manifest)
        index = cls._open_index(path, manifest)
        vectors, scales = cls._open_vectors(path, manifest)
        reader = cls._open_metadata(path, manifest)
        removed = cls._open_removed(path, manifest)
        return cls(path, manifest, index, vectors, scales, reader, removed)

    @staticmethod
    def _check_files(path: Path, m: Manifest) -> None:
        for name in m.data_files():
            if name not in m.files:
                raise ManifestError(f"{path / MANIFEST}: file {name} is used but not listed under \"files\"; "
                                    f"rebuild the bundle")
        for name, info in m.files.items():
            fpath = bundle_file(path, name, str(path / MANIFEST))
            if not fpath.is_file():
                raise BundleFileError(f"{fpath} is missing from bundle {m.bundle_id}; copy the whole bundle folder "
                                      f"again or rebuild it")
            size = fpath.stat().st_size
            if size != info.get("size"):
                raise BundleFileError(
                    f"{fpath} is {size:,} bytes but the manifest records {info.get('size'):,}: the file is truncated "
                    f"or was replaced; copy it again (then 'provenance-guard index verify {path}')"
                )

    @staticmethod
    def _open_index(path: Path, m: Manifest):
        import faiss

        fpath = path / m.index_file
        flags = faiss.IO_FLAG_READ_ONLY
        flags |= faiss.IO_FLAG_ONDISK_SAME_DIR if m.ivfdata_file else faiss.IO_FLAG_MMAP_IFC
        try:
            with quiet_stdout():
                index = faiss.read_index(str(fpath), flags)
        except RuntimeError as exc:
            raise IndexCorruptError(
                f"{fpath} is not a readable FAISS index ({str(exc).splitlines()[0][:160]}); the file is truncated "
                f"or damaged: copy it again or rebuild the bundle"
            ) from exc
        if index.d != m.dim:
            raise DimensionMismatchError(
                f"{fpath} holds {index.d}-d vectors but the manifest's model {m.model} gives {m.dim}-d: the index "
                f"was built from another model's embeddings; rebuild it with --model matching the embeddings"
            )
        if index.ntotal != m.count:
            raise RowCountMismatchError(
                f"{fpath} holds {index.ntotal:,} vectors but the manifest says {m.count:,} rows: rows would be "
                f"misattributed; rebuild the bundle"
            )
        if m.search_params:
            params = ",".join(f"{k}={v}" for k, v in m.search_params.items())
            try:
                faiss.ParameterSpace().set_index_parameters(index, params)
            except RuntimeError as exc:
                raise ManifestError(f"{path / MANIFEST}: search_params {params!r} do not apply to a "
                                    f"{m.index_factory} index ({exc}); fix or remove them") from exc
        return index

    @staticmethod
    def _open_vectors(path: Path, m: Manifest):
        import numpy as np

        if not m.rerank_file:
            return None, None
        if m.rerank_dtype not in RERANK_DTYPES:
            raise ManifestError(f"{path / MANIFEST}: re-rank dtype {m.rerank_dtype!r} is unknown; rebuild the bundle")
        arrays = []
        for name, ndim in ((m.rerank_file, 2), (m.rerank_scale_file, 1)):
            if name is None:
                arrays.append(None)
                continue
            fpath = path / name
            try:
                arr = np.load(fpath, mmap_mode="r", allow_pickle=False)
                _advise_random(arr)
            except (ValueError, OSError) as exc:
                raise BundleFileError(f"{fpath} is not a readable .npy file ({exc}); rebuild the bundle") from exc
            if arr.ndim != ndim or (ndim == 2 and arr.shape[1] != m.dim):
                raise DimensionMismatchError(
                    f"{fpath} holds an array of shape {arr.shape} but the manifest says {m.dim}-d vectors; "
                    f"rebuild the bundle")
            if arr.shape[0] != m.count:
                raise RowCountMismatchError(
                    f"{fpath} holds {arr.shape[0]:,} rows but the manifest says {m.count:,}; rebuild the bundle")
            arrays.append(arr)
        if m.rerank_dtype == "int8" and arrays[1] is None:
            raise ManifestError(f"{path / MANIFEST}: int8 re-rank vectors need their scale file; rebuild the bundle")
        return arrays[0], arrays[1]

    @staticmethod
    def _open_metadata(path: Path, m: Manifest):
        import pyarrow as pa
        import pyarrow.ipc as ipc

        fpath = path / m.metadata_file
        try:
            source = pa.memory_map(str(fpath), "r")
            reader = ipc.open_file(source)
            source.seek(0)
            reader._pg_pages = source.read_buffer()  # zero-copy: the whole map, for warm_up()
        except (pa.ArrowInvalid, OSError) as exc:
            raise BundleFileError(f"{fpath} is not a readable Arrow IPC file ({exc}); rebuild the bundle") from exc
        batches = reader.num_record_batches
        last = 0 if batches == 0 else reader.get_batch(batches - 1).num_rows
        rows = 0 if batches == 0 else (batches - 1) * m.metadata_batch_rows + last
        if rows != m.count or last > m.metadata_batch_rows:
            held = f"a last record batch of {last:,} rows (batches hold {m.metadata_batch_rows:,})" \
                if rows == m.count else f"{rows:,} metadata rows but the manifest says {m.count:,}"
            raise RowCountMismatchError(f"{fpath} holds {held}: metadata would be joined to the wrong vectors; "
                                        f"rebuild the bundle")
        return reader

    @staticmethod
    def _open_removed(path: Path, m: Manifest) -> np.ndarray:
        import numpy as np

        if not m.removed_file:
            return np.zeros(0, dtype=np.int64)
        return read_removed(path / m.removed_file, m.count, m.removed_count)

    # reading ------------------------------------------------------------------------------------------
    def is_removed(self, ids) -> np.ndarray:
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)
        if not len(self.removed):
            return np.zeros(ids.shape, dtype=bool)
        pos = np.searchsorted(self.removed, ids).clip(0, len(self.removed) - 1)
        return self.removed[pos] == ids

    def rows(self, ids: Iterable[int], json_values: bool = False,
             extra: dict[str, list] | None = None) -> list[dict[str, Any]]:
        """Metadata of the given row ids, each a dict of every column; a removed row gives {"removed": True}.
        json_values: every value as a JSON answer holds it (a float that is not finite reads None; bytes,
        dates and other types as core.result makes them). extra: more values for each row, one list per
        key in the order of ids, set after the metadata's (a key the metadata has keeps its place)."""
        ids = [int(i) for i in ids]
        gone = self.is_removed(ids).tolist() if len(self.removed) else None
        count = self.manifest.count
        bad = next((i for i in ids if not 0 <= i < count), None)
        if bad is not None:
            raise IndexError(f"row {bad} is outside bundle {self.id} (0..{count - 1})")
        extra = extra or {}
        if any(len(v) != len(ids) for v in extra.values()):
            raise ValueError("rows(): every extra list needs one value per id")
        names = self._rows.names
        # a metadata column that extra also names keeps its place and takes extra's values, unread
        replaced = {c: extra[n] for c, n in enumerate(names) if n in extra}
        columns = self._rows.columns(ids, json_values, skip=replaced.keys())
        for c, values in replaced.items():
            columns[c] = values
        added = [k for k in extra if k not in self._rows.name_set]
        columns += [extra[k] for k in added]
        names = names + added
        out = [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)] if names \
            else [{} for _ in ids]
        if gone is not None:
            for n, removed in enumerate(gone):
                if removed:
                    out[n] = {"removed": True, **{k: v[n] for k, v in extra.items()}}
        return out

    def metadata_batches(self):
        """Every metadata record batch in row order (for rewriting a bundle)."""
        for n in range(self._metadata.num_record_batches):
            yield self._metadata.get_batch(n)

    @property
    def columns(self) -> list[str]:
        return list(self._metadata.schema.names)

    def vector(self, ids) -> np.ndarray:
        """Stored unit vectors of ids as float32 (requires re-rank vectors).

        By default rows are read with pread: for a check's few random rows that is faster than a fresh
        memory map (a page fault per row: ~150 us against ~60 us for 40 rows from the page cache). With
        ``mapped_reads`` (the index server, or once warm) they come through the map in one call that keeps
        the GIL: a pread per row hands the GIL over at every row, which with dozens of request threads cost
        the server half its throughput, and a long-running process soon has the rows it reads mapped.
        float16 rows are widened by rerank.widen_half (numpy's astype took 3-4x as long, FAISS's
        reconstruct_batch 1.1x astype's time for a knn request's 40 rows)."""
        import numpy as np

        if self.vectors is None:
            raise BundleError(f"bundle {self.id} stores no re-rank vectors; rebuild it with re-rank vectors")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        # one reduction checks both ends: read unsigned, a negative id (take would wrap it) is past every row
        if len(ids) and int(ids.view(np.uint64).max()) >= self.count:
            bad = next(int(i) for i in ids if not 0 <= i < self.count)
            raise IndexError(f"row {bad} is outside bundle {self.id} (0..{self.count - 1})")
        gather = (lambda arr: np.asarray(arr).take(ids, axis=0)) if self.mapped_reads else \
            (lambda arr: self._gather(arr, ids))
        return decode_rerank(gather(self.vectors), None if self.scales is None else gather(self.scales))

    def _gather(self, arr, ids) -> np.ndarray:
        import numpy as np

        fd = self._fds.get(arr.filename)
        if fd is None:  # threads share a bundle: the first to open wins, a loser closes its own
            mine = os.open(arr.filename, os.O_RDONLY)
            fd = self._fds.setdefault(arr.filename, mine)
            if fd != mine:
                os.close(mine)
        row_bytes = arr.dtype.itemsize * (arr.shape[1] if arr.ndim == 2 else 1)
        shape = (len(ids),) + arr.shape[1:]
        if not len(ids):
            return np.zeros(shape, arr.dtype)
        first = int(ids[0])
        if int(ids[-1]) - first + 1 == len(ids) and (len(ids) == 1 or bool(np.all(np.diff(ids) == 1))):
            data = os.pread(fd, row_bytes * len(ids), arr.offset + first * row_bytes)
        else:
            data = b"".join(os.pread(fd, row_bytes, arr.offset + int(i) * row_bytes) for i in ids)
        return np.frombuffer(data, dtype=arr.dtype).reshape(shape)

    def verify(self) -> list[str]:
        """Recompute every file's sha256; returns the problems found (empty when the bundle is intact). The
        structure was validated when the bundle was opened."""
        problems = []
        for name, info in self.manifest.files.items():
            fpath = bundle_file(self.path, name)
            if not fpath.is_file():
                problems.append(f"{fpath}: missing")
                continue
            digest = sha256_file(fpath)
            if digest != info.get("sha256"):
                problems.append(f"{fpath}: sha256 {digest} differs from the manifest's {info.get('sha256')}")
        return problems

    def files_table(self) -> list[tuple[str, int, str]]:
        return [(name, int(info.get("size", 0)), str(info.get("sha256", ""))) for name, info in
                sorted(self.manifest.files.items())]


# removed rows -------------------------------------------------------------------------------------------------

def read_removed(fpath: Path, count: int, expected: int) -> np.ndarray:
    """removed.npy validated: a plain (never pickled) 1-d integer array of strictly increasing row ids in
    0..count-1, as many as the manifest says."""
    import numpy as np

    try:
        removed = np.load(fpath, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BundleFileError(f"{fpath} is not a plain .npy array of row ids ({exc}); restore it, or rebuild "
                              f"the removal with 'provenance-guard index remove'") from exc
    if removed.ndim != 1 or not np.issubdtype(removed.dtype, np.integer):
        raise BundleFileError(f"{fpath} holds a {removed.dtype} array of shape {removed.shape}, not a list of "
                              f"row ids; restore it or redo the removals")
    if len(removed) != expected:
        raise RowCountMismatchError(f"{fpath} holds {len(removed)} ids but the manifest says {expected} removed "
                                    f"rows; restore it or redo the removals")
    removed = removed.astype(np.int64)
    if len(removed) and (removed[0] < 0 or removed[-1] >= count or bool(np.any(np.diff(removed) <= 0))):
        raise BundleFileError(f"{fpath} is damaged: its ids must be distinct, sorted and within 0..{count - 1}; "
                              f"restore it or redo the removals")
    return removed

"""The index bundle: the one on-disk format every surface opens, and the one writer that makes it.

A bundle is a folder::

    manifest.json      what the bundle is (see Manifest); written last, so a folder without it is no bundle
    index.faiss        the FAISS index over the rows (inner product on unit vectors = cosine)
    index.ivfdata      inverted lists of a large IVF index, kept on disk and memory-mapped (optional)
    trained.index      the trained, empty index, so rows can be appended without retraining (IVF bundles)
    metadata.arrow     Arrow IPC file, one row per vector: url, caption and every column the source had,
                       in record batches of ``metadata.batch_rows`` rows so row i is found in O(1)
    vectors.f16.npy    the unit vectors as float16 for exact re-ranking, or vectors.i8.npy + vectors.scale.npy
                       (int8 codes with one scale per row); optional: without them scores are the index's
                       approximations and every result says so
    removed.npy        sorted row ids taken out (opt-outs, takedowns); FAISS never returns them (optional)

Opening costs O(1) in the bundle's size: the manifest is read, files are checked against their recorded
sizes, and index, metadata and vectors are memory-mapped read-only. Row ids are positions (0-based) in the
order rows were added; removal keeps positions, so ids stay stable across versions.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

from .config import DEFAULT_BLOCK, DEFAULT_WARN, METADATA_BATCH_ROWS
from .errors import (BundleError, BundleFileError, ConfigError, DimensionMismatchError, IndexCorruptError,
                     ManifestError, RowCountMismatchError)

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pyarrow as pa

FORMAT = "provenance-guard-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
METADATA_FILE = "metadata.arrow"
VECTORS_FILE = "vectors.f16.npy"
VECTORS_I8_FILE = "vectors.i8.npy"
SCALES_FILE = "vectors.scale.npy"
TRAINED_FILE = "trained.index"
REMOVED_FILE = "removed.npy"
RERANK_DTYPES = ("float16", "int8")

# Column names of the producers in the field (LAION release, clip-retrieval, LAION-400M, img2dataset),
# mapped onto the two every surface shows; all other columns are kept under their own names.
URL_COLUMNS = ("url", "URL")
CAPTION_COLUMNS = ("caption", "TEXT", "text")


def _tool_version() -> str:
    from .. import __version__

    return __version__


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Manifest:
    """manifest.json as a dataclass; ``to_json``/``from_json`` keep the on-disk layout in one place."""

    bundle_id: str
    bundle_version: str
    model: str
    dim: int
    count: int
    index_factory: str = "Flat"
    index_file: str = INDEX_FILE
    ivfdata_file: Optional[str] = None
    trained_file: Optional[str] = None
    search_params: dict[str, Any] = field(default_factory=dict)
    rerank_file: Optional[str] = VECTORS_FILE
    rerank_dtype: str = "float16"
    rerank_scale_file: Optional[str] = None
    metadata_file: str = METADATA_FILE
    metadata_batch_rows: int = METADATA_BATCH_ROWS
    removed_file: Optional[str] = None
    removed_count: int = 0
    warn: float = DEFAULT_WARN
    block: float = DEFAULT_BLOCK
    description: str = ""
    normalized: bool = True
    metric: str = "cosine"
    build: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def flat(self) -> bool:
        """True when the index is exhaustive and scores every row in float32 (its scores are exact)."""
        return self.index_factory.replace(" ", "") in ("Flat", "IDMap,Flat", "IDMap2,Flat")

    @property
    def exact(self) -> bool:
        """True when reported scores are exact cosines: a flat index, or stored vectors to re-rank with."""
        return self.flat or self.rerank_file is not None

    def data_files(self) -> list[str]:
        """Every file of the bundle but the manifest."""
        return [f for f in (self.index_file, self.ivfdata_file, self.trained_file, self.metadata_file,
                            self.rerank_file, self.rerank_scale_file, self.removed_file) if f]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "bundle": {"id": self.bundle_id, "version": self.bundle_version, "description": self.description},
            "embedding": {"model": self.model, "dim": self.dim, "normalized": self.normalized},
            "metric": self.metric,
            "count": self.count,
            "index": {"factory": self.index_factory, "file": self.index_file, "ivfdata": self.ivfdata_file,
                      "trained": self.trained_file, "search_params": self.search_params},
            "rerank": {"file": self.rerank_file, "dtype": self.rerank_dtype if self.rerank_file else None,
                       "scale_file": self.rerank_scale_file, "scores": "exact" if self.exact else "approximate"},
            "metadata": {"file": self.metadata_file, "batch_rows": self.metadata_batch_rows},
            "removed": {"file": self.removed_file, "count": self.removed_count},
            "thresholds": {"warn": self.warn, "block": self.block},
            "build": self.build,
            "files": self.files,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = MANIFEST) -> "Manifest":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a provenance-guard bundle manifest (no \"format\": \"{FORMAT}\")")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{where}: bundle format version {version!r} is not known to this release, which reads version "
                f"{FORMAT_VERSION}; upgrade provenance-guard (pip install -U provenance-guard) or rebuild the "
                f"bundle with this release"
            )
        try:
            rerank = data.get("rerank") or {}
            removed = data.get("removed") or {}
            return cls(
                bundle_id=str(data["bundle"]["id"]),
                bundle_version=str(data["bundle"]["version"]),
                description=str(data["bundle"].get("description", "")),
                model=str(data["embedding"]["model"]),
                dim=int(data["embedding"]["dim"]),
                normalized=bool(data["embedding"].get("normalized", True)),
                metric=str(data.get("metric", "cosine")),
                count=int(data["count"]),
                index_factory=str(data["index"]["factory"]),
                index_file=str(data["index"]["file"]),
                ivfdata_file=data["index"].get("ivfdata"),
                trained_file=data["index"].get("trained"),
                search_params=dict(data["index"].get("search_params") or {}),
                rerank_file=rerank.get("file"),
                rerank_dtype=str(rerank.get("dtype") or "float16"),
                rerank_scale_file=rerank.get("scale_file"),
                metadata_file=str(data["metadata"]["file"]),
                metadata_batch_rows=int(data["metadata"]["batch_rows"]),
                removed_file=removed.get("file"),
                removed_count=int(removed.get("count") or 0),
                warn=float(data["thresholds"]["warn"]),
                block=float(data["thresholds"]["block"]),
                build=dict(data.get("build") or {}),
                files=dict(data.get("files") or {}),
                format_version=int(version),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where}: field {exc} is missing or malformed; rebuild the bundle") from exc


def manifest_stamp(path: Union[str, Path]) -> Optional[tuple]:
    """Changes whenever a bundle is published at this path or its manifest is rewritten (every change to a
    bundle ends that way); None where there is no manifest to stat (a server URL, a missing folder)."""
    try:
        st = os.stat(Path(path).expanduser() / MANIFEST)
    except (OSError, ValueError):
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def read_manifest(path: Union[str, Path]) -> Manifest:
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise BundleFileError(f"bundle {path} does not exist or is not a folder; build one with "
                              f"'provenance-guard index build --images DIR --out {path}'")
    if not mpath.is_file():
        raise ManifestError(f"{mpath} is missing: {path} is not a complete bundle (a build that did not finish "
                            f"leaves no manifest); rebuild it")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{mpath} cannot be parsed ({exc}); restore it from the bundle's source") from exc
    return Manifest.from_json(data, str(mpath))


_STDOUT_LOCK = threading.Lock()


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


def sha256_file(path: Union[str, Path], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def search_parameters(index, params: dict[str, Any], removed: Optional["np.ndarray"] = None):
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
                 removed: "np.ndarray"):
        self.path = path
        self.manifest = manifest
        self.index = index
        self.vectors = vectors
        self.scales = scales
        self.removed = removed
        self.params, self._keep = search_parameters(index, manifest.search_params, removed)
        self._metadata = metadata_reader
        self._batches: dict[int, Any] = {}
        self._fds: dict[str, int] = {}
        # Re-rank rows: pread by default; through the memory map in a server (see vector()).
        self.mapped_reads = False

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
        return self.manifest.exact

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

    # opening ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Union[str, Path]) -> "Bundle":
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
            fpath = path / name
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
                arr = np.load(fpath, mmap_mode="r")
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
            reader = ipc.open_file(pa.memory_map(str(fpath), "r"))
        except (pa.ArrowInvalid, OSError) as exc:
            raise BundleFileError(f"{fpath} is not a readable Arrow IPC file ({exc}); rebuild the bundle") from exc
        batches = reader.num_record_batches
        rows = 0 if batches == 0 else (batches - 1) * m.metadata_batch_rows + reader.get_batch(batches - 1).num_rows
        if rows != m.count:
            raise RowCountMismatchError(
                f"{fpath} holds {rows:,} metadata rows but the manifest says {m.count:,}: metadata would be joined to "
                f"the wrong vectors; rebuild the bundle"
            )
        return reader

    @staticmethod
    def _open_removed(path: Path, m: Manifest) -> "np.ndarray":
        import numpy as np

        if not m.removed_file:
            return np.zeros(0, dtype=np.int64)
        removed = np.load(path / m.removed_file)
        if removed.ndim != 1 or len(removed) != m.removed_count:
            raise RowCountMismatchError(f"{path / m.removed_file} holds {removed.shape} ids but the manifest says "
                                        f"{m.removed_count} removed rows; rebuild the bundle")
        return removed.astype(np.int64)

    # reading ------------------------------------------------------------------------------------------
    def is_removed(self, ids) -> "np.ndarray":
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)
        if not len(self.removed):
            return np.zeros(ids.shape, dtype=bool)
        pos = np.searchsorted(self.removed, ids).clip(0, len(self.removed) - 1)
        return self.removed[pos] == ids

    def rows(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        """Metadata of the given row ids, each a dict of every column; a removed row gives {"removed": True}."""
        ids = [int(i) for i in ids]
        gone = self.is_removed(ids) if len(self.removed) else [False] * len(ids)
        out = []
        size = self.manifest.metadata_batch_rows
        names = self._metadata.schema.names
        for i, removed in zip(ids, gone):
            if not 0 <= i < self.count:
                raise IndexError(f"row {i} is outside bundle {self.id} (0..{self.count - 1})")
            if removed:
                out.append({"removed": True})
                continue
            batch, j = self._batch(i // size), i % size
            out.append({name: batch.column(c)[j].as_py() for c, name in enumerate(names)})
        return out

    def _batch(self, n: int):
        # Locating a batch in the IPC file costs ~60 us; the batch objects themselves are zero-copy views.
        batch = self._batches.get(n)
        if batch is None:
            batch = self._batches[n] = self._metadata.get_batch(n)
        return batch

    def metadata_batches(self):
        """Every metadata record batch in row order (for rewriting a bundle)."""
        for n in range(self._metadata.num_record_batches):
            yield self._metadata.get_batch(n)

    @property
    def columns(self) -> list[str]:
        return list(self._metadata.schema.names)

    def vector(self, ids) -> "np.ndarray":
        """Stored unit vectors of ids as float32 (requires re-rank vectors).

        By default rows are read with pread: for a check's few random rows that is faster than a fresh
        memory map (a page fault per row: ~150 us against ~60 us for 40 rows from the page cache). With
        ``mapped_reads`` (the index server) they come through the map in one call that keeps the GIL: a
        pread per row hands the GIL over at every row, which with dozens of request threads cost the server
        half its throughput, and a long-running process soon has the rows it reads mapped."""
        import numpy as np

        if self.vectors is None:
            raise BundleError(f"bundle {self.id} stores no re-rank vectors; rebuild it with re-rank vectors")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        gather = (lambda arr: np.asarray(arr[ids])) if self.mapped_reads else (lambda arr: self._gather(arr, ids))
        return decode_rerank(gather(self.vectors), None if self.scales is None else gather(self.scales))

    def _gather(self, arr, ids) -> "np.ndarray":
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
        """Recompute every file's sha256; returns the problems found (empty when the bundle is intact)."""
        problems = []
        for name, info in self.manifest.files.items():
            fpath = self.path / name
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


# re-rank vectors -----------------------------------------------------------------------------------------

def rerank_file_names(dtype: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(vectors file, scale file) for a re-rank dtype (float16, int8, or None for no vectors)."""
    if dtype is None:
        return None, None
    if dtype == "float16":
        return VECTORS_FILE, None
    if dtype == "int8":
        return VECTORS_I8_FILE, SCALES_FILE
    raise ConfigError(f"re-rank vectors {dtype!r}: give float16, int8 or none")


def encode_rerank(vectors: "np.ndarray", dtype: str) -> tuple["np.ndarray", Optional["np.ndarray"]]:
    """Unit float32 rows -> (codes, per-row scales or None). int8 keeps one float32 scale per row
    (max |x| / 127), so a row's cosine with itself stays >= 0.999."""
    import numpy as np

    if dtype == "float16":
        return vectors.astype("<f2"), None
    scale = np.abs(vectors).max(axis=1) / 127.0
    scale = np.maximum(scale, 1e-12).astype("<f4")
    codes = np.clip(np.rint(vectors / scale[:, None]), -127, 127).astype("i1")
    return codes, scale


def _advise_random(arr) -> None:
    """Tell the kernel that a memory-mapped array is read at random rows: a cold row read through the map
    faults in its own page, not a readahead window."""
    import mmap

    m = getattr(arr, "_mmap", None)
    if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        try:
            m.madvise(mmap.MADV_RANDOM)
        except (OSError, ValueError):
            pass  # an advice the platform refuses changes speed only


_F16_TABLE = None


def decode_rerank(codes: "np.ndarray", scales: Optional["np.ndarray"]) -> "np.ndarray":
    """Stored re-rank codes -> float32 rows. float16 goes through a 65536-entry lookup table (faster than
    numpy's element-wise widening, and unlike torch it starts no OpenMP pool to fight faiss's)."""
    import numpy as np

    global _F16_TABLE
    if scales is None:
        if _F16_TABLE is None:
            _F16_TABLE = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
        return _F16_TABLE[np.ascontiguousarray(codes).view(np.uint16)]
    return codes.astype(np.float32) * np.asarray(scales, dtype=np.float32)[:, None]


def _npy_header(rows: int, dim: Optional[int], dtype: str, length: int = 128) -> bytes:
    """A .npy v1 header of a fixed length, so it can be rewritten in place once the row count is known."""
    shape = (rows, dim) if dim is not None else (rows,)
    body = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode("latin1")
    pad = length - 10 - len(body) - 1
    if pad < 0:
        raise ValueError("npy header too long")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", length - 10) + body + b" " * pad + b"\n"


class RerankFileWriter:
    """Re-rank vector files of a known row count, written at row offsets with pwrite (so parallel workers
    can each write their slice, and nothing is memory-mapped: a build's RSS stays its real memory)."""

    def __init__(self, folder: Path, rows: int, dim: int, dtype: str, create: bool = True):
        import numpy as np

        self.dim, self.dtype = dim, dtype
        self.vec_name, self.scale_name = rerank_file_names(dtype)
        self._files = []
        for name, shape, descr in ((self.vec_name, (rows, dim), "<f2" if dtype == "float16" else "|i1"),
                                   (self.scale_name, (rows,), "<f4")):
            if name is None:
                continue
            path = folder / name
            if create or not path.is_file():
                with open(path, "wb") as f:
                    np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
                    header = f.tell()
                    f.truncate(header + int(np.prod(shape)) * np.dtype(descr).itemsize)
            with open(path, "rb") as f:
                np.lib.format.read_magic(f)
                np.lib.format.read_array_header_1_0(f)
                header = f.tell()
            row_bytes = np.dtype(descr).itemsize * (dim if len(shape) == 2 else 1)
            self._files.append((os.open(path, os.O_RDWR), header, row_bytes))

    def write(self, first: int, vectors: "np.ndarray") -> None:
        """Unit float32 rows for ids first..first+len-1."""
        codes, scales = encode_rerank(vectors, self.dtype)
        for (fd, header, row_bytes), arr in zip(self._files, (codes, scales)):
            os.pwrite(fd, arr.tobytes(), header + first * row_bytes)

    def close(self) -> None:
        for fd, _, _ in self._files:
            os.fsync(fd)
            os.close(fd)
        self._files = []


class RerankAppender:
    """Streams re-rank vectors into .npy files whose headers are fixed up on close."""

    def __init__(self, folder: Path, dim: int, dtype: str):
        self.dim, self.dtype, self.rows = dim, dtype, 0
        self.vec_name, self.scale_name = rerank_file_names(dtype)
        self._descr = "<f2" if dtype == "float16" else "|i1"
        self._vec = open(folder / self.vec_name, "wb")
        self._vec.write(_npy_header(0, dim, self._descr))
        self._scale = open(folder / self.scale_name, "wb") if self.scale_name else None
        if self._scale:
            self._scale.write(_npy_header(0, None, "<f4"))

    def add(self, vectors: "np.ndarray") -> None:
        codes, scales = encode_rerank(vectors, self.dtype)
        self._vec.write(codes.tobytes())
        if self._scale is not None:
            self._scale.write(scales.tobytes())
        self.rows += len(vectors)

    def close(self) -> None:
        for handle, dim, descr in ((self._vec, self.dim, self._descr), (self._scale, None, "<f4")):
            if handle is None or handle.closed:
                continue
            handle.seek(0)
            handle.write(_npy_header(self.rows, dim, descr))
            handle.close()


# metadata --------------------------------------------------------------------------------------------------

def normalize_metadata(table: "pa.Table") -> "pa.Table":
    """Rename the producer's url/caption columns to ``url``/``caption`` (strings); keep every other column."""
    import pyarrow as pa

    names = list(table.column_names)
    for canonical, candidates in (("url", URL_COLUMNS), ("caption", CAPTION_COLUMNS)):
        if canonical in names:
            src = canonical
        else:
            src = next((c for c in candidates if c in names), None)
        if src is None:
            table = table.append_column(canonical, pa.nulls(table.num_rows, pa.string()))
        else:
            idx = names.index(src)
            col = table.column(src)
            if not pa.types.is_string(col.type):
                col = col.cast(pa.string())
            table = table.set_column(idx, canonical, col)
        names = list(table.column_names)
    order = ["url", "caption"] + [n for n in names if n not in ("url", "caption")]
    return table.select(order)


class MetadataWriter:
    """Writes metadata rows to an Arrow IPC file in record batches of exactly ``batch_rows`` rows (the last
    may be shorter), under the schema of the first rows; later rows are conformed to it."""

    def __init__(self, path: Path, batch_rows: int = METADATA_BATCH_ROWS, schema: Optional["pa.Schema"] = None):
        self.path, self.batch_rows = path, batch_rows
        self.rows = 0
        self._schema = schema
        self._writer = None
        self._sink = None
        self._pending: list["pa.Table"] = []
        self._pending_rows = 0

    def write(self, table: Union["pa.Table", list[dict[str, Any]]]) -> None:
        import pyarrow as pa

        if not isinstance(table, pa.Table):
            table = pa.Table.from_pylist(list(table))
        table = normalize_metadata(table)
        if self._schema is None:
            self._schema = table.schema
        else:
            table = self._conform(table)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        while self._pending_rows >= self.batch_rows:
            merged = pa.concat_tables(self._pending)
            self._flush(merged.slice(0, self.batch_rows))
            rest = merged.slice(self.batch_rows)
            self._pending, self._pending_rows = [rest], rest.num_rows

    def _conform(self, table: "pa.Table") -> "pa.Table":
        import pyarrow as pa

        extra = [n for n in table.column_names if n not in self._schema.names]
        if extra:
            raise ConfigError(f"metadata columns {extra} appeared after the first rows; every shard must have "
                              f"the columns of the first ({self._schema.names})")
        cols = []
        for f in self._schema:
            if f.name in table.column_names:
                col = table.column(f.name)
                cols.append(col if col.type == f.type else col.cast(f.type, safe=False))
            else:
                cols.append(pa.nulls(table.num_rows, f.type))
        return pa.Table.from_arrays(cols, schema=self._schema)

    def _flush(self, table: "pa.Table") -> None:
        import pyarrow as pa
        import pyarrow.ipc as ipc

        if self._writer is None:
            self._sink = pa.OSFile(str(self.path), "wb")
            self._writer = ipc.new_file(self._sink, self._schema)
        for batch in table.combine_chunks().to_batches(max_chunksize=self.batch_rows):
            self._writer.write_batch(batch)

    def close(self) -> int:
        import pyarrow as pa

        if self._schema is None:
            self._schema = pa.schema([("url", pa.string()), ("caption", pa.string())])
        if self._pending_rows or self._writer is None:
            self._flush(pa.concat_tables(self._pending) if self._pending else self._schema.empty_table())
            self._pending, self._pending_rows = [], 0
        self._writer.close()
        self._sink.close()
        return self.rows

    def abort(self) -> None:
        for handle in (self._writer, self._sink):
            try:
                if handle is not None:
                    handle.close()
            except Exception:  # noqa: BLE001 - closing half-written files on the way out
                pass


# the writer --------------------------------------------------------------------------------------------------

class BundleWriter:
    """Streams rows into a new bundle in a private temporary folder and publishes it with a rename.

    Use: ``w = BundleWriter(out, model=..., dim=...)``; ``w.add(vectors, metadata)`` any number of times;
    ``w.finish(index)`` (or ``w.finish()`` for an exact flat index built from the added vectors). Nothing is
    visible at ``out`` until finish() succeeds; ``abort()`` (or an exception inside ``with``) removes the
    temporary folder. Memory stays bounded by one metadata batch, whatever the number of rows.
    """

    def __init__(self, out: Union[str, Path], *, model: str, dim: int, bundle_id: Optional[str] = None,
                 bundle_version: Optional[str] = None, description: str = "", warn: float = DEFAULT_WARN,
                 block: float = DEFAULT_BLOCK, rerank: Optional[str] = "float16", overwrite: bool = False):
        from .policy import validate_thresholds

        validate_thresholds(warn, block)
        rerank_file_names(rerank)
        self.out = Path(out).expanduser()
        if self.out.exists() and not overwrite:
            raise ConfigError(f"{self.out} already exists; pass --overwrite to replace it (the old bundle keeps "
                              f"serving until the new one is complete)")
        self.dim = int(dim)
        self.manifest = Manifest(
            bundle_id=bundle_id or self.out.name,
            bundle_version=bundle_version or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
            description=description, model=model, dim=self.dim, count=0, warn=warn, block=block,
            rerank_file=None, rerank_dtype=rerank or "float16",
        )
        self.count = 0
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True)
        self._rerank = RerankAppender(self.tmp, self.dim, rerank) if rerank else None
        self._meta = MetadataWriter(self.tmp / METADATA_FILE)
        self._flat = None
        self._build_flat = True

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, vectors: "np.ndarray", metadata: Union["pa.Table", list[dict[str, Any]]]) -> None:
        """Append rows: vectors N x dim (any float dtype; normalised here) and N metadata rows."""
        import numpy as np
        import pyarrow as pa

        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise DimensionMismatchError(f"vectors of shape {vectors.shape} added to a {self.dim}-d bundle; "
                                         f"embed with the bundle's model")
        table = metadata if isinstance(metadata, pa.Table) else pa.Table.from_pylist(list(metadata))
        if table.num_rows != len(vectors):
            raise RowCountMismatchError(f"{len(vectors)} vectors came with {table.num_rows} metadata rows; "
                                        f"every vector needs exactly one metadata row")
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        if self._rerank:
            self._rerank.add(vectors)
        if self._build_flat:
            import faiss

            if self._flat is None:
                self._flat = faiss.IndexFlatIP(self.dim)
            self._flat.add(vectors)
        self._meta.write(table)
        self.count += len(vectors)

    def no_flat_index(self) -> None:
        """Skip building the exact flat index while adding (for builders that supply their own index)."""
        self._build_flat = False
        self._flat = None

    def finish(self, index=None, *, factory: str = "Flat", search_params: Optional[dict[str, Any]] = None,
               ivfdata: Optional[Union[str, Path]] = None, trained=None,
               build: Optional[dict[str, Any]] = None) -> Path:
        """Write index, metadata, vectors and manifest; publish the folder at ``out``; return ``out``.

        ``ivfdata``: the on-disk inverted lists ``index`` points to (moved into the bundle);
        ``trained``: the trained empty index, kept so rows can be appended later.
        """
        import faiss

        if self.count == 0:
            self.abort()
            raise ConfigError("no rows were added: the bundle would be empty; check the input folder or shards")
        self._meta.close()
        if self._rerank:
            self._rerank.close()
        if index is None:
            if not self._build_flat:
                raise ConfigError("finish() needs an index when no_flat_index() was called")
            index, factory = self._flat, "Flat"
        if index.d != self.dim or index.ntotal != self.count:
            raise RowCountMismatchError(f"the index holds {index.ntotal} x {index.d}-d vectors but {self.count} x "
                                        f"{self.dim}-d rows were added")
        m = self.manifest
        if ivfdata is not None and Path(ivfdata).resolve() != (self.tmp / IVFDATA_FILE).resolve():
            shutil.move(str(ivfdata), self.tmp / IVFDATA_FILE)
        faiss.write_index(index, str(self.tmp / INDEX_FILE))
        if trained is not None:
            faiss.write_index(trained, str(self.tmp / TRAINED_FILE))
        self._flat = None
        m.count, m.index_factory, m.search_params = self.count, factory, dict(search_params or {})
        m.ivfdata_file = IVFDATA_FILE if ivfdata is not None else None
        m.trained_file = TRAINED_FILE if trained is not None else None
        if self._rerank:
            m.rerank_file, m.rerank_scale_file = self._rerank.vec_name, self._rerank.scale_name
        m.build = {"created": utc_now(), "tool": f"provenance-guard {_tool_version()}", **(build or {})}
        finalize(self.tmp, m)
        publish(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        self._meta.abort()
        if self._rerank:
            try:
                self._rerank.close()
            except Exception:  # noqa: BLE001 - closing half-written files on the way out
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def finalize(folder: Path, manifest: Manifest, hashed: Optional[dict[str, dict[str, Any]]] = None,
             hash_files: bool = True) -> None:
    """Record size and sha256 of every data file of manifest in folder, then write manifest.json durably.
    ``hashed`` carries entries already known (files copied unchanged from a previous version);
    ``hash_files=False`` writes sizes only (a provisional manifest, to open a bundle still being built)."""
    manifest.files = {}
    for name in manifest.data_files():
        fpath = folder / name
        known = (hashed or {}).get(name)
        if known and known.get("size") == fpath.stat().st_size:
            manifest.files[name] = dict(known)
        else:
            manifest.files[name] = {"size": fpath.stat().st_size,
                                    "sha256": sha256_file(fpath) if hash_files else None}
    write_manifest(folder, manifest)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write manifest.json durably (temp file, fsync, rename)."""
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def publish(tmp: Path, out: Path) -> None:
    """Move a finished bundle folder to out; an existing bundle at out is replaced only once tmp is complete.

    Processes that already opened the old bundle keep reading it (its files stay mapped until they close).
    """
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    dir_fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

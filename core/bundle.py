"""The index bundle: the one on-disk format every surface opens, and the one writer that makes it.

A bundle is a folder::

    manifest.json      what the bundle is (see Manifest); written last, so a folder without it is no bundle
    index.faiss        the FAISS index over the rows (inner product on unit vectors = cosine)
    index.ivfdata      inverted lists of a large IVF index, kept on disk (optional)
    metadata.arrow     Arrow IPC file, one row per vector: url, caption and every column the source had,
                       in record batches of ``metadata.batch_rows`` rows so row i is found in O(1)
    vectors.f16.npy    the unit vectors as float16 for exact re-ranking (optional: without it scores are
                       the index's approximations and every result says so)

Opening costs O(1) in the bundle's size: the manifest is read, files are checked against their recorded
sizes, and index, metadata and vectors are memory-mapped read-only. Row ids are positions (0-based) in the
order rows were added.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import uuid
from dataclasses import asdict, dataclass, field
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
    search_params: dict[str, Any] = field(default_factory=dict)
    rerank_file: Optional[str] = VECTORS_FILE
    rerank_dtype: str = "float16"
    metadata_file: str = METADATA_FILE
    metadata_batch_rows: int = METADATA_BATCH_ROWS
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

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "bundle": {"id": self.bundle_id, "version": self.bundle_version, "description": self.description},
            "embedding": {"model": self.model, "dim": self.dim, "normalized": self.normalized},
            "metric": self.metric,
            "count": self.count,
            "index": {"factory": self.index_factory, "file": self.index_file, "ivfdata": self.ivfdata_file,
                      "search_params": self.search_params},
            "rerank": {"file": self.rerank_file, "dtype": self.rerank_dtype if self.rerank_file else None,
                       "scores": "exact" if self.exact else "approximate"},
            "metadata": {"file": self.metadata_file, "batch_rows": self.metadata_batch_rows},
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
                search_params=dict(data["index"].get("search_params") or {}),
                rerank_file=rerank.get("file"),
                rerank_dtype=str(rerank.get("dtype", "float16")),
                metadata_file=str(data["metadata"]["file"]),
                metadata_batch_rows=int(data["metadata"]["batch_rows"]),
                warn=float(data["thresholds"]["warn"]),
                block=float(data["thresholds"]["block"]),
                build=dict(data.get("build") or {}),
                files=dict(data.get("files") or {}),
                format_version=int(version),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{where}: field {exc} is missing or malformed; rebuild the bundle") from exc


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


def sha256_file(path: Union[str, Path], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class Bundle:
    """An opened, validated bundle: memory-mapped index, metadata and re-rank vectors (read-only).

    Searching and reading rows are safe from many threads at once.
    """

    def __init__(self, path: Path, manifest: Manifest, index, vectors, metadata_reader):
        self.path = path
        self.manifest = manifest
        self.index = index
        self.vectors = vectors
        self._metadata = metadata_reader
        self._batches: dict[int, Any] = {}

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
        return self.manifest.count

    @property
    def exact(self) -> bool:
        return self.manifest.exact

    def __repr__(self) -> str:
        return f"Bundle({self.id!r} v{self.version}, {self.count} rows, {self.manifest.index_factory}, {self.path})"

    # opening ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Union[str, Path]) -> "Bundle":
        """Open and validate a bundle folder; raises a BundleError subclass naming the file and the fix."""
        path = Path(path).expanduser()
        manifest = read_manifest(path)
        cls._check_files(path, manifest)
        index = cls._open_index(path, manifest)
        vectors = cls._open_vectors(path, manifest)
        reader = cls._open_metadata(path, manifest)
        return cls(path, manifest, index, vectors, reader)

    @staticmethod
    def _check_files(path: Path, m: Manifest) -> None:
        needed = [m.index_file, m.metadata_file] + [f for f in (m.ivfdata_file, m.rerank_file) if f]
        for name in needed:
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
            return None
        fpath = path / m.rerank_file
        try:
            vectors = np.load(fpath, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise BundleFileError(f"{fpath} is not a readable .npy file ({exc}); rebuild the bundle") from exc
        if vectors.ndim != 2 or vectors.shape[1] != m.dim:
            raise DimensionMismatchError(
                f"{fpath} holds vectors of shape {vectors.shape} but the manifest says {m.dim}-d; rebuild the bundle"
            )
        if vectors.shape[0] != m.count:
            raise RowCountMismatchError(
                f"{fpath} holds {vectors.shape[0]:,} vectors but the manifest says {m.count:,} rows; rebuild the bundle"
            )
        return vectors

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

    # reading ------------------------------------------------------------------------------------------
    def rows(self, ids: Iterable[int]) -> list[dict[str, Any]]:
        """Metadata of the given row ids, each a dict of every column."""
        out = []
        size = self.manifest.metadata_batch_rows
        names = self._metadata.schema.names
        for i in ids:
            i = int(i)
            if not 0 <= i < self.count:
                raise IndexError(f"row {i} is outside bundle {self.id} (0..{self.count - 1})")
            batch, j = self._batch(i // size), i % size
            out.append({name: batch.column(c)[j].as_py() for c, name in enumerate(names)})
        return out

    def _batch(self, n: int):
        # Locating a batch in the IPC file costs ~60 us; the batch objects themselves are zero-copy views.
        batch = self._batches.get(n)
        if batch is None:
            batch = self._batches[n] = self._metadata.get_batch(n)
        return batch

    @property
    def columns(self) -> list[str]:
        return list(self._metadata.schema.names)

    def vector(self, ids) -> "np.ndarray":
        """Stored unit vectors of ids as float32 (requires re-rank vectors)."""
        import numpy as np

        if self.vectors is None:
            raise BundleError(f"bundle {self.id} stores no re-rank vectors")
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        out[order] = self.vectors[ids[order]]
        return out

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


# writing ----------------------------------------------------------------------------------------------

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


def _npy_header(rows: int, dim: int, dtype: str = "<f2", length: int = 128) -> bytes:
    """A .npy v1 header of a fixed length, so it can be rewritten in place once the row count is known."""
    body = repr({"descr": dtype, "fortran_order": False, "shape": (rows, dim)}).encode("latin1")
    pad = length - 10 - len(body) - 1
    if pad < 0:
        raise ValueError("npy header too long")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", length - 10) + body + b" " * pad + b"\n"


class BundleWriter:
    """Streams rows into a new bundle in a private temporary folder and publishes it with a rename.

    Use: ``w = BundleWriter(out, model=..., dim=...)``; ``w.add(vectors, metadata)`` any number of times;
    ``w.finish(index)`` (or ``w.finish()`` for an exact flat index built from the added vectors). Nothing is
    visible at ``out`` until finish() succeeds; ``abort()`` (or an exception inside ``with``) removes the
    temporary folder. Memory stays bounded by one metadata batch, whatever the number of rows.
    """

    def __init__(self, out: Union[str, Path], *, model: str, dim: int, bundle_id: Optional[str] = None,
                 bundle_version: Optional[str] = None, description: str = "", warn: float = DEFAULT_WARN,
                 block: float = DEFAULT_BLOCK, rerank: bool = True, overwrite: bool = False,
                 work_dir: Optional[Union[str, Path]] = None):
        from .policy import validate_thresholds

        validate_thresholds(warn, block)
        self.out = Path(out).expanduser()
        if self.out.exists() and not overwrite:
            raise ConfigError(f"{self.out} already exists; pass --overwrite to replace it (the old bundle keeps "
                              f"serving until the new one is complete)")
        self.model = model
        self.dim = int(dim)
        self.bundle_id = bundle_id or self.out.name
        self.bundle_version = bundle_version or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.description = description
        self.warn, self.block = warn, block
        self.rerank = rerank
        self.count = 0
        self.tmp = Path(work_dir) if work_dir else self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True, exist_ok=bool(work_dir))
        self._vec = open(self.tmp / VECTORS_FILE, "wb") if rerank else None
        if self._vec:
            self._vec.write(_npy_header(0, self.dim))
        self._meta_writer = None
        self._meta_sink = None
        self._schema = None
        self._pending: list["pa.Table"] = []
        self._pending_rows = 0
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
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
        if self._vec:
            self._vec.write(vectors.astype("<f2").tobytes())
        if self._build_flat:
            import faiss

            if self._flat is None:
                self._flat = faiss.IndexFlatIP(self.dim)
            self._flat.add(vectors)
        self._add_metadata(normalize_metadata(table))
        self.count += len(vectors)

    def no_flat_index(self) -> None:
        """Skip building the exact flat index while adding (for builders that supply their own index)."""
        self._build_flat = False
        self._flat = None

    def _add_metadata(self, table: "pa.Table") -> None:
        import pyarrow as pa

        if self._schema is None:
            self._schema = table.schema
        else:
            table = self._conform(table)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= METADATA_BATCH_ROWS:
            merged = pa.concat_tables(self._pending)
            self._write_batch(merged.slice(0, METADATA_BATCH_ROWS))
            rest = merged.slice(METADATA_BATCH_ROWS)
            self._pending, self._pending_rows = [rest], rest.num_rows

    def _conform(self, table: "pa.Table") -> "pa.Table":
        import pyarrow as pa

        cols = []
        for f in self._schema:
            if f.name in table.column_names:
                col = table.column(f.name)
                cols.append(col if col.type == f.type else col.cast(f.type, safe=False))
            else:
                cols.append(pa.nulls(table.num_rows, f.type))
        extra = [n for n in table.column_names if n not in self._schema.names]
        if extra:
            raise ConfigError(f"metadata columns {extra} appeared after the first rows; every shard must have "
                              f"the columns of the first ({self._schema.names})")
        return pa.Table.from_arrays(cols, schema=self._schema)

    def _write_batch(self, table: "pa.Table") -> None:
        import pyarrow as pa
        import pyarrow.ipc as ipc

        if self._meta_writer is None:
            self._meta_sink = pa.OSFile(str(self.tmp / METADATA_FILE), "wb")
            self._meta_writer = ipc.new_file(self._meta_sink, self._schema)
        table = table.combine_chunks()
        for batch in table.to_batches(max_chunksize=METADATA_BATCH_ROWS):
            self._meta_writer.write_batch(batch)

    def finish(self, index=None, *, factory: str = "Flat", search_params: Optional[dict[str, Any]] = None,
               ivfdata: Optional[Union[str, Path]] = None, build: Optional[dict[str, Any]] = None) -> Path:
        """Write index, metadata, vectors and manifest; publish the folder at ``out``; return ``out``."""
        import faiss
        import pyarrow as pa

        if self.count == 0:
            self.abort()
            raise ConfigError("no rows were added: the bundle would be empty; check the input folder or shards")
        if self._pending_rows or self._meta_writer is None:
            self._write_batch(pa.concat_tables(self._pending) if self._pending else pa.table({}))
            self._pending, self._pending_rows = [], 0
        self._meta_writer.close()
        self._meta_sink.close()
        if self._vec:
            self._vec.seek(0)
            self._vec.write(_npy_header(self.count, self.dim))
            self._vec.close()
        if index is None:
            if not self._build_flat:
                raise ConfigError("finish() needs an index when no_flat_index() was called")
            index, factory = self._flat, "Flat"
        if index.d != self.dim or index.ntotal != self.count:
            raise RowCountMismatchError(f"the index holds {index.ntotal} x {index.d}-d vectors but {self.count} x "
                                        f"{self.dim}-d rows were added")
        faiss.write_index(index, str(self.tmp / INDEX_FILE))
        self._flat = None
        ivf_name = None
        if ivfdata is not None:
            ivf_name = IVFDATA_FILE
            if Path(ivfdata).resolve() != (self.tmp / IVFDATA_FILE).resolve():
                shutil.move(str(ivfdata), self.tmp / IVFDATA_FILE)
        manifest = Manifest(
            bundle_id=self.bundle_id, bundle_version=self.bundle_version, description=self.description,
            model=self.model, dim=self.dim, count=self.count, index_factory=factory, ivfdata_file=ivf_name,
            search_params=dict(search_params or {}), rerank_file=VECTORS_FILE if self.rerank else None,
            warn=self.warn, block=self.block,
            build={"created": utc_now(), "tool": f"provenance-guard {_tool_version()}", **(build or {})},
        )
        for name in [INDEX_FILE, METADATA_FILE] + ([VECTORS_FILE] if self.rerank else []) + (
                [IVFDATA_FILE] if ivf_name else []):
            fpath = self.tmp / name
            manifest.files[name] = {"size": fpath.stat().st_size, "sha256": sha256_file(fpath)}
        write_manifest(self.tmp, manifest)
        publish(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        for handle in (self._vec, self._meta_writer, self._meta_sink):
            try:
                if handle is not None:
                    handle.close()
            except Exception:  # noqa: BLE001 - closing half-written files on the way out
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


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

"""Writing bundles: metadata in fixed record batches, the streaming BundleWriter, and publishing a finished
folder over a bundle path with one rename (readers see the old version or the new one, never a mix).
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Iterator

from ..config import DEFAULT_BLOCK, DEFAULT_WARN, METADATA_BATCH_ROWS
from ..errors import ConfigError, DimensionMismatchError, DiskFullError, RowCountMismatchError
from .manifest import (CAPTION_COLUMNS, IVFDATA_FILE, INDEX_FILE, METADATA_FILE, TRAINED_FILE, URL_COLUMNS, Manifest,
                       _tool_version, sha256_file, utc_now, write_manifest)
from .rerank import RerankAppender, rerank_file_names

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pyarrow as pa

MAX_CAPTION_CHARS = 4096  # a caption longer than this is cut (and counted): LAION's longest are ~2,000
MAX_URL_CHARS = 8192


def clean_text(value: Any, limit: int = MAX_CAPTION_CHARS) -> tuple[str | None, bool, bool]:
    """(text, repaired, truncated) of one url or caption value: bytes decoded as UTF-8 with replacement
    characters where they are invalid, NULs and a leading BOM dropped, cut at ``limit`` characters."""
    if value is None:
        return None, False, False
    repaired = False
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        text = raw.decode("utf-8", errors="replace")
        repaired = "\ufffd" in text and "\ufffd".encode() not in raw
    else:
        text = str(value)
    if text.startswith("\ufeff") or "\x00" in text:
        text, repaired = text.lstrip("\ufeff").replace("\x00", ""), True
    truncated = len(text) > limit
    return (text[:limit] if truncated else text), repaired, truncated


def normalize_metadata(table: pa.Table, stats: dict[str, int] | None = None) -> pa.Table:
    """Rename the producer's url/caption columns to ``url``/``caption`` (strings); keep every other column.
    Their text is made safe to store (clean_text: invalid UTF-8 replaced, NUL and BOM dropped, captions cut
    at MAX_CAPTION_CHARS); ``stats`` counts the rows "repaired" and "truncated"."""
    import pyarrow as pa

    names = list(table.column_names)
    for canonical, candidates in (("url", URL_COLUMNS), ("caption", CAPTION_COLUMNS)):
        src = canonical if canonical in names else next((c for c in candidates if c in names), None)
        if src is None:
            table = table.append_column(canonical, pa.nulls(table.num_rows, pa.string()))
        else:
            idx = names.index(src)
            col = _text_column(table.column(src), MAX_CAPTION_CHARS if canonical == "caption" else MAX_URL_CHARS,
                               stats)
            table = table.set_column(idx, canonical, col)
        names = list(table.column_names)
    order = ["url", "caption"] + [n for n in names if n not in ("url", "caption")]
    return table.select(order)


def _text_column(col, limit: int, stats: dict[str, int] | None):
    """A url/caption column as strings: the fast path (a valid string column within the limit, without NUL or
    BOM) untouched; otherwise each value through clean_text."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        lengths = pc.max(pc.utf8_length(col)).as_py() if len(col) else 0
        dirty = pc.any(pc.or_(pc.match_substring(col, "\x00"), pc.starts_with(col, "\ufeff"))).as_py()
        if (lengths or 0) <= limit and not dirty:
            return col.cast(pa.string()) if pa.types.is_large_string(col.type) else col
    elif not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
        return col.cast(pa.string())  # numbers and the like: Arrow's own text
    values, repaired, truncated = [], 0, 0
    for value in col.to_pylist():
        text, r, t = clean_text(value, limit)
        values.append(text)
        repaired += r
        truncated += t
    if stats is not None:
        stats["repaired"] = stats.get("repaired", 0) + repaired
        stats["truncated"] = stats.get("truncated", 0) + truncated
    return pa.array(values, pa.string())


class MetadataWriter:
    """Writes metadata rows to an Arrow IPC file in record batches of exactly ``batch_rows`` rows (the last
    may be shorter), under the schema of the first rows; later rows are conformed to it."""

    def __init__(self, path: Path, batch_rows: int = METADATA_BATCH_ROWS, schema: pa.Schema | None = None):
        self.path, self.batch_rows = path, batch_rows
        self.rows = 0
        self._schema = schema
        self._writer = None
        self._sink = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.text_stats: dict[str, int] = {"repaired": 0, "truncated": 0}  # url/caption rows changed to be stored

    def write(self, table: pa.Table | list[dict[str, Any]]) -> None:
        import pyarrow as pa

        if not isinstance(table, pa.Table):
            table = pa.Table.from_pylist(list(table))
        table = normalize_metadata(table, self.text_stats)
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

    def _conform(self, table: pa.Table) -> pa.Table:
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

    def _flush(self, table: pa.Table) -> None:
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


class BundleWriter:
    """Streams rows into a new bundle in a private temporary folder and publishes it with a rename.

    Use: ``w = BundleWriter(out, model=..., dim=...)``; ``w.add(vectors, metadata)`` any number of times;
    ``w.finish(index)`` (or ``w.finish()`` for an exact flat index built from the added vectors). Nothing is
    visible at ``out`` until finish() succeeds; ``abort()`` (or an exception inside ``with``) removes the
    temporary folder. Memory stays bounded by one metadata batch, whatever the number of rows.
    """

    def __init__(self, out: str | Path, *, model: str, dim: int, bundle_id: str | None = None,
                 bundle_version: str | None = None, description: str = "", warn: float = DEFAULT_WARN,
                 block: float = DEFAULT_BLOCK, rerank: str | None = "float16", overwrite: bool = False,
                 wait: bool = True):
        from ..policy import validate_thresholds
        from .lock import BundleLock

        validate_thresholds(warn, block)
        rerank_file_names(rerank)
        self.out = Path(out).expanduser()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        # Held until finish() or abort(): another maintenance run publishing at out meanwhile would be lost.
        self._lock = BundleLock(self.out, "index build", wait=wait).__enter__()
        sweep_leftovers(self.out)
        if self.out.exists() and not overwrite:
            self._lock.__exit__()
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

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, vectors: np.ndarray, metadata: pa.Table | list[dict[str, Any]]) -> None:
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

    @property
    def text_stats(self) -> dict[str, int]:
        """url/caption rows so far that had to be repaired or cut to be stored (clean_text)."""
        return dict(self._meta.text_stats)

    def no_flat_index(self) -> None:
        """Skip building the exact flat index while adding (for builders that supply their own index)."""
        self._build_flat = False
        self._flat = None

    def finish(self, index=None, *, factory: str = "Flat", search_params: dict[str, Any] | None = None,
               ivfdata: str | Path | None = None, trained=None,
               build: dict[str, Any] | None = None) -> Path:
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
        m.captions_file = write_caption_index(self.tmp, m)
        m.build = {"created": utc_now(), "tool": f"provenance-guard {_tool_version()}", **(build or {})}
        if any(self._meta.text_stats.values()):
            m.build["text"] = dict(self._meta.text_stats)  # url/caption rows repaired or cut to be stored
        finalize(self.tmp, m)
        publish(self.tmp, self.out)
        self._lock.__exit__()
        return self.out

    def abort(self) -> None:
        self._meta.abort()
        if self._rerank:
            try:
                self._rerank.close()
            except Exception:  # noqa: BLE001 - closing half-written files on the way out
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._lock.__exit__()


def write_caption_index(folder: Path, manifest: Manifest, bar=None) -> str | None:
    """captions.npy from the finished metadata.arrow in folder (None when no row has a caption); ``bar``
    (core.progress) counts the rows read."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from ..captions import CAPTIONS_FILE, build

    reader = ipc.open_file(pa.memory_map(str(folder / manifest.metadata_file), "r"))
    if "caption" not in reader.schema.names:
        if bar is not None:
            bar.close()
        return None

    def batches():
        for n in range(reader.num_record_batches):
            batch = reader.get_batch(n)
            yield batch
            if bar is not None:
                bar.update(batch.num_rows)

    try:
        pairs = build(folder / CAPTIONS_FILE, batches())
    finally:
        if bar is not None:
            bar.close()
    return CAPTIONS_FILE if pairs else None


def finalize(folder: Path, manifest: Manifest, hashed: dict[str, dict[str, Any]] | None = None,
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


def human(n: float) -> str:
    """A byte count as people read it: 512 B, 1.5 KiB, 3.1 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def is_disk_full(exc: BaseException) -> bool:
    """True for a full disk or quota, also as faiss reports it (a RuntimeError quoting the C error)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return isinstance(exc, (OSError, RuntimeError)) and (os.strerror(errno.ENOSPC) in text
                                                         or os.strerror(errno.EDQUOT) in text)


@contextmanager
def space_for(folder: str | Path, needed: int, what: str) -> Iterator[None]:
    """Refuse to start when folder's disk has less than needed bytes free, and turn a disk that fills up
    during the block into one DiskFullError naming the folder and the space needed. The caller's own
    clean-up (a ``staging`` folder, a writer's abort) runs as the error passes through."""
    folder = Path(folder)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DiskFullError(f"{what} needs about {human(needed)} free in {folder}, which has {human(free)}; free "
                            f"space there and run again (nothing was changed)")
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFullError(f"the disk holding {folder} filled up during {what}, which needs about {human(needed)} "
                            f"free there ({human(shutil.disk_usage(folder).free)} now); temporary files were "
                            f"removed and the bundle is unchanged: free space and run again") from exc


def sweep_leftovers(bundle: Path) -> None:
    """Remove what killed maintenance runs left beside bundle (``.NAME.tmp-*``, ``.NAME.old-*``). Only call
    while holding the bundle's lock: then no other run is writing them. A build's ``.NAME.build`` stays:
    it is how a killed build resumes."""
    for leftover in list(bundle.parent.glob(f".{bundle.name}.tmp-*")) + list(bundle.parent.glob(f".{bundle.name}.old-*")):
        shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def staging(bundle: Path) -> Iterator[Path]:
    """A private folder beside bundle for its next version, removed if anything inside the block fails
    (publish() moves it onto the bundle's path on success)."""
    tmp = bundle.parent / f".{bundle.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def publish(tmp: Path, out: Path) -> None:
    """Move a finished bundle folder to out; an existing bundle at out is replaced only once tmp is complete.

    The swap is one atomic step where the system allows (Linux): readers find the old version or the new
    one at out, never nothing, and a crash leaves one of them in place. Processes that already opened the
    old bundle keep reading it (its files stay mapped until they close).
    """
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    if out.exists():
        if _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old version
        else:
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

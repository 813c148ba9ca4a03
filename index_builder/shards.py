"""LAION-layout embedding shards: reading, validating and writing them.

Layout (as LAION and clip-retrieval publish it)::

    img_emb/img_emb_0000.npy           N x d, float16 or float32, L2-normalised
    metadata/metadata_0000.parquet     N rows, same order as the .npy of the same number

A row's id is its position across the shards concatenated in shard-number order. One missing shard
would shift every id after it, so misaligned input is refused with the shard named: a gap in the
numbering, a .npy without its .parquet (or the reverse), row counts that differ, a dimension that changes.
Sources are local folders or fsspec URLs (``s3://...``, ``gs://...``, ``https://...``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from collections.abc import Iterator

from ..core.errors import ConfigError, DimensionMismatchError, RowCountMismatchError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pyarrow as pa

_NPY = re.compile(r"img_emb_(\d+)\.npy$")
_PARQUET = re.compile(r"metadata_(\d+)\.parquet$")


@dataclass(frozen=True)
class Shard:
    number: int
    npy: str
    parquet: str
    rows: int
    dim: int
    dtype: str
    offset: int  # id of the shard's first row
    header_bytes: int


def _fs(source: str):
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(source))
    return fs, root.rstrip("/")


def _is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _fs_of(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def _npy_header(fs, path: str) -> tuple[tuple[int, ...], str, int]:
    import numpy as np

    with fs.open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = reader(f)
        except ValueError as exc:
            raise ConfigError(f"{path}: not a .npy file ({exc}); re-download the shard") from exc
        if fortran:
            raise ConfigError(f"{path}: Fortran-ordered arrays are not supported; re-save it in C order")
        return shape, np.dtype(dtype).name, f.tell()


def scan_shards(source: str) -> list[Shard]:
    """Validate a LAION-layout folder and return its shards in id order (reads headers only)."""
    import pyarrow.parquet as pq

    fs, root = _fs(source)
    # Remote paths keep their protocol, so each file can be opened again from its name alone.
    full = (lambda p: p) if _is_local(fs) else fs.unstrip_protocol
    npys = {int(m.group(1)): full(p) for p in fs.glob(f"{root}/img_emb/img_emb_*.npy") if (m := _NPY.search(p))}
    parquets = {int(m.group(1)): full(p) for p in fs.glob(f"{root}/metadata/metadata_*.parquet")
                if (m := _PARQUET.search(p))}
    if not npys:
        raise ConfigError(f"{source}: no img_emb/img_emb_NNNN.npy files; give the folder that holds img_emb/ "
                          f"and metadata/ (the LAION embedding layout)")
    numbers = sorted(set(npys) | set(parquets))
    expected = list(range(numbers[0], numbers[0] + len(numbers)))
    if numbers != expected or numbers[0] != 0:
        missing = sorted(set(range(0, numbers[-1] + 1)) - set(numbers))
        raise ConfigError(f"{source}: shard numbering has a gap (missing {missing[:5]}): every id after it would "
                          f"shift; fetch the missing shards, or build from a folder holding shards 0..N without gaps")
    shards, offset, dim = [], 0, None
    for n in numbers:
        if n not in npys:
            raise ConfigError(f"{source}: metadata_{n:04d}.parquet has no img_emb_{n:04d}.npy beside it; "
                              f"fetch the missing .npy")
        if n not in parquets:
            raise ConfigError(f"{source}: img_emb_{n:04d}.npy has no metadata/metadata_{n:04d}.parquet: rows after "
                              f"it would be joined to the wrong metadata; fetch the missing parquet")
        nfs, npath = _fs_of(npys[n])
        shape, dtype, header = _npy_header(nfs, npath)
        if len(shape) != 2 or dtype not in ("float16", "float32"):
            raise ConfigError(f"{npys[n]}: holds {dtype} of shape {shape}; LAION embeddings are 2-d float16/float32")
        expected = header + shape[0] * shape[1] * (2 if dtype == "float16" else 4)
        if nfs.size(npath) != expected:
            raise RowCountMismatchError(f"shard {n}: {npys[n]} is {nfs.size(npath):,} bytes but its header promises "
                                        f"{expected:,}: the file is truncated; download it again")
        pfs, ppath = _fs_of(parquets[n])
        with pfs.open(ppath, "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        if rows != shape[0]:
            raise RowCountMismatchError(f"shard {n}: {npys[n]} has {shape[0]:,} rows but {parquets[n]} has {rows:,}: "
                                        f"ids would shift; re-download both files of shard {n}")
        if dim is not None and shape[1] != dim:
            raise DimensionMismatchError(f"shard {n}: {npys[n]} is {shape[1]}-d but the shards before it are {dim}-d: "
                                         f"they come from different models; build them into separate bundles")
        dim = shape[1]
        shards.append(Shard(n, npys[n], parquets[n], shape[0], shape[1], dtype, offset, header))
        offset += shape[0]
    return shards


def read_vectors(shard: Shard, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of a shard as a private float32 array. Plain reads, not a memory map: a build
    streams gigabytes through here, and mapped pages would count as the process's resident memory."""
    import numpy as np

    stop = shard.rows if stop is None else min(stop, shard.rows)
    itemsize = np.dtype(shard.dtype).itemsize
    fs, path = _fs_of(shard.npy)
    offset = shard.header_bytes + start * shard.dim * itemsize
    if _is_local(fs):
        arr = np.fromfile(path, dtype=shard.dtype, count=(stop - start) * shard.dim, offset=offset)
    else:
        with fs.open(path, "rb") as f:
            f.seek(offset)
            arr = np.frombuffer(f.read((stop - start) * shard.dim * itemsize), dtype=shard.dtype)
    return arr.reshape(stop - start, shard.dim).astype(np.float32)


def read_rows(shard: Shard, rows: np.ndarray) -> np.ndarray:
    """The given local rows (sorted) of a shard as float32, reading only those rows where the file is local."""
    import numpy as np

    fs, path = _fs_of(shard.npy)
    if not _is_local(fs) or len(rows) > shard.rows // 4:
        out = []
        for start in range(0, shard.rows, 100_000):
            block = rows[(rows >= start) & (rows < start + 100_000)]
            if len(block):
                out.append(read_vectors(shard, start, start + 100_000)[block - start])
        return np.concatenate(out) if out else np.zeros((0, shard.dim), np.float32)
    row_bytes = shard.dim * np.dtype(shard.dtype).itemsize
    with open(path, "rb") as f:
        data = b"".join(os.pread(f.fileno(), row_bytes, shard.header_bytes + int(r) * row_bytes) for r in rows)
    return np.frombuffer(data, dtype=shard.dtype).reshape(len(rows), shard.dim).astype(np.float32)


def read_metadata(shard: Shard) -> pa.Table:
    import pyarrow.parquet as pq

    fs, path = _fs_of(shard.parquet)
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def iter_vectors(shards: list[Shard], batch_rows: int = 100_000) -> Iterator[tuple[int, np.ndarray]]:
    """(first id, float32 rows) in id order, batch_rows at a time."""
    for shard in shards:
        for start in range(0, shard.rows, batch_rows):
            yield shard.offset + start, read_vectors(shard, start, start + batch_rows)


def shard_paths(folder: Path, number: int) -> tuple[Path, Path]:
    return folder / "img_emb" / f"img_emb_{number:04d}.npy", folder / "metadata" / f"metadata_{number:04d}.parquet"


def shard_done(folder: Path, number: int) -> bool:
    npy, parquet = shard_paths(folder, number)
    return npy.is_file() and parquet.is_file()


def write_shard(folder: Path, number: int, vectors: np.ndarray, metadata: pa.Table) -> None:
    """Write one shard atomically: the .npy, then the .parquet (whose presence marks the shard complete)."""
    import numpy as np
    import pyarrow.parquet as pq

    if len(vectors) != metadata.num_rows:
        raise RowCountMismatchError(f"shard {number}: {len(vectors)} vectors but {metadata.num_rows} metadata rows")
    npy, parquet = shard_paths(folder, number)
    npy.parent.mkdir(parents=True, exist_ok=True)
    parquet.parent.mkdir(parents=True, exist_ok=True)
    tmp_npy, tmp_parquet = npy.with_suffix(".npy.tmp"), parquet.with_suffix(".parquet.tmp")
    with open(tmp_npy, "wb") as f:
        np.save(f, np.asarray(vectors, dtype=np.float16))
    os.replace(tmp_npy, npy)
    pq.write_table(metadata, tmp_parquet)
    os.replace(tmp_parquet, parquet)


def metadata_schema(shards: list[Shard], base: pa.Schema | None = None) -> pa.Schema:
    """One schema for all shards' metadata (url/caption normalised), so shards of different producers can
    share a bundle; reads parquet footers only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..core.bundle import normalize_metadata

    schemas = [base] if base is not None else []
    for shard in shards:
        fs, path = _fs_of(shard.parquet)
        with fs.open(path, "rb") as f:
            schemas.append(normalize_metadata(pq.read_schema(f).empty_table()).schema)
    return pa.unify_schemas(schemas, promote_options="permissive")

"""Re-rank vectors: the unit vectors a bundle stores for exact cosines, as float16 or as int8 codes with one
scale per row, and the writers that stream them to .npy files without holding them in memory.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..errors import ConfigError
from .manifest import SCALES_FILE, VECTORS_FILE, VECTORS_I8_FILE

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

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


def decode_rerank(codes: "np.ndarray", scales: Optional["np.ndarray"]) -> "np.ndarray":
    """Stored re-rank codes -> float32 rows (numpy's float16 widening uses the CPU's conversion
    instructions: faster than a lookup table on numpy 1.26 and 2, and unlike torch it starts no OpenMP pool
    to fight faiss's)."""
    import numpy as np

    if scales is None:
        return codes.astype(np.float32)
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

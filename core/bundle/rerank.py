"""Re-rank vectors: the unit vectors a bundle stores for exact cosines, as float16 or as int8 codes with one
scale per row, the writers that stream them to .npy files without holding them in memory, and the float16
re-rank done inside FAISS over the mapped file (FaissRerank).
"""
from __future__ import annotations

import array
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .manifest import SCALES_FILE, VECTORS_FILE, VECTORS_I8_FILE

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

def rerank_file_names(dtype: str | None) -> tuple[str | None, str | None]:
    """(vectors file, scale file) for a re-rank dtype (float16, int8, or None for no vectors)."""
    if dtype is None:
        return None, None
    if dtype == "float16":
        return VECTORS_FILE, None
    if dtype == "int8":
        return VECTORS_I8_FILE, SCALES_FILE
    raise ConfigError(f"re-rank vectors {dtype!r}: give float16, int8 or none")


def encode_rerank(vectors: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
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


def decode_rerank(codes: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """Stored re-rank codes -> float32 rows: float16 through widen_half, int8 times each row's scale."""
    import numpy as np

    if scales is None:
        return widen_half(codes)
    return codes.astype(np.float32) * np.asarray(scales, dtype=np.float32)[:, None]


# 2 ** 112 moves a float16's exponent (bias 15) to float32's (bias 127); float16's subnormals come out normal.
_HALF_TO_SINGLE = 2.0 ** 112
_HALF_INF_BITS = 0x7C00 << 13  # float16's all-ones exponent (inf, nan), moved to float32's bit positions
_SIGN_BIT = -0x80000000  # bit 31 of an int32
_SMALLEST_SINGLE = 2.0 ** -149  # float32's smallest subnormal


def widen_half(codes: np.ndarray) -> np.ndarray:
    """float16 values -> float32, the same values as ``astype``, in a third to a quarter of its time: numpy
    widens float16 one value at a time (~1.3 ns a value here, ~40 us of a knn request's de-duplication),
    these whole-array integer steps move the bits into place and scale the exponent. astype widens what
    these steps would get wrong: an array that is not native float16, one holding an infinity or nan
    (float16 exponent 31), and any array on a thread whose CPU reads float32 subnormals as zero (the DAZ
    flag, which a library built with fast-math may set): float16's subnormals pass through one on their
    way to the scaled, normal result."""
    import numpy as np

    if codes.dtype != np.float16 or np.float32(_SMALLEST_SINGLE) * np.float32(_HALF_TO_SINGLE) == 0:
        return np.asarray(codes).astype(np.float32)
    bits = np.asarray(codes).view(np.int16).astype(np.int32)  # sign-extended: bit 31 is the sign
    sign = bits & _SIGN_BIT
    bits &= 0x7FFF
    bits <<= 13  # exponent and mantissa into float32's positions
    if bits.size and int(bits.max()) >= _HALF_INF_BITS:
        return codes.astype(np.float32)
    out = bits.view(np.float32)
    out *= np.float32(_HALF_TO_SINGLE)
    bits |= sign
    return out


def _npy_header(rows: int, dim: int | None, dtype: str, length: int = 128) -> bytes:
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

    def write(self, first: int, vectors: np.ndarray) -> None:
        """Unit float32 rows for ids first..first+len-1."""
        codes, scales = encode_rerank(vectors, self.dtype)
        for (fd, header, row_bytes), arr in zip(self._files, (codes, scales), strict=False):
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
        self._vec = open(folder / self.vec_name, "wb")  # noqa: SIM115 - open until close()
        self._vec.write(_npy_header(0, dim, self._descr))
        self._scale = open(folder / self.scale_name, "wb") if self.scale_name else None  # noqa: SIM115
        if self._scale:
            self._scale.write(_npy_header(0, None, "<f4"))

    def add(self, vectors: np.ndarray) -> None:
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


# Rows decoded at a time while warm-up computes every row's norm (8192 x 768 float32: 25 MB).
NORM_CHUNK_ROWS = 8192


class FaissRerank:
    """The float16 re-rank inside FAISS: an IndexRefine over the bundle's index whose refine stage reads the
    memory-mapped vectors file in place (a scalar-quantizer view, no copy), so one call returns each query's
    candidates with their exact inner products, outside the GIL. In Python that stage cost a check ~0.4 ms:
    gathering, widening and scoring 40 rows right after a search, with every cache cold.

    A cosine also needs each row's norm: ``build`` computes all of them once (FAISS decodes the file in
    chunks: ~1 s per million 768-d rows, on warm-up's background thread) and keeps their inverses in an
    array of 4 bytes a row, so a search reads them with no call into FAISS: a call per row made a server's request
    threads queue for the GIL at each one. FAISS reads a candidate's row at the id the index gives,
    unchecked, so ``build`` first refuses an index with an id outside 0..count-1 (IVF indices: every
    inverted list's ids)."""

    def __init__(self, index, vectors):
        import faiss
        import numpy as np

        rows = np.asarray(vectors).reshape(-1).view(np.uint8)  # the map itself: nothing is read or copied
        sq = faiss.IndexScalarQuantizer(int(vectors.shape[1]), faiss.ScalarQuantizer.QT_fp16,
                                        faiss.METRIC_INNER_PRODUCT)
        # FAISS's public mmap, read_index(path, IO_FLAG_MMAP_IFC), maps files in its own format only (an
        # IndexScalarQuantizer file: an 81-byte header, then these very codes); it refuses the bundle's .npy
        # ("Index type 0x4d554e93"), and MaybeOwnedVector.create_view needs a shared_ptr owner that the Python
        # bindings cannot make. Both give the same view: decoding all 400,000 768-d rows grew RssAnon by 0 MB
        # through the flag, 3 MB here, 614 MB for a plain read_index (faiss 1.15.1). Hence the fields below.
        codes = sq.codes
        codes.is_owned = False  # a view: FAISS never frees nor resizes the map
        codes.view_data = codes.c_ptr = faiss.swig_ptr(rows)
        codes.view_size = codes.c_size = rows.nbytes
        sq.ntotal = int(vectors.shape[0])
        self.index = faiss.IndexRefine(index, sq)
        self._params: tuple = (None, None)  # the bundle's search parameters, wrapped (see search())
        # FAISS objects hold raw pointers: keep what they point into alive as long as this object
        self._keep = (index, sq, rows, vectors)
        self._sq = sq
        self.inverse_norms: array.array | None = None

    def _reads(self, vectors) -> bool:
        """True when FAISS reads the file's own rows through the view (first and last row decoded and
        compared); then every row's inverse norm is computed."""
        import faiss
        import numpy as np

        codes = self._sq.codes
        if not isinstance(codes, faiss.MaybeOwnedVectorUInt8) or codes.size() != vectors.nbytes:
            return False
        for i in (0, len(vectors) - 1):
            row = np.asarray(vectors[i], dtype=np.float32)
            if not np.array_equal(self._sq.reconstruct(i), row, equal_nan=True):
                return False
        self.inverse_norms = self._inverse_norms()
        return True

    def _inverse_norms(self) -> array.array:
        """1 / |v| of every stored row in row order (0 for a zero row, which scores 0 either way; nan stays
        nan, for the score check to report)."""
        import faiss
        import numpy as np

        n, d = self._sq.ntotal, self._sq.d
        out = array.array("f", bytes(4 * n))
        view = np.frombuffer(out, dtype=np.float32)  # FAISS writes the array's own memory
        buf = np.empty((min(n, NORM_CHUNK_ROWS), d), dtype=np.float32)
        for first in range(0, n, NORM_CHUNK_ROWS):
            rows = min(NORM_CHUNK_ROWS, n - first)
            self._sq.reconstruct_n_c(first, rows, faiss.swig_ptr(buf))
            faiss.fvec_norms_L2sqr(faiss.swig_ptr(view[first:]), faiss.swig_ptr(buf), d, rows)
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(1.0, np.sqrt(view), out=view, where=view != 0)  # zero rows keep their 0
        del view
        return out

    @classmethod
    def build(cls, index, vectors, count: int) -> FaissRerank | None:
        """A FaissRerank for float16 vectors over an IVF index whose ids all lie in 0..count-1, else None
        (the caller keeps the Python re-rank)."""
        import faiss
        import numpy as np

        if vectors is None or vectors.dtype != np.float16 or getattr(vectors, "_mmap", None) is None:
            return None
        if (not count or not vectors.flags.c_contiguous or index.ntotal != count or vectors.shape[0] != count
                or index.metric_type != faiss.METRIC_INNER_PRODUCT):
            return None
        # FAISS before 1.10 keeps codes in a std::vector: no view can be laid over the map (and SWIG would let
        # the fields be set on the Python proxy alone, leaving FAISS an empty vector to read past)
        if not hasattr(faiss, "MaybeOwnedVectorUInt8") or not ivf_ids_within(index, count):
            return None
        refine = cls(index, vectors)
        return refine if refine._reads(vectors) else None

    def search(self, queries: np.ndarray, candidates: int, params) -> tuple[np.ndarray, np.ndarray]:
        """(inner products, ids) of each query's candidates, best first by inner product; id -1 pads. params:
        the bundle's own search parameters, which a caller may replace (tuning nprobe)."""
        base, wrapped = self._params
        if base is not params:
            import faiss

            wrapped = faiss.IndexRefineSearchParameters(k_factor=1.0)
            if params is not None:
                wrapped.base_index_params = params
            self._params = (params, wrapped)  # one assignment: threads see the old pair or the new
        return self.index.search(queries, candidates, params=wrapped)


def ivf_ids_within(index, count: int) -> bool:
    """True when index is an IVF index (possibly under a transform) and every id in its inverted lists
    lies in 0..count-1. One pass over the ids (8 bytes a row), run once by a bundle's warm-up."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    invlists = ivf.invlists
    total = 0
    for n in range(ivf.nlist):
        size = invlists.list_size(n)
        if not size:
            continue
        ptr = invlists.get_ids(n)
        try:
            ids = faiss.rev_swig_ptr(ptr, size)
            if int(ids.min()) < 0 or int(ids.max()) >= count:
                return False
        finally:
            invlists.release_ids(n, ptr)
        total += size
    return total == index.ntotal

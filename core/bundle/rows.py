"""Metadata rows as Python dicts, read straight from the Arrow buffers of the memory-mapped file.

A check joins ten rows, a /knn-service request forty: pyarrow's per-value ``column[j].as_py()`` costs a few
microseconds each (a scalar object per value), most of a request's metadata time. For the column types
metadata holds (strings, integers, floats) a value is read here from the column's own buffers: offsets
and data for strings, the values for numbers, the validity bitmap for nulls; numpy views over the mapped
file, made once per record batch. Any other type (lists, structs, timestamps, dictionaries, booleans,
float16) keeps ``as_py``, so every value reads exactly as pyarrow gives it.

``BatchCache`` keeps at most ``limit`` batches' views, least recently used out: a long-running server over
a LAION-scale bundle (tens of thousands of batches) holds a bounded number of them.

``RowGather`` reads many rows at once (a /knn-service answer's 40) with a few numpy gathers per kind of
column instead of Python calls per value; Bundle.rows uses it from GATHER_MIN_ROWS rows on.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

BATCH_LIMIT = 1024


def _valid(col) -> Optional[Callable[[int], bool]]:
    if not col.null_count:
        return None
    bitmap, off = memoryview(col.buffers()[0]), col.offset
    return lambda j: bool((bitmap[(j + off) >> 3] >> ((j + off) & 7)) & 1)


# struct formats of the number types read from their buffers; values come out as Python ints and floats
# exactly as as_py gives them (a float32 widens to the same double).
_NUMBER_FORMATS = {"int8": "b", "int16": "h", "int32": "i", "int64": "q", "uint8": "B", "uint16": "H",
                   "uint32": "I", "uint64": "Q", "float": "f", "double": "d"}


def column_reader(col) -> Optional[Callable[[int], Any]]:
    """A function j -> the j-th value of an Arrow array as a Python object, or None when the type is not
    one read here (the caller uses as_py). struct.unpack_from on the buffers: one C call per value, where
    a numpy scalar index and .item() cost several."""
    import struct

    import pyarrow as pa

    t, n, off = col.type, len(col), col.offset
    valid = _valid(col)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        bufs = col.buffers()
        pair = struct.Struct("<qq" if pa.types.is_large_string(t) else "<ii")
        offsets = memoryview(bufs[1])
        data = memoryview(bufs[2]) if bufs[2] is not None else memoryview(b"")
        step, unpack = pair.size // 2, pair.unpack_from

        def read(j: int):
            if valid is not None and not valid(j):
                return None
            start, end = unpack(offsets, (j + off) * step)
            return str(data[start:end], "utf-8")
        return read
    fmt = _NUMBER_FORMATS.get(str(t))
    if fmt is not None and n:
        one = struct.Struct("<" + fmt)
        values, size, unpack = memoryview(col.buffers()[1]), one.size, one.unpack_from

        def read(j: int):
            if valid is not None and not valid(j):
                return None
            return unpack(values, (j + off) * size)[0]
        return read
    return None


class BatchView:
    """One record batch and a reader per column."""

    __slots__ = ("batch", "readers")

    def __init__(self, batch, names: list[str]):
        self.batch = batch  # the readers view its buffers
        self.readers = [(name, column_reader(batch.column(c)) or _as_py(batch.column(c)))
                        for c, name in enumerate(names)]

    def row(self, j: int) -> dict[str, Any]:
        return {name: read(j) for name, read in self.readers}


def _as_py(col) -> Callable[[int], Any]:
    return lambda j: col[j].as_py()


class BatchCache:
    """Record batches of one IPC file by number, as BatchViews, at most ``limit`` kept (LRU)."""

    def __init__(self, reader, limit: int = BATCH_LIMIT):
        self._reader, self._limit = reader, limit
        self._names = list(reader.schema.names)
        self._views: "OrderedDict[int, BatchView]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, n: int) -> BatchView:
        # A hit takes no lock: get and move_to_end are each atomic, and a view evicted in between is still whole.
        view = self._views.get(n)
        if view is not None:
            try:
                self._views.move_to_end(n)
            except KeyError:
                pass
            return view
        # Locating a batch in the IPC file costs ~60 us; the batch itself is a zero-copy view of the map.
        view = BatchView(self._reader.get_batch(n), self._names)
        with self._lock:
            self._views[n] = view
            while len(self._views) > self._limit:
                self._views.popitem(last=False)
        return view

    def __len__(self) -> int:
        return len(self._views)


# numpy dtypes of the number types a RowGather reads: the struct formats above, which numpy reads alike
_NUMBER_DTYPES = {name: "<" + fmt for name, fmt in _NUMBER_FORMATS.items()}
# Fewer rows than this are read through BatchCache: a check's ten rows cost less there than a RowGather's
# numpy calls per column.
GATHER_MIN_ROWS = 24
# A RowGather keeps 4 positions (8 bytes each) per column and record batch; past this many (64 MB) it is not
# built (a file of tiny batches), and rows are read through BatchCache.
GATHER_POSITIONS_LIMIT = 1 << 23


class NotGathered(Exception):
    """The file has a column type or a buffer that RowGather does not read (compressed, byte-swapped or
    unaligned buffers, types other than strings and numbers): the caller reads rows through BatchCache."""


class RowGather:
    """Metadata of many rows at once: each kind of column read with a few numpy gathers over the memory-mapped
    IPC file, where BatchView makes several Python calls per value.

    A /knn-service answer joins 40 rows scattered over the file. The positions of a record batch's buffers
    (offsets or values, data, validity bitmap) are read once, on the first row asked from it, and checked:
    inside the map, aligned, long enough for the batch's rows, and string offsets rising within their data
    (a damaged file is a BundleFileError, never a read outside a buffer). Strings and numbers only; values
    equal BatchView's (a float32 widens as as_py does)."""

    def __init__(self, reader, whole, batch_rows: int, count: int):
        import numpy as np
        import pyarrow as pa

        self._reader, self._batch_rows, self._count = reader, batch_rows, count
        self.names = list(reader.schema.names)
        self._kinds = []  # per column: ("str", offset dtype) or ("num", value dtype)
        for field in reader.schema:
            t = field.type
            if pa.types.is_string(t) or pa.types.is_large_string(t):
                self._kinds.append(("str", np.dtype("<i8" if pa.types.is_large_string(t) else "<i4")))
            elif str(t) in _NUMBER_DTYPES:
                self._kinds.append(("num", np.dtype(_NUMBER_DTYPES[str(t)])))
            else:
                raise NotGathered(f"column {field.name} is {t}")
        batches = reader.num_record_batches
        if batches * len(self.names) * 4 > GATHER_POSITIONS_LIMIT:
            raise NotGathered(f"{batches:,} record batches")
        groups: dict[tuple, list[int]] = {}
        for c, (kind, dtype) in enumerate(self._kinds):
            groups.setdefault((kind, dtype.str), []).append(c)
        # columns of one kind and dtype are read together: one gather per group, not per column
        self._groups = [(kind, dtype, np.array(cols)) for (kind, dtype), cols in groups.items()]
        self._base, self._size = whole.address, whole.size
        self._mem = memoryview(whole)
        self._u8 = np.frombuffer(whole, dtype=np.uint8)
        self._views = {dtype: self._u8[:self._size // np.dtype(dtype).itemsize * np.dtype(dtype).itemsize].view(dtype)
                       for _, dtype, _ in self._groups}
        # per column and batch: [offsets or values index in its dtype's view, data byte position, data bytes,
        # validity bit position or -1]
        self._pos = np.zeros((len(self.names), 4, batches), dtype=np.int64)
        self._filled = np.zeros(batches, dtype=bool)
        self._nulls = False  # whether any filled batch has a validity bitmap
        self._lock = threading.Lock()

    def _inside(self, buf, need: int, align: int) -> int:
        """buf's position in the map, once it is shown to lie inside it, aligned and of at least need bytes."""
        if buf is None:
            raise NotGathered("a buffer is absent")
        at = buf.address - self._base
        if not (0 <= at and at + buf.size <= self._size and buf.size >= need and at % align == 0):
            raise NotGathered("a buffer lies outside the mapped file or is unaligned or short")
        return at

    def _fill(self, n: int) -> None:
        import numpy as np

        from ..errors import BundleFileError

        batch = self._reader.get_batch(n)
        last = n == len(self._filled) - 1
        rows = self._count - n * self._batch_rows if last else self._batch_rows
        if batch.num_rows != rows:
            raise BundleFileError(f"metadata record batch {n} holds {batch.num_rows:,} rows where {rows:,} belong: "
                                  f"rows would be joined to the wrong vectors; rebuild the bundle")
        pos = self._pos
        for c, (kind, dtype) in enumerate(self._kinds):
            col = batch.column(c)
            bufs, off, size = col.buffers(), col.offset, dtype.itemsize
            pos[c, 3, n] = -1
            if col.null_count:
                pos[c, 3, n] = self._inside(bufs[0], (off + rows + 7) // 8, 1) * 8 + off
                self._nulls = True
            if kind == "num":
                pos[c, 0, n] = self._inside(bufs[1], (off + rows) * size, size) // size + off
                continue
            first = self._inside(bufs[1], (off + rows + 1) * size, size) // size + off
            data, length = (0, 0)
            if bufs[2] is not None and bufs[2].size:
                data, length = self._inside(bufs[2], 0, 1), bufs[2].size
            # Checked once per batch (~0.1 ms for 65,536 rows from the page cache; the batch's offsets read
            # from disk where the file is not cached), so that no read needs a check of its own.
            offsets = self._views[dtype.str][first:first + rows + 1]
            if rows and (int(offsets[0]) < 0 or int(offsets[-1]) > length or bool((np.diff(offsets) < 0).any())):
                raise BundleFileError(f"metadata column {self.names[c]} of record batch {n} has string offsets "
                                      f"outside its data: the file is damaged; rebuild the bundle")
            pos[c, 0, n], pos[c, 1, n], pos[c, 2, n] = first, data, length

    def columns(self, ids: "np.ndarray", json_values: bool = False) -> list[list]:
        """Per column, the values of rows ids (int64, each inside the file) in order; None where null.
        json_values: a float that is not finite reads None (what a JSON answer can hold)."""
        import numpy as np

        batch, j = np.divmod(ids, self._batch_rows)
        if not self._filled[batch].all():
            with self._lock:
                for n in np.unique(batch).tolist():
                    if not self._filled[n]:
                        self._fill(n)
                        self._filled[n] = True
        pos = self._pos[:, :, batch]
        nulls: dict[int, list[int]] = {}  # per column, the asked positions that are null
        if self._nulls:
            bits = pos[:, 3]
            for c, k in zip(*(x.tolist() for x in np.nonzero(bits >= 0))):
                at = int(bits[c, k]) + int(j[k])
                if not (self._u8[at >> 3] >> (at & 7)) & 1:
                    nulls.setdefault(c, []).append(k)
        out: list = [None] * len(self.names)
        mem = self._mem
        for kind, dtype, cols in self._groups:
            view, p = self._views[dtype], pos[cols]
            at = p[:, 0] + j
            if kind == "str":
                data = p[:, 1]
                for c, starts, ends in zip(cols.tolist(), (data + view[at]).tolist(), (data + view[at + 1]).tolist()):
                    for k in nulls.get(c, ()):  # a null slot's bytes are undefined: never decoded
                        ends[k] = starts[k]
                    out[c] = [str(mem[a:z], "utf-8") for a, z in zip(starts, ends)]
                continue
            got = view[at]
            for c, values, finite in zip(cols.tolist(), got.tolist(),
                                         np.isfinite(got).all(axis=1).tolist() if json_values and got.dtype.kind == "f"
                                         else [True] * len(cols)):
                out[c] = values if finite else [v if math.isfinite(v) else None for v in values]
        for c, ks in nulls.items():
            for k in ks:
                out[c][k] = None
        return out


def json_value(v):
    """A metadata value as a JSON answer holds it: most are returned as they are."""
    kind = type(v)
    if v is None or kind is str or kind is int or (kind is float and math.isfinite(v)):
        return v
    from ..result import _jsonable

    return _jsonable(v)

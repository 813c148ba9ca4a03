"""Metadata rows as Python dicts, read straight from the Arrow buffers of the memory-mapped file.

A check joins ten rows, a /knn-service request forty: pyarrow's per-value ``column[j].as_py()`` costs a few
microseconds each (a scalar object per value), most of a request's metadata time. For the column types
metadata holds (strings, integers, floats) a value is read here from the column's own buffers: offsets
and data for strings, the values for numbers, the validity bitmap for nulls; numpy views over the mapped
file, made once per record batch. Any other type (lists, structs, timestamps, dictionaries, booleans,
float16) keeps ``as_py``, so every value reads exactly as pyarrow gives it.

``BatchCache`` keeps at most ``limit`` batches' views, least recently used out: a long-running server over
a LAION-scale bundle (tens of thousands of batches) holds a bounded number of them.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Optional

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

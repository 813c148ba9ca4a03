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
    import numpy as np

    if not col.null_count:
        return None
    bitmap, off = np.frombuffer(col.buffers()[0], dtype=np.uint8), col.offset
    return lambda j: bool((bitmap[(j + off) >> 3] >> ((j + off) & 7)) & 1)


def column_reader(col) -> Optional[Callable[[int], Any]]:
    """A function j -> the j-th value of an Arrow array as a Python object, or None when the type is not
    one read here (the caller uses as_py)."""
    import numpy as np
    import pyarrow as pa

    t, n, off = col.type, len(col), col.offset
    valid = _valid(col)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        bufs = col.buffers()
        offsets = np.frombuffer(bufs[1], dtype=np.int64 if pa.types.is_large_string(t) else np.int32)[off:off + n + 1]
        data = memoryview(bufs[2]) if bufs[2] is not None else memoryview(b"")

        def read(j: int):
            if valid is not None and not valid(j):
                return None
            return str(data[offsets[j]:offsets[j + 1]], "utf-8")
        return read
    if (pa.types.is_integer(t) or pa.types.is_float32(t) or pa.types.is_float64(t)) and n:
        values = np.frombuffer(col.buffers()[1], dtype=t.to_pandas_dtype())[off:off + n]

        def read(j: int):
            if valid is not None and not valid(j):
                return None
            return values[j].item()
        return read
    return None


class BatchView:
    """One record batch and a reader per column."""

    __slots__ = ("batch", "names", "readers")

    def __init__(self, batch, names: list[str]):
        self.batch, self.names = batch, names
        self.readers = [column_reader(batch.column(c)) for c in range(len(names))]

    def row(self, j: int) -> dict[str, Any]:
        return {name: read(j) if read is not None else self.batch.column(c)[j].as_py()
                for c, (name, read) in enumerate(zip(self.names, self.readers))}


class BatchCache:
    """Record batches of one IPC file by number, as BatchViews, at most ``limit`` kept (LRU)."""

    def __init__(self, reader, limit: int = BATCH_LIMIT):
        self._reader, self._limit = reader, limit
        self._names = list(reader.schema.names)
        self._views: "OrderedDict[int, BatchView]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, n: int) -> BatchView:
        with self._lock:
            view = self._views.get(n)
            if view is not None:
                self._views.move_to_end(n)
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

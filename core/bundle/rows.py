"""Metadata rows by id as Python dicts, read through pyarrow's public API over the memory-mapped IPC file.

A request's rows (a check's ten, a /knn-service answer's forty) are one-row slices of their record batches
(zero-copy), concatenated into one small batch and turned into Python column by column with ``to_pylist``:
every value is exactly pyarrow's ``as_py``. ``table.take(ids)`` over the whole file would be the one-liner,
but pyarrow concatenates a chunked column's record batches before taking from it (milliseconds a request);
bench/metadata_read.py measures the variants side by side.

``MetadataRows`` keeps at most ``limit`` record batches (least recently used out), so a long-running server
over a LAION-scale bundle (tens of thousands of batches) holds a bounded number of them. A batch is checked
once, when it is loaded: its length, and for text columns offsets that stay inside their data, so that a
damaged file is a BundleFileError and never a read outside a buffer.
"""
from __future__ import annotations

import functools
import math

BATCH_LIMIT = 1024


class MetadataRows:
    """The rows of one metadata IPC file (record batches of ``batch_rows`` rows, ``count`` in all) by id."""

    def __init__(self, reader, batch_rows: int, count: int, limit: int = BATCH_LIMIT):
        import pyarrow as pa

        self._reader, self._batch_rows = reader, batch_rows
        self.names: list[str] = list(reader.schema.names)
        self.name_set = frozenset(self.names)
        # what json_values does per column: text, integers and booleans are JSON values already; floats that
        # are not finite read None; any other type goes through json_value
        self._json = [None if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
                      or pa.types.is_boolean(t) or pa.types.is_null(t) else "float" if pa.types.is_floating(t)
                      else "other" for t in reader.schema.types]
        # text and binary columns, with the width of their offsets
        self._text = [(c, "<i8" if pa.types.is_large_string(t) or pa.types.is_large_binary(t) else "<i4")
                      for c, t in enumerate(reader.schema.types) if pa.types.is_string(t)
                      or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)]
        # n -> record batch n, checked; the cache holds no reference to self (a Bundle's maps go with it)
        self.batch = functools.lru_cache(maxsize=limit)(functools.partial(_checked_batch, reader, batch_rows, count,
                                                                          self._text))
        # pyarrow 19 added concat_batches; before it a Table of the slices is combined (~20 % slower)
        self._concat = getattr(pa, "concat_batches", None) or (lambda bs: pa.Table.from_batches(bs).combine_chunks())

    def columns(self, ids: list[int], json_values: bool = False, skip=()) -> list[list | None]:
        """Per column, the values of rows ids (each inside the file) in order; None where null.
        json_values: each value as a JSON answer holds it (see json_value). skip: numbers of columns not
        read (None in their place)."""
        size, batch = self._batch_rows, self.batch
        if not ids or not self.names:
            return [None if c in skip else [] for c in range(len(self.names))]
        picked = self._concat([batch(i // size).slice(i % size, 1) for i in ids])
        out = [None if c in skip else col.to_pylist() for c, col in enumerate(picked.columns)]
        if json_values:
            for c, kind in enumerate(self._json):
                values = out[c]
                if values is None:
                    continue
                if kind == "float":
                    if not all(v is None or math.isfinite(v) for v in values):
                        out[c] = [v if v is None or math.isfinite(v) else None for v in values]
                elif kind == "other":
                    out[c] = [json_value(v) for v in values]
        return out


def _checked_batch(reader, batch_rows: int, count: int, text: list[tuple[int, str]], n: int):
    """Record batch n, checked: pyarrow's validate() (buffer sizes, first and last offsets inside their
    data) and text offsets that never decrease, so every value lies inside its buffer."""
    import numpy as np
    import pyarrow as pa

    from ..errors import BundleFileError

    batch = reader.get_batch(n)
    try:
        batch.validate()
    except pa.ArrowInvalid as exc:
        raise BundleFileError(f"metadata record batch {n} is damaged ({exc}); rebuild the bundle") from exc
    rows = min(batch_rows, count - n * batch_rows)
    if batch.num_rows != rows:
        raise BundleFileError(f"metadata record batch {n} holds {batch.num_rows:,} rows where {rows:,} belong: "
                              f"rows would be joined to the wrong vectors; rebuild the bundle")
    for c, width in text:
        col = batch.column(c)
        if not len(col):
            continue
        offsets = np.frombuffer(col.buffers()[1], dtype=width)[col.offset:col.offset + len(col) + 1]
        if bool((np.diff(offsets) < 0).any()):
            raise BundleFileError(f"metadata column {batch.schema.names[c]} of record batch {n} has text offsets "
                                  f"outside its data: the file is damaged; rebuild the bundle")
    return batch


def json_value(v):
    """A metadata value as a JSON answer holds it: most are returned as they are."""
    kind = type(v)
    if v is None or kind is str or kind is int or (kind is float and math.isfinite(v)):
        return v
    from ..result import _jsonable

    return _jsonable(v)

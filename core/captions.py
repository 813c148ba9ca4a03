"""The caption check before generation: is this prompt a training caption, and are its images duplicated?

Memorized images are heavily duplicated training images, and their prompts are often the training caption
verbatim (Carlini et al. 2023, Webster 2023). A bundle built with captions keeps a caption index,
``captions.npy``: one (hash, row id) pair per row with a caption, sorted by hash, where the hash is the first
8 bytes of the sha256 of the caption normalised (Unicode NFKC, case folded, punctuation dropped, whitespace
collapsed). It is written in O(rows) with bounded memory (sorted runs of RUN_ROWS pairs, merged on disk),
and kept current by every change: removed rows are filtered out when it is read, append and merge add the
new rows' pairs.

``lookup(bundle, text)`` gives the rows whose caption normalises to the same text (the hashes are checked
against the rows' own captions, so a collision never counts) and how many of them are near-duplicates of
another of them by their stored vectors (cosine >= NEAR_DUPLICATE): a prompt that is the caption of many
near-identical training images is the kind that gets memorized.
"""
from __future__ import annotations

import hashlib
import heapq
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from collections.abc import Iterable, Iterator

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .bundle import Bundle

CAPTIONS_FILE = "captions.npy"
RUN_ROWS = 4_000_000          # pairs sorted in memory at once (64 MB)
NEAR_DUPLICATE = 0.95         # cosine at which two training images count as the same picture
MAX_ROWS_COMPARED = 1000      # rows of one caption whose vectors are compared (the count is exact regardless)
DTYPE = [("hash", "<u8"), ("row", "<i8")]
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", str(text)).casefold()
    text = "".join(" " if unicodedata.category(ch).startswith(("P", "S", "C")) else ch for ch in text)
    return _SPACE.sub(" ", text).strip()


def caption_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(normalise(text).encode("utf-8")).digest()[:8], "big")


def _pairs(batches: Iterable, first_row: int = 0) -> Iterator[np.ndarray]:
    """(hash, row) pairs of metadata record batches' caption column, a batch at a time."""
    import numpy as np

    row = first_row
    for batch in batches:
        names = batch.schema.names
        captions = batch.column(names.index("caption")).to_pylist() if "caption" in names else [None] * batch.num_rows
        keep = [(caption_hash(c), row + i) for i, c in enumerate(captions) if isinstance(c, str) and normalise(c)]
        row += batch.num_rows
        if keep:
            yield np.array(keep, dtype=DTYPE)


def write_index(path: Path, pairs: Iterable[np.ndarray]) -> int:
    """Sort (hash, row) pairs into ``path`` with memory bounded by RUN_ROWS; returns the pair count."""
    import numpy as np

    runs: list[Path] = []
    pending: list[np.ndarray] = []
    pending_rows = 0
    tmpdir = Path(tempfile.mkdtemp(prefix=".captions-", dir=str(path.parent)))
    try:
        def spill():
            nonlocal pending, pending_rows
            if pending:
                run = np.sort(np.concatenate(pending), order=("hash", "row"))
                runs.append(tmpdir / f"run{len(runs)}.npy")
                np.save(runs[-1], run)
            pending, pending_rows = [], 0

        for chunk in pairs:
            pending.append(chunk)
            pending_rows += len(chunk)
            if pending_rows >= RUN_ROWS:
                spill()
        spill()
        total = sum(np.load(r, mmap_mode="r").shape[0] for r in runs)
        out = np.lib.format.open_memmap(str(path) + ".tmp", mode="w+", dtype=DTYPE, shape=(total,))
        if len(runs) == 1:
            out[:] = np.load(runs[0], mmap_mode="r")
        elif runs:
            maps = [np.load(r, mmap_mode="r") for r in runs]
            merged = heapq.merge(*(((int(h), int(r)) for h, r in m) for m in maps))
            block, n = [], 0
            for item in merged:
                block.append(item)
                if len(block) == 65536:
                    out[n:n + len(block)] = np.array(block, dtype=DTYPE)
                    n, block = n + len(block), []
            if block:
                out[n:n + len(block)] = np.array(block, dtype=DTYPE)
        out.flush()
        del out
        os.replace(str(path) + ".tmp", path)
        return total
    finally:
        for r in runs:
            r.unlink(missing_ok=True)
        os.rmdir(tmpdir)


def build(path: Path, metadata_batches: Iterable, first_row: int = 0) -> int:
    """The caption index of a bundle's metadata (record batches in row order) at ``path``."""
    return write_index(path, _pairs(metadata_batches, first_row))


def extend(path: Path, old: np.ndarray | None, new_batches: Iterable, first_row: int,
           other: np.ndarray | None = None) -> int:
    """An index holding old's pairs, other's (a merged bundle's, already offset) and new rows' (append)."""
    import numpy as np

    def chunks():
        for arr in (old, other):
            if arr is not None:
                for start in range(0, len(arr), RUN_ROWS // 4):
                    yield np.array(arr[start:start + RUN_ROWS // 4])
        yield from _pairs(new_batches, first_row)

    return write_index(path, chunks())


def read_index(path: Path, count: int) -> np.ndarray:
    """captions.npy validated: never pickled, sorted pairs whose rows are inside the bundle."""
    import numpy as np

    from .errors import BundleFileError

    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise BundleFileError(f"{path} is not a caption index ({exc}); rebuild it with 'provenance-guard index "
                              f"captions {path.parent}'") from exc
    if arr.dtype != np.dtype(DTYPE) or arr.ndim != 1:
        raise BundleFileError(f"{path} holds {arr.dtype} data, not a caption index; rebuild it with "
                              f"'provenance-guard index captions {path.parent}'")
    if len(arr) and (int(arr["row"].min()) < 0 or int(arr["row"].max()) >= count):
        raise BundleFileError(f"{path} names rows outside the bundle; rebuild it with 'provenance-guard index "
                              f"captions {path.parent}'")
    return arr


@dataclass
class CaptionMatch:
    bundle: str
    rows: int                  # live rows whose caption is this text
    near_duplicates: int       # of those, rows whose image has a near-duplicate among them
    compared: int              # rows whose vectors were compared (at most MAX_ROWS_COMPARED)
    examples: list[int]        # a few of the row ids

    def to_json(self) -> dict:
        return {"bundle": self.bundle, "rows": self.rows, "near_duplicates": self.near_duplicates,
                "compared": self.compared, "examples": self.examples}


def lookup(bundle: Bundle, text: str) -> CaptionMatch | None:
    """The rows of bundle whose caption is ``text`` (normalised), or None when the bundle has no caption
    index (built before caption indices existed: 'provenance-guard index captions BUNDLE' adds one)."""
    import numpy as np

    index = bundle.captions
    if index is None:
        return None
    key = np.uint64(caption_hash(text))
    lo, hi = np.searchsorted(index["hash"], key, "left"), np.searchsorted(index["hash"], key, "right")
    rows = np.asarray(index["row"][lo:hi], dtype=np.int64)
    if len(bundle.removed):
        rows = rows[~bundle.is_removed(rows)]
    wanted = normalise(text)
    checked = [int(r) for r, meta in zip(rows[:MAX_ROWS_COMPARED], bundle.rows(rows[:MAX_ROWS_COMPARED].tolist()), strict=True)
               if normalise(meta.get("caption") or "") == wanted]
    total = len(checked) + max(0, len(rows) - MAX_ROWS_COMPARED)
    near = 0
    if len(checked) > 1 and bundle.vectors is not None:
        vecs = bundle.vector(checked)
        sims = vecs @ vecs.T
        np.fill_diagonal(sims, -1.0)
        near = int((sims >= NEAR_DUPLICATE).any(axis=1).sum())
    return CaptionMatch(bundle.id, total, near, len(checked), checked[:10])

"""Which FAISS index to build for n vectors of dimension d under a memory budget: always an answer.

- up to 200k vectors whose float32 copy fits: ``Flat`` (exact; exhaustive search stays in milliseconds);
  when it does not fit, ``SQ8`` (1 byte per dimension, exhaustive, re-ranked exactly);
- up to 2M vectors whose float32 lists fit: ``IVF{k},Flat`` (exact distances within the probed lists);
- beyond that, or when memory is short: ``OPQ{m}_{d'},IVF{k}_HNSW32,PQ{m}x8`` (rotation, an HNSW coarse
  quantizer so assigning rows to k lists stays fast, m bytes per vector), with the largest m the budget
  allows. When even the smallest m does not fit, the smallest is chosen and the note says by how much the
  budget is exceeded and what recall that costs, instead of building nothing.

k is about 4 * sqrt(n) (a power of two, 256..131072): enough lists for short scans, few enough that
training on ~64 points per list stays minutes on a laptop. The budget covers the index as served (codes,
ids, coarse quantizer); inverted lists of IVF indices live on disk and are memory-mapped.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..core.bundle.writer import human
from ..core.errors import ConfigError

# Beyond 128 bytes, OPQ/PQ training time grows much faster than candidate recall, which exact re-ranking
# makes up for anyway.
PQ_BYTES = (8, 16, 24, 32, 48, 64, 96, 128)
EXACT_MAX_ROWS = 200_000
IVF_FLAT_MAX_ROWS = 2_000_000
TRAIN_POINTS_PER_LIST = 40


@dataclass
class IndexChoice:
    factory: str
    ivf: bool
    nlist: int = 0
    bytes_needed: int = 0
    train_rows: int = 0
    search_params: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def parse_size(text: str) -> int:
    """'4G', '512M', '2GB', '1.5g', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"memory size {text!r}: give a number with K, M, G or T (e.g. 4G)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def nlist_for(n: int) -> int:
    target = 4 * math.sqrt(max(n, 1))
    return int(min(131072, max(256, 2 ** round(math.log2(target)))))


# Training vectors are float32 in RAM: they may take this share of the budget (at least MIN_TRAIN_ROWS rows,
# what PQ's 256 centroids per sub-space need).
TRAIN_BUDGET_SHARE = 0.35
MIN_TRAIN_ROWS = 10_000


def _train_cap(n: int, d: int, budget: int) -> int:
    return min(n, max(MIN_TRAIN_ROWS, int(TRAIN_BUDGET_SHARE * budget / (d * 4))))


def _ivf_shape(n: int, d: int, budget: int) -> tuple[int, int]:
    """(nlist, training rows): k-means wants >= 39 points per list, so a small training budget caps nlist."""
    cap = _train_cap(n, d, budget)
    nlist = nlist_for(n)
    while nlist > 64 and nlist * 39 > cap:
        nlist //= 2
    return nlist, min(cap, max(nlist * TRAIN_POINTS_PER_LIST, 65_536))


def choose_index(n: int, d: int, budget: int) -> IndexChoice:
    """The index for n vectors of dimension d within budget bytes (see the module docstring)."""
    if n <= 0:
        raise ConfigError("no vectors to index")
    flat = n * d * 4
    if n <= EXACT_MAX_ROWS and flat <= budget:
        return IndexChoice("Flat", False, bytes_needed=flat, note="exact search")
    if n <= EXACT_MAX_ROWS and n * d <= budget:
        return IndexChoice("SQ8", False, bytes_needed=n * d, train_rows=_train_cap(n, d, budget),
                           note="8-bit scalar quantisation, exhaustive search, exact re-rank")
    nlist, train_rows = _ivf_shape(n, d, budget)
    coarse = nlist * d * 4
    ivf_flat = n * (d * 4 + 8) + coarse
    if n <= IVF_FLAT_MAX_ROWS and ivf_flat <= budget:
        return IndexChoice(f"IVF{nlist},Flat", True, nlist, ivf_flat, train_rows,
                           note="exact distances within the probed lists")
    # HNSW32 coarse quantizer: nlist * (d * 4 + ~32 * 2 * 4) bytes.
    coarse = nlist * (d * 4 + 256)
    fitting = [m for m in PQ_BYTES if m <= d and n * (m + 8) + coarse <= budget]
    over = ""
    if fitting:
        m = max(fitting)
    else:
        m = PQ_BYTES[0]
        need = n * (m + 8) + coarse
        over = (f"; the budget {human(budget)} is below the smallest index ({human(need)}), so it is exceeded by "
                f"{human(need - budget)}: expect near-duplicate recall@1 to rely on exact re-ranking of more "
                f"candidates and held-out recall@10 around 0.5-0.7 (measured below)")
    # OPQ rotates into 4 dimensions per PQ byte (what PQ resolves well), never above d: k-means and
    # encoding then work in fewer dimensions, and exact re-ranking restores the precision given up.
    d_out = min((d // m) * m, 4 * m) if d >= m else m
    factory = f"OPQ{m}_{d_out},IVF{nlist}_HNSW32,PQ{m}x8"
    return IndexChoice(factory, True, nlist, n * (m + 8) + coarse, train_rows,
                       note=f"product quantisation to {m} bytes per vector, lists on disk{over}")


def choice_from_key(factory: str, n: int, d: int, budget: int) -> IndexChoice:
    """An IndexChoice for a user-given --index-key."""
    import faiss

    try:
        probe = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ConfigError(f"--index-key {factory!r} is not a FAISS factory string ({str(exc).splitlines()[0]})") from exc
    ivf = faiss.try_extract_index_ivf(probe) is not None
    nlist = faiss.extract_index_ivf(probe).nlist if ivf else 0
    cap = _train_cap(n, d, budget)
    train = min(cap, max(nlist * TRAIN_POINTS_PER_LIST, 65_536)) if ivf else (0 if probe.is_trained else cap)
    return IndexChoice(factory, ivf, nlist, 0, train, note="given by --index-key")

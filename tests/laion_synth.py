"""Synthetic LAION-layout shards for tests and benchmarks (no data set is committed).

Vectors are clustered like real CLIP embeddings (each row = a cluster centre + noise, cosine ~0.6 to its
centre, normalised); metadata follows one of the producers' column conventions (field.md).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CONVENTIONS = ("laion5b", "clip-retrieval", "laion400m")


def vectors(n: int, d: int, seed: int, clusters: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)).astype(np.float32) * (1.3 / np.sqrt(d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def metadata(first: int, n: int, convention: str) -> pa.Table:
    ids = np.arange(first, first + n)
    urls = [f"https://img.example.com/{i}.jpg" for i in ids]
    caps = [f"caption <i>{i}</i>" for i in ids]
    if convention == "laion5b":
        return pa.table({"URL": urls, "TEXT": caps, "WIDTH": np.full(n, 512), "HEIGHT": np.full(n, 384),
                         "similarity": np.full(n, 0.31, np.float32), "hash": [f"h{i:012d}" for i in ids],
                         "punsafe": np.full(n, 0.01, np.float32), "pwatermark": np.full(n, 0.1, np.float32)})
    if convention == "clip-retrieval":
        return pa.table({"url": urls, "caption": caps, "image_path": [f"{i:09d}.jpg" for i in ids],
                         "key": [f"{i:09d}" for i in ids], "width": np.full(n, 512), "height": np.full(n, 384)})
    return pa.table({"SAMPLE_ID": ids, "URL": urls, "TEXT": caps, "LICENSE": ["?"] * n, "NSFW": ["UNLIKELY"] * n,
                     "similarity": np.full(n, 0.31, np.float32), "WIDTH": np.full(n, 512), "HEIGHT": np.full(n, 384)})


def write_shards(folder: Path, rows_per_shard: list[int], d: int = 64, dtype=np.float16, convention: str = "laion5b",
                 seed: int = 0, first_id: int = 0, keep: bool = True, skip_existing: bool = False):
    """Write shards 0..len(rows_per_shard)-1 under folder; returns all vectors (float32, in id order), or
    None with keep=False (a benchmark's 10M rows would not fit in memory)."""
    (folder / "img_emb").mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    out, first = [], first_id
    for n, rows in enumerate(rows_per_shard):
        npy, parquet = folder / "img_emb" / f"img_emb_{n:04d}.npy", folder / "metadata" / f"metadata_{n:04d}.parquet"
        if not (skip_existing and npy.is_file() and parquet.is_file()):
            x = vectors(rows, d, seed * 1000 + n)
            np.save(npy, x.astype(dtype))
            pq.write_table(metadata(first, rows, convention), parquet)
            if keep:
                out.append(x.astype(dtype).astype(np.float32))
        first += rows
    return np.concatenate(out) if keep else None

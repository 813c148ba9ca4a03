"""Ray: the same builds spread over a cluster (or local processes) when one machine is not enough.

``--ray-address`` takes ``local`` (start Ray in this machine's processes), ``auto`` (the cluster this
machine belongs to) or ``ray://head:10001``. Workers import provenance_guard, so it must be installed on
every node, and the build folder (beside --out) must be on storage every node sees.

- adding rows: one Ray task per shard writes that shard's part index and re-rank slice; the driver records
  finished shards as tasks complete (so a killed driver resumes too) and merges the parts on disk;
- embedding images: Ray Data streams decoded images through actors that each hold one model.
"""
from __future__ import annotations

import os
from collections.abc import Iterator


def init_ray(address: str):
    import ray

    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False)
    return ray


def run_shards_on_ray(address: str, shards, work: str, total_rows: int, dim: int, rerank: str | None,
                      ivf: bool) -> Iterator:
    """Run build.process_shard for every shard as a Ray task; yield each shard as its task finishes."""
    from .build import process_shard

    ray = init_ray(address)
    task = ray.remote(num_cpus=1)(process_shard)
    pending = {task.remote(s, work, total_rows, dim, rerank, ivf): s for s in shards}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        ray.get(done[0])
        yield pending.pop(done[0])


class EmbedActor:
    """Holds one model; embeds batches of image bytes (a Ray Data map_batches callable)."""

    def __init__(self, model: str, device: str = "auto", batch_size: int = 32):
        from ..core.embed import get_embedder

        self.embedder = get_embedder(model, device)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from ..core.errors import ImageInputError
        from ..core.images import to_pixels

        pixels = to_pixels(list(batch["image"]))
        ok = np.array([not isinstance(p, ImageInputError) for p in pixels])
        vectors = np.zeros((len(pixels), self.embedder.dim), dtype=np.float32)
        good = [p for p in pixels if not isinstance(p, ImageInputError)]
        if good:
            vectors[ok] = self.embedder.embed_pixels(good, self.batch_size)
        errors = [str(p) if isinstance(p, ImageInputError) else "" for p in pixels]
        return {"row": batch["row"], "embedding": vectors, "ok": ok, "error": np.array(errors, dtype=object)}


def embed_on_ray(address: str, images: list[bytes], model: str, batch_size: int, device: str = "auto"):
    """Embed encoded images with Ray Data and model-holding actors; returns (vectors, ok mask, errors) in input order."""
    import numpy as np

    ray = init_ray(address)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{"row": i, "image": img} for i, img in enumerate(images)])
    out = ds.map_batches(EmbedActor, fn_constructor_kwargs={"model": model, "device": device,
                                                             "batch_size": batch_size},
                         batch_size=batch_size, concurrency=max(1, int(ray.available_resources().get("CPU", 1)) // 2),
                         batch_format="numpy").take_all()
    out.sort(key=lambda r: r["row"])
    vectors = np.stack([r["embedding"] for r in out]) if out else np.zeros((0, 0), np.float32)
    return vectors, np.array([bool(r["ok"]) for r in out]), [str(r["error"]) for r in out]

"""Images -> embeddings in the LAION layout (img_emb/img_emb_NNNN.npy + metadata/metadata_NNNN.parquet).

Inputs: img2dataset webdataset tars (``{shard:05d}.tar`` holding key.jpg/.png/.webp, key.txt, key.json) —
one output shard per tar, in sorted order — or plain folders of images, cut into shards of --shard-size
files (sorted). Batched through the chosen open_clip model on the best device (or Ray Data actors with
--ray-address). Each output shard is written atomically, so a killed run resumes at the first shard not
written; plan.json pins which input makes which shard, so a resumed run never shifts ids.

Metadata per row: url, caption, key, and the sample's JSON fields (img2dataset: status, width, height,
original_width, original_height, sha256, ...); for folders: url and path (relative path), caption (sibling
NAME.txt), sha256. Unreadable images are left out and listed in the report.
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator

from ..core.config import DEFAULT_BATCH_SIZE
from ..core.errors import ConfigError, ImageInputError
from ..core.images import find_images
from .shards import shard_done, write_shard

PLAN = "plan.json"


@dataclass
class EmbedReport:
    out: Path
    shards: int
    rows: int
    resumed: int
    skipped: list[str] = field(default_factory=list)


def plan_inputs(inputs: list[str], shard_size: int) -> list[dict]:
    """One entry per output shard: {"tar": path} or {"folder": root, "files": [relative paths]}."""
    plan: list[dict] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_file() and p.suffix == ".tar":
            plan.append({"tar": str(p.resolve())})
        elif p.is_dir() and sorted(p.glob("*.tar")):
            plan.extend({"tar": str(t.resolve())} for t in sorted(p.glob("*.tar")))
        elif p.is_dir():
            files = [f.relative_to(p).as_posix() for f in find_images(p)]
            if not files:
                raise ConfigError(f"{p}: no images (.png, .jpg, .jpeg, .webp) and no .tar shards")
            for start in range(0, len(files), shard_size):
                plan.append({"folder": str(p.resolve()), "files": files[start:start + shard_size]})
        else:
            matches = sorted(Path().glob(raw)) if any(ch in raw for ch in "*?[") else []
            if not matches:
                raise ConfigError(f"{raw}: no such tar, folder or pattern")
            plan.extend(plan_inputs([str(m) for m in matches], shard_size))
    return plan


def _samples_from_tar(path: str) -> Iterator[tuple[bytes, dict]]:
    """(image bytes, metadata) per key of an img2dataset webdataset tar, in key order."""
    groups: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name
            base, _, ext = name.rpartition(".")
            data = tar.extractfile(member).read()
            groups.setdefault(base, {})[ext.lower()] = data
    for key in sorted(groups):
        parts = groups[key]
        image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
        if image is None:
            continue
        meta: dict = {}
        if "json" in parts:
            try:
                meta = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v)
                        for k, v in json.loads(parts["json"]).items()}
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                meta = {}
        if "txt" in parts:
            meta["caption"] = parts["txt"].decode("utf-8", "replace")
        meta["key"] = str(meta.get("key") or Path(key).name)
        meta.setdefault("url", None)
        meta.setdefault("caption", None)
        meta["source"] = f"{Path(path).name}/{key}"
        yield image, meta


def _samples_from_folder(root: str, files: list[str]) -> Iterator[tuple[bytes, dict]]:
    for rel in files:
        path = Path(root) / rel
        try:
            data = path.read_bytes()
        except OSError as exc:
            yield b"", {"url": rel, "path": rel, "error": str(exc)}
            continue
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else None
        yield data, {"url": rel, "path": rel, "caption": caption, "sha256": hashlib.sha256(data).hexdigest()}


def _metadata_table(rows: list[dict]):
    import pyarrow as pa

    columns: dict[str, list] = {}
    for r in rows:
        for k in r:
            columns.setdefault(k, [])
    for k in columns:
        values = [r.get(k) for r in rows]
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) > 1 or kinds - {int, float, str, bool}:
            values = [None if v is None else str(v) for v in values]
        columns[k] = values
    return pa.table(columns)


def embed_to_shards(inputs: list[str], out: str | Path, model: str, *, device: str = "auto",
                    batch_size: int = DEFAULT_BATCH_SIZE, shard_size: int = 10_000,
                    ray_address: str | None = None, progress: bool = True) -> EmbedReport:
    """Embed images into LAION-layout shards under out (resuming at the first shard not yet written)."""
    import numpy as np

    from ..core.images import to_pixels
    from ..core.progress import progress as progress_bar

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_inputs(inputs, shard_size)
    plan_path = out / PLAN
    record = {"model": model, "shards": plan}
    if plan_path.is_file():
        if json.loads(plan_path.read_text()) != record:
            raise ConfigError(f"{out} holds shards of other inputs or another model ({plan_path}); give a new --out "
                              f"or delete that folder")
    else:
        plan_path.write_text(json.dumps(record, indent=1))
    embedder = None
    skipped: list[str] = []
    rows = resumed = 0
    # Folders list their images: count images. Tars are counted whole, as shards.
    by_image = all("files" in item for item in plan)

    def size(item) -> int:
        return len(item["files"]) if by_image else 1

    bar = progress_bar(sum(size(item) for item in plan), "embedding", "images" if by_image else "shards",
                       enabled=progress)
    for number, item in enumerate(plan):
        if shard_done(out, number):
            resumed += 1
            bar.update(size(item))
            continue
        samples = list(_samples_from_tar(item["tar"]) if "tar" in item
                       else _samples_from_folder(item["folder"], item["files"]))
        if ray_address:
            from .distributed import embed_on_ray

            vectors, ok, errors = embed_on_ray(ray_address, [s[0] for s in samples], model, batch_size, device)
            keep = [i for i in range(len(samples)) if ok[i]]
            skipped += [f"{samples[i][1].get('source') or samples[i][1].get('url')}: {errors[i]}"
                        for i in range(len(samples)) if not ok[i]]
            vecs = vectors[keep] if keep else np.zeros((0, 0), np.float32)
        else:
            if embedder is None:
                from ..core.embed import get_embedder

                embedder = get_embedder(model, device)
            keep, chunks = [], []
            for start in range(0, len(samples), batch_size):
                chunk = samples[start:start + batch_size]
                pixels = to_pixels([s[0] or b"\0" for s in chunk])
                good = []
                for i, p in enumerate(pixels):
                    if isinstance(p, ImageInputError):
                        meta = chunk[i][1]
                        skipped.append(f"{meta.get('source') or meta.get('url')}: {p}")
                    else:
                        keep.append(start + i)
                        good.append(p)
                if good:
                    chunks.append(embedder.embed_pixels(good, batch_size))
            vecs = np.concatenate(chunks) if chunks else np.zeros((0, embedder.dim), np.float32)
        metadata = _metadata_table([samples[i][1] for i in keep]) if keep else None
        if keep:
            write_shard(out, number, vecs, metadata)
            rows += len(keep)
        else:
            skipped.append(f"shard {number}: no readable image; nothing written (ids stay contiguous)")
            raise ConfigError(f"input shard {number} ({item.get('tar') or item.get('folder')}) holds no readable "
                              f"image; remove it from the inputs so shard numbers stay contiguous")
        bar.update(size(item))
    bar.close()
    return EmbedReport(out, len(plan), rows, resumed, skipped)

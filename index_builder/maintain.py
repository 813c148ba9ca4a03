"""Changing a published bundle without rebuilding it: remove rows, append rows, merge two bundles.

Each operation writes a new version of the bundle in a temporary folder beside it and publishes it with a
rename, so readers see the old version or the new one, never a mix; files that do not change are
hard-linked, not copied (bundle files are never modified in place). Each is recorded in the manifest's
build history and bumps the bundle version.

- remove: row ids (or the rows whose url or hash is listed) go into removed.npy; FAISS is given a selector
  that skips them, so they are never returned, and their metadata reads as {"removed": true}. Ids of the
  other rows do not change.
- append: new LAION-layout shards, embedded with the bundle's model, are added with the bundle's trained
  quantizer (no retraining) after the existing rows.
- merge: bundle B's rows follow A's; same model required. When both were trained with the same quantizer,
  their inverted lists are merged; otherwise B's stored vectors are added through A's quantizer.
"""
from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.bundle import (INDEX_FILE, IVFDATA_FILE, METADATA_FILE, REMOVED_FILE, TRAINED_FILE, Bundle, BundleLock,
                           Manifest, MetadataWriter, RerankFileWriter, finalize, normalize_metadata, publish,
                           space_for, staging, sweep_leftovers, utc_now, write_caption_index)
from ..core import captions
from ..core.errors import ConfigError, DimensionMismatchError
from .faiss_build import add_part, merge_parts
from .shards import iter_vectors, metadata_schema, read_metadata, scan_shards


@dataclass
class ChangeReport:
    out: Path
    version: str
    rows: int
    changed: int
    note: str = ""


def _new_version() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _bundle_bytes(bundle: Bundle) -> int:
    return sum(int(info.get("size", 0)) for info in bundle.manifest.files.values())


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _history(m: Manifest, entry: dict) -> None:
    m.build.setdefault("history", []).append({"at": utc_now(), **entry})


def _publish_change(tmp: Path, out: Path, manifest: Manifest, old_files: dict) -> None:
    finalize(tmp, manifest, hashed=old_files)
    publish(tmp, out)


# remove ---------------------------------------------------------------------------------------------------

def ids_for(bundle: Bundle, *, ids: list[int] | None = None, urls: list[str] | None = None,
            hashes: list[str] | None = None, hash_columns: tuple[str, ...] = ("hash", "sha256", "md5")) -> tuple[
        list[int], int]:
    """Row ids named directly, or by url or hash (scanning metadata); returns (ids, how many were not found)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if ids is not None:
        wanted = np.unique(np.asarray(ids, dtype=np.int64))
        ok = wanted[(wanted >= 0) & (wanted < bundle.count)]
        return ok.tolist(), len(wanted) - len(ok)
    if urls is not None:
        columns, values = ["url"], urls
    else:
        columns = [c for c in hash_columns if c in bundle.columns]
        if not columns:
            raise ConfigError(f"bundle {bundle.id} has no hash column ({', '.join(hash_columns)}); its columns are "
                              f"{bundle.columns}; remove by --ids or --urls instead")
        values = hashes or []
    value_set = pa.array(sorted(set(values)), type=pa.string())
    found_ids, found_values = [], set()
    offset = 0
    for batch in bundle.metadata_batches():
        for col in columns:
            arr = batch.column(batch.schema.get_field_index(col)).cast(pa.string())
            mask = pc.is_in(arr, value_set=value_set).to_numpy(zero_copy_only=False)
            hits = np.nonzero(mask)[0]
            found_ids.extend((hits + offset).tolist())
            found_values.update(arr.take(pa.array(hits)).to_pylist())
        offset += batch.num_rows
    return sorted(set(found_ids)), len(set(values) - found_values)


def remove_rows(bundle_path: str | Path, *, ids=None, urls=None, hashes=None, reason: str = "",
                wait: bool = True) -> ChangeReport:
    """Take rows out of the bundle at bundle_path and publish the new version. Runs under the bundle's
    maintenance lock: removed.npy and the manifest's history are read and written by one run at a time."""
    import numpy as np

    bundle_path = Path(bundle_path).expanduser()
    kind = "ids" if ids is not None else ("urls" if urls is not None else "hashes")
    with BundleLock(bundle_path, f"index remove ({kind})", wait=wait):
        sweep_leftovers(bundle_path)
        bundle = Bundle.open(bundle_path)
        try:
            rows, missing = ids_for(bundle, ids=ids, urls=urls, hashes=hashes)
            removed = np.union1d(bundle.removed, np.asarray(rows, dtype=np.int64)).astype(np.int64)
            newly = len(removed) - len(bundle.removed)
            m = copy.deepcopy(bundle.manifest)
            old_files = dict(m.files)
            # Unchanged files are hard links; a copy where links fail (another file system) needs their size.
            needed = removed.nbytes + (1 << 20)
            with space_for(bundle_path.parent, needed, f"removing rows from {bundle_path}"), \
                    staging(bundle_path) as tmp:
                for name in m.data_files():
                    if name != m.removed_file:
                        _link(bundle_path / name, tmp / name)
                np.save(tmp / REMOVED_FILE, removed)
                m.removed_file, m.removed_count = REMOVED_FILE, int(len(removed))
                old_files.pop(REMOVED_FILE, None)
                m.bundle_version = _new_version()
                _history(m, {"op": "remove", "by": kind, "rows": newly, "not_found": missing, "reason": reason})
                _publish_change(tmp, bundle_path, m, old_files)
        finally:
            bundle.close()
    return ChangeReport(bundle_path, m.bundle_version, bundle.count - len(removed), newly,
                        f"{missing} listed {kind} matched no row" if missing else "")


def update_manifest(bundle_path: str | Path, change, wait: bool = True,
                    operation: str = "index calibrate") -> ChangeReport:
    """A new version whose data files are the old ones (hard-linked) and whose manifest ``change(manifest,
    folder)`` edits (it may write new files into the folder); change returns the history entry. Under the
    bundle's maintenance lock, like every change."""
    bundle_path = Path(bundle_path).expanduser()
    with BundleLock(bundle_path, operation, wait=wait):
        sweep_leftovers(bundle_path)
        bundle = Bundle.open(bundle_path)
        try:
            m = copy.deepcopy(bundle.manifest)
            old_names = set(m.data_files())
            with space_for(bundle_path.parent, 1 << 20, f"updating {bundle_path}"), staging(bundle_path) as tmp:
                for name in m.data_files():
                    _link(bundle_path / name, tmp / name)
                entry = change(m, tmp)
                m.validate()
                m.bundle_version = _new_version()
                _history(m, entry)
                _publish_change(tmp, bundle_path, m, {k: v for k, v in m.files.items() if (tmp / k).is_file()
                                                      and k in old_names})
        finally:
            bundle.close()
    return ChangeReport(bundle_path, m.bundle_version, m.count, 0)


def add_caption_index(bundle_path: str | Path, wait: bool = True, progress: bool = True) -> ChangeReport:
    """Write the caption index of a bundle built without one (as a new version)."""
    from ..core.progress import progress as bar

    def change(m, tmp):
        m.captions_file = write_caption_index(tmp, m, bar(m.count, "caption index", "row", enabled=progress))
        return {"op": "captions", "file": m.captions_file}

    return update_manifest(bundle_path, change, wait, operation="index captions")


# append and merge -----------------------------------------------------------------------------------------

def _write_vectors(tmp: Path, m: Manifest, sources: list[tuple[Bundle | None, object]], total: int) -> None:
    """Re-rank vectors of the new version: each source is (bundle whose vectors are copied) or (None, batches)."""
    import numpy as np

    if not m.rerank_file:
        return
    writer = RerankFileWriter(tmp, total, m.dim, m.rerank_dtype)
    pos = 0
    try:
        for bundle, batches in sources:
            if bundle is not None:
                batches = ((start, bundle.vector(np.arange(start, min(start + 100_000, bundle.count))))
                           for start in range(0, bundle.count, 100_000))
            for _, x in batches:
                writer.write(pos, x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
                pos += len(x)
    finally:
        writer.close()


def _combined_index(tmp: Path, base: Bundle, extra_batches, shift_ids: bool = False, extra_index: Path | None = None):
    """base's index with more rows: through base's trained quantizer into on-disk lists (IVF), or added to a
    full in-memory copy (exhaustive indices). Returns the index; writes index.ivfdata into tmp for IVF."""
    import faiss
    import numpy as np

    m = base.manifest
    if m.trained_file:
        _link(base.path / m.trained_file, tmp / TRAINED_FILE)
    if m.ivfdata_file:
        if not m.trained_file:
            raise ConfigError(f"bundle {base.id} keeps no trained quantizer ({TRAINED_FILE}); rebuild it with this "
                              f"release to append or merge")
        parts = [base.path / m.index_file]
        if extra_index is not None:
            parts.append(extra_index)
        else:
            part = tmp / "part_new.index"
            add_part(tmp / TRAINED_FILE, extra_batches, part)
            parts.append(part)
        index = merge_parts(tmp / TRAINED_FILE, parts, tmp, IVFDATA_FILE, shift_ids=shift_ids)
        for p in parts[1:]:
            if p.parent == tmp:
                p.unlink()
        return index
    index = faiss.read_index(str(base.path / m.index_file))
    for _, x in extra_batches:
        index.add(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    return index


def append_rows(bundle_path: str | Path, source: str, model: str | None = None,
                wait: bool = True, progress: bool = True) -> ChangeReport:
    """Add the rows of LAION-layout shards at source to the bundle, under the bundle's maintenance lock."""
    bundle_path = Path(bundle_path).expanduser()
    with BundleLock(bundle_path, "index append", wait=wait):
        sweep_leftovers(bundle_path)
        bundle = Bundle.open(bundle_path)
        try:
            return _append(bundle_path, bundle, source, model, progress)
        finally:
            bundle.close()


def _append(bundle_path: Path, bundle: Bundle, source: str, model: str | None, progress: bool) -> ChangeReport:
    import faiss

    from ..core.progress import heartbeat
    from ..core.progress import progress as bar

    m = copy.deepcopy(bundle.manifest)
    if model and model != m.model:
        raise ConfigError(f"--model {model} differs from the bundle's {m.model}: appended rows must come from the "
                          f"same model")
    shards = scan_shards(source)
    if shards[0].dim != m.dim:
        raise DimensionMismatchError(f"{source} holds {shards[0].dim}-d embeddings but bundle {m.bundle_id} is "
                                     f"{m.dim}-d ({m.model}); embed them with the bundle's model")
    new_rows = sum(s.rows for s in shards)
    old_files = dict(m.files)
    # The new version rewrites index, vectors and metadata: about the old size plus the new rows again.
    needed = int(_bundle_bytes(bundle) * (1 + new_rows / max(bundle.count, 1))) + (16 << 20)
    with space_for(bundle_path.parent, needed, f"appending to {bundle_path}"), staging(bundle_path) as tmp:
        adding = bar(new_rows, "adding", "row", enabled=progress)

        def offset_batches():
            for first, x in iter_vectors(shards):
                yield first + bundle.count, x
                adding.update(len(x))

        index = _combined_index(tmp, bundle, offset_batches())
        adding.close()
        with heartbeat("writing the index and re-rank vectors", enabled=progress):
            faiss.write_index(index, str(tmp / INDEX_FILE))
            del index
            _write_vectors(tmp, m, [(bundle, None), (None, iter_vectors(shards))], bundle.count + new_rows)
        writer = MetadataWriter(tmp / METADATA_FILE, m.metadata_batch_rows,
                                schema=metadata_schema(shards, base=bundle._metadata.schema))
        metadata = bar(bundle.count + new_rows, "metadata", "row", enabled=progress)
        for batch in bundle.metadata_batches():
            writer.write(_table(batch))
            metadata.update(batch.num_rows)
        for s in shards:
            table = read_metadata(s)
            writer.write(table)
            metadata.update(table.num_rows)
        writer.close()
        metadata.close()
        if m.removed_file:
            _link(bundle_path / m.removed_file, tmp / m.removed_file)
        if bundle.captions is not None:  # the new rows' captions join the index
            with heartbeat("caption index", enabled=progress):
                captions.extend(tmp / captions.CAPTIONS_FILE, bundle.captions,
                                (b for s in shards for b in normalize_metadata(read_metadata(s)).to_batches()),
                                bundle.count)
        for name in (INDEX_FILE, IVFDATA_FILE, METADATA_FILE, m.rerank_file, m.rerank_scale_file, m.captions_file):
            old_files.pop(name, None)
        m.count = bundle.count + new_rows
        m.bundle_version = _new_version()
        _history(m, {"op": "append", "rows": new_rows, "source": str(source)})
        _publish_change(tmp, bundle_path, m, old_files)
    return ChangeReport(bundle_path, m.bundle_version, m.count, new_rows)


def _table(batch):
    import pyarrow as pa

    return pa.Table.from_batches([batch])


def merge_bundles(a_path: str | Path, b_path: str | Path, out: str | Path,
                  overwrite: bool = False, wait: bool = True) -> ChangeReport:
    """Bundle B's rows after A's, published at out (under out's maintenance lock: out may be A itself)."""
    out = Path(out).expanduser()
    with BundleLock(out, "index merge", wait=wait):
        sweep_leftovers(out)
        if out.exists() and not overwrite:
            raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
        a, b = Bundle.open(a_path), Bundle.open(b_path)
        try:
            return _merge(a, b, out)
        finally:
            a.close()
            b.close()


def _merge(a: Bundle, b: Bundle, out: Path) -> ChangeReport:
    import faiss
    import numpy as np
    import pyarrow as pa

    if a.model != b.model or a.dim != b.dim:
        raise ConfigError(f"bundles {a.id} ({a.model}, {a.dim}-d) and {b.id} ({b.model}, {b.dim}-d) come from "
                          f"different models: their scores are not comparable; check them side by side instead "
                          f"(--index A --index B)")
    from ..core.fingerprint import KEY, same_weights

    fa, fb = (a.manifest.build or {}).get(KEY), (b.manifest.build or {}).get(KEY)
    if fa is not None and fb is not None and not same_weights(fa, fb):
        raise ConfigError(f"bundles {a.id} and {b.id} name the same model ({a.model}) but their fingerprints say "
                          f"other weights made their vectors: their scores are not comparable; check them side by "
                          f"side instead of merging")
    m = copy.deepcopy(a.manifest)
    if fa is None or fb is None:  # the rows of the one without a fingerprint are known by name only: so is the whole
        m.build.pop(KEY, None)
    same_quantizer = (m.trained_file and b.manifest.trained_file and m.ivfdata_file and b.manifest.ivfdata_file
                      and m.files[m.trained_file]["sha256"] == b.manifest.files[b.manifest.trained_file]["sha256"])
    if not same_quantizer and b.vectors is None and m.ivfdata_file:
        raise ConfigError(f"bundle {b.id} stores no vectors and was trained with another quantizer than {a.id}; "
                          f"rebuild both from their shards with one build instead")
    out.parent.mkdir(parents=True, exist_ok=True)
    needed = _bundle_bytes(a) + _bundle_bytes(b) + (16 << 20)
    with space_for(out.parent, needed, f"merging into {out}"), staging(out) as tmp:
        if same_quantizer:
            index = _combined_index(tmp, a, None, shift_ids=True, extra_index=b.path / b.manifest.index_file)
        else:
            def b_batches():
                for start in range(0, b.count, 100_000):
                    ids = np.arange(start, min(start + 100_000, b.count))
                    yield a.count + start, b.vector(ids) if b.vectors is not None else _reconstruct(b, ids)

            index = _combined_index(tmp, a, b_batches())
        faiss.write_index(index, str(tmp / INDEX_FILE))
        del index
        _write_vectors(tmp, m, [(a, None), (b, None)], a.count + b.count)
        schema = pa.unify_schemas([a._metadata.schema, b._metadata.schema], promote_options="permissive")
        writer = MetadataWriter(tmp / METADATA_FILE, m.metadata_batch_rows, schema=schema)
        for bundle in (a, b):
            for batch in bundle.metadata_batches():
                writer.write(_table(batch))
        writer.close()
        if a.captions is not None or b.captions is not None:
            shifted = None
            if b.captions is not None:
                shifted = np.array(b.captions)
                shifted["row"] += a.count
            captions.extend(tmp / captions.CAPTIONS_FILE, a.captions, [], 0, other=shifted)
            m.captions_file = captions.CAPTIONS_FILE
        removed = np.union1d(a.removed, b.removed + a.count).astype(np.int64)
        m.removed_file, m.removed_count = (REMOVED_FILE, int(len(removed))) if len(removed) else (None, 0)
        if len(removed):
            np.save(tmp / REMOVED_FILE, removed)
        m.count = a.count + b.count
        m.bundle_id = out.name
        m.bundle_version = _new_version()
        _history(m, {"op": "merge", "from": [f"{a.id}@{a.version}", f"{b.id}@{b.version}"],
                     "rows": [a.count, b.count], "lists": "merged" if same_quantizer else "re-added"})
        finalize(tmp, m)
        publish(tmp, out)
    return ChangeReport(out, m.bundle_version, m.count, b.count,
                        "inverted lists merged" if same_quantizer else f"{b.id}'s rows re-added through {a.id}'s index")


def _reconstruct(bundle: Bundle, ids):
    """Vectors of an exhaustive bundle without re-rank vectors, read back from its index."""
    import numpy as np

    return np.stack([bundle.index.reconstruct(int(i)) for i in ids]).astype(np.float32)

"""manifest.json: what a bundle is, the names of its files, and reading and writing it.

Every name in a manifest is a plain file name inside the bundle folder: a name with a path separator, "..",
or an absolute path is refused (ManifestError) before anything is opened, so a manifest cannot make a
reader open files outside its bundle.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import DEFAULT_BLOCK, DEFAULT_WARN, METADATA_BATCH_ROWS
from ..errors import BundleFileError, ManifestError

FORMAT = "provenance-guard-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
METADATA_FILE = "metadata.arrow"
VECTORS_FILE = "vectors.f16.npy"
VECTORS_I8_FILE = "vectors.i8.npy"
SCALES_FILE = "vectors.scale.npy"
TRAINED_FILE = "trained.index"
REMOVED_FILE = "removed.npy"
RERANK_DTYPES = ("float16", "int8")
# A manifest grows by one history entry per change; anything far beyond this is not a manifest.
MAX_MANIFEST_BYTES = 64 << 20

# Column names of the producers in the field (LAION release, clip-retrieval, LAION-400M, img2dataset),
# mapped onto the two every surface shows; all other columns are kept under their own names.
URL_COLUMNS = ("url", "URL")
CAPTION_COLUMNS = ("caption", "TEXT", "text")

def _tool_version() -> str:
    from ... import __version__

    return __version__


_NOW: tuple = (None, "")


def utc_now() -> str:
    """The current UTC time to the second, ISO 8601. Formatted once a second: every check result carries it,
    and strftime cost a check as much as its verdicts."""
    global _NOW
    second = int(time.time())
    if _NOW[0] != second:
        _NOW = (second, datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    return _NOW[1]


@dataclass
class Manifest:
    """manifest.json as a dataclass; ``to_json``/``from_json`` keep the on-disk layout in one place."""

    bundle_id: str
    bundle_version: str
    model: str
    dim: int
    count: int
    index_factory: str = "Flat"
    index_file: str = INDEX_FILE
    ivfdata_file: str | None = None
    trained_file: str | None = None
    search_params: dict[str, Any] = field(default_factory=dict)
    rerank_file: str | None = VECTORS_FILE
    rerank_dtype: str = "float16"
    rerank_scale_file: str | None = None
    metadata_file: str = METADATA_FILE
    metadata_batch_rows: int = METADATA_BATCH_ROWS
    removed_file: str | None = None
    removed_count: int = 0
    captions_file: str | None = None
    warn: float = DEFAULT_WARN
    block: float = DEFAULT_BLOCK
    description: str = ""
    normalized: bool = True
    metric: str = "cosine"
    build: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    verification: dict[str, Any] = field(default_factory=dict)  # calibrated verifier cut-offs (verify.py)

    @property
    def flat(self) -> bool:
        """True when the index is exhaustive and scores every row in float32 (its scores are exact)."""
        return self.index_factory.replace(" ", "") in ("Flat", "IDMap,Flat", "IDMap2,Flat")

    @property
    def exact(self) -> bool:
        """True when reported scores are exact cosines: a flat index, or stored vectors to re-rank with."""
        return self.flat or self.rerank_file is not None

    def data_files(self) -> list[str]:
        """Every file of the bundle but the manifest."""
        return [f for f in (self.index_file, self.ivfdata_file, self.trained_file, self.metadata_file,
                            self.rerank_file, self.rerank_scale_file, self.removed_file, self.captions_file) if f]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "bundle": {"id": self.bundle_id, "version": self.bundle_version, "description": self.description},
            "embedding": {"model": self.model, "dim": self.dim, "normalized": self.normalized},
            "metric": self.metric,
            "count": self.count,
            "index": {"factory": self.index_factory, "file": self.index_file, "ivfdata": self.ivfdata_file,
                      "trained": self.trained_file, "search_params": self.search_params},
            "rerank": {"file": self.rerank_file, "dtype": self.rerank_dtype if self.rerank_file else None,
                       "scale_file": self.rerank_scale_file, "scores": "exact" if self.exact else "approximate"},
            "metadata": {"file": self.metadata_file, "batch_rows": self.metadata_batch_rows},
            "removed": {"file": self.removed_file, "count": self.removed_count},
            **({"captions": {"file": self.captions_file}} if self.captions_file else {}),
            "thresholds": {"warn": self.warn, "block": self.block},
            "build": self.build,
            "files": self.files,
            **({"verification": self.verification} if self.verification else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = MANIFEST) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ManifestError(f"{where}: not a provenance-guard bundle manifest (no \"format\": \"{FORMAT}\")")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{where}: bundle format version {version!r} is not known to this release, which reads version "
                f"{FORMAT_VERSION}; upgrade provenance-guard (pip install -U provenance-guard) or rebuild the "
                f"bundle with this release"
            )
        try:
            rerank = data.get("rerank") or {}
            removed = data.get("removed") or {}
            manifest = cls(
                bundle_id=str(data["bundle"]["id"]),
                bundle_version=str(data["bundle"]["version"]),
                description=str(data["bundle"].get("description", "")),
                model=str(data["embedding"]["model"]),
                dim=int(data["embedding"]["dim"]),
                normalized=bool(data["embedding"].get("normalized", True)),
                metric=str(data.get("metric", "cosine")),
                count=int(data["count"]),
                index_factory=str(data["index"]["factory"]),
                index_file=str(data["index"]["file"]),
                ivfdata_file=data["index"].get("ivfdata"),
                trained_file=data["index"].get("trained"),
                search_params=dict(data["index"].get("search_params") or {}),
                rerank_file=rerank.get("file"),
                rerank_dtype=str(rerank.get("dtype") or "float16"),
                rerank_scale_file=rerank.get("scale_file"),
                metadata_file=str(data["metadata"]["file"]),
                metadata_batch_rows=int(data["metadata"]["batch_rows"]),
                removed_file=removed.get("file"),
                removed_count=int(removed.get("count") or 0),
                captions_file=(data.get("captions") or {}).get("file"),
                warn=float(data["thresholds"]["warn"]),
                block=float(data["thresholds"]["block"]),
                build=dict(data.get("build") or {}),
                files=dict(data.get("files") or {}),
                format_version=int(version),
                verification=dict(data.get("verification") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"{where}: field {exc} is missing or malformed; rebuild the bundle") from exc
        manifest.validate(where)
        return manifest

    def validate(self, where: str = MANIFEST) -> None:
        """Refuse values no reader may act on: counts out of range, thresholds that are no cosines, and file
        names that would lead outside the bundle folder."""
        for name, value, least in (("embedding.dim", self.dim, 1), ("count", self.count, 0),
                                   ("metadata.batch_rows", self.metadata_batch_rows, 1),
                                   ("removed.count", self.removed_count, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ManifestError(f"{where}: {name} is {value!r}; it must be a whole number >= {least}; "
                                    f"the manifest is damaged: restore it or rebuild the bundle")
        if self.removed_count > self.count:
            raise ManifestError(f"{where}: removed.count {self.removed_count} exceeds count {self.count}; "
                                f"the manifest is damaged: restore it or rebuild the bundle")
        for name, value in (("thresholds.warn", self.warn), ("thresholds.block", self.block)):
            if not math.isfinite(value) or not -1.0 <= value <= 1.0:
                raise ManifestError(f"{where}: {name} is {value!r}, not a cosine between -1 and 1; fix it "
                                    f"(provenance-guard index calibrate writes measured ones) or rebuild")
        if self.warn > self.block:
            raise ManifestError(f"{where}: thresholds.warn {self.warn} is above thresholds.block {self.block}")
        for name in self.data_files() + list(self.files):
            check_file_name(name, where)
        for name, info in self.files.items():
            size = info.get("size") if isinstance(info, dict) else None
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ManifestError(f"{where}: files.{name}.size is {size!r}; the manifest is damaged: restore it "
                                    f"or rebuild the bundle")


def check_file_name(name: Any, where: str = MANIFEST) -> str:
    """name when it is a plain file name (no folder part, not "." or "..", no NUL); else ManifestError."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "\0" in name or "/" in name
            or "\\" in name or os.path.isabs(name) or name != os.path.basename(name)):
        raise ManifestError(f"{where}: file name {name!r} is not a plain file name inside the bundle; a manifest "
                            f"may only name files in its own folder: restore the manifest or rebuild the bundle")
    return name


def bundle_file(folder: Path, name: str, where: str = MANIFEST) -> Path:
    """folder/name, refused (ManifestError) unless it is a plain name whose real path stays in folder (a
    symbolic link out of the bundle is refused too)."""
    check_file_name(name, where)
    path = folder / name
    real, root = os.path.realpath(path), os.path.realpath(folder)
    if os.path.commonpath([real, root]) != root:
        raise ManifestError(f"{where}: {name} leads outside the bundle folder ({real}); bundle files must be in "
                            f"the folder itself: copy the real file in, or rebuild the bundle")
    return path


def manifest_stamp(path: str | Path) -> tuple | None:
    """Changes whenever a bundle is published at this path or its manifest is rewritten (every change to a
    bundle ends that way); None where there is no manifest to stat (a server URL, a missing folder)."""
    try:
        # str paths: the server stats every request's bundle, and pathlib cost more than the stat
        st = os.stat(os.path.join(os.path.expanduser(os.fspath(path)), MANIFEST))
    except (OSError, ValueError):
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def _near_bundles(path: Path, limit: int = 2000) -> list[Path]:
    """Bundle folders beside path whose names are close to its name (a typo), at most two; the folder is
    listed only so far (limit entries)."""
    import difflib
    import itertools

    parent = path.parent if str(path.parent) else Path(".")
    try:
        names = [e.name for e in itertools.islice(os.scandir(parent), limit)
                 if e.is_dir() and (Path(e.path) / MANIFEST).is_file()]
    except OSError:
        return []
    return [parent / n for n in difflib.get_close_matches(path.name, names, n=2, cutoff=0.6)]


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        near = _near_bundles(path)
        hint = f"did you mean {' or '.join(str(n) for n in near)}? Otherwise build" if near else "build"
        raise BundleFileError(f"bundle {path} does not exist or is not a folder; {hint} one with "
                              f"'provenance-guard index build --images DIR --out {path}'")
    if not mpath.is_file():
        raise ManifestError(f"{mpath} is missing: {path} is not a complete bundle (a build that did not finish "
                            f"leaves no manifest); rebuild it")
    try:
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{mpath} is {mpath.stat().st_size:,} bytes, larger than any manifest; restore it "
                                f"from the bundle's source")
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestError(f"{mpath} cannot be parsed ({exc}); restore it from the bundle's source") from exc
    return Manifest.from_json(data, str(mpath))


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write manifest.json durably (temp file, fsync, rename)."""
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()

"""A folder of images (recursive; png, jpg, jpeg, webp) -> an exact bundle of their embeddings.

Each row's metadata: ``url`` and ``path`` (the file's path relative to the folder, POSIX separators),
``caption`` (the text of a sibling ``NAME.txt`` when present, as img2dataset writes it, else empty),
``sha256`` of the file, ``width`` and ``height``. Files that cannot be read are skipped and listed in the
build report and the manifest, never dropped silently.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..core.bundle import BundleWriter, space_for
from ..core.config import DEFAULT_BATCH_SIZE, DEFAULT_BLOCK, DEFAULT_WARN
from ..core.embed import get_embedder
from ..core.errors import ConfigError, ImageInputError
from ..core.images import find_images, to_pixels


@dataclass
class BuildReport:
    out: Path
    rows: int
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    text: dict = field(default_factory=dict)  # caption rows "repaired" (invalid UTF-8, NUL, BOM) and "truncated"


MAX_CAPTION_FILE_BYTES = 64 << 10  # a sibling .txt read at most this far (the caption is cut at 4,096 chars)


def _caption(path: Path) -> bytes:
    """The sibling NAME.txt's bytes (the bundle writer decodes them with replacement, drops NUL and a BOM,
    and cuts and counts what is too long), or b"" when there is none."""
    txt = path.with_suffix(".txt")
    try:
        if not txt.is_file():
            return b""
        with open(txt, "rb") as f:
            return f.read(MAX_CAPTION_FILE_BYTES + 1).strip()
    except OSError:
        return b""


def build_from_images(folder: str | Path, out: str | Path, model: str, *, device: str = "auto",
                      batch_size: int = DEFAULT_BATCH_SIZE, bundle_id: str | None = None,
                      bundle_version: str | None = None, description: str = "", warn: float = DEFAULT_WARN,
                      block: float = DEFAULT_BLOCK, overwrite: bool = False, progress: bool = True,
                      wait: bool = True) -> BuildReport:
    """Embed every image under folder with model and publish an exact (flat) bundle at out."""
    import time

    from ..core.progress import progress as progress_bar

    t0 = time.perf_counter()
    # Recorded absolute: a host that reads the bundle later (a webui started elsewhere) resolves a relative
    # path against its own working directory.
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"--images {folder}: no such folder; give the folder holding the reference images")
    files = find_images(folder)
    if not files:
        raise ConfigError(f"--images {folder}: no .png, .jpg, .jpeg or .webp files found (searched recursively)")
    embedder = get_embedder(model, device)
    skipped: list[str] = []
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    # A flat index (float32) and float16 re-rank vectors per row, metadata and slack.
    needed = len(files) * (embedder.dim * 6 + 2048) + (1 << 20)
    with space_for(out.parent, needed, f"building {out}"), \
            BundleWriter(out, model=embedder.spec.raw, dim=embedder.dim, bundle_id=bundle_id,
                         bundle_version=bundle_version, description=description, warn=warn, block=block,
                         overwrite=overwrite, wait=wait) as writer:
        bar = progress_bar(len(files), "embedding", "images", enabled=progress)
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            pixels = to_pixels(chunk)
            rows, good = [], []
            for path, p in zip(chunk, pixels, strict=True):
                if isinstance(p, ImageInputError):
                    skipped.append(str(p))
                    continue
                rel = path.relative_to(folder).as_posix()
                rows.append({"url": rel, "caption": _caption(path), "path": rel,
                             "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                             "width": p.width, "height": p.height})
                good.append(p)
            if good:
                writer.add(embedder.embed_pixels(good, batch_size), rows)
            bar.update(len(chunk))
        bar.close()
        if writer.count == 0:
            raise ConfigError(f"--images {folder}: none of the {len(files)} images could be read: {skipped[:3]}")
        from ..core.fingerprint import KEY, fingerprint

        writer.finish(build={"sources": [{"kind": "images", "path": str(folder), "files": len(files)}],
                             "skipped": skipped, KEY: fingerprint(embedder)})
    from ..core.bundle import read_manifest
    from ..core.references import remember_folder

    manifest = read_manifest(out)
    remember_folder(manifest.bundle_id, manifest.build.get("created", ""), folder)  # checks here may read it
    return BuildReport(Path(out), writer.count, skipped, time.perf_counter() - t0, dict(writer.text_stats))

"""Reference pixels: the training image behind a match, for verification and for people to see.

Where they come from:
- a bundle built from a folder of images records the folder (manifest build.sources, kind "images") and
  each row its path relative to it (metadata ``path``); ``root`` re-attaches a folder that moved
  (``--references DIR``). A path that would lead outside the folder is refused. A bundle is data from
  someone else: the folder its manifest names is read only when this machine's user built the bundle from
  it, as a local record that ``index build`` keeps outside the bundle says (``reference-folders.json`` in
  the user's config folder: bundle id, build time, folder), or when the user names it (``root``);
- a LAION-style bundle has only URLs: with ``fetch`` on (opt-in everywhere: fetching tells the image's host
  that someone looked at it) the image is fetched through core.fetch (public addresses only, size and time
  capped, a small pool) into a cache folder keyed by the URL's sha256, kept under a size cap by evicting the
  least recently used files. Most LAION links are dead by now: a dead link is ``unavailable``, which never
  changes a verdict by itself.
Every reference is decoded with the same pixel and byte caps as generated images.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ImageInputError

log = logging.getLogger("provenance_guard")

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .bundle import Bundle
    from .result import Match

ENV_CACHE = "PROVENANCE_GUARD_REFERENCE_CACHE"
ENV_CONFIG_DIR = "PROVENANCE_GUARD_CONFIG_DIR"
FOLDERS_FILE = "reference-folders.json"
MAX_RECORDED_FOLDERS = 1000  # bundles built here that are remembered, the oldest out
MAX_FOLDERS_FILE_BYTES = 1 << 20
FAILED_RETRY_S = 3600.0  # a dead link is not asked again for an hour


@dataclass(frozen=True)
class ReferenceOptions:
    root: str | None = None        # where a bundle's image folder is now (it moved)
    fetch: bool = False               # fetch LAION-style URLs (opt-in)
    cache_dir: str | None = None   # default $PROVENANCE_GUARD_REFERENCE_CACHE, else ~/.cache/provenance-guard/...
    cache_bytes: int = 512 << 20
    allow_loopback: bool = False      # tests only
    # How messages name the options that fix a missing reference: command-line flags by default; a host
    # passes its own field names (the webuis' Settings fields, the node's inputs).
    root_hint: str = "--references DIR"
    fetch_hint: str = "--fetch-references"


@dataclass
class Reference:
    """image: the pixels (None when unavailable); source: where they were read (a local path or the URL);
    label: what a record may say about it (the row's relative path, or the URL: never a local path, which
    would tell whoever receives the image how this machine's folders are laid out)."""

    image: Image.Image | None
    source: str
    reason: str = ""
    label: str = ""

    @property
    def available(self) -> bool:
        return self.image is not None


def config_dir() -> Path:
    """This user's provenance-guard config folder: $PROVENANCE_GUARD_CONFIG_DIR, else
    $XDG_CONFIG_HOME/provenance-guard, else ~/.config/provenance-guard."""
    if os.environ.get(ENV_CONFIG_DIR):
        return Path(os.environ[ENV_CONFIG_DIR]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "provenance-guard"


_RECORDED: dict = {}  # path -> ((mtime_ns, size), entries): read again only when the file changed
_RECORDED_LOCK = threading.Lock()


def _recorded() -> list:
    path = config_dir() / FOLDERS_FILE
    try:
        st = path.stat()
        if st.st_size > MAX_FOLDERS_FILE_BYTES:
            return []
        stamp = (st.st_mtime_ns, st.st_size)
        with _RECORDED_LOCK:
            cached = _RECORDED.get(str(path))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    entries = [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []
    with _RECORDED_LOCK:
        _RECORDED[str(path)] = (stamp, entries)
    return entries


def _identity(bundle: Bundle) -> tuple[str, str]:
    return str(bundle.id), str((bundle.manifest.build or {}).get("created", ""))


def remember_folder(bundle_id: str, created: str, folder: str | Path) -> None:
    """Record that this machine's user built bundle ``bundle_id`` (at ``created``) from ``folder``, so its
    checks may read that folder's images. Best effort: a config folder that cannot be written is said in
    the log, and the user names the folder instead."""
    from .record import atomic_write

    entry = {"bundle": str(bundle_id), "created": str(created), "folder": os.path.realpath(str(folder))}
    entries = [e for e in _recorded() if e != entry][-(MAX_RECORDED_FOLDERS - 1):] + [entry]
    try:
        config_dir().mkdir(parents=True, exist_ok=True)
        atomic_write(config_dir() / FOLDERS_FILE, json.dumps(entries, indent=1).encode("utf-8"))
    except OSError as exc:
        log.warning("provenance-guard: could not record %s as the reference folder of bundle %s in %s (%s); "
                    "name the folder (--references) when checking", folder, bundle_id, config_dir(), exc)


def built_here(bundle: Bundle, folder: str | Path) -> bool:
    """Whether this machine's user built this bundle from folder (the local record, never the manifest)."""
    bundle_id, created = _identity(bundle)
    real = os.path.realpath(str(folder))
    return any(e.get("bundle") == bundle_id and e.get("created") == created and e.get("folder") == real
               for e in _recorded())


def recorded_folders(bundle: Bundle) -> list[Path]:
    """The image folders the bundle's manifest names (build.sources of kind "images"), trusted or not."""
    out = []
    for source in bundle.manifest.build.get("sources", []) or []:
        if isinstance(source, dict) and source.get("kind") == "images" and isinstance(source.get("path"), str):
            out.append(Path(source["path"]).expanduser())
    return out


def image_roots(bundle: Bundle, root: str | None = None) -> list[Path]:
    """Folders a bundle's relative image paths resolve against: the one the user names first, then the ones
    the manifest recorded that this machine's user built the bundle from (built_here)."""
    roots = [Path(root).expanduser()] if root else []
    roots += [folder for folder in recorded_folders(bundle) if built_here(bundle, folder)]
    return roots


def local_path(bundle: Bundle, match: Match, root: str | None = None) -> Path | None:
    """The match's image file on this machine, or None. Only a relative path inside a root is followed."""
    rel = match.metadata.get("path") or match.metadata.get("image_path")
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\0" in rel:
        return None
    for folder in image_roots(bundle, root):
        candidate = folder / rel
        real, base = os.path.realpath(candidate), os.path.realpath(folder)
        if os.path.commonpath([real, base]) == base and os.path.isfile(real):
            return Path(real)
    return None


class ReferenceCache:
    """Fetched reference images on disk, one file per URL (named by its sha256), least recently used out."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self._lock = threading.Lock()

    def path(self, url: str) -> Path:
        digest = hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()
        return self.folder / digest[:2] / digest

    def get(self, url: str) -> bytes | None:
        path = self.path(url)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            os.utime(path)  # recently used
        except OSError:
            pass
        return data

    def put(self, url: str, data: bytes) -> None:
        from .record import atomic_write

        path = self.path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
        self.evict()

    def evict(self) -> None:
        with self._lock:
            files = []
            for sub in self.folder.glob("??"):
                for f in sub.iterdir():
                    try:
                        st = f.stat()
                    except OSError:
                        continue
                    files.append((st.st_mtime, st.st_size, f))
            total = sum(size for _, size, _ in files)
            for _, size, f in sorted(files):
                if total <= self.limit:
                    break
                try:
                    f.unlink()
                    total -= size
                except OSError:
                    pass


class ReferenceResolver:
    """Finds the reference image of a match (see the module docstring). Thread-safe; one per process setting."""

    def __init__(self, options: ReferenceOptions = ReferenceOptions()):
        self.options = options
        self._fetcher = None
        self._cache: ReferenceCache | None = None
        self._failed: dict[str, float] = {}
        self._lock = threading.Lock()

    def _fetching(self):
        with self._lock:
            if self._fetcher is None:
                from .fetch import Fetcher, FetchPolicy

                folder = Path(self.options.cache_dir or os.environ.get(ENV_CACHE)
                              or Path("~/.cache/provenance-guard/references").expanduser()).expanduser()
                self._cache = ReferenceCache(folder, self.options.cache_bytes)
                self._fetcher = Fetcher(FetchPolicy(max_bytes=20 << 20, allow_loopback=self.options.allow_loopback),
                                        workers=4, queue=64, public="the reference image could not be fetched")
            return self._fetcher, self._cache

    def resolve(self, bundle: Bundle, match: Match) -> Reference:
        from .images import open_image

        path = local_path(bundle, match, self.options.root)
        rel = str(match.metadata.get("path") or match.metadata.get("image_path") or "")
        if path is not None:
            try:
                return Reference(open_image(path).convert("RGB"), str(path), label=rel)
            except ImageInputError as exc:
                return Reference(None, str(path), f"the reference file {rel} cannot be read: {exc}", label=rel)
        url = match.url if isinstance(match.url, str) else ""
        if not url.lower().startswith(("http://", "https://")):
            # The folders looked in stay out of the reason: it goes into records that leave this machine.
            if not self.options.root and any(not built_here(bundle, f) for f in recorded_folders(bundle)):
                return Reference(None, rel or url or f"row {match.row_id}",
                                 f"the image folder this bundle names was not built into it on this machine by "
                                 f"its user, so it is not read; name the folder with {self.options.root_hint} to "
                                 f"verify against it", label=rel or url)
            return Reference(None, rel or url or f"row {match.row_id}",
                             f"the reference image {rel or ''} is not in the bundle's image folder on this machine "
                             f"(moved or never copied); give its folder with {self.options.root_hint}",
                             label=rel or url)
        if not self.options.fetch:
            return Reference(None, url, label=url, reason=f"reference fetching is off ({self.options.fetch_hint} "
                                                          f"turns it on; it tells the image's host that someone "
                                                          f"looked)")
        ref = self._fetch(url)
        ref.label = url
        return ref

    def _fetch(self, url: str) -> Reference:
        from .fetch import FetchError
        from .images import open_image

        fetcher, cache = self._fetching()
        data = cache.get(url)
        if data is None:
            failed_at = self._failed.get(url)
            if failed_at is not None and time.monotonic() - failed_at < FAILED_RETRY_S:
                return Reference(None, url, "the reference image could not be fetched (a recent try failed)")
            try:
                data = fetcher.get(url)
            except FetchError as exc:
                with self._lock:
                    self._failed[url] = time.monotonic()
                log.info("provenance-guard: reference %s not fetched: %s", url, exc.reason)  # details stay here
                return Reference(None, url, f"{exc} ({exc.kind})")
            try:
                image = open_image(data).convert("RGB")
            except ImageInputError as exc:
                with self._lock:
                    self._failed[url] = time.monotonic()
                return Reference(None, url, f"the fetched reference is not a usable image: {exc}")
            cache.put(url, data)
            return Reference(image, url)
        try:
            return Reference(open_image(data).convert("RGB"), url)
        except ImageInputError as exc:
            return Reference(None, url, f"the cached reference is not a usable image: {exc}")

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()

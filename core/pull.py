"""Getting a bundle to an artist: ``index publish`` writes what a host needs to serve a bundle folder, and
``index pull`` downloads a published bundle into models/provenance/, verified file by file and installed in
one rename (never a half bundle). This module owns both, the publish file's format, and the background
pulls the hosts' "bundle URL" field starts.

The publish file (``provenance-bundle.json``, beside manifest.json in the published folder) lists every
file of the bundle with its size and sha256 (see ``PublishFile``). A pull reads it from

- a folder on plain HTTP(S) static hosting: ``https://host/path/`` (or the publish file's own URL), each
  file at ``https://host/path/NAME``;
- a Hugging Face dataset repository: ``hf://datasets/OWNER/NAME[@REVISION][/SUBDIR]`` or
  ``https://huggingface.co/datasets/OWNER/NAME[/tree/REVISION/SUBDIR]``, through the Hub's resolve URLs
  (huggingface_hub supplies the endpoint and the user's token).

Every byte from the network is hostile. The publish file is read up to 1 MiB and parsed strictly (JSON
without duplicate keys, the required keys and their types); every file name must be a plain name inside
the bundle folder, the check the bundle manifest itself uses (``check_file_name``), so ``../x``,
``/etc/passwd`` and ``a/../../b`` are refused before anything is downloaded; the file count is capped. A
file's listed size is a hard cap on what is read from the server (more is cut off and refused), and the
manifest, downloaded first, must list exactly the files the publish file lists, with the same sizes and
sha256. Requests have connect and read timeouts, a deadline per file that grows with its size (enforced on
the sockets), at most a few redirects (http(s) only; the Hub token never follows a redirect to another
host), and ignore proxies and netrc from the environment. Any address the user names is allowed,
private and loopback ones included (a studio's server sits on a private network): a pull is the user's own
request, unlike core/fetch.py's fetches of URLs others gave us, which keep their SSRF guard.

Resumable: files are downloaded into ``DIR/.NAME.pull/`` (resumed with an HTTP Range request from the
partial file's length; a server that ignores Range restarts that file), each verified against its sha256
as it completes and kept across runs. Free disk space is checked up front against what is left to fetch; a
disk that fills up anyway is one DiskFullError and the partial file stays for the next run. The finished
folder is opened with the normal reader (Bundle.open) and renamed onto ``DIR/NAME`` under the bundle's
maintenance lock. ``DIR/.NAME.source.json`` records where it came from, so a host finds an installed
bundle for its URL without the network.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

from .bundle.manifest import MANIFEST, MAX_MANIFEST_BYTES, check_file_name, read_manifest, sha256_file, utc_now
from .errors import BundleError, ConfigError, DiskFullError, ManifestError

log = logging.getLogger("provenance_guard")

PUBLISH_FILE = "provenance-bundle.json"
PUBLISH_FORMAT = "provenance-guard-published-bundle"
PUBLISH_FORMAT_VERSION = 1
DEFAULT_DIR = os.path.join("models", "provenance")
HF_PREFIX = "hf://datasets/"
MAX_PUBLISH_BYTES = 1 << 20
MAX_FILES = 64
MAX_FILE_BYTES = 1 << 44  # 16 TiB: no bundle file comes near it; a listed size beyond it is no bundle
MAX_RECORD_BYTES = 64 << 10
CHUNK = 64 << 10
# A folder name pulls install into: plain, no leading dot (dot folders are work in progress), URL-safe.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._ -]{0,199}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class PullError(BundleError):
    """A published bundle could not be pulled or published; the message says why and what to do. A
    BundleError, so a host's fail mode handles it as it handles a bundle that cannot be opened."""


class PublishFileError(PullError):
    """The publish file (or the manifest it lists) is malformed or names what a bundle may not hold."""


class DownloadError(PullError):
    """The server could not be reached, answered with an error, or the transfer was cut off."""


class ChecksumError(PullError):
    """A downloaded file is not what the publish file lists (its sha256 differs)."""


class NotInstallable(PullError):
    """DIR/NAME already holds something else (another bundle without --replace, or no bundle at all)."""


class BundleNotReady(ConfigError):
    """A host's bundle URL is still downloading, or its download failed: the check fails under the host's
    fail mode with this message (never a silent pass)."""


@dataclass(frozen=True)
class PullPolicy:
    """Timeouts and caps of a pull: ``connect_timeout`` and ``read_timeout`` (a stall) in seconds; each file
    must arrive within ``deadline_base + size / min_rate`` seconds (a server that drips bytes is cut off; a
    re-run resumes); at most ``max_redirects`` redirects per request."""

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    deadline_base: float = 120.0
    min_rate: float = 256 * 1024
    max_redirects: int = 5
    max_publish_bytes: int = MAX_PUBLISH_BYTES
    max_files: int = MAX_FILES

    def deadline(self, size: int) -> float:
        return self.deadline_base + size / self.min_rate


# sources ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """Where a published bundle is: an http(s) folder (``base`` ends with '/') or a Hugging Face dataset."""

    kind: str  # "http" or "hf"
    base: str = ""
    publish_name: str = PUBLISH_FILE
    repo: str = ""
    revision: str = "main"
    subdir: str = ""

    @property
    def canonical(self) -> str:
        """One spelling per place, so a host recognises a bundle it pulled before from any of them."""
        if self.kind == "hf":
            sub = f"{self.subdir}/" if self.subdir else ""
            return f"{HF_PREFIX}{self.repo}@{self.revision}/{sub}{self.publish_name}"
        return self.base + quote(self.publish_name, safe="")

    @property
    def display(self) -> str:
        """The source for messages: no user name or password from the URL."""
        if self.kind == "hf":
            rev = "" if self.revision == "main" else f"@{self.revision}"
            return f"{HF_PREFIX}{self.repo}{rev}" + (f"/{self.subdir}" if self.subdir else "")
        parts = urlsplit(self.base)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def endpoint(self) -> str:
        return str(_hub().constants.ENDPOINT).rstrip("/")

    def url(self, name: str) -> str:
        """The URL of one file of the published folder (name already checked as a plain file name)."""
        if self.kind == "hf":
            sub = "".join(quote(s, safe="") + "/" for s in self.subdir.split("/") if s)
            return (f"{self.endpoint()}/datasets/{self.repo}/resolve/{quote(self.revision, safe='')}/{sub}"
                    f"{quote(name, safe='')}")
        return self.base + quote(name, safe="")

    def auth(self) -> tuple[dict[str, str], tuple | None]:
        """(headers, origin) the requests to origin carry: the Hub's user agent and the user's token."""
        if self.kind != "hf":
            return {}, None
        hub = _hub()
        headers = {"User-Agent": f"provenance-guard/{_version()}"}
        if not getattr(hub.constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False):
            # The token alone: build_hf_headers() would also fetch a telemetry registry from the Hub.
            try:
                get_token = getattr(hub, "get_token", None) or hub.HfFolder.get_token  # before 0.20: HfFolder
                token = get_token()
            except Exception as exc:  # noqa: BLE001 - a token that cannot be read is said in one line
                raise PullError(f"huggingface_hub could not read your token ({type(exc).__name__}: {exc}); run "
                                f"'hf auth login' again or unset HF_TOKEN") from exc
            if token:
                headers["Authorization"] = f"Bearer {token}"
        return headers, _origin(self.endpoint())


def _hub():
    """huggingface_hub (with its constants and utils), or one line saying how to install it."""
    try:
        import huggingface_hub
        import huggingface_hub.constants
    except ImportError:
        raise PullError("hf:// and huggingface.co bundle URLs need huggingface_hub, which is not installed: "
                        "pip install huggingface_hub") from None
    if getattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False):
        raise PullError("HF_HUB_OFFLINE is set, so the Hugging Face Hub is not contacted; unset it to pull from a "
                        "Hugging Face dataset")
    return huggingface_hub


def _origin(url: str) -> tuple:
    parts = urlsplit(url)
    return (parts.scheme, (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80))


def _segments(text: str, what: str, url: str) -> list[str]:
    out = [unquote(s) for s in text.split("/") if s]
    for s in out:
        if not _SEGMENT.fullmatch(s):
            raise ConfigError(f"{url!r}: {what} part {s!r} is not a plain folder name")
    return out


def parse_source(url: str) -> Source:
    """The Source a URL names; ConfigError (one line, with the forms accepted) for anything else."""
    forms = ("give the published folder's http(s) URL (https://host/path/), the URL of its "
             f"{PUBLISH_FILE}, or hf://datasets/OWNER/NAME[@REVISION][/SUBDIR]")
    if not isinstance(url, str) or not url.strip() or len(url) > 4096 or any(ord(c) < 33 for c in url.strip()):
        raise ConfigError(f"bundle URL {str(url)[:200]!r} is not a URL; {forms}")
    url = url.strip()
    if url.lower().startswith(HF_PREFIX):
        return _hf_source(url[len(HF_PREFIX):], url)
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        hint = (" (a folder on this machine is a bundle already: use it with --index, or copy it into "
                "models/provenance/)") if "://" not in url else ""
        raise ConfigError(f"bundle URL {url!r} is not an http(s) or hf:// URL{hint}; {forms}")
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(f"bundle URL {url!r} has no valid port; {forms}") from None
    host = parts.hostname.lower()
    if host in ("huggingface.co", "www.huggingface.co") and parts.path.startswith("/datasets/"):
        return _hf_web_source(parts.path[len("/datasets/"):], url)
    if parts.query:
        raise ConfigError(f"bundle URL {url!r}: a published folder's URL takes no query (?...); {forms}")
    path = parts.path or "/"
    publish_name = PUBLISH_FILE
    if path.lower().endswith(".json"):
        head, _, last = path.rpartition("/")
        publish_name = unquote(last)
        try:
            check_file_name(publish_name)
        except ManifestError:
            raise ConfigError(f"bundle URL {url!r}: {publish_name!r} is not a plain file name; {forms}") from None
        path = head + "/"
    elif not path.endswith("/"):
        path += "/"
    base = urlunsplit((parts.scheme.lower(), parts.netloc, path, "", ""))
    return Source(kind="http", base=base, publish_name=publish_name)


def _hf_source(rest: str, url: str) -> Source:
    """OWNER/NAME[@REVISION][/SUBDIR...][/FILE.json] after hf://datasets/."""
    parts = [p for p in rest.split("/") if p != ""]
    if len(parts) < 2:
        raise ConfigError(f"bundle URL {url!r}: give hf://datasets/OWNER/NAME[@REVISION][/SUBDIR]")
    owner, name = parts[0], parts[1]
    revision = "main"
    if "@" in name:
        name, revision = name.split("@", 1)
        revision = unquote(revision)
    return _hf_checked(owner, name, revision, parts[2:], url)


def _hf_web_source(rest: str, url: str) -> Source:
    """OWNER/NAME[/tree|resolve|blob/REVISION[/SUBDIR...][/FILE.json]] after huggingface.co/datasets/."""
    parts = [p for p in rest.split("/") if p != ""]
    if len(parts) < 2:
        raise ConfigError(f"bundle URL {url!r}: give https://huggingface.co/datasets/OWNER/NAME")
    owner, name, revision, tail = parts[0], parts[1], "main", []
    if len(parts) > 2:
        if parts[2] not in ("tree", "resolve", "blob") or len(parts) < 4:
            raise ConfigError(f"bundle URL {url!r}: give https://huggingface.co/datasets/OWNER/NAME or its "
                              f"/tree/REVISION/SUBDIR page")
        revision, tail = unquote(parts[3]), parts[4:]
    return _hf_checked(owner, name, revision, tail, url)


def _hf_checked(owner: str, name: str, revision: str, tail: list[str], url: str) -> Source:
    for what, value, rule in (("owner", owner, _REPO_PART), ("dataset name", name, _REPO_PART),
                              ("revision", revision, _REVISION)):
        if not rule.fullmatch(value) or value in (".", ".."):
            raise ConfigError(f"bundle URL {url!r}: {what} {value!r} is not a Hugging Face {what}")
    publish_name = PUBLISH_FILE
    if tail and tail[-1].lower().endswith(".json"):
        publish_name = unquote(tail[-1])
        tail = tail[:-1]
        try:
            check_file_name(publish_name)
        except ManifestError:
            raise ConfigError(f"bundle URL {url!r}: {publish_name!r} is not a plain file name") from None
    subdir = "/".join(_segments("/".join(tail), "folder", url))
    return Source(kind="hf", repo=f"{owner}/{name}", revision=revision, subdir=subdir, publish_name=publish_name)


def _name_ok(name: Any) -> bool:
    return isinstance(name, str) and bool(NAME_RE.fullmatch(name)) and not name.endswith((".pull", ".lock"))


def _controls(text: str) -> bool:
    """Whether text holds control or format characters (terminal escapes, bidi overrides): the publish file's
    texts are printed."""
    import unicodedata

    return any(unicodedata.category(ch)[0] == "C" for ch in text)


def check_name(name: Any, where: str = "--name") -> str:
    """name when it is a folder name a pull may install as (letters, digits, '.', '_', '-'; no leading dot)."""
    if not _name_ok(name):
        raise ConfigError(f"{where} {str(name)[:120]!r} is not a plain folder name (letters, digits, '.', '_' "
                          f"and '-', at most 100, not starting with '.'); give another with --name")
    return name


# the publish file ---------------------------------------------------------------------------------------

@dataclass
class PublishFile:
    """provenance-guard-bundle.json: what a host serves beside the bundle's files.

    ``files`` maps every file of the bundle (manifest.json included, the publish file itself not) to its
    ``{"size": bytes, "sha256": hex}``; ``name`` is the folder a pull installs it as by default."""

    name: str
    bundle_id: str
    bundle_version: str
    files: dict[str, dict[str, Any]]
    description: str = ""
    model: str = ""
    count: int = 0
    published_at: str = ""
    tool: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())

    def to_json(self) -> dict[str, Any]:
        return {"format": PUBLISH_FORMAT, "format_version": PUBLISH_FORMAT_VERSION, "name": self.name,
                "bundle": {"id": self.bundle_id, "version": self.bundle_version, "description": self.description},
                "model": self.model, "count": self.count, "total_bytes": self.total_bytes,
                "files": self.files, "published_at": self.published_at, "tool": self.tool}

    @classmethod
    def parse(cls, data: bytes, where: str,  # noqa: C901 - a strict validator: one check per field, in order
              policy: PullPolicy = PullPolicy()) -> PublishFile:
        """Strict parse of a publish file's bytes; PublishFileError naming the first problem."""
        def bad(problem: str) -> PublishFileError:
            return PublishFileError(f"{where}: {problem}; refused before anything was downloaded (ask the "
                                    f"publisher to run 'provenance-guard index publish' again)")

        if len(data) > policy.max_publish_bytes:
            raise bad(f"over {policy.max_publish_bytes:,} bytes, far more than any publish file")

        def pairs(items):
            out = {}
            for k, v in items:
                if k in out:
                    raise ValueError(f"key {k!r} appears twice")
                out[k] = v
            return out

        def constant(name):
            raise ValueError(f"{name} is not JSON")

        try:
            raw = json.loads(data.decode("utf-8-sig"), object_pairs_hook=pairs, parse_constant=constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise bad(f"not a JSON publish file ({str(exc)[:200]})") from None
        if not isinstance(raw, dict) or raw.get("format") != PUBLISH_FORMAT:
            raise bad(f"not a provenance-guard publish file (no \"format\": \"{PUBLISH_FORMAT}\")")
        if raw.get("format_version") != PUBLISH_FORMAT_VERSION:
            raise PublishFileError(f"{where}: publish format version {raw.get('format_version')!r} is not known to "
                                   f"this release, which reads version {PUBLISH_FORMAT_VERSION}; upgrade "
                                   f"provenance-guard (pip install -U provenance-guard)")

        def text(value: Any, key: str, limit: int = 4096, required: bool = True) -> str:
            if value is None and not required:
                return ""
            if not isinstance(value, str) or len(value) > limit or (required and not value) or _controls(value):
                raise bad(f"\"{key}\" is {str(value)[:80]!r}, not a text of at most {limit} characters without "
                          f"control characters")
            return value

        bundle = raw.get("bundle")
        if not isinstance(bundle, dict):
            raise bad("\"bundle\" is missing or not an object")
        files = raw.get("files")
        if not isinstance(files, dict) or not files:
            raise bad("\"files\" is missing, empty or not an object")
        if len(files) > policy.max_files:
            raise bad(f"it lists {len(files):,} files; a bundle has at most {policy.max_files}")
        checked: dict[str, dict[str, Any]] = {}
        folded: set[str] = set()
        for fname, info in files.items():
            try:
                check_file_name(fname, where)
            except ManifestError:
                raise bad(f"file name {str(fname)[:200]!r} is not a plain file name inside the bundle folder "
                          f"(no folders, no '..', no absolute paths)") from None
            if _controls(fname):
                raise bad(f"file name {fname[:200]!r} holds control characters")
            if fname.lower() in folded:
                raise bad(f"file name {fname!r} differs from another only in case")
            folded.add(fname.lower())
            if fname == PUBLISH_FILE or fname.endswith(".part"):
                raise bad(f"file name {fname!r} is reserved")
            if not isinstance(info, dict):
                raise bad(f"files.{fname} is not an object")
            size, digest = info.get("size"), info.get("sha256")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_FILE_BYTES:
                raise bad(f"files.{fname}.size is {str(size)[:40]!r}, not a byte count")
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise bad(f"files.{fname}.sha256 is {str(digest)[:80]!r}, not 64 lower-case hex digits")
            checked[fname] = {"size": size, "sha256": digest}
        if MANIFEST not in checked:
            raise bad(f"it does not list {MANIFEST}")
        if checked[MANIFEST]["size"] > MAX_MANIFEST_BYTES:
            raise bad(f"its {MANIFEST} is listed at {checked[MANIFEST]['size']:,} bytes, larger than any manifest")
        total = raw.get("total_bytes")
        if total is not None and total != sum(f["size"] for f in checked.values()):
            raise bad(f"\"total_bytes\" {str(total)[:40]} is not the sum of the files' sizes")
        count = raw.get("count", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise bad(f"\"count\" is {str(count)[:40]!r}, not a row count")
        name = raw.get("name")
        if not _name_ok(name):
            raise bad(f"\"name\" {str(name)[:120]!r} is not a plain folder name (letters, digits, '.', '_' and '-', "
                      f"not starting with '.')")
        return cls(name=name, bundle_id=text(bundle.get("id"), "bundle.id", 512),
                   bundle_version=text(bundle.get("version"), "bundle.version", 512),
                   description=text(bundle.get("description"), "bundle.description", required=False),
                   model=text(raw.get("model"), "model", 1024, required=False), count=count, files=checked,
                   published_at=text(raw.get("published_at"), "published_at", 64, required=False),
                   tool=text(raw.get("tool"), "tool", 256, required=False))

    def order(self) -> list[str]:
        """Download order: the manifest first (it is checked against this listing before anything large)."""
        return [MANIFEST] + sorted((n for n in self.files if n != MANIFEST), key=lambda n: (self.files[n]["size"], n))


# publishing --------------------------------------------------------------------------------------------

@dataclass
class PublishReport:
    folder: Path
    publish_file: Path
    listing: PublishFile

    def lines(self) -> list[str]:
        from .bundle.writer import human

        m = self.listing
        names = ", ".join(sorted(m.files)) + f", {PUBLISH_FILE}"
        return [
            (f"wrote {self.publish_file}: bundle {m.bundle_id} version {m.bundle_version}, {len(m.files)} files, "
             f"{human(m.total_bytes)}; pulls install it as models/provenance/{m.name}"),
            (f"to serve it, upload the folder {self.folder} as it is ({names}) to any static HTTP(S) host that "
             f"serves files by name (Range requests let interrupted pulls resume), so that "
             f"https://HOST/PATH/{PUBLISH_FILE} is reachable; users then run:"),
            "  provenance-guard index pull https://HOST/PATH/",
            "or to a Hugging Face dataset repository:",
            f"  hf upload OWNER/NAME {self.folder} . --repo-type dataset",
            "  provenance-guard index pull hf://datasets/OWNER/NAME",
            ("run 'provenance-guard index publish' again after every change to the bundle (remove, append, "
             "captions, fingerprint, calibrate): a pull refuses files that no longer match this list"),
        ]


def publish_bundle(folder: str | Path, name: str | None = None, wait: bool = True) -> PublishReport:
    """Write folder/provenance-bundle.json: every file of the bundle with its size and sha256, computed here
    and checked against the sizes and sha256 the bundle's manifest records. A folder that does not open as a
    bundle, or whose files differ from its manifest, is refused."""
    from .bundle import Bundle, BundleLock

    folder = Path(folder).expanduser()
    try:
        read_manifest(folder)  # before the lock, which would create a missing folder's parent
    except BundleError as exc:
        raise BundleError(f"{folder} is not a bundle that can be published: {exc}") from exc
    name = check_name(name if name is not None else folder.resolve().name,
                      "--name" if name is not None else f"the folder name of {folder} (give --name)")
    with BundleLock(folder, "index publish", wait=wait):
        try:
            bundle = Bundle.open(folder)
        except BundleError as exc:
            raise BundleError(f"{folder} is not a bundle that can be published: {exc}") from exc
        try:
            manifest = bundle.manifest
        finally:
            bundle.close()
        if PUBLISH_FILE in manifest.files:
            raise PublishFileError(f"{folder}: its manifest lists a file named {PUBLISH_FILE}, which the publish "
                                   f"file needs; rebuild the bundle")
        files: dict[str, dict[str, Any]] = {}
        for fname in [MANIFEST] + sorted(manifest.files):
            path = folder / fname
            size, digest = path.stat().st_size, sha256_file(path)
            recorded = manifest.files.get(fname)
            if recorded is not None and (recorded.get("size") != size or
                                         (recorded.get("sha256") and recorded.get("sha256") != digest)):
                raise BundleError(f"{path} differs from what the manifest records (size {size:,} vs "
                                  f"{recorded.get('size')!r}, or sha256): bundle {folder} is damaged; restore it "
                                  f"('provenance-guard index verify {folder}' lists what differs) before publishing")
            files[fname] = {"size": size, "sha256": digest}
        if len(files) > MAX_FILES:
            raise PublishFileError(f"{folder}: {len(files)} files, more than a pull accepts ({MAX_FILES})")
        listing = PublishFile(name=name, bundle_id=manifest.bundle_id, bundle_version=manifest.bundle_version,
                              description=manifest.description, model=manifest.model, count=manifest.count,
                              files=files, published_at=utc_now(), tool=f"provenance-guard {_version()}")
        out = folder / PUBLISH_FILE
        tmp = folder / (PUBLISH_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(listing.to_json(), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    return PublishReport(folder=folder, publish_file=out, listing=listing)


def _version() -> str:
    from .. import __version__

    return __version__


# HTTP ---------------------------------------------------------------------------------------------------

@dataclass
class _Reply:
    response: Any
    url: str
    expired: threading.Event


def _network_problem(exc: BaseException, expired: threading.Event) -> str:
    """A network failure in a few words: the innermost reason requests and urllib3 wrap."""
    import requests

    if expired.is_set():
        return "the transfer took longer than its deadline"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "no connection within the connect timeout"
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return "the server stopped answering (read timeout)"
    reason: BaseException = exc
    for _ in range(5):
        inner = getattr(reason, "reason", None)
        if not isinstance(inner, BaseException) and reason.args and isinstance(reason.args[0], BaseException):
            inner = reason.args[0]
        if not isinstance(inner, BaseException):
            break
        reason = inner
    if "NameResolution" in type(reason).__name__ or isinstance(reason, socket.gaierror):
        return "the host name could not be resolved"
    text = str(reason)
    if "Failed to establish a new connection: " in text:
        text = text.split("Failed to establish a new connection: ", 1)[1].rstrip("\"')")
    return (text or type(reason).__name__)[:200]


@contextmanager
def _request(source: Source, url: str, headers: dict[str, str], policy: PullPolicy, seconds: float,
             what: str) -> Iterator[_Reply]:
    """GET url (streamed), redirects followed by hand, the whole transfer bounded by ``seconds``."""
    import requests

    from .fetch import FetchPolicy, deadline_session

    auth, origin = source.auth()
    with deadline_session(FetchPolicy(), seconds, any_address=True) as (session, expired):
        for _ in range(policy.max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise DownloadError(f"{what}: the server redirected to {url[:200]!r}, which is not an http(s) URL")
            send = {"Accept-Encoding": "identity", **headers}
            if auth and _origin(url) == origin:  # the Hub token goes to the Hub only, never along a redirect
                send = {**auth, **send}
            try:
                resp = session.get(url, headers=send, stream=True, allow_redirects=False,
                                   timeout=(policy.connect_timeout, policy.read_timeout))
            except (requests.RequestException, OSError) as exc:
                raise DownloadError(f"{what}: {source.display} could not be reached "
                                    f"({_network_problem(exc, expired)}); check the URL and the network, then run "
                                    f"again") from None
            if resp.is_redirect and resp.headers.get("location"):
                resp.close()
                url = urljoin(url, resp.headers["location"])
                continue
            try:
                yield _Reply(resp, url, expired)
            finally:
                resp.close()
            return
        raise DownloadError(f"{what}: more than {policy.max_redirects} redirects from {source.display}")


def _http_error(status: int, what: str, source: Source) -> DownloadError:
    hint = {404: "it is not there: check the URL, and that the whole folder was uploaded",
            401: "the server wants a login" + (": run 'hf auth login' (or set HF_TOKEN) for a private or gated "
                                                "dataset" if source.kind == "hf" else ""),
            403: "the server refused it" + (": accept the dataset's terms on its page, or log in with "
                                             "'hf auth login'" if source.kind == "hf" else "")}.get(
        status, "try again later" if status >= 500 else "check the URL")
    return DownloadError(f"{what}: {source.display} answered HTTP {status}; {hint}")


def fetch_publish_file(source: Source, policy: PullPolicy = PullPolicy()) -> PublishFile:
    """The publish file at source, read up to its cap and parsed strictly."""
    import requests

    what = f"the publish file {source.publish_name}"
    with _request(source, source.url(source.publish_name), {}, policy, policy.deadline(policy.max_publish_bytes),
                  what) as reply:
        resp = reply.response
        if resp.status_code != 200:
            raise _http_error(resp.status_code, what, source)
        length = resp.headers.get("content-length", "")
        if length.isdigit() and int(length) > policy.max_publish_bytes:
            raise PublishFileError(f"{source.display}: {source.publish_name} is {int(length):,} bytes, more than "
                                   f"any publish file ({policy.max_publish_bytes:,}); refused")
        body = bytearray()
        try:
            for chunk in resp.iter_content(CHUNK):
                body += chunk
                if len(body) > policy.max_publish_bytes:
                    raise PublishFileError(f"{source.display}: {source.publish_name} is more than "
                                           f"{policy.max_publish_bytes:,} bytes, more than any publish file; "
                                           f"refused")
        except (requests.RequestException, OSError) as exc:
            raise DownloadError(f"{what}: the transfer from {source.display} was cut off "
                                f"({_network_problem(exc, reply.expired)}); run again") from None
    return PublishFile.parse(bytes(body), f"{source.display} {source.publish_name}", policy)


# progress -----------------------------------------------------------------------------------------------

class _Progress:
    """Bytes fetched of the whole pull: a tqdm bar on a terminal, else a plain line every 10 s or 10%; and
    the caller's on_progress(done, total) (what a host's message shows)."""

    def __init__(self, total: int, done: int, label: str, show: bool,
                 on_progress: Callable[[int, int], None] | None):
        self.total, self.done, self.label, self.on_progress = total, done, label, on_progress
        self.bar = None
        self.plain = False
        self.last_time, self.last_step = time.monotonic(), -1
        if show:
            if sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                                desc=label, file=sys.stderr, leave=False)
            else:
                self.plain = True
                self.last_step = self._step()
        self._report()

    def _step(self) -> int:
        return int(10 * self.done / self.total) if self.total else 10

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            if n < 0:
                self.bar.reset(total=self.total)
                self.bar.update(self.done)
            else:
                self.bar.update(n)
        elif self.plain:
            now = time.monotonic()
            if now - self.last_time >= 10.0 or self._step() > self.last_step:
                from .bundle.writer import human

                self.last_time, self.last_step = now, self._step()
                pct = 100.0 * self.done / self.total if self.total else 100.0
                print(f"provenance-guard: {self.label}: {pct:.0f}% ({human(self.done)} of {human(self.total)})",
                      file=sys.stderr, flush=True)
        self._report()

    def _report(self) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(self.done, self.total)
            except Exception:  # noqa: BLE001 - a progress display never stops a download
                pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# pulling ------------------------------------------------------------------------------------------------

@dataclass
class PullReport:
    """What a pull did: ``status`` is "installed", "replaced" or "already installed"."""

    path: Path
    name: str
    bundle_id: str
    bundle_version: str
    status: str
    files: int
    total_bytes: int
    downloaded: int = 0
    kept: int = 0
    seconds: float = 0.0
    source: str = ""

    def lines(self) -> list[str]:
        from .bundle.writer import human

        if self.status == "already installed":
            head = (f"{self.path} already holds bundle {self.bundle_id} version {self.bundle_version} from "
                    f"{self.source} (the same manifest): nothing downloaded")
        else:
            kept = f", {human(self.kept)} kept from an interrupted run" if self.kept else ""
            head = (f"{self.status} {self.path}: bundle {self.bundle_id} version {self.bundle_version}, "
                    f"{self.files} files, {human(self.total_bytes)} ({human(self.downloaded)} downloaded{kept}) "
                    f"in {self.seconds:.1f} s, every file's sha256 verified")
        return [head, f"use it: provenance-guard check IMAGES --index {self.path}"]


def _free_bytes(folder: Path) -> int:
    """Free bytes on folder's disk (a function of its own, so tests can fill the disk)."""
    return shutil.disk_usage(folder).free


def _write(f, data: bytes) -> None:
    """One write of downloaded bytes (a function of its own, so tests can make it fail as a full disk)."""
    f.write(data)


def _disk_full(folder: Path, need: int, what: str) -> DiskFullError:
    from .bundle.writer import human

    try:
        free = human(_free_bytes(folder))
    except OSError:
        free = "?"
    return DiskFullError(f"the disk holding {folder} is full ({free} free) while {what}; the pull needs about "
                         f"{human(need)} more there: free space and run the same command again (what was "
                         f"downloaded so far is kept, and the pull resumes from it)")


def _is_disk_full(exc: BaseException) -> bool:
    from .bundle.writer import is_disk_full

    return is_disk_full(exc)


def _read_json(path: Path, limit: int) -> dict | None:
    try:
        if path.stat().st_size > limit:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _hash_prefix(path: Path) -> tuple[hashlib._Hash, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            n += len(block)
    return h, n


def source_record(folder: Path, name: str) -> Path:
    """Where a pulled bundle's origin is recorded: beside it, .NAME.source.json."""
    return folder / f".{name}.source.json"


def installed_from(source: Source, folder: str | Path, limit: int = 2000) -> Path | None:
    """The bundle folder under folder that an earlier pull installed from source (found by the records
    pulls leave beside their bundles; no network), or None."""
    folder = Path(folder).expanduser()
    try:
        entries = list(itertools.islice(os.scandir(folder), limit))
    except OSError:
        return None
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".source.json")):
            continue
        record = _read_json(Path(entry.path), MAX_RECORD_BYTES)
        if not record or record.get("source") != source.canonical:
            continue
        name = record.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or entry.name != f".{name}.source.json":
            continue
        if (folder / name / MANIFEST).is_file():
            return folder / name
    return None


class _Puller:
    """One pull of one published bundle into to/name, run under the bundle's maintenance lock."""

    def __init__(self, source: Source, listing: PublishFile, to: Path, name: str, policy: PullPolicy):
        self.source, self.listing, self.to, self.name, self.policy = source, listing, to, name, policy
        self.target = to / name
        self.work = to / f".{name}.pull"
        self.staged = self.work / "bundle"
        self.state_path = self.work / "verified.json"
        self.verified: dict[str, dict[str, Any]] = {}
        self.downloaded = 0
        self.lost = 0  # bytes kept from an earlier run that a server ignoring Range made us fetch again

    # what is there already ----------------------------------------------------------------------------
    def installed(self) -> str | None:
        """None when target is free; "same" when it holds this very bundle intact; "damaged" when it holds this
        bundle's manifest with files of other sizes; "other" for another bundle. NotInstallable for a target
        that is no bundle at all (never replaced)."""
        if not os.path.lexists(self.target):
            return None
        manifest = self.target / MANIFEST
        if self.target.is_symlink() or not self.target.is_dir() or not manifest.is_file():
            raise NotInstallable(f"{self.target} exists and is not a bundle folder; move it away, or install with "
                                 f"--name OTHER")
        want = self.listing.files[MANIFEST]
        if manifest.stat().st_size != want["size"] or sha256_file(manifest) != want["sha256"]:
            return "other"
        for fname, info in self.listing.files.items():
            path = self.target / fname
            if not path.is_file() or path.stat().st_size != info["size"]:
                return "damaged"
        return "same"

    def describe_installed(self) -> str:
        try:
            m = read_manifest(self.target)
            return f"bundle {m.bundle_id} version {m.bundle_version}"
        except BundleError:
            return "a bundle that does not open"

    # staging ------------------------------------------------------------------------------------------
    def part(self, fname: str) -> Path:
        return self.work / f"{fname}.{self.listing.files[fname]['sha256'][:16]}.part"

    def prepare(self) -> int:
        """Make the staging folders, keep what an earlier run verified (and still matches this listing),
        drop the rest; returns the bytes already here."""
        self.staged.mkdir(parents=True, exist_ok=True)
        state = _read_json(self.state_path, MAX_PUBLISH_BYTES) or {}
        recorded = state.get("files") if isinstance(state.get("files"), dict) else {}
        keep_parts = {self.part(n).name for n in self.listing.files}
        for entry in list(os.scandir(self.work)):
            if entry.name.endswith(".part") and entry.name not in keep_parts:
                os.unlink(entry.path)
        have = 0
        for entry in list(os.scandir(self.staged)):
            info = self.listing.files.get(entry.name)
            path = Path(entry.path)
            if info is None or not entry.is_file(follow_symlinks=False):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path)
                else:
                    path.unlink()
                continue
            st = path.stat()
            rec = recorded.get(entry.name) if isinstance(recorded.get(entry.name), dict) else {}
            if st.st_size == info["size"] and rec.get("sha256") == info["sha256"] and \
                    rec.get("mtime_ns") == st.st_mtime_ns and rec.get("size") == st.st_size:
                ok = True
            else:
                ok = st.st_size == info["size"] and sha256_file(path) == info["sha256"]
            if ok:
                self.verified[entry.name] = {"size": st.st_size, "sha256": info["sha256"], "mtime_ns": st.st_mtime_ns}
                have += st.st_size
            else:
                path.unlink()
        for fname, info in self.listing.files.items():
            part = self.part(fname)
            if fname not in self.verified and part.is_file():
                size = part.stat().st_size
                if size > info["size"]:
                    part.unlink()
                else:
                    have += size
        self.save_state()
        return have

    def save_state(self) -> None:
        _write_json(self.state_path, {"source": self.source.canonical, "files": self.verified})

    # one file -----------------------------------------------------------------------------------------
    def fetch(self, fname: str, progress: _Progress) -> None:
        """Download fname into its part file (resuming it), verify its sha256, move it into the staged
        bundle."""
        info = self.listing.files[fname]
        size, want = info["size"], info["sha256"]
        part = self.part(fname)
        if part.is_file():
            hasher, offset = _hash_prefix(part)
        else:
            hasher, offset = hashlib.sha256(), 0
        restarted = False
        while offset < size:
            status = self._transfer(fname, part, size, offset, hasher, progress, allow_restart=not restarted)
            if status == "restart":  # the server refused the Range: the whole file again
                restarted = True
                progress.update(-offset)
                self.lost += offset
                part.unlink(missing_ok=True)
                hasher, offset = hashlib.sha256(), 0
                continue
            hasher, offset = status
        if offset == 0 and size == 0:
            part.touch()
        digest = hasher.hexdigest()
        if digest != want:
            part.unlink(missing_ok=True)
            raise ChecksumError(f"{fname} from {self.source.display} has sha256 {digest}, not the {want} its publish "
                                f"file lists; the file was deleted and nothing was installed. Run the same command "
                                f"again; if it fails again the publisher's copy is corrupt (they should run "
                                f"'provenance-guard index verify' and 'index publish' and upload again)")
        dest = self.staged / fname
        try:
            with open(part, "rb") as f:
                os.fsync(f.fileno())
            os.replace(part, dest)
        except OSError as exc:
            if _is_disk_full(exc):
                raise _disk_full(self.to, 0, f"finishing {fname}") from None
            raise
        st = dest.stat()
        self.verified[fname] = {"size": st.st_size, "sha256": want, "mtime_ns": st.st_mtime_ns}
        self.save_state()

    def _transfer(self, fname: str, part: Path, size: int, offset: int,  # noqa: C901 - one HTTP exchange's cases
                  hasher, progress: _Progress, allow_restart: bool):
        """One request for fname's bytes from offset; returns (hasher, new offset) or "restart"."""
        import requests

        what = f"{fname} ({offset:,} of {size:,} bytes here)" if offset else fname
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with _request(self.source, self.source.url(fname), headers, self.policy,
                      self.policy.deadline(size - offset), what) as reply:
            resp = reply.response
            if offset and resp.status_code == 200:  # Range ignored: the body is the whole file, from byte 0
                log.info("provenance-guard: %s ignores Range requests; %s starts again", self.source.display, fname)
                part.unlink(missing_ok=True)
                progress.update(-offset)
                self.lost += offset
                hasher, offset = hashlib.sha256(), 0
            elif offset and resp.status_code == 416:
                if not allow_restart:
                    raise _http_error(416, fname, self.source)
                return "restart"
            elif resp.status_code not in ((206,) if offset else (200,)):
                raise _http_error(resp.status_code, fname, self.source)
            if offset:
                got = _content_range(resp.headers.get("content-range", ""))
                if got is None or got[0] != offset or (got[1] is not None and got[1] != size):
                    raise DownloadError(f"{fname}: {self.source.display} answered the resume request with "
                                        f"Content-Range {resp.headers.get('content-range', '')[:80]!r}, not bytes "
                                        f"{offset}-{size - 1}/{size}: its copy is not the one the publish file "
                                        f"lists; ask the publisher to run 'index publish' again")
            left = size - offset
            length = resp.headers.get("content-length", "")
            if length.isdigit() and int(length) > left:
                raise PublishFileError(f"{fname}: {self.source.display} offers {int(length):,} bytes where the publish "
                                       f"file lists {left:,} more; refused (the published copy is not the one "
                                       f"listed: the publisher should run 'index publish' again)")
            try:
                resp.raw.enforce_content_length = False  # a short body is ours to see: its bytes are kept
            except AttributeError:
                pass
            received = 0
            try:
                with open(part, "ab") as f:
                    if f.tell() != offset:
                        raise DownloadError(f"{fname}: the partial file {part} changed during the pull; run again")
                    try:
                        for chunk in resp.iter_content(CHUNK):
                            if not chunk:
                                continue
                            if received + len(chunk) > left:
                                f.close()
                                part.unlink(missing_ok=True)
                                raise PublishFileError(
                                    f"{fname}: {self.source.display} sent more than the {size:,} bytes the publish "
                                    f"file lists; cut off and refused (the published copy is not the one listed: "
                                    f"the publisher should run 'index publish' again)")
                            _write(f, chunk)
                            hasher.update(chunk)
                            received += len(chunk)
                            self.downloaded += len(chunk)
                            progress.update(len(chunk))
                    except (requests.RequestException, ConnectionError, TimeoutError) as exc:
                        f.flush()
                        raise DownloadError(self._cut(fname, offset + received, size,
                                                      _network_problem(exc, reply.expired))) from None
                    except Exception as exc:
                        if type(exc).__module__.startswith("urllib3"):  # a broken stream, as urllib3 says it
                            raise DownloadError(self._cut(fname, offset + received, size,
                                                          _network_problem(exc, reply.expired))) from None
                        raise
            except OSError as exc:
                if _is_disk_full(exc):
                    raise _disk_full(self.to, self.remaining(), f"writing {fname}") from None
                raise PullError(f"{part}: cannot be written ({exc.strerror or exc}); check the folder's "
                                f"permissions and run again") from None
            if received < left:
                raise DownloadError(self._cut(fname, offset + received, size,
                                              "the transfer took longer than its deadline" if reply.expired.is_set()
                                              else "the connection closed early"))
            return hasher, offset + received

    def _cut(self, fname: str, have: int, size: int, why: str) -> str:
        return (f"the download of {fname} from {self.source.display} stopped at {have:,} of {size:,} bytes "
                f"({why}); run the same command again: it resumes where it stopped")

    def remaining(self) -> int:
        left = 0
        for fname, info in self.listing.files.items():
            if fname in self.verified:
                continue
            part = self.part(fname)
            left += info["size"] - (part.stat().st_size if part.is_file() else 0)
        return max(left, 0)

    # the manifest against the listing ---------------------------------------------------------------------
    def check_manifest(self) -> None:
        """The downloaded manifest must be a valid manifest naming exactly the listed files, with their sizes
        and sha256 (before anything large is fetched)."""
        try:
            manifest = read_manifest(self.staged)
        except BundleError as exc:
            self.forget(MANIFEST)
            raise PublishFileError(f"{self.source.display}: its {MANIFEST} is refused: {exc}") from None
        listed = set(self.listing.files) - {MANIFEST}
        named = set(manifest.files)
        problems = []
        if named - listed:
            problems.append(f"the manifest names {', '.join(sorted(named - listed))}, which the publish file does not")
        if listed - named:
            problems.append(f"the publish file lists {', '.join(sorted(listed - named))}, which the manifest does not")
        for fname in sorted(named & listed):
            rec, lst = manifest.files[fname], self.listing.files[fname]
            if rec.get("size") != lst["size"] or (rec.get("sha256") and rec.get("sha256") != lst["sha256"]):
                problems.append(f"{fname}'s size or sha256 differs between the manifest and the publish file")
        if manifest.bundle_id != self.listing.bundle_id or manifest.bundle_version != self.listing.bundle_version:
            problems.append(f"the manifest is bundle {manifest.bundle_id} version {manifest.bundle_version}, the "
                            f"publish file says {self.listing.bundle_id} version {self.listing.bundle_version}")
        if problems:
            self.forget(MANIFEST)
            raise PublishFileError(f"{self.source.display}: " + "; ".join(problems) + "; nothing was installed (the "
                                   "publish file is stale: the publisher should run 'index publish' again)")

    def forget(self, fname: str) -> None:
        (self.staged / fname).unlink(missing_ok=True)
        self.verified.pop(fname, None)
        self.save_state()

    def validate(self) -> tuple[str, str]:
        """Open the staged bundle with the normal reader: what a check would open must open."""
        from .bundle import Bundle

        try:
            bundle = Bundle.open(self.staged)
        except BundleError as exc:
            shutil.rmtree(self.work, ignore_errors=True)
            raise PullError(f"the bundle from {self.source.display} matches its publish file but does not open "
                            f"({exc}); nothing was installed: the publisher's copy is broken") from None
        try:
            return bundle.id, bundle.version
        finally:
            bundle.close()

    def record(self) -> None:
        try:
            _write_json(source_record(self.to, self.name),
                        {"source": self.source.canonical, "name": self.name, "bundle_id": self.listing.bundle_id,
                         "bundle_version": self.listing.bundle_version,
                         "manifest_sha256": self.listing.files[MANIFEST]["sha256"], "pulled_at": utc_now()})
        except OSError as exc:  # the bundle is installed; only the host's shortcut is missing
            log.warning("provenance-guard: could not record where %s came from (%s)", self.target, exc)


def _content_range(value: str) -> tuple[int, int | None] | None:
    """(first byte, total or None) of a Content-Range header 'bytes A-B/N'; None when it is not one."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m:
        return None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def pull(url: str, to: str | Path | None = None, name: str | None = None, *, replace: bool = False,
         progress: bool = True, on_progress: Callable[[int, int], None] | None = None, wait: bool = True,
         policy: PullPolicy = PullPolicy()) -> PullReport:
    """Download the bundle published at url into to/NAME (to: ./models/provenance by default; NAME: the
    publish file's, or name), resumable and verified, installed in one rename. An intact copy of the same
    bundle there is "already installed"; another bundle is replaced only with replace=True (atomically).
    Every failure is one PullError or DiskFullError (a ProvenanceError) whose message says what to do."""
    start = time.monotonic()
    source = parse_source(url)
    to = Path(to if to is not None else DEFAULT_DIR).expanduser()
    listing = fetch_publish_file(source, policy)
    name = check_name(name) if name is not None else listing.name
    job = _Puller(source, listing, to, name, policy)
    try:
        to.mkdir(parents=True, exist_ok=True)
        status, kept = _install(job, replace, progress, on_progress, wait)
    except OSError as exc:  # the local side: a folder that cannot be written, a disk that filled up
        if _is_disk_full(exc):
            raise _disk_full(to, job.remaining() if job.work.exists() else listing.total_bytes,
                             f"pulling {name}") from None
        raise PullError(f"{exc.filename or to}: {exc.strerror or exc}; check that {to} can be written (or pull into "
                        f"another folder with --to) and run again: what was downloaded so far is kept") from None
    return PullReport(path=job.target, name=name, bundle_id=listing.bundle_id, bundle_version=listing.bundle_version,
                      status=status, files=len(listing.files), total_bytes=listing.total_bytes,
                      downloaded=job.downloaded, kept=kept, seconds=time.monotonic() - start, source=source.display)


def _install(job: _Puller, replace: bool, progress: bool, on_progress: Callable[[int, int], None] | None,
             wait: bool) -> tuple[str, int]:
    """Under the bundle's lock: (status, bytes kept from earlier runs) of downloading, verifying, opening and
    installing job's bundle."""
    from .bundle import BundleLock
    from .bundle.writer import human, publish

    listing, to, name = job.listing, job.to, job.name
    with BundleLock(job.target, "index pull", wait=wait):
        there = job.installed()
        if there == "same":
            shutil.rmtree(job.work, ignore_errors=True)  # what a run killed after its install left
            job.record()
            return "already installed", 0
        if there is not None and not replace:
            what = ("holds the same bundle with files of other sizes (damaged)" if there == "damaged"
                    else f"holds another bundle ({job.describe_installed()})")
            raise NotInstallable(f"{job.target} {what}; pass --replace to replace it with bundle "
                                 f"{listing.bundle_id} version {listing.bundle_version}, or --name OTHER to install "
                                 f"beside it")
        kept = job.prepare()
        need = job.remaining()
        free = _free_bytes(to)
        if need + (1 << 20) > free:
            raise DiskFullError(f"pulling {name} needs {human(need)} more free in {to}, which has {human(free)}; "
                                f"free space there (or pull into another folder with --to) and run again"
                                + (" (what was downloaded so far is kept)" if kept else ""))
        if progress:
            print(f"provenance-guard: pulling {name} (bundle {listing.bundle_id} version {listing.bundle_version}, "
                  f"{len(listing.files)} files, {human(listing.total_bytes)}) from {job.source.display} into "
                  f"{job.target}" + (f"; {human(kept)} already here from an interrupted run" if kept else ""),
                  file=sys.stderr, flush=True)
        bar = _Progress(listing.total_bytes, kept, f"pulling {name}", progress, on_progress)
        try:
            for fname in listing.order():
                if fname not in job.verified:
                    job.fetch(fname, bar)
                if fname == MANIFEST:
                    job.check_manifest()
        finally:
            bar.close()
        job.validate()
        publish(job.staged, job.target)
        shutil.rmtree(job.work, ignore_errors=True)
        job.record()
    return ("replaced" if there is not None else "installed"), max(0, kept - job.lost)


# hosts: a bundle URL pulled once, in the background --------------------------------------------------------

@dataclass
class _Job:
    source: Source
    to: Path
    thread: threading.Thread | None = None
    done: int = 0
    total: int = 0
    path: str | None = None
    error: str | None = None
    failed_at: float = 0.0
    finished: threading.Event = field(default_factory=threading.Event)


_JOBS: dict[tuple[str, str], _Job] = {}
_JOBS_LOCK = threading.Lock()
RETRY_AFTER = 60.0


def bundle_from_url(url: str, to: str | Path, retry_after: float = RETRY_AFTER) -> str:
    """For a host's "bundle URL" field: the folder of the bundle published at url, installed under to.

    Pulled once: the first call starts a pull in a background thread (a pull can take minutes; the host's UI
    never waits for it) and raises BundleNotReady ("bundle downloading from URL: 35% ...") until it is
    done; later calls, in this process or after a restart, find the installed bundle without the network
    (the record pulls leave beside it). A failed pull is said in the same way and tried again after
    retry_after seconds. Every failure is a ConfigError: the host's fail mode decides, never a silent pass."""
    try:
        source = parse_source(url)
    except ConfigError as exc:
        raise BundleNotReady(str(exc)) from None
    to = Path(to).expanduser()
    key = (source.canonical, os.path.abspath(to))
    with _JOBS_LOCK:
        job = _JOBS.get(key)
        if job is not None and job.path is not None:
            if os.path.isfile(os.path.join(job.path, MANIFEST)):
                return job.path
            job = None  # the folder was removed since: pull again
        if job is None or (job.error is not None and time.monotonic() - job.failed_at >= retry_after):
            found = installed_from(source, to)
            if found is not None:
                _JOBS[key] = _Job(source=source, to=to, path=str(found))
                _JOBS[key].finished.set()
                return str(found)
            job = _JOBS[key] = _Job(source=source, to=to)
            job.thread = threading.Thread(target=_run_job, args=(job,), name="provenance-guard-pull", daemon=True)
            log.warning("provenance-guard: downloading the bundle published at %s into %s (once; checks fail under "
                        "the fail mode until it is done)", source.display, to)
            job.thread.start()
        if job.path is not None:
            return job.path
        if job.error is not None:
            wait = max(0.0, retry_after - (time.monotonic() - job.failed_at))
            when = "at the next check" if wait <= 0 else f"at the first check after {wait:.0f} s"
            raise BundleNotReady(f"the bundle at {source.display} could not be downloaded: {job.error}; it is tried "
                                 f"again {when}")
        done, total = job.done, job.total
        if total and done >= total:  # every byte is here: installed already, or being opened and renamed
            found = installed_from(source, to)
            if found is not None:
                job.path = str(found)
                return job.path
    pct = f"{100.0 * done / total:.0f}%" if total else "starting"
    raise BundleNotReady(f"bundle downloading from {source.display}: {pct} — the check runs when it finishes")


def _run_job(job: _Job) -> None:
    def on_progress(done: int, total: int) -> None:
        job.done, job.total = done, total

    try:
        report = pull(job.source.canonical, job.to, progress=False, on_progress=on_progress)
    except BaseException as exc:  # noqa: BLE001 - a background thread: everything becomes the job's message
        message = str(exc) if isinstance(exc, Exception) and str(exc) else type(exc).__name__
        log.warning("provenance-guard: the bundle at %s could not be downloaded: %s", job.source.display, message)
        with _JOBS_LOCK:
            job.error, job.failed_at = message, time.monotonic()
        job.finished.set()
        return
    log.warning("provenance-guard: %s", report.lines()[0])
    with _JOBS_LOCK:
        job.path = str(report.path)
    job.finished.set()


def join_pulls(timeout: float | None = None) -> bool:
    """Wait for the background pulls started so far (tests, a clean shutdown); True when all finished."""
    with _JOBS_LOCK:
        jobs = list(_JOBS.values())
    deadline = None if timeout is None else time.monotonic() + timeout
    for job in jobs:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not job.finished.wait(left):
            return False
    return True

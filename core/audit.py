"""The append-only audit log: one JSON line per check (image sha256, time, user and host, bundle id and
version, thresholds, verdict, top match), for a studio to show what was checked before publishing.

Lines are only ever appended: the file is opened with O_APPEND, each line goes out in one write() under an
exclusive flock, so concurrent writers (several gates, the server's workers) never interleave or rewrite.
Lines are chained: each carries ``prev``, the sha256 of the line before it (the first, 64 zeros), so editing,
removing or inserting a line breaks the chain from there on; ``verify`` (``provenance-guard audit verify``)
finds the first broken line. Cutting lines off the end leaves a valid chain: record the last line's hash
that verify prints somewhere else (a ticket, a commit) to detect that too.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from .result import CheckResult

ENV_AUDIT_LOG = "PROVENANCE_GUARD_AUDIT_LOG"
AUDIT_SCHEMA = "provenance-guard/audit"
GENESIS = "0" * 64
MAX_LINE_BYTES = 1 << 20


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def audit_entry(result: CheckResult, image_sha256: Optional[str] = None, source: Optional[str] = None,
                user: Optional[str] = None) -> dict:
    top = result.top
    return {
        "schema": AUDIT_SCHEMA, "schema_version": 1,
        "time": result.checked_at, "user": user or _user(), "host": socket.gethostname(),
        "image_sha256": image_sha256 or result.image.get("sha256"),
        "pixels_sha256": result.image.get("pixels_sha256"), "source": source or result.image.get("source"),
        "bundles": [{"id": t.bundle_id, "version": t.bundle_version, "warn": t.warn, "block": t.block}
                    for t in result.thresholds],
        "model": result.model, "fail_mode": result.fail_mode, "verdict": result.verdict,
        "max_score": result.max_score, "error": result.error,
        "top_match": ({"bundle": top.bundle_id, "row_id": top.row_id, "score": round(top.score, 6), "url": top.url}
                      if top else None),
        "tool_version": result.tool_version,
    }


class AuditLog:
    """Appends entries to a JSON Lines file; safe across threads and processes."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, entries: list[dict]) -> None:
        if not entries:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX)
            except ImportError:  # Windows: O_APPEND alone
                pass
            prev = _last_line_hash(fd)
            lines = []
            for entry in entries:
                line = json.dumps({**entry, "prev": prev}, ensure_ascii=False, separators=(",", ":")).encode()
                prev = hashlib.sha256(line).hexdigest()
                lines.append(line + b"\n")
            data = b"".join(lines)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)


def _last_line_hash(fd: int) -> str:
    """sha256 of the file's last line (without its newline), or GENESIS for an empty file."""
    size = os.fstat(fd).st_size
    if size == 0:
        return GENESIS
    end = size
    if os.pread(fd, 1, size - 1) == b"\n":
        end -= 1
    start, block = end, 64 << 10
    while start > 0:
        step = min(block, start)
        chunk = os.pread(fd, step, start - step)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            start = start - step + cut + 1
            break
        start -= step
        if end - start > MAX_LINE_BYTES:
            break
    return hashlib.sha256(os.pread(fd, end - start, start)).hexdigest()


@dataclass
class Verification:
    lines: int = 0
    broken_at: Optional[int] = None  # 1-based line number of the first line that breaks the chain
    problem: str = ""
    last_sha256: str = GENESIS
    unchained: int = 0  # lines at the start written before chaining (cannot be verified)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.broken_at is None


def verify(path: Union[str, Path]) -> Verification:
    """Walk the chain of an audit log; the first line whose ``prev`` is not the hash of the line before it
    (or that is not a JSON entry at all) is where it was changed."""
    result = Verification()
    prev = GENESIS
    chained = False
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw[:-1] if raw.endswith(b"\n") else raw
            result.lines = number
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict):
                result.broken_at, result.problem = number, "not a JSON audit entry"
                return result
            if "prev" not in entry and not chained:
                result.unchained = number  # written before chaining: a prefix that cannot be verified
            elif entry.get("prev") != prev:
                result.broken_at = number
                result.problem = ("its \"prev\" does not match the line before it: this line, or the one before, was "
                                  "changed, removed or inserted")
                return result
            else:
                chained = True
            prev = hashlib.sha256(line).hexdigest()
    result.last_sha256 = prev
    if result.unchained:
        result.notes.append(f"lines 1-{result.unchained} were written before the log was chained and cannot be "
                            f"verified")
    return result


def from_env() -> Optional[AuditLog]:
    path = os.environ.get(ENV_AUDIT_LOG)
    return AuditLog(path) if path else None

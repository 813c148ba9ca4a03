"""The append-only audit log: one JSON line per check (image sha256, time, user and host, bundle id and
version, thresholds, verdict, top match), for a studio to show what was checked before publishing.

Lines are only ever appended: the file is opened with O_APPEND, each line goes out in one write() under an
exclusive flock, so concurrent writers (several gates, the server's workers) never interleave or rewrite.
Lines are chained: each carries ``prev``, the sha256 of the line before it (the first, 64 zeros), so editing,
removing or inserting a line breaks the chain from there on; ``verify`` (``provenance-guard audit verify``)
finds the first broken line. A log must be chained from its first line: one without ``prev`` anywhere
(stripped, or written before chaining) fails unless the caller allows unchained logs, and once any line is
chained every line must be. The last line, and lines cut off the end, are only caught against a hash kept
elsewhere: verify prints the last line's sha256 and compares it with ``expect_last`` when given. A crash
mid-write leaves a torn last line (no newline): the next append closes it with a newline and chains from
the last whole line, and verify reports the torn line as torn, not as tampering. Whoever can rewrite the
whole file can recompute the chain: only the kept hash (or a signature) tells.
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
            prev, torn = _tail(fd)
            lines = [b"\n"] if torn else []  # close a line torn by a crash; the chain skips it
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


def _line_before(fd: int, end: int) -> tuple[int, int]:
    """(start, end) of the line that ends at byte offset end (exclusive, its newline not included)."""
    start, block = end, 64 << 10
    while start > 0:
        step = min(block, start)
        chunk = os.pread(fd, step, start - step)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return start - step + cut + 1, end
        start -= step
        if end - start > MAX_LINE_BYTES:
            break
    return start, end


def _tail(fd: int) -> tuple[str, bool]:
    """(sha256 of the file's last whole line, or GENESIS; whether a torn line without a newline follows it)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return GENESIS, False
    torn = os.pread(fd, 1, size - 1) != b"\n"
    end = size if torn else size - 1
    if torn:  # the torn tail starts after the last newline; the whole line ends at that newline
        start, _ = _line_before(fd, end)
        if start == 0:
            return GENESIS, True
        end = start - 1
    start, end = _line_before(fd, end)
    return hashlib.sha256(os.pread(fd, end - start, start)).hexdigest(), torn


@dataclass
class Verification:
    lines: int = 0
    broken_at: Optional[int] = None  # 1-based line number of the first line that breaks the chain
    problem: str = ""
    last_sha256: str = GENESIS
    unchained: int = 0  # lines at the start without a chain (allowed only with allow_unchained)
    torn: list = field(default_factory=list)  # 1-based numbers of lines torn by a crash mid-write
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.broken_at is None


def verify(path: Union[str, Path], allow_unchained: bool = False, expect_last: Optional[str] = None) -> Verification:
    """Walk the chain of an audit log; the first line whose ``prev`` is not the hash of the line before it
    (or that is not a JSON entry at all) is where it was changed. A log must be chained from its first line:
    a log with no chain at all passes only with allow_unchained, and unchained lines before chained ones
    never do. A line torn by a crash (not JSON, and the next line chains past it, or it ends the file) is
    reported as torn. expect_last: the last whole line's sha256, kept elsewhere."""
    result = Verification()
    prev = GENESIS
    chained = False
    pending_torn: Optional[int] = None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw[:-1] if raw.endswith(b"\n") else raw
            result.lines = number
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict):
                if pending_torn is None:
                    pending_torn = number  # torn if the next line chains past it (or nothing follows)
                    continue
                result.broken_at, result.problem = pending_torn or number, "not a JSON audit entry"
                return result
            if "prev" not in entry:
                if chained or not allow_unchained or pending_torn is not None:
                    result.broken_at = number
                    result.problem = ("it carries no \"prev\": the chain was stripped or the line was inserted (a "
                                      "log must be chained from its first line; --allow-unchained accepts a log "
                                      "written before chaining)")
                    return result
                result.unchained = number
            elif entry.get("prev") != prev:
                result.broken_at = pending_torn or number
                result.problem = ("its \"prev\" does not match the line before it: this line, or the one before, was "
                                  "changed, removed or inserted")
                return result
            else:
                chained = True
                if result.unchained:  # an unchained prefix may only be a log from before chaining
                    result.broken_at = 1
                    result.problem = (f"lines 1-{result.unchained} carry no chain but later lines do: the chain was "
                                      f"stripped from the start")
                    return result
            if pending_torn is not None:
                result.torn.append(pending_torn)
                pending_torn = None
            prev = hashlib.sha256(line).hexdigest()
    if pending_torn is not None:
        result.torn.append(pending_torn)
    result.last_sha256 = prev
    if result.lines and not chained and not result.unchained and not result.torn:
        result.broken_at, result.problem = 1, "no entry"
        return result
    if result.unchained:
        result.notes.append(f"lines 1-{result.unchained} carry no chain (accepted by --allow-unchained) and cannot "
                            f"be verified")
    for number in result.torn:
        result.notes.append(f"line {number} is torn (a write cut off by a crash): not an entry, skipped by the chain")
    if expect_last is not None and expect_last.strip().lower() != prev:
        result.broken_at = result.lines
        result.problem = (f"the last whole line's sha256 is {prev}, not the expected {expect_last.strip()}: the last "
                          f"line was changed, or lines were cut off or added at the end")
    return result


def from_env() -> Optional[AuditLog]:
    path = os.environ.get(ENV_AUDIT_LOG)
    return AuditLog(path) if path else None

"""The append-only audit log: one JSON line per check (image sha256, time, user and host, bundle id and
version, thresholds, verdict, top match), for a studio to show what was checked before publishing.

Lines are only ever appended: the file is opened with O_APPEND, each line goes out in one write() under an
exclusive flock, so concurrent writers (several gates, the server's workers) never interleave or rewrite.
"""
from __future__ import annotations

import getpass
import json
import os
import socket
from pathlib import Path
from typing import Optional, Union

from .result import CheckResult

ENV_AUDIT_LOG = "PROVENANCE_GUARD_AUDIT_LOG"
AUDIT_SCHEMA = "provenance-guard/audit"


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
        data = "".join(json.dumps(e, ensure_ascii=False, separators=(",", ":")) + "\n" for e in entries).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX)
            except ImportError:  # Windows: O_APPEND alone
                pass
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)


def from_env() -> Optional[AuditLog]:
    path = os.environ.get(ENV_AUDIT_LOG)
    return AuditLog(path) if path else None

"""The append-only audit log: one JSON line per check (image sha256, time, user and host, bundle id and
version, thresholds, verdict, top match), for a studio to show what was checked before publishing.

Lines are only ever appended: the file is opened with O_APPEND, each line goes out in one write() under an
exclusive flock, so concurrent writers (several gates, the server's workers) never interleave or rewrite.
Lines are chained: each carries ``prev``, the sha256 of the line before it (the first, 64 zeros), so editing,
removing or inserting a line breaks the chain from there on; ``verify`` (``provenance-guard audit verify``)
finds the first broken line. A log must be chained from its first line: one without ``prev`` anywhere
(stripped, or written before chaining) fails unless the caller allows unchained logs, and once any line is
chained every line must be (a prefix written before chaining passes only when the caller allows unchained
logs). The last line, and lines cut off the end, are only caught against a hash kept elsewhere: verify
prints the last line's sha256 and compares it with ``expect_last`` when given. A crash mid-write leaves a
torn last line (no newline): the next append closes it with a newline, chains from the last whole entry and
names the torn lines' sha256 in its ``torn`` field, so verify reports them as torn, not as tampering, while
any other line that is no entry breaks the chain. Whoever can rewrite the whole file can recompute the
chain: only the kept hash, or a signature, tells. With a studio signing key (``AuditSigner``: the Content
Credentials key, core/credentials.py) every entry also carries ``signer`` (the sha256 of the signing
certificate) and ``sig``, an ECDSA signature over the entry's line without ``sig``; ``verify`` with that
certificate fails at the first entry that is unsigned, signed by another key, or whose signature does not
hold, so rewriting the log needs the key, not just write access.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
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


def audit_entry(result: CheckResult, image_sha256: str | None = None, source: str | None = None,
                user: str | None = None) -> dict:
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


class AuditSigner:
    """Signs audit lines with a studio key (ECDSA, SHA-256); ``fingerprint`` names its certificate."""

    def __init__(self, key_pem: bytes, cert_pem: bytes):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        self._key = serialization.load_pem_private_key(key_pem, password=None)
        self.fingerprint = cert_fingerprint(x509.load_pem_x509_certificates(cert_pem)[0])

    def sign(self, data: bytes) -> str:
        import base64

        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        return base64.b64encode(self._key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()

    @classmethod
    def from_folder(cls, folder: str | Path) -> AuditSigner:
        """The signer of a credentials folder (signer.pem, signer.key), checked as signing credentials are."""
        from .credentials import load_credentials

        try:
            import cryptography  # noqa: F401
        except ImportError:
            raise ConfigError("signing the audit log needs the cryptography package: pip install "
                              "'provenance-guard[c2pa]'") from None
        creds = load_credentials(folder)
        return cls(creds.key_pem, creds.chain_pem)


def cert_fingerprint(cert) -> str:
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex()


def _line(fields: dict) -> bytes:
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()


class AuditLog:
    """Appends entries to a JSON Lines file; safe across threads and processes. With ``signer`` every entry
    is signed."""

    def __init__(self, path: str | Path, signer: AuditSigner | None = None):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.signer = signer

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
            prev, torn, unclosed = _tail(fd)
            lines = [b"\n"] if unclosed else []  # close a line torn by a crash; the chain skips it, named
            for n, entry in enumerate(entries):
                fields = {**entry, "prev": prev, **({"torn": torn} if torn and n == 0 else {})}
                fields.pop("sig", None)
                if self.signer is not None:
                    fields["signer"] = self.signer.fingerprint
                    fields["sig"] = self.signer.sign(_line(fields))
                line = _line(fields)
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


MAX_TORN = 16  # torn lines after the last entry that an append skips (crashes in a row)


def _is_entry(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _tail(fd: int) -> tuple[str, list, bool]:
    """(sha256 of the file's last whole entry, or GENESIS; the sha256 of each torn line after it, in file
    order; whether the file's last line lacks its newline). Torn lines are lines that are no JSON entry,
    left by crashes mid-write."""
    size = os.fstat(fd).st_size
    if size == 0:
        return GENESIS, [], False
    unclosed = os.pread(fd, 1, size - 1) != b"\n"
    end = size if unclosed else size - 1
    torn: list = []
    while True:
        start, end = _line_before(fd, end)
        line = os.pread(fd, end - start, start)
        if _is_entry(line) or len(torn) >= MAX_TORN:
            return hashlib.sha256(line).hexdigest(), torn[::-1], unclosed
        torn.append(hashlib.sha256(line).hexdigest())
        if start == 0:
            return GENESIS, torn[::-1], unclosed
        end = start - 1


@dataclass
class Verification:
    lines: int = 0
    broken_at: int | None = None  # 1-based line number of the first line that breaks the chain
    problem: str = ""
    last_sha256: str = GENESIS
    unchained: int = 0  # lines at the start without a chain (allowed only with allow_unchained)
    unsigned: int = 0  # lines at the start without a signature (checked with a signer; allow_unchained)
    signed: bool = False  # signatures were checked
    torn: list = field(default_factory=list)  # 1-based numbers of lines torn by a crash mid-write
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.broken_at is None


def _signature_problem(entry: dict, public_key, fingerprint: str) -> str | None:
    """Why entry's signature does not hold for the key, or None."""
    import base64
    import binascii

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    if "sig" not in entry:
        return "it is not signed (the log was written without the studio key, or the signature was stripped)"
    if entry.get("signer") != fingerprint:
        return "it is signed by another key than the given certificate's"
    fields = dict(entry)
    sig = fields.pop("sig")
    try:
        public_key.verify(base64.b64decode(str(sig), validate=True), _line(fields), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        return "its signature does not hold: the line was changed after it was signed"
    return None


def verify(path: str | Path, allow_unchained: bool = False,  # noqa: C901 - one walk, each line's cases in order
           expect_last: str | None = None, signer_cert: bytes | None = None) -> Verification:
    """Walk the chain of an audit log; the first line whose ``prev`` is not the hash of the line before it
    (or that is not a JSON entry at all) is where it was changed. A log must be chained from its first line
    (with allow_unchained, a log with no chain, or an unchained prefix before chained lines, passes with a
    note). A line that is no entry passes only as torn: named by the ``torn`` field of the entry after it,
    or ending the file without a newline (a crash the next append will close). expect_last: the last whole
    line's sha256, kept elsewhere; nothing may follow it."""
    result = Verification()
    prev = GENESIS
    chained = False
    public_key = fingerprint = None
    signed_seen = False
    if signer_cert is not None:
        from cryptography import x509

        try:
            cert = x509.load_pem_x509_certificates(signer_cert)[0]
        except ValueError as exc:
            raise ValueError(f"the signer certificate cannot be read ({exc}); give the studio's signer.pem") from None
        public_key, fingerprint = cert.public_key(), cert_fingerprint(cert)
    pending: list = []  # (line number, sha256) of lines that are no entry, since the last entry
    last_unclosed = False
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw[:-1] if raw.endswith(b"\n") else raw
            last_unclosed = not raw.endswith(b"\n")
            result.lines = number
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict):
                if len(pending) >= MAX_TORN:
                    result.broken_at, result.problem = pending[0][0], "not a JSON audit entry"
                    return result
                pending.append((number, hashlib.sha256(line).hexdigest()))
                continue
            if pending and entry.get("torn") != [h for _, h in pending]:
                result.broken_at, result.problem = pending[0][0], "not a JSON audit entry"
                return result
            if "prev" not in entry:
                if chained or not allow_unchained or pending:
                    result.broken_at = number
                    result.problem = ("it carries no \"prev\": the chain was stripped or the line was inserted (a "
                                      "log must be chained from its first line; --allow-unchained accepts a log "
                                      "written before chaining)")
                    return result
                result.unchained = number
            elif entry.get("prev") != prev:
                result.broken_at = number
                result.problem = ("its \"prev\" does not match the line before it: this line, or the one before, was "
                                  "changed, removed or inserted")
                return result
            else:
                chained = True
            if public_key is not None and not ("prev" not in entry and allow_unchained):
                problem = _signature_problem(entry, public_key, fingerprint)
                if problem and not ({"sig", "signer"} & set(entry)) and allow_unchained and not signed_seen:
                    result.unsigned = number  # a prefix written before the log was signed
                elif problem:
                    result.broken_at, result.problem = number, problem
                    return result
                else:
                    signed_seen = True
            result.torn += [n for n, _ in pending]
            pending = []
            prev = hashlib.sha256(line).hexdigest()
    if pending:
        if not last_unclosed:  # lines after the last entry, each closed: written there, not torn by a crash
            result.broken_at, result.problem = pending[0][0], "not a JSON audit entry"
            return result
        result.torn += [n for n, _ in pending]
    result.last_sha256 = prev
    if result.lines and not chained and not result.unchained and not result.torn:
        result.broken_at, result.problem = 1, "no entry"
        return result
    result.signed = public_key is not None
    if result.unsigned:
        result.notes.append(f"lines 1-{result.unsigned} are not signed (written before the log was signed; "
                            f"accepted by --allow-unchained)")
    if result.unchained:
        result.notes.append(f"lines 1-{result.unchained} carry no chain (accepted by --allow-unchained) and cannot "
                            f"be verified")
    for number in result.torn:
        result.notes.append(f"line {number} is torn (a write cut off by a crash): not an entry, skipped by the chain")
    if expect_last is not None:
        if expect_last.strip().lower() != prev:
            result.broken_at = result.lines
            result.problem = (f"the last whole line's sha256 is {prev}, not the expected {expect_last.strip()}: the "
                              f"last line was changed, or lines were cut off or added at the end")
        elif pending:
            result.broken_at = pending[0][0]
            result.problem = "lines follow the expected last line (torn by a crash, or added)"
    return result


def from_env() -> AuditLog | None:
    """The log $PROVENANCE_GUARD_AUDIT_LOG names, signed with $PROVENANCE_GUARD_CREDENTIALS's key when set."""
    path = os.environ.get(ENV_AUDIT_LOG)
    return AuditLog(path, signer_from_env()) if path else None


def signer_from_env() -> AuditSigner | None:
    from .credentials import ENV_CREDENTIALS

    folder = os.environ.get(ENV_CREDENTIALS, "").strip()
    return AuditSigner.from_folder(folder) if folder else None

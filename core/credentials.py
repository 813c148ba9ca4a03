"""Content Credentials: the provenance record as a signed C2PA manifest inside the image file, written with
c2pa-python (the Content Authenticity Initiative's bindings) and readable by any C2PA tool.

This module owns the keys (``init_credentials`` makes a studio root and a signing leaf; ``load_credentials``
reads a folder holding ``signer.pem`` and ``signer.key``, or takes a signing callback for a KMS/HSM), what
the manifest says (``manifest_for``: the IPTC digital source type trainedAlgorithmicMedia, our check and
generation assertions, schema ``SCHEMA_VERSION``), signing a saved file in place (``sign_file``: the last
write, atomic: a temporary file beside it, then a rename) and reading one back (``verify_file``).

The assertions (version 1):
- ``org.provenance-guard.check``: {schema_version, verdict, max_score, model, bundles: [{id, version,
  manifest_sha256?}], thresholds: [{bundle, warn, block}], matches: [{bundle, row_id, score, verdict,
  verification: {status, method}?}] (top 5), memorization: {score, threshold, verdict}?, checked_at,
  tool_version}
- ``org.provenance-guard.generation``: {schema_version, prompt?, negative_prompt?, seed, sampler, steps,
  cfg, width, height, model, model_hash} (prompts left out with ``include_prompts=False``).

c2pa-python is optional (``pip install 'provenance-guard[c2pa]'``); without it ``unavailable()`` says why
and every surface says once that credentials are off. A blocked or unchecked image is never signed as
passed: its check assertion carries its own verdict.
"""
from __future__ import annotations

import copy
import datetime
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

from .errors import ConfigError, ProvenanceError

ENV_CREDENTIALS = "PROVENANCE_GUARD_CREDENTIALS"
ENV_TSA = "PROVENANCE_GUARD_TSA_URL"  # an RFC 3161 timestamp authority for every signature (off when unset)
CHECK_LABEL = "org.provenance-guard.check"
GENERATION_LABEL = "org.provenance-guard.generation"
SCHEMA_VERSION = 1
SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
ROOT_FILE, SIGNER_FILE, KEY_FILE = "root.pem", "signer.pem", "signer.key"
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
        ".mp4": "video/mp4", ".mov": "video/quicktime"}
MAX_SIGN_BYTES = 256 << 20  # a file larger than this is refused, not read into the signer
MAX_PEM_BYTES = 1 << 20
TOP_MATCHES = 5


class CredentialsError(ProvenanceError):
    """Signing or reading Content Credentials failed; the message says what to do."""


class CredentialsUnavailable(CredentialsError, ConfigError):
    """c2pa-python is not installed (or cannot load here)."""


def unavailable() -> str | None:
    """None when c2pa-python can be used here, else one line saying why and what to install."""
    try:
        import c2pa  # noqa: F401
    except ImportError as exc:
        return (f"Content Credentials are off: c2pa-python is not installed ({exc.name or exc}); pip install "
                f"'provenance-guard[c2pa]' (or c2pa-python) where its wheel exists (glibc 2.28+, macOS, Windows)")
    except OSError as exc:  # the native library does not load on this system
        return f"Content Credentials are off: c2pa-python cannot load its native library here ({exc})"
    return None


def _c2pa():
    reason = unavailable()
    if reason:
        raise CredentialsUnavailable(reason)
    import c2pa

    return c2pa


# keys -----------------------------------------------------------------------------------------------------

@dataclass
class InitReport:
    folder: Path
    root: Path
    signer: Path
    key: Path
    subject: str


def init_credentials(folder: str | Path, organization: str = "provenance-guard studio",
                     days: int = 730, overwrite: bool = False) -> InitReport:
    """A local studio root (``root.pem``, the trust anchor verifiers are given; its key is not kept) and a
    signing leaf (``signer.pem``: leaf then root; ``signer.key``: PKCS#8, mode 0600): ES256 (P-256), key
    usage digitalSignature, extended key usage emailProtection, as C2PA requires of a signer certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder).expanduser()
    organization = " ".join(str(organization).split())[:64] or "provenance-guard studio"
    if not 1 <= days <= 3650:
        raise ConfigError(f"--days {days}: give 1 to 3650")
    existing = [p.name for p in (folder / ROOT_FILE, folder / SIGNER_FILE, folder / KEY_FILE) if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{folder} already holds {', '.join(existing)}; pass --overwrite to make new keys (images "
                          f"signed with the old ones stay valid, but verifiers need the new root.pem)")
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    root_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{organization} root"),
                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)])
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{organization} signer"),
                           x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)])

    def usage(**on: bool) -> x509.KeyUsage:
        flags = dict(digital_signature=False, content_commitment=False, key_encipherment=False,
                     data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                     encipher_only=False, decipher_only=False)
        return x509.KeyUsage(**{**flags, **on})

    root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days + 365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(leaf_name).issuer_name(root_name)
            .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_bytes = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_private(folder / KEY_FILE, key_bytes)
    _write_atomic(folder / SIGNER_FILE, leaf.public_bytes(pem) + root.public_bytes(pem), 0o644)
    _write_atomic(folder / ROOT_FILE, root.public_bytes(pem), 0o644)
    return InitReport(folder, folder / ROOT_FILE, folder / SIGNER_FILE, folder / KEY_FILE,
                      leaf_name.rfc4514_string())


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_private(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o600)


@dataclass
class Credentials:
    """What signs: the certificate chain (leaf first, PEM) and either the private key (PEM) or a callback
    that signs bytes (a KMS/HSM: ``callback(data) -> DER or raw ES256 signature``, as c2pa expects)."""

    chain_pem: bytes
    key_pem: bytes | None = field(default=None, repr=False)
    callback: Callable[[bytes], bytes] | None = None
    alg: str = "es256"
    tsa_url: str | None = None
    source: str = ""
    subject: str = ""

    def signer(self):
        c2pa = _c2pa()
        alg = getattr(c2pa.C2paSigningAlg, self.alg.upper())
        try:
            if self.callback is not None:
                return c2pa.Signer.from_callback(self.callback, alg, self.chain_pem.decode(), self.tsa_url)
            return c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg, self.chain_pem, self.key_pem,
                                                             self.tsa_url.encode() if self.tsa_url else None))
        except c2pa.C2paError as exc:
            raise CredentialsError(f"the signing credentials from {self.source or 'the callback'} are not usable "
                                   f"({exc}); make new ones with 'provenance-guard credentials init DIR' or check "
                                   f"that signer.key belongs to signer.pem") from None


def credentials_folder(value: str | None) -> Path | None:
    """The folder named by value, else by $PROVENANCE_GUARD_CREDENTIALS, else None."""
    raw = value or os.environ.get(ENV_CREDENTIALS) or ""
    return Path(raw).expanduser() if raw.strip() else None


def _read_pem(path: Path, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_PEM_BYTES:
            raise CredentialsError(f"{path}: {size:,} bytes is not a {what}; point at the folder made by "
                                   f"'provenance-guard credentials init'")
        data = path.read_bytes()
    except FileNotFoundError:
        raise CredentialsError(f"{path} is missing: the credentials folder needs {SIGNER_FILE} and {KEY_FILE} "
                               f"(make them with 'provenance-guard credentials init {path.parent}')") from None
    except OSError as exc:
        raise CredentialsError(f"{path} cannot be read ({exc.strerror}); give this user read access") from None
    if b"-----BEGIN" not in data:
        raise CredentialsError(f"{path} is not PEM ({what}); point at the folder made by 'provenance-guard "
                               f"credentials init'")
    return data


def load_credentials(folder: str | Path, tsa_url: str | None = None) -> Credentials:
    """Credentials from folder/signer.pem and folder/signer.key, checked: the key belongs to the leaf, the
    leaf may sign (digitalSignature; not a CA), and it is inside its validity period. tsa_url (else
    $PROVENANCE_GUARD_TSA_URL, else none): the timestamp authority every signature asks."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CredentialsError(f"credentials folder {folder} does not exist; make one with 'provenance-guard "
                               f"credentials init {folder}' or point at your studio's signer.pem/signer.key")
    chain = _read_pem(folder / SIGNER_FILE, "certificate chain")
    key = _read_pem(folder / KEY_FILE, "private key")
    if tsa_url is None:
        tsa_url = os.environ.get(ENV_TSA, "").strip() or None
    if tsa_url and not tsa_url.startswith(("http://", "https://")):
        raise ConfigError(f"timestamp authority {tsa_url!r} (--tsa-url or ${ENV_TSA}): give an http(s) URL")
    try:
        certs = x509.load_pem_x509_certificates(chain)
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialsError(f"{folder}: signer.pem or signer.key cannot be read ({exc}); an encrypted key is "
                               f"not supported here (use a signing callback for keys kept elsewhere)") from None
    leaf = certs[0]
    if leaf.public_key().public_numbers() != private.public_key().public_numbers():
        raise CredentialsError(f"{folder}: signer.key does not belong to the first certificate of signer.pem")
    now = datetime.datetime.now(datetime.timezone.utc)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise CredentialsError(f"{folder}: the signing certificate is valid {leaf.not_valid_before_utc:%Y-%m-%d} to "
                               f"{leaf.not_valid_after_utc:%Y-%m-%d}, not now; make new credentials")
    alg = {256: "es256", 384: "es384", 521: "es512"}.get(getattr(private, "key_size", 0))
    if alg is None:
        raise CredentialsError(f"{folder}: only EC keys (P-256, P-384, P-521) are supported here; use a signing "
                               f"callback for other keys")
    return Credentials(chain, key, alg=alg, tsa_url=tsa_url, source=str(folder),
                       subject=leaf.subject.rfc4514_string())


# the manifest ---------------------------------------------------------------------------------------------

def check_assertion(result, bundles: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Our check assertion for a CheckResult (see the module docstring)."""
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "verdict": result.verdict,
        "max_score": None if result.max_score is None else round(float(result.max_score), 6),
        "model": result.model,
        "bundles": bundles or [{"id": t.bundle_id, "version": t.bundle_version} for t in result.thresholds],
        "thresholds": [{"bundle": t.bundle_id, "warn": t.warn, "block": t.block} for t in result.thresholds],
        "matches": [], "checked_at": result.checked_at, "tool_version": result.tool_version,
    }
    for m in result.matches[:TOP_MATCHES]:
        match = {"bundle": m.bundle_id, "row_id": int(m.row_id), "score": round(float(m.score), 6),
                 "verdict": m.verdict}
        if m.verification is not None:
            match["verification"] = {"status": m.verification.status, "method": m.verification.method}
        out["matches"].append(match)
    if result.error:
        out["error"] = str(result.error)[:500]
    p = result.prompt
    if p is not None and p.memorization_score is not None:
        out["memorization"] = {"score": round(float(p.memorization_score), 6), "threshold": p.threshold,
                               "verdict": p.verdict}
    return out


def generation_assertion(generation, include_prompts: bool = True) -> dict[str, Any] | None:
    if generation is None:
        return None
    data = {k: getattr(generation, k) for k in ("prompt", "negative_prompt", "seed", "sampler", "scheduler",
                                                   "steps", "cfg", "width", "height", "model", "model_hash")}
    if not include_prompts:
        data.pop("prompt"), data.pop("negative_prompt")
    return {"schema_version": SCHEMA_VERSION, **{k: v for k, v in data.items() if v not in (None, "")}}


def manifest_for(result, software: str, title: str = "", include_prompts: bool = True,
                 bundles: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The manifest definition c2pa's Builder signs: the creation action (with its IPTC digital source type,
    set by the builder's intent), the generating model as the host reports it, our two assertions."""
    from .. import __version__

    generation = result.generation
    agent: dict[str, Any] = {"name": software[:200]}
    if generation is not None and (generation.model or generation.model_hash):
        agent["model"] = {k: str(v)[:200] for k, v in (("name", generation.model), ("hash", generation.model_hash))
                          if v}
    assertions = [
        {"label": "c2pa.actions.v2", "data": {"actions": [{
            "action": "c2pa.created", "digitalSourceType": SOURCE_TYPE, "softwareAgent": agent}]}},
        {"label": CHECK_LABEL, "data": check_assertion(result, bundles)},
    ]
    gen = generation_assertion(generation, include_prompts)
    if gen:
        assertions.append({"label": GENERATION_LABEL, "data": gen})
    return {"claim_generator_info": [{"name": "provenance-guard", "version": __version__}],
            "title": title[:200], "assertions": assertions}


# signing --------------------------------------------------------------------------------------------------

def mime_of(path: Path) -> str:
    mime = MIME.get(path.suffix.lower())
    if mime is None:
        raise CredentialsError(f"{path.name}: Content Credentials are written into PNG, JPEG, WebP, MP4 and MOV "
                               f"files here, not {path.suffix or 'files without an extension'}")
    return mime


XMP = ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
       '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
       'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"><Iptc4xmpExt:DigitalSourceType>'
       f'{SOURCE_TYPE}</Iptc4xmpExt:DigitalSourceType></rdf:Description></rdf:RDF></x:xmpmeta>'
       '<?xpacket end="r"?>')
XMP_JPEG_NS = b"http://ns.adobe.com/xap/1.0/\x00"


def with_xmp(data: bytes, mime: str) -> bytes:
    """data with an XMP packet saying the IPTC digital source type (for readers that know only IPTC), added
    to a PNG (an iTXt chunk after IHDR) or a JPEG (an APP1 segment after SOI and APP0) that has no XMP yet;
    anything else, or a file whose structure is not as expected, comes back unchanged."""
    import struct
    import zlib

    packet = XMP.encode()
    if mime == "image/png" and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        if b"XML:com.adobe.xmp" in data:
            return data
        body = b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + packet
        chunk = struct.pack(">I", len(body)) + b"iTXt" + body + struct.pack(">I", zlib.crc32(b"iTXt" + body))
        end = 8 + 12 + struct.unpack(">I", data[8:12])[0]
        return data[:end] + chunk + data[end:]
    if mime == "image/jpeg" and data[:2] == b"\xff\xd8":
        if XMP_JPEG_NS in data[:1 << 16]:
            return data
        at = 2
        if data[2:4] == b"\xff\xe0":  # keep JFIF's APP0 first
            at = 4 + struct.unpack(">H", data[4:6])[0]
        segment = XMP_JPEG_NS + packet
        return data[:at] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + data[at:]
    return data


def sign_file(path: str | Path, credentials: Credentials, manifest: dict[str, Any],
              parent: str | Path | None = None, thumbnail: bool = False) -> None:
    """Sign the saved file at path in place: the manifest (with parent, an input image, as its parentOf
    ingredient, carrying that image's own manifest when it has one) is embedded and the file replaced in one
    rename; a failure leaves the original untouched."""
    c2pa = _c2pa()
    path = Path(path)
    mime = mime_of(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CredentialsError(f"{path} cannot be signed: {exc.strerror}") from None
    if size > MAX_SIGN_BYTES:
        raise CredentialsError(f"{path}: {size:,} bytes is over the {MAX_SIGN_BYTES >> 20} MiB signing limit")
    settings = c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": bool(thumbnail)}}})
    if parent is not None:  # made from an input image (img2img, inpaint): an edit of that parent
        manifest = copy.deepcopy(manifest)
        for a in manifest.get("assertions", []):
            if str(a.get("label", "")).startswith("c2pa.actions"):
                for act in a.get("data", {}).get("actions", []):
                    if act.get("action") == "c2pa.created":
                        act["action"] = "c2pa.edited"
    signer = credentials.signer()
    tmp = None
    try:
        with c2pa.Context(settings) as context, c2pa.Builder(manifest, context=context) as builder:
            if parent is not None:
                parent = Path(parent)
                with open(parent, "rb") as f:
                    builder.add_ingredient({"title": parent.name[:200], "relationship": "parentOf"},
                                           mime_of(parent), f)
                builder.set_intent(c2pa.C2paBuilderIntent.EDIT)
            else:
                builder.set_intent(c2pa.C2paBuilderIntent.CREATE,
                                   c2pa.C2paDigitalSourceType.TRAINED_ALGORITHMIC_MEDIA)
            source = io.BytesIO(with_xmp(path.read_bytes(), mime))
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".signing")
            with os.fdopen(fd, "w+b") as dest:
                builder.sign(signer, mime, source, dest)
                dest.flush()
                os.fsync(dest.fileno())
            try:
                os.chmod(tmp, path.stat().st_mode & 0o777)
            except OSError:
                pass
            os.replace(tmp, path)
            tmp = None
    except c2pa.C2paError as exc:
        raise CredentialsError(f"{path.name} could not be signed ({exc}); the file is unchanged") from None
    except OSError as exc:
        raise CredentialsError(f"{path.name} could not be signed ({exc.strerror or exc}); the file is "
                               f"unchanged") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        try:
            signer.close()
        except Exception:  # noqa: BLE001 - closing a signer never hides the signing result
            pass


# reading --------------------------------------------------------------------------------------------------

STATES = ("trusted", "valid", "untrusted", "invalid", "absent", "error")


@dataclass
class CredentialStatus:
    """What an image's Content Credentials say. state: trusted (valid and chained to the given root), valid
    (valid; no root given), untrusted (valid signature, another root), invalid (the file or the manifest
    was changed after signing, or the signature does not hold), absent (no manifest), error (unreadable)."""

    path: str
    state: str
    signer: str | None = None
    check: dict[str, Any] | None = None
    generation: dict[str, Any] | None = None
    source_type: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state in ("trusted", "valid")

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "state": self.state, "signer": self.signer, "check": self.check,
                "generation": self.generation, "digital_source_type": self.source_type, "problems": self.problems}


def verify_file(path: str | Path, trust_pem: bytes | None = None) -> CredentialStatus:
    """Read and validate path's manifest; with trust_pem (PEM roots) also whether its signer chains to them."""
    c2pa = _c2pa()
    path = Path(path)
    try:
        mime = mime_of(path)
        if path.stat().st_size > MAX_SIGN_BYTES:
            return CredentialStatus(str(path), "error", problems=[f"over {MAX_SIGN_BYTES >> 20} MiB"])
        data = path.read_bytes()
    except (CredentialsError, OSError) as exc:
        return CredentialStatus(str(path), "error", problems=[str(getattr(exc, "strerror", None) or exc)])
    config: dict[str, Any] = {"verify": {"verify_trust": trust_pem is not None}}
    if trust_pem is not None:
        config["trust"] = {"trust_anchors": trust_pem.decode("utf-8", "replace")}
    try:
        with c2pa.Context(c2pa.Settings.from_dict(config)) as context, \
                c2pa.Reader(mime, io.BytesIO(data), context=context) as reader:
            state = (reader.get_validation_state() or "").lower()
            active = reader.get_active_manifest() or {}
            results = reader.get_validation_results() or {}
    except c2pa.C2paError as exc:
        text = str(exc)
        if "ManifestNotFound" in type(exc).__name__ or "no JUMBF" in text or "not found" in text.lower():
            return CredentialStatus(str(path), "absent")
        return CredentialStatus(str(path), "invalid", problems=[text[:300]])
    status = CredentialStatus(str(path), "valid")
    info = active.get("signature_info") or {}
    status.signer = ", ".join(str(info[k]) for k in ("common_name", "issuer") if info.get(k)) or None
    for a in active.get("assertions") or []:
        label, data_ = a.get("label"), a.get("data")
        if label == CHECK_LABEL and isinstance(data_, dict):
            status.check = data_
        elif label == GENERATION_LABEL and isinstance(data_, dict):
            status.generation = data_
        elif str(label).startswith("c2pa.actions") and isinstance(data_, dict):
            for act in data_.get("actions") or []:
                if isinstance(act, dict) and act.get("digitalSourceType"):
                    status.source_type = act["digitalSourceType"]
    failures = [f"{f.get('code')}: {f.get('explanation', '')}"
                for f in (results.get("activeManifest") or {}).get("failure") or [] if isinstance(f, dict)]
    untrusted = [f for f in failures if "signingCredential" in f]
    if state == "invalid" or (failures and len(untrusted) < len(failures)):
        status.state = "invalid"
        status.problems = [f for f in failures if f not in untrusted][:5] or ["the manifest does not validate"]
    elif trust_pem is not None:
        status.state = "trusted" if state == "trusted" else "untrusted"
        status.problems = untrusted[:3]
    return status


def credential_problem(status: CredentialStatus, verdict: str | None = None, require_trust: bool = False) -> \
        str | None:
    """Why a gate that requires credentials refuses this image, or None: absent, invalid or untrusted
    credentials, a check assertion missing or saying block, or one that disagrees with this check's verdict."""
    if status.state not in ("trusted", "valid"):
        return f"Content Credentials {status.state}" + (f" ({status.problems[0]})" if status.problems else "")
    if require_trust and status.state != "trusted":
        return "Content Credentials are not from the trusted root"
    if not status.check:
        return "Content Credentials carry no provenance-guard check"
    said = status.check.get("verdict")
    if said in ("block", "unchecked"):
        return f"its Content Credentials say the image was checked as {said}"
    if verdict is not None and said != verdict:
        return f"its Content Credentials say {said}, this check says {verdict}"
    return None


def describe(status: CredentialStatus) -> str:
    """One line for a person."""
    parts = [status.state]
    if status.signer:
        parts.append(f"signed by {status.signer}")
    if status.check:
        top = (status.check.get("matches") or [None])[0]
        parts.append(f"check: {status.check.get('verdict')}"
                     + (f" (top {top.get('bundle')}#{top.get('row_id')} {top.get('score')})" if top else ""))
    if status.generation:
        g = status.generation
        parts.append("generation: " + ", ".join(f"{k} {g[k]}" for k in ("seed", "steps", "sampler", "model")
                                               if k in g))
    if status.problems:
        parts.append("; ".join(status.problems[:2]))
    return " — ".join(parts)


def manifest_json(status: CredentialStatus) -> str:
    return json.dumps(status.to_json(), ensure_ascii=False)

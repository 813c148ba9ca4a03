"""Content Credentials (C2PA): keys, signing in place, reading back (valid, trusted, untrusted, invalid,
absent), ingredients, host metadata surviving, and the gate (check --sign / --require-credentials,
credentials verify)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from provenance_guard.cli import main as cli
from provenance_guard.core.record import GenerationRecord
from provenance_guard.core.result import BundleThresholds, CheckResult, Match
from provenance_guard.demo import sample_image

cr = pytest.importorskip("provenance_guard.core.credentials")
pytest.importorskip("c2pa", reason="c2pa-python is not installed (pip install '.[c2pa]')")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    cr.init_credentials(folder, organization="Test Studio")
    return folder


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("other-keys")
    cr.init_credentials(folder, organization="Someone Else")
    return folder


def result(verdict: str = "pass", prompt: str = "an astronaut") -> CheckResult:
    return CheckResult(verdict=verdict, max_score=0.42, matches=[Match(0.42, True, "refs", "v1", 3, "u.png", "c")],
                       model="tiny", thresholds=[BundleThresholds("refs", "v1", 0.9, 0.95)], fail_mode="open",
                       generation=GenerationRecord(prompt=prompt, negative_prompt="blurry", seed=7, steps=20,
                                                   cfg=7.0, model="sd15", model_hash="abc123"),
                       checked_at="2026-12-06T00:00:00Z", tool_version="test")


def save(path: Path, name: str = "astronaut", **kw) -> Path:
    sample_image(name).convert("RGB").save(path, **kw)
    return path


def test_init_makes_a_root_and_a_signing_leaf_c2pa_accepts(keys):
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    assert stat.S_IMODE(os.stat(keys / "signer.key").st_mode) == 0o600
    chain = x509.load_pem_x509_certificates((keys / "signer.pem").read_bytes())
    leaf, root = chain[0], x509.load_pem_x509_certificate((keys / "root.pem").read_bytes())
    assert leaf.issuer == root.subject and len(chain) == 2
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(Exception, match="--overwrite"):
        cr.init_credentials(keys)


@pytest.mark.parametrize("suffix,kw", [(".png", {}), (".jpg", {"quality": 90}), (".webp", {"quality": 90})])
def test_round_trip_valid_trusted_untrusted_invalid_absent(tmp_path, keys, other_keys, suffix, kw):
    from PIL import Image

    path = save(tmp_path / f"out{suffix}", **kw)
    cr.sign_file(path, cr.load_credentials(keys), cr.manifest_for(result(), "test host 1.0", path.name))
    root = (keys / "root.pem").read_bytes()
    status = cr.verify_file(path, root)
    assert status.state == "trusted" and "Test Studio" in status.signer
    assert status.source_type == cr.SOURCE_TYPE
    assert status.check["verdict"] == "pass" and status.check["matches"][0]["row_id"] == 3
    assert status.generation["seed"] == 7 and status.generation["prompt"] == "an astronaut"
    assert cr.verify_file(path).state == "valid"
    assert cr.verify_file(path, (other_keys / "root.pem").read_bytes()).state == "untrusted"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one changed byte of the pixels
    (tmp_path / f"bad{suffix}").write_bytes(bytes(data))
    bad = cr.verify_file(tmp_path / f"bad{suffix}", root)
    assert bad.state == "invalid" and bad.problems
    Image.open(path).save(tmp_path / f"resaved{suffix}")  # a re-save drops the manifest
    assert cr.verify_file(tmp_path / f"resaved{suffix}").state == "absent"


def test_prompts_can_be_left_out_and_a_blocked_image_says_block(tmp_path, keys):
    path = save(tmp_path / "b.png")
    cr.sign_file(path, cr.load_credentials(keys), cr.manifest_for(result("block"), "host", include_prompts=False))
    status = cr.verify_file(path)
    assert status.check["verdict"] == "block" and "prompt" not in status.generation
    assert "negative_prompt" not in status.generation and status.generation["seed"] == 7
    assert cr.credential_problem(status) == "its Content Credentials say the image was checked as block"


def test_an_input_image_is_the_parent_ingredient_with_its_own_manifest(tmp_path, keys):
    import c2pa

    creds = cr.load_credentials(keys)
    parent = save(tmp_path / "input.png", "chelsea")
    cr.sign_file(parent, creds, cr.manifest_for(result(), "host", parent.name))
    child = save(tmp_path / "img2img.png", "chelsea")
    cr.sign_file(child, creds, cr.manifest_for(result(), "host", child.name), parent=parent)
    assert cr.verify_file(child, (keys / "root.pem").read_bytes()).state == "trusted"
    with open(child, "rb") as f, c2pa.Reader("image/png", f) as reader:
        manifest = reader.get_active_manifest()
    (ingredient,) = manifest["ingredients"]
    assert ingredient["relationship"] == "parentOf" and ingredient["title"] == "input.png"
    assert ingredient.get("active_manifest")  # the input's own manifest travels with it
    actions = next(a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))["data"]["actions"]
    assert any(a["action"] == "c2pa.edited" for a in actions)


def test_host_metadata_written_before_signing_survives_and_the_manifest_stays_valid(tmp_path, keys):
    """A1111's infotext (a PNG text chunk) and ComfyUI's prompt/workflow chunks are written first; the
    signature is the last write, so both are there and the manifest validates."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "an astronaut\nSteps: 20, Seed: 7")
    info.add_text("workflow", json.dumps({"nodes": []}))
    path = tmp_path / "host.png"
    sample_image("astronaut").convert("RGBA").save(path, pnginfo=info)  # RGBA: stealth infotext's mode
    cr.sign_file(path, cr.load_credentials(keys), cr.manifest_for(result(), "host", path.name))
    with Image.open(path) as im:
        assert im.text["parameters"].startswith("an astronaut") and "workflow" in im.text and im.mode == "RGBA"
    assert cr.verify_file(path, (keys / "root.pem").read_bytes()).state == "trusted"


def test_bad_credentials_fail_closed_with_one_clear_line(tmp_path, keys, other_keys):
    with pytest.raises(cr.CredentialsError, match="credentials init"):
        cr.load_credentials(tmp_path / "nowhere")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "signer.pem").write_bytes((keys / "signer.pem").read_bytes())
    (mixed / "signer.key").write_bytes((other_keys / "signer.key").read_bytes())
    with pytest.raises(cr.CredentialsError, match="does not belong"):
        cr.load_credentials(mixed)
    (mixed / "signer.key").write_text("not a key")
    with pytest.raises(cr.CredentialsError, match="not PEM"):
        cr.load_credentials(mixed)
    path = save(tmp_path / "x.gif")
    with pytest.raises(cr.CredentialsError, match="PNG, JPEG, WebP, MP4 and MOV"):
        cr.sign_file(path, cr.load_credentials(keys), cr.manifest_for(result(), "host"))
    assert cr.verify_file(path).state == "error"


def test_a_failed_signature_leaves_the_file_untouched(tmp_path, keys, monkeypatch):
    import c2pa

    path = save(tmp_path / "keep.png")
    before = path.read_bytes()

    def broken(self, *a, **kw):
        raise c2pa.C2paError("simulated failure")

    monkeypatch.setattr(c2pa.Builder, "sign", broken)
    with pytest.raises(cr.CredentialsError, match="unchanged"):
        cr.sign_file(path, cr.load_credentials(keys), cr.manifest_for(result(), "host"))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_without_c2pa_every_surface_says_once_that_credentials_are_off(monkeypatch, tmp_path, built_bundle, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "c2pa", None)
    assert "pip install 'provenance-guard[c2pa]'" in cr.unavailable()
    save(tmp_path / "a.png")
    assert cli(["credentials", "verify", str(tmp_path / "a.png")]) == 2
    assert cli(["check", str(tmp_path / "a.png"), "--index", str(built_bundle), "--sign", "--credentials",
                str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("Content Credentials are off") == 2 and "Traceback" not in err


def test_the_gate_signs_what_passes_never_a_block_and_requires_credentials(tmp_path, built_bundle, keys, capsys):
    """check --sign signs passing images in place with this check's assertion and leaves blocked ones
    unsigned; check --require-credentials then passes the signed one, fails the unsigned, a changed one and
    one signed under another root; credentials verify says the same with its exit code."""
    from PIL import Image

    out = tmp_path / "out"
    out.mkdir()
    copy = save(out / "copy.png", "astronaut")  # a training image: blocked
    fresh = save(out / "fresh.png", "camera")  # unrelated: passes
    code = cli(["check", str(out), "--index", str(built_bundle), "--sign", "--credentials", str(keys),
                "--write-record", "png", "--no-progress"])
    assert code == 1  # the copy reached block
    root = keys / "root.pem"
    assert cr.verify_file(copy).state == "absent"
    signed = cr.verify_file(fresh, root.read_bytes())
    assert signed.state == "trusted" and signed.check["verdict"] == "pass"
    with Image.open(fresh) as im:  # the record chunk was written before the signature
        assert "provenance" in im.text
    capsys.readouterr()

    assert cli(["credentials", "verify", str(fresh), "--trust", str(root)]) == 0
    assert "trusted — signed by Test Studio signer" in capsys.readouterr().out
    assert cli(["credentials", "verify", str(fresh), str(copy), "--json"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["state"] for x in lines] == ["valid", "absent"]

    code = cli(["check", str(fresh), "--index", str(built_bundle), "--require-credentials", "--trust", str(root),
                "--no-progress", "--report", str(tmp_path / "r.html"), "--report-all"])
    assert code == 0, capsys.readouterr()
    assert "credentials" in (tmp_path / "r.html").read_text()
    unsigned = save(tmp_path / "unsigned.png", "camera")
    assert cli(["check", str(unsigned), "--index", str(built_bundle), "--require-credentials", "--no-progress"]) == 1
    assert "absent" in capsys.readouterr().out
    jpeg = save(tmp_path / "changed.jpg", "camera", quality=90)
    cr.sign_file(jpeg, cr.load_credentials(keys), cr.manifest_for(result(), "host"))
    data = bytearray(jpeg.read_bytes())
    data[len(data) // 2] ^= 0x01  # one changed byte of the pixels (the JPEG still decodes)
    jpeg.write_bytes(bytes(data))
    assert cli(["check", str(jpeg), "--index", str(built_bundle), "--require-credentials", "--no-progress"]) == 1
    assert "Content Credentials invalid" in capsys.readouterr().out
    other = tmp_path / "other"
    cr.init_credentials(other)
    elsewhere = save(tmp_path / "elsewhere.png", "camera")
    cr.sign_file(elsewhere, cr.load_credentials(other), cr.manifest_for(result(), "host"))
    assert cli(["check", str(elsewhere), "--index", str(built_bundle), "--require-credentials", "--trust", str(root),
                "--no-progress"]) == 1
    assert cli(["credentials", "verify", str(elsewhere), "--trust", str(root)]) == 1


def test_a_png_record_never_breaks_existing_credentials(tmp_path, built_bundle, keys):
    path = save(tmp_path / "signed.png", "camera")
    cr.sign_file(path, cr.load_credentials(keys), cr.manifest_for(result(), "host"))
    assert cli(["check", str(path), "--index", str(built_bundle), "--write-record", "png", "--no-progress"]) == 0
    assert cr.verify_file(path).state == "valid"
    assert (tmp_path / "signed.png.provenance.json").is_file()


def test_sign_without_a_key_stops_before_anything_is_checked(tmp_path, built_bundle, capsys, monkeypatch):
    monkeypatch.delenv(cr.ENV_CREDENTIALS, raising=False)
    path = save(tmp_path / "a.png")
    before = path.read_bytes()
    assert cli(["check", str(path), "--index", str(built_bundle), "--sign"]) == 2
    assert "--credentials DIR" in capsys.readouterr().err
    assert cli(["check", str(path), "--index", str(built_bundle), "--sign", "--credentials",
                str(tmp_path / "none")]) == 2
    assert "credentials init" in capsys.readouterr().err and path.read_bytes() == before


def test_credentials_init_command(tmp_path, capsys):
    assert cli(["credentials", "init", str(tmp_path / "k"), "--organization", "Studio X"]) == 0
    out = capsys.readouterr().out
    assert "--trust" in out and (tmp_path / "k" / "signer.key").is_file()
    assert cli(["credentials", "init", str(tmp_path / "k")]) == 2  # keys there: not overwritten



def test_the_audit_log_is_signed_with_the_studio_key_and_verify_checks_it(tmp_path, built_bundle, keys, other_keys,
                                                                            capsys):
    """check --audit-log --credentials signs every entry; audit verify --signer fails an unsigned log, a line
    changed and re-chained (what write access alone allows), and a log signed by another key."""
    import hashlib

    from provenance_guard.core.audit import AuditLog, AuditSigner, verify

    log = tmp_path / "audit.jsonl"
    img = save(tmp_path / "a.png", "camera")
    assert cli(["check", str(img), str(img), "--index", str(built_bundle), "--audit-log", str(log), "--credentials",
                str(keys), "--no-progress"]) == 0
    signer = str(keys / "signer.pem")
    assert cli(["audit", "verify", str(log), "--signer", signer]) == 0
    assert "signed by the given key" in capsys.readouterr().out
    assert cli(["audit", "verify", str(log), "--signer", str(other_keys / "signer.pem")]) == 1
    assert "another key" in capsys.readouterr().err

    lines = [json.loads(x) for x in log.read_text().splitlines()]
    lines[0]["verdict"] = "pass-edited"  # rewrite a line and recompute the chain, as write access allows
    out, prev = [], "0" * 64
    for entry in lines:
        entry["prev"] = prev
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
        prev = hashlib.sha256(line.encode()).hexdigest()
        out.append(line)
    forged = tmp_path / "forged.jsonl"
    forged.write_text("\n".join(out) + "\n")
    assert verify(forged).ok  # the chain alone cannot tell
    bad = verify(forged, signer_cert=(keys / "signer.pem").read_bytes())
    assert bad.broken_at == 1 and "signature does not hold" in bad.problem

    plain = tmp_path / "plain.jsonl"
    AuditLog(plain).append([{"verdict": "pass"}])
    assert "not signed" in verify(plain, signer_cert=(keys / "signer.pem").read_bytes()).problem
    AuditLog(plain, AuditSigner.from_folder(keys)).append([{"verdict": "pass"}])  # signing began later
    later = verify(plain, allow_unchained=True, signer_cert=(keys / "signer.pem").read_bytes())
    assert later.ok and later.unsigned == 1 and any("not signed" in n for n in later.notes)
    stripped = tmp_path / "stripped.jsonl"
    entries = [json.loads(x) for x in plain.read_text().splitlines()]
    entries[1].pop("sig")
    stripped.write_text("\n".join(json.dumps(e, separators=(",", ":")) for e in entries) + "\n")
    assert not verify(stripped, allow_unchained=True, signer_cert=(keys / "signer.pem").read_bytes()).ok


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_the_iptc_digital_source_type_is_in_xmp_too(tmp_path, keys, suffix):
    from PIL import Image

    path = save(tmp_path / f"x{suffix}")
    cr.sign_file(path, cr.load_credentials(keys), cr.manifest_for(result(), "host"))
    with Image.open(path) as im:
        im.load()
        if suffix == ".png":
            xmp = im.text.get("XML:com.adobe.xmp")
        else:  # the APP1 segment itself: Pillow before 10 keeps no "xmp" in im.info (the webuis pin 9.5)
            ns = b"http://ns.adobe.com/xap/1.0/\x00"
            xmp = next((d[len(ns):].decode() for m, d in im.applist if m == "APP1" and d.startswith(ns)), "")
    assert "<Iptc4xmpExt:DigitalSourceType>" + cr.SOURCE_TYPE in xmp
    assert cr.verify_file(path).state == "valid"


def test_the_index_servers_audit_log_is_signed_when_the_studio_key_is_configured(tmp_path, built_bundle, keys,
                                                                                  monkeypatch):
    pytest.importorskip("fastapi")
    from provenance_guard.core.audit import verify
    from provenance_guard.index_server.config import ServerConfig
    from provenance_guard.index_server.state import State

    monkeypatch.setenv(cr.ENV_CREDENTIALS, str(keys))
    log = tmp_path / "server-audit.jsonl"
    state = State(ServerConfig(indices={"refs": str(built_bundle)}, audit_log=str(log), embeddings_only=True))
    try:
        state.audit.append([{"verdict": "pass", "source": "server embedding"}])
    finally:
        state.close()
    assert verify(log, signer_cert=(keys / "signer.pem").read_bytes()).ok


def test_an_mp4_video_round_trips_valid_and_a_changed_byte_is_invalid(tmp_path, keys):
    av = pytest.importorskip("av", reason="PyAV makes the test video (pip install '.[dev]')")
    import numpy as np

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(8):
            frame = (np.random.default_rng(i).random((64, 64, 3)) * 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    cr.sign_file(path, cr.load_credentials(keys), cr.manifest_for(result(), "host", path.name))
    status = cr.verify_file(path, (keys / "root.pem").read_bytes())
    assert status.state == "trusted" and status.check["verdict"] == "pass" and status.source_type == cr.SOURCE_TYPE
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF  # inside the media data
    (tmp_path / "changed.mp4").write_bytes(bytes(data))
    assert cr.verify_file(tmp_path / "changed.mp4").state == "invalid"


def test_a_timestamp_authority_comes_from_the_option_or_the_environment_and_must_be_http(keys, monkeypatch):
    monkeypatch.delenv(cr.ENV_TSA, raising=False)
    assert cr.load_credentials(keys).tsa_url is None  # off by default
    monkeypatch.setenv(cr.ENV_TSA, "http://tsa.example.test/rfc3161")
    assert cr.load_credentials(keys).tsa_url == "http://tsa.example.test/rfc3161"  # every host's signatures
    assert cr.load_credentials(keys, "https://other.example.test/").tsa_url == "https://other.example.test/"
    monkeypatch.setenv(cr.ENV_TSA, "ftp://tsa.example.test/")
    with pytest.raises(cr.ConfigError, match="give an http"):
        cr.load_credentials(keys)

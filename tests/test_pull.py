"""index publish / index pull against a real HTTP server on 127.0.0.1 (a handler with Range support whose
misbehaviours each test turns on: a cut connection, a corrupted byte, more bytes than listed, Range
ignored, a gate that holds every answer). No network beyond loopback."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from provenance_guard.cli import main as cli
from provenance_guard.core import pull as pull_mod
from provenance_guard.core.bundle import Bundle, read_manifest, write_manifest
from provenance_guard.core.pull import (PUBLISH_FILE, ChecksumError, DownloadError, NotInstallable, PublishFile,
                                        PublishFileError, parse_source, publish_bundle, pull)


class BundleServer:
    """A static file server over a folder, on 127.0.0.1, that logs every request (path, Range, Authorization)
    and misbehaves on request:
      cut      {name: n}      the first answer for name sends n bytes of the body, then closes
      corrupt  {name}         one byte of name is changed in every answer
      extra    {name: bytes}  name's body is followed by these bytes
      no_length               no Content-Length (the body ends when the connection closes)
      ignore_range            a Range request gets the whole file (200)
      gate                    a threading.Event every answer waits for (when set to one)
      prefix                  URL path prefix mapped onto the folder (a Hugging Face resolve path)
      redirect {name: url}    the first answer for name is a 302 to url"""

    def __init__(self, root: Path, prefix: str = "/"):
        self.root, self.prefix = Path(root), prefix
        self.log: list[dict] = []
        self.cut: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.extra: dict[str, bytes] = {}
        self.redirect: dict[str, str] = {}
        self.no_length = self.ignore_range = False
        self.gate = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = unquote(urlsplit(self.path).path)
                server.log.append({"path": path, "range": self.headers.get("Range"),
                                   "auth": self.headers.get("Authorization")})
                if server.gate is not None:
                    server.gate.wait(30)
                if not path.startswith(server.prefix):
                    return self.send_error(404)
                name = path[len(server.prefix):]
                if name in server.redirect:
                    self.send_response(302)
                    self.send_header("Location", server.redirect.pop(name))
                    self.end_headers()
                    return
                target = server.root / name
                if ".." in name.split("/") or not target.is_file():
                    return self.send_error(404)
                body = target.read_bytes()
                if name in server.corrupt and body:
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
                body += server.extra.get(name, b"")
                start, status = 0, 200
                wanted = self.headers.get("Range")
                if wanted and not server.ignore_range:
                    start = int(wanted.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.end_headers()
                        return
                    status = 206
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                if not server.no_length:
                    self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                part = body[start:]
                if name in server.cut:
                    part = part[:server.cut.pop(name)]
                self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def requested(self, name: str) -> list[dict]:
        return [e for e in self.log if e["path"].endswith("/" + name)]

    def close(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def published_copy(built_bundle: Path, where: Path, name: str = "studio-refs") -> Path:
    """A copy of the test bundle under where/site/bundles/NAME, published (provenance-bundle.json written)."""
    folder = where / "site" / "bundles" / name
    shutil.copytree(built_bundle, folder)
    publish_bundle(folder)
    return folder


@pytest.fixture
def site(built_bundle, tmp_path):
    folder = published_copy(built_bundle, tmp_path)
    server = BundleServer(tmp_path / "site")
    yield folder, server, f"{server.url}/bundles/{folder.name}/"
    server.close()


def names_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def test_publish_then_pull_round_trip(site, tmp_path, capsys):
    folder, server, url = site
    assert cli(["index", "publish", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "provenance-guard index pull https://HOST/PATH/" in out and "hf upload" in out
    listing = json.loads((folder / PUBLISH_FILE).read_text())
    assert listing["format"] == "provenance-guard-published-bundle" and listing["name"] == "studio-refs"
    assert set(listing["files"]) == {"manifest.json", *read_manifest(folder).files}
    for name, info in listing["files"].items():
        assert info["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert info["size"] == (folder / name).stat().st_size
    to = tmp_path / "models" / "provenance"
    assert cli(["index", "pull", url, "--to", str(to), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"installed {to / 'studio-refs'}" in out and "sha256 verified" in out
    pulled, original = Bundle.open(to / "studio-refs"), Bundle.open(folder)
    assert pulled.manifest.to_json() == original.manifest.to_json() and pulled.verify() == []
    assert pulled.count == original.count and (pulled.vector([0]) == original.vector([0])).all()
    assert names_in(to) == {"studio-refs", ".studio-refs.source.json"}  # no staging, no lock left behind
    assert names_in(to / "studio-refs") == {"manifest.json", *read_manifest(folder).files}
    assert cli(["index", "verify", str(to / "studio-refs")]) == 0
    # the same bundle again: the publish file is read, nothing else
    server.log.clear()
    assert cli(["index", "pull", f"{server.url}/bundles/studio-refs/{PUBLISH_FILE}", "--to", str(to)]) == 0
    assert "already holds bundle test-refs" in capsys.readouterr().out
    assert [e["path"] for e in server.log] == [f"/bundles/studio-refs/{PUBLISH_FILE}"]


def test_publish_refuses_what_is_not_an_intact_bundle(bundle_copy, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli(["index", "publish", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a bundle that can be published" in err
    assert cli(["index", "publish", str(tmp_path / "missing" / "x")]) == 2
    assert not (tmp_path / "missing").exists()  # nothing made for a folder that is not there
    capsys.readouterr()
    data = bytearray((bundle_copy / "vectors.f16.npy").read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only the sha256 tells
    (bundle_copy / "vectors.f16.npy").write_bytes(bytes(data))
    assert cli(["index", "publish", str(bundle_copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vectors.f16.npy differs" in err and "damaged" in err
    assert not (bundle_copy / PUBLISH_FILE).exists()
    assert cli(["index", "publish", str(tmp_path / "empty"), "--name", "../up"]) == 2


def test_a_cut_download_resumes_with_a_range_request(site, tmp_path, capsys):
    folder, server, url = site
    to = tmp_path / "models"
    server.cut["bundles/studio-refs/metadata.arrow"] = 1000
    assert cli(["index", "pull", url, "--to", str(to), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stopped at 1,000 of" in err and "resumes" in err and "Traceback" not in err
    assert names_in(to) == {".studio-refs.pull"}  # nothing installed; the partial file is kept
    parts = list((to / ".studio-refs.pull").glob("metadata.arrow.*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == 1000
    first = {e["path"] for e in server.log}
    server.log.clear()
    assert cli(["index", "pull", url, "--to", str(to)]) == 0
    captured = capsys.readouterr()
    assert "installed" in captured.out and "kept from an interrupted run" in captured.out
    assert "pulling studio-refs: 100%" in captured.err  # not a terminal: plain progress lines, no bar
    ranges = [e["range"] for e in server.requested("metadata.arrow")]
    assert ranges == ["bytes=1000-"]
    # the files verified before the cut are not fetched again
    again = {e["path"] for e in server.log}
    assert "/bundles/studio-refs/manifest.json" in first and "/bundles/studio-refs/manifest.json" not in again
    assert Bundle.open(to / "studio-refs").verify() == []


def test_a_stalled_server_is_cut_off_at_the_file_deadline(site, tmp_path):
    folder, server, url = site
    server.gate = threading.Event()  # every answer waits: the server accepts and then says nothing
    policy = pull_mod.PullPolicy(deadline_base=0.5, min_rate=1e12, read_timeout=30)
    with pytest.raises(DownloadError, match="longer than its deadline"):
        pull(url, tmp_path / "models", progress=False, policy=policy)


def test_a_server_that_ignores_range_restarts_the_file(site, tmp_path):
    folder, server, url = site
    to = tmp_path / "models"
    server.cut["bundles/studio-refs/metadata.arrow"] = 700
    with pytest.raises(DownloadError):
        pull(url, to, progress=False)
    server.ignore_range = True
    report = pull(url, to, progress=False)
    assert report.status == "installed" and Bundle.open(to / "studio-refs").verify() == []
    assert [e["range"] for e in server.requested("metadata.arrow")] == [None, "bytes=700-"]
    assert report.kept + report.downloaded == report.total_bytes  # the 700 bytes fetched again count once


def test_a_corrupted_file_is_refused_and_nothing_installed(site, tmp_path, capsys):
    folder, server, url = site
    to = tmp_path / "models"
    server.corrupt.add("bundles/studio-refs/vectors.f16.npy")
    assert cli(["index", "pull", url, "--to", str(to), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vectors.f16.npy" in err and "sha256" in err and "publisher's copy is corrupt" in err
    assert "studio-refs" not in names_in(to)
    work = to / ".studio-refs.pull"
    assert not list(work.glob("vectors.f16.npy*")) and not (work / "bundle" / "vectors.f16.npy").exists()
    with pytest.raises(ChecksumError):
        pull(url, to, progress=False)
    server.corrupt.clear()
    assert pull(url, to, progress=False).status == "installed"


def test_a_full_disk_is_one_clear_error_and_the_partial_download_is_kept(site, tmp_path, monkeypatch, capsys):
    folder, server, url = site
    to = tmp_path / "models"
    # not enough space up front: refused before any file is fetched
    monkeypatch.setattr(pull_mod, "_free_bytes", lambda path: 1000)
    assert cli(["index", "pull", url, "--to", str(to), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs" in err and "free space" in err
    assert [e["path"] for e in server.log] == [f"/bundles/studio-refs/{PUBLISH_FILE}"]
    monkeypatch.undo()
    # the disk fills up during the download
    written = {"n": 0}
    real = pull_mod._write

    def fill_up(f, data):
        if f.name.split("/")[-1].startswith("metadata.arrow"):
            real(f, data[:500])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written["n"] += len(data)
        real(f, data)

    monkeypatch.setattr(pull_mod, "_write", fill_up)
    assert cli(["index", "pull", url, "--to", str(to), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is full" in err and "kept" in err and "Traceback" not in err
    assert "studio-refs" not in names_in(to)
    assert [p.stat().st_size for p in (to / ".studio-refs.pull").glob("metadata.arrow.*.part")] == [500]
    monkeypatch.undo()
    report = pull(url, to, progress=False)
    assert report.status == "installed" and report.kept >= 500 + written["n"]
    assert [e["range"] for e in server.requested("metadata.arrow")][-1] == "bytes=500-"


@pytest.mark.parametrize("hostile", ["../x", "/etc/passwd", "a/../../b", "..", "sub/file", "a\\b"])
def test_a_publish_file_naming_a_path_outside_the_folder_is_refused_before_any_download(site, tmp_path, hostile):
    folder, server, url = site
    listing = json.loads((folder / PUBLISH_FILE).read_text())
    listing["files"][hostile] = {"size": 4, "sha256": "0" * 64}
    listing["total_bytes"] += 4
    (folder / PUBLISH_FILE).write_text(json.dumps(listing))
    to = tmp_path / "deep" / "models"
    with pytest.raises(PublishFileError, match="not a plain file name"):
        pull(url, to, progress=False)
    assert [e["path"] for e in server.log] == [f"/bundles/studio-refs/{PUBLISH_FILE}"]
    assert not (tmp_path / "deep").exists() and not (tmp_path / "x").exists()


def test_a_manifest_escaping_its_folder_is_refused_before_the_rest(site, tmp_path):
    folder, server, url = site
    m = read_manifest(folder)
    m.files["../evil"] = {"size": 4, "sha256": "0" * 64}
    write_manifest(folder, m)
    listing = json.loads((folder / PUBLISH_FILE).read_text())
    data = (folder / "manifest.json").read_bytes()
    listing["files"]["manifest.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    listing.pop("total_bytes")
    (folder / PUBLISH_FILE).write_text(json.dumps(listing))
    to = tmp_path / "models"
    with pytest.raises(PublishFileError, match="not a plain file name"):
        pull(url, to, progress=False)
    assert {e["path"].rsplit("/", 1)[1] for e in server.log} == {PUBLISH_FILE, "manifest.json"}
    assert "studio-refs" not in names_in(to) and not (tmp_path / "evil").exists()


@pytest.mark.parametrize("no_length", [False, True], ids=["content-length", "close-delimited"])
def test_more_bytes_than_listed_are_cut_off_and_refused(site, tmp_path, no_length):
    folder, server, url = site
    server.no_length = no_length
    server.extra["bundles/studio-refs/metadata.arrow"] = b"x" * (200 << 10)
    to = tmp_path / "models"
    with pytest.raises(PublishFileError, match="more than|offers"):
        pull(url, to, progress=False)
    assert "studio-refs" not in names_in(to)
    assert not list((to / ".studio-refs.pull").glob("metadata.arrow*"))
    assert not (to / ".studio-refs.pull" / "bundle" / "metadata.arrow").exists()


def test_another_bundle_at_the_name_is_replaced_only_on_request(site, tmp_path, capsys):
    folder, server, url = site
    to = tmp_path / "models"
    pull(url, to, progress=False)
    m = read_manifest(folder)
    m.bundle_version, m.description = "v2", "after a takedown"
    write_manifest(folder, m)
    publish_bundle(folder)
    assert cli(["index", "pull", url, "--to", str(to), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds another bundle (bundle test-refs version" in err and "--replace" in err
    assert read_manifest(to / "studio-refs").bundle_version != "v2"
    assert cli(["index", "pull", url, "--to", str(to), "--no-progress", "--replace"]) == 0
    assert "replaced" in capsys.readouterr().out
    assert read_manifest(to / "studio-refs").bundle_version == "v2"
    assert names_in(to) == {"studio-refs", ".studio-refs.source.json"}
    (to / "plain").mkdir()
    with pytest.raises(NotInstallable, match="not a bundle folder"):
        pull(url, to, "plain", replace=True, progress=False)


def test_hugging_face_urls_without_huggingface_hub_say_what_to_install(monkeypatch, tmp_path, capsys):
    for name in [m for m in sys.modules if m == "huggingface_hub" or m.startswith("huggingface_hub.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    for url in ("hf://datasets/studio/refs", "https://huggingface.co/datasets/studio/refs"):
        assert cli(["index", "pull", url, "--to", str(tmp_path / "m")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pip install huggingface_hub" in err


def test_a_hugging_face_dataset_is_pulled_through_the_hub_and_the_token_stays_with_the_hub(
        built_bundle, tmp_path, monkeypatch):
    import huggingface_hub.constants

    folder = published_copy(built_bundle, tmp_path / "repo", "refs")
    server = BundleServer(tmp_path / "repo" / "site" / "bundles", prefix="/datasets/studio/refs/resolve/v1/")
    try:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        # one file is served from another host (a CDN): the token must not go there
        server.redirect["refs/index.faiss"] = f"http://localhost:{server.port}/datasets/studio/refs/resolve/v1/refs/" \
                                              f"index.faiss"
        report = pull("hf://datasets/studio/refs@v1/refs", tmp_path / "models", progress=False)
        assert report.status == "installed" and report.name == "refs"
        assert Bundle.open(tmp_path / "models" / "refs").verify() == []
        served = [e for e in server.log]
        assert served[0]["path"] == f"/datasets/studio/refs/resolve/v1/refs/{PUBLISH_FILE}"
        assert served[0]["auth"] == "Bearer hf_secret"
        faiss_hops = server.requested("index.faiss")
        assert [e["auth"] for e in faiss_hops] == ["Bearer hf_secret", None]
        # the web page's URL names the same place: already installed
        again = pull("https://huggingface.co/datasets/studio/refs/tree/v1/refs", tmp_path / "models", progress=False)
        assert again.status == "already installed"
    finally:
        server.close()
    del folder


@pytest.mark.parametrize("url,canonical", [
    ("https://h.example/b/refs", f"https://h.example/b/refs/{PUBLISH_FILE}"),
    ("https://h.example/b/refs/", f"https://h.example/b/refs/{PUBLISH_FILE}"),
    (f"HTTPS://h.example/b/refs/{PUBLISH_FILE}", f"https://h.example/b/refs/{PUBLISH_FILE}"),
    ("http://10.0.0.5:8080/refs/", f"http://10.0.0.5:8080/refs/{PUBLISH_FILE}"),
    ("hf://datasets/studio/refs", f"hf://datasets/studio/refs@main/{PUBLISH_FILE}"),
    ("hf://datasets/studio/refs@v2/laion/l14", f"hf://datasets/studio/refs@v2/laion/l14/{PUBLISH_FILE}"),
    ("https://huggingface.co/datasets/studio/refs", f"hf://datasets/studio/refs@main/{PUBLISH_FILE}"),
    ("https://huggingface.co/datasets/studio/refs/tree/v2/sub", f"hf://datasets/studio/refs@v2/sub/{PUBLISH_FILE}"),
])
def test_bundle_urls_name_one_place_each(url, canonical):
    assert parse_source(url).canonical == canonical


@pytest.mark.parametrize("url", ["ftp://h/x", "file:///etc", "/local/folder", "https://h/x?token=1",
                                 "hf://datasets/studio", "hf://datasets/../x", "hf://datasets/a/b/../c",
                                 "https://huggingface.co/datasets/a/b/commits/main", "", "https://h/a b"])
def test_bundle_urls_that_name_no_published_folder_are_refused(url):
    from provenance_guard.core.errors import ConfigError

    with pytest.raises(ConfigError):
        parse_source(url)


@pytest.mark.parametrize("change,words", [
    (lambda d: d["files"]["manifest.json"].update(size=True), "not a byte count"),
    (lambda d: d["files"]["manifest.json"].update(sha256="ABC"), "not 64 lower-case hex"),
    (lambda d: d.update(name=".hidden"), "not a plain folder name"),
    (lambda d: d.update(name="a/b"), "not a plain folder name"),
    (lambda d: d.update(format="other"), "not a provenance-guard publish file"),
    (lambda d: d["files"].pop("manifest.json"), "does not list manifest.json"),
    (lambda d: d["files"].update({f"f{i}": {"size": 1, "sha256": "0" * 64} for i in range(70)}), "at most 64"),
    (lambda d: d["files"].update({"MANIFEST.json": {"size": 1, "sha256": "0" * 64}}), "only in case"),
    (lambda d: d.update(total_bytes=1), "not the sum"),
    (lambda d: d["bundle"].update(id="refs\x1b[2J"), "control characters"),
    (lambda d: d["files"].update({"a\x1b[31m": {"size": 1, "sha256": "0" * 64}}), "control characters"),
])
def test_the_publish_file_is_parsed_strictly(built_bundle, tmp_path, change, words):
    folder = published_copy(built_bundle, tmp_path)
    data = json.loads((folder / PUBLISH_FILE).read_text())
    change(data)
    with pytest.raises(PublishFileError, match=words):
        PublishFile.parse(json.dumps(data).encode(), "test")


def test_the_publish_file_refuses_duplicate_keys_constants_and_size(built_bundle, tmp_path):
    folder = published_copy(built_bundle, tmp_path)
    text = (folder / PUBLISH_FILE).read_text()
    with pytest.raises(PublishFileError, match="twice"):
        PublishFile.parse(text.replace('"name":', '"name": "x", "name":', 1).encode(), "test")
    with pytest.raises(PublishFileError, match="not JSON"):
        PublishFile.parse(text.replace('"count": ', '"count": NaN, "c2": ', 1).encode(), "test")
    with pytest.raises(PublishFileError, match="more than any publish file"):
        PublishFile.parse(b" " * (2 << 20), "test")

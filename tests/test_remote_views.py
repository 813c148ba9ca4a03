"""Multi-view queries through the index server: /v1/check's views field (whole | multi, anything else a 422),
RemoteBundle sending the host's setting, every result saying which queries ran, and a server older than the
field (one that ignores it and queries the whole image) refused by the client, never taken for multi."""
from __future__ import annotations

import base64
import http.server
import io
import json
import threading

import numpy as np
import pytest
import requests
from PIL import Image

from provenance_guard.core.check import Checker
from provenance_guard.core.policy import Policy
from provenance_guard.demo import sample_image
from test_server import CLEAN_EXIT, start, stop


def composite() -> Image.Image:
    """A reference (astronaut) in the top-left quarter of an unrelated one (coins): a copy inside a larger image
    that the whole image's query does not rank first."""
    out = np.asarray(sample_image("coins").convert("RGB").resize((256, 256))).copy()
    out[:128, :128] = np.asarray(sample_image("astronaut").convert("RGB").resize((128, 128)))
    return Image.fromarray(out)


def encoded(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(built_bundle):
    proc, base = start(built_bundle)
    yield base
    assert stop(proc) in CLEAN_EXIT


def test_v1_check_runs_the_views_it_is_asked_for_and_says_so(served, built_bundle):
    blob = encoded(composite())
    files = [("images", ("c.png", blob, "image/png"))]

    def check(**data):
        resp = requests.post(f"{served}/v1/check", files=files, data=data, timeout=60)
        assert resp.status_code == 200, resp.text
        return resp.json()["results"][0]

    unset, whole, multi = check(), check(views="whole"), check(views="multi")
    assert unset["views"] == whole["views"] == "whole" and multi["views"] == "multi"
    assert unset["matches"][0]["url"] == whole["matches"][0]["url"] and "view" not in whole["matches"][0]
    assert multi["matches"][0]["view"] == "top-left" and multi["matches"][0]["url"] == "astronaut.png"
    assert multi["matches"][0]["score"] > max(m["score"] for m in whole["matches"] if m["url"] == "astronaut.png")
    body = {"images": [base64.b64encode(blob).decode()], "views": "multi"}
    as_json = requests.post(f"{served}/v1/check", json=body, timeout=60).json()["results"][0]
    assert as_json["views"] == "multi" and as_json["matches"][0]["view"] == "top-left"
    local = Checker(built_bundle, device="cpu", policy=Policy(views="multi", verify="confirm+escalate"))
    (mine,) = local.check([composite()])
    assert mine.views == "multi" and mine.matches[0].view == "top-left"
    assert abs(mine.matches[0].score - multi["matches"][0]["score"]) < 1e-4


@pytest.mark.parametrize("how", ["form", "json"])
@pytest.mark.parametrize("value", ["many", "Multi", "whole,multi", 2])
def test_any_other_views_value_is_a_422_naming_the_field(served, how, value):
    if how == "form":
        resp = requests.post(f"{served}/v1/check", files=[("images", ("a.png", encoded(sample_image("camera")),
                                                                      "image/png"))],
                             data={"views": str(value)}, timeout=60)
    else:
        resp = requests.post(f"{served}/v1/check", json={"images": [base64.b64encode(
            encoded(sample_image("camera"))).decode()], "views": value}, timeout=60)
    assert resp.status_code == 422, resp.text
    assert "views" in resp.json()["error"] and "'whole' or 'multi'" in resp.json()["error"]


def test_embeddings_cannot_be_queried_in_views(served, built_bundle):
    from provenance_guard.core.bundle import Bundle

    row = Bundle.open(built_bundle).vector([0])[0].tolist()
    resp = requests.post(f"{served}/v1/check", json={"embeddings": [row], "views": "multi"}, timeout=60)
    assert resp.status_code == 400 and "needs the images" in resp.json()["error"]
    resp = requests.post(f"{served}/v1/check", json={"embeddings": [row], "views": "whole"}, timeout=60)
    assert resp.status_code == 200 and resp.json()["results"][0]["views"] == "whole"


def test_a_remote_bundle_queries_in_the_hosts_views(served, built_bundle):
    """RemoteBundle sends the policy's views: a host set to multi against a server URL finds the copy in a
    quarter as a local bundle does, and its result records the queries."""
    for views in ("whole", "multi"):
        policy = Policy(views=views, verify="confirm+escalate")
        (remote,) = Checker(f"{served}/refs", policy=policy).check([composite()])
        (local,) = Checker(built_bundle, device="cpu", policy=policy).check([composite()])
        assert remote.error is None and remote.views == local.views == views
        assert [(m.url, m.view) for m in remote.matches[:3]] == [(m.url, m.view) for m in local.matches[:3]]
        assert remote.verdict == local.verdict
    assert remote.matches[0].view == "top-left" and remote.matches[0].url == "astronaut.png"


class OlderServer:
    """A server from before the views field, made of the real one: it ignores the field (the form's views part is
    rewritten to whole, as such a server queries) and its results carry no "views" key."""

    def __init__(self, upstream: str):
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                body = body.replace(b'name="views"\r\n\r\nmulti', b'name="views"\r\n\r\nwhole')
                resp = requests.post(upstream + self.path, data=body, timeout=60,
                                     headers={"Content-Type": self.headers["Content-Type"]})
                out = resp.json()
                for r in out.get("results", []):
                    r.pop("views", None)
                data = json.dumps(out).encode()
                self.send_response(resp.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("mode,verdict", [("open", "unchecked"), ("closed", "block")])
def test_a_server_that_ignores_views_is_refused_never_taken_for_multi(served, mode, verdict):
    older = OlderServer(served)
    try:
        (whole,) = Checker(f"{older.base}/refs", policy=Policy(views="whole", fail_mode=mode)).check([composite()])
        assert whole.error is None and whole.views == "whole"  # what it ran is what was asked
        (multi,) = Checker(f"{older.base}/refs", policy=Policy(views="multi", fail_mode=mode)).check([composite()])
    finally:
        older.close()
    assert multi.verdict == verdict and not multi.matches
    assert "ran whole-image queries where views 'multi' was asked" in multi.error
    assert "upgrade the server, or set views to whole" in multi.error

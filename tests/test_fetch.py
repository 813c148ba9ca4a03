"""The fetch guard (core/fetch.py) through the real requests and urllib3 stack: the address check runs at
connect time, in the connection hook urllib3 calls, before any socket connects."""
from __future__ import annotations

import http.server
import socket
import threading

import pytest

from provenance_guard.core.fetch import FetchError, FetchPolicy, fetch


@pytest.fixture()
def resolver(monkeypatch):
    """socket.getaddrinfo answering `internal.example` with an address the test picks; every look-up and
    every connect() is recorded."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    seen = {"lookups": [], "connects": [], "address": "10.0.0.7"}

    def getaddrinfo(host, port, *args, **kwargs):
        seen["lookups"].append(host)
        if host == "internal.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (seen["address"], port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    def connect(sock, address):
        seen["connects"].append(address)
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


@pytest.fixture()
def local_origin():
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = self.headers.get("Host", "").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_a_name_that_resolves_to_a_private_address_is_refused_before_connecting(resolver):
    """If urllib3 stopped calling the guarded connection hook, urllib3 would resolve and connect by
    itself: the reason would not name the address, and a connect() would be recorded."""
    for address in ("10.0.0.7", "169.254.169.254", "127.0.0.1"):
        resolver["address"] = address
        with pytest.raises(FetchError) as info:
            fetch("http://internal.example:8080/x.png", FetchPolicy(deadline=3.0), public="nope")
        assert str(info.value) == "nope"
        assert f"internal.example resolves to {address}, which is not a public address" in info.value.reason
        assert info.value.kind == "refused address"
    assert resolver["connects"] == [] and set(resolver["lookups"]) == {"internal.example"}


def test_the_guard_connects_to_the_address_it_checked(resolver, local_origin):
    """The same hook makes the connection it allowed: loopback let through (a test's option), the request
    sent to the address the guard resolved, under the URL's own host name."""
    resolver["address"] = "127.0.0.1"
    body = fetch(f"http://internal.example:{local_origin}/x.png", FetchPolicy(deadline=3.0, allow_loopback=True))
    assert body == f"internal.example:{local_origin}".encode()
    assert resolver["connects"] == [("127.0.0.1", local_origin)]

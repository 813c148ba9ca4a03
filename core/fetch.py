"""Fetching an image from a URL someone else gave us (the server's image_url queries, reference images of
LAION-style bundles), without letting the URL reach what it must not.

- http(s) only; the host is resolved and every connection goes to an address checked first: loopback,
  private, link-local, shared, multicast, reserved and unspecified addresses are refused (an option lets
  loopback through, for tests). The check is made on the socket's own address, on every connection, so a
  redirect or a DNS answer that changes between look-ups cannot slip past it; redirects are followed by
  hand (at most ``max_redirects``) and each is checked again.
- bounded: a connect and a read timeout, a total deadline per fetch enforced on the sockets themselves (at
  the deadline every connection of the fetch is shut down, so a host that drips a byte at a time costs its
  own fetch only, never a pool thread beyond the deadline), a byte cap (Content-Length is refused before
  reading, a body is cut off at the cap), and a small pool of workers with a short queue: slow URLs occupy
  the pool, never the caller's threads, and beyond the queue a fetch is refused at once.
- quiet: every failure is one FetchError whose public message does not tell a refused address, a 404, a
  timeout or a non-image apart (a caller must not be able to map a network through it); ``reason`` holds
  the detail for the server's own log.
Proxies and netrc from the environment are ignored (trust_env off): a proxy would connect for us.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urljoin, urlparse

from .errors import ProvenanceError


class FetchError(ProvenanceError):
    """A URL could not be fetched; the message is the same whatever the reason (see ``reason``)."""

    def __init__(self, public: str, reason: str):
        super().__init__(public)
        self.reason = reason

    @property
    def kind(self) -> str:
        """The reason in a few words a record may carry (where this machine's user reads it, never a server's
        client): no addresses, hosts or exception text; ``reason`` holds those, for the log."""
        reason = self.reason
        for words, kind in (("not a public address", "refused address"), ("has no address", "refused address"),
                            ("not an http(s) URL", "not an http(s) URL"), ("deadline", "timed out"),
                            ("Timeout", "timed out"), ("Content-Length", "too large"), ("bytes", "too large"),
                            ("redirects", "too many redirects"), ("HTTP ", "HTTP error"), ("busy", "busy"),
                            ("pool and queue full", "busy")):
            if words in reason:
                return kind
        return "connection failed"


class FetchBusy(FetchError):
    """The fetch pool and its queue are full; try again later."""


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int = 20 << 20
    connect_timeout: float = 3.0
    read_timeout: float = 5.0
    deadline: float = 10.0
    max_redirects: int = 3
    allow_loopback: bool = False


def address_allowed(address: str, allow_loopback: bool = False) -> bool:
    """Whether a connection to this IP address is allowed: public unicast only (loopback on request)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    if ip.is_loopback:
        return allow_loopback
    return ip.is_global and not ip.is_multicast and not ip.is_reserved and not ip.is_unspecified


class _Refused(OSError):
    pass


def _connection_classes(policy: FetchPolicy, opened: list | None = None, any_address: bool = False):
    """urllib3 connection pools whose connections check the address they connect to (none with
    ``any_address``: a download the user asked for) and, with ``opened``, list the sockets they open, for a
    deadline that shuts them down."""
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    # urllib3 opens every connection's socket in HTTPConnection._new_conn (1.x and 2.x alike) and has no public
    # hook that sees the address before connect() (socket_options are setsockopt values, not a callback);
    # tests/test_fetch.py fails if a urllib3 release stops calling it.
    def new_conn(self):
        timeout = self.timeout if isinstance(self.timeout, (int, float)) else policy.connect_timeout
        last: Exception | None = None
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM):
            if not any_address and not address_allowed(sockaddr[0], policy.allow_loopback):
                last = _Refused(f"{self.host} resolves to {sockaddr[0]}, which is not a public address")
                continue
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                if opened is not None:
                    opened.append(sock)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
        raise last or _Refused(f"{self.host} has no address")

    class Plain(HTTPConnection):
        _new_conn = new_conn

    class Secure(HTTPSConnection):
        _new_conn = new_conn

    class PlainPool(HTTPConnectionPool):
        ConnectionCls = Plain

    class SecurePool(HTTPSConnectionPool):
        ConnectionCls = Secure

    return PlainPool, SecurePool


@contextmanager
def deadline_session(policy: FetchPolicy, seconds: float, any_address: bool = False):
    """(session, expired): an http_session whose every connection is shut down ``seconds`` from now (a read
    blocked in recv() then returns at once, and ``expired`` is set), closed on leaving."""
    opened: list = []
    session = http_session(policy, opened, any_address)
    expired = threading.Event()

    def cut_off() -> None:
        expired.set()
        for sock in list(opened):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(seconds, cut_off)
    timer.daemon = True
    timer.start()
    try:
        yield session, expired
    finally:
        timer.cancel()
        session.close()


def http_session(policy: FetchPolicy, opened: list | None = None, any_address: bool = False):
    """A requests session through those pools; proxies and netrc from the environment are ignored."""
    import requests
    from requests.adapters import HTTPAdapter

    plain, secure = _connection_classes(policy, opened, any_address)

    class Adapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": plain, "https": secure}

    session = requests.Session()
    session.trust_env = False
    adapter = Adapter(max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def fetch(url: str, policy: FetchPolicy = FetchPolicy(), public: str = "the URL could not be fetched") -> bytes:
    """The body at url, under policy; FetchError (message ``public``) for any failure."""
    import requests

    start = time.monotonic()

    def fail(reason: str):
        return FetchError(public, reason)

    with deadline_session(policy, policy.deadline) as (session, expired):
        for _ in range(policy.max_redirects + 1):
            parsed = urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise fail(f"{url!r} is not an http(s) URL")
            left = policy.deadline - (time.monotonic() - start)
            if left <= 0:
                raise fail("deadline passed")
            try:
                resp = session.get(url, stream=True, allow_redirects=False,
                                   timeout=(min(policy.connect_timeout, left), min(policy.read_timeout, left)))
            except (requests.RequestException, OSError) as exc:
                raise fail("deadline passed" if expired.is_set() else f"{type(exc).__name__}: {exc}") from None
            with resp:
                if resp.is_redirect and resp.headers.get("location"):
                    url = urljoin(url, resp.headers["location"])
                    continue
                if resp.status_code != 200:
                    raise fail(f"HTTP {resp.status_code}")
                length = resp.headers.get("content-length", "")
                if length.isdigit() and int(length) > policy.max_bytes:
                    raise fail(f"Content-Length {length} is over {policy.max_bytes}")
                body = bytearray()
                try:
                    for chunk in resp.iter_content(64 << 10):
                        body += chunk
                        if len(body) > policy.max_bytes:
                            raise fail(f"body is over {policy.max_bytes} bytes")
                        if time.monotonic() - start > policy.deadline:
                            raise fail("deadline passed while reading")
                except (requests.RequestException, OSError) as exc:
                    raise fail("deadline passed while reading" if expired.is_set()
                               else f"{type(exc).__name__}: {exc}") from None
                if expired.is_set():
                    raise fail("deadline passed while reading")
                return bytes(body)
        raise fail(f"more than {policy.max_redirects} redirects")


class Fetcher:
    """A small pool for fetches (``workers`` at once, ``queue`` more waiting, the rest refused at once)."""

    def __init__(self, policy: FetchPolicy = FetchPolicy(), workers: int = 4, queue: int = 16,
                 public: str = "the URL could not be fetched"):
        self.policy, self.public = policy, public
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="provenance-guard-fetch")
        self._slots = threading.BoundedSemaphore(workers + queue)

    def submit(self, url: str) -> Future[bytes]:
        if not self._slots.acquire(blocking=False):
            raise FetchBusy(self.public + " (too many fetches at once; try again shortly)", "pool and queue full")
        try:
            future = self._pool.submit(fetch, url, self.policy, self.public)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def get(self, url: str) -> bytes:
        """Fetch and wait (the deadline bounds the wait too)."""
        future = self.submit(url)
        try:
            return future.result(timeout=self.policy.deadline + 1.0)
        except FutureTimeout:
            raise FetchError(self.public, "deadline passed (resolving or connecting)") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

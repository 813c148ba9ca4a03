"""A published bundle served as static hosting serves it, for the hosts' bundle-URL tests: a local HTTP server
that counts the requests and can hold its answers."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def static_site(root: Path, hold_s: float = 45):
    """root served as static hosting serves a published bundle: a ThreadingHTTPServer on 127.0.0.1 (a port of
    its own) in a thread of this process. Yields (base URL, site): site["requests"] lists every request's
    (method, path); every answer waits until site["gate"] (an Event) is set, or at most hold_s seconds (below a
    pull's 60 s read timeout, so that a held answer never fails the pull; site["released"] counts those)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    site = {"requests": [], "gate": threading.Event(), "released": 0}
    lock = threading.Lock()

    class Handler(SimpleHTTPRequestHandler):
        def _held(self) -> None:
            with lock:
                site["requests"].append((self.command, self.path))
            if not site["gate"].wait(hold_s):
                with lock:
                    site["released"] += 1

        def do_GET(self):
            self._held()
            super().do_GET()

        def do_HEAD(self):
            self._held()
            super().do_HEAD()

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, name="e2e-static-site", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", site
    finally:
        site["gate"].set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def wait_for(what: str, ready, timeout: float) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline, f"{what} within {timeout} s"
        time.sleep(0.25)

"""Guard, the ASGI layer in front of the routes: the token and the declared body size checked before a request
reaches a route, the busy routes called straight (past FastAPI's own layers), and each request counted."""
from __future__ import annotations

import hmac
import logging
import time

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:  # pragma: no cover
    from .config import ServerConfig

log = logging.getLogger("provenance_guard.server")


class Guard:
    """Token and declared-size checks before a request reaches a route, and request metrics after it.
    Plain ASGI: starlette's BaseHTTPMiddleware would run every request through an extra task and stream."""

    def __init__(self, app, config: ServerConfig, metrics, problem, direct: dict | None = None):
        self.app, self.config, self.metrics, self.problem = app, config, metrics, problem
        self.direct = direct if direct is not None else {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        status = 500
        counted = path if path in KNOWN_PATHS else "other"  # labels stay a bounded set
        self.metrics.started(counted)

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self.refusal(path, dict(scope["headers"]))
            if refusal is not None:
                return await refusal(scope, receive, send_status)
            route = self.direct.get((scope["method"], path))
            if route is None:
                return await self.app(scope, receive, send_status)
            try:
                response = await route(Request(scope, receive))
            except Exception:  # noqa: BLE001 - what FastAPI's error middleware would do: log it, answer 500
                log.exception("%s %s failed", scope["method"], path)
                response = self.problem(500, "internal server error")
            await response(scope, receive, send_status)
        finally:
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"  # labels stay a bounded set
            self.metrics.request(counted, method, status, time.perf_counter() - t0)

    def refusal(self, path: str, headers: dict):
        token, limit = self.config.token, self.config.max_request_bytes
        if token and path != "/healthz":
            header = headers.get(b"authorization", b"")
            given = header[7:] if header.lower().startswith(b"bearer ") else b""
            if not hmac.compare_digest(given, token.encode()):
                return self.problem(401, "missing or wrong token: send \"Authorization: Bearer <token>\"")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return self.problem(413, f"request body of {int(length):,} bytes is over the limit of {limit:,}")
        return None


KNOWN_METHODS = {"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"}
KNOWN_PATHS = {"/healthz", "/indices-list", "/v1/indices", "/knn-service", "/metadata", "/v1/check", "/metrics"}


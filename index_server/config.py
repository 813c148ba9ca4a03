"""The server's settings (ServerConfig), its one error type for requests (HTTPProblem), and its limits."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MAX_WORKERS = 64


@dataclass
class ServerConfig:
    indices: dict[str, str]
    token: str | None = None
    allow_image_url: bool = False
    # Tests only: lets image_url reach loopback addresses (never private or link-local ones).
    allow_loopback_fetch: bool = False
    max_request_bytes: int = 20 << 20
    max_images_per_request: int = 64
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    device: str = "auto"
    audit_log: str | None = None
    warn: float | None = None
    block: float | None = None
    fail_mode: str = "open"
    # Decoded image memory all requests together may hold; beyond it requests wait, then get 503.
    max_decode_memory: int = 2 << 30
    admission_wait_s: float = 10.0
    openapi: bool = False
    verify: str = "confirm+escalate"
    verify_from: float | None = None
    references: Any = None  # core.references.ReferenceOptions
    # Processes serving the same socket (uvicorn's own workers); each maps the bundles (their pages are
    # shared) and loads its own model.
    workers: int = 1
    # The model image and text queries are embedded with: None = each bundle's own; a local file or folder
    # holding the same weights (checked by the bundle's fingerprint before the port listens).
    model: str | None = None
    # Serve embedding queries only: no model is loaded, image and text queries are refused.
    embeddings_only: bool = False
    # Connections: a client must send a request's headers within header_timeout_s of connecting (or of its
    # previous response), and its body within body_timeout_s; idle keep-alive connections close after
    # keep_alive_s; beyond max_connections open connections per worker, requests get 503.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: int = 5
    max_connections: int = 1000
    extra: dict[str, Any] = field(default_factory=dict)


class HTTPProblem(Exception):
    """A request the server answers with an error status and a JSON {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers

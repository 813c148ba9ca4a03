"""A bundle on an index server: ``http(s)://host:port/NAME`` checks through `provenance-guard serve`'s
POST /v1/check, so a ComfyUI node, an A1111 extension and a gate can share one studio index without a
local model or bundle. Requests time out, are retried with exponential backoff on connection errors and
5xx answers, and a server that stays down raises ProvenanceError, which the caller's fail mode turns into
'unchecked' or 'block'. The token comes from PROVENANCE_GUARD_TOKEN (or token=). The views setting
(core.policy.VIEWS) is sent with every check, and a server whose results do not say they ran those queries
(one older than multi-view queries ignores the field) is refused the same way: never a silent whole-image
query where multi was asked.
"""
from __future__ import annotations

import io
import os
import time
from urllib.parse import urlparse

from .errors import ConfigError, ProvenanceError
from .images import Pixels
from .result import BundleThresholds, CheckResult, Match

ENV_TOKEN = "PROVENANCE_GUARD_TOKEN"


def is_remote(source) -> bool:
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


class ServerDown(ProvenanceError):
    """The index server could not be reached or kept failing; the fail mode decides."""


class ViewsUnsupported(ConfigError):
    """The index server did not run the queries the views setting asks for (it predates multi-view queries);
    the fail mode decides, as for any check that could not run."""


class RemoteBundle:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5):
        parsed = urlparse(url)
        name = parsed.path.strip("/").split("/")[-1] if parsed.path.strip("/") else ""
        if not parsed.hostname or not name:
            raise ConfigError(f"remote bundle {url!r}: give http(s)://host:port/INDEX_NAME")
        self.url, self.name = url, name
        self.base = f"{parsed.scheme}://{parsed.netloc}"
        self.token = token if token is not None else os.environ.get(ENV_TOKEN)
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.id = name
        self.exact = True

    def __repr__(self) -> str:
        return f"RemoteBundle({self.url!r})"

    def _post(self, path: str, files, data) -> dict:
        import requests

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        last = None
        for attempt in range(self.retries + 1):
            try:
                resp = requests.post(self.base + path, files=files, data=data, headers=headers,
                                     timeout=(min(3.0, self.timeout), self.timeout))
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 400:
                    return resp.json()
                try:
                    message = resp.json().get("error", resp.text[:300])
                except ValueError:
                    message = resp.text[:300]
                if resp.status_code == 401:
                    raise ConfigError(f"index server {self.base} refused the token ({message}); set "
                                      f"{ENV_TOKEN} to the server's token")
                if resp.status_code < 500:
                    raise ConfigError(f"index server {self.base}: {message}")
                last = f"HTTP {resp.status_code}: {message}"
            if attempt < self.retries:
                time.sleep(self.backoff * (2 ** attempt))
        raise ServerDown(f"index server {self.base} is unavailable after {self.retries + 1} tries ({last})")

    def check(self, pixels: list[Pixels], policy) -> list[CheckResult]:
        """The server's results for these images against this index (policy's thresholds, top-k)."""
        from PIL import Image

        files = []
        for n, p in enumerate(pixels):
            buf = io.BytesIO()
            Image.fromarray(p.tensor.detach().cpu().numpy()).save(buf, "PNG", compress_level=1)
            files.append(("images", (f"{n}.png", buf.getvalue(), "image/png")))
        data = {"indices": self.name, "top_k": str(policy.top_k), "fail_mode": "open", "verify": policy.verify,
                "views": policy.views}
        if policy.warn is not None:
            data["warn"] = str(policy.warn)
        if policy.block is not None:
            data["block"] = str(policy.block)
        out = self._post("/v1/check", files, data)
        results = [CheckResult.from_json(r) for r in out.get("results", [])]
        if len(results) != len(pixels):
            raise ServerDown(f"index server {self.base} answered {len(results)} results for {len(pixels)} images")
        for r in results:
            if r.error:  # the server could not check: this side's fail mode decides
                raise ProvenanceError(f"index server {self.base}: {r.error}")
            # A server that predates views ignores the field and queries the whole image: never taken for multi.
            if r.views != policy.views and (policy.views != "whole" or r.views is not None):
                raise ViewsUnsupported(
                    f"index server {self.base} ran {r.views or 'whole-image'} queries where views "
                    f"{policy.views!r} was asked (a server older than multi-view queries ignores the setting): "
                    f"upgrade the server, or set views to whole for this index")
        return results

    def search(self, pixels: list[Pixels], policy) -> tuple[list[list[Match]], list[BundleThresholds]]:
        results = self.check(pixels, policy)
        thresholds = results[0].thresholds if results else []
        return [r.matches for r in results], thresholds

"""Defaults and environment variables: every tunable number of the package lives here, once.

Thresholds are exact cosines between L2-normalised CLIP image embeddings. The literature gives no CLIP
cut-off for "copy"; dataset de-duplication uses 0.94 (clip-retrieval) to ~0.95 (LAION-2B), so a score at
or above 0.95 is a near-duplicate of a training image (block) and 0.90 flags likely edits (warn). A bundle's
manifest may carry its own; a call may override both.
"""
from __future__ import annotations

import os

DEFAULT_WARN = 0.90
DEFAULT_BLOCK = 0.95
DEFAULT_TOP_K = 10
DEFAULT_FAIL_MODE = "open"
FAIL_MODES = ("open", "closed")

DEFAULT_BATCH_SIZE = 32
# ~ 12k x 8k: large enough for any upscaled generation, small enough that decoding cannot exhaust RAM.
DEFAULT_MAX_PIXELS = 100_000_000
# An approximate index returns k + (factor - 1) * min(k, 10) candidates for exact re-ranking: 4 x k for
# a check's top-10, a few dozen extra for long result lists.
RERANK_CANDIDATES_FACTOR = 4
METADATA_BATCH_ROWS = 65536

# Seconds to wait for the weights host before reporting that the model cannot be fetched.
NETWORK_PROBE_TIMEOUT_S = 3.0

ENV_MAX_PIXELS = "PROVENANCE_GUARD_MAX_PIXELS"
ENV_DEVICE = "PROVENANCE_GUARD_DEVICE"


def max_pixels() -> int:
    """The decompression-bomb cap in pixels (width x height); env PROVENANCE_GUARD_MAX_PIXELS overrides."""
    raw = os.environ.get(ENV_MAX_PIXELS)
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        from .errors import ConfigError

        raise ConfigError(f"{ENV_MAX_PIXELS}={raw!r} is not a whole number of pixels; unset it or give e.g. 100000000")
    return value

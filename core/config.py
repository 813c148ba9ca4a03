"""Shared defaults and environment variables: the thresholds, limits and switches more than one module reads.
A number only one module uses lives beside its use, named and explained there.

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
# Bytes one image may take decoded, in its own mode (100 MP RGBA = 400 MB fits): a larger JPEG is decoded at a
# reduced scale, anything else is refused. Converting it to 8-bit RGB adds at most 3 bytes per pixel, so
# one image costs well under 1.5 GB whatever its format.
DEFAULT_MAX_DECODE_BYTES = 512 << 20
ENV_MAX_DECODE_BYTES = "PROVENANCE_GUARD_MAX_DECODE_BYTES"


def _env_int(name: str, default: int, example: str) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        from .errors import ConfigError

        raise ConfigError(f"{name}={raw!r} is not a positive whole number; unset it or give e.g. {example}")
    return value


def max_pixels() -> int:
    """The decompression-bomb cap in pixels (width x height); env PROVENANCE_GUARD_MAX_PIXELS overrides."""
    return _env_int(ENV_MAX_PIXELS, DEFAULT_MAX_PIXELS, "100000000")


def max_decode_bytes() -> int:
    """Bytes one image may take decoded; env PROVENANCE_GUARD_MAX_DECODE_BYTES overrides."""
    return _env_int(ENV_MAX_DECODE_BYTES, DEFAULT_MAX_DECODE_BYTES, str(DEFAULT_MAX_DECODE_BYTES))

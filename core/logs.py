"""Logging inside the hosts: what third-party libraries may print there, and the one line of our own.

ComfyUI and the webuis show INFO logs in their console. faiss logs its CPU-feature fallbacks at INFO
("Could not load library with AVX512 support"), and open_clip logs through the root logger ("Loaded ...
model config."): in a host's console both read as errors. ``quiet_third_party()`` keeps their records
below WARNING out of the console, and nothing else of the host's logging changes.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
from contextlib import contextmanager

log = logging.getLogger("provenance_guard")

_QUIET_PACKAGES = ("open_clip", "faiss")
_installed = False
_lock = threading.Lock()


class _BelowWarningFrom(logging.Filter):
    """Drops records below a level that were emitted from files inside the given folders."""

    def __init__(self, folders: list[str], below: int = logging.WARNING):
        super().__init__()
        self.folders = tuple(os.path.join(os.path.realpath(f), "") for f in folders)
        self.below = below

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.below:
            return True
        return not os.path.realpath(record.pathname).startswith(self.folders)


def _package_folders(names) -> list[str]:
    folders = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            folders.extend(spec.submodule_search_locations)
    return folders


@contextmanager
def silenced(package: str, below: int = logging.ERROR):
    """Drop records below ``below`` emitted from package's files while the block runs (open_clip warns "No
    pretrained weights loaded ... initialized randomly" for every model we build and then load ourselves)."""
    root = logging.getLogger()
    quiet = _BelowWarningFrom(_package_folders([package]), below)
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def quiet_third_party() -> None:
    """Keep faiss's and open_clip's INFO/DEBUG records out of the host's console (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        for name in _QUIET_PACKAGES:
            logging.getLogger(name).setLevel(logging.WARNING)
        folders = _package_folders(_QUIET_PACKAGES)
        if folders:
            # open_clip calls logging.info() on the root logger: only a filter on the root logger sees those.
            logging.getLogger().addFilter(_BelowWarningFrom(folders))

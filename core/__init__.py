"""The shared core: image -> embed -> search -> re-rank -> verdict -> act, with no host imports.

Stages, data flowing one way:
images.py (pixels) -> embed.py (+ models.py: open_clip loading) -> search.py (FAISS + exact re-rank over a
bundle: the bundle/ package, reader.py, writer.py, manifest.py, rerank.py, rows.py) -> policy.py (verdict)
-> verify.py (pixels of the training image) -> record.py (PNG chunk / sidecar) and credentials.py (C2PA).
check.py runs the pipeline; result.py holds the dataclasses it returns; errors.py the named errors;
config.py the shared defaults and environment variables. Beside the check: memorization.py (the sampler's
signal), captions.py (the prompt side), references.py, remote.py (a studio server as a bundle), fetch.py
and pull.py (bytes from the network), audit.py, html_report.py and report.py (what a person reads),
progress.py, logs.py, fingerprint.py.

Importing this package loads neither torch nor faiss: the names below resolve on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Checker": "check", "model_override_problem": "check",
    "Bundle": "bundle", "BundleWriter": "bundle", "Manifest": "bundle", "read_manifest": "bundle",
    "Embedder": "embed", "get_embedder": "embed", "resolve_device": "embed",
    "ModelSpec": "models",
    "Policy": "policy", "PASS": "policy", "WARN": "policy", "BLOCK": "policy", "UNCHECKED": "policy",
    "CheckResult": "result", "Match": "result", "GenerationRecord": "result",
    "write_record": "record", "read_record": "record", "read_generation": "record",
    "to_pixels": "images", "find_images": "images",
    "ProvenanceError": "errors", "ConfigError": "errors", "ModelLoadError": "errors", "BundleError": "errors",
    "ManifestError": "errors", "BundleFileError": "errors", "IndexCorruptError": "errors",
    "DimensionMismatchError": "errors", "RowCountMismatchError": "errors", "ImageInputError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

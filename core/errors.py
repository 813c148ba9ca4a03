"""The named errors of provenance-guard: each message says what went wrong, where, and what to do.

Every error carries the exit code the command-line tool uses for it, so a surface (CLI, node,
extension, server) can report it without knowing its kind:
2 = usage or configuration (a bundle, a model, an option), 3 = an image could not be checked.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FLAGGED = 1
EXIT_CONFIG = 2
EXIT_UNCHECKED = 3


class ProvenanceError(Exception):
    """Base class; catch this to handle every error of the package."""

    exit_code = EXIT_CONFIG


class ConfigError(ProvenanceError):
    """An option, threshold or model spec is not usable."""


class ModelLoadError(ConfigError):
    """An open_clip model could not be built or its weights could not be found or fetched."""


class BundleError(ConfigError):
    """A bundle cannot be opened or used; the message names the file and the fix."""


class ManifestError(BundleError):
    """manifest.json is missing, unreadable, or of a format version this release does not know."""


class BundleFileError(BundleError):
    """A file the manifest lists is missing, has the wrong size, or fails its checksum."""


class IndexCorruptError(BundleError):
    """The FAISS index file cannot be read (truncated or not a FAISS index)."""


class DimensionMismatchError(BundleError):
    """Vectors of one dimension met an index, model or file of another."""

    @classmethod
    def model_for(cls, model: object, got: int, bundle) -> DimensionMismatchError:
        """A model whose embeddings have another dimension than a bundle's vectors, said one way everywhere."""
        return cls(f"model {model} gives {got}-d embeddings but bundle {bundle.id} ({bundle.path}) holds "
                   f"{bundle.dim}-d vectors of {bundle.model}; check with the bundle's model")


class RowCountMismatchError(BundleError):
    """Index, metadata and re-rank vectors disagree on how many rows the bundle has."""


class ImageInputError(ProvenanceError):
    """An image could not be read or is not acceptable (unknown type, too many pixels)."""

    exit_code = EXIT_UNCHECKED


class BundleBusyError(BundleError):
    """Another maintenance operation holds the bundle's lock (and --no-wait was given)."""


class DiskFullError(ProvenanceError):
    """The disk filled up while writing; temporary files were removed and the old bundle is untouched."""

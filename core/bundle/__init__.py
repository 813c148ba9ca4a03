"""The index bundle: the one on-disk format every surface opens, and the one writer that makes it.

A bundle is a folder::

    manifest.json      what the bundle is (see Manifest); written last, so a folder without it is no bundle
    index.faiss        the FAISS index over the rows (inner product on unit vectors = cosine)
    index.ivfdata      inverted lists of a large IVF index, kept on disk and memory-mapped (optional)
    trained.index      the trained, empty index, so rows can be appended without retraining (IVF bundles)
    metadata.arrow     Arrow IPC file, one row per vector: url, caption and every column the source had,
                       in record batches of ``metadata.batch_rows`` rows so row i is found in O(1)
    vectors.f16.npy    the unit vectors as float16 for exact re-ranking, or vectors.i8.npy + vectors.scale.npy
                       (int8 codes with one scale per row); optional: without them scores are the index's
                       approximations and every result says so
    removed.npy        sorted row ids taken out (opt-outs, takedowns); FAISS never returns them (optional)

Opening costs O(1) in the bundle's size: the manifest is read, files are checked against their recorded
sizes, and index, metadata and vectors are memory-mapped read-only. Row ids are positions (0-based) in the
order rows were added; removal keeps positions, so ids stay stable across versions.

The package, one concern a module: manifest.py (manifest.json, file names), reader.py (opening, validation,
reading rows), rerank.py (re-rank vector codecs, writers, the re-rank inside FAISS), writer.py (BundleWriter,
metadata, publishing), lock.py (maintenance operations take turns). The names below are the public ones.
"""
from .lock import BundleLock, lock_path
from .manifest import (CAPTION_COLUMNS, FORMAT, FORMAT_VERSION, INDEX_FILE, IVFDATA_FILE, MANIFEST, METADATA_FILE,
                       REMOVED_FILE, RERANK_DTYPES, SCALES_FILE, TRAINED_FILE, URL_COLUMNS, VECTORS_FILE,
                       VECTORS_I8_FILE, Manifest, bundle_file, check_file_name, manifest_stamp, read_manifest,
                       sha256_file, utc_now, write_manifest)
from .reader import Bundle, quiet_stdout, read_removed, search_parameters
from .rerank import RerankAppender, RerankFileWriter, decode_rerank, encode_rerank, rerank_file_names
from .writer import (BundleWriter, MetadataWriter, finalize, human, is_disk_full, normalize_metadata, publish,
                     space_for, staging, sweep_leftovers, write_caption_index)

__all__ = [
    "Bundle", "BundleLock", "BundleWriter", "CAPTION_COLUMNS", "FORMAT", "FORMAT_VERSION", "INDEX_FILE",
    "IVFDATA_FILE", "MANIFEST", "METADATA_FILE", "Manifest", "MetadataWriter", "REMOVED_FILE", "RERANK_DTYPES",
    "RerankAppender", "RerankFileWriter", "SCALES_FILE", "TRAINED_FILE", "URL_COLUMNS", "VECTORS_FILE",
    "VECTORS_I8_FILE", "bundle_file", "check_file_name", "decode_rerank", "encode_rerank", "finalize",
    "human", "is_disk_full", "lock_path", "manifest_stamp", "normalize_metadata", "publish", "quiet_stdout", "read_manifest",
    "read_removed", "rerank_file_names", "search_parameters", "sha256_file", "space_for", "staging", "sweep_leftovers", "utc_now", "write_caption_index",
    "write_manifest",
]

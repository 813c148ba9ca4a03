"""The bundle format: writing, O(1) opening, validation errors by name, and CLI exit codes for them."""
from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest

from provenance_guard.cli import main as cli
from provenance_guard.core.bundle import (FORMAT_VERSION, INDEX_FILE, METADATA_FILE, VECTORS_FILE, Bundle,
                                          BundleWriter, normalize_metadata, read_manifest)
from provenance_guard.core.errors import (BundleFileError, ConfigError, DimensionMismatchError, ImageInputError,
                                          IndexCorruptError, ManifestError, RowCountMismatchError)
from provenance_guard.core.search import search


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_manifest(path: Path, edit) -> None:
    data = json.loads((path / "manifest.json").read_text())
    edit(data)
    (path / "manifest.json").write_text(json.dumps(data))


def refresh_file_entry(path: Path, name: str) -> None:
    write_manifest(path, lambda d: d["files"][name].update(size=(path / name).stat().st_size))


def test_built_bundle_layout_and_manifest(built_bundle):
    m = read_manifest(built_bundle)
    assert m.format_version == FORMAT_VERSION and m.count == 6 and m.dim == 64
    assert m.model.startswith("local-dir:") and m.index_factory == "Flat" and m.exact
    assert set(m.files) == {INDEX_FILE, METADATA_FILE, VECTORS_FILE, "captions.npy"} and m.captions_file
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in m.files.values())
    assert m.build["sources"][0]["kind"] == "images" and m.build["created"].endswith("Z")
    b = Bundle.open(built_bundle)
    assert b.vectors.dtype == np.float16 and b.vectors.shape == (6, 64)
    assert isinstance(b.vectors, np.memmap)
    row = b.rows([1])[0]
    assert row["url"] == "chelsea.png" and row["caption"] == "Chelsea the cat, close-up"
    assert {"path", "sha256", "width", "height"} <= set(row)
    assert not list(built_bundle.parent.glob(".refs.tmp-*"))  # the temporary folder is gone


def test_writer_streams_many_batches_with_fixed_metadata_batches(tmp_path):
    n, d = 70_000, 8
    vecs = unit(n, d)
    with BundleWriter(tmp_path / "b", model="ViT-B-32/openai", dim=d) as w:
        for start in range(0, n, 9_999):
            stop = min(n, start + 9_999)
            w.add(vecs[start:stop], pa.table({"URL": [f"u{i}" for i in range(start, stop)],
                                              "TEXT": [f"c{i}" for i in range(start, stop)],
                                              "similarity": np.full(stop - start, 0.3)}))
        w.finish()
    b = Bundle.open(tmp_path / "b")
    assert b.count == n and b.columns == ["url", "caption", "similarity"]
    assert [r["url"] for r in b.rows([0, 65_535, 65_536, n - 1])] == ["u0", "u65535", "u65536", f"u{n - 1}"]
    np.testing.assert_allclose(b.vector([5, 65_600]), vecs[[5, 65_600]], atol=2e-3)
    out = search(b, vecs[[12, 69_000]], 3)
    assert [m[0].row_id for m in out.matches] == [12, 69_000]
    assert out.matches[0][0].score > 0.999 and out.matches[0][0].url == "u12"


@pytest.mark.parametrize("cols,url,caption", [
    ({"URL": ["a"], "TEXT": ["t"], "WIDTH": [1], "punsafe": [0.1]}, "URL", "TEXT"),  # LAION-5B release
    ({"url": ["a"], "caption": ["t"], "key": ["000"], "image_path": ["x"]}, "url", "caption"),  # clip-retrieval
    ({"SAMPLE_ID": [7], "URL": ["a"], "TEXT": ["t"], "LICENSE": ["?"], "NSFW": ["UNLIKELY"]}, "URL", "TEXT"),
])
def test_metadata_conventions_normalised_and_kept(cols, url, caption):
    t = normalize_metadata(pa.table(cols))
    assert t.column_names[:2] == ["url", "caption"]
    assert t.column("url").to_pylist() == ["a"] and t.column("caption").to_pylist() == ["t"]
    others = [c for c in cols if c not in (url, caption)]
    assert t.column_names[2:] == others


def test_writer_refuses_bad_rows_and_cleans_up(tmp_path):
    with pytest.raises(DimensionMismatchError):
        with BundleWriter(tmp_path / "x", model="m/t", dim=4) as w:
            w.add(unit(2, 5), [{"url": "a"}, {"url": "b"}])
    with pytest.raises(RowCountMismatchError):
        with BundleWriter(tmp_path / "x", model="m/t", dim=4) as w:
            w.add(unit(2, 4), [{"url": "a"}])
    with pytest.raises(ConfigError, match="empty"):
        BundleWriter(tmp_path / "x", model="m/t", dim=4).finish()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "exists").mkdir()
    with pytest.raises(ConfigError, match="--overwrite"):
        BundleWriter(tmp_path / "exists", model="m/t", dim=4)


def test_overwrite_replaces_only_when_complete(tmp_path):
    def build(n, fail=False):
        with BundleWriter(tmp_path / "b", model="m/t", dim=4, overwrite=True) as w:
            w.add(unit(n, 4), [{"url": str(i)} for i in range(n)])
            if fail:
                raise RuntimeError("killed mid-build")
            w.finish()

    build(3)
    old = Bundle.open(tmp_path / "b")
    with pytest.raises(RuntimeError):
        build(5, fail=True)
    assert Bundle.open(tmp_path / "b").count == 3  # the old bundle still serves
    build(5)
    assert Bundle.open(tmp_path / "b").count == 5
    assert old.rows([2])[0]["url"] == "2"  # an already-open reader keeps its mapped files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_ivfpq_bundle_reranks_to_exact_cosine(tmp_path):
    n, d = 20_000, 32
    vecs = unit(n, d, seed=3)
    index = faiss.index_factory(d, "IVF64,PQ8x4", faiss.METRIC_INNER_PRODUCT)
    index.train(vecs[:5000])
    index.add(vecs)
    with BundleWriter(tmp_path / "ivf", model="m/t", dim=d) as w:
        w.no_flat_index()
        w.add(vecs, pa.table({"url": [str(i) for i in range(n)]}))
        w.finish(index, factory="IVF64,PQ8x4", search_params={"nprobe": 16})
    b = Bundle.open(tmp_path / "ivf")
    assert faiss.extract_index_ivf(b.index).nprobe == 16 and b.exact
    q = vecs[[10, 500]] + 0.01 * unit(2, d, seed=9)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    out = search(b, q, 5)
    for qi, matches in zip([10, 500], out.matches, strict=False):
        assert matches[0].row_id == qi and matches[0].exact
        expected = float(q[[10, 500].index(qi)] @ vecs[qi])
        assert abs(matches[0].score - expected) < 2e-3  # float16-stored vectors, exact arithmetic
        assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)


def _ivfpq_bundle(path: Path, n: int = 6000, d: int = 32, removed=()) -> tuple[Bundle, np.ndarray]:
    vecs = unit(n, d, seed=5)
    index = faiss.index_factory(d, "IVF32,PQ8x4", faiss.METRIC_INNER_PRODUCT)
    index.train(vecs)
    index.add(vecs)
    with BundleWriter(path, model="m/t", dim=d) as w:
        w.no_flat_index()
        w.add(vecs, pa.table({"url": [str(i) for i in range(n)]}))
        w.finish(index, factory="IVF32,PQ8x4", search_params={"nprobe": 32})
    if removed:
        from provenance_guard.index_builder.maintain import remove_rows

        remove_rows(path, ids=list(removed), reason="test")
    return Bundle.open(path), vecs


def _python_rerank(b: Bundle, q: np.ndarray, k: int, **kw):
    refine, b.refine = b.refine, None
    try:
        return search(b, q, k, **kw)
    finally:
        b.refine = refine


def _same_matches(fast, slow) -> None:
    for a, c in zip(fast.matches, slow.matches, strict=False):
        assert [m.row_id for m in a] == [m.row_id for m in c]
        assert max(abs(x.score - y.score) for x, y in zip(a, c, strict=False)) < 1e-5
        assert all(x.exact for x in a)


def test_warm_bundle_reranks_inside_faiss_with_the_same_results(tmp_path):
    b, vecs = _ivfpq_bundle(tmp_path / "b", removed=[11, 12])
    assert b.refine is None  # nothing is set up before warm-up has checked the index's ids
    b.warm_up(wait=True)
    assert b.refine is not None
    q = vecs[[10, 11, 400, 4000]] + 0.02 * unit(4, 32, seed=8)
    q = np.concatenate([q, unit(4, 32, seed=9)])  # and queries near nothing stored
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for k in (1, 5, 10, 40):
        fast, slow = search(b, q, k, with_vectors=True), _python_rerank(b, q, k, with_vectors=True)
        _same_matches(fast, slow)
        for ms, rows in zip(fast.matches, fast.vectors, strict=False):
            np.testing.assert_array_equal(rows, b.vector([m.row_id for m in ms]))
        assert all(m.row_id not in (11, 12) for ms in fast.matches for m in ms)  # removed rows stay out
    assert fast.matches[0][0].row_id == 10 and fast.matches[0][0].url == "10"
    # warm rows come decoded by FAISS: the stored float16 values exactly, ids outside the bundle refused
    np.testing.assert_array_equal(b.vector([4000, 0, 7]), np.asarray(b.vectors[[4000, 0, 7]], dtype=np.float32))
    for bad in ([b.count], [0, -1]):
        with pytest.raises(IndexError, match="outside bundle"):
            b.vector(bad)
    # the exact cosine with the stored float16 row, whatever the query's length
    scaled = search(b, 3.0 * q[:1], 3, squares=None)
    row = b.vector([10])[0]
    expected = float(q[0] @ row / np.linalg.norm(row))
    assert abs(scaled.matches[0][0].score - expected) < 1e-6
    twice = search(b, np.stack([q[0], q[0]]), 3)  # the same rows for two queries: each match its own values
    first, again = twice.matches
    assert [(m.row_id, m.url, m.metadata) for m in first] == [(m.row_id, m.url, m.metadata) for m in again]
    assert first[0].url == "10" and first[0].metadata is not again[0].metadata
    nan = q[:2].copy()
    nan[1, 3] = np.nan  # a model that overflowed: refused, on either path, rather than searched (and passed)
    for run in (search, _python_rerank):
        with pytest.raises(ImageInputError, match="not finite"):
            run(b, nan, 5)


def test_rows_off_the_unit_length_score_their_exact_cosines(tmp_path):
    """Stored rows are unit length whenever a writer here made them; a vectors file that is not (rewritten
    elsewhere, or damaged) still gets exact cosines from the FAISS re-rank: every row's own norm is used."""
    b, vecs = _ivfpq_bundle(tmp_path / "b")
    del b
    arr = np.load(tmp_path / "b" / VECTORS_FILE, mmap_mode="r+")
    arr[5:3000:2] = (arr[5:3000:2].astype(np.float32) * 0.5).astype(np.float16)
    arr[6:3000:2] = (arr[6:3000:2].astype(np.float32) * 1.7).astype(np.float16)
    arr[7] = 0  # a zero row scores 0
    arr.flush()
    del arr
    b = Bundle.open(tmp_path / "b")
    b.warm_up(wait=True)
    assert b.refine is not None
    targets = [5, 6, 4005]
    q = vecs[targets] + 0.02 * unit(3, 32, seed=4)
    q = np.concatenate([q, vecs[[7]]])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for k in (1, 3, 10, 40):
        fast, slow = search(b, q, k), _python_rerank(b, q, k)
        _same_matches(fast, slow)
        assert [ms[0].row_id for ms in fast.matches[:3]] == targets
    assert 7 not in [m.row_id for m in search(b, q[3:], 3).matches[0]]


def test_index_ids_outside_the_bundle_keep_the_checked_python_rerank(tmp_path, monkeypatch):
    """FAISS's refine stage reads a row at whatever id the index gives: an index whose lists hold an id past
    the bundle's rows never gets it, and searching it still reports the damage instead of reading past the
    vectors file. Nor does a FAISS too old to lay its codes over the file."""
    from provenance_guard.core.bundle.rerank import ivf_ids_within

    b, vecs = _ivfpq_bundle(tmp_path / "b")
    index = faiss.read_index(str(tmp_path / "b" / INDEX_FILE))
    ivf = faiss.extract_index_ivf(index)
    target = int(ivf.quantizer.assign(vecs[:1], 1)[0, 0])
    ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(target), ivf.invlists.list_size(target))
    ids[ids == 0] = 10 ** 9  # row 0's id, far outside the 6000 rows
    assert not ivf_ids_within(index, b.count)
    faiss.write_index(index, str(tmp_path / "b" / INDEX_FILE))
    b = Bundle.open(tmp_path / "b")  # same size: opening does not hash the files
    b.warm_up(wait=True)
    assert b.refine is None and b.mapped_reads
    with pytest.raises(IndexCorruptError, match="outside 0..5999"):
        search(b, vecs[:1], 5)
    good = tmp_path / "good"
    _ivfpq_bundle(good)
    monkeypatch.delattr(faiss, "MaybeOwnedVectorUInt8")  # FAISS before 1.10: codes no view can be laid over
    older = Bundle.open(good)
    older.warm_up(wait=True)
    assert older.refine is None and older.mapped_reads and search(older, vecs[:1], 1).matches[0][0].row_id == 0
    flat = faiss.IndexFlatIP(32)
    flat.add(vecs[:10])
    assert not ivf_ids_within(flat, 10)  # only IVF indices are checked, so only they get the FAISS re-rank


def test_bundle_without_rerank_vectors_says_approximate(tmp_path):
    vecs = unit(3000, 16)
    index = faiss.index_factory(16, "IVF8,PQ4x4", faiss.METRIC_INNER_PRODUCT)
    index.train(vecs)
    index.add(vecs)
    with BundleWriter(tmp_path / "a", model="m/t", dim=16, rerank=None) as w:
        w.no_flat_index()
        w.add(vecs, [{"url": str(i)} for i in range(3000)])
        w.finish(index, factory="IVF8,PQ4x4", search_params={"nprobe": 8})
    b = Bundle.open(tmp_path / "a")
    assert not b.exact and b.manifest.to_json()["rerank"]["scores"] == "approximate"
    assert all(not m.exact for m in search(b, vecs[:1], 3).matches[0])


# validation errors: each by name, each an exit code 2 from the command --------------------------------

def _missing_file(p: Path) -> None:
    (p / METADATA_FILE).unlink()


def _unknown_version(p: Path) -> None:
    write_manifest(p, lambda d: d.update(format_version=99))


def _truncated_index_size_recorded(p: Path) -> None:
    data = (p / INDEX_FILE).read_bytes()
    (p / INDEX_FILE).write_bytes(data[: len(data) // 2])
    refresh_file_entry(p, INDEX_FILE)


def _truncated_index(p: Path) -> None:
    data = (p / INDEX_FILE).read_bytes()
    (p / INDEX_FILE).write_bytes(data[: len(data) // 2])


def _dimension_mismatch(p: Path) -> None:
    write_manifest(p, lambda d: d["embedding"].update(dim=32))


def _misaligned_rows(p: Path) -> None:
    # Metadata of 5 rows next to an index and vectors of 6: a shard went missing.
    from pyarrow import ipc

    src = ipc.open_file(pa.memory_map(str(p / METADATA_FILE))).read_all().slice(0, 5)
    with pa.OSFile(str(p / METADATA_FILE), "wb") as f:
        with ipc.new_file(f, src.schema) as w:
            w.write_table(src)
    refresh_file_entry(p, METADATA_FILE)


def _no_manifest(p: Path) -> None:
    (p / "manifest.json").unlink()


@pytest.mark.parametrize("damage,error,words", [
    (_missing_file, BundleFileError, "metadata.arrow is missing"),
    (_unknown_version, ManifestError, "format version 99 is not known"),
    (_truncated_index, BundleFileError, "truncated"),
    (_truncated_index_size_recorded, IndexCorruptError, "not a readable FAISS index"),
    (_dimension_mismatch, DimensionMismatchError, "64-d vectors but the manifest"),
    (_misaligned_rows, RowCountMismatchError, "5 metadata rows but the manifest says 6"),
    (_no_manifest, ManifestError, "manifest.json is missing"),
])
def test_damaged_bundle_raises_named_error_and_exit_2(bundle_copy, damage, error, words, outputs, capsys):
    damage(bundle_copy)
    with pytest.raises(error, match=words):
        Bundle.open(bundle_copy)
    folder, _ = outputs
    assert cli(["check", str(folder / "chelsea_copy.png"), "--index", str(bundle_copy)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(bundle_copy) in err
    assert cli(["index", "info", str(bundle_copy)]) == 2


def test_missing_bundle_folder(tmp_path):
    with pytest.raises(BundleFileError, match="index build"):
        Bundle.open(tmp_path / "nope")


def test_info_and_verify(built_bundle, bundle_copy, capsys):
    assert cli(["index", "info", str(built_bundle)]) == 0
    out = capsys.readouterr().out
    for words in ("test-refs", "64-d", "rows        6", "Flat", "exact cosine", "warn >=", "metadata.arrow"):
        assert words in out
    assert cli(["index", "info", str(built_bundle), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 6
    assert cli(["index", "verify", str(built_bundle)]) == 0
    assert "OK" in capsys.readouterr().out
    # Same size, one byte changed: only the checksum can tell.
    vec = bundle_copy / VECTORS_FILE
    data = bytearray(vec.read_bytes())
    data[-1] ^= 0xFF
    vec.write_bytes(bytes(data))
    Bundle.open(bundle_copy)  # opening stays O(1) and does not hash
    assert cli(["index", "verify", str(bundle_copy)]) == 2
    assert "sha256" in capsys.readouterr().err


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_open_is_constant_time_in_rows(tmp_path):
    """Opening maps files and reads headers only: bytes read by the process stay far below the bundle size."""
    n, d = 200_000, 16
    with BundleWriter(tmp_path / "big", model="m/t", dim=d) as w:
        w.add(unit(n, d), pa.table({"url": np.arange(n).astype(str)}))
        w.finish()
    size = sum(f.stat().st_size for f in (tmp_path / "big").iterdir())
    Bundle.open(tmp_path / "big")  # warm imports so only the opening itself is counted
    before = _rchar()
    b = Bundle.open(tmp_path / "big")
    read = _rchar() - before
    assert b.count == n and size > 20_000_000
    assert read < 200_000, f"opening read {read} bytes of a {size}-byte bundle"


def test_float16_rerank_decode_is_exact_for_every_code():
    from provenance_guard.core.bundle import decode_rerank

    import struct

    bits = np.arange(65536, dtype=np.uint16)
    # IEEE half precision decoded by the standard library, independent of numpy's conversion
    reference = np.array(struct.unpack("<65536e", bits.tobytes()), dtype=np.float32).reshape(256, 256)
    every = bits.view(np.float16).reshape(256, 256)
    for codes, want in ((every, reference), (every[:, ::2], reference[:, ::2]), (every.T, reference.T)):
        got = decode_rerank(codes, None)  # contiguous, strided and transposed (memory-mapped slices)
        assert got.dtype == np.float32 and got.shape == codes.shape
        np.testing.assert_array_equal(got, want)  # NaNs compare equal here
    finite = np.isfinite(reference).all(axis=1)  # rows without an infinity or nan: widened by bit steps
    assert 0 < finite.sum() < 256
    cases = ((every[finite], reference[finite]), (every[finite][:, ::3], reference[finite][:, ::3]),
             (every[finite].T, reference[finite].T), (every[finite].astype(">f2"), reference[finite]))
    for codes, want in cases:
        got = decode_rerank(codes, None)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # bit for bit: -0.0, subnormals


def test_float16_widening_is_exact_where_the_cpu_reads_subnormals_as_zero():
    """A library may set the CPU's DAZ flag (float32 subnormals read as zero), under which the bit steps would
    zero float16's subnormals: widen_half then widens with astype."""
    import struct

    torch = pytest.importorskip("torch")
    from provenance_guard.core.bundle.rerank import widen_half

    bits = np.arange(65536, dtype=np.uint16)
    reference = np.array(struct.unpack("<65536e", bits.tobytes()), dtype=np.float32)
    finite = np.isfinite(reference)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        assert np.float32(2.0 ** -149) * np.float32(2.0 ** 112) == 0  # the flag is on: the bit steps would fail
        got = widen_half(bits.view(np.float16)[finite])
    finally:
        torch.set_flush_denormal(False)
    np.testing.assert_array_equal(got.view(np.uint32), reference[finite].view(np.uint32))


@pytest.mark.parametrize("rerank", ["float16", "int8"])
def test_mapped_and_pread_row_reads_agree(tmp_path, rerank):
    vecs = unit(3000, 24, seed=11)
    with BundleWriter(tmp_path / "b", model="m/t", dim=24, rerank=rerank) as w:
        w.add(vecs, pa.table({"url": [str(i) for i in range(len(vecs))]}))
        w.finish()
    b = Bundle.open(tmp_path / "b")
    ids = [2999, 0, 17, 18, 19, 1500, 17]  # unsorted, a contiguous run, a repeat
    by_pread = b.vector(ids)
    b.mapped_reads = True
    np.testing.assert_array_equal(b.vector(ids), by_pread)
    np.testing.assert_allclose(by_pread, vecs[ids], atol=2e-2 if rerank == "int8" else 2e-3)


def test_warm_up_maps_rows_and_metadata_and_reads_stay_the_same(tmp_path, monkeypatch):
    """warm_up touches every page of the re-rank and metadata maps on a background thread, once, then
    re-rank rows come through the map; a bundle over a quarter of the available memory is left alone."""
    import provenance_guard.core.bundle.reader as reader

    vecs = unit(3000, 24, seed=12)
    with BundleWriter(tmp_path / "b", model="m/t", dim=24) as w:
        w.add(vecs, pa.table({"url": [f"u{i}" for i in range(len(vecs))]}))
        w.finish()
    ids = [2999, 0, 17, 1500]
    b = Bundle.open(tmp_path / "b")
    before, rows_before = b.vector(ids), b.rows(ids)
    assert not b.warm
    monkeypatch.setattr(reader, "available_memory", lambda: 4 * 1024)  # far less than the files
    b.warm_up(wait=True)
    assert not b.mapped_reads and b.warm  # warm-up has finished: it left the files alone
    b.warm_up(wait=True)  # once per bundle: a second call starts nothing
    assert not b.mapped_reads

    monkeypatch.setattr(reader, "available_memory", lambda: 1 << 40)
    warm = Bundle.open(tmp_path / "b")
    warm.warm_up(wait=True)
    assert warm.mapped_reads and warm.warm
    np.testing.assert_array_equal(warm.vector(ids), before)
    assert warm.rows(ids) == rows_before and [r["url"] for r in rows_before] == [f"u{i}" for i in ids]
    out = search(warm, vecs[[5]], 3)
    assert out.matches[0][0].row_id == 5 and out.matches[0][0].exact


def _ipc_reader(path: Path, table, batch_rows: int):
    import pyarrow.ipc as ipc

    with ipc.new_file(str(path), table.schema) as w:
        for b in table.to_batches(max_chunksize=batch_rows):
            w.write_batch(b)
    return ipc.open_file(pa.memory_map(str(path), "r"))


def _metadata_table(n: int = 300):
    rng = np.random.default_rng(4)
    null = lambda i, v: None if i % 7 == 3 else v  # noqa: E731
    f32 = [null(i, float(rng.random())) for i in range(n)]
    f32[5], f32[6], f32[8] = float("nan"), float("inf"), float("-inf")
    return pa.table({
        "url": pa.array([null(i, f"https://e.com/{i}?q=<b>&x=ü") for i in range(n)]),
        "caption": pa.array([null(i, "" if i % 5 == 0 else "星 " * (i % 4) + "<i>x</i>") for i in range(n)],
                            pa.large_string()),
        "width": pa.array([null(i, int(rng.integers(-2**40, 2**40))) for i in range(n)], pa.int64()),
        "small": pa.array([null(i, i % 120) for i in range(n)], pa.uint8()),
        "height": pa.array([i * 3 for i in range(n)], pa.int32()),
        "f32": pa.array(f32, pa.float32()),
        "f64": pa.array([null(i, float(rng.random())) for i in range(n)], pa.float64()),
        "empty": pa.array([None] * n, pa.string()),
        "key": pa.array([f"{i:09d}" for i in range(n)]),  # a second string column without nulls
        "nsfw": pa.array([null(i, i % 2 == 0) for i in range(n)], pa.bool_()),
        "tags": pa.array([null(i, ["a", str(i)]) for i in range(n)], pa.list_(pa.string())),
        "when": pa.array([null(i, i * 1000) for i in range(n)], pa.timestamp("ms")),
        "kind": pa.array([["x", "y"][i % 2] for i in range(n)]).dictionary_encode(),
        "raw": pa.array([null(i, bytes([i % 256, 0xFF])) for i in range(n)], pa.binary()),
    })


def test_metadata_rows_equal_pyarrow_values_and_keep_few_batches(tmp_path):
    """Every value equals pyarrow's own to_pylist (nulls, unicode, empty strings, large strings, every number
    width, lists, timestamps, dictionaries, bytes), whatever the order of the ids and with repeats;
    json_values turns floats that are not finite into None and other types into JSON values, and leaves the
    rest alone. At most `limit` record batches are kept."""
    import math

    from provenance_guard.core.bundle.rows import MetadataRows
    from provenance_guard.core.result import _jsonable

    table = _metadata_table()
    meta = MetadataRows(_ipc_reader(tmp_path / "m.arrow", table, 64), 64, table.num_rows, limit=2)
    want = table.to_pylist()
    ids = [299, 0, 63, 64, 65, 5, 6, 8, 3, 150, 5, 256, 255]
    got = [dict(zip(meta.names, vals, strict=False)) for vals in zip(*meta.columns(ids), strict=False)]
    for i, row in zip(ids, got, strict=False):
        assert row.keys() == want[i].keys()
        for k, v in row.items():
            assert v == want[i][k] or (isinstance(v, float) and math.isnan(v) and math.isnan(want[i][k])), (i, k)
            assert type(v) is type(want[i][k])
    assert meta.batch.cache_info().currsize <= 2
    safe = [dict(zip(meta.names, vals, strict=False)) for vals in zip(*meta.columns(ids, json_values=True), strict=False)]
    assert [r["f32"] for r in safe[5:8]] == [None, None, None]
    assert safe == [{k: _jsonable(v) for k, v in r.items()} for r in got]
    assert safe[0]["when"] == want[299]["when"].isoformat() and safe[0]["raw"] == "2bff"
    assert meta.columns([]) == [[] for _ in meta.names]


def test_metadata_rows_refuse_damaged_files(tmp_path):
    """Text offsets that point outside their data, or a record batch of the wrong length, are a
    BundleFileError naming the fix, never a read outside a buffer; the file's other batches still read."""
    import pyarrow.ipc as ipc

    from provenance_guard.core.bundle.rows import MetadataRows

    table = pa.table({"url": [f"u{i}" for i in range(100)], "w": pa.array(range(100), pa.int32())})
    reader = _ipc_reader(tmp_path / "ok.arrow", table, 10)
    with pytest.raises(BundleFileError, match="record batch 0 holds 10 rows where 8 belong"):
        MetadataRows(reader, 8, 100).columns([1])

    source = pa.memory_map(str(tmp_path / "ok.arrow"), "r")
    source.seek(0)
    whole = source.read_buffer()
    offsets = ipc.open_file(source).get_batch(3).column(0).buffers()[1]
    at = offsets.address - whole.address + 4 * 5  # the end of row 34's string
    data = bytearray((tmp_path / "ok.arrow").read_bytes())
    data[at:at + 4] = (1 << 30).to_bytes(4, "little")
    (tmp_path / "bad.arrow").write_bytes(bytes(data))
    meta = MetadataRows(ipc.open_file(pa.memory_map(str(tmp_path / "bad.arrow"), "r")), 10, 100)
    assert meta.columns([3, 99]) == [["u3", "u99"], [3, 99]]  # other batches read
    with pytest.raises(BundleFileError, match="url of record batch 3 has text offsets outside its data.*rebuild"):
        meta.columns([31])


def test_bundle_rows_equal_pyarrow_rows_removed_and_json_values(tmp_path):
    """Bundle.rows of a check's few rows and of a knn answer's many: the metadata's own rows (pyarrow's
    to_pylist), removed rows read {"removed": True}, json_values as core.result makes values."""
    import math

    from provenance_guard.core.result import _jsonable
    from provenance_guard.index_builder.maintain import remove_rows

    table = _metadata_table(200)
    with BundleWriter(tmp_path / "b", model="m/t", dim=8) as w:
        w.add(unit(200, 8, seed=2), table)
        w.finish()
    remove_rows(tmp_path / "b", ids=[7, 150], reason="test")
    b = Bundle.open(tmp_path / "b")
    stored = b._rows._reader.read_all().to_pylist()  # as written, after the writer's normalisation
    ids = [150, 0, 5, 6, 8, 7, 199, 3] + list(range(100, 140))
    for count in (3, len(ids)):
        want = [{"removed": True} if i in (7, 150) else stored[i] for i in ids[:count]]
        got = b.rows(ids[:count])
        assert repr(got) == repr(want)  # NaN included
        assert b.rows(ids[:count], json_values=True) == [{k: _jsonable(v) for k, v in r.items()} for r in want]
    assert math.isnan(b.rows([5])[0]["f32"]) and b.rows([5], json_values=True)[0]["f32"] is None
    with pytest.raises(IndexError, match="row 200 is outside"):
        b.rows(ids + [200])


def test_batch_scoring_in_numpy_equals_the_python_scoring():
    """The index server's batches are scored in numpy: the same float64 products in the same order, so the
    same scores; the same stable order (equal scores keep FAISS's order); -1 padding dropped; a score that is
    not finite leaves the batch to the Python path."""
    import array
    from types import SimpleNamespace

    from provenance_guard.core import search as S

    rng = np.random.default_rng(8)
    n, c, k = 16, 100, 80
    inverse = array.array("f", (rng.random(5000) + 0.5).astype(np.float32).tobytes())
    refine = SimpleNamespace(inverse_norms=inverse)
    ids = rng.integers(0, 5000, (n, c)).astype(np.int64)
    ids[3, 60:] = -1  # fewer candidates than asked
    ids[4, 10:] = -1  # fewer than k
    ids[5, :] = -1  # none
    dots = rng.random((n, c)).astype(np.float32)
    dots[6, 20:30] = dots[6, 5]  # ties: equal dots of one row...
    ids[6, 20:30] = ids[6, 5]  # ...and the same id, so equal scores
    q_norms = [float(x) for x in rng.random(n) + 0.5]
    q_norms[7] = 0.0  # a zero query scores 0 throughout
    python, finite = S._exact_from_dots(refine, q_norms, dots, ids, k)
    assert finite  # numpy's scores: all finite
    assert dots.size >= S.NUMPY_SCORING_CANDIDATES
    fast = S._exact_from_dots_numpy(refine, q_norms, dots, ids, k)
    small = S.NUMPY_SCORING_CANDIDATES
    try:
        S.NUMPY_SCORING_CANDIDATES = 10 ** 9
        slow, finite = S._exact_from_dots(refine, q_norms, dots, ids, k)
        assert not finite  # Python's: not checked
    finally:
        S.NUMPY_SCORING_CANDIDATES = small
    assert fast == slow == python
    assert [len(r) for r in fast[3:6]] == [60, 10, 0] and len(fast[0]) == k
    tied = [j for j, (_, i) in enumerate(fast[6]) if i == ids[6, 5]]
    assert tied == list(range(tied[0], tied[0] + 11))  # eleven equal scores, side by side
    dots[2, 0] = np.nan
    assert S._exact_from_dots_numpy(refine, q_norms, dots, ids, k) is None


def test_scores_are_clamped_to_cosines_and_a_damaged_one_reported():
    """A score a float sum puts just past 1 is clamped; one that is no cosine is reported, also inside a
    row whose first and last scores lie in range (the rows of an unchecked path are read one by one)."""
    from types import SimpleNamespace

    from provenance_guard.core import search as S

    bundle = SimpleNamespace(id="b", path="/p")
    rows = [[(1.0000001, 1), (0.5, 2), (-1.0000002, 3)], [], [(0.9, 4), (0.1, 5)]]
    for finite in (True, False):
        assert S._clamped_rows(bundle, rows, finite) == [[(1.0, 1), (0.5, 2), (-1.0, 3)], [], [(0.9, 4), (0.1, 5)]]
    kept = [[(0.9, 4), (0.1, 5)]]
    assert S._clamped_rows(bundle, kept, True)[0] is kept[0]  # in range at both ends: the row as it was
    with pytest.raises(IndexCorruptError, match="no cosine"):
        S._clamped_rows(bundle, [[(1.5, 1), (0.2, 2)]], True)
    with pytest.raises(IndexCorruptError, match="no cosine"):
        S._clamped_rows(bundle, [[(0.9, 1), (float("nan"), 2), (0.2, 3)]], False)


def test_bundle_rows_take_extra_values_after_the_metadata(tmp_path):
    """extra values (a knn answer's id and similarity) follow the metadata's columns; one the metadata has
    keeps its place, whichever way the rows are read; a removed row keeps them too."""
    n = 100
    vecs = unit(n, 8, seed=3)
    with BundleWriter(tmp_path / "b", model="m/t", dim=8) as w:
        w.add(vecs, pa.table({"url": [f"u{i}" for i in range(n)], "similarity": [0.5] * n}))
        w.finish()
    from provenance_guard.index_builder.maintain import remove_rows

    remove_rows(tmp_path / "b", ids=[4], reason="test")
    b = Bundle.open(tmp_path / "b")
    for count in (3, 40):  # a check's rows, a knn answer's
        ids = list(range(count))
        plain = b.rows(ids)
        rows = b.rows(ids, extra={"id": ids, "similarity": [i / 100 for i in ids]})
        assert list(rows[1]) == list(plain[1]) + ["id"]  # similarity where the metadata has it, id after
        assert rows[1] == {**plain[1], "similarity": 0.01, "id": 1} and plain[1]["url"] == "u1"
    assert b.rows([4], extra={"id": [4]}) == [{"removed": True, "id": 4}]


def test_metadata_rows_never_decode_a_null_slot_and_rows_check_their_extra(tmp_path):
    """A null string's bytes are undefined (Arrow lets them be anything, invalid UTF-8 too): they read None
    without being decoded. extra lists of the wrong length are refused."""
    from provenance_guard.core.bundle.rows import MetadataRows

    n = 40
    offsets = np.arange(n + 1, dtype=np.int32)
    data = bytearray(b"a" * n)
    data[3] = 0xFF  # row 3: null, over a byte that is no UTF-8
    valid = np.ones(n, dtype=bool)
    valid[3] = False
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little").tobytes())
    col = pa.Array.from_buffers(pa.string(), n, [bitmap, pa.py_buffer(offsets.tobytes()), pa.py_buffer(bytes(data))],
                                null_count=1)
    table = pa.table({"url": col, "w": pa.array(range(n), pa.int64())})
    meta = MetadataRows(_ipc_reader(tmp_path / "m.arrow", table, 16), 16, n)
    assert meta.columns([2, 3, 4, 35]) == [["a", None, "a", "a"], [2, 3, 4, 35]]

    vecs = unit(30, 8, seed=1)
    with BundleWriter(tmp_path / "b", model="m/t", dim=8) as w:
        w.add(vecs, pa.table({"url": [f"u{i}" for i in range(30)]}))
        w.finish()
    with pytest.raises(ValueError, match="one value per id"):
        Bundle.open(tmp_path / "b").rows([1, 2], extra={"id": [1]})


def test_a_last_metadata_batch_longer_than_the_others_is_refused(tmp_path):
    """Rows are found by batch number and position: a last record batch longer than the manifest's batch
    size would put rows in the wrong place, though the row count adds up."""
    from pyarrow import ipc

    vecs = unit(25, 8, seed=1)
    with BundleWriter(tmp_path / "b", model="m/t", dim=8) as w:
        w.add(vecs, pa.table({"url": [f"u{i}" for i in range(25)]}))
        w.finish()
    src = ipc.open_file(pa.memory_map(str(tmp_path / "b" / METADATA_FILE))).read_all()
    with pa.OSFile(str(tmp_path / "b" / METADATA_FILE), "wb") as f:
        with ipc.new_file(f, src.schema) as w:
            w.write_table(src.slice(0, 10))
            w.write_table(src.slice(10, 15))
    refresh_file_entry(tmp_path / "b", METADATA_FILE)
    write_manifest(tmp_path / "b", lambda d: d["metadata"].update(batch_rows=10))
    with pytest.raises(RowCountMismatchError, match="a last record batch of 15 rows .batches hold 10.*rebuild"):
        Bundle.open(tmp_path / "b")

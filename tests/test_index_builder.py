"""The LAION-scale builder: shards in every convention, misalignment refused, images and webdataset input,
recall, removal, append, merge, crash safety and resume, Ray against local."""
from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from laion_synth import write_shards
from provenance_guard.cli import main as cli
from provenance_guard.core.bundle import Bundle
from provenance_guard.core.errors import ConfigError, DimensionMismatchError, RowCountMismatchError
from provenance_guard.core.search import search
from provenance_guard.index_builder.build import BuildOptions, build_from_embeddings
from provenance_guard.index_builder.choose import choose_index, parse_size
from provenance_guard.index_builder.maintain import append_rows, merge_bundles, remove_rows
from provenance_guard.index_builder.shards import scan_shards

MODEL = "ViT-B-32/openai"  # recorded only: these tests never load a model for generated vectors
FAST_IVF = "IVF32,PQ8x8"


def opts(**kw) -> BuildOptions:
    return BuildOptions(model=MODEL, progress=False, **kw)


def top1(bundle: Bundle, q: np.ndarray) -> list[int]:
    return [ms[0].row_id if ms else -1 for ms in search(bundle, q, 10).matches]


@pytest.mark.parametrize("convention", ["laion5b", "clip-retrieval", "laion400m"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_flat_build_from_shards_keeps_every_column(tmp_path, convention, dtype):
    x = write_shards(tmp_path / "src", [300, 200, 250], d=32, dtype=dtype, convention=convention)
    report = build_from_embeddings(str(tmp_path / "src"), tmp_path / "b", opts())
    assert report.factory == "Flat" and report.rows == 750
    b = Bundle.open(tmp_path / "b")
    assert b.count == 750 and b.manifest.model == MODEL
    row = b.rows([420])[0]
    assert row["url"] == "https://img.example.com/420.jpg" and row["caption"] == "caption <i>420</i>"
    expected = {"laion5b": {"WIDTH", "hash", "punsafe", "pwatermark", "similarity"},
                "clip-retrieval": {"image_path", "key", "width"},
                "laion400m": {"SAMPLE_ID", "LICENSE", "NSFW", "similarity"}}[convention]
    assert expected <= set(row)
    # A small flat bundle finds every stored vector as its own top-1: recall 1.0.
    assert top1(b, x[::50]) == list(range(0, 750, 50))
    assert report.tuning.chosen.near_dup_r1 == 1.0 and report.tuning.chosen.held_out_r10 == 1.0
    assert b.manifest.build["recall"]["near_dup_r1"] == 1.0


def test_misaligned_input_is_refused_naming_the_shard(tmp_path):
    src = tmp_path / "src"
    write_shards(src, [100, 100, 100], d=16)
    # rows differ
    pq.write_table(pq.read_table(src / "metadata/metadata_0001.parquet").slice(0, 99),
                   src / "metadata/metadata_0001.parquet")
    with pytest.raises(RowCountMismatchError, match="shard 1: .* has 100 rows but .* has 99"):
        scan_shards(str(src))
    write_shards(src, [100, 100, 100], d=16)
    # a gap in the numbering
    for f in ("img_emb/img_emb_0001.npy", "metadata/metadata_0001.parquet"):
        (src / f).unlink()
    with pytest.raises(ConfigError, match=r"gap \(missing \[1\]\)"):
        scan_shards(str(src))
    write_shards(src, [100, 100, 100], d=16)
    (src / "metadata/metadata_0002.parquet").unlink()
    with pytest.raises(ConfigError, match="img_emb_0002.npy has no metadata/metadata_0002.parquet"):
        scan_shards(str(src))
    write_shards(src, [100, 100, 100], d=16)
    data = (src / "img_emb/img_emb_0001.npy").read_bytes()
    (src / "img_emb/img_emb_0001.npy").write_bytes(data[:-100])  # a download cut short
    with pytest.raises(RowCountMismatchError, match="shard 1: .* truncated"):
        scan_shards(str(src))
    write_shards(src, [100, 100, 100], d=16)
    np.save(src / "img_emb/img_emb_0002.npy", np.zeros((100, 24), np.float16))
    with pytest.raises(DimensionMismatchError, match="shard 2: .* is 24-d but the shards before it are 16-d"):
        scan_shards(str(src))
    # The command says so with exit 2 and builds nothing.
    assert cli(["index", "build", "--embeddings", str(src), "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert not (tmp_path / "b").exists()


def test_fsspec_source(tmp_path):
    import fsspec

    write_shards(tmp_path / "src", [120, 80], d=16)
    fs = fsspec.filesystem("memory")
    for f in (tmp_path / "src").rglob("*.*"):
        fs.pipe(f"/laion/{f.relative_to(tmp_path / 'src').as_posix()}", f.read_bytes())
    report = build_from_embeddings("memory://laion", tmp_path / "b", opts())
    assert report.rows == 200 and Bundle.open(tmp_path / "b").rows([150])[0]["url"].endswith("/150.jpg")


def test_choice_always_gives_an_index_and_says_what_it_costs():
    assert choose_index(1000, 768, parse_size("1G")).factory == "Flat"
    big = choose_index(10_000_000, 768, parse_size("4G"))
    assert big.factory.startswith("OPQ") and "_HNSW32,PQ" in big.factory and big.bytes_needed <= parse_size("4G")
    tight = choose_index(1_000_000, 768, parse_size("1M"))
    assert tight.factory and "below the smallest index" in tight.note and "recall" in tight.note


@pytest.mark.slow
def test_ivfpq_near_duplicate_recall(tmp_path):
    """The automatic choice under a tight budget (OPQ + IVF with HNSW quantizer + PQ), tuned to recall."""
    x = write_shards(tmp_path / "src", [15_000] * 4, d=64)
    report = build_from_embeddings(str(tmp_path / "src"), tmp_path / "b", opts(max_memory=parse_size("1M")))
    assert report.factory.startswith("OPQ") and "HNSW32" in report.factory and "PQ" in report.factory
    b = Bundle.open(tmp_path / "b")
    assert b.manifest.ivfdata_file and b.manifest.search_params["nprobe"] >= 1
    assert report.tuning.chosen.near_dup_r1 >= 0.95
    # Independently of the tuning's own queries: perturbed stored rows find their source.
    rng = np.random.default_rng(5)
    ids = rng.choice(len(x), 300, replace=False)
    q = x[ids] + 0.3 * rng.standard_normal((300, 64)).astype(np.float32) / 8
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    assert np.mean(np.array(top1(b, q)) == ids) >= 0.95


def test_int8_rerank_and_budget_step_down(tmp_path):
    x = write_shards(tmp_path / "src", [2000], d=32)
    report = build_from_embeddings(str(tmp_path / "src"), tmp_path / "b",
                                   opts(index_key=FAST_IVF, max_rerank_memory=2000 * 40))
    assert report.rerank == "int8"
    b = Bundle.open(tmp_path / "b")
    assert b.manifest.rerank_dtype == "int8" and b.scales is not None
    m = search(b, x[[7]], 1).matches[0][0]
    assert m.row_id == 7 and m.score > 0.999 and m.exact
    report = build_from_embeddings(str(tmp_path / "src"), tmp_path / "c",
                                   opts(index_key=FAST_IVF, max_rerank_memory=1000))
    assert report.rerank is None and not Bundle.open(tmp_path / "c").exact


@pytest.fixture
def ivf_bundle(tmp_path):
    x = write_shards(tmp_path / "src", [3000, 3000], d=32)
    build_from_embeddings(str(tmp_path / "src"), tmp_path / "b", opts(index_key=FAST_IVF))
    return tmp_path / "b", x


def test_removed_rows_are_never_returned(ivf_bundle, tmp_path, capsys):
    path, x = ivf_bundle
    (tmp_path / "ids.txt").write_text("10\n20\n99999\n")
    (tmp_path / "urls.txt").write_text("https://img.example.com/30.jpg\n")
    (tmp_path / "hashes.txt").write_text("h000000000040\n")
    assert cli(["index", "remove", str(path), "--ids", str(tmp_path / "ids.txt")]) == 0
    assert "1 listed ids matched no row" in capsys.readouterr().out
    remove_rows(path, urls=["https://img.example.com/30.jpg"])
    assert cli(["index", "remove", str(path), "--hashes", str(tmp_path / "hashes.txt"), "--reason", "takedown"]) == 0
    b = Bundle.open(path)  # reopened: the removal is on disk
    assert b.removed.tolist() == [10, 20, 30, 40] and b.live_count == 5996
    for gone in (10, 20, 30, 40):
        found = {m.row_id for m in search(b, x[[gone]], 50).matches[0]}
        assert gone not in found
    assert b.rows([10])[0] == {"removed": True}
    assert top1(b, x[[11]]) == [11]
    history = b.manifest.build["history"]
    assert [h["op"] for h in history[-3:]] == ["remove"] * 3 and history[-1]["reason"] == "takedown"
    capsys.readouterr()
    # info, verify and the server say the same number: the searchable rows, with the removed ones named
    assert cli(["index", "verify", str(path)]) == 0
    assert "5,996 searchable rows (6,000 stored, 4 removed)" in capsys.readouterr().out
    assert cli(["index", "info", str(path)]) == 0
    info = capsys.readouterr().out
    assert "5,996 searchable (6,000 stored, 4 removed: never returned)" in info
    recall = next(line for line in info.splitlines() if line.startswith("recall"))
    assert "near_dup_r1 " in recall and "measured at build" in recall
    assert "remove" in info and "reason=takedown" in info


def test_append_rows_are_found_with_the_same_quantizer(ivf_bundle, tmp_path):
    path, x = ivf_bundle
    trained = (path / "trained.index").read_bytes()
    new = write_shards(tmp_path / "new", [500, 500], d=32, seed=9, convention="clip-retrieval")
    assert cli(["index", "append", str(path), "--embeddings", str(tmp_path / "new")]) == 0
    b = Bundle.open(path)
    assert b.count == 7000 and (path / "trained.index").read_bytes() == trained
    assert top1(b, new[[0, 999]]) == [6000, 6999]
    assert top1(b, x[[5]]) == [5]
    assert b.rows([6000])[0]["key"] == "000000000"
    with pytest.raises(ConfigError, match="same model"):
        append_rows(path, str(tmp_path / "new"), model="ViT-L-14/openai")


def test_merge_two_bundles(ivf_bundle, tmp_path):
    path, x = ivf_bundle
    y = write_shards(tmp_path / "other", [1000], d=32, seed=4)
    build_from_embeddings(str(tmp_path / "other"), tmp_path / "o", opts(index_key=FAST_IVF))
    report = merge_bundles(path, tmp_path / "o", tmp_path / "m")
    b = Bundle.open(tmp_path / "m")
    assert b.count == 7000 and "re-added" in report.note
    assert top1(b, np.concatenate([x[[3]], y[[3]]])) == [3, 6003]
    report = merge_bundles(path, path, tmp_path / "same")
    assert "merged" in report.note and Bundle.open(tmp_path / "same").count == 12000


@pytest.mark.slow
def test_sigkill_mid_build_keeps_old_bundle_then_resumes(tmp_path):
    src = tmp_path / "src"
    write_shards(src, [1500] * 6, d=32)
    out = tmp_path / "live"
    build_from_embeddings(str(src), out, opts(index_key=FAST_IVF))
    old_version = Bundle.open(out).version
    write_shards(src, [1500] * 6, d=32, seed=3)  # new data for a rebuild
    slow = (
        "import sys, time\n"
        "import provenance_guard.index_builder.build as b\n"
        "real = b.process_shard\n"
        "def slow(*a, **k):\n"
        "    r = real(*a, **k); time.sleep(1.5); return r\n"
        "b.process_shard = slow\n"
        "from provenance_guard.cli import main\n"
        f"sys.exit(main(['index', 'build', '--embeddings', {str(src)!r}, '--out', {str(out)!r}, '--model', "
        f"{MODEL!r}, '--index-key', {FAST_IVF!r}, '--overwrite', '--no-progress']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", slow], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / ".live.build" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if state.is_file() and len(json.loads(state.read_text() or "{}").get("done", [])) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(json.loads(state.read_text())["done"])
    assert 2 <= done_before < 6
    live = Bundle.open(out)  # the old bundle is intact and still serves
    assert live.version == old_version and live.count == 9000
    report = build_from_embeddings(str(src), out, opts(index_key=FAST_IVF, overwrite=True))
    assert report.resumed_shards == done_before
    build_from_embeddings(str(src), tmp_path / "fresh", opts(index_key=FAST_IVF))
    a, b = Bundle.open(out), Bundle.open(tmp_path / "fresh")
    assert a.version != old_version and a.count == b.count == 9000
    q = b.vector(np.arange(0, 9000, 97))
    assert top1(a, q) == top1(b, q) == list(range(0, 9000, 97))
    assert not (tmp_path / ".live.build").exists()


def _tar(path: Path, items: list[tuple[str, bytes, str, dict]]) -> None:
    with tarfile.open(path, "w") as t:
        for key, img, caption, meta in items:
            for ext, payload in (("jpg", img), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))


def _jpeg(name: str) -> bytes:
    from provenance_guard.demo import sample_image

    buf = io.BytesIO()
    sample_image(name).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_webdataset_and_folder_inputs_embed_resumably(tmp_path, tiny_model, references):
    from provenance_guard.core.check import Checker
    from provenance_guard.demo import sample_image

    wds = tmp_path / "wds"
    wds.mkdir()
    names = ["astronaut", "coffee", "chelsea", "rocket"]
    for s in range(2):
        _tar(wds / f"{s:05d}.tar", [
            (f"{s:05d}{j:04d}", _jpeg(n), f"a photo of {n}",
             {"url": f"https://example.org/{n}.jpg", "key": f"{s:05d}{j:04d}", "status": "success",
              "width": 512, "height": 512, "original_width": 1024, "original_height": 1024, "sha256": "00",
              "exif": {"Make": "x"}})
            for j, n in enumerate(names[2 * s:2 * s + 2])] + ([("broken", b"not a jpeg", "x", {})] if s else []))
    emb = tmp_path / "emb"
    assert cli(["index", "embed", str(wds), "--out", str(emb), "--model", tiny_model, "--no-progress"]) == 0
    meta = pq.read_table(emb / "metadata/metadata_0001.parquet").to_pylist()
    assert [m["url"] for m in meta] == ["https://example.org/chelsea.jpg", "https://example.org/rocket.jpg"]
    assert meta[0]["caption"] == "a photo of chelsea" and meta[0]["original_width"] == 1024
    # Resumable: a finished shard is not embedded again.
    first = (emb / "img_emb/img_emb_0000.npy").stat().st_mtime_ns
    (emb / "metadata/metadata_0001.parquet").unlink()
    assert cli(["index", "embed", str(wds), "--out", str(emb), "--model", tiny_model, "--no-progress"]) == 0
    assert (emb / "img_emb/img_emb_0000.npy").stat().st_mtime_ns == first
    assert (emb / "metadata/metadata_0001.parquet").is_file()
    # Folder input, in shards of 4 files.
    folder_emb = tmp_path / "folder-emb"
    assert cli(["index", "embed", str(references), "--out", str(folder_emb), "--model", tiny_model,
                "--shard-size", "4", "--no-progress"]) == 0
    assert len(scan_shards(str(folder_emb))) == 2
    # Both build into bundles that find the copies.
    for src, url in ((emb, "https://example.org/rocket.jpg"), (folder_emb, "rocket.png")):
        out = tmp_path / f"bundle-{src.name}"
        assert cli(["index", "build", "--embeddings", str(src), "--model", tiny_model, "--out", str(out),
                    "--no-progress"]) == 0
        (r,) = Checker(out, device="cpu").check([sample_image("rocket")])
        assert r.matches[0].url == url and r.max_score > 0.99


@pytest.mark.slow
def test_ray_build_equals_local_build(tmp_path):
    pytest.importorskip("ray")
    write_shards(tmp_path / "src", [800, 700, 900], d=32)
    build_from_embeddings(str(tmp_path / "src"), tmp_path / "local", opts(index_key=FAST_IVF))
    try:
        build_from_embeddings(str(tmp_path / "src"), tmp_path / "ray", opts(index_key=FAST_IVF, ray_address="local"))
    finally:
        import ray

        ray.shutdown()
    a, b = Bundle.open(tmp_path / "local"), Bundle.open(tmp_path / "ray")
    assert a.count == b.count == 2400
    assert (a.path / "metadata.arrow").read_bytes() == (b.path / "metadata.arrow").read_bytes()
    assert np.array_equal(np.asarray(a.vectors), np.asarray(b.vectors))
    assert (a.path / "index.ivfdata").read_bytes() == (b.path / "index.ivfdata").read_bytes()
    q = a.vector(np.arange(0, 2400, 37))
    assert top1(a, q) == top1(b, q)


@pytest.mark.slow
def test_ray_data_embedding_equals_local(tmp_path, tiny_model, references):
    """index embed with --ray-address local: Ray Data actors holding the model give the local shards."""
    pytest.importorskip("ray")
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert cli(["index", "embed", str(references), "--out", str(local), "--model", tiny_model, "--no-progress"]) == 0
    try:
        assert cli(["index", "embed", str(references), "--out", str(remote), "--model", tiny_model,
                    "--ray-address", "local", "--no-progress"]) == 0
    finally:
        import ray

        ray.shutdown()
    a = np.load(local / "img_emb/img_emb_0000.npy").astype(np.float32)
    b = np.load(remote / "img_emb/img_emb_0000.npy").astype(np.float32)
    assert a.shape == b.shape == (6, 64)
    np.testing.assert_allclose(a, b, atol=2e-3)
    assert pq.read_table(local / "metadata/metadata_0000.parquet").equals(
        pq.read_table(remote / "metadata/metadata_0000.parquet"))


def test_captions_are_stored_safely_and_counted(tmp_path, capsys):
    """Hostile captions: a binary column with invalid UTF-8 (a LAION parquet), an 8 MB caption, NUL and a
    BOM. Kept with replacement characters, cut at 4,096 characters, counted; never an ArrowInvalid abort."""
    import pyarrow as pa

    write_shards(tmp_path / "src", [40], d=16)
    parquet = tmp_path / "src" / "metadata" / "metadata_0000.parquet"
    table = pq.read_table(parquet)
    texts = [f"caption {i}".encode() for i in range(40)]
    texts[3] = b"caf\xe9 \xff broken"  # Latin-1, not UTF-8
    texts[5] = b"x" * (8 << 20)
    texts[7] = "\ufeffwith a BOM and a \x00 NUL".encode()
    table = table.set_column(table.column_names.index("TEXT"), "TEXT", pa.array(texts, pa.binary()))
    pq.write_table(table, parquet)
    assert cli(["index", "build", "--embeddings", str(tmp_path / "src"), "--out", str(tmp_path / "b"),
                "--model", MODEL, "--no-progress"]) == 0
    assert "captions and urls: 2 rows repaired" in capsys.readouterr().out
    b = Bundle.open(tmp_path / "b")
    rows = b.rows([3, 5, 7, 8])
    assert rows[0]["caption"] == "caf\ufffd \ufffd broken" and rows[3]["caption"] == "caption 8"
    assert len(rows[1]["caption"]) == 4096 and rows[2]["caption"] == "with a BOM and a  NUL"
    assert b.manifest.build["text"] == {"repaired": 2, "truncated": 1}


def test_image_captions_keep_what_decodes(tmp_path, tiny_model, references, capsys):
    import shutil

    folder = tmp_path / "refs"
    shutil.copytree(references, folder)
    (folder / "astronaut.txt").write_bytes(b"\xef\xbb\xbfan astronaut \xff in \x00 orbit")
    (folder / "rocket.txt").write_bytes(b"r" * 10_000)
    assert cli(["index", "build", "--images", str(folder), "--out", str(tmp_path / "b"), "--model", tiny_model,
                "--no-progress"]) == 0
    assert "1 repaired" in capsys.readouterr().out
    b = Bundle.open(tmp_path / "b")
    by_path = {r["path"]: r for r in b.rows(list(range(b.count)))}
    assert by_path["astronaut.png"]["caption"] == "an astronaut \ufffd in  orbit"
    assert len(by_path["rocket.png"]["caption"]) == 4096
    assert b.manifest.build["text"] == {"repaired": 1, "truncated": 1}


@pytest.mark.slow
def test_a_build_past_its_index_budget_says_what_the_budget_bounds(tmp_path):
    write_shards(tmp_path / "src", [400], d=32)
    proc = subprocess.run([sys.executable, "-m", "provenance_guard", "index", "build", "--embeddings",
                           str(tmp_path / "src"), "--out", str(tmp_path / "b"), "--model", MODEL, "--max-memory", "1K",
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "bounds the index" in proc.stdout and "not the build" in proc.stdout and "peak RSS" in proc.stdout

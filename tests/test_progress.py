"""Progress where no one watches a terminal: lines at each tenth and every N seconds, a heartbeat for a step
that cannot count its work, and the build/append/captions/check phases that report through them."""
from __future__ import annotations

import io
import time

from provenance_guard.core.progress import LineProgress, duration, heartbeat, progress


def test_a_pipe_gets_a_line_at_each_tenth_and_one_when_done():
    out = io.StringIO()  # not a terminal
    bar = progress(200, "adding", "row", file=out)
    assert isinstance(bar, LineProgress)
    for _ in range(20):
        bar.update(10)
    bar.close()
    bar.close()  # once only
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("adding: 20/200 rows (10%)") and "left" in lines[0]
    assert len(lines) == 10 and lines[-1].startswith("adding: done, 200 rows in")


def test_a_line_every_n_seconds_between_tenths(monkeypatch):
    monkeypatch.setenv("PROVENANCE_GUARD_PROGRESS_S", "0.01")
    out = io.StringIO()
    bar = progress(10**6, "metadata", "row", file=out)
    for _ in range(3):
        time.sleep(0.02)
        bar.update(1)
    assert len(out.getvalue().splitlines()) == 3  # no tenth was reached: the seconds made them
    monkeypatch.setenv("PROVENANCE_GUARD_PROGRESS_S", "nonsense")
    assert LineProgress(1, "x", "row", io.StringIO()).every == 30.0


def test_disabled_progress_says_nothing():
    out = io.StringIO()
    bar = progress(5, "checking", "img", enabled=False, file=out)
    bar.update(5)
    bar.close()
    with heartbeat("training", 10, enabled=False, file=out):
        pass
    assert out.getvalue() == ""


def test_a_heartbeat_says_started_elapsed_and_done(monkeypatch):
    monkeypatch.setenv("PROVENANCE_GUARD_PROGRESS_S", "0.05")
    out = io.StringIO()
    with heartbeat("training IVF64,Flat", expected_s=90, file=out):
        time.sleep(0.2)
    lines = out.getvalue().splitlines()
    assert lines[0] == "training IVF64,Flat: started (about 1m30s expected)"
    assert any("elapsed (about 1m30s expected)" in line for line in lines[1:-1])
    assert lines[-1].startswith("training IVF64,Flat: done in")
    assert [duration(s) for s in (3, 70, 7500)] == ["3 s", "1m10s", "2h05m"]


def test_training_estimate_is_seconds_for_the_factories_the_builder_chooses():
    from provenance_guard.index_builder.faiss_build import training_estimate

    ivf = training_estimate("IVF256,Flat", 64, 20_000)
    opq = training_estimate("OPQ8_32,IVF256_HNSW32,PQ8x8", 64, 20_000)
    assert 0 < ivf < 600 and 0 < opq < 3600
    assert training_estimate("Flat", 64, 1000) is None


def test_a_build_without_a_terminal_reports_every_phase(tmp_path, capfd):
    from laion_synth import write_shards

    from provenance_guard.index_builder.build import BuildOptions, build_from_embeddings
    from provenance_guard.index_builder.maintain import add_caption_index, append_rows

    write_shards(tmp_path / "laion", [3000, 3000], d=32)
    build_from_embeddings(str(tmp_path / "laion"), tmp_path / "b",
                          BuildOptions(model="ViT-B-32/openai", index_key="IVF64,Flat"))
    err = capfd.readouterr().err
    for phase in ("training IVF64,Flat on", "adding: done", "writing the index: done in", "metadata: done",
                  "exact search for recall: done"):
        assert phase in err, (phase, err[-2000:])
    assert "expected)" in err
    write_shards(tmp_path / "more", [500], d=32, seed=1, first_id=6000)
    append_rows(tmp_path / "b", str(tmp_path / "more"))
    err = capfd.readouterr().err
    assert "adding: done, 500 rows" in err and "metadata: done, 6,500 rows" in err, err[-2000:]
    add_caption_index(tmp_path / "b")
    assert "caption index: done" in capfd.readouterr().err

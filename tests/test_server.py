"""The index server started on 127.0.0.1 inside the test (the real command, a real HTTP socket): clip-retrieval
request and response shapes, /v1/check, auth, limits, batching, metrics, graceful shutdown; the remote
backend against it, and what a client does when it is down."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from provenance_guard.core.bundle import Bundle
from provenance_guard.core.check import Checker
from provenance_guard.core.errors import ConfigError
from provenance_guard.core.policy import Policy
from provenance_guard.demo import sample_image
from conftest import TEST_BLOCK, TEST_WARN

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"


def refused_port():
    """A port nothing listens on while the socket holding it lives (bound, never listening)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def png(name: str) -> bytes:
    buf = io.BytesIO()
    sample_image(name).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


class Served:
    """`serve` in a subprocess on --port 0, its output collected line by line as it comes."""

    def __init__(self, cmd: list, cwd=None, new_session: bool = False, env_token: bool = False, preexec=None,
                 env: dict | None = None):
        env = dict(os.environ, PROVENANCE_GUARD_DEVICE="cpu", PYTHONUNBUFFERED="1", **(env or {}))
        if env_token:
            env["PROVENANCE_GUARD_TOKEN"] = TOKEN
        # new_session stands for a terminal's foreground job, where SIGINT is not ignored; a test run that is
        # itself a background job of a script (nohup ... &) hands its children SIGINT ignored, which the
        # server keeps, as a background job should.
        def setup():
            if new_session:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
            if preexec is not None:
                preexec()

        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=new_session, preexec_fn=setup)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def ready(self, workers: int = 0, seconds: float = 120.0) -> str:
        """The server's base URL, from the line that says where it serves (--port 0: the port the kernel
        picked), once it answers /healthz; with workers, once that many say they are ready."""
        said = lambda: any(x.startswith("serving on http") for x in self.lines)  # noqa: E731
        assert _wait(lambda: said() or self.proc.poll() is not None, seconds), self.log[-3000:]
        line = next((x for x in self.lines if x.startswith("serving on http")), None)
        assert line is not None, self.log[-3000:]
        base = line.split()[2]
        assert _wait(lambda: len(self.ready_workers()) >= workers or self.proc.poll() is not None, seconds), \
            self.log[-3000:]
        assert _wait(lambda: _healthy(base) or self.proc.poll() is not None, seconds), self.log[-3000:]
        assert self.proc.poll() is None, self.log[-3000:]
        return base

    def ready_workers(self) -> list[int]:
        return [int(x.split()[2]) for x in list(self.lines) if x.startswith("provenance-guard: worker ")
                and x.endswith(" ready")]


def _healthy(base: str) -> bool:
    try:
        return requests.get(f"{base}/healthz", timeout=2).ok
    except requests.RequestException:
        return False


def serve_cmd(bundle: Path, *extra: str, entry=("-m", "provenance_guard")) -> list:
    return [sys.executable, *entry, "serve", "--index", f"refs={bundle}", "--port", "0", "--log-level", "warning",
            *extra]


def start(bundle: Path, *extra: str, env_token: bool = False):
    served = Served(serve_cmd(bundle, *extra), env_token=env_token)
    try:
        return served.proc, served.ready()
    except AssertionError:
        served.proc.kill()
        raise


def in_progress(base: str, path: str) -> float:
    """Requests to path the server is serving now (its own /metrics gauge, summed over its workers)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(requests.get(f"{base}/metrics", timeout=10).text):
        if family.name == "provenance_guard_requests_in_progress":
            return sum(s.value for s in family.samples if s.labels.get("path") == path)
    return 0.0


def stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


CLEAN_EXIT = (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after its graceful shutdown


@pytest.fixture(scope="module")
def server(built_bundle, tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    proc, base = start(built_bundle, "--batch-wait-ms", "150", "--max-request-mb", "2", "--audit-log", str(audit))
    yield base, audit
    assert stop(proc) in CLEAN_EXIT


def test_clip_retrieval_indices_list_and_embedding_query(server, built_bundle):
    base, _ = server
    assert requests.get(f"{base}/indices-list").json() == ["refs"]
    bundle = Bundle.open(built_bundle)
    body = {"embedding_input": bundle.vector([2])[0].tolist(), "modality": "image", "num_images": 3,
            "indice_name": "refs", "deduplicate": True, "use_safety_model": False, "use_violence_detector": False,
            "aesthetic_score": "", "aesthetic_weight": ""}
    out = requests.post(f"{base}/knn-service", json=body).json()
    assert isinstance(out, list) and len(out) == 3
    assert out[0]["id"] == 2 and out[0]["similarity"] > 0.999  # exact cosine: a row scores ~1 against itself
    assert {"id", "similarity", "url", "caption", "path", "sha256"} <= set(out[0])
    assert [r["similarity"] for r in out] == sorted((r["similarity"] for r in out), reverse=True)


def test_knn_with_image_and_text(server):
    base, _ = server
    image = base64.b64encode(png("rocket")).decode()
    out = requests.post(f"{base}/knn-service", json={"image": image, "indice_name": "refs", "num_images": 2,
                                                     "modality": "image"}).json()
    assert out[0]["url"] == "rocket.png" and out[0]["similarity"] > 0.999
    out = requests.post(f"{base}/knn-service", json={"text": "a rocket", "indice_name": "refs",
                                                     "num_images": 4, "modality": "image"}).json()
    assert len(out) == 4 and all(-1 <= r["similarity"] <= 1 for r in out)
    r = requests.post(f"{base}/knn-service", json={"image_url": "http://127.0.0.1:9/x.png", "indice_name": "refs"})
    assert r.status_code == 400 and "--allow-image-url" in r.json()["error"]
    r = requests.post(f"{base}/knn-service", json={"embedding_input": [0.1] * 3, "indice_name": "refs"})
    assert r.status_code == 400 and "64-d" in r.json()["error"]
    r = requests.post(f"{base}/knn-service", json={"text": "x", "indice_name": "nope"})
    assert r.status_code == 404


def test_indices_info_says_when_warm(server, built_bundle):
    base, _ = server
    deadline = time.monotonic() + 60
    info = requests.get(f"{base}/v1/indices").json()["refs"]
    while not info["warm"] and time.monotonic() < deadline:  # warmed in the background from start-up
        time.sleep(0.1)
        info = requests.get(f"{base}/v1/indices").json()["refs"]
    bundle = Bundle.open(built_bundle)
    assert info["warm"] is True and isinstance(info["faiss_rerank"], bool)
    assert (info["id"], info["rows"], info["dim"], info["exact"]) == (bundle.id, bundle.live_count, bundle.dim, bundle.exact)


def test_server_warms_its_bundles_before_any_search_and_serves_again_after_its_lifespan(built_bundle):
    """Bundles start warming as the app opens them; the search pool ends with the lifespan, and an app served
    again (a second uvicorn server, a second lifespan) gets a new one."""
    import uvicorn

    from provenance_guard.index_server.app import create_app
    from provenance_guard.index_server.config import ServerConfig

    app = create_app(ServerConfig(indices={"refs": str(built_bundle)}))
    assert app.app.state.pg.bundles["refs"]._warming is not None  # no search has run yet
    for _ in range(2):
        sock = socket.create_server(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        t = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
        t.start()
        try:
            assert _wait(lambda server=server: server.started, 30)
            r = requests.post(f"http://127.0.0.1:{port}/metadata", json={"indice_name": "refs", "ids": [0]})
            assert r.status_code == 200 and r.json()[0]["id"] == 0
            assert requests.get(f"http://127.0.0.1:{port}/healthz").json()["status"] == "ok"  # FastAPI behind Guard
        finally:
            server.should_exit = True
            t.join(30)
            sock.close()
        assert not t.is_alive()


def test_request_threads_run_faiss_on_one_thread():
    """OpenMP's thread count belongs to each thread: a request thread sets its own (the server's limit at
    start-up holds for its main thread only)."""
    import faiss

    from provenance_guard.index_server.handlers import _one_thread_pools

    bare, seen = [], []
    for target in (lambda: bare.append(faiss.omp_get_max_threads()),
                   lambda: seen.extend(_one_thread_pools(faiss.omp_get_max_threads) for _ in range(2))):
        t = threading.Thread(target=target)
        t.start()
        t.join()
    if (os.cpu_count() or 1) > 1 and "OMP_NUM_THREADS" not in os.environ:
        assert bare[0] > 1  # what a new thread starts with, whatever the main thread set
    assert seen == [1, 1]  # the second call finds the thread set already


def test_metadata(server):
    base, _ = server
    out = requests.post(f"{base}/metadata", json={"indice_name": "refs", "ids": [0, 3]}).json()
    assert [o["id"] for o in out] == [0, 3] and out[0]["metadata"]["url"] == "astronaut.png"
    assert requests.post(f"{base}/metadata", json={"indice_name": "refs", "ids": [99]}).status_code == 400


def test_v1_check_multipart_and_json(server):
    import jsonschema

    schema = json.loads((ROOT / "core/schema/check-result.v1.json").read_text())
    base, audit = server
    files = [("images", ("a.png", png("astronaut"), "image/png")), ("images", ("c.png", png("camera"), "image/png"))]
    out = requests.post(f"{base}/v1/check", files=files,
                        data={"generation": json.dumps({"prompt": "an astronaut", "seed": 7})}).json()
    results = out["results"]
    assert [r["verdict"] for r in results] == ["block", "pass"]
    for r in results:
        jsonschema.validate(r, schema)
    assert results[0]["generation"]["seed"] == 7 and results[0]["image"]["sha256"]
    body = {"images": [base64.b64encode(png("coffee")).decode()], "top_k": 2}
    out = requests.post(f"{base}/v1/check", json=body).json()
    assert out["results"][0]["matches"][0]["url"] == "coffee.png" and len(out["results"][0]["matches"]) == 2
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {"image_sha256", "user", "host", "bundles", "verdict", "top_match"} <= set(lines[-1])


def test_v1_check_precomputed_embeddings(server, built_bundle):
    """JSON /v1/check with embeddings instead of images: same results as the library's check_embeddings,
    normalised on arrival, wrong sizes and zero vectors refused, one of images/embeddings required."""
    import jsonschema

    from provenance_guard.core.check import Checker

    schema = json.loads((ROOT / "core/schema/check-result.v1.json").read_text())
    base, audit = server
    bundle = Bundle.open(built_bundle)
    rows = bundle.vector([1, 4])
    body = {"embeddings": [(rows[0] * 3.0).tolist(), rows[1].tolist()], "top_k": 3,
            "generation": [{"prompt": "first"}, None]}
    results = requests.post(f"{base}/v1/check", json=body).json()["results"]
    local = Checker(bundle).check_embeddings(rows)
    assert [r["verdict"] for r in results] == [r.verdict for r in local] == ["block", "block"]
    assert [r["matches"][0]["row_id"] for r in results] == [1, 4]
    for got, want in zip(results, local, strict=True):
        jsonschema.validate(got, schema)
        assert got["max_score"] == pytest.approx(want.max_score, abs=1e-5) and got["image"]["source"] == "embedding"
    assert results[0]["generation"]["prompt"] == "first" and results[1]["generation"] is None
    assert json.loads(audit.read_text().splitlines()[-1])["source"] == "server embedding"
    for bad, status, words in (({"embeddings": [[0.1] * 3]}, 400, "64-d"),
                               ({"embeddings": [[0.0] * 64]}, 400, "non-zero"),
                               ({"embeddings": [[1e39] * 64]}, 400, "finite"),  # beyond float32
                               ({"embeddings": [rows[0].tolist()], "images": ["aGk="]}, 422, "either"),
                               ({"top_k": 2}, 422, "either")):
        r = requests.post(f"{base}/v1/check", json=bad)
        assert r.status_code == status and words in r.json()["error"], (bad.keys(), r.text)


def test_json_bodies_are_the_same_with_and_without_orjson(monkeypatch):
    """The fast encoder and the standard library's give the same JSON, HTML in captions included."""
    import builtins

    from provenance_guard.index_server.handlers import json_body

    content = [{"id": 3, "similarity": 0.987654, "url": "https://e.com/a.jpg?x=<script>",
                "caption": "<b>Ünïcode</b> \u2028 & \"quotes\"", "nested": {"n": None, "ok": True, "f": 1.5e-7}}]
    fast = json_body(content)
    real_import = builtins.__import__

    def no_orjson(name, *a, **kw):
        if name == "orjson":
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_orjson)
    slow = json_body(content)
    assert json.loads(fast) == json.loads(slow) == content


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    base, _ = server
    big = b"x" * (3 << 20)
    assert requests.post(f"{base}/v1/check", files=[("images", ("big.png", big, "image/png"))]).status_code == 413
    r = requests.post(f"{base}/v1/check", files=[("images", ("bad.png", b"\x89PNG garbage", "image/png"))])
    assert r.status_code == 400 and "image 0" in r.json()["error"]
    assert requests.post(f"{base}/v1/check", json={"images": ["***not base64***"]}).status_code == 400
    assert requests.post(f"{base}/v1/check", data=b"{", headers={"Content-Type": "application/json"}).status_code == 400
    assert requests.post(f"{base}/v1/check", files=[("other", ("x", b"1"))]).status_code == 400
    assert requests.post(f"{base}/knn-service", json={"text": "still fine", "indice_name": "refs"}).ok


def test_concurrent_requests_are_batched_and_counted(server):
    base, _ = server
    before = requests.get(f"{base}/metrics").text

    def counter(text, name):
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    results = []

    def one(name):
        r = requests.post(f"{base}/v1/check", files=[("images", ("i.png", png(name), "image/png"))])
        results.append(r.json()["results"][0]["verdict"] if r.ok else (r.status_code, r.text))

    threads = [threading.Thread(target=one, args=(n,)) for n in ["astronaut", "camera"] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["block"] * 4 + ["pass"] * 4
    after = requests.get(f"{base}/metrics").text
    images = counter(after, "provenance_guard_embed_batch_images_total") - \
        counter(before, "provenance_guard_embed_batch_images_total")
    batches = counter(after, "provenance_guard_embed_batches_total") - counter(before, "provenance_guard_embed_batches_total")
    assert images == 8 and batches < 8  # several requests shared a forward pass
    assert 'provenance_guard_checks_total{verdict="block"}' in after
    assert _served(base, "/v1/check") >= 8
    requests.request("PROPFIND", f"{base}/healthz")  # a method label never grows past a fixed set
    assert 'method="PROPFIND"' not in requests.get(f"{base}/metrics").text
    assert 'method="other",path="/healthz"' in requests.get(f"{base}/metrics").text


def test_remote_backend_matches_local(server, built_bundle):
    base, _ = server
    images = [sample_image("chelsea"), sample_image("coins")]
    remote = Checker(f"{base}/refs").check(images)
    local = Checker(built_bundle, device="cpu").check(images)
    assert [r.verdict for r in remote] == [r.verdict for r in local] == ["block", "pass"]
    assert remote[0].matches[0].url == local[0].matches[0].url == "chelsea.png"
    assert abs(remote[0].max_score - local[0].max_score) < 1e-4
    assert remote[0].model.startswith("remote ")


@pytest.mark.parametrize("mode,verdict", [("open", "unchecked"), ("closed", "block")])
def test_server_down_follows_fail_mode(mode, verdict):
    with refused_port() as held:
        checker = Checker(f"http://127.0.0.1:{held.getsockname()[1]}/refs", policy=Policy(fail_mode=mode))
        checker.remote[0].backoff = 0.01
        (r,) = checker.check([sample_image("camera")])
    assert r.verdict == verdict and "unavailable after 4 tries" in r.error


@pytest.mark.slow
def test_token_auth(built_bundle):
    proc, base = start(built_bundle, env_token=True)
    try:
        assert requests.get(f"{base}/healthz").ok  # probes need no token
        assert requests.get(f"{base}/indices-list").status_code == 401
        assert requests.get(f"{base}/indices-list", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert requests.get(f"{base}/indices-list", headers={"Authorization": f"Bearer {TOKEN}"}).ok
        checker = Checker(f"{base}/refs", token="wrong")
        (r,) = checker.check([sample_image("camera")])
        assert r.verdict == "unchecked" and "refused the token" in r.error
        (r,) = Checker(f"{base}/refs", token=TOKEN).check([sample_image("astronaut")])
        assert r.verdict == "block"
    finally:
        assert stop(proc) in CLEAN_EXIT


def test_non_loopback_needs_a_token(built_bundle):
    from provenance_guard.index_server.config import ServerConfig
    from provenance_guard.index_server.processes import serve

    with pytest.raises(ConfigError, match="needs a token"):
        serve(ServerConfig(indices={"refs": str(built_bundle)}), "0.0.0.0", 0)
    out = subprocess.run([sys.executable, "-m", "provenance_guard", "serve", "--index", f"refs={built_bundle}",
                          "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "PROVENANCE_GUARD_TOKEN"})
    assert out.returncode == 2 and "needs a token" in out.stderr


@pytest.mark.slow
def test_graceful_shutdown_finishes_in_flight_requests(built_bundle):
    proc, base = start(built_bundle, "--batch-wait-ms", "400")
    got = {}

    def slow():
        got["r"] = requests.post(f"{base}/v1/check", files=[("images", ("i.png", png("astronaut"), "image/png"))])

    t = threading.Thread(target=slow)
    t.start()
    assert _wait(lambda: in_progress(base, "/v1/check") == 1, 30)  # the request is waiting in the batcher
    proc.send_signal(signal.SIGTERM)
    t.join(timeout=60)
    assert got["r"].status_code == 200 and got["r"].json()["results"][0]["verdict"] == "block"
    assert proc.wait(timeout=30) in CLEAN_EXIT


def test_audit_log_concurrent_writers_never_interleave(tmp_path):
    log = tmp_path / "audit.jsonl"
    code = ("import sys; from provenance_guard.core.audit import AuditLog\n"
            "a = AuditLog(sys.argv[1]); w = sys.argv[2]\n"
            "for i in range(150): a.append([{'writer': w, 'i': i, 'pad': 'x' * 3000}])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(log), str(n)]) for n in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 600
    entries = [json.loads(line) for line in lines]
    for w in "0123":
        assert [e["i"] for e in entries if e["writer"] == w] == list(range(150))


def test_knn_deduplicates_near_identical_rows_like_clip_retrieval(tmp_path):
    """Rows within clip-retrieval's 0.94 cosine of a better result are dropped unless deduplicate is false."""
    import pyarrow as pa

    from provenance_guard.core.bundle import BundleWriter
    from provenance_guard.index_server.config import ServerConfig
    from provenance_guard.index_server.handlers import knn
    from provenance_guard.index_server.state import State
    from provenance_guard.index_server.schemas import KnnRequest

    rng = np.random.default_rng(5)
    base = rng.standard_normal((40, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    twins = base[:5] + 0.01 * rng.standard_normal((5, 16)).astype(np.float32)
    vecs = np.vstack([base, twins / np.linalg.norm(twins, axis=1, keepdims=True)])
    with BundleWriter(tmp_path / "b", model="m/t", dim=16) as w:
        w.add(vecs, pa.table({"url": [f"u{i}" for i in range(len(vecs))], "caption": ["<b>c</b>"] * len(vecs)}))
        w.finish()
    state = State(ServerConfig(indices={"b": str(tmp_path / "b")}, embeddings_only=True))
    query = {"embedding_input": base[0].tolist(), "indice_name": "b", "num_images": 5}
    deduped = knn(state, KnnRequest(**query))
    ids = [r["id"] for r in deduped]
    assert ids[0] in (0, 40) and not {0, 40} <= set(ids) and len(ids) == 5
    assert deduped[0]["url"] in ("u0", "u40") and deduped[0]["caption"] == "<b>c</b>"
    both = [r["id"] for r in knn(state, KnnRequest(**query, deduplicate=False))]
    assert {0, 40} <= set(both) and len(both) == 5


@pytest.mark.slow
def test_serve_loads_its_model_before_listening_and_will_not_start_without_it(tmp_path, tiny_model, references):
    """A server whose bundle's weights are not here stops at start with one line naming --model and
    --embeddings-only (exit 2), instead of answering its clients 400 after a long first request."""
    from provenance_guard.index_builder.images import build_from_images

    model = tmp_path / "model"
    shutil.copytree(tiny_model.split(":", 1)[1], model)
    bundle = tmp_path / "b"
    build_from_images(references, bundle, f"local-dir:{model}", warn=TEST_WARN, block=TEST_BLOCK, progress=False,
                      bundle_id="b")
    shutil.rmtree(model)  # the bundle's weights are gone from this machine
    env = dict(os.environ, PROVENANCE_GUARD_DEVICE="cpu", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "provenance_guard", "serve", "--index", f"refs={bundle}",
                          "--port", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr
    assert "could not be loaded" in out.stderr and "--model" in out.stderr and "--embeddings-only" in out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "provenance_guard", "serve", "--index", f"refs={bundle}",
                          "--port", "0", "--model", f"local-dir:{tmp_path / 'nothing'}"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "could not be loaded" in out.stderr and "Traceback" not in out.stderr, out.stderr

    proc, base = start(bundle, "--model", tiny_model)  # the same weights, in another place
    try:
        files = [("images", ("a.png", png("astronaut"), "image/png"))]
        r = requests.post(f"{base}/v1/check", files=files, data={"indices": "refs"})
        assert r.status_code == 200 and r.json()["results"][0]["verdict"] == "block", r.text
    finally:
        assert stop(proc) in CLEAN_EXIT

    proc, base = start(bundle, "--embeddings-only")
    try:
        r = requests.post(f"{base}/knn-service", json={"image": base64.b64encode(png("astronaut")).decode(),
                                                        "indice_name": "refs", "num_images": 2})
        assert r.status_code == 400 and "--embeddings-only" in r.json()["error"], r.text
        vector = Bundle.open(bundle).vector([0])[0].tolist()
        r = requests.post(f"{base}/knn-service", json={"embedding_input": vector, "indice_name": "refs",
                                                        "num_images": 1})
        assert r.status_code == 200 and r.json()[0]["id"] == 0
    finally:
        assert stop(proc) in CLEAN_EXIT


def test_the_servers_own_faults_are_503_and_a_bad_request_400():
    from provenance_guard.core.errors import (BundleError, DiskFullError, ImageInputError, ModelLoadError,
                                              ProvenanceError)
    from provenance_guard.index_server.handlers import error_status

    assert [error_status(e("x")) for e in (ModelLoadError, BundleError, DiskFullError)] == [503] * 3
    assert [error_status(e("x")) for e in (ConfigError, ImageInputError, ProvenanceError)] == [400, 400, 500]


def test_serve_without_the_server_extras_says_what_to_install(built_bundle, monkeypatch, capsys):
    from provenance_guard.cli import main as cli

    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # as if `pip install .[server]` never ran
    assert cli(["serve", "--index", f"refs={built_bundle}", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "threadpoolctl" in err and "provenance-guard[server]" in err


@pytest.mark.slow
def test_a_takedown_is_served_from_the_next_request_without_a_restart(bundle_copy):
    from provenance_guard.index_builder.maintain import remove_rows

    proc, base = start(bundle_copy)
    try:
        astronaut = Bundle.open(bundle_copy).vector([0])[0].tolist()
        query = {"embedding_input": astronaut, "indice_name": "refs", "num_images": 3, "modality": "image"}
        assert requests.post(f"{base}/knn-service", json=query).json()[0]["url"] == "astronaut.png"
        remove_rows(bundle_copy, urls=["astronaut.png"], reason="takedown")
        assert "astronaut.png" not in [r["url"] for r in requests.post(f"{base}/knn-service", json=query).json()]
        image = base64.b64encode(png("astronaut")).decode()
        (result,) = requests.post(f"{base}/v1/check", json={"images": [image]}).json()["results"]
        assert result["verdict"] != "block" and "astronaut.png" not in [m["url"] for m in result["matches"]]
    finally:
        assert stop(proc) in CLEAN_EXIT


# limits, typed bodies, image_url, token file, docs, memory --------------------------------------------------

def test_every_count_is_capped_with_a_422_naming_the_field_and_limit(server):
    base, _ = server
    r = requests.post(f"{base}/knn-service", json={"text": "x", "indice_name": "refs", "num_result_ids": 10**9})
    assert r.status_code == 422 and "num_result_ids" in r.json()["error"] and "1000" in r.json()["error"]
    r = requests.post(f"{base}/knn-service", json={"text": "x", "indice_name": "refs", "num_images": 0})
    assert r.status_code == 422 and "num_images" in r.json()["error"]
    r = requests.post(f"{base}/metadata", json={"indice_name": "refs", "ids": list(range(1500))})
    assert r.status_code == 422 and "ids" in r.json()["error"] and "1000" in r.json()["error"]  # never truncated
    body = {"images": [base64.b64encode(png("coffee")).decode()], "top_k": 10**9}
    r = requests.post(f"{base}/v1/check", json=body)
    assert r.status_code == 422 and "top_k" in r.json()["error"] and "100" in r.json()["error"]
    r = requests.post(f"{base}/v1/check", files=[("images", ("a.png", png("coffee"), "image/png"))],
                      data={"top_k": "1000000000"})
    assert r.status_code == 422 and "top_k" in r.json()["error"]


@pytest.mark.parametrize("raw,field", [
    ('{"indice_name": "refs", "embedding_input": [1e400, 0.5]}', "embedding_input"),
    ('{"indice_name": "refs", "embedding_input": [Infinity, 0.5]}', None),
    ('{"indice_name": ["refs"], "text": "x"}', "indice_name"),
    ('{"indice_name": {"a": 1}, "text": "x"}', "indice_name"),
    ('{"indice_name": "refs", "text": ' + "[" * 50000 + "]" * 50000 + "}", None),
    ('{"indice_name": "refs", "deduplicate": "maybe", "text": "x"}', "deduplicate"),
    # strict JSON types: no string or boolean passes as a number, no boolean as a count, no 1 as a switch
    ('{"indice_name": "refs", "embedding_input": ["0.1", 0.5]}', "embedding_input"),
    ('{"indice_name": "refs", "embedding_input": [true, 0.5]}', "embedding_input"),
    ('{"indice_name": "refs", "text": "x", "num_images": true}', "num_images"),
    ('{"indice_name": "refs", "text": "x", "num_images": "5"}', "num_images"),
    ('{"indice_name": "refs", "text": "x", "deduplicate": 1}', "deduplicate"),
])
def test_malformed_bodies_are_4xx_never_500(server, raw, field):
    base, _ = server
    r = requests.post(f"{base}/knn-service", data=raw.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422), r.text[:300]
    if field:
        assert field in r.json()["error"]
    r = requests.post(f"{base}/v1/check", data=b'{"images": ["aGk="], "warn": 1e400, "fail_mode": "sometimes"}',
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "warn" in r.json()["error"] and "fail_mode" in r.json()["error"]
    for value in ("NaN", "1e400", "-Infinity"):  # precomputed embeddings: finite numbers only
        r = requests.post(f"{base}/v1/check", data=b'{"embeddings": [[0.5, %s]]}' % value.encode(),
                          headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "embeddings" in r.json()["error"], r.text[:300]
    assert requests.post(f"{base}/knn-service", json={"text": "still fine", "indice_name": "refs"}).ok


def test_json_bodies_are_strict_and_forms_still_convert(server):
    base, _ = server
    for body, field in (({"indice_name": "refs", "ids": [True]}, "ids"), ({"indice_name": "refs", "ids": ["1"]}, "ids")):
        r = requests.post(f"{base}/metadata", json=body)
        assert r.status_code == 422 and field in r.json()["error"], r.text[:300]
    for extra, field in (({"top_k": True}, "top_k"), ({"warn": "0.5"}, "warn"), ({"embeddings": [["0.1"]]}, "embeddings"),
                         ({"warn": ""}, "warn"), ({"fail_mode": ""}, "fail_mode")):
        body = {"images": [base64.b64encode(png("coffee")).decode()], **extra}
        if "embeddings" in extra:
            del body["images"]
        r = requests.post(f"{base}/v1/check", json=body)
        assert r.status_code == 422 and field in r.json()["error"], r.text[:300]
    ok = requests.post(f"{base}/knn-service", json={"text": "x", "indice_name": "refs", "num_images": 3,
                                                    "embedding_input": None, "deduplicate": False})
    assert ok.ok
    form = requests.post(f"{base}/v1/check", files=[("images", ("a.png", png("coffee"), "image/png"))],
                         data={"top_k": "3", "warn": "0.5"})  # a form's fields are strings: converted
    assert form.ok, form.text[:300]


@pytest.mark.slow
def test_knn_embedding_queries_in_one_batch_answer_each_as_alone(tmp_path, monkeypatch):
    """knn_many (the search batcher's work): queries of one index and count share a FAISS call, and each
    request gets what knn() gives it alone, on the IVF-PQ bundle with FAISS re-rank as on the flat one; a
    bad request in the batch gets its own error and the others their answers."""
    import faiss
    import pyarrow as pa

    from provenance_guard.core import search as search_mod
    from provenance_guard.core.bundle import BundleWriter
    from provenance_guard.index_server.config import HTTPProblem, ServerConfig
    from provenance_guard.index_server import handlers
    from provenance_guard.index_server.handlers import knn, knn_many
    from provenance_guard.index_server.state import State
    from provenance_guard.index_server.schemas import KnnRequest

    n, d = 4000, 32
    vecs = np.random.default_rng(4).standard_normal((n, d)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs[11] = vecs[10]  # near-duplicates for de-duplication to drop
    index = faiss.index_factory(d, "IVF32,PQ8x4", faiss.METRIC_INNER_PRODUCT)
    index.train(vecs)
    index.add(vecs)
    with BundleWriter(tmp_path / "ivf", model="m/t", dim=d) as w:
        w.no_flat_index()
        w.add(vecs, pa.table({"url": [f"u{i}" for i in range(n)], "caption": ["<b>c</b>"] * n}))
        w.finish(index, factory="IVF32,PQ8x4", search_params={"nprobe": 8})
    state = State(ServerConfig(indices={"ivf": str(tmp_path / "ivf")}, embeddings_only=True))
    state.bundles["ivf"].warm_up(wait=True)
    assert state.bundles["ivf"].refine is not None  # the re-rank inside FAISS, as the P4 server runs it

    def body(row, **kw):
        return KnnRequest.model_validate({"embedding_input": (vecs[row] + 0.01).tolist(), "indice_name": "ivf",
                                          **kw})

    bodies = [body(10), body(3, num_images=5), body(10, deduplicate=False), body(10, num_images=5),
              KnnRequest.model_validate({"embedding_input": [0.1] * 3, "indice_name": "ivf"}),
              body(5, indice_name="nope"), body(6, modality="text"), body(200, num_images=17), body(300),
              KnnRequest.model_validate({"embedding_input": [0.0] * d, "indice_name": "ivf"}),
              KnnRequest.model_validate({"embedding_input": [1e30] * d, "indice_name": "ivf"}),  # squares overflow
              body(10, num_images=5, num_result_ids=10), body(11, num_images=10)]  # one count, two result lengths
    calls = []
    real = search_mod.search_scores
    monkeypatch.setattr(search_mod, "search_scores", lambda b, q, k, **kw: calls.append((len(q), k)) or real(b, q, k))
    answers = knn_many(state, bodies)
    assert sorted(calls) == [(1, 34), (1, 40), (2, 10), (2, 20), (2, 80)]  # one call per (index, count), not per query
    for b, got in zip(bodies, answers, strict=True):
        if b.indice_name == "nope" or b.modality == "text" or len(b.embedding_input) == 3 or \
                b.embedding_input[0] in (0.0, 1e30):
            assert isinstance(got, HTTPProblem)
            assert got.status == (404 if b.indice_name == "nope" else 400)
            with pytest.raises(HTTPProblem) as alone:
                knn(state, b)
            assert alone.value.message == got.message  # the same error as the request alone
            continue
        assert got == knn(state, b)
        assert len(got) == b.num_images and got[0]["caption"] == "<b>c</b>"
    assert answers[0][0]["id"] in (10, 11) and {10, 11} - {r["id"] for r in answers[0]}  # one of the pair kept
    assert {10, 11} <= {r["id"] for r in answers[2]}  # both, without de-duplication

    # a batch whose shared search fails is searched again one query at a time: each gets its own outcome
    def fails_batched(b, q, k, **kw):
        if len(q) > 1:
            raise RuntimeError("batched search failed")
        return real(b, q, k)

    monkeypatch.setattr(search_mod, "search_scores", fails_batched)
    assert knn_many(state, bodies[:4]) == answers[:4]
    # answers whose shared reads fail are made again one at a time: each gets its own outcome
    monkeypatch.setattr(search_mod, "search_scores", real)
    shared = handlers._answers
    monkeypatch.setattr(handlers, "_answers", lambda st, b, bs, rs: 1 / 0 if len(bs) > 1 else shared(st, b, bs, rs))

    def outcomes(got):
        return [str(a) if isinstance(a, Exception) else a for a in got]

    assert outcomes(knn_many(state, bodies)) == outcomes(answers)
    state.close()

    # behind a transform (OPQ) FAISS rotates a batch in one matrix product, whose rounding depends on the
    # batch: each query is searched alone; a flat index takes the batch and answers exactly as alone
    opq = faiss.index_factory(d, "OPQ8_32,IVF32,PQ8x4", faiss.METRIC_INNER_PRODUCT)
    opq.train(vecs)
    opq.add(vecs)
    with BundleWriter(tmp_path / "opq", model="m/t", dim=d) as w:
        w.no_flat_index()
        w.add(vecs, pa.table({"url": [f"u{i}" for i in range(n)]}))
        w.finish(opq, factory="OPQ8_32,IVF32,PQ8x4", search_params={"nprobe": 8})
    with BundleWriter(tmp_path / "flat", model="m/t", dim=d) as w:
        w.add(vecs, pa.table({"url": [f"u{i}" for i in range(n)]}))
        w.finish()
    state = State(ServerConfig(indices={"opq": str(tmp_path / "opq"), "flat": str(tmp_path / "flat")},
                               embeddings_only=True))
    monkeypatch.setattr(search_mod, "search_scores", lambda b, q, k, **kw: calls.append((b.id, len(q))) or
                        real(b, q, k))
    bodies = [body(r, indice_name=name) for name in ("opq", "flat") for r in (10, 20, 30)]
    calls.clear()
    answers = knn_many(state, bodies)
    assert sorted(calls) == sorted([(state.bundles["opq"].id, 1)] * 3 + [(state.bundles["flat"].id, 3)])
    assert answers == [knn(state, b) for b in bodies] and all(len(a) == 40 for a in answers)
    state.close()


def test_heavy_knn_requests_are_not_batched():
    from provenance_guard.index_server.handlers import KNN_BATCH_CANDIDATES, knn_batched
    from provenance_guard.index_server.schemas import KnnRequest

    def req(**kw):
        return KnnRequest.model_validate({"embedding_input": [0.5, 0.5], **kw})

    assert knn_batched(req()) and knn_batched(req(num_images=100))
    assert knn_batched(req(num_images=200, deduplicate=False))
    assert not knn_batched(req(num_images=KNN_BATCH_CANDIDATES // 2 + 1))  # twice as many candidates, de-duplicated
    assert not knn_batched(req(num_images=1000)) and not knn_batched(req(num_images=10, num_result_ids=500))
    assert not knn_batched(KnnRequest.model_validate({"text": "a cat"}))


def test_search_batcher_takes_what_waits_answers_each_early_and_refuses_after_close():
    import asyncio

    from provenance_guard.index_server.batcher import SearchBatcher

    started, release, sizes = threading.Event(), threading.Event(), []
    first_answered = threading.Event()

    def fn(items, answer):
        sizes.append(len(items))
        started.set()
        release.wait(30)
        if "all" in items:
            raise RuntimeError("the whole batch failed")
        for n, x in enumerate(items):
            answer(n, ValueError(f"bad {x}") if x < 0 else x * 10)
            if len(items) == 4 and n == 0:  # the next answers wait until the loop has the first
                assert first_answered.wait(30)

    batcher = SearchBatcher(fn, threads=1, max_batch=4, flush=1)

    async def main():
        first = batcher.submit(1)
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
        rest = [batcher.submit(x) for x in (2, -3, 4, 5, 6)]  # queued while the first batch runs
        rest[0].add_done_callback(lambda _: first_answered.set())
        release.set()
        answers = await asyncio.gather(first, *rest, return_exceptions=True)
        failed = await asyncio.gather(batcher.submit("all"), return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, batcher.close, lambda: ConnectionAbortedError("x"))
        late = await asyncio.gather(batcher.submit(7), return_exceptions=True)
        return answers, failed, late

    answers, failed, late = asyncio.run(main())
    assert sizes == [1, 4, 1, 1]  # what waited, up to max_batch, without waiting for more
    assert answers[:2] == [10, 20] and isinstance(answers[2], ValueError) and answers[3:] == [40, 50, 60]
    assert isinstance(failed[0], RuntimeError)
    assert isinstance(late[0], ConnectionAbortedError)  # never queued for a thread that is gone
    assert not any(t.is_alive() for t in batcher._threads)


def test_concurrent_knn_queries_get_the_answers_they_get_alone(server, built_bundle):
    base, _ = server
    bundle = Bundle.open(built_bundle)
    bodies = [{"embedding_input": (bundle.vector([i % bundle.count])[0] + 0.05 * (i % 3)).tolist(),
               "indice_name": "refs", "num_images": 1 + i % 4, "deduplicate": i % 2 == 0} for i in range(24)]
    alone = [requests.post(f"{base}/knn-service", json=b).json() for b in bodies]
    together = [None] * len(bodies)

    def one(i):
        together[i] = requests.post(f"{base}/knn-service", json=bodies[i]).json()

    def queries_batched():
        text = requests.get(f"{base}/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("provenance_guard_search_batch_queries_total "))

    before = queries_batched()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone and all(len(a) == 1 + i % 4 for i, a in enumerate(alone))
    assert queries_batched() - before == len(bodies)  # every one went through the search batcher


def test_deduplication_compares_with_kept_results_only():
    """Bounded work: 25k candidates are compared a block at a time with at most num_images kept vectors and
    their own block, never as a 25k x 25k matrix; the result equals the greedy definition."""
    from provenance_guard.index_server.handlers import DEDUP_COSINE, deduplicate

    class Counting(np.ndarray):
        largest = 0

        def __matmul__(self, other):
            out = np.asarray(self) @ np.asarray(other)
            Counting.largest = max(Counting.largest, out.size)
            return out

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((25_000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[1] = vectors[0]  # a duplicate of the best result
    vectors[130] = vectors[129]  # a duplicate inside a later block
    vectors[200] = vectors[5]  # a duplicate of a result kept in an earlier block
    counting = vectors.view(Counting)
    kept = deduplicate(lambda a, b: counting[a:b], list(range(25_000)), 40)
    assert len(kept) == 40 and 0 in kept and 1 not in kept
    assert kept == sorted(kept)
    assert 0 < Counting.largest <= 128 * (40 + 128)
    reads = []  # without a duplicate among the first 40, only their rows are read
    assert deduplicate(lambda a, b: reads.append((a, b)) or vectors[2 + a:2 + b], list(range(24_998)), 40) == \
        list(range(40))
    assert reads == [(0, 40)]

    def greedy(n_keep, vecs=vectors):
        out = []
        for i in range(len(vecs)):
            if not any(float(vecs[i] @ vecs[j]) >= DEDUP_COSINE for j in out):
                out.append(i)
                if len(out) == n_keep:
                    return out
        return out

    expected = greedy(300)
    assert 130 not in expected and 200 not in expected
    assert deduplicate(lambda a, b: vectors[a:b], list(range(25_000)), 300) == expected
    # blocks smaller than num_images, the first without a duplicate (kept whole), the later ones with them
    shifted = vectors[2:]
    expected = greedy(300, shifted)
    assert 128 not in expected and 198 not in expected
    assert deduplicate(lambda a, b: shifted[a:b], list(range(len(shifted))), 300, block=16) == expected


class _Origin:
    """A loopback HTTP server with the cases an image_url can lead to."""

    def __init__(self):
        import http.server

        png_bytes = png("rocket")

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.path == "/ok.png":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(png_bytes)))
                    self.end_headers()
                    self.wfile.write(png_bytes)
                elif self.path == "/redirect-out":
                    self.send_response(302)
                    self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                    self.end_headers()
                elif self.path == "/redirect-in":
                    self.send_response(302)
                    self.send_header("Location", "/ok.png")
                    self.end_headers()
                elif self.path == "/big":
                    self.send_response(200)
                    self.send_header("Content-Length", str(1 << 40))
                    self.end_headers()
                elif self.path == "/slow":
                    self.send_response(200)
                    self.end_headers()
                    try:
                        for _ in range(120):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.25)
                    except OSError:
                        pass
                elif self.path == "/drip":  # a byte a second for a minute: never silent for a read timeout
                    self.send_response(200)
                    self.end_headers()
                    try:
                        for _ in range(60):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(1.0)
                    except OSError:
                        pass
                elif self.path == "/text":
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(b"not an image")
                else:
                    self.send_response(404)
                    self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def origin():
    o = _Origin()
    yield o
    o.close()


def test_fetch_refuses_what_it_must_and_bounds_the_rest(origin):
    from provenance_guard.core.fetch import FetchError, FetchPolicy, address_allowed, fetch

    for address in ("127.0.0.1", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                    "224.0.0.1", "0.0.0.0", "::ffff:127.0.0.1", "fe80::1", "240.0.0.1"):
        assert not address_allowed(address), address
    assert address_allowed("8.8.8.8") and address_allowed("127.0.0.1", allow_loopback=True)
    strict = FetchPolicy(deadline=3.0)
    for url in (origin.url("/ok.png"), origin.url("/ok.png", "localhost"), origin.url("/ok.png", "2130706433"),
                "file:///etc/passwd", "ftp://example.com/x"):
        with pytest.raises(FetchError) as info:
            fetch(url, strict, public="nope")
        assert str(info.value) == "nope"  # one message whatever the reason
    loop = FetchPolicy(deadline=2.0, max_bytes=1 << 20, allow_loopback=True)
    assert fetch(origin.url("/ok.png"), loop) == png("rocket")
    assert fetch(origin.url("/redirect-in"), loop) == png("rocket")
    reasons = {}
    for path in ("/redirect-out", "/big", "/slow", "/missing"):
        with pytest.raises(FetchError) as info:
            fetch(origin.url(path), loop)
        reasons[path] = info.value.reason
    assert "169.254.169.254" in reasons["/redirect-out"] and "not a public address" in reasons["/redirect-out"]
    assert "Content-Length" in reasons["/big"] and "deadline" in reasons["/slow"] and "404" in reasons["/missing"]


def test_a_dripping_host_costs_its_own_fetch_only(origin):
    """The deadline holds while reading: the connection is cut at it, so the pool thread is free again and
    the next fetch works (a byte every second used to keep a thread for a minute against a 2 s deadline)."""
    from provenance_guard.core.fetch import FetchError, Fetcher, FetchPolicy

    fetcher = Fetcher(FetchPolicy(deadline=2.0, read_timeout=5.0, allow_loopback=True), workers=1, queue=1)
    try:
        t0 = time.monotonic()
        with pytest.raises(FetchError) as info:
            fetcher.get(origin.url("/drip"))
        assert "deadline" in info.value.reason
        assert fetcher.get(origin.url("/ok.png")) == png("rocket")  # the one worker is free again
        assert time.monotonic() - t0 < 30  # not the drip's 60 s (a bound on correctness, not a speed target)
    finally:
        fetcher.close()


@pytest.mark.slow
def test_image_url_on_the_server(built_bundle, origin):
    proc, base = start(built_bundle, "--allow-image-url")
    try:
        for url in (origin.url("/ok.png"), origin.url("/ok.png", "localhost"), origin.url("/ok.png", "2130706433")):
            r = requests.post(f"{base}/knn-service", json={"image_url": url, "indice_name": "refs"})
            assert r.status_code == 400 and r.json()["error"] == "image_url could not be fetched"
    finally:
        assert stop(proc) in CLEAN_EXIT
    proc, base = start(built_bundle, "--allow-image-url", "--allow-image-url-loopback")
    try:
        r = requests.post(f"{base}/knn-service", json={"image_url": origin.url("/ok.png"), "indice_name": "refs",
                                                       "num_images": 1})
        assert r.status_code == 200 and r.json()[0]["url"] == "rocket.png"
        errors = set()
        for path in ("/redirect-out", "/big", "/text", "/missing"):
            r = requests.post(f"{base}/knn-service", json={"image_url": origin.url(path), "indice_name": "refs"})
            assert r.status_code == 400
            errors.add(r.json()["error"])
        assert errors == {"image_url could not be fetched"}  # refused, too big, not an image, 404: alike
        # Slow URLs fill the small fetch pool and its queue; more are refused at once, and ordinary queries
        # are answered meanwhile (fetches hold no request thread).
        answers = []

        def slow():
            answers.append(requests.post(f"{base}/knn-service", json={"image_url": origin.url("/slow"),
                                                                      "indice_name": "refs"}, timeout=60).status_code)

        threads = [threading.Thread(target=slow) for _ in range(24)]
        for t in threads:
            t.start()
        assert _wait(lambda: len(answers) == 4 and in_progress(base, "/knn-service") >= 20, 30)  # fetches under way
        ordinary = requests.post(f"{base}/knn-service", json={"text": "rocket", "indice_name": "refs"}, timeout=60)
        done_before = len(answers)
        assert ordinary.ok
        for t in threads:
            t.join(timeout=60)
        assert sorted(set(answers)) == [400, 503] and answers.count(503) == 4 and done_before <= 4
    finally:
        assert stop(proc) in CLEAN_EXIT


@pytest.mark.slow
def test_token_file_and_no_cdn_docs(built_bundle, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proc, base = start(built_bundle, "--token-file", str(token_file))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        assert requests.get(f"{base}/indices-list").status_code == 401
        assert requests.get(f"{base}/indices-list", headers=auth).ok
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert requests.get(f"{base}{path}", headers=auth).status_code == 404
    finally:
        assert stop(proc) in CLEAN_EXIT
    proc, base = start(built_bundle, "--openapi")
    try:
        assert "/knn-service" in requests.get(f"{base}/openapi.json").json()["paths"]
        assert requests.get(f"{base}/docs").status_code == 404
    finally:
        assert stop(proc) in CLEAN_EXIT
    empty = tmp_path / "empty"
    empty.write_text("\n")
    out = subprocess.run([sys.executable, "-m", "provenance_guard", "serve", "--index", f"refs={built_bundle}",
                          "--token-file", str(empty), "--port", "0"], capture_output=True, text=True)
    assert out.returncode == 2 and "first line is empty" in out.stderr


def test_decode_budget_admits_waits_and_refuses():
    from provenance_guard.index_server.config import HTTPProblem
    from provenance_guard.index_server.state import DecodeBudget

    budget = DecodeBudget(100, wait_s=0.2)
    held = budget.acquire(80)
    with pytest.raises(HTTPProblem) as busy:
        budget.acquire(40)
    assert busy.value.status == 503 and busy.value.headers == {"Retry-After": "1"}
    with pytest.raises(HTTPProblem) as never:
        budget.acquire(101)
    assert never.value.status == 413 and "send fewer or smaller images" in never.value.message
    threading.Timer(0.05, budget.release, args=(held,)).start()
    budget.wait_s = 5.0
    assert budget.acquire(40) == 40 and budget.used == 40
    # Each of N worker processes admits its share: the server's whole decode memory stays bounded.
    share = DecodeBudget(100, wait_s=0.2, workers=2)
    assert share.acquire(50) == 50
    with pytest.raises(HTTPProblem) as never:
        share.acquire(51)
    assert never.value.status == 413 and "2 worker processes" in never.value.message
    assert "--max-decode-mb or fewer --workers" in never.value.message


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_large_uploads_are_admitted_by_memory_and_memory_returns(built_bundle):
    big = io.BytesIO()
    Image = __import__("PIL.Image", fromlist=["Image"])
    Image.new("RGBA", (4000, 4000), (10, 200, 30, 128)).save(big, "PNG")
    proc, base = start(built_bundle, "--max-decode-mb", "64")
    try:
        r = requests.post(f"{base}/v1/check", files=[("images", ("big.png", big.getvalue(), "image/png"))])
        assert r.status_code == 413 and "admits at once" in r.json()["error"]
    finally:
        assert stop(proc) in CLEAN_EXIT
    proc, base = start(built_bundle)
    try:
        requests.post(f"{base}/v1/check", files=[("images", ("a.png", png("astronaut"), "image/png"))]).raise_for_status()
        # Warm with the request the loop sends: a first batch of two grows the model's buffers once.
        requests.post(f"{base}/v1/check", files=[("images", ("b.png", big.getvalue(), "image/png"))] * 2
                      ).raise_for_status()
        warm = rss(proc.pid)
        for _ in range(3):
            r = requests.post(f"{base}/v1/check", files=[("images", ("b.png", big.getvalue(), "image/png"))] * 2)
            assert r.ok and len(r.json()["results"]) == 2
        # Each request decodes 2 x 112 MB; what stays resident afterwards is the warm server, not the images.
        assert rss(proc.pid) - warm < 64 << 20, f"{(rss(proc.pid) - warm) / 2**20:.0f} MiB more than after warm-up"
    finally:
        assert stop(proc) in CLEAN_EXIT


def _children(pid: int) -> list[int]:
    """The server's worker processes (uvicorn's, spawned by multiprocessing)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    return [child for child in pids if _is_worker(child)]


def _is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()  # not its resource tracker
    except OSError:
        return False


def _wait(condition, seconds: float = 60.0) -> bool:
    """Poll condition until it holds or seconds pass (the server's readiness signals: its lines, /healthz,
    its in-progress gauge, /proc)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _served(base: str, path: str = "/knn-service") -> int:
    """Requests to path answered 200, summed over every worker, from /metrics as Prometheus reads it."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{base}/metrics", timeout=10).text
    return int(sum(s.value for f in text_string_to_metric_families(text) if f.name == "provenance_guard_requests"
                   for s in f.samples if s.name == "provenance_guard_requests_total"
                   and s.labels == {"path": path, "method": "POST", "status": "200"}))


LISTEN, ESTABLISHED = "0A", "01"  # /proc/net/tcp's states


def _sockets(pid: int, port: int, state: str) -> list[int]:
    """The TCP sockets process pid holds on local port `port` in `state` (Linux /proc), by inode."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state and int(fields[9]) in inodes:
                found.append(int(fields[9]))
    return found


LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts worker processes in /proc (Linux)")


@LINUX_PROC
@pytest.mark.slow
def test_workers_share_the_port_sum_their_metrics_and_a_dead_one_is_replaced(built_bundle):
    sup = Served(serve_cmd(built_bundle, "--workers", "2"))
    proc = sup.proc
    try:
        base = sup.ready(workers=2)
        workers = _children(proc.pid)
        assert len(workers) == 2 and sorted(workers) == sorted(sup.ready_workers())
        run = next(Path(tempfile.gettempdir()).glob(f"provenance-guard-serve-{proc.pid}-*"))
        body = {"embedding_input": Bundle.open(built_bundle).vector([2])[0].tolist(), "num_images": 3,
                "indice_name": "refs"}
        port = int(base.rsplit(":", 1)[1])
        # Each worker listens on a socket of its own on the port; the manager's socket holds it, unlistened.
        assert all(len(_sockets(w, port, LISTEN)) == 1 for w in workers)
        assert not _sockets(proc.pid, port, LISTEN)
        # 32 keep-alive clients that connect at once are spread over both workers: the kernel hashes each new
        # connection to a worker's socket, and a worker above its share (16, plus one) answers with
        # "Connection: close" until the clients' new connections have evened it out.
        sessions = [requests.Session() for _ in range(32)]
        splits = []
        for _ in range(12):
            for session in sessions:
                r = session.post(f"{base}/knn-service", json=body)
                assert r.ok and r.json()[0]["id"] == 2
            splits.append(sorted(len(_sockets(w, port, ESTABLISHED)) for w in workers))
            if sum(splits[-1]) == 32 and splits[-1][1] <= 17:
                break
        assert sum(splits[-1]) == 32 and splits[-1][1] <= 17, splits
        for session in sessions:
            session.close()
        answered = 32 * len(splits)
        assert _served(base) == answered  # summed over both workers, whichever answers the scrape
        assert len(list((run / "metrics").glob("counter_*.db"))) == 2  # both served: prometheus_client's files

        # A crashed worker is replaced by uvicorn's manager; its counts stay in the sums.
        os.kill(workers[0], signal.SIGKILL)
        assert _wait(lambda: len(sup.ready_workers()) == 3, 120), sup.log[-3000:]
        assert _wait(lambda: len(_children(proc.pid)) == 2 and workers[0] not in _children(proc.pid))
        assert _served(base) >= answered
        assert all(requests.post(f"{base}/knn-service", json=body, timeout=30).ok for _ in range(5))
        assert _served(base) >= answered + 5
        assert all(len(_sockets(w, port, LISTEN)) == 1 for w in _children(proc.pid))  # the new one's own
    finally:
        assert stop(proc) in CLEAN_EXIT
    assert not run.exists()  # the settings and metrics folder goes with the server
    assert "Traceback" not in sup.log, sup.log[-3000:]


@pytest.mark.slow
def test_a_worker_that_cannot_open_its_bundle_stops_the_server_with_the_reason(tmp_path):
    out = subprocess.run([sys.executable, "-m", "provenance_guard", "serve", "--index", f"refs={tmp_path / 'none'}",
                          "--port", "0", "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [x for x in out.stderr.splitlines() if x.startswith("provenance-guard: error:")]
    assert len(lines) == 1 and "a server worker could not start" in lines[0], out.stderr[-3000:]
    assert "does not exist or is not a folder" in lines[0]
    assert "Traceback" not in out.stderr and "died" not in out.stderr  # stopped, never restarted in a loop


def test_a_worker_started_by_gunicorn_reads_serve_arguments_from_the_environment(built_bundle, monkeypatch):
    from provenance_guard.index_server import processes

    monkeypatch.delenv(processes.PG_SETTINGS_ENV, raising=False)
    monkeypatch.setenv(processes.PG_ARGS_ENV, f"--index 'refs={built_bundle}' --embeddings-only --max-images 3")
    app = processes.worker_app()
    state = app.app.state.pg
    assert list(state.bundles) == ["refs"] and state.config.max_images_per_request == 3
    state.close()
    monkeypatch.setenv(processes.PG_ARGS_ENV, "--index refs=/nonexistent/bundle --embeddings-only")
    with pytest.raises(SystemExit) as stopped:  # uvicorn's and gunicorn's code for a worker that cannot boot
        processes.worker_app()
    assert stopped.value.code == 3


@pytest.mark.slow
def test_gunicorn_serves_the_same_app_with_its_uvicorn_workers(built_bundle, tmp_path):
    """The production recipe of docs/commands.md: gunicorn's workers build the app from
    $PROVENANCE_GUARD_SERVE_ARGS, and /metrics sums them through PROMETHEUS_MULTIPROC_DIR."""
    pytest.importorskip("gunicorn")
    pytest.importorskip("uvicorn_worker")
    gunicorn = Path(sys.executable).with_name("gunicorn")
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    env = dict(os.environ, PROVENANCE_GUARD_DEVICE="cpu", PROMETHEUS_MULTIPROC_DIR=str(metrics),
               PROVENANCE_GUARD_SERVE_ARGS=f"--index 'refs={built_bundle}' --embeddings-only")
    proc = subprocess.Popen([str(gunicorn), "-w", "2", "-k", "uvicorn_worker.UvicornWorker", "-b", "127.0.0.1:0",
                             "provenance_guard.index_server.processes:worker_app()"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(x.decode(errors="replace")) for x in proc.stdout],
                     daemon=True).start()
    try:
        assert _wait(lambda: sum("worker" in x and "ready" in x for x in lines) >= 2 or proc.poll() is not None, 120)
        line = next(x for x in lines if "Listening at: http://" in x)  # -b :0: the port gunicorn bound
        base = line.split("Listening at: ")[1].split()[0]
        body = {"embedding_input": Bundle.open(built_bundle).vector([2])[0].tolist(), "num_images": 3}
        for _ in range(10):
            assert requests.post(f"{base}/knn-service", json=body, timeout=30).json()[0]["id"] == 2
        assert _served(base) == 10
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "".join(lines)[-3000:]


@LINUX_PROC
@pytest.mark.slow
def test_workers_finish_a_request_in_flight_on_sigterm(built_bundle):
    sup = Served(serve_cmd(built_bundle, "--workers", "2", "--batch-wait-ms", "2500"))
    got = {}
    try:
        base = sup.ready(workers=2)
        workers = _children(sup.proc.pid)

        def slow():
            got["r"] = requests.post(f"{base}/v1/check", files=[("images", ("i.png", png("astronaut"), "image/png"))],
                                     timeout=120)

        t = threading.Thread(target=slow)
        t.start()
        assert _wait(lambda: in_progress(base, "/v1/check") == 1, 30)  # in a worker, waiting in its image batch
        sup.proc.send_signal(signal.SIGTERM)
        t.join(timeout=120)
        assert got["r"].status_code == 200 and got["r"].json()["results"][0]["verdict"] == "block"
        assert sup.proc.wait(timeout=60) in CLEAN_EXIT
        assert _wait(lambda: not any(_is_worker(w) for w in workers), 10)
    finally:
        if sup.proc.poll() is None:
            sup.proc.kill()
            sup.proc.wait()


@LINUX_PROC
@pytest.mark.slow
def test_workers_of_a_clone_run_by_path_refuse_a_taken_port_and_end_with_their_manager(built_bundle, tmp_path):
    import provenance_guard
    from provenance_guard.index_server.processes import _remove_stale_runs

    # A clone that pip did not install, in a folder not named like the package (custom_nodes/, extensions/).
    clone = tmp_path / "Provenance Guard clone"
    shutil.copytree(Path(provenance_guard.__file__).parent, clone, ignore=shutil.ignore_patterns(
        ".*", "tests", "bench", "*.egg-info", "__pycache__", "demo-out"))
    # Each worker says which file its code came from...
    code = clone / "index_server" / "processes.py"
    ready = 'print(f"provenance-guard: worker {os.getpid()} ready"'
    assert code.read_text().count(ready) == 1
    code.write_text(code.read_text().replace(
        ready, 'print(f"provenance-guard: worker code {__file__}", file=sys.stderr, flush=True)\n    ' + ready))
    # ...and a package of the same name that an import by name finds first (an installed copy, or none at all
    # in a clone pip did not install) refuses to load: the workers must load the clone, as the manager does.
    decoy = tmp_path / "elsewhere" / "provenance_guard"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text('raise ImportError("the workers imported provenance_guard by name")\n')
    sup = Served(serve_cmd(built_bundle, "--workers", "2", entry=(str(clone),)), cwd=tmp_path,
                 env={"PYTHONPATH": str(decoy.parent)})
    proc = sup.proc
    try:
        base = sup.ready(workers=2)  # --port 0: the port the kernel picked, in the line that says it serves
        port = int(base.rsplit(":", 1)[1])
        assert port > 0
        workers = _children(proc.pid)
        assert len(workers) == 2
        assert sup.log.count(f"provenance-guard: worker code {code}") == 2, sup.log[-3000:]
        run = next(Path(tempfile.gettempdir()).glob(f"provenance-guard-serve-{proc.pid}-*"))
        body = {"embedding_input": Bundle.open(built_bundle).vector([1])[0].tolist(), "num_images": 2}
        assert requests.post(f"{base}/knn-service", json=body).json()[0]["id"] == 1

        # A second server on the same port is refused in one line.
        second = subprocess.run(serve_cmd(built_bundle, "--port", str(port), entry=(str(clone),)), cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "another server holds it" in second.stderr, second.stderr[-2000:]

        # A manager that is killed outright takes its workers with it (they finish their requests first);
        # its folder, left behind, goes with the next server's start.
        proc.kill()
        proc.wait()
        assert _wait(lambda: not any(_is_worker(w) for w in workers), 30)
        assert run.exists()
        _remove_stale_runs()
        assert not run.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-worker sockets are Linux's (SO_REUSEPORT)")
def test_worker_sockets_share_the_port_and_a_second_server_is_refused_before_they_listen():
    from provenance_guard.index_server.processes import WorkerSocket, _claim_port, bind

    held = bind("127.0.0.1", 0, per_worker=True)  # the manager's: bound, never listening
    port = held.getsockname()[1]
    claim = _claim_port(port)
    # What each worker gets from uvicorn's manager, which pickles the sockets it hands them: what the socket
    # reduces to, rebuilt (as unpickling in the worker does), is a socket of its own on the same port, not a
    # copy of the manager's. (The workers test checks each real worker's listening socket.)
    assert isinstance(held, WorkerSocket)
    rebuild, args = held.__reduce_ex__(4)[:2]
    mine = [rebuild(*args) for _ in range(2)]
    try:
        assert all(type(w) is socket.socket and w.getsockname() == ("127.0.0.1", port) for w in mine)
        assert all(w.fileno() != held.fileno() for w in mine)
        for w in mine:
            w.listen(64)
            w.setblocking(False)
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(32)]
        accepted = []
        for w in mine:
            n = 0
            while True:
                try:
                    w.accept()[0].close()
                except BlockingIOError:
                    break
                n += 1
            accepted.append(n)
        assert sum(accepted) == 32 and min(accepted) >= 1, accepted  # the kernel spread them
        for c in clients:
            c.close()
        # A second server on the port: while the workers listen its bind is refused; before they do (they
        # are still loading) only the claim stands between it and SO_REUSEPORT joining it to the port.
        with pytest.raises(ConfigError, match="another server holds it"):
            bind("127.0.0.1", port, per_worker=True)
        for w in mine:
            w.close()
        second = bind("127.0.0.1", port, per_worker=True)
        try:
            with pytest.raises(ConfigError, match=f"port {port}: another provenance-guard server"):
                _claim_port(port)
        finally:
            second.close()
    finally:
        for w in mine:
            w.close()
        held.close()
        claim.close()
    _claim_port(port).close()  # released with the server


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the per-worker connection table is Linux's")
def test_connection_share_slots_and_rebalance_asks_a_crowded_workers_clients_to_reconnect(tmp_path):
    import asyncio

    from provenance_guard.index_server.processes import MAX_WORKERS, ConnectionShare, Rebalance

    table = tmp_path / "connections"
    ConnectionShare.create(table)
    assert table.stat().st_mode & 0o777 == 0o600
    code = ("import sys, time; from pathlib import Path; "
            "from provenance_guard.index_server.processes import ConnectionShare as C; "
            "c = C(Path(sys.argv[1])); c.add(int(sys.argv[2])); print(c.slot, flush=True); time.sleep(60)")
    others = [subprocess.Popen([sys.executable, "-c", code, str(table), str(n)], stdout=subprocess.PIPE, text=True)
              for n in (10, 10)]
    try:
        slots = [int(p.stdout.readline()) for p in others]
        assert sorted(slots) == [0, 1]  # each worker its own slot, held while it lives
        mine = ConnectionShare(table)
        assert mine.slot == 2
        mine.add(11)
        assert not mine.crowded()  # 11 of 31 over three workers: within the share (10.3) plus one
        mine.add(1)
        assert mine.crowded()  # 12 of 32: above 10.7 plus one
        sent = []

        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"x")]})
            await send({"type": "http.response.body", "body": b"ok"})

        async def send(message):
            sent.append(message)

        asyncio.run(Rebalance(app, mine)({"type": "http"}, None, send))
        assert (b"connection", b"close") in sent[0]["headers"] and sent[1]["body"] == b"ok"
        mine.add(-3)
        sent.clear()
        asyncio.run(Rebalance(app, mine)({"type": "http"}, None, send))
        assert sent[0]["headers"] == [(b"content-type", b"x")]  # within its share: kept alive
        # A worker that dies leaves its slot to its replacement, which starts from no connections.
        others[0].kill()
        others[0].wait()
        replacement = ConnectionShare(table)
        assert replacement.slot == slots[0]
        mine.leave()
        assert not replacement.crowded()
    finally:
        for p in others:
            p.kill()
            p.wait()
    bad = tmp_path / "short"
    bad.write_bytes(bytes(MAX_WORKERS))
    with pytest.raises(ConfigError, match="not a server's connection table"):
        ConnectionShare(bad)


@LINUX_PROC
@pytest.mark.slow
def test_ctrl_c_stops_every_worker(built_bundle):
    sup = Served(serve_cmd(built_bundle, "--workers", "2"), new_session=True)
    try:
        sup.ready(workers=2)
        workers = _children(sup.proc.pid)
        assert len(workers) == 2
        os.killpg(sup.proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground process group
        code = sup.proc.wait(timeout=60)
    finally:
        if sup.proc.poll() is None:  # not stopped: the session's every process goes
            os.killpg(sup.proc.pid, signal.SIGKILL)
            sup.proc.wait()
    assert code in (0, 130, -signal.SIGINT), sup.log[-2000:]
    assert "died" not in sup.log and "Traceback" not in sup.log, sup.log[-2000:]
    assert _wait(lambda: not any(_is_worker(w) for w in workers), 10)


def _open_idle(port: int, count: int) -> list:
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def _closed_by_server(conn: socket.socket, seconds: float = 10.0) -> bool:
    conn.settimeout(seconds)
    try:
        return conn.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.slow
def test_idle_and_trickling_connections_are_closed_and_cannot_hold_the_server(built_bundle):
    """A connection that never sends a byte, or sends its headers a byte at a time, is closed after
    --header-timeout; a body that trickles gets 408 after --body-timeout; a keep-alive connection that goes
    idle after an answer closes too. With the process's descriptors capped (ulimit -n 128), 300 idle
    connections opened at once cannot keep a new client out for longer than the header deadline."""
    import resource

    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))  # noqa: E731
    sup = Served(serve_cmd(built_bundle, "--embeddings-only", "--header-timeout", "1.5", "--body-timeout", "1.5"),
                 preexec=limit)
    try:
        base = sup.ready()
        port = int(base.rsplit(":", 1)[1])
        idle = _open_idle(port, 100)
        assert all(_closed_by_server(c) for c in idle)  # all 100 closed, each within the deadline
        for c in idle:
            c.close()

        trickle = socket.create_connection(("127.0.0.1", port))
        t0 = time.monotonic()
        closed = False
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if _closed_by_server(trickle, 0.2):
                closed = True
                break
        assert closed and time.monotonic() - t0 < 6
        trickle.close()

        body = socket.create_connection(("127.0.0.1", port))
        body.sendall(b"POST /metadata HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        body.settimeout(10)
        assert body.recv(4096).startswith(b"HTTP/1.1 408 ")
        body.close()

        # Descriptors capped at 128: most of 300 idle connections wait in the backlog or are refused while
        # they hold the process's descriptors; once the deadline closes them a new client is served.
        crowd = []
        for _ in range(300):
            try:
                crowd.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break
        t0 = time.monotonic()
        assert _wait(lambda: _healthy(base), 30), sup.log[-2000:]
        assert time.monotonic() - t0 < 20
        for c in crowd:
            c.close()
        assert _healthy(base)
    finally:
        assert stop(sup.proc) in CLEAN_EXIT


@pytest.mark.slow
def test_beyond_max_connections_requests_get_503_and_the_server_recovers(built_bundle):
    sup = Served(serve_cmd(built_bundle, "--embeddings-only", "--max-connections", "5", "--header-timeout", "30"))
    try:
        base = sup.ready()
        port = int(base.rsplit(":", 1)[1])
        held = _open_idle(port, 5)
        assert _wait(lambda: requests.get(f"{base}/healthz", timeout=5).status_code == 503, 10)
        for c in held:
            c.close()
        assert _wait(lambda: _healthy(base), 10)
    finally:
        assert stop(sup.proc) in CLEAN_EXIT


@pytest.mark.slow
def test_metrics_parse_as_prometheus_with_a_hostile_index_name(built_bundle):
    """/metrics is prometheus_client's exposition: it parses, an operator's index name with a quote, a
    backslash and a newline stays one label value, and every stage of a check has its histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    name = 'we"ird\\name\n{x:1}'
    sup = Served([sys.executable, "-m", "provenance_guard", "serve", "--index", f"{name}={built_bundle}", "--port",
                  "0", "--log-level", "warning"])
    try:
        base = sup.ready()
        requests.post(f"{base}/v1/check", files=[("images", ("i.png", png("astronaut"), "image/png"))],
                      data={"indices": name}).raise_for_status()
        body = {"embedding_input": Bundle.open(built_bundle).vector([2])[0].tolist(), "indice_name": name}
        requests.post(f"{base}/knn-service", json=body).raise_for_status()
        families = {f.name: f for f in text_string_to_metric_families(requests.get(f"{base}/metrics").text)}
        (rows,) = families["provenance_guard_index_rows"].samples
        assert rows.labels == {"index": name} and rows.value == Bundle.open(built_bundle).live_count
        stages = {s.labels["stage"] for s in families["provenance_guard_stage_seconds"].samples
                  if s.name.endswith("_count") and s.value > 0}
        assert stages >= {"decode", "embed", "search", "rerank", "metadata"}, stages
        checks = {s.labels["verdict"]: s.value for s in families["provenance_guard_checks"].samples
                  if s.name == "provenance_guard_checks_total"}
        assert checks == {"block": 1.0}
    finally:
        assert stop(sup.proc) in CLEAN_EXIT


def test_knn_rows_of_several_queries_deduplicate_each_as_alone(tmp_path):
    """Queries answered together share one read of their first candidates' vectors: a query whose first
    num_images hold no pair within DEDUP_MARGIN of DEDUP_COSINE keeps them all, any other goes through
    deduplicate(); each gets the rows deduplicate() gives it, whatever the others' lengths (shorter blocks
    padded). Stored pairs at 0.999 and 0.95 (near-duplicates), just under 0.94 (kept, but decided by
    deduplicate()) and at 0.71 (far)."""
    import pyarrow as pa

    from provenance_guard.core.bundle import BundleWriter
    from provenance_guard.index_server import handlers as H
    from provenance_guard.index_server.schemas import KnnRequest

    rng = np.random.default_rng(5)
    d = 16
    vecs = rng.standard_normal((300, d)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)

    def stored(v):  # as the bundle keeps a row: normalised, then float16
        return (v / np.linalg.norm(v)).astype(np.float16).astype(np.float32)

    def pair(a, b, low, high):  # row b at a stored cosine in [low, high) of row a
        for _ in range(10_000):
            p = rng.standard_normal(d).astype(np.float32)
            p -= (p @ vecs[a]) * vecs[a]
            p /= np.linalg.norm(p)
            angle = np.arccos((low + high) / 2)
            v = (np.cos(angle) * vecs[a] + np.sin(angle) * p).astype(np.float32)
            if low <= float(stored(vecs[a]) @ stored(v)) < high:
                vecs[b] = v
                return
        raise AssertionError(f"no pair in [{low}, {high})")

    line, margin = H.DEDUP_COSINE, H.DEDUP_MARGIN
    pair(1, 2, 0.998, 1.0)
    pair(3, 4, 0.70, 0.72)
    pair(5, 6, line - margin, line)  # within the margin: deduplicate() decides, and keeps both
    pair(7, 8, 0.95, 0.96)  # a near-duplicate the margin must not hide
    with BundleWriter(tmp_path / "b", model="m/t", dim=d) as w:
        w.add(vecs, pa.table({"url": [f"u{i}" for i in range(300)]}))
        w.finish()
    bundle = Bundle.open(tmp_path / "b")
    rows = bundle.vector(list(range(300)))
    assert line - margin <= float(rows[5] @ rows[6]) < line and 0.95 <= float(rows[7] @ rows[8]) < 0.96

    def body(num, dedup=True):
        return KnnRequest(embedding_input=[1.0] * d, num_images=num, deduplicate=dedup)

    firsts = ([1, 2] + list(range(10, 40)), [3, 4] + list(range(40, 60)), [5, 6] + list(range(60, 100)),
              list(range(100, 140)), [7, 8, 9], [1, 2] + list(range(140, 160)), [3, 4, 7, 8] + list(range(160, 200)))
    bodies = [body(10), body(20), body(30), body(40), body(5), body(10, dedup=False), body(4)]
    rankeds = [[(0.9 - j / 1000, i) for j, i in enumerate(ids)] for ids in firsts]
    assert H._clear_first_blocks(bundle, bodies, rankeds) == [False, True, False, True, False, False, False]
    together = H._knn_rows(bundle, bodies, rankeds)
    for b, r, got in zip(bodies, rankeds, together, strict=True):
        assert got == H._knn_rows(bundle, [b], [r])[0]  # alone: deduplicate() for every query
        want = H.deduplicate(lambda i, j, r=r: bundle.vector([x for _, x in r[i:j]]), r, b.num_images) \
            if b.deduplicate else r[:b.num_images]
        assert [row["id"] for row in got] == [i for _, i in want]
    ids = [[row["id"] for row in got] for got in together]
    assert 2 not in ids[0] and 4 in ids[1] and {5, 6} <= set(ids[2]) and 8 not in ids[4] and 2 in ids[5]
    assert ids[6] == [3, 4, 7, 160]  # the near-duplicate 8 dropped, the next candidate in its place


def test_knn_rows_keep_url_and_caption_on_every_row(tmp_path):
    """A /knn-service row always has url and caption (clip-retrieval's client reads both), a removed row's
    too (the index's filter keeps removed rows out of answers; were one to come through, it reads the same),
    and the answer's similarity replaces a metadata column of that name in its place."""
    import pyarrow as pa

    from provenance_guard.core.bundle import BundleWriter
    from provenance_guard.index_builder.maintain import remove_rows
    from provenance_guard.index_server.handlers import _knn_rows
    from provenance_guard.index_server.schemas import KnnRequest

    vecs = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with BundleWriter(tmp_path / "b", model="m/t", dim=8) as w:
        w.add(vecs, pa.table({"url": [f"u{i}" for i in range(40)], "similarity": [0.25] * 40}))
        w.finish()
    remove_rows(tmp_path / "b", ids=[4], reason="test")
    bundle = Bundle.open(tmp_path / "b")
    body = KnnRequest(embedding_input=vecs[0].tolist(), num_images=30, deduplicate=False)
    for n in (6, 30):  # row by row, and gathered
        ranked = [(0.9 - i / 100, i) for i in range(n)]
        rows = _knn_rows(bundle, [body], [ranked])[0]
        assert rows[4] == {"removed": True, "id": 4, "similarity": 0.86, "url": None, "caption": None}
        assert rows[1] == {"url": "u1", "caption": None, "similarity": 0.89, "id": 1}
        assert list(rows[1]) == ["url", "caption", "similarity", "id"]

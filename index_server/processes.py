"""Serving the app: on uvicorn, in this process or in uvicorn's own worker processes (``--workers N``).

One process: the app is made (bundles opened and warmed, models loaded and checked against each bundle's
fingerprint) before the socket listens; uvicorn then serves until SIGINT/SIGTERM and finishes the
requests in flight.

N processes: uvicorn's multiprocess manager restarts a worker that dies, pings each for health, restarts
them one by one on SIGHUP and adds or removes one on SIGTTIN/SIGTTOU; SIGINT/SIGTERM stop them all, each
finishing its requests. The port is bound here (so ``--port 0`` is resolved and printed, and a port
another server holds is refused in one line) and listens once a worker has made its app. On Linux each
worker listens on a socket of its own, bound to the port with SO_REUSEPORT, so the kernel spreads new
connections over the workers by a hash of their addresses; one shared socket lets whichever worker wakes
first accept a whole burst of keep-alive connections, leaving the others idle (WorkerSocket). Each worker
reads the settings from a file this process wrote (0600, in a 0700 folder named by PG_SETTINGS_ENV) and
counts its metrics in prometheus_client's multiprocess folder beside it. A worker that cannot make its app
writes the reason beside the settings and exits with uvicorn's start-up failure code, which stops the
manager; the reason is then raised here as the command's one error line.

Connections are bounded by uvicorn's own settings (limit_concurrency, backlog, the keep-alive timeout)
plus, in HeaderTimeout, the one uvicorn lacks: a connection must send its request's headers within
header_timeout_s of opening (or of its last response), so idle or trickling clients cannot hold the
server's sockets. A body must arrive within body_timeout_s (the app's body reader).

Production behind gunicorn works the same way: each gunicorn worker calls ``worker_app()``, which reads
the serve command's arguments from $PROVENANCE_GUARD_SERVE_ARGS (docs/hosts.md shows the command line).
"""
from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import asdict
from pathlib import Path

from ..core.errors import ConfigError, ProvenanceError
from .config import MAX_WORKERS, ServerConfig

PG_SETTINGS_ENV = "PROVENANCE_GUARD_SERVER_SETTINGS"  # the settings file a worker reads (set by serve())
PG_ARGS_ENV = "PROVENANCE_GUARD_SERVE_ARGS"  # serve's arguments, for workers started by gunicorn
RUN_PREFIX = "provenance-guard-serve-"
FAILED = "failed"  # the file a worker that cannot start writes its reason to
CONNECTIONS = "connections"  # the workers' open connections (ConnectionShare)
GRACEFUL_S = 15  # how long in-flight requests get to finish at shutdown
# uvicorn's manager kills a worker that does not answer its health ping within this many seconds (its default,
# 5, can pass while a worker on a loaded machine is still starting: it would be killed and started again)
HEALTHCHECK_S = 30


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config: ServerConfig, host: str, port: int, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests finish (graceful shutdown)."""
    import uvicorn

    if not config.token and not is_loopback(host):
        raise ConfigError(f"listening on {host} (beyond this machine) needs a token: pass --token or set "
                          f"PROVENANCE_GUARD_TOKEN, and send it as 'Authorization: Bearer <token>'")
    if not 1 <= config.workers <= MAX_WORKERS:
        raise ConfigError(f"--workers {config.workers}: give 1 to {MAX_WORKERS} (one per CPU core serves the most)")
    per_worker = config.workers > 1 and sys.platform.startswith("linux")
    sock = bind(host, port, per_worker=per_worker)
    port = sock.getsockname()[1]
    try:
        claim = _claim_port(port) if per_worker else None
    except ConfigError:
        sock.close()
        raise
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    if config.workers == 1:
        try:
            app = ready_app(config)
            print(f"serving on {url}", file=sys.stderr, flush=True)
            uvicorn.Server(uvicorn_config(app, config, log_level)).run(sockets=[sock])
        finally:
            sock.close()
        return
    _remove_stale_runs()
    import tempfile

    run = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-"))  # 0700: this user's workers only
    saved = {k: os.environ.get(k) for k in (PG_SETTINGS_ENV, "PROMETHEUS_MULTIPROC_DIR")}
    try:
        settings = run / "settings.json"
        fd = os.open(settings, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it may hold the token
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(config), f)
        (run / "metrics").mkdir()
        if per_worker:
            ConnectionShare.create(run / CONNECTIONS)
        os.environ[PG_SETTINGS_ENV] = str(settings)  # spawned workers inherit the environment
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(run / "metrics")
        print(f"serving on {url} with {config.workers} worker processes", file=sys.stderr, flush=True)
        if os.name == "nt":
            sock.close()  # Windows: uvicorn binds it again and shares it with its workers
            uvicorn.run(f"{__name__}:worker_app", factory=True, workers=config.workers, host=host, port=port,
                        **uvicorn_options(config, log_level))
        else:  # what uvicorn.run does for workers, with the socket made here
            from uvicorn.supervisors import Multiprocess

            Multiprocess(uvicorn.Config(f"{__name__}:worker_app", factory=True, workers=config.workers,
                                        **uvicorn_options(config, log_level)), sockets=[sock]).run()
        failed = run / FAILED
        if failed.is_file():
            raise ConfigError(failed.read_text(encoding="utf-8", errors="replace")[:2000].strip())
    finally:
        sock.close()
        if claim is not None:
            claim.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        import shutil

        shutil.rmtree(run, ignore_errors=True)


def uvicorn_options(config: ServerConfig, log_level: str) -> dict:
    return dict(log_level=log_level, access_log=False, timeout_graceful_shutdown=GRACEFUL_S,
                timeout_keep_alive=config.keep_alive_s, limit_concurrency=config.max_connections,
                backlog=2048, http=HeaderTimeout, timeout_worker_healthcheck=HEALTHCHECK_S)


def uvicorn_config(app, config: ServerConfig, log_level: str):
    import uvicorn

    HeaderTimeout.seconds = config.header_timeout_s
    return uvicorn.Config(app, **uvicorn_options(config, log_level))


def worker_app():
    """The app of one worker process (uvicorn's --workers, or gunicorn's): the settings serve() wrote, or
    the serve command's arguments in $PROVENANCE_GUARD_SERVE_ARGS."""
    _end_with_parent()
    settings = os.environ.get(PG_SETTINGS_ENV)
    try:
        if settings:
            config = _read_settings(Path(settings))
        elif os.environ.get(PG_ARGS_ENV):
            import shlex

            from ..cli import server_config_from_argv

            config = server_config_from_argv(shlex.split(os.environ[PG_ARGS_ENV]))
        else:
            raise ConfigError(f"no settings: run 'provenance-guard serve', or set ${PG_ARGS_ENV} to its arguments "
                              f"(e.g. \"--index refs=/path/to/bundle\") for gunicorn")
        HeaderTimeout.seconds = config.header_timeout_s
        app = ready_app(config)
        if settings and Path(settings).with_name(CONNECTIONS).is_file():
            HeaderTimeout.share = ConnectionShare(Path(settings).with_name(CONNECTIONS))
            app = Rebalance(app, HeaderTimeout.share)
    except (ProvenanceError, OSError, ValueError) as exc:
        _fail(settings, f"a server worker could not start: {exc}")
    print(f"provenance-guard: worker {os.getpid()} ready", file=sys.stderr, flush=True)
    return app


def ready_app(config: ServerConfig):
    """create_app(), then this process set up for serving."""
    import gc

    from threadpoolctl import threadpool_limits

    from .app import create_app

    app = create_app(config)
    # Concurrency here comes from requests, each on its own thread: numpy's and faiss's BLAS and OpenMP pools
    # of one. Pools of N spin between calls and contend across request threads (40% of the CPU of a knn
    # request on 2 cores). Libraries loaded later (torch, for /v1/check) keep their own pools for batches.
    threadpool_limits(1)
    # The opened bundles, models and libraries never become garbage: keep them out of every collection
    # (full collections over them were a tenth of the server's time under load).
    gc.freeze()
    return app


def bind(host: str, port: int, per_worker: bool = False):
    """The server's socket, bound, not yet listening (uvicorn listens once the app is made). A port another
    process listens on is refused, also where BSD or macOS would let it bind beside that listener.
    per_worker (Linux): a WorkerSocket, each worker's socket then joins it on the port with SO_REUSEPORT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port and not sys.platform.startswith("linux") and host not in ("0.0.0.0", "::"):
        try:  # BSD/macOS: a wildcard listener on the port does not stop a bind to one address
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); another server holds it: "
                              f"choose another --port") from exc
    sock = (WorkerSocket if per_worker else socket.socket)(family, socket.SOCK_STREAM)
    # SO_REUSEADDR: a listener on the port still conflicts (Linux), a stopped server's TIME_WAIT ones do not.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))  # port 0: the kernel picks a free one
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); another server holds it or the "
                          f"address is not this machine's: choose another --port or --host") from exc
    if per_worker:  # set once bound: the bind above was refused by any listener that is not ours
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def _claim_port(port: int):
    """This server's claim on the port among provenance-guard servers on this machine (Linux): an abstract
    Unix socket named after the port, released when the process ends. Before a worker listens the port only
    holds bound sockets, which a second server's bind would join through SO_REUSEPORT; the claim refuses it."""
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0provenance-guard-serve-port-{port}")
    except OSError as exc:
        claim.close()
        raise ConfigError(f"port {port}: another provenance-guard server on this machine serves it: stop it or "
                          f"choose another --port") from exc
    return claim


def _worker_socket(family: int, address: tuple):
    """A worker's own socket on the server's port (what a WorkerSocket becomes in a worker process)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        _fail(os.environ.get(PG_SETTINGS_ENV), f"a server worker could not bind {address[0]}:{address[1]} "
                                               f"({exc.strerror}): stop the process that holds it")
    return sock


class WorkerSocket(socket.socket):
    """The server's port as handed to uvicorn's worker manager: in the manager a bound socket that never
    listens (it holds the port), in each worker process a socket of the worker's own on the same port.

    uvicorn passes its sockets to the spawned workers by pickling them; this one pickles to its address, and
    unpickles to a new SO_REUSEPORT socket bound there (_worker_socket). Each worker listens on its own
    socket once its app is made, and the kernel hashes each new connection to one listening socket: 32
    keep-alive clients split 20/12 or 15/17 over two workers, where one shared socket gave one worker nearly
    all of them (docs/performance.md, P4)."""

    def __reduce_ex__(self, protocol):
        return _worker_socket, (self.family, self.getsockname()[:2])


def _import_protocol():
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # uvicorn without httptools (its [standard] extra)
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    return base


class HeaderTimeout(_import_protocol()):
    """uvicorn's HTTP protocol, plus a deadline for the request headers: a connection that has not sent a
    whole request head within ``seconds`` of opening, or of its previous response, is closed. (uvicorn
    closes idle connections only after a response: one that never sends a byte would be kept forever.)
    Also TCP_NODELAY on every connection, whatever the listening socket's family reads as."""

    seconds = 10.0
    share: ConnectionShare | None = None  # uvicorn's workers on Linux: every worker's open connections

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.share is not None:
            self.share.add(1)
            self._counted = True
        sock = transport.get_extra_info("socket")
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass  # not TCP
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def connection_lost(self, exc) -> None:
        deadline = getattr(self, "_header_deadline", None)
        if deadline is not None:
            deadline.cancel()
        if self.share is not None and getattr(self, "_counted", False):
            self.share.add(-1)
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        deadline = getattr(self, "_header_deadline", None)
        if deadline is not None:
            deadline.cancel()
        self._header_deadline = self.loop.call_later(self.seconds, self._header_deadline_passed)

    def _header_deadline_passed(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return  # a request is being served: its body has the app's deadline, its answer its own time
        if not self.transport.is_closing():
            self.transport.close()


class ConnectionShare:
    """How many connections each worker process holds open, in a file every worker maps: one 16-byte slot
    (pid, open connections) per worker, the slot held with a lock on its bytes that ends with the process,
    so a replacement for a worker that died takes its slot over.

    SO_REUSEPORT hashes each new connection to a worker: 32 clients split 20/12 as often as 16/16, and a
    client pool that hands each connection the same share of work waits on the fuller worker while the
    other idles (under P4's load the hash alone served 16 % fewer requests than the previous release's
    least-connections hand-off, 6 % fewer with Rebalance; docs/performance.md). Rebalance asks the client of
    a worker above its share to reconnect, and the kernel hashes the new connection afresh: 32 clients are
    16/16 or 15/17 after two or three requests each."""

    SLOT = 16

    @classmethod
    def create(cls, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(MAX_WORKERS * cls.SLOT))

    def __init__(self, path: Path):
        import fcntl
        import mmap

        self._fd = os.open(path, os.O_RDWR)
        if os.fstat(self._fd).st_size != MAX_WORKERS * self.SLOT:
            os.close(self._fd)
            raise ConfigError(f"{path} is not a server's connection table: restart the server")
        for slot in range(MAX_WORKERS):
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, self.SLOT, slot * self.SLOT)
                break
            except OSError:
                continue
        else:
            os.close(self._fd)
            raise ConfigError(f"more than {MAX_WORKERS} workers: give --workers 1 to {MAX_WORKERS}")
        self._map = mmap.mmap(self._fd, MAX_WORKERS * self.SLOT)
        self._q = memoryview(self._map).cast("q")  # [pid, open, pid, open, ...]; aligned 8-byte stores
        self.slot = slot
        self._q[2 * slot], self._q[2 * slot + 1] = os.getpid(), 0
        import atexit

        atexit.register(self.leave)

    def add(self, n: int) -> None:
        self._q[2 * self.slot + 1] += n

    def leave(self) -> None:
        """This worker ends: its slot no longer counts towards the share."""
        self._q[2 * self.slot] = self._q[2 * self.slot + 1] = 0

    def crowded(self) -> bool:
        """Whether this worker holds more than its share of the open connections (with one of slack)."""
        q = self._q
        pids, counts = q[0::2].tolist(), q[1::2].tolist()
        live = [c for p, c in zip(pids, counts, strict=True) if p]
        return len(live) > 1 and counts[self.slot] > sum(live) / len(live) + 1


class Rebalance:
    """ASGI: a response of a worker that holds more than its share of the connections (ConnectionShare)
    carries ``Connection: close``; HTTP clients then open a new connection for their next request, which
    the kernel may hash to another worker. Nothing else changes: the response is whole, and nothing is
    retried."""

    def __init__(self, app, share: ConnectionShare):
        self.app, self.share = app, share

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        share = self.share

        async def send_closing(message):
            if message["type"] == "http.response.start" and share.crowded():
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        return await self.app(scope, receive, send_closing)


def _read_settings(path: Path) -> ServerConfig:
    from ..core.references import ReferenceOptions

    data = json.loads(path.read_text(encoding="utf-8"))
    refs = data.pop("references", None)
    return ServerConfig(**data, references=ReferenceOptions(**refs) if refs is not None else None)


def _fail(settings: str | None, message: str):
    """A worker that cannot start: its reason beside the settings (serve() raises it), then uvicorn's start-up
    failure exit code, which stops the manager instead of restarting the worker forever."""
    from uvicorn.config import STARTUP_FAILURE

    if settings:
        try:
            failed = Path(settings).with_name(FAILED)
            fd = os.open(failed, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(message)
        except OSError:
            pass  # another worker said it first
    else:
        print(f"provenance-guard: error: {message}", file=sys.stderr, flush=True)
    sys.exit(STARTUP_FAILURE)


def _end_with_parent() -> None:
    """Linux: this worker gets SIGTERM (and finishes its requests) when its manager process ends, even when the
    manager was killed and could not stop it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the manager ended before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def _remove_stale_runs() -> None:
    """Settings and metrics folders of this user's servers that are gone (killed before they could remove them)."""
    import shutil
    import tempfile

    for folder in Path(tempfile.gettempdir()).glob(f"{RUN_PREFIX}*-*"):
        pid = folder.name[len(RUN_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or folder.stat().st_uid != os.getuid() or not folder.is_dir():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue  # alive (another user's pid) or not ours to judge

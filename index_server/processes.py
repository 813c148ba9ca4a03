"""Serving the app: on uvicorn, in this process or in uvicorn's own worker processes (``--workers N``).

One process: the app is made (bundles opened and warmed, models loaded and checked against each bundle's
fingerprint) before the socket listens; uvicorn then serves until SIGINT/SIGTERM and finishes the
requests in flight.

N processes: uvicorn's multiprocess manager restarts a worker that dies, pings each for health, restarts
them one by one on SIGHUP and adds or removes one on SIGTTIN/SIGTTOU; SIGINT/SIGTERM stop them all, each
finishing its requests. The socket is bound here (so ``--port 0`` is resolved and printed, and a port
another server holds is refused in one line) and listens once a worker has made its app. Each worker
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
import sys
from dataclasses import asdict
from pathlib import Path

from ..core.errors import ConfigError, ProvenanceError
from .config import MAX_WORKERS, ServerConfig

PG_SETTINGS_ENV = "PROVENANCE_GUARD_SERVER_SETTINGS"  # the settings file a worker reads (set by serve())
PG_ARGS_ENV = "PROVENANCE_GUARD_SERVE_ARGS"  # serve's arguments, for workers started by gunicorn
RUN_PREFIX = "provenance-guard-serve-"
FAILED = "failed"  # the file a worker that cannot start writes its reason to
GRACEFUL_S = 15  # how long in-flight requests get to finish at shutdown


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
    sock = bind(host, port)
    port = sock.getsockname()[1]
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
        os.environ[PG_SETTINGS_ENV] = str(settings)  # spawned workers inherit the environment
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(run / "metrics")
        print(f"serving on {url} with {config.workers} worker processes", file=sys.stderr, flush=True)
        where = dict(host=host, port=port) if os.name == "nt" else dict(fd=sock.fileno())
        if os.name == "nt":
            sock.close()  # Windows: uvicorn binds it again and shares it with its workers
        uvicorn.run(f"{__name__}:worker_app", factory=True, workers=config.workers, **where,
                    **uvicorn_options(config, log_level))
        failed = run / FAILED
        if failed.is_file():
            raise ConfigError(failed.read_text(encoding="utf-8", errors="replace")[:2000].strip())
    finally:
        sock.close()
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
                backlog=2048, http=HeaderTimeout)


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


def bind(host: str, port: int):
    """The server's socket, bound, not yet listening (uvicorn listens once the app is made). A port another
    process listens on is refused, also where BSD or macOS would let it bind beside that listener."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port and not sys.platform.startswith("linux") and host not in ("0.0.0.0", "::"):
        try:  # BSD/macOS: a wildcard listener on the port does not stop a bind to one address
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); another server holds it: "
                              f"choose another --port") from exc
    sock = socket.socket(family, socket.SOCK_STREAM)
    # SO_REUSEADDR: a listener on the port still conflicts (Linux), a stopped server's TIME_WAIT ones do not.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))  # port 0: the kernel picks a free one
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); another server holds it or the "
                          f"address is not this machine's: choose another --port or --host") from exc
    sock.set_inheritable(True)
    return sock


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

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        import socket

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

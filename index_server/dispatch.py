"""Connections of `serve --workers N`, balanced: the supervisor accepts every connection on the one listening
socket and hands it to the worker that holds the fewest open ones, over a Unix socket pair per worker
(SCM_RIGHTS); each worker serves what it is handed with uvicorn and says, one byte each, when a connection
has closed. Kernel spreading (a SO_REUSEPORT socket per worker) hashes each connection to a worker, and
32 keep-alive clients were split 18/14: the worker with fewer went idle between its batches while the other
had more queries than it could search (P4). Handing a connection over costs a few tens of microseconds,
once per connection, not per request."""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Optional

import uvicorn

log = logging.getLogger("provenance_guard.server")

ACCEPT_BURST = 64  # connections accepted per wake-up before the supervisor looks at its workers again
LINK_BUFFER = 1 << 20  # bytes a link may hold (macOS's default of 8 KiB fills with a burst of connections)
CLOSED = b"x"  # worker -> supervisor: one connection it was handed has closed
HANDED = b"c"  # supervisor -> worker: the byte that carries one connection's descriptor
GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)  # a link whose worker has ended


def supported() -> bool:
    """Whether this platform can pass sockets between processes (Unix; not Windows)."""
    return hasattr(socket, "send_fds") and hasattr(socket, "AF_UNIX")


def link_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor's end, worker's end) of one worker's link; the worker's end is to be passed to it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for end in (ours, theirs):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                end.setsockopt(socket.SOL_SOCKET, option, LINK_BUFFER)
            except OSError:
                pass  # the system's limit stays: a full link only sends the connection to the next worker
    ours.setblocking(False)
    return ours, theirs


class Link:
    """The supervisor's end of one worker's link, with the number of connections handed and not yet closed."""

    def __init__(self, sock: socket.socket):
        self.sock: Optional[socket.socket] = sock
        self.open = 0

    def hand(self, conn: socket.socket) -> bool:
        """Pass conn to the worker; False (conn untouched) when its link cannot take it now or is gone."""
        if self.sock is None:
            return False
        try:
            socket.send_fds(self.sock, [HANDED], [conn.fileno()])
        except OSError as exc:
            if exc.errno in GONE:
                self.close()
            # Else full (a worker that does not read) or out of descriptors in flight (ETOOMANYREFS): the
            # next worker takes this one, and this worker the next.
            return False
        self.open += 1
        return True

    def read(self) -> None:
        """Take the worker's closed-connection bytes; its end closing means it is ending."""
        if self.sock is None:
            return
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.open = max(0, self.open - data.count(CLOSED))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def accept_and_hand(listener: socket.socket, links: list[Link], turn: int) -> tuple[int, int, Optional[OSError]]:
    """Accept what waits on the (non-blocking) listener, up to ACCEPT_BURST, each to the live link with the
    fewest open connections (ties in turn, so short connections alternate). A connection no worker can take
    is closed: the client sees it reset and may retry. Returns the next turn, the number closed so, and the
    error that stopped accepting (out of descriptors, say: the caller waits before it accepts again)."""
    dropped = 0
    for _ in range(ACCEPT_BURST):
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            break
        except ConnectionAbortedError:  # the client gave up before it was accepted
            continue
        except OSError as exc:
            return turn, dropped, exc
        with conn:
            n = len(links)
            order = sorted(range(n), key=lambda i: (links[i].open, (i - turn) % n))
            taken = next((i for i in order if links[i].hand(conn)), None)
        if taken is None:
            dropped += 1
        else:
            turn = taken + 1
    return turn, dropped, None


class HandedServer(uvicorn.Server):
    """uvicorn in a worker: no listening socket of its own; it serves the connections its supervisor hands
    over ``link``, and says over it when each has closed. SIGINT/SIGTERM: in-flight requests finish, as
    uvicorn's own shutdown has it; the link closing (the supervisor gave up on this worker) stops it the
    same way."""

    def __init__(self, config: uvicorn.Config, link: socket.socket):
        # No route takes WebSockets, and an upgrade would swap in another protocol, whose close would never
        # be counted: the config takes none.
        config.ws = "none"
        super().__init__(config)
        self.link = link
        self.link.setblocking(False)
        self._handed_protocol = None
        self._handed_tasks: set = set()

    def handed_closed(self) -> None:
        try:
            self.link.send(CLOSED)
        except OSError:
            pass  # a full link only skews the supervisor's count; a closed one means it is gone

    async def startup(self, sockets=None):
        await super().startup(sockets=[])
        if not self.started:
            return
        # What uvicorn's own listener makes for each connection (the same arguments from 0.29 on), told to
        # say when its connection closes.
        kwargs = {"config": self.config, "server_state": self.server_state, "app_state": self.lifespan.state}
        closed = self.handed_closed

        class Counted(self.config.http_protocol_class):
            def connection_lost(self, exc):
                try:
                    super().connection_lost(exc)
                finally:
                    closed()

        self._handed_protocol = lambda: Counted(**kwargs)
        asyncio.get_running_loop().add_reader(self.link.fileno(), self._handed_take)

    def _handed_take(self) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                # One byte and its descriptor a call, so each message is read whole (BSD's records too).
                data, fds, _, _ = socket.recv_fds(self.link, 1, 1, getattr(socket, "MSG_CMSG_CLOEXEC", 0))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data and not fds:
                asyncio.get_running_loop().remove_reader(self.link.fileno())
                if not self.should_exit:
                    log.warning("this worker's link to its supervisor closed; finishing its requests")
                    self.should_exit = True
                return
            if not fds:  # the descriptor did not arrive (this process is out of them): the client sees a reset
                log.warning("a connection handed to this worker was lost: it is out of file descriptors")
                self.handed_closed()
            for fd in fds:
                self._handed_serve(socket.socket(fileno=fd))

    def _handed_serve(self, conn: socket.socket) -> None:
        if self.should_exit:
            conn.close()
            self.handed_closed()
            return
        conn.setblocking(False)
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(self._handed_protocol, conn))
        self._handed_tasks.add(task)

        def done(task: asyncio.Task) -> None:
            self._handed_tasks.discard(task)
            if task.cancelled() or task.exception() is not None:  # not served: counted as closed here
                conn.close()  # a no-op where the transport closed it already (asyncio and uvloop both do)
                self.handed_closed()

        task.add_done_callback(done)

    async def shutdown(self, sockets=None):
        if self._handed_protocol is not None:
            asyncio.get_running_loop().remove_reader(self.link.fileno())
        await super().shutdown(sockets=sockets)

"""The gateway's listening socket: many new connections per readiness event, on either event loop.

Why not ``loop.create_server``: uvloop >= 0.18 ships libuv >= 1.45, which
accepts ONE connection per event-loop iteration (libuv PR #3696, "unix: don't
accept() connections in a loop"). A worker busy with a few hundred keep-alive
connections runs an iteration every 5-10 ms, so a burst of 200 new clients (a
restart, a reconnect storm, a benchmark's start) waited up to 1-2 s in the
kernel's accept queue before its TLS handshake even began; that was the whole
p99 of the 200-connection benchmark. asyncio accepts up to ``backlog`` per
readiness event. :class:`BatchListener` gives both loops the same policy:
``add_reader`` on the listening socket, then ``accept()`` until it would block
or :data:`ACCEPT_BATCH` connections were taken, each handed to
``loop.connect_accepted_socket`` with the worker's own protocol factory.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

# Bounds the handshakes one iteration can start, so a connection storm cannot stall the
# established connections for long (a ClientHello costs ~0.5 ms of CPU).
ACCEPT_BATCH = 64
# Out of descriptors or memory: stop accepting for a moment instead of spinning on the error.
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_PAUSE_SECONDS = 1.0


class BatchListener:
    """Accepts on bound, listening sockets; has what the worker used of ``asyncio.Server``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        socks: list[socket.socket],
        factory: Callable[[], asyncio.BaseProtocol],
    ) -> None:
        self._loop = loop
        self._socks = socks
        self._factory = factory
        self._serving = True
        self._pending: set[asyncio.Task[None]] = set()
        for sock in socks:
            loop.add_reader(sock.fileno(), self._accept, sock)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._socks)

    def close(self) -> None:
        """Stop accepting and close the listening sockets (open connections are the worker's to drain)."""
        if not self._serving:
            return
        self._serving = False
        for sock in self._socks:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    def _accept(self, sock: socket.socket) -> None:
        # socket.accept() converts family and type to enums for every connection (~5 µs, seen in
        # profiles of short connections); _accept() returns the bare descriptor, wrapped here with
        # the listening socket's own (int) family.
        family = int(sock.family)
        tcp = family in (socket.AF_INET, socket.AF_INET6)
        for _ in range(ACCEPT_BATCH):
            try:
                fd, _ = sock._accept()  # type: ignore[attr-defined]
                conn = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                log.error("accept failed, pausing the listener", extra={"error": exc.strerror})
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(_PAUSE_SECONDS, self._resume, sock)
                return
            conn.setblocking(False)
            if tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as create_server's transports do
            task = self._loop.create_task(self._connect(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def _resume(self, sock: socket.socket) -> None:
        if self._serving:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError:
            conn.close()  # the client left between accept() and here


async def listen(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.BaseProtocol],
    host: str | None,
    port: int,
    *,
    reuse_port: bool,
    backlog: int,
) -> BatchListener:
    """Bind every address ``host`` resolves to (as ``loop.create_server`` does) and start accepting."""
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return BatchListener(loop, socks, factory)

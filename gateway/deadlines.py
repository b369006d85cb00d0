"""Client deadlines aiohttp does not have: request-head and request-body timeouts.

Slowloris clients send a request head or body a byte at a time to hold
connections open; aiohttp's server has no header-read timeout and no idle
timeout on request bodies. :class:`ClientDeadlines` wraps aiohttp's
per-connection protocol (it sits between the TLS transport and aiohttp) and
:func:`deadline_middleware`, the outermost middleware, tells it when a
request reached the handlers and when its answer was done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web

TimeoutHook = Callable[[str, tuple[str, int] | None], None]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def peer_address(peer: Any) -> tuple[str, int] | None:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return None


class ClientDeadlines(asyncio.Protocol):
    """aiohttp's per-connection protocol, with the deadlines aiohttp lacks.

    aiohttp has no request-head timeout: a client that sends one header byte
    a second (slowloris) holds a connection, a task and a parser for ever.
    Its keep-alive timer only runs between requests and is pushed back by
    every byte. This wrapper adds, per connection:

    * **head**: from the end of the handshake, and on a keep-alive
      connection from the first byte of the next request, the request head
      must be complete within ``head_timeout`` (nginx's
      ``client_header_timeout``). "Complete" is observed from the
      application side: :func:`deadline_middleware` reports when a request
      reaches the handlers and when its answer is done, so no second HTTP
      parser runs here. A keep-alive connection with no bytes at all is left
      to aiohttp's ``keepalive_timeout``.
    * **body**: while a request is being handled and its body is not fully
      received, the client must send a byte at least every ``body_timeout``
      seconds, unless the gateway itself paused reading (back-pressure from
      a slow backend is not the client's fault).

    A connection that misses a deadline is closed and counted; nothing is
    sent (there is no request to answer yet, or it is half-received).
    """

    def __init__(
        self,
        inner: asyncio.Protocol,
        head_timeout: float,
        body_timeout: float,
        on_timeout: TimeoutHook | None = None,
    ) -> None:
        self.inner = inner
        self._head_timeout = head_timeout
        self._body_timeout = body_timeout
        self._on_timeout = on_timeout
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._state = "head"  # head | request | idle
        self._last_data = 0.0
        self._body_done: Callable[[], bool] | None = None

    # -- asyncio.Protocol, forwarded -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check here.
        self._transport = cast(asyncio.Transport, transport)
        self.inner.connection_made(transport)
        self._arm(self._head_timeout, self._head_expired)

    def data_received(self, data: bytes) -> None:
        self._last_data = asyncio.get_running_loop().time()
        if self._state == "idle":
            self._state = "head"
            self._arm(self._head_timeout, self._head_expired)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self._transport = None
        self._body_done = None
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- called from deadline_middleware -------------------------------------------

    def request_started(self, body_done: Callable[[], bool]) -> None:
        """A request head was parsed and reached the handlers: watch its body now."""
        self._state = "request"
        self._body_done = body_done
        self._last_data = asyncio.get_running_loop().time()
        self._arm(self._body_timeout, self._body_check)

    def request_finished(self) -> None:
        """The answer is done; the next request's head is timed from its first byte."""
        self._state = "idle"
        self._body_done = None
        self._cancel()

    # -- timers ------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_expired(self) -> None:
        self._timer = None
        if self._state == "head":
            self._expire("header_timeout")

    def _body_check(self) -> None:
        self._timer = None
        transport, done = self._transport, self._body_done
        if self._state != "request" or transport is None or done is None or done():
            return
        now = asyncio.get_running_loop().time()
        if not transport.is_reading():
            self._last_data = now  # we paused reading: the wait is ours, not the client's
        elif now - self._last_data >= self._body_timeout:
            self._expire("body_timeout")
            return
        self._arm(max(self._body_timeout - (now - self._last_data), 0.05), self._body_check)

    def _expire(self, why: str) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._on_timeout is not None:
            self._on_timeout(why, peer_address(transport.get_extra_info("peername")))
        transport.abort()


@web.middleware
async def deadline_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: report the request's start and end to its connection's deadlines."""
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    if not isinstance(protocol, ClientDeadlines):
        return await handler(request)
    upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    protocol.request_started((lambda: True) if upgrade else request.content.is_eof)
    try:
        return await handler(request)
    finally:
        protocol.request_finished()

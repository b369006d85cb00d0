"""Client deadlines aiohttp does not have: request-head and request-body timeouts.

Slowloris clients send a request head or body a byte at a time to hold
connections open; aiohttp's server has no header-read timeout and no idle
timeout on request bodies. :class:`ClientDeadlines` wraps aiohttp's
per-connection protocol (it sits between the TLS transport and aiohttp) and
:func:`request_deadlines`, called first by the gateway's middleware, tells it
when a request reached the handlers; the middleware reports when its answer
was done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web

# (why, the connection's transport (still open), the request being received or None, any byte received?)
TimeoutHook = Callable[[str, asyncio.Transport, web.BaseRequest | None, bool], None]


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
      application side: :func:`request_deadlines` reports when a request
      reaches the handlers and when its answer is done, so no second HTTP
      parser runs here. A keep-alive connection with no bytes at all is left
      to aiohttp's ``keepalive_timeout``.
    * **body**: while a request is being handled and its body is not fully
      received, the client must send a byte at least every ``body_timeout``
      seconds, unless the gateway itself paused reading (back-pressure from
      a slow backend is not the client's fault).

    A connection that misses a deadline is reported to ``on_timeout`` (while
    its transport is still open, so the client's address and certificate
    are known), then closed; nothing is sent (there is no request to answer
    yet, or it is half-received). :attr:`expired` tells the request being
    handled why its body stopped.
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
        self._loop = asyncio.get_running_loop()  # built by the loop's protocol factory
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._state = "head"  # head | request | idle
        self._head_deadline = 0.0
        self._last_data = 0.0
        self._body_done: Callable[[], bool] | None = None
        self._request: web.BaseRequest | None = None
        self.expired = ""  # the deadline this connection missed, if any

    # -- asyncio.Protocol, forwarded -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check here.
        self._transport = cast(asyncio.Transport, transport)
        self.inner.connection_made(transport)
        self._head_deadline = self._loop.time() + self._head_timeout
        self._watch(self._head_deadline)

    def data_received(self, data: bytes) -> None:
        self._last_data = now = self._loop.time()
        if self._state == "idle":
            self._state = "head"
            self._head_deadline = now + self._head_timeout
            self._watch(self._head_deadline)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
        self._body_done = None
        self._request = None
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- called from the gateway's middleware -----------------------------------------

    def request_started(self, request: web.BaseRequest, body_done: Callable[[], bool]) -> None:
        """A request head was parsed and reached the handlers: watch its body now (if one is coming)."""
        self._state = "request"
        if body_done():
            self._body_done = None  # a GET: nothing left to arrive, nothing to watch
            return
        self._body_done = body_done
        self._request = request
        self._last_data = self._loop.time()
        self._watch(self._last_data + self._body_timeout)

    def request_finished(self) -> None:
        """The answer is done; the next request's head is timed from its first byte."""
        self._state = "idle"
        self._body_done = None
        self._request = None

    # -- one lazy timer per connection ---------------------------------------------------
    # Keep-alive requests arrive far more often than the timeouts expire, so the timer is
    # not moved per request: it fires at the earliest deadline that was ever due, and
    # :meth:`_check` looks at the state *then* and sleeps again until the current deadline.
    # (Two timer handles per request showed up in profiles.)

    def _watch(self, at: float) -> None:
        if self._timer is not None and self._timer_at <= at:
            return  # an earlier check is due; it will see this deadline
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._check)

    def _check(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        now = self._loop.time()
        if self._state == "head":
            if now >= self._head_deadline:
                self._expire("header_timeout")
            else:
                self._watch(self._head_deadline)
            return
        done = self._body_done
        if self._state != "request" or done is None or done():
            return  # idle (aiohttp's keep-alive timer takes over) or the body is in
        if not transport.is_reading():
            self._last_data = now  # we paused reading: the wait is ours, not the client's
        elif now - self._last_data >= self._body_timeout:
            self._expire("body_timeout")
            return
        self._watch(self._last_data + max(self._body_timeout, 0.05))

    def _expire(self, why: str) -> None:
        transport = self._transport
        if transport is None:
            return
        self.expired = why
        if self._on_timeout is not None:
            request = self._request if self._state == "request" else None
            self._on_timeout(why, transport, request, self._last_data > 0)
        transport.abort()


def request_deadlines(request: web.BaseRequest) -> ClientDeadlines | None:
    """Tell the request's connection that a request reached the handlers; return it for ``request_finished``.

    None when the connection has no deadlines (test servers without the wrapper).
    """
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    if not isinstance(protocol, ClientDeadlines):
        return None
    upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    protocol.request_started(request, _always_done if upgrade else request.content.is_eof)
    return protocol


def _always_done() -> bool:
    return True

"""The backend hop: a lean HTTP/1.1 client with keep-alive pools, parsed by llhttp (httptools).

Why not aiohttp's client: under keep-alive load it cost ~75 µs of worker CPU
per forwarded request (``ClientSession._request``, ``ClientRequest``,
``ClientResponse``, its timers), a quarter of the gateway's whole
per-request cost (py-spy, bench/RESULTS.md). A reverse proxy needs none of
what makes it general (cookies, redirects, auth, decompression, proxies,
URL objects). This client does only the proxy's part:

* one request at a time per connection, idle connections pooled per backend
  address (last in, first out: the warmest socket), closed after
  ``idle_seconds`` or when the backend closes them;
* the request head and a small body in one write; larger bodies streamed
  with ``Content-Length`` or chunked framing and write flow control;
* the response head parsed by llhttp (the C parser aiohttp and Node use);
  the body handed out chunk by chunk with read flow control, so a 1 GB
  download keeps memory flat;
* a connect timeout, and a read timeout on every wait for backend bytes
  (aiohttp's ``sock_read``); the head's wait starts once the request body is
  sent, so a slow upload is not the backend's delay;
* a reused connection that the backend closed before answering is retried
  once on a fresh one, only for idempotent requests whose body can be sent
  again (a POST may have been acted on, so it gets a 502 instead).

WebSockets still go through aiohttp's client (rare, long-lived).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

# RFC 9110 9.2.2; a request with a streamed body cannot be sent twice anyway.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Methods that carry a body by definition: an absent body is sent as length 0.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
MAX_HEAD_BYTES = 64 * 1024
HIGH_WATER = 256 * 1024  # buffered response bytes at which reading from the backend pauses
LOW_WATER = 64 * 1024


class UpstreamError(Exception):
    """The backend could not be reached (502) or did not answer in time (504)."""

    def __init__(self, timeout: bool, detail: str) -> None:
        super().__init__(detail)
        self.timeout = timeout


class _Trailing(Exception):
    """Raised from the parser's callback to stop at a second answer (see ``on_message_begin``)."""


class _Stale(Exception):
    """A pooled connection closed before any byte of the answer: safe to retry if replayable."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a backend lives, parsed once from its ``upstream`` URL."""

    scheme: str
    host: str
    port: int
    base_path: str
    host_header: str

    @staticmethod
    @functools.cache
    def of(url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        netloc = parts.netloc.rpartition("@")[2]
        return Origin(parts.scheme, parts.hostname, port, parts.path.rstrip("/"), netloc)


def encode_head(method: str, target: str, host: str, headers: Iterable[tuple[str, str]], framing: str) -> bytes:
    """The request line and headers; a line break in any value is refused (header injection)."""
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in headers:
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            raise UpstreamError(False, f"header {name!r} contains a line break")
        lines.append(f"{name}: {value}\r\n")
    lines.append(framing)
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def _framing(method: str, body: bytes | AsyncIterator[bytes] | None, length: int | None) -> str:
    if isinstance(body, bytes):
        return f"Content-Length: {len(body)}\r\n"
    if body is None:
        return "Content-Length: 0\r\n" if method in BODY_METHODS else ""
    if length is not None:
        return f"Content-Length: {length}\r\n"
    return "Transfer-Encoding: chunked\r\n"


class UpstreamResponse:
    """A backend's answer: status and headers now, the body on demand; :meth:`release` when done."""

    __slots__ = ("_conn", "_read_timeout", "content_length", "headers", "reason", "status")

    def __init__(self, conn: _Connection, status: int, reason: str, headers: CIMultiDict[str], read_timeout: float):
        self.status = status
        self.reason = reason
        self.headers = headers
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._conn = conn
        self._read_timeout = read_timeout

    async def read(self) -> bytes:
        """The whole body (the caller checked it is small)."""
        conn = self._conn
        if conn.complete and not conn.error:
            data = b"".join(conn.body)  # the common case: it came with the head
            conn.body.clear()
            conn.buffered = 0
            if conn.transport is not None and not conn.closed:
                conn.transport.resume_reading()  # paused if the body went over HIGH_WATER: pooled paused, it would hang
            return data
        parts = []
        while chunk := await self.next_chunk():
            parts.append(chunk)
        return b"".join(parts)

    async def next_chunk(self) -> bytes:
        """The next piece of the body as it arrives, b"" at its end; raises :class:`UpstreamError` on failure.

        A method, not an async generator: a generator abandoned half-way (the
        client went away) would be finalised later by the garbage collector.
        """
        return await self._conn.next_chunk(self._read_timeout)

    def release(self) -> None:
        """Back to the pool if the exchange ended cleanly and the backend keeps the connection; else close."""
        self._conn.finish()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a backend, one exchange at a time."""

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.write_paused: asyncio.Future[None] | None = None  # the transport's state, across exchanges
        self.reused = False
        self.busy = False
        self.idle_since = 0.0
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self._reset(head_only=False)

    def _reset(self, *, head_only: bool) -> None:
        # A parser per exchange: no state of an earlier answer can reach this one.
        self.parser = httptools.HttpResponseParser(self)
        self.head_only = head_only
        self.trailing = False  # bytes came after the final answer: the connection is not reused
        self.reason = ""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0  # header lines of the answer (checked when its head is complete)
        self.head_received = 0  # bytes received while the head is incomplete (checked as they come)
        self.head: asyncio.Future[UpstreamResponse] | None = None
        self.read_timeout = 0.0
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.until_eof = False
        self.got_bytes = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.writer: asyncio.Task[None] | None = None
        self.deadline = 0.0  # when the awaited backend bytes are overdue (0: nothing awaited)

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            self.abort()  # bytes on an idle connection: nothing can be trusted on it any more
            return
        self.got_bytes = True
        if self.head is not None and not self.head.done():
            self.head_received += len(data)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.trailing:
                self.abort()  # the answer itself is whole; what followed it is not ours to relay
                return
            self._fail(UpstreamError(False, f"backend {self.origin.host_header} sent a broken answer: {exc}"))
            return
        if self.head is not None and not self.head.done() and self.head_received > MAX_HEAD_BYTES:
            # all of it is head; counted raw because llhttp reports a header line only once it ends
            self._fail(UpstreamError(False, f"backend answer head over {MAX_HEAD_BYTES} bytes"))

    def eof_received(self) -> bool:
        if self.until_eof and not self.complete:
            self.complete = True  # body delimited by the connection's end (no length, not chunked)
            self.until_eof = False
            self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pool.forget(self)
        self.resume_writing()  # a body writer waiting for room must wake up and see the end
        if self.complete:
            return
        if self.head is not None and not self.got_bytes and self.reused:
            if not self.head.done():
                self.head.set_exception(_Stale())
            return
        self._fail(UpstreamError(False, f"backend {self.origin.host_header} closed the connection"))

    def pause_writing(self) -> None:
        if self.write_paused is None:
            self.write_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        paused, self.write_paused = self.write_paused, None
        if paused is not None and not paused.done():
            paused.set_result(None)

    # -- llhttp callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # A second answer to one request (a backend that saw a request smuggled in a body,
            # or a HEAD answer with a body): stop parsing here. The first answer stands; the
            # connection is closed, never pooled, so nothing of this reaches another request.
            self.trailing = True
            self.keep_alive = False
            raise _Trailing

    def on_status(self, reason: bytes) -> None:
        self.reason += reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # interim (100 Continue, 103 Early Hints): wait for the real answer
            self.reason, self.raw_headers, self.head_size = "", [], 0
            return
        if self.head_size > MAX_HEAD_BYTES:  # completed by a read that took it over: refused all the same
            self._fail(UpstreamError(False, f"backend answer head over {MAX_HEAD_BYTES} bytes"))
            return
        headers: CIMultiDict[str] = CIMultiDict(
            (n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in self.raw_headers
        )
        coding = ",".join(headers.getall("Transfer-Encoding", ()))  # llhttp reads every line of it
        chunked = coding.rstrip().lower().endswith("chunked")
        self.until_eof = (  # RFC 9112 6.3: no length and not chunked (even with another coding): until close
            not self.head_only and status not in (204, 304) and "Content-Length" not in headers and not chunked
        )
        self.keep_alive = self.parser.should_keep_alive()  # llhttp knows it only until the message ends
        if self.head_only:
            self.complete = True  # llhttp would wait for the body a HEAD answer never has
        response = UpstreamResponse(self, status, self.reason, headers, self.read_timeout)
        self._cancel_timer()
        if self.head is not None and not self.head.done():
            self.head.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self.complete:  # a body after a HEAD answer: not part of anything
            self.trailing = True
            self.keep_alive = False
            return
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if 100 <= self.parser.get_status_code() < 200:
            return
        self.complete = True
        self.until_eof = False
        self._wake()

    # -- the exchange ---------------------------------------------------------------------

    async def exchange(
        self,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        *,
        chunked: bool,
        read_timeout: float,
        head_only: bool,
    ) -> UpstreamResponse:
        """Send one request; return once the answer's head is in."""
        assert self.transport is not None
        self._reset(head_only=head_only)
        self.busy = True
        self.read_timeout = read_timeout
        answer = self.head = self.loop.create_future()
        try:
            if body is None or isinstance(body, bytes):
                self.transport.write(head + body if body else head)
            else:
                self.transport.write(head)
                writer = self.writer = self.loop.create_task(self._send_body(body, chunked))
                await asyncio.wait((writer, answer), return_when=asyncio.FIRST_COMPLETED)
                failed = writer.exception() if writer.done() and not writer.cancelled() else None
                answered = answer.done() and not answer.cancelled() and answer.exception() is None
                if failed is not None and not (answered and isinstance(failed, UpstreamError)):
                    # BodyTooLarge or the client's own failure wins over its effect (a closed backend);
                    # but an answer that came before the backend closed mid-body (an early 413) is the outcome
                    raise failed
            if not answer.done():
                self._arm_timer()
            response: UpstreamResponse = await answer
            return response
        except BaseException:
            self.head = None  # later failures of this connection concern nobody
            if answer.done() and not answer.cancelled():
                answer.exception()  # seen: not "never retrieved" when collected
            self.abort_exchange()
            raise

    async def _send_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        try:
            await self._write_body(body, chunked)
        except BaseException:
            self.abort()  # half a body must never be taken for a whole one
            raise
        finally:
            aclose = getattr(body, "aclose", None)  # closed here, even when cancelled, not by the GC
            if aclose is not None:
                await aclose()

    async def _write_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        async for chunk in body:
            if not chunk:
                continue
            self._send((b"%x\r\n" % len(chunk), chunk, b"\r\n") if chunked else (chunk,))
            if self.write_paused is not None:
                await self._writable()
        if chunked:
            self._send((b"0\r\n\r\n",))

    def _send(self, parts: tuple[bytes, ...]) -> None:
        """Write body bytes, or fail as the backend's doing if it closed (uvloop raises on a closed transport)."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise UpstreamError(False, f"backend {self.origin.host_header} closed the connection mid-body")
        transport.writelines(parts)

    async def _writable(self) -> None:
        """Wait until the backend takes more of the body, at most ``read_timeout`` (nginx's proxy_send_timeout).

        A backend that stops reading without answering would otherwise hold the
        upload, the client and this connection for ever.
        """
        paused = self.write_paused
        if paused is None:
            return
        try:
            async with asyncio.timeout(self.read_timeout):
                await paused
        except TimeoutError:
            raise UpstreamError(
                True, f"backend {self.origin.host_header} took no request body for {self.read_timeout:g} s"
            ) from None

    async def next_chunk(self, read_timeout: float) -> bytes:
        """The next piece of the body, b"" at its end."""
        while True:
            if self.body:
                chunk = self.body.popleft()
                self.buffered -= len(chunk)
                if self.buffered < LOW_WATER and self.transport is not None and not self.closed:
                    self.transport.resume_reading()
                return chunk
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            self.waiter = self.loop.create_future()
            self.read_timeout = read_timeout
            self._arm_timer()
            try:
                await self.waiter
            finally:
                self.waiter = None
                self._cancel_timer()

    def finish(self) -> None:
        """The caller is done with the answer: pool the connection or close it."""
        self._cancel_timer()
        self.head = None
        writer = self.writer
        writer_ok = writer is None or (writer.done() and not writer.cancelled() and writer.exception() is None)
        clean = self.complete and not self.body and self.error is None and writer_ok
        if clean and self.keep_alive and not self.closed and not self.head_only:
            self.busy = False
            self.pool.put_back(self)
            return
        self.abort_exchange()

    def abort_exchange(self) -> None:
        """Stop sending (an early answer or a failure) and close: the connection's state is unknown."""
        self._cancel_timer()
        writer = self.writer
        if writer is not None and not writer.done():
            writer.cancel()
        elif writer is not None and not writer.cancelled():
            writer.exception()  # seen: not "never retrieved" when collected
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- internals ---------------------------------------------------------------------------

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        self.error = error
        if self.head is not None and not self.head.done():
            self.head.set_exception(error)
        self._wake()
        self.abort()

    # One lazy timer per connection, not one per wait: a wait sets ``deadline``; the timer
    # fires at the earliest deadline ever set, and re-sleeps until the current one if the
    # connection is still waiting (answers normally come in well under the read timeout).

    def _arm_timer(self) -> None:
        """The backend must send something within ``read_timeout`` from now."""
        self.deadline = time.monotonic() + self.read_timeout
        self._watch(self.deadline)

    def _cancel_timer(self) -> None:
        """Nothing is awaited from the backend any more (the timer, if any, will find that)."""
        self.deadline = 0.0

    def _watch(self, at: float) -> None:
        if self.timer is not None and self.timer_at <= at:
            return
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = at
        self.timer = self.loop.call_later(max(at - time.monotonic(), 0.0), self._check_deadline)

    def _check_deadline(self) -> None:
        self.timer = None
        if not self.deadline or self.closed:
            return
        if time.monotonic() < self.deadline:
            self._watch(self.deadline)
            return
        self._fail(UpstreamError(True, f"backend {self.origin.host_header} sent nothing for {self.read_timeout:g} s"))


class UpstreamPool:
    """Keep-alive connections to every backend of one worker."""

    def __init__(self, *, idle_seconds: float = 30.0, max_idle_per_origin: int = 1000) -> None:
        self.idle_seconds = idle_seconds
        self.max_idle = max_idle_per_origin
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._tls: ssl.SSLContext | None = None
        self._last_sweep = 0.0

    async def request(
        self,
        url: str,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None = None,
        *,
        length: int | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> UpstreamResponse:
        """Send ``method target`` to the backend at ``url``; the caller must :meth:`UpstreamResponse.release`.

        ``body`` is bytes, an async iterator (streamed; ``length`` is its
        Content-Length when known, else it is sent chunked) or None.
        Raises :class:`UpstreamError`; exceptions raised by a streamed body
        (e.g. a size limit) propagate unchanged.
        """
        origin = Origin.of(url)
        head = encode_head(
            method, origin.base_path + target, origin.host_header, headers, _framing(method, body, length)
        )
        replayable = method in IDEMPOTENT and (body is None or isinstance(body, bytes))
        chunked = length is None and body is not None and not isinstance(body, bytes)
        while True:
            conn = self._take(origin) or await self._connect(origin, connect_timeout)
            try:
                return await conn.exchange(
                    head, body, chunked=chunked, read_timeout=read_timeout, head_only=method == "HEAD"
                )
            except _Stale:
                if not replayable:
                    raise UpstreamError(False, f"backend {origin.host_header} closed a kept-alive connection") from None
                # the next round takes another pooled connection or a fresh one (which cannot be stale)

    async def close(self) -> None:
        """Close every connection (worker shutdown)."""
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()
        self._open.clear()

    # -- pool bookkeeping --------------------------------------------------------------------

    def _take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            usable = not conn.closed and conn.transport is not None and not conn.transport.is_closing()
            if usable and now - conn.idle_since < self.idle_seconds:
                conn.reused = True
                return conn
            conn.abort()
        return None

    async def _connect(self, origin: Origin, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self._client_tls() if origin.scheme == "https" else None
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError as exc:
            raise UpstreamError(True, f"backend {origin.host_header}: no connection within {timeout:g} s") from exc
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(False, f"backend {origin.host_header} unreachable: {exc}") from exc
        self._open.add(conn)
        return conn

    def _client_tls(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()  # https backends: verified like any TLS client
        return self._tls

    def put_back(self, conn: _Connection) -> None:
        now = time.monotonic()
        conn.idle_since = now
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= self.max_idle:
            conn.abort()
        else:
            idle.append(conn)
        if now - self._last_sweep > self.idle_seconds:
            self._sweep(now)

    def forget(self, conn: _Connection) -> None:
        self._open.discard(conn)

    def _sweep(self, now: float) -> None:
        """Close connections idle for too long (checked on release, no timer per request)."""
        self._last_sweep = now
        for origin, idle in self._idle.items():
            keep = [c for c in idle if not c.closed and now - c.idle_since < self.idle_seconds]
            for conn in idle:
                if conn not in keep:
                    conn.abort()
            self._idle[origin] = keep

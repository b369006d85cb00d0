"""The backend hop (gateway.forward.upstream) against real servers on 127.0.0.1.

aiohttp servers play well-behaved backends; raw ``asyncio.start_server``
servers send the exact (or broken) bytes a test needs. Every test runs on
both event loops the gateway can use: asyncio's own and uvloop (the workers'
default), since their transports differ in read sizes and callback order.
Each refusal sits next to its accept twin.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop
from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.forward.upstream import (
    HIGH_WATER,
    MAX_HEAD_BYTES,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    encode_head,
)
from tests.harness import free_port

Run = Callable[[Coroutine[Any, Any, None]], None]
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
# The most a transport hands to data_received at once (asyncio and uvloop: 256 KiB).
MAX_READ = 256 * 1024


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Run:
    """Run a test's coroutine on a fresh loop of each kind."""

    def run(coro: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            runner.run(asyncio.wait_for(coro, 10))  # a hang fails here, not at pytest's global timeout

    return run


# -- backends ------------------------------------------------------------------------------


@dataclass
class Seen:
    """What an aiohttp backend received."""

    method: str
    path: str
    port: int
    headers: CIMultiDictProxy[str]
    framing: list[tuple[bytes, bytes]]  # raw Content-Length / Transfer-Encoding lines, duplicates kept
    body: bytes


@dataclass
class Backend:
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    sent: int = 0  # bytes of /big written so far

    @property
    def ports(self) -> set[int]:
        return {s.port for s in self.seen}


BIG_BLOCK = bytes(range(256)) * 256  # 64 KiB


def big_block(i: int) -> bytes:
    return i.to_bytes(8, "big") + BIG_BLOCK[8:]


def backend_app(state: Backend) -> web.Application:
    async def record(request: web.Request, body: bytes) -> None:
        framing = [(n, v) for n, v in request.raw_headers if n.lower() in (b"content-length", b"transfer-encoding")]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        port = peer[1] if peer else 0
        state.seen.append(Seen(request.method, request.path, port, request.headers, framing, body))

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        await record(request, body)
        return web.Response(body=b"echo:" + body)

    async def close(request: web.Request) -> web.Response:
        await record(request, b"")
        response = web.Response(text="bye")
        response.force_close()
        return response

    async def status(request: web.Request) -> web.Response:
        await record(request, b"")
        return web.Response(status=int(request.match_info["code"]))

    async def chunked(request: web.Request) -> web.StreamResponse:
        await record(request, b"")
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(5):
            await response.write(b"part%d;" % i)
        await response.write_eof()
        return response

    async def sha256(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
        await record(request, b"")
        return web.Response(text=digest.hexdigest())

    async def big(request: web.Request) -> web.StreamResponse:
        await record(request, b"")
        count = int(request.query["blocks"])
        response = web.StreamResponse()
        response.content_length = count * len(BIG_BLOCK)
        await response.prepare(request)
        for i in range(count):
            await response.write(big_block(i))
            state.sent += len(BIG_BLOCK)
        await response.write_eof()
        return response

    app = web.Application(client_max_size=8 << 20)
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/close", close)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/chunked", chunked)
    app.router.add_post("/sha256", sha256)
    app.router.add_get("/big", big)
    return app


@contextlib.asynccontextmanager
async def aiohttp_backend() -> AsyncIterator[Backend]:
    state = Backend()
    runner = web.AppRunner(backend_app(state), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        await runner.cleanup()


RawHandler = Callable[["Raw", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@dataclass
class Raw:
    url: str = ""
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)  # connection numbers whose client side ended


@contextlib.asynccontextmanager
async def raw_backend(handler: RawHandler) -> AsyncIterator[Raw]:
    """A TCP server running ``handler(server, reader, writer, connection_number)`` for each connection."""
    state = Raw()
    tasks: set[asyncio.Task[Any]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        state.connections += 1
        number = state.connections
        try:
            await handler(state, reader, writer, number)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield state
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader, state: Raw) -> tuple[bytes, bytes]:
    """One request's head and its Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    state.heads.append(head)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def answer(body: bytes = b"ok", *, status: bytes = b"200 OK", headers: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n%s" % (status, len(body), headers, body)


async def keep_answering(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
    """Answer every request on the connection, keep-alive, with ``ok#<connection number>``."""
    while True:
        try:
            await read_request(reader, server)
        except (asyncio.IncompleteReadError, ConnectionError):
            server.closed.append(number)
            return
        writer.write(answer(b"ok#%d" % number))
        await writer.drain()


@contextlib.asynccontextmanager
async def pooled(**options: Any) -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(**options)
    try:
        yield pool
    finally:
        await pool.close()


async def fetch(
    pool: UpstreamPool, url: str, target: str = "/", method: str = "GET", **options: Any
) -> tuple[UpstreamResponse, bytes]:
    """One exchange, whole body read, connection released."""
    response = await pool.request(url, method, target, options.pop("headers", []), **options)
    try:
        return response, await response.read()
    finally:
        response.release()


async def chunks(*parts: bytes, pause: float = 0.0) -> AsyncIterator[bytes]:
    for part in parts:
        if pause:
            await asyncio.sleep(pause)
        yield part


async def until(condition: Callable[[], object], seconds: float = 1.0) -> None:
    """Wait for something the event loop will make true soon."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# -- 1. keep-alive ---------------------------------------------------------------------------


def test_sequential_requests_reuse_one_connection(run: Run) -> None:
    async def scenario() -> None:
        async with aiohttp_backend() as backend, pooled() as pool:
            for i in range(20):
                response, body = await fetch(pool, backend.url, f"/echo?i={i}")
                assert (response.status, body) == (200, b"echo:")
            assert len(backend.seen) == 20
            assert len(backend.ports) == 1

    run(scenario())


def test_connection_close_answers_are_not_reused(run: Run) -> None:
    async def scenario() -> None:
        async with aiohttp_backend() as backend, pooled() as pool:
            for _ in range(3):
                response, body = await fetch(pool, backend.url, "/close")
                assert (response.status, body, response.headers["Connection"]) == (200, b"bye", "close")
            assert len(backend.ports) == 3

    run(scenario())


def test_head_answers_have_no_body_and_are_not_reused(run: Run) -> None:
    async def scenario() -> None:
        async with aiohttp_backend() as backend, pooled() as pool:
            for _ in range(3):
                response = await pool.request(backend.url, "HEAD", "/echo", [], read_timeout=1.0)
                try:
                    assert response.status == 200
                    assert response.headers["Content-Length"] == "5"  # what GET would send: b"echo:"
                    assert await response.read() == b""
                    assert await response.next_chunk() == b""
                finally:
                    response.release()
            assert len(backend.ports) == 3  # llhttp would wait for HEAD's body: never pooled
            response, body = await fetch(pool, backend.url, "/echo")
            assert (response.status, body) == (200, b"echo:")

    run(scenario())


def test_no_body_statuses_keep_the_connection(run: Run) -> None:
    async def scenario() -> None:
        async with aiohttp_backend() as backend, pooled() as pool:
            for target, status, expected in (
                ("/status/204", 204, b""),
                ("/status/304", 304, b""),
                ("/echo", 200, b"echo:"),
                ("/status/204", 204, b""),
            ):
                response, body = await fetch(pool, backend.url, target, read_timeout=1.0)
                assert (response.status, body) == (status, expected)
            assert len(backend.ports) == 1

    run(scenario())


def test_idle_connections_expire_after_idle_seconds(run: Run) -> None:
    async def scenario() -> None:
        async with aiohttp_backend() as backend:
            async with pooled(idle_seconds=0.02) as pool:
                await fetch(pool, backend.url, "/echo")
                await asyncio.sleep(0.05)
                await fetch(pool, backend.url, "/echo")
            assert len(backend.ports) == 2
            async with pooled() as pool:  # twin: within idle_seconds, reused
                await fetch(pool, backend.url, "/echo")
                await asyncio.sleep(0.05)
                await fetch(pool, backend.url, "/echo")
            assert len(backend.ports) == 3

    run(scenario())


def test_max_idle_per_origin_closes_the_extra_connections(run: Run) -> None:
    async def scenario() -> None:
        async with raw_backend(keep_answering) as backend, pooled(max_idle_per_origin=1) as pool:
            first, second = await asyncio.gather(
                pool.request(backend.url, "GET", "/", []), pool.request(backend.url, "GET", "/", [])
            )
            assert backend.connections == 2
            for response in (first, second):
                await response.read()
                response.release()
            await until(lambda: backend.closed)  # the second release closes its connection
            assert len(backend.closed) == 1
            _, body = await fetch(pool, backend.url)  # the one kept is used
            assert body == b"ok#%d" % first_connection(backend)
            assert backend.connections == 2

    def first_connection(backend: Raw) -> int:
        return ({1, 2} - set(backend.closed)).pop()

    run(scenario())


def test_release_before_the_body_ends_closes_the_connection(run: Run) -> None:
    async def scenario() -> None:
        async with aiohttp_backend() as backend, pooled() as pool:
            response = await pool.request(backend.url, "GET", "/big?blocks=64", [])
            assert await response.next_chunk()
            response.release()  # the client went away: the rest of the body is unknown state
            await fetch(pool, backend.url, "/echo")
            assert len(backend.ports) == 2
            response = await pool.request(backend.url, "GET", "/big?blocks=4", [])
            while await response.next_chunk():  # twin: read to the end, then reused
                pass
            response.release()
            await fetch(pool, backend.url, "/echo")
            assert len(backend.ports) == 2  # the second connection served all three

    run(scenario())


# -- 2. framing -------------------------------------------------------------------------------

PARTS = (b"first part,", b"", b"second part,", b"x" * 100_000)
WHOLE = b"".join(PARTS)


@pytest.mark.parametrize(
    ("make_body", "length", "framing"),
    [
        pytest.param(lambda: WHOLE, None, [(b"Content-Length", str(len(WHOLE)).encode())], id="bytes"),
        pytest.param(lambda: chunks(*PARTS), len(WHOLE), [(b"Content-Length", str(len(WHOLE)).encode())], id="sized"),
        pytest.param(lambda: chunks(*PARTS), None, [(b"Transfer-Encoding", b"chunked")], id="chunked"),
    ],
)
def test_request_bodies_arrive_whole_with_one_framing_header(
    run: Run, make_body: Callable[[], Any], length: int | None, framing: list[tuple[bytes, bytes]]
) -> None:
    """An empty chunk from the iterator is skipped: in chunked framing it would end the body."""

    async def scenario() -> None:
        async with aiohttp_backend() as backend, pooled() as pool:
            response, body = await fetch(
                pool, backend.url, "/echo", "POST", headers=[("X-Test", "1")], body=make_body(), length=length
            )
            assert (response.status, body) == (200, b"echo:" + WHOLE)
            (seen,) = backend.seen
            assert seen.body == WHOLE
            assert seen.framing == framing
            assert seen.headers["X-Test"] == "1"
            assert seen.headers["Host"] == backend.url.removeprefix("http://")
            await fetch(pool, backend.url, "/echo")
            assert len(backend.ports) == 1

    run(scenario())


@pytest.mark.parametrize(
    ("method", "framing"),
    [
        ("POST", [(b"Content-Length", b"0")]),
        ("PUT", [(b"Content-Length", b"0")]),
        ("PATCH", [(b"Content-Length", b"0")]),
        ("GET", []),  # twins: no body by definition, no framing header
        ("DELETE", []),
    ],
)
def test_bodiless_requests_framing(run: Run, method: str, framing: list[tuple[bytes, bytes]]) -> None:
    async def scenario() -> None:
        async with aiohttp_backend() as backend, pooled() as pool:
            response, _ = await fetch(pool, backend.url, "/echo", method)
            assert response.status == 200
            assert backend.seen[0].framing == framing
            assert backend.seen[0].body == b""

    run(scenario())


def test_response_with_content_length(run: Run) -> None:
    async def scenario() -> None:
        async with aiohttp_backend() as backend, pooled() as pool:
            response, body = await fetch(pool, backend.url, "/echo", "POST", body=b"abc")
            assert (response.content_length, body) == (8, b"echo:abc")

    run(scenario())


def test_chunked_response(run: Run) -> None:
    async def scenario() -> None:
        async with aiohttp_backend() as backend, pooled() as pool:
            response = await pool.request(backend.url, "GET", "/chunked", [])
            try:
                assert response.headers["Transfer-Encoding"] == "chunked"
                assert response.content_length is None
                parts = []
                while chunk := await response.next_chunk():
                    parts.append(chunk)
            finally:
                response.release()
            assert b"".join(parts) == b"part0;part1;part2;part3;part4;"
            await fetch(pool, backend.url, "/echo")
            assert len(backend.ports) == 1  # the terminating chunk ended it cleanly: pooled

    run(scenario())


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n",
    ],
    ids=["http1.0", "http1.1-close", "non-chunked-coding"],
)
def test_close_delimited_response(run: Run, head: bytes) -> None:
    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            await read_request(reader, server)
            writer.write(head)
            for i in range(3):
                writer.write(b"piece %d/%d;" % (i, number))
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.close()  # the end of the body

        async with raw_backend(handler) as backend, pooled() as pool:
            for number in (1, 2):
                response, body = await fetch(pool, backend.url, read_timeout=1.0)
                assert response.content_length is None
                assert body == b"piece 0/%d;piece 1/%d;piece 2/%d;" % ((number,) * 3)
            assert backend.connections == 2  # the body's end was the connection's

    run(scenario())


def test_close_delimited_response_cut_by_a_reset_is_an_error(run: Run) -> None:
    """A reset, unlike a clean close, does not end a close-delimited body: it truncates it."""

    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            await read_request(reader, server)
            writer.write(b"HTTP/1.0 200 OK\r\n\r\npartial")
            await writer.drain()
            await asyncio.sleep(0.05)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()  # with SO_LINGER 0: a reset

        async with raw_backend(handler) as backend, pooled() as pool:
            response = await pool.request(backend.url, "GET", "/", [], read_timeout=1.0)
            try:
                assert await response.next_chunk() == b"partial"
                with pytest.raises(UpstreamError) as caught:
                    await response.next_chunk()
                assert not caught.value.timeout
            finally:
                response.release()

    run(scenario())


def test_base_path_and_host_header_come_from_the_upstream_url(run: Run) -> None:
    async def scenario() -> None:
        async with raw_backend(keep_answering) as backend, pooled() as pool:
            port = backend.url.rpartition(":")[2]
            await fetch(pool, f"http://user:secret@127.0.0.1:{port}/base/", "/x?y=1")
            await fetch(pool, backend.url, "/x?y=1")  # twin: no base path
            assert backend.heads == [
                f"GET /base/x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode(),
                f"GET /x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode(),
            ]
            with pytest.raises(ValueError, match="not an http"):
                await fetch(pool, f"ws://127.0.0.1:{port}")

    run(scenario())


def test_encode_head_exact_bytes() -> None:
    head = encode_head("POST", "/a?b=1", "backend:8080", [("X-One", "1"), ("x-two", "a b")], "Content-Length: 3\r\n")
    assert head == (
        b"POST /a?b=1 HTTP/1.1\r\nHost: backend:8080\r\nX-One: 1\r\nx-two: a b\r\nContent-Length: 3\r\n\r\n"
    )


# -- 3. streaming -----------------------------------------------------------------------------


def test_large_download_is_read_with_flat_memory(run: Run) -> None:
    """64 MiB read slowly: the client holds at most HIGH_WATER plus one read, the backend is held back."""
    blocks = 1024
    expected = hashlib.sha256()
    for i in range(blocks):
        expected.update(big_block(i))

    async def scenario() -> None:
        async with aiohttp_backend() as backend, pooled() as pool:
            response = await pool.request(backend.url, "GET", f"/big?blocks={blocks}", [], read_timeout=5.0)
            digest = hashlib.sha256()
            most = 0
            received = 0
            try:
                assert response.content_length == blocks * len(BIG_BLOCK)
                first = await response.next_chunk()
                await asyncio.sleep(0.1)  # a slow client: the backend could send everything meanwhile
                most = response._conn.buffered
                assert backend.sent < 32 << 20  # held back by TCP, not buffered here
                digest.update(first)
                received = len(first)
                count = 0
                while chunk := await response.next_chunk():
                    most = max(most, response._conn.buffered + len(chunk))
                    digest.update(chunk)
                    received += len(chunk)
                    count += 1
                    if count % 32 == 0:
                        await asyncio.sleep(0.005)
            finally:
                response.release()
            assert received == blocks * len(BIG_BLOCK)
            assert digest.hexdigest() == expected.hexdigest()
            assert 0 < most <= HIGH_WATER + MAX_READ
            await fetch(pool, backend.url, "/echo")
            assert len(backend.ports) == 1

    run(scenario())


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "chunked"])
def test_large_streamed_upload_arrives_whole(run: Run, sized: bool) -> None:
    size = 32 << 20
    block = bytes(range(256)) * 256

    async def body() -> AsyncIterator[bytes]:
        for i in range(size // len(block)):
            yield i.to_bytes(8, "big") + block[8:]

    expected = hashlib.sha256()
    for i in range(size // len(block)):
        expected.update(i.to_bytes(8, "big") + block[8:])

    async def scenario() -> None:
        async with aiohttp_backend() as backend, pooled() as pool:
            response, digest = await fetch(
                pool, backend.url, "/sha256", "POST", body=body(), length=size if sized else None, read_timeout=5.0
            )
            assert response.status == 200
            assert digest.decode() == expected.hexdigest()
            framing = (b"Content-Length", str(size).encode()) if sized else (b"Transfer-Encoding", b"chunked")
            assert backend.seen[0].framing == [framing]

    run(scenario())


@pytest.mark.parametrize("answers", [True, False], ids=["answers", "silent"])
def test_read_timeout_starts_when_the_upload_ends(run: Run, answers: bool) -> None:
    """A slow upload (0.24 s) is not the backend's delay (0.15 s); a silent backend still times out after it."""

    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            await read_request(reader, server)
            if answers:
                writer.write(answer())
                await writer.drain()
            await asyncio.Event().wait()

        async with raw_backend(handler) as backend, pooled() as pool:
            started = time.monotonic()
            body = chunks(b"a" * 10, b"b" * 10, b"c" * 10, b"d" * 10, pause=0.06)
            if answers:
                response, data = await fetch(pool, backend.url, "/", "POST", body=body, length=40, read_timeout=0.15)
                assert (response.status, data) == (200, b"ok")
            else:
                with pytest.raises(UpstreamError) as caught:
                    await fetch(pool, backend.url, "/", "POST", body=body, length=40, read_timeout=0.15)
                assert caught.value.timeout
                assert time.monotonic() - started >= 0.38  # 0.24 s of upload, then 0.15 s of silence

    run(scenario())


@pytest.mark.parametrize("reads", [True, False], ids=["backend-reads", "backend-stops-reading"])
def test_send_timeout_when_the_backend_stops_taking_the_body(run: Run, reads: bool) -> None:
    """A backend that reads the head, then neither reads the body nor answers, is cut off after
    read_timeout (it would hold the upload for ever); the twin that keeps reading gets it all."""
    size = 64 * 1024 * 1024

    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            server.heads.append(head)
            if not reads:
                await asyncio.Event().wait()
            await reader.readexactly(size)
            writer.write(answer())
            await writer.drain()
            await asyncio.Event().wait()

        async def body() -> AsyncIterator[bytes]:
            block = b"x" * (1 << 16)
            for _ in range(size // len(block)):
                yield block

        async with raw_backend(handler) as backend, pooled() as pool:
            started = time.monotonic()
            if reads:
                response, data = await fetch(pool, backend.url, "/", "POST", body=body(), length=size, read_timeout=0.5)
                assert (response.status, data) == (200, b"ok")
            else:
                with pytest.raises(UpstreamError) as caught:
                    await fetch(pool, backend.url, "/", "POST", body=body(), length=size, read_timeout=0.3)
                assert caught.value.timeout
                assert "took no request body" in str(caught.value)
                assert time.monotonic() - started < 3

    run(scenario())


# -- 4. failures ------------------------------------------------------------------------------


def test_connection_refused(run: Run) -> None:
    async def scenario() -> None:
        async with pooled() as pool:
            with pytest.raises(UpstreamError) as caught:
                await fetch(pool, f"http://127.0.0.1:{free_port()}")
            assert not caught.value.timeout
            assert "unreachable" in str(caught.value)
            async with raw_backend(keep_answering) as backend:  # twin: someone listens
                _, body = await fetch(pool, backend.url)
                assert body == b"ok#1"

    run(scenario())


def test_connect_timeout(run: Run) -> None:
    """A listener whose accept queue is full drops the SYN: connect() hangs until the timeout.

    With backlog 0 Linux queues one connection; the next SYN is dropped.
    """

    async def scenario() -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            host, port = listener.getsockname()
            url = f"http://{host}:{port}"
            filler = socket.create_connection((host, port))  # the one queued connection
            async with pooled() as pool:
                # Measured on the loop's own clock, the one its timers run on. uvloop's ticks in whole
                # milliseconds (time.monotonic() could see a 0.1 s timeout fire at 0.0997 s), and its
                # 23595.75 - 23595.65 is 0.09999... in floats: one tick of slack, not an early timeout.
                loop = asyncio.get_running_loop()
                started = loop.time()
                with filler, pytest.raises(UpstreamError) as caught:
                    await fetch(pool, url, connect_timeout=0.1)
                assert caught.value.timeout
                assert "no connection within 0.1 s" in str(caught.value)
                assert 0.099 <= loop.time() - started < 1.0
                listener.accept()[0].close()  # twin: room in the queue, connected; then nobody answers
                with pytest.raises(UpstreamError) as caught:
                    await fetch(pool, url, connect_timeout=0.1, read_timeout=0.05)
                assert caught.value.timeout
                assert "sent nothing for 0.05 s" in str(caught.value)

    run(scenario())


@pytest.mark.parametrize("delay", [None, 0.05], ids=["never", "in-time"])
def test_read_timeout_before_the_answer(run: Run, delay: float | None) -> None:
    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            await read_request(reader, server)
            if delay is None:
                await asyncio.Event().wait()
            else:
                await asyncio.sleep(delay)
                writer.write(answer())
                await writer.drain()

        async with raw_backend(handler) as backend, pooled() as pool:
            started = time.monotonic()
            if delay is None:
                with pytest.raises(UpstreamError) as caught:
                    await fetch(pool, backend.url, read_timeout=0.1)
                assert caught.value.timeout
                assert 0.1 <= time.monotonic() - started < 1.0
            else:
                response, body = await fetch(pool, backend.url, read_timeout=0.5)
                assert (response.status, body) == (200, b"ok")

    run(scenario())


@pytest.mark.parametrize("stall", [None, 0.03], ids=["stalls", "resumes"])
def test_read_timeout_mid_body(run: Run, stall: float | None) -> None:
    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            await read_request(reader, server)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd")
            await writer.drain()
            if stall is not None:
                await asyncio.sleep(stall)
                writer.write(b"efghij")
                await writer.drain()
            await asyncio.Event().wait()

        async with raw_backend(handler) as backend, pooled() as pool:
            response = await pool.request(backend.url, "GET", "/", [], read_timeout=0.15)
            try:
                assert await response.next_chunk() == b"abcd"
                if stall is None:
                    with pytest.raises(UpstreamError) as caught:
                        await response.next_chunk()
                    assert caught.value.timeout
                else:
                    assert await response.read() == b"efghij"
            finally:
                response.release()

    run(scenario())


@pytest.mark.parametrize(
    ("head", "parts", "whole"),
    [
        (b"Content-Length: 10\r\n\r\n", (b"abcd",), False),
        (b"Content-Length: 10\r\n\r\n", (b"abcd", b"efghij"), True),
        (b"Transfer-Encoding: chunked\r\n\r\n", (b"4\r\nabcd\r\n",), False),
        (b"Transfer-Encoding: chunked\r\n\r\n", (b"4\r\nabcd\r\n", b"6\r\nefghij\r\n0\r\n\r\n"), True),
    ],
    ids=["length-cut", "length-whole", "chunked-cut", "chunked-whole"],
)
def test_backend_closing_mid_body(run: Run, head: bytes, parts: tuple[bytes, ...], whole: bool) -> None:
    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            await read_request(reader, server)
            writer.write(b"HTTP/1.1 200 OK\r\n" + head)
            for part in parts:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.close()

        async with raw_backend(handler) as backend, pooled() as pool:
            response = await pool.request(backend.url, "GET", "/", [], read_timeout=1.0)
            try:
                assert await response.next_chunk() == b"abcd"
                if whole:
                    assert await response.next_chunk() == b"efghij"
                    assert await response.next_chunk() == b""
                else:
                    with pytest.raises(UpstreamError) as caught:
                        await response.next_chunk()
                    assert not caught.value.timeout
                    assert "closed the connection" in str(caught.value)
            finally:
                response.release()

    run(scenario())


@pytest.mark.parametrize(
    ("reply", "ok"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
    ],
    ids=["ssh", "bad-length", "http"],
)
def test_garbage_instead_of_http(run: Run, reply: bytes, ok: bool) -> None:
    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            await read_request(reader, server)
            writer.write(reply)
            await writer.drain()
            await asyncio.Event().wait()

        async with raw_backend(handler) as backend, pooled() as pool:
            if ok:
                response, body = await fetch(pool, backend.url, read_timeout=1.0)
                assert (response.status, body) == (200, b"ok")
            else:
                with pytest.raises(UpstreamError) as caught:
                    await fetch(pool, backend.url, read_timeout=1.0)
                assert not caught.value.timeout
                assert "broken answer" in str(caught.value)

    run(scenario())


@pytest.mark.parametrize("trickle", [False, True], ids=["one-write", "trickled"])
@pytest.mark.parametrize("over", [True, False], ids=["over", "under"])
def test_answer_head_size_limit(run: Run, over: bool, trickle: bool) -> None:
    """MAX_HEAD_BYTES holds however the head arrives: in one piece, or one endless header line."""

    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            await read_request(reader, server)
            if trickle:  # a single header line, 4 KiB at a time
                writer.write(b"HTTP/1.1 200 OK\r\nX-Long: ")
                size = (4 << 20) if over else MAX_HEAD_BYTES - 4096
                for _ in range(size // 4096):
                    writer.write(b"v" * 4096)
                    await writer.drain()
                    await asyncio.sleep(0)
                if over:
                    await asyncio.Event().wait()  # no end of line: only the size limit can end this
                writer.write(b"\r\n" + answer().partition(b"\r\n")[2])
            else:
                count = (MAX_HEAD_BYTES // 1000) + (4 if over else -4)
                lines = b"".join(b"X-H%04d: %s\r\n" % (i, b"v" * 990) for i in range(count))
                writer.write(answer(headers=lines))
            await writer.drain()
            await asyncio.Event().wait()

        async with raw_backend(handler) as backend, pooled() as pool:
            if over:
                with pytest.raises(UpstreamError) as caught:
                    await pool.request(backend.url, "GET", "/", [], read_timeout=5.0)
                assert not caught.value.timeout
                assert f"head over {MAX_HEAD_BYTES} bytes" in str(caught.value)
            else:
                response, body = await fetch(pool, backend.url, read_timeout=5.0)
                assert (response.status, body) == (200, b"ok")

    run(scenario())


@pytest.mark.parametrize(
    "header",
    [
        ("X-Evil", "a\r\nX-Authenticated-User: admin"),
        ("X-Evil", "a\nb"),
        ("X-Evil", "a\rb"),
        ("X-Evil\r\nX-Authenticated-User", "admin"),
    ],
    ids=["crlf-value", "lf-value", "cr-value", "crlf-name"],
)
def test_line_breaks_in_headers_are_refused_before_sending(run: Run, header: tuple[str, str]) -> None:
    async def scenario() -> None:
        async with raw_backend(keep_answering) as backend, pooled() as pool:
            with pytest.raises(UpstreamError) as caught:
                await fetch(pool, backend.url, headers=[("X-Fine", "1"), header])
            assert "line break" in str(caught.value)
            assert "admin" not in str(caught.value)  # the value may be a secret: only the name is quoted
            await asyncio.sleep(0.01)
            assert backend.connections == 0  # refused before connecting
            # twin: ordinary values (spaces, tabs, punctuation, UTF-8) pass verbatim
            value = 'a b\tc; d="e,f"; 日本'
            response, _ = await fetch(pool, backend.url, headers=[("X-Fine", value)])
            assert response.status == 200
            assert b"\r\nX-Fine: " + value.encode() + b"\r\n" in backend.heads[0]

    run(scenario())


# -- 5. stale pooled connections --------------------------------------------------------------


async def answer_once_then_drop(
    server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
) -> None:
    """Answer a connection's first request keep-alive; read the second and close without a byte."""
    await read_request(reader, server)
    writer.write(answer(b"from %d" % number))
    await writer.drain()
    await read_request(reader, server)


@pytest.mark.parametrize(
    ("method", "body"),
    [("GET", None), ("DELETE", None), ("PUT", b"replayable"), ("OPTIONS", None)],
)
def test_stale_connection_is_retried_for_replayable_requests(run: Run, method: str, body: bytes | None) -> None:
    async def scenario() -> None:
        async with raw_backend(answer_once_then_drop) as backend, pooled() as pool:
            _, first = await fetch(pool, backend.url)
            assert first == b"from 1"
            response, second = await fetch(pool, backend.url, "/again", method, body=body, read_timeout=1.0)
            assert (response.status, second) == (200, b"from 2")
            assert backend.connections == 2
            assert [h.split(b" ")[0] for h in backend.heads] == [b"GET", method.encode(), method.encode()]

    run(scenario())


@pytest.mark.parametrize(("method", "body"), [("POST", "bytes"), ("POST", "stream"), ("PUT", "stream")])
def test_stale_connection_is_not_retried_when_the_request_may_have_been_acted_on(
    run: Run, method: str, body: str
) -> None:
    """A POST may have been acted on; a streamed body cannot be sent again (PUT with bytes is retried above)."""

    async def scenario() -> None:
        async with raw_backend(answer_once_then_drop) as backend, pooled() as pool:
            await fetch(pool, backend.url)
            payload = b"order #1"
            data: bytes | AsyncIterator[bytes] = payload if body == "bytes" else chunks(payload)
            with pytest.raises(UpstreamError) as caught:
                await fetch(pool, backend.url, "/", method, body=data, length=len(payload), read_timeout=1.0)
            assert not caught.value.timeout
            assert "kept-alive" in str(caught.value)
            assert backend.connections == 1  # not sent twice
            assert len(backend.heads) == 2

    run(scenario())


def test_several_stale_connections_are_all_skipped(run: Run) -> None:
    async def scenario() -> None:
        async with raw_backend(answer_once_then_drop) as backend, pooled() as pool:
            responses = await asyncio.gather(*(pool.request(backend.url, "GET", "/", []) for _ in range(3)))
            for response in responses:
                await response.read()
                response.release()
            assert backend.connections == 3
            response, body = await fetch(pool, backend.url, read_timeout=1.0)
            assert (response.status, body) == (200, b"from 4")

    run(scenario())


def test_idle_connection_closed_by_the_backend_is_not_used(run: Run) -> None:
    """The accept twin of the POST refusal: a close the client has seen costs nothing."""

    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            await read_request(reader, server)
            writer.write(answer(b"from %d" % number))  # keep-alive by default in HTTP/1.1...
            await writer.drain()
            if number == 1:
                return  # ...but closed right after (the raw server closes the writer)
            await read_request(reader, server)

        async with raw_backend(handler) as backend, pooled() as pool:
            await fetch(pool, backend.url)
            (idle,) = [c for conns in pool._idle.values() for c in conns]
            await until(lambda: idle.closed)
            response, body = await fetch(pool, backend.url, "/", "POST", body=b"order #1", read_timeout=1.0)
            assert (response.status, body) == (200, b"from 2")

    run(scenario())


# -- 6. a failing body iterator ---------------------------------------------------------------


class TooLarge(Exception):
    """Stands in for the proxy's BodyTooLarge."""


@pytest.mark.parametrize("fails", [True, False], ids=["fails", "completes"])
@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("reused", [False, True], ids=["fresh", "reused"])
def test_body_iterator_exception_propagates_and_closes(
    run: Run, caplog: pytest.LogCaptureFixture, reused: bool, sized: bool, fails: bool
) -> None:
    async def scenario() -> None:
        closed = asyncio.Event()
        finalised = []

        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    if head.startswith(b"GET"):
                        writer.write(answer())
                        continue
                    if b"chunked" in head:
                        await reader.readuntil(b"\r\n0\r\n\r\n")
                    else:
                        await reader.readexactly(3000)
                    writer.write(answer(b"stored"))
            except (asyncio.IncompleteReadError, ConnectionError):
                closed.set()

        async def body() -> AsyncIterator[bytes]:
            try:
                yield b"x" * 1000
                await asyncio.sleep(0.01)
                yield b"y" * 1000
                if fails:
                    raise TooLarge("over the limit")
                yield b"z" * 1000
            finally:
                finalised.append(True)

        with caplog.at_level(logging.ERROR, logger="asyncio"):
            async with raw_backend(handler) as backend, pooled() as pool:
                if reused:
                    await fetch(pool, backend.url)
                length = 3000 if sized else None
                if fails:
                    with pytest.raises(TooLarge, match="over the limit"):
                        await fetch(pool, backend.url, "/", "POST", body=body(), length=length, read_timeout=1.0)
                    await asyncio.wait_for(closed.wait(), 1.0)  # half a body is never left looking whole
                else:
                    response, data = await fetch(
                        pool, backend.url, "/", "POST", body=body(), length=length, read_timeout=1.0
                    )
                    assert (response.status, data) == (200, b"stored")
                    _, data = await fetch(pool, backend.url)
                    assert not closed.is_set()
                assert backend.connections == 1
                assert finalised == [True]
                gc.collect()
                for _ in range(5):
                    await asyncio.sleep(0)
            gc.collect()
        assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []

    run(scenario())


# -- 7. interim answers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "interim",
    [
        (b"HTTP/1.1 100 Continue\r\n\r\n",),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\n",),
        (b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a.js>; rel=preload\r\n\r\n"),
        (),
    ],
    ids=["100", "103", "100+103", "none"],
)
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "separate-writes"])
def test_interim_answers_are_skipped(run: Run, interim: tuple[bytes, ...], split: bool) -> None:
    async def scenario() -> None:
        final = answer(b"hello", status=b"201 Created", headers=b"X-Final: yes\r\n")

        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            while True:
                await read_request(reader, server)
                for part in (*interim, final) if split else (b"".join((*interim, final)),):
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.01 if split else 0)

        async with raw_backend(handler) as backend, pooled() as pool:
            for _ in range(2):
                response, body = await fetch(pool, backend.url, "/", "POST", body=b"data", read_timeout=1.0)
                assert (response.status, response.reason, body) == (201, "Created", b"hello")
                assert response.headers["X-Final"] == "yes"
                assert "Link" not in response.headers
            assert backend.connections == 1

    run(scenario())


# -- 8. closing the pool ----------------------------------------------------------------------


@pytest.mark.parametrize("close", [True, False], ids=["closed", "kept"])
def test_pool_close_closes_idle_connections(run: Run, close: bool) -> None:
    async def scenario() -> None:
        async with raw_backend(keep_answering) as backend:
            pool = UpstreamPool()
            try:
                await fetch(pool, backend.url)
                await fetch(pool, backend.url)
                if close:
                    await pool.close()
                    await until(lambda: backend.closed)
                else:
                    await asyncio.sleep(0.05)
                assert backend.closed == ([1] if close else [])
            finally:
                await pool.close()

    run(scenario())


# -- 9. an answer before the body is sent -----------------------------------------------------


@pytest.mark.parametrize("upload", ["stalls", "streams", "floods"])
def test_early_answer_wins_over_the_unsent_body(run: Run, caplog: pytest.LogCaptureFixture, upload: str) -> None:
    """The backend refuses (413) after the head and closes; the client is still uploading.

    ``stalls``: the client's next chunk never comes; ``streams``: chunks keep
    coming (the writer is mid-write when the backend's reset lands: on
    asyncio's loop its "closed mid-body" error used to win, a 502 instead of
    the 413); ``floods``: 64 MiB pushed as fast as TCP takes it (the writer
    waits for room). The backend's answer is what happened: the caller gets it.
    """

    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer(b"too large", status=b"413 Payload Too Large", headers=b"Connection: close\r\n"))
            await writer.drain()

        finalised = []

        async def body() -> AsyncIterator[bytes]:
            try:
                for _ in range(1024):
                    yield b"x" * 65536
                    if upload == "stalls":
                        await asyncio.Event().wait()
                    elif upload == "streams":
                        await asyncio.sleep(0)
            finally:
                finalised.append(True)

        with caplog.at_level(logging.ERROR, logger="asyncio"):
            async with raw_backend(handler) as backend, pooled() as pool:
                length = None if upload == "stalls" else 1024 * 65536
                response, data = await fetch(pool, backend.url, "/", "POST", body=body(), length=length)
                assert (response.status, data) == (413, b"too large")
                await until(lambda: finalised)  # the upload stopped with the exchange
                assert all(not idle for idle in pool._idle.values())  # not pooled
                gc.collect()
                await asyncio.sleep(0)
            gc.collect()
        assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []

    run(scenario())


# -- read() on a body that came whole ---------------------------------------------------------


@pytest.mark.parametrize("size", [HIGH_WATER + 1, 16 * 1024], ids=["over-high-water", "small"])
def test_read_of_a_complete_body_leaves_the_connection_usable(run: Run, size: int) -> None:
    """A body that arrived whole while the caller waited may have paused reading (over HIGH_WATER).

    HIGH_WATER + 1 bytes: reading pauses exactly when the last byte arrives, so the body is complete.
    """

    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            await read_request(reader, server)
            writer.write(answer(b"x" * size))
            await writer.drain()
            await read_request(reader, server)
            writer.write(answer())
            await writer.drain()
            await asyncio.Event().wait()

        async with raw_backend(handler) as backend, pooled() as pool:
            response = await pool.request(backend.url, "GET", "/", [], read_timeout=1.0)
            await until(lambda: response._conn.complete)
            assert len(await response.read()) == size
            response.release()
            response, body = await fetch(pool, backend.url, read_timeout=0.5)
            assert (response.status, body) == (200, b"ok")
            assert backend.connections == 1

    run(scenario())


# -- answers that do not end where they say (found in review) ----------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        answer(b"SMUGGLED"),
        b"HTTP/1.1 302 Found\r\nLocation: https://evil.example/\r\nSet-Cookie: x=attacker\r\nX-Junk: ",
        b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nEVIL-",
    ],
    ids=["whole-second-answer", "half-a-head", "half-a-body"],
)
def test_bytes_after_the_answer_never_reach_the_next_request(run: Run, extra: bytes) -> None:
    """A backend answering one request twice (it saw a request smuggled in a body): the first answer is
    delivered exactly, the connection is closed, and the next request (another user's) gets its own answer
    on a fresh connection. The twin: a clean answer keeps the connection."""

    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            while True:
                head, _ = await read_request(reader, server)
                first = b"/attacker" in head.split(b"\r\n", 1)[0]
                writer.write(answer(b"first") + (extra if first else b"") if first else answer(b"own answer"))
                await writer.drain()

        async with raw_backend(handler) as backend, pooled() as pool:
            response, data = await fetch(pool, backend.url, "/attacker")
            assert (response.status, data) == (200, b"first")
            response, data = await fetch(pool, backend.url, "/victim")
            assert (response.status, data, response.headers.get("Location")) == (200, b"own answer", None)
            assert backend.connections == 2
            response, data = await fetch(pool, backend.url, "/victim-again")  # twin: a clean answer is pooled
            assert data == b"own answer" and backend.connections == 2

    run(scenario())


def test_a_body_after_a_head_answer_is_not_relayed(run: Run) -> None:
    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            while True:
                head, _ = await read_request(reader, server)
                if head.startswith(b"HEAD"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!")
                else:
                    writer.write(answer(b"own answer"))
                await writer.drain()

        async with raw_backend(handler) as backend, pooled() as pool:
            response, data = await fetch(pool, backend.url, "/", "HEAD")
            assert (response.status, data, response.content_length) == (200, b"", 5)
            response, data = await fetch(pool, backend.url, "/next")
            assert data == b"own answer"

    run(scenario())


def test_a_switching_protocols_answer_is_a_clean_upstream_error(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    """The gateway never asks for an upgrade on this client: a 101 is a broken answer (502), not a logged crash."""

    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            await read_request(reader, server)
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n")
            await writer.drain()
            await asyncio.Event().wait()

        async with raw_backend(handler) as backend, pooled() as pool:
            with pytest.raises(UpstreamError) as caught:
                await fetch(pool, backend.url, "/", read_timeout=2)
            assert not caught.value.timeout

    with caplog.at_level(logging.ERROR):
        run(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("cut", [True, False], ids=["cut-mid-body", "whole"])
def test_chunked_named_on_a_second_transfer_encoding_line(run: Run, cut: bool) -> None:
    """llhttp reads every Transfer-Encoding line; so must the end-of-body rule: a chunked body cut by the
    backend's close is an error, not a whole (shorter) body."""

    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            await read_request(reader, server)
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
            )
            if not cut:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            writer.close()

        async with raw_backend(handler) as backend, pooled() as pool:
            if cut:
                with pytest.raises(UpstreamError):
                    await fetch(pool, backend.url, "/")
            else:
                _, data = await fetch(pool, backend.url, "/")
                assert data == b"hello"

    run(scenario())


@pytest.mark.parametrize("closes", [True, False], ids=["backend-closes", "backend-reads"])
def test_backend_closing_during_a_streamed_upload_is_an_upstream_error(run: Run, closes: bool) -> None:
    """uvloop raises RuntimeError on a write to a closed transport: that must still be a 502, not a 500."""

    async def scenario() -> None:
        async def handler(server: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(100_000)
            if closes:
                writer.transport.abort()
                return
            tail = b""
            while not tail.endswith(b"\r\n0\r\n\r\n"):
                tail = (tail + await reader.read(65536))[-16:]
            writer.write(answer())
            await writer.drain()
            await asyncio.Event().wait()

        async def body() -> AsyncIterator[bytes]:
            for _ in range(200 if not closes else 10**6):
                await asyncio.sleep(0)
                yield b"x" * 4096

        async with raw_backend(handler) as backend, pooled() as pool:
            if closes:
                with pytest.raises(UpstreamError):
                    await fetch(pool, backend.url, "/up", "POST", body=body())
            else:
                response, data = await fetch(pool, backend.url, "/up", "POST", body=body())
                assert (response.status, data) == (200, b"ok")

    run(scenario())

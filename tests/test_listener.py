"""The batch-accepting listener, on both event loops the gateway runs on."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, cast

import pytest
import uvloop

from gateway.tls.listener import ACCEPT_BATCH, listen

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
BURST = 200


def run_on(kind: str, coro: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[kind]) as runner:
        runner.run(asyncio.wait_for(coro, 20))


class Counted(asyncio.Protocol):
    """Echoes, and counts the connections made."""

    made: ClassVar[list[int]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        Counted.made.append(1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"echo:" + data)


def burst(port: int, count: int) -> list[socket.socket]:
    """``count`` connections completed by the kernel, waiting in the accept queue."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        socks.append(sock)
    return socks


async def iterations_until(condition: Callable[[], bool], limit: int = 5000) -> int:
    """How many event-loop iterations pass before ``condition`` holds (a call_soon chain counts them)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    count = 0

    def tick() -> None:
        nonlocal count
        count += 1
        if condition() or count >= limit:
            done.set_result(count)
        else:
            loop.call_soon(tick)

    loop.call_soon(tick)
    return int(await done)


@pytest.mark.parametrize("kind", sorted(LOOPS))
def test_a_burst_is_accepted_in_a_few_iterations(kind: str) -> None:
    """200 waiting connections are taken ACCEPT_BATCH at a time, not one per iteration (uvloop's own)."""

    async def scenario() -> None:
        Counted.made = []
        loop = asyncio.get_running_loop()
        listener = await listen(loop, Counted, "127.0.0.1", 0, reuse_port=False, backlog=1024)
        loop.remove_reader(listener.sockets[0].fileno())  # hold accepting until the burst is queued
        port = listener.sockets[0].getsockname()[1]
        clients = await asyncio.to_thread(burst, port, BURST)
        try:
            loop.add_reader(listener.sockets[0].fileno(), listener._accept, listener.sockets[0])
            spent = await iterations_until(lambda: len(Counted.made) >= BURST)
            assert len(Counted.made) == BURST
            # ceil(200 / 64) = 4 readiness events, plus the iterations connect_accepted_socket takes;
            # one accept per iteration (libuv's own policy) would need at least 200
            assert BURST // ACCEPT_BATCH <= 4
            assert spent <= 20
        finally:
            listener.close()
            for sock in clients:
                sock.close()

    run_on(kind, scenario())


@pytest.mark.parametrize("kind", sorted(LOOPS))
def test_accepted_connections_are_served_and_close_stops_accepting(kind: str) -> None:
    async def scenario() -> None:
        Counted.made = []
        loop = asyncio.get_running_loop()
        listener = await listen(loop, Counted, "127.0.0.1", 0, reuse_port=False, backlog=16)
        port = listener.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        assert await reader.readexactly(10) == b"echo:hello"
        sock = writer.get_extra_info("socket")
        assert sock is not None
        writer.close()
        listener.close()
        listener.close()  # twice is harmless
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)

    run_on(kind, scenario())


def test_reuse_port_lets_two_listeners_share_a_port() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        first = await listen(loop, Counted, "127.0.0.1", 0, reuse_port=True, backlog=16)
        port = first.sockets[0].getsockname()[1]
        second = await listen(loop, Counted, "127.0.0.1", port, reuse_port=True, backlog=16)
        first.close()
        second.close()
        with pytest.raises(OSError):  # the twin: without SO_REUSEPORT the port is taken
            held = await listen(loop, Counted, "127.0.0.1", 0, reuse_port=False, backlog=16)
            try:
                await listen(loop, Counted, "127.0.0.1", held.sockets[0].getsockname()[1], reuse_port=False, backlog=16)
            finally:
                held.close()

    run_on("uvloop", scenario())

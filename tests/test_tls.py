"""TLS layer details: how sessions resume (tickets shared across workers, or one worker's cache), and that
resumption keeps the client certificate."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.certs.files import ThrowawayPki
from gateway.config import TlsConfig
from gateway.server import TICKET_KEYS_ENV, GatewayWorker
from gateway.tls.termination import TICKET_KEYS_BYTES, resumption_mode
from tests.harness import ListAudit, start_harness


def fetch(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[bool, ssl.SSLSession | None, bytes]:
    """One GET on a fresh connection; (resumed?, session for next time, response head)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
    ):
        tls.sendall(b"GET /onre/a HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        return tls.session_reused, tls.session, data.split(b"\r\n", 1)[0]


@contextlib.asynccontextmanager
async def two_workers(tmp_path: Path, pki: ThrowawayPki, extra: dict[str, Any]) -> AsyncIterator[tuple[int, int, Any]]:
    """Two workers of one configuration on their own ports: (first port, second port, client context)."""
    h = await start_harness(tmp_path, pki, extra=extra)
    other = GatewayWorker(h.config, ListAudit(), worker=1, serve_admin=False)
    await other.start()
    try:
        yield h.worker.port, other.port, h.client_context("LC000001")
    finally:
        await other.stop()
        await h.close()


@pytest.mark.parametrize("shared", [True, False], ids=["shared-keys", "own-keys"])
async def test_ticket_from_one_worker_resumes_at_another_only_with_shared_keys(
    tmp_path: Path, pki: ThrowawayPki, monkeypatch: pytest.MonkeyPatch, shared: bool
) -> None:
    if shared:
        monkeypatch.setenv(TICKET_KEYS_ENV, secrets.token_hex(TICKET_KEYS_BYTES))
    else:
        monkeypatch.delenv(TICKET_KEYS_ENV, raising=False)
    async with two_workers(tmp_path, pki, {"workers": 2}) as (first, second, ctx):  # several workers: tickets
        resumed, session, head = await asyncio.to_thread(fetch, first, ctx, None)
        assert (resumed, head) == (False, b"HTTP/1.1 200 OK")
        resumed, _, head = await asyncio.to_thread(fetch, second, ctx, session)
        assert head == b"HTTP/1.1 200 OK"  # the resumed session still carries the certificate
        assert resumed is shared


def _tls(pki: ThrowawayPki, mode: str | None) -> dict[str, Any]:
    tls: dict[str, Any] = {"cert": str(pki.server_cert), "key": str(pki.server_key), "client_ca": str(pki.ca_cert)}
    return tls if mode is None else {**tls, "session_resumption": mode}


@pytest.mark.parametrize("mode", [None, "cache"], ids=["auto", "cache"])
async def test_one_worker_resumes_from_its_own_cache_and_keeps_the_certificate(
    tmp_path: Path, pki: ThrowawayPki, monkeypatch: pytest.MonkeyPatch, mode: str | None
) -> None:
    """One worker (the default) keeps sessions in memory: they resume there with the certificate, and
    nowhere else, even with shared ticket keys (no ticket is issued: nothing to decrypt elsewhere)."""
    monkeypatch.setenv(TICKET_KEYS_ENV, secrets.token_hex(TICKET_KEYS_BYTES))
    async with two_workers(tmp_path, pki, {"tls": _tls(pki, mode)}) as (first, second, ctx):
        resumed, session, head = await asyncio.to_thread(fetch, first, ctx, None)
        assert (resumed, head) == (False, b"HTTP/1.1 200 OK")
        for _ in range(2):
            resumed, session, head = await asyncio.to_thread(fetch, first, ctx, session)
            assert (resumed, head) == (True, b"HTTP/1.1 200 OK")  # the cached session carries the certificate
        resumed, _, head = await asyncio.to_thread(fetch, second, ctx, session)
        assert (resumed, head) == (False, b"HTTP/1.1 200 OK")


async def test_tickets_chosen_for_one_worker_resume_at_another(
    tmp_path: Path, pki: ThrowawayPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``session_resumption: tickets`` overrides the one-worker default."""
    monkeypatch.setenv(TICKET_KEYS_ENV, secrets.token_hex(TICKET_KEYS_BYTES))
    async with two_workers(tmp_path, pki, {"tls": _tls(pki, "tickets")}) as (first, second, ctx):
        _, session, _ = await asyncio.to_thread(fetch, first, ctx, None)
        resumed, _, head = await asyncio.to_thread(fetch, second, ctx, session)
        assert (resumed, head) == (True, b"HTTP/1.1 200 OK")


@pytest.mark.parametrize(
    ("setting", "workers", "mode"),
    [
        ("auto", 1, "cache"),
        ("auto", 2, "tickets"),
        ("auto", 8, "tickets"),
        ("cache", 4, "cache"),
        ("tickets", 1, "tickets"),
    ],
)
def test_resumption_mode(setting: str, workers: int, mode: str) -> None:
    assert resumption_mode(setting, workers) == mode


def test_session_cache_is_bounded_and_holds_the_session_not_a_ticket(pki: ThrowawayPki) -> None:
    """A cached session costs ~12 KiB (its client certificate decoded): the worker keeps at most
    SESSION_CACHE_SIZE of them, where OpenSSL would keep 20,480; with tickets nothing is kept."""
    from gateway.tls.termination import SESSION_CACHE_SIZE, _openssl_ctx, build_server_context, load_client_cas

    config, client_ctx = _tls_config_and_client(pki)
    found = {}
    for cache in (True, False):
        server_ctx = build_server_context(config, load_client_cas(config.client_ca), session_cache=cache)
        assert bool(server_ctx.options & ssl.OP_NO_TICKET) is cache
        lib, pointer = _openssl_ctx(server_ctx)
        assert lib is not None and pointer is not None
        size = lib.SSL_CTX_ctrl(pointer, 43, 0, None)  # SSL_CTRL_GET_SESS_CACHE_SIZE
        server, client, pump = _handshake_pair(server_ctx, client_ctx)
        server.write(b"x")  # TLS 1.3 sends the session after the handshake: let it arrive
        pump()
        assert client.read(1) == b"x"
        assert client.session is not None
        found[cache] = (size, server_ctx.session_stats()["number"])
    assert found == {True: (SESSION_CACHE_SIZE, 1), False: (20_480, 0)}


def test_no_unbounded_cache_when_openssl_is_out_of_reach(pki: ThrowawayPki, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ctypes access the cache size cannot be set, so the worker keeps tickets rather than an
    unbounded cache (OpenSSL's 20,480 sessions would be ~240 MiB)."""
    from gateway.tls import termination

    config, _ = _tls_config_and_client(pki)
    monkeypatch.setattr(termination, "_openssl_ctx", lambda ctx: (None, None))
    server_ctx = termination.build_server_context(
        config, termination.load_client_cas(config.client_ca), session_cache=True
    )
    assert not server_ctx.options & ssl.OP_NO_TICKET


def _tls_config_and_client(pki: ThrowawayPki) -> tuple[TlsConfig, ssl.SSLContext]:
    """The gateway's TLS settings for the throwaway PKI, and a client context presenting LC000001."""
    files = pki.clients["LC000001"]
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    client_ctx.load_cert_chain(files.cert, files.key)
    return TlsConfig(cert=pki.server_cert, key=pki.server_key, client_ca=(pki.ca_cert,)), client_ctx


def _handshake_pair(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject, Any]:
    """A real TLS handshake between two SSLObjects over memory BIOs; returns (server, client, pump)."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="127.0.0.1")

    def pump() -> None:
        c_in.write(s_out.read())
        s_in.write(c_out.read())

    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        pump()
    return server, client, pump


def test_message_callback_stops_after_the_handshake_and_one_ticket_per_handshake(pki: ThrowawayPki) -> None:
    """The callback that keeps refused certificates runs during the handshake only (it cost a Python
    call per record afterwards); the twin without the switch-off keeps being called."""
    import _ssl

    from gateway.tls.termination import _on_tls_message, build_server_context, load_client_cas, stop_message_callback

    seen: list[int] = []

    def counting(conn: Any, direction: str, version: int, content_type: int, msg_type: int, data: bytes) -> None:
        seen.append(content_type)
        _on_tls_message(conn, direction, version, content_type, msg_type, data)

    config, client_ctx = _tls_config_and_client(pki)
    results = {}
    for stop in (True, False):
        server_ctx = build_server_context(config, load_client_cas(config.client_ca))
        assert server_ctx.num_tickets == 1
        _ssl._SSLContext._msg_callback.__set__(server_ctx, counting)  # type: ignore[attr-defined]
        server, client, pump = _handshake_pair(server_ctx, client_ctx)
        assert server.getpeercert(binary_form=True)  # the client certificate arrived
        during = len(seen)
        assert during > 0
        if stop:
            assert stop_message_callback(server) is True
        seen.clear()
        for _ in range(5):
            client.write(b"GET / HTTP/1.1\r\n\r\n")
            pump()
            assert server.read(1024).startswith(b"GET")
            server.write(b"HTTP/1.1 200 OK\r\n\r\n")
            pump()
            client.read(1024)
        results[stop] = len(seen)
    assert results[True] == 0
    assert results[False] > 0

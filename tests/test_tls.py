"""TLS layer details: session tickets shared across workers, resumption keeps the client certificate."""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
from pathlib import Path

import pytest

from gateway.pkifiles import ThrowawayPki
from gateway.server import TICKET_KEYS_ENV, GatewayWorker
from gateway.tls import TICKET_KEYS_BYTES
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


@pytest.mark.parametrize("shared", [True, False], ids=["shared-keys", "own-keys"])
async def test_ticket_from_one_worker_resumes_at_another_only_with_shared_keys(
    tmp_path: Path, pki: ThrowawayPki, monkeypatch: pytest.MonkeyPatch, shared: bool
) -> None:
    if shared:
        monkeypatch.setenv(TICKET_KEYS_ENV, secrets.token_hex(TICKET_KEYS_BYTES))
    else:
        monkeypatch.delenv(TICKET_KEYS_ENV, raising=False)
    h = await start_harness(tmp_path, pki)
    other = GatewayWorker(h.config, ListAudit(), worker=1, serve_admin=False)
    await other.start()
    try:
        ctx = h.client_context("LC000001")
        resumed, session, head = await asyncio.to_thread(fetch, h.worker.port, ctx, None)
        assert (resumed, head) == (False, b"HTTP/1.1 200 OK")
        resumed, _, head = await asyncio.to_thread(fetch, other.port, ctx, session)
        assert head == b"HTTP/1.1 200 OK"  # the resumed session still carries the certificate
        assert resumed is shared
    finally:
        await other.stop()
        await h.close()

"""Hostile HTTP over real TLS, from a raw socket: what aiohttp's client would never send.

Request smuggling shapes, path tricks, Host against SNI, slowloris on the
head and the body, renegotiation and clients that vanish mid-upload. Each
refusal is followed by a request that succeeds on the same worker, and the
backend must never have seen the refused request.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gzip
import json
import logging
import re
import ssl
import time
import traceback
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from gateway.access.login import LoginAccess
from gateway.access.passwords import hash_password
from gateway.access.users import UserStore
from gateway.audit.events import serial_hex
from gateway.certs.files import ThrowawayPki
from tests.harness import Harness, start_harness

FAST = {"limits": {"header_timeout_seconds": 1, "body_timeout_seconds": 1}}


@pytest.fixture
async def gw(tmp_path: Path, pki: ThrowawayPki) -> Harness:  # type: ignore[misc]
    harness = await start_harness(tmp_path, pki, extra=FAST)
    yield harness
    await harness.close()


def client_ctx(h: Harness, user: str = "LC000001") -> ssl.SSLContext:
    ctx = h.client_context(user)
    ctx.check_hostname = False  # SNI names below are not in the test server certificate
    return ctx


async def connect(h: Harness, server_hostname: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", h.worker.port, ssl=client_ctx(h), server_hostname=server_hostname or ""
    )


async def exchange(h: Harness, data: bytes, *, server_hostname: str | None = None, wait: float = 5) -> bytes:
    """Send raw bytes on a fresh TLS connection; everything the gateway answers until it closes."""
    reader, writer = await connect(h, server_hostname)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            except (TimeoutError, ConnectionError, ssl.SSLError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    assert match, answer[:200]
    return int(match.group(1))


def json_body(answer: bytes) -> dict[str, Any]:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


async def still_serving(h: Harness) -> None:
    answer = await exchange(h, b"GET /onre/ok HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert status_of(answer) == 200


# --- request smuggling shapes: aiohttp's parser answers 400 and closes -----------------

SMUGGLING = {
    "cl-and-te": b"POST /onre/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /onre/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "two-cl": b"POST /onre/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
    "te-not-chunked-last": b"POST /onre/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te-obfuscated": b"POST /onre/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET /onre/a HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Folded: a\r\n b\r\n\r\n",
    "bare-lf": b"GET /onre/a HTTP/1.1\nHost: 127.0.0.1\nX-A: b\n\n",
    "bad-header-name": b"GET /onre/a HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: x\r\n\r\n",
    "control-in-name": b"GET /onre/a HTTP/1.1\r\nHost: 127.0.0.1\r\nX\x01Y: x\r\n\r\n",
    "huge-header": b"GET /onre/a HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    "huge-line": b"GET /onre/" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "two-hosts": b"GET /onre/a HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n",
    "nul-in-value": b"GET /onre/a HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x00b\r\n\r\n",
}


@pytest.mark.parametrize("raw", SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_smuggling_shapes_are_refused_before_any_backend(gw: Harness, raw: bytes) -> None:
    answer = await exchange(gw, raw)
    assert status_of(answer) in (400, 413, 431), answer[:300]
    assert b"smuggled" not in answer
    await still_serving(gw)


# What the HTTP parser itself refuses: each is the gateway's own 400 page, with a support ID
# the audit event carries, the client's address and certificate, and no traceback in the log.
PARSER_REFUSALS = {
    "cl-and-te": (SMUGGLING["cl-and-te"], "Transfer-Encoding can't be present with Content-Length"),
    "two-cl": (SMUGGLING["two-cl"], "Duplicate Content-Length"),
    "two-hosts": (SMUGGLING["two-hosts"], "Duplicate 'Host' header"),
    "header-200k": (
        b"GET /onre/a HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
        "header field over 16384 bytes (limits.max_header_bytes)",
    ),
    "line-10k": (SMUGGLING["huge-line"], "request line over 8190 bytes (limits.max_line_bytes)"),
    "malformed-request-line": (b"GET /onre/a HTTP/1.1 extra\r\nHost: 127.0.0.1\r\n\r\n", ""),
    "not-http": (b"\x16\x03\x01 hello\r\n\r\n", ""),
    "bad-header-name": (SMUGGLING["bad-header-name"], ""),
}
SUPPORT_ID = re.compile(rb'id="support-id">([0-9A-F]{12})<')


@pytest.mark.parametrize(("raw", "detail"), PARSER_REFUSALS.values(), ids=PARSER_REFUSALS.keys())
async def test_parser_refusals_get_the_page_a_support_id_and_an_audit_event(
    gw: Harness, raw: bytes, detail: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await exchange(gw, raw)
    head, _, page = answer.partition(b"\r\n\r\n")
    assert status_of(answer) == 400, answer[:300]
    assert b"Content-Type: text/html" in head and b"Python/" not in head and b"aiohttp" not in head
    assert b"Content-Security-Policy:" in head and b"Connection: close" in head
    found = SUPPORT_ID.search(page)
    assert found and "不正なリクエストです".encode() in page, page[:500]
    refusals = [e for e in gw.audit.events if e.reason == "bad_request"]
    assert len(refusals) == 1
    event = refusals[0]
    assert (event.event, event.support_id) == ("request_refused", found.group(1).decode())
    assert (event.client_ip, event.cert_subject) == ("127.0.0.1", "LC000001")
    assert event.cert_serial == serial_hex(gw.pki.clients["LC000001"].certificate.serial_number)
    assert event.tls_version.startswith("TLS") and event.method == "" and event.path == ""
    assert detail in event.detail and event.detail
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records
    ]
    warned = [r for r in caplog.records if r.getMessage() == "refused a request the HTTP parser could not read"]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    await still_serving(gw)


async def test_head_just_under_the_limits_is_served(gw: Harness) -> None:
    """The twins of the size refusals: a big header and a request line at its limit pass.

    (The header stays under 8190 bytes, the demo backends' own aiohttp limit.)
    """
    header = b"X-Big: " + b"a" * 8000
    answer = await exchange(
        gw, b"GET /onre/a HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header + b"\r\nConnection: close\r\n\r\n"
    )
    assert status_of(answer) == 200
    path = b"/onre/" + b"a" * (8_190 - len("/onre/"))
    answer = await exchange(gw, b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert status_of(answer) == 200
    assert not [e for e in gw.audit.events if e.reason == "bad_request"]


async def test_compressed_body_is_forwarded_as_sent_never_inflated_into_a_second_request(
    tmp_path: Path, pki: ThrowawayPki
) -> None:
    """A gzip body is the client's bytes: inflated, its tail became a request of its own on the backend hop."""
    received = bytearray()

    async def raw_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                received.extend(data)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        finally:
            writer.close()

    server = await asyncio.start_server(raw_backend, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    h = await start_harness(tmp_path, pki, backend_extra={"upstream": f"http://127.0.0.1:{port}"})
    try:
        smuggled = b"GET /onre/smuggled HTTP/1.1\r\nHost: x\r\nX-Authenticated-User: LC000002\r\n\r\n"
        body = gzip.compress(b"a" * 2000 + smuggled)
        head = b"POST /onre/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Encoding: gzip\r\n"
        answer = await exchange(h, head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        assert status_of(answer) == 200
        assert b"smuggled" not in received and received.endswith(b"\r\n\r\n" + body)
        assert b"Content-Length: %d\r\n" % len(body) in received
    finally:
        await h.close()
        server.close()
        await server.wait_closed()


async def test_chunked_body_alone_is_fine(gw: Harness) -> None:
    """The twin: a well-formed chunked upload passes."""
    raw = (
        b"POST /onre/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"4\r\nabcd\r\n0\r\n\r\n"
    )
    answer = await exchange(gw, raw)
    assert status_of(answer) == 200
    assert json_body(answer)["bytes"] == 4


@pytest.mark.parametrize(
    "target",
    [
        b"http://127.0.0.1/onre/a",
        b"https://evil.example/onre/a",
        b"//evil.example/onre/a",
        b"*",
    ],
    ids=["absolute", "absolute-other-host", "scheme-relative", "asterisk"],
)
async def test_non_origin_form_targets_are_bad_request(gw: Harness, target: bytes) -> None:
    answer = await exchange(
        gw, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )
    assert status_of(answer) == 400, answer[:300]
    await still_serving(gw)


async def test_connect_is_refused(gw: Harness) -> None:
    answer = await exchange(gw, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\nConnection: close\r\n\r\n")
    # aiohttp finds no route for an authority-form target: 404, never forwarded.
    assert status_of(answer) in (400, 404, 405), answer[:300]
    assert b"Clearing" not in answer and b"TDnet" not in answer
    await still_serving(gw)


# --- path tricks: nothing a backend could resolve outside its prefix --------------------


@pytest.mark.parametrize(
    "path",
    [
        "/onre/../admin",
        "/onre/./../admin",
        "/onre/%2e%2e/admin",
        "/onre/.%2E/admin",
        "/onre/%2E./admin",
        "/onre/a%2Fb",
        "/onre/..%2fadmin",
        "/onre/..%5cadmin",
        "/onre/%252e%252e/admin",
        "/onre/%25%32%65/admin",
        "/onre/..;/admin",
        "/onre/.;x/admin",
        "/onre//admin",
        "/onre/a\\..\\admin",
        "/onre/a%00b",
        "/onre/..",
        "/onre/%c0%ae%c0%ae/admin",
        "/onre/%e0%80%af../admin",
    ],
)
async def test_path_tricks_never_leave_the_prefix(gw: Harness, path: str) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    answer = await exchange(gw, request.encode("latin-1"))
    status = status_of(answer)
    if status == 200:
        # Only acceptable if the backend saw exactly the same bytes under /onre/ (not decoded into ..).
        seen = json_body(answer)["path"]
        assert seen == path and seen.startswith("/onre/") and "/../" not in seen, seen
        pytest.fail(f"{path} reached the backend")  # every case above is meant to be refused
    assert status == 400, answer[:300]
    assert json_body(answer)["error"] == "bad_request"
    await still_serving(gw)


# --- Host against SNI -------------------------------------------------------------------


async def test_host_header_must_match_sni(gw: Harness) -> None:
    raw = b"GET /onre/a HTTP/1.1\r\nHost: other.example\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    answer = await exchange(gw, raw, server_hostname="gateway.example")
    assert status_of(answer) == 400
    assert json_body(answer)["error"] == "bad_request"
    event = next(e for e in reversed(gw.audit.events) if e.reason == "bad_request")
    assert "does not match the TLS server name" in event.detail
    # Twins: the same name (any case, with a port) passes; so does no SNI at all (IP address).
    ok = b"GET /onre/a HTTP/1.1\r\nHost: Gateway.Example:443\r\nConnection: close\r\n\r\n"
    assert status_of(await exchange(gw, ok, server_hostname="gateway.example")) == 200
    assert status_of(await exchange(gw, ok)) == 200


async def test_http11_without_host_is_bad_request(gw: Harness) -> None:
    answer = await exchange(gw, b"GET /onre/a HTTP/1.1\r\nAccept: application/json\r\nConnection: close\r\n\r\n")
    assert status_of(answer) == 400
    assert status_of(await exchange(gw, b"GET /onre/a HTTP/1.0\r\n\r\n")) == 200  # HTTP/1.0 needs none


async def test_session_for_one_host_routed_system_does_not_open_another(tmp_path: Path, pki: ThrowawayPki) -> None:
    backends = [
        {"name": "tdnet", "prefix": "/", "host": "tdnet.example", "upstream": "http://127.0.0.1:1"},
        {"name": "clearing", "prefix": "/", "host": "clearing.example", "upstream": "http://127.0.0.1:1"},
    ]
    h = await start_harness(tmp_path, pki, login_mode="gateway", access_factory=LoginAccess)
    try:
        # Point the host routes at the harness's real backends, then reload them in.
        backends[0]["upstream"] = f"http://127.0.0.1:{h.backends['tdnet']}"
        backends[1]["upstream"] = f"http://127.0.0.1:{h.backends['clearing']}"
        import yaml

        data = yaml.safe_load(h.config.path.read_text())
        data["backends"] = backends
        h.config.path.write_text(yaml.safe_dump(data))
        assert (await h.worker.reload())[0]
        with UserStore(h.config.users.database) as store:
            store.add_user("LC000001", hash_password("correct horse battery"), ("tdnet",), now=dt.datetime.now(dt.UTC))
        cookie = await login_cookie(h)

        async def get(sni: str, host: str) -> bytes:
            raw = (
                f"GET /x HTTP/1.1\r\nHost: {host}\r\nCookie: __Host-gw_session={cookie}\r\n"
                "Accept: application/json\r\nConnection: close\r\n\r\n"
            )
            return await exchange(h, raw.encode(), server_hostname=sni)

        answer = await get("tdnet.example", "tdnet.example")
        assert status_of(answer) == 200 and json_body(answer)["system"] == "TDnet"
        answer = await get("clearing.example", "clearing.example")
        assert (status_of(answer), json_body(answer)["error"]) == (403, "not_authorized")
        answer = await get("tdnet.example", "clearing.example")  # TLS to one name, Host of the other
        assert (status_of(answer), json_body(answer)["error"]) == (400, "bad_request")
    finally:
        await h.close()


async def login_cookie(h: Harness) -> str:
    async with h.session() as s:
        async with s.get(h.url("/_gateway/login")) as r:
            token = re.search(r'name="csrf" value="([^"]+)"', await r.text())
        assert token
        form = {"user_id": "LC000001", "password": "correct horse battery", "csrf": token.group(1), "next": ""}
        async with s.post(h.url("/_gateway/login"), data=form, allow_redirects=False) as r:
            assert r.status == 303, await r.text()
            value = r.cookies["__Host-gw_session"].value
    return value


# --- slowloris ------------------------------------------------------------------------------


def timeouts(phase: str) -> float:
    return REGISTRY.get_sample_value("gateway_client_timeouts_total", {"phase": phase}) or 0.0


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    started = time.monotonic()
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(1024), seconds)
        except (ConnectionError, ssl.SSLError):
            break
        if not chunk:
            break
    return time.monotonic() - started


async def test_slowloris_head_is_cut_off(gw: Harness) -> None:
    before = timeouts("header_timeout")
    reader, writer = await connect(gw)
    started = time.monotonic()

    async def drip() -> None:
        for byte in b"GET /onre/a HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)

    dripping = asyncio.create_task(drip())
    try:
        await closed_within(reader, 5)
    finally:
        dripping.cancel()
        writer.close()
    assert 0.9 <= time.monotonic() - started < 3
    assert timeouts("header_timeout") == before + 1
    await still_serving(gw)


async def test_head_in_time_then_idle_keepalive_is_not_cut(gw: Harness) -> None:
    """Twins: a head sent slowly but within the limit is served; an idle keep-alive connection stays."""
    reader, writer = await connect(gw)
    try:
        for part in (b"GET /onre/a HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"\r\n"):
            writer.write(part)
            await asyncio.sleep(0.3)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        await reader.readexactly(length)
        await asyncio.sleep(1.5)  # longer than header_timeout, shorter than keepalive_timeout
        writer.write(b"GET /onre/b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def test_slowloris_body_is_cut_off(gw: Harness) -> None:
    before = timeouts("body_timeout")
    reader, writer = await connect(gw)
    try:
        writer.write(b"POST /onre/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await writer.drain()
        took = await closed_within(reader, 5)
    finally:
        writer.close()
    assert 0.9 <= took < 3.5
    assert timeouts("body_timeout") == before + 1
    await still_serving(gw)


def gateway_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Error lines and tracebacks the gateway logged (the demo backends, in-process, may log their own)."""
    return [
        r.getMessage()
        for r in caplog.records
        if (r.exc_info or r.levelno >= logging.ERROR)
        and "gateway/demo/backend.py" not in "".join(traceback.format_tb(r.exc_info[2] if r.exc_info else None))
    ]


def refusals(reason: str) -> float:
    return REGISTRY.get_sample_value("gateway_refusals_total", {"reason": reason}) or 0.0


def tdnet_5xx() -> float:
    return REGISTRY.get_sample_value("gateway_requests_total", {"backend": "tdnet", "status": "5xx"}) or 0.0


async def stall_body(h: Harness, path: str) -> None:
    """POST announcing 1000 bytes, send 10, then silence until the gateway hangs up."""
    reader, writer = await connect(h)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n".encode())
        writer.write(b"Content-Type: application/x-www-form-urlencoded\r\nUser-Agent: staller\r\n\r\nuserId=LC0")
        await writer.drain()
        assert await closed_within(reader, 5) < 3.5
    finally:
        writer.close()


def assert_client_timeout(h: Harness, event: Any) -> None:
    """The stalled client is named: its address and its certificate."""
    assert (event.event, event.reason) == ("request_refused", "client_timeout")
    assert (event.client_ip, event.cert_subject) == ("127.0.0.1", "LC000001")
    assert event.cert_serial == serial_hex(h.pki.clients["LC000001"].certificate.serial_number)
    assert event.client_port and event.tls_version.startswith("TLS")


async def test_stalled_upload_is_the_clients_timeout_not_a_backend_failure(
    gw: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    before = (refusals("backend_unavailable"), refusals("client_timeout"), tdnet_5xx(), timeouts("body_timeout"))
    await stall_body(gw, "/onre/upload")
    await asyncio.sleep(0.2)
    assert [e.reason for e in gw.audit.events] == ["client_timeout"]
    event = gw.audit.events[0]
    assert_client_timeout(gw, event)
    assert (event.method, event.path, event.backend, event.user_agent) == ("POST", "/onre/upload", "tdnet", "staller")
    assert "limits.body_timeout_seconds" in event.detail
    after = (refusals("backend_unavailable"), refusals("client_timeout"), tdnet_5xx(), timeouts("body_timeout"))
    assert after == (before[0], before[1] + 1, before[2], before[3] + 1)
    access = [r for r in caplog.records if r.getMessage() == "access"]
    assert [r.status for r in access] == [408]  # type: ignore[attr-defined]
    assert gateway_errors(caplog) == []
    await still_serving(gw)


async def test_stalled_passthrough_login_body_is_the_clients_timeout(
    tmp_path: Path, pki: ThrowawayPki, caplog: pytest.LogCaptureFixture
) -> None:
    """The login reads its body itself: a stall there is the client's too, and not a 500 with a traceback."""
    h = await start_harness(tmp_path, pki, access_factory=LoginAccess, extra=FAST)
    try:
        await stall_body(h, "/onre/login")
        await asyncio.sleep(0.2)
        assert [e.reason for e in h.audit.events] == ["client_timeout"]
        assert_client_timeout(h, h.audit.events[0])
        assert h.audit.events[0].path == "/onre/login"
        assert gateway_errors(caplog) == []
        await still_serving(h)
    finally:
        await h.close()


async def test_stalled_head_is_audited_with_the_client_and_its_certificate(gw: Harness) -> None:
    reader, writer = await connect(gw)
    try:
        writer.write(b"GET /onre/a HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
        await writer.drain()
        assert await closed_within(reader, 5) < 3
    finally:
        writer.close()
    await asyncio.sleep(0.1)
    assert [e.reason for e in gw.audit.events] == ["client_timeout"]
    event = gw.audit.events[0]
    assert_client_timeout(gw, event)
    assert (event.method, event.path) == ("", "")
    assert "limits.header_timeout_seconds" in event.detail


async def test_silent_connection_is_closed_and_counted_but_not_audited(gw: Harness) -> None:
    """The twin: a connection that never sends a byte (a browser's preconnect) is no one's refusal."""
    before = timeouts("header_timeout")
    reader, writer = await connect(gw)
    try:
        assert await closed_within(reader, 5) < 3
    finally:
        writer.close()
    await asyncio.sleep(0.1)
    assert timeouts("header_timeout") == before + 1
    assert gw.audit.events == []


async def test_slow_but_steady_body_is_served(gw: Harness) -> None:
    reader, writer = await connect(gw)
    try:
        writer.write(
            b"POST /onre/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 80\r\nConnection: close\r\n\r\n"
        )
        for _ in range(8):  # 2.4 s in all, never silent for the 1 s limit
            writer.write(b"y" * 10)
            await asyncio.sleep(0.3)
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert status_of(answer) == 200
    assert json_body(answer)["bytes"] == 80


# --- renegotiation and vanishing clients -----------------------------------------------------


async def test_client_renegotiation_is_refused_and_worker_survives(gw: Harness) -> None:
    files = gw.pki.clients["LC000001"]
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-tls1_2",
        "-connect",
        f"127.0.0.1:{gw.worker.port}",
        "-cert",
        str(files.cert),
        "-key",
        str(files.key),
        "-CAfile",
        str(gw.pki.ca_cert),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdin is not None
    await asyncio.sleep(0.5)
    proc.stdin.write(b"R\n")
    await proc.stdin.drain()
    await asyncio.sleep(0.5)
    # s_client may already have exited on the refusal: uvloop raises on a write to its closed pipe.
    with contextlib.suppress(RuntimeError, ConnectionError):
        proc.stdin.write(b"GET /onre/a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    with_timeout = asyncio.wait_for(proc.communicate(), 10)
    out = (await with_timeout)[0].decode(errors="replace")
    assert "RENEGOTIATING" in out
    assert "no renegotiation" in out.lower() or "alert" in out.lower(), out[-800:]
    assert "HTTP/1.1 200" not in out  # the connection did not carry on after the attempt
    await still_serving(gw)


async def test_client_vanishing_mid_upload_leaves_the_worker_serving(gw: Harness) -> None:
    for _ in range(3):
        reader, writer = await connect(gw)
        writer.write(b"POST /onre/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000000\r\n\r\n")
        writer.write(b"z" * 1_000_000)
        await writer.drain()
        writer.transport.abort()  # no FIN, no close_notify: gone
        del reader
    await asyncio.sleep(0.2)
    await still_serving(gw)
    async with aiohttp.ClientSession() as s, s.get(gw.admin_url("/healthz")) as r:
        assert r.status == 200
    assert "backend_unavailable" not in gw.audit.reasons()  # the client left: not the backend's failure

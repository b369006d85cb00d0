"""Forwarding: stream a request to its backend and the response back.

Bodies stream both ways in 64 KiB chunks (a 1 GB upload or download keeps
memory flat); connections to each backend are pooled and kept alive by
:mod:`gateway.forward.upstream` (WebSockets by aiohttp's client).
Identity headers are built here from the verified certificate and never
taken from the client: every header in :data:`IDENTITY_HEADERS` that a client
sends is dropped before ours are added.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import metrics
from gateway.certs.policy import PeerCertificate
from gateway.config import Backend
from gateway.forward.upstream import UpstreamError, UpstreamPool, UpstreamResponse
from gateway.web.responses import HSTS, SERVER

CHUNK = 1 << 16

# RFC 9110 7.6.1 hop-by-hop headers, plus the legacy Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
    }
)
# Set by the backend hop itself: Host (the backend's), the body's framing, and no Expect
# (aiohttp answers the client's 100-continue; the body goes to the backend without waiting).
NOT_FORWARDED = HOP_BY_HOP | {"expect", "host", "content-length"}
# Headers that carry identity to the backends: only the gateway sets them.
IDENTITY_HEADERS = frozenset(
    {
        "x-forwarded-client-cert",
        "x-client-cert-serial",
        "x-authenticated-user",
        "x-client-cert-subject",
        "x-client-cert-fingerprint",
        "x-client-cert-not-after",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
        "forwarded",
    }
)


GATEWAY_COOKIE_PREFIX = "__Host-gw_"


# How often an open WebSocket re-checks the certificate and the session.
WEBSOCKET_RECHECK_SECONDS = 5.0
Recheck = Callable[[], Awaitable[bool]]


class BodyTooLarge(Exception):
    """The client sent more than the backend's ``max_body_bytes``."""


class ClientBodyEnded(ConnectionResetError):
    """The client's connection ended mid-body (it closed, or missed the body deadline): its doing, not the backend's."""


def xfcc_value(peer: PeerCertificate) -> str:
    """Envoy's X-Forwarded-Client-Cert element: Hash and quoted Subject."""
    subject = peer.subject.replace("\\", "\\\\").replace('"', '\\"')
    return f'Hash={peer.fingerprint};Subject="{subject}"'


_CERT_HEADERS: dict[str, tuple[str, str]] = {}


def identity_headers(peer: PeerCertificate, user_id: str | None) -> dict[str, str]:
    """The verified identity, as the backends receive it (formatted once per certificate)."""
    cached = _CERT_HEADERS.get(peer.fingerprint)
    if cached is None:
        if len(_CERT_HEADERS) > 20_000:
            _CERT_HEADERS.clear()
        cached = _CERT_HEADERS[peer.fingerprint] = (xfcc_value(peer), peer.serial_hex)
    headers = {"X-Forwarded-Client-Cert": cached[0], "X-Client-Cert-Serial": cached[1]}
    if user_id is not None:
        headers["X-Authenticated-User"] = user_id
    return headers


def outbound_headers(
    incoming: CIMultiDictProxy[str] | Mapping[str, str],
    identity: Mapping[str, str],
    *,
    client_ip: str,
    host: str,
) -> list[tuple[str, str]]:
    """Client headers minus hop-by-hop and identity ones, plus ours (Host is the backend's)."""
    connection = incoming.get("Connection")
    connection_listed = {t.strip().lower() for t in connection.split(",") if t.strip()} if connection else ()
    out: list[tuple[str, str]] = []
    for name, value in incoming.items():
        lower = name.lower()
        if lower in NOT_FORWARDED or lower in IDENTITY_HEADERS or lower in connection_listed:
            continue
        if "_" in name:
            # Many backend stacks (CGI, WSGI, PHP) read X_Authenticated_User and
            # X-Authenticated-User as the same variable: drop every underscore
            # header, as nginx does by default (underscores_in_headers off).
            continue
        if lower == "cookie":
            kept = strip_gateway_cookies(value)
            if kept:
                out.append((name, kept))
            continue
        out.append((name, value))
    out.append(("X-Forwarded-For", client_ip))
    out.append(("X-Forwarded-Proto", "https"))
    out.append(("X-Forwarded-Host", host))
    out.extend(identity.items())
    return out


def strip_gateway_cookies(header: str) -> str:
    """The Cookie header without the gateway's own ``__Host-gw_*`` cookies.

    Backends never see the gateway's session: a backend (or its logs) could
    otherwise replay it.
    """
    kept = [part.strip() for part in header.split(";") if not part.strip().startswith(GATEWAY_COOKIE_PREFIX)]
    return "; ".join(p for p in kept if p)


def response_headers(upstream: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    connection = upstream.get("Connection")
    connection_listed = {t.strip().lower() for t in connection.split(",") if t.strip()} if connection else ()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in connection_listed or lower == "content-length":
            continue
        if lower == "set-cookie" and value.lstrip().startswith(GATEWAY_COOKIE_PREFIX):
            continue  # a backend must not set (or clear) the gateway's own cookies
        out.add(name, value)
    # The backend's own Server and HSTS pass through; without them, ours (never aiohttp's versioned default).
    if "Server" not in out:
        out["Server"] = SERVER
    if "Strict-Transport-Security" not in out:
        out["Strict-Transport-Security"] = HSTS
    return out


async def _limited(stream: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    """The client's body for the backend, cut off at ``limit`` bytes."""
    seen = 0
    try:
        async for chunk in stream.iter_chunked(CHUNK):
            seen += len(chunk)
            if seen > limit:
                raise BodyTooLarge(f"body over {limit} bytes")
            yield chunk
    except (ConnectionError, aiohttp.ClientError) as exc:
        # The client went away mid-body: the backend got half a request and is cut off (the
        # upstream connection is aborted), and the failure is the client's (see app.py).
        raise ClientBodyEnded(f"client body ended early: {type(exc).__name__}") from exc


def make_client_session(max_connections: int = 1000) -> aiohttp.ClientSession:
    """One pooled, keep-alive client for all backends; no cookies, no decompression."""
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
        timeout=aiohttp.ClientTimeout(total=None),
    )


async def forward(
    request: web.Request,
    backend: Backend,
    pool: UpstreamPool,
    websockets: aiohttp.ClientSession,
    identity: Mapping[str, str],
    body: bytes | None = None,
    response_extra: Mapping[str, str] | None = None,
    still_allowed: Recheck | None = None,
) -> web.StreamResponse:
    """Send ``request`` to ``backend`` and stream the answer back.

    ``body`` replaces the request body when the caller already read it (the
    passthrough login). Raises :class:`BodyTooLarge` before contacting the
    backend when Content-Length says so, :class:`UpstreamError` when the
    backend fails before answering; after the answer has started, a failure
    aborts the client connection (there is no honest status left to send).
    """
    length = request.content_length
    if length is not None and length > backend.max_body_bytes:
        raise BodyTooLarge(f"Content-Length {length} over {backend.max_body_bytes}")
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await _forward_websocket(request, backend, websockets, identity, still_allowed)
    data: bytes | AsyncIterator[bytes] | None
    if body is not None:
        data = body
    elif request.body_exists:
        data = _limited(request.content, backend.max_body_bytes)
    else:
        data = None
    started = time.perf_counter()
    upstream = await pool.request(
        backend.upstream,
        request.method,
        request.raw_path,
        outbound_headers(request.headers, identity, client_ip=_client_ip(request), host=request.host),
        data,
        length=length,
        connect_timeout=backend.connect_timeout,
        read_timeout=backend.timeout,
    )
    try:
        metrics.upstream_latency(backend.name).observe(time.perf_counter() - started)
        return await _relay(request, upstream, response_extra)
    finally:
        upstream.release()


def _client_ip(request: web.BaseRequest) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return str(peer[0]) if peer else ""


# Bodies up to this size are read whole and sent with the headers in one
# write (one TLS record instead of three); larger or unsized ones stream.
SMALL_BODY = 64 * 1024
# Writing to a client that went away: not the backend's fault, not a refusal.
CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError)


async def _relay(
    request: web.Request, upstream: UpstreamResponse, extra: Mapping[str, str] | None
) -> web.StreamResponse:
    headers = response_headers(upstream.headers)
    if extra:
        headers.update(extra)
    length = upstream.content_length
    if length is not None and length <= SMALL_BODY and request.method != "HEAD":
        body = await upstream.read()
        return web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=body)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    if length is not None:
        response.content_length = length
    try:
        await response.prepare(request)
        while chunk := await upstream.next_chunk():
            await response.write(chunk)
        await response.write_eof()
    except CLIENT_GONE:
        return response
    except UpstreamError:
        # The status line is gone already: cut the client off so it sees a
        # truncated body instead of a silently short one.
        if request.transport is not None:
            request.transport.abort()
    return response


async def _forward_websocket(
    request: web.Request,
    backend: Backend,
    session: aiohttp.ClientSession,
    identity: Mapping[str, str],
    still_allowed: Recheck | None,
) -> web.StreamResponse:
    """Relay a WebSocket: both directions pumped until either side closes.

    A socket outlives the request that opened it, so ``still_allowed`` (the
    certificate and session checks of a new request) is asked again every
    :data:`WEBSOCKET_RECHECK_SECONDS`; a revoked certificate, a logout or an
    expired session closes the socket (code 1008, policy violation).
    """
    url = backend.upstream.replace("http", "ws", 1) + request.raw_path
    headers = CIMultiDict(outbound_headers(request.headers, identity, client_ip=_client_ip(request), host=request.host))
    for name in ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol"):
        headers.popall(name, None)
    try:
        upstream = await session.ws_connect(
            url, headers=headers, timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10)
        )
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise UpstreamError(isinstance(exc, asyncio.TimeoutError), f"websocket to {backend.name}: {exc}") from exc
    client = web.WebSocketResponse()
    client.headers.update({"Server": SERVER, "Strict-Transport-Security": HSTS})
    await client.prepare(request)

    async def pump(
        src: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
        dst: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
    ) -> None:
        async for msg in src:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            else:
                break
        await dst.close()

    async def watch() -> None:
        while still_allowed is not None:
            await asyncio.sleep(WEBSOCKET_RECHECK_SECONDS)
            if not await still_allowed():
                await client.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=b"access ended")
                return
        await asyncio.Event().wait()  # nothing to re-check: never the first to finish

    async with upstream:
        tasks = [
            asyncio.create_task(pump(client, upstream)),
            asyncio.create_task(pump(upstream, client)),
            asyncio.create_task(watch()),
        ]
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return client

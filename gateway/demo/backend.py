"""A small backend that shows what it received: the demo's TDnet, J-IRISS and clearing.

Also the backend of the tests and benchmarks: it echoes identity headers as
HTML or JSON, counts streamed uploads, streams downloads of any size, sleeps
on request (for timeout tests) and echoes WebSocket messages.
"""

from __future__ import annotations

import asyncio
import hashlib

from aiohttp import WSMsgType, web

from gateway.web.pages import render

IDENTITY = (
    "X-Authenticated-User",
    "X-Forwarded-Client-Cert",
    "X-Client-Cert-Serial",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
)
TITLE = web.AppKey("title", str)


async def show(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await echo_ws(request)
    body = await request.read()
    data = {
        "system": request.app[TITLE],
        "method": request.method,
        "path": request.path_qs,
        "headers": dict(request.headers),
        "identity": {name: request.headers.get(name) for name in IDENTITY},
        "body_bytes": len(body),
    }
    if "application/json" in request.headers.get("Accept", "") or request.query.get("format") == "json":
        return web.json_response(data)
    html = render("demobackend.html", **data)
    return web.Response(text=html, content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-store"})


async def upload(request: web.Request) -> web.Response:
    digest, size = hashlib.sha256(), 0
    async for chunk in request.content.iter_chunked(1 << 16):
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({"bytes": size, "sha256": digest.hexdigest()})


async def download(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("size", "0"))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    block = b"\xa5" * (1 << 16)
    sent = 0
    while sent < size:
        part = block[: min(len(block), size - sent)]
        await response.write(part)
        sent += len(part)
    await response.write_eof()
    return response


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("seconds", "5")))
    return web.Response(text="slow")


async def echo_ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    user = request.headers.get("X-Authenticated-User") or request.headers.get("X-Client-Cert-Serial", "")
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(f"{user}:{msg.data}")
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def tiny(request: web.Request) -> web.Response:
    """The benchmarks' trivial answer: a few bytes, no templating."""
    return web.Response(text="ok", headers={"X-User": request.headers.get("X-Authenticated-User", "")})


ENDPOINTS = {"upload": upload, "download": download, "slow": slow, "tiny": tiny}


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Every system's prefix has the same test endpoints: /<prefix>/upload, /download, ..."""
    handler = ENDPOINTS.get(request.path.rsplit("/", 1)[-1], show)
    return await handler(request)


async def _no_version(request: web.Request, response: web.StreamResponse) -> None:
    """A demo system names no software version either (aiohttp set its Server before this hook)."""
    response.headers.popall("Server", None)


def build_backend(title: str) -> web.Application:
    app = web.Application(client_max_size=4 * 1024**3)
    app[TITLE] = title
    app.router.add_route("*", "/{tail:.*}", dispatch)
    app.on_response_prepare.append(_no_version)
    return app

"""Floors for the gateway's design: minimal aiohttp TLS servers on uvloop, measured by ``bench.probe``.

python -m bench.ceiling KIND PORT CERT KEY CA BACKEND_PORT

* ``hello``: answers every request itself (aiohttp server + TLS, nothing else);
* ``aiohttp-proxy``: forwards to the backend with aiohttp's ``ClientSession``;
* ``upstream-proxy``: forwards with the gateway's own backend client (``gateway.forward.upstream``).

No certificate policy, session or headers: what is left of the gateway's cost per request when
those are taken away, so a change can be judged against the floor it could reach.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from gateway.forward.upstream import UpstreamPool
from gateway.server import install_uvloop

CLIENT = web.AppKey("client", aiohttp.ClientSession)
POOL = web.AppKey("pool", UpstreamPool)


def build(kind: str, backend: str) -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def via_aiohttp(request: web.Request) -> web.Response:
        async with request.app[CLIENT].get(backend + request.raw_path) as upstream:
            return web.Response(body=await upstream.read(), status=upstream.status)

    async def via_upstream(request: web.Request) -> web.Response:
        upstream = await request.app[POOL].request(backend, "GET", request.raw_path, [])
        try:
            return web.Response(body=await upstream.read(), status=upstream.status)
        finally:
            upstream.release()

    async def clients(app: web.Application) -> AsyncIterator[None]:
        app[CLIENT] = aiohttp.ClientSession()
        app[POOL] = UpstreamPool()
        yield
        await app[CLIENT].close()
        await app[POOL].close()

    handlers = {"hello": hello, "aiohttp-proxy": via_aiohttp, "upstream-proxy": via_upstream}
    app = web.Application()
    app.cleanup_ctx.append(clients)
    app.router.add_route("*", "/{tail:.*}", handlers[kind])
    return app


def main() -> None:
    kind, port, cert, key, ca, backend_port = sys.argv[1:7]
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    install_uvloop()
    app = build(kind, f"http://127.0.0.1:{backend_port}")
    web.run_app(app, host="127.0.0.1", port=int(port), ssl_context=ctx, backlog=1024, access_log=None, print=None)


if __name__ == "__main__":
    main()

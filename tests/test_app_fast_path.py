"""gateway.app.proxied_fast_path: which requests skip aiohttp's router, and that the rest do not."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway import app as gateway_app
from gateway.app import GatewayRuntime, build_app, proxied_fast_path
from gateway.certs.files import ThrowawayPki
from tests.harness import start_harness


class _Pages:
    """An access layer with pages at an exact path, under a prefix, and at "/"."""

    async def authorize(self, request: web.Request, backend: Any, peer: Any) -> None:
        return None

    def setup_routes(self, app: web.Application) -> None:
        async def page(request: web.Request) -> web.Response:
            return web.Response(text="page")

        app.router.add_get("/_gateway/login", page)
        app.router.add_get("/_gateway/audit/{item}", page)
        app.router.add_get("/", page)


def _app() -> web.Application:
    return build_app(cast(GatewayRuntime, object()), cast(Any, _Pages()))


def _short_way(monkeypatch: pytest.MonkeyPatch, app: web.Application, short: list[str]) -> None:
    """Stand in for the certificate check (the short way's first step) once the handler is built."""

    async def checked(request: web.Request, handler: Any) -> web.StreamResponse:
        assert handler is gateway_app.proxy_handler
        assert request.match_info.route.handler is gateway_app.proxy_handler
        assert request.app is app
        short.append(request.path)
        return web.Response(text="short")

    monkeypatch.setattr(gateway_app, "certificate_middleware", checked)


def _fallback(slow: list[str]) -> Any:
    async def fallback(request: web.BaseRequest) -> web.StreamResponse:
        slow.append(request.path)
        return web.Response(text="router")

    return fallback


@pytest.mark.parametrize(
    ("method", "path", "headers", "short_way"),
    [
        ("GET", "/onre/tiny", {}, True),
        ("POST", "/onre/upload?x=1", {}, True),
        ("POST", "/", {}, False),  # "/" has a page (GET): the router decides
        ("GET", "/_gateway/login", {}, False),
        ("GET", "/_gateway/audit/x", {}, False),  # under a dynamic page's prefix
        ("GET", "/onre/a%2Fb", {}, False),  # percent-encoded: the router sees it as aiohttp does
        ("POST", "/onre/upload", {"Expect": "100-continue"}, False),
        ("OPTIONS", "*", {}, False),  # no route matches: aiohttp's own 404
    ],
)
async def test_only_requests_for_the_proxy_route_take_the_short_way(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    path: str,
    headers: dict[str, str],
    short_way: bool,
) -> None:
    app, short, slow = _app(), list[str](), list[str]()
    handle = proxied_fast_path(app, _fallback(slow))
    _short_way(monkeypatch, app, short)
    request = make_mocked_request(method, path, headers=headers, app=app)
    await handle(request)
    assert (short, slow) == (([request.path], []) if short_way else ([], [request.path]))


async def test_a_middleware_after_the_certificate_check_runs_on_the_short_way_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The access layer's middleware (database outage → 503) must not be skipped by the short way."""
    app, order = _app(), list[str]()

    @web.middleware
    async def extra(request: web.Request, handler: Any) -> web.StreamResponse:
        order.append("extra")  # answers itself (as the outage middleware does), so no backend is needed
        return web.Response(status=503)

    app.middlewares.append(extra)
    slow: list[str] = []
    handle = proxied_fast_path(app, _fallback(slow))

    async def checked(request: web.Request, handler: Any) -> web.StreamResponse:
        order.append("certificate")
        response: web.StreamResponse = await handler(request)
        return response

    monkeypatch.setattr(gateway_app, "certificate_middleware", checked)
    response = await handle(make_mocked_request("GET", "/onre/tiny", app=app))
    assert (order, slow, response.status) == (["certificate", "extra"], [], 503)


async def test_no_short_way_unless_the_certificate_check_comes_first() -> None:
    app = _app()

    @web.middleware
    async def extra(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.insert(0, extra)
    fallback = _fallback([])
    assert proxied_fast_path(app, fallback) is fallback


async def test_the_gateway_as_served_takes_the_short_way(tmp_path: Path, session_pki: ThrowawayPki) -> None:
    """The production worker (login pages, the access layer's own middleware) installs the short way."""
    h = await start_harness(tmp_path, session_pki, login_mode="gateway")
    try:
        runner = h.worker._runner
        assert runner is not None and runner.server is not None
        assert runner.server.request_handler.__qualname__.startswith("proxied_fast_path")
    finally:
        await h.close()

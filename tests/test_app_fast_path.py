"""gateway.app.proxied_fast_path: which requests skip aiohttp's router, and that the rest do not."""

from __future__ import annotations

from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway import app as gateway_app
from gateway.app import GatewayRuntime, build_app, proxied_fast_path


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


async def test_an_extra_middleware_turns_the_short_way_off() -> None:
    app = _app()

    @web.middleware
    async def extra(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.append(extra)
    fallback = _fallback([])
    assert proxied_fast_path(app, fallback) is fallback

"""The gateway's own responses over real TLS: security headers, no version, the public favicon."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.access.login import LoginAccess
from gateway.certs.files import ThrowawayPki
from tests.harness import Harness, start_harness

ICO_MAGIC = b"\x00\x00\x01\x00"


@pytest.fixture
async def gw(tmp_path: Path, pki: ThrowawayPki) -> Harness:  # type: ignore[misc]
    h = await start_harness(tmp_path, pki, login_mode="gateway", access_factory=LoginAccess)
    yield h
    await h.close()


def assert_own_headers(headers: Any) -> None:
    """What a bank's security review asks of every page the gateway makes itself."""
    csp = headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    assert "script-src" not in csp and "'unsafe-inline'" not in csp.replace("style-src 'unsafe-inline'", "")
    hsts = re.fullmatch(r"max-age=(\d+)(;.*)?", headers["Strict-Transport-Security"])
    assert hsts and int(hsts.group(1)) >= 365 * 24 * 3600
    assert headers["Referrer-Policy"] in ("no-referrer", "same-origin")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert_no_version(headers)


def assert_no_version(headers: Any) -> None:
    server = headers.get("Server", "")
    assert not re.search(r"\d", server) and "aiohttp" not in server and "Python" not in server, server


# --- security headers and Server (own pages) ---------------------------------------------------


async def test_own_pages_refusals_and_redirects_carry_the_security_headers(gw: Harness) -> None:
    async with gw.session("LC000001") as s:
        for path, accept, status in (
            ("/_gateway/login", "text/html", 200),  # the login page
            ("/onre/x", "text/html", 303),  # to the login page
            ("/onre/x", "application/json", 401),  # JSON refusal
            ("/nowhere", "text/html", 404),  # refusal page (no_route)
            ("/favicon.ico", "image/*", 200),
        ):
            async with s.get(gw.url(path), headers={"Accept": accept}, allow_redirects=False) as r:
                assert r.status == status, (path, await r.text())
                assert_own_headers(r.headers)
    async with gw.session(None) as s, s.get(gw.url("/_gateway/login")) as r:  # no certificate: 403 page
        assert r.status == 403
        assert_own_headers(r.headers)


async def test_pages_need_no_inline_script_or_foreign_asset(gw: Harness) -> None:
    """The CSP above holds for the pages as written: no <script>, nothing loaded from elsewhere."""
    async with gw.session("LC000001") as s:
        for path in ("/_gateway/login", "/nowhere"):
            async with s.get(gw.url(path)) as r:
                page = await r.text()
            assert "<script" not in page and "src=" not in page and 'href="http' not in page, path


async def own_backend(handler: Any) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)

    async def no_server(request: web.Request, response: web.StreamResponse) -> None:
        if request.path.endswith("/bare"):
            response.headers.popall("Server", None)

    app.on_response_prepare.append(no_server)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def test_backend_headers_pass_untouched_and_hsts_is_added_where_missing(
    tmp_path: Path, pki: ThrowawayPki
) -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.path.endswith("/own"):
            own = {
                "Server": "backend/1.0",
                "Content-Security-Policy": "default-src 'self'",
                "Referrer-Policy": "origin",
            }
            own["Strict-Transport-Security"] = "max-age=60"
            return web.Response(text="own", headers=own)
        return web.Response(text="bare")

    runner, port = await own_backend(handler)
    h = await start_harness(tmp_path, pki, backend_extra={"upstream": f"http://127.0.0.1:{port}"})
    try:
        async with h.session("LC000001") as s:
            async with s.get(h.url("/onre/own")) as r:
                assert r.status == 200
                assert r.headers["Server"] == "backend/1.0"
                assert r.headers["Content-Security-Policy"] == "default-src 'self'"
                assert r.headers["Referrer-Policy"] == "origin"
                assert r.headers["Strict-Transport-Security"] == "max-age=60"
            async with s.get(h.url("/onre/bare")) as r:
                assert r.status == 200 and await r.text() == "bare"
                assert_no_version(r.headers)
                assert r.headers["Strict-Transport-Security"] == "max-age=31536000"
                assert "Content-Security-Policy" not in r.headers  # a backend's pages are its own business
    finally:
        await h.close()
        await runner.cleanup()


async def test_proxied_demo_system_names_no_version(tmp_path: Path, pki: ThrowawayPki) -> None:
    h = await start_harness(tmp_path, pki)
    try:
        async with h.session("LC000001") as s, s.get(h.url("/onre/x")) as r:
            assert r.status == 200
            assert r.headers["Server"] == "tse-gateway"
    finally:
        await h.close()


# --- favicon -----------------------------------------------------------------------------------


@pytest.mark.parametrize("user", [None, "LC000001"], ids=["no-certificate", "certificate"])
async def test_favicon_is_public_and_never_audited(gw: Harness, user: str | None) -> None:
    async with gw.session(user) as s:
        for method in ("GET", "HEAD"):
            async with s.request(method, gw.url("/favicon.ico")) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("image/")
                body = await r.read()
                assert body.startswith(ICO_MAGIC) if method == "GET" else body == b""
    assert gw.audit.events == []


async def test_a_refused_page_view_is_exactly_one_audit_event(gw: Harness) -> None:
    """What a browser does for a user without a certificate: the page, then the icon on its own."""
    async with gw.session(None) as s:
        async with s.get(gw.url("/onre/")) as r:
            assert r.status == 403
            page = await r.text()
        async with s.get(gw.url("/favicon.ico")) as r:
            assert r.status == 200
    assert [e.reason for e in gw.audit.events] == ["no_certificate"]
    assert gw.audit.events[0].support_id in page


async def test_only_a_plain_get_of_the_icon_skips_the_certificate_check(gw: Harness) -> None:
    """The twin: anything else on that path is judged like every request."""
    async with gw.session(None) as s:
        async with s.post(gw.url("/favicon.ico"), data=b"x") as r:
            assert r.status == 403
        async with s.get(gw.url("/favicon.ico?x=1")) as r:
            assert r.status == 403
        async with s.get(gw.url("/favicon.icon")) as r:
            assert r.status == 403
    assert [e.reason for e in gw.audit.events] == ["no_certificate"] * 3


def test_the_icon_ships_as_package_data() -> None:
    """An installed gateway has the icon too: pyproject's package-data names every file it reads."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parent.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["gateway.web"]
    for folder in ("static", "templates"):
        for file in (root / "gateway" / "web" / folder).iterdir():
            name = f"{folder}/{file.name}"
            assert any(fnmatch.fnmatch(name, g) for g in globs), f"{name} is not in package-data"

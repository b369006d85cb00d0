"""The gateway's own pages live under one reserved prefix; a system mounted at ``/`` works, without a loop."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.access.login import LoginAccess
from gateway.access.passwords import hash_password
from gateway.access.users import UserStore
from gateway.audit.events import EventKind
from gateway.certs.files import ThrowawayPki
from gateway.config import GatewayPaths, load_config, shadowed_paths
from gateway.demo.backend import build_backend
from gateway.errors import ConfigError
from gateway.server import GatewayWorker
from tests.harness import Harness, ListAudit, start_harness, write_config

PASSWORD = "correct horse battery"
MAX_HOPS = 10


def add_user(database: Path, user_id: str = "LC000001", systems: tuple[str, ...] = ("tdnet",)) -> None:
    with UserStore(database) as store:
        store.add_user(user_id, hash_password(PASSWORD), systems, now=dt.datetime.now(dt.UTC))


async def follow(s: aiohttp.ClientSession, base: str, path: str) -> tuple[int, list[str], Any]:
    """GET ``path`` and follow redirects by hand, at most MAX_HOPS: (final status, the hops, the JSON body or text)."""
    hops: list[str] = []
    headers = {"Accept": "text/html,application/json"}
    while True:
        async with s.get(base + path, allow_redirects=False, headers=headers) as r:
            if r.status not in (301, 302, 303, 307, 308):
                body = await r.json() if r.content_type == "application/json" else await r.text()
                return r.status, hops, body
            path = r.headers["Location"]
        hops.append(path)
        assert len(hops) <= MAX_HOPS, f"redirect loop: {hops}"


async def log_in(s: aiohttp.ClientSession, base: str, login_path: str, next_path: str = "") -> aiohttp.ClientResponse:
    async with s.get(base + login_path) as r:
        assert r.status == 200
        page = await r.text()
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token and f'action="{login_path}"' in page
    form = {"user_id": "LC000001", "password": PASSWORD, "csrf": token.group(1), "next": next_path}
    async with s.post(base + login_path, data=form, allow_redirects=False) as r:
        await r.read()
        return r


class RootSystem:
    """A gateway with one system, TDnet, mounted at ``/`` in gateway login mode."""

    def __init__(self, worker: GatewayWorker, backend: web.AppRunner, hits: list[str], pki: ThrowawayPki) -> None:
        self.worker, self.backend, self.hits, self.pki = worker, backend, hits, pki

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.worker.port}"

    def session(self) -> aiohttp.ClientSession:
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        files = self.pki.clients["LC000001"]
        ctx.load_cert_chain(files.cert, files.key)
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), cookie_jar=aiohttp.CookieJar(unsafe=True))


@pytest.fixture
async def root_system(tmp_path: Path, pki: ThrowawayPki) -> AsyncIterator[RootSystem]:
    hits: list[str] = []

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        hits.append(request.path)
        return await handler(request)  # type: ignore[no-any-return]

    app = build_backend("TDnet")
    app.middlewares.append(count)
    backend = web.AppRunner(app, access_log=None)
    await backend.setup()
    site = web.TCPSite(backend, "127.0.0.1", 0)
    await site.start()
    port = backend.addresses[0][1]
    backends = [{"name": "tdnet", "prefix": "/", "upstream": f"http://127.0.0.1:{port}"}]
    ports = {"tdnet": port, "j-iriss": port, "clearing": port}
    config = load_config(write_config(tmp_path, pki, ports, login_mode="gateway", extra={"backends": backends}))
    add_user(config.users.database)
    worker = GatewayWorker(config, ListAudit(), access_factory=LoginAccess)
    await worker.start()
    yield RootSystem(worker, backend, hits, pki)
    await worker.stop()
    await backend.cleanup()


async def test_a_system_at_root_gets_root_after_login_and_never_loops(root_system: RootSystem) -> None:
    gw = root_system
    async with gw.session() as s:
        async with s.get(gw.base + "/", allow_redirects=False, headers={"Accept": "text/html"}) as r:
            assert (r.status, r.headers["Location"]) == (303, "/_gateway/login?next=/")
        assert (await log_in(s, gw.base, "/_gateway/login", "/")).headers["Location"] == "/"
        status, hops, body = await follow(s, gw.base, "/")
        assert (status, hops) == (200, [])
        assert body["path"] == "/" and body["identity"]["X-Authenticated-User"] == "LC000001"
        # Without a next: the landing target is the system at "/", reached in one hop.
        status, hops, body = await follow(s, gw.base, "/_gateway/")
        assert (status, hops, body["path"]) == (200, ["/"], "/")
        # The backend's own /login and /password are its own now.
        for path in ("/login", "/password", "/notice"):
            status, hops, body = await follow(s, gw.base, path)
            assert (status, hops, body["path"]) == (200, [], path)
    assert gw.hits.count("/") == 2


async def test_the_reserved_prefix_never_reaches_a_system_at_root(root_system: RootSystem) -> None:
    gw = root_system
    async with gw.session() as s:
        await log_in(s, gw.base, "/_gateway/login")
        for method, path in (("GET", "/_gateway/anything"), ("POST", "/_gateway/login/x"), ("POST", "/_gateway")):
            async with s.request(method, gw.base + path, headers={"Accept": "application/json"}) as r:
                assert r.status == 404, path
                assert (await r.json())["error"] == "no_route"
        async with s.get(gw.base + "/_gateway", allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (303, "/_gateway/")
    assert not any(hit.startswith("/_gateway") for hit in gw.hits)
    audit = gw.worker.audit
    assert isinstance(audit, ListAudit)
    refused = [e for e in audit.events if e.reason == "no_route"]
    assert {e.path for e in refused} == {"/_gateway/anything", "/_gateway/login/x", "/_gateway"}
    assert all(e.event == EventKind.REQUEST_REFUSED and e.support_id for e in refused)


async def test_without_a_system_at_root_slash_is_the_landing_page(tmp_path: Path, pki: ThrowawayPki) -> None:
    h = await start_harness(tmp_path, pki, login_mode="gateway", access_factory=LoginAccess)
    add_user(h.config.users.database, systems=("j-iriss",))
    try:
        async with h.session() as s:
            async with s.get(h.url("/"), allow_redirects=False) as r:
                assert (r.status, r.headers["Location"]) == (303, "/_gateway/login")
            r2 = await log_in(s, h.url(""), "/_gateway/login")
            assert r2.headers["Location"] == "/nt/"
            status, hops, body = await follow(s, h.url(""), "/")
            assert (status, hops, body["system"]) == (200, ["/nt/"], "J-IRISS")
    finally:
        await h.close()


async def test_a_user_without_a_routed_system_is_told_so_not_looped(tmp_path: Path, pki: ThrowawayPki) -> None:
    backends = [{"name": "tdnet", "prefix": "/onre/", "upstream": "http://127.0.0.1:9"}]
    h = await start_harness(
        tmp_path, pki, login_mode="gateway", access_factory=LoginAccess, extra={"backends": backends}
    )
    add_user(h.config.users.database, systems=("clearing",))
    try:
        async with h.session() as s:
            await log_in(s, h.url(""), "/_gateway/login")
            status, hops, _ = await follow(s, h.url(""), "/")
            assert (status, len(hops)) == (403, 0)
    finally:
        await h.close()
    assert "not_authorized" in h.audit.reasons()


async def test_the_prefix_is_configurable_and_every_redirect_uses_it(tmp_path: Path, pki: ThrowawayPki) -> None:
    h = await start_harness(
        tmp_path, pki, login_mode="gateway", access_factory=LoginAccess, extra={"gateway_paths": {"prefix": "/sso/"}}
    )
    add_user(h.config.users.database)
    try:
        async with h.session() as s:
            async with s.get(h.url("/onre/x"), allow_redirects=False, headers={"Accept": "text/html"}) as r:
                assert r.headers["Location"] == "/sso/login?next=/onre/x"
            async with s.get(h.url("/_gateway/login"), headers={"Accept": "application/json"}) as r:
                assert r.status == 404  # the default prefix is nothing special now
            assert (await log_in(s, h.url(""), "/sso/login")).headers["Location"] == "/onre/"
            async with s.get(h.url("/sso/logout")) as r:
                assert r.status == 200 and 'action="/sso/logout"' in await r.text()
    finally:
        await h.close()


async def test_refusal_pages_link_to_the_login_page_under_the_prefix(gw_refusal: Harness) -> None:
    async with gw_refusal.session() as s:
        form = {"user_id": "LC000001", "password": "wrong", "csrf": "x"}
        async with s.post(gw_refusal.url("/_gateway/login"), data=form) as r:
            assert r.status in (401, 403)
            assert 'href="/_gateway/login"' in await r.text()


@pytest.fixture
async def gw_refusal(tmp_path: Path, pki: ThrowawayPki) -> AsyncIterator[Harness]:
    h = await start_harness(tmp_path, pki, login_mode="gateway", access_factory=LoginAccess)
    yield h
    await h.close()


# -- check-config: backends under the reserved paths are refused; a system at "/" is accepted ---------------------


def config_with(tmp_path: Path, pki: ThrowawayPki, backends: list[dict[str, Any]], **top: Any) -> Path:
    ports = {"tdnet": 9, "j-iriss": 9, "clearing": 9}
    path = write_config(tmp_path, pki, ports, login_mode="gateway", extra={"backends": backends, **top})
    return path


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


UP = "http://127.0.0.1:9"
REFUSED = [
    ({"name": "tdnet", "prefix": "/_gateway/", "upstream": UP}, "backends[0].prefix: '/_gateway/' lies under"),
    ({"name": "tdnet", "prefix": "/_gateway/onre/", "upstream": UP}, "backends[0].prefix: '/_gateway/onre/' lies"),
    ({"name": "tdnet", "prefix": "/favicon.ico/", "upstream": UP}, "backends[0].prefix: '/favicon.ico/' lies under"),
    (
        {
            "name": "tdnet",
            "prefix": "/",
            "upstream": UP,
            "login": {"mode": "passthrough", "path": "/_gateway/login"},
        },
        "backends[0].login.path: '/_gateway/login' lies under",
    ),
]
ACCEPTED = [
    {"name": "tdnet", "prefix": "/_gatewayx/", "upstream": UP},
    {"name": "tdnet", "prefix": "/favicon/", "upstream": UP},
    {"name": "tdnet", "prefix": "/", "upstream": UP, "login": {"mode": "passthrough", "path": "/login"}},
]


@pytest.mark.parametrize(("backend", "message"), REFUSED)
def test_check_config_refuses_a_backend_under_the_gateway_paths(
    tmp_path: Path, session_pki: ThrowawayPki, backend: dict[str, Any], message: str
) -> None:
    path = config_with(tmp_path, session_pki, [backend])
    result = check_config(path)
    assert result.returncode == 2, result.stdout
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {path}: {message}"), line
    assert "Traceback" not in result.stderr
    with pytest.raises(ConfigError):
        load_config(path)  # serve reads the same way


@pytest.mark.parametrize("backend", ACCEPTED)
def test_check_config_accepts_a_backend_beside_the_gateway_paths(
    tmp_path: Path, session_pki: ThrowawayPki, backend: dict[str, Any]
) -> None:
    result = check_config(config_with(tmp_path, session_pki, [backend]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith(": OK")


def test_check_config_notes_what_a_system_at_root_does_not_see(tmp_path: Path, session_pki: ThrowawayPki) -> None:
    path = config_with(tmp_path, session_pki, [{"name": "tdnet", "prefix": "/", "upstream": UP}])
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        f"note: {path}: backends[0].prefix: '/': the gateway answers /_gateway/ and /favicon.ico itself;"
        " backend 'tdnet' never sees those paths"
    )
    other = config_with(tmp_path, session_pki, [{"name": "tdnet", "prefix": "/onre/", "upstream": UP}])
    assert shadowed_paths(load_config(other)) == []


@pytest.mark.parametrize(
    ("prefix", "accepted"),
    [("/sso/", True), ("/a/b-c_d.e~/", True), ("/", False), ("sso/", False), ("/sso", False), ("/a b/", False)],
)
def test_the_prefix_itself_is_validated(tmp_path: Path, session_pki: ThrowawayPki, prefix: str, accepted: bool) -> None:
    path = config_with(
        tmp_path, session_pki, [{"name": "tdnet", "prefix": "/onre/", "upstream": UP}], gateway_paths={"prefix": prefix}
    )
    if accepted:
        assert load_config(path).gateway_paths == GatewayPaths(prefix)
    else:
        with pytest.raises(ConfigError) as refused:
            load_config(path)
        assert refused.value.problems[0].startswith(f"{path}: gateway_paths.prefix: expected a path prefix")


def test_the_example_config_documents_the_prefix() -> None:
    example = yaml.safe_load(Path("config/gateway.example.yaml").read_text(encoding="utf-8"))
    assert example["gateway_paths"] == {"prefix": "/_gateway/"}

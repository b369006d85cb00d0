"""The machinery of the browser suite: servers on a background loop, and browser "terminals".

Playwright's sync API refuses to run inside a running asyncio loop, so the
servers (the real gateway, the demo backends and the issuance portal) run
on an event loop of their own in a background thread, and the tests drive
real Chromium from the main thread. A :class:`Terminal` is one user's PC:
its own HOME, whose NSS database (``$HOME/.pki/nssdb``) holds the trusted
CA and whatever client certificates were imported with ``pk12util``, and
its own browser profile. "Restart the browser" closes Chromium and starts
it again on the same HOME and profile, as a user would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import uvloop
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from gateway.access.login import LoginAccess
from gateway.access.passwords import hash_password
from gateway.access.users import UserStore
from gateway.audit.events import serial_hex
from gateway.ca.authority import CertificateAuthority
from gateway.certs.builders import SSO_CA_NAME
from gateway.certs.files import write_atomic
from gateway.config import Config, load_config
from gateway.demo.backend import build_backend
from gateway.server import GatewayWorker
from tests.harness import SYSTEMS, ListAudit

T = TypeVar("T")
PASSWORD = "correct horse battery"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CA_NICKNAME = "TSE SSO CA"
PAGE_TIMEOUT_MS = 15_000
LAUNCH_TIMEOUT_MS = 30_000
TOOL_TIMEOUT_S = 30
POLICY_DIR = Path("/etc/chromium/policies/managed")
# One file per test run: runs on the same machine must not delete each other's
# rule (without it a browser holding a certificate hangs in the picker). The
# files all say the same, so which one Chromium prefers does not matter.
POLICY_FILE = POLICY_DIR / f"tse-sso-e2e-autoselect-{os.getpid()}.json"
# Chromium picks the certificate itself (no dialog) only for URLs a rule
# covers and only among certificates the filter matches; anything else
# opens the picker, which waits forever in headless mode.
AUTO_SELECT_RULE = {"pattern": "https://127.0.0.1", "filter": {"ISSUER": {"CN": SSO_CA_NAME}}}


# -- clocks and servers -----------------------------------------------------------


class Clock:
    """A movable UTC clock (the portal issues back-dated certificates with it)."""

    def __init__(self) -> None:
        self.offset = dt.timedelta()

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset


@dataclass(frozen=True)
class BackendHit:
    """One request a demo backend received (what the gateway forwarded)."""

    system: str
    method: str
    path: str
    user: str | None
    serial: str | None


class ServerLoop:
    """The servers' event loop in a daemon thread; ``run`` executes a coroutine there and waits.

    uvloop, as ``gateway serve`` and ``gateway portal`` run (the browser sees what ships).
    """

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="e2e-servers", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@dataclass
class Servers:
    """The CA, the gateway, the demo backends and (once started) the portal, all real."""

    directory: Path
    config_path: Path
    config: Config
    ca: CertificateAuthority
    loop: ServerLoop
    audit: ListAudit
    worker: GatewayWorker
    hits: list[BackendHit]
    portal_audit: ListAudit = field(default_factory=ListAudit)
    portal_clock: Clock = field(default_factory=Clock)
    portal_port: int | None = None
    _runners: list[web.AppRunner] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Servers(gateway={self.worker.port}, portal={self.portal_port}, dir={self.directory})"

    def gateway_url(self, path: str = "/") -> str:
        return f"https://127.0.0.1:{self.worker.port}{path}"

    def portal_url(self, path: str = "/") -> str:
        assert self.portal_port is not None, "the portal is not running"
        return f"https://127.0.0.1:{self.portal_port}{path}"

    def add_user(self, user_id: str, password: str = PASSWORD, *, systems: tuple[str, ...] = ("tdnet",)) -> None:
        with UserStore(self.config.users.database) as store:
            store.add_user(user_id, hash_password(password), systems, now=dt.datetime.now(dt.UTC))

    def issue_p12(self, user_id: str, directory: Path) -> tuple[Path, x509.Certificate]:
        """Issue ``user_id``'s certificate straight from the CA (as the admin CLI would)."""
        issued = self.ca.issue_client(user_id, dt.datetime.now(dt.UTC), "e2e-admin")
        path = directory / f"{user_id}-{issued.certificate.serial_number:X}.p12"
        write_atomic(path, issued.pkcs12, mode=0o600)
        return path, issued.certificate

    def refresh_crl(self) -> None:
        """Make the gateway load the CRL file the CA just rewrote (no waiting for the timer)."""
        runtime = self.worker.runtime
        assert runtime is not None
        self.loop.run(runtime.refresher.refresh_all())

    def hits_for(self, user_id: str) -> list[BackendHit]:
        return [h for h in self.hits if h.user == user_id]

    def events_for(self, user_id: str) -> list[Any]:
        return [e for e in self.audit.events if user_id in (e.user_id, e.cert_subject)]

    def start_portal(self) -> None:
        """Start the issuance portal on the same config, CA and users database."""
        if self.portal_port is not None:
            return
        from gateway.ca import portal  # built by another issue; imported late so 3, 6, 7 run without it

        async def start() -> tuple[web.AppRunner, int]:
            return await portal.start_portal(self.config, audit=self.portal_audit, clock=self.portal_clock)

        runner, port = self.loop.run(start())
        self._runners.append(runner)
        self.portal_port = port

    def close(self) -> None:
        async def stop() -> None:
            await self.worker.stop()
            for runner in reversed(self._runners):
                await runner.cleanup()

        try:
            self.loop.run(stop())
        finally:
            self.loop.close()


def _recorder(system: str, hits: list[BackendHit]) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def record(request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        headers = request.headers
        hits.append(
            BackendHit(
                system,
                request.method,
                request.path_qs,
                headers.get("X-Authenticated-User"),
                headers.get("X-Client-Cert-Serial"),
            )
        )
        return await handler(request)

    return record


async def _start_backends(hits: list[BackendHit]) -> tuple[list[web.AppRunner], dict[str, int]]:
    runners, ports = [], {}
    for name, _prefix, title in SYSTEMS:
        app = build_backend(title)
        app.middlewares.append(_recorder(name, hits))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        ports[name] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runners, ports


def _write_config(
    directory: Path, ca: CertificateAuthority, server_cert: Path, server_key: Path, ports: dict[str, int]
) -> Path:
    """One config file for the gateway and the portal, as an operator would write it."""
    secret = directory / "session.key"
    write_atomic(secret, os.urandom(64), mode=0o600)
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "tls": {"cert": str(server_cert), "key": str(server_key), "client_ca": str(ca.cert_path)},
        "revocation": {"crl": str(ca.crl_der_path), "refresh_seconds": 3600, "grace_seconds": 3600},
        "backends": [
            {"name": name, "prefix": prefix, "upstream": f"http://127.0.0.1:{ports[name]}"}
            for name, prefix, _title in SYSTEMS
        ],
        "users": {"database": str(directory / "gateway.db")},
        "session": {"secret_file": str(secret)},
        "audit": {"database": str(directory / "audit.db")},
        "ca": {"dir": str(ca.directory)},
        "portal": {
            "listen": {"host": "127.0.0.1", "port": 0},
            "tls": {"cert": str(server_cert), "key": str(server_key)},
        },
        "log_level": "warning",
    }
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def start_servers(directory: Path) -> Servers:
    """A fresh CA, a server certificate for 127.0.0.1, the gateway and its backends."""
    now = dt.datetime.now(dt.UTC)
    ca = CertificateAuthority.init(directory / "ca", now=now)
    server = ca.issue_server(
        ["127.0.0.1", "localhost"], now, "e2e", out_cert=directory / "server.pem", out_key=directory / "server.key"
    )
    loop = ServerLoop()
    hits: list[BackendHit] = []
    audit = ListAudit()
    try:
        runners, ports = loop.run(_start_backends(hits))
        config_path = _write_config(directory, ca, server.cert, server.key, ports)
        config = load_config(config_path)
        worker = GatewayWorker(config, audit, serve_admin=False, access_factory=LoginAccess)
        loop.run(worker.start())
    except BaseException:
        loop.close()
        raise
    return Servers(directory, config_path, config, ca, loop, audit, worker, hits, _runners=runners)


# -- the admin CLI ------------------------------------------------------------------


def cli(servers: Servers, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``gateway ARGS --config <the suite's config>`` as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--config", str(servers.config_path)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=True,
    )


# -- the browser's certificate store ----------------------------------------------------


def missing_tools() -> list[str]:
    """What the suite needs from the machine that is not there."""
    missing = [tool for tool in ("certutil", "pk12util") if shutil.which(tool) is None]
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(CHROMIUM)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[dev]')")
    return missing


def _tool(*argv: str) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
        )
    return done.stdout


class NssDb:
    """``$HOME/.pki/nssdb``: where Chromium on Linux keeps trusted CAs and client keys."""

    def __init__(self, home: Path, ca_pem: Path) -> None:
        self.path = home / ".pki" / "nssdb"
        self.db = f"sql:{self.path}"
        self.path.mkdir(parents=True)
        _tool("certutil", "-N", "-d", self.db, "--empty-password")
        self.trust_ca(ca_pem)

    def trust_ca(self, ca_pem: Path) -> None:
        """Install the CA certificate (the portal's 認証局証明書のインストール) as trusted for TLS."""
        _tool("certutil", "-A", "-d", self.db, "-n", CA_NICKNAME, "-t", "C,,", "-i", str(ca_pem))

    def import_p12(self, p12: Path, password: str = "") -> None:
        """Import a downloaded PKCS#12, leaving the password empty as the manual says."""
        _tool("pk12util", "-i", str(p12), "-d", self.db, "-W", password)

    def client_nicknames(self) -> list[str]:
        """Nicknames of the certificates that have a private key here (``u,u,u`` trust)."""
        listing = _tool("certutil", "-L", "-d", self.db)
        names = []
        for line in listing.splitlines():
            match = re.match(r"^(.*\S)\s+(\S*u\S*)$", line)
            if match and "," in match.group(2):
                names.append(match.group(1))
        return names

    def delete_client(self, nickname: str) -> None:
        """Delete a certificate and its private key (the user removing an old certificate)."""
        _tool("certutil", "-F", "-d", self.db, "-n", nickname)


@dataclass
class Terminal:
    """One user's PC: HOME with an NSS database, a browser profile, and Chromium when running."""

    name: str
    home: Path
    nss: NssDb
    playwright: Any
    auto_select_in_profile: bool
    context: Any = None
    page: Any = None
    downloads: Path = field(init=False)

    def __post_init__(self) -> None:
        self.downloads = self.home / "Downloads"
        self.downloads.mkdir(exist_ok=True)

    @property
    def profile(self) -> Path:
        return self.home / "chromium-profile"

    def start(self, *, bypass_csp: bool = False) -> Any:
        """Start Chromium on this terminal's HOME and profile; return its first tab.

        ``bypass_csp`` only for the accessibility check: axe-core is injected as a
        script, which the pages' CSP (no script at all) would block.
        """
        assert self.context is None, f"{self.name}: the browser is already running"
        if self.auto_select_in_profile:
            self._write_profile_rule()
        self.context = self.playwright.chromium.launch_persistent_context(
            str(self.profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            env={**os.environ, "HOME": str(self.home)},
            timeout=LAUNCH_TIMEOUT_MS,
            accept_downloads=True,
            locale="ja-JP",
            bypass_csp=bypass_csp,
        )
        self.context.set_default_timeout(PAGE_TIMEOUT_MS)
        self.context.set_default_navigation_timeout(PAGE_TIMEOUT_MS)
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        return self.page

    def close(self) -> None:
        if self.context is not None:
            context, self.context, self.page = self.context, None, None
            context.close()

    def restart(self) -> Any:
        """Close the browser and start it again (what the manual asks after a new certificate)."""
        self.close()
        return self.start()

    def pages(self) -> list[Any]:
        return list(self.context.pages) if self.context is not None else []

    def _write_profile_rule(self) -> None:
        """Without root: the same auto-select rule as a content setting in the profile."""
        import json

        prefs_file = self.profile / "Default" / "Preferences"
        prefs: dict[str, Any] = json.loads(prefs_file.read_text()) if prefs_file.exists() else {}
        rule = {"filters": [AUTO_SELECT_RULE["filter"]]}
        exceptions = prefs.setdefault("profile", {}).setdefault("content_settings", {}).setdefault("exceptions", {})
        exceptions["auto_select_certificate"] = {"https://127.0.0.1:*,*": {"setting": rule}}
        prefs_file.parent.mkdir(parents=True, exist_ok=True)
        prefs_file.write_text(json.dumps(prefs))


def read_p12(path: Path) -> x509.Certificate:
    """The user certificate inside a downloaded PKCS#12 (opened with the empty password)."""
    _key, cert, _chain = pkcs12.load_key_and_certificates(path.read_bytes(), None)
    assert cert is not None, f"{path} holds no certificate"
    return cert


# -- what the pages say -------------------------------------------------------------------


def gateway_login(page: Any, servers: Servers, user_id: str, password: str = PASSWORD, start: str = "/onre/") -> Any:
    """Open ``start`` on the gateway, get sent to its login form, log in; return the response."""
    page.goto(servers.gateway_url(start))
    assert "/_gateway/login" in page.url, f"expected the login form, got {page.url}: {page.inner_text('body')[:300]}"
    assert page.locator("h1").inner_text().startswith("ログイン")
    page.fill("#user_id", user_id)
    page.fill("#password", password)
    with page.expect_navigation() as nav:
        page.click("button#go")
    return nav.value


def identity(page: Any) -> dict[str, str]:
    """The identity headers the demo backend shows it received (table#identity)."""
    cells = page.locator("table#identity td[data-header]")
    return {cells.nth(i).get_attribute("data-header"): cells.nth(i).inner_text() for i in range(cells.count())}


def assert_tdnet_as(page: Any, servers: Servers, user_id: str, cert: x509.Certificate) -> None:
    """The TDnet demo page is shown, and the backend got this user and this certificate."""
    assert "/onre/" in page.url, page.url
    assert page.locator("h1#system").inner_text().startswith("TDnet")
    shown = identity(page)
    serial = serial_hex(cert.serial_number)
    assert shown["X-Authenticated-User"] == user_id
    assert shown["X-Client-Cert-Serial"] == serial
    assert f"CN={user_id}" in shown["X-Forwarded-Client-Cert"]
    hit = servers.hits[-1]
    assert (hit.system, hit.user, hit.serial) == ("tdnet", user_id, serial), hit


def assert_refusal(page: Any, reason: str, title_ja: str) -> str:
    """The gateway's refusal page with this reason code and Japanese title; return its support ID."""
    assert page.locator("#reason").inner_text() == reason, page.inner_text("body")[:500]
    assert page.locator("h1#title").inner_text().startswith(title_ja)
    assert page.locator("#identity").count() == 0
    support_id = page.locator("#support-id").inner_text()
    assert re.fullmatch(r"[0-9A-F]{12}", support_id), support_id
    return support_id


# -- the issuance portal (TSE-CA 証明書発行サービス) ------------------------------------------


def portal_login(page: Any, servers: Servers, user_id: str, password: str = PASSWORD) -> None:
    """Log in to the issuance service: no client certificate needed there."""
    page.goto(servers.portal_url("/login"))
    page.fill("#user_id", user_id)
    page.fill("#password", password)
    with page.expect_navigation():
        page.click("button#go")
    assert urlsplit(page.url).path == "/", f"portal login ended at {page.url}: {page.inner_text('body')[:300]}"
    for item in ("a#menu-issue", "a#menu-certificates", "a#menu-ca", "a#menu-help"):
        assert page.locator(item).count() == 1, f"portal menu lacks {item}"


def portal_apply(page: Any, servers: Servers) -> Any:
    """From the main menu: 証明書発行 → 申請; return the response to the application."""
    page.goto(servers.portal_url("/"))
    with page.expect_navigation():
        page.click("a#menu-issue")
    assert urlsplit(page.url).path == "/issue", page.url
    with page.expect_navigation() as nav:
        page.click("button#apply")
    return nav.value


def portal_issue(page: Any, servers: Servers, term: Terminal) -> tuple[Path, x509.Certificate]:
    """Apply for a certificate and download the PKCS#12 (証明書ダウンロード) into the terminal."""
    response = portal_apply(page, servers)
    heading = page.locator("h1").inner_text()
    assert "証明書を発行しました" in heading, f"{response.status}: {page.inner_text('body')[:500]}"
    with page.expect_download() as info:
        page.click("a#download")
    download = info.value
    assert download.failure() is None, download.failure()
    path = term.downloads / (download.suggested_filename or "certificate.p12")
    download.save_as(str(path))
    return path, read_p12(path)


@dataclass(frozen=True)
class CertificateRow:
    """One line of the portal's certificate list (証明書情報の確認 / 失効)."""

    serial: int
    user_id: str
    status: str
    revoked_at: str
    detail_href: str | None


def portal_certificates(page: Any, servers: Servers) -> list[CertificateRow]:
    """Open 証明書情報の確認 / 失効 and read table#certificates (listed at once, no 実行 needed)."""
    page.goto(servers.portal_url("/"))
    with page.expect_navigation():
        page.click("a#menu-certificates")
    rows = page.eval_on_selector_all(
        "table#certificates tr:has(td)",
        """rows => rows.map(r => ({
            cells: [...r.querySelectorAll('td')].map(td => td.innerText.trim()),
            href: r.querySelector('a.detail') && r.querySelector('a.detail').getAttribute('href')}))""",
    )
    found = []
    for row in rows:
        cells = row["cells"]
        assert len(cells) >= 6, f"certificate row has {len(cells)} cells: {cells}"
        serial_text = re.sub(r"[^0-9A-Fa-f]", "", cells[2])
        found.append(CertificateRow(int(serial_text, 16), cells[1], cells[4], cells[5], row["href"]))
    return found


def status_is(row: CertificateRow, status_ja: str) -> bool:
    """The ステータス cell says this Japanese status (an English gloss may follow it)."""
    return re.sub(r"[\sA-Za-z()/]", "", row.status) == status_ja


def portal_revoke(page: Any, servers: Servers, serial: int) -> None:
    """Open the certificate's detail, 失効する / Revoke, confirm (失効する / Revoke), see 失効しました."""
    rows = {row.serial: row for row in portal_certificates(page, servers)}
    assert serial in rows, f"{serial:X} not in the portal's list: {list(rows.values())}"
    with page.expect_navigation():
        page.click(f'a.detail[href="{rows[serial].detail_href}"]')
    assert page.locator("a#close").count() == 1
    with page.expect_navigation():
        page.click("button#revoke")
    with page.expect_navigation():
        page.click("button#confirm")
    assert "失効しました" in page.locator("h1#done").inner_text()

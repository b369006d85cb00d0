"""The issuance portal over real HTTPS: login, issue, download, list, revoke, CA and CRL files.

Everything is real: a CA directory made by CertificateAuthority.init, the
portal's server certificate issued by it, SQLite user and session stores,
an aiohttp client that trusts only that CA, and the PKCS#12 read back with
cryptography. Two movable clocks: the CA's (issuance) and the sessions'.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import re
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from gateway.access.passwords import hash_password
from gateway.access.sessions import SESSION_COOKIE as GATEWAY_COOKIE
from gateway.access.sessions import SessionStore, load_session_key, sign
from gateway.access.users import UserStore
from gateway.audit.events import serial_hex
from gateway.ca.authority import CertificateAuthority
from gateway.ca.issuance import JST
from gateway.ca.portal import LOGIN_CSRF_COOKIE, SESSION_COOKIE, start_portal
from gateway.ca.publisher import CrlPublisher
from gateway.config import Config, load_config
from gateway.verdict import Reason
from tests.harness import ListAudit

UTC = dt.UTC
PASSWORD = "correct horse battery"
REAL_NOW = dt.datetime.now(UTC).replace(microsecond=0)
CA_BORN = REAL_NOW - dt.timedelta(days=420)  # so back-dated issuance is inside the CA's validity


class Clock:
    """A movable clock: real time plus an offset."""

    def __init__(self) -> None:
        self.offset = dt.timedelta()

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(UTC) + self.offset


def write_portal_config(directory: Path, ca: CertificateAuthority, *, extra: dict[str, Any] | None = None) -> Config:
    """A config with ca:, portal:, users:, session: (the sections `gateway portal` reads)."""
    server = ca.issue_server(
        ["127.0.0.1", "localhost"],
        dt.datetime.now(UTC),
        "test",
        out_cert=directory / "portal.crt",
        out_key=directory / "portal.key",
    )
    secret = directory / "session.key"
    if not secret.exists():
        secret.write_bytes(b"k" * 64)
    data: dict[str, Any] = {
        "ca": {"dir": str(ca.directory), "crl_next_update_hours": 24},
        "portal": {
            "listen": {"host": "127.0.0.1", "port": 0},
            "tls": {"cert": str(server.cert), "key": str(server.key)},
        },
        "users": {"database": str(directory / "gateway.db")},
        "session": {"secret_file": str(secret), "idle_minutes": 30, "absolute_hours": 10},
        "login": {"max_failures": 3, "lockout_minutes": 30, "password_min_length": 12},
        "audit": {"database": str(directory / "audit.db")},
        "log_level": "warning",
    }
    data.update(extra or {})
    path = directory / "portal.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_config(path)


@functools.cache
def hashed(password: str) -> str:
    """argon2 is slow on purpose; one hash per password per run is enough for the tests."""
    return hash_password(password)


def add_user(config: Config, user_id: str, *, password: str = PASSWORD, must_change: bool = False) -> None:
    with UserStore(config.users.database) as store:
        store.add_user(user_id, hashed(password), ("tdnet",), now=REAL_NOW, must_change_password=must_change)


@dataclass
class Portal:
    """A running portal and what a test needs around it."""

    ca: CertificateAuthority
    config: Config
    audit: ListAudit
    clock: Clock
    session_clock: Clock
    port: int
    directory: Path

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def client(self) -> aiohttp.ClientSession:
        ctx = ssl.create_default_context(cafile=str(self.ca.cert_path))
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), cookie_jar=aiohttp.CookieJar(unsafe=True))

    def events(self, kind: str) -> list[Any]:
        return [e for e in self.audit.events if e.event == kind]


@pytest.fixture
async def portal(tmp_path: Path) -> AsyncIterator[Portal]:
    ca = CertificateAuthority.init(tmp_path / "ca", now=CA_BORN)
    ca.publish_crl(REAL_NOW)
    config = write_portal_config(tmp_path, ca)
    for user in ("LC000001", "LC000002"):
        add_user(config, user)
    audit, clock, session_clock = ListAudit(), Clock(), Clock()
    runner, port = await start_portal(config, audit=audit, clock=clock, session_clock=session_clock, crl_interval=None)
    yield Portal(ca, config, audit, clock, session_clock, port, tmp_path)
    await runner.cleanup()


# -- helpers ------------------------------------------------------------------------


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "page has no csrf field"
    return found.group(1)


async def get(p: Portal, s: aiohttp.ClientSession, path: str) -> tuple[int, str, Any]:
    async with s.get(p.url(path), allow_redirects=False) as r:
        return r.status, await r.text(), r.headers


async def post(p: Portal, s: aiohttp.ClientSession, path: str, form: dict[str, str]) -> tuple[int, str, Any]:
    async with s.post(p.url(path), data=form, allow_redirects=False, headers={"Accept": "text/html"}) as r:
        return r.status, await r.text(), r.headers


async def login(
    p: Portal, s: aiohttp.ClientSession, user_id: str = "LC000001", password: str = PASSWORD, *, csrf: str | None = None
) -> tuple[int, str, Any]:
    status, page, _ = await get(p, s, "/login")
    assert status == 200
    form = {"user_id": user_id, "password": password, "csrf": csrf_of(page) if csrf is None else csrf, "next": ""}
    return await post(p, s, "/login", form)


async def logged_in(p: Portal, user_id: str = "LC000001") -> aiohttp.ClientSession:
    s = p.client()
    status, _, headers = await login(p, s, user_id)
    assert (status, headers["Location"]) == (303, "/")
    return s


async def session_csrf(p: Portal, s: aiohttp.ClientSession) -> str:
    status, page, _ = await get(p, s, "/")
    assert status == 200
    return csrf_of(page)


async def issue(p: Portal, s: aiohttp.ClientSession, **fields: str) -> tuple[int, str]:
    status, page, _ = await post(p, s, "/issue", {"csrf": await session_csrf(p, s), **fields})
    return status, page


def download_link(page: str) -> str:
    found = re.search(
        r'<a class="button" id="download" href="(/download/[^"]+)">証明書ダウンロード / Download certificate</a>', page
    )
    assert found, page
    return found.group(1)


async def issue_and_download(p: Portal, s: aiohttp.ClientSession, **fields: str) -> bytes:
    status, page = await issue(p, s, **fields)
    assert status == 200, page
    async with s.get(p.url(download_link(page))) as r:
        assert r.status == 200
        return await r.read()


def serials_of(page: str) -> list[str]:
    return re.findall(r'<a class="detail" href="/certificates/([0-9A-F]+)">', page)


async def revoke(p: Portal, s: aiohttp.ClientSession, serial: str) -> str:
    status, page, _ = await get(p, s, f"/certificates/{serial}")
    assert status == 200 and 'id="revoke"' in page
    status, confirm, _ = await post(p, s, f"/certificates/{serial}/revoke", {"csrf": csrf_of(page)})
    assert status == 200 and 'id="confirm"' in confirm
    assert f'action="/certificates/{serial}/revoke/confirm"' in confirm
    status, done, _ = await post(p, s, f"/certificates/{serial}/revoke/confirm", {"csrf": csrf_of(confirm)})
    assert status == 200
    return done


# -- login ----------------------------------------------------------------------------


async def test_login_leads_to_the_main_menu_with_four_items(portal: Portal) -> None:
    async with portal.client() as s:
        status, _, headers = await get(portal, s, "/")
        assert (status, headers["Location"]) == (303, "/login?next=/")
        status, page, headers = await get(portal, s, "/login")
        for needle in (
            'id="user_id"',
            'id="password"',
            'id="go">ログイン / Login<',
            'href="/help#password">パスワードをお忘れですか?',
        ):
            assert needle in page
        status, _, headers = await login(portal, s)
        assert (status, headers["Location"]) == (303, "/")
        cookie = next(v for v in headers.getall("Set-Cookie") if v.startswith(SESSION_COOKIE + "="))
        for attribute in ("Secure", "HttpOnly", "SameSite=Lax", "Path=/"):
            assert attribute in cookie
        status, page, headers = await get(portal, s, "/")
    assert status == 200
    for needle in (
        '<a id="menu-issue" href="/issue">証明書発行</a>',
        '<a id="menu-certificates" href="/certificates">証明書情報の確認 / 失効</a>',
        '<a id="menu-ca" href="/ca">認証局証明書のインストール</a>',
        '<a id="menu-help" href="/help">ヘルプ</a>',
        'action="/logout"',
        'id="logout"',
    ):
        assert needle in page
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "Server" not in headers  # aiohttp's "Python/x aiohttp/y" is removed
    assert headers["Strict-Transport-Security"] == "max-age=31536000"
    assert [e.user_id for e in portal.events("login")] == ["LC000001"]


async def test_wrong_password_is_refused_with_bad_credentials(portal: Portal) -> None:
    async with portal.client() as s:
        status, page, _ = await login(portal, s, password="wrong password!")
        assert status == 401
        assert '<code id="reason">bad_credentials</code>' in page
        status, _, _ = await get(portal, s, "/")
    assert status == 303
    assert [e.reason for e in portal.events("login_refused")] == ["bad_credentials"]


async def test_unknown_user_is_refused_like_a_wrong_password(portal: Portal) -> None:
    async with portal.client() as s:
        status, page, _ = await login(portal, s, "NOBODY01")
    assert status == 401 and "bad_credentials" in page


async def test_lockout_after_repeated_failures_then_unlock(portal: Portal) -> None:
    async with portal.client() as s:
        for _ in range(3):
            status, _, _ = await login(portal, s, password="wrong password!")
            assert status == 401
        status, page, _ = await login(portal, s)  # the right password, but locked
        assert status == 403 and '<code id="reason">account_locked</code>' in page
        assert [e.user_id for e in portal.events("account_locked")] == ["LC000001"]
        portal.session_clock.offset = dt.timedelta(minutes=31)
        status, _, headers = await login(portal, s)
    assert (status, headers["Location"]) == (303, "/")


async def test_login_without_the_form_token_is_refused_and_not_counted(portal: Portal) -> None:
    async with portal.client() as s:
        status, page, _ = await login(portal, s, csrf="")
        assert status == 403 and "csrf_failed" in page
        status, page, _ = await login(portal, s, csrf="1.forged")
        assert status == 403 and "csrf_failed" in page
    with UserStore(portal.config.users.database) as store:
        assert store.user_failures("LC000001", dt.datetime.now(UTC), dt.timedelta(hours=1)) == 0


async def test_temporary_password_forces_a_change_first(portal: Portal) -> None:
    add_user(portal.config, "LC000009", password="temporary-pass-1", must_change=True)
    async with portal.client() as s:
        status, _, headers = await login(portal, s, "LC000009", "temporary-pass-1")
        assert (status, headers["Location"]) == (303, "/password")
        status, _, headers = await get(portal, s, "/")
        assert (status, headers["Location"]) == (303, "/password")
        status, _, headers = await get(portal, s, "/issue")
        assert (status, headers["Location"]) == (303, "/password")
        status, page, _ = await get(portal, s, "/password")
        assert status == 200
        for needle in (
            'id="old_password"',
            'id="new_password"',
            'id="new_password_again"',
            'id="change"',
            'id="forced"',
        ):
            assert needle in page
        form = {"csrf": csrf_of(page), "old_password": "temporary-pass-1", "new_password": "short"}
        status, _, _ = await post(portal, s, "/password", {**form, "new_password_again": "short"})
        assert status == 400
        new = "a brand new passphrase"
        form = {**form, "new_password": new, "new_password_again": new}
        status, _, headers = await post(portal, s, "/password", form)
        assert (status, headers["Location"]) == (303, "/")
        status, _, _ = await get(portal, s, "/")
        assert status == 200
    async with portal.client() as s:
        status, _, _ = await login(portal, s, "LC000009", "temporary-pass-1")
        assert status == 401
        status, _, headers = await login(portal, s, "LC000009", new)
        assert (status, headers["Location"]) == (303, "/")
    assert [e.user_id for e in portal.events("password_changed")] == ["LC000009"]


async def test_logout_ends_the_session(portal: Portal) -> None:
    async with await logged_in(portal) as s:
        status, page, _ = await post(portal, s, "/logout", {"csrf": await session_csrf(portal, s)})
        assert status == 200 and "ログアウトしました" in page
        status, _, headers = await get(portal, s, "/")
    assert (status, headers["Location"]) == (303, "/login?next=/")
    assert [e.user_id for e in portal.events("logout")] == ["LC000001"]


async def test_idle_session_expires(portal: Portal) -> None:
    async with await logged_in(portal) as s:
        portal.session_clock.offset = dt.timedelta(minutes=29)
        assert (await get(portal, s, "/"))[0] == 200
        portal.session_clock.offset = dt.timedelta(minutes=29 + 31)
        status, _, headers = await get(portal, s, "/")
    assert (status, headers["Location"]) == (303, "/login?next=/")
    assert [e.reason for e in portal.events("session_ended")] == ["session_expired"]


async def test_a_gateway_session_is_not_a_portal_session(portal: Portal) -> None:
    """A session bound to a certificate (the gateway's) opens nothing here, even under the portal's cookie."""
    key = load_session_key(portal.config.session.secret_file)
    with SessionStore(portal.config.users.database) as store:
        gateway_id, _ = store.create("LC000001", "ab" * 32, ["tdnet"], False, dt.datetime.now(UTC))
        portal_id, _ = store.create("LC000001", "", ["portal"], False, dt.datetime.now(UTC))
    async with portal.client() as s:
        s.cookie_jar.update_cookies({SESSION_COOKIE: sign(gateway_id, key)})
        status, _, headers = await get(portal, s, "/")
        assert (status, headers["Location"]) == (303, "/login?next=/")
    async with portal.client() as s:
        s.cookie_jar.update_cookies({GATEWAY_COOKIE: sign(portal_id, key)})
        assert (await get(portal, s, "/"))[0] == 303
    async with portal.client() as s:
        s.cookie_jar.update_cookies({SESSION_COOKIE: sign(portal_id, key)})
        assert (await get(portal, s, "/"))[0] == 200


# -- issuing ----------------------------------------------------------------------------


async def test_issue_then_download_once_a_pkcs12_with_key_cert_and_ca(portal: Portal) -> None:
    async with await logged_in(portal) as s:
        status, page, _ = await get(portal, s, "/issue")
        assert status == 200
        for needle in ('id="windows_login"', 'id="p12_password"', 'id="apply">申請 / Apply<', 'action="/issue"'):
            assert needle in page
        assert 'id="duplicate-notice"' not in page
        status, page = await issue(portal, s)
        assert status == 200 and "<h1>証明書を発行しました" in page
        link = download_link(page)
        async with s.get(portal.url(link)) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/x-pkcs12"
            assert r.headers["Content-Disposition"] == 'attachment; filename="LC000001.p12"'
            assert r.headers["Cache-Control"] == "no-store"
            data = await r.read()
        async with s.get(portal.url(link)) as r:
            assert r.status == 404
    key, cert, chain = pkcs12.load_key_and_certificates(data, None)
    assert key is not None and cert is not None
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "LC000001"
    assert cert.issuer == portal.ca.certificate.subject
    assert chain == [portal.ca.certificate]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
    # The key was sent once and kept nowhere: not on disk, not in memory, not in the audit.
    key_der = key.private_bytes(der, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    for path in portal.directory.rglob("*"):
        if path.is_file():
            assert key_der not in path.read_bytes(), path
    issued = portal.events("certificate_issued")
    assert [(e.user_id, e.cert_serial) for e in issued] == [("LC000001", serial_hex(cert.serial_number))]
    assert all("/download/" not in e.path or e.path == "/download/***" for e in portal.audit.events)
    assert portal.ca.get(cert.serial_number).requested_by == "portal:LC000001"


async def test_issue_records_the_windows_login_and_uses_the_ca_clock(portal: Portal) -> None:
    portal.clock.offset = -dt.timedelta(days=2)
    async with await logged_in(portal) as s:
        data = await issue_and_download(portal, s, windows_login="CORP\\tanaka")
    _, cert, _ = pkcs12.load_key_and_certificates(data, None)
    assert cert is not None
    assert abs(cert.not_valid_before_utc - (dt.datetime.now(UTC) - dt.timedelta(days=2))) < dt.timedelta(minutes=1)
    record = portal.ca.get(cert.serial_number)
    assert record.windows_login == "CORP\\tanaka"


async def test_optional_file_password_protects_the_pkcs12(portal: Portal) -> None:
    async with await logged_in(portal) as s:
        data = await issue_and_download(portal, s, p12_password="my file secret")
    with pytest.raises((ValueError, TypeError)):
        pkcs12.load_key_and_certificates(data, None)
    key, cert, _ = pkcs12.load_key_and_certificates(data, b"my file secret")
    assert key is not None and cert is not None


async def test_issue_page_offers_the_three_download_formats_default_checked(portal: Portal) -> None:
    async with await logged_in(portal) as s:
        status, page, _ = await get(portal, s, "/issue")
    assert status == 200
    assert '<input type="radio" name="p12_format" id="p12_format_default" value="default" checked>' in page
    for fmt in ("password", "legacy"):
        assert f'<input type="radio" name="p12_format" id="p12_format_{fmt}" value="{fmt}">' in page
    for advice in ("Windows 10/11", "AES-256", "Windows 10 バージョン 1709 より前", "before 10 version 1709"):
        assert advice in page


@pytest.mark.parametrize(
    ("fmt", "password", "mac", "encryption"),
    [
        ("default", "", "sha1", "pbeWithSHA1And3-KeyTripleDES-CBC"),
        ("password", "my file secret", "sha256", "AES-256-CBC"),
        ("legacy", "my file secret", "sha1", "pbeWithSHA1And3-KeyTripleDES-CBC"),
    ],
)
async def test_each_download_format_is_issued_and_audited_by_name(
    portal: Portal, tmp_path: Path, fmt: str, password: str, mac: str, encryption: str
) -> None:
    async with await logged_in(portal) as s:
        status, page = await issue(portal, s, p12_format=fmt, p12_password=password)
        assert status == 200, page
        assert 'id="p12-format"' in page
        async with s.get(portal.url(download_link(page))) as r:
            data = await r.read()
    key, cert, chain = pkcs12.load_key_and_certificates(data, password.encode() or None)
    assert key is not None and cert is not None and chain == [portal.ca.certificate]
    p12_file = tmp_path / "download.p12"
    p12_file.write_bytes(data)
    info = subprocess.run(
        ["openssl", "pkcs12", "-info", "-nokeys", "-in", str(p12_file), "-passin", f"pass:{password}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert info.returncode == 0, info.stderr
    assert f"MAC: {mac}" in info.stderr + info.stdout and encryption in info.stderr + info.stdout
    [event] = portal.events("certificate_issued")
    assert event.detail == f"pkcs12 format {fmt}"
    assert not password or all(password not in str(e) for e in portal.audit.events)


@pytest.mark.parametrize(
    ("fmt", "password", "ja", "en"),
    [
        ("password", "", "この形式にはパスワードが必要です", "this format needs a password"),
        ("legacy", "", "この形式にはパスワードが必要です", "this format needs a password"),
        ("password", "short", "8 文字以上", "at least 8 characters"),
        ("default", "a password", "標準の形式はパスワードなしです", "the default format has no password"),
        ("pfx-rc2", "", "入力内容を確認してください", "unknown download format"),
    ],
)
async def test_a_password_that_does_not_fit_the_format_is_refused_on_the_form(
    portal: Portal, fmt: str, password: str, ja: str, en: str
) -> None:
    async with await logged_in(portal) as s:
        status, page = await issue(portal, s, p12_format=fmt, p12_password=password)
    assert status == 400
    assert 'id="error" role="alert"' in page and ja in page and en in page
    assert 'action="/issue"' in page  # the form again, to correct
    assert portal.ca.list(user="LC000001") == []  # nothing was issued
    assert portal.events("certificate_issued") == []


async def test_download_is_for_its_user_only_and_expires(portal: Portal) -> None:
    async with await logged_in(portal, "LC000001") as s1, await logged_in(portal, "LC000002") as s2:
        _, page = await issue(portal, s1)
        link = download_link(page)
        async with s2.get(portal.url(link)) as r:
            assert r.status == 404  # another user's token
        portal.session_clock.offset = dt.timedelta(minutes=11)
        await login(portal, s1)  # the session's idle limit is not what this test is about
        async with s1.get(portal.url(link)) as r:
            assert r.status == 404  # expired
        portal.session_clock.offset = dt.timedelta()
        _, page = await issue(portal, s2)
        async with s2.get(portal.url(download_link(page))) as r:
            assert r.status == 200  # the twin: fresh and own


async def test_second_certificate_is_a_duplicate_error_409(portal: Portal) -> None:
    async with await logged_in(portal) as s:
        assert (await issue(portal, s))[0] == 200
        status, page = await issue(portal, s)
        assert status == 409
        assert re.search(r"<h1[^>]*>証明書重複エラー", page)
        assert "既に有効な証明書が発行されています" in page
        assert "失効してから発行してください" in page
        assert 'href="/certificates"' in page
        _, page, _ = await get(portal, s, "/issue")
        assert 'id="duplicate-notice"' in page
    refused = portal.events("issuance_refused")
    assert [(e.user_id, e.reason) for e in refused] == [("LC000001", Reason.CERTIFICATE_DUPLICATE)]


async def test_renewal_window_allows_a_second_certificate_only_near_expiry(portal: Portal) -> None:
    async with await logged_in(portal, "LC000001") as s:
        portal.clock.offset = -dt.timedelta(days=355)  # expires in 10 days
        assert (await issue(portal, s))[0] == 200
        portal.clock.offset = dt.timedelta()
        assert (await issue(portal, s))[0] == 200  # in the window
        assert (await issue(portal, s))[0] == 409  # the renewal itself is far from expiry
    async with await logged_in(portal, "LC000002") as s:
        portal.clock.offset = -dt.timedelta(days=334)  # expires in 31 days
        assert (await issue(portal, s))[0] == 200
        portal.clock.offset = dt.timedelta()
        status, page = await issue(portal, s)
        assert status == 409 and "証明書重複エラー" in page


# -- list, detail, revoke -------------------------------------------------------------------


async def test_list_shows_own_certificates_with_the_manuals_columns(portal: Portal) -> None:
    async with await logged_in(portal, "LC000002") as other:
        await issue(portal, other)
    async with await logged_in(portal) as s:
        portal.clock.offset = -dt.timedelta(days=400)
        await issue(portal, s)  # expired by now
        portal.clock.offset = -dt.timedelta(days=10)
        await issue(portal, s)
        portal.clock.offset = dt.timedelta()
        status, page, _ = await get(portal, s, "/certificates")  # the list at once, no blank 実行 step
        assert status == 200 and 'id="run" autofocus>実行 / Run<' in page and 'id="certificates"' in page
        assert len(serials_of(page)) == 2
        _, page, _ = await get(portal, s, "/certificates?run=1")
        revoked_serial = serials_of(page)[0]
        await revoke(portal, s, revoked_serial)
        await issue(portal, s)
        status, page, headers = await get(portal, s, "/certificates?run=1")
    assert status == 200 and headers["Cache-Control"] == "no-store"
    header = re.search(r"<thead><tr>(.*?)</tr></thead>", page)
    assert header is not None
    assert re.findall(r"<th>(.*?)</th>", header.group(1)) == [
        "No.",
        "ユーザID",
        "シリアル番号",
        "有効期限",
        "ステータス",
        "失効日",
    ]
    rows = re.findall(r'<tr class="certificate.*?</tr>', page, re.S)
    assert len(rows) == 3  # LC000002's certificate is not listed
    cells = [re.findall(r"<td class=\"(\w+)\">(.*?)</td>", row, re.S) for row in rows]
    table = [{k: re.sub(r"<[^>]+>", " ", v).split()[0] for k, v in row} for row in cells]
    assert [r["no"] for r in table] == ["1", "2", "3"]
    assert {r["user"] for r in table} == {"LC000001"}
    assert [r["status"] for r in table] == ["有効", "失効", "有効期限切れ"]
    assert table[1]["serial"] == revoked_serial
    assert all(re.fullmatch(r"[0-9A-F]+", r["serial"]) for r in table)
    revoked_at = re.findall(r'<td class="revoked">(.*?)</td>', page)
    assert revoked_at[0] == "-" and revoked_at[2] == "-"
    assert re.fullmatch(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d", revoked_at[1])
    assert revoked_at[1][:10] == dt.datetime.now(JST).strftime("%Y/%m/%d")
    expiries = re.findall(r'<td class="expiry">(.*?)</td>', page)
    assert expiries == sorted(expiries, reverse=True)


async def test_detail_of_own_certificate_and_404_for_anyone_elses(portal: Portal) -> None:
    async with await logged_in(portal, "LC000002") as other:
        await issue(portal, other)
        _, page, _ = await get(portal, other, "/certificates?run=1")
        others_serial = serials_of(page)[0]
    async with await logged_in(portal) as s:
        await issue(portal, s)
        _, page, _ = await get(portal, s, "/certificates?run=1")
        own = serials_of(page)[0]
        status, page, _ = await get(portal, s, f"/certificates/{own}")
        assert status == 200
        assert 'id="close" href="/certificates">閉じる / Close<' in page and 'id="revoke">失効する / Revoke<' in page
        status, page, _ = await get(portal, s, f"/certificates/{others_serial}")
        assert status == 404 and 'id="revoke"' not in page
        assert (await get(portal, s, "/certificates/NOT-HEX"))[0] == 404
        form = {"csrf": await session_csrf(portal, s)}
        status, _, _ = await post(portal, s, f"/certificates/{others_serial}/revoke/confirm", form)
        assert status == 404
    assert portal.ca.get(int(others_serial, 16)).revoked_at is None


async def test_revoke_in_three_steps_updates_list_and_crl(portal: Portal) -> None:
    async with await logged_in(portal) as s:
        data = await issue_and_download(portal, s)
        _, cert, _ = pkcs12.load_key_and_certificates(data, None)
        assert cert is not None
        serial = serial_hex(cert.serial_number)
        done = await revoke(portal, s, serial)
        assert re.search(r'<h1 id="done">失効しました', done)
        _, page, _ = await get(portal, s, "/certificates?run=1")
        assert '<td class="status">失効' in page
        _, page, _ = await get(portal, s, f"/certificates/{serial}")
        assert 'id="revoke"' not in page
        # Revoked: a new certificate may be issued at once (reissue = revoke, then issue).
        assert (await issue(portal, s))[0] == 200
    crl = x509.load_der_x509_crl(portal.ca.crl_der_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert portal.ca.get(cert.serial_number).revoked_by == "portal:LC000001"
    revoked = portal.events("certificate_revoked")
    assert [(e.user_id, e.cert_serial) for e in revoked] == [("LC000001", serial)]
    assert len(portal.events("crl_published")) == 1


@pytest.mark.parametrize(
    "path",
    ["/issue", "/logout", "/password", "/certificates/{serial}/revoke", "/certificates/{serial}/revoke/confirm"],
)
@pytest.mark.parametrize("token", ["", "forged-token-value-0123456789"])
async def test_every_post_needs_the_session_token(portal: Portal, path: str, token: str) -> None:
    async with await logged_in(portal) as s:
        await issue(portal, s)
        serial = serial_hex(portal.ca.list(user="LC000001")[0].serial)
        status, page, _ = await post(portal, s, path.format(serial=serial), {"csrf": token, "old_password": PASSWORD})
        assert status == 403 and '<code id="reason">csrf_failed</code>' in page
        assert (await get(portal, s, "/"))[0] == 200  # still logged in
    records = portal.ca.list(user="LC000001")
    assert len(records) == 1 and records[0].revoked_at is None
    assert "csrf_failed" in [e.reason for e in portal.audit.events]


# -- public files ------------------------------------------------------------------------------


async def test_crl_is_served_with_validators_and_revalidates_with_304(portal: Portal) -> None:
    async with portal.client() as s:
        async with s.get(portal.url("/crl")) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/pkix-crl"
            body, etag, modified = await r.read(), r.headers["ETag"], r.headers["Last-Modified"]
            max_age = int(re.fullmatch(r"public, max-age=(\d+)", r.headers["Cache-Control"]).group(1))  # type: ignore[union-attr]
        crl = x509.load_der_x509_crl(body)
        assert crl.is_signature_valid(portal.ca.certificate.public_key())  # type: ignore[arg-type]
        assert modified == crl.last_update_utc.strftime("%a, %d %b %Y %H:%M:%S GMT")
        assert 0 < max_age <= 600
        async with s.get(portal.url("/crl"), headers={"If-None-Match": etag}) as r:
            assert r.status == 304 and await r.read() == b"" and r.headers["ETag"] == etag
        async with s.get(portal.url("/crl"), headers={"If-Modified-Since": modified}) as r:
            assert r.status == 304
        async with s.get(portal.url("/crl"), headers={"If-None-Match": '"other"', "If-Modified-Since": modified}) as r:
            assert r.status == 200  # If-None-Match wins
        portal.ca.publish_crl(dt.datetime.now(UTC) + dt.timedelta(seconds=2))
        async with s.get(portal.url("/crl"), headers={"If-None-Match": etag}) as r:
            assert r.status == 200 and r.headers["ETag"] != etag
        async with s.get(portal.url("/crl.pem")) as r:
            assert r.status == 200 and "ETag" in r.headers
            pem = x509.load_pem_x509_crl(await r.read())
    assert pem.last_update_utc > crl.last_update_utc


async def test_ca_certificate_downloads_and_pages_need_no_login(portal: Portal) -> None:
    async with portal.client() as s:
        async with s.get(portal.url("/ca.der")) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/x-x509-ca-cert"
            assert "attachment" in r.headers["Content-Disposition"]
            assert x509.load_der_x509_certificate(await r.read()) == portal.ca.certificate
        async with s.get(portal.url("/ca.pem")) as r:
            assert r.status == 200
            assert x509.load_pem_x509_certificate(await r.read()) == portal.ca.certificate
        status, page, _ = await get(portal, s, "/ca")
        assert status == 200 and 'id="ca-der" href="/ca.der"' in page and 'id="ca-pem" href="/ca.pem"' in page
        status, page, headers = await get(portal, s, "/help")
        assert status == 200 and headers["X-Frame-Options"] == "DENY"
        for needle in ('id="password"', "仮パスワード", "再起動", "30 日前", "失効してから"):
            assert needle in page
        status, _, _ = await get(portal, s, "/issue")
        assert status == 303  # the twin: logged-in pages do need a login


async def test_login_cookie_is_the_portals_own(portal: Portal) -> None:
    async with portal.client() as s, s.get(portal.url("/login")) as r:
        cookies = r.headers.getall("Set-Cookie")
    assert any(c.startswith(LOGIN_CSRF_COOKIE + "=") for c in cookies)
    assert not any(c.startswith("__Host-gw_") for c in cookies)


# -- the CRL schedule -----------------------------------------------------------------------------


async def test_scheduler_resigns_the_crl_only_when_due(portal: Portal) -> None:
    clock = Clock()
    publisher = CrlPublisher(portal.ca, portal.audit, clock=clock)
    before = portal.ca.last_crl()
    assert before is not None
    assert await publisher.step() is None  # fresh: nothing to do
    clock.offset = dt.timedelta(hours=17)  # 7 of 24 hours left: under a third
    info = await publisher.step()
    assert info is not None and info.number == before.number + 1
    crl = x509.load_der_x509_crl(portal.ca.crl_der_path.read_bytes())
    assert crl.next_update_utc - dt.datetime.now(UTC) > dt.timedelta(hours=40)
    assert await publisher.step() is None
    assert [e.event for e in portal.audit.events] == ["crl_published"]


async def test_running_portal_resigns_an_expired_crl_on_its_own(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", now=CA_BORN)  # its CRL ran out long ago
    config = write_portal_config(tmp_path, ca)
    audit = ListAudit()
    runner, _ = await start_portal(config, audit=audit, crl_interval=0.05)
    try:
        for _ in range(100):
            if audit.events:
                break
            await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()
    crl = x509.load_der_x509_crl(ca.crl_der_path.read_bytes())
    assert crl.next_update_utc > dt.datetime.now(UTC)
    assert [e.event for e in audit.events] == ["crl_published"]

"""Login over real TLS: user ID + password + certificate, sessions pinned to the certificate."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.access.accounts import MAX_FORM_BYTES
from gateway.access.login import LoginAccess
from gateway.access.passwords import hash_password
from gateway.access.sessions import SessionStore, unsign
from gateway.access.users import UserStore
from gateway.certs.files import ThrowawayPki
from gateway.config import Config
from tests.harness import Harness, start_harness

PASSWORD = "correct horse battery"


class Clock:
    """A movable clock shared by the gateway and the test."""

    def __init__(self) -> None:
        self.offset = dt.timedelta()

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset


def add_user(
    h: Harness,
    user_id: str,
    systems: tuple[str, ...] = ("tdnet", "j-iriss", "clearing"),
    *,
    password: str = PASSWORD,
    must_change: bool = False,
) -> None:
    with UserStore(h.config.users.database) as store:
        store.add_user(
            user_id, hash_password(password), systems, now=dt.datetime.now(dt.UTC), must_change_password=must_change
        )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def gw(tmp_path: Path, pki: ThrowawayPki, clock: Clock) -> Harness:  # type: ignore[misc]
    h = await start_harness(tmp_path, pki, login_mode="gateway", access_factory=LoginAccess, clock=clock)
    add_user(h, "LC000001")
    add_user(h, "LC000002", ("tdnet",))
    yield h
    await h.close()


@pytest.fixture
async def gw_access(tmp_path: Path, pki: ThrowawayPki, clock: Clock) -> tuple[Harness, LoginAccess]:  # type: ignore[misc]
    """The gateway of ``gw`` and its worker's LoginAccess (to reach its cache and its writer store)."""
    made: list[LoginAccess] = []

    def factory(config: Config, audit: Any) -> LoginAccess:
        made.append(LoginAccess(config, audit))
        return made[-1]

    h = await start_harness(tmp_path, pki, login_mode="gateway", access_factory=factory, clock=clock)
    add_user(h, "LC000001")
    yield h, made[0]
    await h.close()


async def login(
    h: Harness,
    s: aiohttp.ClientSession,
    user_id: str = "LC000001",
    password: str = PASSWORD,
    next_path: str = "",
    csrf: str | None = None,
) -> aiohttp.ClientResponse:
    async with s.get(h.url("/_gateway/login")) as r:
        assert r.status == 200
        page = await r.text()
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token
    form = {
        "user_id": user_id,
        "password": password,
        "csrf": token.group(1) if csrf is None else csrf,
        "next": next_path,
    }
    async with s.post(h.url("/_gateway/login"), data=form, allow_redirects=False, headers={"Accept": "text/html"}) as r:
        await r.read()
        return r


async def fetch_json(h: Harness, s: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
    async with s.get(h.url(path), headers={"Accept": "application/json"}, allow_redirects=False) as r:
        return r.status, await r.json()


def reasons(h: Harness) -> list[str]:
    return [e.reason for e in h.audit.events]


async def test_full_login_reaches_backend_as_the_user(gw: Harness) -> None:
    async with gw.session() as s:
        async with s.get(gw.url("/onre/top?a=1"), allow_redirects=False, headers={"Accept": "text/html"}) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/_gateway/login?next=/onre/top%3Fa%3D1"
        r = await login(gw, s, next_path="/onre/top?a=1")
        assert r.status == 303 and r.headers["Location"] == "/onre/top?a=1"
        cookie = next(v for v in r.headers.getall("Set-Cookie") if v.startswith("__Host-gw_session="))
        for attribute in ("Secure", "HttpOnly", "SameSite=Lax", "Path=/"):
            assert attribute in cookie
        assert "Domain" not in cookie
        status, body = await fetch_json(gw, s, "/onre/top")
    assert status == 200
    assert body["identity"]["X-Authenticated-User"] == "LC000001"
    assert "__Host-gw" not in body["headers"].get("Cookie", "")  # the backend never sees our session
    assert any(e.event == "login" and e.user_id == "LC000001" for e in gw.audit.events)


async def test_login_page_shows_the_presented_certificate(gw: Harness) -> None:
    async with gw.session() as s, s.get(gw.url("/_gateway/login")) as r:
        page = await r.text()
    assert "ユーザID" in page and "パスワード" in page and "ログイン" in page
    assert 'id="cert-subject">LC000001<' in page


async def test_request_without_session_is_401_for_api_clients(gw: Harness) -> None:
    async with gw.session() as s:
        status, body = await fetch_json(gw, s, "/onre/x")
    assert (status, body["error"]) == (401, "login_required")


@pytest.mark.parametrize("typed", ["lc000001", "LC000001 ", " LC000001", "LC000002", "ＬＣ000001"])
async def test_user_id_must_equal_certificate_subject_exactly(gw: Harness, typed: str) -> None:
    async with gw.session("LC000001") as s:
        r = await login(gw, s, user_id=typed)
        assert r.status == 403
        status, _ = await fetch_json(gw, s, "/onre/x")
    assert status == 401
    assert reasons(gw).count("subject_mismatch") == 1


async def test_subject_mismatch_page_says_the_certificate_is_not_this_users(gw: Harness) -> None:
    async with gw.session("LC000001") as s:
        await s.get(gw.url("/_gateway/login"))
        async with s.get(gw.url("/_gateway/login")) as r:
            token = re.search(r'name="csrf" value="([^"]+)"', await r.text()).group(1)  # type: ignore[union-attr]
        async with s.post(
            gw.url("/_gateway/login"), data={"user_id": "LC000002", "password": PASSWORD, "csrf": token}
        ) as r:
            page = await r.text()
    assert "選択された証明書はこのユーザIDのものではありません" in page
    assert "subject_mismatch" in page


async def test_wrong_password_and_unknown_user_look_the_same(gw: Harness, pki: ThrowawayPki, tmp_path: Path) -> None:
    cert, key, _ = gw.issue("LC999999", name="ghost")
    async with gw.session("LC000001") as s:
        wrong = await login(gw, s, password="nope")
    async with gw.session(cert=cert, key=key) as s:
        unknown = await login(gw, s, user_id="LC999999")
    assert wrong.status == unknown.status == 401
    assert reasons(gw).count("bad_credentials") == 2


async def test_lockout_after_five_failures_and_its_expiry(gw: Harness, clock: Clock) -> None:
    async with gw.session() as s:
        for _ in range(5):
            assert (await login(gw, s, password="wrong")).status == 401
        locked = await login(gw, s)  # the right password no longer helps
        assert locked.status == 403
        assert "account_locked" in reasons(gw)
        assert any(e.event == "account_locked" for e in gw.audit.events)
        clock.offset = dt.timedelta(minutes=31)
        ok = await login(gw, s)
        assert ok.status == 303


async def test_lockout_of_unknown_user_is_indistinguishable(gw: Harness) -> None:
    cert, key, _ = gw.issue("LC777777", name="nobody")
    async with gw.session(cert=cert, key=key) as s:
        statuses = [(await login(gw, s, user_id="LC777777", password="x")).status for _ in range(6)]
    assert statuses == [401] * 5 + [403]
    assert reasons(gw)[-1] == "account_locked"


async def test_session_replayed_with_another_valid_certificate_is_refused(gw: Harness) -> None:
    async with gw.session("LC000001") as s:
        await login(gw, s)
        cookies = s.cookie_jar.filter_cookies(URL(gw.url("/")))
        stolen = cookies["__Host-gw_session"].value
    async with gw.session("LC000002") as thief:
        thief.cookie_jar.update_cookies({"__Host-gw_session": stolen}, URL(gw.url("/")))
        status, body = await fetch_json(gw, thief, "/onre/x")
    assert (status, body["error"]) == (403, "session_certificate_mismatch")
    # The session is ended for its owner too (the cookie leaked).
    async with gw.session("LC000001") as s:
        s.cookie_jar.update_cookies({"__Host-gw_session": stolen}, URL(gw.url("/")))
        status, body = await fetch_json(gw, s, "/onre/x")
    assert (status, body["error"]) == (401, "login_required")


async def test_revocation_during_a_session_ends_it(gw: Harness) -> None:
    async with gw.session("LC000001") as s:
        await login(gw, s)
        assert (await fetch_json(gw, s, "/onre/x"))[0] == 200
        await gw.publish_crl([gw.pki.clients["LC000001"].certificate.serial_number])
        status, body = await fetch_json(gw, s, "/onre/x")
    assert (status, body["error"]) == (403, "certificate_revoked")
    ended = [e for e in gw.audit.events if e.event == "session_ended"]
    assert ended and ended[0].reason == "certificate_revoked" and ended[0].user_id == "LC000001"


async def test_session_expires_when_idle(gw: Harness, clock: Clock) -> None:
    async with gw.session() as s:
        await login(gw, s)
        clock.offset = dt.timedelta(minutes=31)
        status, body = await fetch_json(gw, s, "/onre/x")
    assert (status, body["error"]) == (401, "session_expired")


async def test_per_system_authorisation(gw: Harness) -> None:
    async with gw.session("LC000002") as s:
        await login(gw, s, user_id="LC000002")
        assert (await fetch_json(gw, s, "/onre/x"))[0] == 200
        status, body = await fetch_json(gw, s, "/nt/x")
    assert (status, body["error"]) == (403, "not_authorized")


@pytest.mark.parametrize("evil", ["//evil.example/", "https://evil.example/", "/\\evil.example", "javascript:alert(1)"])
async def test_open_redirects_in_next_are_ignored(gw: Harness, evil: str) -> None:
    async with gw.session() as s:
        r = await login(gw, s, next_path=evil)
    assert r.status == 303 and r.headers["Location"] == "/onre/"


async def test_csrf_missing_or_wrong_is_refused(gw: Harness) -> None:
    async with gw.session() as s:
        assert (await login(gw, s, csrf="")).status == 403
        assert (await login(gw, s, csrf="123.forged")).status == 403
        assert (await login(gw, s)).status == 303
    assert reasons(gw).count("csrf_failed") == 2


async def test_forced_password_change_after_reset(gw: Harness) -> None:
    add_user(gw, "LC000003", password="temporary-1234", must_change=True)
    cert, key, _ = gw.issue("LC000003", name="lc3")
    async with gw.session(cert=cert, key=key) as s:
        r = await login(gw, s, user_id="LC000003", password="temporary-1234")
        assert r.headers["Location"] == "/_gateway/password"
        status, body = await fetch_json(gw, s, "/onre/x")
        assert (status, body["error"]) == (403, "password_change_required")
        async with s.get(gw.url("/_gateway/password")) as page:
            token = re.search(r'name="csrf" value="([^"]+)"', await page.text()).group(1)  # type: ignore[union-attr]
        short = {
            "csrf": token,
            "old_password": "temporary-1234",
            "new_password": "short",
            "new_password_again": "short",
        }
        async with s.post(gw.url("/_gateway/password"), data=short, allow_redirects=False) as r:
            assert r.status == 400
            assert "12文字以上" in await r.text()
        good = {
            "csrf": token,
            "old_password": "temporary-1234",
            "new_password": "a much better one",
            "new_password_again": "a much better one",
        }
        async with s.post(gw.url("/_gateway/password"), data=good, allow_redirects=False) as r:
            assert r.status == 303
        assert (await fetch_json(gw, s, "/onre/x"))[0] == 200
    async with gw.session(cert=cert, key=key) as s:
        assert (await login(gw, s, user_id="LC000003", password="a much better one")).status == 303


async def test_logout_is_seen_by_another_worker(gw: Harness, tmp_path: Path) -> None:
    from gateway.server import GatewayWorker

    other = GatewayWorker(gw.config, gw.audit, worker=1, serve_admin=False, access_factory=LoginAccess)
    await other.start()
    try:
        async with gw.session() as s:
            await login(gw, s)
            other_url = gw.url("/onre/x").replace(str(gw.worker.port), str(other.port))
            async with s.get(other_url, headers={"Accept": "application/json"}) as r:
                assert r.status == 200  # the session is valid in the other worker
            async with s.get(gw.url("/_gateway/logout")) as r:
                token = re.search(r'name="csrf" value="([^"]+)"', await r.text()).group(1)  # type: ignore[union-attr]
            async with s.post(gw.url("/_gateway/logout"), data={"csrf": token}) as r:
                assert r.status == 200
                assert "ログアウトしました" in await r.text()
            s.cookie_jar.clear()
        async with gw.session() as s:
            # Replay the old cookie on the other worker: gone there too.
            s.cookie_jar.update_cookies({"__Host-gw_session": "x"}, URL(other_url))
            async with s.get(other_url, headers={"Accept": "application/json"}) as r:
                assert r.status == 401
    finally:
        await other.stop()
    assert any(e.event == "logout" for e in gw.audit.events)


async def test_logout_cookie_replay_after_logout_fails(gw: Harness) -> None:
    async with gw.session() as s:
        await login(gw, s)
        cookie = s.cookie_jar.filter_cookies(URL(gw.url("/")))["__Host-gw_session"].value
        async with s.get(gw.url("/_gateway/logout")) as r:
            token = re.search(r'name="csrf" value="([^"]+)"', await r.text()).group(1)  # type: ignore[union-attr]
        async with s.post(gw.url("/_gateway/logout"), data={"csrf": token}) as r:
            assert r.status == 200
    async with gw.session() as s:
        s.cookie_jar.update_cookies({"__Host-gw_session": cookie}, URL(gw.url("/")))
        status, body = await fetch_json(gw, s, "/onre/x")
    assert (status, body["error"]) == (401, "login_required")


async def test_logout_without_token_is_csrf_failed(gw: Harness) -> None:
    async with gw.session() as s:
        await login(gw, s)
        async with s.post(gw.url("/_gateway/logout"), data={}, headers={"Accept": "application/json"}) as r:
            assert r.status == 403
            assert (await r.json())["error"] == "csrf_failed"
        assert (await fetch_json(gw, s, "/onre/x"))[0] == 200


async def test_expiry_soon_notice_after_login(tmp_path: Path, pki: ThrowawayPki) -> None:
    h = await start_harness(tmp_path, pki, login_mode="gateway", access_factory=LoginAccess)
    try:
        add_user(h, "LC000001")
        cert, key, _ = h.issue("LC000001", not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=355), name="soon")
        async with h.session(cert=cert, key=key) as s:
            r = await login(h, s, next_path="/onre/x")
            assert r.headers["Location"] == "/_gateway/notice?next=/onre/x"
            async with s.get(h.url("/_gateway/notice?next=/onre/x")) as page:
                assert "証明書の有効期限が近づいています" in await page.text()
    finally:
        await h.close()


# --- passthrough -----------------------------------------------------------------


async def test_passthrough_login_forwards_only_for_the_certificate_user(tmp_path: Path, pki: ThrowawayPki) -> None:
    h = await start_harness(tmp_path, pki, login_mode="passthrough", access_factory=LoginAccess)
    try:
        async with h.session("LC000001") as s:
            async with s.post(
                h.url("/onre/login"), data={"userId": "LC000001", "pw": "x"}, headers={"Accept": "application/json"}
            ) as r:
                assert r.status == 200
                body = await r.json()
                assert body["body_bytes"] > 0
                assert body["identity"]["X-Client-Cert-Serial"]
            async with s.post(
                h.url("/onre/login"), data={"userId": "LC000002", "pw": "x"}, headers={"Accept": "application/json"}
            ) as r:
                assert r.status == 403
                assert (await r.json())["error"] == "subject_mismatch"
            async with s.get(h.url("/onre/other"), headers={"Accept": "application/json"}) as r:
                assert r.status == 200  # other pages pass with the certificate identity
    finally:
        await h.close()


@pytest.mark.parametrize(
    ("method", "path", "form"),
    [
        ("POST", "/onre/login;jsessionid=x", {"userId": "LC000002"}),
        ("POST", "/onre/login/", {"userId": "LC000002"}),
        ("POST", "/onre/LOGIN", {"userId": "LC000002"}),
        ("POST", "/onre/login?userId=LC000002", {"userId": "LC000001"}),
        ("POST", "/onre/login", [("userId", "LC000001"), ("userId", "LC000002")]),
        ("POST", "/onre/login", {"password": "no user field"}),
        ("GET", "/onre/login?userId=LC000002", None),
        ("GET", "/onre/other?userId=LC000002", None),
    ],
    ids=["path-params", "trailing-slash", "case", "query-first", "duplicate", "missing", "get-login", "get-other"],
)
async def test_passthrough_binding_cannot_be_sidestepped(
    tmp_path: Path, pki: ThrowawayPki, method: str, path: str, form: Any
) -> None:
    h = await start_harness(tmp_path, pki, login_mode="passthrough", access_factory=LoginAccess)
    try:
        async with h.session("LC000001") as s:
            async with s.request(method, h.url(path), data=form, headers={"Accept": "application/json"}) as r:
                assert r.status == 403, await r.text()
                assert (await r.json())["error"] == "subject_mismatch"
            async with s.get(h.url("/onre/other?userId=LC000001"), headers={"Accept": "application/json"}) as r:
                assert r.status == 200  # the accept twin: the certificate's own user ID passes
    finally:
        await h.close()


def multipart(fields: list[tuple[str, str]], boundary: str = "b0undary") -> tuple[bytes, str]:
    """A multipart/form-data body as browsers (and ``curl -F``) send it."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n' for name, value in fields
    ]
    return ("".join(parts) + f"--{boundary}--\r\n").encode(), f"multipart/form-data; boundary={boundary}"


LOGIN_FORMS = {
    "multipart": multipart([("userId", "{user}"), ("password", "x")]),
    "multipart-charset": (
        multipart([("userId", "{user}"), ("password", "x")])[0],
        'multipart/form-data; charset=UTF-8; boundary="b0undary"',
    ),
    "urlencoded": (b"userId={user}&password=x", "application/x-www-form-urlencoded"),
    "urlencoded-charset": (b"userId={user}&password=%82%A0", "application/x-www-form-urlencoded; charset=Shift_JIS"),
    "urlencoded-utf8": (b"password=%E3%81%82&userId={user}", "application/x-www-form-urlencoded;charset=utf-8"),
}


@pytest.mark.parametrize(("body", "content_type"), LOGIN_FORMS.values(), ids=LOGIN_FORMS.keys())
async def test_passthrough_login_reads_every_form_encoding(
    tmp_path: Path, pki: ThrowawayPki, body: bytes, content_type: str
) -> None:
    """The certificate's user ID is forwarded with the body intact; another user ID is refused and audited."""
    h = await start_harness(tmp_path, pki, login_mode="passthrough", access_factory=LoginAccess)
    try:
        async with h.session("LC000001") as s:
            for user, status in (("LC000001", 200), ("LC000002", 403)):
                data = body.replace(b"{user}", user.encode())
                headers = {"Content-Type": content_type, "Accept": "application/json"}
                async with s.post(h.url("/onre/login"), data=data, headers=headers) as r:
                    assert r.status == status, await r.text()
                    answer = await r.json()
                if status == 200:
                    assert answer["body_bytes"] == len(data)  # forwarded as sent, not re-encoded
                    assert answer["headers"]["Content-Type"] == content_type
                else:
                    assert answer["error"] == "subject_mismatch"
                    event = h.audit.events[-1]
                    assert (event.event, event.reason, event.support_id) == (
                        "login_refused",
                        "subject_mismatch",
                        answer["support_id"],
                    )
                    assert (event.user_id, event.cert_subject, event.client_ip) == ("LC000002", "LC000001", "127.0.0.1")
    finally:
        await h.close()


NOT_FORMS = {
    "json": (b'{"userId": "LC000001"}', "application/json"),
    "text-plain-form": (b"userId=LC000001\r\n", "text/plain"),
    "no-content-type": (b"userId=LC000001", None),
    "unknown-charset": (b"userId=LC000001", "application/x-www-form-urlencoded; charset=x-no-such"),
    "undecodable": (b"userId=LC000001&password=%FF", "application/x-www-form-urlencoded"),
    "no-boundary": (multipart([("userId", "LC000001")])[0], "multipart/form-data"),
    "wrong-boundary": (multipart([("userId", "LC000001")])[0], "multipart/form-data; boundary=other"),
    "name-star": (
        b"--b\r\nContent-Disposition: form-data; name=\"x\"; name*=UTF-8''userId\r\n\r\nLC000001\r\n--b--\r\n",
        "multipart/form-data; boundary=b",
    ),
    # A backend that ignores the declared charset (most do) would read "userId=LC000002" here,
    # while the charset gives the gateway "userId=LC000001": never read a form two ways.
    "utf-16-smuggling": (
        b"userId=LC000002&x=" + "&userId=LC000001".encode("utf-16-le"),
        "application/x-www-form-urlencoded; charset=utf-16-le",
    ),
    "utf-16-part": (
        b'--b\r\nContent-Disposition: form-data; name="userId"\r\nContent-Type: text/plain; charset=utf-16-le\r\n\r\n'
        + "LC000001".encode("utf-16-le")
        + b"\r\n--b--\r\n",
        "multipart/form-data; boundary=b",
    ),
    "transfer-encoded-part": (
        b'--b\r\nContent-Disposition: form-data; name="userId"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        b"TEMwMDAwMDE=\r\n--b--\r\n",
        "multipart/form-data; boundary=b",
    ),
}


@pytest.mark.parametrize(("body", "content_type"), NOT_FORMS.values(), ids=NOT_FORMS.keys())
async def test_passthrough_login_body_that_is_not_a_readable_form_is_bad_request(
    tmp_path: Path, pki: ThrowawayPki, body: bytes, content_type: str | None
) -> None:
    h = await start_harness(tmp_path, pki, login_mode="passthrough", access_factory=LoginAccess)
    try:
        async with h.session("LC000001") as s:
            headers = {"Accept": "application/json", **({"Content-Type": content_type} if content_type else {})}
            async with s.post(
                h.url("/onre/login"), data=body, headers=headers, skip_auto_headers=["Content-Type"]
            ) as r:
                assert r.status == 400, await r.text()
                answer = await r.json()
            assert answer["error"] == "bad_request"
            event = h.audit.events[-1]
            assert (event.reason, event.support_id, event.cert_subject) == (
                "bad_request",
                answer["support_id"],
                "LC000001",
            )
            assert event.detail.startswith("login body: ")
            # The twin: the same user ID as a form passes.
            twin = {"Accept": "application/json"}
            async with s.post(h.url("/onre/login"), data={"userId": "LC000001"}, headers=twin) as r:
                assert r.status == 200
    finally:
        await h.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_passthrough_login_body_over_the_form_limit_is_refused(
    tmp_path: Path, pki: ThrowawayPki, chunked: bool
) -> None:
    h = await start_harness(tmp_path, pki, login_mode="passthrough", access_factory=LoginAccess)
    try:
        big = b"userId=LC000001&pad=" + b"a" * (MAX_FORM_BYTES + 1)

        async def stream() -> Any:
            yield big

        async with h.session("LC000001") as s:
            headers = {"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"}
            async with s.post(h.url("/onre/login"), data=stream() if chunked else big, headers=headers) as r:
                assert r.status == 413, await r.text()
                assert (await r.json())["error"] == "payload_too_large"
            assert h.audit.events[-1].reason == "payload_too_large"
            just_fits = big[: MAX_FORM_BYTES - 1]
            async with s.post(h.url("/onre/login"), data=just_fits, headers=headers) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["body_bytes"] == len(just_fits)
    finally:
        await h.close()


async def test_logout_closes_an_open_websocket(gw: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.forward.proxy.WEBSOCKET_RECHECK_SECONDS", 0.1)
    async with gw.session() as s:
        await login(gw, s)
        async with s.ws_connect(gw.url("/onre/ws").replace("https", "wss")) as ws:
            await ws.send_str("hi")
            assert (await ws.receive(timeout=5)).data == "LC000001:hi"
            async with s.get(gw.url("/_gateway/logout")) as r:
                token = re.search(r'name="csrf" value="([^"]+)"', await r.text()).group(1)  # type: ignore[union-attr]
            async with s.post(gw.url("/_gateway/logout"), data={"csrf": token}) as r:
                assert r.status == 200
            msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION


# --- the per-worker session cache ---------------------------------------------------


def session_cookie(h: Harness, s: aiohttp.ClientSession) -> str:
    return s.cookie_jar.filter_cookies(URL(h.url("/")))["__Host-gw_session"].value


async def test_requests_reuse_the_cached_session_until_the_writer_ends_it(
    gw_access: tuple[Harness, LoginAccess],
) -> None:
    gw, access = gw_access
    async with gw.session() as s:
        await login(gw, s)
        assert (await fetch_json(gw, s, "/onre/x"))[0] == 200
        statements: list[str] = []
        access.reader._conn.set_trace_callback(statements.append)
        for _ in range(5):
            assert (await fetch_json(gw, s, "/onre/x"))[0] == 200
        assert statements and not [q for q in statements if "FROM sessions" in q]
        session_id = unsign(session_cookie(gw, s), access.key)
        assert session_id is not None
        assert access.sessions.delete(session_id) is True  # this worker's writer connection
        status, body = await fetch_json(gw, s, "/onre/x")
    assert (status, body["error"]) == (401, "login_required")


async def test_systems_change_from_another_connection_applies_to_the_next_request(
    gw_access: tuple[Harness, LoginAccess],
) -> None:
    gw, _ = gw_access
    async with gw.session() as s:
        await login(gw, s)
        assert (await fetch_json(gw, s, "/nt/x"))[0] == 200
        assert (await fetch_json(gw, s, "/onre/x"))[0] == 200
        with SessionStore(gw.config.users.database) as portal:  # e.g. the portal or the CLI
            assert portal.set_systems_for_user("LC000001", ["tdnet"]) == 1
        status, body = await fetch_json(gw, s, "/nt/x")
        assert (status, body["error"]) == (403, "not_authorized")
        assert (await fetch_json(gw, s, "/onre/x"))[0] == 200


async def test_a_cached_session_still_expires_on_the_clock(
    gw_access: tuple[Harness, LoginAccess], clock: Clock
) -> None:
    gw, _ = gw_access
    async with gw.session() as s:
        await login(gw, s)
        assert (await fetch_json(gw, s, "/onre/x"))[0] == 200  # now in the cache
        clock.offset = dt.timedelta(minutes=31)
        status, body = await fetch_json(gw, s, "/onre/x")
    assert (status, body["error"]) == (401, "session_expired")


async def test_passthrough_login_body_with_a_content_encoding_is_refused(tmp_path: Path, pki: ThrowawayPki) -> None:
    """A backend that inflates request bodies would read other fields than the gateway checked."""
    import gzip

    h = await start_harness(tmp_path, pki, login_mode="passthrough", access_factory=LoginAccess)
    try:
        async with h.session("LC000001") as s:
            form = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
            zipped = {**form, "Content-Encoding": "gzip"}
            async with s.post(h.url("/onre/login"), data=gzip.compress(b"userId=LC000002"), headers=zipped) as r:
                assert r.status == 400, await r.text()
                assert (await r.json())["error"] == "bad_request"
            assert "Content-Encoding" in h.audit.events[-1].detail
            async with s.post(h.url("/onre/login"), data=b"userId=LC000001", headers=form) as r:
                assert r.status == 200  # the twin: the same form, not encoded
    finally:
        await h.close()


@pytest.mark.parametrize("path", ["/onre/login/x", "/onre/login.do", "/onre/LOGIN;jsessionid=1"])
async def test_passthrough_login_paths_a_backend_routes_to_its_login_are_checked(
    tmp_path: Path, pki: ThrowawayPki, path: str
) -> None:
    """PATH_INFO below the login path and suffix routes reach the same handler: their bodies are checked too."""
    h = await start_harness(tmp_path, pki, login_mode="passthrough", access_factory=LoginAccess)
    try:
        async with h.session("LC000001") as s:
            headers = {"Accept": "application/json"}
            async with s.post(h.url(path), data={"userId": "LC000002"}, headers=headers) as r:
                assert r.status == 403, await r.text()
                assert (await r.json())["error"] == "subject_mismatch"
            async with s.post(h.url(path), data={"userId": "LC000001"}, headers=headers) as r:
                assert r.status != 403  # the twin: the certificate's own user ID goes through
    finally:
        await h.close()

"""The users' pages over real TLS: what a refused or logged-in user reads, on the gateway and the portal.

Support contact and support-ID advice on every refusal page, the no-certificate
steps with the issuance link, a wrong password answered on the login form,
the subject-mismatch page naming the presented certificate, the portal's
main page at a glance, its list without a blank step and its own name on
its error pages.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.access.login import LoginAccess
from gateway.ca.authority import CertificateAuthority
from gateway.ca.portal import start_portal
from gateway.certs.files import ThrowawayPki
from gateway.verdict import CERTIFICATE_REASONS, Reason
from gateway.web.messages import NO_CERTIFICATE_TITLE_JA, NOT_VALID_JA, SUPPORT_ID_ADVICE_JA, message_for
from gateway.web.pages import render
from tests.harness import Harness, ListAudit, start_harness
from tests.test_login import Clock, add_user, login
from tests.test_portal import (
    CA_BORN,
    REAL_NOW,
    Portal,
    get,
    issue,
    logged_in,
    serials_of,
    write_portal_config,
)
from tests.test_portal import add_user as add_portal_user
from tests.test_portal import login as portal_login

SUPPORT = {"name": "SSO ヘルプデスク", "phone": "03-1234-5678", "email": "help@example.jp", "hours": "平日 9:00-17:00"}
ISSUANCE_URL = "https://issuance.example.jp"


@pytest.fixture
async def gw(tmp_path: Path, pki: ThrowawayPki) -> AsyncIterator[Harness]:
    portal = {"tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)}, "public_url": ISSUANCE_URL}
    h = await start_harness(
        tmp_path,
        pki,
        login_mode="gateway",
        access_factory=LoginAccess,
        clock=Clock(),
        extra={"support": SUPPORT, "portal": portal},
    )
    add_user(h, "LC000001")
    add_user(h, "LC000002")
    yield h
    await h.close()


@pytest.fixture
async def portal(tmp_path: Path) -> AsyncIterator[Portal]:
    ca = CertificateAuthority.init(tmp_path / "ca", now=CA_BORN)
    ca.publish_crl(REAL_NOW)
    config = write_portal_config(tmp_path, ca, extra={"support": SUPPORT})
    add_portal_user(config, "LC000001")
    audit, clock, session_clock = ListAudit(), Clock(), Clock()
    runner, port = await start_portal(config, audit=audit, clock=clock, session_clock=session_clock, crl_interval=None)
    yield Portal(ca, config, audit, clock, session_clock, port, tmp_path)
    await runner.cleanup()


def assert_support_contact(page: str) -> None:
    assert SUPPORT_ID_ADVICE_JA in page and "Please quote this support ID" in page
    for key, value in SUPPORT.items():
        assert f'id="support-{key}">' in page and value in page, key
    assert 'href="mailto:help@example.jp"' in page


async def fetch(h: Harness, path: str, user: str | None = "LC000001") -> tuple[int, str]:
    async with h.session(user) as s, s.get(h.url(path), headers={"Accept": "text/html"}) as r:
        return r.status, await r.text()


def text_of(page: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}"[^>]*>(.*?)(?:<span class="en"|</)', page, re.S)
    assert found, element_id
    return found.group(1)


# -- 1, 2: the no-certificate page, the support contact ---------------------------------


async def test_no_certificate_page_has_its_title_steps_issuance_link_and_support(gw: Harness) -> None:
    status, page = await fetch(gw, "/onre/page", user=None)
    assert status == 403
    assert text_of(page, "title") == NO_CERTIFICATE_TITLE_JA
    assert NOT_VALID_JA in page  # the manual's sentence, under the title
    steps = re.search(r'<ol id="steps">(.*?)</ol>', page, re.S)
    assert steps and len(re.findall(r"<li>", steps.group(1))) == 4
    assert f'id="issuance-link" href="{ISSUANCE_URL}"' in page
    assert_support_contact(page)
    [event] = [e for e in gw.audit.events if e.reason == "no_certificate"]
    assert event.support_id in page


async def test_an_invalid_certificate_keeps_the_manuals_title_and_no_issuance_link(
    gw: Harness, pki: ThrowawayPki
) -> None:
    cert, key, _ = gw.issue("LC000001", name="expired", not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=400))
    async with gw.session(cert=cert, key=key) as s, s.get(gw.url("/onre/page")) as r:
        status, page = r.status, await r.text()
    assert (status, text_of(page, "reason")) == (403, "certificate_expired")
    assert text_of(page, "title") == NOT_VALID_JA
    assert 'id="issuance-link"' not in page and 'id="steps"' not in page
    assert_support_contact(page)
    for reason in CERTIFICATE_REASONS - {Reason.NO_CERTIFICATE}:
        assert message_for(reason).title_ja == NOT_VALID_JA, reason


async def test_a_refusal_page_without_support_config_still_asks_to_quote_the_id(tmp_path: Path) -> None:
    page = render(
        "refusal.html", msg=message_for(Reason.NO_ROUTE), reason="no_route", support_id="ABC", links=(), support=None
    )
    assert SUPPORT_ID_ADVICE_JA in page and 'id="support-contact"' not in page


# -- 3: a wrong password on the login form ---------------------------------------------------


async def test_wrong_password_shows_the_error_on_the_form_keeping_the_user_id(gw: Harness) -> None:
    async with gw.session() as s:
        r = await login(gw, s, password="wrong password!")
        page = await r.text()
        assert r.status == 401
        assert 'id="error" role="alert"' in page and "ユーザIDまたはパスワードが正しくありません" in page
        assert "続けて失敗するとアカウントが一定時間ロックされます" in page and "Repeated failures lock" in page
        assert re.search(r'id="user_id"[^>]*value="LC000001"', page)
        assert re.search(r'id="password"[^>]*autofocus', page)
        assert 'name="csrf" value="' in page and 'id="go"' in page  # the form again, ready to retry
        [event] = [e for e in gw.audit.events if e.event == "login_refused"]
        assert (event.reason, event.user_id) == ("bad_credentials", "LC000001")
        assert text_of(page, "support-id") == event.support_id
        assert (await login(gw, s)).status == 303  # its accept twin: the right password goes through


async def test_unknown_user_id_gets_the_very_same_form(gw: Harness) -> None:
    cert, key, _ = gw.issue("LC999999", name="ghost")
    async with gw.session("LC000001") as s:
        wrong = await login(gw, s, password="nope")
        wrong_page = await wrong.text()
    async with gw.session(cert=cert, key=key) as s:
        unknown = await login(gw, s, user_id="LC999999")
        unknown_page = await unknown.text()

    def shape(page: str) -> str:
        page = re.sub(r'value="[^"]*"', "", page)
        page = re.sub(r"LC\d{6}|[0-9A-F]{12}|\d{4}/\d\d/\d\d \d\d:\d\d:\d\d|\d+ 日|\d+ days", "", page)
        return page

    assert wrong.status == unknown.status == 401
    assert shape(wrong_page) == shape(unknown_page)


async def test_portal_wrong_password_is_answered_on_its_form(portal: Portal) -> None:
    async with portal.client() as s:
        status, page, _ = await portal_login(portal, s, password="wrong password!")
        assert status == 401 and 'id="error" role="alert"' in page
        assert re.search(r'id="user_id"[^>]*value="LC000001"', page)
        assert "アカウントが一定時間ロックされます" in page
        status, _, headers = await portal_login(portal, s)
    assert (status, headers["Location"]) == (303, "/")


# -- 4: subject mismatch ----------------------------------------------------------------------


async def test_subject_mismatch_names_the_presented_certificate_without_the_word_subject(gw: Harness) -> None:
    async with gw.session("LC000001") as s:
        r = await login(gw, s, user_id="LC000002")
        page = await r.text()
    assert text_of(page, "reason") == "subject_mismatch"
    assert "サブジェクト" not in page
    assert text_of(page, "presented-name") == "LC000001"
    assert_support_contact(page)


def test_the_presented_name_is_escaped() -> None:
    msg = message_for(Reason.SUBJECT_MISMATCH)
    page = render("refusal.html", msg=msg, reason="subject_mismatch", support_id="X", links=(), presented="<b>x</b>")
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page


def test_no_message_says_subject_in_japanese() -> None:
    for reason in Reason:
        msg = message_for(reason)
        assert "サブジェクト" not in msg.title_ja + msg.advice_ja, reason


# -- 5: the portal's main page and list -------------------------------------------------------


async def test_main_page_shows_no_certificate_then_the_current_one_at_a_glance(portal: Portal) -> None:
    async with await logged_in(portal) as s:
        _, page, _ = await get(portal, s, "/")
        assert 'id="glance-none"' in page
        await issue(portal, s)
        status, page, _ = await get(portal, s, "/")
    assert status == 200
    assert text_of(page, "glance-status") == "有効"
    expiry = text_of(page, "glance-expiry")
    assert re.fullmatch(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d JST \(\+09:00\)", expiry), expiry
    renewal = text_of(page, "glance-renewal")
    expiry_day = dt.date(*map(int, expiry[:10].split("/")))
    opens = (expiry_day - dt.timedelta(days=30)).strftime("%Y/%m/%d")
    assert f"更新は {opens} から可能です" in renewal, renewal


async def test_main_page_says_the_renewal_window_is_open_30_days_before_expiry(portal: Portal) -> None:
    async with await logged_in(portal) as s:
        portal.clock.offset = -dt.timedelta(days=345)  # issued 345 days ago: expires in about 20 days
        await issue(portal, s)
        portal.clock.offset = dt.timedelta()
        _, page, _ = await get(portal, s, "/")
    assert "更新可能期間中です" in text_of(page, "glance-renewal")


async def test_certificate_list_appears_without_pressing_run(portal: Portal) -> None:
    async with await logged_in(portal) as s:
        await issue(portal, s)
        status, page, _ = await get(portal, s, "/certificates")
    assert status == 200 and len(serials_of(page)) == 1


# -- 6: buttons --------------------------------------------------------------------------------


async def test_revoke_buttons_say_revoke_and_are_as_large_as_cancel(portal: Portal) -> None:
    async with await logged_in(portal) as s:
        await issue(portal, s)
        _, page, _ = await get(portal, s, "/certificates")
        serial = serials_of(page)[0]
        _, detail, _ = await get(portal, s, f"/certificates/{serial}")
    assert 'id="revoke">失効する / Revoke<' in detail and 'id="close" href="/certificates">閉じる / Close<' in detail
    css = render("base.html")
    assert "button.danger" in css and "font:inherit" in css
    assert not re.search(r"\.danger\{[^}]*(font-size|padding)", css)  # same size as the others


# -- 7: the portal's error pages ---------------------------------------------------------------


async def test_portal_error_pages_carry_the_portals_name_and_the_support_contact(portal: Portal) -> None:
    async with await logged_in(portal) as s:
        status, page, _ = await get(portal, s, "/certificates/ABCDEF")
    assert status == 404
    header = re.search(r"<header>(.*?)</header>", page, re.S)
    assert header and "TSE-CA 証明書発行サービス" in header.group(1) and "Gateway" not in header.group(1)
    assert_support_contact(page)


# -- 8: first fields focused, contrast ------------------------------------------------------


def test_every_form_template_focuses_its_first_field() -> None:
    templates = Path(__file__).parent.parent / "gateway" / "templates"
    for path in sorted(templates.glob("*.html")):
        if path.name == "audit.html":  # the security team's report on the admin listener, not a users' page
            continue
        text = path.read_text(encoding="utf-8")
        fields = re.findall(r'<input type="(?:text|password)"[^>]*>', text)
        if fields:  # the first visible field carries autofocus (the login form's error case moves it on)
            assert any("autofocus" in field for field in fields[:2]), path.name


def _luminance(hex_colour: str) -> float:
    channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_footer_and_secondary_text_reach_4_5_to_1() -> None:
    css = render("base.html")
    footer = re.search(r"footer\{[^}]*color:(#[0-9a-f]{6})", css)
    secondary = re.search(r"\.en\{[^}]*color:(#[0-9a-f]{6})", css)
    assert footer and secondary
    assert contrast(footer.group(1), "#f4f6f9") >= 4.5  # the footer sits on the page background
    for background in ("#ffffff", "#f4f6f9", "#fff6d5", "#eef1f5", "#fdecee"):
        assert contrast(secondary.group(1), background) >= 4.5, background

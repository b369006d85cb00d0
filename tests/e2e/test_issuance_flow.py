"""Browser scenarios: the issuance service and the gateway, as a user lives them.

Every certificate here comes from the portal's pages (申請 → 証明書ダウンロード),
is imported into the terminal's NSS database with an empty password, and is
presented by Chromium itself after a browser restart.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.audit.events import EventKind, serial_hex
from gateway.certs.builders import SSO_CA_NAME
from gateway.web.messages import NO_CERTIFICATE_TITLE_JA, NOT_VALID_JA
from tests.e2e.support import (
    Servers,
    Terminal,
    assert_refusal,
    assert_tdnet_as,
    gateway_login,
    portal_apply,
    portal_certificates,
    portal_issue,
    portal_login,
    portal_revoke,
    status_is,
)

pytestmark = pytest.mark.browser
LIFETIME = dt.timedelta(days=365)
RENEWAL_DAYS_LEFT = 10


def _cn(name: x509.Name) -> str:
    return str(name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _serial(cert: x509.Certificate) -> str:
    return serial_hex(cert.serial_number)


@pytest.fixture
def back_dated(portal: Servers) -> Iterator[Callable[[dt.timedelta], None]]:
    """Move the portal's clock (the issuance time); always put it back."""

    def move(offset: dt.timedelta) -> None:
        portal.portal_clock.offset = offset

    yield move
    portal.portal_clock.offset = dt.timedelta()


def test_1_new_user_issues_imports_and_logs_in(portal: Servers, terminal: Callable[[str], Terminal]) -> None:
    portal.add_user("LC000101")
    term = terminal("pc")
    page = term.start()

    # Without a certificate the gateway turns the terminal away ...
    response = page.goto(portal.gateway_url("/onre/"))
    assert response is not None and response.status == 403
    assert_refusal(page, "no_certificate", NO_CERTIFICATE_TITLE_JA)

    # ... while the issuance service needs none.
    portal_login(page, portal, "LC000101")
    p12, cert = portal_issue(page, portal, term)
    assert _cn(cert.subject) == "LC000101"
    assert _cn(cert.issuer) == SSO_CA_NAME
    now = dt.datetime.now(dt.UTC)
    assert abs(cert.not_valid_before_utc - now) < dt.timedelta(minutes=5)
    assert LIFETIME <= cert.not_valid_after_utc - cert.not_valid_before_utc <= LIFETIME + dt.timedelta(days=1)

    term.nss.import_p12(p12)  # password left empty, as the manual says
    assert term.nss.client_nicknames() == ["LC000101"]
    page = term.restart()
    response = gateway_login(page, portal, "LC000101")
    assert response.status == 200
    assert_tdnet_as(page, portal, "LC000101", cert)
    login = [e for e in portal.events_for("LC000101") if e.event == EventKind.LOGIN]
    assert [(e.reason, e.cert_serial) for e in login] == [("ok", _serial(cert))]
    issued = [
        e for e in portal.portal_audit.events if e.event == EventKind.CERTIFICATE_ISSUED and e.user_id == "LC000101"
    ]
    assert [e.cert_serial for e in issued] == [_serial(cert)]


def test_2_second_issue_is_a_duplicate(portal: Servers, terminal: Callable[[str], Terminal]) -> None:
    portal.add_user("LC000201")
    term = terminal("pc")
    page = term.start()
    portal_login(page, portal, "LC000201")
    p12, cert = portal_issue(page, portal, term)

    response = portal_apply(page, portal)
    assert response.status == 409
    assert "証明書重複エラー" in page.locator("h1").inner_text()
    assert "既に有効な証明書が発行されています" in page.inner_text("body")
    assert page.locator("a#download").count() == 0
    refused = [
        e for e in portal.portal_audit.events if e.user_id == "LC000201" and e.event == EventKind.ISSUANCE_REFUSED
    ]
    assert [e.reason for e in refused] == ["certificate_duplicate"]
    valid = [r.serial for r in portal.ca.list(user="LC000201") if r.revoked_at is None]
    assert valid == [cert.serial_number]
    rows = portal_certificates(page, portal)
    assert [(r.serial, r.user_id) for r in rows] == [(cert.serial_number, "LC000201")]
    assert status_is(rows[0], "有効")

    # The refused request changed nothing: the first certificate still opens TDnet.
    term.nss.import_p12(p12)
    page = term.restart()
    gateway_login(page, portal, "LC000201")
    assert_tdnet_as(page, portal, "LC000201", cert)


def test_4_revoke_refuses_at_once_and_reissue_restores(portal: Servers, terminal: Callable[[str], Terminal]) -> None:
    portal.add_user("LC000401")
    term = terminal("pc")
    page = term.start()
    portal_login(page, portal, "LC000401")
    p12, first = portal_issue(page, portal, term)
    term.nss.import_p12(p12)
    page = term.restart()
    gateway_login(page, portal, "LC000401")
    assert_tdnet_as(page, portal, "LC000401", first)
    # The connections this browser opened to the gateway before the revocation.
    open_ports = {e.client_port for e in portal.audit.events if e.cert_serial == _serial(first)}

    # Revoke in the service, from another tab of the same browser.
    tab = term.context.new_page()
    portal_login(tab, portal, "LC000401")
    portal_revoke(tab, portal, first.serial_number)
    row = next(r for r in portal_certificates(tab, portal) if r.serial == first.serial_number)
    assert status_is(row, "失効"), row
    assert re.fullmatch(r"\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}", row.revoked_at), row
    revoked = [e for e in portal.portal_audit.events if e.event == EventKind.CERTIFICATE_REVOKED]
    assert revoked[-1].cert_serial == _serial(first)
    portal.refresh_crl()

    # The very next gateway request of that browser is refused, and the backend sees nothing.
    before = len(portal.hits)
    page.bring_to_front()
    response = page.reload()
    assert response is not None and response.status == 403
    support_id = assert_refusal(page, "certificate_revoked", NOT_VALID_JA)
    assert "この証明書は失効しています" in page.inner_text("#advice")
    assert portal.hits[before:] == []
    refused = next(e for e in portal.audit.events if e.support_id == support_id)
    assert (refused.event, refused.cert_serial) == (EventKind.REQUEST_REFUSED, _serial(first))
    assert refused.client_port in open_ports, "expected a keep-alive connection opened before the revocation"
    ended = [e for e in portal.events_for("LC000401") if e.event == EventKind.SESSION_ENDED]
    assert [e.reason for e in ended] == ["certificate_revoked"]

    # Reissue: issue anew, delete the revoked certificate, import, restart: access is back.
    p12, second = portal_issue(tab, portal, term)
    assert second.serial_number != first.serial_number
    (nickname,) = term.nss.client_nicknames()
    term.nss.delete_client(nickname)
    term.nss.import_p12(p12)
    page = term.restart()
    gateway_login(page, portal, "LC000401")
    assert_tdnet_as(page, portal, "LC000401", second)


def test_5_renewal_window_and_expiry_notice(
    portal: Servers, terminal: Callable[[str], Terminal], back_dated: Callable[[dt.timedelta], None]
) -> None:
    portal.add_user("LC000501")
    term = terminal("pc")
    page = term.start()

    # A certificate issued 355 days ago: 10 days left.
    back_dated(-(LIFETIME - dt.timedelta(days=RENEWAL_DAYS_LEFT)))
    portal_login(page, portal, "LC000501")
    p12, old = portal_issue(page, portal, term)
    back_dated(dt.timedelta())
    left = old.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=RENEWAL_DAYS_LEFT - 1) < left <= dt.timedelta(days=RENEWAL_DAYS_LEFT)

    term.nss.import_p12(p12)
    page = term.restart()
    _login_through_notice(page, portal, old)

    # Inside the renewal window the service issues a new one although the old is valid.
    page = term.restart()
    portal_login(page, portal, "LC000501")
    new_p12, new = portal_issue(page, portal, term)
    assert new.not_valid_after_utc - dt.datetime.now(dt.UTC) > LIFETIME - dt.timedelta(days=1)
    rows = {r.serial: r for r in portal_certificates(page, portal)}
    assert set(rows) == {old.serial_number, new.serial_number}
    assert all(status_is(r, "有効") for r in rows.values()), rows

    # The old one still works until it is deleted from the browser ...
    page = term.restart()
    _login_through_notice(page, portal, old)

    # ... then the new one takes over, with no notice.
    assert term.nss.client_nicknames() == ["LC000501"]
    term.nss.delete_client("LC000501")
    assert term.nss.client_nicknames() == []
    term.nss.import_p12(new_p12)
    page = term.restart()
    gateway_login(page, portal, "LC000501")
    assert_tdnet_as(page, portal, "LC000501", new)
    assert page.locator("#expiry-notice").count() == 0


def _login_through_notice(page: Any, servers: Servers, cert: x509.Certificate) -> None:
    """Log in with a certificate near expiry: the notice first, then TDnet."""
    page.goto(servers.gateway_url("/onre/"))
    days = (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).days
    login_notice = page.inner_text("#expiry-notice")
    assert f"証明書の有効期限まであと {days} 日です" in login_notice
    gateway_login(page, servers, "LC000501")
    assert "/_gateway/notice" in page.url
    notice = page.inner_text("#expiry-notice")
    jst = cert.not_valid_after_utc.astimezone(dt.timezone(dt.timedelta(hours=9)))
    assert f"証明書の有効期限は {jst:%Y/%m/%d %H:%M:%S} です(あと {days} 日)" in notice
    with page.expect_navigation():
        page.click("a#continue")
    assert_tdnet_as(page, servers, "LC000501", cert)

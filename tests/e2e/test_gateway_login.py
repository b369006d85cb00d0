"""Browser scenarios: the gateway's login in real Chromium, certificates from the CA.

The certificates are issued by the suite's CA directly (as ``gateway ca``
would), so these run without the issuance portal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.audit.events import EventKind, serial_hex
from gateway.web.messages import NO_CERTIFICATE_TITLE_JA, NOT_VALID_JA
from tests.e2e.support import (
    PASSWORD,
    Servers,
    Terminal,
    assert_refusal,
    assert_tdnet_as,
    cli,
    gateway_login,
)

pytestmark = pytest.mark.browser
MISMATCH_JA = "選択された証明書はこのユーザIDのものではありません"
NEW_PASSWORD = "a brand new passphrase 6"


def test_3_wrong_certificate_and_no_certificate(
    servers: Servers, terminal: Callable[[str], Terminal], tmp_path: Path
) -> None:
    servers.add_user("LC000301")
    servers.add_user("LC000302")
    own_p12, own_cert = servers.issue_p12("LC000301", tmp_path)
    other_p12, other_cert = servers.issue_p12("LC000302", tmp_path)

    # Accept twin: the user's own terminal reaches TDnet as LC000301.
    own = terminal("own")
    own.nss.import_p12(own_p12)
    page = own.start()
    assert gateway_login(page, servers, "LC000301").status == 200
    assert_tdnet_as(page, servers, "LC000301", own_cert)

    # A terminal holding only LC000302's certificate, logging in as LC000301 with the right password.
    other = terminal("other")
    other.nss.import_p12(other_p12)
    page = other.start()
    before = len(servers.hits)
    response = gateway_login(page, servers, "LC000301")
    assert response.status == 403
    support_id = assert_refusal(page, "subject_mismatch", MISMATCH_JA)
    assert "ご自身のユーザIDの証明書を選択してください" in page.inner_text("#advice")
    assert servers.hits[before:] == []
    refused = [e for e in servers.audit.events if e.support_id == support_id]
    assert len(refused) == 1
    assert (refused[0].event, refused[0].user_id, refused[0].cert_subject) == (
        EventKind.LOGIN_REFUSED,
        "LC000301",
        "LC000302",
    )
    assert refused[0].cert_serial == serial_hex(other_cert.serial_number)
    # ... and the backend stays closed to that browser afterwards.
    page.goto(servers.gateway_url("/onre/"))
    assert "/_gateway/login" in page.url
    assert servers.hits[before:] == []

    # A terminal with no client certificate at all (only the CA trusted).
    bare = terminal("bare")
    page = bare.start()
    for path in ("/_gateway/login", "/onre/"):
        response = page.goto(servers.gateway_url(path))
        assert response is not None and response.status == 403
        support_id = assert_refusal(page, "no_certificate", NO_CERTIFICATE_TITLE_JA)
        assert NOT_VALID_JA in page.inner_text("#advice")
        assert page.locator("ol#steps li").count() >= 3
        event = next(e for e in servers.audit.events if e.support_id == support_id)
        assert (event.event, event.reason, event.path, event.cert_serial) == (
            EventKind.REQUEST_REFUSED,
            "no_certificate",
            path,
            "",
        )
    assert servers.hits[before:] == []


def test_6_forced_password_change_after_admin_reset(
    servers: Servers, terminal: Callable[[str], Terminal], tmp_path: Path
) -> None:
    servers.add_user("LC000601")
    p12, cert = servers.issue_p12("LC000601", tmp_path)
    reset = cli(servers, "users", "reset-password", "LC000601")
    temporary = reset.stdout.strip()
    assert len(temporary) >= 12 and temporary != PASSWORD

    term = terminal("pc")
    term.nss.import_p12(p12)
    page = term.start()
    before = len(servers.hits)

    # The password from before the reset no longer opens anything.
    assert gateway_login(page, servers, "LC000601", PASSWORD).status == 401
    assert page.locator("#reason").inner_text() == "bad_credentials"  # on the login form, the ID kept
    assert "ユーザIDまたはパスワードが正しくありません" in page.inner_text("#error")
    assert page.input_value("#user_id") == "LC000601"

    # The temporary one leads straight to the forced change, and nowhere else.
    gateway_login(page, servers, "LC000601", temporary)
    assert page.url.endswith("/_gateway/password"), page.url
    assert "仮パスワードでログインしました" in page.inner_text("#forced")
    page.goto(servers.gateway_url("/onre/"))
    assert page.url.endswith("/_gateway/password"), page.url
    assert servers.hits[before:] == []

    # Changing it: the TDnet page, as LC000601.
    page.fill("#old_password", temporary)
    page.fill("#new_password", NEW_PASSWORD)
    page.fill("#new_password_again", NEW_PASSWORD)
    with page.expect_navigation():
        page.click("button#change")
    assert_tdnet_as(page, servers, "LC000601", cert)
    kinds = [e.event for e in servers.events_for("LC000601")]
    assert EventKind.PASSWORD_CHANGED in kinds

    # After a browser restart the new password logs in without any detour.
    page = term.restart()
    gateway_login(page, servers, "LC000601", NEW_PASSWORD)
    assert_tdnet_as(page, servers, "LC000601", cert)
    assert page.locator("#forced").count() == 0


def test_7_logout_then_back_serves_no_backend_page(
    servers: Servers, terminal: Callable[[str], Terminal], tmp_path: Path
) -> None:
    servers.add_user("LC000701")
    p12, cert = servers.issue_p12("LC000701", tmp_path)
    term = terminal("pc")
    term.nss.import_p12(p12)
    page = term.start()
    gateway_login(page, servers, "LC000701")
    assert_tdnet_as(page, servers, "LC000701", cert)
    page.goto(servers.gateway_url("/onre/disclosures?page=2"))
    assert_tdnet_as(page, servers, "LC000701", cert)

    page.goto(servers.gateway_url("/_gateway/logout"))
    assert "LC000701 からログアウトしますか" in page.inner_text("body")
    with page.expect_navigation():
        page.click("button#logout")
    assert page.locator("h1#title").inner_text().startswith("ログアウトしました")
    served = len(servers.hits)
    assert [e.event for e in servers.events_for("LC000701")][-1] == EventKind.LOGOUT

    # Back, back, back: the logout page, then the two TDnet pages; none may come back.
    for _ in range(3):
        page.go_back()
        page.wait_for_load_state()
        assert page.locator("table#identity").count() == 0, f"backend page shown again at {page.url}"
        assert "/_gateway/login" in page.url, page.url
        assert page.locator("h1").inner_text().startswith("ログイン")
    assert servers.hits[served:] == []
    # Going to TDnet directly asks for a login too.
    page.goto(servers.gateway_url("/onre/"))
    assert "/_gateway/login?next=/onre/" in page.url
    assert servers.hits[served:] == []

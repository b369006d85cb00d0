"""The download formats in the browser: choose one on the issue page, import it, log in.

The user picks 「古い Windows 用」 / "For older Windows" or 「パスワード付き」 /
"With a password" with a password of their own; the file imports into the
terminal's NSS database with that password (and not without it), the
certificate shows under the user ID (the friendly name), and Chromium logs in
with it after a restart.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.serialization import pkcs12

from gateway.audit.events import EventKind
from tests.e2e.support import Servers, Terminal, assert_tdnet_as, gateway_login, portal_login

pytestmark = pytest.mark.browser
FILE_PASSWORD = "my terminal 42"


@pytest.mark.parametrize(("user_id", "fmt"), [("LC009101", "legacy"), ("LC009102", "password")])
def test_a_password_format_downloads_imports_and_logs_in(
    portal: Servers, terminal: Callable[[str], Terminal], user_id: str, fmt: str
) -> None:
    portal.add_user(user_id)
    term = terminal(f"pc-{fmt}")
    page = term.start()
    portal_login(page, portal, user_id)
    page.goto(portal.portal_url("/issue"))
    assert page.locator("#p12_format_default").is_checked()  # the manual's download unless the user chooses
    page.check(f"#p12_format_{fmt}")
    page.fill("#p12_password", FILE_PASSWORD)
    with page.expect_navigation():
        page.click("button#apply")
    assert "証明書を発行しました" in page.locator("h1").inner_text(), page.inner_text("body")[:500]
    with page.expect_download() as info:
        page.click("a#download")
    path = term.downloads / (info.value.suggested_filename or "certificate.p12")
    info.value.save_as(str(path))
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(path.read_bytes(), None)
    _key, cert, _chain = pkcs12.load_key_and_certificates(path.read_bytes(), FILE_PASSWORD.encode())
    assert cert is not None

    with pytest.raises(AssertionError):  # the empty password of the default does not open it
        term.nss.import_p12(path)
    term.nss.import_p12(path, FILE_PASSWORD)
    assert term.nss.client_nicknames() == [user_id]  # the friendly name
    page = term.restart()
    response = gateway_login(page, portal, user_id)
    assert response.status == 200
    assert_tdnet_as(page, portal, user_id, cert)
    issued = [e for e in portal.portal_audit.events if e.event == EventKind.CERTIFICATE_ISSUED and e.user_id == user_id]
    assert [e.detail for e in issued] == [f"pkcs12 format {fmt}"]

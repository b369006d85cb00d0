"""The security team's audit workspace in real Chromium: an auditor's login, filters, pages, both exports.

The auditor and a user without the role log in with certificates from the
suite's CA, held in each terminal's NSS database, as any user would.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from gateway.access.users import UserStore
from gateway.audit.events import AuditEvent, EventKind
from gateway.audit.store import AuditStore
from tests.e2e.support import PASSWORD, Servers, Terminal, assert_refusal

pytestmark = pytest.mark.browser
WORKSPACE = "/_gateway/audit"
SUSPECT = "LC000A09"  # the user whose refusals the auditor reviews (unique to this file)


def seed(servers: Servers, now: dt.datetime) -> None:
    events = [
        AuditEvent(
            EventKind.LOGIN_REFUSED,
            time=now - dt.timedelta(hours=7 * i + 1),
            reason="bad_credentials",
            user_id=SUSPECT,
            client_ip="192.0.2.77",
            cert_subject=SUSPECT,
            cert_serial="7F3A9C21B4D5E6F708192A3B4C5D6E7F80912A3B",
        )
        for i in range(12)
    ]
    events.append(AuditEvent(EventKind.REQUEST_REFUSED, time=now - dt.timedelta(hours=3), reason="certificate_revoked"))
    with AuditStore(servers.config.audit.database) as store:
        store.append(events)


def login_to_workspace(page: Any, servers: Servers, user_id: str, start: str) -> Any:
    """Open ``start``, get sent to the login form, log in; return the response of where it lands."""
    page.goto(servers.gateway_url(start))
    assert "/_gateway/login" in page.url
    page.fill("#user_id", user_id)
    page.fill("#password", PASSWORD)
    with page.expect_navigation() as nav:
        page.click("button#go")
    return nav.value


def test_auditor_searches_pages_and_exports(
    servers: Servers, terminal: Callable[[str], Terminal], tmp_path: Path
) -> None:
    now = dt.datetime.now(dt.UTC)
    seed(servers, now)
    servers.add_user("SEC0A001")
    with UserStore(servers.config.users.database) as store:
        store.set_roles("SEC0A001", ["auditor"], now=now)
    p12, _cert = servers.issue_p12("SEC0A001", tmp_path)
    pc = terminal("auditor")
    pc.nss.import_p12(p12)
    page = pc.start()

    # Not logged in: the login page, then back to the shared search link.
    start = f"{WORKSPACE}?user={SUSPECT}&since=30d&limit=5"
    response = login_to_workspace(page, servers, "SEC0A001", start)
    assert response.status == 200
    assert urlsplit(page.url).path == WORKSPACE
    assert "12 events" in page.inner_text("#total") and "1–5" in page.inner_text("#total")
    table = page.inner_text("table.events")
    assert "JST, UTC+09:00" in table and SUSPECT in table
    nowrap = page.locator("table.events td.nw").first.evaluate("e => getComputedStyle(e).whiteSpace")
    assert nowrap == "nowrap"

    # Paging keeps the filter in the URL.
    with page.expect_navigation():
        page.click("a[rel=next]")
    query = parse_qs(urlsplit(page.url).query)
    assert query["user"] == [SUSPECT] and query["page"] == ["2"]
    assert "6–10" in page.inner_text("#total")

    # Filtering with the form: the reason dropdown.
    page.goto(servers.gateway_url(WORKSPACE + "?since=30d"))
    page.select_option("select[name=reason]", "certificate_revoked")
    with page.expect_navigation():
        page.click("form.filters button[type=submit]")
    assert parse_qs(urlsplit(page.url).query)["reason"] == ["certificate_revoked"]
    assert "1 events" in page.inner_text("#total")

    # Both exports of a filter, as downloads.
    page.goto(servers.gateway_url(f"{WORKSPACE}?user={SUSPECT}&since=30d"))
    with page.expect_download() as got:
        page.click("text=Export CSV")
    csv_path = tmp_path / "export.csv"
    got.value.save_as(csv_path)
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text(encoding="utf-8-sig"))))
    assert len(rows) == 12 and {r["user_id"] for r in rows} == {SUSPECT}
    assert all(r["time_utc"].endswith("Z") for r in rows) and rows[0]["cert_cn"] == SUSPECT
    with page.expect_download() as got:
        page.click("text=Export JSON")
    json_path = tmp_path / "export.json"
    got.value.save_as(json_path)
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert len(data) == 12 and data[0]["cert_serial"] == "7F3A9C21B4D5E6F708192A3B4C5D6E7F80912A3B"
    assert data[0]["time_utc"].endswith("Z")

    mine = [e for e in servers.audit.events if e.user_id == "SEC0A001"]
    assert sum(e.event == EventKind.AUDIT_VIEWED for e in mine) == 5  # first page, next, two searches, the export page
    exports = [e.detail for e in mine if e.event == EventKind.AUDIT_EXPORTED]
    assert [d.split(" ")[0] for d in exports] == ["format=csv", "format=json"]
    assert all(f"user={SUSPECT}" in d and "rows=12 complete=True" in d for d in exports)


def test_a_user_without_the_role_is_refused(
    servers: Servers, terminal: Callable[[str], Terminal], tmp_path: Path
) -> None:
    servers.add_user("LC000A02")
    p12, _cert = servers.issue_p12("LC000A02", tmp_path)
    pc = terminal("clerk")
    pc.nss.import_p12(p12)
    page = pc.start()
    response = login_to_workspace(page, servers, "LC000A02", WORKSPACE)
    assert response.status == 403
    support_id = assert_refusal(page, "not_authorized", "")
    assert SUSPECT not in page.inner_text("body")
    event = next(e for e in servers.audit.events if e.support_id == support_id)
    assert (event.user_id, event.reason, event.path) == ("LC000A02", "not_authorized", WORKSPACE)
    assert re.fullmatch(r"[0-9A-F]{12}", support_id)

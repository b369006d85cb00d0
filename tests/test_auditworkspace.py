"""The audit workspace through a real gateway: mTLS + login + the auditor role, pages, streamed exports."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from gateway.access.login import LoginAccess
from gateway.access.users import UserStore
from gateway.audit.events import AuditEvent, AuditFilter, EventKind
from gateway.audit.rows import cert_cn, jst_text
from gateway.audit.store import AuditStore
from gateway.audit.workspace import csv_cell, csv_chunk, export_cursor, json_chunk
from gateway.certs.files import ThrowawayPki
from gateway.storage import postgres
from gateway.storage.pg_audit import SCHEMA, PgAuditStore
from tests.harness import Harness, start_harness
from tests.test_login import add_user, login

WORKSPACE = "/_gateway/audit"
NOW = dt.datetime.now(dt.UTC)


def seed(h: Harness) -> list[AuditEvent]:
    """Events in the gateway's audit database: 25 refusals of LC000009 over 10 days, some noise."""
    events = [
        AuditEvent(
            EventKind.LOGIN_REFUSED,
            time=NOW - dt.timedelta(hours=9 * i + 1),
            reason="bad_credentials",
            user_id="LC000009",
            client_ip="192.0.2.7",
            cert_subject=r"CN=LC000009,O=Example\, Inc.,C=JP",
            cert_serial="1A2B3C4D5E6F708192A3B4C5D6E7F8091A2B3C4D",
        )
        for i in range(25)
    ]
    events += [
        AuditEvent(
            EventKind.REQUEST_REFUSED, time=NOW - dt.timedelta(hours=2), reason="certificate_revoked", instance="gw-b"
        ),
        AuditEvent(EventKind.LOGIN, time=NOW - dt.timedelta(days=40), reason="ok", user_id="LC000009"),
    ]
    with AuditStore(h.config.audit.database) as store:
        store.append(events)
    return events


@pytest.fixture
async def gw(tmp_path: Path, pki: ThrowawayPki) -> Harness:  # type: ignore[misc]
    h = await start_harness(tmp_path, pki, login_mode="gateway", access_factory=LoginAccess)
    add_user(h, "LC000001")  # the auditor (below), logging in with the LC000001 certificate
    add_user(h, "LC000002", ("tdnet",))  # no role
    with UserStore(h.config.users.database) as store:
        store.set_roles("LC000001", ["auditor"], now=NOW)
    seed(h)
    yield h
    await h.close()


async def get(s: aiohttp.ClientSession, h: Harness, path: str, **params: str) -> tuple[int, str, Any]:
    async with s.get(h.url(path), params=params, allow_redirects=False, headers={"Accept": "text/html"}) as r:
        return r.status, await r.text(), r.headers


def events_of(h: Harness, kind: EventKind) -> list[AuditEvent]:
    return [e for e in h.audit.events if e.event == kind]


async def test_auditor_filters_pages_and_the_view_is_audited(gw: Harness) -> None:
    async with gw.session("LC000001") as s:
        assert (await login(gw, s)).status == 303
        status, page, headers = await get(s, gw, WORKSPACE, user="LC000009", since="30d", limit="10")
        assert status == 200
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert headers["Cache-Control"] == "no-store"
        assert "全 25 件中 1&ndash;10 件" in page and "1&ndash;10 of 25 events" in page
        assert "JST, UTC+09:00" in page
        assert '<td class="cn">LC000009</td>' in page  # the certificate name column
        assert '<td class="mono nw">1A2B3C4D5E6F708192A3B4C5D6E7F8091A2B3C4D</td>' in page
        assert 'rel="next"' in page and 'rel="prev"' not in page
        next_link = re.search(r'href="([^"]+)" rel="next"', page)
        assert next_link is not None
        link = next_link.group(1).replace("&amp;", "&")
        assert link.startswith(WORKSPACE + "?") and "user=LC000009" in link and "page=2" in link
        async with s.get(gw.url(link), allow_redirects=False) as r:
            assert r.status == 200
            second = await r.text()
        assert "11&ndash;20 of 25 events" in second and 'rel="prev"' in second
        status, last, _ = await get(s, gw, WORKSPACE, user="LC000009", since="30d", limit="10", page="3")
        assert "21&ndash;25 of 25 events" in last and 'rel="next"' not in last
        # the reason is a dropdown, the chosen one selected; the filter narrows
        status, page, _ = await get(s, gw, WORKSPACE, reason="certificate_revoked", since="30d")
        assert '<option value="certificate_revoked" selected>' in page
        assert "1&ndash;1 of 1 events" in page
    viewed = events_of(gw, EventKind.AUDIT_VIEWED)
    assert len(viewed) == 4
    assert all(e.user_id == "LC000001" for e in viewed)
    assert viewed[0].detail == "filter: limit=10&since=30d&user=LC000009; page=1 rows=10 total=25"
    assert viewed[2].detail.endswith("page=3 rows=5 total=25")


async def test_a_bad_filter_is_explained_in_both_languages(gw: Harness) -> None:
    async with gw.session("LC000001") as s:
        await login(gw, s)
        status, page, _ = await get(s, gw, WORKSPACE, since="yesterday")
        assert status == 400
        alert = re.search(r'<p class="notice" role="alert">(.*?)</p>', page, re.S)
        assert alert is not None
        assert alert.group(1).index("検索条件を読み取れません") < alert.group(1).index("yesterday")
        status, _, _ = await get(s, gw, WORKSPACE, page="0")
        assert status == 400
        async with s.get(gw.url(WORKSPACE + "/export.csv"), params={"since": "nope"}) as r:
            assert r.status == 400
            assert "検索条件を読み取れません / Bad filter" in (await r.json())["message"]


async def test_csv_export_streams_the_whole_filter_in_utc_and_is_audited(gw: Harness) -> None:
    async with gw.session("LC000001") as s:
        await login(gw, s)
        params = {"user": "LC000009", "since": "30d", "limit": "10", "page": "2"}  # page and limit: ignored
        async with s.get(gw.url(WORKSPACE + "/export.csv"), params=params) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/csv")
            assert r.headers["Content-Disposition"].startswith('attachment; filename="audit-')
            assert "Content-Length" not in r.headers  # streamed
            body = (await r.read()).decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(body)))
    assert len(rows) == 25
    assert {r["user_id"] for r in rows} == {"LC000009"}
    assert list(rows[0])[:2] == ["time_utc", "cert_cn"]
    assert rows[0]["cert_cn"] == "LC000009"
    assert rows[0]["cert_subject"] == r"CN=LC000009,O=Example\, Inc.,C=JP"
    times = [dt.datetime.fromisoformat(r["time_utc"]) for r in rows]
    assert all(t.utcoffset() == dt.timedelta(0) for t in times)
    assert times == sorted(times, reverse=True)
    assert abs(times[0] - (NOW - dt.timedelta(hours=1))) < dt.timedelta(seconds=1)
    exported = events_of(gw, EventKind.AUDIT_EXPORTED)
    assert len(exported) == 1 and exported[0].user_id == "LC000001"
    assert exported[0].detail == "format=csv filter: limit=10&since=30d&user=LC000009; rows=25 complete=True"


async def test_json_export_is_one_array_of_the_filter(gw: Harness) -> None:
    async with gw.session("LC000001") as s:
        await login(gw, s)
        async with s.get(gw.url(WORKSPACE + "/export.json"), params={"since": "30d", "event": "request_refused"}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("application/json")
            data = json.loads(await r.read())
        async with s.get(gw.url(WORKSPACE + "/export.json"), params={"since": "1m"}) as r:
            assert json.loads(await r.read()) == []  # an empty result is still valid JSON
    assert [(d["event"], d["reason"]) for d in data] == [("request_refused", "certificate_revoked")]
    assert data[0]["time_utc"].endswith("Z")
    assert [e.detail.split(";")[1] for e in events_of(gw, EventKind.AUDIT_EXPORTED)] == [
        " rows=1 complete=True",
        " rows=0 complete=True",
    ]


async def test_instance_filters_the_page_and_the_exports(gw: Harness) -> None:
    async with gw.session("LC000001") as s:
        await login(gw, s)
        status, html, _ = await get(s, gw, WORKSPACE, instance="gw-b", since="30d")
        async with s.get(gw.url(WORKSPACE + "/export.csv"), params={"instance": "gw-b", "since": "30d"}) as r:
            rows = list(csv.DictReader(io.StringIO((await r.read()).decode("utf-8-sig"))))
        async with s.get(gw.url(WORKSPACE + "/export.json"), params={"instance": "nowhere"}) as r:
            assert json.loads(await r.read()) == []
    assert status == 200
    assert 'name="instance" value="gw-b"' in html and "export.csv?instance=gw-b" in html
    assert "certificate_revoked" in html and "LC000009" not in html.split('<table class="events">')[1]
    assert [(r["reason"], r["instance"]) for r in rows] == [("certificate_revoked", "gw-b")]


async def test_a_logged_in_user_without_the_role_is_refused_and_audited(gw: Harness) -> None:
    async with gw.session("LC000002") as s:
        assert (await login(gw, s, "LC000002")).status == 303
        for path in (WORKSPACE, WORKSPACE + "/export.csv", WORKSPACE + "/export.json"):
            status, page, _ = await get(s, gw, path, since="30d")
            assert status == 403
            assert "not_authorized" in page
            assert "LC000009" not in page
    refused = [e for e in gw.audit.events if e.reason == "not_authorized"]
    assert len(refused) == 3 and {e.user_id for e in refused} == {"LC000002"}
    assert refused[0].detail == "audit workspace needs the auditor role"
    assert not events_of(gw, EventKind.AUDIT_VIEWED) and not events_of(gw, EventKind.AUDIT_EXPORTED)


async def test_a_role_taken_away_takes_effect_at_the_next_request(gw: Harness) -> None:
    async with gw.session("LC000001") as s:
        await login(gw, s)
        assert (await get(s, gw, WORKSPACE))[0] == 200
        with UserStore(gw.config.users.database) as store:
            store.set_roles("LC000001", [], now=NOW)
        assert (await get(s, gw, WORKSPACE))[0] == 403


async def test_not_logged_in_goes_to_the_login_page_and_back(gw: Harness) -> None:
    async with gw.session("LC000001") as s:
        status, _, headers = await get(s, gw, WORKSPACE, user="LC000009", since="30d")
        assert status == 303
        assert headers["Location"] == "/_gateway/login?next=/_gateway/audit%3Fuser%3DLC000009%26since%3D30d"
        status, _, headers = await get(s, gw, WORKSPACE + "/export.csv")
        assert status == 303 and headers["Location"].startswith("/_gateway/login?next=")
        r = await login(gw, s, next_path="/_gateway/audit?user=LC000009&since=30d")
        assert r.headers["Location"] == "/_gateway/audit?user=LC000009&since=30d"
        status, page, _ = await get(s, gw, WORKSPACE, user="LC000009", since="30d")
        assert status == 200 and "of 25 events" in page
    assert not events_of(gw, EventKind.AUDIT_EXPORTED)


async def test_the_admin_listener_has_no_audit_report_by_default(gw: Harness) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.admin_url("/audit")) as r:
            assert r.status == 404
        async with s.get(gw.admin_url("/healthz")) as r:
            assert r.status == 200


async def test_the_admin_listener_serves_the_report_when_enabled(tmp_path: Path, pki: ThrowawayPki) -> None:
    extra = {"admin": {"host": "127.0.0.1", "port": 0, "audit_report": True}}
    h = await start_harness(tmp_path, pki, login_mode="gateway", access_factory=LoginAccess, extra=extra)
    try:
        seed(h)
        async with aiohttp.ClientSession() as s, s.get(h.admin_url("/audit"), params={"user": "LC000009"}) as r:
            assert r.status == 200
            assert "LC000009" in await r.text()
    finally:
        await h.close()


def test_cells_and_names() -> None:
    assert cert_cn(r"CN=Tanaka\, Taro,O=Example,C=JP") == "Tanaka, Taro"
    assert cert_cn("O=Example,C=JP") == ""
    assert cert_cn("LC000001") == "LC000001"  # what the gateway records: the CN itself
    assert jst_text("2026-11-30T15:00:00.000Z") == "2026-12-01 00:00:00"
    assert csv_cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert csv_cell("-1") == "-1" and csv_cell("LC-1") == "LC-1" and csv_cell(None) == ""


async def test_the_page_shows_the_verification_of_the_period(gw: Harness) -> None:
    from gateway.audit.signing import generate_signing_key

    async with gw.session("LC000001") as s:
        assert (await login(gw, s)).status == 303
        status, page, _ = await get(s, gw, WORKSPACE, since="30d")
        assert status == 200 and 'data-verified="no"' in page and "no audit signing key yet" in page
        generate_signing_key(gw.config.audit.signing_key)
        status, page, _ = await get(s, gw, WORKSPACE, since="30d")
        assert status == 200 and 'data-verified="yes"' in page, re.findall(r"trail-state.*", page)
        line = re.findall(r'<p class="trail-state".*</p>', page)
        assert len(line) == 1 and "検証済み" in line[0] and "Verified: the hash chains and signed" in line[0], line


def test_the_lines_the_database_builds_are_what_csv_and_json_would_write(
    tmp_path: Path, store_backend: str, request: pytest.FixtureRequest
) -> None:
    """The exports' SQL encoding against the Python one, on hostile cells (formulas, quotes, newlines, DNs)."""
    nasty = ["=1+2", "+1", "-1", "-12a", "-", "@SUM(A1)", "\tx", "\rx", "＝1", "＋1", "－1", "＠x", 'say "hi"',
             "a,b", "two\nlines", "cr\rlf", "ｶﾅ 日本語", "", "'quoted", "-１２"]  # fmt: skip
    subjects = ["LC000001", r"cn=Tanaka\, Taro,O=Ex", "O=Example,C=JP", r"O=x, CN=y\\z", "", "CN=", "C=JP,CN=ok"]
    events = [
        AuditEvent(
            EventKind.LOGIN_REFUSED,
            time=NOW - dt.timedelta(seconds=i),
            reason=text,
            user_agent=text,
            path="/" + text,
            cert_subject=subjects[i % len(subjects)] if i % 3 else rf"CN={text}\, x,O=Example",
            client_port=None if i % 3 else 443,
            worker=i % 2,
        )
        for i, text in enumerate(nasty)
    ]
    with ExitStack() as stack:
        db: postgres.Database | None = None
        if store_backend == "postgres":
            url = request.getfixturevalue("pg_url")
            with psycopg.connect(url, autocommit=True) as conn:
                postgres.migrate(conn, [SCHEMA])
            db = stack.enter_context(postgres.Database(postgres.target(url)))

        def store() -> AuditStore | PgAuditStore:  # one a cursor: an export cursor holds its connection
            return PgAuditStore(db) if db is not None else AuditStore(tmp_path / "audit.db")

        with store() as writer:
            writer.append(events)
        f = AuditFilter()
        with store() as reader:
            plain = reader.cursor(f).fetchmany(1000)
        with store() as reader:
            lines, encode = export_cursor(reader, f, "csv")
            csv_text = csv_chunk([], header=True) + encode(lines.fetchmany(1000), True)
        with store() as reader:
            lines, encode = export_cursor(reader, f, "json")
            json_text = encode(lines.fetchmany(1000), True)
    assert csv_text == csv_chunk(plain, header=True)
    rows = list(csv.reader(io.StringIO(csv_text)))[1:]
    assert [row[3] for row in rows][:3] == ["'=1+2", "'+1", "-1"] and "'-１２" in [row[3] for row in rows]
    assert {row[1] for row in rows} >= {"LC000001", "Tanaka, Taro", "", "y\\z", "ok"}
    assert json.loads("[" + json_text + "]") == json.loads("[" + json_chunk(plain, first=True) + "]")

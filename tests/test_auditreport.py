"""The /audit report: chart geometry (pure), the page (escaped) and the handler (real server)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.audit.events import AuditEvent, EventKind, utcnow
from gateway.audit.report import audit_handler, refusal_chart, render_report
from gateway.audit.store import AuditStore, AuditSummary

T0 = dt.datetime(2026, 11, 30, 0, 0, tzinfo=dt.UTC)
HOSTILE_UA = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


def summary_with(per_hour: list[tuple[dt.datetime, str, int]], hours: int = 24) -> AuditSummary:
    return AuditSummary(
        since=T0,
        until=T0 + dt.timedelta(hours=hours),
        total=sum(n for _, _, n in per_hour),
        refusals=sum(n for _, _, n in per_hour),
        by_event=[],
        by_reason=[],
        top_users=[],
        top_ips=[],
        top_serials=[],
        per_hour=per_hour,
    )


def test_chart_stacks_reasons_per_hour_scaled_to_the_peak() -> None:
    per_hour = [
        (T0, "certificate_revoked", 6),
        (T0, "bad_credentials", 4),
        (T0 + dt.timedelta(hours=3), "certificate_revoked", 5),
    ]
    chart = refusal_chart(per_hour, T0, T0 + dt.timedelta(hours=24))
    assert chart.bucket == "hour" and chart.peak == 10
    assert [(r, n) for r, _, n in chart.legend] == [
        ("certificate_revoked", 11),
        ("bad_credentials", 4),
    ]
    plot = chart.plot_bottom - chart.plot_top
    first = [b for b in chart.bars if b.x == chart.plot_left]
    assert sum(b.height for b in first) == pytest.approx(plot)  # the peak fills the plot
    assert first[0].y + first[0].height == pytest.approx(chart.plot_bottom)  # stacked from 0
    assert first[1].y + first[1].height == pytest.approx(first[0].y)
    later = [b for b in chart.bars if b.x != chart.plot_left]
    assert len(later) == 1 and later[0].height == pytest.approx(plot / 2)
    assert later[0].title == "11-30 03:00 certificate_revoked: 5"
    assert first[0].color != first[1].color


def test_chart_switches_to_days_for_long_windows_and_drops_outside_counts() -> None:
    per_hour = [
        (T0 + dt.timedelta(hours=1), "no_certificate", 2),
        (T0 + dt.timedelta(hours=30), "no_certificate", 3),
        (T0 - dt.timedelta(days=5), "no_certificate", 100),  # before the window
    ]
    chart = refusal_chart(per_hour, T0, T0 + dt.timedelta(days=30))
    assert chart.bucket == "day"
    assert [b.title for b in chart.bars] == ["11-30 no_certificate: 2", "12-01 no_certificate: 3"]
    assert chart.peak == 3


def test_chart_without_refusals_has_no_bars() -> None:
    chart = refusal_chart([], T0, T0 + dt.timedelta(hours=24))
    assert chart.bars == [] and chart.peak == 0 and chart.legend == []


def test_report_escapes_untrusted_strings_and_has_no_external_assets() -> None:
    event = AuditEvent(
        EventKind.REQUEST_REFUSED,
        reason="certificate_revoked",
        user_id="<b>LC</b>",
        user_agent=HOSTILE_UA,
        path="/onre/<x>",
    )
    html = render_report([event], summary_with([(T0, "<evil>", 1)]), {"support_id": ""})
    assert "<script>" not in html and "<b>LC</b>" not in html and "<evil>" not in html
    assert "&lt;b&gt;LC&lt;/b&gt;" in html
    assert "<svg" in html and "<rect" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    detail = render_report([event], None, {"support_id": event.support_id})
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in detail  # the UA is shown, as data
    assert "<script>" not in detail


async def _client(aiohttp_client: object, store_path: Path) -> TestClient[web.Request, web.Application]:
    app = web.Application()
    app.router.add_get("/audit", audit_handler(store_path))
    client: TestClient[web.Request, web.Application] = await aiohttp_client(app)  # type: ignore[operator]
    return client


async def test_handler_filters_and_finds_a_support_id(aiohttp_client: object, tmp_path: Path) -> None:
    now = utcnow()
    revoked = AuditEvent(
        EventKind.REQUEST_REFUSED,
        reason="certificate_revoked",
        time=now - dt.timedelta(minutes=5),
        user_id="LC000001",
        user_agent=HOSTILE_UA,
    )
    bad_pw = AuditEvent(
        EventKind.LOGIN_REFUSED,
        reason="bad_credentials",
        time=now - dt.timedelta(minutes=4),
        user_id="LC000002",
    )
    old = AuditEvent(EventKind.LOGIN, time=now - dt.timedelta(days=3), user_id="LC000003")
    with AuditStore(tmp_path / "audit.db") as s:
        s.append([revoked, bad_pw, old])
    client = await _client(aiohttp_client, tmp_path / "audit.db")

    resp = await client.get("/audit")  # default: the last 24 hours
    html = await resp.text()
    assert resp.status == 200
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["Cache-Control"] == "no-store"
    assert revoked.support_id in html and bad_pw.support_id in html
    assert old.support_id not in html
    assert html.count('class="bar"') == 2

    resp = await client.get("/audit", params={"reason": "bad_credentials", "since": "1h"})
    html = await resp.text()
    assert bad_pw.support_id in html and revoked.support_id not in html

    resp = await client.get("/audit", params={"support_id": revoked.support_id.lower()})
    html = await resp.text()
    assert resp.status == 200 and "Event details" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html

    resp = await client.get("/audit", params={"since": "7d"})
    assert old.support_id in await resp.text()


async def test_handler_rejects_bad_filters_with_400(aiohttp_client: object, tmp_path: Path) -> None:
    AuditStore(tmp_path / "audit.db").close()
    client = await _client(aiohttp_client, tmp_path / "audit.db")
    resp = await client.get("/audit", params={"since": "yesterday<script>"})
    html = await resp.text()
    assert resp.status == 400
    assert "expected a duration" in html and "<script>" not in html
    resp = await client.get("/audit", params={"since": "24h"})
    assert resp.status == 200


async def test_handler_without_a_database_says_so(aiohttp_client: object, tmp_path: Path) -> None:
    client = await _client(aiohttp_client, tmp_path / "missing.db")
    resp = await client.get("/audit")
    assert resp.status == 503
    assert "no audit database" in await resp.text()
    assert not (tmp_path / "missing.db").exists()  # the report never creates it


async def test_handler_on_the_shared_database_filters_by_instance(aiohttp_client: object, pg_url: str) -> None:
    """The admin listener's report reads the PostgreSQL trail through a Backend; instance is a column and filter."""
    import psycopg

    from gateway.config import parse_config
    from gateway.storage import postgres as pg
    from gateway.storage.backends import Backend
    from gateway.storage.pg_audit import SCHEMA

    with psycopg.connect(pg_url, autocommit=True) as conn:
        pg.migrate(conn, [SCHEMA])
    config = parse_config({"instance": "gw-a", "database": pg_url}, Path("/nonexistent/gateway.yaml"))
    now = utcnow()
    a = AuditEvent(EventKind.LOGIN, time=now - dt.timedelta(minutes=2), user_id="LC000001", instance="gw-a")
    b = AuditEvent(EventKind.LOGIN, time=now - dt.timedelta(minutes=1), user_id="LC000002", instance="gw-b")
    with Backend(config) as backend:
        with backend.audit() as store:
            store.append([a, b])
        app = web.Application()
        app.router.add_get("/audit", audit_handler(backend))
        client: TestClient[web.Request, web.Application] = await aiohttp_client(app)  # type: ignore[operator]
        resp = await client.get("/audit", params={"instance": "gw-b"})
        html = await resp.text()
        assert resp.status == 200
        assert b.support_id in html and a.support_id not in html
        assert 'name="instance" value="gw-b"' in html
        resp = await client.get("/audit")
        html = await resp.text()
        assert a.support_id in html and b.support_id in html and "gw-a" in html

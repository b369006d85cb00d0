"""The audit contract's pure helpers: query stripping, serials, times, filters."""

from __future__ import annotations

import datetime as dt

import pytest

from gateway.audit.events import (
    AuditEvent,
    EventKind,
    epoch_ms,
    event_from_dict,
    event_to_dict,
    format_time,
    new_support_id,
    normalize_serial,
    parse_filter,
    parse_when,
    serial_hex,
    strip_query,
)
from gateway.errors import GatewayError

NOW = dt.datetime(2026, 11, 30, 4, 50, 12, 345678, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("/onre/login?password=hunter2&user=LC000001", "/onre/login"),
        ("/nt/a?x", "/nt/a"),
        ("/nt/a#frag?x=1", "/nt/a"),
        ("/jpxcube/", "/jpxcube/"),
        ("", ""),
    ],
)
def test_strip_query_keeps_only_the_path(raw: str, path: str) -> None:
    assert strip_query(raw) == path
    assert "hunter2" not in strip_query(raw)


@pytest.mark.parametrize("text", ["0x1a2b", "1A:2B", "001a2b", " 1A2B ", "1a 2b"])
def test_normalize_serial_accepts_any_hex_spelling(text: str) -> None:
    assert normalize_serial(text) == "1A2B"


def test_normalize_serial_leaves_non_hex_alone() -> None:
    assert normalize_serial("LC000001") == "LC000001"
    assert normalize_serial("00") == "00"
    assert serial_hex(0x1A2B) == "1A2B"
    assert serial_hex(0xF1127) == "0F1127"  # as openssl x509 -serial prints it


def test_format_time_is_utc_iso_with_milliseconds() -> None:
    assert format_time(NOW) == "2026-11-30T04:50:12.345Z"
    jst = NOW.astimezone(dt.timezone(dt.timedelta(hours=9)))
    assert format_time(jst) == "2026-11-30T04:50:12.345Z"
    assert epoch_ms(NOW) == epoch_ms(jst) == int(NOW.timestamp()) * 1000 + 345


def test_event_dict_round_trip_keeps_every_field() -> None:
    event = AuditEvent(
        EventKind.REQUEST_REFUSED,
        reason="certificate_revoked",
        time=NOW.replace(microsecond=345000),
        client_ip="192.0.2.7",
        client_port=51234,
        user_agent="ua\x1b[31m",
        worker=3,
        cert_serial="1A2B",
    )
    data = event_to_dict(event)
    assert data["time"] == "2026-11-30T04:50:12.345Z"
    assert data["event"] == "request_refused"
    assert event_from_dict(data) == event


def test_support_ids_are_short_and_distinct() -> None:
    ids = {new_support_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 12 and i == i.upper() for i in ids)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW - dt.timedelta(minutes=30)),
        ("24h", NOW - dt.timedelta(hours=24)),
        ("7d", NOW - dt.timedelta(days=7)),
        ("2w", NOW - dt.timedelta(weeks=2)),
        ("90s", NOW - dt.timedelta(seconds=90)),
        ("2026-11-01", dt.datetime(2026, 11, 1, tzinfo=dt.UTC)),
        ("2026-11-01T10:00", dt.datetime(2026, 11, 1, 10, tzinfo=dt.UTC)),
        ("2026-11-01T10:00:00+09:00", dt.datetime(2026, 11, 1, 1, tzinfo=dt.UTC)),
        ("2026-11-01T10:00:00.5Z", dt.datetime(2026, 11, 1, 10, 0, 0, 500000, tzinfo=dt.UTC)),
    ],
)
def test_parse_when_relative_and_absolute(text: str, expected: dt.datetime) -> None:
    assert parse_when(text, NOW) == expected


@pytest.mark.parametrize("text", ["24", "h", "-1d", "1y", "yesterday", "2026-13-01", "7 d", ""])
def test_parse_when_rejects_with_a_clear_error(text: str) -> None:
    with pytest.raises(GatewayError, match="expected a duration like 30m"):
        parse_when(text, NOW)


def test_parse_filter_builds_every_field() -> None:
    f = parse_filter(
        {
            "since": "24h",
            "until": "2026-11-30",
            "event": "login_refused",
            "reason": "bad_credentials",
            "user": "LC000001",
            "ip": "192.0.2.7",
            "serial": "0x00ab",
            "support_id": "abc123def456",
            "limit": "5",
        },
        NOW,
    )
    assert f.since == NOW - dt.timedelta(hours=24)
    assert f.until == dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    assert f.event is EventKind.LOGIN_REFUSED
    assert (f.reason, f.user_id, f.client_ip) == ("bad_credentials", "LC000001", "192.0.2.7")
    assert f.cert_serial == "AB"
    assert f.support_id == "ABC123DEF456"
    assert f.limit == 5


def test_parse_filter_defaults_mean_any() -> None:
    f = parse_filter({}, NOW, default_limit=7)
    assert (f.since, f.until, f.event, f.reason, f.limit) == (None, None, None, "", 7)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"event": "nope"}, "expected one of handshake_failed"),
        ({"limit": "0"}, "limit '0'"),
        ({"limit": "ten"}, "limit 'ten'"),
        ({"limit": "²"}, "limit '²'"),
        ({"since": "1h", "until": "2h"}, "must be before"),
        ({"since": "soon"}, "expected a duration"),
    ],
)
def test_parse_filter_rejects_bad_values(params: dict[str, str], message: str) -> None:
    with pytest.raises(GatewayError, match=message):
        parse_filter(params, NOW)

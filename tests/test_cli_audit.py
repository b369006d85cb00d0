"""`gateway audit list|summary|show|prune` through the real CLI entry point."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path

import pytest

from gateway.audit import signing
from gateway.audit.events import AuditEvent, AuditFilter, EventKind, utcnow
from gateway.audit.store import AuditStore, AuditSummary
from gateway.cli import main
from gateway.cli.audit import format_table, hourly_chart, printable

HOSTILE_UA = "evil\x1b[2J\x1b]0;owned\x07\u202e\r\nforged line"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text("audit:\n  database: audit.db\n", encoding="utf-8")
    signing.generate_signing_key(tmp_path / "audit-signing.key")  # prune signs its anchors
    return path


@pytest.fixture
def events(config: Path) -> dict[str, AuditEvent]:
    now = utcnow()
    ev = {
        "revoked": AuditEvent(
            EventKind.REQUEST_REFUSED,
            reason="certificate_revoked",
            time=now - dt.timedelta(hours=2),
            client_ip="192.0.2.7",
            client_port=51000,
            user_id="LC000001",
            cert_serial="5A17F00D",
            method="GET",
            path="/onre/\x1b[2Jx",  # request.path is percent-decoded: controls can arrive
            user_agent=HOSTILE_UA,
        ),
        "badpw": AuditEvent(
            EventKind.LOGIN_REFUSED,
            reason="bad_credentials",
            time=now - dt.timedelta(hours=1),
            client_ip="2001:db8::1",
            client_port=443,
            user_id="LC000002",
            user_agent='=HYPERLINK("http://x")',
        ),
        "login": AuditEvent(EventKind.LOGIN, time=now - dt.timedelta(minutes=30), user_id="LC000001"),
        "old": AuditEvent(
            EventKind.REQUEST_REFUSED,
            reason="no_certificate",
            time=now - dt.timedelta(days=500),
            client_ip="198.51.100.1",
        ),
    }
    with AuditStore(config.parent / "audit.db") as s:
        # In the order they happened: prune deletes a chain's head up to the first recent event.
        s.append(sorted(ev.values(), key=lambda e: e.time))
    return ev


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["audit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_list_table_newest_first_and_escaped(
    capsys: pytest.CaptureFixture[str], config: Path, events: dict[str, AuditEvent]
) -> None:
    code, out, _ = run(capsys, "list", "--config", str(config))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("TIME (JST)")
    order = [k for line in lines[1:] for k, e in events.items() if e.support_id in line]
    assert order == ["login", "badpw", "revoked", "old"]
    assert "[2001:db8::1]:443" in out and "192.0.2.7:51000" in out
    assert "\x1b" not in out and "\r" not in out
    assert "GET /onre/\\x1b[2Jx" in out


def test_list_filters_like_the_issue_says(
    capsys: pytest.CaptureFixture[str], config: Path, events: dict[str, AuditEvent]
) -> None:
    cases = {
        ("--reason", "certificate_revoked"): {"revoked"},
        ("--user", "LC000001"): {"revoked", "login"},
        ("--ip", "2001:db8::1"): {"badpw"},
        ("--serial", "5a:17:f0:0d"): {"revoked"},
        ("--event", "login"): {"login"},
        ("--since", "24h"): {"revoked", "badpw", "login"},
        ("--until", "90m"): {"revoked", "old"},
        ("--limit", "1"): {"login"},
    }
    for args, expected in cases.items():
        code, out, _ = run(capsys, "list", "--config", str(config), "--format", "json", *args)
        assert code == 0
        ids = {json.loads(line)["support_id"] for line in out.splitlines()}
        assert ids == {events[k].support_id for k in expected}, args


def test_list_json_and_csv_are_for_tools(
    capsys: pytest.CaptureFixture[str], config: Path, events: dict[str, AuditEvent]
) -> None:
    _, out, _ = run(capsys, "list", "--config", str(config), "--format", "json", "--reason",
                    "certificate_revoked")  # fmt: skip
    [row] = [json.loads(line) for line in out.splitlines()]
    assert row["user_agent"] == HOSTILE_UA  # exact data, escaped by JSON itself
    assert row["cert_serial"] == "5A17F00D" and row["client_port"] == 51000
    assert row["time"].endswith("Z")

    _, out, _ = run(capsys, "list", "--config", str(config), "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 4
    by_id = {r["support_id"]: r for r in rows}
    assert by_id[events["revoked"].support_id]["user_agent"] == HOSTILE_UA
    # A formula in an attacker-chosen cell is defused for spreadsheet programs.
    assert by_id[events["badpw"].support_id]["user_agent"] == '\'=HYPERLINK("http://x")'


def test_list_rejects_bad_options_with_one_line(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, _, err = run(capsys, "list", "--config", str(config), "--since", "last week")
    assert code == 2
    assert err.startswith("error: 'last week': expected a duration like 30m")
    assert len(err.splitlines()) == 1
    code, _, err = run(capsys, "list", "--config", str(config), "--event", "hack")
    assert code == 2 and "expected one of" in err


def test_list_without_a_database_says_so(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, _, err = run(capsys, "list", "--config", str(config))
    assert code == 2 and "no audit database" in err
    assert not (config.parent / "audit.db").exists()


def test_show_finds_the_event_behind_a_support_id(
    capsys: pytest.CaptureFixture[str], config: Path, events: dict[str, AuditEvent]
) -> None:
    e = events["revoked"]
    code, out, _ = run(capsys, "show", e.support_id.lower(), "--config", str(config))
    assert code == 0
    fields = dict(line.split(None, 1) for line in out.splitlines() if len(line.split(None, 1)) == 2)
    assert fields["support_id"] == e.support_id
    assert fields["reason"] == "certificate_revoked"
    assert fields["cert_serial"] == "5A17F00D"
    assert fields["client_ip"] == "192.0.2.7"
    assert "\x1b" not in out and "\\x1b[2J" in out
    code, out, _ = run(capsys, "show", e.support_id, "--config", str(config), "--format", "json")
    assert json.loads(out)["user_agent"] == HOSTILE_UA
    code, _, err = run(capsys, "show", "FFFFFFFFFFFF", "--config", str(config))
    assert code == 2 and "no audit event has support ID FFFFFFFFFFFF" in err


def test_summary_counts_and_charts_refusals(
    capsys: pytest.CaptureFixture[str], config: Path, events: dict[str, AuditEvent]
) -> None:
    code, out, _ = run(capsys, "summary", "--config", str(config), "--since", "7d")
    assert code == 0
    assert "Events: 3   refusals: 2" in out
    assert "certificate_revoked" in out and "bad_credentials" in out
    assert "no_certificate" not in out  # 500 days old
    assert "Refusals per hour (JST)" in out and "█" in out
    code, out, _ = run(capsys, "summary", "--config", str(config), "--format", "json")
    data = json.loads(out)
    assert data["by_reason"] == {"certificate_revoked": 1, "bad_credentials": 1}
    assert data["top_users"] == {"LC000001": 1, "LC000002": 1}
    assert data["top_serials"] == {"5A17F00D": 1}


def test_prune_applies_retention_and_refuses_a_typo(
    capsys: pytest.CaptureFixture[str], config: Path, events: dict[str, AuditEvent]
) -> None:
    code, _, err = run(capsys, "prune", "--config", str(config), "--older-than", "4m")
    assert code == 2 and "younger than a day" in err
    code, out, _ = run(capsys, "prune", "--config", str(config), "--older-than", "400d")
    assert code == 0 and out.startswith("deleted 1 audit event recorded before ")
    with AuditStore(config.parent / "audit.db", readonly=True) as s:
        left = s.query(AuditFilter())
    assert events["old"].support_id not in {e.support_id for e in left}
    assert {events[k].support_id for k in ("revoked", "badpw", "login")} < {e.support_id for e in left}
    assert left[0].event is EventKind.ADMIN_ACTION and left[0].actor.startswith("cli:")


def test_every_audit_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("list", "summary", "show", "prune", "verify", "export", "pubkey"):
        with pytest.raises(SystemExit) as exc:
            main(["audit", command, "--help"])
        assert exc.value.code == 0
        assert "--config FILE" in capsys.readouterr().out


def test_printable_escapes_terminal_controls_but_keeps_japanese() -> None:
    assert printable("a\x1b[31mb") == "a\\x1b[31mb"
    assert printable("\u202e\r\n\t") == "\\u202e\\r\\n\\t"
    assert printable("証明書 LC000001") == "証明書 LC000001"
    assert printable("a\\x1b") == "a\\\\x1b"  # a literal backslash cannot fake an escape


def test_table_clips_long_cells() -> None:
    e = AuditEvent(EventKind.REQUEST_REFUSED, method="GET", path="/onre/" + "a" * 500)
    row = format_table([e]).splitlines()[1]
    assert "…" in row and len(row) < 300


def test_hourly_chart_one_line_per_day_scaled_to_the_peak() -> None:
    since = dt.datetime(2026, 11, 29, 22, 30, tzinfo=dt.UTC)
    until = dt.datetime(2026, 11, 30, 2, 0, tzinfo=dt.UTC)
    summary = AuditSummary(
        since, until, 9, 9, [], [], [], [], [],
        per_hour=[
            (dt.datetime(2026, 11, 29, 23, tzinfo=dt.UTC), "no_certificate", 1),
            (dt.datetime(2026, 11, 30, 1, tzinfo=dt.UTC), "no_certificate", 6),
            (dt.datetime(2026, 11, 30, 1, tzinfo=dt.UTC), "bad_credentials", 2),
        ],
    )  # fmt: skip
    header, day = hourly_chart(summary)  # 07:30-11:00 JST: one JST day
    assert "█ = 8" in header
    assert day == "  2026-11-30  " + " " * 7 + ".▁.█" + " " * 13 + "  9"


def _backend_config(tmp_path: Path, store_backend: str, request: pytest.FixtureRequest) -> Path:
    """A config whose trail is the SQLite file or a fresh, migrated PostgreSQL database."""
    path = tmp_path / "gateway.yaml"
    signing.generate_signing_key(tmp_path / "audit-signing.key")
    if store_backend == "sqlite":
        path.write_text("instance: gw-a\naudit:\n  database: audit.db\n", encoding="utf-8")
        return path
    import psycopg

    from gateway.storage import postgres as pg
    from gateway.storage.pg_audit import SCHEMA

    url = request.getfixturevalue("pg_url")
    with psycopg.connect(url, autocommit=True) as conn:
        pg.migrate(conn, [SCHEMA])
    path.write_text(f"instance: gw-a\ndatabase: {url}\n", encoding="utf-8")
    return path


def test_instance_is_a_column_and_a_filter_on_both_backends(
    tmp_path: Path, store_backend: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.config import load_config
    from gateway.storage.backends import Backend

    config_file = _backend_config(tmp_path, store_backend, request)
    now = utcnow()
    a = AuditEvent(EventKind.LOGIN_REFUSED, reason="bad_credentials", time=now, user_id="LC1", instance="gw-a")
    b = AuditEvent(EventKind.LOGIN_REFUSED, reason="bad_credentials", time=now, user_id="LC2", instance="gw-b")
    with Backend(load_config(config_file)) as backend, backend.audit() as store:
        store.append([a, b])

    code, out, _ = run(capsys, "list", "--config", str(config_file), "--instance", "gw-b")
    assert code == 0 and "INSTANCE" in out.splitlines()[0]
    assert b.support_id in out and a.support_id not in out and "gw-b" in out

    code, out, _ = run(capsys, "list", "--config", str(config_file), "--format", "json")
    assert sorted(json.loads(line)["instance"] for line in out.splitlines()) == ["gw-a", "gw-b"]

    code, out, _ = run(capsys, "summary", "--config", str(config_file), "--instance", "gw-a", "--format", "json")
    assert json.loads(out)["top_users"] == {"LC1": 1}

    code, out, _ = run(capsys, "show", "--config", str(config_file), a.support_id)
    assert code == 0 and "gw-a" in out
    assert run(capsys, "show", "--config", str(config_file), a.support_id, "--instance", "gw-b")[0] != 0

    # prune goes through the same backend (for PostgreSQL: the marker the trigger honours)
    code, out, _ = run(capsys, "prune", "--config", str(config_file), "--older-than", "1d")
    assert code == 0 and "deleted 0 audit events" in out

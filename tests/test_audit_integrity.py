"""The audit chain in the stores: tampering done directly in the database is named by `gateway audit verify`.

Every test runs on both backends. The attacker disables the append-only
guards first (drops SQLite's triggers, or disables PostgreSQL's as the
superuser), as someone with write access to the database would.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import signing
from gateway.audit.events import AuditEvent, AuditFilter, EventKind, utcnow
from gateway.audit.report import load_report
from gateway.audit.store import CHAINED_FIELDS
from gateway.audit.trailstate import StateCache, TrailState
from gateway.cli import main
from gateway.config import load_config
from gateway.storage import postgres as pg
from gateway.storage.backends import Backend
from gateway.storage.interfaces import AuditStoreProtocol
from gateway.storage.pg_audit import SCHEMA

COLUMNS = ", ".join(("time_ms", *CHAINED_FIELDS))


@dataclass
class Trail:
    """A config naming a trail on one backend, its signing key, and raw SQL access for the attacker."""

    config: Path
    backend: str
    key: Ed25519PrivateKey
    url: str = ""

    def store(self) -> Iterator[AuditStoreProtocol]:
        with Backend(load_config(self.config)) as backend, backend.audit() as store:
            yield store

    def append(self, events: list[AuditEvent]) -> None:
        for store in self.store():
            store.append(events)

    def checkpoint(self, key: Ed25519PrivateKey | None = None, when: dt.datetime | None = None) -> None:
        for store in self.store():
            assert store.checkpoint("gw-a", key or self.key, when or utcnow()) is not None

    def tamper(self, *statements: str) -> None:
        if self.backend == "sqlite":
            conn = sqlite3.connect(self.config.parent / "audit.db", isolation_level=None)
            try:
                for trigger in ("events_no_update", "events_no_delete", "audit_marks_no_delete"):
                    conn.execute(f"DROP TRIGGER IF EXISTS {trigger}")
                for statement in statements:
                    conn.execute(statement)
            finally:
                conn.close()
            return
        with psycopg.connect(self.url, autocommit=True) as conn:  # the test server's superuser
            conn.execute("ALTER TABLE events DISABLE TRIGGER USER")
            conn.execute("ALTER TABLE audit_marks DISABLE TRIGGER USER")
            for statement in statements:
                conn.execute(statement)

    def drop_unique(self) -> None:
        self.tamper("DROP INDEX events_chain", *(["DROP INDEX events_once"] if self.backend == "postgres" else []))


@pytest.fixture
def trail(tmp_path: Path, store_backend: str, request: pytest.FixtureRequest) -> Trail:
    """Six events of gw-a (seq 1-6), a checkpoint at seq 4 signed by the audit key."""
    path = tmp_path / "gateway.yaml"
    key = signing.generate_signing_key(tmp_path / "audit-signing.key")
    url = ""
    if store_backend == "sqlite":
        path.write_text("instance: gw-a\naudit:\n  database: audit.db\n", encoding="utf-8")
    else:
        url = request.getfixturevalue("pg_url")
        with psycopg.connect(url, autocommit=True) as conn:
            pg.migrate(conn, [SCHEMA])
        path.write_text(f"instance: gw-a\ndatabase: {url}\n", encoding="utf-8")
    t = Trail(path, store_backend, key, url)
    t.append([event(i) for i in range(1, 5)])
    t.checkpoint()
    t.append([event(i) for i in range(5, 7)])
    return t


def event(i: int, *, days: float = 0) -> AuditEvent:
    return AuditEvent(
        EventKind.LOGIN_REFUSED,
        reason="bad_credentials",
        time=utcnow() - dt.timedelta(days=days, seconds=100 - i),
        user_id=f"LC{i:06d}",
        client_ip="192.0.2.7",
        client_port=50000 + i,
        instance="gw-a",
        worker=0,
    )


def verify(capsys: pytest.CaptureFixture[str], trail: Trail, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["audit", "verify", "--config", str(trail.config), *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_an_untouched_trail_verifies(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    code, out = verify(capsys, trail)
    assert code == 0, out
    assert "gw-a: 6 events, from genesis to seq 6; 1 good signatures, signed up to seq 4" in out
    code, out = verify(capsys, trail, "--format", "json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_a_changed_reason_is_named(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    trail.tamper("UPDATE events SET reason = 'ok' WHERE seq = 2")
    code, out = verify(capsys, trail)
    assert code == 1
    assert "gw-a: modified at seq 2" in out and "FAILED: 1 finding(s)" in out


def test_a_deleted_event_is_named(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    trail.tamper("DELETE FROM events WHERE seq = 3")
    code, out = verify(capsys, trail)
    assert code == 1 and "gw-a: removed at seq 3" in out


def test_a_forged_event_is_named(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    trail.drop_unique()
    forged = COLUMNS.replace("reason", "'ok'").replace("support_id", "'FORGED000000'")
    trail.tamper(f"INSERT INTO events ({COLUMNS}) SELECT {forged} FROM events WHERE seq = 3")
    code, out = verify(capsys, trail)
    assert code == 1 and "gw-a: inserted at seq 3 (support ID FORGED000000)" in out


def test_two_swapped_events_are_named(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    trail.drop_unique()
    other = "CASE WHEN events.seq = 2 THEN 3 ELSE 2 END"
    trail.tamper(
        f"CREATE TABLE swap AS SELECT {COLUMNS} FROM events WHERE seq IN (2, 3)",
        f"UPDATE events SET ({COLUMNS}) = (SELECT {COLUMNS} FROM swap WHERE swap.seq = {other}) WHERE seq IN (2, 3)",
    )
    code, out = verify(capsys, trail)
    assert code == 1 and "gw-a: reordered at seq 2" in out


def test_a_tail_truncated_after_a_checkpoint_is_named(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    trail.tamper("DELETE FROM events WHERE seq >= 3")
    code, out = verify(capsys, trail)
    assert code == 1 and "gw-a: truncated at seq 3" in out and "checkpoint at seq 4" in out


def test_a_replaced_chain_signed_by_another_key_is_named(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    trail.tamper("DELETE FROM events", "DELETE FROM audit_marks", "DELETE FROM audit_chain_heads")
    trail.append([event(i) for i in range(1, 4)])
    trail.checkpoint(Ed25519PrivateKey.generate())
    code, out = verify(capsys, trail)
    assert code == 1 and "gw-a: bad_signature at seq 3" in out and "not by the audit key" in out


def test_a_prune_leaves_a_trail_that_verifies(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    trail.append([event(i, days=400) for i in range(7, 9)])  # recorded late, but old: kept (after seq 6)
    old = [event(i, days=500) for i in range(1, 3)]
    trail.tamper("DELETE FROM events", "DELETE FROM audit_marks", "DELETE FROM audit_chain_heads")
    trail.append([*old, *(event(i) for i in range(3, 6))])
    trail.checkpoint()
    capsys.readouterr()
    assert main(["audit", "prune", "--config", str(trail.config), "--older-than", "400d"]) == 0
    assert "deleted 2 audit events" in capsys.readouterr().out
    code, out = verify(capsys, trail)
    assert code == 0, out
    assert "gw-a: 3 events, from prune at seq 2" in out
    # Deleting the anchor's successor is still seen.
    trail.tamper("DELETE FROM events WHERE seq = 3")
    code, out = verify(capsys, trail)
    assert code == 1 and "removed at seq 3" in out


def test_export_verifies_offline_and_a_changed_line_does_not(
    capsys: pytest.CaptureFixture[str], trail: Trail, tmp_path: Path
) -> None:
    export, pub = tmp_path / "export.jsonl", tmp_path / "audit.pub"
    assert main(["audit", "export", "--config", str(trail.config), "--out", str(export)]) == 0
    assert main(["audit", "pubkey", "--config", str(trail.config), "--out", str(pub)]) == 0
    capsys.readouterr()
    assert main(["audit", "verify", "--file", str(export), "--pubkey", str(pub)]) == 0
    assert "OK: every chain and checkpoint verifies" in capsys.readouterr().out
    lines = export.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["record"] == "mark" and len(lines) == 7
    export.write_text("\n".join(line.replace("LC000005", "LC000099") for line in lines) + "\n", encoding="utf-8")
    assert main(["audit", "verify", "--file", str(export), "--pubkey", str(pub)]) == 1
    assert "gw-a: modified at seq 5" in capsys.readouterr().out


def test_verify_since_starts_at_the_checkpoint_before(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    trail.append([event(7)])
    trail.checkpoint(when=utcnow() - dt.timedelta(hours=2))
    trail.append([event(8), event(9)])
    code, out = verify(capsys, trail, "--since", "1h")
    assert code == 0, out
    assert "gw-a: 2 events, from checkpoint at seq 7" in out
    trail.tamper("DELETE FROM events WHERE seq = 8")
    code, out = verify(capsys, trail, "--since", "1h")
    assert code == 1 and "removed at seq 8" in out


def test_verify_errors_are_one_line(capsys: pytest.CaptureFixture[str], trail: Trail, tmp_path: Path) -> None:
    code = main(["audit", "verify", "--file", str(tmp_path / "nope.jsonl")])
    err = capsys.readouterr().err
    assert code != 0 and "--pubkey" in err and "Traceback" not in err
    (tmp_path / "bad.jsonl").write_text("{not json\n", encoding="utf-8")
    code = main(
        ["audit", "verify", "--file", str(tmp_path / "bad.jsonl"), "--pubkey", str(tmp_path / "audit-signing.key")]
    )
    err = capsys.readouterr().err
    assert code != 0 and "line 1: not JSON" in err and len(err.strip().splitlines()) == 1


async def test_the_writer_signs_its_head_at_close(capsys: pytest.CaptureFixture[str], trail: Trail) -> None:
    from gateway.audit.writer import AuditLog

    audit = AuditLog(load_config(trail.config), worker=0, checkpoints=True)
    await audit.start()
    try:
        audit.record(event(7))
    finally:
        await audit.aclose()
    code, out = verify(capsys, trail)
    assert code == 0 and "seq 7; 2 good signatures, signed up to seq 7" in out, out


# -- The verification line of the report pages (gateway.audit.trailstate) --------------------


def page_state(trail: Trail, cache: StateCache, since: dt.datetime | None = None) -> TrailState:
    now = utcnow()
    f = AuditFilter(since=since or now - dt.timedelta(hours=24), until=now + dt.timedelta(hours=1))
    with Backend(load_config(trail.config)) as backend:
        _, _, state = load_report(backend, f, now, cache)
    assert state is not None
    return state


def test_the_pages_say_a_clean_period_is_verified(trail: Trail) -> None:
    state = page_state(trail, StateCache())
    assert state.ok and state.instances == ("gw-a",) and state.unsigned == 2
    assert state.ja.startswith("検証済み") and state.en.startswith("Verified:")


def test_the_pages_name_the_first_finding_and_the_command(trail: Trail) -> None:
    trail.tamper("UPDATE events SET reason = 'ok' WHERE seq = 2")
    state = page_state(trail, StateCache())
    assert not state.ok and state.findings == 1
    assert state.first is not None and (state.first.kind, state.first.instance, state.first.seq) == (
        "modified",
        "gw-a",
        2,
    )
    assert state.first.support_id and state.first.support_id in state.en
    assert f"gateway audit verify --config {trail.config} --since " in state.en
    assert state.ja.startswith("改ざんの疑い: 1 件")


def test_paging_does_not_verify_again_and_new_events_are_verified_alone(trail: Trail) -> None:
    clock = [0.0]
    cache = StateCache(clock=lambda: clock[0])
    since = utcnow() - dt.timedelta(hours=24)
    assert page_state(trail, cache, since).ok and cache.verified_events == 6
    assert page_state(trail, cache, since).ok and cache.verified_events == 6  # the heads did not move
    trail.append([event(7)])
    assert page_state(trail, cache, since).ok and cache.verified_events == 7  # seq 7 only
    trail.tamper("UPDATE events SET reason = 'ok' WHERE seq = 2")
    trail.append([event(8)])
    assert page_state(trail, cache, since).ok  # verified a moment ago: only seq 8 is read
    clock[0] += 301  # past max_age: the period is verified in full again
    trail.append([event(9)])
    state = page_state(trail, cache, since)
    assert not state.ok and state.first is not None and state.first.seq == 2


def test_the_pages_verify_from_the_last_checkpoint_before_the_period(trail: Trail) -> None:
    since = utcnow()
    trail.append([event(150)])  # seq 7, 50 s from now: the only event in the period
    cache = StateCache()
    state = page_state(trail, cache, since)
    assert state.ok and cache.verified_events == 3  # seq 5-7, after the checkpoint at seq 4
    trail.tamper("UPDATE events SET reason = 'ok' WHERE seq = 6")
    state = page_state(trail, StateCache(), since)
    assert not state.ok and state.first is not None and state.first.seq == 6


def test_the_pages_without_a_signing_key_say_so(trail: Trail) -> None:
    (trail.config.parent / "audit-signing.key").unlink()
    state = page_state(trail, StateCache())
    assert not state.ok and not state.findings and "no audit signing key" in state.en


def test_a_long_verification_does_not_hold_the_page(trail: Trail) -> None:
    """Past the budget the line says "running"; the background verifier finishes it for the next view."""
    import threading

    cache = StateCache(budget=0.0)
    gate = threading.Event()

    def busy() -> TrailState:  # holds the one verifier thread until the gate opens
        gate.wait(10)
        return TrailState(True)

    cache.submit(("busy",), busy)
    now = utcnow()
    f = AuditFilter(since=now - dt.timedelta(hours=24), until=now + dt.timedelta(hours=1))
    try:
        with Backend(load_config(trail.config)) as backend:
            _, _, state = load_report(backend, f, now, cache)
            assert state is not None and state.pending and not state.ok
            assert "実行中" in state.ja and "Verifying this period in the background" in state.en
            gate.set()
            for _ in range(200):
                if cache.verified_events:
                    break
                threading.Event().wait(0.05)
            _, _, state = load_report(backend, f, now, cache)
            assert state is not None and state.ok and not state.pending and cache.verified_events == 6
    finally:
        gate.set()
        cache.close()

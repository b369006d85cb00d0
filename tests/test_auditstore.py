"""The SQLite audit store: round trips, filters, append-only, summaries, many writers."""

from __future__ import annotations

import dataclasses
import datetime as dt
import multiprocessing
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.audit.events import AuditEvent, AuditFilter, EventKind
from gateway.audit.store import AuditStore
from gateway.errors import StoreError

T0 = dt.datetime(2026, 11, 30, 4, 0, tzinfo=dt.UTC)


def refusal(minutes: float = 0, **fields: object) -> AuditEvent:
    base = AuditEvent(
        EventKind.REQUEST_REFUSED,
        reason="certificate_revoked",
        time=T0 + dt.timedelta(minutes=minutes),
        client_ip="192.0.2.7",
        client_port=50000,
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
        backend="tdnet",
        method="GET",
        path="/onre/",
        user_id="LC000001",
        cert_subject="LC000001",
        cert_serial="1A2B",
        cert_issuer="Tokyo Stock Exchange SSO CA",
        cert_fingerprint="ab" * 32,
        cert_not_after="2027-11-30T00:00:00.000Z",
        user_agent="Mozilla/5.0",
        worker=1,
    )
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuditStore]:
    with AuditStore(tmp_path / "audit.db") as s:
        yield s


def test_round_trip_keeps_every_field_and_lists_newest_first(store: AuditStore) -> None:
    hostile = "x\x1b[2J'; DROP TABLE events; --\u202e\n"
    events = [
        refusal(0),
        refusal(1, user_agent=hostile),
        AuditEvent(EventKind.LOGIN, time=T0 + dt.timedelta(minutes=2)),
    ]
    store.append(events)
    found = store.query(AuditFilter())
    assert found == list(reversed(events))
    assert found[1].user_agent == hostile
    assert found[0].client_port is None and found[0].worker is None


def test_time_is_stored_as_iso_text_with_milliseconds_and_epoch(tmp_path: Path) -> None:
    with AuditStore(tmp_path / "audit.db") as s:
        s.append([refusal(0, time=T0.replace(microsecond=123456))])
    conn = sqlite3.connect(tmp_path / "audit.db")
    row = conn.execute("SELECT time, time_ms FROM events").fetchone()
    conn.close()
    assert row == ("2026-11-30T04:00:00.123Z", int(T0.timestamp()) * 1000 + 123)


def test_wal_mode_and_indexes(tmp_path: Path) -> None:
    AuditStore(tmp_path / "audit.db").close()
    conn = sqlite3.connect(tmp_path / "audit.db")
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    indexed = {r[0] for r in conn.execute("SELECT sql FROM sqlite_master WHERE type='index'")}
    conn.close()
    assert mode == "wal"
    text = " ".join(indexed)
    for column in ("time_ms", "support_id", "reason", "user_id", "client_ip", "cert_serial", "event"):
        assert f"({column}" in text


@pytest.mark.parametrize(
    ("f", "expected"),
    [
        (AuditFilter(reason="bad_credentials"), ["b"]),
        (AuditFilter(user_id="LC000002"), ["b"]),
        (AuditFilter(client_ip="198.51.100.9"), ["c"]),
        (AuditFilter(cert_serial="0x00ff:ee"), ["c"]),
        (AuditFilter(event=EventKind.LOGIN_REFUSED), ["b"]),
        (AuditFilter(since=T0 + dt.timedelta(minutes=1)), ["c", "b"]),
        (AuditFilter(until=T0 + dt.timedelta(minutes=1)), ["a"]),
        (AuditFilter(support_id="SUPPORT00000A"), ["a"]),
        (AuditFilter(limit=2), ["c", "b"]),
        (AuditFilter(user_id="LC000001", client_ip="192.0.2.7"), ["a"]),
        (AuditFilter(user_id="LC000002", client_ip="198.51.100.9"), []),
        (AuditFilter(), ["c", "b", "a"]),
    ],
)
def test_filters_pick_exactly_their_events(store: AuditStore, f: AuditFilter, expected: list[str]) -> None:
    store.append(
        [
            refusal(0, support_id="SUPPORT00000A", detail="a"),
            refusal(
                1,
                event=EventKind.LOGIN_REFUSED,
                reason="bad_credentials",
                user_id="LC000002",
                support_id="SUPPORT00000B",
                detail="b",
            ),
            refusal(2, client_ip="198.51.100.9", cert_serial="FFEE", detail="c"),
        ]
    )
    assert [e.detail for e in store.query(f)] == expected


def test_get_finds_the_event_behind_a_support_id(store: AuditStore) -> None:
    events = [refusal(i) for i in range(5)]
    store.append(events)
    assert store.get(events[3].support_id.lower()) == events[3]
    assert store.get("000000000000") is None


def test_a_repeated_support_id_is_stored_not_rejected(store: AuditStore) -> None:
    store.append([refusal(0, support_id="AAAAAAAAAAAA", detail="first")])
    store.append([refusal(1, support_id="AAAAAAAAAAAA", detail="second")])
    assert store.count() == 2
    got = store.get("AAAAAAAAAAAA")
    assert got is not None and got.detail == "second"


def test_update_and_delete_are_refused(tmp_path: Path) -> None:
    with AuditStore(tmp_path / "audit.db") as s:
        s.append([refusal(0)])
    conn = sqlite3.connect(tmp_path / "audit.db")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE events SET reason = 'ok'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM events")
    assert conn.execute("SELECT reason FROM events").fetchall() == [("certificate_revoked",)]
    conn.close()


def test_prune_deletes_only_older_events_and_records_itself(store: AuditStore) -> None:
    store.append([refusal(m) for m in (0, 10, 20, 30)])
    deleted = store.prune(T0 + dt.timedelta(minutes=15), actor="cli:root")
    assert deleted == 2
    left = store.query(AuditFilter())
    assert [e.event for e in left] == [
        EventKind.ADMIN_ACTION,
        EventKind.REQUEST_REFUSED,
        EventKind.REQUEST_REFUSED,
    ]
    assert left[0].reason == "audit_pruned"
    assert left[0].actor == "cli:root"
    assert left[0].detail.startswith("2 events before 2026-11-30T04:15:00.000Z")
    # The permit does not outlive the prune: plain deletes are refused again.
    conn = sqlite3.connect(store.path)
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("DELETE FROM events")
    conn.close()


def test_prune_with_nothing_old_deletes_nothing(store: AuditStore) -> None:
    store.append([refusal(0)])
    assert store.prune(T0 - dt.timedelta(days=1)) == 0
    assert store.count() == 2  # the refusal and the prune record


def test_readonly_store_refuses_to_write_or_create(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no audit database"):
        AuditStore(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()
    AuditStore(tmp_path / "audit.db").close()
    with AuditStore(tmp_path / "audit.db", readonly=True) as ro:
        with pytest.raises(StoreError, match="read-only"):
            ro.append([refusal(0)])
        assert ro.query(AuditFilter()) == []


def test_a_file_that_is_not_an_audit_database_is_an_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=r"junk\.db"):
        AuditStore(junk)
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(StoreError, match="not an audit database"):
        AuditStore(empty, readonly=True)


def test_summary_counts_refusals_in_the_window(store: AuditStore) -> None:
    store.append(
        [
            refusal(5, reason="certificate_revoked", cert_serial="AA"),
            refusal(6, reason="certificate_revoked", cert_serial="AA"),
            refusal(70, reason="bad_credentials", user_id="LC000002", client_ip="198.51.100.9"),
            AuditEvent(EventKind.LOGIN, user_id="LC000003", time=T0 + dt.timedelta(minutes=71)),
            refusal(24 * 60, reason="no_certificate"),  # outside the window (until exclusive)
            refusal(-1, reason="no_certificate"),  # before the window
        ]
    )
    s = store.summary(T0, T0 + dt.timedelta(days=1))
    assert (s.total, s.refusals) == (4, 3)
    assert s.by_reason == [("certificate_revoked", 2), ("bad_credentials", 1)]
    assert dict(s.by_event) == {"request_refused": 3, "login": 1}
    assert s.top_users == [("LC000001", 2), ("LC000002", 1)]  # refusals only: no LC000003
    assert s.top_ips == [("192.0.2.7", 2), ("198.51.100.9", 1)]
    assert s.top_serials == [("AA", 2), ("1A2B", 1)]
    assert s.per_hour == [
        (T0, "certificate_revoked", 2),
        (T0 + dt.timedelta(hours=1), "bad_credentials", 1),
    ]
    narrowed = store.summary(T0, T0 + dt.timedelta(days=1), match=AuditFilter(user_id="LC000002"))
    assert (narrowed.total, narrowed.by_reason) == (1, [("bad_credentials", 1)])
    top1 = store.summary(T0, T0 + dt.timedelta(days=1), top=1)
    assert top1.by_reason == [("certificate_revoked", 2)]


def test_two_stores_on_one_file_interleave_safely(tmp_path: Path) -> None:
    a, b = AuditStore(tmp_path / "audit.db"), AuditStore(tmp_path / "audit.db")

    def write(store: AuditStore, tag: str) -> None:
        for i in range(50):
            store.append([refusal(i, detail=tag) for _ in range(10)])

    threads = [threading.Thread(target=write, args=(s, t)) for s, t in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert a.count() == b.count() == 1000
    assert len(b.query(AuditFilter(limit=2000))) == 1000
    a.close()
    b.close()


def _write_in_process(path: str, tag: str, total: int) -> None:
    with AuditStore(path) as store:
        for start in range(0, total, 50):
            store.append([refusal(0, detail=f"{tag}{i}") for i in range(start, start + 50)])


def test_two_processes_write_every_event(tmp_path: Path) -> None:
    path = str(tmp_path / "audit.db")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_in_process, args=(path, t, 2000)) for t in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with AuditStore(path, readonly=True) as s:
        details = {e.detail for e in s.query(AuditFilter(limit=10_000))}
        assert s.count() == 4000
    assert details == {f"{t}{i}" for t in "ab" for i in range(2000)}


def test_the_audit_database_is_created_0600_like_gateway_db(tmp_path: Path) -> None:
    """The trail names users, addresses and certificates: only the gateway's user may read it."""
    import os
    import stat

    from gateway.access.users import UserStore

    old = os.umask(0o022)
    try:
        with AuditStore(tmp_path / "audit.db") as store:
            store.append([AuditEvent(event=EventKind.LOGIN, reason="ok", user_id="LC000001")])
        UserStore(tmp_path / "gateway.db").close()
    finally:
        os.umask(old)
    for name in ("audit.db", "audit.db-wal", "gateway.db"):
        path = tmp_path / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
    assert (tmp_path / "audit.db").exists()

"""The audit stores: round trips, filters, append-only, summaries, many writers.

The tests taking the ``store`` fixture run on both backends (the SQLite file
and the shared PostgreSQL table); the others check what only SQLite has
(the file, its mode, its migration, several processes on one file).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import multiprocessing
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import chain
from gateway.audit.events import AuditEvent, AuditFilter, EventKind
from gateway.audit.store import AuditStore
from gateway.errors import StoreError
from gateway.storage import postgres
from gateway.storage.interfaces import AuditStoreProtocol
from gateway.storage.pg_audit import SCHEMA, PgAuditStore

T0 = dt.datetime(2026, 11, 30, 4, 0, tzinfo=dt.UTC)
KEY = Ed25519PrivateKey.generate()


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
def store(store_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AuditStoreProtocol]:
    """An empty audit store on each backend."""
    if store_backend == "sqlite":
        with AuditStore(tmp_path / "audit.db") as s:
            yield s
        return
    url = request.getfixturevalue("pg_url")
    with psycopg.connect(url, autocommit=True) as conn:
        postgres.migrate(conn, [SCHEMA])
    with postgres.Database(postgres.target(url)) as db, PgAuditStore(db) as pg:
        yield pg


def raw_delete(store: AuditStoreProtocol) -> None:
    """A DELETE behind the store's back (what the append-only guard must refuse)."""
    if isinstance(store, AuditStore):
        conn = sqlite3.connect(store.path)
        try:
            conn.execute("DELETE FROM events")
        finally:
            conn.close()
        return
    assert isinstance(store, PgAuditStore)
    with store.db.connection() as pg:
        pg.execute("DELETE FROM events")


def test_round_trip_keeps_every_field_and_lists_newest_first(store: AuditStoreProtocol) -> None:
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
    indexed = {r[0] for r in conn.execute("SELECT sql FROM sqlite_master WHERE type='index' AND sql IS NOT NULL")}
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
def test_filters_pick_exactly_their_events(store: AuditStoreProtocol, f: AuditFilter, expected: list[str]) -> None:
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


def test_get_finds_the_event_behind_a_support_id(store: AuditStoreProtocol) -> None:
    events = [refusal(i) for i in range(5)]
    store.append(events)
    assert store.get(events[3].support_id.lower()) == events[3]
    assert store.get("000000000000") is None


def test_a_repeated_support_id_is_stored_not_rejected(store: AuditStoreProtocol) -> None:
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


def test_prune_deletes_only_older_events_and_records_itself(store: AuditStoreProtocol) -> None:
    store.append([refusal(m) for m in (0, 10, 20, 30)])
    deleted = store.prune(T0 + dt.timedelta(minutes=15), actor="cli:root", key=KEY)
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
    with pytest.raises((sqlite3.IntegrityError, StoreError), match="append-only"):
        raw_delete(store)
    assert store.count() == 3


def test_prune_with_nothing_old_deletes_nothing(store: AuditStoreProtocol) -> None:
    store.append([refusal(0)])
    assert store.prune(T0 - dt.timedelta(days=1), key=KEY) == 0
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


def test_summary_counts_refusals_in_the_window(store: AuditStoreProtocol) -> None:
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


def test_the_instance_is_stored_and_filters(store: AuditStoreProtocol) -> None:
    store.append([refusal(0, instance="gw-a", detail="a"), refusal(1, instance="gw-b", detail="b"), refusal(2)])
    assert [e.detail for e in store.query(AuditFilter(instance="gw-a"))] == ["a"]
    assert [e.instance for e in store.query(AuditFilter())] == ["", "gw-b", "gw-a"]
    assert store.query(AuditFilter(instance="gw-c")) == []
    narrowed = store.summary(T0, T0 + dt.timedelta(days=1), match=AuditFilter(instance="gw-b"))
    assert (narrowed.total, narrowed.refusals) == (1, 1)


def test_update_behind_the_store_is_refused(store: AuditStoreProtocol) -> None:
    store.append([refusal(0)])
    if isinstance(store, AuditStore):
        conn = sqlite3.connect(store.path)
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE events SET reason = 'ok'")
        conn.close()
    else:
        assert isinstance(store, PgAuditStore)
        with pytest.raises(StoreError, match="append-only"), store.db.connection() as pg:
            pg.execute("UPDATE events SET reason = 'ok'")
        with pytest.raises(StoreError, match="append-only"), store.db.connection() as pg:
            pg.execute("TRUNCATE events")
    assert [e.reason for e in store.query(AuditFilter())] == ["certificate_revoked"]


def test_page_and_cursor_agree_with_query(store: AuditStoreProtocol) -> None:
    store.append([refusal(i, detail=str(i)) for i in range(7)])
    assert isinstance(store, AuditStore | PgAuditStore)
    events, total = store.page(AuditFilter(limit=3), 3)
    assert total == 7 and [e.detail for e in events] == ["3", "2", "1"]
    cursor = store.cursor(AuditFilter(limit=1, since=T0 + dt.timedelta(minutes=2)))
    rows = [*cursor.fetchmany(2), *cursor.fetchmany(10)]
    assert [r[-2] for r in rows] == ["6", "5", "4", "3", "2"]  # detail, then instance, in FIELDS order


def test_postgres_append_is_idempotent_for_a_replayed_batch(pg_url: str) -> None:
    """The outage spool may resend a batch the server had committed: it is stored once."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        postgres.migrate(conn, [SCHEMA])
    batch = [refusal(i, instance="gw-a") for i in range(3)]
    with postgres.Database(postgres.target(pg_url)) as db, PgAuditStore(db) as store:
        store.append(batch)
        store.append([*batch, refusal(9, instance="gw-a")])
        assert store.count() == 4
        # The same support ID from another instance (or another millisecond) is another event.
        store.append([dataclasses.replace(batch[0], instance="gw-b")])
        assert store.count() == 5
        with PgAuditStore(db, readonly=True) as ro, pytest.raises(StoreError, match="read-only"):
            ro.append(batch)


def test_a_version_1_file_gains_the_instance_column(tmp_path: Path) -> None:
    """A file from the previous release is upgraded in place; its events read back with instance ''."""
    path = tmp_path / "audit.db"
    AuditStore(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(
        "DROP INDEX events_chain; ALTER TABLE events DROP COLUMN seq; ALTER TABLE events DROP COLUMN prev_hash;"
        "ALTER TABLE events DROP COLUMN hash; DROP TABLE audit_chain_heads; DROP TABLE audit_marks;"
        "DROP INDEX events_instance; ALTER TABLE events DROP COLUMN instance; PRAGMA user_version = 1;"
        "INSERT INTO events (time_ms, event, reason, time, support_id, client_ip, tls_version, tls_cipher,"
        " backend, method, path, user_id, cert_subject, cert_serial, cert_issuer, cert_fingerprint,"
        " cert_not_after, user_agent, actor, detail) VALUES (0, 'login', 'ok', '1970-01-01T00:00:00.000Z',"
        " 'AAAAAAAAAAAA', '', '', '', '', '', '', 'LC000001', '', '', '', '', '', '', '', 'old')"
    )
    conn.close()
    with AuditStore(path, readonly=True) as ro:  # a reader first: the CLI after an upgrade
        assert [(e.detail, e.instance) for e in ro.query(AuditFilter())] == [("old", "")]
    with AuditStore(path) as store:
        store.append([refusal(0, instance="gw-a")])
        assert [e.instance for e in store.query(AuditFilter(instance="gw-a"))] == ["gw-a"]
        trail = store.chain_trail()  # the old row was chained by the upgrade (v3)
        assert [(r["instance"], r["seq"]) for rs in trail.events.values() for r in rs] == [("", 1), ("gw-a", 1)]
        assert chain.verify_chain(trail.events, [], [], KEY.public_key()).ok
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
    conn.execute("PRAGMA user_version = 4")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="version 4"):
        AuditStore(path)


def test_row_values_are_the_serialised_event_with_the_support_id_upper_cased() -> None:
    """The append path reads the event without building a dict; it must store what event_to_dict says."""
    from gateway.audit.events import FIELDS, epoch_ms, event_to_dict
    from gateway.audit.store import row_values

    when = dt.datetime(2026, 11, 30, 13, 50, 12, 345678, tzinfo=dt.timezone(dt.timedelta(hours=9)))
    events = [
        AuditEvent(EventKind.LOGIN_REFUSED, reason="bad_password", time=when, support_id="abc123def456"),
        AuditEvent(EventKind.LOGIN, time=when, cert_serial="0x1a:2b", client_port=443, worker=1, instance="gw1"),
        AuditEvent(EventKind.ADMIN_ACTION, time=when.replace(tzinfo=None), cert_serial="not hex"),
    ]
    for event in events:
        expected = {**event_to_dict(event), "support_id": event.support_id.upper()}
        assert row_values(event) == [epoch_ms(event.time), *(expected[name] for name in FIELDS)]

"""The audit trail's SQLite store: append-only, shared by every worker process.

One table of events, written in WAL mode with a busy timeout so several
processes append to the same file; each batch is one short ``BEGIN
IMMEDIATE`` transaction. Triggers refuse ``UPDATE`` always and ``DELETE``
unless :meth:`AuditStore.prune` has opened its permit inside its own
transaction. That guards against mistakes in our own code, not against
someone who can write the file: for tamper evidence, ship the JSON lines
(``audit.jsonl``) to a SIEM as they are written.

Times are kept twice: the ISO text the security team reads, and an
integer ``time_ms`` for indexed range queries.

Support IDs are indexed but deliberately *not* unique: they are 48 random
bits, so a flood of tens of millions of refusals can repeat one, and a
unique constraint would then reject a real event. ``show`` lists every
event with the ID (normally one).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gateway.audit.events import (
    FIELDS,
    REFUSAL_KINDS,
    AuditEvent,
    AuditFilter,
    EventKind,
    epoch_ms,
    event_from_dict,
    event_to_dict,
    format_time,
    from_epoch_ms,
    normalize_serial,
    serial_spellings,
)
from gateway.errors import StoreError

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
# 2: the ``instance`` column (events recorded before it hold '').
SCHEMA_VERSION = 2
_RETRIES = 5
_INTEGER_COLUMNS = {"client_port", "worker"}

_COLUMNS = ", ".join(f"{name} INTEGER" if name in _INTEGER_COLUMNS else f"{name} TEXT NOT NULL" for name in FIELDS)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    {_COLUMNS}
);
CREATE INDEX IF NOT EXISTS events_time ON events (time_ms);
CREATE INDEX IF NOT EXISTS events_support_id ON events (support_id);
CREATE INDEX IF NOT EXISTS events_reason ON events (reason, time_ms);
CREATE INDEX IF NOT EXISTS events_user ON events (user_id, time_ms);
CREATE INDEX IF NOT EXISTS events_ip ON events (client_ip, time_ms);
CREATE INDEX IF NOT EXISTS events_serial ON events (cert_serial, time_ms);
CREATE INDEX IF NOT EXISTS events_event ON events (event, time_ms);
CREATE INDEX IF NOT EXISTS events_instance ON events (instance, time_ms);
CREATE TABLE IF NOT EXISTS prune_permit (granted INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only');
END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
WHEN NOT EXISTS (SELECT 1 FROM prune_permit)
BEGIN
    SELECT RAISE(ABORT, 'audit events are append-only; use gateway audit prune');
END;
PRAGMA user_version = {SCHEMA_VERSION};
"""  # noqa: S608 - built from constant column names, never from input
# The SQL below is shared with the PostgreSQL store (gateway.storage.pg_audit), which
# swaps the ``?`` placeholders for ``%s``: no statement holds a literal ``?`` or ``%``.
INSERT_SQL = (
    f"INSERT INTO events (time_ms, {', '.join(FIELDS)}) "  # noqa: S608 - constant column names
    f"VALUES (?, {', '.join('?' for _ in FIELDS)})"
)
SELECT_SQL = f"SELECT {', '.join(FIELDS)} FROM events"  # noqa: S608 - constant column names
ORDER_SQL = " ORDER BY time_ms DESC, id DESC"
_INSERT = INSERT_SQL
_SELECT = SELECT_SQL
_REFUSALS = f"event IN ({', '.join(repr(str(k)) for k in sorted(REFUSAL_KINDS))})"
# v1 -> v2: older rows get '' (the instance that wrote them is unknown).
_ADD_INSTANCE = "ALTER TABLE events ADD COLUMN instance TEXT NOT NULL DEFAULT ''"

Reader = Callable[[str, Sequence[Any]], Sequence[Sequence[Any]]]


@dataclass(frozen=True, slots=True)
class AuditSummary:
    """Counts for ``gateway audit summary`` and the /audit page.

    The "top" lists and ``per_hour`` count refusals only (see
    :data:`gateway.audit.events.REFUSAL_KINDS`): those are what the security team
    watches. ``per_hour`` holds (start of the UTC hour, reason, count).
    """

    since: dt.datetime
    until: dt.datetime
    total: int
    refusals: int
    by_event: list[tuple[str, int]]
    by_reason: list[tuple[str, int]]
    top_users: list[tuple[str, int]]
    top_ips: list[tuple[str, int]]
    top_serials: list[tuple[str, int]]
    per_hour: list[tuple[dt.datetime, str, int]]


class AuditStore:
    """One connection to the audit database; safe to share between threads.

    ``readonly=True`` (the CLI and the report page) refuses to create a
    missing database and sets ``query_only`` so a reader cannot write.
    """

    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        self._conn = self._retry(self._connect)

    # -- lifecycle --

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> sqlite3.Connection:
        if self.readonly and not self.path.is_file():
            raise StoreError(
                f"no audit database at {self.path} (nothing recorded yet, or audit.database points elsewhere)"
            )
        if not self.readonly and not self.path.exists():
            # 0600 like gateway.db: the trail names users, addresses and certificates (SQLite
            # gives the -wal and -shm files the same mode).
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # explicit BEGIN IMMEDIATE ... COMMIT below
            check_same_thread=False,  # guarded by self._lock
        )
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if self.readonly:
                self._check_schema(conn)
                if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                    # A file from the previous release, read before any writer opened it:
                    # upgrade it (adding a column loses nothing), then read only.
                    self._upgrade(conn)
                conn.execute("PRAGMA query_only = ON")
            else:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                self._upgrade(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone()
        if row is None:
            raise StoreError(f"{self.path} is not an audit database (no events table)")

    def _upgrade(self, conn: sqlite3.Connection) -> None:
        """Create the tables, or bring an older file to SCHEMA_VERSION; refuse a newer one.

        The version check and the ALTER run under one write lock, so two
        workers starting together on an old file do not both add the column.
        """
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"audit database {self.path} is version {version}; this release knows {SCHEMA_VERSION}"
                )
            columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(events)")}
            if columns and "instance" not in columns:
                conn.execute(_ADD_INSTANCE)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")

    # -- writing --

    def append(self, events: Sequence[AuditEvent]) -> None:
        """Insert a batch in one transaction: all stored or, on error, none."""
        if self.readonly:
            raise StoreError(f"audit database {self.path} was opened read-only")
        rows = [row_values(e) for e in events]
        if not rows:
            return
        with self._transaction() as conn:
            conn.executemany(_INSERT, rows)

    def prune(self, older_than: dt.datetime, *, actor: str = "") -> int:
        """Delete events before ``older_than``; the prune itself is recorded.

        Returns how many events were deleted.
        """
        with self._transaction() as conn:
            conn.execute("INSERT INTO prune_permit (granted) VALUES (1)")
            deleted = conn.execute("DELETE FROM events WHERE time_ms < ?", (epoch_ms(older_than),)).rowcount
            conn.execute("DELETE FROM prune_permit")
            conn.execute(_INSERT, row_values(prune_note(older_than, actor, deleted)))
        return int(deleted)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._conn
            self._retry(lambda: conn.execute("BEGIN IMMEDIATE"))
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # -- reading --

    def query(self, f: AuditFilter) -> list[AuditEvent]:
        """Events matching ``f``, newest first, at most ``f.limit``."""
        where, params = where_sql(f)
        sql = f"{_SELECT}{where}{ORDER_SQL} LIMIT ?"
        return [event_from_dict(dict(r)) for r in self._read(sql, [*params, f.limit])]

    def page(self, f: AuditFilter, offset: int) -> tuple[list[AuditEvent], int]:
        """One page of events matching ``f`` (newest first, ``f.limit`` from ``offset``) and the total count.

        Both queries run in one read transaction, so the total and the page agree.
        """
        where, params = where_sql(f)
        sql = f"{_SELECT}{where}{ORDER_SQL} LIMIT ? OFFSET ?"
        with self._lock:
            conn = self._conn

            def read() -> tuple[list[sqlite3.Row], int]:
                conn.execute("BEGIN")
                try:
                    total = conn.execute(f"SELECT count(*) FROM events{where}", params).fetchone()[0]  # noqa: S608
                    return conn.execute(sql, [*params, f.limit, offset]).fetchall(), int(total)
                finally:
                    conn.execute("COMMIT")

            rows, total = self._retry(read)
        return [event_from_dict(dict(r)) for r in rows], total

    def cursor(self, f: AuditFilter) -> sqlite3.Cursor:
        """A cursor over every event matching ``f`` (its limit ignored), newest first.

        For streamed exports: the caller fetches batches with ``fetchmany`` (from one
        thread at a time) and never holds the whole result. Rows are plain tuples in
        FIELDS order (cheaper than ``sqlite3.Row`` at a million rows). Use a store of its own.
        """
        where, params = where_sql(f)
        sql = f"{_SELECT}{where}{ORDER_SQL}"
        with self._lock:
            cursor = self._conn.cursor()
            cursor.row_factory = None
            return self._retry(lambda: cursor.execute(sql, params))

    def get(self, support_id: str) -> AuditEvent | None:
        """The newest event with this support ID (IDs are not unique, see the module doc)."""
        found = self.query(AuditFilter(support_id=support_id.strip().upper(), limit=1))
        return found[0] if found else None

    def count(self) -> int:
        return int(self._read("SELECT count(*) FROM events", [])[0][0])

    def summary(
        self,
        since: dt.datetime,
        until: dt.datetime,
        *,
        top: int = 10,
        match: AuditFilter | None = None,
    ) -> AuditSummary:
        """Counts between ``since`` (inclusive) and ``until`` (exclusive); see :func:`summarize`."""
        return summarize(self._read, since, until, top=top, match=match)

    def _read(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        with self._lock:
            conn = self._conn
            return self._retry(lambda: conn.execute(sql, params).fetchall())

    # -- errors --

    def _retry(self, action: Callable[[], T]) -> T:
        """Run ``action``, retrying briefly when another process holds the lock.

        ``busy_timeout`` already waits; this covers the cases SQLite reports
        busy at once (a lock upgrade, WAL recovery). Other SQLite errors
        become one :class:`StoreError` naming the file.
        """
        for attempt in range(_RETRIES):
            try:
                return action()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or attempt == _RETRIES - 1:
                    raise StoreError(f"audit database {self.path}: {exc}") from exc
                time.sleep(0.05 * 2**attempt)
            except sqlite3.Error as exc:
                raise StoreError(f"audit database {self.path}: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


def row_values(event: AuditEvent) -> list[Any]:
    """The INSERT_SQL parameters of an event: epoch milliseconds, then FIELDS in order."""
    data = event_to_dict(event)
    data["support_id"] = event.support_id.upper()
    data["cert_serial"] = normalize_serial(event.cert_serial) if event.cert_serial else ""
    return [epoch_ms(event.time), *(data[name] for name in FIELDS)]


_row = row_values


def prune_note(older_than: dt.datetime, actor: str, deleted: int) -> AuditEvent:
    """The admin_action event a prune records about itself (in the same transaction)."""
    return AuditEvent(
        EventKind.ADMIN_ACTION,
        reason="audit_pruned",
        actor=actor,
        detail=f"{deleted} events before {format_time(older_than)} deleted",
    )


def summarize(
    read: Reader,
    since: dt.datetime,
    until: dt.datetime,
    *,
    top: int = 10,
    match: AuditFilter | None = None,
) -> AuditSummary:
    """Counts between ``since`` (inclusive) and ``until`` (exclusive), with ``read(sql, params)``.

    ``match`` narrows further by its exact fields (user, IP, serial...);
    its times and limit are ignored. The SQL is portable (both backends run it).
    """
    extra, extra_params = where_sql(dataclasses.replace(match, since=None, until=None) if match else AuditFilter())
    span = "time_ms >= ? AND time_ms < ?" + extra.replace(" WHERE ", " AND ", 1)
    window = [epoch_ms(since), epoch_ms(until), *extra_params]
    refused = f"{span} AND {_REFUSALS}"

    def grouped(column: str, where: str) -> list[tuple[str, int]]:
        sql = (
            f"SELECT {column}, count(*) AS n FROM events WHERE {where} AND {column} != '' "  # noqa: S608 - constant column names
            f"GROUP BY {column} ORDER BY n DESC, {column} LIMIT ?"
        )
        return [(str(r[0]), int(r[1])) for r in read(sql, [*window, top])]

    hourly = read(
        f"SELECT time_ms / 3600000 AS hour, reason, count(*) FROM events WHERE {refused} "  # noqa: S608 - constant column names
        "GROUP BY hour, reason ORDER BY hour, reason",
        window,
    )
    totals = read(
        f"SELECT count(*), coalesce(sum(CASE WHEN {_REFUSALS} THEN 1 ELSE 0 END), 0) FROM events WHERE {span}",  # noqa: S608
        window,
    )[0]
    return AuditSummary(
        since=since,
        until=until,
        total=int(totals[0]),
        refusals=int(totals[1]),
        by_event=grouped("event", span),
        by_reason=grouped("reason", refused),
        top_users=grouped("user_id", refused),
        top_ips=grouped("client_ip", refused),
        top_serials=grouped("cert_serial", refused),
        per_hour=[(from_epoch_ms(int(h) * 3600000), str(r), int(n)) for h, r, n in hourly],
    )


def where_sql(f: AuditFilter) -> tuple[str, list[Any]]:
    """`` WHERE ...`` (or '') and its parameters for a filter's times and exact fields."""
    clauses: list[str] = []
    params: list[Any] = []
    if f.since is not None:
        clauses.append("time_ms >= ?")
        params.append(epoch_ms(f.since))
    if f.until is not None:
        clauses.append("time_ms < ?")
        params.append(epoch_ms(f.until))
    exact = {
        "event": str(f.event) if f.event is not None else "",
        "reason": f.reason,
        "user_id": f.user_id,
        "client_ip": f.client_ip,
        "support_id": f.support_id,
        "instance": f.instance,
    }
    if f.cert_serial:
        spellings = serial_spellings(f.cert_serial)
        clauses.append(f"cert_serial IN ({', '.join('?' for _ in spellings)})")
        params.extend(spellings)
    for column, value in exact.items():
        if value:
            clauses.append(f"{column} = ?")
            params.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

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
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import chain
from gateway.audit.events import (
    FIELDS,
    REFUSAL_KINDS,
    AuditEvent,
    AuditFilter,
    EventKind,
    epoch_ms,
    event_from_dict,
    format_time,
    from_epoch_ms,
    normalize_serial,
    serial_spellings,
    utcnow,
)
from gateway.audit.rows import cert_cn
from gateway.errors import StoreError

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
# 2: the ``instance`` column (events recorded before it hold '').
# 3: the hash chain (``seq``, ``prev_hash``, ``hash``; heads; signed marks), see gateway.audit.chain.
SCHEMA_VERSION = 3
_RETRIES = 5
_INTEGER_COLUMNS = {"client_port", "worker"}

_HEADS_TABLE = (
    "CREATE TABLE IF NOT EXISTS audit_chain_heads (instance TEXT PRIMARY KEY, seq INTEGER NOT NULL, hash TEXT NOT NULL)"
)
_COLUMNS = ", ".join(f"{name} INTEGER" if name in _INTEGER_COLUMNS else f"{name} TEXT NOT NULL" for name in FIELDS)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    {_COLUMNS},
    seq INTEGER,
    prev_hash TEXT,
    hash TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS events_chain ON events (instance, seq);
{_HEADS_TABLE};
CREATE TABLE IF NOT EXISTS audit_marks (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    instance TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    time TEXT NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_marks_no_update BEFORE UPDATE ON audit_marks
BEGIN
    SELECT RAISE(ABORT, 'audit marks are append-only');
END;
CREATE TRIGGER IF NOT EXISTS audit_marks_no_delete BEFORE DELETE ON audit_marks
BEGIN
    SELECT RAISE(ABORT, 'audit marks are append-only');
END;
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
    f"INSERT INTO events (time_ms, {', '.join(FIELDS)}, seq, prev_hash, hash) "  # noqa: S608 - constant column names
    f"VALUES (?, {', '.join('?' for _ in FIELDS)}, ?, ?, ?)"
)
SELECT_SQL = f"SELECT {', '.join(FIELDS)} FROM events"  # noqa: S608 - constant column names
# The chain's view of the events: what verify reads, in storage order.
CHAINED_FIELDS = (*FIELDS, "seq", "prev_hash", "hash")
CHAIN_SELECT_SQL = f"SELECT {', '.join(CHAINED_FIELDS)} FROM events WHERE instance = ? AND seq > ? ORDER BY id"  # noqa: S608
HEAD_SQL = "SELECT seq, hash FROM audit_chain_heads WHERE instance = ?"
# The heads of the instances with events in [since, until) (the report pages verify only those).
PERIOD_HEADS_SQL = (
    "SELECT h.instance, h.seq FROM audit_chain_heads h WHERE EXISTS "
    "(SELECT 1 FROM events e WHERE e.instance = h.instance AND e.time_ms >= ? AND e.time_ms < ?)"
)
SET_HEAD_SQL = (
    "INSERT INTO audit_chain_heads (instance, seq, hash) VALUES (?, ?, ?) "
    "ON CONFLICT (instance) DO UPDATE SET seq = excluded.seq, hash = excluded.hash"
)
MARK_COLUMNS = ("kind", "instance", "seq", "hash", "time", "key_id", "signature")
INSERT_MARK_SQL = f"INSERT INTO audit_marks ({', '.join(MARK_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?)"  # noqa: S608
SELECT_MARKS_SQL = f"SELECT {', '.join(MARK_COLUMNS)} FROM audit_marks ORDER BY id"  # noqa: S608
# Prune: per instance the last seq to delete, N = (lowest seq at or after the cutoff) - 1, or the
# whole chain when nothing is that recent. Pruning by seq keeps what remains one unbroken chain.
PRUNE_BOUNDS_SQL = (
    "SELECT instance, min(seq), max(seq), min(CASE WHEN time_ms >= ? THEN seq END) "
    "FROM events WHERE seq IS NOT NULL GROUP BY instance ORDER BY instance"
)
ORDER_SQL = " ORDER BY time_ms DESC, id DESC"
_INSERT = INSERT_SQL
_SELECT = SELECT_SQL
_REFUSALS = f"event IN ({', '.join(repr(str(k)) for k in sorted(REFUSAL_KINDS))})"
# v1 -> v2: older rows get '' (the instance that wrote them is unknown).
_ADD_INSTANCE = "ALTER TABLE events ADD COLUMN instance TEXT NOT NULL DEFAULT ''"
# v2 -> v3: the chain columns; existing rows are chained per instance in id order.
_ADD_CHAIN = (
    "ALTER TABLE events ADD COLUMN seq INTEGER",
    "ALTER TABLE events ADD COLUMN prev_hash TEXT",
    "ALTER TABLE events ADD COLUMN hash TEXT",
)

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
            if columns and "seq" not in columns:
                for statement in _ADD_CHAIN:
                    conn.execute(statement)
                conn.execute("DROP TRIGGER IF EXISTS events_no_update")  # recreated by _SCHEMA below
                _chain_existing(conn)
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
        batches = chain_bodies(events)  # encoded outside the lock
        if not batches:
            return
        with self._transaction() as conn:
            _link_and_insert(conn, batches)

    def checkpoint(self, instance: str, key: Ed25519PrivateKey, now: dt.datetime) -> chain.Mark | None:
        """Sign ``instance``'s head into the marks (None: no events yet, or the last checkpoint is there)."""
        with self._transaction() as conn:
            head = _head(conn.execute(HEAD_SQL, (instance,)).fetchone(), instance)
            last = conn.execute(
                "SELECT seq FROM audit_marks WHERE instance = ? AND kind = 'checkpoint' ORDER BY id DESC LIMIT 1",
                (instance,),
            ).fetchone()
            if head.seq == 0 or (last is not None and int(last[0]) == head.seq):
                return None
            mark = chain.checkpoint(head, now, key)
            conn.execute(INSERT_MARK_SQL, mark_values(mark))
        return mark

    def prune(self, older_than: dt.datetime, *, actor: str = "", key: Ed25519PrivateKey | None = None) -> int:
        """Delete each instance's chain up to the first event at or after ``older_than``; the prune is recorded.

        A signed prune anchor for the last deleted event goes in first, in the
        same transaction, so what remains starts from a signed point. Returns
        how many events were deleted.
        """
        if key is None:
            raise StoreError("pruning the audit trail needs the audit signing key (audit.signing_key)")
        now = utcnow()
        with self._transaction() as conn:
            conn.execute("INSERT INTO prune_permit (granted) VALUES (1)")
            deleted = 0
            for instance, last_seq in prune_plan(conn.execute(PRUNE_BOUNDS_SQL, (epoch_ms(older_than),)).fetchall()):
                row = conn.execute("SELECT hash FROM events WHERE instance = ? AND seq = ?", (instance, last_seq))
                anchor = chain.prune_anchor(chain.Head(instance, last_seq, str(row.fetchone()[0])), now, key)
                conn.execute(INSERT_MARK_SQL, mark_values(anchor))
                deleted += conn.execute(
                    "DELETE FROM events WHERE instance = ? AND seq <= ?", (instance, last_seq)
                ).rowcount
            conn.execute("DELETE FROM prune_permit")
            _link_and_insert(conn, chain_bodies([prune_note(older_than, actor, deleted)]))
        return int(deleted)

    # -- the chain --

    def chain_trail(
        self,
        since: dt.datetime | None = None,
        *,
        instances: Collection[str] | None = None,
        after: Mapping[str, int] | None = None,
    ) -> chain.Trail:
        """Every instance's chain (storage order) and the marks, for verify and the export.

        With ``since``, each chain from the latest mark made before it (verify with ``partial=True``).
        ``instances`` keeps those chains (and their marks) only; ``after`` reads an instance's events
        after that seq instead (the report pages' cache verified the rest).
        """
        with self._lock:
            conn = self._conn

            def read() -> chain.Trail:
                conn.execute("BEGIN")  # one snapshot: the marks and the events agree
                try:
                    return trail_of(lambda sql, params: conn.execute(sql, params).fetchall(), since, instances, after)
                finally:
                    conn.execute("COMMIT")

            return self._retry(read)

    def chain_heads(self, since: dt.datetime, until: dt.datetime, instance: str = "") -> dict[str, int]:
        """Instance -> head seq, for the instances (or ``instance``) with events in [since, until)."""
        return period_heads(self._read, since, until, instance)

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

    def cursor(
        self, f: AuditFilter, columns: str = "", functions: Mapping[str, Callable[[str], str]] | None = None
    ) -> sqlite3.Cursor:
        """A cursor over every event matching ``f`` (its limit ignored), newest first.

        For streamed exports: the caller fetches batches with ``fetchmany`` (from one
        thread at a time) and never holds the whole result. Rows are plain tuples in
        FIELDS order (cheaper than ``sqlite3.Row`` at a million rows), or of ``columns``,
        SQL expressions over the events' columns, ``cert_cn(subject)`` and ``functions``
        (one-argument SQL functions; the export builds its lines there). Use a store of its own.
        """
        where, params = where_sql(f)
        sql = f"SELECT {columns} FROM events{where}{ORDER_SQL}" if columns else f"{_SELECT}{where}{ORDER_SQL}"  # noqa: S608
        with self._lock:
            named: dict[str, Callable[[str], str]] = {"cert_cn": _cert_cn, **(functions or {})}
            for name, function in named.items():
                self._conn.create_function(name, 1, function, deterministic=True)
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


# The same few certificates appear again and again in an export.
_cert_cn = functools.lru_cache(maxsize=4096)(cert_cn)


def _chain_existing(conn: sqlite3.Connection) -> None:
    """Migration to v3: chain the rows already stored, per instance in id (insertion) order."""
    conn.execute(_HEADS_TABLE)
    rows = conn.execute(f"SELECT id, {', '.join(FIELDS)} FROM events ORDER BY id").fetchall()  # noqa: S608
    by_instance: dict[str, list[tuple[int, bytes]]] = {}
    for row in rows:
        fields = dict(zip(FIELDS, tuple(row)[1:], strict=True))
        by_instance.setdefault(str(fields["instance"]), []).append((int(row[0]), chain.encode_body(fields)))
    for instance, items in by_instance.items():
        links, head = chain.link_batch(chain.Head(instance), [body for _, body in items])
        conn.executemany(
            "UPDATE events SET seq = ?, prev_hash = ?, hash = ? WHERE id = ?",
            [(*link, row_id) for (row_id, _), link in zip(items, links, strict=True)],
        )
        conn.execute(SET_HEAD_SQL, (instance, head.seq, head.hash))


def _link_and_insert(conn: sqlite3.Connection, batches: dict[str, tuple[list[list[Any]], list[bytes]]]) -> None:
    """Under the write lock: chain each instance's rows onto its head, insert them, move the head."""
    for instance, (rows, bodies) in batches.items():
        head = _head(conn.execute(HEAD_SQL, (instance,)).fetchone(), instance)
        links, new_head = chain.link_batch(head, bodies)
        conn.executemany(_INSERT, [[*r, *link] for r, link in zip(rows, links, strict=True)])
        conn.execute(SET_HEAD_SQL, (instance, new_head.seq, new_head.hash))


def _head(row: Sequence[Any] | None, instance: str) -> chain.Head:
    return chain.Head(instance) if row is None else chain.Head(instance, int(row[0]), str(row[1]))


def chain_bodies(events: Sequence[AuditEvent]) -> dict[str, tuple[list[list[Any]], list[bytes]]]:
    """Per instance (in first-seen order): the events' INSERT values and their chain bodies.

    The body is encoded from exactly the values stored (upper-cased support ID,
    normalised serial), so what verify reads back hashes the same.
    """
    out: dict[str, tuple[list[list[Any]], list[bytes]]] = {}
    encode = chain.encode_body_values
    for event in events:
        row = row_values(event)
        rows, bodies = out.setdefault(event.instance, ([], []))
        rows.append(row)
        bodies.append(encode(row[1:-1]))  # FIELDS without `instance` (last) are BODY_FIELDS: asserted below
    return out


assert (*chain.BODY_FIELDS, "instance") == FIELDS, "chain_bodies slices the row: AuditEvent's fields moved"


def trail_of(
    read: Reader,
    since: dt.datetime | None,
    instances: Collection[str] | None,
    after: Mapping[str, int] | None,
) -> chain.Trail:
    """:meth:`AuditStore.chain_trail` with ``read(sql, params)`` (both backends, inside one snapshot)."""
    marks = [mark_from_row(r) for r in read(SELECT_MARKS_SQL, [])]
    names = [str(r[0]) for r in read("SELECT instance FROM audit_chain_heads ORDER BY instance", [])]
    if instances is not None:
        names = [name for name in names if name in instances]
        marks = [m for m in marks if m.instance in instances]
    trail = chain.Trail({}, [m for m in marks if m.kind is chain.MarkKind.CHECKPOINT], [])
    trail.anchors.extend(m for m in marks if m.kind is chain.MarkKind.PRUNE)
    for name in names:
        start = (after or {}).get(name, start_seq(marks, name, since))
        rows = read(CHAIN_SELECT_SQL, [name, start])
        trail.events[name] = [dict(zip(CHAINED_FIELDS, r, strict=True)) for r in rows]
    return trail


def period_heads(read: Reader, since: dt.datetime, until: dt.datetime, instance: str) -> dict[str, int]:
    """:meth:`AuditStore.chain_heads` with ``read(sql, params)``."""
    sql, params = PERIOD_HEADS_SQL, [epoch_ms(since), epoch_ms(until)] + ([instance] if instance else [])
    if instance:
        sql += " AND h.instance = ?"
    return {str(name): int(seq) for name, seq in read(sql + " ORDER BY h.instance", params)}


def mark_values(mark: chain.Mark) -> tuple[Any, ...]:
    return (str(mark.kind), mark.instance, mark.seq, mark.hash, mark.time, mark.key_id, mark.signature)


def mark_from_row(row: Sequence[Any]) -> chain.Mark:
    return chain.mark_from_dict(dict(zip(MARK_COLUMNS, row, strict=True)), "audit_marks")


def prune_plan(bounds: Sequence[Sequence[Any]]) -> list[tuple[str, int]]:
    """(instance, last seq to delete) from PRUNE_BOUNDS_SQL's rows; instances with nothing to delete left out."""
    plan = []
    for instance, first, last, first_kept in bounds:
        upto = int(last) if first_kept is None else int(first_kept) - 1
        if upto >= int(first):
            plan.append((str(instance), upto))
    return plan


def start_seq(marks: Sequence[chain.Mark], instance: str, since: dt.datetime | None) -> int:
    """Where a partial verify starts: after the latest mark of ``instance`` made before ``since`` (0: all)."""
    if since is None:
        return 0
    cutoff = format_time(since)
    return max((m.seq for m in marks if m.instance == instance and m.time < cutoff), default=0)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


_ALL_FIELDS = attrgetter(*FIELDS)
# Positions in a row_values row (epoch milliseconds first, then FIELDS).
_ROW_TIME, _ROW_EVENT, _ROW_SID, _ROW_SERIAL = (
    1 + FIELDS.index(n) for n in ("time", "event", "support_id", "cert_serial")
)
# A gateway sees the same few certificates again and again: their serials are normalised once.
_serial = functools.lru_cache(maxsize=4096)(normalize_serial)


def row_values(event: AuditEvent) -> list[Any]:
    """The INSERT_SQL parameters of an event: epoch milliseconds, then FIELDS in order.

    The values of :func:`~gateway.audit.events.event_to_dict` (a test compares them), plus the
    support ID upper-cased, read without building a dict: this runs once per event written.
    """
    when = event.time
    row = [epoch_ms(when), *_ALL_FIELDS(event)]
    row[_ROW_TIME] = format_time(when)
    row[_ROW_EVENT] = str(event.event)
    row[_ROW_SID] = event.support_id.upper()
    serial = event.cert_serial
    row[_ROW_SERIAL] = _serial(serial) if serial else ""
    return row


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

"""The audit trail in PostgreSQL: one append-only table shared by every instance and the portal.

Same table and column names as the SQLite store (:mod:`gateway.audit.store`),
and the same SQL: filters, pages and summaries are built there with ``?``
placeholders and run here with ``%s`` (none of that SQL holds a literal
``?`` or ``%``), so the two backends cannot drift apart.

Append-only is enforced by the database on two levels:

- a statement trigger refuses ``UPDATE`` and ``TRUNCATE`` always and
  ``DELETE`` unless the deleting transaction set the prune marker
  (``SET LOCAL gateway.audit_prune = 'on'``, what :meth:`PgAuditStore.prune`
  does), like SQLite's ``prune_permit``: a guard against our own mistakes;
- least privilege (``docs/postgresql-roles.sql``): the gateway's role may
  only INSERT and SELECT, so even setting the marker does not let it delete;
  only the admin role (the owner, which runs ``gateway db migrate``) prunes.

Replays are idempotent: the writer's outage spool may resend a batch whose
COMMIT reached the server but whose answer was lost, so every insert is
``ON CONFLICT DO NOTHING`` on (instance, support_id, time_ms). Support IDs
alone are not unique (48 random bits, see the SQLite store); with the same
instance and the same millisecond a repeat is, for all practical purposes,
the same event.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Sequence
from typing import Any, Self

import psycopg

from gateway.audit.events import FIELDS, AuditEvent, AuditFilter, epoch_ms, event_from_dict
from gateway.audit.store import (
    INSERT_SQL,
    ORDER_SQL,
    SELECT_SQL,
    AuditSummary,
    prune_note,
    row_values,
    summarize,
    where_sql,
)
from gateway.errors import StoreError
from gateway.storage.postgres import Database, Schema

_INTEGER_COLUMNS = {"client_port", "worker"}
# COLLATE "C": byte order, as SQLite sorts (summaries break ties by value) and cheaper to index.
_COLUMNS = ",\n    ".join(
    f"{name} INTEGER" if name in _INTEGER_COLUMNS else f'{name} TEXT COLLATE "C" NOT NULL' for name in FIELDS
)

SCHEMA = Schema(
    "audit",
    {
        1: f"""
CREATE TABLE events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    {_COLUMNS}
);
CREATE UNIQUE INDEX events_once ON events (instance, support_id, time_ms);
CREATE INDEX events_time ON events (time_ms);
CREATE INDEX events_support_id ON events (support_id);
CREATE INDEX events_reason ON events (reason, time_ms);
CREATE INDEX events_user ON events (user_id, time_ms);
CREATE INDEX events_ip ON events (client_ip, time_ms);
CREATE INDEX events_serial ON events (cert_serial, time_ms);
CREATE INDEX events_event ON events (event, time_ms);
CREATE INDEX events_instance ON events (instance, time_ms);
CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND coalesce(current_setting('gateway.audit_prune', true), '') = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'audit events are append-only; use gateway audit prune';
END
$$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_append_only();
""",
    },
)

_INSERT = INSERT_SQL.replace("?", "%s") + " ON CONFLICT (instance, support_id, time_ms) DO NOTHING"


def _pg(sql: str) -> str:
    """The SQLite store's SQL with psycopg's placeholders."""
    return sql.replace("?", "%s")


class PgAuditStore:
    """The audit store on a shared :class:`~gateway.storage.postgres.Database` (its pool is not ours to close).

    ``readonly=True`` (the CLI's readers, the report pages) refuses to append.
    """

    def __init__(self, db: Database, *, readonly: bool = False) -> None:
        self.db = db
        self.readonly = readonly
        self._exports: list[contextlib.ExitStack] = []

    def close(self) -> None:
        """Close the export cursors this store opened; the pool stays (the Backend owns it)."""
        exports, self._exports = self._exports, []
        for stack in exports:
            with contextlib.suppress(Exception):
                stack.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing --

    def append(self, events: Sequence[AuditEvent]) -> None:
        """Insert a batch in one transaction; an event already stored (a replay) is skipped."""
        if self.readonly:
            raise StoreError(f"audit database {self.db.target} was opened read-only")
        rows = [row_values(e) for e in events]
        if not rows:
            return
        with self.db.transaction() as conn, conn.cursor() as cur:
            cur.executemany(_INSERT, rows)

    def prune(self, older_than: dt.datetime, *, actor: str = "") -> int:
        """Delete events before ``older_than`` under the prune marker; the prune itself is recorded."""
        with self.db.transaction() as conn:
            conn.execute("SELECT set_config('gateway.audit_prune', 'on', true)")
            deleted = conn.execute("DELETE FROM events WHERE time_ms < %s", (epoch_ms(older_than),)).rowcount
            conn.execute("SELECT set_config('gateway.audit_prune', 'off', true)")
            conn.execute(_INSERT, row_values(prune_note(older_than, actor, deleted)))
        return int(deleted)

    # -- reading --

    def query(self, f: AuditFilter) -> list[AuditEvent]:
        """Events matching ``f``, newest first, at most ``f.limit``."""
        where, params = where_sql(f)
        rows = self._read(f"{SELECT_SQL}{where}{ORDER_SQL} LIMIT ?", [*params, f.limit])
        return [_event(r) for r in rows]

    def page(self, f: AuditFilter, offset: int) -> tuple[list[AuditEvent], int]:
        """One page and the total count, from one snapshot (REPEATABLE READ) so they agree."""
        where, params = where_sql(f)
        with self.db.transaction() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            total = conn.execute(_pg(f"SELECT count(*) FROM events{where}"), params).fetchone()  # noqa: S608
            sql = _pg(f"{SELECT_SQL}{where}{ORDER_SQL} LIMIT ? OFFSET ?")
            rows = conn.execute(sql, [*params, f.limit, offset]).fetchall()
        return [_event(r) for r in rows], int(total[0]) if total else 0

    def cursor(self, f: AuditFilter) -> ExportCursor:
        """A server-side cursor over every event matching ``f`` (limit ignored), newest first.

        Holds one pooled connection until :meth:`close`; rows are tuples in FIELDS order.
        """
        where, params = where_sql(f)
        stack = contextlib.ExitStack()
        try:
            conn = stack.enter_context(self.db.transaction())
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cur = stack.enter_context(conn.cursor(name="audit_export"))
            cur.execute(_pg(f"{SELECT_SQL}{where}{ORDER_SQL}"), params)
        except psycopg.Error as exc:
            stack.close()
            raise StoreError(f"database {self.db.target}: {self.db.target.scrub(str(exc).strip())}") from None
        except BaseException:
            stack.close()
            raise
        self._exports.append(stack)
        return ExportCursor(cur, self.db)

    def get(self, support_id: str) -> AuditEvent | None:
        """The newest event with this support ID (IDs are not unique, see the SQLite store)."""
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
        """Counts between ``since`` and ``until``: the SQLite store's queries (:func:`summarize`)."""
        return summarize(self._read, since, until, top=top, match=match)

    def _read(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self.db.connection() as conn:
            return conn.execute(_pg(sql), list(params)).fetchall()


class ExportCursor:
    """``fetchmany`` over a server-side cursor, with psycopg errors turned into StoreError."""

    def __init__(self, cursor: psycopg.Cursor[Any], db: Database) -> None:
        self._cursor = cursor
        self._db = db

    def fetchmany(self, size: int) -> list[tuple[Any, ...]]:
        try:
            return self._cursor.fetchmany(size)
        except psycopg.Error as exc:
            raise StoreError(f"database {self._db.target}: {self._db.target.scrub(str(exc).strip())}") from None


def _event(row: Sequence[Any]) -> AuditEvent:
    return event_from_dict(dict(zip(FIELDS, row, strict=True)))

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
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import chain
from gateway.audit.chain import BODY_FIELDS
from gateway.audit.events import FIELDS, AuditEvent, AuditFilter, epoch_ms, event_from_dict, utcnow
from gateway.audit.store import (
    HEAD_SQL,
    INSERT_MARK_SQL,
    INSERT_SQL,
    ORDER_SQL,
    PRUNE_BOUNDS_SQL,
    SELECT_SQL,
    SET_HEAD_SQL,
    AuditSummary,
    chain_bodies,
    mark_values,
    period_heads,
    prune_note,
    prune_plan,
    summarize,
    trail_of,
    where_sql,
)
from gateway.errors import StoreError
from gateway.storage.postgres import Database, PgStore, Schema

_INTEGER_COLUMNS = {"client_port", "worker"}
# COLLATE "C": byte order, as SQLite sorts (summaries break ties by value) and cheaper to index.
_COLUMNS = ",\n    ".join(
    f"{name} INTEGER" if name in _INTEGER_COLUMNS else f'{name} TEXT COLLATE "C" NOT NULL' for name in FIELDS
)

# v2: the hash chain (gateway.audit.chain). Existing rows are chained per instance in id order by
# the same encoding in PL/pgSQL (PostgreSQL text holds no NUL and no lone surrogate, so escaping
# is the backslash only); tests check it against the Python. Needs PostgreSQL 11+ (sha256).
_ENCODED = ", ".join(
    f"coalesce(r.{name}::text, '')" if name in _INTEGER_COLUMNS else f"r.{name}" for name in BODY_FIELDS
)
_V2 = f"""
ALTER TABLE events ADD COLUMN seq BIGINT, ADD COLUMN prev_hash TEXT, ADD COLUMN hash TEXT;
CREATE TABLE audit_chain_heads (
    instance TEXT COLLATE "C" PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TABLE audit_marks (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind TEXT NOT NULL,
    instance TEXT COLLATE "C" NOT NULL,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    time TEXT NOT NULL,
    key_id TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE FUNCTION audit_marks_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit marks are append-only';
END
$$;
CREATE TRIGGER audit_marks_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_marks
    FOR EACH STATEMENT EXECUTE FUNCTION audit_marks_append_only();
ALTER TABLE events DISABLE TRIGGER events_append_only;
DO $$
DECLARE
    r record;
    v text;
    enc bytea;
    cur_instance text := NULL;
    n bigint := 0;
    prev text;
BEGIN
    FOR r IN SELECT * FROM events ORDER BY instance, id LOOP
        IF cur_instance IS DISTINCT FROM r.instance THEN
            IF cur_instance IS NOT NULL THEN
                INSERT INTO audit_chain_heads (instance, seq, hash) VALUES (cur_instance, n, prev);
            END IF;
            cur_instance := r.instance;
            n := 0;
            prev := '{chain.GENESIS}';
        END IF;
        n := n + 1;
        enc := convert_to('{chain.EVENT_TAG}', 'UTF8');
        FOREACH v IN ARRAY ARRAY[r.instance, n::text, prev, {_ENCODED}] LOOP
            enc := enc || '\\x00'::bytea || convert_to(replace(v, E'\\\\', E'\\\\\\\\'), 'UTF8');
        END LOOP;
        UPDATE events SET seq = n, prev_hash = prev, hash = encode(sha256(enc), 'hex') WHERE id = r.id;
        prev := encode(sha256(enc), 'hex');
    END LOOP;
    IF cur_instance IS NOT NULL THEN
        INSERT INTO audit_chain_heads (instance, seq, hash) VALUES (cur_instance, n, prev);
    END IF;
END
$$;
ALTER TABLE events ENABLE TRIGGER events_append_only;
CREATE UNIQUE INDEX events_chain ON events (instance, seq);
"""  # noqa: S608 - built from constant column names

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
        2: _V2,
    },
)

# Replays are skipped before linking (see _link_and_insert), so a conflict here is a bug, not a replay:
# it fails the batch (which is retried) rather than leaving a gap in the chain.
_INSERT = INSERT_SQL.replace("?", "%s")
_SUPPORT_ID = 1 + FIELDS.index("support_id")  # in row_values: time_ms first


def _pg(sql: str) -> str:
    """The SQLite store's SQL with psycopg's placeholders."""
    return sql.replace("?", "%s")


class PgAuditStore(PgStore):
    """The audit store on a shared :class:`~gateway.storage.postgres.Database` (its pool is not ours to close).

    ``readonly=True`` (the CLI's readers, the report pages) refuses to append.
    """

    def __init__(self, db: Database, *, readonly: bool = False) -> None:
        super().__init__(db)
        self.readonly = readonly
        self._exports: list[contextlib.ExitStack] = []

    def close(self) -> None:
        """Close the export cursors this store opened; the pool stays (the Backend owns it)."""
        exports, self._exports = self._exports, []
        for stack in exports:
            with contextlib.suppress(Exception):
                stack.close()

    # -- writing --

    def append(self, events: Sequence[AuditEvent]) -> None:
        """Insert a batch in one transaction; an event already stored (a replay) is skipped."""
        if self.readonly:
            raise StoreError(f"audit database {self.db.target} was opened read-only")
        batches = chain_bodies(events)  # encoded outside the transaction
        if not batches:
            return
        with self.db.transaction() as conn:
            _link_and_insert(conn, batches)

    def checkpoint(self, instance: str, key: Ed25519PrivateKey, now: dt.datetime) -> chain.Mark | None:
        """Sign ``instance``'s head into the marks (None: no events yet, or the last checkpoint is there)."""
        with self.db.transaction() as conn:
            row = conn.execute(_pg(HEAD_SQL) + " FOR UPDATE", (instance,)).fetchone()
            last = conn.execute(
                "SELECT seq FROM audit_marks WHERE instance = %s AND kind = 'checkpoint' ORDER BY id DESC LIMIT 1",
                (instance,),
            ).fetchone()
            if row is None or int(row[0]) == 0 or (last is not None and int(last[0]) == int(row[0])):
                return None
            mark = chain.checkpoint(chain.Head(instance, int(row[0]), str(row[1])), now, key)
            conn.execute(_pg(INSERT_MARK_SQL), mark_values(mark))
        return mark

    def prune(self, older_than: dt.datetime, *, actor: str = "", key: Ed25519PrivateKey | None = None) -> int:
        """Delete each chain up to the first event at or after ``older_than``, anchored and recorded.

        Same plan as the SQLite store: a signed prune anchor per instance, then
        the delete under the prune marker, then the note, in one transaction.
        """
        if key is None:
            raise StoreError("pruning the audit trail needs the audit signing key (audit.signing_key)")
        now = utcnow()
        with self.db.transaction() as conn:
            conn.execute("SELECT set_config('gateway.audit_prune', 'on', true)")
            deleted = 0
            bounds = conn.execute(_pg(PRUNE_BOUNDS_SQL), (epoch_ms(older_than),)).fetchall()
            for instance, last_seq in prune_plan(bounds):
                row = conn.execute("SELECT hash FROM events WHERE instance = %s AND seq = %s", (instance, last_seq))
                found = row.fetchone()
                assert found is not None
                anchor = chain.prune_anchor(chain.Head(instance, last_seq, str(found[0])), now, key)
                conn.execute(_pg(INSERT_MARK_SQL), mark_values(anchor))
                deleted += conn.execute(
                    "DELETE FROM events WHERE instance = %s AND seq <= %s", (instance, last_seq)
                ).rowcount
            conn.execute("SELECT set_config('gateway.audit_prune', 'off', true)")
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
        """Every instance's chain (storage order) and the marks, from one snapshot; see the SQLite store."""
        with self.db.transaction() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return trail_of(
                lambda sql, params: conn.execute(_pg(sql), list(params)).fetchall(), since, instances, after
            )

    def chain_heads(self, since: dt.datetime, until: dt.datetime, instance: str = "") -> dict[str, int]:
        """Instance -> head seq, for the instances (or ``instance``) with events in [since, until)."""
        return period_heads(self._read, since, until, instance)

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

    def cursor(self, f: AuditFilter, columns: str = "", source: str = "events") -> ExportCursor:
        """A server-side cursor over every event matching ``f`` (limit ignored), newest first.

        Holds one pooled connection until :meth:`close`; rows are tuples in FIELDS order, or
        of ``columns`` (SQL expressions over the columns of ``source``, the events or the
        events joined with what the export derives from them: the export's lines).
        """
        where, params = where_sql(f)
        select = f"SELECT {columns} FROM {source}" if columns else SELECT_SQL  # noqa: S608
        stack = contextlib.ExitStack()
        try:
            conn = stack.enter_context(self.db.transaction())
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cur = stack.enter_context(conn.cursor(name="audit_export"))
            cur.execute(select + _pg(where + ORDER_SQL), params)  # the columns may hold a "?" (a regex)
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


def _link_and_insert(conn: psycopg.Connection[Any], batches: dict[str, tuple[list[list[Any]], list[bytes]]]) -> None:
    """Chain each instance's new rows onto its head (row-locked), skipping events stored already (replays)."""
    with conn.cursor() as cur:
        for instance in sorted(batches):  # one lock order: two writers never deadlock on the heads
            rows, bodies = batches[instance]
            cur.execute(
                "INSERT INTO audit_chain_heads (instance, seq, hash) VALUES (%s, 0, %s) ON CONFLICT DO NOTHING",
                (instance, chain.GENESIS),
            )
            head_row = cur.execute(_pg(HEAD_SQL) + " FOR UPDATE", (instance,)).fetchone()
            assert head_row is not None
            head = chain.Head(instance, int(head_row[0]), str(head_row[1]))
            stored = {
                (str(sid), int(ms))
                for sid, ms in cur.execute(
                    "SELECT support_id, time_ms FROM events WHERE instance = %s AND support_id = ANY(%s)",
                    (instance, list({r[_SUPPORT_ID] for r in rows})),
                )
            }
            fresh_rows, fresh_bodies = [], []
            for row, body in zip(rows, bodies, strict=True):
                once = (row[_SUPPORT_ID], row[0])
                if once not in stored:  # a replay of a committed batch, or a repeat within this one
                    stored.add(once)
                    fresh_rows.append(row)
                    fresh_bodies.append(body)
            if not fresh_rows:
                continue
            links, new_head = chain.link_batch(head, fresh_bodies)
            cur.executemany(_INSERT, [[*r, *link] for r, link in zip(fresh_rows, links, strict=True)])
            cur.execute(_pg(SET_HEAD_SQL), (instance, new_head.seq, new_head.hash))


def _event(row: Sequence[Any]) -> AuditEvent:
    return event_from_dict(dict(zip(FIELDS, row, strict=True)))

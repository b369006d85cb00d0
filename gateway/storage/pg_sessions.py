"""Sessions in PostgreSQL, shared by every instance, and the reader behind each worker's session cache.

The ``sessions`` table has the same columns as in SQLite
(:mod:`gateway.access.sessions`); the cookie, signing and CSRF rules stay there.

Why NOTIFY: each worker answers the per-request session check from memory
(:class:`~gateway.access.sessions.SessionCache`); on SQLite the cache asks
``PRAGMA data_version`` whether anything changed, which is free because the
file is local. Across hosts there is no such counter, and a query per
request is what the cache exists to avoid. So every write that ends or
changes a session (and the 30-second ``last_seen`` touch) sends
``pg_notify('gateway_sessions', <id hash>)`` in its own transaction:
PostgreSQL delivers it at COMMIT, to every listening worker of every
instance, and never for a rolled-back write. A write that hits many rows
sends ``*`` (drop everything) instead of one notification per row.

:class:`PgSessionReader` LISTENs through one
:class:`~gateway.storage.postgres.Listener` per worker process. While the
listener is down, notifications may be lost, so:

- cache misses fail at once (:class:`DatabaseUnavailable`: the page says
  ``service_unavailable``); the database is not even tried;
- sessions already in the cache are served for ``grace`` seconds after the
  loss (``database.outage_grace_seconds``), then refused as well;
- when the listener is back, the reader's version moves and the cache starts
  afresh, since what changed meanwhile is unknown.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

from gateway import metrics
from gateway.access.policy import SessionLimits
from gateway.access.sessions import (
    SESSION_COLUMNS,
    TOUCH_INTERVAL,
    SessionRecord,
    id_hash,
    new_session_row,
    session_record,
    well_formed_id,
)
from gateway.access.users import join_systems, to_epoch
from gateway.storage.postgres import Database, DatabaseUnavailable, Listener, PgStore, Schema, notify

SCHEMA = Schema(
    "sessions",
    {
        1: """
CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    cert_fingerprint TEXT NOT NULL,
    systems TEXT NOT NULL,
    must_change_password INTEGER NOT NULL,
    csrf_token TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE INDEX sessions_last_seen ON sessions (last_seen);
CREATE INDEX sessions_created ON sessions (created_at);
""",
    },
)

CHANNEL = "gateway_sessions"
EVERYTHING = "*"
# A write touching more sessions than this announces "*" rather than one notification each.
MAX_NAMED = 32


def announce(conn: psycopg.Connection[Any], hashes: list[str]) -> None:
    """Tell every worker which sessions this transaction changed (delivered at COMMIT)."""
    if len(hashes) > MAX_NAMED:
        notify(conn, CHANNEL, EVERYTHING)
        return
    for hashed in hashes:
        notify(conn, CHANNEL, hashed)


class PgSessionStore(PgStore):
    """Sessions in the shared database; every change is announced on :data:`CHANNEL`."""

    def create(
        self,
        user_id: str,
        cert_fingerprint: str,
        systems: Iterable[str],
        must_change_password: bool,
        now: dt.datetime,
    ) -> tuple[str, str]:
        """Start a session with a new random id (never the client's); return ``(session_id, csrf_token)``.

        Not announced: no cache can hold an entry for an id that did not
        exist (its cookie is signed only after this returns), and an
        announcement would only make every worker read the new session twice.
        """
        session_id, csrf_token, row = new_session_row(user_id, cert_fingerprint, systems, must_change_password, now)
        with self.db.connection() as conn:
            conn.execute(f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", row)  # noqa: S608
        return session_id, csrf_token

    def get(self, session_id: str) -> SessionRecord | None:
        if not well_formed_id(session_id):
            return None
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT user_id, cert_fingerprint, systems, must_change_password, csrf_token,"
                " created_at, last_seen FROM sessions WHERE id_hash = %s",
                (id_hash(session_id),),
            ).fetchone()
        return None if row is None else session_record(session_id, row)

    def touch(self, session_id: str, now: dt.datetime, *, last_seen: dt.datetime | None = None) -> bool:
        """Move ``last_seen`` to ``now`` if older than TOUCH_INTERVAL; announced, so caches see the new time."""
        if last_seen is not None and now - last_seen < TOUCH_INTERVAL:
            return False
        return bool(
            self._changed(
                "UPDATE sessions SET last_seen = %s WHERE id_hash = %s AND last_seen <= %s RETURNING id_hash",
                (to_epoch(now), id_hash(session_id), to_epoch(now - TOUCH_INTERVAL)),
            )
        )

    def delete(self, session_id: str) -> bool:
        return bool(self._changed("DELETE FROM sessions WHERE id_hash = %s RETURNING id_hash", (id_hash(session_id),)))

    def delete_for_user(self, user_id: str) -> int:
        return self._changed("DELETE FROM sessions WHERE user_id = %s RETURNING id_hash", (user_id,))

    def set_systems_for_user(self, user_id: str, systems: Iterable[str]) -> int:
        return self._changed(
            "UPDATE sessions SET systems = %s WHERE user_id = %s RETURNING id_hash", (join_systems(systems), user_id)
        )

    def purge_expired(self, now: dt.datetime, limits: SessionLimits) -> int:
        return self._changed(
            "DELETE FROM sessions WHERE last_seen <= %s OR created_at <= %s RETURNING id_hash",
            (to_epoch(now - limits.idle), to_epoch(now - limits.absolute)),
        )

    def _changed(self, statement: Any, params: tuple[object, ...]) -> int:
        """Run one write that returns the id hashes it hit, announce them, return how many."""
        with self.db.transaction() as conn:
            hashes = [str(row[0]) for row in conn.execute(statement, params).fetchall()]
            announce(conn, hashes)
        return len(hashes)


class PgSessionReader(PgSessionStore):
    """The session cache's reader: kept current by LISTEN/NOTIFY instead of by a query per request.

    Start :attr:`listener` on the worker's event loop (:meth:`start`); the
    notifications are handled on that loop, like the cache's lookups.
    """

    def __init__(self, db: Database, *, grace: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(db)
        self.grace = grace
        self._clock = clock
        self._version = 0
        self._watchers: list[Callable[[str | None], None]] = []
        self.listener = Listener(db.target, (CHANNEL,), self._notified, self._state)
        metrics.DATABASE_LISTENERS_DOWN.set(1)

    def start(self) -> None:
        """Start listening (on the running loop)."""
        self.listener.start()

    async def stop(self) -> None:
        await self.listener.stop()

    def watch(self, invalidate: Callable[[str | None], None]) -> None:
        self._watchers.append(invalidate)

    def data_version(self) -> int:
        """A local counter, bumped on ``*`` and on reconnect; raises once an outage outlasts the grace."""
        if not self.listener.up:
            down = self._clock() - (self.listener.down_since or 0.0)
            if down > self.grace:
                raise DatabaseUnavailable(
                    f"database {self.db.target}: session changes unknown for {down:.0f} s (grace {self.grace:g} s)"
                )
        return self._version

    def get(self, session_id: str) -> SessionRecord | None:
        """A cache miss: read only while changes are being heard, else what is read could go stale unseen."""
        if not self.listener.up:
            raise DatabaseUnavailable(f"database {self.db.target}: not listening for session changes")
        return super().get(session_id)

    @property
    def down_for(self) -> float | None:
        """Seconds since the listener was lost (None while it is up): for /healthz."""
        if self.listener.up:
            return None
        return self._clock() - (self.listener.down_since or 0.0)

    def _notified(self, channel: str, payload: str) -> None:
        if payload == EVERYTHING:
            self._version += 1
            return
        for invalidate in self._watchers:
            invalidate(payload)

    def _state(self, up: bool) -> None:
        metrics.DATABASE_LISTENERS_DOWN.set(0 if up else 1)
        if up:  # whatever was announced while the connection was down is lost
            self._version += 1

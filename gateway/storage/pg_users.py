"""The user store in PostgreSQL: accounts, failed logins and locks shared by every instance.

The same tables and columns as the SQLite file (:mod:`gateway.access.users`),
so a plain table copy moves one to the other; the rules (ID and system
validation, when a lock is due) are imported from there and from
:mod:`gateway.access.policy`, not repeated.

Why an advisory lock in :meth:`PgUserStore.record_failure`: SQLite's
``BEGIN IMMEDIATE`` serialises every writer on one file, but PostgreSQL lets
transactions run side by side, so two instances counting the fifth failure
at once could both see four. ``pg_advisory_xact_lock`` on a key derived
from the user ID (and one from the address) makes the insert, the count and
the lock one step per key across every process and host; it is released at
COMMIT. Keys are always taken in the order user, then address, so two
transactions never wait on each other in a circle.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

import psycopg

from gateway.access.policy import LoginSettings, lock_due
from gateway.access.users import (
    FailureResult,
    LoginState,
    User,
    UserExistsError,
    UserNotFoundError,
    check_hash,
    from_epoch,
    join_systems,
    split_systems,
    to_epoch,
    validate_roles,
    validate_systems,
    validate_user_id,
)
from gateway.storage.postgres import PgStore, Schema

SCHEMA = Schema(
    "users",
    {
        1: """
CREATE TABLE users (
    user_id TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    systems TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    must_change_password INTEGER NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    roles TEXT NOT NULL DEFAULT ''
);
CREATE TABLE login_failures (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
CREATE INDEX login_failures_key ON login_failures (kind, key, at);
CREATE INDEX login_failures_at ON login_failures (at);
CREATE TABLE lockouts (
    user_id TEXT PRIMARY KEY,
    locked_until DOUBLE PRECISION NOT NULL
);
""",
    },
)

_USER_COLUMNS = "user_id, password_hash, systems, enabled, must_change_password, created_at, roles"
# One advisory-lock key per counted thing; hashtextextended gives a bigint from any text.
_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"


class PgUserStore(PgStore):
    """Accounts, failures and locks in the shared database (``db`` is the process's pool)."""

    # -- accounts ---------------------------------------------------------

    def add_user(
        self,
        user_id: str,
        password_hash: str,
        systems: Iterable[str],
        *,
        now: dt.datetime,
        must_change_password: bool = False,
        enabled: bool = True,
        roles: Iterable[str] = (),
    ) -> User:
        """Create an account; raise UserExistsError if the ID is taken."""
        validate_user_id(user_id)
        check_hash(password_hash)
        wanted = validate_systems(systems)
        granted = validate_roles(roles)
        at = to_epoch(now)
        with self.db.transaction() as conn:
            cursor = conn.execute(
                f"INSERT INTO users ({_USER_COLUMNS}, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"  # noqa: S608
                " ON CONFLICT (user_id) DO NOTHING",
                (
                    user_id,
                    password_hash,
                    join_systems(wanted),
                    int(enabled),
                    int(must_change_password),
                    at,
                    join_systems(granted),
                    at,
                ),
            )
            if cursor.rowcount == 0:
                raise UserExistsError(f"user {user_id} already exists")
        return User(user_id, password_hash, wanted, enabled, must_change_password, from_epoch(at), granted)

    def get_user(self, user_id: str) -> User | None:
        with self.db.connection() as conn:
            return _select_user(conn, user_id)

    def list_users(self) -> list[User]:
        with self.db.connection() as conn:
            rows = conn.execute(f'SELECT {_USER_COLUMNS} FROM users ORDER BY user_id COLLATE "C"').fetchall()  # noqa: S608
        return [_user(row) for row in rows]

    def set_enabled(self, user_id: str, enabled: bool, *, now: dt.datetime) -> None:
        self._update(user_id, "enabled = %s", (int(enabled),), now)

    def set_systems(self, user_id: str, systems: Iterable[str], *, now: dt.datetime) -> frozenset[str]:
        wanted = validate_systems(systems)
        self._update(user_id, "systems = %s", (join_systems(wanted),), now)
        return wanted

    def set_roles(self, user_id: str, roles: Iterable[str], *, now: dt.datetime) -> frozenset[str]:
        granted = validate_roles(roles)
        self._update(user_id, "roles = %s", (join_systems(granted),), now)
        return granted

    def set_password(self, user_id: str, password_hash: str, *, temporary: bool, now: dt.datetime) -> None:
        check_hash(password_hash)
        self._update(user_id, "password_hash = %s, must_change_password = %s", (password_hash, int(temporary)), now)

    def _update(self, user_id: str, assignments: str, values: tuple[object, ...], now: dt.datetime) -> None:
        # ``assignments`` is always a literal from this class, never user input.
        sql = f"UPDATE users SET {assignments}, updated_at = %s WHERE user_id = %s"  # noqa: S608
        with self.db.transaction() as conn:
            cursor = conn.execute(sql, (*values, to_epoch(now), user_id))
            if cursor.rowcount == 0:
                raise UserNotFoundError(f"no such user: {user_id}")

    # -- failures and locks ----------------------------------------------

    def login_state(self, user_id: str, ip: str, now: dt.datetime, window: dt.timedelta) -> LoginState:
        """The account, the lock and the address's failures, in one round of queries on one connection."""
        with self.db.transaction() as conn:
            user = _select_user(conn, user_id)
            lock = conn.execute("SELECT locked_until FROM lockouts WHERE user_id = %s", (user_id,)).fetchone()
            ip_count = _count(conn, "ip", ip, to_epoch(now - window)) if ip else 0
        at = to_epoch(now)
        locked_until = from_epoch(lock[0]) if lock is not None and lock[0] > at else None
        return LoginState(user, locked_until, ip_count)

    def record_failure(self, user_id: str, ip: str, now: dt.datetime, settings: LoginSettings) -> FailureResult:
        """Count one failed login against the user ID and the address; maybe lock.

        Atomic across every process and instance: the advisory locks (user,
        then address) are held until COMMIT, so each failure sees every
        earlier one and exactly the ``max_failures``-th starts the lock.
        """
        at = to_epoch(now)
        since = at - settings.failure_window.total_seconds()
        with self.db.transaction() as conn:
            conn.execute(_LOCK, ("login:" + user_id,))
            if ip:
                conn.execute(_LOCK, ("login-ip:" + ip,))
            _prune(conn, "user", user_id, since)
            conn.execute("INSERT INTO login_failures (kind, key, at) VALUES ('user', %s, %s)", (user_id, at))
            if ip:
                _prune(conn, "ip", ip, since)
                conn.execute("INSERT INTO login_failures (kind, key, at) VALUES ('ip', %s, %s)", (ip, at))
            user_count = _count(conn, "user", user_id, since)
            ip_count = _count(conn, "ip", ip, since) if ip else 0
            if not lock_due(user_count, settings):
                return FailureResult(user_count, ip_count, None)
            until = at + settings.lockout.total_seconds()
            conn.execute(
                "INSERT INTO lockouts (user_id, locked_until) VALUES (%s, %s)"
                " ON CONFLICT (user_id) DO UPDATE SET locked_until = EXCLUDED.locked_until",
                (user_id, until),
            )
            conn.execute("DELETE FROM login_failures WHERE kind = 'user' AND key = %s", (user_id,))
        return FailureResult(0, ip_count, from_epoch(until))

    def record_ip_failure(self, ip: str, now: dt.datetime, settings: LoginSettings) -> int:
        at = to_epoch(now)
        since = at - settings.failure_window.total_seconds()
        with self.db.transaction() as conn:
            conn.execute(_LOCK, ("login-ip:" + ip,))
            _prune(conn, "ip", ip, since)
            conn.execute("INSERT INTO login_failures (kind, key, at) VALUES ('ip', %s, %s)", (ip, at))
            return _count(conn, "ip", ip, since)

    def user_failures(self, user_id: str, now: dt.datetime, window: dt.timedelta) -> int:
        with self.db.connection() as conn:
            return _count(conn, "user", user_id, to_epoch(now - window))

    def ip_failures(self, ip: str, now: dt.datetime, window: dt.timedelta) -> int:
        with self.db.connection() as conn:
            return _count(conn, "ip", ip, to_epoch(now - window))

    def clear_failures(self, user_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(_LOCK, ("login:" + user_id,))
            conn.execute("DELETE FROM login_failures WHERE kind = 'user' AND key = %s", (user_id,))

    def locked_until(self, user_id: str, now: dt.datetime) -> dt.datetime | None:
        with self.db.connection() as conn:
            row = conn.execute("SELECT locked_until FROM lockouts WHERE user_id = %s", (user_id,)).fetchone()
        if row is None or row[0] <= to_epoch(now):
            return None
        return from_epoch(row[0])

    def unlock(self, user_id: str) -> bool:
        with self.db.transaction() as conn:
            conn.execute(_LOCK, ("login:" + user_id,))
            cursor = conn.execute("DELETE FROM lockouts WHERE user_id = %s", (user_id,))
            conn.execute("DELETE FROM login_failures WHERE kind = 'user' AND key = %s", (user_id,))
            return cursor.rowcount > 0

    def purge(self, now: dt.datetime, window: dt.timedelta) -> int:
        with self.db.transaction() as conn:
            old = conn.execute("DELETE FROM login_failures WHERE at < %s", (to_epoch(now - window),))
            ended = conn.execute("DELETE FROM lockouts WHERE locked_until <= %s", (to_epoch(now),))
            return old.rowcount + ended.rowcount


def _prune(conn: psycopg.Connection[Any], kind: str, key: str, since: float) -> None:
    conn.execute("DELETE FROM login_failures WHERE kind = %s AND key = %s AND at < %s", (kind, key, since))


def _count(conn: psycopg.Connection[Any], kind: str, key: str, since: float) -> int:
    row = conn.execute(
        "SELECT COUNT(*) FROM login_failures WHERE kind = %s AND key = %s AND at >= %s", (kind, key, since)
    ).fetchone()
    return int(row[0]) if row else 0


def _select_user(conn: psycopg.Connection[Any], user_id: str) -> User | None:
    row = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE user_id = %s", (user_id,)).fetchone()  # noqa: S608
    return None if row is None else _user(row)


def _user(row: tuple[Any, ...]) -> User:
    user_id, password_hash, systems, enabled, must_change, created, roles = row
    return User(
        user_id=user_id,
        password_hash=password_hash,
        systems=split_systems(systems),
        enabled=bool(enabled),
        must_change_password=bool(must_change),
        created_at=from_epoch(created),
        roles=split_systems(roles),
    )

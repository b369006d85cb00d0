"""The user store: accounts, failed logins and locks, in one SQLite file.

Every gateway worker process opens the same file (config.users.database), so
the store is built for several writers: WAL journal, a busy timeout, short
transactions, and ``BEGIN IMMEDIATE`` around every read-modify-write (record
a failure, then maybe lock) so two workers cannot both miss the fifth failure.

Each :class:`UserStore` keeps one connection guarded by a lock, so it may be
shared by the threads of an executor. All methods block (file I/O): from
async code call them with ``loop.run_in_executor``. Passwords never enter
this module; it stores argon2id hashes made by :mod:`gateway.access.passwords`.

Failures and locks are kept per *typed* user ID, whether or not the user
exists, so a lock looks the same for unknown IDs (see gateway.access.policy).
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from gateway.access.passwords import HASH_PREFIX
from gateway.access.policy import LoginSettings, lock_due
from gateway.errors import GatewayError
from gateway.storage.sqlite import SqliteStore
from gateway.verdict import Reason, Verdict

USER_ID_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,64}", re.ASCII)
SYSTEM_PATTERN = re.compile(r"[a-z0-9._-]{1,32}", re.ASCII)
SCHEMA_VERSION = 2
# Roles are separate from systems: a system is a backend a user may reach, a role a
# duty at the gateway itself. ``auditor`` opens the audit workspace.
ROLES = ("auditor",)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    systems TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    must_change_password INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    roles TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS login_failures (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS login_failures_key ON login_failures (kind, key, at);
CREATE INDEX IF NOT EXISTS login_failures_at ON login_failures (at);
CREATE TABLE IF NOT EXISTS lockouts (
    user_id TEXT PRIMARY KEY,
    locked_until REAL NOT NULL
) WITHOUT ROWID;
"""
# Upgrades of an existing file, by the version they lead to (run in order, in the
# same transaction that records the new version).
_MIGRATIONS = {
    2: "ALTER TABLE users ADD COLUMN roles TEXT NOT NULL DEFAULT ''",
}


class UserError(GatewayError):
    """A user-store operation cannot be done as asked."""


class InvalidUserIdError(UserError):
    """The user ID is not a plain ID (1-64 of A-Z a-z 0-9 . _ - @)."""


class UserExistsError(UserError):
    """``add`` for a user ID that is already taken."""


class UserNotFoundError(UserError):
    """The named user does not exist."""


@dataclass(frozen=True, slots=True)
class User:
    """One account. ``password_hash`` stays out of repr so it cannot reach a log."""

    user_id: str
    password_hash: str = field(repr=False)
    systems: frozenset[str]
    enabled: bool
    must_change_password: bool
    created_at: dt.datetime
    roles: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class FailureResult:
    """What :meth:`UserStore.record_failure` did.

    ``user_failures`` / ``ip_failures``: failures in the window after this one
    (``user_failures`` is 0 when this failure started a lock, because the
    count restarts). ``locked_until`` is set when this failure started a lock.
    """

    user_failures: int
    ip_failures: int
    locked_until: dt.datetime | None


@dataclass(frozen=True, slots=True)
class LoginState:
    """What the login handler needs from the store before deciding."""

    user: User | None
    locked_until: dt.datetime | None
    ip_failures: int


def validate_user_id(user_id: str) -> str:
    """Return ``user_id`` if it is a plain ID, else raise InvalidUserIdError."""
    if not USER_ID_PATTERN.fullmatch(user_id):
        raise InvalidUserIdError(f"invalid user ID {user_id!r}: use 1-64 characters from A-Z a-z 0-9 . _ - @")
    return user_id


def validate_systems(systems: Iterable[str]) -> frozenset[str]:
    """The systems as a set; each must be a plain lower-case name, at least one."""
    result = frozenset(systems)
    if not result:
        raise UserError("a user needs at least one system")
    for name in sorted(result):
        if not SYSTEM_PATTERN.fullmatch(name):
            raise UserError(f"invalid system name {name!r}")
    return result


def validate_roles(roles: Iterable[str]) -> frozenset[str]:
    """The roles as a set (empty is allowed: no role); each must be a known role."""
    result = frozenset(r for r in roles if r)
    for name in sorted(result):
        if name not in ROLES:
            raise UserError(f"unknown role {name!r}: known roles are {', '.join(ROLES)}")
    return result


def decide_audit_access(user: User | None) -> Verdict:
    """May this (logged-in) user open the audit workspace? Only an enabled account with ``auditor``."""
    if user is None or not user.enabled:
        return Verdict.deny(Reason.NOT_AUTHORIZED, "audit workspace: no enabled account")
    if "auditor" not in user.roles:
        return Verdict.deny(Reason.NOT_AUTHORIZED, "audit workspace needs the auditor role")
    return Verdict.allow("auditor")


def to_epoch(when: dt.datetime) -> float:
    """Seconds since the epoch; refuses naive datetimes (all times are UTC-aware)."""
    if when.tzinfo is None:
        raise ValueError("naive datetime; use timezone-aware UTC times")
    return when.timestamp()


def from_epoch(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def join_systems(systems: Iterable[str]) -> str:
    return ",".join(sorted(systems))


def split_systems(text: str) -> frozenset[str]:
    return frozenset(s for s in text.split(",") if s)


class UserStore(SqliteStore):
    """Accounts, failures and locks in the SQLite file at ``path``."""

    component = "users"
    schema_version = SCHEMA_VERSION
    schema = _SCHEMA
    migrations = _MIGRATIONS
    label = "user"

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction, taking the write lock up front."""
        with self._guard() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

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
        with self._write() as conn:
            exists = conn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone()
            if exists:
                raise UserExistsError(f"user {user_id} already exists")
            conn.execute(
                "INSERT INTO users (user_id, password_hash, systems, enabled,"
                " must_change_password, created_at, updated_at, roles) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    user_id,
                    password_hash,
                    join_systems(wanted),
                    enabled,
                    must_change_password,
                    at,
                    at,
                    join_systems(granted),
                ),
            )
        return User(user_id, password_hash, wanted, enabled, must_change_password, from_epoch(at), granted)

    def get_user(self, user_id: str) -> User | None:
        """The account with exactly this ID, or None (any string may be asked)."""
        with self._guard() as conn:
            return _select_user(conn, user_id)

    def list_users(self) -> list[User]:
        """All accounts, ordered by user ID."""
        with self._guard() as conn:
            rows = conn.execute(
                "SELECT user_id, password_hash, systems, enabled, must_change_password,"
                " created_at, roles FROM users ORDER BY user_id"
            ).fetchall()
        return [_user(row) for row in rows]

    def set_enabled(self, user_id: str, enabled: bool, *, now: dt.datetime) -> None:
        self._update(user_id, "enabled = ?", (enabled,), now)

    def set_systems(self, user_id: str, systems: Iterable[str], *, now: dt.datetime) -> frozenset[str]:
        wanted = validate_systems(systems)
        self._update(user_id, "systems = ?", (join_systems(wanted),), now)
        return wanted

    def set_roles(self, user_id: str, roles: Iterable[str], *, now: dt.datetime) -> frozenset[str]:
        """Replace the user's roles (an empty set takes every role away)."""
        granted = validate_roles(roles)
        self._update(user_id, "roles = ?", (join_systems(granted),), now)
        return granted

    def set_password(self, user_id: str, password_hash: str, *, temporary: bool, now: dt.datetime) -> None:
        """Store a new hash; ``temporary`` forces a change at the next login."""
        check_hash(password_hash)
        self._update(user_id, "password_hash = ?, must_change_password = ?", (password_hash, temporary), now)

    def _update(self, user_id: str, assignments: str, values: tuple[object, ...], now: dt.datetime) -> None:
        # ``assignments`` is always a literal from this class, never user input.
        sql = f"UPDATE users SET {assignments}, updated_at = ? WHERE user_id = ?"  # noqa: S608
        with self._write() as conn:
            cursor = conn.execute(sql, (*values, to_epoch(now), user_id))
            if cursor.rowcount == 0:
                raise UserNotFoundError(f"no such user: {user_id}")

    # -- failures and locks ----------------------------------------------

    def login_state(self, user_id: str, ip: str, now: dt.datetime, window: dt.timedelta) -> LoginState:
        """The account, the lock and the address's failures for one login POST.

        One call (one executor hop) instead of three; a consistent snapshot.
        """
        with self._guard() as conn:
            conn.execute("BEGIN")
            try:
                user = _select_user(conn, user_id)
                lock = conn.execute("SELECT locked_until FROM lockouts WHERE user_id = ?", (user_id,)).fetchone()
                ip_count = self._count(conn, "ip", ip, to_epoch(now - window)) if ip else 0
            finally:
                conn.execute("COMMIT")
        at = to_epoch(now)
        locked_until = from_epoch(lock[0]) if lock is not None and lock[0] > at else None
        return LoginState(user, locked_until, ip_count)

    def record_failure(self, user_id: str, ip: str, now: dt.datetime, settings: LoginSettings) -> FailureResult:
        """Count one failed login against the user ID and the address; maybe lock.

        One IMMEDIATE transaction: the insert, the count and the lock are
        atomic across worker processes. When the lock starts, the user's
        failures are cleared so that after it ends the user gets a full
        ``max_failures`` tries again. Pass "" for ``ip`` to count only the user.
        """
        at = to_epoch(now)
        since = at - settings.failure_window.total_seconds()
        with self._write() as conn:
            self._prune(conn, "user", user_id, since)
            conn.execute("INSERT INTO login_failures (kind, key, at) VALUES ('user', ?, ?)", (user_id, at))
            if ip:
                self._prune(conn, "ip", ip, since)
                conn.execute("INSERT INTO login_failures (kind, key, at) VALUES ('ip', ?, ?)", (ip, at))
            user_count = self._count(conn, "user", user_id, since)
            ip_count = self._count(conn, "ip", ip, since) if ip else 0
            if not lock_due(user_count, settings):
                return FailureResult(user_count, ip_count, None)
            until = at + settings.lockout.total_seconds()
            conn.execute(
                "INSERT INTO lockouts (user_id, locked_until) VALUES (?, ?)"
                " ON CONFLICT (user_id) DO UPDATE SET locked_until = excluded.locked_until",
                (user_id, until),
            )
            conn.execute("DELETE FROM login_failures WHERE kind = 'user' AND key = ?", (user_id,))
        return FailureResult(0, ip_count, from_epoch(until))

    def record_ip_failure(self, ip: str, now: dt.datetime, settings: LoginSettings) -> int:
        """Count a failure against the address only; return its count in the window."""
        at = to_epoch(now)
        since = at - settings.failure_window.total_seconds()
        with self._write() as conn:
            self._prune(conn, "ip", ip, since)
            conn.execute("INSERT INTO login_failures (kind, key, at) VALUES ('ip', ?, ?)", (ip, at))
            return self._count(conn, "ip", ip, since)

    def user_failures(self, user_id: str, now: dt.datetime, window: dt.timedelta) -> int:
        """Failed logins for this user ID within ``window`` before ``now``."""
        with self._guard() as conn:
            return self._count(conn, "user", user_id, to_epoch(now - window))

    def ip_failures(self, ip: str, now: dt.datetime, window: dt.timedelta) -> int:
        """Failed logins from this address within ``window`` before ``now``."""
        with self._guard() as conn:
            return self._count(conn, "ip", ip, to_epoch(now - window))

    def clear_failures(self, user_id: str) -> None:
        """Forget the user ID's failures (after a successful login)."""
        with self._write() as conn:
            conn.execute("DELETE FROM login_failures WHERE kind = 'user' AND key = ?", (user_id,))

    def locked_until(self, user_id: str, now: dt.datetime) -> dt.datetime | None:
        """When the lock on this user ID ends, or None if it is not locked at ``now``."""
        with self._guard() as conn:
            row = conn.execute("SELECT locked_until FROM lockouts WHERE user_id = ?", (user_id,)).fetchone()
        if row is None or row[0] <= to_epoch(now):
            return None
        return from_epoch(row[0])

    def unlock(self, user_id: str) -> bool:
        """Lift the lock and forget the failures; True if a lock row existed."""
        with self._write() as conn:
            cursor = conn.execute("DELETE FROM lockouts WHERE user_id = ?", (user_id,))
            conn.execute("DELETE FROM login_failures WHERE kind = 'user' AND key = ?", (user_id,))
            return cursor.rowcount > 0

    def purge(self, now: dt.datetime, window: dt.timedelta) -> int:
        """Drop failures older than the window and ended locks (housekeeping)."""
        with self._write() as conn:
            old = conn.execute("DELETE FROM login_failures WHERE at < ?", (to_epoch(now - window),))
            ended = conn.execute("DELETE FROM lockouts WHERE locked_until <= ?", (to_epoch(now),))
            return old.rowcount + ended.rowcount

    @staticmethod
    def _prune(conn: sqlite3.Connection, kind: str, key: str, since: float) -> None:
        conn.execute("DELETE FROM login_failures WHERE kind = ? AND key = ? AND at < ?", (kind, key, since))

    @staticmethod
    def _count(conn: sqlite3.Connection, kind: str, key: str, since: float) -> int:
        row = conn.execute(
            "SELECT COUNT(*) FROM login_failures WHERE kind = ? AND key = ? AND at >= ?",
            (kind, key, since),
        ).fetchone()
        return int(row[0])


def check_hash(password_hash: str) -> None:
    # A guard against storing a plain password by mistake; the text of the
    # refused value is deliberately not in the message.
    if not password_hash.startswith(HASH_PREFIX):
        raise UserError("refusing to store a password that is not an argon2id hash")


def _select_user(conn: sqlite3.Connection, user_id: str) -> User | None:
    row = conn.execute(
        "SELECT user_id, password_hash, systems, enabled, must_change_password,"
        " created_at, roles FROM users WHERE user_id = ?",
        (user_id,),
    ).fetchone()
    return None if row is None else _user(row)


def _user(row: tuple[str, str, str, int, int, float, str]) -> User:
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

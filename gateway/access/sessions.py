"""Server-side sessions, the signed session cookie and the CSRF tokens.

A session is a row in the ``sessions`` table of the users database
(config.users.database), shared by all worker processes: deleting the row
(logout, admin disable) ends the session in every worker at once. The
cookie ``__Host-gw_session`` carries only ``<random id>.<HMAC>``; the key
comes from config.session.secret_file. The table stores a SHA-256 of the id,
so a copy of the database alone yields no usable cookie.

Cookies are set with ``Secure; HttpOnly; SameSite=Lax; Path=/`` and no
Domain, as the ``__Host-`` prefix requires (:func:`set_cookie_header`).

CSRF: each session row holds a random token for the forms of logged-in
pages (:func:`check_session_csrf`). The login form has no session yet, so it
uses a double-submit token: a random nonce in the ``__Host-gw_csrf`` cookie
and, in the form, an HMAC over that nonce and the time
(:func:`login_csrf_token` / :func:`check_login_csrf`, pure functions).

Every proxied request looks its cookie up in a :class:`SessionCache`, which
answers from memory while ``PRAGMA data_version`` says no other connection
has committed to the file, and otherwise drops everything and reads again
(:meth:`SessionStore.get`, one SELECT by primary key). All store methods
block; from async code use an executor (the cache's reads are cheap enough
to run inline). On PostgreSQL (:mod:`gateway.storage.pg_sessions`) the
same cache is told of each change by LISTEN/NOTIFY instead
(:meth:`SessionCache.invalidate`).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gateway.access.policy import SessionLimits
from gateway.access.users import from_epoch, join_systems, split_systems, to_epoch
from gateway.errors import ConfigError
from gateway.storage.sqlite import SqliteStore

SESSION_COOKIE = "__Host-gw_session"
LOGIN_CSRF_COOKIE = "__Host-gw_csrf"
MIN_KEY_BYTES = 32
# Entries a worker's SessionCache holds before it starts over (~1 KiB each).
SESSION_CACHE_ENTRIES = 10_000
# last_seen is written at most this often per session: idle expiry is then
# exact to within this interval, and most requests cost no write at all.
TOUCH_INTERVAL = dt.timedelta(seconds=30)
# Clock skew tolerated for login-form tokens minted by another worker.
_CSRF_SKEW_SECONDS = 60
_MAX_COOKIE_LENGTH = 256
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,128}", re.ASCII)
_SESSION_CONTEXT = b"gw-session\x00"
_LOGIN_CSRF_CONTEXT = b"gw-login-csrf\x00"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    cert_fingerprint TEXT NOT NULL,
    systems TEXT NOT NULL,
    must_change_password INTEGER NOT NULL,
    csrf_token TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_seen REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user_id);
CREATE INDEX IF NOT EXISTS sessions_last_seen ON sessions (last_seen);
CREATE INDEX IF NOT EXISTS sessions_created ON sessions (created_at);
"""


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One live session. The id and CSRF token stay out of repr (they are secrets)."""

    session_id: str = field(repr=False)
    user_id: str
    cert_fingerprint: str
    systems: frozenset[str]
    must_change_password: bool
    csrf_token: str = field(repr=False)
    created_at: dt.datetime
    last_seen: dt.datetime


class SessionStore(SqliteStore):
    """Sessions in the SQLite file at ``path`` (normally the users database)."""

    component = "sessions"
    schema_version = SCHEMA_VERSION
    schema = _SCHEMA
    label = "session"

    def create(
        self,
        user_id: str,
        cert_fingerprint: str,
        systems: Iterable[str],
        must_change_password: bool,
        now: dt.datetime,
    ) -> tuple[str, str]:
        """Start a session; return ``(session_id, csrf_token)``.

        Always a new random id, never one the client brought along (no
        session fixation). Sign the id with :func:`sign` for the cookie.
        """
        session_id, csrf_token, row = new_session_row(user_id, cert_fingerprint, systems, must_change_password, now)
        with self._guard() as conn:
            conn.execute(f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)  # noqa: S608
        return session_id, csrf_token

    def get(self, session_id: str) -> SessionRecord | None:
        """The session with this id, expired or not (decide_session judges), or None."""
        if not well_formed_id(session_id):
            return None
        with self._guard() as conn:
            row = conn.execute(
                "SELECT user_id, cert_fingerprint, systems, must_change_password, csrf_token,"
                " created_at, last_seen FROM sessions WHERE id_hash = ?",
                (id_hash(session_id),),
            ).fetchone()
        return None if row is None else session_record(session_id, row)

    def touch(self, session_id: str, now: dt.datetime, *, last_seen: dt.datetime | None = None) -> bool:
        """Move ``last_seen`` to ``now`` if it is older than TOUCH_INTERVAL.

        Pass the ``last_seen`` of the record just read to skip the database
        entirely when it is fresh. Returns True when a row was written.
        """
        if last_seen is not None and now - last_seen < TOUCH_INTERVAL:
            return False
        with self._guard() as conn:
            cursor = conn.execute(
                "UPDATE sessions SET last_seen = ? WHERE id_hash = ? AND last_seen <= ?",
                (to_epoch(now), id_hash(session_id), to_epoch(now - TOUCH_INTERVAL)),
            )
            return cursor.rowcount > 0

    def delete(self, session_id: str) -> bool:
        """End one session (logout); True if it existed."""
        with self._guard() as conn:
            cursor = conn.execute("DELETE FROM sessions WHERE id_hash = ?", (id_hash(session_id),))
            return cursor.rowcount > 0

    def delete_for_user(self, user_id: str) -> int:
        """End every session of a user (disable, password reset or change)."""
        with self._guard() as conn:
            return conn.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,)).rowcount

    def set_systems_for_user(self, user_id: str, systems: Iterable[str]) -> int:
        """Apply a change of the user's systems to the sessions already open."""
        with self._guard() as conn:
            cursor = conn.execute(
                "UPDATE sessions SET systems = ? WHERE user_id = ?",
                (join_systems(systems), user_id),
            )
            return cursor.rowcount

    def purge_expired(self, now: dt.datetime, limits: SessionLimits) -> int:
        """Delete sessions past their idle or absolute limit (housekeeping)."""
        with self._guard() as conn:
            cursor = conn.execute(
                "DELETE FROM sessions WHERE last_seen <= ? OR created_at <= ?",
                (to_epoch(now - limits.idle), to_epoch(now - limits.absolute)),
            )
            return cursor.rowcount


class SessionReader(SessionStore):
    """A SessionStore whose connection cannot write (``PRAGMA query_only``).

    ``PRAGMA data_version`` changes when *another* connection commits, never
    for the connection's own commits, so it only signals every change on a
    connection that never commits. query_only makes that a property of the
    connection rather than a convention.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)  # creates the tables if needed, before going read-only
        try:
            with self._guard() as conn:
                conn.execute("PRAGMA query_only = ON")
        except BaseException:
            self.close()
            raise

    def data_version(self) -> int:
        """A value that differs from the last one read here iff another connection committed since."""
        with self._guard() as conn:
            row = conn.execute("PRAGMA data_version").fetchone()
        return int(row[0])

    def watch(self, invalidate: Callable[[str | None], None]) -> None:
        """Nothing to watch: ``data_version`` already sees every commit to the file."""


class CacheReader(Protocol):
    """What :class:`SessionCache` uses of its reader (the storage interfaces' SessionReaderProtocol has it all)."""

    def get(self, session_id: str) -> SessionRecord | None: ...

    def data_version(self) -> int: ...

    def watch(self, invalidate: Callable[[str | None], None]) -> None: ...


class SessionCache:
    """The per-request cookie → session lookup of one worker, answered from memory when it can.

    Why: under keep-alive load py-spy put ``unsign`` + :meth:`SessionStore.get`
    at ~16 % of a worker's CPU (~50 µs a request). A hit here costs one
    ``PRAGMA data_version`` and a dict lookup (a few µs).

    Why it stays exact: the entries are valid only while the reader's
    ``data_version`` is the one read when they were filled. Any commit to the
    file by any other connection (another worker, the portal, the CLI, this
    worker's writer store: logout, session ends, password changes,
    :meth:`SessionStore.set_systems_for_user`, touches) changes it, and the
    next lookup drops every entry and reads again. The version is read
    *before* the SELECT it guards, so a commit racing that SELECT costs a
    reload, never a stale answer. Records are cached, not verdicts:
    ``decide_session`` still judges expiry against the current clock.

    Only cookies with a valid signature are kept (a forged cookie costs an
    HMAC each time but cannot push live sessions out), and the whole cache
    starts over when full, so memory stays bounded.

    A reader whose database cannot bump a version on every commit (PostgreSQL,
    shared by other hosts) is told of changes instead: it calls
    :meth:`invalidate` with the changed session's id hash, or None for
    "anything may have changed", and bumps its own ``data_version`` for the latter.
    """

    def __init__(self, reader: CacheReader, key: bytes, max_entries: int = SESSION_CACHE_ENTRIES) -> None:
        self.reader = reader
        self._key = key
        self._max_entries = max_entries
        self._entries: dict[str, SessionRecord | None] = {}
        self._cookies: dict[str, str] = {}  # id hash -> the cookie its entry is kept under
        self._version: int | None = None
        self._lock = threading.Lock()  # the event loop is the normal caller; threads stay safe
        reader.watch(self.invalidate)

    def invalidate(self, hashed: str | None) -> None:
        """Forget the session with this id hash (a write elsewhere changed or ended it); None: forget all."""
        with self._lock:
            if hashed is None:
                self._clear()
                return
            cookie = self._cookies.pop(hashed, None)
            if cookie is not None:
                self._entries.pop(cookie, None)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, cookie: str) -> SessionRecord | None:
        """The session the cookie names (expired or not: decide_session judges), or None."""
        with self._lock:
            self._drop_if_changed()
            try:
                return self._entries[cookie]
            except KeyError:
                pass
            session_id = unsign(cookie, self._key)
            if session_id is None:
                return None
            record = self.reader.get(session_id)
            self._remember(cookie, id_hash(session_id), record)
            return record

    def _drop_if_changed(self) -> None:
        version = self.reader.data_version()
        if version != self._version:
            self._clear()
            self._version = version

    def _clear(self) -> None:
        self._entries.clear()
        self._cookies.clear()

    def _remember(self, cookie: str, hashed: str, record: SessionRecord | None) -> None:
        if len(self._entries) >= self._max_entries:
            self._clear()
        self._entries[cookie] = record
        self._cookies[hashed] = cookie


def cookie_value(header: str | None, name: str) -> str | None:
    """The first value of cookie ``name`` in a Cookie header, or None.

    The per-request session lookup needs one cookie; aiohttp's ``request.cookies``
    parses them all into Morsels (~8 µs a request in profiles). Quoted or otherwise
    odd values are returned as sent: they fail :func:`unsign`, which is the
    refusal they deserve.
    """
    if not header or name not in header:
        return None
    for part in header.split(";"):
        key, eq, value = part.partition("=")
        if eq and key.strip() == name:
            return value.strip()
    return None


def well_formed_id(session_id: str) -> bool:
    """True for text that could be a session id (anything else is not even looked up)."""
    return _TOKEN_RE.fullmatch(session_id) is not None


# A session row's columns, in the order :func:`new_session_row` gives them (both backends).
SESSION_COLUMNS = "id_hash, user_id, cert_fingerprint, systems, must_change_password, csrf_token, created_at, last_seen"


def new_session_row(
    user_id: str, cert_fingerprint: str, systems: Iterable[str], must_change_password: bool, now: dt.datetime
) -> tuple[str, str, tuple[Any, ...]]:
    """A new session: ``(session_id, csrf_token, row)`` with fresh random ids and the row in SESSION_COLUMNS order.

    Always a new random id, never one the client brought along (no session fixation).
    """
    session_id = secrets.token_urlsafe(32)
    csrf_token = secrets.token_urlsafe(32)
    at = to_epoch(now)
    row = (
        id_hash(session_id),
        user_id,
        cert_fingerprint.lower(),
        join_systems(systems),
        int(must_change_password),
        csrf_token,
        at,
        at,
    )
    return session_id, csrf_token, row


def session_record(session_id: str, row: Sequence[Any]) -> SessionRecord:
    """A record from a row of (user_id, cert_fingerprint, systems, must_change_password, csrf_token,
    created_at, last_seen): the same columns in every backend."""
    user_id, fingerprint, systems, must_change, csrf_token, created, seen = row
    return SessionRecord(
        session_id=session_id,
        user_id=user_id,
        cert_fingerprint=fingerprint,
        systems=split_systems(systems),
        must_change_password=bool(must_change),
        csrf_token=csrf_token,
        created_at=from_epoch(created),
        last_seen=from_epoch(seen),
    )


def id_hash(session_id: str) -> str:
    """The sessions table's key for a session id (the id itself is never stored)."""
    return hashlib.sha256(session_id.encode("ascii", "replace")).hexdigest()


def _mac(key: bytes, context: bytes, *parts: str) -> str:
    message = context + b"\x00".join(p.encode("ascii", "replace") for p in parts)
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def sign(session_id: str, key: bytes) -> str:
    """The cookie value for a session id: ``<id>.<HMAC-SHA256>``."""
    return f"{session_id}.{_mac(key, _SESSION_CONTEXT, session_id)}"


def unsign(value: str, key: bytes) -> str | None:
    """The session id from a cookie value, or None if it was not signed with ``key``."""
    if len(value) > _MAX_COOKIE_LENGTH:
        return None
    session_id, dot, mac = value.rpartition(".")
    if not dot or not _TOKEN_RE.fullmatch(session_id):
        return None
    expected = _mac(key, _SESSION_CONTEXT, session_id)
    if not hmac.compare_digest(mac.encode("ascii", "replace"), expected.encode("ascii")):
        return None
    return session_id


def check_session_csrf(session: SessionRecord, token: str | None) -> bool:
    """True when a form's token equals the session's (constant time)."""
    if not token:
        return False
    return hmac.compare_digest(token.encode("utf-8", "replace"), session.csrf_token.encode("ascii"))


def new_login_nonce() -> str:
    """A random value for the ``__Host-gw_csrf`` cookie of the login form."""
    return secrets.token_urlsafe(32)


def login_csrf_token(key: bytes, nonce: str, now: dt.datetime) -> str:
    """The login form's hidden token: ``<unix time>.<HMAC(nonce, time)>``.

    Double submit: a cross-site page can neither read the nonce cookie nor
    compute the HMAC without the key, and the time bounds a token's life.
    """
    stamp = str(int(now.timestamp()))
    return f"{stamp}.{_mac(key, _LOGIN_CSRF_CONTEXT, nonce, stamp)}"


def check_login_csrf(
    key: bytes,
    token: str | None,
    cookie_nonce: str | None,
    now: dt.datetime,
    max_age: dt.timedelta,
) -> bool:
    """True when ``token`` was made by :func:`login_csrf_token` for this nonce, recently."""
    if not token or not cookie_nonce or not _TOKEN_RE.fullmatch(cookie_nonce):
        return False
    if len(token) > _MAX_COOKIE_LENGTH:
        return False
    stamp, dot, mac = token.partition(".")
    if not dot or not stamp.isascii() or not stamp.isdigit():
        return False
    age = now.timestamp() - int(stamp)
    if age > max_age.total_seconds() or age < -_CSRF_SKEW_SECONDS:
        return False
    expected = _mac(key, _LOGIN_CSRF_CONTEXT, cookie_nonce, stamp)
    return hmac.compare_digest(mac.encode("ascii", "replace"), expected.encode("ascii"))


def set_cookie_header(name: str, value: str, max_age: int | None = None) -> str:
    """A ``Set-Cookie`` value with the attributes every gateway cookie needs.

    No Max-Age by default: the cookie dies with the browser, which users
    restart after installing a certificate anyway; the server-side limits
    decide the real lifetime.
    """
    parts = [f"{name}={value}", "Path=/", "Secure", "HttpOnly", "SameSite=Lax"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts)


def clear_cookie_header(name: str) -> str:
    """A ``Set-Cookie`` value that deletes the cookie in the browser."""
    return set_cookie_header(name, "", max_age=0)


def load_session_key(path: Path) -> bytes:
    """Read the cookie-signing key; at least 32 bytes, surrounding whitespace ignored.

    Any content works (``openssl rand -hex 32 > session.key`` gives 64 bytes):
    it is used as an HMAC key as-is, and every worker reads the same file.
    The key's bytes never appear in an error.
    """
    try:
        data = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError([f"session.secret_file: cannot read {path}: {exc.strerror or exc}"]) from exc
    if len(data) < MIN_KEY_BYTES:
        raise ConfigError(
            [
                f"session.secret_file: {path} holds {len(data)} bytes; need at least"
                f" {MIN_KEY_BYTES} (create one with: openssl rand -hex 32 > {path})"
            ]
        )
    return data


def create_session_key(path: Path) -> None:
    """Write a new random key file (mode 0600); refuse to overwrite an existing one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError([f"session.secret_file: {path} already exists"]) from exc
    except OSError as exc:
        raise ConfigError([f"session.secret_file: cannot create {path}: {exc.strerror}"]) from exc
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(secrets.token_hex(32) + "\n")

"""The PostgreSQL base every PostgreSQL store shares: a pool, versioned schemas, LISTEN/NOTIFY.

Why PostgreSQL: several gateway instances on several hosts (a pair per
system) and the portal must see one set of users, sessions, login failures,
audit events and CA records. SQLite stays the embedded default; this module
is used only when the config has a top-level ``database:``.

- :class:`Database` holds one psycopg connection pool per process (size from
  ``database.pool_size``), in autocommit mode with explicit transactions.
  Every psycopg error becomes :class:`~gateway.errors.StoreError` with the
  password removed; an unreachable server becomes
  :class:`DatabaseUnavailable` so the web edge can answer
  ``service_unavailable`` instead of a 500.
- Schemas are versioned per component (users, sessions, audit, ca) in one
  ``schema_version`` table, as in SQLite. Unlike SQLite, a running gateway
  never changes the schema: ``gateway db migrate`` does (with the admin role),
  and :func:`check_schema` refuses to start on a schema that is behind.
- :class:`Listener` keeps one connection per process LISTENing and hands each
  notification to a callback on the event loop; it reconnects with backoff
  and reports when it was down (notifications may have been missed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
import psycopg_pool
from psycopg import conninfo as pg_conninfo

from gateway.errors import ConfigError, StoreError

log = logging.getLogger("gateway.storage")
# The pool logs a warning for every failed reconnection attempt: a storm during an
# outage. The outage is reported once (the listener's line, /healthz, the audit
# spool's line); the pool keeps only its errors.
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

# One schema_version row per component; the same components as the SQLite files.
_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
# Serialises `gateway db migrate` runs against each other (any constant key works).
_MIGRATE_LOCK = 7_216_042_101


class DatabaseUnavailable(StoreError):
    """PostgreSQL cannot be reached (down, restarting, network): a temporary refusal, not a bug."""


class SchemaBehind(StoreError):
    """The database's schema is older than this release: run ``gateway db migrate``."""


@dataclass(frozen=True)
class Target:
    """Where to connect and with which secret; ``str()`` never shows the password."""

    conninfo: str
    display: str  # the URL without its password, for logs and errors
    password: str = ""

    def __str__(self) -> str:
        return self.display

    def scrub(self, text: str) -> str:
        """``text`` with the password (if any) replaced, for anything that may reach a log."""
        return text.replace(self.password, "***") if self.password else text


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (the user name stays: it helps)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def target(url: str, password_file: Path | None = None, *, application_name: str = "tse-gateway") -> Target:
    """The connection target from ``database.url`` and ``database.password_file``.

    The password file's first line wins over a password in the URL, so the
    YAML can stay free of secrets.
    """
    password = unquote(urlsplit(url).password or "")  # libpq decodes %XX in the URL: so must the scrubbing
    if password_file is not None:
        try:
            password = Path(password_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (OSError, UnicodeDecodeError, IndexError) as exc:
            why = getattr(exc, "strerror", None) or "empty or not UTF-8"
            raise ConfigError([f"database.password_file: cannot read {password_file}: {why}"]) from exc
    extra: dict[str, Any] = {"application_name": application_name}
    if password:
        extra["password"] = password
    try:
        info = pg_conninfo.make_conninfo(url, **extra)
    except psycopg.ProgrammingError as exc:
        words = str(exc).replace(password, "***") if password else str(exc)
        raise ConfigError([f"database.url: {redact_url(url)}: {words}"]) from exc
    return Target(conninfo=info, display=redact_url(url), password=password)


def target_of(database: Any, *, application_name: str = "tse-gateway") -> Target:
    """:func:`target` for a :class:`gateway.config.DatabaseConfig` (typed loosely: storage sits below config)."""
    return target(database.url, database.password_file, application_name=application_name)


class Database:
    """One process's connection pool to the shared PostgreSQL database.

    Blocking, like the SQLite stores (async code calls it in an executor).
    ``timeout`` bounds how long a caller waits for a connection: during an
    outage requests fail within it (:class:`DatabaseUnavailable`) while the
    pool reconnects in the background with backoff.
    """

    def __init__(self, where: Target, *, pool_size: int = 2, timeout: float = 5.0) -> None:
        self.target = where
        self.timeout = timeout
        self._pool = psycopg_pool.ConnectionPool(
            where.conninfo,
            min_size=1,
            max_size=max(1, pool_size),
            kwargs={"autocommit": True, "connect_timeout": max(1, round(timeout))},
            timeout=timeout,
            reconnect_timeout=0,  # keep trying for ever: an outage ends, the process should not
            open=False,
            name="gateway",
            check=psycopg_pool.ConnectionPool.check_connection,
        )
        self._pool.open(wait=False)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in autocommit mode; errors come out as StoreError."""
        with self._errors(), self._pool.connection(timeout=self.timeout) as conn:
            yield conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection inside one transaction (committed on success, rolled back on error)."""
        with self._errors(), self._pool.connection(timeout=self.timeout) as conn, conn.transaction():
            yield conn

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except psycopg_pool.PoolTimeout:
            raise DatabaseUnavailable(f"database {self.target}: no connection within {self.timeout:g} s") from None
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"database {self.target}: {self._words(exc)}") from None
        except psycopg.Error as exc:
            raise StoreError(f"database {self.target}: {self._words(exc)}") from None

    def _words(self, exc: BaseException) -> str:
        return self.target.scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


class PgStore:
    """The base of every PostgreSQL store: it uses the process's pool and never closes it.

    The pool belongs to the :class:`~gateway.storage.backends.Backend` that
    made it, shared by all of the process's stores; ``close`` and the
    context manager exist so a store is used like its SQLite twin.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    def close(self) -> None:
        """Nothing of its own to close (a subclass closes what it opened itself)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(where: Target, *, timeout: float = 5.0) -> psycopg.Connection[Any]:
    """One plain connection (autocommit), for the CLI's one-off jobs (migrate, import)."""
    try:
        return psycopg.connect(where.conninfo, autocommit=True, connect_timeout=max(1, round(timeout)))
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"database {where}: {where.scrub(str(exc).strip())}") from None


# --- schemas: one versioned list of migrations per component ------------------------------------


@dataclass(frozen=True)
class Schema:
    """A component's tables: ``migrations[n]`` leads from version n-1 to n (1 creates them)."""

    component: str
    migrations: Mapping[int, str]

    @property
    def version(self) -> int:
        return max(self.migrations)


def schema_versions(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Every component's version in this database ({} before the first migrate)."""
    exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return {}
    return {str(c): int(v) for c, v in conn.execute("SELECT component, version FROM schema_version")}


def migrate(conn: psycopg.Connection[Any], schemas: list[Schema]) -> list[tuple[str, int, int]]:
    """Bring every component up to this release's version; returns (component, from, to) per change.

    One transaction for the lot, under an advisory lock so two operators
    running it at once do not interleave. A component at a newer version
    than this release knows is refused (an older binary must not touch it).
    """
    changes = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
        conn.execute(_VERSION_TABLE)
        current = schema_versions(conn)
        for schema in schemas:
            have = current.get(schema.component, 0)
            if have > schema.version:
                raise StoreError(
                    f"the {schema.component} tables are version {have}; this release knows {schema.version}"
                )
            for step in range(have + 1, schema.version + 1):
                conn.execute(schema.migrations[step])
            if have < schema.version:
                conn.execute(
                    "INSERT INTO schema_version (component, version) VALUES (%s, %s)"
                    " ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                    (schema.component, schema.version),
                )
                changes.append((schema.component, have, schema.version))
    return changes


def check_schema(db: Database, schema: Schema) -> None:
    """Refuse to run on a schema that is behind this release (or ahead of it), naming the command."""
    with db.connection() as conn:
        have = schema_versions(conn).get(schema.component, 0)
    if have < schema.version:
        raise SchemaBehind(
            f"database {db.target}: the {schema.component} tables are at version {have}, this release needs"
            f" {schema.version}; run: gateway db migrate --config FILE"
        )
    if have > schema.version:
        raise StoreError(
            f"database {db.target}: the {schema.component} tables are version {have}; this release knows"
            f" {schema.version} (a newer release migrated them)"
        )


# --- LISTEN/NOTIFY ---------------------------------------------------------------------------

Handler = Callable[[str, str], None]  # (channel, payload)


class Listener:
    """One connection LISTENing on some channels; notifications go to ``handler`` on the loop.

    Why a connection of its own: a pooled connection is handed to other
    callers between uses, and LISTEN is per connection. ``on_state(up)`` is
    called when the connection comes up and when it is lost; after a loss,
    notifications may have been missed, so callers treat "up again" as
    "everything may have changed". A heartbeat query every ``heartbeat``
    seconds notices a dead peer that closed nothing (a network cut).
    """

    def __init__(
        self,
        where: Target,
        channels: tuple[str, ...],
        handler: Handler,
        on_state: Callable[[bool], None] | None = None,
        *,
        heartbeat: float = 2.0,
        max_backoff: float = 5.0,
    ) -> None:
        self.target = where
        self.channels = channels
        self.handler = handler
        self.on_state = on_state or (lambda _up: None)
        self.heartbeat = heartbeat
        self.max_backoff = max_backoff
        self.up = False
        self.down_since: float | None = time.monotonic()  # monotonic; None while connected
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pg-listener")

    async def stop(self) -> None:
        """Stop listening; a later :meth:`start` reports "up" again (so callers reload what they missed)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._set(False)

    async def wait_up(self, timeout: float) -> bool:
        """True once connected (within ``timeout`` seconds); start-up uses it."""
        deadline = time.monotonic() + timeout
        while not self.up and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.up

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError, TimeoutError) as exc:
                if self.up:  # one line per outage, not one per retry
                    log.warning("database listener lost: %s", self.target.scrub(str(exc).strip() or repr(exc)))
            except Exception as exc:  # a bug in a handler: never leave "up" standing while nobody listens
                log.error("database listener failed: %s: %s", type(exc).__name__, self.target.scrub(str(exc)))
            if self.up:
                delay = 0.1
            self._set(False)
            await asyncio.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not a secret
            delay = min(self.max_backoff, delay * 2)

    async def _session(self) -> None:
        conn = await psycopg.AsyncConnection.connect(
            self.target.conninfo, autocommit=True, connect_timeout=max(1, round(self.heartbeat))
        )
        try:
            for channel in self.channels:
                await conn.execute(f'LISTEN "{channel}"')
            self._set(True)
            while True:
                async for note in conn.notifies(timeout=self.heartbeat):
                    self.handler(note.channel, note.payload)
                await asyncio.wait_for(conn.execute("SELECT 1"), self.heartbeat)
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    def _set(self, up: bool) -> None:
        if up == self.up:
            return
        self.up = up
        self.down_since = None if up else time.monotonic()
        if up:
            log.info("database listener connected to %s", self.target)
        self.on_state(up)


def notify(conn: psycopg.Connection[Any], channel: str, payload: str = "") -> None:
    """Send a notification; inside a transaction it is delivered at COMMIT (and never on rollback)."""
    conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

"""The SQLite base every SQLite store shares: one file, several processes, explicit transactions.

A store here is one connection to a file shared by all worker processes:
WAL journal (readers never wait for the writer), a busy timeout (a writer
waits for another instead of failing at once), autocommit with explicit
``BEGIN IMMEDIATE`` transactions, and one ``schema_version`` row per
component so several stores (users, sessions) can share a file and a file
from a newer release is refused. :class:`SqliteStore` is the base of the
user and session stores; the interfaces they satisfy are in
:mod:`gateway.storage.interfaces`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Literal, Self

from gateway.errors import StoreError

BUSY_TIMEOUT_MS = 10_000


def open_database(path: Path) -> sqlite3.Connection:
    """Open (creating if needed, mode 0600) a SQLite file shared by processes.

    Autocommit mode (transactions are explicit), WAL so readers never wait
    for the writer, and a busy timeout so a writer waits for another instead
    of failing at once. The file holds password hashes and session IDs,
    hence 0600; SQLite gives the -wal and -shm files the same mode.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _set_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from exc
    return conn


def _set_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, waiting out a concurrent opener.

    Changing the journal mode takes an exclusive lock and SQLite does not
    always run the busy handler for it: two workers starting together on a
    new file saw "database is locked". Retry for up to the busy timeout.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def ensure_schema(
    conn: sqlite3.Connection,
    component: str,
    version: int,
    schema: str,
    migrations: dict[int, str] | None = None,
) -> None:
    """Create a component's tables once, upgrade an older file, refuse one from a newer release.

    Several components (users, sessions) may share one file; each has a row
    in ``schema_version``. A file at an older version gets ``migrations``
    (keyed by the version each leads to) in order, in the same transaction.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version WHERE component = ?", (component,)).fetchone()
        if row is not None and row[0] > version:
            raise StoreError(f"the {component} tables are version {row[0]}; this release knows {version}")
        for statement in schema.split(";"):
            if statement.strip():
                conn.execute(statement)
        if row is None:
            conn.execute(
                "INSERT INTO schema_version (component, version) VALUES (?, ?)",
                (component, version),
            )
        elif row[0] < version:
            for step in range(row[0] + 1, version + 1):
                upgrade = (migrations or {}).get(step)
                if upgrade:
                    conn.execute(upgrade)
            conn.execute("UPDATE schema_version SET version = ? WHERE component = ?", (version, component))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class SqliteStore:
    """One connection to a shared SQLite file, one component's tables in it.

    Threads are serialised on the connection; sqlite3 errors become
    :class:`StoreError` naming the store and the file.
    """

    component = ""
    label = ""  # how errors name the store
    schema_version = 1
    schema = ""
    migrations: dict[int, str] = {}  # noqa: RUF012 - read-only, per subclass

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = open_database(self.path)
        self._guarded = _Guard(self)
        try:
            with self._guard():
                ensure_schema(self._conn, self.component, self.schema_version, self.schema, self.migrations)
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _guard(self) -> _Guard:
        """Serialise threads on the connection; turn sqlite3 errors into StoreError."""
        return self._guarded


class _Guard:
    """``with store._guard() as conn``: the store's lock held, sqlite3 errors as StoreError.

    A plain context manager, not ``@contextmanager``: the session lookup runs it on
    every logged-in request, and a generator-based one costs ~0.75 µs more a call.
    """

    __slots__ = ("_store",)

    def __init__(self, store: SqliteStore) -> None:
        self._store = store

    def __enter__(self) -> sqlite3.Connection:
        self._store._lock.acquire()
        return self._store._conn

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> Literal[False]:
        store = self._store
        store._lock.release()
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"{store.label} store {store.path}: {exc}") from exc
        return False

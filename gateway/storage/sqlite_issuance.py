"""The CA's issuance records in SQLite: ``issuance.db`` in the CA directory (the embedded default).

Every certificate issued, its revocation, the CRL numbers. Several processes
(the portal's workers, ``gateway ca`` runs) write it at once, so every state
change is one short ``BEGIN IMMEDIATE`` transaction (WAL, ``busy_timeout``):
SQLite admits one writer at a time across threads and processes, which is
what makes "one valid certificate per user ID" hold when two requests race.
Each operation opens its own connection (safe from executor threads).
The PostgreSQL twin is :mod:`gateway.storage.pg_issuance`; both satisfy
:class:`~gateway.storage.interfaces.IssuanceRecordsProtocol`.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

from cryptography import x509

from gateway.ca import issuance
from gateway.ca.issuance import (
    RECORD_COLUMNS,
    CertificateKind,
    CertificateRecord,
    CrlEntry,
    CrlInfo,
    RevocationReason,
    Status,
    from_timestamp,
    timestamp,
)
from gateway.errors import CaError, StoreError

SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,            -- upper-case hex, no leading zeros (too big for INTEGER)
    kind TEXT NOT NULL CHECK (kind IN ('client', 'server')),
    user_id TEXT NOT NULL,
    not_before INTEGER NOT NULL,        -- Unix seconds, UTC
    not_after INTEGER NOT NULL,
    issued_at INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    windows_login TEXT,
    status TEXT NOT NULL CHECK (status IN ('valid', 'revoked')),  -- 'expired' is derived
    revoked_at INTEGER,
    revocation_reason TEXT,
    revoked_by TEXT,
    der BLOB NOT NULL,
    CHECK ((status = 'revoked') = (revoked_at IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS certificates_user ON certificates (user_id, kind, not_after);
CREATE INDEX IF NOT EXISTS certificates_revoked ON certificates (not_after)
    WHERE status = 'revoked';
CREATE TABLE IF NOT EXISTS crls (
    number INTEGER PRIMARY KEY,
    this_update INTEGER NOT NULL,
    next_update INTEGER NOT NULL,
    entries INTEGER NOT NULL,
    der_bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('crl_number', 0), ('crl_stale', 1);
-- A revocation is final: nothing turns a revoked certificate valid again or deletes it
-- (which would take it off the next CRL).
CREATE TRIGGER IF NOT EXISTS certificates_unrevoke BEFORE UPDATE ON certificates
WHEN OLD.status = 'revoked' AND (NEW.status <> 'revoked' OR NEW.revoked_at IS NOT OLD.revoked_at)
BEGIN
    SELECT RAISE(ABORT, 'a revocation is final');
END;
CREATE TRIGGER IF NOT EXISTS certificates_revoked_delete BEFORE DELETE ON certificates
WHEN OLD.status = 'revoked'
BEGIN
    SELECT RAISE(ABORT, 'a revocation is final');
END;
PRAGMA user_version = 1;
"""

Signer = Callable[[], tuple[CertificateRecord, bytes]]


class SqliteIssuanceRecords:
    """``issuance.db``: holds no open connection (each call opens and closes its own)."""

    def __init__(self, path: Path, *, busy_timeout: float = 15.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout

    @classmethod
    def create(cls, path: Path, *, busy_timeout: float = 15.0) -> SqliteIssuanceRecords:
        """A new, empty file (0600: who holds which certificate is the CA's own); refuse an existing one."""
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
        records = cls(path, busy_timeout=busy_timeout)
        with records._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
        return records

    @classmethod
    def open(cls, path: Path, *, busy_timeout: float = 15.0) -> SqliteIssuanceRecords:
        """The existing file, its schema brought up to date; a missing file is an error (records lost)."""
        if not path.is_file():
            raise CaError(f"{path.parent}: {path.name} is missing; the CA's issuance records are gone")
        records = cls(path, busy_timeout=busy_timeout)
        with records._connect() as conn:
            conn.executescript(SCHEMA)  # idempotent
        return records

    def __repr__(self) -> str:
        return f"SqliteIssuanceRecords({str(self.path)!r})"

    def close(self) -> None:
        """Nothing held open."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------

    def list(
        self,
        user: str | None = None,
        status: Status | None = None,
        *,
        kind: CertificateKind | None = "client",
        now: dt.datetime | None = None,
    ) -> builtins.list[CertificateRecord]:
        with self._connect() as conn:
            records = _records(conn, user=user, kind=kind)
        return issuance.filter_records(records, status, now)

    def get(self, serial: int) -> CertificateRecord:
        with self._connect() as conn:
            return _get(conn, serial)

    def certificate_of(self, serial: int) -> x509.Certificate:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT der FROM certificates WHERE serial = ?", (issuance.storage_serial(serial),)
            ).fetchone()
        if row is None:
            raise issuance.unknown_serial(serial)
        return x509.load_der_x509_certificate(row[0])

    def last_crl(self) -> CrlInfo | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT number, this_update, next_update, entries, der_bytes FROM crls ORDER BY number DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        return CrlInfo(row[0], from_timestamp(row[1]), from_timestamp(row[2]), row[3], row[4])

    def crl_stale(self) -> bool:
        with self._connect() as conn:
            return bool(conn.execute("SELECT value FROM meta WHERE key = 'crl_stale'").fetchone()[0])

    # -- writing -----------------------------------------------------------

    def issue(self, user_id: str, now: dt.datetime, sign: Signer) -> CertificateRecord:
        """Check the one-valid-certificate rule and insert what ``sign`` makes, in one transaction."""
        with self._transaction() as conn:
            verdict = issuance.may_issue(_records(conn, user=user_id), now)
            if not verdict.allowed:
                raise issuance.duplicate_refusal(user_id, verdict)
            record, der = sign()
            _insert(conn, record, der)
        return record

    def add(self, record: CertificateRecord, der: bytes) -> None:
        with self._transaction() as conn:
            _insert(conn, record, der)

    def revoke(
        self, serial: int, reason: RevocationReason, now: dt.datetime, by: str, *, owner: str | None = None
    ) -> CertificateRecord:
        """Mark revoked (if the rules allow) and the CRL stale, in one transaction."""
        with self._transaction() as conn:
            record = _get(conn, serial)
            verdict = issuance.may_revoke(record, now, owner=owner)
            if not verdict.allowed:
                raise issuance.revoke_refusal(record, verdict)
            conn.execute(
                "UPDATE certificates SET status = 'revoked', revoked_at = ?, "
                "revocation_reason = ?, revoked_by = ? WHERE serial = ?",
                (timestamp(now), reason.value, by, issuance.storage_serial(record.serial)),
            )
            conn.execute("UPDATE meta SET value = 1 WHERE key = 'crl_stale'")
            return _get(conn, serial)

    def start_crl(self, cutoff: dt.datetime) -> tuple[int, builtins.list[CrlEntry]]:
        """Take the next CRL number and read the entries in the same transaction.

        So a later number always lists at least as much; the stale mark is
        cleared (a revocation committed after this sets it again).
        """
        with self._transaction() as conn:
            number = conn.execute(
                "UPDATE meta SET value = value + 1 WHERE key = 'crl_number' RETURNING value"
            ).fetchone()[0]
            conn.execute("UPDATE meta SET value = 0 WHERE key = 'crl_stale'")
            rows = conn.execute(
                "SELECT serial, revoked_at, revocation_reason FROM certificates "
                "WHERE status = 'revoked' AND not_after >= ?",
                (timestamp(cutoff),),
            ).fetchall()
        return int(number), [issuance.crl_entry_of_row(*row) for row in rows]

    def finish_crl(self, info: CrlInfo) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO crls (number, this_update, next_update, entries, der_bytes) VALUES (?, ?, ?, ?, ?)",
                (info.number, timestamp(info.this_update), timestamp(info.next_update), info.entries, info.der_bytes),
            )

    def mark_crl_stale(self) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE meta SET value = 1 WHERE key = 'crl_stale'")

    # -- plumbing ----------------------------------------------------------

    def _connect(self) -> contextlib.closing[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the issuance database: {exc}") from exc
        return contextlib.closing(conn)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at BEGIN so the rule check and the write see one state."""
        with self._connect() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: database busy or unwritable: {exc}") from exc
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: commit failed: {exc}") from exc


_INSERT = f"INSERT INTO certificates ({issuance.INSERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'valid', ?)"  # noqa: S608


def _records(
    conn: sqlite3.Connection, *, user: str | None = None, kind: CertificateKind | None = "client"
) -> builtins.list[CertificateRecord]:
    columns, params = issuance.record_filter(user, kind)
    where = f" WHERE {' AND '.join(f'{c} = ?' for c in columns)}" if columns else ""
    rows = conn.execute(f"SELECT {RECORD_COLUMNS} FROM certificates{where}", params).fetchall()  # noqa: S608
    return [issuance.record_of_row(row) for row in rows]


def _insert(conn: sqlite3.Connection, record: CertificateRecord, der: bytes) -> None:
    conn.execute(_INSERT, issuance.insert_values(record, der))


def _get(conn: sqlite3.Connection, serial: int) -> CertificateRecord:
    row = conn.execute(
        f"SELECT {RECORD_COLUMNS} FROM certificates WHERE serial = ?",  # noqa: S608
        (issuance.storage_serial(serial),),
    ).fetchone()
    if row is None:
        raise issuance.unknown_serial(serial)
    return issuance.record_of_row(row)

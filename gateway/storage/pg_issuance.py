"""The CA's issuance records in PostgreSQL, shared by every portal and ``gateway ca`` run; revocation push.

The same tables and columns as :mod:`gateway.storage.sqlite_issuance`
(instants stay Unix seconds), so ``gateway db import`` can copy them as is.
Only the records move here: the CA's key and certificate stay files in
``ca.dir``.

**One valid certificate per user ID, enforced by the database.** Portals and
CLI runs on several hosts share no Python lock. The issuance transaction
first takes a transaction-scoped advisory lock on the user ID, then reads
that user's certificates, runs the pure rule and inserts: a second request
for the same user waits for the first to commit and then sees its
certificate (READ COMMITTED takes a new snapshot per statement). No unique
index can say it: during the renewal window two valid certificates of one
user are allowed, and "valid" depends on the clock.

**CRL numbers** come from the ``meta`` row, incremented in the transaction
that reads the entries: the row lock orders publishers on every host.

**Revocation push.** A revocation sends ``pg_notify('gateway_revocations',
'<issuer key id hex>:<serial hex>')`` in its own transaction (delivered at
COMMIT, never on rollback). :class:`RevocationFeed` is the gateway worker's
side: a :class:`~gateway.storage.postgres.Listener` adds each pushed serial
to a set the per-request certificate check consults, so an open keep-alive
connection is refused at its next request. A push only adds refusals; the
signed CRL stays the source of truth, and after every (re)connect the feed
loads the revoked, unexpired serials it may have missed.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Iterable
from typing import Any

import psycopg
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
from gateway.storage import postgres
from gateway.storage.postgres import Database, Listener, Schema, Target

log = logging.getLogger("gateway.storage")

CHANNEL = "gateway_revocations"
# Pushed revocations a gateway worker holds at most (a million ~ 100 MB; a CRL that size
# is the design's upper end). Pushes beyond it are ignored until the next reload.
MAX_PUSHED = 1_000_000
# pg_advisory_xact_lock(class, hashtext(user_id)): the class keeps these apart from other locks.
_ISSUE_LOCK_CLASS = 0x4341  # "CA"

SCHEMA = Schema(
    "ca",
    {
        1: """
CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,            -- upper-case hex, no leading zeros
    kind TEXT NOT NULL CHECK (kind IN ('client', 'server')),
    user_id TEXT NOT NULL,
    not_before BIGINT NOT NULL,         -- Unix seconds, UTC
    not_after BIGINT NOT NULL,
    issued_at BIGINT NOT NULL,
    fingerprint TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    windows_login TEXT,
    status TEXT NOT NULL CHECK (status IN ('valid', 'revoked')),  -- 'expired' is derived
    revoked_at BIGINT,
    revocation_reason TEXT,
    revoked_by TEXT,
    der BYTEA NOT NULL,
    CHECK ((status = 'revoked') = (revoked_at IS NOT NULL))
);
CREATE INDEX certificates_user ON certificates (user_id, kind, not_after);
CREATE INDEX certificates_revoked ON certificates (not_after) WHERE status = 'revoked';
CREATE TABLE crls (
    number BIGINT PRIMARY KEY,
    this_update BIGINT NOT NULL,
    next_update BIGINT NOT NULL,
    entries BIGINT NOT NULL,
    der_bytes BIGINT NOT NULL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO meta (key, value) VALUES ('crl_number', 0), ('crl_stale', 1);
""",
        # A revocation is final: no role that may write the records (a gateway host's
        # included) can turn a revoked certificate valid again or delete it, which
        # would take it off the next CRL.
        2: """
CREATE FUNCTION certificates_revocation_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'revoked' AND (TG_OP = 'DELETE' OR NEW.status <> 'revoked'
                                   OR NEW.revoked_at IS DISTINCT FROM OLD.revoked_at) THEN
        RAISE EXCEPTION 'certificate %: a revocation is final', OLD.serial;
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$;
CREATE TRIGGER certificates_revocation_final BEFORE UPDATE OR DELETE ON certificates
    FOR EACH ROW EXECUTE FUNCTION certificates_revocation_final();
""",
    },
)

Signer = Callable[[], tuple[CertificateRecord, bytes]]


class PgIssuanceRecords(postgres.PgStore):
    """The issuance records in the shared database; uses the process's pool, never closes it."""

    @classmethod
    def open(cls, db: Database) -> PgIssuanceRecords:
        """Refuse a database whose ``ca`` tables are missing or behind (``gateway db migrate`` makes them)."""
        postgres.check_schema(db, SCHEMA)
        return cls(db)

    def __repr__(self) -> str:
        return f"PgIssuanceRecords({self.db.target})"

    # -- reading -----------------------------------------------------------

    def list(
        self,
        user: str | None = None,
        status: Status | None = None,
        *,
        kind: CertificateKind | None = "client",
        now: dt.datetime | None = None,
    ) -> builtins.list[CertificateRecord]:
        with self.db.connection() as conn:
            records = _records(conn, user=user, kind=kind)
        return issuance.filter_records(records, status, now)

    def get(self, serial: int) -> CertificateRecord:
        with self.db.connection() as conn:
            return _get(conn, serial)

    def certificate_of(self, serial: int) -> x509.Certificate:
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT der FROM certificates WHERE serial = %s", (issuance.storage_serial(serial),)
            ).fetchone()
        if row is None:
            raise issuance.unknown_serial(serial)
        return x509.load_der_x509_certificate(bytes(row[0]))

    def last_crl(self) -> CrlInfo | None:
        with self.db.connection() as conn:
            row = conn.execute(
                "SELECT number, this_update, next_update, entries, der_bytes FROM crls ORDER BY number DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        return CrlInfo(int(row[0]), from_timestamp(row[1]), from_timestamp(row[2]), int(row[3]), int(row[4]))

    def crl_stale(self) -> bool:
        with self.db.connection() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'crl_stale'").fetchone()
        return bool(row and row[0])

    # -- writing -----------------------------------------------------------

    def issue(self, user_id: str, now: dt.datetime, sign: Signer) -> CertificateRecord:
        """The rule check and the insert under a per-user advisory lock, in one transaction.

        The lock, not a Python one, is what serialises two portals (or CLI
        runs) issuing for the same user ID; the read after it sees every
        certificate committed before the lock was granted.
        """
        with self.db.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s::int4, hashtext(%s))", (_ISSUE_LOCK_CLASS, user_id))
            verdict = issuance.may_issue(_records(conn, user=user_id), now)
            if not verdict.allowed:
                raise issuance.duplicate_refusal(user_id, verdict)
            record, der = sign()
            _insert(conn, record, der)
        return record

    def add(self, record: CertificateRecord, der: bytes) -> None:
        with self.db.transaction() as conn:
            _insert(conn, record, der)

    def revoke(
        self, serial: int, reason: RevocationReason, now: dt.datetime, by: str, *, owner: str | None = None
    ) -> CertificateRecord:
        """Mark revoked, the CRL stale, and push the revocation to every gateway: one transaction.

        ``FOR UPDATE`` makes a second, concurrent revocation of the same
        certificate wait and then be refused as "already revoked".
        """
        key = issuance.storage_serial(serial)
        with self.db.transaction() as conn:
            row = conn.execute(
                f"SELECT {RECORD_COLUMNS}, der FROM certificates WHERE serial = %s FOR UPDATE",  # noqa: S608
                (key,),
            ).fetchone()
            if row is None:
                raise issuance.unknown_serial(serial)
            record = issuance.record_of_row(row[:-1])
            verdict = issuance.may_revoke(record, now, owner=owner)
            if not verdict.allowed:
                raise issuance.revoke_refusal(record, verdict)
            conn.execute(
                "UPDATE certificates SET status = 'revoked', revoked_at = %s, "
                "revocation_reason = %s, revoked_by = %s WHERE serial = %s",
                (timestamp(now), reason.value, by, key),
            )
            conn.execute("UPDATE meta SET value = 1 WHERE key = 'crl_stale'")
            postgres.notify(conn, CHANNEL, push_payload(bytes(row[-1])))
            return _get(conn, serial)

    def start_crl(self, cutoff: dt.datetime) -> tuple[int, builtins.list[CrlEntry]]:
        """Take the next CRL number and read the entries in one transaction (see the module doc)."""
        with self.db.transaction() as conn:
            number_row = conn.execute(
                "UPDATE meta SET value = value + 1 WHERE key = 'crl_number' RETURNING value"
            ).fetchone()
            conn.execute("UPDATE meta SET value = 0 WHERE key = 'crl_stale'")
            rows = conn.execute(
                "SELECT serial, revoked_at, revocation_reason FROM certificates "
                "WHERE status = 'revoked' AND not_after >= %s",
                (timestamp(cutoff),),
            ).fetchall()
        assert number_row is not None
        return int(number_row[0]), [issuance.crl_entry_of_row(*row) for row in rows]

    def finish_crl(self, info: CrlInfo) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO crls (number, this_update, next_update, entries, der_bytes) VALUES (%s, %s, %s, %s, %s)",
                (info.number, timestamp(info.this_update), timestamp(info.next_update), info.entries, info.der_bytes),
            )

    def mark_crl_stale(self) -> None:
        with self.db.transaction() as conn:
            conn.execute("UPDATE meta SET value = 1 WHERE key = 'crl_stale'")


_INSERT = (
    f"INSERT INTO certificates ({issuance.INSERT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 'valid', %s)"  # noqa: S608
)


def _records(
    conn: psycopg.Connection[Any], *, user: str | None = None, kind: CertificateKind | None = "client"
) -> builtins.list[CertificateRecord]:
    columns, params = issuance.record_filter(user, kind)
    where = f" WHERE {' AND '.join(f'{c} = %s' for c in columns)}" if columns else ""
    rows = conn.execute(f"SELECT {RECORD_COLUMNS} FROM certificates{where}", params).fetchall()  # noqa: S608
    return [issuance.record_of_row(row) for row in rows]


def _insert(conn: psycopg.Connection[Any], record: CertificateRecord, der: bytes) -> None:
    conn.execute(_INSERT, issuance.insert_values(record, der))


def _get(conn: psycopg.Connection[Any], serial: int) -> CertificateRecord:
    row = conn.execute(
        f"SELECT {RECORD_COLUMNS} FROM certificates WHERE serial = %s",  # noqa: S608
        (issuance.storage_serial(serial),),
    ).fetchone()
    if row is None:
        raise issuance.unknown_serial(serial)
    return issuance.record_of_row(row)


# --- revocation push: the gateway side ---------------------------------------------------------

PushedKey = tuple[bytes, int]  # (issuer key identifier, serial): a CA rollover keeps serial spaces apart


def authority_key_id(cert: x509.Certificate) -> bytes:
    """The issuing key's identifier as the certificate names it (empty when absent)."""
    try:
        return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier or b""
    except x509.ExtensionNotFound:
        return b""


def push_payload(der: bytes) -> str:
    """``<issuer key id hex>:<serial hex>`` for a revoked certificate's DER."""
    cert = x509.load_der_x509_certificate(der)
    return f"{authority_key_id(cert).hex()}:{cert.serial_number:x}"


def parse_payload(payload: str) -> PushedKey | None:
    """The key a push names; None for anything malformed (logged, never trusted further)."""
    key_hex, _, serial_hex = payload.partition(":")
    try:
        return bytes.fromhex(key_hex), int(serial_hex, 16)
    except ValueError:
        return None


def revoked_keys(conn: psycopg.Connection[Any], now: dt.datetime) -> set[PushedKey]:
    """Every revoked certificate not yet expired, as push keys (what a listener that was down missed)."""
    rows = conn.execute(
        "SELECT der FROM certificates WHERE status = 'revoked' AND not_after >= %s", (timestamp(now),)
    ).fetchall()
    keys: set[PushedKey] = set()
    for (der,) in rows:
        cert = x509.load_der_x509_certificate(bytes(der))
        keys.add((authority_key_id(cert), cert.serial_number))
    return keys


class RevocationFeed:
    """A gateway worker's pushed revocations: a set filled by LISTEN and by a reload on every connect.

    ``revoked`` is mutated in place on the event loop, so the per-request
    check holds a reference to it and pays one set lookup. Anyone who may
    connect to the database can NOTIFY, so pushes are bounded
    (:data:`MAX_PUSHED`; beyond it the CRL alone covers) and each reload
    replaces the set with what the database says is revoked (plus what was
    pushed while it read), dropping anything pushed that is not.
    """

    def __init__(self, where: Target, *, clock: Callable[[], dt.datetime], heartbeat: float = 2.0) -> None:
        self.target = where
        self.clock = clock
        self.revoked: set[PushedKey] = set()
        self._pushed_while_loading: list[set[PushedKey]] = []  # one per reload in flight
        self._full_logged = False
        self.loads = 0  # completed reloads (tests and metrics read it)
        self.listener = Listener(where, (CHANNEL,), self._on_push, self._on_state, heartbeat=heartbeat)
        self._load: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.listener.start()

    async def stop(self) -> None:
        await self.listener.stop()
        if self._load is not None:
            self._load.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._load

    def is_revoked(self, key_id: bytes, serial: int) -> bool:
        return (key_id, serial) in self.revoked

    def add(self, keys: Iterable[PushedKey]) -> None:
        self.revoked.update(keys)

    def _on_push(self, _channel: str, payload: str) -> None:
        key = parse_payload(payload)
        if key is None:
            log.warning("ignored a malformed revocation push (%d characters)", len(payload))
            return
        if len(self.revoked) >= MAX_PUSHED:
            if not self._full_logged:
                self._full_logged = True
                log.warning("%d pushed revocations held: further pushes wait for the CRL", MAX_PUSHED)
            return
        self.revoked.add(key)
        for pushed in self._pushed_while_loading:
            pushed.add(key)

    def _on_state(self, up: bool) -> None:
        """On (re)connect, load what may have been missed while down (LISTEN is already on)."""
        if up:
            if self._load is not None:
                self._load.cancel()
            self._load = asyncio.get_running_loop().create_task(self._reload(), name="revocation-reload")

    async def _reload(self) -> None:
        pushed: set[PushedKey] = set()
        self._pushed_while_loading.append(pushed)
        try:
            keys = await asyncio.get_running_loop().run_in_executor(None, self._read)
        except Exception as exc:  # the CRL still covers: say so and go on
            log.warning("could not load revoked serials from the database: %s", self.target.scrub(str(exc)))
            return
        finally:
            self._pushed_while_loading.remove(pushed)
        # In place and without an await between: a request sees the old set or the new one.
        self.revoked.clear()
        self.revoked.update(keys | pushed)
        self._full_logged = False
        self.loads += 1

    def _read(self) -> set[PushedKey]:
        with contextlib.closing(postgres.connect(self.target)) as conn:
            return revoked_keys(conn, self.clock())

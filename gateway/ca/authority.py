"""The Tokyo Stock Exchange SSO CA: key, issuance database and CRL, on disk.

This is the I/O edge of issuance; the rules are in :mod:`gateway.ca.issuance`
and the certificates come from :mod:`gateway.certs.builders`. The admin CLI and the
issuance portal both drive a :class:`CertificateAuthority`, possibly from
several processes at once, so every state change is one short SQLite
transaction (WAL, ``busy_timeout``) and each operation opens its own
connection (safe from executor threads).

Layout of the CA directory::

    ca.pem  ca.der      the CA certificate (PEM; DER for Windows download)
    ca.key              its private key, 0600, never printed
    issuance.db         every certificate issued, revocations, CRL numbers
    crl.der  crl.pem    the current full CRL, replaced atomically
    server.pem/.key     default output of ``issue_server``
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import fcntl
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.ca import issuance
from gateway.ca.issuance import (
    CertificateKind,
    CertificateRecord,
    RevocationReason,
    Status,
)
from gateway.certs import builders as pki
from gateway.certs import p12
from gateway.certs.files import read_pem_certs, read_private_key, write_atomic
from gateway.certs.p12 import P12Format
from gateway.config import CaConfig
from gateway.errors import CaError, PkiError, StoreError
from gateway.verdict import Verdict

CA_CERT = "ca.pem"
CA_CERT_DER = "ca.der"
CA_KEY = "ca.key"
DATABASE = "issuance.db"
CRL_DER = "crl.der"
CRL_PEM = "crl.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
_CRL_LOCK = ".crl.lock"
# Re-sign the CRL when less than this share of its validity is left, so a
# missed run or two still leaves relying parties a current CRL.
CRL_RESIGN_FRACTION = 1 / 3

_SCHEMA = """
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
PRAGMA user_version = 1;
"""

_COLUMNS = (
    "serial, kind, user_id, not_before, not_after, issued_at, fingerprint, requested_by, "
    "windows_login, revoked_at, revocation_reason, revoked_by"
)


@dataclass(frozen=True)
class CaSettings:
    """What the ``ca:`` config section tunes (defaults when only ``--dir`` is given)."""

    crl_url: str | None = None
    crl_next_update: dt.timedelta = dt.timedelta(hours=24)
    crl_drop_expired_after: dt.timedelta = dt.timedelta(days=90)
    client_key_type: pki.KeyType = "ec-p256"
    busy_timeout: float = 15.0  # seconds a writer waits for another's transaction

    @classmethod
    def from_config(cls, config: CaConfig) -> CaSettings:
        return cls(
            crl_url=config.crl_url,
            crl_next_update=dt.timedelta(hours=config.crl_next_update_hours),
            crl_drop_expired_after=dt.timedelta(days=config.crl_drop_expired_after_days),
        )


@dataclass(frozen=True)
class IssuedCertificate:
    """A new client certificate: its record, the certificate and the PKCS#12 download."""

    record: CertificateRecord
    certificate: x509.Certificate
    pkcs12: bytes = field(repr=False)  # holds the private key


@dataclass(frozen=True)
class ServerFiles:
    """A server certificate written to disk (chain: leaf then CA) and its key (0600)."""

    record: CertificateRecord
    cert: Path
    key: Path


@dataclass(frozen=True)
class CrlInfo:
    """What one CRL publication produced."""

    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    entries: int
    der_bytes: int


@dataclass(frozen=True)
class Revocation:
    """The revoked certificate's record and the CRL that now lists it."""

    record: CertificateRecord
    crl: CrlInfo


class IssuanceRefused(CaError):
    """A rule of the manual refused the request; ``verdict`` says which and why."""

    def __init__(self, verdict: Verdict, message: str) -> None:
        self.verdict = verdict
        super().__init__(message)


class CertificateAuthority:
    """The CA directory opened for use. Cheap to create; holds no open connection."""

    def __init__(
        self,
        directory: Path,
        certificate: x509.Certificate,
        key: pki.PrivateKey,
        settings: CaSettings,
    ) -> None:
        self.directory = directory
        self.certificate = certificate
        self._key = key
        self.settings = settings

    def __repr__(self) -> str:
        return f"CertificateAuthority({str(self.directory)!r})"

    # -- paths -------------------------------------------------------------

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT

    @property
    def cert_der_path(self) -> Path:
        return self.directory / CA_CERT_DER

    @property
    def database_path(self) -> Path:
        return self.directory / DATABASE

    @property
    def crl_der_path(self) -> Path:
        return self.directory / CRL_DER

    @property
    def crl_pem_path(self) -> Path:
        return self.directory / CRL_PEM

    # -- creating and opening ----------------------------------------------

    @classmethod
    def init(
        cls,
        directory: Path,
        *,
        key_type: pki.KeyType = "ec-p256",
        now: dt.datetime,
        settings: CaSettings | None = None,
    ) -> CertificateAuthority:
        """Create a new CA in ``directory``; refuse if any CA file is already there.

        The key file is created with O_EXCL, so two racing ``init`` runs
        cannot both succeed and nothing existing is ever replaced.
        """
        directory = directory.resolve()
        present = [n for n in (CA_KEY, CA_CERT, DATABASE, CRL_DER) if (directory / n).exists()]
        if present:
            raise CaError(f"{directory}: a CA already exists here ({', '.join(present)}); refusing to overwrite it")
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = pki.generate_key(key_type)
        cert = pki.build_ca(key, now=now)
        _create_private_key(directory / CA_KEY, key)
        write_atomic(directory / CA_CERT, pki.cert_pem(cert))
        write_atomic(directory / CA_CERT_DER, cert.public_bytes(serialization.Encoding.DER))
        ca = cls(directory, cert, key, settings or CaSettings())
        # The issuance records (who holds which certificate) are the CA's own: 0600 like its key.
        os.close(os.open(ca.database_path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
        with ca._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
        ca.publish_crl(now)
        return ca

    @classmethod
    def open(cls, directory: Path, settings: CaSettings | None = None) -> CertificateAuthority:
        """Open an existing CA; its certificate, key and database must all be there."""
        directory = directory.resolve()
        if not (directory / CA_CERT).is_file() or not (directory / CA_KEY).is_file():
            raise CaError(f"{directory}: no CA here (run `gateway ca init --dir {directory}`)")
        if not (directory / DATABASE).is_file():
            raise CaError(f"{directory}: {DATABASE} is missing; the CA's issuance records are gone")
        cert = read_pem_certs(directory / CA_CERT)[0]
        key = read_private_key(directory / CA_KEY)
        if _spki(key) != cert.public_key().public_bytes(*_SPKI):
            raise PkiError(f"{directory}: {CA_KEY} does not belong to {CA_CERT}")
        ca = cls(directory, cert, key, settings or CaSettings())
        with ca._connect() as conn:
            conn.executescript(_SCHEMA)  # idempotent; brings an older file up to date
        return ca

    # -- issuing -----------------------------------------------------------

    def check_issue(self, user_id: str, now: dt.datetime) -> Verdict:
        """Would :meth:`issue_client` succeed now? Advisory (for the portal's page)."""
        return issuance.may_issue(self.list(user=user_id), now)

    def issue_client(
        self,
        user_id: str,
        now: dt.datetime,
        requested_by: str,
        windows_login: str | None = None,
        p12_format: P12Format = P12Format.DEFAULT,
        password: str = "",
    ) -> IssuedCertificate:
        """Issue a user's certificate if the manual's rules allow it now.

        The rule check and the insert run in one ``BEGIN IMMEDIATE``
        transaction: SQLite admits one writer at a time across threads and
        processes, so of two simultaneous requests for one user the second
        sees the first's certificate and is refused. The key is generated
        before the transaction to keep it short. ``p12_format`` and
        ``password`` choose the download (:mod:`gateway.certs.p12`; the default is
        the manual's empty password); a password that does not fit the
        format is refused before anything is issued.
        """
        _check_subject(user_id, windows_login)
        problem = p12.password_problem(p12_format, password)
        if problem is not None:
            raise CaError(problem[1])
        key = pki.generate_key(self.settings.client_key_type)
        not_before = _whole_seconds(now)
        with self._transaction() as conn:
            verdict = issuance.may_issue(self._records(conn, user=user_id), now)
            if not verdict.allowed:
                raise _duplicate(user_id, verdict)
            cert = pki.build_client_cert(
                self.certificate,
                self._key,
                key.public_key(),
                user_id,
                not_before=not_before,
                crl_url=self.settings.crl_url,
                windows_login=windows_login,
            )
            record = _record_of(
                cert,
                "client",
                user_id=user_id,
                now=now,
                by=requested_by,
                windows_login=windows_login,
            )
            _insert(conn, record, cert)
        bundle = p12.bundle(key, cert, [self.certificate], friendly_name=user_id, fmt=p12_format, password=password)
        return IssuedCertificate(record, cert, bundle)

    def issue_server(
        self,
        hostnames: Sequence[str],
        now: dt.datetime,
        requested_by: str,
        *,
        out_cert: Path | None = None,
        out_key: Path | None = None,
        key_type: pki.KeyType = "ec-p256",
        force: bool = False,
    ) -> ServerFiles:
        """Issue a TLS server certificate for the gateway or the portal and write it.

        The certificate file holds the leaf and the CA (what servers send);
        it is recorded in the database like any other certificate so it can
        be listed and revoked.
        """
        if not hostnames:
            raise CaError("a server certificate needs at least one host name")
        problems = [p for p in map(pki.server_name_problem, hostnames) if p]
        if problems:
            raise CaError("; ".join(problems))
        cert_path = out_cert or self.directory / SERVER_CERT
        key_path = out_key or self.directory / SERVER_KEY
        for path in (key_path, cert_path):
            if path.exists() and not force:
                raise CaError(f"{path}: exists; refusing to overwrite it (--force replaces it)")
        key = pki.generate_key(key_type)
        cert = pki.build_server_cert(self.certificate, self._key, key.public_key(), hostnames, now=now)
        record = _record_of(cert, "server", user_id=hostnames[0], now=now, by=requested_by, windows_login=None)
        with self._transaction() as conn:
            _insert(conn, record, cert)
        write_atomic(key_path, pki.key_pem(key), mode=0o600)
        write_atomic(cert_path, pki.cert_pem(cert) + pki.cert_pem(self.certificate))
        return ServerFiles(record, cert_path, key_path)

    # -- reading -----------------------------------------------------------

    def list(
        self,
        user: str | None = None,
        status: Status | None = None,
        *,
        kind: CertificateKind | None = "client",
        now: dt.datetime | None = None,
    ) -> builtins.list[CertificateRecord]:
        """Certificates, newest expiry first; ``status`` is judged at ``now`` (default: clock)."""
        with self._connect() as conn:
            records = self._records(conn, user=user, kind=kind)
        if status is not None:
            moment = now or dt.datetime.now(dt.UTC)
            records = [r for r in records if issuance.status_of(r, moment) is status]
        return issuance.sort_for_list(records)

    def get(self, serial: int) -> CertificateRecord:
        """One certificate's record by serial; unknown serials are an error."""
        with self._connect() as conn:
            return _get(conn, serial)

    def certificate_of(self, serial: int) -> x509.Certificate:
        """The issued certificate itself (for a detail page or a re-check)."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT der FROM certificates WHERE serial = ?", (issuance.storage_serial(serial),)
            ).fetchone()
        if row is None:
            raise CaError(f"no certificate with serial {issuance.format_serial(serial)}")
        return x509.load_der_x509_certificate(row[0])

    # -- revoking and the CRL ----------------------------------------------

    def revoke(
        self,
        serial: int,
        reason: RevocationReason,
        now: dt.datetime,
        by: str,
        *,
        owner: str | None = None,
    ) -> Revocation:
        """Revoke a certificate, then publish a fresh CRL at once.

        ``owner`` is the portal user asking (users revoke only their own);
        None means an administrator. The revocation is committed before the
        CRL is built; if publishing fails the database keeps a "CRL stale"
        mark, so :meth:`crl_due` asks for it again.
        """
        with self._transaction() as conn:
            record = _get(conn, serial)
            verdict = issuance.may_revoke(record, now, owner=owner)
            if not verdict.allowed:
                why = f"cannot revoke {record.serial_hex}: {verdict.detail}"
                raise IssuanceRefused(verdict, why)
            at = _whole_seconds(now)
            conn.execute(
                "UPDATE certificates SET status = 'revoked', revoked_at = ?, "
                "revocation_reason = ?, revoked_by = ? WHERE serial = ?",
                (_ts(at), reason.value, by, issuance.storage_serial(record.serial)),
            )
            conn.execute("UPDATE meta SET value = 1 WHERE key = 'crl_stale'")
            revoked = _get(conn, serial)
        return Revocation(revoked, self.publish_crl(now))

    def publish_crl(self, now: dt.datetime) -> CrlInfo:
        """Sign a full CRL and replace crl.der and crl.pem atomically.

        Publications are serialised by a lock file, not by the database's
        write lock, so issuing is not held up while a large CRL is signed;
        the CRL number is taken in the same transaction that reads the
        entries, so a later number always lists at least as much. Entries
        whose certificate expired more than ``crl_drop_expired_after`` ago
        are left out (RFC 5280 allows it once a certificate has expired).
        """
        this_update = _whole_seconds(now)
        next_update = this_update + self.settings.crl_next_update
        cutoff = this_update - self.settings.crl_drop_expired_after
        with self._crl_lock():
            with self._transaction() as conn:
                number = conn.execute(
                    "UPDATE meta SET value = value + 1 WHERE key = 'crl_number' RETURNING value"
                ).fetchone()[0]
                conn.execute("UPDATE meta SET value = 0 WHERE key = 'crl_stale'")
                rows = conn.execute(
                    "SELECT serial, revoked_at, revocation_reason FROM certificates "
                    "WHERE status = 'revoked' AND not_after >= ?",
                    (_ts(cutoff),),
                ).fetchall()
            try:
                info = self._write_crl(rows, number, this_update, next_update)
            except BaseException:
                with self._transaction() as conn:
                    conn.execute("UPDATE meta SET value = 1 WHERE key = 'crl_stale'")
                raise
            with self._transaction() as conn:
                conn.execute(
                    "INSERT INTO crls (number, this_update, next_update, entries, der_bytes) VALUES (?, ?, ?, ?, ?)",
                    (number, _ts(this_update), _ts(next_update), info.entries, info.der_bytes),
                )
        return info

    def _write_crl(
        self,
        rows: builtins.list[tuple[str, int, str | None]],
        number: int,
        this_update: dt.datetime,
        next_update: dt.datetime,
    ) -> CrlInfo:
        entries = [
            pki.RevokedEntry(
                int(serial, 16),
                _from_ts(revoked_at),
                RevocationReason(reason).flag if reason else None,
            )
            for serial, revoked_at, reason in rows
        ]
        crl = pki.build_crl(
            self.certificate,
            self._key,
            entries,
            this_update=this_update,
            next_update=next_update,
            number=number,
        )
        der = crl.public_bytes(serialization.Encoding.DER)
        write_atomic(self.crl_der_path, der)
        write_atomic(self.crl_pem_path, crl.public_bytes(serialization.Encoding.PEM))
        return CrlInfo(number, this_update, next_update, len(entries), len(der))

    def last_crl(self) -> CrlInfo | None:
        """The most recent successful publication, if any."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT number, this_update, next_update, entries, der_bytes FROM crls ORDER BY number DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        return CrlInfo(row[0], _from_ts(row[1]), _from_ts(row[2]), row[3], row[4])

    def crl_due(self, now: dt.datetime) -> bool:
        """Should the scheduler publish now?

        Yes when no CRL was published, a revocation is not yet in it, the
        files are missing, or less than a third of its validity is left
        (so it is re-signed well before nextUpdate even without changes).
        """
        last = self.last_crl()
        if last is None or not self.crl_der_path.is_file() or not self.crl_pem_path.is_file():
            return True
        with self._connect() as conn:
            stale = conn.execute("SELECT value FROM meta WHERE key = 'crl_stale'").fetchone()[0]
        if stale:
            return True
        validity = last.next_update - last.this_update
        return last.next_update - now < validity * CRL_RESIGN_FRACTION

    # -- plumbing ----------------------------------------------------------

    def _records(
        self,
        conn: sqlite3.Connection,
        *,
        user: str | None = None,
        kind: CertificateKind | None = "client",
    ) -> builtins.list[CertificateRecord]:
        clauses, params = [], []
        if user is not None:
            clauses.append("user_id = ?")
            params.append(user)
        if kind is not None:
            clauses.append("kind = ?")
            params.append(kind)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = conn.execute(f"SELECT {_COLUMNS} FROM certificates{where}", params).fetchall()  # noqa: S608
        return [_row_record(row) for row in rows]

    def _connect(self) -> contextlib.closing[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.database_path, timeout=self.settings.busy_timeout, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(self.settings.busy_timeout * 1000)}")
        except sqlite3.Error as exc:
            why = f"{self.database_path}: cannot open the issuance database: {exc}"
            raise StoreError(why) from exc
        return contextlib.closing(conn)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at BEGIN so the rule check and the write see one state."""
        with self._connect() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                why = f"{self.database_path}: database busy or unwritable: {exc}"
                raise StoreError(why) from exc
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.database_path}: commit failed: {exc}") from exc

    @contextlib.contextmanager
    def _crl_lock(self) -> Iterator[None]:
        with open(self.directory / _CRL_LOCK, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _check_subject(user_id: str, windows_login: str | None) -> None:
    problem = issuance.user_id_problem(user_id)
    if problem is None and windows_login is not None:
        problem = issuance.windows_login_problem(windows_login)
    if problem is not None:
        raise CaError(problem)


def _duplicate(user_id: str, verdict: Verdict) -> IssuanceRefused:
    return IssuanceRefused(
        verdict,
        f"{issuance.DUPLICATE_TITLE_JA}: {issuance.DUPLICATE_MESSAGE_JA} "
        f"({issuance.DUPLICATE_MESSAGE_EN} for {user_id}: {verdict.detail}; "
        "revoke it first or wait for the renewal window)",
    )


def _record_of(
    cert: x509.Certificate,
    kind: CertificateKind,
    *,
    user_id: str,
    now: dt.datetime,
    by: str,
    windows_login: str | None,
) -> CertificateRecord:
    return CertificateRecord(
        serial=cert.serial_number,
        user_id=user_id,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint=pki.fingerprint_sha256(cert),
        requested_by=by,
        issued_at=_whole_seconds(now),
        windows_login=windows_login,
        kind=kind,
    )


def _insert(conn: sqlite3.Connection, record: CertificateRecord, cert: x509.Certificate) -> None:
    conn.execute(
        "INSERT INTO certificates (serial, kind, user_id, not_before, not_after, issued_at, "
        "fingerprint, requested_by, windows_login, status, der) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'valid', ?)",
        (
            issuance.storage_serial(record.serial),
            record.kind,
            record.user_id,
            _ts(record.not_before),
            _ts(record.not_after),
            _ts(record.issued_at),
            record.fingerprint,
            record.requested_by,
            record.windows_login,
            cert.public_bytes(serialization.Encoding.DER),
        ),
    )


def _get(conn: sqlite3.Connection, serial: int) -> CertificateRecord:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM certificates WHERE serial = ?",  # noqa: S608
        (issuance.storage_serial(serial),),
    ).fetchone()
    if row is None:
        raise CaError(f"no certificate with serial {issuance.format_serial(serial)}")
    return _row_record(row)


def _row_record(row: tuple[object, ...]) -> CertificateRecord:
    (serial, kind, user_id, nb, na, issued, fp, by, login, revoked_at, reason, revoked_by) = row
    assert isinstance(serial, str) and isinstance(user_id, str)
    assert isinstance(nb, int) and isinstance(na, int) and isinstance(issued, int)
    assert isinstance(fp, str) and isinstance(by, str)
    return CertificateRecord(
        serial=int(serial, 16),
        user_id=user_id,
        not_before=_from_ts(nb),
        not_after=_from_ts(na),
        fingerprint=fp,
        requested_by=by,
        issued_at=_from_ts(issued),
        windows_login=login if isinstance(login, str) else None,
        revoked_at=_from_ts(revoked_at) if isinstance(revoked_at, int) else None,
        revocation_reason=RevocationReason(reason) if isinstance(reason, str) else None,
        revoked_by=revoked_by if isinstance(revoked_by, str) else None,
        kind="server" if kind == "server" else "client",
    )


def _create_private_key(path: Path, key: pki.PrivateKey) -> None:
    """Write the CA key 0600, failing if the file exists (never replace a CA's key)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise CaError(f"{path}: exists; refusing to overwrite a CA key") from exc
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(pki.key_pem(key))
        handle.flush()
        os.fsync(handle.fileno())


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _spki(key: pki.PrivateKey) -> bytes:
    return key.public_key().public_bytes(*_SPKI)


def _whole_seconds(moment: dt.datetime) -> dt.datetime:
    """Certificates and CRLs carry whole seconds; so does the database."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime; the CA works in aware UTC")
    return moment.astimezone(dt.UTC).replace(microsecond=0)


def _ts(moment: dt.datetime) -> int:
    return int(moment.timestamp())


def _from_ts(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)

"""The Tokyo Stock Exchange SSO CA: its key and CRL on disk, its issuance records in a store.

This is the I/O edge of issuance; the rules are in :mod:`gateway.ca.issuance`
and the certificates come from :mod:`gateway.certs.builders`. The admin CLI and the
issuance portal both drive a :class:`CertificateAuthority`, possibly from
several processes (and, with PostgreSQL, several hosts) at once. Signing is
done here; record keeping is the records store's
(:class:`~gateway.storage.interfaces.IssuanceRecordsProtocol`:
``issuance.db`` by default, :mod:`gateway.storage.pg_issuance` with a
``database:``), and every state change is one transaction there.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.ca import issuance
from gateway.ca.issuance import (
    CertificateKind,
    CertificateRecord,
    CrlEntry,
    CrlInfo,
    RevocationReason,
    Status,
)
from gateway.certs import builders as pki
from gateway.certs import p12
from gateway.certs.files import read_pem_certs, read_private_key, write_atomic
from gateway.certs.p12 import P12Format
from gateway.config import CaConfig
from gateway.errors import CaError, PkiError
from gateway.storage.sqlite_issuance import SqliteIssuanceRecords
from gateway.verdict import Verdict

if TYPE_CHECKING:
    from gateway.storage.interfaces import IssuanceRecordsProtocol

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
class Revocation:
    """The revoked certificate's record and the CRL that now lists it."""

    record: CertificateRecord
    crl: CrlInfo


class CertificateAuthority:
    """The CA directory opened for use: signs with its key, keeps its records in ``records``.

    ``records`` is the issuance-records store (``issuance.db`` in the
    directory by default, or the shared PostgreSQL one chosen by
    :meth:`gateway.storage.backends.Backend.issuance`); every rule that must
    hold across processes runs inside one of its transactions.
    """

    def __init__(
        self,
        directory: Path,
        certificate: x509.Certificate,
        key: pki.PrivateKey,
        settings: CaSettings,
        records: IssuanceRecordsProtocol | None = None,
    ) -> None:
        self.directory = directory
        self.certificate = certificate
        self._key = key
        self.settings = settings
        self.records: IssuanceRecordsProtocol = records or SqliteIssuanceRecords(
            directory / DATABASE, busy_timeout=settings.busy_timeout
        )

    def __repr__(self) -> str:
        return f"CertificateAuthority({str(self.directory)!r}, {self.records!r})"

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
        records: IssuanceRecordsProtocol | None = None,
    ) -> CertificateAuthority:
        """Create a new CA in ``directory``; refuse if any CA file is already there.

        The key file is created with O_EXCL, so two racing ``init`` runs
        cannot both succeed and nothing existing is ever replaced. Without
        ``records`` a new ``issuance.db`` is created beside the key.
        """
        directory = directory.resolve()
        present = [n for n in (CA_KEY, CA_CERT, DATABASE, CRL_DER) if (directory / n).exists()]
        if present:
            raise CaError(f"{directory}: a CA already exists here ({', '.join(present)}); refusing to overwrite it")
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        settings = settings or CaSettings()
        key = pki.generate_key(key_type)
        cert = pki.build_ca(key, now=now)
        _create_private_key(directory / CA_KEY, key)
        write_atomic(directory / CA_CERT, pki.cert_pem(cert))
        write_atomic(directory / CA_CERT_DER, cert.public_bytes(serialization.Encoding.DER))
        if records is None:
            records = SqliteIssuanceRecords.create(directory / DATABASE, busy_timeout=settings.busy_timeout)
        ca = cls(directory, cert, key, settings, records)
        ca.publish_crl(now)
        return ca

    @classmethod
    def open(
        cls,
        directory: Path,
        settings: CaSettings | None = None,
        records: IssuanceRecordsProtocol | None = None,
    ) -> CertificateAuthority:
        """Open an existing CA; its certificate and key must be there (and ``issuance.db`` without ``records``)."""
        directory = directory.resolve()
        if not (directory / CA_CERT).is_file() or not (directory / CA_KEY).is_file():
            raise CaError(f"{directory}: no CA here (run `gateway ca init --dir {directory}`)")
        settings = settings or CaSettings()
        if records is None:
            records = SqliteIssuanceRecords.open(directory / DATABASE, busy_timeout=settings.busy_timeout)
        cert = read_pem_certs(directory / CA_CERT)[0]
        key = read_private_key(directory / CA_KEY)
        if _spki(key) != cert.public_key().public_bytes(*_SPKI):
            raise PkiError(f"{directory}: {CA_KEY} does not belong to {CA_CERT}")
        return cls(directory, cert, key, settings, records)

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

        The rule check, the signing and the insert run in one records
        transaction that the database serialises per user ID (SQLite:
        ``BEGIN IMMEDIATE``; PostgreSQL: an advisory lock), so of two
        simultaneous requests for one user, from any process or host, the
        second sees the first's certificate and is refused. The key is
        generated before the transaction to keep it short. ``p12_format`` and
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
        signed: list[x509.Certificate] = []

        def sign() -> tuple[CertificateRecord, bytes]:
            cert = pki.build_client_cert(
                self.certificate,
                self._key,
                key.public_key(),
                user_id,
                not_before=not_before,
                crl_url=self.settings.crl_url,
                windows_login=windows_login,
            )
            signed.append(cert)
            record = _record_of(cert, "client", user_id=user_id, now=now, by=requested_by, windows_login=windows_login)
            return record, cert.public_bytes(serialization.Encoding.DER)

        record = self.records.issue(user_id, now, sign)
        cert = signed[-1]
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
        self.records.add(record, cert.public_bytes(serialization.Encoding.DER))
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
        return self.records.list(user, status, kind=kind, now=now)

    def get(self, serial: int) -> CertificateRecord:
        """One certificate's record by serial; unknown serials are an error."""
        return self.records.get(serial)

    def certificate_of(self, serial: int) -> x509.Certificate:
        """The issued certificate itself (for a detail page or a re-check)."""
        return self.records.certificate_of(serial)

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
        CRL is built (with PostgreSQL it is also pushed to every gateway in
        that transaction); if publishing fails the records keep a "CRL
        stale" mark, so :meth:`crl_due` asks for it again.
        """
        revoked = self.records.revoke(serial, reason, now, by, owner=owner)
        return Revocation(revoked, self.publish_crl(now))

    def publish_crl(self, now: dt.datetime) -> CrlInfo:
        """Sign a full CRL and replace crl.der and crl.pem atomically.

        Publications are serialised by a lock file, not by the database's
        write lock, so issuing is not held up while a large CRL is signed;
        the CRL number is taken in the same transaction that reads the
        entries, so a later number always lists at least as much (across
        portals too, when the records are shared). Entries whose
        certificate expired more than ``crl_drop_expired_after`` ago are
        left out (RFC 5280 allows it once a certificate has expired).
        """
        this_update = _whole_seconds(now)
        next_update = this_update + self.settings.crl_next_update
        cutoff = this_update - self.settings.crl_drop_expired_after
        with self._crl_lock():
            number, entries = self.records.start_crl(cutoff)
            try:
                info = self._write_crl(entries, number, this_update, next_update)
            except BaseException:
                self.records.mark_crl_stale()
                raise
            self.records.finish_crl(info)
        return info

    def _write_crl(
        self,
        rows: builtins.list[CrlEntry],
        number: int,
        this_update: dt.datetime,
        next_update: dt.datetime,
    ) -> CrlInfo:
        entries = [pki.RevokedEntry(e.serial, e.revoked_at, e.reason.flag if e.reason else None) for e in rows]
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
        return self.records.last_crl()

    def crl_due(self, now: dt.datetime) -> bool:
        """Should the scheduler publish now?

        Yes when no CRL was published, a revocation is not yet in it, the
        files are missing, or less than a third of its validity is left
        (so it is re-signed well before nextUpdate even without changes).
        """
        last = self.last_crl()
        if last is None or not self.crl_der_path.is_file() or not self.crl_pem_path.is_file():
            return True
        if self.records.crl_stale():
            return True
        validity = last.next_update - last.this_update
        return last.next_update - now < validity * CRL_RESIGN_FRACTION

    # -- plumbing ----------------------------------------------------------

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

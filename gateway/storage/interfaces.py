"""One interface per store: what the rest of the product asks of users, sessions, audit and issuance records.

Each :class:`typing.Protocol` here is the contract a storage backend fulfils;
today the SQLite classes do (:class:`gateway.access.users.UserStore`,
:class:`gateway.access.sessions.SessionStore` and ``SessionReader``,
:class:`gateway.audit.store.AuditStore`,
:class:`gateway.storage.sqlite_issuance.SqliteIssuanceRecords`; the
PostgreSQL ones are ``gateway.storage.pg_*``), and mypy checks that
they do (``tests/test_storage.py`` assigns each to its protocol). A second
backend implements the same protocols and runs the same behaviour tests.

All methods block (database I/O): async code calls them in an executor.
Times are timezone-aware UTC datetimes. The record types stay with their
concern (users with access, events with audit, certificate records with the
CA's rules); they are imported here for typing only.
"""

from __future__ import annotations

import builtins
import datetime as dt
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, Self

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gateway.access.policy import LoginSettings, SessionLimits
    from gateway.access.sessions import SessionRecord
    from gateway.access.users import FailureResult, LoginState, User
    from gateway.audit.chain import Mark, Trail
    from gateway.audit.events import AuditEvent, AuditFilter
    from gateway.audit.store import AuditSummary
    from gateway.ca.issuance import CertificateKind, CertificateRecord, CrlEntry, CrlInfo, RevocationReason, Status


class Closable(Protocol):
    """Every store holds a connection (or a pool): close it, or use the store as a context manager."""

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class UserStoreProtocol(Closable, Protocol):
    """Accounts, failed logins (per user ID and per IP) and locks.

    Failures and locks are kept per *typed* user ID, whether or not the user
    exists; ``record_failure`` must count and lock atomically across
    processes (two workers must not both miss the fifth failure).
    """

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
    ) -> User: ...

    def get_user(self, user_id: str) -> User | None: ...

    def list_users(self) -> list[User]: ...

    def set_enabled(self, user_id: str, enabled: bool, *, now: dt.datetime) -> None: ...

    def set_systems(self, user_id: str, systems: Iterable[str], *, now: dt.datetime) -> frozenset[str]: ...

    def set_roles(self, user_id: str, roles: Iterable[str], *, now: dt.datetime) -> frozenset[str]: ...

    def set_password(self, user_id: str, password_hash: str, *, temporary: bool, now: dt.datetime) -> None: ...

    def login_state(self, user_id: str, ip: str, now: dt.datetime, window: dt.timedelta) -> LoginState: ...

    def record_failure(self, user_id: str, ip: str, now: dt.datetime, settings: LoginSettings) -> FailureResult: ...

    def record_ip_failure(self, ip: str, now: dt.datetime, settings: LoginSettings) -> int: ...

    def user_failures(self, user_id: str, now: dt.datetime, window: dt.timedelta) -> int: ...

    def ip_failures(self, ip: str, now: dt.datetime, window: dt.timedelta) -> int: ...

    def clear_failures(self, user_id: str) -> None: ...

    def locked_until(self, user_id: str, now: dt.datetime) -> dt.datetime | None: ...

    def unlock(self, user_id: str) -> bool: ...

    def purge(self, now: dt.datetime, window: dt.timedelta) -> int: ...


class SessionStoreProtocol(Closable, Protocol):
    """Server-side sessions shared by every worker: deleting one ends it everywhere at once."""

    def create(
        self,
        user_id: str,
        cert_fingerprint: str,
        systems: Iterable[str],
        must_change_password: bool,
        now: dt.datetime,
    ) -> tuple[str, str]: ...

    def get(self, session_id: str) -> SessionRecord | None: ...

    def touch(self, session_id: str, now: dt.datetime, *, last_seen: dt.datetime | None = None) -> bool: ...

    def delete(self, session_id: str) -> bool: ...

    def delete_for_user(self, user_id: str) -> int: ...

    def set_systems_for_user(self, user_id: str, systems: Iterable[str]) -> int: ...

    def purge_expired(self, now: dt.datetime, limits: SessionLimits) -> int: ...


class SessionReaderProtocol(SessionStoreProtocol, Protocol):
    """The per-request session reader behind the session cache.

    ``data_version`` differs from the last value read iff another connection
    committed since; the cache drops its entries when it changes (SQLite:
    ``PRAGMA data_version``). PostgreSQL has no such counter across hosts:
    its reader is told of each change by LISTEN/NOTIFY, passes the changed
    session to ``watch``'s callback, and bumps a counter of its own when
    everything may have changed (a "*" notification, the listener reconnecting).
    It may raise :class:`~gateway.storage.postgres.DatabaseUnavailable` from
    either method while the database is unreachable.
    """

    def data_version(self) -> int: ...

    def watch(self, invalidate: Callable[[str | None], None]) -> None:
        """Have ``invalidate(id_hash)`` called when a session changes elsewhere (None: any may have)."""


class AuditStoreProtocol(Closable, Protocol):
    """The append-only audit trail, shared by every process: append, read, prune by retention only."""

    def append(self, events: Sequence[AuditEvent]) -> None: ...

    def prune(self, older_than: dt.datetime, *, actor: str = "", key: Ed25519PrivateKey | None = None) -> int: ...

    def checkpoint(self, instance: str, key: Ed25519PrivateKey, now: dt.datetime) -> Mark | None: ...

    def chain_trail(
        self,
        since: dt.datetime | None = None,
        *,
        instances: Collection[str] | None = None,
        after: Mapping[str, int] | None = None,
    ) -> Trail: ...

    def chain_heads(self, since: dt.datetime, until: dt.datetime, instance: str = "") -> dict[str, int]: ...

    def query(self, f: AuditFilter) -> list[AuditEvent]: ...

    def get(self, support_id: str) -> AuditEvent | None: ...

    def count(self) -> int: ...

    def summary(
        self,
        since: dt.datetime,
        until: dt.datetime,
        *,
        top: int = 10,
        match: AuditFilter | None = None,
    ) -> AuditSummary: ...


class IssuanceRecordsProtocol(Closable, Protocol):
    """The CA's issuance records: what the CA writes and the portal, the CLI and the CRL schedule read.

    :class:`~gateway.ca.authority.CertificateAuthority` signs; this store
    keeps the records and runs the rules that must hold across processes
    and hosts inside its own transactions, so the database (not a Python
    lock) enforces them:

    - ``issue`` checks "one valid certificate per user ID" (the renewal
      window included) and inserts what ``sign`` returns, serialised per
      user ID against every other writer; a refusal raises
      :class:`~gateway.ca.issuance.IssuanceRefused` and inserts nothing.
    - ``revoke`` checks the revocation rule, marks the CRL stale and (with
      PostgreSQL) pushes the revocation to the gateways, all at COMMIT.
    - ``start_crl`` takes the next CRL number and reads the entries in one
      transaction, so CRL numbers strictly increase across publishers and
      a later number lists at least as much; ``finish_crl`` records the
      publication, ``mark_crl_stale`` asks for another after a failure.
    """

    def list(
        self,
        user: str | None = None,
        status: Status | None = None,
        *,
        kind: CertificateKind | None = "client",
        now: dt.datetime | None = None,
    ) -> builtins.list[CertificateRecord]: ...

    def get(self, serial: int) -> CertificateRecord: ...

    def certificate_of(self, serial: int) -> x509.Certificate: ...

    def last_crl(self) -> CrlInfo | None: ...

    def crl_stale(self) -> bool: ...

    def issue(
        self, user_id: str, now: dt.datetime, sign: Callable[[], tuple[CertificateRecord, bytes]]
    ) -> CertificateRecord: ...

    def add(self, record: CertificateRecord, der: bytes) -> None: ...

    def revoke(
        self, serial: int, reason: RevocationReason, now: dt.datetime, by: str, *, owner: str | None = None
    ) -> CertificateRecord: ...

    def start_crl(self, cutoff: dt.datetime) -> tuple[int, builtins.list[CrlEntry]]: ...

    def finish_crl(self, info: CrlInfo) -> None: ...

    def mark_crl_stale(self) -> None: ...

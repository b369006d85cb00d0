"""One interface per store: what the rest of the product asks of users, sessions, audit and issuance records.

Each :class:`typing.Protocol` here is the contract a storage backend fulfils;
today the SQLite classes do (:class:`gateway.access.users.UserStore`,
:class:`gateway.access.sessions.SessionStore` and ``SessionReader``,
:class:`gateway.audit.store.AuditStore`, and the records side of
:class:`gateway.ca.authority.CertificateAuthority`), and mypy checks that
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
from collections.abc import Collection, Iterable, Mapping, Sequence
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
    from gateway.ca.authority import CrlInfo
    from gateway.ca.issuance import CertificateKind, CertificateRecord, Status


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
    ``PRAGMA data_version``; another backend needs its own change counter).
    """

    def data_version(self) -> int: ...


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


class IssuanceRecordsProtocol(Protocol):
    """The CA's issuance records as the portal, the CLI and the CRL schedule read them.

    The writes (issue, revoke, publish a CRL) stay inside
    :class:`~gateway.ca.authority.CertificateAuthority`: each runs the
    issuance rule and the write in one ``BEGIN IMMEDIATE`` transaction, so
    a second backend has to offer that transaction, not only these reads.
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

    def crl_due(self, now: dt.datetime) -> bool: ...

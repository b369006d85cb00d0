"""The SQLite stores satisfy the storage interfaces (gateway.storage.interfaces).

mypy checks this file too (``[tool.mypy] files``): each assignment of a real
store to its protocol is a structural check of every method's signature, so a
store that drifts from its interface (or an interface from the stores) fails
the type check. The runtime assertions below repeat the check by name, on
real SQLite files, so a plain test run notices a missing method as well.
"""

from __future__ import annotations

import datetime as dt
import inspect
from pathlib import Path

from gateway.access.sessions import SessionReader, SessionStore
from gateway.access.users import UserStore
from gateway.audit.store import AuditStore
from gateway.ca.authority import CertificateAuthority
from gateway.storage import interfaces, pg_issuance, postgres
from gateway.storage.interfaces import (
    AuditStoreProtocol,
    IssuanceRecordsProtocol,
    SessionReaderProtocol,
    SessionStoreProtocol,
    UserStoreProtocol,
)
from gateway.storage.sqlite_issuance import SqliteIssuanceRecords

T0 = dt.datetime(2026, 11, 1, 9, 0, tzinfo=dt.UTC)
CONTEXT = {"__enter__", "__exit__"}


def protocol_methods(protocol: type) -> set[str]:
    """The methods a protocol declares, its bases' included (object's excluded)."""
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass.__module__ == interfaces.__name__:
            names |= {n for n, v in vars(klass).items() if inspect.isfunction(v) and (n[0] != "_" or n in CONTEXT)}
    return names


def assert_satisfies(store: object, protocol: type) -> None:
    for name in sorted(protocol_methods(protocol)):
        wanted = inspect.signature(getattr(protocol, name))
        got = inspect.signature(getattr(type(store), name))
        assert list(got.parameters) == list(wanted.parameters), (type(store).__name__, name, got, wanted)


def test_user_and_session_stores_satisfy_their_interfaces(tmp_path: Path) -> None:
    users: UserStoreProtocol = UserStore(tmp_path / "gateway.db")
    sessions: SessionStoreProtocol = SessionStore(tmp_path / "gateway.db")
    reader: SessionReaderProtocol = SessionReader(tmp_path / "gateway.db")
    with users, sessions, reader:
        assert_satisfies(users, UserStoreProtocol)
        assert_satisfies(sessions, SessionStoreProtocol)
        assert_satisfies(reader, SessionReaderProtocol)
        assert users.get_user("LC000001") is None
        assert reader.get("no-such-session") is None


def test_audit_store_satisfies_its_interface(tmp_path: Path) -> None:
    store: AuditStoreProtocol = AuditStore(tmp_path / "audit.db")
    with store:
        assert_satisfies(store, AuditStoreProtocol)
        assert store.count() == 0


def test_the_issuance_records_satisfy_their_interface(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", now=T0)
    records: IssuanceRecordsProtocol = SqliteIssuanceRecords.open(ca.database_path)
    assert_satisfies(records, IssuanceRecordsProtocol)
    assert_satisfies(ca.records, IssuanceRecordsProtocol)
    assert records.list() == []
    assert records.last_crl() is not None  # init publishes the first CRL
    assert not records.crl_stale()
    assert not ca.crl_due(T0)


def test_the_postgresql_issuance_records_satisfy_their_interface(pg_url: str) -> None:
    with postgres.Database(postgres.target(pg_url)) as db:
        with db.connection() as conn:
            postgres.migrate(conn, [pg_issuance.SCHEMA])
        records: IssuanceRecordsProtocol = pg_issuance.PgIssuanceRecords.open(db)
        assert_satisfies(records, IssuanceRecordsProtocol)
        assert records.list() == []
        assert records.last_crl() is None
        assert records.crl_stale()  # nothing published yet


def test_a_store_missing_a_method_is_caught() -> None:
    """The name check is not vacuous: a class without ``unlock`` fails it."""

    class Partial:
        def close(self) -> None: ...

    try:
        assert_satisfies(Partial(), UserStoreProtocol)
    except AttributeError:
        return
    raise AssertionError("a store without the protocol's methods passed")


def test_postgres_user_and_session_stores_satisfy_their_interfaces(pg_url: str) -> None:
    from gateway.storage import postgres
    from gateway.storage.pg_sessions import PgSessionReader, PgSessionStore
    from gateway.storage.pg_users import PgUserStore
    from tests.stores import migrate

    migrate(pg_url)
    with postgres.Database(postgres.target(pg_url)) as db:
        users: UserStoreProtocol = PgUserStore(db)
        sessions: SessionStoreProtocol = PgSessionStore(db)
        reader: SessionReaderProtocol = PgSessionReader(db)
        assert_satisfies(users, UserStoreProtocol)
        assert_satisfies(sessions, SessionStoreProtocol)
        assert_satisfies(reader, SessionReaderProtocol)
        assert users.get_user("LC000001") is None
        assert sessions.get("no-such-session") is None

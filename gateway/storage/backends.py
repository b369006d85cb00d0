"""Where a process's stores live: SQLite files (the embedded default) or one shared PostgreSQL.

Every caller that needs a store (the gateway's workers, the portal, the CLI)
asks a :class:`Backend` built from the config instead of naming a class:
the config's top-level ``database:`` decides, in this one place. A
PostgreSQL backend holds one connection pool per process, shared by all of
its stores; closing a store leaves the pool alone, closing the backend
closes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Self

from gateway.config import Config
from gateway.storage import postgres

if TYPE_CHECKING:
    from gateway.storage.interfaces import (
        AuditStoreProtocol,
        IssuanceRecordsProtocol,
        SessionReaderProtocol,
        SessionStoreProtocol,
        UserStoreProtocol,
    )


class Backend:
    """The stores one process uses, all from one place (files or one database pool)."""

    def __init__(
        self, config: Config, *, role: str = "gateway", workers: int = 1, pool_size: int | None = None
    ) -> None:
        """``role`` names the process to PostgreSQL (application_name); ``workers`` sizes the pool.

        ``pool_size`` fixes the size for a user that needs a set number (the
        audit writer is one thread: one connection).
        """
        self.config = config
        self.db: postgres.Database | None = None
        if config.database is not None:
            where = postgres.target_of(config.database, application_name=f"tse-{role}:{config.instance}")
            size = pool_size if pool_size is not None else config.database.pool_for(workers)
            self.db = postgres.Database(where, pool_size=size, timeout=config.database.connect_timeout)

    @property
    def shared(self) -> bool:
        """True when the stores are in PostgreSQL (several instances share them)."""
        return self.db is not None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def users(self) -> UserStoreProtocol:
        if self.db is not None:
            from gateway.storage.pg_users import PgUserStore

            return PgUserStore(self.db)
        from gateway.access.users import UserStore

        return UserStore(self.config.users.database)

    def sessions(self) -> SessionStoreProtocol:
        """The session store; on PostgreSQL its writes are announced to every instance's caches."""
        if self.db is not None:
            from gateway.storage.pg_sessions import PgSessionStore

            return PgSessionStore(self.db)
        from gateway.access.sessions import SessionStore

        return SessionStore(self.config.users.database)

    def session_reader(self) -> SessionReaderProtocol:
        """The reader behind a worker's session cache (PostgreSQL: start its listener on the worker's loop)."""
        if self.db is not None:
            from gateway.storage.pg_sessions import PgSessionReader

            assert self.config.database is not None
            return PgSessionReader(self.db, grace=self.config.database.outage_grace)
        from gateway.access.sessions import SessionReader

        return SessionReader(self.config.users.database)

    def audit(self, *, readonly: bool = False) -> AuditStoreProtocol:
        """The audit trail: the shared ``events`` table, or the ``audit.database`` file."""
        if self.db is not None:
            from gateway.storage.pg_audit import PgAuditStore

            return PgAuditStore(self.db, readonly=readonly)
        from gateway.audit.store import AuditStore

        return AuditStore(self.config.audit.database, readonly=readonly)

    def issuance(self, ca_dir: Path, *, busy_timeout: float = 15.0) -> IssuanceRecordsProtocol:
        """The CA's issuance records: ``issuance.db`` in ``ca_dir``, or the shared database's ``ca`` tables.

        The CA's key and certificate stay files in ``ca_dir`` either way.
        """
        if self.db is not None:
            from gateway.storage.pg_issuance import PgIssuanceRecords

            return PgIssuanceRecords.open(self.db)
        from gateway.storage.sqlite_issuance import SqliteIssuanceRecords

        return SqliteIssuanceRecords.open(ca_dir / "issuance.db", busy_timeout=busy_timeout)

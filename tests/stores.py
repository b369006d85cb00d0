"""Open the user and session stores of either backend, each as a separate worker would.

The behaviour tests of the stores take the ``stores`` fixture (tests/conftest.py),
parametrised over SQLite and PostgreSQL, so both backends pass the same tests. Each
store opened here stands for one worker: on SQLite its own connection to the file,
on PostgreSQL its own connection pool (as another process or instance has).
"""

from __future__ import annotations

from pathlib import Path

from gateway.access.sessions import SessionReader, SessionStore
from gateway.access.users import UserStore
from gateway.storage import postgres
from gateway.storage.interfaces import SessionStoreProtocol, UserStoreProtocol
from gateway.storage.pg_sessions import PgSessionReader, PgSessionStore
from gateway.storage.pg_users import PgUserStore
from gateway.storage.schemas import all_schemas


def migrate(url: str) -> None:
    """Create every component's tables, as ``gateway db migrate`` does."""
    with postgres.connect(postgres.target(url)) as conn:
        postgres.migrate(conn, all_schemas())


class Opener:
    """Stores of one backend on one database; :meth:`close` closes all of them (and their pools)."""

    def __init__(self, backend: str, path: Path, url: str | None = None) -> None:
        self.backend = backend
        self.path = path
        self.url = url
        self._pools: list[postgres.Database] = []
        self._stores: list[UserStore | SessionStore] = []
        if url is not None:
            migrate(url)

    def pool(self, *, size: int = 2, timeout: float = 5.0) -> postgres.Database:
        """A connection pool of its own (another worker's or instance's)."""
        assert self.url is not None
        self._pools.append(postgres.Database(postgres.target(self.url), pool_size=size, timeout=timeout))
        return self._pools[-1]

    def users(self) -> UserStoreProtocol:
        if self.backend == "postgres":
            return PgUserStore(self.pool())
        self._stores.append(UserStore(self.path))
        return self._stores[-1]  # type: ignore[return-value]

    def sessions(self) -> SessionStoreProtocol:
        if self.backend == "postgres":
            return PgSessionStore(self.pool())
        self._stores.append(SessionStore(self.path))
        return self._stores[-1]  # type: ignore[return-value]

    def reader(self, *, grace: float = 30.0) -> SessionReader | PgSessionReader:
        if self.backend == "postgres":
            return PgSessionReader(self.pool(), grace=grace)
        reader = SessionReader(self.path)
        self._stores.append(reader)
        return reader

    def close(self) -> None:
        for store in self._stores:
            store.close()
        for pool in self._pools:
            pool.close()

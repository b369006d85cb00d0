"""docs/postgresql-roles.sql, applied to a fresh database: the gateway role appends, only the admin prunes.

The roles are the second line of defence behind the append-only trigger:
the trigger lets a DELETE through when the transaction set the prune
marker, so the gateway role must lack the DELETE privilege itself.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.events import AuditEvent, AuditFilter, EventKind
from gateway.errors import StoreError
from gateway.storage import postgres as pg
from gateway.storage.pg_audit import SCHEMA, PgAuditStore
from tests.pgserver import PgServer

ROLES_SQL = Path(__file__).resolve().parent.parent / "docs" / "postgresql-roles.sql"
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def apply_roles(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(ROLES_SQL.read_text(encoding="utf-8").encode())


@pytest.fixture
def urls(postgres: PgServer, pg_url: str) -> dict[str, str]:
    """The roles file run before and after `gateway db migrate` (as gateway_admin), as the file says."""
    name = urlsplit(pg_url).path.lstrip("/")
    apply_roles(pg_url)
    admin = postgres.url(name, user="gateway_admin")
    with psycopg.connect(admin, autocommit=True) as conn:
        assert pg.migrate(conn, [SCHEMA]) == [("audit", 0, SCHEMA.version)]
    apply_roles(pg_url)
    apply_roles(pg_url)  # idempotent
    return {"admin": admin, "gateway": postgres.url(name, user="gateway")}


def old_events(n: int) -> list[AuditEvent]:
    return [AuditEvent(EventKind.LOGIN, reason="ok", time=T0 + dt.timedelta(minutes=i)) for i in range(n)]


def test_the_gateway_role_appends_and_reads(urls: dict[str, str]) -> None:
    with pg.Database(pg.target(urls["gateway"])) as db, PgAuditStore(db) as store:
        pg.check_schema(db, SCHEMA)  # it may read schema_version
        store.append(old_events(3))
        assert store.count() == 3
        assert len(store.query(AuditFilter())) == 3


def test_the_gateway_role_cannot_update_delete_or_prune_even_with_the_marker(urls: dict[str, str]) -> None:
    with pg.Database(pg.target(urls["gateway"])) as db, PgAuditStore(db) as store:
        store.append(old_events(3))
        with pytest.raises(StoreError, match="permission denied"), db.connection() as conn:
            conn.execute("UPDATE events SET reason = 'x'")
        with pytest.raises(StoreError, match="permission denied"), db.transaction() as conn:
            conn.execute("SELECT set_config('gateway.audit_prune', 'on', true)")  # the trigger's bypass
            conn.execute("DELETE FROM events")
        with pytest.raises(StoreError, match="permission denied"):
            store.prune(T0 + dt.timedelta(days=1), actor="cli:gateway", key=Ed25519PrivateKey.generate())
        with pytest.raises(StoreError, match="permission denied"), db.connection() as conn:
            conn.execute("CREATE TABLE mine (x int)")
        assert store.count() == 3


def test_the_admin_role_prunes_and_the_prune_is_recorded(urls: dict[str, str]) -> None:
    with pg.Database(pg.target(urls["gateway"])) as db, PgAuditStore(db) as store:
        store.append(old_events(3))
    with pg.Database(pg.target(urls["admin"])) as db, PgAuditStore(db) as admin:
        assert admin.prune(T0 + dt.timedelta(minutes=2), actor="cli:admin", key=Ed25519PrivateKey.generate()) == 2
        assert [e.event for e in admin.query(AuditFilter())] == [EventKind.ADMIN_ACTION, EventKind.LOGIN]
        # Even the owner is held by the trigger outside a prune.
        with pytest.raises(StoreError, match="append-only"), db.connection() as conn:
            conn.execute("DELETE FROM events")

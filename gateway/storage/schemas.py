"""Which PostgreSQL tables this release has, and where each component's SQLite tables were.

Two lists, read by ``gateway db migrate``/``status``/``import`` and by the
start-up checks:

- :func:`all_schemas`: every PostgreSQL store's versioned :class:`Schema`,
  in the order ``gateway db migrate`` creates them. A new store adds one line.
- :data:`SQLITE_SOURCES`: for ``gateway db import``, each component's SQLite
  file in a single-host config and its tables with their natural keys (a row
  whose key is already in PostgreSQL is skipped, so the import can run twice).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config
from gateway.storage.postgres import Schema

# The PostgreSQL store modules, each with a module-level ``SCHEMA``, in the order
# ``gateway db migrate`` creates them. One line per store.
SCHEMA_MODULES: tuple[str, ...] = (
    "gateway.storage.pg_users",
    "gateway.storage.pg_sessions",
    "gateway.storage.pg_audit",
    "gateway.storage.pg_issuance",
)


def all_schemas() -> list[Schema]:
    """This release's PostgreSQL schemas, one per component (users, sessions, audit, ca).

    Imported on call, not with this module, so a process that never touches
    PostgreSQL loads none of the store modules.
    """
    schemas = []
    for name in SCHEMA_MODULES:
        schema = importlib.import_module(name).SCHEMA
        assert isinstance(schema, Schema), name
        schemas.append(schema)
    return schemas


@dataclass(frozen=True)
class Table:
    """One table to copy: ``key`` is its natural key, ``order`` the order rows are copied in.

    ``keep_greatest`` names a column whose existing row is raised to the
    imported value instead of kept (the CA's CRL number must never go back).
    """

    name: str
    key: tuple[str, ...]
    order: tuple[str, ...] = ()
    keep_greatest: str = ""


@dataclass(frozen=True)
class Source:
    """A component's SQLite file in a single-host config (``file`` is None when the config has none)."""

    component: str
    file: Callable[[Config], Path | None]
    tables: tuple[Table, ...]
    # Run after the tables, in the same transaction: state derived from the copied rows.
    after: tuple[str, ...] = ()


# The audit chain's head per instance is its last event: after an import it must be the
# imported chain's end, or the next event would restart at seq 1 (and collide with it).
_AUDIT_HEADS = """
INSERT INTO audit_chain_heads (instance, seq, hash)
SELECT DISTINCT ON (instance) instance, seq, hash FROM events ORDER BY instance, seq DESC
ON CONFLICT (instance) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash
WHERE EXCLUDED.seq > audit_chain_heads.seq
"""


def _ca_file(config: Config) -> Path | None:
    return None if config.ca is None else config.ca.dir / "issuance.db"


SQLITE_SOURCES: tuple[Source, ...] = (
    Source(
        "users",
        lambda config: config.users.database,
        (
            Table("users", ("user_id",)),
            # No key in SQLite: a failure is the same failure when kind, key and time all match.
            Table("login_failures", ("kind", "key", "at"), order=("at",)),
            Table("lockouts", ("user_id",)),
        ),
    ),
    Source("sessions", lambda config: config.users.database, (Table("sessions", ("id_hash",)),)),
    # Events are copied in the order they were written (new ids keep it); a support ID
    # names one request, so it is with the event kind and time that it names one event.
    # Signed checkpoints and prune anchors come along, so the imported trail verifies as before.
    Source(
        "audit",
        lambda config: config.audit.database,
        (
            Table("events", ("support_id", "event", "time_ms"), ("id",)),
            Table("audit_marks", ("instance", "kind", "seq", "signature"), ("id",)),
        ),
        after=(_AUDIT_HEADS,),
    ),
    Source(
        "ca",
        _ca_file,
        (
            Table("certificates", ("serial",)),
            Table("crls", ("number",)),
            Table("meta", ("key",), keep_greatest="value"),
        ),
    ),
)

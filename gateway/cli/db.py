"""``gateway db``: create and upgrade the stores' tables, show their versions, import a single host.

A running gateway never changes the PostgreSQL schema (it refuses to start
on one that is behind): ``gateway db migrate`` does, once per release, with a
role allowed to create tables. Without ``database:`` the stores are SQLite
files that upgrade themselves when opened; ``migrate`` then opens each once so
the files are ready before the service starts. ``gateway db import`` moves a
single-host SQLite deployment into PostgreSQL. No output or error shows the
database password.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import psycopg

from gateway.cli.common import add_config_argument, config_path
from gateway.config import Config, load_config
from gateway.errors import ConfigError, StoreError
from gateway.storage import postgres

MIGRATE = "gateway db migrate --config {}"


def register(sub: argparse._SubParsersAction[Any]) -> None:
    db = sub.add_parser(
        "db",
        help="create/upgrade the database tables, show their versions, import a single-host deployment",
        description="The stores' tables: PostgreSQL when the config has database:, else SQLite files.",
    )
    actions = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    p = _action(
        actions,
        "migrate",
        "create or upgrade the tables to this release's version",
        "PostgreSQL: bring every component's tables to this release's version, in one transaction\n"
        "(run it with a role allowed to create tables, once per release, before the services).\n"
        "SQLite (no database:): open each store once so its file is created or upgraded.",
        "gateway db migrate --config /etc/tse-gateway/tdnet.yaml",
    )
    add_config_argument(p)
    p.set_defaults(func=_migrate)
    p = _action(
        actions,
        "status",
        "show each component's table version against this release's",
        "Print each component's schema version in the database and the version this release needs;\n"
        "exit 1 if any is behind (run gateway db migrate) or ahead (a newer release migrated it).",
        "gateway db status --config /etc/tse-gateway/tdnet.yaml",
    )
    add_config_argument(p)
    p.set_defaults(func=_status)
    p = _action(
        actions,
        "import",
        "copy a single-host SQLite deployment into the PostgreSQL database",
        "Copy users, login failures and lockouts, sessions, audit events and CA records from the\n"
        "SQLite files named by --from into the PostgreSQL database of --config. One transaction per\n"
        "component; rows already there are skipped, so running it twice changes nothing.\n"
        "Run gateway db migrate --config NEW first; the SQLite files are only read.",
        "gateway db import --from /etc/tse-gateway/old.yaml --config /etc/tse-gateway/tdnet.yaml",
    )
    p.add_argument("--from", dest="source", metavar="OLD", required=True, help="the single-host (SQLite) config")
    add_config_argument(p)
    p.set_defaults(func=_import)


def _action(actions: argparse._SubParsersAction[Any], name: str, help_text: str, description: str, example: str) -> Any:
    return actions.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# --- migrate and status ----------------------------------------------------------------------


def _migrate(args: argparse.Namespace) -> int:
    config = load_config(config_path(args.config))
    if config.database is None:
        for line in _open_sqlite_stores(config):
            print(line)
        return 0
    from gateway.storage.schemas import all_schemas

    where = _target(config)
    print(f"database: {where}")
    schemas = all_schemas()
    with _connection(where, config) as conn, _errors(where):
        before = postgres.schema_versions(conn)
        changes = {component: (old, new) for component, old, new in postgres.migrate(conn, schemas)}
    for schema in schemas:
        if schema.component in changes:
            old, new = changes[schema.component]
            print(f"{schema.component}: {old} → {new}")
        else:
            print(f"{schema.component}: up to date (version {before.get(schema.component, 0)})")
    return 0


def _status(args: argparse.Namespace) -> int:
    config = load_config(config_path(args.config))
    if config.database is None:
        print("no database: in the config; the SQLite stores create and upgrade their files when opened")
        return 0
    from gateway.storage.schemas import all_schemas

    where = _target(config)
    print(f"database: {where}")
    with _connection(where, config) as conn, _errors(where):
        have = postgres.schema_versions(conn)
    status = 0
    for schema in all_schemas():
        version = have.get(schema.component, 0)
        if version < schema.version:
            state, status = f"behind: run {MIGRATE.format(config.path)}", 1
        elif version > schema.version:
            state, status = "ahead: a newer release migrated it", 1
        else:
            state = "up to date"
        print(f"{schema.component}: {version} (this release: {schema.version}) {state}")
    return status


def _open_sqlite_stores(config: Config) -> Iterator[str]:
    """Open each SQLite store once: each creates or upgrades its own tables on open."""
    from gateway.access.sessions import SessionStore
    from gateway.access.users import UserStore
    from gateway.audit.store import AuditStore

    users, audit = config.users.database, config.audit.database
    for component, path, store in (
        ("users", users, lambda: UserStore(users)),
        ("sessions", users, lambda: SessionStore(users)),
        ("audit", audit, lambda: AuditStore(audit)),
    ):
        store().close()
        yield f"{component}: ready ({path}, SQLite)"
    from gateway.ca.authority import CA_CERT, CertificateAuthority

    if config.ca is not None and (config.ca.dir / CA_CERT).exists():  # no CA yet: `gateway ca init` makes one
        CertificateAuthority.open(config.ca.dir)
        yield f"ca: ready ({config.ca.dir}, SQLite)"


# --- import --------------------------------------------------------------------------------


def _import(args: argparse.Namespace) -> int:
    from gateway.storage import transfer
    from gateway.storage.schemas import SQLITE_SOURCES, all_schemas

    old = load_config(config_path(args.source))
    new = load_config(config_path(args.config))
    if old.database is not None:
        raise ConfigError([f"{old.path}: --from takes the single-host config (SQLite files), not one with database:"])
    if new.database is None:
        raise ConfigError([f"{new.path}: database: missing; --config names the config of the PostgreSQL deployment"])
    where = _target(new)
    print(f"database: {where}")
    sources = [(source, source.file(old)) for source in SQLITE_SOURCES]
    with _connection(where, new) as conn, _errors(where):
        _require_current(conn, all_schemas(), [s.component for s, path in sources if path is not None], new)
        for source, path in sources:
            if path is None:
                print(f"{source.component}: not in {old.path}; nothing to import")
                continue
            lite = transfer.open_sqlite(path)
            try:
                copied = transfer.import_component(lite, conn, source, _progress)
            finally:
                lite.close()
            for row in copied:
                print(f"{source.component}.{row.table}: {row.read} read, {row.inserted} new")
    return 0


def _require_current(
    conn: psycopg.Connection[Any], schemas: list[postgres.Schema], components: list[str], config: Config
) -> None:
    """Refuse before copying anything if a target component's tables are missing or behind."""
    have = postgres.schema_versions(conn)
    known = {schema.component: schema.version for schema in schemas}
    problems = []
    for component in components:
        if component not in known:
            problems.append(f"{component}: this release has no PostgreSQL tables for it")
        elif have.get(component, 0) < known[component]:
            problems.append(
                f"{component}: the tables are at version {have.get(component, 0)}, this release needs"
                f" {known[component]}; run: {MIGRATE.format(config.path)}"
            )
    if problems:
        raise StoreError("; ".join(problems))


def _progress(table: str, done: int, total: int) -> None:
    print(f"  {table}: {done}/{total}", file=sys.stderr, flush=True)


# --- the connection and its errors -------------------------------------------------------------


def _target(config: Config) -> postgres.Target:
    assert config.database is not None
    try:
        return postgres.target_of(config.database, application_name=f"tse-db:{config.instance}")
    except ConfigError as exc:
        raise ConfigError([f"{config.path}: {line}" for line in exc.problems]) from None


@contextlib.contextmanager
def _connection(where: postgres.Target, config: Config) -> Iterator[psycopg.Connection[Any]]:
    assert config.database is not None
    try:
        conn = postgres.connect(where, timeout=config.database.connect_timeout)
    except postgres.DatabaseUnavailable as exc:
        raise postgres.DatabaseUnavailable(" ".join(str(exc).split())) from None  # the driver's hint, one line
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def _errors(where: postgres.Target) -> Iterator[None]:
    """A driver error as one line naming the database, without the password (and without a traceback)."""
    try:
        yield
    except psycopg.OperationalError as exc:
        raise postgres.DatabaseUnavailable(f"database {where}: {where.scrub(_first_line(exc))}") from None
    except psycopg.Error as exc:
        raise StoreError(f"database {where}: {where.scrub(_first_line(exc))}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

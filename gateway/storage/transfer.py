"""Copying a single-host deployment's SQLite tables into PostgreSQL (``gateway db import``).

Generic on purpose: the PostgreSQL tables carry the SQLite tables' names and
column names, so one copy serves every store and a new column needs no code
here. Per table: the rows are streamed with COPY into a temporary table, then
inserted where their natural key is not there yet (see
:class:`gateway.storage.schemas.Table`): running the import twice changes
nothing. Columns PostgreSQL numbers itself (identity or serial) are left to
it. One transaction per component: a failure leaves that component as it was.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from gateway.errors import StoreError
from gateway.storage.schemas import Source, Table

# (table, rows copied so far, rows in the table): called every BATCH rows of a large table.
Progress = Callable[[str, int, int], None]
BATCH = 10_000
_ORDER = "_gw_n"  # the temporary table's row number: rows are inserted in the SQLite order


@dataclass(frozen=True)
class Copied:
    """What one table's import did: rows read from SQLite, rows new to PostgreSQL."""

    table: str
    read: int
    inserted: int


def open_sqlite(path: Path) -> sqlite3.Connection:
    """The SQLite file, read-only: the import never changes the old deployment."""
    if not path.is_file():
        raise StoreError(f"{path}: no such SQLite file")
    try:
        return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot open: {exc}") from exc


def import_component(
    lite: sqlite3.Connection, conn: psycopg.Connection[Any], source: Source, progress: Progress | None = None
) -> list[Copied]:
    """Copy every table of ``source`` from ``lite`` into ``conn``'s database, in one transaction."""
    with conn.transaction():
        copied = [_copy_table(lite, conn, table, progress) for table in source.tables]
        for statement in source.after:
            conn.execute(statement.encode())  # constant SQL from schemas.SQLITE_SOURCES
        return copied


def _copy_table(
    lite: sqlite3.Connection, conn: psycopg.Connection[Any], table: Table, progress: Progress | None
) -> Copied:
    have = _sqlite_columns(lite, table.name)
    if not have:
        return Copied(table.name, 0, 0)  # an older file without this table: nothing to bring
    target = _insertable_columns(conn, table.name)
    columns = [c for c in have if c in target]
    missing = [k for k in table.key if k not in columns]
    if missing:
        raise StoreError(f"table {table.name}: key column {', '.join(missing)} is missing on one side")
    total = int(lite.execute(f"SELECT count(*) FROM {_quoted(table.name)}").fetchone()[0])  # noqa: S608 - constant name
    staging = sql.Identifier(f"_gw_import_{table.name}")
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT {}, 0::bigint AS {} FROM {} WITH NO DATA").format(
            staging, names, sql.Identifier(_ORDER), sql.Identifier(table.name)
        )
    )
    _stream(lite, conn, table, columns, staging, total, progress)
    inserted = conn.execute(_insert_statement(table, columns, staging)).rowcount
    return Copied(table.name, total, max(0, inserted))


def _stream(
    lite: sqlite3.Connection,
    conn: psycopg.Connection[Any],
    table: Table,
    columns: list[str],
    staging: sql.Identifier,
    total: int,
    progress: Progress | None,
) -> None:
    """COPY the SQLite rows into the staging table, numbered in the table's order."""
    order = ", ".join(_quoted(c) for c in (table.order or table.key))
    select = f"SELECT {', '.join(map(_quoted, columns))} FROM {_quoted(table.name)} ORDER BY {order}"  # noqa: S608
    copy_sql = sql.SQL("COPY {} ({}, {}) FROM STDIN").format(
        staging, sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(_ORDER)
    )
    done = 0
    with conn.cursor() as cur, cur.copy(copy_sql) as copy:
        rows = lite.execute(select)
        while batch := rows.fetchmany(BATCH):
            for row in batch:
                copy.write_row((*row, done))
                done += 1
            if progress is not None and total > BATCH:
                progress(table.name, done, total)


def _insert_statement(table: Table, columns: list[str], staging: sql.Identifier) -> sql.Composed:
    """Insert the staged rows whose natural key is new; ``keep_greatest`` raises an existing value instead."""
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    staged = sql.SQL(", ").join(sql.SQL("s.{}").format(sql.Identifier(c)) for c in columns)
    key = sql.SQL(", ").join(map(sql.Identifier, table.key))
    if table.keep_greatest:
        value = sql.Identifier(table.keep_greatest)
        return sql.SQL(
            "INSERT INTO {t} AS t ({names}) SELECT {staged} FROM {s} AS s ORDER BY s.{n}"
            " ON CONFLICT ({key}) DO UPDATE SET {v} = GREATEST(t.{v}, EXCLUDED.{v})"
        ).format(
            t=sql.Identifier(table.name),
            names=names,
            staged=staged,
            s=staging,
            n=sql.Identifier(_ORDER),
            key=key,
            v=value,
        )
    same = sql.SQL(" AND ").join(sql.SQL("t.{c} = s.{c}").format(c=sql.Identifier(c)) for c in table.key)
    return sql.SQL(
        "INSERT INTO {t} ({names}) SELECT {staged} FROM {s} AS s"
        " WHERE NOT EXISTS (SELECT 1 FROM {t} AS t WHERE {same}) ORDER BY s.{n} ON CONFLICT DO NOTHING"
    ).format(t=sql.Identifier(table.name), names=names, staged=staged, s=staging, same=same, n=sql.Identifier(_ORDER))


def _quoted(name: str) -> str:
    """A SQLite identifier in quotes (the names are this module's constants or the file's own columns)."""
    return '"' + name.replace('"', '""') + '"'


def _sqlite_columns(lite: sqlite3.Connection, name: str) -> list[str]:
    return [str(row[1]) for row in lite.execute(f"PRAGMA table_info({_quoted(name)})")]


def _insertable_columns(conn: psycopg.Connection[Any], name: str) -> set[str]:
    """The target table's columns, less those PostgreSQL fills itself (identity, serial, generated)."""
    rows = conn.execute(
        "SELECT column_name, is_identity, is_generated, coalesce(column_default, '') FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = %s",
        (name,),
    ).fetchall()
    if not rows:
        raise StoreError(f"table {name} is missing in PostgreSQL; run gateway db migrate first")
    return {
        str(column)
        for column, identity, generated, default in rows
        if identity != "YES" and generated != "ALWAYS" and not str(default).startswith("nextval(")
    }

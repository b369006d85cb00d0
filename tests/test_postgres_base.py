"""The PostgreSQL base on a real server: targets keep the password out of sight, schemas migrate and refuse, LISTEN reconnects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from gateway.errors import ConfigError, StoreError
from gateway.storage import postgres as pg
from tests.pgserver import PgServer

SECRET = "s3cr3t-Pa55"

ONE = pg.Schema("widgets", {1: "CREATE TABLE widgets (id INTEGER PRIMARY KEY)"})
TWO = pg.Schema("widgets", {**ONE.migrations, 2: "ALTER TABLE widgets ADD COLUMN name TEXT NOT NULL DEFAULT ''"})


def test_the_password_never_shows_in_the_target_or_its_errors(tmp_path: Path) -> None:
    url = f"postgresql://gw:{SECRET}@127.0.0.1:1/gateway?sslmode=disable"
    where = pg.target(url)
    assert SECRET not in str(where) and "gw:***@127.0.0.1:1" in str(where)
    with pytest.raises(pg.DatabaseUnavailable) as caught:
        pg.connect(where, timeout=1)
    assert SECRET not in str(caught.value) and "127.0.0.1:1" in str(caught.value)


def test_the_password_file_wins_and_an_unreadable_one_is_named(tmp_path: Path) -> None:
    secret_file = tmp_path / "db.password"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    where = pg.target("postgresql://gw@db.example.jp/gateway", secret_file)
    assert where.password == SECRET and SECRET in where.conninfo and SECRET not in where.display
    assert where.scrub(f"failed for {SECRET}") == "failed for ***"
    with pytest.raises(ConfigError, match=r"database.password_file: cannot read .*missing"):
        pg.target("postgresql://gw@db.example.jp/gateway", tmp_path / "missing")


def test_migrate_creates_upgrades_and_refuses_a_newer_schema(pg_url: str) -> None:
    with pg.connect(pg.target(pg_url)) as conn:
        assert pg.schema_versions(conn) == {}
        assert pg.migrate(conn, [ONE]) == [("widgets", 0, 1)]
        assert pg.migrate(conn, [ONE]) == []  # idempotent
        assert pg.migrate(conn, [TWO]) == [("widgets", 1, 2)]
        conn.execute("INSERT INTO widgets (id, name) VALUES (1, 'a')")
        with pytest.raises(StoreError, match="widgets tables are version 2; this release knows 1"):
            pg.migrate(conn, [ONE])


def test_a_running_process_refuses_a_schema_that_is_behind_naming_the_command(pg_url: str) -> None:
    where = pg.target(pg_url)
    with pg.Database(where) as db:
        with pytest.raises(pg.SchemaBehind, match=r"version 0, this release needs 1; run: gateway db migrate"):
            pg.check_schema(db, ONE)
        with pg.connect(where) as conn:
            pg.migrate(conn, [ONE])
        pg.check_schema(db, ONE)  # accepted once migrated
        with pytest.raises(pg.SchemaBehind, match="version 1, this release needs 2"):
            pg.check_schema(db, TWO)


def test_a_transaction_rolls_back_on_error_and_errors_become_store_errors(pg_url: str) -> None:
    with pg.Database(pg.target(pg_url)) as db:
        with db.connection() as conn:
            pg.migrate(conn, [ONE])
        with pytest.raises(StoreError, match="duplicate key"), db.transaction() as conn:
            conn.execute("INSERT INTO widgets (id) VALUES (1)")
            conn.execute("INSERT INTO widgets (id) VALUES (1)")
        with db.connection() as conn:
            row = conn.execute("SELECT count(*) FROM widgets").fetchone()
        assert row == (0,)


def test_an_unreachable_server_is_database_unavailable_within_the_timeout() -> None:
    where = pg.target("postgresql://gw@127.0.0.1:1/gateway")
    with pg.Database(where, timeout=1.0) as db:
        started = time.monotonic()
        with pytest.raises(pg.DatabaseUnavailable, match="no connection within 1 s"), db.connection():
            pass
        assert time.monotonic() - started < 3


async def test_a_listener_delivers_notifications_and_reconnects_after_a_restart(postgres: PgServer) -> None:
    if postgres.external:
        pytest.fail("this test restarts the server; run it on the tests' own server (unset DATABASE_URL)")
    url = postgres.new_database()
    got: list[tuple[str, str]] = []
    states: list[bool] = []
    listener = pg.Listener(
        pg.target(url), ("test_channel",), lambda c, p: got.append((c, p)), states.append, heartbeat=0.5
    )
    listener.start()
    try:
        assert await listener.wait_up(5)
        _notify(url, "hello")
        await _until(lambda: ("test_channel", "hello") in got)
        await asyncio.to_thread(postgres.pg_ctl, "restart", mode="immediate")
        await _until(lambda: False in states and states[-1] is True, timeout=15)
        assert listener.up and listener.down_since is None
        _notify(url, "again")
        await _until(lambda: ("test_channel", "again") in got)
    finally:
        await listener.stop()
    assert states[0] is True


def _notify(url: str, payload: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        pg.notify(conn, "test_channel", payload)


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_a_handler_that_raises_does_not_leave_the_listener_reported_up(pg_url: str) -> None:
    """A bug in a handler must not stop the listening while ``up`` still says it listens (caches would go stale)."""
    got: list[str] = []
    states: list[bool] = []

    def handler(_channel: str, payload: str) -> None:
        if payload == "boom":
            raise RuntimeError("handler bug")
        got.append(payload)

    listener = pg.Listener(pg.target(pg_url), ("test_channel",), handler, states.append, heartbeat=0.5)
    listener.start()
    try:
        assert await listener.wait_up(5)
        _notify(pg_url, "boom")
        await _until(lambda: False in states and states[-1] is True)  # reported down, then listening again
        _notify(pg_url, "after")
        await _until(lambda: "after" in got)
    finally:
        await listener.stop()

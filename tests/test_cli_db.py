"""``gateway db migrate/status/import`` and the start-up schema checks, on a real PostgreSQL server.

The schemas are this release's own (:func:`gateway.storage.schemas.all_schemas`),
and the single-host files are written by the SQLite stores' own code. Every
refusal has its accept twin, and no output, log line or error may show the
database password.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from gateway import cli
from gateway.access.sessions import SessionStore
from gateway.access.users import UserStore
from gateway.audit.events import AuditEvent, EventKind
from gateway.audit.signing import load_or_create_signing_key
from gateway.audit.store import AuditStore
from gateway.ca.authority import CertificateAuthority
from gateway.certs.files import ThrowawayPki
from gateway.config import load_config
from gateway.storage import transfer
from gateway.storage.backends import Backend
from tests.harness import free_port, write_config
from tests.pgserver import PgServer

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
SECRET = "Pw-n0t-in-any-output-7c1f"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def pg_config(directory: Path, url: str, **database: Any) -> Path:
    path = directory / "pg.yaml"
    path.write_text(yaml.safe_dump({"database": {"url": url, **database}}), encoding="utf-8")
    return path


def with_password(url: str, password: str = SECRET) -> str:
    """``url`` with a user and password (the test server trusts any: the password only has to stay hidden)."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{password}@")


# --- migrate and status ------------------------------------------------------------------------


def test_migrate_creates_every_component_then_is_up_to_date(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = pg_config(tmp_path, with_password(pg_url))
    code, out, err = run(capsys, "db", "migrate", "--config", str(config))
    assert code == 0, err
    assert "users: 0 → 1" in out
    assert "audit: 0 → 2" in out
    assert "ca: 0 → 2" in out
    assert "postgres:***@" in out
    code, out, _ = run(capsys, "db", "migrate", "--config", str(config))
    assert code == 0
    assert "audit: up to date (version 2)" in out
    assert SECRET not in out


def test_status_says_behind_and_names_the_command_until_migrated(
    tmp_path: Path, pg_url: str, postgres: PgServer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = pg_config(tmp_path, pg_url)
    code, out, _ = run(capsys, "db", "status", "--config", str(config))
    assert code == 1
    assert f"audit: 0 (this release: 2) behind: run gateway db migrate --config {config}" in out
    run(capsys, "db", "migrate", "--config", str(config))
    code, out, _ = run(capsys, "db", "status", "--config", str(config))
    assert code == 0
    assert "audit: 2 (this release: 2) up to date" in out
    postgres.sql(pg_url, "UPDATE schema_version SET version = 3 WHERE component = 'audit'")
    code, out, _ = run(capsys, "db", "status", "--config", str(config))
    assert code == 1
    assert "audit: 3 (this release: 2) ahead" in out


def test_migrate_without_database_opens_each_sqlite_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "old.yaml"
    config.write_text("users:\n  database: u.db\naudit:\n  database: a.db\n", encoding="utf-8")
    code, out, err = run(capsys, "db", "migrate", "--config", str(config))
    assert code == 0, err
    assert (tmp_path / "u.db").is_file()
    assert (tmp_path / "a.db").is_file()
    assert "users: ready" in out
    assert "audit: ready" in out
    with sqlite3.connect(tmp_path / "u.db") as conn:
        versions = dict(conn.execute("SELECT component, version FROM schema_version"))
    assert versions == {"users": 2, "sessions": 1}


def test_db_commands_have_help(capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("migrate", "status", "import"):
        with pytest.raises(SystemExit) as exited:
            cli.main(["db", action, "--help"])
        assert exited.value.code == 0
        assert "example:" in capsys.readouterr().out


# --- import --------------------------------------------------------------------------------


def single_host(directory: Path) -> Path:
    """A single-host deployment with a row in every table, through the stores' own code."""
    users_db, audit_db, ca_dir = directory / "users.db", directory / "audit.db", directory / "ca"
    with UserStore(users_db) as users:
        users.add_user("LC000001", "$argon2id$fake", ["tdnet"], now=NOW, roles=["auditor"])
        users.add_user("LC000002", "$argon2id$fake", ["clearing"], now=NOW, enabled=False)
    with sqlite3.connect(users_db) as conn:
        conn.execute(
            "INSERT INTO login_failures (kind, key, at) VALUES ('user', 'LC000002', 1.5), ('ip', '10.0.0.9', 2.5)"
        )
        conn.execute("INSERT INTO lockouts (user_id, locked_until) VALUES ('LC000002', 99.0)")
    with SessionStore(users_db) as sessions:
        sessions.create("LC000001", "AB" * 32, ["tdnet"], False, NOW)
    store = AuditStore(audit_db)
    store.append([AuditEvent(EventKind.LOGIN, support_id=f"S{i}", time=NOW) for i in range(5)])
    store.close()
    ca = CertificateAuthority.init(ca_dir, now=NOW)
    with sqlite3.connect(ca.database_path) as conn:
        conn.execute(
            "INSERT INTO certificates (serial, kind, user_id, not_before, not_after, issued_at, fingerprint,"
            " requested_by, status, der) VALUES ('1A2B', 'client', 'LC000001', 1, 2, 1, 'FP', 'admin', 'valid', ?)",
            (b"\x00\x01binary\xff",),
        )
        conn.execute("UPDATE meta SET value = 41 WHERE key = 'crl_number'")
    config = directory / "old.yaml"
    body = {"users": {"database": str(users_db)}, "audit": {"database": str(audit_db)}, "ca": {"dir": str(ca_dir)}}
    config.write_text(yaml.safe_dump(body), encoding="utf-8")
    return config


def counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return {
            table: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # type: ignore[index]
            for table in ("users", "login_failures", "lockouts", "sessions", "events", "certificates", "crls")
        }


def test_import_copies_every_table_and_a_second_run_changes_nothing(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    old = single_host(tmp_path)
    new = pg_config(tmp_path, pg_url)
    assert run(capsys, "db", "migrate", "--config", str(new))[0] == 0
    code, out, err = run(capsys, "db", "import", "--from", str(old), "--config", str(new))
    assert code == 0, err
    assert "users.users: 2 read, 2 new" in out
    assert "audit.events: 5 read, 5 new" in out
    assert "ca.certificates: 1 read, 1 new" in out
    first = counts(pg_url)
    assert first == {
        "users": 2, "login_failures": 2, "lockouts": 1, "sessions": 1, "events": 5, "certificates": 1, "crls": 1
    }  # fmt: skip
    code, out, _ = run(capsys, "db", "import", "--from", str(old), "--config", str(new))
    assert code == 0
    assert "audit.events: 5 read, 0 new" in out
    assert "users.login_failures: 2 read, 0 new" in out
    assert counts(pg_url) == first
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT roles, enabled FROM users WHERE user_id = 'LC000001'").fetchone() == (
            "auditor",
            True,
        )
        assert conn.execute("SELECT der FROM certificates").fetchone() == (b"\x00\x01binary\xff",)
        support_ids = [r[0] for r in conn.execute("SELECT support_id FROM events ORDER BY id")]
        assert support_ids == [f"S{i}" for i in range(5)]  # the SQLite order, new ids
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    assert meta["crl_number"] == 41  # never back to the fresh database's 0: relying parties want it to grow


def test_an_imported_audit_trail_keeps_its_chain_and_new_events_continue_it(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    old = single_host(tmp_path)
    with AuditStore(tmp_path / "audit.db") as store:  # a signed checkpoint comes along too
        store.checkpoint("", load_or_create_signing_key(tmp_path / "audit-signing.key"), NOW)
    new = pg_config(tmp_path, pg_url)
    run(capsys, "db", "migrate", "--config", str(new))
    assert run(capsys, "db", "import", "--from", str(old), "--config", str(new))[0] == 0
    with Backend(load_config(new)) as backend, backend.audit() as store:
        store.append([AuditEvent(EventKind.LOGIN, support_id="AFTER", time=NOW)])  # same instance as imported
        assert store.get("AFTER") is not None  # continued the chain: no seq collision, no lost event
    code, out, err = run(capsys, "audit", "verify", "--config", str(new))
    assert code == 0, out + err
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM audit_marks").fetchone() == (1,)
        assert conn.execute("SELECT seq FROM audit_chain_heads WHERE instance = ''").fetchone() == (6,)


def test_import_never_lowers_the_crl_number(
    tmp_path: Path, pg_url: str, postgres: PgServer, capsys: pytest.CaptureFixture[str]
) -> None:
    old = single_host(tmp_path)
    new = pg_config(tmp_path, pg_url)
    run(capsys, "db", "migrate", "--config", str(new))
    postgres.sql(pg_url, "UPDATE meta SET value = 50 WHERE key = 'crl_number'")
    assert run(capsys, "db", "import", "--from", str(old), "--config", str(new))[0] == 0
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'crl_number'").fetchone() == (50,)


def test_import_refuses_a_schema_that_is_behind_and_copies_nothing(
    tmp_path: Path, pg_url: str, postgres: PgServer, capsys: pytest.CaptureFixture[str]
) -> None:
    old = single_host(tmp_path)
    new = pg_config(tmp_path, pg_url)
    code, _, err = run(capsys, "db", "import", "--from", str(old), "--config", str(new))
    assert code == 2
    assert f"run: gateway db migrate --config {new}" in err
    assert "Traceback" not in err
    run(capsys, "db", "migrate", "--config", str(new))
    postgres.sql(pg_url, "UPDATE schema_version SET version = 1 WHERE component = 'audit'")
    code, _, err = run(capsys, "db", "import", "--from", str(old), "--config", str(new))
    assert code == 2
    assert "audit: the tables are at version 1, this release needs 2" in err
    assert counts(pg_url)["events"] == 0  # checked before anything was copied


def test_import_refuses_configs_the_wrong_way_round(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    old = single_host(tmp_path)
    new = pg_config(tmp_path, pg_url)
    code, _, err = run(capsys, "db", "import", "--from", str(new), "--config", str(old))
    assert code == 2
    assert "--from takes the single-host config" in err


def test_import_shows_progress_on_large_tables(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    old = single_host(tmp_path)
    new = pg_config(tmp_path, pg_url)
    run(capsys, "db", "migrate", "--config", str(new))
    monkeypatch.setattr(transfer, "BATCH", 2)
    code, _, err = run(capsys, "db", "import", "--from", str(old), "--config", str(new))
    assert code == 0
    assert "  events: 2/5" in err.splitlines()
    assert "  events: 5/5" in err.splitlines()


# --- start-up: serve, portal and check-config ------------------------------------------------------


def gateway_config(directory: Path, pki: ThrowawayPki, url: str, **database: Any) -> Path:
    """A complete gateway config whose stores are in PostgreSQL at ``url``."""
    path = write_config(directory, pki, {"tdnet": 1, "j-iriss": 2, "clearing": 3})
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    del data["users"], data["audit"]
    data["database"] = {"url": url, **database}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_check_config_and_serve_refuse_a_schema_behind_then_accept_it_migrated(
    tmp_path: Path, pki: ThrowawayPki, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = gateway_config(tmp_path, pki, with_password(pg_url))
    code, out, err = run(capsys, "check-config", "--config", str(config))
    assert code == 2
    assert f"database: {with_password(pg_url, '***')}" in out  # the target, never the password
    assert f"tables are at version 0, this release needs 1; run: gateway db migrate --config {config}" in err
    code, _, err = run(capsys, "serve", "--config", str(config))
    assert code == 1
    assert f"run: gateway db migrate --config {config}" in err
    assert run(capsys, "db", "migrate", "--config", str(config))[0] == 0
    code, out, err = run(capsys, "check-config", "--config", str(config))
    assert code == 0, err
    assert out.rstrip().endswith(f"{config}: OK")


def test_portal_checks_refuse_a_schema_behind(tmp_path: Path, pki: ThrowawayPki, pg_url: str) -> None:
    from gateway.config import load_config
    from gateway.startup import PORTAL_CHECKS, startup_problems

    config = load_config(gateway_config(tmp_path, pki, pg_url))
    assert any("gateway db migrate --config" in line for line in startup_problems(config, PORTAL_CHECKS))
    cli.main(["db", "migrate", "--config", str(config.path)])
    assert not [line for line in startup_problems(config, PORTAL_CHECKS) if "database" in line]


@pytest.mark.parametrize("where", ["url", "password_file"])
def test_the_password_never_shows_when_the_database_is_unreachable(
    tmp_path: Path,
    pki: ThrowawayPki,
    postgres: PgServer,
    where: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Wrong port: every command fails with one line naming the target, none with the password."""
    url = f"postgresql://gw@127.0.0.1:{free_port()}/gateway"
    extra: dict[str, Any] = {"connect_timeout_seconds": 1}
    if where == "url":
        url = url.replace("gw@", f"gw:{SECRET}@")
    else:
        secret = tmp_path / "db.password"
        secret.write_text(SECRET + "\n", encoding="utf-8")
        extra["password_file"] = str(secret)
    caplog.set_level(logging.DEBUG)
    config = gateway_config(tmp_path, pki, url, **extra)
    old = single_host(tmp_path)
    seen = []
    for argv in (
        ["check-config", "--config", str(config)],
        ["db", "migrate", "--config", str(config)],
        ["db", "status", "--config", str(config)],
        ["db", "import", "--from", str(old), "--config", str(config)],
        ["serve", "--config", str(config)],
    ):
        code, out, err = run(capsys, *argv)
        assert code in (1, 2), argv
        assert "gw" in err and "127.0.0.1" in err, err  # names the target
        assert "Traceback" not in err
        seen.append(out + err)
    assert "cannot connect" in seen[0]
    assert not [text for text in [*seen, caplog.text] if SECRET in text]

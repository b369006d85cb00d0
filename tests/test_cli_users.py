"""`gateway users ...` through the real CLI entry point, on a real SQLite file or PostgreSQL database."""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

import pytest

from gateway.access.passwords import verify_password
from gateway.access.policy import LoginSettings
from gateway.audit.events import AuditEvent, AuditFilter, EventKind
from gateway.cli import main
from gateway.cli import users as cli_users
from gateway.config import Config, load_config
from gateway.storage.backends import Backend
from gateway.storage.interfaces import SessionStoreProtocol, UserStoreProtocol
from tests.stores import Opener

GOOD_PASSWORD = "correct horse battery"


@pytest.fixture
def config(tmp_path: Path, stores: Opener) -> Path:
    """A config on the backend under test: the SQLite file users.db, or the test's PostgreSQL database."""
    path = tmp_path / "gateway.yaml"
    where = f"database: {stores.url}\n" if stores.url else "users:\n  database: users.db\n"
    path.write_text(where + "login:\n  password_min_length: 14\n")
    return path


@pytest.fixture
def audited(monkeypatch: pytest.MonkeyPatch) -> list[AuditEvent]:
    events: list[AuditEvent] = []

    def record(config: Config, event: AuditEvent) -> None:
        events.append(event)

    monkeypatch.setattr(cli_users, "_record", record)
    return events


@pytest.fixture
def store(config: Path, stores: Opener) -> UserStoreProtocol:
    """The users database as a gateway worker sees it, to check what the CLI did."""
    stores.path = config.parent / "users.db"
    return stores.users()


@pytest.fixture
def sessions(config: Path, stores: Opener) -> SessionStoreProtocol:
    stores.path = config.parent / "users.db"
    return stores.sessions()


def users(config: Path, *args: str) -> int:
    return main(["users", *args, "--config", str(config)])


def add_with_password(config: Path, monkeypatch: pytest.MonkeyPatch, user_id: str = "LC000001") -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(GOOD_PASSWORD + "\n"))
    return users(config, "add", user_id, "--systems", "tdnet,clearing", "--password-stdin")


def test_add_with_password_stdin(
    config: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    audited: list[AuditEvent],
    store: UserStoreProtocol,
) -> None:
    assert add_with_password(config, monkeypatch) == 0
    out, err = capsys.readouterr()
    assert out == ""  # nothing to print: the admin chose the password
    assert GOOD_PASSWORD not in out + err
    user = store.get_user("LC000001")
    assert user is not None
    assert user.systems == {"tdnet", "clearing"}
    assert not user.must_change_password
    assert verify_password(user.password_hash, GOOD_PASSWORD)
    assert len(audited) == 1
    event = audited[0]
    assert event.event is EventKind.ADMIN_ACTION
    assert event.actor.startswith("cli:")
    assert event.user_id == "LC000001"
    assert event.detail == "users add systems=clearing,tdnet"


def test_add_without_password_prints_a_temporary_one(
    config: Path, capsys: pytest.CaptureFixture[str], audited: list[AuditEvent], store: UserStoreProtocol
) -> None:
    assert users(config, "add", "LC000002", "--systems", "j-iriss") == 0
    out, err = capsys.readouterr()
    temporary = out.strip()
    assert len(temporary) >= 16
    assert "must be changed" in err
    user = store.get_user("LC000002")
    assert user is not None and user.must_change_password
    assert verify_password(user.password_hash, temporary)
    assert all(temporary not in e.detail for e in audited)


def test_add_refusals(
    config: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    audited: list[AuditEvent],
) -> None:
    assert users(config, "add", "LC 1", "--systems", "tdnet") == 2
    assert "invalid user ID" in capsys.readouterr().err
    assert users(config, "add", "LC000001", "--systems", "tdnet,payroll") == 2
    assert "unknown system payroll" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert users(config, "add", "LC000001", "--systems", "tdnet", "--password-stdin") == 2
    err = capsys.readouterr().err
    assert "at least 14 characters" in err
    assert "short" not in err  # the refused password is not echoed
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert users(config, "add", "LC000001", "--systems", "tdnet", "--password-stdin") == 2
    assert "no password on stdin" in capsys.readouterr().err
    assert add_with_password(config, monkeypatch) == 0
    assert add_with_password(config, monkeypatch) == 2
    assert "already exists" in capsys.readouterr().err
    assert len(audited) == 1  # refused commands change nothing and record nothing


def test_list_table_and_json(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], store: UserStoreProtocol
) -> None:
    add_with_password(config, monkeypatch, "LC000002")
    users(config, "add", "LC000001", "--systems", "tdnet")
    store.set_enabled("LC000002", False, now=dt.datetime.now(dt.UTC))
    capsys.readouterr()
    assert users(config, "list") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["USER_ID", "SYSTEMS", "ROLES", "STATUS", "CREATED"]
    assert table[1].startswith("LC000001") and "temporary-password" in table[1]
    assert table[2].startswith("LC000002") and "disabled" in table[2]
    assert users(config, "list", "--format", "json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["user_id"] for r in rows] == ["LC000001", "LC000002"]
    assert rows[1]["systems"] == ["clearing", "tdnet"]
    assert rows[1]["enabled"] is False
    assert "password_hash" not in rows[0]


def test_list_empty_store(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert users(config, "list", "--format", "json") == 0
    assert json.loads(capsys.readouterr().out) == []


def test_disable_ends_sessions_and_enable_restores(
    config: Path,
    monkeypatch: pytest.MonkeyPatch,
    audited: list[AuditEvent],
    store: UserStoreProtocol,
    sessions: SessionStoreProtocol,
) -> None:
    add_with_password(config, monkeypatch)
    session_id, _ = sessions.create("LC000001", "ab" * 32, ["tdnet"], False, dt.datetime.now(dt.UTC))
    assert users(config, "disable", "LC000001") == 0
    user = store.get_user("LC000001")
    assert user is not None and not user.enabled
    assert sessions.get(session_id) is None
    assert users(config, "enable", "LC000001") == 0
    user = store.get_user("LC000001")
    assert user is not None and user.enabled
    assert [e.detail for e in audited[1:]] == ["users disable", "users enable"]


def test_enable_unknown_user_fails(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert users(config, "enable", "ghost") == 2
    assert "no such user: ghost" in capsys.readouterr().err


def test_set_systems_updates_user_and_open_sessions(
    config: Path,
    monkeypatch: pytest.MonkeyPatch,
    audited: list[AuditEvent],
    store: UserStoreProtocol,
    sessions: SessionStoreProtocol,
) -> None:
    add_with_password(config, monkeypatch)
    session_id, _ = sessions.create("LC000001", "ab" * 32, ["tdnet", "clearing"], False, dt.datetime.now(dt.UTC))
    assert users(config, "set-systems", "LC000001", "--systems", "j-iriss, clearing") == 0
    user = store.get_user("LC000001")
    assert user is not None and user.systems == {"j-iriss", "clearing"}
    record = sessions.get(session_id)
    assert record is not None and record.systems == {"j-iriss", "clearing"}
    assert audited[-1].detail == "users set-systems systems=clearing,j-iriss"
    assert users(config, "set-systems", "LC000001", "--systems", ",") == 2


def test_reset_password_sets_temporary_unlocks_and_ends_sessions(
    config: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    audited: list[AuditEvent],
    store: UserStoreProtocol,
    sessions: SessionStoreProtocol,
) -> None:
    add_with_password(config, monkeypatch)
    now = dt.datetime.now(dt.UTC)
    for _ in range(5):
        store.record_failure("LC000001", "192.0.2.1", now, LoginSettings())
    assert store.locked_until("LC000001", now) is not None
    session_id, _ = sessions.create("LC000001", "ab" * 32, ["tdnet"], False, now)
    capsys.readouterr()
    assert users(config, "reset-password", "LC000001") == 0
    temporary = capsys.readouterr().out.strip()
    user = store.get_user("LC000001")
    assert user is not None and user.must_change_password
    assert verify_password(user.password_hash, temporary)
    assert not verify_password(user.password_hash, GOOD_PASSWORD)
    assert store.locked_until("LC000001", now) is None
    assert sessions.get(session_id) is None
    assert audited[-1].detail == "users reset-password sessions_ended=1"
    assert temporary not in audited[-1].detail
    assert users(config, "reset-password", "ghost") == 2


def test_unlock(
    config: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    audited: list[AuditEvent],
    store: UserStoreProtocol,
) -> None:
    add_with_password(config, monkeypatch)
    now = dt.datetime.now(dt.UTC)
    for _ in range(5):
        store.record_failure("LC000001", "192.0.2.1", now, LoginSettings())
    capsys.readouterr()
    assert users(config, "unlock", "LC000001") == 0
    assert "LC000001 unlocked" in capsys.readouterr().err
    assert store.locked_until("LC000001", now) is None
    assert audited[-1].event is EventKind.ACCOUNT_UNLOCKED
    assert users(config, "unlock", "LC000001") == 0
    assert "was not locked" in capsys.readouterr().err


def test_default_database_is_next_to_the_config(tmp_path: Path) -> None:
    path = tmp_path / "minimal.yaml"
    path.write_text("log_level: info\n")
    assert main(["users", "add", "LC000001", "--systems", "tdnet", "--config", str(path)]) == 0
    assert (tmp_path / "gateway.db").is_file()


def test_admin_actions_reach_the_audit_store(tmp_path: Path, config: Path) -> None:
    # No monkeypatch here: the real hook writes to audit.db next to the config.
    assert users(config, "add", "LC000009", "--systems", "tdnet") == 0
    assert users(config, "unlock", "LC000009") == 0
    with Backend(load_config(config)) as backend, backend.audit() as audit:  # audit.db, or the database
        events = audit.query(AuditFilter(user_id="LC000009"))
    assert [e.event for e in events] == [EventKind.ACCOUNT_UNLOCKED, EventKind.ADMIN_ACTION]
    assert events[1].detail == "users add systems=tdnet"
    assert all(e.actor.startswith("cli:") for e in events)


def test_bad_config_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert users(tmp_path / "missing.yaml", "list") == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("add", "list", "disable", "enable", "set-systems", "reset-password", "unlock"):
        with pytest.raises(SystemExit) as info:
            main(["users", command, "--help"])
        assert info.value.code == 0
        assert "--config" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["users", "add", "--help"])
    assert "temporary password" in capsys.readouterr().out


def test_roles_are_set_at_add_and_replaced_by_set_roles(
    config: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    store: UserStoreProtocol,
    audited: list[AuditEvent],
) -> None:
    assert users(config, "add", "SEC00001", "--systems", "tdnet", "--roles", "auditor") == 0
    assert users(config, "add", "LC000001", "--systems", "tdnet") == 0
    user = store.get_user("SEC00001")
    assert user is not None and user.roles == frozenset({"auditor"}) and user.systems == frozenset({"tdnet"})
    plain = store.get_user("LC000001")
    assert plain is not None and plain.roles == frozenset()
    assert users(config, "set-roles", "LC000001", "--roles", "auditor") == 0
    assert users(config, "set-roles", "SEC00001", "--roles", "") == 0
    assert store.get_user("LC000001").roles == frozenset({"auditor"})  # type: ignore[union-attr]
    assert store.get_user("SEC00001").roles == frozenset()  # type: ignore[union-attr]
    assert [e.detail for e in audited][-2:] == ["users set-roles roles=auditor", "users set-roles roles="]
    capsys.readouterr()
    assert users(config, "list", "--format", "json") == 0
    rows = {r["user_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["LC000001"]["roles"] == ["auditor"] and rows["SEC00001"]["roles"] == []


def test_unknown_role_and_unknown_user_are_refused(
    config: Path, capsys: pytest.CaptureFixture[str], store: UserStoreProtocol, audited: list[AuditEvent]
) -> None:
    assert users(config, "add", "LC000001", "--systems", "tdnet", "--roles", "admin") == 2
    assert "unknown role 'admin'" in capsys.readouterr().err
    assert store.get_user("LC000001") is None
    assert users(config, "set-roles", "LC000009", "--roles", "auditor") == 2
    assert "no such user" in capsys.readouterr().err
    assert audited == []

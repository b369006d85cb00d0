"""The user store (SQLite and PostgreSQL): accounts, failures, locks; two stores on one database act as two workers."""

from __future__ import annotations

import datetime as dt
import sqlite3
import stat
import threading
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from gateway.access.passwords import dummy_verify, hash_password, verify_password
from gateway.access.policy import LoginAttempt, LoginSettings, decide_login
from gateway.access.users import (
    InvalidUserIdError,
    LoginState,
    UserError,
    UserExistsError,
    UserNotFoundError,
    UserStore,
    validate_user_id,
)
from gateway.errors import GatewayError, StoreError
from gateway.storage.interfaces import UserStoreProtocol
from gateway.verdict import Reason, Verdict
from tests.stores import Opener

NOW = dt.datetime(2025, 1, 15, 9, 0, tzinfo=dt.UTC)
SETTINGS = LoginSettings(
    max_failures=5,
    failure_window=dt.timedelta(minutes=15),
    lockout=dt.timedelta(minutes=30),
    ip_max_failures=10,
)


@pytest.fixture(scope="module")
def pw_hash() -> str:
    return hash_password("correct horse battery")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


@pytest.fixture
def opened(stores: Opener) -> Callable[[], UserStoreProtocol]:
    """Open stores on the test's file or database (each one stands for a worker); closed afterwards."""
    return stores.users


@pytest.fixture
def store(opened: Callable[[], UserStoreProtocol]) -> UserStoreProtocol:
    return opened()


def test_add_and_get(store: UserStoreProtocol, pw_hash: str) -> None:
    added = store.add_user("LC000001", pw_hash, ["tdnet", "clearing"], now=NOW)
    got = store.get_user("LC000001")
    assert got == added
    assert got is not None
    assert got.systems == frozenset({"tdnet", "clearing"})
    assert got.enabled and not got.must_change_password
    assert got.created_at == NOW
    assert pw_hash not in repr(got)


def test_get_is_exact(store: UserStoreProtocol, pw_hash: str) -> None:
    store.add_user("LC000001", pw_hash, ["tdnet"], now=NOW)
    assert store.get_user("lc000001") is None
    assert store.get_user("LC000001 ") is None
    assert store.get_user("nobody") is None


def test_database_file_is_private(db: Path) -> None:
    UserStore(db).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_duplicate_user_refused(store: UserStoreProtocol, pw_hash: str) -> None:
    store.add_user("LC000001", pw_hash, ["tdnet"], now=NOW)
    with pytest.raises(UserExistsError, match="already exists"):
        store.add_user("LC000001", pw_hash, ["clearing"], now=NOW)


@pytest.mark.parametrize("user_id", ["", "a" * 65, "LC 01", "LC\n01", "LC000001\n", "ユーザ", "a/b", "a:b", "a;b"])
def test_invalid_user_ids_refused(store: UserStoreProtocol, pw_hash: str, user_id: str) -> None:
    with pytest.raises(InvalidUserIdError, match="invalid user ID"):
        store.add_user(user_id, pw_hash, ["tdnet"], now=NOW)
    assert store.list_users() == []


@pytest.mark.parametrize("user_id", ["LC000001", "a", "a" * 64, "first.last@example-1_x"])
def test_valid_user_ids(user_id: str) -> None:
    assert validate_user_id(user_id) == user_id


def test_user_errors_are_gateway_errors() -> None:
    assert issubclass(UserError, GatewayError)


def test_refuses_plain_password_and_empty_systems(store: UserStoreProtocol, pw_hash: str) -> None:
    with pytest.raises(UserError, match="not an argon2id hash") as info:
        store.add_user("LC000001", "secret-plain-password", ["tdnet"], now=NOW)
    assert "secret-plain-password" not in str(info.value)
    with pytest.raises(UserError, match="at least one system"):
        store.add_user("LC000001", pw_hash, [], now=NOW)
    with pytest.raises(UserError, match="invalid system"):
        store.add_user("LC000001", pw_hash, ["TD NET"], now=NOW)


def test_list_and_updates(store: UserStoreProtocol, pw_hash: str) -> None:
    store.add_user("LC000002", pw_hash, ["tdnet"], now=NOW)
    store.add_user("LC000001", pw_hash, ["tdnet"], now=NOW, must_change_password=True)
    assert [u.user_id for u in store.list_users()] == ["LC000001", "LC000002"]
    store.set_enabled("LC000002", False, now=NOW)
    store.set_systems("LC000002", ["j-iriss", "clearing"], now=NOW)
    user = store.get_user("LC000002")
    assert user is not None
    assert not user.enabled
    assert user.systems == {"j-iriss", "clearing"}
    new_hash = hash_password("another long password")
    store.set_password("LC000001", new_hash, temporary=False, now=NOW)
    first = store.get_user("LC000001")
    assert first is not None
    assert first.password_hash == new_hash and not first.must_change_password
    store.set_password("LC000001", pw_hash, temporary=True, now=NOW)
    again = store.get_user("LC000001")
    assert again is not None and again.must_change_password


@pytest.mark.parametrize("action", ["enable", "systems", "password"])
def test_updates_of_unknown_user_fail(store: UserStoreProtocol, pw_hash: str, action: str) -> None:
    with pytest.raises(UserNotFoundError, match="no such user: ghost"):
        if action == "enable":
            store.set_enabled("ghost", True, now=NOW)
        elif action == "systems":
            store.set_systems("ghost", ["tdnet"], now=NOW)
        else:
            store.set_password("ghost", pw_hash, temporary=True, now=NOW)


def test_two_stores_on_one_file_see_each_others_writes(opened: Callable[[], UserStoreProtocol], pw_hash: str) -> None:
    worker1, worker2 = opened(), opened()
    worker1.add_user("LC000001", pw_hash, ["tdnet"], now=NOW)
    user = worker2.get_user("LC000001")
    assert user is not None and user.enabled
    worker2.set_enabled("LC000001", False, now=NOW)
    user = worker1.get_user("LC000001")
    assert user is not None and not user.enabled


def fail(store: UserStoreProtocol, user_id: str, times: int, at: dt.datetime, ip: str = "192.0.2.1") -> None:
    for _ in range(times):
        store.record_failure(user_id, ip, at, SETTINGS)


@pytest.mark.parametrize("user_id", ["LC000001", "never-created"])
def test_lockout_after_max_failures_and_its_expiry(store: UserStoreProtocol, pw_hash: str, user_id: str) -> None:
    # Known and unknown IDs are locked the same way: a lock reveals nothing.
    store.add_user("LC000001", pw_hash, ["tdnet"], now=NOW)
    fail(store, user_id, SETTINGS.max_failures - 1, NOW)
    assert store.locked_until(user_id, NOW) is None
    assert store.user_failures(user_id, NOW, SETTINGS.failure_window) == 4
    result = store.record_failure(user_id, "192.0.2.1", NOW, SETTINGS)
    until = NOW + SETTINGS.lockout
    assert result.locked_until == until
    assert store.locked_until(user_id, NOW) == until
    assert store.locked_until(user_id, until - dt.timedelta(seconds=1)) == until
    assert store.locked_until(user_id, until) is None
    # After the lock the user has a full set of tries again.
    after = until + dt.timedelta(seconds=1)
    assert store.record_failure(user_id, "192.0.2.1", after, SETTINGS).locked_until is None


def test_failures_outside_the_window_do_not_lock(store: UserStoreProtocol) -> None:
    fail(store, "LC000001", 4, NOW)
    later = NOW + SETTINGS.failure_window + dt.timedelta(seconds=1)
    result = store.record_failure("LC000001", "192.0.2.1", later, SETTINGS)
    assert result.locked_until is None
    assert result.user_failures == 1


def test_locks_are_per_user_id(store: UserStoreProtocol) -> None:
    fail(store, "LC000001", 5, NOW)
    assert store.locked_until("LC000001", NOW) is not None
    assert store.locked_until("LC000002", NOW) is None
    assert store.locked_until("lc000001", NOW) is None


def test_clear_failures_after_success(store: UserStoreProtocol) -> None:
    fail(store, "LC000001", 4, NOW)
    store.clear_failures("LC000001")
    assert store.user_failures("LC000001", NOW, SETTINGS.failure_window) == 0
    assert store.record_failure("LC000001", "192.0.2.1", NOW, SETTINGS).locked_until is None


def test_unlock(store: UserStoreProtocol) -> None:
    fail(store, "LC000001", 5, NOW)
    assert store.unlock("LC000001") is True
    assert store.locked_until("LC000001", NOW) is None
    assert store.unlock("LC000001") is False


def test_ip_failures_counted_across_user_ids(store: UserStoreProtocol) -> None:
    for i in range(3):
        store.record_failure(f"user{i}", "198.51.100.7", NOW, SETTINGS)
    store.record_ip_failure("198.51.100.7", NOW, SETTINGS)
    assert store.ip_failures("198.51.100.7", NOW, SETTINGS.failure_window) == 4
    assert store.ip_failures("198.51.100.8", NOW, SETTINGS.failure_window) == 0
    later = NOW + SETTINGS.failure_window + dt.timedelta(seconds=1)
    assert store.ip_failures("198.51.100.7", later, SETTINGS.failure_window) == 0


def test_lock_is_shared_between_workers(opened: Callable[[], UserStoreProtocol]) -> None:
    worker1, worker2 = opened(), opened()
    for i in range(5):
        (worker1 if i % 2 else worker2).record_failure("LC000001", "192.0.2.1", NOW, SETTINGS)
    assert worker1.locked_until("LC000001", NOW) == NOW + SETTINGS.lockout
    assert worker2.unlock("LC000001")
    assert worker1.locked_until("LC000001", NOW) is None


def test_concurrent_failures_lock_exactly_once(opened: Callable[[], UserStoreProtocol]) -> None:
    # Many threads on two connections: the read-modify-write is atomic, so
    # exactly one failure starts the lock and none is lost.
    stores = [opened(), opened()]
    results = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        r = stores[n % 2].record_failure("LC000001", "192.0.2.1", NOW, SETTINGS)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(SETTINGS.max_failures)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.locked_until is not None for r in results) == 1
    assert stores[0].ip_failures("192.0.2.1", NOW, SETTINGS.failure_window) == 5


def test_purge_drops_old_rows(store: UserStoreProtocol) -> None:
    fail(store, "LC000001", 5, NOW)  # locks and clears the user's rows; 5 ip rows stay
    later = NOW + SETTINGS.lockout + dt.timedelta(seconds=1)
    assert store.purge(later, SETTINGS.failure_window) == 6
    assert store.purge(later, SETTINGS.failure_window) == 0


def test_naive_datetimes_refused(store: UserStoreProtocol, pw_hash: str) -> None:
    with pytest.raises(ValueError, match="naive"):
        store.add_user("LC000001", pw_hash, ["tdnet"], now=dt.datetime(2025, 1, 1))


def test_newer_schema_refused(db: Path) -> None:
    UserStore(db).close()
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("UPDATE schema_version SET version = 99 WHERE component = 'users'")
        conn.commit()
    with pytest.raises(StoreError, match="version 99"):
        UserStore(db)


def test_unopenable_path_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot open database"):
        UserStore(blocker / "gateway.db")


def test_login_state_snapshot(store: UserStoreProtocol, pw_hash: str) -> None:
    store.add_user("LC000001", pw_hash, ["tdnet"], now=NOW)
    fail(store, "LC000001", 5, NOW, ip="203.0.113.9")
    state = store.login_state("LC000001", "203.0.113.9", NOW, SETTINGS.failure_window)
    assert state.user is not None and state.user.user_id == "LC000001"
    assert state.locked_until == NOW + SETTINGS.lockout
    assert state.ip_failures == 5
    later = NOW + SETTINGS.lockout
    empty = store.login_state("ghost", "203.0.113.10", later, SETTINGS.failure_window)
    assert empty == LoginState(None, None, 0)


def edge_login(
    store: UserStoreProtocol, user_id: str, password: str, now: dt.datetime, ip: str = "192.0.2.50"
) -> Reason:
    """What the login handler does around decide_login (the lead's edge, in miniature)."""
    state = store.login_state(user_id, ip, now, SETTINGS.failure_window)
    if state.user is not None and state.user.enabled:
        password_ok = verify_password(state.user.password_hash, password)
    else:
        password_ok = dummy_verify(password)
    attempt = LoginAttempt(
        certificate=Verdict.allow(),
        cert_subject=user_id,
        user_id=user_id,
        csrf_ok=True,
        ip_failures=state.ip_failures,
        locked_until=state.locked_until,
        password_ok=password_ok,
        must_change_password=bool(state.user and state.user.must_change_password),
    )
    outcome = decide_login(attempt, now, SETTINGS)
    if outcome.counts_for_user:
        store.record_failure(user_id, ip, now, SETTINGS)
    elif outcome.counts_for_ip:
        store.record_ip_failure(ip, now, SETTINGS)
    elif outcome.verdict.allowed:
        store.clear_failures(user_id)
    return outcome.verdict.reason


def test_unknown_user_and_wrong_password_give_the_same_answers(
    opened: Callable[[], UserStoreProtocol], pw_hash: str
) -> None:
    store = opened()
    store.add_user("LC000001", pw_hash, ["tdnet"], now=NOW)
    store.add_user("LC000003", pw_hash, ["tdnet"], now=NOW, enabled=False)
    runs = {
        who: [edge_login(store, who, "wrong password!", NOW, ip=f"ip-{who}") for _ in range(7)]
        for who in ("LC000001", "LC000002", "LC000003")  # wrong pw, unknown, disabled
    }
    expected = [Reason.BAD_CREDENTIALS] * 5 + [Reason.ACCOUNT_LOCKED] * 2
    assert runs == {"LC000001": expected, "LC000002": expected, "LC000003": expected}
    # Accept twin: after the lock, the right password gets in.
    after = NOW + SETTINGS.lockout
    assert edge_login(store, "LC000001", "correct horse battery", after) is Reason.OK


def test_rate_limit_per_address_across_user_ids(opened: Callable[[], UserStoreProtocol]) -> None:
    store = opened()
    for i in range(SETTINGS.ip_max_failures):
        assert edge_login(store, f"U{i}", "wrong password!", NOW) is Reason.BAD_CREDENTIALS
    assert edge_login(store, "U99", "wrong password!", NOW) is Reason.RATE_LIMITED
    # Another address is not affected; the limit ends with the window.
    assert edge_login(store, "U99", "x", NOW, ip="192.0.2.51") is Reason.BAD_CREDENTIALS
    later = NOW + SETTINGS.failure_window + dt.timedelta(seconds=1)
    assert edge_login(store, "U99", "x", later) is Reason.BAD_CREDENTIALS


def test_many_processes_opening_a_new_database_at_once_all_succeed(tmp_path: Path) -> None:
    """Workers start together: the first-open WAL switch must not fail with 'database is locked'."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from gateway.access.users import UserStore; from gateway.access.sessions import SessionStore\n"
        "p = Path(sys.argv[1]); UserStore(p).close(); SessionStore(p).close()"
    )
    for round_ in range(3):
        db = tmp_path / f"race-{round_}.db"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(db)], stderr=subprocess.PIPE) for _ in range(8)]
        errors = [p.communicate(timeout=60)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0] * 8, [e for e in errors if e][:1]


def test_a_version_1_users_file_is_upgraded_with_no_roles(tmp_path: Path) -> None:
    """A database made before roles existed gains the column; its users keep working, with no role."""
    import sqlite3

    from gateway.access.users import _SCHEMA

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    old_schema = _SCHEMA.replace(",\n    roles TEXT NOT NULL DEFAULT ''", "")
    assert "roles" not in old_schema
    conn.executescript(old_schema)
    conn.execute("CREATE TABLE schema_version (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES ('users', 1)")
    conn.execute(
        "INSERT INTO users VALUES ('LC000001', ?, 'tdnet', 1, 0, 0, 0)", (hash_password("correct horse battery"),)
    )
    conn.commit()
    conn.close()
    with UserStore(path) as store:
        user = store.get_user("LC000001")
        assert user is not None and user.roles == frozenset() and user.systems == frozenset({"tdnet"})
        store.set_roles("LC000001", ["auditor"], now=dt.datetime.now(dt.UTC))
        assert store.get_user("LC000001").roles == frozenset({"auditor"})  # type: ignore[union-attr]
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM schema_version WHERE component = 'users'").fetchone() == (2,)
    conn.close()


def test_audit_access_needs_an_enabled_auditor() -> None:
    from gateway.access.users import User, decide_audit_access
    from gateway.verdict import Reason

    now = dt.datetime.now(dt.UTC)
    auditor = User("SEC00001", "h", frozenset({"tdnet"}), True, False, now, frozenset({"auditor"}))
    assert decide_audit_access(auditor).allowed
    for user in (
        None,
        User("LC000001", "h", frozenset({"tdnet"}), True, False, now),
        User("SEC00001", "h", frozenset({"tdnet"}), False, False, now, frozenset({"auditor"})),
    ):
        verdict = decide_audit_access(user)
        assert not verdict.allowed and verdict.reason is Reason.NOT_AUTHORIZED

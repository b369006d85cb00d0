"""Server-side sessions, cookie signing and CSRF tokens."""

from __future__ import annotations

import datetime as dt
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from gateway.access.policy import SessionLimits
from gateway.access.sessions import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    TOUCH_INTERVAL,
    SessionCache,
    SessionReader,
    SessionStore,
    check_login_csrf,
    check_session_csrf,
    clear_cookie_header,
    cookie_value,
    create_session_key,
    id_hash,
    load_session_key,
    login_csrf_token,
    new_login_nonce,
    set_cookie_header,
    sign,
    unsign,
)
from gateway.access.users import UserStore
from gateway.errors import ConfigError, StoreError
from gateway.storage.interfaces import SessionStoreProtocol
from tests.stores import Opener

NOW = dt.datetime(2025, 1, 15, 9, 0, tzinfo=dt.UTC)
FP = "AB" * 32
KEY = b"k" * 32
OTHER_KEY = b"o" * 32
LIMITS = SessionLimits(idle=dt.timedelta(minutes=30), absolute=dt.timedelta(hours=10))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


@pytest.fixture
def store(db: Path) -> Iterator[SessionStore]:
    """A SQLite store (for the SQLite cache's tests)."""
    with SessionStore(db) as opened:
        yield opened


@pytest.fixture
def sessions(stores: Opener) -> SessionStoreProtocol:
    """A store of each backend, for the behaviour both must share."""
    return stores.sessions()


def new(store: SessionStoreProtocol, user: str = "LC000001", at: dt.datetime = NOW) -> str:
    session_id, _ = store.create(user, FP, ["tdnet", "clearing"], False, at)
    return session_id


def test_create_and_get(sessions: SessionStoreProtocol) -> None:
    session_id, csrf = sessions.create("LC000001", FP, ["tdnet", "clearing"], True, NOW)
    record = sessions.get(session_id)
    assert record is not None
    assert record.user_id == "LC000001"
    assert record.cert_fingerprint == FP.lower()
    assert record.systems == {"tdnet", "clearing"}
    assert record.must_change_password
    assert record.csrf_token == csrf
    assert record.created_at == record.last_seen == NOW
    assert session_id not in repr(record) and csrf not in repr(record)


def test_ids_are_random_and_not_stored_in_clear(db: Path, store: SessionStore) -> None:
    ids = {new(store) for _ in range(20)}
    assert len(ids) == 20
    with closing(sqlite3.connect(db)) as conn:
        dump = "\n".join(conn.iterdump())
    assert not any(i in dump for i in ids)


@pytest.mark.parametrize("bad", ["", "nope", "x" * 500, "a.b", "' OR 1=1 --" * 3])
def test_get_unknown_or_malformed(sessions: SessionStoreProtocol, bad: str) -> None:
    new(sessions)
    assert sessions.get(bad) is None


def test_logout_in_one_worker_ends_the_session_in_another(stores: Opener) -> None:
    worker1, worker2 = stores.sessions(), stores.sessions()
    session_id = new(worker1)
    assert worker2.get(session_id) is not None
    assert worker2.delete(session_id) is True
    assert worker1.get(session_id) is None
    assert worker1.delete(session_id) is False


def test_delete_for_user_only_hits_that_user(sessions: SessionStoreProtocol) -> None:
    mine = [new(sessions), new(sessions)]
    theirs = new(sessions, "LC000002")
    assert sessions.delete_for_user("LC000001") == 2
    assert all(sessions.get(s) is None for s in mine)
    assert sessions.get(theirs) is not None


def test_set_systems_for_user(sessions: SessionStoreProtocol) -> None:
    session_id = new(sessions)
    assert sessions.set_systems_for_user("LC000001", ["j-iriss"]) == 1
    record = sessions.get(session_id)
    assert record is not None and record.systems == {"j-iriss"}


def test_touch_writes_at_most_every_interval(sessions: SessionStoreProtocol) -> None:
    session_id = new(sessions)
    soon = NOW + TOUCH_INTERVAL - dt.timedelta(seconds=1)
    assert sessions.touch(session_id, soon) is False
    assert sessions.touch(session_id, soon, last_seen=NOW) is False
    later = NOW + TOUCH_INTERVAL
    assert sessions.touch(session_id, later, last_seen=NOW) is True
    record = sessions.get(session_id)
    assert record is not None and record.last_seen == later
    assert sessions.touch("unknown-session-id-xxxxxx", later + TOUCH_INTERVAL) is False


def test_purge_expired(sessions: SessionStoreProtocol) -> None:
    idle = new(sessions, at=NOW - LIMITS.idle)
    active_but_old = new(sessions, at=NOW - LIMITS.absolute)
    sessions.touch(active_but_old, NOW)
    alive = new(sessions, at=NOW - dt.timedelta(minutes=1))
    assert sessions.purge_expired(NOW, LIMITS) == 2
    assert sessions.get(idle) is None and sessions.get(active_but_old) is None
    assert sessions.get(alive) is not None


def test_shares_the_users_database(db: Path) -> None:
    with UserStore(db) as users, SessionStore(db) as sessions:
        assert users.get_user("x") is None
        assert sessions.get(new(sessions)) is not None
    with closing(sqlite3.connect(db)) as conn:
        versions = dict(conn.execute("SELECT component, version FROM schema_version"))
    assert versions == {"users": 2, "sessions": 1}  # users 2: roles


# -- the per-worker cache --------------------------------------------------


@pytest.fixture
def reader(db: Path, store: SessionStore) -> Iterator[SessionReader]:
    with SessionReader(db) as opened:
        yield opened


@pytest.fixture
def cache(reader: SessionReader) -> SessionCache:
    return SessionCache(reader, KEY)


def selects(reader: SessionReader) -> list[str]:
    """Record the statements the reader's connection runs from now on (the SELECTs a cache must avoid)."""
    statements: list[str] = []
    reader._conn.set_trace_callback(statements.append)
    return statements


def test_cache_answers_a_repeated_cookie_without_a_select(store: SessionStore, reader: SessionReader) -> None:
    cache = SessionCache(reader, KEY)
    cookie = sign(new(store), KEY)
    first = cache.lookup(cookie)
    assert first is not None and first.user_id == "LC000001"
    statements = selects(reader)
    assert cache.lookup(cookie) is first
    assert cache.lookup(cookie) is first
    assert statements == ["PRAGMA data_version"] * 2


def test_cache_reads_again_after_another_connection_commits(store: SessionStore, reader: SessionReader) -> None:
    cache = SessionCache(reader, KEY)
    session_id = new(store)
    cache.lookup(sign(session_id, KEY))
    statements = selects(reader)
    assert store.touch(session_id, NOW + TOUCH_INTERVAL) is True
    record = cache.lookup(sign(session_id, KEY))
    assert record is not None and record.last_seen == NOW + TOUCH_INTERVAL
    assert [s for s in statements if s.startswith("SELECT")] != []


def test_cache_sees_a_session_deleted_by_another_worker(db: Path, store: SessionStore, cache: SessionCache) -> None:
    ended, kept = new(store), new(store, "LC000002")
    assert cache.lookup(sign(ended, KEY)) is not None
    assert cache.lookup(sign(kept, KEY)) is not None
    with SessionStore(db) as other_worker:
        assert other_worker.delete(ended) is True
    assert cache.lookup(sign(ended, KEY)) is None
    assert cache.lookup(sign(kept, KEY)) is not None


def test_cache_sees_a_delete_by_the_same_process_writer(store: SessionStore, cache: SessionCache) -> None:
    # LoginAccess's writer store and its reader are two connections in one process.
    session_id = new(store)
    assert cache.lookup(sign(session_id, KEY)) is not None
    assert store.delete_for_user("LC000001") == 1
    assert cache.lookup(sign(session_id, KEY)) is None


def test_cache_finds_a_session_created_after_a_cached_miss(db: Path, store: SessionStore, cache: SessionCache) -> None:
    session_id = new(store)
    with closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT * FROM sessions").fetchone()
    store.delete(session_id)
    cookie = sign(session_id, KEY)
    assert cache.lookup(cookie) is None
    assert len(cache) == 1  # the miss is cached
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(f"INSERT INTO sessions VALUES ({', '.join('?' * len(row))})", row)
    record = cache.lookup(cookie)
    assert record is not None and record.user_id == "LC000001"


def test_cache_sees_systems_change_and_touch_from_another_connection(
    db: Path, store: SessionStore, cache: SessionCache
) -> None:
    session_id = new(store)
    cookie = sign(session_id, KEY)
    before = cache.lookup(cookie)
    assert before is not None and before.systems == {"tdnet", "clearing"} and before.last_seen == NOW
    with SessionStore(db) as portal:
        assert portal.set_systems_for_user("LC000001", ["j-iriss"]) == 1
        after = cache.lookup(cookie)
        assert after is not None and after.systems == {"j-iriss"}
        assert portal.touch(session_id, NOW + TOUCH_INTERVAL) is True
    touched = cache.lookup(cookie)
    assert touched is not None and touched.last_seen == NOW + TOUCH_INTERVAL


def test_cache_invalidate_drops_one_session_or_all(store: SessionStore, cache: SessionCache) -> None:
    """What a PostgreSQL reader's notifications call: one id hash drops that entry only, None drops all."""
    one, two = sign(new(store), KEY), sign(new(store, "LC000002"), KEY)
    assert cache.lookup(one) is not None and cache.lookup(two) is not None
    cache.invalidate(id_hash("unknown-session-id-xxxxxx"))
    assert len(cache) == 2
    cache.invalidate(id_hash(one.rpartition(".")[0]))
    assert len(cache) == 1 and cache.lookup(two) is not None
    cache.invalidate(None)
    assert len(cache) == 0


def test_cache_stays_within_its_bound(store: SessionStore, reader: SessionReader) -> None:
    cache = SessionCache(reader, KEY, max_entries=8)
    live = sign(new(store), KEY)
    for n in range(50):
        assert cache.lookup(sign(f"unknown-session-{n:04d}-xxxxx", KEY)) is None
        assert len(cache) <= 8
    assert cache.lookup(live) is not None  # still answered after the cache started over
    assert len(cache) <= 8


def test_cache_keeps_no_forged_cookies(store: SessionStore, cache: SessionCache) -> None:
    session_id = new(store)
    for forged in (sign(session_id, OTHER_KEY), session_id, "x" * 500, f"{session_id}.", "garbage"):
        assert cache.lookup(forged) is None
    assert len(cache) == 0
    assert cache.lookup(sign(session_id, KEY)) is not None  # the twin: the right key finds it
    assert len(cache) == 1


def test_reader_cannot_write(store: SessionStore, reader: SessionReader) -> None:
    session_id = new(store)
    assert reader.get(session_id) is not None
    with pytest.raises(StoreError, match="readonly"):
        reader.delete(session_id)
    with pytest.raises(StoreError, match="readonly"):
        reader.create("LC000001", FP, ["tdnet"], False, NOW)
    assert store.get(session_id) is not None
    assert reader.get(session_id) is not None  # the failed writes released the reader's lock


def test_reader_data_version_moves_only_for_other_connections(store: SessionStore, reader: SessionReader) -> None:
    version = reader.data_version()
    assert reader.get("unknown-session-id-xxxxxx") is None
    assert reader.data_version() == version
    new(store)
    assert reader.data_version() != version


def test_cache_never_keeps_an_answer_older_than_its_version(store: SessionStore, cache: SessionCache) -> None:
    """A commit landing in the middle of a cache fill is seen by the next lookup.

    The version must be read before the SELECT it vouches for: read after,
    it could vouch for a row that a commit in between had already deleted.
    """
    session_id = new(store)
    cookie = sign(session_id, KEY)
    fired: list[str] = []

    def commit_while_filling(statement: str) -> None:
        if statement == "PRAGMA data_version" and not fired:
            fired.append(statement)
            assert store.delete(session_id) is True  # another connection, mid-lookup

    cache.reader._conn.set_trace_callback(commit_while_filling)
    cache.lookup(cookie)  # either answer is fair for a lookup racing the logout
    assert fired
    assert cache.lookup(cookie) is None


# -- cookie signing --------------------------------------------------------


def test_sign_round_trip() -> None:
    session_id = "A" * 43
    value = sign(session_id, KEY)
    assert value.startswith(session_id + ".")
    assert unsign(value, KEY) == session_id


def test_unsign_refuses_tampering_and_other_keys() -> None:
    session_id = "A" * 43
    value = sign(session_id, KEY)
    assert unsign(value, OTHER_KEY) is None
    assert unsign("B" + value[1:], KEY) is None
    assert unsign(value[:-1], KEY) is None
    assert unsign(session_id, KEY) is None
    assert unsign("", KEY) is None
    assert unsign(value + "x" * 300, KEY) is None
    assert unsign("é" * 20 + "." + value.split(".")[1], KEY) is None


def test_session_mac_is_not_a_login_csrf_mac() -> None:
    # Separate HMAC contexts: a value from one use never validates in the other.
    nonce = new_login_nonce()
    token = login_csrf_token(KEY, nonce, NOW)
    assert unsign(f"{nonce}.{token.split('.')[1]}", KEY) is None


def test_cookie_headers() -> None:
    header = set_cookie_header(SESSION_COOKIE, "v")
    assert header.startswith("__Host-gw_session=v;")
    for attr in ("Path=/", "Secure", "HttpOnly", "SameSite=Lax"):
        assert attr in header
    assert "Domain" not in header and "Max-Age" not in header
    assert "Max-Age=0" in clear_cookie_header(LOGIN_CSRF_COOKIE)
    assert LOGIN_CSRF_COOKIE.startswith("__Host-")


# -- CSRF ------------------------------------------------------------------


def test_session_csrf(sessions: SessionStoreProtocol) -> None:
    session_id, csrf = sessions.create("LC000001", FP, ["tdnet"], False, NOW)
    record = sessions.get(session_id)
    assert record is not None
    assert check_session_csrf(record, csrf)
    assert not check_session_csrf(record, csrf[:-1] + "x")
    assert not check_session_csrf(record, "")
    assert not check_session_csrf(record, None)


def test_login_csrf_accepts_a_fresh_token_for_its_nonce() -> None:
    nonce = new_login_nonce()
    token = login_csrf_token(KEY, nonce, NOW)
    max_age = dt.timedelta(hours=1)
    assert check_login_csrf(KEY, token, nonce, NOW + dt.timedelta(minutes=59), max_age)


def test_login_csrf_refusals() -> None:
    nonce = new_login_nonce()
    token = login_csrf_token(KEY, nonce, NOW)
    max_age = dt.timedelta(hours=1)
    assert not check_login_csrf(KEY, token, new_login_nonce(), NOW, max_age)
    assert not check_login_csrf(OTHER_KEY, token, nonce, NOW, max_age)
    assert not check_login_csrf(KEY, token, nonce, NOW + dt.timedelta(hours=1, seconds=1), max_age)
    assert not check_login_csrf(KEY, token, nonce, NOW - dt.timedelta(minutes=5), max_age)
    assert not check_login_csrf(KEY, None, nonce, NOW, max_age)
    assert not check_login_csrf(KEY, token, None, NOW, max_age)
    assert not check_login_csrf(KEY, "garbage", nonce, NOW, max_age)
    assert not check_login_csrf(KEY, "１２.x", nonce, NOW, max_age)
    stamp, mac = token.split(".")
    assert not check_login_csrf(KEY, f"{int(stamp) + 1}.{mac}", nonce, NOW, max_age)


# -- the key file ----------------------------------------------------------


def test_create_and_load_key(tmp_path: Path) -> None:
    path = tmp_path / "session.key"
    create_session_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_session_key(path)
    assert len(key) >= 32
    with pytest.raises(ConfigError, match="already exists"):
        create_session_key(path)
    assert load_session_key(path) == key


def test_short_or_missing_key_refused(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    secret = "s3cr3t-but-short"
    short.write_text(secret + "\n")
    with pytest.raises(ConfigError, match="need at least 32") as info:
        load_session_key(short)
    assert secret not in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_session_key(tmp_path / "missing.key")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("__Host-gw_session=abc.def", "abc.def"),
        ("a=1; __Host-gw_session=abc.def; b=2", "abc.def"),
        ("a=1;__Host-gw_session= abc.def ;b=2", "abc.def"),
        ("__Host-gw_session=first; __Host-gw_session=second", "first"),
        ('__Host-gw_session="quoted"', '"quoted"'),  # returned as sent: unsign refuses it
    ],
)
def test_cookie_value_finds_the_session_cookie(header: str, expected: str) -> None:
    assert cookie_value(header, SESSION_COOKIE) == expected


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "a=1; b=2",
        "x__Host-gw_session=abc",
        "__Host-gw_session_old=abc",
        "__Host-gw_session",
        "__host-gw_session=abc",
    ],
)
def test_cookie_value_ignores_other_cookies(header: str | None) -> None:
    assert cookie_value(header, SESSION_COOKIE) is None

"""The session cache on PostgreSQL: answered from memory, kept current by LISTEN/NOTIFY from any process."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.access.passwords import hash_password
from gateway.access.sessions import TOUCH_INTERVAL, SessionCache, SessionRecord, id_hash, sign
from gateway.storage import postgres
from gateway.storage.pg_sessions import CHANNEL, MAX_NAMED, PgSessionReader, PgSessionStore
from gateway.storage.pg_users import PgUserStore
from tests.stores import Opener

NOW = dt.datetime(2025, 1, 15, 9, 0, tzinfo=dt.UTC)
FP = "AB" * 32
KEY = b"k" * 32

# Another process (another worker or instance) changes sessions through its own PgSessionStore.
_OTHER_PROCESS = """
import datetime as dt, sys
from gateway.storage import postgres
from gateway.storage.pg_sessions import PgSessionStore
url, action, arg = sys.argv[1:4]
with postgres.Database(postgres.target(url), pool_size=1) as db:
    store = PgSessionStore(db)
    if action == "delete":
        print(store.delete(arg))
    elif action == "systems":
        print(store.set_systems_for_user(arg, ["j-iriss"]))
    elif action == "touch":
        print(store.touch(arg, dt.datetime(2025, 1, 15, 9, 0, 30, tzinfo=dt.UTC)))
"""


def other_process(url: str, action: str, arg: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS, url, action, arg], capture_output=True, timeout=60, check=True
    )
    return done.stdout.decode().strip()


@pytest.fixture
async def reader(pg_url: str) -> AsyncIterator[PgSessionReader]:
    opener = Opener("postgres", None, pg_url)  # type: ignore[arg-type]
    reader = opener.reader()
    assert isinstance(reader, PgSessionReader)
    reader.start()
    assert await reader.listener.wait_up(10)
    try:
        yield reader
    finally:
        await reader.stop()
        opener.close()


async def until(check: Callable[[], bool], within: float) -> bool:
    """True as soon as ``check()`` holds, polling the loop (notifications arrive on it)."""
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def gone(cache: SessionCache, cookie: str) -> Callable[[], bool]:
    return lambda: cache.lookup(cookie) is None


async def test_cache_hits_need_no_database(reader: PgSessionReader) -> None:
    store = PgSessionStore(reader.db)
    session_id, _ = store.create("LC000001", FP, ["tdnet"], False, NOW)
    cache = SessionCache(reader, KEY)
    first = cache.lookup(sign(session_id, KEY))
    assert first is not None and first.user_id == "LC000001"
    reader.db.close()  # no pooled connection any more: only memory can answer now
    assert cache.lookup(sign(session_id, KEY)) is first


async def test_a_delete_in_another_process_ends_the_cached_session_within_a_second(
    reader: PgSessionReader, pg_url: str
) -> None:
    store = PgSessionStore(reader.db)
    ended, _ = store.create("LC000001", FP, ["tdnet"], False, NOW)
    kept, _ = store.create("LC000002", FP, ["tdnet"], False, NOW)
    heard: list[str | None] = []
    reader.watch(heard.append)
    cache = SessionCache(reader, KEY)
    assert cache.lookup(sign(ended, KEY)) is not None
    assert cache.lookup(sign(kept, KEY)) is not None
    assert other_process(pg_url, "delete", ended) == "True"
    assert await until(gone(cache, sign(ended, KEY)), 1.0)
    assert heard == [id_hash(ended)]
    assert len(cache) == 2  # only that session was dropped (and re-read as a miss); the other stays cached
    assert cache.lookup(sign(kept, KEY)) is not None


async def test_systems_change_and_touch_from_another_process_are_seen(reader: PgSessionReader, pg_url: str) -> None:
    store = PgSessionStore(reader.db)
    session_id, _ = store.create("LC000001", FP, ["tdnet"], False, NOW)
    cookie = sign(session_id, KEY)
    cache = SessionCache(reader, KEY)

    def systems() -> frozenset[str] | None:
        record = cache.lookup(cookie)
        return None if record is None else record.systems

    assert systems() == {"tdnet"}
    assert other_process(pg_url, "systems", "LC000001") == "1"
    assert await until(lambda: systems() == {"j-iriss"}, 1.0)
    assert other_process(pg_url, "touch", session_id) == "True"

    def seen() -> dt.datetime | None:
        record: SessionRecord | None = cache.lookup(cookie)
        return None if record is None else record.last_seen

    assert await until(lambda: seen() == NOW + TOUCH_INTERVAL, 1.0)


async def test_a_write_hitting_many_sessions_drops_everything(reader: PgSessionReader) -> None:
    store = PgSessionStore(reader.db)
    ids = [store.create("LC000001", FP, ["tdnet"], False, NOW)[0] for _ in range(MAX_NAMED + 1)]
    other, _ = store.create("LC000002", FP, ["tdnet"], False, NOW)
    cache = SessionCache(reader, KEY)
    for session_id in [*ids, other]:
        assert cache.lookup(sign(session_id, KEY)) is not None
    version = reader.data_version()
    assert store.delete_for_user("LC000001") == MAX_NAMED + 1  # announced as "*"
    assert await until(lambda: reader.data_version() != version, 1.0)
    assert cache.lookup(sign(ids[0], KEY)) is None
    assert cache.lookup(sign(other, KEY)) is not None


async def test_a_rolled_back_write_announces_nothing(reader: PgSessionReader) -> None:
    store = PgSessionStore(reader.db)
    session_id, _ = store.create("LC000001", FP, ["tdnet"], False, NOW)
    cache = SessionCache(reader, KEY)
    assert cache.lookup(sign(session_id, KEY)) is not None
    heard: list[str | None] = []
    reader.watch(heard.append)
    version = reader.data_version()
    with pytest.raises(RuntimeError), reader.db.transaction() as conn:
        postgres.notify(conn, CHANNEL, "*")
        raise RuntimeError("rolled back")
    with reader.db.transaction() as conn:
        postgres.notify(conn, CHANNEL, "a-committed-one")  # the twin: a committed notification arrives
    assert await until(lambda: bool(heard), 1.0)
    assert heard == ["a-committed-one"]
    assert reader.data_version() == version  # the "*" was never delivered
    assert cache.lookup(sign(session_id, KEY)) is not None


@pytest.mark.parametrize(
    ("command", "ended"),
    [(("disable",), True), (("reset-password",), True), (("set-systems", "--systems", "j-iriss"), False)],
)
async def test_the_users_cli_reaches_every_instances_cache(
    reader: PgSessionReader, pg_url: str, tmp_path: Path, command: tuple[str, ...], ended: bool
) -> None:
    """`gateway users disable/reset-password/set-systems` in another process: this worker's cache hears it."""
    PgUserStore(reader.db).add_user("LC000001", hash_password("correct horse battery"), ["tdnet"], now=NOW)
    session_id, _ = PgSessionStore(reader.db).create("LC000001", FP, ["tdnet"], False, NOW)
    cookie = sign(session_id, KEY)
    cache = SessionCache(reader, KEY)
    assert cache.lookup(cookie) is not None
    config = tmp_path / "gateway.yaml"
    config.write_text(f"database: {pg_url}\n")
    argv = [sys.executable, "-m", "gateway", "users", command[0], "LC000001", *command[1:], "--config", str(config)]
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()

    def current() -> bool:
        record = cache.lookup(cookie)
        return record is None if ended else (record is not None and record.systems == {"j-iriss"})

    assert await until(current, 1.0)

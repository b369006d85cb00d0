"""A PostgreSQL outage: cached sessions are served for the grace period, then refused; misses fail; recovery.

These tests stop the shared, session-scoped test server (``pg_ctl stop -m
immediate``, a crash) and always start it again before they end.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.access.login import LoginAccess
from gateway.access.sessions import SessionCache, sign
from gateway.certs.files import ThrowawayPki
from gateway.storage.pg_sessions import PgSessionReader, PgSessionStore
from gateway.storage.postgres import DatabaseUnavailable
from tests.harness import Harness
from tests.pgserver import PgServer
from tests.stores import Opener, migrate
from tests.test_login import login
from tests.test_pg_gateway import add_users, start_on

NOW = dt.datetime(2025, 1, 15, 9, 0, tzinfo=dt.UTC)
FP = "AB" * 32
KEY = b"k" * 32
GRACE = 2.0


@pytest.fixture
def crashable(postgres: PgServer) -> Iterator[PgServer]:
    """The test server, started again (if a test left it down) before anything else uses it."""
    if postgres.external:
        pytest.fail("outage tests stop the server: they need the throwaway one, not DATABASE_URL")
    try:
        yield postgres
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # already running: pg_ctl refuses, fine
            postgres.pg_ctl("start")


def crash(server: PgServer) -> None:
    """Stop the server as a crash would; what was committed before stays (the test server runs
    with synchronous_commit off, so the WAL is written out first)."""
    server.sql(server.admin_url, "CHECKPOINT")
    server.pg_ctl("stop", mode="immediate")


async def wait_for(check: object, within: float) -> bool:
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_cached_sessions_are_served_for_the_grace_then_refused_and_recover(
    crashable: PgServer, pg_url: str
) -> None:
    opener = Opener("postgres", None, pg_url)  # type: ignore[arg-type]
    reader = opener.reader(grace=GRACE)
    assert isinstance(reader, PgSessionReader)
    store = PgSessionStore(opener.pool(timeout=1.0))
    cached, _ = store.create("LC000001", FP, ["tdnet"], False, NOW)
    uncached, _ = store.create("LC000002", FP, ["tdnet"], False, NOW)
    reader.start()
    try:
        assert await reader.listener.wait_up(10)
        cache = SessionCache(reader, KEY)
        assert cache.lookup(sign(cached, KEY)) is not None
        crash(crashable)
        assert await wait_for(lambda: not reader.listener.up, 10)
        # Within the grace: what is cached is served, a miss fails at once (the database is not tried).
        assert cache.lookup(sign(cached, KEY)) is not None
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match="not listening"):
            cache.lookup(sign(uncached, KEY))
        assert time.monotonic() - started < 0.5
        assert reader.down_for is not None
        # Past the grace: the cached session is refused too.
        await asyncio.sleep(GRACE + 0.2)
        with pytest.raises(DatabaseUnavailable, match="grace"):
            cache.lookup(sign(cached, KEY))
        # The server is back: the listener reconnects, the cache starts afresh, both sessions are found.
        crashable.pg_ctl("start")
        assert await reader.listener.wait_up(15)
        assert reader.down_for is None
        assert cache.lookup(sign(cached, KEY)) is not None
        assert cache.lookup(sign(uncached, KEY)) is not None
    finally:
        await reader.stop()
        opener.close()


async def test_changes_made_while_a_listener_was_down_are_not_missed(crashable: PgServer, pg_url: str) -> None:
    """A reconnect means "anything may have changed": the whole cache is dropped, nothing stale survives."""
    opener = Opener("postgres", None, pg_url)  # type: ignore[arg-type]
    reader = opener.reader(grace=30)
    assert isinstance(reader, PgSessionReader)
    store = PgSessionStore(opener.pool(timeout=1.0))
    session_id, _ = store.create("LC000001", FP, ["tdnet"], False, NOW)
    reader.start()
    try:
        assert await reader.listener.wait_up(10)
        cache = SessionCache(reader, KEY)
        assert cache.lookup(sign(session_id, KEY)) is not None
        version = reader.data_version()
        crash(crashable)
        assert await wait_for(lambda: not reader.listener.up, 10)
        crashable.pg_ctl("start")
        # A write the listener cannot have heard: made before it is back (it retries with backoff).
        assert await wait_for(lambda: _delete_quietly(store, session_id), 10)
        assert await reader.listener.wait_up(15)
        assert reader.data_version() != version
        assert cache.lookup(sign(session_id, KEY)) is None
    finally:
        await reader.stop()
        opener.close()


def _delete_quietly(store: PgSessionStore, session_id: str) -> bool:
    try:
        return store.delete(session_id)
    except DatabaseUnavailable:
        return False


async def test_a_gateway_serves_cached_sessions_in_the_grace_and_answers_service_unavailable(
    crashable: PgServer, pg_url: str, tmp_path: Path, pki: ThrowawayPki, caplog: pytest.LogCaptureFixture
) -> None:
    """Over real TLS: the page and JSON with a support ID, the audit event, /healthz, one log line, recovery."""
    migrate(pg_url)
    add_users(pg_url, "LC000001", "LC000002")
    h = await start_on(tmp_path / "gw", pki, pg_url, outage_grace_seconds=GRACE, connect_timeout_seconds=1)
    try:
        async with h.session() as s:
            assert (await login(h, s, next_path="/onre/")).status == 303
            async with s.get(h.url("/onre/"), allow_redirects=False) as r:
                assert r.status == 200
            crash(crashable)
            async with aiohttp.ClientSession() as plain:
                assert await wait_for(lambda: not listener_up(h), 10)
                async with plain.get(h.admin_url("/healthz")) as r:
                    health = await r.json()
                assert r.status == 503 and "listener down" in health["database"]
                # Within the grace: the cached session still reaches its backend.
                async with s.get(h.url("/onre/"), allow_redirects=False) as r:
                    assert r.status == 200
                # A login needs the database: 503 service_unavailable, as JSON and as the page.
                async with h.session("LC000002") as other:
                    async with other.get(h.url("/onre/"), headers={"Accept": "application/json"}) as r:
                        body = await r.json()
                    assert (r.status, body["error"]) == (401, "login_required")  # no cookie: nothing to look up
                    r = await login(h, other, "LC000002")
                    assert r.status == 503
                await asyncio.sleep(GRACE + 0.2)
                async with s.get(h.url("/onre/"), headers={"Accept": "application/json"}) as r:
                    body = await r.json()
                assert (r.status, body["error"]) == (503, "service_unavailable") and body["support_id"]
                async with s.get(h.url("/onre/"), headers={"Accept": "text/html"}) as r:
                    page = await r.text()
                assert (
                    r.status == 503
                    and "ただいまログインを確認できません" in page
                    and "Logins cannot be checked" in page
                )
                refused = [e for e in h.audit.events if e.reason == "service_unavailable"]
                assert len(refused) == 3 and body["support_id"] in {e.support_id for e in refused}
                lines = [m for m in caplog.messages if "refusing logins and session checks" in m]
                assert len(lines) == 1 and "Traceback" not in caplog.text
                # The database is back: the listener reconnects, /healthz is 200, the session works again.
                crashable.pg_ctl("start")
                assert await wait_for(lambda: listener_up(h), 15)
                async with plain.get(h.admin_url("/healthz")) as r:
                    assert r.status == 200
                async with s.get(h.url("/onre/"), allow_redirects=False) as r:
                    assert r.status == 200
    finally:
        await h.close()


def listener_up(h: Harness) -> bool:
    access = h.worker._access
    assert isinstance(access, LoginAccess) and isinstance(access.reader, PgSessionReader)
    return access.reader.listener.up

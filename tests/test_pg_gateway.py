"""Two gateways (two LoginAccess, two pools) on one PostgreSQL database act as two instances."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.access.login import LoginAccess
from gateway.access.passwords import hash_password
from gateway.certs.files import ThrowawayPki
from gateway.storage import postgres
from gateway.storage.pg_users import PgUserStore
from gateway.storage.postgres import SchemaBehind
from tests.harness import Harness, start_harness
from tests.stores import migrate
from tests.test_login import PASSWORD, login


def on_postgres(url: str, **database: Any) -> dict[str, Any]:
    """The harness config's sections for a gateway whose users and sessions are in ``url``."""
    return {"database": {"url": url, **database}, "users": {}, "audit": {}}


def add_users(url: str, *user_ids: str) -> None:
    with postgres.Database(postgres.target(url)) as db:
        for user_id in user_ids:
            PgUserStore(db).add_user(user_id, hash_password(PASSWORD), ["tdnet"], now=dt.datetime.now(dt.UTC))


async def start_on(directory: Path, pki: ThrowawayPki, url: str, **database: Any) -> Harness:
    directory.mkdir()
    return await start_harness(
        directory, pki, login_mode="gateway", access_factory=LoginAccess, extra=on_postgres(url, **database)
    )


@pytest.fixture
async def pair(tmp_path: Path, pki: ThrowawayPki, pg_url: str) -> AsyncIterator[tuple[Harness, Harness]]:
    migrate(pg_url)
    add_users(pg_url, "LC000001", "LC000002")
    first = await start_on(tmp_path / "a", pki, pg_url)
    try:
        second = await start_on(tmp_path / "b", pki, pg_url)
        try:
            yield first, second
        finally:
            await second.close()
    finally:
        await first.close()


async def test_a_session_made_on_one_instance_works_on_the_other_and_logout_ends_it_there(
    pair: tuple[Harness, Harness],
) -> None:
    a, b = pair
    async with a.session() as s:
        r = await login(a, s, next_path="/onre/")
        assert r.status == 303
        cookie = next(v for v in r.headers.getall("Set-Cookie") if v.startswith("__Host-gw_session="))
        with_cookie = {"Cookie": cookie.split(";")[0], "Accept": "application/json"}
        async with s.get(a.url("/_gateway/logout")) as page:
            token = (await page.text()).split('name="csrf" value="')[1].split('"')[0]
    async with b.session() as s:
        async with s.get(b.url("/onre/"), headers=with_cookie, allow_redirects=False) as r:
            assert r.status == 200  # the other instance knows the session
        async with (
            a.session() as s_a,
            s_a.post(a.url("/_gateway/logout"), data={"csrf": token}, headers=with_cookie) as r,
        ):
            assert r.status == 200
        deadline = asyncio.get_running_loop().time() + 1.0
        status = 200
        while status == 200 and asyncio.get_running_loop().time() < deadline:
            async with s.get(b.url("/onre/"), headers=with_cookie, allow_redirects=False) as r:
                status, body = r.status, await r.read()
            await asyncio.sleep(0.02)
        assert status == 401 and b"login_required" in body


async def test_wrong_passwords_spread_over_two_instances_lock_after_exactly_max_failures(
    pair: tuple[Harness, Harness],
) -> None:
    a, b = pair
    limit = a.config.login.max_failures
    seen = []
    for n in range(limit + 1):
        h = (a, b)[n % 2]
        async with h.session() as s:
            await login(h, s, password="wrong password!")
        seen.append(h.audit.events[-1].reason)
    assert seen == ["bad_credentials"] * limit + ["account_locked"]
    async with b.session("LC000002") as s:  # the twin: another user is not affected
        assert (await login(b, s, "LC000002")).status == 303


async def test_a_gateway_refuses_to_start_on_tables_that_are_not_migrated(
    tmp_path: Path, pki: ThrowawayPki, pg_url: str
) -> None:
    with pytest.raises(SchemaBehind, match="gateway db migrate"):
        await start_on(tmp_path / "a", pki, pg_url)
    migrate(pg_url)  # the twin: migrated, it starts
    h = await start_on(tmp_path / "b", pki, pg_url)
    await h.close()

"""The shared password-login edge: rehash on login, one answer for every wrong password."""

from __future__ import annotations

import asyncio
import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from gateway.access.accounts import Accounts
from gateway.access.passwords import needs_rehash, verify_password
from gateway.access.policy import LoginSettings
from gateway.access.users import UserStore
from gateway.verdict import Verdict

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


async def inline(func: Any, *args: Any) -> Any:
    return func(*args)


async def login(accounts: Accounts, user_id: str, password: str) -> str:
    result = await accounts.login(
        user_id=user_id,
        password=password,
        ip="192.0.2.1",
        now=NOW,
        csrf_ok=True,
        certificate=Verdict.allow(),
        cert_subject=user_id,
    )
    return str(result.outcome.verdict.reason)


async def test_weak_hash_is_upgraded_after_a_successful_login(tmp_path: Path) -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash("old parameters 1")
    with UserStore(tmp_path / "u.db") as store:
        store.add_user("LC000001", weak, ["tdnet"], now=NOW)
        accounts = Accounts(store, LoginSettings(), inline)
        assert needs_rehash(weak)
        assert await login(accounts, "LC000001", "wrong") == "bad_credentials"
        assert store.get_user("LC000001").password_hash == weak  # type: ignore[union-attr]
        assert await login(accounts, "LC000001", "old parameters 1") == "ok"
        stored = store.get_user("LC000001").password_hash  # type: ignore[union-attr]
    assert stored != weak and not needs_rehash(stored) and verify_password(stored, "old parameters 1")


async def test_parallel_guesses_for_one_user_each_see_the_lock(tmp_path: Path) -> None:
    from gateway.access.passwords import hash_password

    pool = ThreadPoolExecutor(max_workers=8)  # real threads: unserialised guesses would overlap

    async def threaded(func: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, func, *args)

    with UserStore(tmp_path / "u.db") as store:
        store.add_user("LC000001", hash_password("the right one 1"), ["tdnet"], now=NOW)
        accounts = Accounts(store, LoginSettings(max_failures=3), threaded)
        reasons = await asyncio.gather(*(login(accounts, "LC000001", f"guess {i}") for i in range(8)))
    pool.shutdown()
    assert reasons.count("bad_credentials") == 3
    assert reasons.count("account_locked") == 5


async def test_a_right_password_locked_out_mid_check_gets_the_wrong_password_answer(tmp_path: Path) -> None:
    """Another process locks the ID while this (correct) password is checked: the answer must not tell."""
    from gateway.access.passwords import hash_password

    with UserStore(tmp_path / "u.db") as store, UserStore(tmp_path / "u.db") as elsewhere:
        store.add_user("LC000001", hash_password("right password 1"), ["tdnet"], now=NOW)
        settings = LoginSettings()

        async def locking_elsewhere(func: Any, *args: Any) -> Any:
            if func is verify_password:  # the other process's failures reach the limit meanwhile
                for _ in range(settings.max_failures):
                    elsewhere.record_failure("LC000001", "198.51.100.7", NOW, settings)
            return func(*args)

        accounts = Accounts(store, settings, locking_elsewhere)
        result = await accounts.login(
            user_id="LC000001",
            password="right password 1",
            ip="192.0.2.1",
            now=NOW,
            csrf_ok=True,
            certificate=Verdict.allow(),
            cert_subject="LC000001",
        )
    assert str(result.outcome.verdict.reason) == "bad_credentials"  # what a wrong guess gets here
    assert "correct password" in result.outcome.verdict.detail  # the security team is told

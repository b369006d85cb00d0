"""Password login and password change, shared by the gateway's login and the portal.

Both front doors check a user ID and password against the same store with
the same lockout, rate limit and policy; they differ only in what stands for
the certificate (the gateway has one, the portal asks for none) and in what
they do with the result. This module is that common edge: it gathers the
facts, lets :func:`gateway.loginpolicy.decide_login` decide, and applies the
outcome to the store. Blocking work (argon2, SQLite writes) goes to the
caller's executor.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from gateway.loginpolicy import LoginAttempt, LoginOutcome, LoginSettings, decide_login
from gateway.passwords import (
    check_password_policy,
    dummy_verify,
    hash_password,
    needs_rehash,
    policy_message,
    verify_password,
)
from gateway.users import User, UserStore
from gateway.verdict import Reason, Verdict

T = TypeVar("T")
Runner = Callable[..., Awaitable[Any]]
LOGIN_FORM_MAX_AGE = dt.timedelta(hours=1)
MAX_FORM_BYTES = 16 * 1024
WRONG_CURRENT_PASSWORD = ("現在のパスワードが正しくありません。", "The current password is wrong.")


def see_other(location: str, headers: dict[str, str] | None = None) -> web.Response:
    """A 303 redirect returned (not raised), so cookies can be added to it."""
    return web.Response(status=303, headers={**(headers or {}), "Location": location})


def form_text(value: object) -> str:
    """A form field as text; a file upload or a missing field is the empty string."""
    return value if isinstance(value, str) else ""


@dataclass(frozen=True, slots=True)
class LoginResult:
    """The decision, the account it was about, and whether this attempt started a lock."""

    outcome: LoginOutcome
    user: User | None
    locked_until: dt.datetime | None = None


class Accounts:
    """The password half of a login, against one user store."""

    def __init__(self, users: UserStore, settings: LoginSettings, run: Runner) -> None:
        self.users = users
        self.settings = settings
        self._run = run
        # Attempts for one user ID run one at a time in a process, so parallel
        # guesses each see the failures (and the lock) of the ones before.
        self._locks: dict[str, asyncio.Lock] = {}

    async def login(
        self,
        *,
        user_id: str,
        password: str,
        ip: str,
        now: dt.datetime,
        csrf_ok: bool,
        certificate: Verdict,
        cert_subject: str | None,
    ) -> LoginResult:
        """Check one login and record its outcome (failures, lock, success)."""
        lock = self._locks.setdefault(user_id, asyncio.Lock())
        async with lock:
            result = await self._login(user_id, password, ip, now, csrf_ok, certificate, cert_subject)
        if not lock.locked():
            self._locks.pop(user_id, None)
        return result

    async def _login(
        self,
        user_id: str,
        password: str,
        ip: str,
        now: dt.datetime,
        csrf_ok: bool,
        certificate: Verdict,
        cert_subject: str | None,
    ) -> LoginResult:
        state = await self._run(self.users.login_state, user_id, ip, now, self.settings.failure_window)
        user = state.user
        if user is not None and user.enabled and csrf_ok:
            password_ok = await self._run(verify_password, user.password_hash, password)
        else:
            password_ok = await self._run(dummy_verify, password)  # same time for unknown users
        attempt = LoginAttempt(
            certificate=certificate,
            cert_subject=cert_subject,
            user_id=user_id,
            csrf_ok=csrf_ok,
            ip_failures=state.ip_failures,
            locked_until=state.locked_until,
            password_ok=password_ok,
            must_change_password=bool(user and user.must_change_password),
        )
        outcome = decide_login(attempt, now, self.settings)
        if not outcome.verdict.allowed:
            return LoginResult(outcome, user, await self._count_failure(user_id, ip, now, outcome))
        if await self._run(self.users.locked_until, user_id, now) is not None:
            # Another process locked the ID while this password was being checked.
            locked = Verdict.deny(Reason.ACCOUNT_LOCKED, "locked during the password check")
            return LoginResult(LoginOutcome(locked), user)
        await self._run(self.users.clear_failures, user_id)
        if user is not None and needs_rehash(user.password_hash):
            # Parameters were raised since this hash was made: store a new one
            # of the password just proven, keeping a temporary one temporary.
            new_hash = await self._run(hash_password, password)
            temporary = user.must_change_password
            await self._run(lambda: self.users.set_password(user_id, new_hash, temporary=temporary, now=now))
        return LoginResult(outcome, user)

    async def _count_failure(
        self, user_id: str, ip: str, now: dt.datetime, outcome: LoginOutcome
    ) -> dt.datetime | None:
        if outcome.counts_for_user:
            result = await self._run(self.users.record_failure, user_id, ip, now, self.settings)
            return result.locked_until  # type: ignore[no-any-return]
        if outcome.counts_for_ip and ip:
            await self._run(self.users.record_ip_failure, ip, now, self.settings)
        return None

    async def change_password(
        self, user_id: str, old: str, new: str, again: str, now: dt.datetime
    ) -> tuple[Verdict, tuple[str, str] | None]:
        """Set a new password if the old one is right and the new one meets the policy.

        Returns the verdict and, on refusal, the (Japanese, English) message for the page.
        """
        min_length = self.settings.password_min_length
        policy = check_password_policy(user_id, old, new, again, min_length)
        user = await self._run(self.users.get_user, user_id)
        if user is None or not await self._run(verify_password, user.password_hash, old):
            return Verdict.deny(Reason.BAD_CREDENTIALS, "current password wrong"), WRONG_CURRENT_PASSWORD
        if not policy.allowed:
            message = policy_message(policy.detail, min_length)
            return policy, (message.ja, message.en)
        new_hash = await self._run(hash_password, new)
        await self._run(lambda: self.users.set_password(user_id, new_hash, temporary=False, now=now))
        return Verdict.allow("password changed"), None

"""Password login and password change, shared by the gateway's login and the portal.

Both front doors check a user ID and password against the same store with
the same lockout, rate limit and policy; they differ only in what stands for
the certificate (the gateway has one, the portal asks for none) and in what
they do with the result. This module is that common edge: it gathers the
facts, lets :func:`gateway.access.policy.decide_login` decide, and applies the
outcome to the store. Blocking work (argon2, SQLite writes) goes to the
caller's executor.
"""

from __future__ import annotations

import asyncio
import codecs
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from aiohttp.helpers import parse_mimetype
from aiohttp.multipart import parse_content_disposition
from multidict import MultiDict

from gateway.access.passwords import (
    check_password_policy,
    dummy_verify,
    hash_password,
    needs_rehash,
    policy_message,
    verify_password,
)
from gateway.access.policy import LoginAttempt, LoginOutcome, LoginSettings, decide_login
from gateway.access.users import User
from gateway.storage.interfaces import UserStoreProtocol
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


class FormError(ValueError):
    """A request body that is not a form, or a form that cannot be read unambiguously."""


class Upload:
    """A multipart part sent as a file (or a nested multipart): never a field's text."""


async def read_capped(request: web.BaseRequest, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is over ``limit`` bytes (declared or sent, chunked too)."""
    if (request.content_length or 0) > limit:
        return None
    parts, size = [], 0
    async for chunk in request.content.iter_chunked(limit + 1):
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


URLENCODED = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
# Per-part transfer encodings a form may declare without changing the bytes (RFC 7578 4.7).
_PLAIN_TRANSFER = frozenset({"", "7bit", "8bit", "binary"})


async def parse_form(content_type: str | None, body: bytes) -> MultiDict[str | Upload]:
    """The fields of a form body already read in full, parsed as the browser encoded it.

    For a body the gateway must both inspect and forward (the passthrough
    login): aiohttp's ``request.post()`` reads the body itself and cannot
    parse a multipart one that was read before. Both encodings a browser
    sends for a POST form are understood, with any ``charset`` parameter
    (``text/plain`` forms are not: no backend parses them as fields).
    Anything a backend could read differently is refused rather than
    guessed: an unknown charset, bytes that do not decode, a non-form body,
    a part named twice over (``name*``) or with a transfer encoding.
    """
    mime = parse_mimetype(content_type or "")
    kind = f"{mime.type}/{mime.subtype}"
    if not content_type and not body:
        return MultiDict()
    if kind == URLENCODED:
        return _urlencoded(body, mime.parameters.get("charset") or "utf-8")
    if kind == MULTIPART:
        return await _multipart(content_type or "", body)
    raise FormError(f"not a form: Content-Type {content_type or '(none)'!r}")


# Charsets whose bytes 0x00-0x7F are the ASCII characters and never part of a multi-byte character:
# split on "&" and "=" and read as ASCII, a form means the same to a backend that ignores the
# declared charset (most do) as to the gateway. UTF-16, UTF-7, EBCDIC or ISO-2022-JP would not:
# a body could carry one user ID for the gateway and another for the backend.
_SAFE_CHARSETS = frozenset(
    {"utf-8", "ascii", "latin-1", "shift_jis", "cp932", "euc_jp"}
    | {f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15, 16)}
    | {f"cp125{n}" for n in range(9)}
)


def check_charset(charset: str) -> str:
    """``charset`` if a backend that ignores it reads the same fields; else FormError."""
    try:
        name = codecs.lookup(charset).name
    except LookupError:
        raise FormError(f"unknown charset {charset!r}") from None
    if name not in _SAFE_CHARSETS:
        raise FormError(f"charset {charset!r} not accepted for a login form (ASCII-compatible charsets only)")
    return charset


def _urlencoded(body: bytes, charset: str) -> MultiDict[str | Upload]:
    check_charset(charset)  # known, and one a backend ignoring it reads alike
    try:
        text = body.decode(charset)
        pairs = parse_qsl(text, keep_blank_values=True, encoding=charset, errors="strict")
    except (LookupError, UnicodeDecodeError, ValueError) as exc:
        raise FormError(f"form not readable as {charset}: {exc}") from None
    return MultiDict(pairs)


async def _multipart(content_type: str, body: bytes) -> MultiDict[str | Upload]:
    stream = StreamReader(cast(Any, _NoFlowControl()), 2 * MAX_FORM_BYTES, loop=asyncio.get_running_loop())
    stream.feed_data(body)
    stream.feed_eof()
    out: MultiDict[str | Upload] = MultiDict()
    try:
        reader = MultipartReader({"Content-Type": content_type}, stream)
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise FormError("nested multipart in a form")
            name = _part_name(part)
            check_charset(part.get_charset(default="utf-8"))
            value = Upload() if part.filename is not None else await part.text()
            if name == "_charset_" and isinstance(value, str):
                check_charset(value)  # the HTML5 hint some backends follow for the other parts
            out.add(name, value)
    except (ValueError, LookupError, UnicodeDecodeError, AssertionError) as exc:
        if isinstance(exc, FormError):
            raise
        raise FormError(f"multipart form not readable: {exc}") from None
    return out


def _part_name(part: BodyPartReader) -> str:
    disposition, params = parse_content_disposition(part.headers.get("Content-Disposition"))
    if disposition != "form-data" or "name" not in params or any(k.endswith("*") for k in params):
        raise FormError(f"multipart part without one plain name: {part.headers.get('Content-Disposition')!r}")
    if part.headers.get("Content-Transfer-Encoding", "").strip().lower() not in _PLAIN_TRANSFER:
        raise FormError("multipart part with a transfer encoding")
    return params["name"]


class _NoFlowControl:
    """The protocol of an in-memory StreamReader: a body already read has no connection to pause."""

    _reading_paused = False
    connected = True

    def pause_reading(self) -> None:
        """Nothing to pause."""

    def resume_reading(self, resume_parser: bool = True) -> None:
        """Nothing to resume."""


@dataclass(frozen=True, slots=True)
class LoginResult:
    """The decision, the account it was about, and whether this attempt started a lock."""

    outcome: LoginOutcome
    user: User | None
    locked_until: dt.datetime | None = None


class Accounts:
    """The password half of a login, against one user store."""

    def __init__(self, users: UserStoreProtocol, settings: LoginSettings, run: Runner) -> None:
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
            # Another process locked the ID while this password was being checked. The answer
            # is the one a wrong password gets in this state: a different one would tell a
            # guesser that this guess was right. The audit trail says what happened.
            locked = Verdict.deny(Reason.BAD_CREDENTIALS, "correct password, but the ID was locked during the check")
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

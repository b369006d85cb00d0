"""The login and session decisions (pure: plain data and ``now`` in, a verdict out).

The edge (the aiohttp handlers) gathers the facts - the certificate verdict
from the core, the CSRF check, failure counts and the lock from the user
store, the password check done in an executor - and these functions decide.
They import no aiohttp, asyncio, sqlite3 or file I/O, so every branch is
tested by moving ``now`` and flipping inputs.

Why the order of :func:`decide_login` matters: nothing the attacker learns
may depend on whether the user ID exists. The checks that come before the
user store is consulted (certificate, CSRF, per-IP limit, subject binding)
do not look at it at all; the lock is kept per typed user ID, for unknown
IDs too, so ``account_locked`` shows up identically for both; and unknown
user, disabled user and wrong password all give ``bad_credentials``.
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from gateway.verdict import Reason, Verdict

if TYPE_CHECKING:
    from gateway.config import LoginConfig, SessionConfig

# Longest ``next`` we redirect to; anything longer is not a link we made.
MAX_NEXT_LENGTH = 2048


@dataclass(frozen=True, slots=True)
class LoginSettings:
    """The lockout and rate-limit numbers (config.login), as timedeltas."""

    max_failures: int = 5
    failure_window: dt.timedelta = dt.timedelta(minutes=15)
    lockout: dt.timedelta = dt.timedelta(minutes=30)
    ip_max_failures: int = 50
    password_min_length: int = 12

    @classmethod
    def from_config(cls, login: LoginConfig) -> LoginSettings:
        return cls(
            max_failures=login.max_failures,
            failure_window=dt.timedelta(minutes=login.failure_window_minutes),
            lockout=dt.timedelta(minutes=login.lockout_minutes),
            ip_max_failures=login.ip_max_failures,
            password_min_length=login.password_min_length,
        )


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """How long a session lives: since the last request, and since login."""

    idle: dt.timedelta = dt.timedelta(minutes=30)
    absolute: dt.timedelta = dt.timedelta(hours=10)

    @classmethod
    def from_config(cls, session: SessionConfig) -> SessionLimits:
        return cls(
            idle=dt.timedelta(minutes=session.idle_minutes),
            absolute=dt.timedelta(hours=session.absolute_hours),
        )


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    """Everything the edge knows about one login POST.

    ``certificate`` is the core's verdict on the presented certificate and
    ``cert_subject`` its CN (None when there is none). ``ip_failures`` is the
    number of failed logins from the client address within the window;
    ``locked_until`` the lock on the typed user ID (None if unlocked).
    ``password_ok`` is only True when the user exists, is enabled and the
    password verified; for unknown or disabled users the edge runs
    :func:`gateway.access.passwords.dummy_verify` and passes False.
    """

    certificate: Verdict
    cert_subject: str | None
    user_id: str
    csrf_ok: bool
    ip_failures: int
    locked_until: dt.datetime | None
    password_ok: bool
    must_change_password: bool = False


@dataclass(frozen=True, slots=True)
class LoginOutcome:
    """The verdict plus what the edge must do with it.

    ``must_change_password``: the login succeeded with a temporary password;
    create the session flagged so no backend is reachable before a change.
    ``counts_for_user`` / ``counts_for_ip``: record a failure against the
    typed user ID (lockout) and/or the client address (rate limit).
    """

    verdict: Verdict
    must_change_password: bool = False
    counts_for_user: bool = False
    counts_for_ip: bool = False


def decide_login(attempt: LoginAttempt, now: dt.datetime, settings: LoginSettings) -> LoginOutcome:
    """Decide one login POST. Deny by default; the checks run in this order."""
    # (1) The certificate must pass every check of the core (issuer, validity,
    #     revocation, key usage). Its reason is passed through unchanged.
    if not attempt.certificate.allowed:
        return LoginOutcome(attempt.certificate)
    # (2) CSRF: a forged cross-site POST must not even count as a failure,
    #     or another site could lock users out.
    if not attempt.csrf_ok:
        return LoginOutcome(Verdict.deny(Reason.CSRF_FAILED, "login form token invalid"))
    # (3) Per-address rate limit, before anything about the user is looked at.
    if attempt.ip_failures >= settings.ip_max_failures:
        detail = f"{attempt.ip_failures} failures from this address within the window"
        return LoginOutcome(Verdict.deny(Reason.RATE_LIMITED, detail))
    # (4) The typed user ID must equal the certificate's CN exactly: no case
    #     folding, trimming or normalisation. Says nothing about the store.
    if attempt.cert_subject is None or not same_text(attempt.user_id, attempt.cert_subject):
        detail = "user ID differs from the certificate subject"
        return LoginOutcome(Verdict.deny(Reason.SUBJECT_MISMATCH, detail), counts_for_ip=True)
    # (5) Lock on the user ID; kept for unknown IDs too, so it reveals nothing.
    #     Attempts while locked do not extend the lock (no endless lockout).
    if is_locked(attempt.locked_until, now):
        detail = f"locked until {attempt.locked_until}"
        return LoginOutcome(Verdict.deny(Reason.ACCOUNT_LOCKED, detail), counts_for_ip=True)
    # (6) Unknown user, disabled user and wrong password: one answer.
    if not attempt.password_ok:
        verdict = Verdict.deny(Reason.BAD_CREDENTIALS, "unknown user, disabled or wrong password")
        return LoginOutcome(verdict, counts_for_user=True, counts_for_ip=True)
    # (7) A temporary password logs in, but only to the password-change page.
    if attempt.must_change_password:
        verdict = Verdict.allow("temporary password; change required")
        return LoginOutcome(verdict, must_change_password=True)
    return LoginOutcome(Verdict.allow("password and certificate match"))


def is_locked(locked_until: dt.datetime | None, now: dt.datetime) -> bool:
    """True while a lock is in force (it ends exactly at ``locked_until``)."""
    return locked_until is not None and now < locked_until


def lock_due(failures_in_window: int, settings: LoginSettings) -> bool:
    """True when this many recent failures for one user ID start a lock."""
    return failures_in_window >= settings.max_failures


def same_text(a: str, b: str) -> bool:
    """Exact, constant-time equality of two strings (UTF-8 bytes)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


class SessionFacts(Protocol):
    """What :func:`decide_session` reads from a stored session."""

    @property
    def cert_fingerprint(self) -> str: ...
    @property
    def systems(self) -> Set[str]: ...
    @property
    def must_change_password(self) -> bool: ...
    @property
    def created_at(self) -> dt.datetime: ...
    @property
    def last_seen(self) -> dt.datetime: ...


def decide_session(
    session: SessionFacts | None,
    presented_fingerprint: str | None,
    system: str,
    now: dt.datetime,
    limits: SessionLimits,
) -> Verdict:
    """Decide whether a request with this session may reach ``system``.

    Order: (1) no (valid) session -> login_required; (2) absolute, then idle
    expiry -> session_expired (a dead session is not worth more checks and
    "log in again" is the useful answer); (3) the certificate must be the one
    used at login (SHA-256 fingerprint) -> session_certificate_mismatch, so a
    stolen cookie is useless without the private key; (4) a temporary
    password must be changed before any backend -> password_change_required;
    (5) the user must be allowed on this system -> not_authorized.
    """
    if session is None:
        return Verdict.deny(Reason.LOGIN_REQUIRED, "no session")
    if now >= session.created_at + limits.absolute:
        return Verdict.deny(Reason.SESSION_EXPIRED, "absolute session lifetime reached")
    if now >= session.last_seen + limits.idle:
        return Verdict.deny(Reason.SESSION_EXPIRED, "idle timeout")
    presented = presented_fingerprint or ""
    if not same_text(presented.lower(), session.cert_fingerprint.lower()):
        return Verdict.deny(Reason.SESSION_CERTIFICATE_MISMATCH, "certificate differs from the one used at login")
    if session.must_change_password:
        return Verdict.deny(Reason.PASSWORD_CHANGE_REQUIRED, "temporary password not yet changed")
    if system not in session.systems:
        return Verdict.deny(Reason.NOT_AUTHORIZED, f"user not authorised for {system}")
    return Verdict.allow(f"session valid for {system}")


def safe_next(next_param: str | None) -> str | None:
    """The ``next`` target if it is a path on this site, else None.

    Accepted: printable ASCII (no spaces, no control characters), starting
    with exactly one ``/`` followed by anything but ``/`` or ``\\``, with no
    backslash anywhere (browsers treat ``\\`` as ``/``) and no scheme. So
    ``//evil.com``, ``/\\evil.com``, ``https://evil.com``,
    ``javascript:alert(1)`` and ``\\t//x`` are refused.
    Percent-encoded text is left alone: ``/%2F%2Fevil.com`` is a path on this
    site (browsers do not decode ``%2F`` when resolving a Location header).
    """
    if not next_param or len(next_param) > MAX_NEXT_LENGTH:
        return None
    if any(not 0x21 <= ord(ch) <= 0x7E for ch in next_param):
        return None
    if "\\" in next_param:
        return None
    if not next_param.startswith("/") or next_param.startswith("//"):
        return None
    return next_param

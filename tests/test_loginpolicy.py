"""The pure login and session decisions, and the ``next`` redirect filter."""

from __future__ import annotations

import dataclasses
import datetime as dt
from urllib.parse import urljoin, urlsplit

import pytest

from gateway.access.policy import (
    LoginAttempt,
    LoginSettings,
    SessionLimits,
    decide_login,
    decide_session,
    is_locked,
    lock_due,
    safe_next,
    same_text,
)
from gateway.access.sessions import SessionRecord
from gateway.config import LoginConfig, SessionConfig
from gateway.verdict import Reason, Verdict

NOW = dt.datetime(2025, 1, 15, 9, 0, tzinfo=dt.UTC)
SETTINGS = LoginSettings()
FP = "ab" * 32

GOOD = LoginAttempt(
    certificate=Verdict.allow("cert ok"),
    cert_subject="LC000001",
    user_id="LC000001",
    csrf_ok=True,
    ip_failures=0,
    locked_until=None,
    password_ok=True,
)


def attempt(**changes: object) -> LoginAttempt:
    return dataclasses.replace(GOOD, **changes)  # type: ignore[arg-type]


def test_good_login_is_allowed() -> None:
    outcome = decide_login(GOOD, NOW, SETTINGS)
    assert outcome.verdict.allowed
    assert not outcome.must_change_password
    assert not outcome.counts_for_user and not outcome.counts_for_ip


def test_certificate_refusal_passes_through_unchanged() -> None:
    cert = Verdict.deny(Reason.CERTIFICATE_REVOKED, "serial 0A")
    outcome = decide_login(attempt(certificate=cert), NOW, SETTINGS)
    assert outcome.verdict == cert
    assert not outcome.counts_for_user


def test_csrf_failure_is_refused_and_never_counts() -> None:
    outcome = decide_login(attempt(csrf_ok=False, password_ok=False), NOW, SETTINGS)
    assert outcome.verdict.reason is Reason.CSRF_FAILED
    assert not outcome.counts_for_user and not outcome.counts_for_ip


def test_ip_rate_limit_at_threshold_but_not_below() -> None:
    limit = SETTINGS.ip_max_failures
    assert decide_login(attempt(ip_failures=limit - 1), NOW, SETTINGS).verdict.allowed
    refused = decide_login(attempt(ip_failures=limit), NOW, SETTINGS)
    assert refused.verdict.reason is Reason.RATE_LIMITED


@pytest.mark.parametrize(
    "typed",
    ["lc000001", "LC000001 ", " LC000001", "LC00000１", "LC000002", "", "LC0000010"],
)
def test_user_id_must_equal_the_certificate_cn_exactly(typed: str) -> None:
    outcome = decide_login(attempt(user_id=typed), NOW, SETTINGS)
    assert outcome.verdict.reason is Reason.SUBJECT_MISMATCH
    assert not outcome.counts_for_user  # typing another ID must not lock that user


def test_unicode_normalisation_is_not_applied() -> None:
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    outcome = decide_login(attempt(user_id=decomposed, cert_subject=composed), NOW, SETTINGS)
    assert outcome.verdict.reason is Reason.SUBJECT_MISMATCH
    twin = decide_login(attempt(user_id=composed, cert_subject=composed), NOW, SETTINGS)
    assert twin.verdict.allowed


def test_missing_subject_is_a_mismatch() -> None:
    assert decide_login(attempt(cert_subject=None), NOW, SETTINGS).verdict.reason is (Reason.SUBJECT_MISMATCH)


def test_lock_refuses_even_with_the_right_password_and_ends_on_time() -> None:
    until = NOW + dt.timedelta(minutes=30)
    locked = decide_login(attempt(locked_until=until), NOW, SETTINGS)
    assert locked.verdict.reason is Reason.ACCOUNT_LOCKED
    assert not locked.counts_for_user  # no endless lockout
    assert locked.counts_for_ip
    assert decide_login(attempt(locked_until=until), until, SETTINGS).verdict.allowed


def test_bad_credentials_counts_for_user_and_ip() -> None:
    outcome = decide_login(attempt(password_ok=False), NOW, SETTINGS)
    assert outcome.verdict.reason is Reason.BAD_CREDENTIALS
    assert outcome.counts_for_user and outcome.counts_for_ip


def test_unknown_user_and_wrong_password_look_the_same() -> None:
    # The edge passes password_ok=False for unknown/disabled users (after a
    # dummy verify); the decision has no input that could tell them apart.
    unknown = decide_login(attempt(password_ok=False), NOW, SETTINGS)
    wrong = decide_login(attempt(password_ok=False, must_change_password=True), NOW, SETTINGS)
    assert unknown == wrong


def test_temporary_password_is_allowed_but_flagged() -> None:
    outcome = decide_login(attempt(must_change_password=True), NOW, SETTINGS)
    assert outcome.verdict.allowed
    assert outcome.must_change_password


def test_order_certificate_before_everything() -> None:
    cert = Verdict.deny(Reason.NO_CERTIFICATE)
    worst = attempt(certificate=cert, csrf_ok=False, ip_failures=999, user_id="x", password_ok=False)
    assert decide_login(worst, NOW, SETTINGS).verdict.reason is Reason.NO_CERTIFICATE


def test_order_mismatch_before_lock_so_a_lock_is_not_revealed() -> None:
    outcome = decide_login(attempt(user_id="LC000002", locked_until=NOW + dt.timedelta(minutes=1)), NOW, SETTINGS)
    assert outcome.verdict.reason is Reason.SUBJECT_MISMATCH


def test_lock_helpers() -> None:
    assert not is_locked(None, NOW)
    assert is_locked(NOW + dt.timedelta(seconds=1), NOW)
    assert not is_locked(NOW, NOW)
    assert not lock_due(SETTINGS.max_failures - 1, SETTINGS)
    assert lock_due(SETTINGS.max_failures, SETTINGS)


def test_same_text() -> None:
    assert same_text("LC000001", "LC000001")
    assert not same_text("LC000001", "lc000001")
    assert not same_text("\udcff", "x")  # lone surrogates from a form do not raise


def test_settings_from_config() -> None:
    settings = LoginSettings.from_config(LoginConfig(max_failures=3, failure_window_minutes=2))
    assert settings.max_failures == 3
    assert settings.failure_window == dt.timedelta(minutes=2)
    assert settings.lockout == dt.timedelta(minutes=30)
    limits = SessionLimits.from_config(SessionConfig(secret_file=__file__))  # type: ignore[arg-type]
    assert limits == SessionLimits(dt.timedelta(minutes=30), dt.timedelta(hours=10))


# -- sessions -------------------------------------------------------------

LIMITS = SessionLimits(idle=dt.timedelta(minutes=30), absolute=dt.timedelta(hours=10))


def session(**changes: object) -> SessionRecord:
    base = SessionRecord(
        session_id="s" * 43,
        user_id="LC000001",
        cert_fingerprint=FP,
        systems=frozenset({"tdnet", "clearing"}),
        must_change_password=False,
        csrf_token="c" * 43,
        created_at=NOW - dt.timedelta(hours=1),
        last_seen=NOW - dt.timedelta(minutes=1),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_valid_session_reaches_an_authorised_system() -> None:
    assert decide_session(session(), FP, "tdnet", NOW, LIMITS).allowed
    assert decide_session(session(), FP.upper(), "clearing", NOW, LIMITS).allowed


def test_no_session_means_login_required() -> None:
    assert decide_session(None, FP, "tdnet", NOW, LIMITS).reason is Reason.LOGIN_REQUIRED


def test_idle_expiry() -> None:
    fresh = session(last_seen=NOW - LIMITS.idle + dt.timedelta(seconds=1))
    assert decide_session(fresh, FP, "tdnet", NOW, LIMITS).allowed
    stale = session(last_seen=NOW - LIMITS.idle)
    assert decide_session(stale, FP, "tdnet", NOW, LIMITS).reason is Reason.SESSION_EXPIRED


def test_absolute_expiry_even_when_active() -> None:
    young = session(created_at=NOW - LIMITS.absolute + dt.timedelta(seconds=1), last_seen=NOW)
    assert decide_session(young, FP, "tdnet", NOW, LIMITS).allowed
    old = session(created_at=NOW - LIMITS.absolute, last_seen=NOW)
    verdict = decide_session(old, FP, "tdnet", NOW, LIMITS)
    assert verdict.reason is Reason.SESSION_EXPIRED
    assert "absolute" in verdict.detail


@pytest.mark.parametrize("presented", ["cd" * 32, None, "", FP[:-2]])
def test_session_pinned_to_the_certificate(presented: str | None) -> None:
    verdict = decide_session(session(), presented, "tdnet", NOW, LIMITS)
    assert verdict.reason is Reason.SESSION_CERTIFICATE_MISMATCH


def test_temporary_password_blocks_every_backend() -> None:
    verdict = decide_session(session(must_change_password=True), FP, "tdnet", NOW, LIMITS)
    assert verdict.reason is Reason.PASSWORD_CHANGE_REQUIRED


def test_other_system_is_not_authorised() -> None:
    verdict = decide_session(session(), FP, "j-iriss", NOW, LIMITS)
    assert verdict.reason is Reason.NOT_AUTHORIZED


# -- safe_next -------------------------------------------------------------

BASE = "https://gw.example.jp/login"


@pytest.mark.parametrize(
    "value",
    ["/", "/onre/", "/nt/menu?x=1&y=2#top", "/jpxcube/a/b;c", "/a//b", "/%2F%2Fevil.com"],
)
def test_safe_next_keeps_same_site_paths(value: str) -> None:
    assert safe_next(value) == value
    assert urlsplit(urljoin(BASE, value)).hostname == "gw.example.jp"


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "//evil.com",
        "/\\evil.com",
        "\\\\evil.com",
        "/a\\b",
        "https://evil.com",
        "http:/evil.com",
        "javascript:alert(1)",
        "\t//x",
        "/\t/evil.com",
        "/\n/evil.com",
        " /x",
        "/x y",
        "/\x7f",
        "/日本",
        "evil.com",
        "onre/",
        "/" + "a" * 2048,
    ],
)
def test_safe_next_refuses_everything_else(value: str | None) -> None:
    assert safe_next(value) is None

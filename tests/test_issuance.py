"""The manual's issuance rules at the edges of their dates, in JST and UTC."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from gateway.ca import issuance
from gateway.ca.issuance import (
    JST,
    CertificateRecord,
    RevocationReason,
    Status,
    may_issue,
    may_revoke,
    renewal_window,
    status_of,
)
from gateway.verdict import Reason

UTC = dt.UTC


def jst(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> dt.datetime:
    """An instant given as a JST wall-clock time, returned in UTC like stored values."""
    return dt.datetime(y, mo, d, h, mi, s, tzinfo=JST).astimezone(UTC)


# The manual's example: expiry 2021-05-01 (here 10:00 JST, 01:00 UTC).
EXPIRY = jst(2021, 5, 1, 10, 0, 0)


def record(
    not_after: dt.datetime = EXPIRY,
    *,
    serial: int = 0x1234ABCD,
    user_id: str = "LC000001",
    revoked_at: dt.datetime | None = None,
    kind: issuance.CertificateKind = "client",
) -> CertificateRecord:
    not_before = not_after - dt.timedelta(days=365)
    return CertificateRecord(
        serial=serial,
        user_id=user_id,
        not_before=not_before,
        not_after=not_after,
        fingerprint="00" * 32,
        requested_by="test",
        issued_at=not_before,
        revoked_at=revoked_at,
        revocation_reason=RevocationReason.UNSPECIFIED if revoked_at else None,
        kind=kind,
    )


# -- the renewal window -------------------------------------------------------


def test_manual_example_window_is_april_1_to_30() -> None:
    window = renewal_window(EXPIRY)
    assert window.first_day == dt.date(2021, 4, 1)
    assert window.last_day == dt.date(2021, 4, 30)
    assert window.opens_at == jst(2021, 4, 1, 0, 0, 0)
    assert window.closes_at == jst(2021, 5, 1, 0, 0, 0)


@pytest.mark.parametrize(
    ("now", "allowed", "why"),
    [
        (jst(2021, 3, 31, 12, 0, 0), False, "31 days before expiry"),
        (jst(2021, 3, 31, 23, 59, 59), False, "last second of day -31"),
        (jst(2021, 4, 1, 0, 0, 0), True, "30 days before: window opens at 00:00 JST"),
        (jst(2021, 4, 15, 12, 0, 0), True, "inside the window"),
        (jst(2021, 4, 30, 0, 0, 0), True, "1 day before expiry"),
        (jst(2021, 4, 30, 23, 59, 59), True, "last second of the window"),
        (jst(2021, 5, 1, 0, 0, 0), False, "0 days: the expiry day itself"),
        (jst(2021, 5, 1, 9, 59, 59), False, "expiry day, one second before notAfter"),
        (EXPIRY, False, "notAfter itself is still valid"),
        (EXPIRY + dt.timedelta(seconds=1), True, "expired: issue at once"),
        (jst(2020, 6, 1, 0, 0, 0), False, "early in its life"),
    ],
)
def test_may_issue_around_the_window(now: dt.datetime, allowed: bool, why: str) -> None:
    verdict = may_issue([record()], now)
    assert verdict.allowed is allowed, why
    if not allowed:
        assert verdict.reason is Reason.CERTIFICATE_DUPLICATE
        assert "1234ABCD" in verdict.detail
        assert "2021-04-01..2021-04-30" in verdict.detail
    else:
        assert verdict.reason is Reason.OK


@pytest.mark.parametrize("now", [jst(2020, 6, 1, 0, 0, 0), jst(2021, 3, 31, 12, 0, 0), jst(2021, 5, 1, 0, 0, 0)])
def test_revoked_certificate_never_blocks(now: dt.datetime) -> None:
    revoked = record(revoked_at=jst(2020, 5, 20, 8, 18, 11))
    assert may_issue([revoked], now).allowed
    # Twin: the same certificate unrevoked blocks at that moment.
    assert not may_issue([record()], now).allowed


def test_no_certificate_allows_issue() -> None:
    assert may_issue([], EXPIRY).allowed


def test_days_are_counted_in_jst_not_utc() -> None:
    """Expiry 2021-05-01 08:00 JST is 2021-04-30 23:00 UTC: the window follows the JST date."""
    not_after = jst(2021, 5, 1, 8, 0, 0)
    assert not_after.date() == dt.date(2021, 4, 30)  # the UTC date differs
    window = renewal_window(not_after)
    assert (window.first_day, window.last_day) == (dt.date(2021, 4, 1), dt.date(2021, 4, 30))
    # 2021-04-30 20:00 JST (11:00 UTC, the "expiry day" in UTC): still in the window.
    assert may_issue([record(not_after)], jst(2021, 4, 30, 20, 0, 0)).allowed
    # 2021-04-01 00:30 JST is still 2021-03-31 in UTC, yet the window is open.
    assert may_issue([record(not_after)], jst(2021, 4, 1, 0, 30, 0)).allowed
    assert not may_issue([record(not_after)], jst(2021, 3, 31, 23, 30, 0)).allowed


def test_a_renewed_user_cannot_renew_again() -> None:
    now = jst(2021, 4, 10, 9, 0, 0)
    old = record()
    assert may_issue([old], now).allowed
    new = record(now + dt.timedelta(days=365), serial=0xBEEF)
    verdict = may_issue([old, new], now)
    assert not verdict.allowed
    assert "BEEF" in verdict.detail  # names the certificate that blocks


def test_expired_and_revoked_together_allow() -> None:
    now = jst(2022, 1, 1, 0, 0, 0)
    history = [record(), record(jst(2021, 12, 1, 0, 0, 0), serial=2, revoked_at=jst(2021, 6, 1))]
    assert may_issue(history, now).allowed


def test_server_certificates_do_not_count() -> None:
    server = record(kind="server", user_id="LC000001")
    assert may_issue([server], jst(2020, 6, 1)).allowed
    assert not may_issue([dataclasses.replace(server, kind="client")], jst(2020, 6, 1)).allowed


@given(st.datetimes(min_value=dt.datetime(2020, 1, 1), max_value=dt.datetime(2022, 1, 1)))
def test_window_matches_day_arithmetic(naive: dt.datetime) -> None:
    """Independent restatement: allowed iff expired, or 1..30 JST days before the expiry day."""
    now = naive.replace(tzinfo=UTC)
    days_before = (EXPIRY.astimezone(JST).date() - now.astimezone(JST).date()).days
    expected = now > EXPIRY or 1 <= days_before <= 30
    assert may_issue([record()], now).allowed is expected


# -- status and the list ------------------------------------------------------


def test_status_valid_expired_revoked() -> None:
    assert status_of(record(), EXPIRY) is Status.VALID
    assert status_of(record(), EXPIRY + dt.timedelta(seconds=1)) is Status.EXPIRED
    revoked = record(revoked_at=jst(2021, 3, 11, 8, 18, 11))
    assert status_of(revoked, jst(2021, 3, 12)) is Status.REVOKED
    assert status_of(revoked, EXPIRY + dt.timedelta(days=1)) is Status.REVOKED


def test_status_labels() -> None:
    assert [(s.label_ja, s.label_en) for s in Status] == [
        ("有効", "Valid"),
        ("失効", "Revoked"),
        ("有効期限切れ", "Expired"),
    ]


def test_revocation_time_is_shown_in_jst() -> None:
    """The manual's 2021/03/11 08:18:11 is JST; stored as UTC 2021-03-10 23:18:11."""
    at = dt.datetime(2021, 3, 10, 23, 18, 11, tzinfo=UTC)
    assert issuance.format_revoked_at(record(revoked_at=at)) == "2021/03/11 08:18:11"
    assert issuance.format_revoked_at(record()) == "-"


def test_list_is_newest_expiry_first_and_numbered() -> None:
    now = jst(2021, 4, 10)
    a = record(jst(2021, 5, 1), serial=1, revoked_at=jst(2020, 7, 1))
    b = record(jst(2022, 4, 9), serial=2)
    c = record(jst(2020, 12, 1), serial=3)
    rows = issuance.list_rows([a, c, b], now)
    assert [r.serial for r in rows] == ["02", "01", "03"]  # as openssl x509 -serial prints them
    assert [r.no for r in rows] == [1, 2, 3]
    assert [r.status for r in rows] == [Status.VALID, Status.REVOKED, Status.EXPIRED]
    assert [r.revoked_at for r in rows] == ["-", "2020/07/01 00:00:00", "-"]
    assert rows[0].expiry == "2022/04/09 00:00:00"


# -- revocation ---------------------------------------------------------------


def test_user_may_revoke_own_valid_certificate() -> None:
    assert may_revoke(record(), jst(2021, 1, 1), owner="LC000001").allowed


def test_user_may_not_revoke_anothers() -> None:
    verdict = may_revoke(record(), jst(2021, 1, 1), owner="LC000002")
    assert not verdict.allowed
    assert verdict.reason is Reason.NOT_AUTHORIZED


def test_user_may_not_revoke_a_server_certificate_named_like_them() -> None:
    server = record(kind="server")
    assert not may_revoke(server, jst(2021, 1, 1), owner="LC000001").allowed
    assert may_revoke(server, jst(2021, 1, 1)).allowed  # an administrator may


def test_nobody_revokes_twice() -> None:
    revoked = record(revoked_at=jst(2021, 1, 1))
    verdict = may_revoke(revoked, jst(2021, 1, 2))
    assert not verdict.allowed
    assert verdict.reason is Reason.CERTIFICATE_REVOKED


def test_admin_may_revoke_an_expired_certificate() -> None:
    assert may_revoke(record(), EXPIRY + dt.timedelta(days=3)).allowed


def test_reasons_are_rfc5280_without_hold() -> None:
    assert issuance.reasons() == [
        "unspecified",
        "keyCompromise",
        "affiliationChanged",
        "superseded",
        "cessationOfOperation",
        "privilegeWithdrawn",
    ]
    assert RevocationReason.KEY_COMPROMISE.flag is x509.ReasonFlags.key_compromise
    assert "certificateHold" not in issuance.reasons()


# -- input --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("1234ABCD", 0x1234ABCD), ("12:34:ab:cd", 0x1234ABCD), ("0x1234abcd", 0x1234ABCD)],
)
def test_parse_serial_accepts_what_people_paste(text: str, value: int) -> None:
    assert issuance.parse_serial(text) == value
    assert issuance.format_serial(value) == "1234ABCD"


@pytest.mark.parametrize("text", ["", "xyz", "12-34", "0", "1" * 41])
def test_parse_serial_refuses_non_serials(text: str) -> None:
    with pytest.raises(ValueError, match="serial"):
        issuance.parse_serial(text)


@pytest.mark.parametrize("user_id", ["LC000001", "a", "user.name@example", "A" * 64])
def test_user_ids_accepted(user_id: str) -> None:
    assert issuance.user_id_problem(user_id) is None


@pytest.mark.parametrize("user_id", ["", "A" * 65, "a b", "CN=x,O=y", ".hidden", "ユーザ", "a\n"])
def test_user_ids_refused(user_id: str) -> None:
    assert issuance.user_id_problem(user_id) is not None


def test_windows_login_checks() -> None:
    assert issuance.windows_login_problem("CORP\\taro.yamada") is None
    assert issuance.windows_login_problem("山田太郎@corp.example") is None
    assert issuance.windows_login_problem("taro\x00") is not None
    assert issuance.windows_login_problem("") is not None
    assert issuance.windows_login_problem("x" * 257) is not None

"""The issuance service's rules, as pure functions over certificate records and ``now``.

The manual's rules (one valid certificate per user ID, the renewal window,
how a certificate's status reads, how the list is ordered and shown) live
here and nowhere else; :mod:`gateway.ca.authority` does the I/O and calls them inside
its transactions, the portal and the CLI render what they return.

Time zone: users are in Japan and read every date on the portal in Japan
Standard Time, so *days* are JST calendar days and every date-time shown is
JST (``YYYY/MM/DD HH:MM:SS``). Stored and compared instants stay aware UTC.
Japan has had no daylight saving since 1951, so JST is a fixed UTC+9 offset
and needs no tz database.

The renewal window, precisely: for a certificate whose notAfter falls on JST
calendar day E, a new certificate may be issued from 00:00:00 JST of day
E-30 up to 23:59:59 JST of day E-1, both inclusive. The manual's example:
expiry 2021-05-01 gives the window 2021-04-01 .. 2021-04-30. On day E itself
the old certificate is still valid for some hours and the manual says "up to
the day before expiry", so a request on day E is refused until notAfter has
passed; from then on the certificate is expired and a new one is issued at
once. Days are counted in JST, not UTC: a certificate issued at 08:00 JST
expires at 23:00 UTC the day before, and a UTC count would shift the window
a day away from the expiry date the user sees.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from cryptography import x509

from gateway.audit.events import serial_hex
from gateway.errors import CaError
from gateway.verdict import Reason, Verdict

JST = dt.timezone(dt.timedelta(hours=9), "JST")
RENEWAL_OPENS_DAYS_BEFORE = 30
RENEWAL_CLOSES_DAYS_BEFORE = 1
NO_DATE = "-"
DATETIME_FORMAT = "%Y/%m/%d %H:%M:%S"

# The manual's wording for the duplicate refusal (page title, message, advice).
DUPLICATE_TITLE_JA = "証明書重複エラー"
DUPLICATE_TITLE_EN = "Certificate duplicate error"
DUPLICATE_MESSAGE_JA = "既に有効な証明書が発行されています"
DUPLICATE_MESSAGE_EN = "A valid certificate has already been issued"
DUPLICATE_ADVICE_JA = "新しい証明書が必要な場合は、現在の証明書を失効してから発行してください。"
DUPLICATE_ADVICE_EN = "To obtain a new certificate, revoke the current one first."

# A user ID becomes the certificate's CN (at most 64 characters, RFC 5280
# ub-common-name) and a file name on download: keep it to a safe alphabet.
_USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_WINDOWS_LOGIN_MAX = 256

CertificateKind = Literal["client", "server"]


class Status(StrEnum):
    """A certificate's status as the list shows it."""

    VALID = "valid"
    REVOKED = "revoked"
    EXPIRED = "expired"

    @property
    def label_ja(self) -> str:
        return _STATUS_JA[self]

    @property
    def label_en(self) -> str:
        return _STATUS_EN[self]


_STATUS_JA = {Status.VALID: "有効", Status.REVOKED: "失効", Status.EXPIRED: "有効期限切れ"}
_STATUS_EN = {Status.VALID: "Valid", Status.REVOKED: "Revoked", Status.EXPIRED: "Expired"}


class RevocationReason(StrEnum):
    """The RFC 5280 (5.3.1) reasons an end-entity certificate may be revoked for.

    Left out on purpose: cACompromise and aACompromise (they concern
    authorities, not users), removeFromCRL (delta CRLs only) and
    certificateHold: a hold can be lifted, which would need a fourth status
    the manual does not have, and the CA/Browser Forum forbids it for
    subscriber certificates. Revocation here is final.
    """

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "keyCompromise"
    AFFILIATION_CHANGED = "affiliationChanged"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessationOfOperation"
    PRIVILEGE_WITHDRAWN = "privilegeWithdrawn"

    @property
    def flag(self) -> x509.ReasonFlags:
        """The CRL entry's reason code."""
        return _REASON_FLAGS[self]


_REASON_FLAGS = {
    RevocationReason.UNSPECIFIED: x509.ReasonFlags.unspecified,
    RevocationReason.KEY_COMPROMISE: x509.ReasonFlags.key_compromise,
    RevocationReason.AFFILIATION_CHANGED: x509.ReasonFlags.affiliation_changed,
    RevocationReason.SUPERSEDED: x509.ReasonFlags.superseded,
    RevocationReason.CESSATION_OF_OPERATION: x509.ReasonFlags.cessation_of_operation,
    RevocationReason.PRIVILEGE_WITHDRAWN: x509.ReasonFlags.privilege_withdrawn,
}


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    """One issued certificate as the issuance database remembers it."""

    serial: int
    user_id: str  # client: the user ID (CN); server: the first host name
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: str  # lower-case hex SHA-256 of the DER certificate
    requested_by: str  # who asked: "portal:<user>", "cli:<os user>", ...
    issued_at: dt.datetime
    windows_login: str | None = None
    revoked_at: dt.datetime | None = None
    revocation_reason: RevocationReason | None = None
    revoked_by: str | None = None
    kind: CertificateKind = "client"

    @property
    def serial_hex(self) -> str:
        return format_serial(self.serial)


@dataclass(frozen=True)
class CrlInfo:
    """What one CRL publication produced (kept in the records' ``crls`` table)."""

    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    entries: int
    der_bytes: int


@dataclass(frozen=True, slots=True)
class CrlEntry:
    """One revoked certificate as a CRL lists it."""

    serial: int
    revoked_at: dt.datetime
    reason: RevocationReason | None


@dataclass(frozen=True, slots=True)
class RenewalWindow:
    """The JST days on which a valid certificate may be renewed, and the instants bounding them."""

    first_day: dt.date
    last_day: dt.date
    opens_at: dt.datetime  # 00:00:00 JST of first_day (inclusive)
    closes_at: dt.datetime  # 00:00:00 JST of the expiry day (exclusive)

    def contains(self, now: dt.datetime) -> bool:
        return self.opens_at <= now < self.closes_at


@dataclass(frozen=True, slots=True)
class ListRow:
    """One line of the certificate list (証明書情報の確認)."""

    no: int
    user_id: str
    serial: str
    expiry: str
    status: Status
    revoked_at: str
    record: CertificateRecord


def status_of(record: CertificateRecord, now: dt.datetime) -> Status:
    """Revoked beats expired (revocation is final); the notAfter second itself is still valid."""
    if record.revoked_at is not None:
        return Status.REVOKED
    if now > record.not_after:
        return Status.EXPIRED
    return Status.VALID


def jst_date(moment: dt.datetime) -> dt.date:
    """The calendar day in Japan at ``moment``."""
    return moment.astimezone(JST).date()


def renewal_window(not_after: dt.datetime) -> RenewalWindow:
    """From 30 days before the JST expiry day up to the day before it (see the module doc)."""
    expiry_day = jst_date(not_after)
    first = expiry_day - dt.timedelta(days=RENEWAL_OPENS_DAYS_BEFORE)
    last = expiry_day - dt.timedelta(days=RENEWAL_CLOSES_DAYS_BEFORE)
    return RenewalWindow(
        first_day=first,
        last_day=last,
        opens_at=_jst_midnight(first),
        closes_at=_jst_midnight(last + dt.timedelta(days=1)),
    )


def _jst_midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=JST).astimezone(dt.UTC)


def may_issue(existing: Iterable[CertificateRecord], now: dt.datetime) -> Verdict:
    """May this user be issued a new certificate now?

    Refused (``CERTIFICATE_DUPLICATE``) when any of the user's certificates
    is valid and ``now`` lies outside that certificate's renewal window.
    Revoked and expired certificates never block. A certificate obtained in
    the renewal window is itself valid and far from expiry, so a second
    renewal is refused: at most two valid certificates exist, and only
    while the old one runs out.
    """
    blocking = [
        r
        for r in existing
        if r.kind == "client" and status_of(r, now) is Status.VALID and not renewal_window(r.not_after).contains(now)
    ]
    if not blocking:
        return Verdict.allow()
    latest = max(blocking, key=lambda r: r.not_after)
    window = renewal_window(latest.not_after)
    return Verdict.deny(
        Reason.CERTIFICATE_DUPLICATE,
        f"valid certificate {latest.serial_hex} expires {format_jst(latest.not_after)} JST; "
        f"renewal window {window.first_day.isoformat()}..{window.last_day.isoformat()} JST",
    )


def may_revoke(record: CertificateRecord, now: dt.datetime, *, owner: str | None = None) -> Verdict:
    """May this certificate be revoked? ``owner`` is the user asking (None: an administrator).

    Users revoke only their own certificates; nobody revokes twice (the
    first revocation time and reason stay what the CRL says). Expired
    certificates may still be revoked: it is harmless and an administrator
    may want the record to say why a certificate was withdrawn.
    """
    if owner is not None and (record.kind != "client" or record.user_id != owner):
        return Verdict.deny(Reason.NOT_AUTHORIZED, f"{owner} asked to revoke {record.serial_hex} of another user")
    if status_of(record, now) is Status.REVOKED:
        return Verdict.deny(Reason.CERTIFICATE_REVOKED, f"{record.serial_hex} is already revoked")
    return Verdict.allow()


def sort_for_list(records: Iterable[CertificateRecord]) -> list[CertificateRecord]:
    """Newest expiry first; ties (same second) by newest issue, then serial, to stay stable."""
    return sorted(records, key=lambda r: (r.not_after, r.issued_at, r.serial), reverse=True)


def list_rows(records: Iterable[CertificateRecord], now: dt.datetime) -> list[ListRow]:
    """The list as the manual shows it: No., user ID, serial, expiry, status, revocation time."""
    return [
        ListRow(
            no=i,
            user_id=r.user_id,
            serial=r.serial_hex,
            expiry=format_jst(r.not_after),
            status=status_of(r, now),
            revoked_at=format_revoked_at(r),
            record=r,
        )
        for i, r in enumerate(sort_for_list(records), start=1)
    ]


def format_jst(moment: dt.datetime) -> str:
    """``YYYY/MM/DD HH:MM:SS`` in Japan Standard Time (the manual's 2021/03/11 08:18:11)."""
    return moment.astimezone(JST).strftime(DATETIME_FORMAT)


def format_revoked_at(record: CertificateRecord) -> str:
    """The 失効日 column: JST date-time, or "-" when not revoked."""
    return NO_DATE if record.revoked_at is None else format_jst(record.revoked_at)


def format_serial(serial: int) -> str:
    """Upper-case hex, an even number of digits: what ``openssl x509 -serial`` prints (``0F1127...``)."""
    return serial_hex(serial)


def storage_serial(serial: int) -> str:
    """The key of a serial in issuance.db: hex without leading zeros (the form its rows were written in)."""
    return format(serial, "X")


def parse_serial(text: str) -> int:
    """Read a serial typed by a person: hex, optional ``0x``, colons or spaces, leading zeros tolerated.

    ``0F1127...`` (as ``openssl x509 -serial`` prints it) and ``F1127...`` are the same serial.
    """
    cleaned = text.strip().replace(":", "").replace(" ", "")
    cleaned = cleaned.removeprefix("0x").removeprefix("0X")
    cleaned = cleaned.lstrip("0") or cleaned[:1]
    if not cleaned or not re.fullmatch(r"[0-9A-Fa-f]{1,40}", cleaned):
        raise ValueError(f"not a hexadecimal serial number: {text!r}")
    value = int(cleaned, 16)
    if value <= 0:
        raise ValueError("a serial number is positive")
    return value


def user_id_problem(user_id: str) -> str | None:
    """Why this user ID cannot be a certificate subject, or None when it can."""
    if not _USER_ID.fullmatch(user_id):
        return "a user ID is 1-64 characters of A-Z a-z 0-9 . _ @ - starting with a letter or digit"
    return None


def windows_login_problem(login: str) -> str | None:
    """Why this Windows login ID cannot be recorded, or None when it can."""
    if not login or len(login) > _WINDOWS_LOGIN_MAX:
        return f"a Windows login ID is 1-{_WINDOWS_LOGIN_MAX} characters"
    if not login.isprintable():
        return "a Windows login ID must not contain control characters"
    return None


def reasons() -> Sequence[str]:
    """The revocation reason names accepted (for --help and forms)."""
    return [r.value for r in RevocationReason]


# --- what the records stores share (both backends keep the same columns) -----------------------

RECORD_COLUMNS = (
    "serial, kind, user_id, not_before, not_after, issued_at, fingerprint, requested_by, "
    "windows_login, revoked_at, revocation_reason, revoked_by"
)
# A new certificate's row: INSERT_COLUMNS with the values of :func:`insert_values`, status 'valid'.
INSERT_COLUMNS = (
    "serial, kind, user_id, not_before, not_after, issued_at, fingerprint, requested_by, windows_login, status, der"
)


def insert_values(record: CertificateRecord, der: bytes) -> tuple[object, ...]:
    """The values of a new certificate's row, in INSERT_COLUMNS order (status 'valid' comes from the SQL)."""
    return (
        storage_serial(record.serial),
        record.kind,
        record.user_id,
        timestamp(record.not_before),
        timestamp(record.not_after),
        timestamp(record.issued_at),
        record.fingerprint,
        record.requested_by,
        record.windows_login,
        der,
    )


def record_filter(user: str | None, kind: CertificateKind | None) -> tuple[list[str], list[str]]:
    """The columns to match and their values for a listing; each backend adds its placeholder."""
    pairs = [(column, value) for column, value in (("user_id", user), ("kind", kind)) if value is not None]
    return [column for column, _ in pairs], [value for _, value in pairs]


def crl_entry_of_row(serial: str, revoked_at: int, reason: str | None) -> CrlEntry:
    """A CRL entry from a row of (serial, revoked_at, revocation_reason) (either backend)."""
    return CrlEntry(int(serial, 16), from_timestamp(revoked_at), RevocationReason(reason) if reason else None)


class IssuanceRefused(CaError):
    """A rule of the manual refused the request; ``verdict`` says which and why."""

    def __init__(self, verdict: Verdict, message: str) -> None:
        self.verdict = verdict
        super().__init__(message)


def duplicate_refusal(user_id: str, verdict: Verdict) -> IssuanceRefused:
    """The 証明書重複エラー for a refused issuance, with what to do about it."""
    return IssuanceRefused(
        verdict,
        f"{DUPLICATE_TITLE_JA}: {DUPLICATE_MESSAGE_JA} "
        f"({DUPLICATE_MESSAGE_EN} for {user_id}: {verdict.detail}; "
        "revoke it first or wait for the renewal window)",
    )


def revoke_refusal(record: CertificateRecord, verdict: Verdict) -> IssuanceRefused:
    return IssuanceRefused(verdict, f"cannot revoke {record.serial_hex}: {verdict.detail}")


def unknown_serial(serial: int) -> CaError:
    return CaError(f"no certificate with serial {format_serial(serial)}")


def timestamp(moment: dt.datetime) -> int:
    """Stored instants are Unix seconds (numbers in both backends, so a table copies as is)."""
    return int(moment.timestamp())


def from_timestamp(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def record_of_row(row: Sequence[object]) -> CertificateRecord:
    """A record from a row of :data:`RECORD_COLUMNS` (either backend)."""
    (serial, kind, user_id, nb, na, issued, fp, by, login, revoked_at, reason, revoked_by) = row
    assert isinstance(serial, str) and isinstance(user_id, str)
    assert isinstance(nb, int) and isinstance(na, int) and isinstance(issued, int)
    assert isinstance(fp, str) and isinstance(by, str)
    return CertificateRecord(
        serial=int(serial, 16),
        user_id=user_id,
        not_before=from_timestamp(nb),
        not_after=from_timestamp(na),
        fingerprint=fp,
        requested_by=by,
        issued_at=from_timestamp(issued),
        windows_login=login if isinstance(login, str) else None,
        revoked_at=from_timestamp(revoked_at) if isinstance(revoked_at, int) else None,
        revocation_reason=RevocationReason(reason) if isinstance(reason, str) else None,
        revoked_by=revoked_by if isinstance(revoked_by, str) else None,
        kind="server" if kind == "server" else "client",
    )


def filter_records(
    records: Iterable[CertificateRecord], status: Status | None, now: dt.datetime | None
) -> list[CertificateRecord]:
    """The list as the portal and CLI show it: ``status`` judged at ``now`` (default: clock), newest first."""
    if status is not None:
        moment = now or dt.datetime.now(dt.UTC)
        records = [r for r in records if status_of(r, moment) is status]
    return sort_for_list(records)

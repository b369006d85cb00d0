"""Audit events: what the gateway, the login and the CA record for the security team.

This module is the contract and stays pure (no I/O): the event record, its
one serialised form (the same keys in SQLite, JSON lines and the CLI), the
query filter and the parsing of ``--since 24h`` style times shared by the
CLI and the ``/audit`` page. Storage lives in :mod:`gateway.audit.store`,
the non-blocking writer in :mod:`gateway.audit.writer`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gateway.errors import GatewayError


class EventKind(StrEnum):
    """What happened. One event per decision."""

    HANDSHAKE_FAILED = "handshake_failed"
    REQUEST_REFUSED = "request_refused"
    LOGIN_REFUSED = "login_refused"
    LOGIN = "login"
    LOGOUT = "logout"
    SESSION_ENDED = "session_ended"
    PASSWORD_CHANGED = "password_changed"  # noqa: S105 - an event name
    ACCOUNT_LOCKED = "account_locked"
    ACCOUNT_UNLOCKED = "account_unlocked"
    ADMIN_ACTION = "admin_action"
    CERTIFICATE_ISSUED = "certificate_issued"
    CERTIFICATE_REVOKED = "certificate_revoked"
    ISSUANCE_REFUSED = "issuance_refused"
    CRL_PUBLISHED = "crl_published"
    CRL_REFRESH_FAILED = "crl_refresh_failed"
    AUDIT_VIEWED = "audit_viewed"  # the audit workspace was searched (who, the filter, how many rows)
    AUDIT_EXPORTED = "audit_exported"  # the audit workspace exported the filter as CSV or JSON


# The kinds that count as a refusal in summaries and the chart.
REFUSAL_KINDS = frozenset(
    {
        EventKind.HANDSHAKE_FAILED,
        EventKind.REQUEST_REFUSED,
        EventKind.LOGIN_REFUSED,
        EventKind.ISSUANCE_REFUSED,
    }
)


def connection_fields(transport: Any) -> dict[str, Any]:
    """Client address and TLS parameters of an event, from an asyncio transport (or None)."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    cipher = ssl_object.cipher() if ssl_object is not None else None
    return {
        "client_ip": str(peer[0]) if peer else "",
        "client_port": int(peer[1]) if peer else None,
        "tls_version": (ssl_object.version() or "") if ssl_object is not None else "",
        "tls_cipher": cipher[0] if cipher else "",
    }


def new_support_id() -> str:
    """A short, unguessable ID a user can read out to the help desk."""
    return secrets.token_hex(6).upper()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audit record. Never holds a password, cookie or key.

    ``path`` carries no query string (see :func:`strip_query`);
    ``user_agent`` and the certificate fields are untrusted data, stored as
    given and escaped on display. ``cert_serial`` is stored in the form
    :func:`normalize_serial` gives, so any hex spelling finds it.
    """

    event: EventKind
    reason: str = ""
    time: dt.datetime = field(default_factory=utcnow)
    support_id: str = field(default_factory=new_support_id)
    client_ip: str = ""
    client_port: int | None = None
    tls_version: str = ""
    tls_cipher: str = ""
    backend: str = ""
    method: str = ""
    path: str = ""
    user_id: str = ""
    cert_subject: str = ""
    cert_serial: str = ""
    cert_issuer: str = ""
    cert_fingerprint: str = ""
    cert_not_after: str = ""
    user_agent: str = ""
    worker: int | None = None
    actor: str = ""
    detail: str = ""
    instance: str = ""  # the gateway instance (config ``instance``) that recorded it; '' in older records


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AuditEvent))
_TEXT_FIELDS = tuple(f.name for f in dataclasses.fields(AuditEvent) if f.type in ("str", str))


def storable_text(text: str) -> str:
    """``text`` as every store and the spool can hold it: NUL and lone surrogates escaped.

    Why: clients control paths (``/a%00b`` decodes to a NUL) and headers
    (aiohttp turns invalid UTF-8 into lone surrogates). PostgreSQL refuses
    both and a UTF-8 file cannot hold the second, so one such event used to
    fail its whole batch: a refused client could keep its own attempts out
    of the trail. Escaped, the event is stored and still shows what was sent.
    """
    if "\0" in text:
        text = text.replace("\0", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def storable(event: AuditEvent) -> AuditEvent:
    """The event with every text field made storable (the same event when nothing needed it)."""
    changes: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        value = getattr(event, name)
        if value and value != (clean := storable_text(value)):
            changes[name] = clean
    return dataclasses.replace(event, **changes) if changes else event


_INT_FIELDS = frozenset({"client_port", "worker"})


# -- Values in events ---------------------------------------------------------


def strip_query(path_qs: str) -> str:
    """The path alone: query string and fragment dropped, keys and values alike.

    Query values may hold secrets (tokens, passwords in badly built forms),
    and even keys are attacker-chosen, so the audit keeps only the path.
    """
    return path_qs.split("?", 1)[0].split("#", 1)[0]


def normalize_serial(text: str) -> str:
    """A certificate serial as ``openssl x509 -serial`` prints it: upper-case hex, an even number of digits.

    Accepts ``0x1a2b``, ``1A:2B``, ``001a2b``, ``F1127`` and ``0F1127`` alike, so
    the help desk can paste a serial in whatever form a tool printed it.
    Non-hex input is returned stripped, unchanged otherwise (it then matches
    nothing).
    """
    raw = text.strip().replace(":", "").replace(" ", "")
    if raw[:2].lower() == "0x":
        raw = raw[2:]
    if not raw or not re.fullmatch(r"[0-9A-Fa-f]+", raw):
        return text.strip()
    return serial_hex(int(raw, 16))


def serial_hex(serial: int) -> str:
    """The printed and stored form of a serial: what ``openssl x509 -serial`` shows (``0F1127...``)."""
    digits = format(serial, "X")
    return digits if len(digits) % 2 == 0 else "0" + digits


def serial_spellings(text: str) -> tuple[str, ...]:
    """The forms a stored serial may have: openssl's and the one without a leading zero older stores kept."""
    even = normalize_serial(text)
    bare = even.lstrip("0") or "0"
    return (even,) if bare == even else (even, bare)


def format_time(when: dt.datetime) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2026-11-30T04:50:12.345Z``.

    Naive datetimes are taken as UTC (the house rule is aware datetimes;
    an audit record is never refused over it).
    """
    utc = _as_utc(when)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def epoch_ms(when: dt.datetime) -> int:
    """Milliseconds since 1970 UTC, floored like :func:`format_time`."""
    return (_as_utc(when) - _EPOCH) // dt.timedelta(milliseconds=1)


def from_epoch_ms(ms: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=ms)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _as_utc(when: dt.datetime) -> dt.datetime:
    if when.tzinfo is None:
        return when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC)


def event_to_dict(event: AuditEvent) -> dict[str, Any]:
    """The one serialised form: field names as keys, time as ISO text."""
    out: dict[str, Any] = {}
    for name in FIELDS:
        value = getattr(event, name)
        if name == "time":
            value = format_time(value)
        elif name == "event":
            value = str(value)
        elif name == "cert_serial" and value:
            value = normalize_serial(value)  # as openssl prints it, in every output and the JSONL stream
        out[name] = value
    return out


def event_from_dict(data: Mapping[str, Any]) -> AuditEvent:
    """Inverse of :func:`event_to_dict` (also reads SQLite rows); unknown keys ignored."""
    values: dict[str, Any] = {}
    for name in FIELDS:
        if name not in data:
            continue
        value = data[name]
        if name == "time":
            value = parse_iso(str(value))
        elif name == "event":
            value = EventKind(value)
        elif name in _INT_FIELDS:
            value = None if value is None or value == "" else int(value)
        else:
            value = "" if value is None else str(value)
        values[name] = value
    return AuditEvent(**values)


def parse_iso(text: str) -> dt.datetime:
    """Read back :func:`format_time` output (any ISO 8601 with offset or ``Z``)."""
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return _as_utc(parsed)


# -- Reading: times and filters -----------------------------------------------

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_RELATIVE = re.compile(r"(\d{1,7})([smhdw])")
_WHEN_HELP = "expected a duration like 30m, 24h, 7d, 2w or a UTC date/time like 2026-11-01 or 2026-11-01T10:00"


def parse_when(text: str, now: dt.datetime) -> dt.datetime:
    """A point in time from ``24h`` (that long before ``now``) or an ISO date/time.

    Units: s, m (minutes), h, d, w. Dates and times without an offset are
    UTC, like everything in the audit trail.
    """
    value = text.strip()
    match = _RELATIVE.fullmatch(value)
    if match:
        amount, unit = int(match[1]), match[2]
        return _as_utc(now) - dt.timedelta(**{_UNITS[unit]: amount})
    try:
        return parse_iso(value)
    except ValueError:
        raise GatewayError(f"{text!r}: {_WHEN_HELP}") from None


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """What to list. Empty strings and None mean "any"; matches are exact."""

    since: dt.datetime | None = None
    until: dt.datetime | None = None
    event: EventKind | None = None
    reason: str = ""
    user_id: str = ""
    client_ip: str = ""
    cert_serial: str = ""
    support_id: str = ""
    instance: str = ""
    limit: int = 100


# Query keys shared by the CLI options and the /audit page's parameters.
FILTER_KEYS = ("since", "until", "event", "reason", "user", "ip", "serial", "support_id", "instance", "limit")
MAX_LIMIT = 100_000


def parse_filter(params: Mapping[str, str | None], now: dt.datetime, *, default_limit: int = 100) -> AuditFilter:
    """Build a filter from CLI options or page parameters; one clear error per bad value."""

    def get(key: str) -> str:
        return (params.get(key) or "").strip()

    since = parse_when(get("since"), now) if get("since") else None
    until = parse_when(get("until"), now) if get("until") else None
    if since is not None and until is not None and since >= until:
        raise GatewayError(f"--since ({format_time(since)}) must be before --until ({format_time(until)})")
    return AuditFilter(
        since=since,
        until=until,
        event=_event_kind(get("event")) if get("event") else None,
        reason=get("reason"),
        user_id=get("user"),
        client_ip=get("ip"),
        cert_serial=normalize_serial(get("serial")) if get("serial") else "",
        support_id=get("support_id").upper(),
        instance=get("instance"),
        limit=_limit(get("limit"), default_limit),
    )


def _event_kind(text: str) -> EventKind:
    try:
        return EventKind(text)
    except ValueError:
        kinds = ", ".join(k.value for k in EventKind)
        raise GatewayError(f"event {text!r}: expected one of {kinds}") from None


def _limit(text: str, default: int) -> int:
    if not text:
        return default
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= MAX_LIMIT:
        raise GatewayError(f"limit {text!r}: expected a whole number from 1 to {MAX_LIMIT}")
    return int(text)

"""Reason codes and the verdict every decision returns.

Every refusal the gateway, the login or the issuance service can make has one
code here, and a code never means two things: the audit trail, the refusal
page, the metrics and the tests all key on it. Decisions are pure functions
that return a :class:`Verdict`; they never raise for a "no".
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Why something was allowed or refused (the stable, documented codes)."""

    OK = "ok"
    # Certificate checks (gateway core).
    NO_CERTIFICATE = "no_certificate"
    UNTRUSTED_CERTIFICATE = "untrusted_certificate"
    CERTIFICATE_EXPIRED = "certificate_expired"
    CERTIFICATE_NOT_YET_VALID = "certificate_not_yet_valid"
    CERTIFICATE_REVOKED = "certificate_revoked"
    REVOCATION_UNAVAILABLE = "revocation_unavailable"
    WRONG_KEY_USAGE = "wrong_key_usage"
    MALFORMED_SUBJECT = "malformed_subject"
    MALFORMED_CERTIFICATE = "malformed_certificate"
    CA_EXPIRED = "ca_expired"
    CA_NOT_YET_VALID = "ca_not_yet_valid"
    TLS_HANDSHAKE_FAILED = "tls_handshake_failed"
    # Routing and forwarding.
    NO_ROUTE = "no_route"
    BAD_REQUEST = "bad_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    BACKEND_TIMEOUT = "backend_timeout"
    # The client's side: a request head or body that stopped arriving (never a backend's fault).
    CLIENT_TIMEOUT = "client_timeout"
    # The gateway's own shared state (the PostgreSQL database) cannot be reached right now.
    SERVICE_UNAVAILABLE = "service_unavailable"
    # Login and session.
    LOGIN_REQUIRED = "login_required"
    SUBJECT_MISMATCH = "subject_mismatch"
    BAD_CREDENTIALS = "bad_credentials"
    ACCOUNT_LOCKED = "account_locked"
    RATE_LIMITED = "rate_limited"
    CSRF_FAILED = "csrf_failed"
    SESSION_EXPIRED = "session_expired"
    SESSION_CERTIFICATE_MISMATCH = "session_certificate_mismatch"
    NOT_AUTHORIZED = "not_authorized"
    PASSWORD_CHANGE_REQUIRED = "password_change_required"
    PASSWORD_POLICY = "password_policy"
    # Issuance service.
    CERTIFICATE_DUPLICATE = "certificate_duplicate"


# Reasons that mean "the certificate itself is not acceptable": the page says
# 有効なクライアント証明書ではありません for all of them.
CERTIFICATE_REASONS = frozenset(
    {
        Reason.NO_CERTIFICATE,
        Reason.UNTRUSTED_CERTIFICATE,
        Reason.CERTIFICATE_EXPIRED,
        Reason.CERTIFICATE_NOT_YET_VALID,
        Reason.CERTIFICATE_REVOKED,
        Reason.REVOCATION_UNAVAILABLE,
        Reason.WRONG_KEY_USAGE,
        Reason.MALFORMED_SUBJECT,
        Reason.MALFORMED_CERTIFICATE,
        Reason.CA_EXPIRED,
        Reason.CA_NOT_YET_VALID,
    }
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one decision: allowed or not, with a code and a detail.

    ``detail`` is for the audit trail and operators only; it may name
    certificate fields and is never shown to the client.
    """

    allowed: bool
    reason: Reason
    detail: str = ""

    @classmethod
    def allow(cls, detail: str = "") -> Verdict:
        # Immutable, so the common detail-less verdict is one shared object (it is built
        # several times per request).
        return cls(True, Reason.OK, detail) if detail else _ALLOWED

    @classmethod
    def deny(cls, reason: Reason, detail: str = "") -> Verdict:
        if reason is Reason.OK:
            raise ValueError("a refusal needs a reason other than OK")
        return cls(False, reason, detail)


_ALLOWED = Verdict(True, Reason.OK)

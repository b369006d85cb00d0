"""Is this client certificate acceptable right now? A pure decision.

OpenSSL has already verified the chain and signatures in the handshake (with
time checks moved here, see :mod:`gateway.tls`). This module takes the leaf
as plain data, the trusted issuers, a revocation state and ``now``, and
returns a :class:`~gateway.verdict.Verdict`. No I/O, no clock, no aiohttp:
the same function runs per request, in tests and in the login decision.
"""

from __future__ import annotations

import datetime as dt
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.audit import serial_hex
from gateway.revocation import RevocationState
from gateway.verdict import Reason, Verdict

# A plain user ID: what the CA puts in a CN and what users type at login.
USER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# RFC 5280 4.1.2.6: new certificates use UTF8String or PrintableString; a CN in
# BMPString, TeletexString etc. is not one our CA wrote.
CN_STRING_TYPES = frozenset({_ASN1Type.UTF8String.name, _ASN1Type.PrintableString.name})
# RFC 5280 4.1.2.2: a positive integer of at most 20 octets.
MAX_SERIAL = (1 << 159) - 1


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The client's leaf certificate, parsed once per connection."""

    der: bytes
    fingerprint: str  # SHA-256, lower-case hex
    serial: int
    subject: str  # RFC 4514, for display and XFCC
    common_names: tuple[str, ...]
    issuer: bytes  # DER of the issuer Name
    issuer_text: str
    issuer_cn: str
    not_before: dt.datetime
    not_after: dt.datetime
    extended_key_usage: tuple[str, ...] | None  # dotted OIDs, None when absent
    digital_signature: bool | None  # keyUsage bit, None when keyUsage is absent
    is_ca: bool
    certificate: x509.Certificate
    common_name_types: tuple[str, ...] = ()  # ASN.1 string type of each CN
    issuer_key_id: bytes = b""  # authorityKeyIdentifier keyid, empty when absent

    @property
    def serial_hex(self) -> str:
        # As openssl x509 -serial prints it (even number of digits); a negative serial keeps its sign.
        return serial_hex(self.serial) if self.serial >= 0 else "-" + serial_hex(-self.serial)

    @property
    def common_name(self) -> str:
        return self.common_names[0] if len(self.common_names) == 1 else ""


def _names(name: x509.Name, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    return tuple(
        a.value if isinstance(a.value, str) else a.value.decode("latin-1") for a in name.get_attributes_for_oid(oid)
    )


def _authority_key_id(cert: x509.Certificate) -> bytes:
    try:
        return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier or b""
    except x509.ExtensionNotFound:
        return b""


def parse_peer(der: bytes) -> PeerCertificate | None:
    """Parse a leaf; None when cryptography cannot read it (treated as malformed)."""
    with warnings.catch_warnings():
        # cryptography warns (not fails) on over-long names; we judge them ourselves.
        warnings.simplefilter("ignore", UserWarning)
        return _parse_peer(der)


def _parse_peer(der: bytes) -> PeerCertificate | None:
    try:
        cert = x509.load_der_x509_certificate(der)
        common_names = _names(cert.subject, NameOID.COMMON_NAME)
        eku: tuple[str, ...] | None
        try:
            eku = tuple(o.dotted_string for o in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        except x509.ExtensionNotFound:
            eku = None
        try:
            digital_signature: bool | None = cert.extensions.get_extension_for_class(
                x509.KeyUsage
            ).value.digital_signature
        except x509.ExtensionNotFound:
            digital_signature = None
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        issuer_cns = _names(cert.issuer, NameOID.COMMON_NAME)
        return PeerCertificate(
            der=der,
            fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
            serial=cert.serial_number,
            subject=cert.subject.rfc4514_string(),
            common_names=common_names,
            issuer=cert.issuer.public_bytes(),
            issuer_text=cert.issuer.rfc4514_string(),
            issuer_cn=issuer_cns[0] if len(issuer_cns) == 1 else "",
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            extended_key_usage=eku,
            digital_signature=digital_signature,
            is_ca=is_ca,
            certificate=cert,
            common_name_types=tuple(a._type.name for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)),
            issuer_key_id=_authority_key_id(cert),
        )
    except (ValueError, TypeError, UnicodeDecodeError):
        return None


@dataclass(frozen=True, slots=True)
class TrustAnchors:
    """The CAs the operator trusts for client certificates, and the CN they must carry."""

    cas: tuple[x509.Certificate, ...]
    issuer_cn: str

    @classmethod
    def of(cls, cas: Sequence[x509.Certificate], issuer_cn: str) -> TrustAnchors:
        return cls(tuple(cas), issuer_cn)


def issued_by_trusted_ca(peer: PeerCertificate, anchors: TrustAnchors) -> Verdict:
    """Step 1 on its own: signed by a configured CA whose CN is ``tls.issuer``.

    The TLS layer verified the chain against the same bundle; this repeats the
    signature check so a look-alike CA with the same name but another key,
    or a second configured CA with another CN, is refused by name and key.
    Separate from :func:`check_certificate` so callers may cache it per
    fingerprint: it does not depend on time or revocation.
    """
    if peer.issuer_cn != anchors.issuer_cn:
        return Verdict.deny(Reason.UNTRUSTED_CERTIFICATE, f"issuer {peer.issuer_text!r} is not {anchors.issuer_cn!r}")
    for ca in anchors.cas:
        if ca.subject.public_bytes() != peer.issuer:
            continue
        try:
            peer.certificate.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return Verdict.allow()
    return Verdict.deny(Reason.UNTRUSTED_CERTIFICATE, f"not signed by a configured CA named {anchors.issuer_cn!r}")


def check_subject(peer: PeerCertificate) -> Verdict:
    """Exactly one CN, as UTF8String or PrintableString, and a plain user ID (no controls, spaces or look-alikes)."""
    if len(peer.common_names) != 1:
        return Verdict.deny(Reason.MALFORMED_SUBJECT, f"{len(peer.common_names)} CNs in the subject")
    if peer.common_name_types and peer.common_name_types[0] not in CN_STRING_TYPES:
        return Verdict.deny(Reason.MALFORMED_SUBJECT, f"CN encoded as {peer.common_name_types[0]}")
    if not USER_ID_PATTERN.fullmatch(peer.common_names[0]):
        return Verdict.deny(Reason.MALFORMED_SUBJECT, f"CN {peer.common_names[0]!r} is not a plain user ID")
    return Verdict.allow()


def check_usage(peer: PeerCertificate) -> Verdict:
    """Meant for TLS client authentication: not a CA, clientAuth EKU if EKU is present, a sane serial."""
    if peer.is_ca:
        return Verdict.deny(Reason.WRONG_KEY_USAGE, "a CA certificate was presented as a client certificate")
    if not 0 < peer.serial <= MAX_SERIAL:
        # Our CA never writes one; cryptography only warns when parsing it.
        return Verdict.deny(Reason.UNTRUSTED_CERTIFICATE, f"serial {peer.serial_hex} is not positive or over 20 octets")
    if (
        peer.extended_key_usage is not None
        and ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string not in peer.extended_key_usage
    ):
        return Verdict.deny(Reason.WRONG_KEY_USAGE, "extendedKeyUsage lacks clientAuth")
    if peer.digital_signature is False:
        return Verdict.deny(Reason.WRONG_KEY_USAGE, "keyUsage lacks digitalSignature")
    return Verdict.allow()


def check_shape(peer: PeerCertificate) -> Verdict:
    """Steps 4 and 5 of :func:`check_certificate`: usage, then subject (time-independent, cacheable)."""
    verdict = check_usage(peer)
    return check_subject(peer) if verdict.allowed else verdict


def check_certificate(
    peer: PeerCertificate | None,
    anchors: TrustAnchors,
    revocation: RevocationState,
    now: dt.datetime,
    *,
    issuer_verdict: Verdict | None = None,
    shape_verdict: Verdict | None = None,
) -> Verdict:
    """The whole certificate decision, in a fixed order; deny by default.

    1. A certificate was presented and parses.
    2. Issued by a trusted CA named ``tls.issuer`` (``issuer_verdict`` may be a cached step 2).
    3. Inside its validity period (the handshake skipped time checks on purpose).
    4. Usable for client authentication (and a serial RFC 5280 4.1.2.2 allows).
    5. The subject is exactly one plain user ID.
    6. Not revoked, according to a fresh CRL (no fresh CRL: refuse).
    """
    if peer is None:
        return Verdict.deny(Reason.NO_CERTIFICATE)
    verdict = issuer_verdict or issued_by_trusted_ca(peer, anchors)
    if verdict.allowed:
        verdict = _check_time(peer, now)
    if verdict.allowed:
        verdict = shape_verdict or check_shape(peer)  # steps 4 and 5 (``shape_verdict``: cached)
    if verdict.allowed:
        verdict = revocation.check(peer.serial, peer.issuer, now, peer.issuer_key_id)
    return verdict


def _check_time(peer: PeerCertificate, now: dt.datetime) -> Verdict:
    if now < peer.not_before:
        return Verdict.deny(Reason.CERTIFICATE_NOT_YET_VALID, f"valid from {peer.not_before.isoformat()}")
    if now > peer.not_after:
        return Verdict.deny(Reason.CERTIFICATE_EXPIRED, f"expired {peer.not_after.isoformat()}")
    return Verdict.allow()

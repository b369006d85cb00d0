"""Is this client certificate acceptable right now? A pure decision.

OpenSSL has already verified the chain and signatures in the handshake (with
time checks moved here, see :mod:`gateway.tls.termination`). This module takes the leaf
(and the other certificates the client sent) as plain data, the trusted
issuers, a revocation state and ``now``, and returns a
:class:`~gateway.verdict.Verdict`. No I/O, no clock, no aiohttp: the same
function runs per request, in tests and in the login decision.

The certificate profile (what OpenSSL lets through and we do not):

* **Leaf** (:func:`check_leaf_profile`, :func:`check_usage`): X.509 v3;
  extendedKeyUsage present with clientAuth; keyUsage present with
  digitalSignature and without keyCertSign/cRLSign; an authorityKeyIdentifier
  with a keyIdentifier; no NameConstraints; a key from ``tls.key_types``
  (EC P-256/P-384, RSA >= ``tls.rsa_min_bits`` and a multiple of 8 by
  default; never DSA); rfc822Name and dNSName SANs that are well-formed.
* **CAs** (:func:`ca_problems`: configured ones when the config is loaded,
  presented ones per distinct chain): v3; basicConstraints critical with
  CA:TRUE; keyUsage with keyCertSign; a subjectKeyIdentifier; an AKI, if
  present, with a keyIdentifier (required when not self-signed);
  NameConstraints and PolicyConstraints critical (RFC 5280 4.2.1.10/11); a key
  from the same allow-list.
* **Chain** (:func:`check_chain`): at most ``tls.max_chain_depth``
  certificates (leaf included, copies of configured CAs not counted); every
  CA on the path from the leaf to its root inside its validity period
  (:func:`check_ca_dates`, per request: ``X509_V_FLAG_NO_CHECK_TIME`` switched
  OpenSSL's date checks off for the whole chain).

Everything but dates and revocation is time-independent and is judged once
per distinct chain (the caller caches :func:`check_shape` and
:func:`check_chain`).
"""

from __future__ import annotations

import datetime as dt
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.audit.events import serial_hex
from gateway.certs.revocation import RevocationState
from gateway.config import DEFAULT_KEY_TYPES
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
    presented: tuple[bytes, ...] = ()  # DER of the other certificates the client sent, in order

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


def parse_peer(der: bytes, presented: tuple[bytes, ...] = ()) -> PeerCertificate | None:
    """Parse a leaf; None when cryptography cannot read it (treated as malformed).

    ``presented`` is the rest of what the client sent (intermediates, maybe a
    root), kept as DER for :func:`check_chain`.
    """
    with warnings.catch_warnings():
        # cryptography warns (not fails) on over-long names; we judge them ourselves.
        warnings.simplefilter("ignore", UserWarning)
        return _parse_peer(der, presented)


def _parse_peer(der: bytes, presented: tuple[bytes, ...]) -> PeerCertificate | None:
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
            presented=presented,
        )
    except (ValueError, TypeError, UnicodeDecodeError):
        return None


_CURVES = {"secp256r1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """The key types and sizes accepted in client and CA certificates (``tls.key_types``, ``tls.rsa_min_bits``)."""

    key_types: frozenset[str] = frozenset(DEFAULT_KEY_TYPES)
    rsa_min_bits: int = 2048

    def problem(self, key: object) -> str | None:
        """Why this public key is not accepted, or None."""
        if isinstance(key, ec.EllipticCurvePublicKey):
            name = _CURVES.get(key.curve.name)
            return None if name in self.key_types else f"EC key on {key.curve.name} is not allowed"
        if isinstance(key, rsa.RSAPublicKey):
            bits = key.key_size
            if "rsa" not in self.key_types:
                return "RSA keys are not allowed"
            if bits < self.rsa_min_bits or bits % 8:
                return f"RSA-{bits} key is not allowed (at least {self.rsa_min_bits} bits, a multiple of 8)"
            return None
        return f"{type(key).__name__.lstrip('_')} keys are not allowed"


@dataclass(frozen=True, slots=True)
class TrustAnchors:
    """The CAs the operator trusts for client certificates, the CN they must carry, and the profile limits."""

    cas: tuple[x509.Certificate, ...]
    issuer_cn: str
    key_policy: KeyPolicy = KeyPolicy()
    max_chain_depth: int = 2  # certificates on a client's chain, leaf included
    ca_ders: frozenset[bytes] = frozenset()

    @classmethod
    def of(
        cls,
        cas: Sequence[x509.Certificate],
        issuer_cn: str,
        *,
        key_policy: KeyPolicy | None = None,
        max_chain_depth: int | None = None,
    ) -> TrustAnchors:
        """``max_chain_depth`` None: the longest path through the configured CAs plus the leaf."""
        depth = max_chain_depth or 1 + max((len(_path_up(ca, cas)) for ca in cas), default=1)
        ders = frozenset(ca.public_bytes(_DER) for ca in cas)
        return cls(tuple(cas), issuer_cn, key_policy or KeyPolicy(), depth, ders)


def _issuer_among(cert: x509.Certificate, candidates: Sequence[x509.Certificate]) -> x509.Certificate | None:
    """The candidate whose name and key issued ``cert``, if any."""
    for ca in candidates:
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return ca
    return None


def _self_issued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


def _path_up(ca: x509.Certificate, candidates: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """``ca`` and its issuers among ``candidates`` up to a self-issued root (loops and depth capped)."""
    path = [ca]
    while not _self_issued(path[-1]) and len(path) <= 10:
        parent = _issuer_among(path[-1], candidates)
        if parent is None or parent in path:
            break
        path.append(parent)
    return path


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
    if peer.extended_key_usage is None:
        return Verdict.deny(Reason.WRONG_KEY_USAGE, "no extendedKeyUsage (clientAuth required)")
    if ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string not in peer.extended_key_usage:
        return Verdict.deny(Reason.WRONG_KEY_USAGE, "extendedKeyUsage lacks clientAuth")
    try:
        usage = peer.certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return Verdict.deny(Reason.WRONG_KEY_USAGE, "no keyUsage (digitalSignature required)")
    if not usage.digital_signature:
        return Verdict.deny(Reason.WRONG_KEY_USAGE, "keyUsage lacks digitalSignature")
    if usage.key_cert_sign or usage.crl_sign:
        return Verdict.deny(Reason.WRONG_KEY_USAGE, "keyUsage of a CA (keyCertSign or cRLSign) in a client certificate")
    return Verdict.allow()


def check_leaf_profile(peer: PeerCertificate, policy: KeyPolicy) -> Verdict:
    """The client-certificate profile beyond usage: the shape our CA always issues (RFC 5280 4.1, 4.2)."""
    cert = peer.certificate
    if peer.issuer_key_id == b"":
        return Verdict.deny(Reason.MALFORMED_CERTIFICATE, "no authorityKeyIdentifier keyIdentifier")
    problem = policy.problem(cert.public_key())
    if problem is not None:
        return Verdict.deny(Reason.MALFORMED_CERTIFICATE, problem)
    try:
        cert.extensions.get_extension_for_class(x509.NameConstraints)
        return Verdict.deny(Reason.MALFORMED_CERTIFICATE, "nameConstraints in a client certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return Verdict.allow()
    for name in sans:
        problem = _san_problem(name)
        if problem is not None:
            return Verdict.deny(Reason.MALFORMED_CERTIFICATE, problem)
    return Verdict.allow()


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")


def _dns_name_ok(name: str) -> bool:
    """A preferred-syntax host name (RFC 5280 4.2.1.6, RFC 1034 3.5): no empty label, no wildcard."""
    labels = name.split(".")
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def _san_problem(name: x509.GeneralName) -> str | None:
    """Why a SAN entry is malformed (rfc822Name: one local@domain; dNSName: a host name), or None."""
    if isinstance(name, x509.RFC822Name):
        local, at, domain = name.value.rpartition("@")
        if not at or not _LOCAL_PART.fullmatch(local) or local.startswith(".") or not _dns_name_ok(domain):
            return f"malformed rfc822Name SAN {name.value!r}"
    elif isinstance(name, x509.DNSName) and not _dns_name_ok(name.value):
        return f"malformed dNSName SAN {name.value!r}"
    return None


def ca_problems(cert: x509.Certificate, policy: KeyPolicy) -> list[str]:
    """How a CA certificate departs from the profile (empty: acceptable). RFC 5280 4.2.1.1-4.2.1.11."""
    problems: list[str] = []
    if cert.version is not x509.Version.v3:
        return ["not an X.509 v3 certificate"]
    try:
        extensions = cert.extensions
    except ValueError as exc:
        return [f"unreadable extensions ({exc})"]

    def ext(kind: type[x509.ExtensionType]) -> x509.Extension[x509.ExtensionType] | None:
        try:
            return extensions.get_extension_for_class(kind)
        except x509.ExtensionNotFound:
            return None

    bc = ext(x509.BasicConstraints)
    if bc is None or not isinstance(bc.value, x509.BasicConstraints) or not bc.value.ca:
        problems.append("basicConstraints CA:TRUE missing")
    elif not bc.critical:
        problems.append("basicConstraints is not marked critical")
    usage = ext(x509.KeyUsage)
    if usage is None or not isinstance(usage.value, x509.KeyUsage) or not usage.value.key_cert_sign:
        problems.append("keyUsage keyCertSign missing")
    if ext(x509.SubjectKeyIdentifier) is None:
        problems.append("no subjectKeyIdentifier")
    aki = ext(x509.AuthorityKeyIdentifier)
    if aki is not None and isinstance(aki.value, x509.AuthorityKeyIdentifier) and not aki.value.key_identifier:
        problems.append("authorityKeyIdentifier without keyIdentifier")
    elif aki is None and not _self_issued(cert):
        problems.append("no authorityKeyIdentifier")
    for kind, label in ((x509.NameConstraints, "nameConstraints"), (x509.PolicyConstraints, "policyConstraints")):
        found = ext(kind)
        if found is not None and not found.critical:
            problems.append(f"{label} is not marked critical")
    try:
        problem = policy.problem(cert.public_key())
    except (ValueError, TypeError) as exc:
        problem = f"unreadable public key ({exc})"
    if problem is not None:
        problems.append(problem)
    return problems


@dataclass(frozen=True, slots=True)
class CaValidity:
    """One CA on a client's path, reduced to what the per-request date check needs."""

    subject: str
    not_before: dt.datetime
    not_after: dt.datetime


@dataclass(frozen=True, slots=True)
class ChainCheck:
    """The time-independent verdict on a client's chain, and the CA dates to check per request."""

    verdict: Verdict
    path: tuple[CaValidity, ...] = ()


_DER = serialization.Encoding.DER


def check_chain(peer: PeerCertificate, anchors: TrustAnchors) -> ChainCheck:
    """Depth and CA profile of what the client sent, and the path to check dates on (cache per chain).

    The path runs from the configured CA that issued the leaf up to its root,
    through the configured CAs (then the presented ones); OpenSSL verified
    the same path's signatures in the handshake.
    """
    presented: list[x509.Certificate] = []
    for der in peer.presented:
        if der in anchors.ca_ders or der == peer.der:
            continue  # a copy of a configured CA (browsers often send the root): checked at load
        try:
            presented.append(x509.load_der_x509_certificate(der))
        except ValueError:
            return ChainCheck(Verdict.deny(Reason.MALFORMED_CERTIFICATE, "an unreadable certificate in the chain"))
    if 1 + len(presented) > anchors.max_chain_depth:
        return ChainCheck(
            Verdict.deny(
                Reason.MALFORMED_CERTIFICATE,
                f"{1 + len(presented)} certificates sent, over tls.max_chain_depth {anchors.max_chain_depth}",
            )
        )
    for cert in presented:
        problems = ca_problems(cert, anchors.key_policy)
        if problems:
            return ChainCheck(
                Verdict.deny(
                    Reason.MALFORMED_CERTIFICATE, f"presented CA {cert.subject.rfc4514_string()!r}: {problems[0]}"
                )
            )
    issuer = _issuer_among(peer.certificate, anchors.cas)
    if issuer is None:
        return ChainCheck(Verdict.deny(Reason.UNTRUSTED_CERTIFICATE, "no configured CA issued the certificate"))
    path = _path_up(issuer, [*anchors.cas, *presented])
    if 1 + len(path) > anchors.max_chain_depth:
        return ChainCheck(
            Verdict.deny(
                Reason.MALFORMED_CERTIFICATE,
                f"a path of {1 + len(path)} certificates, over tls.max_chain_depth {anchors.max_chain_depth}",
            )
        )
    validity = tuple(
        CaValidity(ca.subject.rfc4514_string(), ca.not_valid_before_utc, ca.not_valid_after_utc) for ca in path
    )
    return ChainCheck(Verdict.allow(), validity)


def check_ca_dates(chain: ChainCheck, now: dt.datetime) -> Verdict:
    """Every CA on the path inside its validity period: a CA's expiry ends what it issued."""
    for ca in chain.path:
        if now > ca.not_after:
            return Verdict.deny(Reason.CA_EXPIRED, f"CA {ca.subject!r} expired {ca.not_after.isoformat()}")
        if now < ca.not_before:
            return Verdict.deny(Reason.CA_NOT_YET_VALID, f"CA {ca.subject!r} valid from {ca.not_before.isoformat()}")
    return Verdict.allow()


def expiring_cas(cas: Sequence[x509.Certificate], now: dt.datetime, within: dt.timedelta) -> list[str]:
    """Configured CAs that expire within ``within`` (or already have), for warnings: one line each."""
    lines = []
    for ca in cas:
        if ca.not_valid_after_utc <= now + within:
            state = "expired" if ca.not_valid_after_utc < now else "expires"
            lines.append(f"{ca.subject.rfc4514_string()} {state} {ca.not_valid_after_utc.isoformat()}")
    return lines


def check_shape(peer: PeerCertificate, policy: KeyPolicy | None = None) -> Verdict:
    """Steps 5 and 6 of :func:`check_certificate`: version, usage, profile, subject (time-independent, cacheable)."""
    if peer.certificate.version is not x509.Version.v3:
        return Verdict.deny(Reason.MALFORMED_CERTIFICATE, "not an X.509 v3 certificate")
    verdict = check_usage(peer)
    if verdict.allowed:
        verdict = check_leaf_profile(peer, policy or KeyPolicy())
    return check_subject(peer) if verdict.allowed else verdict


def check_certificate(
    peer: PeerCertificate | None,
    anchors: TrustAnchors,
    revocation: RevocationState,
    now: dt.datetime,
    *,
    issuer_verdict: Verdict | None = None,
    shape_verdict: Verdict | None = None,
    chain: ChainCheck | None = None,
) -> Verdict:
    """The whole certificate decision, in a fixed order; deny by default.

    1. A certificate was presented and parses.
    2. Issued by a trusted CA named ``tls.issuer`` (``issuer_verdict`` may be a cached step 2).
    3. The chain: depth and CA profile, then every CA inside its validity period
       (``chain`` may be a cached :func:`check_chain`; the dates are judged now).
    4. The leaf inside its validity period (the handshake skipped time checks on purpose).
    5. The client-certificate profile: v3, usable for client authentication (and a
       serial RFC 5280 4.1.2.2 allows), AKI, key type, no CA powers, well-formed SANs.
    6. The subject is exactly one plain user ID.
    7. Not revoked, according to a fresh CRL (no fresh CRL: refuse).
    """
    if peer is None:
        return Verdict.deny(Reason.NO_CERTIFICATE)
    verdict = issuer_verdict or issued_by_trusted_ca(peer, anchors)
    if verdict.allowed:
        chain = chain or check_chain(peer, anchors)
        verdict = chain.verdict
        if verdict.allowed:
            verdict = check_ca_dates(chain, now)
    if verdict.allowed:
        verdict = _check_time(peer, now)
    if verdict.allowed:
        verdict = shape_verdict or check_shape(peer, anchors.key_policy)  # steps 5 and 6 (``shape_verdict``: cached)
    if verdict.allowed:
        verdict = revocation.check(peer.serial, peer.issuer, now, peer.issuer_key_id)
    return verdict


def _check_time(peer: PeerCertificate, now: dt.datetime) -> Verdict:
    if now < peer.not_before:
        return Verdict.deny(Reason.CERTIFICATE_NOT_YET_VALID, f"valid from {peer.not_before.isoformat()}")
    if now > peer.not_after:
        return Verdict.deny(Reason.CERTIFICATE_EXPIRED, f"expired {peer.not_after.isoformat()}")
    return Verdict.allow()

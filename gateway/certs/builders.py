"""Certificate building: CA, server and client certificates, CRLs (PKCS#12 files: :mod:`gateway.certs.p12`).

Pure functions over keys and dates (no files, no clock): the demo, the tests
and the issuance service all build their PKI here, so what the tests exercise
is exactly what the CA issues. Extensions follow RFC 5280 and the CA/B
profile closely enough that OpenSSL, cryptography's verifier and
Windows/Chrome all accept the result (see ``build_client_cert``).
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, ObjectIdentifier

SSO_CA_NAME = "Tokyo Stock Exchange SSO CA"
SSO_CA_ORG = "Tokyo Stock Exchange"
CLIENT_VALIDITY_DAYS = 365
# Microsoft's User Principal Name otherName: where Windows expects a login ID.
UPN_OID = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")

KeyType = Literal["ec-p256", "rsa-2048", "rsa-3072"]
KEY_TYPES: tuple[KeyType, ...] = ("ec-p256", "rsa-2048", "rsa-3072")
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def generate_key(kind: KeyType = "ec-p256") -> PrivateKey:
    """A fresh private key of one of the supported types."""
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "rsa-3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise ValueError(f"unknown key type {kind!r}; expected one of {', '.join(KEY_TYPES)}")


def random_serial() -> int:
    """A positive 159-bit serial: RFC 5280 allows 20 octets, CA/B wants >= 64 random bits."""
    return secrets.randbits(159) | (1 << 127)


def ca_name(common_name: str = SSO_CA_NAME) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, SSO_CA_ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def build_ca(
    key: PrivateKey,
    *,
    now: dt.datetime,
    common_name: str = SSO_CA_NAME,
    days: int = 3650,
    name: x509.Name | None = None,
    path_length: int | None = 0,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    issuer: tuple[x509.Certificate, Any] | None = None,
    ski: bool = True,
    aki: Literal["keyid", "none", "issuer-only"] = "keyid",
    basic_constraints_critical: bool = True,
    crl_sign: bool = True,
    extra_extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
) -> x509.Certificate:
    """A CA certificate: self-signed root by default (pathlen 0: it signs only end entities).

    ``issuer`` (certificate, key) makes it an intermediate signed by that CA;
    it then carries an AKI with the issuer's key identifier. The other knobs
    exist so tests can build the malformed CAs the gateway must refuse
    (no SKI, an AKI without keyIdentifier, non-critical basicConstraints, no
    cRLSign, odd dates); the defaults are the profile the gateway requires.
    ``key`` is any key cryptography signs with (tests pass DSA on purpose).
    """
    subject = name or ca_name(common_name)
    public = key.public_key()
    signer_cert, signer_key = issuer if issuer is not None else (None, key)
    start = not_before or now - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_cert.subject if signer_cert is not None else subject)
        .public_key(public)
        .serial_number(random_serial())
        .not_valid_before(start)
        .not_valid_after(not_after or now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=basic_constraints_critical)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=crl_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if ski:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    if aki == "keyid" and signer_cert is not None:
        builder = builder.add_extension(_key_id_aki(signer_cert), critical=False)
    elif aki == "issuer-only":
        issuer_name = signer_cert.subject if signer_cert is not None else subject
        serial = signer_cert.serial_number if signer_cert is not None else 1
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier(None, [x509.DirectoryName(issuer_name)], serial), critical=False
        )
    for extension, critical in extra_extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signer_key, hashes.SHA256())


def _key_id_aki(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """An AKI naming the issuer's key: its SKI, or RFC 5280's SHA-1 of its key when it has none."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        ski = x509.SubjectKeyIdentifier.from_public_key(ca_cert.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _leaf_key_usage(*, key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_builder(
    ca_cert: x509.Certificate,
    public_key: PublicKey,
    subject: x509.Name,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    serial: int,
    aki: bool = True,
) -> x509.CertificateBuilder:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    return builder.add_extension(_key_id_aki(ca_cert), critical=False) if aki else builder


MAX_CN_LENGTH = 64  # RFC 5280 ub-common-name
MAX_DNS_NAME = 253
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def server_name_problem(name: str) -> str | None:
    """Why ``name`` is neither an IP address nor an RFC 1123 host name, or None when it is one.

    Host names: labels of letters, digits and inner hyphens, 1 to 63
    characters each, 253 characters in all (a final dot is allowed). IPv4 and
    IPv6 addresses become IP SANs. Wildcards are not issued.
    """
    try:
        ip_address(name)
        return None
    except ValueError:
        pass
    if not name:
        return "empty host name"
    host = name[:-1] if name.endswith(".") else name
    if len(host) > MAX_DNS_NAME:
        return f"host name {name[:40]!r}... is {len(host)} characters; at most {MAX_DNS_NAME}"
    if all(label.isdigit() for label in host.split(".")):
        return f"host name {name!r} looks like an IP address but is not one"
    for label in host.split("."):
        if len(label) > 63:
            return f"host name {name!r}: label {label[:20]!r}... is {len(label)} characters; at most 63"
        if not _DNS_LABEL.fullmatch(label):
            return (
                f"host name {name!r} is not a DNS name or IP address "
                "(labels of letters, digits and inner hyphens, separated by dots)"
            )
    return None


def server_subject(hostnames: Sequence[str]) -> x509.Name:
    """CN = the first name that fits the 64-character CN limit; none fits: an empty subject (the SANs name it).

    Clients match host names against the SANs only (RFC 6125); the CN is for
    people reading the certificate, so a long name costs nothing but the CN.
    """
    for host in hostnames:
        if len(host) <= MAX_CN_LENGTH:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    return x509.Name([])


def build_server_cert(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    public_key: PublicKey,
    hostnames: Sequence[str],
    *,
    now: dt.datetime,
    days: int = 397,
) -> x509.Certificate:
    """A TLS server certificate for the given DNS names and IP addresses."""
    if not hostnames:
        raise ValueError("a server certificate needs at least one host name")
    for host in hostnames:
        problem = server_name_problem(host)
        if problem:
            raise ValueError(problem)
    sans: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            sans.append(x509.IPAddress(ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    subject = server_subject(hostnames)
    return (
        _leaf_builder(
            ca_cert,
            public_key,
            subject,
            not_before=now - dt.timedelta(minutes=5),
            not_after=now + dt.timedelta(days=days),
            serial=random_serial(),
        )
        # An empty subject makes the SANs the only name, so they must be critical (RFC 5280 4.2.1.6).
        .add_extension(x509.SubjectAlternativeName(sans), critical=len(subject) == 0)
        .add_extension(
            _leaf_key_usage(key_encipherment=isinstance(public_key, rsa.RSAPublicKey)),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def client_subject(user_id: str) -> x509.Name:
    """Subject of a user's certificate: CN = the user ID, nothing else to compare."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user_id)])


def build_client_cert(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    public_key: PublicKey,
    user_id: str,
    *,
    not_before: dt.datetime,
    days: int = CLIENT_VALIDITY_DAYS,
    serial: int | None = None,
    crl_url: str | None = None,
    windows_login: str | None = None,
    subject: x509.Name | None = None,
    eku: Sequence[ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    hash_algorithm: hashes.HashAlgorithm | None = None,
    extra_extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
    aki: bool = True,
    key_usage: x509.KeyUsage | None = None,
) -> x509.Certificate:
    """A user's client certificate: CN = user ID, EKU clientAuth, 365 days.

    Extensions: basicConstraints CA:FALSE, keyUsage digitalSignature (plus
    keyEncipherment for RSA, which Windows' TLS 1.2 RSA key exchange wants),
    EKU clientAuth, SKI/AKI, an optional CRL distribution point and an
    optional UPN otherName carrying the terminal's Windows login ID. The
    ``subject``, ``eku``, ``hash_algorithm``, ``extra_extensions``, ``aki`` and
    ``key_usage`` knobs exist so tests can build the odd certificates the
    gateway must refuse.
    """
    builder = _leaf_builder(
        ca_cert,
        public_key,
        subject if subject is not None else client_subject(user_id),
        not_before=not_before,
        not_after=not_before + dt.timedelta(days=days),
        serial=serial if serial is not None else random_serial(),
        aki=aki,
    ).add_extension(
        key_usage or _leaf_key_usage(key_encipherment=isinstance(public_key, rsa.RSAPublicKey)),
        critical=True,
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if crl_url:
        point = x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(crl_url)],
            relative_name=None,
            reasons=None,
            crl_issuer=None,
        )
        builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
    if windows_login:
        upn = x509.OtherName(UPN_OID, _der_utf8string(windows_login))
        builder = builder.add_extension(x509.SubjectAlternativeName([upn]), critical=False)
    for extension, critical in extra_extensions:
        builder = builder.add_extension(extension, critical=critical)
    # Tests pass SHA-1 on purpose (hostile input); cryptography's stubs list only SHA-2/3.
    algorithm: Any = hash_algorithm or hashes.SHA256()
    return builder.sign(ca_key, algorithm)


def windows_login_of(cert: x509.Certificate) -> str | None:
    """The Windows login ID recorded in a client certificate, if any."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for name in san.get_values_for_type(x509.OtherName):
        if name.type_id == UPN_OID:
            return _parse_der_utf8string(name.value)
    return None


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_utf8string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return b"\x0c" + _der_length(len(raw)) + raw


def _parse_der_utf8string(der: bytes) -> str | None:
    if len(der) < 2 or der[0] != 0x0C:
        return None
    length, offset = der[1], 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(der[2 : 2 + size], "big")
        offset = 2 + size
    return der[offset : offset + length].decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    """One line of a CRL: which serial, since when, and why (RFC 5280 5.3.1)."""

    serial: int
    revoked_at: dt.datetime
    reason: x509.ReasonFlags | None = None


def build_crl(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    revoked: Iterable[RevokedEntry],
    *,
    this_update: dt.datetime,
    next_update: dt.datetime,
    number: int | None,
    number_critical: bool = False,
) -> x509.CertificateRevocationList:
    """A full CRL signed by the CA, with a CRL number and the CA's key identifier.

    The revoked list is handed to the builder's constructor in one go:
    ``add_revoked_certificate`` copies the whole list on every call, which is
    quadratic: ~22 s for 100,000 entries against ~1 s this way (bench/crl_bench.py).
    ``number=None`` and ``number_critical`` build the CRLs the gateway refuses (tests).
    """
    if next_update < this_update:
        raise ValueError("a CRL's nextUpdate must not be before its thisUpdate")
    aki = _key_id_aki(ca_cert)
    extensions: list[x509.Extension[x509.ExtensionType]] = [x509.Extension(aki.oid, False, aki)]
    if number is not None:
        extensions.insert(0, x509.Extension(ExtensionOID.CRL_NUMBER, number_critical, x509.CRLNumber(number)))
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=ca_cert.subject,
        last_update=this_update,
        next_update=next_update,
        extensions=extensions,
        revoked_certificates=[_revoked_certificate(entry) for entry in revoked],
    )
    return builder.sign(ca_key, hashes.SHA256())


def _revoked_certificate(entry: RevokedEntry) -> x509.RevokedCertificate:
    """One CRL entry; reason ``unspecified`` is omitted, as RFC 5280 5.3.1 asks."""
    rb = x509.RevokedCertificateBuilder().serial_number(entry.serial).revocation_date(entry.revoked_at)
    if entry.reason is not None and entry.reason is not x509.ReasonFlags.unspecified:
        rb = rb.add_extension(x509.CRLReason(entry.reason), critical=False)
    return rb.build()


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """Lower-case hex SHA-256 of the DER certificate (Envoy's XFCC ``Hash``)."""
    return cert.fingerprint(hashes.SHA256()).hex()

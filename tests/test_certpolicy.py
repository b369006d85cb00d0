"""The pure certificate decision: each step refuses alone, and a good certificate passes all."""

from __future__ import annotations

import datetime as dt
import warnings

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.certs import builders as pki
from gateway.certs.policy import TrustAnchors, check_certificate, parse_peer
from gateway.certs.revocation import RevocationState, parse_crl

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
KEY = pki.generate_key()
CA = pki.build_ca(KEY, now=NOW - dt.timedelta(days=10))
ANCHORS = TrustAnchors.of([CA], "Tokyo Stock Exchange SSO CA")


def state(revoked: tuple[int, ...] = ()) -> RevocationState:
    crl = pki.build_crl(
        CA,
        KEY,
        [pki.RevokedEntry(s, NOW) for s in revoked],
        this_update=NOW,
        next_update=NOW + dt.timedelta(days=1),
        number=1,
    )
    snap = parse_crl(crl.public_bytes(Encoding.DER), [CA.public_bytes(Encoding.DER)], NOW)
    return RevocationState().with_snapshot(snap)


def leaf(user: str = "LC000001", **kw: object) -> x509.Certificate:
    kw.setdefault("not_before", NOW - dt.timedelta(days=1))
    return pki.build_client_cert(CA, KEY, pki.generate_key().public_key(), user, **kw)  # type: ignore[arg-type]


def judge(cert: x509.Certificate, revocation: RevocationState | None = None, now: dt.datetime = NOW) -> str:
    peer = parse_peer(cert.public_bytes(Encoding.DER))
    return check_certificate(peer, ANCHORS, revocation or state(), now).reason


def test_good_certificate_passes() -> None:
    assert judge(leaf()) == "ok"


def test_no_certificate() -> None:
    assert check_certificate(None, ANCHORS, state(), NOW).reason == "no_certificate"


def test_lookalike_issuer_is_untrusted() -> None:
    fake_key = pki.generate_key()
    fake_ca = pki.build_ca(fake_key, now=NOW - dt.timedelta(days=1))
    cert = pki.build_client_cert(fake_ca, fake_key, pki.generate_key().public_key(), "LC000001", not_before=NOW)
    assert judge(cert) == "untrusted_certificate"


def test_wrong_issuer_name_is_untrusted() -> None:
    anchors = TrustAnchors.of([CA], "TSE-CA2")
    peer = parse_peer(leaf().public_bytes(Encoding.DER))
    assert check_certificate(peer, anchors, state(), NOW).reason == "untrusted_certificate"


def test_validity_edges() -> None:
    cert = leaf(not_before=NOW - dt.timedelta(hours=12), days=1)  # ends while the CRL is fresh
    assert judge(cert, now=cert.not_valid_after_utc) == "ok"
    assert judge(cert, now=cert.not_valid_after_utc + dt.timedelta(seconds=1)) == "certificate_expired"
    assert judge(cert, now=cert.not_valid_before_utc - dt.timedelta(seconds=1)) == "certificate_not_yet_valid"


def test_key_usage() -> None:
    assert judge(leaf(eku=[ExtendedKeyUsageOID.SERVER_AUTH])) == "wrong_key_usage"
    # EKU absent means "any usage" in RFC 5280 4.2.1.12; the client-certificate profile requires clientAuth.
    assert judge(leaf(eku=None)) == "wrong_key_usage"
    assert judge(leaf(eku=[ExtendedKeyUsageOID.CLIENT_AUTH])) == "ok"


@pytest.mark.parametrize("cn", ["", "LC 1", "LC\x00001", "a" * 65, "ＬＣ000001", "LC000001\u200b", "-LC"])
def test_malformed_subjects(cn: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # cryptography warns about the 65-character CN
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False)]) if cn else x509.Name([])
    assert judge(leaf(subject=subject)) == "malformed_subject"


def test_revoked_and_stale() -> None:
    cert = leaf()
    assert judge(cert, state((cert.serial_number,))) == "certificate_revoked"
    assert judge(cert, now=NOW + dt.timedelta(days=3)) == "revocation_unavailable"
    assert judge(cert, RevocationState()) == "revocation_unavailable"


def test_leaf_key_allow_list() -> None:
    """DSA and odd RSA sizes are refused (malformed_certificate); the allowed types pass (the twins)."""
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

    from gateway.certs.policy import KeyPolicy, check_shape

    def shape(public_key: object, policy: KeyPolicy | None = None) -> str:
        cert = pki.build_client_cert(CA, KEY, public_key, "LC000001", not_before=NOW)  # type: ignore[arg-type]
        peer = parse_peer(cert.public_bytes(Encoding.DER))
        assert peer is not None
        return check_shape(peer, policy).reason

    assert shape(dsa.generate_private_key(2048).public_key()) == "malformed_certificate"
    assert shape(rsa.generate_private_key(65537, 2056).public_key()) == "ok"
    assert shape(rsa.generate_private_key(65537, 2052).public_key()) == "malformed_certificate"
    assert shape(ec.generate_private_key(ec.SECP384R1()).public_key()) == "ok"
    assert shape(ec.generate_private_key(ec.SECP521R1()).public_key()) == "malformed_certificate"
    assert shape(ec.generate_private_key(ec.SECP521R1()).public_key(), KeyPolicy(frozenset({"ec-p521"}))) == "ok"

"""The certificate profile, end to end: each defect refused through real TLS, each beside its accepted twin.

Chains are built with the project's own builders (:mod:`gateway.certs.builders`), served
by a real gateway (:mod:`tests.harness`), presented by a real TLS client that
loads leaf + intermediates. Four classes, as a path-validation suite sees them:

1. CA dates: an expired or not-yet-valid root or intermediate ends what it
   issued (``ca_expired`` / ``ca_not_yet_valid``), although OpenSSL's own date
   checks are off (``X509_V_FLAG_NO_CHECK_TIME``, for the leaf's friendly page).
2. The client-certificate profile: v3, clientAuth EKU, no CA key usage, no
   NameConstraints, an AKI, an allowed key, well-formed SANs.
3. CAs: configured ones are refused when the configuration is loaded (naming
   file and defect); presented ones are held to the same profile; chain depth.
4. CRLs: no cRLNumber, a critical cRLNumber, a signer without cRLSign.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

from gateway.certs import builders as pki
from gateway.certs.files import ThrowawayPki, issue_client_files, write_atomic, write_private_key
from gateway.config import load_config
from gateway.errors import GatewayError, PkiError
from gateway.server import load_tls_state
from tests.harness import Harness, start_harness, write_config
from tests.test_hostile_certs import _der, _tlv

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)
ROOT_NAME = "TSE Root CA"
SIGN = tuple[x509.Certificate, Any]

_KEYS: dict[str, Any] = {}


def key(kind: str = "ec-p256") -> Any:
    """Fresh EC keys; the slow ones (RSA-2052, DSA) are made once per run."""
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind not in _KEYS:
        if kind.startswith("rsa-"):
            _KEYS[kind] = rsa.generate_private_key(public_exponent=65537, key_size=int(kind[4:]))
        elif kind == "dsa":
            _KEYS[kind] = dsa.generate_private_key(2048)
    return _KEYS[kind]


def root(kind: str = "ec-p256", **build: Any) -> SIGN:
    k = key(kind)
    build.setdefault("common_name", pki.SSO_CA_NAME)
    return pki.build_ca(k, now=NOW, **build), k


def intermediate(parent: SIGN, kind: str = "ec-p256", **build: Any) -> SIGN:
    k = key(kind)
    return pki.build_ca(k, now=NOW, common_name=pki.SSO_CA_NAME, issuer=parent, **build), k


def leaf(issuer: SIGN, kind: str = "ec-p256", **build: Any) -> tuple[x509.Certificate, Any]:
    k = key(kind)
    build.setdefault("not_before", NOW - dt.timedelta(minutes=1))
    return pki.build_client_cert(issuer[0], issuer[1], k.public_key(), "LC000001", **build), k


def as_v1(cert: x509.Certificate, ca_key: Any) -> x509.Certificate:
    """The same certificate as X.509 v1: version and extensions cut from the TBS, signed again."""
    der = cert.public_bytes(serialization.Encoding.DER)
    body, _, _ = _tlv(der, 0)
    tbs_body, _, tbs_end = _tlv(der, body)
    _, _, alg_end = _tlv(der, tbs_end)
    fields, pos = [], tbs_body
    while pos < tbs_end:
        _, _, end = _tlv(der, pos)
        fields.append(der[pos:end])
        pos = end
    kept = [f for f in fields if f[0] not in (0xA0, 0xA3)]  # [0] version, [3] extensions
    tbs = _der(0x30, b"".join(kept))
    signature = ca_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return x509.load_der_x509_certificate(_der(0x30, tbs + der[tbs_end:alg_end] + _der(0x03, b"\x00" + signature)))


@dataclass
class Chain:
    """What one case configures and presents: configured CAs, the leaf's issuer, leaf, extras sent."""

    cas: list[x509.Certificate]
    issuer: SIGN
    leaf: x509.Certificate
    leaf_key: Any
    presented: list[x509.Certificate] = field(default_factory=list)
    tls: dict[str, Any] = field(default_factory=dict)


def simple(**leaf_build: Any) -> Chain:
    r = root()
    cert, k = leaf(r, **leaf_build)
    return Chain([r[0]], r, cert, k)


def two_level(inter_build: dict[str, Any] | None = None, **leaf_build: Any) -> Chain:
    r = root(common_name=ROOT_NAME, path_length=1)
    i = intermediate(r, path_length=0, **(inter_build or {}))
    cert, k = leaf(i, **leaf_build)
    return Chain([r[0], i[0]], i, cert, k, presented=[i[0]])


def with_root(**root_build: Any) -> Chain:
    r = root(**root_build)
    cert, k = leaf(r)
    return Chain([r[0]], r, cert, k)


def v1_leaf() -> Chain:
    chain = simple()
    chain.leaf = as_v1(chain.leaf, chain.issuer[1])
    return chain


def key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(True, False, False, False, False, cert_sign, False, False, False)


NAME_CONSTRAINTS = x509.NameConstraints(
    permitted_subtrees=[x509.RFC822Name("example.com"), x509.DNSName("example.com")], excluded_subtrees=None
)


def constrained(san: x509.GeneralName) -> Chain:
    """A leaf with ``san`` under a name-constrained intermediate (OpenSSL lets malformed names through)."""
    return two_level(
        {"extra_extensions": [(NAME_CONSTRAINTS, True)]},
        extra_extensions=[(x509.SubjectAlternativeName([san]), False)],
    )


def presenting(*extra: Callable[[], SIGN], **tls: Any) -> Chain:
    chain = simple()
    chain.presented = [make()[0] for make in extra]
    chain.tls = tls
    return chain


def stranger(kind: str = "ec-p256", **build: Any) -> SIGN:
    return root(kind, common_name="Somebody Else CA", **build)


RSA_2052 = "rsa-2052"
CASES: dict[str, tuple[Callable[[], Chain], str]] = {
    # 1. CA dates (OpenSSL's date checks are off for the whole chain: ours decide).
    "root-valid": (with_root, "ok"),
    "root-expired": (lambda: with_root(not_before=NOW - 400 * DAY, not_after=NOW - DAY), "ca_expired"),
    "root-not-yet-valid": (lambda: with_root(not_before=NOW + DAY, days=3650), "ca_not_yet_valid"),
    "intermediate-valid": (two_level, "ok"),
    "intermediate-expired": (
        lambda: two_level({"not_before": NOW - 400 * DAY, "not_after": NOW - DAY}),
        "ca_expired",
    ),
    "intermediate-not-yet-valid": (lambda: two_level({"not_before": NOW + DAY, "days": 3650}), "ca_not_yet_valid"),
    # 2. The client-certificate profile.
    "leaf-v3": (simple, "ok"),
    "leaf-v1": (v1_leaf, "malformed_certificate"),
    "leaf-digital-signature": (lambda: simple(key_usage=key_usage(False)), "ok"),
    "leaf-key-cert-sign": (lambda: simple(key_usage=key_usage(True)), "wrong_key_usage"),
    "leaf-name-constraints": (
        lambda: simple(extra_extensions=[(NAME_CONSTRAINTS, True)]),
        "malformed_certificate",
    ),
    "leaf-without-aki": (lambda: simple(aki=False), "malformed_certificate"),
    "leaf-without-eku": (lambda: simple(eku=None), "wrong_key_usage"),
    "leaf-ec-p384": (lambda: simple(kind="ec-p384"), "ok"),
    "leaf-rsa-2048": (lambda: simple(kind="rsa-2048"), "ok"),
    "leaf-rsa-2052": (lambda: simple(kind=RSA_2052), "malformed_certificate"),
    "san-email": (lambda: constrained(x509.RFC822Name("user@example.com")), "ok"),
    "san-email-two-ats": (
        lambda: constrained(x509.RFC822Name._init_without_validation("invalid@address@example.com")),
        "malformed_certificate",
    ),
    "san-dns": (lambda: constrained(x509.DNSName("host.example.com")), "ok"),
    "san-dns-leading-dot": (lambda: constrained(x509.DNSName(".example.com")), "malformed_certificate"),
    # 3. Presented CAs: the same profile as configured ones, and a depth limit.
    "presented-ca-good": (lambda: presenting(stranger), "ok"),
    "presented-ca-dsa": (lambda: presenting(lambda: stranger("dsa")), "malformed_certificate"),
    "presented-ca-rsa-2052": (lambda: presenting(lambda: stranger(RSA_2052)), "malformed_certificate"),
    "presented-ca-without-ski": (lambda: presenting(lambda: stranger(ski=False)), "malformed_certificate"),
    "presented-ca-bc-not-critical": (
        lambda: presenting(lambda: stranger(basic_constraints_critical=False)),
        "malformed_certificate",
    ),
    "presented-ca-aki-without-keyid": (
        lambda: presenting(lambda: stranger(aki="issuer-only")),
        "malformed_certificate",
    ),
    "presented-depth-within": (lambda: presenting(stranger, max_chain_depth=3), "ok"),
    "presented-too-deep": (lambda: presenting(stranger, stranger), "malformed_certificate"),
    "path-depth-default": (two_level, "ok"),
    "path-too-deep": (lambda: _with_tls(two_level(), max_chain_depth=2), "malformed_certificate"),
}


def _with_tls(chain: Chain, **tls: Any) -> Chain:
    chain.tls = tls
    return chain


def write_pki(directory: Path, chain: Chain, *, crl: x509.CertificateRevocationList | None = None) -> ThrowawayPki:
    """Files for a harness: the configured CA bundle, a server certificate from its own CA, the issuer's CRL."""
    directory.mkdir(parents=True, exist_ok=True)
    server_ca_key = pki.generate_key()
    server_ca = pki.build_ca(server_ca_key, now=NOW, common_name="Server CA")
    server_key = pki.generate_key()
    server = pki.build_server_cert(server_ca, server_ca_key, server_key.public_key(), ["127.0.0.1"], now=NOW)
    issuer_cert, issuer_key = chain.issuer
    if crl is None:  # (a CRL with no entries is falsy: it has a length)
        crl = pki.build_crl(issuer_cert, issuer_key, [], this_update=NOW, next_update=NOW + DAY, number=1)
    paths = {n: directory / n for n in ("ca.pem", "ca.key", "server.crt", "server.key", "ca.crl")}
    write_atomic(paths["ca.pem"], b"".join(pki.cert_pem(c) for c in chain.cas))
    write_private_key(paths["ca.key"], issuer_key)
    write_atomic(paths["server.crt"], pki.cert_pem(server))
    write_private_key(paths["server.key"], server_key)
    write_atomic(paths["ca.crl"], crl.public_bytes(serialization.Encoding.PEM))
    return ThrowawayPki(
        directory, paths["ca.pem"], paths["ca.key"], paths["server.crt"], paths["server.key"], paths["ca.crl"],
        issuer_cert, issuer_key, {},
    )  # fmt: skip


def tls_extra(the_pki: ThrowawayPki, **more: Any) -> dict[str, Any]:
    section = {"cert": str(the_pki.server_cert), "key": str(the_pki.server_key), "client_ca": str(the_pki.ca_cert)}
    return {"tls": {**section, **more}}


async def present(h: Harness, chain: Chain, directory: Path) -> tuple[int, str]:
    """(HTTP status, reason) for one request presenting leaf + the chain's extras; (0, "handshake") if refused there."""
    cert_path, key_path = directory / "client.pem", directory / "client.key"
    write_atomic(cert_path, b"".join(pki.cert_pem(c) for c in [chain.leaf, *chain.presented]))
    write_private_key(key_path, chain.leaf_key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # this client judges nothing: the gateway does
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.load_cert_chain(cert_path, key_path)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.worker.port, ssl=ctx)
        try:
            writer.write(
                b"GET /onre/a HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
    except (ssl.SSLError, ConnectionError):
        return 0, "handshake"
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head[9:12])
    return status, "ok" if status == 200 else yaml.safe_load(body)["error"]


@pytest.mark.parametrize("case", list(CASES))
async def test_chain_profile(tmp_path: Path, case: str) -> None:
    build, expected = CASES[case]
    chain = build()
    the_pki = write_pki(tmp_path / "pki", chain)
    h = await start_harness(tmp_path, the_pki, extra=tls_extra(the_pki, **chain.tls))
    try:
        status, reason = await present(h, chain, tmp_path)
        assert reason == expected, (status, reason, [e.detail for e in h.audit.events[-1:]])
        if expected != "ok":
            assert status == 403
            event = h.audit.events[-1]
            assert (event.event, event.reason, event.cert_subject) == ("request_refused", expected, "LC000001")
    finally:
        await h.close()


# --- configured CAs: refused when the configuration is loaded ----------------------------


CONFIGURED: dict[str, tuple[Callable[[], Chain], str | None]] = {
    "root-good": (with_root, None),
    "root-without-ski": (lambda: with_root(ski=False), "no subjectKeyIdentifier"),
    "root-bc-not-critical": (lambda: with_root(basic_constraints_critical=False), "basicConstraints is not marked"),
    "root-aki-without-keyid": (lambda: with_root(aki="issuer-only"), "authorityKeyIdentifier without keyIdentifier"),
    "root-dsa": (lambda: root_chain("dsa"), "DSAPublicKey keys are not allowed"),
    "root-rsa-2052": (lambda: root_chain(RSA_2052), "RSA-2052 key is not allowed"),
    "root-rsa-2048": (lambda: root_chain("rsa-2048"), None),
    "intermediate-good": (two_level, None),
    "intermediate-without-aki": (lambda: two_level({"aki": "none"}), "no authorityKeyIdentifier"),
    "intermediate-without-ski": (lambda: two_level({"ski": False}), "no subjectKeyIdentifier"),
    "intermediate-policy-constraints-not-critical": (
        lambda: two_level({"extra_extensions": [(x509.PolicyConstraints(0, None), False)]}),
        "policyConstraints is not marked critical",
    ),
    "intermediate-policy-constraints-critical": (
        lambda: two_level({"extra_extensions": [(x509.PolicyConstraints(0, None), True)]}),
        None,
    ),
}


def root_chain(kind: str) -> Chain:
    r = root(kind)
    cert, k = leaf(r)
    return Chain([r[0]], r, cert, k)


@pytest.mark.parametrize("case", list(CONFIGURED))
def test_configured_ca_profile_checked_at_load(tmp_path: Path, case: str) -> None:
    build, problem = CONFIGURED[case]
    chain = build()
    the_pki = write_pki(tmp_path / "pki", chain)
    config = load_config(write_config(tmp_path, the_pki, {n: 1 for n in ("tdnet", "j-iriss", "clearing")}))
    if problem is None:
        assert load_tls_state(config).anchors.cas == tuple(chain.cas)
        return
    with pytest.raises(PkiError) as info:
        load_tls_state(config)
    assert str(the_pki.ca_cert) in str(info.value) and problem in str(info.value)


async def test_malformed_configured_ca_refuses_start_up_and_reload(tmp_path: Path) -> None:
    good = with_root()
    the_pki = write_pki(tmp_path / "pki", good)
    h = await start_harness(tmp_path, the_pki, extra=tls_extra(the_pki))
    try:
        assert await present(h, good, tmp_path) == (200, "ok")
        bad = with_root(ski=False)
        write_atomic(the_pki.ca_cert, pki.cert_pem(bad.cas[0]))
        ok, message = await h.worker.reload()
        assert not ok and "no subjectKeyIdentifier" in message and str(the_pki.ca_cert) in message
        assert await present(h, good, tmp_path) == (200, "ok")  # still the previous configuration
    finally:
        await h.close()
    with pytest.raises(PkiError, match="no subjectKeyIdentifier"):
        await start_harness(tmp_path / "again", the_pki, extra=tls_extra(the_pki))


def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_names_the_file_and_the_defect(tmp_path: Path) -> None:
    chain = with_root(basic_constraints_critical=False)
    the_pki = write_pki(tmp_path / "pki", chain)
    result = check_config(write_config(tmp_path, the_pki, {n: 1 for n in ("tdnet", "j-iriss", "clearing")}))
    assert result.returncode != 0
    assert str(the_pki.ca_cert) in result.stderr and "basicConstraints is not marked critical" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_warns_about_a_ca_expiring_within_30_days(tmp_path: Path) -> None:
    for name, days, warned in (("soon", 20, True), ("later", 40, False)):
        chain = with_root(days=days)
        the_pki = write_pki(tmp_path / name, chain)
        result = check_config(write_config(tmp_path / name, the_pki, {n: 1 for n in ("tdnet", "j-iriss", "clearing")}))
        assert result.returncode == 0, result.stderr
        assert ("warning: tls.client_ca" in result.stderr and "expires" in result.stderr) is warned, result.stderr


async def test_healthz_names_a_ca_expiring_within_30_days(tmp_path: Path) -> None:
    chain = with_root(days=20)
    the_pki = write_pki(tmp_path / "pki", chain)
    h = await start_harness(tmp_path, the_pki, extra=tls_extra(the_pki))
    try:
        ok, detail = h.worker.health()
        assert ok and len(detail["ca_expiring"]) == 1 and "expires" in detail["ca_expiring"][0]
    finally:
        await h.close()
    later = with_root(days=40)
    the_pki = write_pki(tmp_path / "pki2", later)
    h = await start_harness(tmp_path / "pki2", the_pki, extra=tls_extra(the_pki))
    try:
        assert h.worker.health()[1]["ca_expiring"] == []
    finally:
        await h.close()


# --- CRLs ------------------------------------------------------------------------------------


def crl_for(chain: Chain, revoked: tuple[int, ...] = (), **build: Any) -> x509.CertificateRevocationList:
    build.setdefault("number", 2)
    issuer_cert, issuer_key = chain.issuer
    entries = [pki.RevokedEntry(s, NOW) for s in revoked]
    return pki.build_crl(issuer_cert, issuer_key, entries, this_update=NOW, next_update=NOW + DAY, **build)


CRL_DEFECTS: dict[str, tuple[Callable[[], Chain], dict[str, Any], str | None]] = {
    "good": (with_root, {}, None),
    "no-crl-number": (with_root, {"number": None}, "no cRLNumber"),
    "critical-crl-number": (with_root, {"number_critical": True}, "cRLNumber is marked critical"),
    "signer-without-crl-sign": (lambda: with_root(crl_sign=False), {}, "lacks the cRLSign key usage"),
}


@pytest.mark.parametrize("case", list(CRL_DEFECTS))
async def test_crl_profile_at_start_up(tmp_path: Path, case: str) -> None:
    """Start-up: a CRL outside the profile refuses the configuration, as a reload does."""
    build, crl_build, problem = CRL_DEFECTS[case]
    chain = build()
    the_pki = write_pki(tmp_path / "pki", chain, crl=crl_for(chain, **crl_build))
    if problem is not None:
        with pytest.raises(GatewayError, match=f"CRL source not loaded: .*{problem}"):
            await start_harness(tmp_path, the_pki, extra=tls_extra(the_pki))
        return
    h = await start_harness(tmp_path, the_pki, extra=tls_extra(the_pki))
    try:
        assert await present(h, chain, tmp_path) == (200, "ok")
    finally:
        await h.close()


@pytest.mark.parametrize("case", [c for c in CRL_DEFECTS if c != "signer-without-crl-sign"])
async def test_crl_profile_on_refresh_keeps_the_last_good_crl(tmp_path: Path, case: str) -> None:
    """A refresh bringing a CRL outside the profile (revoking the user) is refused; the last good CRL stays."""
    _, crl_build, problem = CRL_DEFECTS[case]
    chain = with_root()
    the_pki = write_pki(tmp_path / "pki", chain)
    h = await start_harness(tmp_path, the_pki, extra=tls_extra(the_pki))
    try:
        assert await present(h, chain, tmp_path) == (200, "ok")
        write_atomic(the_pki.crl, crl_for(chain, (chain.leaf.serial_number,), **crl_build).public_bytes(
            serialization.Encoding.DER
        ))  # fmt: skip
        assert h.worker.runtime is not None
        await h.worker.runtime.refresher.refresh_all()
        errors = h.worker.runtime.refresher.last_error
        if problem is None:  # the twin: the same CRL, made correct, revokes
            assert not errors
            assert await present(h, chain, tmp_path) == (403, "certificate_revoked")
        else:
            assert problem in errors[str(the_pki.crl)]
            assert await present(h, chain, tmp_path) == (200, "ok")
    finally:
        await h.close()


def test_demo_and_issued_certificates_pass_the_profile(tmp_path: Path) -> None:
    """The throwaway PKI (demo, tests) and the CA's issuance produce what the profile requires."""
    from gateway.certs.files import make_throwaway_pki
    from gateway.certs.policy import KeyPolicy, TrustAnchors, ca_problems, check_chain, check_shape, parse_peer

    the_pki = make_throwaway_pki(tmp_path, users=("LC000001",))
    assert ca_problems(the_pki.ca_certificate, KeyPolicy()) == []
    anchors = TrustAnchors.of([the_pki.ca_certificate], pki.SSO_CA_NAME)
    for kind in pki.KEY_TYPES:
        files = issue_client_files(tmp_path / kind, the_pki.ca_certificate, the_pki.ca_private_key, "LC000002", now=NOW)
        der = x509.load_pem_x509_certificate(files.cert.read_bytes()).public_bytes(serialization.Encoding.DER)
        peer = parse_peer(der)
        assert peer is not None
        assert check_shape(peer).allowed and check_chain(peer, anchors).verdict.allowed, kind

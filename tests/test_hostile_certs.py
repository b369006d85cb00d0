"""Odd client certificates over real TLS: each is refused with its reason, and the worker keeps serving.

Every case ends with the accept twin: a valid certificate gets 200 from the
same worker right after the hostile one. Certificates cryptography will not
build (negative or over-long serials) are built by editing a real
certificate's DER and signing it again with the CA key. OpenSSL refuses some
in the handshake (weak keys and digests, unknown critical extensions, broken
paths): those must show up as a ``handshake_failed`` audit event naming the
reason, never as a crashed worker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import warnings
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID, ObjectIdentifier

from gateway.certs import builders as pki
from gateway.certs.files import ThrowawayPki, write_atomic, write_private_key
from tests.harness import Harness, start_harness

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
async def gw(tmp_path: Path, pki: ThrowawayPki) -> Harness:  # type: ignore[misc]
    harness = await start_harness(tmp_path, pki)
    yield harness
    await harness.close()


async def attempt(h: Harness, cert: Path, key: Path, *, weak_ok: bool = False) -> tuple[str, Any]:
    """("http", (status, json body)) or ("handshake", the handshake_failed audit event)."""
    ctx = ssl.create_default_context(cafile=str(h.pki.ca_cert))
    if weak_ok:  # let the *client* load RSA-1024 / SHA-1; the server must still refuse
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.load_cert_chain(cert, key)
    before = len(h.audit.events)
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
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        raw = b""
    if raw.startswith(b"HTTP/1.1 "):
        head, _, body = raw.partition(b"\r\n\r\n")
        return "http", (int(head[9:12]), json.loads(body) if body.startswith(b"{") else body)
    for _ in range(50):
        failures = [e for e in h.audit.events[before:] if e.event == "handshake_failed"]
        if failures:
            return "handshake", failures[-1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"neither an HTTP answer nor an audited handshake failure: {raw[:200]!r}")


async def assert_still_serving(h: Harness) -> None:
    """The accept twin: a valid certificate on the same worker right after."""
    files = h.pki.clients["LC000001"]
    kind, (status, _) = await attempt(h, files.cert, files.key)
    assert (kind, status) == ("http", 200)


async def refused(h: Harness, cert: Path, key: Path, reason: str, **kw: Any) -> dict[str, Any]:
    kind, result = await attempt(h, cert, key, **kw)
    assert kind == "http", result
    status, body = result
    assert (status, body["error"]) == (403, reason), body
    await assert_still_serving(h)
    event = next(e for e in reversed(h.audit.events) if e.reason == reason)
    return {"body": body, "event": event}


def cn(value: str, kind: _ASN1Type = _ASN1Type.UTF8String) -> x509.Name:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # cryptography warns about CNs over 64 characters
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value, kind, _validate=False)])


# --- the subject ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "detail"),
    [
        (cn("LC000001", _ASN1Type.BMPString), "BMPString"),
        (cn("LC000001", _ASN1Type.T61String), "T61String"),
        (cn("LC000001", _ASN1Type.UniversalString), "UniversalString"),
        (cn("LC000001\x00.evil"), "not a plain user ID"),
        (cn("L" + "C" * 999), "not a plain user ID"),
        (cn("ＬＣ０００００１"), "not a plain user ID"),  # full-width
        (cn("LС000001"), "not a plain user ID"),  # Cyrillic Es
        (cn("LC00000l"), None),  # a homoglyph that is itself a plain ID: another user, must not become LC000001
        (x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "LC000001")] * 2), "2 CNs"),
        (x509.Name([]), "0 CNs"),
    ],
    ids=[
        "bmp",
        "teletex",
        "universal",
        "nul",
        "1000-chars",
        "full-width",
        "cyrillic",
        "lookalike-id",
        "two-cns",
        "empty",
    ],
)
async def test_odd_subjects_are_malformed_subject(gw: Harness, subject: x509.Name, detail: str | None) -> None:
    cert, key, _ = gw.issue("ignored", subject=subject)
    if detail is None:  # LC00000l is a syntactically valid ID: it reaches the backend as that ID, not LC000001
        kind, (status, body) = await attempt(gw, cert, key)
        assert (kind, status) == ("http", 200)
        assert 'Subject="CN=LC00000l"' in body["identity"]["X-Forwarded-Client-Cert"]
        return
    result = await refused(gw, cert, key, "malformed_subject")
    assert detail in result["event"].detail


@pytest.mark.parametrize("kind", [_ASN1Type.UTF8String, _ASN1Type.PrintableString], ids=["utf8", "printable"])
async def test_cn_string_types_our_ca_writes_are_accepted(gw: Harness, kind: _ASN1Type) -> None:
    cert, key, _ = gw.issue("ignored", subject=cn("LC000001", kind))
    assert (await attempt(gw, cert, key))[1][0] == 200


# --- serials (built by editing DER: cryptography refuses to build them) ----------


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(start of content, content length, end) of the DER element at ``pos``."""
    first = data[pos + 1]
    if first < 0x80:
        return pos + 2, first, pos + 2 + first
    n = first & 0x7F
    length = int.from_bytes(data[pos + 2 : pos + 2 + n], "big")
    return pos + 2 + n, length, pos + 2 + n + length


def _der(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + pki._der_length(len(content)) + content


ECDSA_WITH_SHA1 = bytes.fromhex("300906072a8648ce3d0401")


def resign(cert: x509.Certificate, ca_key: pki.PrivateKey, *, serial: bytes | None = None, sha1: bool = False) -> bytes:
    """The certificate with its serial INTEGER content and/or digest replaced, signed again by the CA.

    For what cryptography refuses to build: negative and over-long serials,
    SHA-1 signatures (cryptography 50 has no SHA-1 for X.509 signing).
    """
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    der = cert.public_bytes(pki.serialization.Encoding.DER)
    body, _, _ = _tlv(der, 0)
    _, _, tbs_end = _tlv(der, body)
    _, _, alg_end = _tlv(der, tbs_end)
    tbs = der[body:tbs_end]
    tbs_body, _, _ = _tlv(tbs, 0)
    _, _, version_end = _tlv(tbs, tbs_body)  # [0] version
    _, _, serial_end = _tlv(tbs, version_end)
    _, _, tbs_alg_end = _tlv(tbs, serial_end)
    serial_der = _der(0x02, serial) if serial is not None else tbs[version_end:serial_end]
    algorithm = ECDSA_WITH_SHA1 if sha1 else tbs[serial_end:tbs_alg_end]
    new_tbs = _der(0x30, tbs[tbs_body:version_end] + serial_der + algorithm + tbs[tbs_alg_end:])
    digest = hashes.SHA1() if sha1 else hashes.SHA256()
    signature = ca_key.sign(new_tbs, ec.ECDSA(digest))
    outer_alg = ECDSA_WITH_SHA1 if sha1 else der[tbs_end:alg_end]
    return _der(0x30, new_tbs + outer_alg + _der(0x03, b"\x00" + signature))


def odd_files(h: Harness, directory: Path, **edit: Any) -> tuple[Path, Path]:
    """A valid LC000001 certificate, edited by :func:`resign`, written as PEM with its key."""
    key = pki.generate_key()
    good = pki.build_client_cert(
        h.pki.ca_certificate,
        h.pki.ca_private_key,
        key.public_key(),
        "LC000001",
        not_before=NOW - dt.timedelta(minutes=1),
    )
    der = resign(good, h.pki.ca_private_key, **edit)
    cert_path, key_path = directory / "odd.crt", directory / "odd.key"
    write_atomic(cert_path, ssl.DER_cert_to_PEM_cert(der).encode())
    write_private_key(key_path, key)
    return cert_path, key_path


@pytest.mark.parametrize(
    ("content", "shown"),
    [(b"\xff\x01", "-FF"), (b"\x01" + b"\x00" * 29, "01" + "0" * 58)],
    ids=["negative", "30-octets"],
)
async def test_serials_rfc5280_forbids_are_untrusted(gw: Harness, tmp_path: Path, content: bytes, shown: str) -> None:
    cert_path, key_path = odd_files(gw, tmp_path, serial=content)
    result = await refused(gw, cert_path, key_path, "untrusted_certificate")
    assert "not positive or over 20 octets" in result["event"].detail
    assert result["event"].cert_serial.startswith(shown[:4])


# --- what OpenSSL refuses in the handshake -----------------------------------------


async def handshake_refused(h: Harness, cert: Path, key: Path, *words: str) -> None:
    kind, event = await attempt(h, cert, key, weak_ok=True)
    assert kind == "handshake", event
    assert event.reason == "certificate_verify_failed"
    assert any(w in event.detail for w in words), event.detail
    assert event.cert_subject == "LC000001"  # the audit names the refused certificate
    await assert_still_serving(h)


async def test_rsa_1024_key_is_refused_in_the_handshake(gw: Harness) -> None:
    cert, key, _ = gw.issue("LC000001", key=rsa.generate_private_key(public_exponent=65537, key_size=1024))
    await handshake_refused(gw, cert, key, "too weak", "too small")


async def test_sha1_signature_is_refused_in_the_handshake(gw: Harness, tmp_path: Path) -> None:
    cert, key = odd_files(gw, tmp_path, sha1=True)
    await handshake_refused(gw, cert, key, "too weak")
    # Twin: the same editing path with SHA-256 is accepted (the edit itself is sound).
    cert, key = odd_files(gw, tmp_path)
    assert (await attempt(gw, cert, key))[1][0] == 200


async def test_unknown_critical_extension_is_refused_in_the_handshake(gw: Harness) -> None:
    odd = x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
    cert, key, _ = gw.issue("LC000001", extra_extensions=[(odd, True)])
    await handshake_refused(gw, cert, key, "unhandled critical extension")
    # Twin: the same extension, not critical, is ignored as RFC 5280 4.2 says.
    cert, key, _ = gw.issue("LC000001", extra_extensions=[(odd, False)])
    assert (await attempt(gw, cert, key))[1][0] == 200


# --- chains ------------------------------------------------------------------------


def intermediate(h: Harness, name: str) -> tuple[x509.Certificate, pki.PrivateKey]:
    key = pki.generate_key()
    ca = pki.build_ca(key, now=NOW, common_name=name)
    # Re-issue it under the trusted root (which has pathlen 0: it may sign no CA).
    issued = (
        x509.CertificateBuilder()
        .subject_name(ca.subject)
        .issuer_name(h.pki.ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(pki.random_serial())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(h.pki.ca_private_key, hashes.SHA256())
    )
    return issued, key


async def test_chain_through_an_extra_intermediate_is_refused(gw: Harness, tmp_path: Path) -> None:
    inter, inter_key = intermediate(gw, "SSO Intermediate CA")
    key = pki.generate_key()
    leaf = pki.build_client_cert(
        inter, inter_key, key.public_key(), "LC000001", not_before=NOW - dt.timedelta(minutes=1)
    )
    chain, key_path = tmp_path / "chain.pem", tmp_path / "chain.key"
    write_atomic(chain, pki.cert_pem(leaf) + pki.cert_pem(inter))
    write_private_key(key_path, key)
    await handshake_refused(gw, chain, key_path, "path length")


async def test_valid_leaf_with_an_extra_unrelated_certificate_in_the_chain_is_accepted(
    gw: Harness, tmp_path: Path
) -> None:
    """The twin: extra certificates a client sends do not matter when the leaf chains to the CA."""
    files = gw.pki.clients["LC000001"]
    stranger = pki.build_ca(pki.generate_key(), now=NOW, common_name="Somebody Else CA")
    chain = tmp_path / "extra.pem"
    write_atomic(chain, files.cert.read_bytes() + pki.cert_pem(stranger))
    kind, (status, body) = await attempt(gw, chain, files.key)
    assert (kind, status) == ("http", 200)
    assert 'Subject="CN=LC000001"' in body["identity"]["X-Forwarded-Client-Cert"]


async def test_ca_certificate_as_client_certificate_is_wrong_key_usage(gw: Harness) -> None:
    result = await refused(gw, gw.pki.ca_cert, gw.pki.ca_key, "wrong_key_usage")
    assert "CA certificate" in result["event"].detail


async def test_same_name_ca_with_a_pathlen_free_root_is_refused_by_policy(tmp_path: Path) -> None:
    """OpenSSL accepts leaf <- intermediate <- root when the root allows it; our policy does not."""
    root_key = pki.generate_key()
    root_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Root"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Tokyo Stock Exchange SSO CA"),
        ]
    )
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(pki.random_serial())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    the_pki = pki_files(tmp_path / "pki", root, root_key)
    h = await start_harness(tmp_path, the_pki)
    try:
        inter, inter_key = intermediate(h, "Tokyo Stock Exchange SSO CA")
        key = pki.generate_key()
        leaf = pki.build_client_cert(
            inter, inter_key, key.public_key(), "LC000001", not_before=NOW - dt.timedelta(minutes=1)
        )
        chain, key_path = tmp_path / "chain.pem", tmp_path / "chain.key"
        write_atomic(chain, pki.cert_pem(leaf) + pki.cert_pem(inter))
        write_private_key(key_path, key)
        result = await refused(h, chain, key_path, "untrusted_certificate")
        assert "not signed by a configured CA" in result["event"].detail
    finally:
        await h.close()


def pki_files(directory: Path, root: x509.Certificate, root_key: pki.PrivateKey) -> ThrowawayPki:
    """A ThrowawayPki around a given root (server certificate, one client, an empty CRL)."""
    from gateway.certs.files import issue_client_files

    directory.mkdir(parents=True)
    server_key = pki.generate_key()
    server = pki.build_server_cert(root, root_key, server_key.public_key(), ["127.0.0.1"], now=NOW)
    crl = pki.build_crl(root, root_key, [], this_update=NOW, next_update=NOW + dt.timedelta(days=1), number=1)
    paths = {n: directory / n for n in ("ca.pem", "ca.key", "server.crt", "server.key", "ca.crl")}
    write_atomic(paths["ca.pem"], pki.cert_pem(root))
    write_private_key(paths["ca.key"], root_key)
    write_atomic(paths["server.crt"], pki.cert_pem(server))
    write_private_key(paths["server.key"], server_key)
    write_atomic(paths["ca.crl"], crl.public_bytes(pki.serialization.Encoding.PEM))
    client = issue_client_files(directory, root, root_key, "LC000001", now=NOW - dt.timedelta(minutes=1))
    return ThrowawayPki(
        directory,
        paths["ca.pem"],
        paths["ca.key"],
        paths["server.crt"],
        paths["server.key"],
        paths["ca.crl"],
        root,
        root_key,
        {"LC000001": client},
    )

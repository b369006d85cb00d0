"""The server's TLS profile and chain, as a scanner sees them: real ``openssl s_client`` against a real gateway.

Mozilla's "intermediate" profile by default (TLS 1.2 with ECDHE + AEAD suites
only, TLS 1.3), "modern" on request (TLS 1.3 only); the server sends its own
certificate and intermediates, never the self-signed root.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest
from cryptography import x509

from gateway.certs import builders as pki
from gateway.certs.files import ThrowawayPki
from gateway.tls.termination import served_chain
from tests.harness import Harness, start_harness

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

AEAD_ECDHE = re.compile(r"^ECDHE-(ECDSA|RSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)$")


async def s_client(port: int, *args: str) -> tuple[bool, str]:
    """(handshake completed?, s_client's output) for one connection with these options."""
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text = out.decode("utf-8", "replace")
    return "CONNECTION ESTABLISHED" in text or "BEGIN CERTIFICATE" in text, text


async def local_tls12_ciphers() -> list[str]:
    """Every TLS 1.2 suite the local openssl knows, weak ones included."""
    proc = await asyncio.create_subprocess_exec(
        "openssl", "ciphers", "-s", "-tls1_2", "ALL:COMPLEMENTOFALL:@SECLEVEL=0", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return [c for c in out.decode().strip().split(":") if c]


async def negotiable(port: int, ciphers: list[str]) -> list[str]:
    limit = asyncio.Semaphore(8)

    async def one(cipher: str) -> str | None:
        async with limit:
            ok, _ = await s_client(port, "-brief", "-tls1_2", "-cipher", f"{cipher}:@SECLEVEL=0")
        return cipher if ok else None

    return [c for c in await asyncio.gather(*(one(c) for c in ciphers)) if c]


@pytest.fixture
async def gw(tmp_path: Path, session_pki: ThrowawayPki) -> Harness:  # type: ignore[misc]
    harness = await start_harness(tmp_path, session_pki)
    yield harness
    await harness.close()


async def test_intermediate_profile_offers_only_ecdhe_aead_suites_in_tls12(gw: Harness) -> None:
    ciphers = await local_tls12_ciphers()
    assert len(ciphers) > 30 and "ECDHE-ECDSA-AES128-SHA256" in ciphers  # the CBC suite a scanner flagged
    accepted = await negotiable(gw.worker.port, ciphers)
    assert accepted, "no TLS 1.2 suite negotiated at all"
    assert all(AEAD_ECDHE.match(c) for c in accepted), accepted
    # The gateway's key is EC P-256: the ECDSA AEAD suites are the ones that connect.
    assert {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"} <= set(accepted)


@pytest.mark.parametrize(("flag", "ok"), [("-tls1", False), ("-tls1_1", False), ("-tls1_2", True), ("-tls1_3", True)])
async def test_intermediate_profile_versions(gw: Harness, flag: str, ok: bool) -> None:
    connected, text = await s_client(gw.worker.port, "-brief", flag, "-cipher", "ALL:@SECLEVEL=0")
    assert connected is ok, text


@pytest.mark.parametrize(("flag", "ok"), [("-tls1_2", False), ("-tls1_3", True)])
async def test_modern_profile_is_tls13_only(tmp_path: Path, session_pki: ThrowawayPki, flag: str, ok: bool) -> None:
    h = await start_harness(tmp_path, session_pki, extra={"tls": tls_section(session_pki, profile="modern")})
    try:
        connected, text = await s_client(h.worker.port, "-brief", flag)
        assert connected is ok, text
    finally:
        await h.close()


def tls_section(the_pki: ThrowawayPki, **more: object) -> dict[str, object]:
    return {
        "cert": str(the_pki.server_cert),
        "key": str(the_pki.server_key),
        "client_ca": str(the_pki.ca_cert),
        **more,
    }


def sent_chain(text: str) -> list[x509.Certificate]:
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.S)
    return [x509.load_pem_x509_certificate(b.encode()) for b in blocks]


async def test_server_sends_its_certificate_but_not_the_root(gw: Harness) -> None:
    # The configured tls.cert file holds server certificate + root, as the throwaway PKI writes it.
    assert len(x509.load_pem_x509_certificates(gw.pki.server_cert.read_bytes())) == 2
    _, text = await s_client(gw.worker.port, "-showcerts")
    chain = sent_chain(text)
    assert [c.subject for c in chain] == [x509.load_pem_x509_certificate(gw.pki.server_cert.read_bytes()).subject]
    assert gw.pki.ca_certificate not in chain


async def test_server_sends_its_intermediate(tmp_path: Path, session_pki: ThrowawayPki) -> None:
    """The twin: an intermediate in tls.cert is sent (leaf, intermediate), the root after it is not."""
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    key = pki.generate_key()
    inter = pki.build_ca(
        key,
        now=now,
        common_name="Server Intermediate",
        issuer=(session_pki.ca_certificate, session_pki.ca_private_key),
    )
    server_key = pki.generate_key()
    server = pki.build_server_cert(inter, key, server_key.public_key(), ["127.0.0.1"], now=now)
    cert_path, key_path = tmp_path / "server-chain.pem", tmp_path / "server-chain.key"
    cert_path.write_bytes(pki.cert_pem(server) + pki.cert_pem(inter) + pki.cert_pem(session_pki.ca_certificate))
    key_path.write_bytes(pki.key_pem(server_key))
    key_path.chmod(0o600)
    assert served_chain([server, inter, session_pki.ca_certificate]) == [server, inter]
    h = await start_harness(
        tmp_path,
        session_pki,
        extra={"tls": {"cert": str(cert_path), "key": str(key_path), "client_ca": str(session_pki.ca_cert)}},
    )
    try:
        _, text = await s_client(h.worker.port, "-showcerts")
        assert sent_chain(text) == [server, inter]
    finally:
        await h.close()

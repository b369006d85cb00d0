"""The gateway core over real TLS: every certificate reason code next to its accept twin.

Backends here use the passthrough login mode so requests reach them with the
certificate identity alone; the login flow has its own tests.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import re
import ssl
import threading
import warnings
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.audit.events import serial_hex
from gateway.certs import builders as pki
from gateway.certs.files import ThrowawayPki, make_throwaway_pki
from gateway.errors import GatewayError
from gateway.web.messages import NOT_VALID_JA
from tests.harness import Harness, start_harness, without_instance

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
async def gw(tmp_path: Path, pki: ThrowawayPki) -> Harness:  # type: ignore[misc]
    harness = await start_harness(tmp_path, pki)
    yield harness
    await harness.close()


async def get(
    h: Harness,
    path: str,
    user: str | None = "LC000001",
    *,
    headers: dict[str, str] | None = None,
    cert: Path | None = None,
    key: Path | None = None,
) -> tuple[int, str, dict[str, str]]:
    async with h.session(user, cert=cert, key=key) as s, s.get(h.url(path), headers=headers or {}) as r:
        return r.status, await r.text(), dict(r.headers)


async def get_json(h: Harness, path: str, user: str | None = "LC000001", **kw: object) -> tuple[int, dict[str, object]]:
    headers = {"Accept": "application/json", **kw.pop("headers", {})}  # type: ignore[dict-item]
    status, text, _ = await get(h, path, user, headers=headers, **kw)  # type: ignore[arg-type]
    return status, json.loads(text)


def refused_with(h: Harness, reason: str) -> list[object]:
    return [e for e in h.audit.events if e.reason == reason]


# --- accept -------------------------------------------------------------------


async def test_valid_certificate_reaches_backend_with_identity_headers(gw: Harness) -> None:
    status, body = await get_json(gw, "/onre/page?x=1")
    assert status == 200
    identity = body["identity"]
    cert = gw.pki.clients["LC000001"].certificate
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    assert identity["X-Forwarded-Client-Cert"] == f'Hash={fingerprint};Subject="CN=LC000001"'
    assert identity["X-Client-Cert-Serial"] == serial_hex(cert.serial_number)  # as openssl prints it
    assert identity["X-Forwarded-For"] == "127.0.0.1"
    assert identity["X-Forwarded-Proto"] == "https"
    assert identity["X-Authenticated-User"] is None  # no login in passthrough mode
    assert body["path"] == "/onre/page?x=1"
    assert body["system"] == "TDnet"


async def test_routes_by_longest_prefix_to_each_system(gw: Harness) -> None:
    for path, system in (("/onre/a", "TDnet"), ("/nt/b", "J-IRISS"), ("/jpxcube/c", "Clearing")):
        status, body = await get_json(gw, path)
        assert (status, body["system"]) == (200, system)


# --- no_certificate -----------------------------------------------------------


async def test_no_certificate_gets_403_page_with_support_id(gw: Harness) -> None:
    status, text, headers = await get(gw, "/onre/page", user=None)
    assert status == 403
    assert NOT_VALID_JA in text
    assert "no_certificate" in text
    assert headers["Cache-Control"] == "no-store"
    [event] = refused_with(gw, "no_certificate")
    assert event.support_id in text
    assert event.client_ip == "127.0.0.1" and event.path == "/onre/page"


async def test_no_certificate_json_body(gw: Harness) -> None:
    status, body = await get_json(gw, "/onre/page", user=None)
    assert status == 403
    assert body["error"] == "no_certificate"
    assert "証明書が提示されていません" in str(body["message"])
    assert body["support_id"] == refused_with(gw, "no_certificate")[0].support_id
    assert set(body) == {"error", "message", "support_id"}


# --- untrusted_certificate ------------------------------------------------------


async def test_lookalike_ca_with_same_name_fails_in_handshake_and_is_audited(gw: Harness, tmp_path: Path) -> None:
    other = make_throwaway_pki(tmp_path / "evil")  # same CA name, another key
    files = other.clients["LC000001"]
    with pytest.raises(aiohttp.ClientError):
        await get(gw, "/onre/page", cert=files.cert, key=files.key)
    await asyncio.sleep(0.1)
    failures = [e for e in gw.audit.events if e.event == "handshake_failed"]
    assert failures, gw.audit.events
    event = failures[-1]
    assert event.reason == "certificate_verify_failed"
    assert event.client_ip == "127.0.0.1"
    assert event.cert_subject == "LC000001"
    assert event.cert_serial == serial_hex(files.certificate.serial_number)
    # The accept twin: the real CA's certificate still passes.
    assert (await get(gw, "/onre/page"))[0] == 200


async def test_second_trusted_ca_with_another_cn_is_refused_by_name(tmp_path: Path, pki: ThrowawayPki) -> None:
    other_key = pki_key = pki_mod_key()
    other_ca = pki_mod().build_ca(other_key, now=NOW, common_name="Some Other CA")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca_cert.read_bytes() + pki_mod().cert_pem(other_ca))
    h = await start_harness(
        tmp_path,
        pki,
        extra={"tls": {"cert": str(pki.server_cert), "key": str(pki.server_key), "client_ca": str(bundle)}},
    )
    try:
        leaf_key = pki_mod_key()
        leaf = pki_mod().build_client_cert(
            other_ca, other_key, leaf_key.public_key(), "LC000001", not_before=NOW - dt.timedelta(minutes=1)
        )
        cert_path, key_path = tmp_path / "o.crt", tmp_path / "o.key"
        cert_path.write_bytes(pki_mod().cert_pem(leaf))
        key_path.write_bytes(pki_mod().key_pem(leaf_key))
        status, body = await get_json(h, "/onre/x", cert=cert_path, key=key_path)
        assert (status, body["error"]) == (403, "untrusted_certificate")
        assert (await get(h, "/onre/x"))[0] == 200
    finally:
        await h.close()
    del pki_key


def pki_mod():
    return pki


def pki_mod_key() -> pki.PrivateKey:
    return pki.generate_key()


# --- validity period ------------------------------------------------------------


@pytest.mark.parametrize(
    ("not_before", "days", "reason"),
    [
        (NOW - dt.timedelta(days=400), 365, "certificate_expired"),
        (NOW + dt.timedelta(days=1), 365, "certificate_not_yet_valid"),
    ],
)
async def test_time_checks_refuse_with_a_page_not_an_alert(
    gw: Harness, not_before: dt.datetime, days: int, reason: str
) -> None:
    cert, key, _ = gw.issue("LC000001", not_before=not_before, days=days)
    status, body = await get_json(gw, "/onre/x", cert=cert, key=key)
    assert (status, body["error"]) == (403, reason)
    # Accept twin: same user, current validity.
    cert, key, _ = gw.issue("LC000001")
    assert (await get(gw, "/onre/x", cert=cert, key=key))[0] == 200


# --- revocation ---------------------------------------------------------------


async def test_revoked_certificate_is_refused_on_an_open_keepalive_connection(gw: Harness) -> None:
    ctx = gw.client_context("LC000001")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.worker.port, ssl=ctx)
    try:
        first = await http_get(reader, writer, "/onre/a")
        assert first.startswith("HTTP/1.1 200")
        serial = gw.pki.clients["LC000001"].certificate.serial_number
        await gw.publish_crl([serial])
        second = await http_get(reader, writer, "/onre/a")  # same TLS connection
        assert second.startswith("HTTP/1.1 403")
        assert "certificate_revoked" in second
    finally:
        writer.close()
    # Accept twin: another user's certificate is not on the CRL.
    assert (await get(gw, "/onre/a", user="LC000002"))[0] == 200


async def http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> str:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n\r\n".encode())
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    length = next(int(line.split(":")[1]) for line in head.split("\r\n") if line.lower().startswith("content-length"))
    return head + (await reader.readexactly(length)).decode()


async def test_background_refresh_picks_up_a_new_crl(tmp_path: Path, pki: ThrowawayPki) -> None:
    h = await start_harness(tmp_path, pki, extra={"revocation": {"crl": str(pki.crl), "refresh_seconds": 0.2}})
    try:
        assert (await get(h, "/onre/a"))[0] == 200
        serial = pki.clients["LC000001"].certificate.serial_number
        crl = pki_mod().build_crl(
            pki.ca_certificate,
            pki.ca_private_key,
            [pki_mod().RevokedEntry(serial, NOW)],
            this_update=NOW,
            next_update=NOW + dt.timedelta(days=1),
            number=7,
        )
        from cryptography.hazmat.primitives.serialization import Encoding

        from gateway.certs.files import write_atomic

        write_atomic(pki.crl, crl.public_bytes(Encoding.PEM))
        for _ in range(50):
            await asyncio.sleep(0.1)
            if (await get_json(h, "/onre/a"))[0] == 403:
                break
        status, body = await get_json(h, "/onre/a")
        assert (status, body["error"]) == (403, "certificate_revoked")
    finally:
        await h.close()


async def test_missing_crl_refuses_start_up_naming_the_source(tmp_path: Path, pki: ThrowawayPki) -> None:
    """One rule with reload: a configuration whose CRL cannot be loaded is not taken (fail closed, loudly)."""
    pki.crl.unlink()
    with pytest.raises(GatewayError, match=f"CRL source not loaded: {re.escape(str(pki.crl))}: cannot read"):
        await start_harness(tmp_path, pki)


async def test_stale_crl_past_grace_fails_closed(gw: Harness) -> None:
    long_ago = NOW - dt.timedelta(days=3)
    await gw.publish_crl([], this_update=long_ago, next_update=dt.timedelta(days=1), number=3)
    status, body = await get_json(gw, "/onre/a")
    assert (status, body["error"]) == (403, "revocation_unavailable")
    await gw.publish_crl([], number=4)  # fresh again: accepted
    assert (await get(gw, "/onre/a"))[0] == 200


async def test_crl_signed_by_another_ca_is_rejected_and_old_crl_kept(gw: Harness, tmp_path: Path) -> None:
    other = make_throwaway_pki(tmp_path / "other")
    gw.pki.crl.write_bytes(other.crl.read_bytes())
    assert gw.worker.runtime is not None
    await gw.worker.runtime.refresher.refresh_all()
    assert "does not verify" in next(iter(gw.worker.runtime.refresher.last_error.values()))
    assert (await get(gw, "/onre/a"))[0] == 200  # the last good CRL still answers
    assert any(e.event == "crl_refresh_failed" for e in gw.audit.events)


async def test_garbage_crl_keeps_old_and_counts_failure(gw: Harness) -> None:
    from prometheus_client import REGISTRY

    label = {"source": str(gw.pki.crl)}
    before = REGISTRY.get_sample_value("gateway_crl_refresh_failures_total", label) or 0
    gw.pki.crl.write_bytes(b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
    assert gw.worker.runtime is not None
    await gw.worker.runtime.refresher.refresh_all()
    assert REGISTRY.get_sample_value("gateway_crl_refresh_failures_total", label) == before + 1
    assert (await get(gw, "/onre/a"))[0] == 200


# --- key usage and subject ------------------------------------------------------


async def test_eku_without_client_auth_is_wrong_key_usage(gw: Harness) -> None:
    cert, key, _ = gw.issue("LC000001", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    status, body = await get_json(gw, "/onre/a", cert=cert, key=key)
    assert (status, body["error"]) == (403, "wrong_key_usage")
    cert, key, _ = gw.issue("LC000001", eku=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    assert (await get(gw, "/onre/a", cert=cert, key=key))[0] == 200


async def test_ca_certificate_presented_as_client_certificate(gw: Harness) -> None:
    status, body = await get_json(gw, "/onre/a", cert=gw.pki.ca_cert, key=gw.pki.ca_key)
    assert (status, body["error"]) == (403, "wrong_key_usage")


@pytest.mark.parametrize(
    "subject",
    [
        x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, "LC000001"), x509.NameAttribute(NameOID.COMMON_NAME, "LC000002")]
        ),
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "LC 000001")]),
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "LC000001\n")]),
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no CN")]),
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ＬＣ000001")]),  # full-width letters
    ],
    ids=["two-cns", "space", "newline", "no-cn", "full-width"],
)
async def test_malformed_subjects_are_refused(gw: Harness, subject: x509.Name) -> None:
    cert, key, _ = gw.issue("ignored", subject=subject)
    status, body = await get_json(gw, "/onre/a", cert=cert, key=key)
    assert (status, body["error"]) == (403, "malformed_subject")


# --- forwarding -----------------------------------------------------------------


async def test_client_cannot_inject_identity_headers(gw: Harness) -> None:
    forged = {
        "X-Authenticated-User": "ADMIN",
        "X-Forwarded-Client-Cert": 'Hash=00;Subject="CN=ADMIN"',
        "X-Client-Cert-Serial": "01",
        "X-Forwarded-For": "10.0.0.1",
        "Connection": "keep-alive, X-Custom-Hop",
        "X-Custom-Hop": "should vanish",
    }
    status, body = await get_json(gw, "/onre/a", headers=forged)
    assert status == 200
    identity = body["identity"]
    assert identity["X-Authenticated-User"] is None
    assert "ADMIN" not in str(identity["X-Forwarded-Client-Cert"])
    assert identity["X-Client-Cert-Serial"] != "01"
    assert identity["X-Forwarded-For"] == "127.0.0.1"
    assert "X-Custom-Hop" not in body["headers"]


async def test_unknown_path_is_404_page(gw: Harness) -> None:
    status, body = await get_json(gw, "/admin/")
    assert (status, body["error"]) == (404, "no_route")


@pytest.mark.parametrize(
    "path", ["/onre/../admin", "/onre/%2e%2e/admin", "/onre/a%2Fb", "/onre/%252e%252e/x", "/onre/a\\b"]
)
async def test_path_tricks_are_refused(gw: Harness, path: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.worker.port, ssl=gw.client_context())
    try:
        answer = await http_get(reader, writer, path)
    finally:
        writer.close()
    assert answer.startswith("HTTP/1.1 400"), answer[:200]
    assert "bad_request" in answer


async def test_streaming_upload_and_download(gw: Harness) -> None:
    size = 40 * 1024 * 1024
    block = bytes(range(256)) * 4096

    async def body():
        for _ in range(size // len(block)):
            yield block

    digest = hashlib.sha256(block * (size // len(block))).hexdigest()
    async with gw.session() as s:
        async with s.post(gw.url("/onre/upload"), data=body()) as r:
            assert r.status == 200
            assert await r.json() == {"bytes": size, "sha256": digest}
        async with s.get(gw.url(f"/onre/download?size={size}")) as r:
            assert r.status == 200
            got = 0
            async for chunk in r.content.iter_chunked(1 << 16):
                got += len(chunk)
            assert got == size


async def test_body_over_backend_limit_is_413(tmp_path: Path, pki: ThrowawayPki) -> None:
    h = await start_harness(tmp_path, pki, backend_extra={"max_body_bytes": 1000})
    try:
        async with h.session() as s:
            async with s.post(h.url("/onre/upload"), data=b"x" * 2000, headers={"Accept": "application/json"}) as r:
                assert r.status == 413
                assert (await r.json())["error"] == "payload_too_large"
            async with s.post(h.url("/onre/upload"), data=b"x" * 500) as r:
                assert r.status == 200
    finally:
        await h.close()


async def test_backend_down_is_502_and_slow_backend_is_504(tmp_path: Path, pki: ThrowawayPki) -> None:
    h = await start_harness(tmp_path, pki, backend_extra={"timeout_seconds": 0.5})
    try:
        status, body = await get_json(h, "/onre/slow?seconds=3")
        assert (status, body["error"]) == (504, "backend_timeout")
        assert (await get(h, "/onre/slow?seconds=0.05"))[0] == 200
        await h._runners[1].cleanup()  # J-IRISS goes down
        status, body = await get_json(h, "/nt/a")
        assert (status, body["error"]) == (502, "backend_unavailable")
    finally:
        await h.close()


async def test_websocket_upgrade_is_relayed_with_identity(gw: Harness) -> None:
    async with gw.session() as s, s.ws_connect(gw.url("/onre/ws").replace("https", "wss")) as ws:
        await ws.send_str("hello")
        msg = await ws.receive(timeout=5)
        serial = serial_hex(gw.pki.clients["LC000001"].certificate.serial_number)
        assert msg.data == f"{serial}:hello"


# --- TLS layer --------------------------------------------------------------------


async def test_certificate_request_names_the_sso_ca(gw: Harness) -> None:
    files = gw.pki.clients["LC000001"]
    proc = await asyncio.create_subprocess_exec(
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{gw.worker.port}",
        "-cert",
        str(files.cert),
        "-key",
        str(files.key),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await asyncio.wait_for(proc.communicate(), 20))[0].decode()
    assert "Acceptable client certificate CA names" in out
    assert "CN = Tokyo Stock Exchange SSO CA" in out


async def test_tls_1_1_is_refused(gw: Harness) -> None:
    ctx = gw.client_context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection("127.0.0.1", gw.worker.port, ssl=ctx)


# --- operations ------------------------------------------------------------------


async def test_healthz_and_metrics(gw: Harness) -> None:
    await get(gw, "/onre/a", user=None)
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.admin_url("/healthz")) as r:
            assert r.status == 200
            assert (await r.json())["crl_fresh"] is True
        async with s.get(gw.admin_url("/metrics")) as r:
            labelled = await r.text()
    # every sample names the instance (the config's instance:, default the host name)
    assert f'gateway_refusals_total{{gateway_instance="{gw.config.instance}",reason="no_certificate"}}' in labelled
    text = without_instance(labelled)
    assert 'gateway_refusals_total{reason="no_certificate"}' in text
    assert "gateway_crl_entries" in text


async def test_admin_listener_serves_the_audit_report(tmp_path: Path, pki: ThrowawayPki) -> None:
    """/audit, when enabled, is wired through the worker's admin listener (its module loads on the first request)."""
    from gateway.audit.events import AuditEvent, EventKind
    from gateway.audit.signing import generate_signing_key
    from gateway.audit.store import AuditStore

    gw = await start_harness(tmp_path, pki, extra={"admin": {"host": "127.0.0.1", "port": 0, "audit_report": True}})
    generate_signing_key(gw.config.audit.signing_key)  # with a key the page verifies the period, in a thread
    event = AuditEvent(EventKind.REQUEST_REFUSED, reason="certificate_revoked", user_id="LC000009")
    with AuditStore(gw.config.audit.database) as store:
        store.append([event])
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(2):  # the first request imports the report module, the second reuses it
                async with s.get(gw.admin_url("/audit"), params={"support_id": event.support_id}) as r:
                    assert r.status == 200
                    assert r.content_type == "text/html"
                    assert "LC000009" in await r.text()
            async with s.get(gw.admin_url("/audit"), params={"since": "not-a-time"}) as r:
                assert r.status == 400  # the report's own filter check answers, not a 404 or 500
        assert verifier_threads()
    finally:
        await gw.close()
    for _ in range(200):  # the listener's cleanup stops the verifier; its thread ends soon after
        if not verifier_threads():
            break
        await asyncio.sleep(0.02)
    assert not verifier_threads()


def verifier_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("audit-verify")]


async def test_underscore_spellings_of_identity_headers_are_dropped(gw: Harness) -> None:
    forged = {"X_Authenticated_User": "ADMIN", "X_Forwarded_Client_Cert": "Hash=00", "X-Custom": "kept"}
    status, body = await get_json(gw, "/onre/a", headers=forged)
    assert status == 200
    assert not any("_" in name for name in body["headers"])
    assert body["headers"]["X-Custom"] == "kept"


def test_backends_cannot_set_the_gateways_cookies() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    from gateway.forward.proxy import response_headers

    upstream = CIMultiDict(
        [("Set-Cookie", "__Host-gw_session=evil; Path=/"), ("Set-Cookie", "JSESSIONID=1; Path=/onre/")]
    )
    assert response_headers(CIMultiDictProxy(upstream)).getall("Set-Cookie") == ["JSESSIONID=1; Path=/onre/"]


async def test_open_websocket_is_closed_when_the_certificate_is_revoked(
    gw: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.forward.proxy.WEBSOCKET_RECHECK_SECONDS", 0.1)
    async with gw.session() as s, s.ws_connect(gw.url("/onre/ws").replace("https", "wss")) as ws:
        await ws.send_str("before")
        assert (await ws.receive(timeout=5)).data.endswith(":before")
        await asyncio.sleep(0.3)
        assert not ws.closed  # the accept twin: still allowed, still open
        await gw.publish_crl([gw.pki.clients["LC000001"].certificate.serial_number])
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION

"""The whole loop with real servers: issue in the portal, log in at the gateway, revoke, refused.

One CA directory serves both sides: the portal issues from it and publishes
its CRL file, the gateway trusts its CA certificate and reads that CRL file.
The user store and session key are shared, as in production.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.serialization import pkcs12

from gateway.access.login import LoginAccess
from gateway.access.sessions import SESSION_COOKIE as GATEWAY_COOKIE
from gateway.access.users import UserStore
from gateway.audit.events import serial_hex
from gateway.ca.authority import CA_KEY, CertificateAuthority
from gateway.ca.portal import SESSION_COOKIE as PORTAL_COOKIE
from gateway.ca.portal import start_portal
from gateway.certs import builders as pki
from gateway.certs.files import ThrowawayPki, read_private_key, write_atomic, write_private_key
from tests.harness import Harness, ListAudit, start_harness
from tests.test_portal import (
    PASSWORD,
    Clock,
    Portal,
    csrf_of,
    get,
    hashed,
    issue_and_download,
    logged_in,
    revoke,
    write_portal_config,
)

USER = "LC000001"


@dataclass
class Loop:
    portal: Portal
    gateway: Harness


def pki_of(ca: CertificateAuthority, directory: Path) -> ThrowawayPki:
    """The harness wants a ThrowawayPki; describe the real CA directory as one."""
    server = ca.issue_server(
        ["127.0.0.1", "localhost"],
        dt.datetime.now(dt.UTC),
        "test",
        out_cert=directory / "gateway.crt",
        out_key=directory / "gateway.key",
    )
    return ThrowawayPki(
        directory=directory,
        ca_cert=ca.cert_path,
        ca_key=ca.directory / CA_KEY,
        server_cert=server.cert,
        server_key=server.key,
        crl=ca.crl_der_path,
        ca_certificate=ca.certificate,
        ca_private_key=read_private_key(ca.directory / CA_KEY),
    )


@pytest.fixture
async def loop(tmp_path: Path) -> AsyncIterator[Loop]:
    ca = CertificateAuthority.init(tmp_path / "ca", now=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    ca.publish_crl(dt.datetime.now(dt.UTC))
    config = write_portal_config(tmp_path, ca)
    with UserStore(config.users.database) as store:
        store.add_user(USER, hashed(PASSWORD), ("tdnet", "j-iriss", "clearing"), now=dt.datetime.now(dt.UTC))
    audit, clock, session_clock = ListAudit(), Clock(), Clock()
    runner, port = await start_portal(config, audit=audit, clock=clock, session_clock=session_clock, crl_interval=None)
    gateway = await start_harness(
        tmp_path,  # same directory: same users database and session key as the portal
        pki_of(ca, tmp_path),
        login_mode="gateway",
        access_factory=LoginAccess,
        extra={"revocation": {"crl": str(ca.crl_der_path), "refresh_seconds": 3600, "grace_seconds": 3600}},
    )
    assert gateway.config.users.database == config.users.database
    yield Loop(Portal(ca, config, audit, clock, session_clock, port, tmp_path), gateway)
    await gateway.close()
    await runner.cleanup()


async def gateway_login(h: Harness, s: aiohttp.ClientSession, user_id: str = USER) -> tuple[int, str]:
    """The gateway's login form: GET for the token, POST user ID and password."""
    async with s.get(h.url("/_gateway/login")) as r:
        assert r.status == 200
        token = re.search(r'name="csrf" value="([^"]+)"', await r.text())
    assert token
    form = {"user_id": user_id, "password": PASSWORD, "csrf": token.group(1), "next": ""}
    async with s.post(h.url("/_gateway/login"), data=form, allow_redirects=False, headers={"Accept": "text/html"}) as r:
        await r.read()
        return r.status, r.headers.get("Location", "")


async def test_issue_login_revoke_refused(loop: Loop, tmp_path: Path) -> None:
    portal, gateway = loop.portal, loop.gateway
    # 1. Issue in the portal over HTTPS and keep the downloaded key and certificate.
    async with await logged_in(portal, USER) as ps:
        data = await issue_and_download(portal, ps)
        key, cert, _ = pkcs12.load_key_and_certificates(data, None)
        assert isinstance(key, pki.PrivateKey) and cert is not None
        cert_path, key_path = tmp_path / "user.crt", tmp_path / "user.key"
        write_atomic(cert_path, pki.cert_pem(cert))
        write_private_key(key_path, key)
        serial = serial_hex(cert.serial_number)

        # 2. Log in through the gateway with that certificate, user ID and password.
        async with gateway.session(cert=cert_path, key=key_path) as gs:
            status, location = await gateway_login(gateway, gs)
            assert (status, location) == (303, "/onre/")
            async with gs.get(gateway.url("/onre/top"), headers={"Accept": "application/json"}) as r:
                assert r.status == 200
                body = await r.json()
            assert body["identity"]["X-Authenticated-User"] == USER

            # 3. Revoke in the portal (detail -> 失効する -> 実行).
            done = await revoke(portal, ps, serial)
            assert "失効しました" in done

            # 4. The gateway picks up the CA's new CRL and refuses the very next request.
            assert gateway.worker.runtime is not None
            await gateway.worker.runtime.refresher.refresh_all()
            async with gs.get(gateway.url("/onre/top"), headers={"Accept": "application/json"}) as r:
                assert r.status == 403
                refused = await r.json()
    assert refused["error"] == "certificate_revoked"
    assert "certificate_revoked" in [e.reason for e in gateway.audit.events]


async def test_portal_and_gateway_sessions_do_not_cross(loop: Loop, tmp_path: Path) -> None:
    portal, gateway = loop.portal, loop.gateway
    async with await logged_in(portal, USER) as ps:
        data = await issue_and_download(portal, ps)
        portal_cookie = next(c.value for c in ps.cookie_jar if c.key == PORTAL_COOKIE)
        key, cert, _ = pkcs12.load_key_and_certificates(data, None)
        assert isinstance(key, pki.PrivateKey) and cert is not None
        cert_path, key_path = tmp_path / "user.crt", tmp_path / "user.key"
        write_atomic(cert_path, pki.cert_pem(cert))
        write_private_key(key_path, key)
        async with gateway.session(cert=cert_path, key=key_path) as gs:
            # The portal's session, presented to the gateway with the right certificate: refused.
            gs.cookie_jar.update_cookies({GATEWAY_COOKIE: portal_cookie})
            async with gs.get(gateway.url("/onre/top"), headers={"Accept": "application/json"}) as r:
                assert r.status in (401, 403)
                assert (await r.json())["error"] in ("session_certificate_mismatch", "login_required")
            # The twin: a real gateway login works, and its cookie opens nothing in the portal.
            assert (await gateway_login(gateway, gs))[0] == 303
            gateway_cookie = next(c.value for c in gs.cookie_jar if c.key == GATEWAY_COOKIE)
    async with portal.client() as other:
        other.cookie_jar.update_cookies({PORTAL_COOKIE: gateway_cookie})
        status, _, headers = await get(portal, other, "/")
        assert (status, headers["Location"]) == (303, "/login?next=/")
        assert csrf_of((await get(portal, other, "/login"))[1])

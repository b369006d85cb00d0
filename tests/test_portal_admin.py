"""The portal's own admin listener (``portal.admin``, plain HTTP on loopback): /healthz and /metrics."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.ca.authority import CertificateAuthority
from gateway.ca.portal import PORTAL, start_portal
from gateway.config import load_config
from tests.harness import ListAudit, without_instance
from tests.test_portal import (
    CA_BORN,
    REAL_NOW,
    Clock,
    Portal,
    add_user,
    issue,
    logged_in,
    login,
    revoke,
    serials_of,
    write_portal_config,
)
from tests.test_portal import get as portal_get


async def start(tmp_path: Path, *, crl_at: dt.datetime = REAL_NOW, admin: bool = True) -> tuple[Any, Portal, int]:
    ca = CertificateAuthority.init(tmp_path / "ca", now=CA_BORN)
    ca.publish_crl(crl_at)
    config = write_portal_config(tmp_path, ca)
    if admin:
        doc = yaml.safe_load(config.path.read_text(encoding="utf-8"))
        doc["portal"]["admin"] = {"host": "127.0.0.1", "port": 0}
        config.path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        config = load_config(config.path)
    add_user(config, "LC000001")
    audit, clock, session_clock = ListAudit(), Clock(), Clock()
    runner, port = await start_portal(config, audit=audit, clock=clock, session_clock=session_clock, crl_interval=None)
    p = Portal(ca, config, audit, clock, session_clock, port, tmp_path)
    return runner, p, runner.app[PORTAL].admin_port


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Portal, int]]:
    runner, p, admin = await start(tmp_path)
    yield p, admin
    await runner.cleanup()


async def admin_get(admin: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin}{path}") as r:
        return r.status, without_instance(await r.text())


def sample(text: str, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def test_portal_healthz_is_ok_with_a_fresh_crl(served: tuple[Portal, int]) -> None:
    _p, admin = served
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin}/healthz") as r:
        assert r.status == 200
        body = await r.json()
    assert (body["status"], body["crl_fresh"], body["degraded"]) == ("ok", True, [])


async def test_portal_healthz_is_degraded_close_to_next_update(tmp_path: Path) -> None:
    runner, _p, admin = await start(tmp_path, crl_at=REAL_NOW - dt.timedelta(hours=21))  # nextUpdate in 3 h
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin}/healthz") as r:
            assert r.status == 200
            body = await r.json()
        assert (body["status"], body["degraded"]) == ("degraded", ["crl_near_next_update"])
    finally:
        await runner.cleanup()


async def test_portal_healthz_is_503_past_next_update(tmp_path: Path) -> None:
    runner, _p, admin = await start(tmp_path, crl_at=REAL_NOW - dt.timedelta(hours=30))
    try:
        status, _ = await admin_get(admin, "/healthz")
        assert status == 503
    finally:
        await runner.cleanup()


async def test_portal_metrics_count_issuances_revocations_and_login_refusals(served: tuple[Portal, int]) -> None:
    p, admin = served
    _, before = await admin_get(admin, "/metrics")
    async with p.client() as s:
        assert (await login(p, s, password="wrong password!"))[0] == 401
    s = await logged_in(p)
    async with s:
        status, _ = await issue(p, s)
        assert status == 200
        _, listing, _ = await portal_get(p, s, "/certificates?run=1")
        await revoke(p, s, serials_of(listing)[0])
    status, text = await admin_get(admin, "/metrics")
    assert status == 200
    assert (
        sample(text, "gateway_portal_certificates_issued_total")
        == sample(before, "gateway_portal_certificates_issued_total") + 1
    )
    assert (
        sample(text, "gateway_portal_certificates_revoked_total")
        == sample(before, "gateway_portal_certificates_revoked_total") + 1
    )
    labels = '{reason="bad_credentials"}'
    assert (
        sample(text, "gateway_portal_login_refusals_total", labels)
        == sample(before, "gateway_portal_login_refusals_total", labels) + 1
    )
    assert 0 <= sample(text, "gateway_portal_crl_age_seconds") < 600
    assert 23 * 3600 < sample(text, "gateway_portal_crl_seconds_to_next_update") <= 24 * 3600


async def test_without_portal_admin_the_portal_opens_no_second_listener(tmp_path: Path) -> None:
    runner, p, admin = await start(tmp_path, admin=False)
    try:
        assert admin is None
        async with p.client() as s:
            status, _, _ = await portal_get(p, s, "/healthz")  # not on the users' listener
        assert status == 404
    finally:
        await runner.cleanup()

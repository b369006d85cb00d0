"""/healthz before a CRL lapse: "degraded" (still 200) within a margin of nextUpdate, 503 past nextUpdate + grace."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization

from gateway.certs import builders as pki
from gateway.certs.files import ThrowawayPki, write_atomic
from gateway.certs.revocation import HourlyWarning
from gateway.web.admin import crl_degraded
from tests.harness import Harness, start_harness, without_instance
from tests.test_supervisor import Served


def write_crl(the_pki: ThrowawayPki, next_update: dt.timedelta, *, age: dt.timedelta = dt.timedelta(minutes=1)) -> None:
    now = dt.datetime.now(dt.UTC) - age
    crl = pki.build_crl(
        the_pki.ca_certificate, the_pki.ca_private_key, [], this_update=now, next_update=now + next_update, number=7
    )
    write_atomic(the_pki.crl, crl.public_bytes(serialization.Encoding.DER))


async def healthz(h: Harness) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(h.admin_url("/healthz")) as r:
        return r.status, await r.json()


async def test_crl_three_hours_from_next_update_is_degraded_but_200(tmp_path: Path, pki: ThrowawayPki) -> None:
    write_crl(pki, dt.timedelta(hours=3))
    h = await start_harness(tmp_path, pki)
    try:
        status, body = await healthz(h)
        assert status == 200
        assert body["status"] == "degraded"
        assert body["degraded"] == ["crl_near_next_update"]
        assert 2.9 * 3600 < body["crl_seconds_to_next_update"] <= 3 * 3600
        async with aiohttp.ClientSession() as s, s.get(h.admin_url("/metrics")) as r:
            text = without_instance(await r.text())
        assert "gateway_crl_seconds_to_next_update{" in text
    finally:
        await h.close()


async def test_crl_three_days_from_next_update_is_ok(tmp_path: Path, pki: ThrowawayPki) -> None:
    write_crl(pki, dt.timedelta(days=3))
    h = await start_harness(tmp_path, pki)
    try:
        status, body = await healthz(h)
        assert (status, body["status"], body["degraded"]) == (200, "ok", [])
    finally:
        await h.close()


async def test_the_margin_is_configurable(tmp_path: Path, pki: ThrowawayPki) -> None:
    write_crl(pki, dt.timedelta(hours=3))
    extra = {"revocation": {"crl": str(pki.crl), "warn_before_next_update_seconds": 3600}}
    h = await start_harness(tmp_path, pki, extra=extra)
    try:
        assert (await healthz(h))[1]["status"] == "ok"
    finally:
        await h.close()


async def test_crl_past_next_update_and_grace_is_unhealthy(tmp_path: Path, pki: ThrowawayPki) -> None:
    write_crl(pki, dt.timedelta(hours=1), age=dt.timedelta(hours=3))  # nextUpdate 2 h ago, grace 1 h
    h = await start_harness(tmp_path, pki)
    try:
        status, body = await healthz(h)
        assert (status, body["status"], body["crl_fresh"]) == (503, "unhealthy", False)
    finally:
        await h.close()


def test_degraded_decision_is_pure() -> None:
    now = 1_000_000.0
    assert crl_degraded([now + 3 * 3600], now, 21600) == ["crl_near_next_update"]
    assert crl_degraded([now + 3 * 86400], now, 21600) == []
    assert crl_degraded([now + 3 * 86400, now + 60], now, 21600) == ["crl_near_next_update"]
    assert crl_degraded([], now, 21600) == []  # no CRL at all is unhealthy, not degraded
    assert crl_degraded([now + 60], now, 0) == []  # a margin of 0 turns the warning off


def test_the_warning_is_logged_once_per_hour_not_per_call() -> None:
    clock = [100.0]
    warning = HourlyWarning(clock=lambda: clock[0])
    seen = [warning.due() for _ in range(50)]
    assert seen.count(True) == 1
    clock[0] += 3599
    assert not warning.due()
    clock[0] += 1
    assert warning.due()
    assert not warning.due()


async def test_the_log_warns_once_in_the_window(
    tmp_path: Path, pki: ThrowawayPki, caplog: pytest.LogCaptureFixture
) -> None:
    write_crl(pki, dt.timedelta(hours=3))
    caplog.set_level(logging.WARNING, logger="gateway")
    h = await start_harness(tmp_path, pki)
    try:
        for _ in range(5):  # health checks and refreshes in the window: still one warning this hour
            await healthz(h)
            assert h.worker.runtime is not None
            await h.worker.runtime.refresher.refresh_all()
            h.worker.runtime.refresher.update_age_metrics()
        warnings = [r for r in caplog.records if "close to nextUpdate" in r.getMessage()]
        assert len(warnings) == 1
        assert warnings[0].levelno == logging.WARNING
    finally:
        await h.close()


def test_the_supervisor_reports_degraded_from_the_workers_metrics(tmp_path: Path, pki: ThrowawayPki) -> None:
    write_crl(pki, dt.timedelta(hours=3))
    gw = Served(tmp_path, pki)
    try:
        deadline = time.monotonic() + 60
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{gw.admin}/healthz", timeout=5) as r:
                    body = json.loads(r.read())
                    if body.get("workers_listening") == 2:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        assert body["status"] == "degraded", body
        assert body["degraded"] == ["crl_near_next_update"]
    finally:
        gw.proc.terminate()
        gw.proc.wait(60)

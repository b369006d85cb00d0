"""The audit trail end to end: a real gateway with the real writer, read back through the CLI.

The gateway refuses in the ways the earlier issues define (over real TLS with
generated certificates); the security team's commands then find each
refusal with the right reason, certificate serial and client address, and
the support ID on a refusal page finds its event.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.audit.events import serial_hex
from gateway.audit.writer import AuditLog
from gateway.certs.files import ThrowawayPki, make_throwaway_pki
from gateway.cli import main
from tests.harness import Harness, start_harness, write_config


@pytest.fixture
async def gw(tmp_path: Path, pki: ThrowawayPki) -> Any:
    config_path = write_config(tmp_path, pki, {"tdnet": 1, "j-iriss": 1, "clearing": 1})
    from gateway.config import load_config

    audit = AuditLog(load_config(config_path).audit, worker=0)
    await audit.start()
    h = await start_harness(tmp_path, pki, audit=audit)
    yield h
    await h.close()
    await audit.aclose()


def cli_json(h: Harness, capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    assert main(["audit", "list", "--config", str(h.config.path), "--format", "json", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


async def status_of(h: Harness, path: str, **session: Any) -> tuple[int, dict[str, Any]]:
    async with h.session(**session) as s, s.get(h.url(path), headers={"Accept": "application/json"}) as r:
        return r.status, await r.json(content_type=None)


async def flush(h: Harness) -> None:
    """Let the writer task drain its queue (it batches in a thread)."""
    audit: AuditLog = h.audit
    for _ in range(100):
        await asyncio.sleep(0.05)
        if audit._queue.empty():  # type: ignore[attr-defined]
            await asyncio.sleep(0.2)
            return


async def test_each_refusal_is_found_through_the_cli(
    gw: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = gw.issue("LC000001", not_before=now - dt.timedelta(days=400), days=365, name="expired")
    wrong_usage = gw.issue("LC000001", eku=[ExtendedKeyUsageOID.SERVER_AUTH], name="eku")
    revoked_serial = gw.pki.clients["LC000002"].certificate.serial_number
    await gw.publish_crl([revoked_serial])
    cases = {
        "no_certificate": ({"user": None}, ""),
        "certificate_expired": ({"cert": expired[0], "key": expired[1]}, serial_hex(expired[2].serial_number)),
        "wrong_key_usage": ({"cert": wrong_usage[0], "key": wrong_usage[1]}, serial_hex(wrong_usage[2].serial_number)),
        "certificate_revoked": ({"user": "LC000002"}, serial_hex(revoked_serial)),
    }
    support_ids = {}
    for reason, (who, _serial) in cases.items():
        status, body = await status_of(gw, "/onre/x", **who)
        assert (status, body["error"]) == (403, reason)
        support_ids[reason] = body["support_id"]
    other = make_throwaway_pki(tmp_path / "lookalike").clients["LC000001"]
    with pytest.raises(aiohttp.ClientError):
        await status_of(gw, "/onre/x", cert=other.cert, key=other.key)
    await flush(gw)

    for reason, (_who, serial) in cases.items():
        events = cli_json(gw, capsys, "--reason", reason)
        assert len(events) == 1, (reason, events)
        [event] = events
        assert event["client_ip"] == "127.0.0.1" and event["path"] == "/onre/x"
        assert event["cert_serial"] == serial
        assert event["support_id"] == support_ids[reason]
    handshakes = cli_json(gw, capsys, "--event", "handshake_failed")  # aiohttp's client tries twice
    assert handshakes and {(e["reason"], e["cert_serial"], e["client_ip"]) for e in handshakes} == {
        ("certificate_verify_failed", serial_hex(other.certificate.serial_number), "127.0.0.1")
    }
    by_serial = cli_json(gw, capsys, "--serial", format(revoked_serial, "x"))
    assert [e["reason"] for e in by_serial] == ["certificate_revoked"]

    assert main(["audit", "show", support_ids["certificate_revoked"], "--config", str(gw.config.path)]) == 0
    shown = capsys.readouterr().out
    assert "certificate_revoked" in shown and serial_hex(revoked_serial) in shown


async def test_refusal_page_support_id_finds_its_event(gw: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    async with gw.session(None) as s, s.get(gw.url("/jpxcube/")) as r:
        page = await r.text()
    support_id = page.split('id="support-id">', 1)[1].split("<", 1)[0]
    await flush(gw)
    assert main(["audit", "show", support_id, "--config", str(gw.config.path), "--format", "json"]) == 0
    [event] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert event["reason"] == "no_certificate" and event["path"] == "/jpxcube/"


async def test_parser_refusal_and_client_timeout_are_found_through_the_cli(
    tmp_path: Path, pki: ThrowawayPki, capsys: pytest.CaptureFixture[str]
) -> None:
    """The two refusals made outside any handler: `gateway audit show` finds each, with client and certificate."""
    from gateway.config import load_config
    from tests.test_hostile_http import FAST, SUPPORT_ID, closed_within, connect, exchange

    config_path = write_config(tmp_path, pki, {"tdnet": 1, "j-iriss": 1, "clearing": 1}, extra=FAST)
    audit = AuditLog(load_config(config_path).audit, worker=0)
    await audit.start()
    h = await start_harness(tmp_path, pki, audit=audit, extra=FAST)
    try:
        answer = await exchange(
            h, b"POST /onre/a HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
        )
        found = SUPPORT_ID.search(answer)
        assert found, answer[:300]
        reader, writer = await connect(h)
        writer.write(b"GET /onre/a HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        await closed_within(reader, 5)
        writer.close()
        await flush(h)
        serial = serial_hex(pki.clients["LC000001"].certificate.serial_number)
        [stalled] = cli_json(h, capsys, "--reason", "client_timeout")
        for support_id, reason in ((found.group(1).decode(), "bad_request"), (stalled["support_id"], "client_timeout")):
            assert main(["audit", "show", support_id, "--config", str(h.config.path), "--format", "json"]) == 0
            [event] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
            assert (event["reason"], event["client_ip"], event["cert_subject"], event["cert_serial"]) == (
                reason,
                "127.0.0.1",
                "LC000001",
                serial,
            )
    finally:
        await h.close()
        await audit.aclose()


@pytest.mark.slow
async def test_refusal_flood_loses_nothing_and_does_not_block_requests(
    gw: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    """Thousands of refusals in a few seconds: every one stored, valid requests still answered promptly."""

    async def valid_latencies(n: int) -> list[float]:
        out = []
        async with gw.session("LC000001") as s:
            for _ in range(n):
                started = time.perf_counter()
                async with s.get(gw.url("/onre/tiny")) as r:
                    await r.read()
                    assert r.status == 200
                out.append(time.perf_counter() - started)
        return out

    baseline = statistics.median(await valid_latencies(50))
    flood_requests = 2000

    async def flooder(s: aiohttp.ClientSession, count: int) -> None:
        for _ in range(count):
            async with s.get(gw.url("/onre/x")) as r:
                assert r.status == 403

    async with gw.session(None) as s:
        started = time.perf_counter()
        flood = asyncio.gather(*(flooder(s, flood_requests // 20) for _ in range(20)))
        during = await valid_latencies(50)
        await flood
        rate = flood_requests / (time.perf_counter() - started)
    await flush(gw)
    assert main(["audit", "summary", "--config", str(gw.config.path), "--since", "1h", "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["by_reason"]["no_certificate"] == flood_requests
    print(
        f"flood: {rate:.0f} refusals/s; valid p50 {baseline * 1000:.1f} ms before, "
        f"{statistics.median(during) * 1000:.1f} ms during"
    )
    # The writer never blocks the loop: a blocked loop would stall every request for whole batches.
    assert statistics.median(during) < baseline * 20 + 0.25

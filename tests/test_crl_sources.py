"""CRL sources that misbehave: the last good CRL is kept, the failure is counted and audited,
and once the kept CRL is past nextUpdate + grace every certificate is refused.

The HTTP source is a real aiohttp server on loopback whose behaviour each
test switches: 500, too slow, too big, truncated, garbage, signed by another
CA, and ETag / 304.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import REGISTRY

from gateway.certs import builders as pki_mod
from gateway.certs.files import ThrowawayPki, make_throwaway_pki
from gateway.certs.revocation import CrlRefresher
from gateway.config import RevocationConfig
from tests.harness import start_harness

NOW = dt.datetime.now(dt.UTC)


class CrlServer:
    """Serves one CRL over HTTP; ``mode`` decides how badly."""

    def __init__(self, good: bytes) -> None:
        self.good = good
        self.body = good
        self.mode = "good"
        self.requests: list[dict[str, str]] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(dict(request.headers))
        etag = '"v1"'
        if self.mode == "500":
            return web.Response(status=500, text="oops")
        if self.mode == "slow":
            await asyncio.sleep(2)
        if self.mode == "etag" and request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        if self.mode == "huge-stream":  # no Content-Length: the limit must hold while streaming
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(64):
                await response.write(b"\x00" * 4096)
            return response
        body = {
            "huge": b"\x30" * 300_000,
            "truncated": self.body[: len(self.body) // 2],
            "garbage": b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        }.get(self.mode, self.body)
        return web.Response(body=body, headers={"ETag": etag, "Content-Type": "application/pkix-crl"})


@pytest.fixture
async def crl_server(pki: ThrowawayPki) -> AsyncIterator[CrlServer]:
    server = CrlServer(pki.crl.read_bytes())
    app = web.Application()
    app.router.add_get("/ca.crl", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield server
    await runner.cleanup()


def url(server: CrlServer) -> str:
    return f"http://127.0.0.1:{server.port}/ca.crl"


def failures(source: str) -> float:
    return REGISTRY.get_sample_value("gateway_crl_refresh_failures_total", {"source": source}) or 0.0


def refresher_for(pki: ThrowawayPki, source: str, **config: Any) -> tuple[CrlRefresher, list[tuple[str, str]]]:
    reported: list[tuple[str, str]] = []
    settings = RevocationConfig(sources=(source,), fetch_timeout=0.5, max_bytes=200_000, **config)
    ca_der = pki.ca_certificate.public_bytes(Encoding.DER)
    return CrlRefresher(settings, [ca_der], on_failure=lambda s, why: reported.append((s, why))), reported


def wrong_signer(tmp_path: Path) -> bytes:
    return make_throwaway_pki(tmp_path / "other").crl.read_bytes()


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("500", "HTTP 500"),
        ("slow", "TimeoutError"),
        ("huge", "larger than revocation.max_bytes"),
        ("huge-stream", "larger than revocation.max_bytes"),
        ("truncated", "not a CRL"),
        ("garbage", "not a CRL"),
        ("wrong-signer", "does not verify against any configured CA"),
    ],
)
async def test_http_source_failure_keeps_the_last_good_crl(
    pki: ThrowawayPki, crl_server: CrlServer, tmp_path: Path, mode: str, words: str
) -> None:
    refresher, reported = refresher_for(pki, url(crl_server))
    try:
        assert await refresher.refresh(url(crl_server))
        good = refresher.state
        before = failures(url(crl_server))
        crl_server.mode = mode
        if mode == "wrong-signer":
            crl_server.mode, crl_server.body = "good", wrong_signer(tmp_path)
        assert not await refresher.refresh(url(crl_server))
        assert refresher.state is good  # nothing swapped
        assert words in refresher.last_error[url(crl_server)]
        assert failures(url(crl_server)) == before + 1
        assert reported and words in reported[-1][1]
        # Twin: the source recovers, the next refresh loads and clears the error.
        crl_server.mode, crl_server.body = "good", crl_server.good
        newer = pki_mod.build_crl(
            pki.ca_certificate,
            pki.ca_private_key,
            [],
            this_update=NOW,
            next_update=NOW + dt.timedelta(days=1),
            number=9,
        )
        crl_server.body = newer.public_bytes(Encoding.PEM)
        assert await refresher.refresh(url(crl_server))
        assert url(crl_server) not in refresher.last_error
    finally:
        await refresher.aclose()


async def test_etag_is_sent_and_304_keeps_the_crl_without_a_failure(pki: ThrowawayPki, crl_server: CrlServer) -> None:
    crl_server.mode = "etag"
    refresher, reported = refresher_for(pki, url(crl_server))
    try:
        assert await refresher.refresh(url(crl_server))
        state, before = refresher.state, failures(url(crl_server))
        assert not await refresher.refresh(url(crl_server))  # 304: nothing new
        assert crl_server.requests[-1].get("If-None-Match") == '"v1"'
        assert "If-None-Match" not in crl_server.requests[0]
        assert refresher.state is state and not refresher.last_error and not reported
        assert failures(url(crl_server)) == before
    finally:
        await refresher.aclose()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("truncated", "not a CRL"),
        ("garbage", "not a CRL"),
        ("huge", "over revocation.max_bytes"),
        ("missing", "cannot read CRL file"),
    ],
)
async def test_file_source_failure_keeps_the_last_good_crl(pki: ThrowawayPki, content: str, words: str) -> None:
    refresher, _ = refresher_for(pki, str(pki.crl))
    try:
        assert await refresher.refresh(str(pki.crl))
        good = refresher.state
        data = pki.crl.read_bytes()
        if content == "missing":
            pki.crl.unlink()
        else:
            pki.crl.write_bytes(
                {"truncated": data[: len(data) // 2], "garbage": b"\x00" * 100, "huge": b"\x30" * 300_000}[content]
            )
        assert not await refresher.refresh(str(pki.crl))
        assert refresher.state is good
        assert words in refresher.last_error[str(pki.crl)]
    finally:
        await refresher.aclose()


class Clock:
    def __init__(self) -> None:
        self.offset = dt.timedelta()

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset


async def test_failing_source_fails_closed_once_past_next_update_and_grace(
    tmp_path: Path, pki: ThrowawayPki, crl_server: CrlServer
) -> None:
    clock = Clock()
    revocation = {"crl": url(crl_server), "refresh_seconds": 3600, "grace_seconds": 600, "fetch_timeout_seconds": 0.5}
    h = await start_harness(tmp_path, pki, extra={"revocation": revocation}, clock=clock)
    try:
        async with h.session() as s:

            async def status() -> tuple[int, str]:
                async with s.get(h.url("/onre/a"), headers={"Accept": "application/json"}) as r:
                    return r.status, (await r.json()).get("error", "") if r.status != 200 else ""

            assert await status() == (200, "")
            crl_server.mode = "500"
            assert h.worker.runtime is not None
            await h.worker.runtime.refresher.refresh_all()
            assert any(e.event == "crl_refresh_failed" and "HTTP 500" in e.detail for e in h.audit.events)
            clock.offset = dt.timedelta(days=1, minutes=5)  # past nextUpdate, inside the 10-minute grace
            assert await status() == (200, "")
            clock.offset = dt.timedelta(days=1, minutes=11)  # past nextUpdate + grace
            assert await status() == (403, "revocation_unavailable")
        async with aiohttp.ClientSession() as plain, plain.get(h.admin_url("/healthz")) as r:
            assert r.status == 503
            assert "HTTP 500" in json.dumps(await r.json())
    finally:
        await h.close()

"""Reload and shutdown: SIGHUP / ``gateway reload`` swap everything or nothing; SIGTERM drains.

In-process tests drive :meth:`GatewayWorker.reload` through the admin
listener's ``POST /reload``; the subprocess tests run a real ``gateway
serve`` (one worker, and the supervisor with two) and use the CLI and real
signals. CA rollover: two CAs with the *same* name trusted side by side,
each certificate judged by its own CA's CRL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import signal
import sqlite3
import ssl
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import REGISTRY

from gateway.certs import builders as pki_mod
from gateway.certs.files import ThrowawayPki, make_throwaway_pki, write_atomic
from tests.harness import Harness, free_port, start_backend, start_harness, without_instance, write_config

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
async def gw(tmp_path: Path, pki: ThrowawayPki) -> Harness:  # type: ignore[misc]
    harness = await start_harness(tmp_path, pki)
    yield harness
    await harness.close()


@pytest.fixture
def pki_b(tmp_path: Path) -> ThrowawayPki:
    """The next CA: same name as the first, another key (a rollover)."""
    return make_throwaway_pki(tmp_path / "pki-b", users=("LC000001",))


def reloads(result: str) -> float:
    return REGISTRY.get_sample_value("gateway_reloads_total", {"result": result}) or 0.0


def edit_config(path: Path, **sections: Any) -> None:
    data = yaml.safe_load(path.read_text())
    for name, value in sections.items():
        data[name] = {**data.get(name, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(data))


async def post_reload(h: Harness) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.post(h.admin_url("/reload")) as r:
        return r.status, await r.json()


def trust_both(h: Harness, b: ThrowawayPki, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cadata=h.pki.ca_cert.read_text() + b.ca_cert.read_text())
    ctx.load_cert_chain(cert, key)
    return ctx


async def fetch(port: int, ctx: ssl.SSLContext, path: str = "/onre/a") -> tuple[int, dict[str, Any], str]:
    """(status, JSON body, SHA-256 of the server certificate) on a fresh connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        sslobj = writer.get_extra_info("ssl_object")
        server_fp = hashlib.sha256(sslobj.getpeercert(binary_form=True)).hexdigest()
        return (*await request(reader, writer, path), server_fp)
    finally:
        writer.close()


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> tuple[int, dict[str, Any]]:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n\r\n".encode())
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    length = next(int(x.split(":")[1]) for x in head.split("\r\n") if x.lower().startswith("content-length"))
    body = await reader.readexactly(length)
    return int(head[9:12]), json.loads(body) if body.startswith(b"{") else {"text": body.decode()}


def fingerprint(pem_file: Path) -> str:
    cert = pki_mod.x509.load_pem_x509_certificate(pem_file.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# --- in-process: rotation, rollover, failure ----------------------------------------------------


async def test_reload_rotates_server_certificate_and_adds_a_second_ca(gw: Harness, pki_b: ThrowawayPki) -> None:
    a_files, b_files = gw.pki.clients["LC000001"], pki_b.clients["LC000001"]
    old_fp, new_fp = fingerprint(gw.pki.server_cert), fingerprint(pki_b.server_cert)
    # A keep-alive connection opened before the reload.
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.worker.port, ssl=trust_both(gw, pki_b, a_files.cert, a_files.key)
    )
    assert (await request(reader, writer, "/onre/before"))[0] == 200
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)):  # B not trusted yet
        await fetch(gw.worker.port, trust_both(gw, pki_b, b_files.cert, b_files.key))
    old_task = gw.worker._tasks[0]
    ok_before = reloads("ok")

    edit_config(
        gw.config.path,
        tls={
            "cert": str(pki_b.server_cert),
            "key": str(pki_b.server_key),
            "client_ca": [str(gw.pki.ca_cert), str(pki_b.ca_cert)],
        },
        revocation={"crl": [str(gw.pki.crl), str(pki_b.crl)]},
    )
    status, body = await post_reload(gw)
    assert (status, body["ok"]) == (200, True), body
    assert reloads("ok") == ok_before + 1
    assert old_task.done()  # the old CRL refresher no longer runs

    # The old connection still works (its TLS session is kept) ...
    assert (await request(reader, writer, "/onre/after"))[0] == 200
    writer.close()
    # ... new handshakes present the new certificate, and both CAs' users get in.
    for files in (a_files, b_files):
        status, body, server_fp = await fetch(gw.worker.port, trust_both(gw, pki_b, files.cert, files.key))
        assert (status, server_fp) == (200, new_fp), body
    assert old_fp != new_fp


async def test_each_ca_is_judged_by_its_own_crl(gw: Harness, pki_b: ThrowawayPki) -> None:
    """Two CAs with the same name: revoking in B's CRL must not touch A's certificates, and vice versa."""
    a_files, b_files = gw.pki.clients["LC000001"], pki_b.clients["LC000001"]
    revoked_b = pki_mod.build_crl(
        pki_b.ca_certificate,
        pki_b.ca_private_key,
        [pki_mod.RevokedEntry(b_files.certificate.serial_number, NOW)],
        this_update=NOW,
        next_update=NOW + dt.timedelta(days=1),
        number=5,
    )
    write_atomic(pki_b.crl, revoked_b.public_bytes(serialization.Encoding.DER))
    edit_config(
        gw.config.path,
        tls={"client_ca": [str(gw.pki.ca_cert), str(pki_b.ca_cert)]},
        revocation={"crl": [str(gw.pki.crl), str(pki_b.crl)]},
    )
    assert (await post_reload(gw))[1]["ok"]
    status, body, _ = await fetch(gw.worker.port, trust_both(gw, pki_b, b_files.cert, b_files.key))
    assert (status, body["error"]) == (403, "certificate_revoked")
    assert (await fetch(gw.worker.port, trust_both(gw, pki_b, a_files.cert, a_files.key)))[0] == 200


async def test_second_ca_without_its_crl_is_revocation_unavailable(gw: Harness, pki_b: ThrowawayPki) -> None:
    edit_config(gw.config.path, tls={"client_ca": [str(gw.pki.ca_cert), str(pki_b.ca_cert)]})
    assert (await post_reload(gw))[1]["ok"]
    b_files, a_files = pki_b.clients["LC000001"], gw.pki.clients["LC000001"]
    status, body, _ = await fetch(gw.worker.port, trust_both(gw, pki_b, b_files.cert, b_files.key))
    assert (status, body["error"]) == (403, "revocation_unavailable")
    assert (await fetch(gw.worker.port, trust_both(gw, pki_b, a_files.cert, a_files.key)))[0] == 200


@pytest.mark.parametrize(
    ("target", "content", "words"),
    [
        ("server_cert", b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n", "server certificate"),
        ("server_key", b"not a key", "server certificate and key"),
        ("ca_cert", b"", "not a PEM certificate file"),
        ("crl", b"\x30\x03garbage", "CRL source not loaded"),
        ("config", b"tls: [unclosed", "line"),
    ],
)
async def test_broken_file_keeps_the_old_state(
    gw: Harness, pki_b: ThrowawayPki, target: str, content: bytes, words: str
) -> None:
    a_files = gw.pki.clients["LC000001"]
    old_fp = fingerprint(gw.pki.server_cert)
    failed_before = reloads("failed")
    # Point the config at new files, one of which is broken.
    broken = gw.directory / f"broken-{target}"
    broken.write_bytes(content)
    files = {
        "server_cert": pki_b.server_cert,
        "server_key": pki_b.server_key,
        "ca_cert": pki_b.ca_cert,
        "crl": pki_b.crl,
    }
    if target == "config":
        gw.config.path.write_bytes(content)
    else:
        files[target] = broken
        edit_config(
            gw.config.path,
            tls={
                "cert": str(files["server_cert"]),
                "key": str(files["server_key"]),
                "client_ca": [str(gw.pki.ca_cert), str(files["ca_cert"])],
            },
            revocation={"crl": [str(gw.pki.crl), str(files["crl"])]},
        )
    status, body = await post_reload(gw)
    assert (status, body["ok"]) == (500, False)
    assert words in body["message"], body
    assert reloads("failed") == failed_before + 1
    # The old certificate, CA and CRL keep serving.
    status, _, server_fp = await fetch(gw.worker.port, trust_both(gw, pki_b, a_files.cert, a_files.key))
    assert (status, server_fp) == (200, old_fp)
    async with aiohttp.ClientSession() as s, s.get(gw.admin_url("/healthz")) as r:
        assert r.status == 200


async def test_requests_during_reloads_never_fail(gw: Harness) -> None:
    """No request may see a half-swapped state or an empty CRL state."""
    stop = asyncio.Event()
    statuses: list[int] = []

    async def load() -> None:
        async with gw.session() as s:
            while not stop.is_set():
                async with s.get(gw.url("/onre/a")) as r:
                    statuses.append(r.status)

    workers = [asyncio.create_task(load()) for _ in range(4)]
    for _ in range(5):
        assert (await post_reload(gw))[1]["ok"]
    stop.set()
    await asyncio.gather(*workers)
    assert statuses and set(statuses) == {200}


async def test_reload_is_refused_from_a_browser(gw: Harness) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.admin_url("/reload"), headers={"Origin": "https://evil.example"}) as r,
    ):
        assert r.status == 403
    assert (await post_reload(gw))[0] == 200


async def test_restart_only_sections_are_named(gw: Harness) -> None:
    edit_config(gw.config.path, login={"max_failures": 9})
    status, body = await post_reload(gw)
    assert status == 200
    assert body["message"] == "reloaded; restart needed for: login"


# --- a real `gateway serve`: CLI reload, SIGTERM drain, the supervisor ---------------------------


class Served:
    """A ``gateway serve`` subprocess in front of in-test backends."""

    def __init__(self, directory: Path, the_pki: ThrowawayPki, workers: int = 1) -> None:
        self.directory, self.pki, self.workers = directory, the_pki, workers
        self.port, self.admin = free_port(), free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.runners: list[Any] = []
        self.config = Path()
        self.ca_pem = ""

    async def start(self) -> None:
        ports = {}
        for name in ("tdnet", "j-iriss", "clearing"):
            runner, ports[name] = await start_backend(name)
            self.runners.append(runner)
        self.config = write_config(self.directory, self.pki, ports, extra={"workers": self.workers})
        edit_config(
            self.config,
            listen={"port": self.port},
            admin={"port": self.admin},
            limits={"drain_timeout_seconds": 10},
            log_level="info",  # serve.out in the test's folder tells what happened
        )
        self.ca_pem = self.pki.ca_cert.read_text()
        with (self.directory / "serve.out").open("wb") as out:  # the child keeps its own descriptor
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--config",
                str(self.config),
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        for _ in range(300):
            await asyncio.sleep(0.1)
            try:
                async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{self.admin}/healthz") as r:
                    if r.status == 200 and await self._all_workers_listen():
                        return
            except aiohttp.ClientError:
                continue
        raise AssertionError("gateway serve did not come up")

    async def _all_workers_listen(self) -> bool:
        if self.workers == 1:
            return True
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{self.admin}/metrics") as r:
            text = without_instance(await r.text())
        return text.count("gateway_crl_entries{") >= 1

    def ctx(self, user: str | None = "LC000001") -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.ca_pem)
        if user:
            ctx.load_cert_chain(self.pki.clients[user].cert, self.pki.clients[user].key)
        return ctx

    async def cli_reload(self) -> tuple[int, dict[str, Any]]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "reload",
            "--config",
            str(self.config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, _err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode is not None
        return proc.returncode, json.loads(out or b"{}")

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), 60)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            for runner in self.runners:
                await runner.cleanup()
            self.runners = []
        return code


@pytest.mark.slow
async def test_cli_reload_against_a_running_gateway(tmp_path: Path, pki: ThrowawayPki, pki_b: ThrowawayPki) -> None:
    served = Served(tmp_path, pki)
    await served.start()
    try:
        good_cert = pki.server_cert.read_bytes()
        pki.server_cert.write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncated")
        code, body = await served.cli_reload()
        assert (code, body["ok"]) == (1, False)
        assert "server certificate" in body["message"]
        assert (await fetch(served.port, served.ctx()))[0] == 200  # still serving the old one
        # Rotate for real: a new key and certificate from the same CA, then reload.
        key = pki_mod.generate_key()
        cert = pki_mod.build_server_cert(
            pki.ca_certificate, pki.ca_private_key, key.public_key(), ["127.0.0.1"], now=NOW
        )
        write_atomic(pki.server_key, pki_mod.key_pem(key), mode=0o600)
        write_atomic(pki.server_cert, pki_mod.cert_pem(cert))
        code, body = await served.cli_reload()
        assert (code, body) == (0, {"ok": True, "message": "reloaded"})
        status, _, server_fp = await fetch(served.port, served.ctx())
        assert (status, server_fp) == (200, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest())
        old_leaf = x509.load_pem_x509_certificates(good_cert)[0]  # the file holds leaf + CA
        assert server_fp != hashlib.sha256(old_leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    finally:
        assert await served.stop() == 0


@pytest.mark.slow
async def test_sigterm_drains_in_flight_requests_and_flushes_the_audit(tmp_path: Path, pki: ThrowawayPki) -> None:
    served = Served(tmp_path, pki)
    await served.start()
    assert served.proc is not None
    try:
        # Something for the audit trail: a refusal just before the signal.
        status, body, _ = await fetch(served.port, served.ctx(user=None))
        assert (status, body["error"]) == (403, "no_certificate")
        support_id = body["support_id"]
        slow = asyncio.create_task(fetch(served.port, served.ctx(), "/onre/slow?seconds=2"))
        await asyncio.sleep(0.5)
        served.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises(OSError):  # stopped accepting
            await asyncio.open_connection("127.0.0.1", served.port, ssl=served.ctx())
        status, body, _ = await slow
        assert (status, body) == (200, {"text": "slow"})  # the in-flight request finished
    finally:
        code = await served.stop()
    assert code == 0
    with sqlite3.connect(tmp_path / "audit.db") as db:
        rows = db.execute("SELECT event, reason FROM events WHERE support_id = ?", (support_id,)).fetchall()
    assert rows == [("request_refused", "no_certificate")]


@pytest.mark.slow
async def test_supervisor_reload_validates_first_then_reloads_every_worker(tmp_path: Path, pki: ThrowawayPki) -> None:
    served = Served(tmp_path, pki, workers=2)
    await served.start()
    try:
        code, body = await served.cli_reload()
        assert (code, body["ok"]) == (0, True), body
        assert body["message"].startswith("2 workers reloaded")
        pki.ca_cert.write_bytes(b"")  # a broken CA bundle: refused before any worker is touched
        code, body = await served.cli_reload()
        assert (code, body["ok"]) == (1, False)
        assert "not a PEM certificate file" in body["message"] or "holds no certificate" in body["message"]
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{served.admin}/metrics") as r:
            text = without_instance(await r.text())
        assert 'gateway_reloads_total{result="ok"} 2.0' in text  # one per worker
        assert 'gateway_reloads_total{result="failed"} 1.0' in text  # the supervisor's refusal
        for _ in range(4):  # both workers (SO_REUSEPORT spreads connections) still serve
            assert (await fetch(served.port, served.ctx()))[0] == 200
        status, body, _ = await fetch(served.port, served.ctx(user=None))
        assert status == 403
    finally:
        code = await served.stop()
    assert code == 0  # SIGTERM to the supervisor: workers drain, flush their audit and exit
    with sqlite3.connect(tmp_path / "audit.db") as db:
        rows = db.execute("SELECT event FROM events WHERE support_id = ?", (body["support_id"],)).fetchall()
    assert rows == [("request_refused",)]

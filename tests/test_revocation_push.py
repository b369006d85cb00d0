"""Revocation push: a revocation in the shared database refuses at the gateway before the next CRL.

Real TLS through the test harness's gateway (its CRL refresh is an hour
away, so only the push can be what refuses), a real PostgreSQL database
holding the harness CA's issuance records, and the CA's own revoke
transaction sending the notification. The CRL stays the fallback: a push
lost while the listener was down is covered by the next CRL, and by the
reload the listener does when it reconnects.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.ca.issuance import CertificateRecord, RevocationReason
from gateway.certs import builders as pki_builders
from gateway.certs.files import ThrowawayPki
from gateway.storage import pg_issuance, postgres
from tests.harness import Harness, start_harness
from tests.pgserver import PgServer

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture
def records(pg_url: str) -> Iterator[pg_issuance.PgIssuanceRecords]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        postgres.migrate(conn, [pg_issuance.SCHEMA])
    with postgres.Database(postgres.target(pg_url)) as db:
        yield pg_issuance.PgIssuanceRecords(db)


@pytest.fixture
async def gw(
    tmp_path: Path, pki: ThrowawayPki, pg_url: str, records: pg_issuance.PgIssuanceRecords
) -> AsyncIterator[Harness]:
    """The harness gateway with ``database:`` set, its CA's client certificates in the records."""
    for files in pki.clients.values():
        records.add(_record(files.certificate), files.certificate.public_bytes(Encoding.DER))
    # The users and audit stores live in the database then (this gateway uses neither).
    extra = {"database": {"url": pg_url}, "users": {}, "audit": {}}
    harness = await start_harness(tmp_path, pki, extra=extra)
    try:
        feed = harness.worker._revocation_feed
        assert feed is not None
        await _until(lambda: feed.loads >= 1, 10)  # listening, and the initial load done
        yield harness
    finally:
        await harness.close()


def _record(cert: x509.Certificate) -> CertificateRecord:
    return CertificateRecord(
        serial=cert.serial_number,
        user_id=cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value,  # type: ignore[arg-type]
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint=pki_builders.fingerprint_sha256(cert),
        requested_by="test",
        issued_at=cert.not_valid_before_utc,
    )


async def _until(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> str:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n\r\n".encode())
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    length = next(int(line.split(":")[1]) for line in head.split("\r\n") if line.lower().startswith("content-length"))
    return head + (await reader.readexactly(length)).decode()


async def _revoke(records: pg_issuance.PgIssuanceRecords, serial: int) -> None:
    """The CA's revoke transaction (as the portal or `gateway ca revoke` runs it), off the loop."""
    await asyncio.get_running_loop().run_in_executor(
        None, lambda: records.revoke(serial, RevocationReason.KEY_COMPROMISE, NOW, "cli:admin")
    )


async def _refused_within(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seconds: float) -> str:
    """Ask again on the same connection until refused; the refusal, or fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        answer = await http_get(reader, writer, "/onre/a")
        if not answer.startswith("HTTP/1.1 200"):
            return answer
        assert time.monotonic() < deadline, "still allowed"
        await asyncio.sleep(0.02)


async def test_a_pushed_revocation_refuses_an_open_keepalive_connection_within_a_second(
    gw: Harness, records: pg_issuance.PgIssuanceRecords
) -> None:
    serial = gw.pki.clients["LC000001"].certificate.serial_number
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.worker.port, ssl=gw.client_context("LC000001"))
    try:
        assert (await http_get(reader, writer, "/onre/a")).startswith("HTTP/1.1 200")
        await _revoke(records, serial)
        refused = await _refused_within(reader, writer, 1.0)  # same TLS connection, no CRL refresh
        assert refused.startswith("HTTP/1.1 403")
        assert "certificate_revoked" in refused  # the reason the CRL gives
    finally:
        writer.close()
    assert gw.audit.reasons()[-1] == "certificate_revoked"
    # Accept twin: another user's certificate was not revoked and still passes.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.worker.port, ssl=gw.client_context("LC000002"))
    try:
        assert (await http_get(reader, writer, "/onre/a")).startswith("HTTP/1.1 200")
    finally:
        writer.close()


async def test_a_push_lost_while_the_listener_was_down_is_covered_by_the_crl(
    gw: Harness, records: pg_issuance.PgIssuanceRecords
) -> None:
    feed = gw.worker._revocation_feed
    assert feed is not None
    await feed.listener.stop()  # the push is lost
    serial = gw.pki.clients["LC000001"].certificate.serial_number
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.worker.port, ssl=gw.client_context("LC000001"))
    try:
        await _revoke(records, serial)
        await asyncio.sleep(0.3)
        assert (await http_get(reader, writer, "/onre/a")).startswith("HTTP/1.1 200")  # nothing pushed
        await gw.publish_crl([serial])  # the signed CRL, the source of truth
        refused = await http_get(reader, writer, "/onre/a")
        assert refused.startswith("HTTP/1.1 403") and "certificate_revoked" in refused
    finally:
        writer.close()


async def test_on_reconnect_the_listener_loads_the_revocations_it_missed(
    gw: Harness, records: pg_issuance.PgIssuanceRecords, postgres: PgServer, pg_url: str
) -> None:
    """A real outage of the listener's connection: the push sent meanwhile is lost, the reload finds it."""
    feed = gw.worker._revocation_feed
    assert feed is not None
    database = urlsplit(pg_url).path.lstrip("/")
    loads = feed.loads
    postgres.sql(postgres.admin_url, f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    try:
        postgres.sql(
            postgres.admin_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = '{database}' AND application_name LIKE 'tse-gateway:%'",
        )
        await _until(lambda: not feed.listener.up, 10)
        serial = gw.pki.clients["LC000001"].certificate.serial_number
        await _revoke(records, serial)  # over the records' pooled connection; nobody is listening
    finally:
        postgres.sql(postgres.admin_url, f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.worker.port, ssl=gw.client_context("LC000001"))
    try:
        await _until(lambda: feed.loads > loads, 15)  # reconnected (with backoff) and reloaded
        refused = await http_get(reader, writer, "/onre/a")
        assert refused.startswith("HTTP/1.1 403") and "certificate_revoked" in refused
    finally:
        writer.close()
    key_id = pg_issuance.authority_key_id(gw.pki.clients["LC000001"].certificate)
    assert feed.is_revoked(key_id, serial)
    # The reload takes only revoked certificates: the other user's is not in the set.
    other = gw.pki.clients["LC000002"].certificate
    assert not feed.is_revoked(pg_issuance.authority_key_id(other), other.serial_number)


async def test_a_reload_keeps_only_what_the_database_revoked_and_pushes_are_bounded(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone who may connect can NOTIFY: junk pushes are dropped at the next reload, and never exceed the bound."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        postgres.migrate(conn, [pg_issuance.SCHEMA])
    feed = pg_issuance.RevocationFeed(postgres.target(pg_url), clock=lambda: dt.datetime.now(dt.UTC))
    monkeypatch.setattr(pg_issuance, "MAX_PUSHED", 3)
    for serial in range(1, 6):
        feed._on_push(pg_issuance.CHANNEL, f"{'ab' * 20}:{serial:x}")
    assert len(feed.revoked) == 3  # bounded
    await feed._reload()
    assert feed.revoked == set() and feed.loads == 1  # the database revoked none of them

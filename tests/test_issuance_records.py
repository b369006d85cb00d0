"""The CA's issuance records on both backends: one behaviour, and the rules the database enforces.

The same tests run on ``issuance.db`` and on a real PostgreSQL database
(``store_backend``). The PostgreSQL-only tests are what a shared database
adds: CA processes on several "hosts" (separate processes, separate pools)
racing for one user ID, two portals publishing CRLs, and the revocation
push a gateway listens to.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import multiprocessing
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.ca.authority import CaSettings, CertificateAuthority
from gateway.ca.issuance import IssuanceRefused, RevocationReason, Status
from gateway.errors import CaError
from gateway.storage import pg_issuance, postgres
from gateway.storage.interfaces import IssuanceRecordsProtocol
from gateway.storage.sqlite_issuance import SqliteIssuanceRecords

REAL_NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
T0 = REAL_NOW - dt.timedelta(days=400)
SETTINGS = CaSettings(crl_next_update=dt.timedelta(hours=6))


def migrated(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        postgres.migrate(conn, [pg_issuance.SCHEMA])


def open_records(backend: str, directory: Path, url: str) -> tuple[IssuanceRecordsProtocol, postgres.Database | None]:
    """Records for a CA in ``directory``: its issuance.db, or the shared database at ``url``."""
    if backend == "sqlite":
        return SqliteIssuanceRecords.open(directory / "issuance.db"), None
    db = postgres.Database(postgres.target(url), pool_size=2)
    return pg_issuance.PgIssuanceRecords.open(db), db


@pytest.fixture
def backend_url(store_backend: str, request: pytest.FixtureRequest) -> str:
    """'' for SQLite; a fresh, migrated PostgreSQL database's URL otherwise."""
    if store_backend == "sqlite":
        return ""
    url = str(request.getfixturevalue("pg_url"))
    migrated(url)
    return url


@pytest.fixture
def ca(store_backend: str, backend_url: str, tmp_path: Path) -> Iterator[CertificateAuthority]:
    db = None
    records = None
    if store_backend == "postgres":
        db = postgres.Database(postgres.target(backend_url), pool_size=2)
        records = pg_issuance.PgIssuanceRecords.open(db)
    try:
        yield CertificateAuthority.init(tmp_path / "ca", now=T0, settings=SETTINGS, records=records)
    finally:
        if db is not None:
            db.close()


def crl_of(ca: CertificateAuthority) -> x509.CertificateRevocationList:
    return x509.load_der_x509_crl(ca.crl_der_path.read_bytes())


# -- one behaviour on both backends ---------------------------------------------------------------


def test_a_second_valid_certificate_is_refused_and_renewal_is_allowed(ca: CertificateAuthority) -> None:
    first = ca.issue_client("LC000001", T0, "test")
    with pytest.raises(IssuanceRefused, match="既に有効な証明書が発行されています"):
        ca.issue_client("LC000001", T0 + dt.timedelta(days=1), "test")
    assert [r.serial for r in ca.list(user="LC000001")] == [first.record.serial]
    # Twin: inside the renewal window (20 days before expiry) a second one is allowed.
    renewal = ca.issue_client("LC000001", first.record.not_after - dt.timedelta(days=20), "test")
    assert {r.serial for r in ca.list(user="LC000001")} == {first.record.serial, renewal.record.serial}


def test_revocation_is_recorded_listed_and_frees_the_user_id(ca: CertificateAuthority) -> None:
    old = ca.issue_client("LC000001", T0, "test").record
    now = T0 + dt.timedelta(days=3, microseconds=700)
    result = ca.revoke(old.serial, RevocationReason.KEY_COMPROMISE, now, "cli:admin")
    assert result.record.revoked_at == now.replace(microsecond=0)
    assert result.record.revocation_reason is RevocationReason.KEY_COMPROMISE
    assert ca.get(old.serial).revoked_by == "cli:admin"
    assert crl_of(ca).get_revoked_certificate_by_serial_number(old.serial) is not None
    new = ca.issue_client("LC000001", now, "test").record
    assert [r.serial for r in ca.list(user="LC000001", status=Status.VALID, now=now)] == [new.serial]
    assert [r.serial for r in ca.list(status=Status.REVOKED, now=now)] == [old.serial]
    assert ca.certificate_of(new.serial).serial_number == new.serial
    # Refusals: a second revocation, someone else's certificate, an unknown serial.
    with pytest.raises(IssuanceRefused, match="already revoked"):
        ca.revoke(old.serial, RevocationReason.UNSPECIFIED, now, "cli:admin")
    with pytest.raises(IssuanceRefused):
        ca.revoke(new.serial, RevocationReason.UNSPECIFIED, now, "portal:LC000002", owner="LC000002")
    with pytest.raises(CaError, match="no certificate with serial"):
        ca.get(0x1234)


def test_crl_numbers_increase_and_a_failed_publication_leaves_it_due(ca: CertificateAuthority) -> None:
    first = ca.last_crl()
    assert first is not None and not ca.crl_due(T0)
    issued = ca.issue_client("LC000001", T0, "test")
    ca.crl_der_path.unlink()
    ca.crl_der_path.mkdir()  # the next atomic replace fails for real
    with pytest.raises(OSError):
        ca.revoke(issued.record.serial, RevocationReason.SUPERSEDED, T0, "a")
    assert ca.crl_due(T0) and ca.records.crl_stale()
    ca.crl_der_path.rmdir()
    info = ca.publish_crl(T0)
    assert info.number > first.number + 1  # the failed attempt used a number too: never reused
    assert ca.last_crl() == info and not ca.crl_due(T0)
    assert info.entries == 1


def test_server_certificates_are_recorded_apart_from_client_ones(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = ca.issue_server(["gw.example"], T0, "cli:admin", out_cert=tmp_path / "s.pem", out_key=tmp_path / "s.key")
    assert ca.list() == []
    assert [r.serial for r in ca.list(kind="server")] == [files.record.serial]


def _issue_in_process(backend: str, directory: str, url: str, barrier: Any, results: Any) -> None:
    records, db = open_records(backend, Path(directory), url)
    ca = CertificateAuthority.open(Path(directory), SETTINGS, records)
    barrier.wait()
    try:
        ca.issue_client("LC000001", T0, "process")
        results.put("issued")
    except IssuanceRefused:
        results.put("refused")
    finally:
        if db is not None:
            db.close()


def test_concurrent_issues_from_processes_yield_one_valid_certificate(
    store_backend: str, backend_url: str, ca: CertificateAuthority
) -> None:
    """Separate processes, each with its own connection (as on separate hosts): the database decides."""
    spawn = multiprocessing.get_context("spawn")
    n = 4
    barrier, results = spawn.Barrier(n), spawn.Queue()
    procs = [
        spawn.Process(target=_issue_in_process, args=(store_backend, str(ca.directory), backend_url, barrier, results))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(results.get(timeout=5) for _ in range(n)) == ["issued"] + ["refused"] * (n - 1)
    assert len(ca.list(user="LC000001", status=Status.VALID, now=T0)) == 1


# -- what a shared database adds ------------------------------------------------------------------


@pytest.fixture
def shared(pg_url: str) -> Iterator[postgres.Database]:
    migrated(pg_url)
    with postgres.Database(postgres.target(pg_url), pool_size=4) as db:
        yield db


def test_two_portals_sharing_the_database_publish_increasing_crl_numbers(
    shared: postgres.Database, tmp_path: Path
) -> None:
    """Two portal hosts: one CA key, two CA directories, one set of records."""
    one = CertificateAuthority.init(
        tmp_path / "one", now=T0, settings=SETTINGS, records=pg_issuance.PgIssuanceRecords(shared)
    )
    (tmp_path / "two").mkdir()
    for name in ("ca.pem", "ca.der", "ca.key"):
        (tmp_path / "two" / name).write_bytes((one.directory / name).read_bytes())
    two = CertificateAuthority.open(tmp_path / "two", SETTINGS, pg_issuance.PgIssuanceRecords(shared))
    issued = one.issue_client("LC000001", T0, "portal:one")
    with pytest.raises(IssuanceRefused):
        two.issue_client("LC000001", T0, "portal:two")  # the other portal sees it at once
    numbers = [one.last_crl().number]  # type: ignore[union-attr]
    for ca in (two, one, two, two, one):
        numbers.append(ca.publish_crl(T0).number)
    revocation = two.revoke(issued.record.serial, RevocationReason.SUPERSEDED, T0, "portal:two")
    numbers.append(revocation.crl.number)
    numbers.append(one.publish_crl(T0).number)
    assert numbers == sorted(set(numbers))  # strictly increasing across both
    assert one.last_crl() is not None and one.last_crl().number == numbers[-1]  # type: ignore[union-attr]
    latest = x509.load_der_x509_crl(one.crl_der_path.read_bytes())
    assert latest.get_revoked_certificate_by_serial_number(issued.record.serial) is not None


def test_concurrent_publications_never_share_a_crl_number(shared: postgres.Database, tmp_path: Path) -> None:
    cas = []
    first = CertificateAuthority.init(
        tmp_path / "p0", now=T0, settings=SETTINGS, records=pg_issuance.PgIssuanceRecords(shared)
    )
    cas.append(first)
    for i in (1, 2):
        directory = tmp_path / f"p{i}"
        directory.mkdir()
        for name in ("ca.pem", "ca.der", "ca.key"):
            (directory / name).write_bytes((first.directory / name).read_bytes())
        cas.append(CertificateAuthority.open(directory, SETTINGS, pg_issuance.PgIssuanceRecords(shared)))

    async def publish_all() -> list[int]:
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(None, ca.publish_crl, T0) for ca in cas * 3]
        return [info.number for info in await asyncio.gather(*jobs)]

    numbers = asyncio.run(publish_all())
    assert len(set(numbers)) == len(numbers) == 9


def test_a_revocation_is_pushed_at_commit_and_a_refused_one_is_not(
    shared: postgres.Database, pg_url: str, tmp_path: Path
) -> None:
    ca = CertificateAuthority.init(
        tmp_path / "ca", now=T0, settings=SETTINGS, records=pg_issuance.PgIssuanceRecords(shared)
    )
    issued = ca.issue_client("LC000001", T0, "test")
    with psycopg.connect(pg_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {pg_issuance.CHANNEL}")
        ca.revoke(issued.record.serial, RevocationReason.KEY_COMPROMISE, T0, "cli:admin")
        notes = list(listener.notifies(timeout=2, stop_after=1))
        assert [n.payload for n in notes] == [pg_issuance.push_payload(issued.certificate.public_bytes(Encoding.DER))]
        key = pg_issuance.parse_payload(notes[0].payload)
        assert key == (pg_issuance.authority_key_id(issued.certificate), issued.record.serial)
        # Twin: a refused revocation (already revoked) rolls back and pushes nothing.
        with pytest.raises(IssuanceRefused):
            ca.revoke(issued.record.serial, RevocationReason.KEY_COMPROMISE, T0, "cli:admin")
        assert list(listener.notifies(timeout=0.5, stop_after=1)) == []


def test_malformed_push_payloads_are_ignored() -> None:
    assert pg_issuance.parse_payload("zz:10") is None
    assert pg_issuance.parse_payload("abcd:") is None
    assert pg_issuance.parse_payload("abcd:1F") == (b"\xab\xcd", 0x1F)


def test_a_revocation_is_final_even_for_someone_writing_to_the_records_directly(
    ca: CertificateAuthority, store_backend: str, backend_url: str
) -> None:
    """A gateway host's database role may write the records; it still cannot un-revoke (the next CRL would forget)."""
    revoked = ca.issue_client("LC000001", T0, "test").record
    ca.revoke(revoked.serial, RevocationReason.KEY_COMPROMISE, T0 + dt.timedelta(days=1), "cli:admin")
    valid = ca.issue_client("LC000002", T0, "test").record
    serial = f"{revoked.serial:X}"
    attacks = [
        "UPDATE certificates SET status = 'valid', revoked_at = NULL, revocation_reason = NULL WHERE serial = '{s}'",
        "DELETE FROM certificates WHERE serial = '{s}'",
    ]
    for attack in attacks:
        if store_backend == "sqlite":
            with sqlite3.connect(ca.database_path) as conn, pytest.raises(sqlite3.IntegrityError, match="final"):
                conn.execute(attack.format(s=serial))
        else:
            with psycopg.connect(backend_url, autocommit=True) as conn, pytest.raises(psycopg.Error, match="final"):
                conn.execute(attack.format(s=serial).encode())
    assert ca.records.get(revoked.serial).revoked_at is not None
    # the accept twin: a valid certificate's row is still written as before (here: revoked by the CA)
    ca.revoke(valid.serial, RevocationReason.SUPERSEDED, T0 + dt.timedelta(days=2), "cli:admin")
    assert ca.records.get(valid.serial).revoked_at is not None

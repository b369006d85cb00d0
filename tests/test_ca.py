"""The CA on disk: init, issuance under concurrency, revocation, the CRL, and interop.

Everything is real: CA directories under tmp_path, SQLite files, the
project's own certificate builders, and the openssl / NSS binaries that
browsers' and servers' trust decisions are made with.
"""

from __future__ import annotations

import datetime as dt
import itertools
import multiprocessing
import shutil
import sqlite3
import stat
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from gateway.ca.authority import CaSettings, CertificateAuthority
from gateway.ca.issuance import JST, IssuanceRefused, RevocationReason, Status
from gateway.certs import builders as pki
from gateway.certs.files import make_throwaway_pki
from gateway.certs.p12 import P12Format
from gateway.errors import CaError, PkiError
from gateway.verdict import Reason

UTC = dt.UTC
CRL_URL = "http://gateway.example:8080/crl"
# The CA was made "400 days ago" so tests can issue at fixed times in its past
# and verification tests can use the real clock.
REAL_NOW = dt.datetime.now(UTC).replace(microsecond=0)
T0 = REAL_NOW - dt.timedelta(days=400)
SETTINGS = CaSettings(crl_url=CRL_URL, crl_next_update=dt.timedelta(hours=6))


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (apt: openssl / libnss3-tools)")
    return path


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", now=T0, settings=SETTINGS)


def _load_crl(ca: CertificateAuthority) -> x509.CertificateRevocationList:
    return x509.load_der_x509_crl(ca.crl_der_path.read_bytes())


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


# -- init and open ------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_type", "key_class"),
    [
        ("ec-p256", ec.EllipticCurvePrivateKey),
        ("rsa-2048", rsa.RSAPrivateKey),
        ("rsa-3072", rsa.RSAPrivateKey),
    ],
)
def test_init_creates_the_ca(tmp_path: Path, key_type: pki.KeyType, key_class: type) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", key_type=key_type, now=T0)
    d = ca.directory
    cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    assert x509.load_der_x509_certificate((d / "ca.der").read_bytes()) == cert
    subject = {a.oid: a.value for a in cert.subject}
    assert subject == {
        NameOID.COMMON_NAME: "Tokyo Stock Exchange SSO CA",
        NameOID.ORGANIZATION_NAME: "Tokyo Stock Exchange",
        NameOID.COUNTRY_NAME: "JP",
    }
    assert cert.issuer == cert.subject
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600
    key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
    assert isinstance(key, key_class)
    if key_type == "rsa-3072":
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 3072
    assert (d / "issuance.db").is_file()
    crl = _load_crl(ca)
    assert _crl_number(crl) == 1 and len(crl) == 0


def test_init_refuses_to_overwrite(ca: CertificateAuthority) -> None:
    key_before = (ca.directory / "ca.key").read_bytes()
    cert_before = ca.cert_path.read_bytes()
    with pytest.raises(CaError, match="refusing to overwrite"):
        CertificateAuthority.init(ca.directory, now=T0)
    assert (ca.directory / "ca.key").read_bytes() == key_before
    assert ca.cert_path.read_bytes() == cert_before


def test_init_refuses_a_directory_holding_only_a_key(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "ca.key").write_bytes(b"precious")
    with pytest.raises(CaError, match=r"ca\.key"):
        CertificateAuthority.init(tmp_path / "ca", now=T0)
    assert (tmp_path / "ca" / "ca.key").read_bytes() == b"precious"


def test_open_reads_back_the_same_ca(ca: CertificateAuthority) -> None:
    again = CertificateAuthority.open(ca.directory, SETTINGS)
    assert again.certificate == ca.certificate


def test_open_refuses_an_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(CaError, match="no CA here"):
        CertificateAuthority.open(tmp_path)


def test_open_refuses_a_ca_without_its_database(ca: CertificateAuthority) -> None:
    ca.database_path.unlink()
    with pytest.raises(CaError, match=r"issuance\.db"):
        CertificateAuthority.open(ca.directory)


def test_open_refuses_a_key_of_another_ca(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.init(tmp_path / "other", now=T0)
    shutil.copy(other.directory / "ca.key", ca.directory / "ca.key")
    with pytest.raises(PkiError, match="does not belong"):
        CertificateAuthority.open(ca.directory)


# -- issuing ------------------------------------------------------------------


def test_issued_certificate_profile(ca: CertificateAuthority) -> None:
    issued = ca.issue_client("LC000001", T0, "portal:LC000001")
    cert = issued.certificate
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "LC000001")])
    assert cert.issuer == ca.certificate.subject
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=365)
    assert cert.not_valid_before_utc == T0
    assert cert.serial_number.bit_length() >= 128
    ext = cert.extensions
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.value.digest
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    cdp = ext.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [n.value for p in cdp for n in p.full_name or []] == [CRL_URL]
    with pytest.raises(x509.ExtensionNotFound):
        ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert pki.windows_login_of(cert) is None
    # The record matches the certificate.
    record = ca.get(cert.serial_number)
    assert record == issued.record
    assert record.fingerprint == cert.fingerprint(hashes.SHA256()).hex()
    assert record.requested_by == "portal:LC000001"
    assert (record.not_before, record.not_after) == (
        cert.not_valid_before_utc,
        cert.not_valid_after_utc,
    )
    assert ca.certificate_of(cert.serial_number) == cert


def test_no_crl_distribution_point_without_url(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", now=T0)
    cert = ca.issue_client("LC000001", T0, "test").certificate
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)


def test_windows_login_is_recorded(ca: CertificateAuthority) -> None:
    issued = ca.issue_client("LC000001", T0, "test", windows_login="CORP\\taro")
    assert pki.windows_login_of(issued.certificate) == "CORP\\taro"
    assert ca.get(issued.record.serial).windows_login == "CORP\\taro"


def test_bad_user_id_is_refused_before_anything_is_written(ca: CertificateAuthority) -> None:
    with pytest.raises(CaError, match="user ID"):
        ca.issue_client("CN=LC000001,O=x", T0, "test")
    assert ca.list() == []


def test_pkcs12_round_trip_without_password(ca: CertificateAuthority) -> None:
    issued = ca.issue_client("LC000001", T0, "test")
    key, cert, extra = pkcs12.load_key_and_certificates(issued.pkcs12, None)
    assert cert == issued.certificate
    assert extra == [ca.certificate]
    assert key is not None
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    p12 = pkcs12.load_pkcs12(issued.pkcs12, None)
    assert p12.cert is not None and p12.cert.friendly_name == b"LC000001"


def test_pkcs12_with_password_needs_it(ca: CertificateAuthority) -> None:
    issued = ca.issue_client("LC000001", T0, "test", p12_format=P12Format.PASSWORD, password="s3cret-file")
    _, cert, _ = pkcs12.load_key_and_certificates(issued.pkcs12, b"s3cret-file")
    assert cert == issued.certificate
    with pytest.raises(ValueError, match="password"):
        pkcs12.load_key_and_certificates(issued.pkcs12, None)
    assert "s3cret" not in repr(issued)


def test_duplicate_is_refused_with_the_manuals_words(ca: CertificateAuthority) -> None:
    first = ca.issue_client("LC000001", T0, "test")
    with pytest.raises(IssuanceRefused) as refused:
        ca.issue_client("LC000001", T0 + dt.timedelta(days=100), "test")
    assert refused.value.verdict.reason is Reason.CERTIFICATE_DUPLICATE
    assert "証明書重複エラー" in str(refused.value)
    assert "既に有効な証明書が発行されています" in str(refused.value)
    assert first.record.serial_hex in refused.value.verdict.detail
    assert [r.serial for r in ca.list(user="LC000001")] == [first.record.serial]
    # Twin: another user is not affected.
    ca.issue_client("LC000002", T0 + dt.timedelta(days=100), "test")


def _day_before_expiry_in_jst(not_after: dt.datetime, days: int, hour: int) -> dt.datetime:
    day = not_after.astimezone(JST).date() - dt.timedelta(days=days)
    return dt.datetime.combine(day, dt.time(hour), tzinfo=JST).astimezone(UTC)


@pytest.mark.parametrize(
    ("days_before", "hour", "allowed"),
    [(31, 12, False), (30, 0, True), (1, 23, True), (0, 0, False)],
)
def test_renewal_window_through_the_ca(ca: CertificateAuthority, days_before: int, hour: int, allowed: bool) -> None:
    old = ca.issue_client("LC000001", T0, "test")
    now = _day_before_expiry_in_jst(old.record.not_after, days_before, hour)
    assert ca.check_issue("LC000001", now).allowed is allowed
    if allowed:
        new = ca.issue_client("LC000001", now, "test")
        valid = ca.list(user="LC000001", status=Status.VALID, now=now)
        assert {r.serial for r in valid} == {old.record.serial, new.record.serial}
        with pytest.raises(IssuanceRefused):  # and not a third
            ca.issue_client("LC000001", now, "test")
    else:
        with pytest.raises(IssuanceRefused):
            ca.issue_client("LC000001", now, "test")


def test_expired_certificate_allows_issue_at_once(ca: CertificateAuthority) -> None:
    old = ca.issue_client("LC000001", T0, "test")
    after = old.record.not_after + dt.timedelta(seconds=1)
    with pytest.raises(IssuanceRefused):
        ca.issue_client("LC000001", old.record.not_after, "test")
    ca.issue_client("LC000001", after, "test")
    assert [r.serial for r in ca.list(user="LC000001", status=Status.EXPIRED, now=after)] == [old.record.serial]


def test_revoked_certificate_allows_issue_at_once(ca: CertificateAuthority) -> None:
    old = ca.issue_client("LC000001", T0, "test")
    now = T0 + dt.timedelta(days=10)
    ca.revoke(old.record.serial, RevocationReason.SUPERSEDED, now, "portal:LC000001", owner="LC000001")
    new = ca.issue_client("LC000001", now, "test")
    rows = ca.list(user="LC000001")
    assert [r.serial for r in rows] == [new.record.serial, old.record.serial]


def test_concurrent_issues_in_threads_yield_one_certificate(ca: CertificateAuthority) -> None:
    n = 8
    barrier = threading.Barrier(n)

    def attempt(user: str) -> str:
        mine = CertificateAuthority.open(ca.directory, SETTINGS)
        barrier.wait()
        try:
            mine.issue_client(user, T0, "thread")
        except IssuanceRefused:
            return "refused"
        return "issued"

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(attempt, ["LC000001"] * n))
    assert sorted(results) == ["issued"] + ["refused"] * (n - 1)
    assert len(ca.list(user="LC000001")) == 1
    # Twin: different users all succeed concurrently.
    barrier.reset()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(attempt, [f"U{i}" for i in range(n)]))
    assert results == ["issued"] * n


def _issue_in_process(directory: str, barrier: object, results: object) -> None:
    ca = CertificateAuthority.open(Path(directory), SETTINGS)
    barrier.wait()  # type: ignore[attr-defined]
    try:
        ca.issue_client("LC000001", T0, "process")
        results.put("issued")  # type: ignore[attr-defined]
    except IssuanceRefused:
        results.put("refused")  # type: ignore[attr-defined]


def test_concurrent_issues_in_processes_yield_one_certificate(ca: CertificateAuthority) -> None:
    ctx = multiprocessing.get_context("spawn")
    n = 4
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [ctx.Process(target=_issue_in_process, args=(str(ca.directory), barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    outcomes = sorted(results.get(timeout=5) for _ in range(n))
    assert outcomes == ["issued"] + ["refused"] * (n - 1)
    assert len(ca.list(user="LC000001")) == 1


# -- revoking and the CRL -----------------------------------------------------


def test_revoke_records_and_publishes(ca: CertificateAuthority) -> None:
    issued = ca.issue_client("LC000001", T0, "test")
    now = T0 + dt.timedelta(days=3, microseconds=500)
    before = _crl_number(_load_crl(ca))
    result = ca.revoke(issued.record.serial, RevocationReason.KEY_COMPROMISE, now, "cli:admin")
    record = result.record
    assert record.revoked_at == now.replace(microsecond=0)
    assert record.revocation_reason is RevocationReason.KEY_COMPROMISE
    assert record.revoked_by == "cli:admin"
    crl = _load_crl(ca)
    assert _crl_number(crl) == result.crl.number == before + 1
    entry = crl.get_revoked_certificate_by_serial_number(issued.record.serial)
    assert entry is not None
    assert entry.revocation_date_utc == now.replace(microsecond=0)
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise


def test_unspecified_reason_is_left_out_of_the_entry(ca: CertificateAuthority) -> None:
    issued = ca.issue_client("LC000001", T0, "test")
    ca.revoke(issued.record.serial, RevocationReason.UNSPECIFIED, T0, "portal:LC000001")
    entry = _load_crl(ca).get_revoked_certificate_by_serial_number(issued.record.serial)
    assert entry is not None
    with pytest.raises(x509.ExtensionNotFound):
        entry.extensions.get_extension_for_class(x509.CRLReason)


def test_user_cannot_revoke_anothers_certificate(ca: CertificateAuthority) -> None:
    theirs = ca.issue_client("LC000002", T0, "test")
    with pytest.raises(IssuanceRefused) as refused:
        ca.revoke(theirs.record.serial, RevocationReason.UNSPECIFIED, T0, "portal:x", owner="LC000001")
    assert refused.value.verdict.reason is Reason.NOT_AUTHORIZED
    assert ca.get(theirs.record.serial).revoked_at is None
    assert len(_load_crl(ca)) == 0


def test_revoking_twice_is_refused(ca: CertificateAuthority) -> None:
    issued = ca.issue_client("LC000001", T0, "test")
    ca.revoke(issued.record.serial, RevocationReason.SUPERSEDED, T0, "a")
    with pytest.raises(IssuanceRefused, match="already revoked"):
        ca.revoke(issued.record.serial, RevocationReason.KEY_COMPROMISE, T0, "b")
    assert ca.get(issued.record.serial).revocation_reason is RevocationReason.SUPERSEDED


def test_revoking_an_unknown_serial(ca: CertificateAuthority) -> None:
    with pytest.raises(CaError, match="no certificate with serial 0ABC"):
        ca.revoke(0xABC, RevocationReason.UNSPECIFIED, T0, "a")


def test_crl_is_signed_and_well_formed(ca: CertificateAuthority) -> None:
    serials = [ca.issue_client(f"U{i}", T0, "t").record.serial for i in range(3)]
    for s in serials[:2]:
        ca.revoke(s, RevocationReason.AFFILIATION_CHANGED, T0, "a")
    now = T0 + dt.timedelta(hours=1)
    info = ca.publish_crl(now)
    crl = _load_crl(ca)
    assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca.certificate.subject
    assert crl.last_update_utc == now
    assert crl.next_update_utc == now + dt.timedelta(hours=6)
    assert (info.this_update, info.next_update, info.entries) == (
        now,
        now + dt.timedelta(hours=6),
        2,
    )
    assert info.der_bytes == ca.crl_der_path.stat().st_size
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert sorted(e.serial_number for e in crl) == sorted(serials[:2])
    assert x509.load_pem_x509_crl(ca.crl_pem_path.read_bytes()) == crl
    # Twin: a CRL signed by another key with the same name does not verify.
    impostor = pki.generate_key()
    assert not crl.is_signature_valid(impostor.public_key())


def test_crl_verifies_with_openssl(ca: CertificateAuthority) -> None:
    openssl = _need("openssl")
    ca.revoke(ca.issue_client("U1", T0, "t").record.serial, RevocationReason.SUPERSEDED, T0, "a")
    ok = subprocess.run(
        [openssl, "crl", "-in", str(ca.crl_pem_path), "-CAfile", str(ca.cert_path), "-noout"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0 and "verify OK" in ok.stderr + ok.stdout
    other = make_throwaway_pki(ca.directory.parent / "other", users=())
    bad = subprocess.run(
        [openssl, "crl", "-in", str(ca.crl_pem_path), "-CAfile", str(other.ca_cert), "-noout"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "verify OK" not in bad.stderr + bad.stdout


def test_crl_number_always_increases(ca: CertificateAuthority) -> None:
    numbers = [_crl_number(_load_crl(ca))]
    for hours in (1, 2, 3):
        ca.publish_crl(T0 + dt.timedelta(hours=hours))
        numbers.append(_crl_number(_load_crl(ca)))
    assert numbers == [1, 2, 3, 4]
    again = CertificateAuthority.open(ca.directory, SETTINGS)  # the number lives in the database
    assert again.publish_crl(T0 + dt.timedelta(hours=4)).number == 5


def test_concurrent_publications_keep_numbers_unique_and_file_latest(
    ca: CertificateAuthority,
) -> None:
    with ThreadPoolExecutor(6) as pool:
        infos = list(pool.map(lambda _: ca.publish_crl(T0), range(12)))
    numbers = [i.number for i in infos]
    assert len(set(numbers)) == 12
    assert _crl_number(_load_crl(ca)) == max(numbers)


def test_expired_entries_drop_off_after_the_configured_time(tmp_path: Path) -> None:
    settings = CaSettings(crl_drop_expired_after=dt.timedelta(days=10))
    ca = CertificateAuthority.init(tmp_path / "ca", now=T0, settings=settings)
    issued = ca.issue_client("LC000001", T0, "t")
    ca.revoke(issued.record.serial, RevocationReason.KEY_COMPROMISE, T0, "a")
    expiry = issued.record.not_after
    assert ca.publish_crl(expiry + dt.timedelta(days=10)).entries == 1
    assert issued.record.serial in {e.serial_number for e in _load_crl(ca)}
    assert ca.publish_crl(expiry + dt.timedelta(days=10, seconds=1)).entries == 0
    assert len(_load_crl(ca)) == 0
    assert ca.get(issued.record.serial).revoked_at is not None  # the record stays


def test_crl_due_on_schedule(ca: CertificateAuthority) -> None:
    info = ca.publish_crl(T0)
    assert not ca.crl_due(T0)
    assert not ca.crl_due(info.this_update + dt.timedelta(hours=4))  # 2 of 6 hours left
    assert ca.crl_due(info.this_update + dt.timedelta(hours=4, seconds=1))
    assert ca.crl_due(info.next_update + dt.timedelta(hours=1))  # even when unchanged


def test_crl_due_when_files_are_missing(ca: CertificateAuthority) -> None:
    assert not ca.crl_due(T0)
    ca.crl_pem_path.unlink()
    assert ca.crl_due(T0)


def test_failed_publication_after_revocation_leaves_crl_due(ca: CertificateAuthority) -> None:
    issued = ca.issue_client("LC000001", T0, "t")
    ca.crl_der_path.unlink()
    ca.crl_der_path.mkdir()  # the next atomic replace fails for real
    with pytest.raises(OSError):
        ca.revoke(issued.record.serial, RevocationReason.KEY_COMPROMISE, T0, "a")
    assert ca.get(issued.record.serial).revoked_at is not None  # the revocation stands
    ca.crl_der_path.rmdir()
    assert ca.crl_due(T0)
    ca.publish_crl(T0)
    assert not ca.crl_due(T0)
    assert issued.record.serial in {e.serial_number for e in _load_crl(ca)}


def test_revocation_list_stays_in_the_database_with_status(ca: CertificateAuthority) -> None:
    a = ca.issue_client("A", T0, "t").record
    b = ca.issue_client("B", T0 + dt.timedelta(days=1), "t").record
    ca.revoke(a.serial, RevocationReason.SUPERSEDED, T0, "x")
    with sqlite3.connect(ca.database_path) as conn:
        rows = dict(conn.execute("SELECT serial, status FROM certificates").fetchall())
    conn.close()
    # Stored without leading zeros (the key older files have), printed as openssl does.
    assert rows == {format(a.serial, "X"): "revoked", format(b.serial, "X"): "valid"}
    assert [r.user_id for r in ca.list()] == ["B", "A"]
    assert [r.user_id for r in ca.list(status=Status.REVOKED, now=T0)] == ["A"]
    assert [r.user_id for r in ca.list(status=Status.VALID, now=T0)] == ["B"]


# -- server certificates ------------------------------------------------------


def test_server_certificate(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = ca.issue_server(["gateway.example", "127.0.0.1"], REAL_NOW, "cli:admin")
    chain = x509.load_pem_x509_certificates(files.cert.read_bytes())
    assert chain[1] == ca.certificate
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gateway.example"]
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert files.record.kind == "server"
    assert ca.list() == []  # users' lists do not show it
    assert [r.serial for r in ca.list(kind=None)] == [files.record.serial]
    # A server certificate for a name like a user ID does not block that user.
    ca.issue_server(["LC000001"], REAL_NOW, "cli:admin", out_cert=tmp_path / "s.pem", out_key=tmp_path / "s.key")
    ca.issue_client("LC000001", REAL_NOW, "t")
    openssl = _need("openssl")
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(pki.cert_pem(chain[0]))
    result = subprocess.run(
        [openssl, "verify", "-CAfile", str(ca.cert_path), "-purpose", "sslserver", str(leaf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# -- interoperability: OpenSSL, cryptography's verifier, NSS ------------------


@pytest.fixture(scope="module", params=["ec-p256", "rsa-2048"])
def live_ca(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """A CA valid now, for checks with the real clock (module scope: RSA keys are slow)."""
    directory = tmp_path_factory.mktemp(f"live-{request.param}") / "ca"
    return CertificateAuthority.init(
        directory, key_type=request.param, now=REAL_NOW - dt.timedelta(days=1), settings=SETTINGS
    )


@pytest.fixture(scope="module")
def impostor(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """Another CA with exactly the same name: only the key tells them apart."""
    return CertificateAuthority.init(tmp_path_factory.mktemp("impostor") / "ca", now=REAL_NOW - dt.timedelta(days=1))


_users = itertools.count(1)


def _next_user() -> str:
    """A fresh user ID: the live CAs are shared by the module's tests."""
    return f"LIVE{next(_users):04d}"


def _client_verifier(ca: CertificateAuthority, at: dt.datetime) -> ClientVerifier:
    ee = ExtensionPolicy.webpki_defaults_ee().may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    return (
        PolicyBuilder()
        .store(Store([ca.certificate]))
        .time(at)
        .extension_policies(ee_policy=ee, ca_policy=ExtensionPolicy.webpki_defaults_ca())
        .build_client_verifier()
    )


@pytest.mark.parametrize("windows_login", [None, "CORP\\taro"])
def test_cryptography_client_verifier_accepts(
    live_ca: CertificateAuthority, impostor: CertificateAuthority, windows_login: str | None
) -> None:
    user = _next_user()
    issued = live_ca.issue_client(user, REAL_NOW, "t", windows_login=windows_login)
    verified = _client_verifier(live_ca, REAL_NOW).verify(issued.certificate, [])
    assert verified.chain[-1] == live_ca.certificate
    # Twins: the wrong trust anchor (same name) and a time after expiry fail.
    with pytest.raises(VerificationError):
        _client_verifier(impostor, REAL_NOW).verify(issued.certificate, [])
    late = issued.record.not_after + dt.timedelta(seconds=1)
    with pytest.raises(VerificationError):
        _client_verifier(live_ca, late).verify(issued.certificate, [])


def _openssl_verify(openssl: str, ca_pem: Path, cert: x509.Certificate, tmp: Path) -> subprocess.CompletedProcess[str]:
    leaf = tmp / "leaf.pem"
    leaf.write_bytes(pki.cert_pem(cert))
    return subprocess.run(
        [openssl, "verify", "-CAfile", str(ca_pem), "-purpose", "sslclient", str(leaf)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("windows_login", [None, "CORP\\taro"])
def test_openssl_verify_accepts_as_ssl_client(
    live_ca: CertificateAuthority, impostor: CertificateAuthority, windows_login: str | None, tmp_path: Path
) -> None:
    openssl = _need("openssl")
    user = _next_user()
    issued = live_ca.issue_client(user, REAL_NOW, "t", windows_login=windows_login)
    ok = _openssl_verify(openssl, live_ca.cert_path, issued.certificate, tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("OK"), ok.stderr
    bad = _openssl_verify(openssl, impostor.cert_path, issued.certificate, tmp_path)
    assert bad.returncode != 0


def test_openssl_crl_check_sees_the_revocation(live_ca: CertificateAuthority, tmp_path: Path) -> None:
    openssl = _need("openssl")
    issued = live_ca.issue_client(_next_user(), REAL_NOW, "t")
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(pki.cert_pem(issued.certificate))

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                openssl,
                "verify",
                "-crl_check",
                "-CAfile",
                str(live_ca.cert_path),
                "-CRLfile",
                str(live_ca.crl_pem_path),
                "-purpose",
                "sslclient",
                str(leaf),
            ],
            capture_output=True,
            text=True,
            check=False,
        )

    live_ca.publish_crl(REAL_NOW)
    assert check().returncode == 0
    live_ca.revoke(issued.record.serial, RevocationReason.KEY_COMPROMISE, REAL_NOW, "a")
    revoked = check()
    assert revoked.returncode != 0 and "revoked" in revoked.stdout + revoked.stderr


def test_openssl_reads_pkcs12_with_empty_password(ca: CertificateAuthority, tmp_path: Path) -> None:
    openssl = _need("openssl")
    issued = ca.issue_client("LC000001", T0, "t")
    p12 = tmp_path / "u.p12"
    p12.write_bytes(issued.pkcs12)
    out = subprocess.run(
        [openssl, "pkcs12", "-in", str(p12), "-passin", "pass:", "-nodes"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "BEGIN PRIVATE KEY" in out.stdout
    assert "subject=CN = LC000001" in out.stdout
    assert "issuer=C = JP, O = Tokyo Stock Exchange, CN = Tokyo Stock Exchange SSO CA" in out.stdout
    # Twin: a password-protected file is not readable with an empty password.
    locked = tmp_path / "locked.p12"
    locked.write_bytes(
        ca.issue_client("LC000002", T0, "t", p12_format=P12Format.PASSWORD, password="pw-twelve-chars").pkcs12
    )
    bad = subprocess.run(
        [openssl, "pkcs12", "-in", str(locked), "-passin", "pass:", "-nodes"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0


def test_nss_imports_pkcs12_with_empty_password(ca: CertificateAuthority, tmp_path: Path) -> None:
    certutil, pk12util = _need("certutil"), _need("pk12util")
    db = tmp_path / "nssdb"
    db.mkdir()
    subprocess.run([certutil, "-N", "-d", f"sql:{db}", "--empty-password"], check=True, capture_output=True)
    p12 = tmp_path / "u.p12"
    p12.write_bytes(ca.issue_client("LC000001", T0, "t", windows_login="CORP\\taro").pkcs12)
    imported = subprocess.run(
        [pk12util, "-i", str(p12), "-d", f"sql:{db}", "-W", "", "-K", ""],
        capture_output=True,
        text=True,
        check=False,
    )
    assert imported.returncode == 0, imported.stdout + imported.stderr
    listing = subprocess.run([certutil, "-L", "-d", f"sql:{db}"], capture_output=True, text=True, check=True)
    assert "LC000001" in listing.stdout
    keys = subprocess.run([certutil, "-K", "-d", f"sql:{db}"], capture_output=True, text=True, check=False)
    assert "LC000001" in keys.stdout
    # Twin: a password-protected file does not import with an empty password.
    locked = tmp_path / "locked.p12"
    locked.write_bytes(
        ca.issue_client("LC000002", T0, "t", p12_format=P12Format.PASSWORD, password="pw-twelve-chars").pkcs12
    )
    bad = subprocess.run(
        [pk12util, "-i", str(locked), "-d", f"sql:{db}", "-W", "", "-K", ""],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0


def test_the_issuance_database_is_0600_like_the_ca_key(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        ca = CertificateAuthority.init(tmp_path / "ca", now=T0, settings=SETTINGS)
    finally:
        os.umask(old)
    assert stat.S_IMODE(ca.database_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((ca.directory / "ca.key").stat().st_mode) == 0o600

"""What every run shares: the PKI, CRLs of each size, the bench user and a 1 GiB upload file.

Everything lives under bench/out/ (git-ignored) and is reused between runs:
a 1,000,000-entry CRL takes tens of seconds and a few GiB of memory to sign.
The CA is the project's own (ECDSA P-256, "Tokyo Stock Exchange SSO CA"),
the client certificate is LC000001's, built by gateway.certs.files.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from gateway.certs import builders as pki
from gateway.certs.files import ThrowawayPki, issue_client_files, make_throwaway_pki, read_private_key, write_atomic

OUT = Path(__file__).resolve().parent / "out"
USER = "LC000001"
PASSWORD = "bench-Password-2024!"
CRL_VALID_DAYS = 30


@dataclass(frozen=True)
class BenchPki:
    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    empty_crl: Path

    def crl(self, entries: int, number: int = 10) -> Path:
        """The PEM CRL with ``entries`` revoked serials (built once, then cached)."""
        return self.directory / f"crl-{entries}-n{number}.pem"


def load_pki(log: Callable[[str], None] = print) -> BenchPki:
    """The cached PKI, made on first use."""
    directory = OUT / "pki"
    marker = directory / "pki.json"
    if not marker.exists():
        log(f"making the bench PKI in {directory}")
        made: ThrowawayPki = make_throwaway_pki(directory, users=(USER,))
        marker.write_text(json.dumps({"made": dt.datetime.now(dt.UTC).isoformat()}))
        del made
    client = directory / f"{USER}.crt"
    ca = pki_ca(directory)
    not_after = _cert_not_after(client)
    if not_after < dt.datetime.now(dt.UTC) + dt.timedelta(days=2):
        issue_client_files(directory, ca[0], ca[1], USER, now=dt.datetime.now(dt.UTC))
    return BenchPki(
        directory=directory,
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=client,
        client_key=directory / f"{USER}.key",
        empty_crl=directory / "ca.crl",
    )


def pki_ca(directory: Path) -> tuple[object, pki.PrivateKey]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    return cert, read_private_key(directory / "ca.key")


def _cert_not_after(path: Path) -> dt.datetime:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc


def _crl_fresh(path: Path) -> bool:
    from cryptography import x509

    if not path.exists():
        return False
    head = path.read_bytes()
    crl = x509.load_pem_x509_crl(head)
    next_update = crl.next_update_utc
    return next_update is not None and next_update > dt.datetime.now(dt.UTC) + dt.timedelta(days=2)


def ensure_crl(bench_pki: BenchPki, entries: int, number: int = 10, log: Callable[[str], None] = print) -> Path:
    """Build (or reuse) a CRL revoking ``entries`` random serials, never the bench client's."""
    path = bench_pki.crl(entries, number)
    if _crl_fresh(path):
        return path
    started = time.perf_counter()
    log(f"building a CRL with {entries:,} entries (number {number}) ...")
    ca_cert, ca_key = pki_ca(bench_pki.directory)
    from cryptography import x509

    client_serial = x509.load_pem_x509_certificate(bench_pki.client_cert.read_bytes()).serial_number
    now = dt.datetime.now(dt.UTC)
    revoked_at = now - dt.timedelta(days=1)
    serials = (pki.random_serial() for _ in range(entries))
    revoked = (pki.RevokedEntry(s, revoked_at) for s in serials if s != client_serial)
    crl = pki.build_crl(
        ca_cert,  # type: ignore[arg-type]
        ca_key,
        revoked,
        this_update=now - dt.timedelta(minutes=10 - number % 10),
        next_update=now + dt.timedelta(days=CRL_VALID_DAYS),
        number=number,
    )
    write_atomic(path, crl.public_bytes(serialization.Encoding.PEM))
    del crl
    gc.collect()
    log(f"  built in {time.perf_counter() - started:.1f} s, {path.stat().st_size / 2**20:.1f} MiB PEM")
    return path


def upload_file(size: int) -> Path:
    """A sparse file of ``size`` zero bytes (reading it costs no disk)."""
    path = OUT / f"upload-{size}.bin"
    if not path.exists() or path.stat().st_size != size:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            handle.truncate(size)
    return path

"""How long publishing the CRL takes with 100,000+ revoked certificates, and how big it gets.

Creates a throwaway CA, inserts revoked rows straight into issuance.db (issuing
100,000 real certificates would measure signing, not the CRL), then times
``CertificateAuthority.publish_crl`` and a few operations that must stay fast
next to a big CRL: issuing, and parsing the result the way the gateway does.

    .venv/bin/python bench/crl_bench.py [--entries 100000] [--runs 3] [--key-type ec-p256]
"""

from __future__ import annotations

import argparse
import datetime as dt
import secrets
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from cryptography import x509

from gateway.ca.authority import CertificateAuthority
from gateway.ca.issuance import RevocationReason, format_serial
from gateway.certs.builders import KEY_TYPES, random_serial

REASONS = [r.value for r in RevocationReason]


def fill(ca: CertificateAuthority, entries: int, now: dt.datetime) -> None:
    """Insert ``entries`` revoked client certificates, most still unexpired."""
    ts = int(now.timestamp())
    rows = []
    for i in range(entries):
        issued = ts - secrets.randbelow(300 * 86400)
        rows.append(
            (
                format_serial(random_serial()),
                f"U{i:07d}",
                issued,
                issued + 365 * 86400,
                issued,
                secrets.token_hex(32),
                issued + secrets.randbelow(max(1, ts - issued)),
                REASONS[i % len(REASONS)],
            )
        )
    with sqlite3.connect(ca.database_path) as conn:
        conn.executemany(
            "INSERT INTO certificates (serial, kind, user_id, not_before, not_after, issued_at, "
            "fingerprint, requested_by, status, revoked_at, revocation_reason, revoked_by, der) "
            "VALUES (?, 'client', ?, ?, ?, ?, ?, 'bench', 'revoked', ?, ?, 'bench', x'')",
            [(s, u, nb, na, nb, fp, ra, r) for s, u, nb, na, _, fp, ra, r in rows],
        )
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--key-type", choices=KEY_TYPES, default="ec-p256")
    args = parser.parse_args()
    now = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory() as tmp:
        ca = CertificateAuthority.init(Path(tmp) / "ca", key_type=args.key_type, now=now)
        t0 = time.perf_counter()
        fill(ca, args.entries, now)
        print(f"inserted {args.entries:,} revoked rows in {time.perf_counter() - t0:.2f} s")

        timings = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            info = ca.publish_crl(now)
            timings.append(time.perf_counter() - t0)
        print(
            f"publish_crl ({args.key_type}): median {statistics.median(timings):.3f} s, "
            f"min {min(timings):.3f} s, max {max(timings):.3f} s over {args.runs} runs"
        )
        pem_bytes = ca.crl_pem_path.stat().st_size
        print(
            f"CRL #{info.number}: {info.entries:,} entries, DER {info.der_bytes:,} bytes "
            f"({info.der_bytes / max(1, info.entries):.1f} B/entry), PEM {pem_bytes:,} bytes"
        )

        t0 = time.perf_counter()
        crl = x509.load_der_x509_crl(ca.crl_der_path.read_bytes())
        serials = {entry.serial_number for entry in crl}
        t1 = time.perf_counter()
        valid = crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
        t2 = time.perf_counter()
        print(
            f"gateway side: parse + serial set {t1 - t0:.3f} s ({len(serials):,} serials), "
            f"signature check {t2 - t1:.3f} s (valid={valid})"
        )

        t0 = time.perf_counter()
        ca.issue_client("BENCH0001", now, "bench")
        t1 = time.perf_counter()
        ca.crl_due(now)
        t2 = time.perf_counter()
        print(f"issue_client next to {args.entries:,} rows: {t1 - t0:.3f} s; crl_due {t2 - t1:.4f} s")


if __name__ == "__main__":
    main()

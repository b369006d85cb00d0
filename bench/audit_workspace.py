"""How fast the audit workspace answers over a million events (a bench, not a timed test).

Fills a throwaway audit database with ``--events`` events (1,000 users, 90
days, a mix of kinds and reasons) through :class:`gateway.audit.store.AuditStore`,
then times what the workspace's handlers run, minus the network:

* a filtered page: one user, the last 30 days, 100 rows, with its total count
  and the chart's counts (:func:`gateway.audit.workspace._load`) and the HTML;
* an export: every row of a 90-day filter through the store's cursor in
  batches, as the workspace streams it (:func:`export_cursor`: the database
  builds the CSV lines and JSON objects), as CSV and as JSON;
* the same exports from a throwaway PostgreSQL server holding the same rows
  (started as tests/pgserver.py does; ``--no-postgres`` skips it), with the
  server's CPU time counted in rows per CPU-second.

It prints the query plans too, so a missing index shows. Targets: a page under
500 ms, an export at 50,000 rows/s or more.

    .venv/bin/python bench/audit_workspace.py [--events 1000000] [--runs 5] [--keep DIR] [--no-postgres]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from gateway.audit.events import AuditEvent, EventKind, utcnow
from gateway.audit.report import render_report
from gateway.audit.store import CHAINED_FIELDS, AuditStore
from gateway.audit.workspace import EXPORT_BATCH, _load, csv_chunk, export_cursor, page_rows, workspace_filter
from gateway.storage import postgres
from gateway.storage.pg_audit import SCHEMA, PgAuditStore

KINDS = [EventKind.LOGIN, EventKind.LOGIN_REFUSED, EventKind.REQUEST_REFUSED, EventKind.HANDSHAKE_FAILED]
REASONS = ["ok", "bad_credentials", "certificate_revoked", "not_authorized", "no_certificate", "session_expired"]


def fill(path: Path, events: int, now: dt.datetime, seed: int = 17) -> None:
    """``events`` events over 90 days, appended in batches like the audit writer does."""
    rng = random.Random(seed)
    batch: list[AuditEvent] = []
    with AuditStore(path) as store:
        for i in range(events):
            user = f"LC{rng.randrange(1000):06d}"
            batch.append(
                AuditEvent(
                    rng.choice(KINDS),
                    time=now - dt.timedelta(seconds=rng.randrange(90 * 86400)),
                    reason=rng.choice(REASONS),
                    user_id=user,
                    client_ip=f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                    client_port=rng.randrange(1024, 65535),
                    cert_subject=f"CN={user},O=Example,C=JP",
                    cert_serial=f"{rng.getrandbits(128):X}",
                    method="GET",
                    path="/onre/top",
                    backend="tdnet",
                    user_agent="Mozilla/5.0 (Windows NT 10.0; Win64; x64)",
                )
            )
            if len(batch) == 20_000 or i == events - 1:
                store.append(batch)
                batch = []


def timed_page(path: Path, now: dt.datetime) -> tuple[float, int, int]:
    start = time.perf_counter()
    f = workspace_filter({"user": "LC000042", "since": "30d"}, now)
    events, total, summary, _ = _load(path, f, 1, now)
    render_report(events, summary, {"user": "LC000042", "since": "30d"}, rows=page_rows(events))
    return time.perf_counter() - start, len(events), total


def timed_export(
    open_store: Callable[[], AuditStore | PgAuditStore], now: dt.datetime, fmt: str, server: Callable[[], float]
) -> tuple[float, float, int, int]:
    """Wall and CPU seconds (this process plus ``server()``'s), rows, bytes (the machine may be shared and busy)."""
    f = workspace_filter({"since": "90d"}, now)
    start = time.perf_counter()
    cpu = time.process_time() + server()
    rows = size = 0
    with open_store() as store:
        cursor, encode = export_cursor(store, f, fmt)  # what the workspace's export runs
        size += len(csv_chunk([], header=True).encode()) if fmt == "csv" else 0
        while batch := cursor.fetchmany(EXPORT_BATCH):
            size += len(encode(batch, rows == 0).encode())
            rows += len(batch)
    return time.perf_counter() - start, time.process_time() + server() - cpu, rows, size


def report_exports(name: str, open_store: Callable[[], AuditStore | PgAuditStore], now: dt.datetime, runs: int,
                   server: Callable[[], float] = lambda: 0.0) -> None:  # fmt: skip
    for fmt in ("csv", "json"):
        results = [timed_export(open_store, now, fmt, server) for _ in range(runs)]
        took = statistics.median(r[0] for r in results)
        cpu = statistics.median(r[1] for r in results)
        rows, size = results[0][2], results[0][3]
        print(
            f"{name} export {fmt}: {rows:,} rows, {size / 2**20:.0f} MiB, median of {runs}: {took:.1f} s ="
            f" {rows / took:,.0f} rows/s wall, {rows / cpu:,.0f} rows per CPU-second (target >= 50,000 rows/s)"
        )


def server_cpu(pid: int) -> Callable[[], float]:
    """CPU seconds used so far by a PostgreSQL server: the postmaster and its children (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")

    def total() -> float:
        seconds = 0.0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(entry.name) == pid:  # utime + stime, and cutime + cstime: the backends that ended
                seconds += sum(int(x) for x in fields[11:15]) / tick
            elif int(fields[1]) == pid:  # fields[1]: the parent's pid; a live backend's utime + stime
                seconds += (int(fields[11]) + int(fields[12])) / tick
        return seconds

    return total


def postgres_exports(path: Path, now: dt.datetime, runs: int) -> None:
    """The same rows in a throwaway PostgreSQL server (as tests/pgserver.py starts one), exported the same way."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.pgserver import PgServer

    server = PgServer()
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"PostgreSQL: not measured ({exc})")
        return
    try:
        url = server.new_database()
        columns = ", ".join(("time_ms", *CHAINED_FIELDS))
        start = time.perf_counter()
        with psycopg.connect(url, autocommit=True) as conn:
            postgres.migrate(conn, [SCHEMA])
            with conn.cursor().copy(f"COPY events ({columns}) FROM STDIN") as copy:
                source = sqlite3.connect(path)
                for row in source.execute(f"SELECT {columns} FROM events ORDER BY id"):
                    copy.write_row(row)
                source.close()
            conn.execute("ANALYZE events")
        print(f"PostgreSQL: copied the events in {time.perf_counter() - start:.1f} s")
        assert server.dir is not None
        pid = int((server.dir / "data" / "postmaster.pid").read_text().split()[0])
        with postgres.Database(postgres.target(url)) as db:
            report_exports("PostgreSQL", lambda: PgAuditStore(db, readonly=True), now, runs, server_cpu(pid))
    finally:
        server.stop()


def plans(path: Path, now: dt.datetime) -> list[str]:
    since = int((now - dt.timedelta(days=30)).timestamp() * 1000)
    conn = sqlite3.connect(path)
    out = []
    for sql in (
        "SELECT * FROM events WHERE time_ms >= ? AND user_id = ? ORDER BY time_ms DESC, id DESC LIMIT 100",
        "SELECT count(*) FROM events WHERE time_ms >= ? AND user_id = ?",
    ):
        rows = conn.execute("EXPLAIN QUERY PLAN " + sql, (since, "LC000042")).fetchall()
        out.append(f"{sql}\n    -> " + "; ".join(str(r[-1]) for r in rows))
    conn.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="reuse/keep the database in this directory")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL exports")
    args = parser.parse_args()
    print(f"load average before: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    directory = args.keep or Path(tempfile.mkdtemp(prefix="audit-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "audit.db"
    now = utcnow()
    if not path.exists():
        start = time.perf_counter()
        fill(path, args.events, now)
        print(f"filled {args.events:,} events in {time.perf_counter() - start:.1f} s ({path})")
    for line in plans(path, now):
        print(line)
    pages = [timed_page(path, now) for _ in range(args.runs)]
    seconds = [p[0] for p in pages]
    print(
        f"filtered page (one user, 30 days, {pages[0][1]} rows of {pages[0][2]:,}, with count + chart + HTML): "
        f"median {statistics.median(seconds) * 1000:.1f} ms, max {max(seconds) * 1000:.1f} ms "
        f"over {args.runs} runs (target < 500 ms)"
    )
    report_exports("SQLite", lambda: AuditStore(path, readonly=True), now, args.runs)
    if not args.no_postgres:
        postgres_exports(path, now, args.runs)
    print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.keep is None:
        for name in ("audit.db", "audit.db-wal", "audit.db-shm"):
            (directory / name).unlink(missing_ok=True)
        directory.rmdir()


if __name__ == "__main__":
    main()

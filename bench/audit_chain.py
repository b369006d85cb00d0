"""How fast the audit chain is built and verified (a bench, not a timed test).

Builds ``--events`` realistic serialised events (refusals with certificate
fields and a user agent) for ``--instances`` instances, chains them with
:func:`gateway.audit.chain.extend`, signs a checkpoint per instance, then
times :func:`gateway.audit.chain.verify_chain` over the whole trail and, for
comparison, the same trail read back from JSON lines. Target: verify at
200,000 events/s or more on one core; chaining is what the writer adds per
event, so it is printed too.

The store's write throughput is measured too (``--store-events``, SQLite
file, batches of ``--batch``): the chained ``AuditStore.append`` against the
same rows inserted without chaining (target: 90 % or more).

    .venv/bin/python bench/audit_chain.py [--events 200000] [--instances 2] [--runs 3] [--store-events 50000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import chain
from gateway.audit.events import AuditEvent, EventKind, event_from_dict, event_to_dict, format_time
from gateway.audit.store import INSERT_SQL, AuditStore, row_values


def make_events(count: int) -> list[dict[str, Any]]:
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    out = []
    for i in range(count):
        event = AuditEvent(
            event=EventKind.LOGIN_REFUSED if i % 3 else EventKind.LOGIN,
            reason="bad_password" if i % 3 else "",
            time=start + dt.timedelta(milliseconds=37 * i),
            client_ip=f"10.0.{i % 250}.{i % 200}",
            client_port=40000 + i % 20000,
            tls_version="TLSv1.3",
            tls_cipher="TLS_AES_256_GCM_SHA384",
            backend="tdnet",
            method="POST",
            path="/_gateway/login",
            user_id=f"user{i % 1000:04d}",
            cert_subject=f"user{i % 1000:04d}",
            cert_serial=f"{i * 7919:X}",
            cert_issuer="Gateway SSO CA",
            cert_fingerprint=f"{i:064x}",
            cert_not_after="2027-11-01T00:00:00.000Z",
            user_agent="Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/131.0 Safari/537.36",
            worker=i % 2,
        )
        out.append(event_to_dict(event))
    return out


def best(runs: int, action: Callable[[], object]) -> float:
    """Median CPU seconds of this process: one core's work, whatever else the machine runs."""
    times = []
    for _ in range(runs):
        began = time.process_time()
        action()
        times.append(time.process_time() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--store-events", type=int, default=50_000, help="0 skips the store bench")
    parser.add_argument("--batch", type=int, default=500)  # the writer's BATCH_SIZE
    args = parser.parse_args()
    key = Ed25519PrivateKey.generate()
    fields = make_events(args.events)
    per = args.events // args.instances
    names = [f"gw{n}" for n in range(args.instances)]

    def build() -> dict[str, list[dict[str, Any]]]:
        return {
            name: chain.extend(chain.Head(name), fields[n * per : (n + 1) * per])[0] for n, name in enumerate(names)
        }

    chaining = best(args.runs, build)
    trail = build()
    now = format_time(dt.datetime.now(dt.UTC))
    marks = [
        chain.sign(
            chain.Mark(chain.MarkKind.CHECKPOINT, name, trail[name][-1]["seq"], trail[name][-1]["hash"], now), key
        )
        for name in names
    ]
    report = chain.verify_chain(trail, marks, [], key.public_key())
    assert report.ok, chain.render_report(report)
    verify = best(args.runs, lambda: chain.verify_chain(trail, marks, [], key.public_key()))
    lines = list(chain.trail_lines((r for name in names for r in trail[name]), marks))
    from_jsonl = best(args.runs, lambda: chain.verify_chain(*_read(lines), key.public_key()))
    total = per * args.instances
    print(f"events: {total:,} in {args.instances} chains (per CPU second of one core)")
    print(f"chain (extend: body encoding, link, hash): {total / chaining:,.0f} events/s")
    print(f"verify_chain:                              {total / verify:,.0f} events/s")
    print(f"read JSON lines + verify_chain:            {total / from_jsonl:,.0f} events/s")
    if args.store_events:
        rates = store_throughput(args.store_events, args.batch, args.runs)
        (plain_wall, plain_cpu), (chained_wall, chained_cpu) = rates["plain"], rates["chained"]
        print(f"SQLite append, batches of {args.batch} ({args.store_events:,} events), wall / CPU of this process:")
        print(f"  without chaining: {plain_wall:,.0f} / {plain_cpu:,.0f} events/s")
        print(
            f"  with chaining:    {chained_wall:,.0f} / {chained_cpu:,.0f} events/s"
            f" ({100 * chained_wall / plain_wall:.0f} % / {100 * chained_cpu / plain_cpu:.0f} %)"
        )


def store_throughput(count: int, batch: int, runs: int) -> dict[str, tuple[float, float]]:
    """Events/s through AuditStore.append and through the same INSERT without the chain (median of runs).

    Per kind, (wall, CPU): wall time is what a writer sees; CPU time of this process (SQLite runs in
    it) is the steadier figure on a shared machine. Plain and chained alternate within each run.
    """
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    events = [
        event_from_dict({**fields, "instance": "gw0"})
        for fields in make_events(count)
        if fields["time"] >= format_time(start)
    ]
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "chained": []}

    def plain(store: AuditStore) -> None:
        for i in range(0, len(events), batch):
            rows = [[*row_values(e), None, None, None] for e in events[i : i + batch]]
            with store._transaction() as conn:
                conn.executemany(INSERT_SQL, rows)

    def chained(store: AuditStore) -> None:
        for i in range(0, len(events), batch):
            store.append(events[i : i + batch])

    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            for kind, action in (("plain", plain), ("chained", chained)):
                with AuditStore(Path(tmp) / f"{kind}.db") as store:
                    wall, cpu = time.perf_counter(), time.process_time()
                    action(store)
                    times[kind].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        kind: (
            len(events) / statistics.median(t[0] for t in measured),
            len(events) / statistics.median(t[1] for t in measured),
        )
        for kind, measured in times.items()
    }


def _read(lines: list[str]) -> tuple[dict[str, list[dict[str, Any]]], list[chain.Mark], list[chain.Mark]]:
    trail = chain.read_lines(lines)
    return trail.events, trail.checkpoints, trail.anchors


if __name__ == "__main__":
    main()

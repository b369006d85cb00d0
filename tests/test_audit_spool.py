"""The audit writer's outage spool against a real PostgreSQL server that is crashed and restarted.

The server is session-scoped and shared by every test: each outage test
restarts it in ``finally``. Counts are exact: nothing lost, nothing doubled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from prometheus_client import REGISTRY

from gateway.audit import chain
from gateway.audit.events import AuditEvent, EventKind, new_support_id
from gateway.audit.signing import load_public_key
from gateway.audit.spool import Spool
from gateway.audit.writer import AuditLog, record_now
from gateway.config import Config, parse_config
from gateway.storage import postgres as pg
from gateway.storage.pg_audit import SCHEMA, PgAuditStore
from tests.pgserver import PgServer


def overflow(cause: str) -> float:
    return REGISTRY.get_sample_value("gateway_audit_overflow_total", {"cause": cause}) or 0.0


def make_config(tmp_path: Path, url: str, **audit: object) -> Config:
    return parse_config(
        {
            "instance": "gw-a",
            "database": {"url": url, "connect_timeout_seconds": 1},
            "audit": {"spool_dir": "spool", **audit},
        },
        tmp_path / "gateway.yaml",
    )


def rows(url: str) -> list[tuple[str, str]]:
    """(detail, instance) of every stored event, in insertion order."""
    with psycopg.connect(url, autocommit=True) as conn:
        return [(str(d), str(i)) for d, i in conn.execute("SELECT detail, instance FROM events ORDER BY id")]


def spool_files(config: Config) -> list[Path]:
    d = config.audit.spool_dir
    return sorted(d.glob("*.jsonl")) if d.is_dir() else []


def spooled_lines(config: Config) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in spool_files(config))


async def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture
def url(pg_url: str) -> str:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        pg.migrate(conn, [SCHEMA])
    return pg_url


class Outage:
    """Crash the shared server and start it again; the fixture restarts it if a test did not."""

    def __init__(self, server: PgServer) -> None:
        self.server = server
        self.down = False

    def crash(self) -> None:
        # The test server runs with synchronous_commit=off: flush what it acknowledged
        # first, or the crash itself loses recent commits (not what is tested here).
        self.server.sql(self.server.admin_url, "CHECKPOINT")
        self.server.pg_ctl("stop", mode="immediate")
        self.down = True

    def start(self) -> None:
        self.server.pg_ctl("start")
        self.down = False


@pytest.fixture
def outage(postgres: PgServer) -> Iterator[Outage]:
    o = Outage(postgres)
    try:
        yield o
    finally:
        if o.down:
            o.start()


def event(i: int) -> AuditEvent:
    return AuditEvent(EventKind.LOGIN, reason="ok", user_id="LC000001", detail=str(i))


async def test_events_recorded_during_an_outage_are_replayed_in_order_exactly_once(
    tmp_path: Path,
    url: str,
    outage: Outage,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(tmp_path, url)
    audit = AuditLog(config, worker=0, retry_interval=0.2, checkpoints=True)
    await audit.start()
    caplog.set_level(logging.INFO, logger="gateway.audit")
    try:
        for i in range(5):
            audit.record(event(i))
        await until(lambda: len(rows(url)) == 5)
        await asyncio.to_thread(outage.crash)
        n = 300
        for i in range(5, 5 + n):
            audit.record(event(i))
            if i % 50 == 0:
                await asyncio.sleep(0.05)  # several batches, not one
        await until(lambda: spooled_lines(config) == n)
        assert len(spool_files(config)) == 1  # one file for this process
        await asyncio.to_thread(outage.start)
        await until(lambda: not spool_files(config))
    finally:
        await audit.aclose()
    stored = rows(url)
    assert [d for d, _ in stored] == [str(i) for i in range(5 + n)]  # all, once, in order
    assert {i for _, i in stored} == {"gw-a"}
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.audit"]
    assert sum("unavailable" in m for m in messages) == 1, messages  # no storm: one line each way
    assert sum("reachable again; 300 spooled events replayed" in m for m in messages) == 1, messages
    assert not any(r.exc_info for r in caplog.records)
    # The replayed events were chained as they were committed: no gap, signed at close.
    with pg.Database(pg.target(url)) as db, PgAuditStore(db) as store:
        trail = store.chain_trail()
    public_key = load_public_key(config.audit.signing_key)
    report = chain.verify_chain(trail.events, trail.checkpoints, trail.anchors, public_key)
    assert report.ok, chain.render_report(report)
    assert [(c.instance, c.last_seq, c.signed_up_to) for c in report.chains] == [("gw-a", 5 + n, 5 + n)]


async def test_a_full_spool_counts_and_reports_what_did_not_fit(
    tmp_path: Path,
    url: str,
    outage: Outage,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    line = len(json.dumps(_spooled_form(event(10))).encode()) + 1
    config = make_config(tmp_path, url, spool_max_bytes=line * 4 + line // 2)  # room for 4 events
    audit = AuditLog(config, retry_interval=0.2)
    before = overflow("spool_full")
    await audit.start()
    try:
        await asyncio.to_thread(outage.crash)
        for i in range(10, 20):
            audit.record(event(i))
        await until(lambda: overflow("spool_full") == before + 6)
        assert spooled_lines(config) == 4
        await asyncio.to_thread(outage.start)
        await until(lambda: not spool_files(config))
    finally:
        await audit.aclose()
    assert [d for d, _ in rows(url)] == ["10", "11", "12", "13"]
    lost = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    assert [(x["audit_overflow"], x["detail"]) for x in lost] == [("spool_full", str(i)) for i in range(14, 20)]
    assert sum("is full" in r.getMessage() for r in caplog.records) == 1


def _spooled_form(e: AuditEvent) -> dict[str, object]:
    from gateway.audit.events import event_to_dict

    return event_to_dict(e)


async def test_a_spool_left_by_a_dead_process_is_replayed_at_start_but_not_a_live_ones(
    tmp_path: Path, url: str
) -> None:
    config = make_config(tmp_path, url)
    dead = Spool(config.audit.spool_dir, "audit-gw-a-3-999999", 1 << 20)
    assert dead.add([event(i) for i in range(7)]) == []
    dead.close()  # the process died: its lock is gone, its file stays
    live = Spool(config.audit.spool_dir, "audit-gw-b-1-999998", 1 << 20)
    live.add([event(100)])
    try:
        audit = AuditLog(config, retry_interval=0.2)
        await audit.start()
        try:
            await until(lambda: len(rows(url)) == 7)
            await asyncio.sleep(0.3)
        finally:
            await audit.aclose()
        assert [d for d, _ in rows(url)] == [str(i) for i in range(7)]
        assert spool_files(config) == [live.path]  # still held by its (live) owner
    finally:
        live.close()


def test_record_now_spools_during_an_outage_and_the_next_process_replays(
    tmp_path: Path, url: str, outage: Outage
) -> None:
    config = make_config(tmp_path, url)
    outage.crash()
    assert record_now(config, event(1)) is False
    assert spooled_lines(config) == 1
    outage.start()
    assert record_now(config, event(2)) is True  # replays the first, then writes its own
    assert [d for d, _ in rows(url)] == ["1", "2"]
    assert spool_files(config) == []


def test_a_spool_file_is_locked_by_its_owner(tmp_path: Path) -> None:
    spool = Spool(tmp_path, "audit-x-1-1", 1 << 20)
    spool.add([event(1)])
    fd = os.open(spool.path, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        spool.close()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with its owner
    finally:
        os.close(fd)


async def test_a_client_s_nul_or_bad_utf8_neither_fails_the_batch_nor_the_spool(
    tmp_path: Path, url: str, outage: Outage
) -> None:
    """``/a%00b`` decodes to a NUL, invalid UTF-8 in a header to a lone surrogate: both stored, escaped, with the rest."""
    hostile = [
        AuditEvent(EventKind.REQUEST_REFUSED, reason="no_certificate", path="/a\0b", detail="nul"),
        AuditEvent(EventKind.REQUEST_REFUSED, reason="no_certificate", user_agent="x\udcff", detail="surrogate"),
        event(0),
    ]
    config = make_config(tmp_path, url)
    audit = AuditLog(config, worker=0, retry_interval=0.2)
    await audit.start()
    try:
        for e in hostile:
            audit.record(e)
        await until(lambda: len(rows(url)) == 3)  # the whole batch, not stderr
        await asyncio.to_thread(outage.crash)
        for e in hostile:
            audit.record(dataclasses.replace(e, support_id=new_support_id(), detail=e.detail + "-spooled"))
        await until(lambda: spooled_lines(config) == 3)
        await asyncio.to_thread(outage.start)
        await until(lambda: len(rows(url)) == 6 and not spool_files(config))
    finally:
        await audit.aclose()
    with psycopg.connect(url, autocommit=True) as conn:
        stored = dict(conn.execute("SELECT detail, path || '|' || user_agent FROM events").fetchall())
    assert stored["nul"] == "/a\\x00b|" and stored["surrogate"] == "|x\\udcff"
    assert stored["nul-spooled"] == "/a\\x00b|"

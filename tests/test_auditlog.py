"""The non-blocking audit writer: nothing blocks, nothing is lost, failures are loud."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import statistics
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from gateway.audit.events import AuditEvent, AuditFilter, EventKind
from gateway.audit.store import AuditStore
from gateway.audit.writer import AuditLog, record_now
from gateway.config import parse_config
from gateway.errors import StoreError


def overflow(cause: str) -> float:
    return REGISTRY.get_sample_value("gateway_audit_overflow_total", {"cause": cause}) or 0.0


def recorded(event: str, reason: str) -> float:
    labels = {"event": event, "reason": reason}
    return REGISTRY.get_sample_value("gateway_audit_events_total", labels) or 0.0


def refusal(i: int = 0, reason: str = "certificate_revoked") -> AuditEvent:
    return AuditEvent(EventKind.REQUEST_REFUSED, reason=reason, client_ip="192.0.2.7", detail=f"n{i}")


def stored(path: Path) -> list[AuditEvent]:
    with AuditStore(path, readonly=True) as s:
        return s.query(AuditFilter(limit=100_000))


def overflow_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith('{"audit_overflow"')]


async def test_recorded_events_reach_the_store_and_the_metric(tmp_path: Path) -> None:
    before = recorded("request_refused", "reason_for_metric_test")
    audit = AuditLog(tmp_path / "audit.db", worker=4)
    await audit.start()
    events = [refusal(i, "reason_for_metric_test") for i in range(3)]
    for e in events:
        audit.record(e)
    await audit.aclose()
    rows = stored(tmp_path / "audit.db")
    assert {e.support_id for e in rows} == {e.support_id for e in events}
    assert {e.worker for e in rows} == {4}  # the log fills in its worker id
    assert recorded("request_refused", "reason_for_metric_test") == before + 3


async def test_events_recorded_before_start_or_without_start_are_written(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.db")
    audit.record(refusal(1))
    await audit.start()
    audit.record(refusal(2))
    await audit.aclose()
    never_started = AuditLog(tmp_path / "audit.db")
    never_started.record(refusal(3))
    await never_started.aclose()
    assert sorted(e.detail for e in stored(tmp_path / "audit.db")) == ["n1", "n2", "n3"]


async def test_record_after_close_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = overflow("closed")
    audit = AuditLog(tmp_path / "audit.db")
    await audit.start()
    await audit.aclose()
    late = refusal(9)
    audit.record(late)
    lines = overflow_lines(capsys.readouterr().err)
    assert [(x["audit_overflow"], x["support_id"]) for x in lines] == [("closed", late.support_id)]
    assert overflow("closed") == before + 1


async def test_a_full_queue_spills_to_stderr_and_is_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = overflow("queue_full")
    audit = AuditLog(tmp_path / "audit.db", queue_size=10)
    events = [refusal(i) for i in range(15)]
    for e in events:  # not started yet: the queue fills up
        audit.record(e)
    await audit.start()
    await audit.aclose()
    spilled = overflow_lines(capsys.readouterr().err)
    assert overflow("queue_full") == before + 5
    assert {x["audit_overflow"] for x in spilled} == {"queue_full"}
    ids_in_store = {e.support_id for e in stored(tmp_path / "audit.db")}
    ids_on_stderr = {str(x["support_id"]) for x in spilled}
    assert len(ids_in_store) == 10
    assert ids_in_store | ids_on_stderr == {e.support_id for e in events}  # nothing silent


async def test_a_flood_stays_fast_and_loses_nothing(tmp_path: Path) -> None:
    """20,000 events as fast as handlers can produce them: record() never waits for the store,
    the event loop keeps ticking, and every event is in the store after aclose()."""
    full_before, failed_before = overflow("queue_full"), overflow("store_failed")
    audit = AuditLog(tmp_path / "audit.db", queue_size=50_000)
    await audit.start()
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:  # stands in for other requests being served
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t - 0.001)

    tick = asyncio.create_task(ticker())
    durations: list[float] = []
    events = [refusal(i) for i in range(20_000)]
    started = time.perf_counter()
    for chunk in range(0, len(events), 200):  # 200 "requests" per loop turn
        for e in events[chunk : chunk + 200]:
            t = time.perf_counter()
            audit.record(e)
            durations.append(time.perf_counter() - t)
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - started
    await audit.aclose()
    stop.set()
    await tick
    durations.sort()
    # Bounds that catch a record() doing I/O (20,000 commits or fsyncs take minutes) yet hold on a
    # loaded CI box; the writer's speed itself is measured in bench/audit_chain.py, not here.
    assert elapsed < 10.0
    assert statistics.median(durations) < 0.001
    assert durations[int(len(durations) * 0.99)] < 0.01
    assert max(lags, default=0.0) < 1.0
    assert len(stored(tmp_path / "audit.db")) == 20_000
    assert overflow("queue_full") == full_before
    assert overflow("store_failed") == failed_before


async def test_a_failing_store_is_reported_not_silent_and_recovers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The database path is a directory: SQLite cannot open it, even as root."""
    db = tmp_path / "audit.db"
    db.mkdir()
    before = overflow("store_failed")
    audit = AuditLog(db)
    await audit.start()
    lost = [refusal(i) for i in range(5)]
    with caplog.at_level(logging.WARNING, logger="gateway.audit"):
        for e in lost:
            audit.record(e)
        await asyncio.sleep(0.2)  # let the writer try (and fail)
        spilled = overflow_lines(capsys.readouterr().err)
        assert {str(x["support_id"]) for x in spilled} == {e.support_id for e in lost}
        assert {x["audit_overflow"] for x in spilled} == {"store_failed"}
        assert spilled[0]["reason"] == "certificate_revoked"
        assert overflow("store_failed") == before + 5
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert errors and "audit store" in errors[0].getMessage()
        # The disk comes back: later batches are stored again.
        db.rmdir()
        later = refusal(99)
        audit.record(later)
        await audit.aclose()
    assert [e.support_id for e in stored(db)] == [later.support_id]
    assert any("works again" in r.getMessage() for r in caplog.records)
    assert overflow("store_failed") == before + 5


async def test_a_database_replaced_after_start_is_noticed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A working store whose file is swapped for a directory: the open connection would
    happily keep writing to the unlinked file; the writer notices and reports."""
    db = tmp_path / "audit.db"
    audit = AuditLog(db)
    await audit.start()
    audit.record(refusal(1))
    for _ in range(100):
        await asyncio.sleep(0.01)
        with contextlib.suppress(StoreError):  # the writer may be creating the schema
            if len(stored(db)) == 1:
                break
    assert [e.detail for e in stored(db)] == ["n1"]
    before = overflow("store_failed")
    shutil.move(db, tmp_path / "moved.db")
    db.mkdir()
    victim = refusal(2)
    audit.record(victim)
    await audit.aclose()
    spilled = overflow_lines(capsys.readouterr().err)
    assert [x["support_id"] for x in spilled] == [victim.support_id]
    assert overflow("store_failed") == before + 1


async def test_a_corrupt_database_file_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "audit.db"
    db.write_bytes(b"\x00garbage" * 1000)
    before = overflow("store_failed")
    audit = AuditLog(db)
    await audit.start()
    audit.record(refusal(1))
    await audit.aclose()
    assert len(overflow_lines(capsys.readouterr().err)) == 1
    assert overflow("store_failed") == before + 1


async def test_jsonl_file_sink_gets_one_line_per_event(tmp_path: Path) -> None:
    sink = tmp_path / "audit.jsonl"
    audit = AuditLog(tmp_path / "audit.db", jsonl=str(sink))
    await audit.start()
    events = [refusal(i) for i in range(3)]
    for e in events:
        audit.record(e)
    await audit.aclose()
    lines = [json.loads(x) for x in sink.read_text(encoding="utf-8").splitlines()]
    assert [x["support_id"] for x in lines] == [e.support_id for e in events]
    assert lines[0]["time"].endswith("Z") and "audit_overflow" not in lines[0]
    assert len(stored(tmp_path / "audit.db")) == 3


async def test_jsonl_stdout_sink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    audit = AuditLog(tmp_path / "audit.db", jsonl="-")
    await audit.start()
    e = refusal(1)
    audit.record(e)
    await audit.aclose()
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["support_id"] for x in out] == [e.support_id]


async def test_a_failing_jsonl_sink_is_logged_and_the_store_still_gets_everything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = tmp_path / "sink"
    sink.mkdir()
    audit = AuditLog(tmp_path / "audit.db", jsonl=str(sink))
    await audit.start()
    with caplog.at_level(logging.ERROR, logger="gateway.audit"):
        audit.record(refusal(1))
        await audit.aclose()
    assert any("JSON lines sink" in r.getMessage() for r in caplog.records)
    assert len(stored(tmp_path / "audit.db")) == 1


def test_record_now_appends_at_once_for_cli_processes(tmp_path: Path) -> None:
    config = parse_config({"audit": {"database": "audit.db"}}, tmp_path / "gateway.yaml")
    event = AuditEvent(EventKind.ADMIN_ACTION, reason="user_added", user_id="LC000009")
    assert record_now(config, event) is True
    [row] = stored(tmp_path / "audit.db")
    assert (row.support_id, row.reason, row.user_id) == (event.support_id, "user_added", "LC000009")


def test_record_now_failure_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "audit.db").mkdir()
    config = parse_config({"audit": {"database": "audit.db"}}, tmp_path / "gateway.yaml")
    before = overflow("store_failed")
    event = AuditEvent(EventKind.ADMIN_ACTION, reason="user_added", user_id="LC000009")
    assert record_now(config, event) is False
    [line] = overflow_lines(capsys.readouterr().err)
    assert line["support_id"] == event.support_id
    assert overflow("store_failed") == before + 1


async def test_built_from_the_config_section_uses_its_sink_and_queue(tmp_path: Path) -> None:
    config = parse_config(
        {"audit": {"database": "a.db", "jsonl": "a.jsonl", "queue_size": 2}},
        tmp_path / "gateway.yaml",
    )
    audit = AuditLog(config.audit, worker=2)
    before = overflow("queue_full")
    for i in range(3):  # not started: the third does not fit a queue of 2
        audit.record(refusal(i))
    assert overflow("queue_full") == before + 1
    await audit.aclose()
    assert len((tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert [e.worker for e in stored(tmp_path / "a.db")] == [2, 2]


async def test_aclose_flushes_even_if_the_writer_task_was_cancelled(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.db")
    await audit.start()
    assert audit._task is not None
    audit._task.cancel()  # e.g. a careless "cancel every task" at shutdown
    await asyncio.sleep(0)
    events = [refusal(i) for i in range(3)]
    for e in events:
        audit.record(e)
    await audit.aclose()
    assert {e.support_id for e in stored(tmp_path / "audit.db")} == {e.support_id for e in events}

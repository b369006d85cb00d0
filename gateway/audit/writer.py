"""The audit writer: request handlers record events without ever waiting for disk.

``AuditLog.record`` is synchronous and only puts the event on a bounded
``asyncio.Queue``; one writer task takes batches off the queue and writes
them in a dedicated thread (SQLite blocks), to the store and, if set, to a
JSON-lines sink for a SIEM. Nothing is dropped silently: an event that
cannot be queued (queue full, log closed) or stored (database failing) is
written to stderr as one JSON line carrying ``"audit_overflow": <cause>``,
counted in ``gateway_audit_overflow_total{cause}`` and, for store
failures, logged as an error. The writer keeps trying the store with each
later batch, so it recovers on its own when the disk comes back.

With a top-level ``database:`` the store is the shared PostgreSQL table
(from a :class:`~gateway.storage.backends.Backend`) and an outage is not a
failure: while the store raises
:class:`~gateway.storage.postgres.DatabaseUnavailable`, batches go to the
local spool (:mod:`gateway.audit.spool`) and are replayed in order once
the database answers again. One log line when an outage starts, one when
it ends. Every event is stamped with the config's ``instance``.

``record_now`` is the synchronous variant for short CLI processes (users,
CA): it appends straight to the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit.events import AuditEvent, event_to_dict, storable, utcnow
from gateway.audit.signing import load_or_create_signing_key
from gateway.audit.spool import Spool
from gateway.audit.store import AuditStore
from gateway.config import AuditConfig, Config
from gateway.metrics import AUDIT_EVENTS, AUDIT_OVERFLOW, AUDIT_SPOOLED
from gateway.storage.backends import Backend
from gateway.storage.postgres import DatabaseUnavailable

if TYPE_CHECKING:
    from gateway.storage.interfaces import AuditStoreProtocol

log = logging.getLogger("gateway.audit")
# How long the writer waits for more events before a small batch goes to the shared database.
COALESCE_SECONDS = 0.01

BATCH_SIZE = 500
DEFAULT_QUEUE_SIZE = 10_000
ERROR_LOG_INTERVAL = 60.0  # seconds between repeated error lines while a sink keeps failing
RETRY_INTERVAL = 1.0  # seconds between attempts to reach the database during an outage


def overflow_line(event: AuditEvent, cause: str) -> str:
    """The stderr form of an event that missed the store: one JSON object, one line."""
    return json.dumps({"audit_overflow": cause, **event_to_dict(event)}, ensure_ascii=False)


def json_line(event: AuditEvent) -> str:
    return json.dumps(event_to_dict(event), ensure_ascii=False)


class _Complaints:
    """Error logging for a failing sink: the first failure, then once a minute, then recovery."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failing = False
        self.suppressed = 0
        self.last = 0.0

    def failed(self, exc: BaseException, lost: str) -> None:
        now = time.monotonic()
        if not self.failing or now - self.last >= ERROR_LOG_INTERVAL:
            more = f" ({self.suppressed} more failures since last report)" if self.suppressed else ""
            log.error("%s failed: %s; %s%s", self.what, exc, lost, more)
            self.last, self.suppressed = now, 0
        else:
            self.suppressed += 1
        self.failing = True

    def succeeded(self) -> None:
        if self.failing:
            log.warning("%s works again", self.what)
        self.failing, self.suppressed = False, 0


class AuditLog:
    """The non-blocking recorder handed to every component that audits.

    Call :meth:`record` from the event loop's thread (request handlers);
    from another thread use ``loop.call_soon_threadsafe(audit.record, e)``.
    :meth:`start` and :meth:`aclose` bracket the application's life.
    """

    def __init__(
        self,
        target: Config | AuditConfig | Path | str,
        *,
        backend: Backend | None = None,
        jsonl: str | None = None,
        queue_size: int | None = None,
        batch_size: int = BATCH_SIZE,
        worker: int | None = None,
        stderr: TextIO | None = None,
        retry_interval: float = RETRY_INTERVAL,
        checkpoints: bool = False,
    ) -> None:
        """``target`` is the whole config, its ``audit`` section, or a database path.

        Only the whole config can name the shared database and the instance;
        its ``backend`` is used if given (its pool shared), else the log opens
        one of its own. With a config or section, ``jsonl`` and ``queue_size``
        default to its values. ``worker`` (and the config's ``instance``) are
        stamped on events recorded without one. With ``checkpoints`` (one
        log per instance: the single worker, or worker 0) the log signs its
        instance's chain head every ``audit.checkpoint_interval_seconds`` and
        once more at close, after everything queued was written.
        """
        self.config = target if isinstance(target, Config) else None
        self.instance = self.config.instance if self.config is not None else ""
        self._backend = backend
        self._own_backend = False
        self._spool: Spool | None = None
        self._retry_interval = retry_interval
        self._next_try = 0.0
        self._outage = False
        self._spool_full_said = False
        if isinstance(target, Config):
            target = target.audit
            if self.config is not None and self.config.database is not None:
                # Unique per log, not only per process: a CLI run may open two in turn.
                who = worker if worker is not None else "main"
                name = f"audit-{self.instance}-{who}-{os.getpid()}-{secrets.token_hex(3)}"
                self._spool = Spool(target.spool_dir, name, target.spool_max_bytes)
        if isinstance(target, AuditConfig):
            self.database = target.database
            jsonl = jsonl if jsonl is not None else target.jsonl
            queue_size = queue_size if queue_size is not None else target.queue_size
        else:
            self.database = Path(target)
        self.jsonl = jsonl
        self.worker = worker
        self.batch_size = batch_size
        self._stderr = stderr
        self._queue: asyncio.Queue[AuditEvent | None] = asyncio.Queue(
            maxsize=queue_size if queue_size is not None else DEFAULT_QUEUE_SIZE
        )
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._store: AuditStore | None = None  # or the PostgreSQL store, with a database
        self._store_identity: tuple[int, int] | None = None
        self._jsonl_fd: int | None = None
        self._store_complaints = _Complaints(f"audit store {self.database}")
        self._jsonl_complaints = _Complaints(f"audit JSON lines sink {jsonl}")
        self._checkpoints = checkpoints and self.config is not None
        self._signing_key: Ed25519PrivateKey | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None

    # -- the request side --

    def record(self, event: AuditEvent) -> None:
        """Queue one event; never blocks, never raises for a full queue."""
        if self.worker is not None and event.worker is None:
            event = dataclasses.replace(event, worker=self.worker)
        if self.instance and not event.instance:
            event = dataclasses.replace(event, instance=self.instance)
        AUDIT_EVENTS.labels(event=str(event.event), reason=event.reason).inc()
        if self._closed:
            self._overflow([event], "closed")
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._overflow([event], "queue_full")

    # -- lifecycle --

    async def start(self) -> None:
        """Start the writer task (events recorded before this wait in the queue)."""
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-writer")
        loop = asyncio.get_running_loop()
        if self._checkpoints and self._signing_key is None:
            assert self.config is not None
            path = self.config.audit.signing_key
            self._signing_key = await loop.run_in_executor(self._executor, load_or_create_signing_key, path)
        self._task = loop.create_task(self._run(), name="audit-writer")
        if self._signing_key is not None:
            self._checkpoint_task = loop.create_task(self._checkpoint_loop(), name="audit-checkpoints")

    async def aclose(self) -> None:
        """Stop taking events, write everything queued, close the sinks."""
        if self._closed:
            return
        self._closed = True
        if self._task is None:  # never started: write what was queued, in a thread
            await self.start()
        assert self._task is not None and self._executor is not None
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
            await asyncio.wait([self._checkpoint_task])
        if not self._task.done():
            await self._queue.put(None)
            await asyncio.wait([self._task])
        # If the writer task was cancelled by someone else, flush what it left.
        leftover = [e for e in self._drain() if e is not None]
        loop = asyncio.get_running_loop()
        if leftover:
            await loop.run_in_executor(self._executor, self._write, leftover)
        if self._signing_key is not None:  # the last word: sign the head once everything is written
            await loop.run_in_executor(self._executor, self._checkpoint)
        await loop.run_in_executor(self._executor, self._close_sinks)
        self._executor.shutdown(wait=True)

    def _drain(self) -> list[AuditEvent | None]:
        items: list[AuditEvent | None] = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        if self._spool is not None:  # spools left by processes that died: replay before anything new
            await loop.run_in_executor(self._executor, self._claim_orphans)
        while not stop:
            batch: list[AuditEvent] = []
            if self._spool is not None and self._spool.pending:
                try:  # nothing new to write: still try the database now and then
                    item = await asyncio.wait_for(self._queue.get(), self._retry_interval)
                except TimeoutError:
                    await loop.run_in_executor(self._executor, self._write_store, [])
                    continue
            else:
                item = await self._queue.get()
            if self._spool is not None and item is not None and self._queue.qsize() < self.batch_size:
                # The shared database: let a few more events arrive, so a batch is one transaction for
                # many events rather than one each (a transaction costs PostgreSQL ~50 µs of CPU per
                # event in full batches, several times that in batches of one or two).
                await asyncio.sleep(COALESCE_SECONDS)
            while item is not None:
                batch.append(item)
                if len(batch) >= self.batch_size or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            stop = item is None
            if batch:
                try:
                    await loop.run_in_executor(self._executor, self._write, batch)
                except Exception:  # a bug in a sink must not stop the writer
                    log.exception("audit writer failed on a batch of %d events", len(batch))

    async def _checkpoint_loop(self) -> None:
        assert self.config is not None
        interval = self.config.audit.checkpoint_interval_seconds
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            await loop.run_in_executor(self._executor, self._checkpoint)

    # -- the writer thread --

    def _checkpoint(self) -> None:
        """Sign the instance's head (on the writer's thread, so never beside a write of this log)."""
        assert self._signing_key is not None
        try:
            store: AuditStoreProtocol = self._shared_store() if self._spool is not None else self._open_store()
            store.checkpoint(self.instance, self._signing_key, utcnow())
        except Exception as exc:  # the next interval tries again; the chain is intact meanwhile
            log.warning("audit checkpoint of %s failed: %s", self.instance or "(no instance)", exc)

    def _write(self, batch: Sequence[AuditEvent]) -> None:
        batch = [storable(event) for event in batch]  # a client's NUL or bad UTF-8 must not fail the batch
        try:
            self._write_jsonl(batch)
        finally:
            self._write_store(batch)

    def _write_store(self, batch: Sequence[AuditEvent]) -> None:
        if self._spool is not None:
            self._write_shared(self._spool, batch)
            return
        if not batch:
            return
        try:
            self._open_store().append(batch)
        except Exception as exc:
            self._drop_store()
            self._overflow(batch, "store_failed")
            self._store_complaints.failed(exc, "events go to stderr until it recovers")
        else:
            self._store_complaints.succeeded()

    # -- the shared database and its outage spool (writer thread) --

    def _write_shared(self, spool: Spool, batch: Sequence[AuditEvent]) -> None:
        """Store ``batch`` after everything spooled before it, or spool it while the database is away.

        During an outage only one attempt per retry interval reaches for the
        database (each waits up to the connect timeout); the other batches
        go straight to the spool, so the queue keeps draining.
        """
        if spool.pending or self._outage:
            if time.monotonic() < self._next_try:
                self._to_spool(spool, batch)
                return
            try:
                replayed = spool.replay(self._shared_store().append, self.batch_size)
            except DatabaseUnavailable as exc:
                self._down(spool, exc)
                self._to_spool(spool, batch)
                return
            except Exception as exc:
                self._store_complaints.failed(exc, "spooled events stay in the spool")
                self._next_try = time.monotonic() + self._retry_interval
                self._to_spool(spool, batch)
                return
            self._up(spool, replayed)
        if not batch:
            return
        try:
            self._shared_store().append(batch)
        except DatabaseUnavailable as exc:
            self._down(spool, exc)
            self._to_spool(spool, batch)
        except Exception as exc:  # not an outage (a bug, a schema problem): say so, keep the events
            self._overflow(batch, "store_failed")
            self._store_complaints.failed(exc, "events go to stderr until it recovers")
        else:
            self._store_complaints.succeeded()

    def _to_spool(self, spool: Spool, batch: Sequence[AuditEvent]) -> None:
        if not batch:
            return
        try:
            left = spool.add(batch)
        except OSError as exc:
            self._overflow(batch, "spool_failed")
            self._store_complaints.failed(exc, f"cannot write the audit spool {spool.path}; events go to stderr")
            return
        AUDIT_SPOOLED.inc(len(batch) - len(left))
        if left:
            self._overflow(left, "spool_full")
            if not self._spool_full_said:
                self._spool_full_said = True
                log.error(
                    "audit spool %s is full (audit.spool_max_bytes = %d); further events go to stderr"
                    " until the database is back",
                    spool.path,
                    spool.max_bytes,
                )

    def _down(self, spool: Spool, exc: BaseException) -> None:
        self._next_try = time.monotonic() + self._retry_interval
        if not self._outage:
            self._outage = True
            log.error("audit database unavailable (%s); spooling events to %s", exc, spool.path)

    def _up(self, spool: Spool, replayed: int) -> None:
        if self._outage or replayed:
            log.warning("audit database reachable again; %d spooled events replayed", replayed)
        self._outage = False
        self._spool_full_said = False
        if replayed:
            self._claim_orphans()  # a process that died during the outage may have left one

    def _claim_orphans(self) -> None:
        if self._spool is not None:
            try:
                found = self._spool.claim_orphans()
            except OSError as exc:
                log.error("cannot read the audit spool directory %s: %s", self._spool.directory, exc)
                return
            if found:
                log.warning("audit spool: %d file(s) left by stopped processes will be replayed", found)

    def _shared_store(self) -> AuditStoreProtocol:
        if self._store is None:
            if self._backend is None:
                assert self.config is not None
                self._backend = Backend(self.config, role="audit", pool_size=1)  # one writer thread
                self._own_backend = True
            self._store = self._backend.audit()  # type: ignore[assignment]
        assert self._store is not None
        return self._store

    def _open_store(self) -> AuditStore:
        """The store, reopened if its file was moved, deleted or replaced.

        An open SQLite connection keeps writing to a file that was renamed
        or unlinked, so without this check events would vanish with it.
        One stat per batch is cheap.
        """
        try:
            st = os.stat(self.database)
            identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            identity = None
        if self._store is not None and identity != self._store_identity:
            log.warning("audit database %s was moved or replaced; reopening it", self.database)
            self._drop_store()
        if self._store is None:
            self._store = AuditStore(self.database)
            st = os.stat(self.database)
            self._store_identity = (st.st_dev, st.st_ino)
        return self._store

    def _write_jsonl(self, batch: Sequence[AuditEvent]) -> None:
        if self.jsonl is None:
            return
        data = "".join(json_line(e) + "\n" for e in batch)
        try:
            if self.jsonl == "-":
                sys.stdout.write(data)
                sys.stdout.flush()
            else:
                self._append_jsonl(data.encode())
        except Exception as exc:
            self._close_jsonl()
            self._jsonl_complaints.failed(exc, "the events are still in the audit database")
        else:
            self._jsonl_complaints.succeeded()

    def _append_jsonl(self, data: bytes) -> None:
        # O_APPEND and whole batches per write(): workers sharing the file
        # never interleave inside a line.
        if self._jsonl_fd is None:
            assert self.jsonl is not None
            self._jsonl_fd = os.open(self.jsonl, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(self._jsonl_fd, view) :]

    def _overflow(self, events: Sequence[AuditEvent], cause: str) -> None:
        stream = self._stderr or sys.stderr
        stream.write("".join(overflow_line(e, cause) + "\n" for e in events))
        stream.flush()
        AUDIT_OVERFLOW.labels(cause=cause).inc(len(events))

    def _drop_store(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            with contextlib.suppress(Exception):  # already failing; the reopen will report
                store.close()

    def _close_jsonl(self) -> None:
        if self._jsonl_fd is not None:
            fd, self._jsonl_fd = self._jsonl_fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def _close_sinks(self) -> None:
        if self._spool is not None and self._spool.pending and not self._outage:
            self._next_try = 0.0
            self._write_store([])  # one last try; what stays is replayed by the next process
        self._drop_store()
        self._close_jsonl()
        if self._spool is not None:
            self._spool.close()
        if self._own_backend and self._backend is not None:
            backend, self._backend = self._backend, None
            backend.close()


def record_now(config: Config, event: AuditEvent, *, stderr: TextIO | None = None) -> bool:
    """Append one event at once, for CLI processes (admin actions); True if stored.

    On failure the event goes to stderr as an overflow line and is counted,
    like in the gateway, and the error is logged; the caller's action has
    already happened, so this does not raise.
    """
    audit = AuditLog(config, stderr=stderr)
    AUDIT_EVENTS.labels(event=str(event.event), reason=event.reason).inc()
    if audit.instance and not event.instance:
        event = dataclasses.replace(event, instance=audit.instance)
    audit._claim_orphans()
    audit._write([event])
    stored = not audit._store_complaints.failing and not audit._outage
    audit._close_sinks()
    return stored

"""The verification state of the period a report page shows: one line, verified or the first finding.

The /audit report and the auditor workspace run the check of ``gateway
audit verify`` (:func:`gateway.audit.chain.verify_chain`), bounded in cost:
only the instances with events in the period, each from its latest signed
mark before the period's start (a partial verify), up to its head (the
signed part and the unsigned tail).

Paging must not re-verify: a :class:`StateCache` keeps, per period (the
instances and where their chains start) the heads it verified. When the
heads have not moved the state is reused; when they have (the page views
are audited, so they move) and the trail verified, only the events after
the verified heads are read and verified, continuing from them. A new
checkpoint before the period (hourly) or ``max_age`` starts a full partial
verify again, so tampering with already verified events is seen within
that age. A trail with findings is verified in full on every change.

A page waits for a verification at most ``budget`` seconds (a long period
seen for the first time, a trail without recent checkpoints): then the line
says it is running, and the cache's one background thread finishes it for
the next view.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.audit import chain, signing
from gateway.audit.events import format_time
from gateway.audit.store import start_seq
from gateway.storage.interfaces import AuditStoreProtocol

CACHE_SIZE = 32
MAX_AGE_SECONDS = 300.0
BUDGET_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class TrailState:
    """What the page says about the period's trail."""

    ok: bool
    instances: tuple[str, ...] = ()
    unsigned: int = 0  # events after the last signed point (protected by the chain only)
    findings: int = 0
    first: chain.Finding | None = None
    command: str = "gateway audit verify"
    problem: str = ""  # why nothing could be verified (no signing key), in English
    pending: bool = False  # still verifying in the background (a long period seen for the first time)

    @property
    def ja(self) -> str:
        if self.pending:
            return "この期間の改ざん検証を実行中です。しばらくしてから再読み込みしてください。"
        if self.problem:
            return "改ざん検証を行えません（監査署名鍵がありません）。"
        if self.ok:
            if not self.instances:
                return "検証済み: この期間にチェーン化されたイベントはありません。"
            return (
                f"検証済み: この期間の {len(self.instances)} インスタンスのハッシュチェーンと署名付きチェックポイントは"
                f"改ざんされていません（最後の署名以降の {self.unsigned} 件はチェーンのみで保護）。"
            )
        first = self._first_text()
        return f"改ざんの疑い: {self.findings} 件の検出。最初: {first}。詳細は {self.command} を実行してください。"

    @property
    def en(self) -> str:
        if self.pending:
            return f"Verifying this period in the background; reload in a moment (or run {self.command})."
        if self.problem:
            return f"Not verified: {self.problem}."
        if self.ok:
            if not self.instances:
                return "Verified: no chained events in this period."
            return (
                f"Verified: the hash chains and signed checkpoints of {len(self.instances)} instance(s) in this"
                f" period hold ({self.unsigned} event(s) after the last signed point, protected by the chain only)."
            )
        return f"{self.findings} finding(s); the first: {self._first_text()}. Run {self.command} for the details."

    def _first_text(self) -> str:
        f = self.first
        if f is None:
            return ""
        where = f"seq {f.seq}" if f.seq is not None else "(no seq)"
        sid = f", support ID {f.support_id}" if f.support_id else ""
        return f"{f.kind} in {f.instance} at {where}{sid}"


@dataclass(frozen=True, slots=True)
class _Entry:
    heads: dict[str, chain.Head]  # what was verified, per instance
    state: TrailState
    base_time: float  # when the last full (partial-from-a-mark) verify ran


class StateCache:
    """Verified heads per (store, period start points); thread-safe, least recently used out."""

    def __init__(
        self,
        size: int = CACHE_SIZE,
        max_age: float = MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        budget: float = BUDGET_SECONDS,
    ):
        self.size = size
        self.max_age = max_age
        self.clock = clock
        self.budget = budget  # how long a page waits for a verification before saying it is running
        self._entries: OrderedDict[tuple[object, ...], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._running: dict[tuple[object, ...], Future[TrailState]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self.verified_events = 0  # events read and verified, all calls together (tests check paging adds none)

    def close(self) -> None:
        """Stop the background verifier (a running verification finishes; queued ones are dropped)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, key: tuple[object, ...], job: Callable[[], TrailState]) -> Future[TrailState]:
        """Run ``job`` in the background verifier, or join the one already running for ``key``."""
        with self._lock:
            running = self._running.get(key)
            if running is not None and not running.done():
                return running
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-verify")
            future = self._executor.submit(job)
            self._running[key] = future
        future.add_done_callback(lambda done: self._forget(key, done))
        return future

    def _forget(self, key: tuple[object, ...], done: Future[TrailState]) -> None:
        with self._lock:
            if self._running.get(key) is done:
                del self._running[key]

    def get(self, key: tuple[object, ...]) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple[object, ...], entry: _Entry, verified: int) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
            self.verified_events += verified


def signing_public_key(path: Path) -> Ed25519PublicKey | None:
    """The public half of the audit signing key, or None when there is none yet."""
    if not path.exists():
        return None
    return signing.load_public_key(path)


def period_state(
    store: AuditStoreProtocol,
    open_store: Callable[[], AbstractContextManager[AuditStoreProtocol]],
    since: dt.datetime,
    until: dt.datetime,
    instance: str,
    public_key: Ed25519PublicKey | None,
    cache: StateCache,
    store_name: object,
) -> TrailState:
    """The verification state of [since, until) (``instance``: that one only); see the module doc.

    ``store`` answers the cheap questions (heads, marks); the verification itself runs in the
    cache's background thread on a store of its own (``open_store``), and the page waits for it
    at most ``cache.budget`` seconds: a long period seen for the first time says "running".
    """
    command = f"gateway audit verify --since {format_time(since)}"
    if public_key is None:
        return TrailState(False, command=command, problem="no audit signing key yet")
    heads = store.chain_heads(since, until, instance)
    if not heads:
        return TrailState(True, command=command)
    # The marks alone (reading after each head: no events), for where each chain starts.
    marks = store.chain_trail(since, instances=set(heads), after=heads)
    signed = [*marks.checkpoints, *marks.anchors]
    key = (store_name, tuple((name, start_seq(signed, name, since)) for name in heads))
    entry = cache.get(key)
    now = cache.clock()
    if entry is not None and all(name in entry.heads and entry.heads[name].seq == seq for name, seq in heads.items()):
        return entry.state
    trusted = None
    if entry is not None and entry.state.ok and now - entry.base_time < cache.max_age:
        trusted = {name: entry.heads[name] for name in heads if name in entry.heads}
    base_time = entry.base_time if trusted is not None and entry is not None else now

    def verify() -> TrailState:
        with open_store() as own:
            trail = own.chain_trail(
                since, instances=set(heads), after={name: head.seq for name, head in (trusted or {}).items()}
            )
        report = chain.verify_chain(
            trail.events, trail.checkpoints, trail.anchors, public_key, partial=True, trusted=trusted
        )
        verified_heads = {c.instance: chain.Head(c.instance, c.last_seq, c.last_hash) for c in report.chains}
        state = TrailState(
            report.ok,
            instances=tuple(sorted(heads)),
            unsigned=sum(c.last_seq - c.signed_up_to for c in report.chains),
            findings=len(report.findings),
            first=report.findings[0] if report.findings else None,
            command=command,
        )
        cache.put(key, _Entry(verified_heads, state, base_time), sum(len(v) for v in trail.events.values()))
        return state

    try:
        return cache.submit(key, verify).result(timeout=cache.budget)
    except FutureTimeout:
        return TrailState(False, command=command, pending=True)

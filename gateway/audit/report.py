"""The read-only ``/audit`` report page of the admin listener.

The chart geometry is a pure function of the summary's hourly counts
(:func:`refusal_chart`); the template draws it as inline SVG, so the page
needs no script and no external asset, and every untrusted string (user
agents, DNs, user IDs) reaches the HTML only through Jinja2 autoescaping.
:func:`audit_handler` is the only aiohttp part: it parses the same filters
as ``gateway audit list`` and runs the queries in an executor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.audit.events import (
    FIELDS,
    FILTER_KEYS,
    AuditEvent,
    AuditFilter,
    EventKind,
    format_time,
    parse_filter,
    utcnow,
)
from gateway.audit.rows import page_rows
from gateway.audit.store import AuditStore, AuditSummary
from gateway.audit.trailstate import StateCache, TrailState, period_state, signing_public_key
from gateway.errors import GatewayError, StoreError
from gateway.storage.backends import Backend
from gateway.storage.interfaces import AuditStoreProtocol
from gateway.verdict import Reason
from gateway.web.pages import render
from gateway.web.responses import SECURITY_HEADERS as RESPONSE_SECURITY_HEADERS

if TYPE_CHECKING:
    from gateway.config import Config

PALETTE = (
    "#b00020", "#00315e", "#e07b00", "#2e7d32", "#6a1b9a",
    "#00838f", "#8d6e63", "#c2185b", "#7cb342", "#5c6bc0",
)  # fmt: skip
MAX_HOURLY_BUCKETS = 168  # longer windows are drawn per day
DEFAULT_WINDOW = dt.timedelta(hours=24)
PAGE_LIMIT = 200

SECURITY_HEADERS = {
    **RESPONSE_SECURITY_HEADERS,
    "Cache-Control": "no-store",
}


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    color: str
    title: str


@dataclass(frozen=True, slots=True)
class Chart:
    """Everything the template needs to draw the stacked bar chart."""

    width: int
    height: int
    plot_top: int
    plot_bottom: int
    plot_left: int
    bars: list[Bar]
    legend: list[tuple[str, str, int]]  # reason, colour, count
    x_labels: list[tuple[float, str]]
    y_labels: list[tuple[float, str]]
    bucket: str  # "hour" or "day"
    peak: int


def refusal_chart(
    per_hour: Sequence[tuple[dt.datetime, str, int]],
    since: dt.datetime,
    until: dt.datetime,
    *,
    width: int = 720,
    height: int = 220,
) -> Chart:
    """Stacked bars of refusals per hour (per day beyond a week), one colour per reason."""
    step = dt.timedelta(hours=1)
    start = since.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
    if (until - start) / step > MAX_HOURLY_BUCKETS:
        step = dt.timedelta(days=1)
        start = start.replace(hour=0)
    count = max(1, -(-(until - start) // step))
    totals: dict[str, int] = {}
    cells: dict[tuple[int, str], int] = {}
    for when, reason, n in per_hour:
        index = (when - start) // step
        if 0 <= index < count:
            cells[index, reason] = cells.get((index, reason), 0) + n
            totals[reason] = totals.get(reason, 0) + n
    reasons = sorted(totals, key=lambda r: (-totals[r], r))
    colors = {r: PALETTE[i % len(PALETTE)] for i, r in enumerate(reasons)}
    per_bucket = [sum(cells.get((i, r), 0) for r in reasons) for i in range(count)]
    peak = max(per_bucket, default=0)
    left, top, bottom = 44, 10, height - 24
    slot = (width - left - 4) / count
    scale = (bottom - top) / peak if peak else 0.0
    label = "%m-%d %H:00" if step.days == 0 else "%m-%d"
    bars: list[Bar] = []
    for i in range(count):
        y = float(bottom)
        for r in reasons:
            n = cells.get((i, r), 0)
            if n:
                h = n * scale
                y -= h
                title = f"{(start + i * step).strftime(label)} {r}: {n}"
                bars.append(Bar(left + i * slot, y, max(slot * 0.85, 1.0), h, colors[r], title))
    every = max(1, count // 6)
    return Chart(
        width=width,
        height=height,
        plot_top=top,
        plot_bottom=bottom,
        plot_left=left,
        bars=bars,
        legend=[(r, colors[r], totals[r]) for r in reasons],
        x_labels=[
            (left + i * slot, (start + i * step).strftime(label))
            for i in range(0, count, every)
            if left + i * slot <= width - 64  # room for the text
        ],
        y_labels=[(bottom - v * scale, str(v)) for v in sorted({0, peak // 2, peak}) if peak or v == 0],
        bucket="hour" if step.days == 0 else "day",
        peak=peak,
    )


def render_report(
    events: Sequence[AuditEvent],
    summary: AuditSummary | None,
    filters: Mapping[str, str],
    *,
    error: str = "",
    error_ja: str = "",
    rows: list[dict[str, Any]] | None = None,
    paging: Mapping[str, Any] | None = None,
    workspace: Mapping[str, str] | None = None,
    trail_state: TrailState | None = None,
) -> str:
    """The whole audit page. ``filters`` are the form values as the user typed them.

    The admin listener's report and the gateway's workspace share it; the
    workspace adds ``paging`` (total count, previous/next links) and
    ``workspace`` (the form's action and the export links). ``trail_state``
    is the period's verification line (:mod:`gateway.audit.trailstate`).
    """
    chart = refusal_chart(summary.per_hour, summary.since, summary.until) if summary else None
    if rows is None:
        rows = page_rows(events)
    typed = {filters["reason"]} if filters.get("reason") else set()
    reasons = sorted({str(r) for r in Reason} | {"audit_pruned"} | typed)
    return render(
        "audit.html",
        title_ja="監査ログ",
        events=rows,
        reasons=reasons,
        error_ja=error_ja,
        paging=paging,
        workspace=workspace,
        trail_state=trail_state,
        detail=bool(filters.get("support_id")),
        fields=FIELDS,
        summary=summary,
        chart=chart,
        filters=filters,
        kinds=[k.value for k in EventKind],
        error=error,
        since_text=format_time(summary.since) if summary else "",
        until_text=format_time(summary.until) if summary else "",
    )


def load_report(
    source: Backend | Path, f: AuditFilter, now: dt.datetime, cache: StateCache | None = None
) -> tuple[list[AuditEvent], AuditSummary, TrailState | None]:
    """The blocking part of the page: one read-only store (the backend's, or a SQLite file), the queries.

    With a ``cache`` the period's verification state too (on a backend, whose config names the key).
    """
    since = f.since or now - DEFAULT_WINDOW
    until = f.until or now
    with source.audit(readonly=True) if isinstance(source, Backend) else AuditStore(source, readonly=True) as store:
        state = None
        if cache is not None and isinstance(source, Backend):
            backend = source
            state = verification(
                store, lambda: backend.audit(readonly=True), backend.config, since, until, f.instance, cache
            )
        return store.query(f), store.summary(since, until, match=f), state


def verification(
    store: AuditStoreProtocol,
    open_store: Callable[[], AbstractContextManager[AuditStoreProtocol]],
    config: Config,
    since: dt.datetime,
    until: dt.datetime,
    instance: str,
    cache: StateCache,
) -> TrailState:
    """The period's verification line; a key that cannot be read is said on the line, not as a page error."""
    try:
        key = signing_public_key(config.audit.signing_key)
    except GatewayError as exc:
        return TrailState(False, problem=str(exc))
    state = period_state(store, open_store, since, until, instance, key, cache, "audit")
    return dataclasses.replace(state, command=state.command.replace("verify", f"verify --config {config.path}", 1))


Handler = Callable[[web.Request], Awaitable[web.Response]]


def audit_handler(source: Backend | Path | str, cache: StateCache | None = None) -> Handler:
    """A GET handler for the admin listener's ``/audit`` page, on a backend's store (or a SQLite file).

    ``cache`` keeps verified heads, so paging and reloading do not verify again; it runs the
    verifications in a thread of its own, so its owner closes it when the listener stops.
    """
    path = source if isinstance(source, Backend) else Path(source)
    cache = cache if cache is not None else StateCache()

    async def handle(request: web.Request) -> web.Response:
        filters = {key: request.query.get(key, "") for key in FILTER_KEYS}
        if not any(filters.values()):
            filters["since"] = "24h"
        now = utcnow()
        try:
            f = parse_filter(filters, now, default_limit=PAGE_LIMIT)
            loop = asyncio.get_running_loop()
            events, summary, state = await loop.run_in_executor(None, load_report, path, f, now, cache)
        except StoreError as exc:
            return _page(render_report([], None, filters, error=str(exc)), 503)
        except GatewayError as exc:
            return _page(render_report([], None, filters, error=str(exc)), 400)
        return _page(render_report(events, summary, filters, trail_state=state), 200)

    return handle


def _page(html: str, status: int) -> web.Response:
    return web.Response(
        text=html,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers=SECURITY_HEADERS,
    )

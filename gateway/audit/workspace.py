"""The security team's audit workspace, on the gateway behind mTLS + password login.

Served under the gateway's reserved prefix (``<prefix>audit``, by default
``/_gateway/audit``) to logged-in users holding the ``auditor`` role
(:func:`gateway.access.users.decide_audit_access`); the plain-HTTP admin listener
serves ``/audit`` only when ``admin.audit_report`` is on. The role is read
from the users database on every request, so ``gateway users set-roles``
takes effect at once.

Every filter is a URL parameter (a search can be shared as a link), the
page shows a total count and pages through it, and the same filter exports
as CSV or JSON: streamed from a SQLite cursor in batches, so a million rows
never sit in memory. Looking is itself audited: ``audit_viewed`` and
``audit_exported`` events name the user, the filter and how many rows.

Times on the page are JST (UTC+09:00, said in the column header); exports
carry UTC (column ``time_utc``).
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import functools
import io
import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urlencode

from aiohttp import web

from gateway.access.accounts import see_other
from gateway.access.users import decide_audit_access
from gateway.app import RUNTIME
from gateway.audit.events import (
    FIELDS,
    FILTER_KEYS,
    AuditEvent,
    AuditFilter,
    EventKind,
    parse_filter,
    utcnow,
)
from gateway.audit.rows import cert_cn, page_rows
from gateway.audit.store import AuditStore, AuditSummary
from gateway.audit.trailstate import StateCache, TrailState
from gateway.errors import GatewayError, StoreError
from gateway.keys import PEER
from gateway.storage.backends import Backend
from gateway.storage.pg_audit import ExportCursor, PgAuditStore
from gateway.verdict import Reason
from gateway.web.responses import NO_STORE

if TYPE_CHECKING:
    from gateway.access.sessions import SessionRecord
    from gateway.config import Config, GatewayPaths
    from gateway.storage.interfaces import UserStoreProtocol


class LoginAccess(Protocol):
    """What the workspace uses of the login layer (a protocol: the login layer imports this module)."""

    users: UserStoreProtocol
    config: Config
    paths: GatewayPaths

    async def _run(self, func: Any, *args: Any) -> Any: ...

    def _live_session(self, request: web.Request) -> SessionRecord | None: ...

    def _record(self, request: web.Request, kind: EventKind, reason: Reason | str = "", **fields: Any) -> None: ...


# gateway.audit.report (the chart, Jinja2's page) is imported on the first audit request, not with
# the login layer: a worker that only proxies never loads it (tests/test_cli.py checks the serve path).

PER_PAGE = 100
MAX_PER_PAGE = 1000
EXPORT_BATCH = 5000
EXPORT_COLUMNS = ("time_utc", "cert_cn", *(name for name in FIELDS if name != "time"))
BAD_FILTER_JA = "検索条件を読み取れません。日時は 24h、7d、2026-11-01、2026-11-01T09:00:00Z の形で指定してください。"
_FORMULA_START = frozenset("=+-@\t\r＝＋－＠")  # full-width forms too: Japanese Excel reads them as formulas


def shown_filters(query: Mapping[str, str]) -> dict[str, str]:
    """The filter parameters of a request as typed (the form refills from them; links keep them)."""
    return {key: query.get(key, "").strip() for key in FILTER_KEYS if query.get(key, "").strip()}


def filter_text(filters: Mapping[str, str]) -> str:
    """The filter as one canonical query string (for links and the audit event's detail)."""
    return urlencode(sorted((k, v) for k, v in filters.items() if v and k != "page"))


def parse_page(text: str) -> int:
    """The 1-based page number; a bad value is an error the user can read."""
    if not text:
        return 1
    if not text.isdigit() or int(text) < 1 or int(text) > 1_000_000:
        raise GatewayError(f"page must be a whole number from 1, not {text!r}")
    return int(text)


def workspace_filter(filters: Mapping[str, str], now: dt.datetime) -> AuditFilter:
    """The store filter; with no filter at all the last 24 hours. Page size at most MAX_PER_PAGE."""
    wanted = dict(filters) if filters else {"since": "24h"}
    f = parse_filter(wanted, now, default_limit=PER_PAGE)
    if f.limit > MAX_PER_PAGE:
        raise GatewayError(f"limit (rows per page) may be at most {MAX_PER_PAGE}, not {f.limit}")
    return f


_TIME = FIELDS.index("time")
_SUBJECT = FIELDS.index("cert_subject")
_REST = tuple(i for i, name in enumerate(FIELDS) if name != "time")


def export_values(row: Sequence[Any]) -> list[Any]:
    """One stored row (in FIELDS order) as exported, in EXPORT_COLUMNS order: UTC time, certificate name, the rest."""
    subject = row[_SUBJECT]
    return [row[_TIME], cert_cn(subject) if subject else "", *(row[i] for i in _REST)]


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet will not run as a formula (user agents and paths are untrusted)."""
    if value is None:
        return ""
    risky = value.__class__ is str and value and value[0] in _FORMULA_START
    return "'" + value if risky and not (value[0] == "-" and value[1:].isascii() and value[1:].isdigit()) else value


# -- Export lines built by the database: the cells of csv_cell and json_chunk, at C speed --------------

_INTEGER_FIELDS = ("client_port", "worker")
_QUOTE, _TWO_QUOTES = "'\"'", "'\"\"'"
# PostgreSQL has no cert_cn(): the same expression as gateway.audit.rows.cert_cn (a test compares them),
# computed once per row in a LATERAL subquery (OFFSET 0 keeps the planner from copying it into each use).
_PG_CN = (
    r"(CASE WHEN cert_subject = '' THEN '' WHEN cert_subject ~* '(^|,)\s*CN=' THEN regexp_replace(substring("
    r"cert_subject FROM '(?i)(?:^|,)\s*CN=((?:[^,\\]|\\.)*)'), '\\(.)', '\1', 'g')"
    " WHEN strpos(cert_subject, '=') > 0 THEN '' ELSE cert_subject END)"
)
PG_EXPORT_SOURCE = f"events CROSS JOIN LATERAL (SELECT {_PG_CN} AS cn OFFSET 0) AS derived"


@dataclass(frozen=True, slots=True)
class _Dialect:
    char: str  # the function making a character from its code
    is_negative_number: str  # a format string over the value: "-" then ASCII digits only
    needs_quotes: str  # a format string over the value: holds a quote, comma, CR or LF
    cert_cn: str
    neutral_cert_cn: str  # the certificate name's cell, when not the generic one over cert_cn
    json_object: str


_SQLITE = _Dialect(
    char="char",
    is_negative_number="({0} GLOB '-[0-9]*' AND substr({0}, 2) NOT GLOB '*[^0-9]*')",
    needs_quotes="({0} GLOB '*[\",\n\r]*')",
    cert_cn="cert_cn(cert_subject)",
    neutral_cert_cn="neutral_cert_cn(cert_subject)",  # one Python call a row (cached), not one per use
    json_object="json_object",
)
_POSTGRES = _Dialect(
    char="chr",
    is_negative_number="({0} ~ '^-[0-9]+$')",
    needs_quotes="({0} ~ '[\",\n\r]')",
    cert_cn="derived.cn",
    neutral_cert_cn="",  # the generic cell over derived.cn (computed once a row)
    json_object="json_build_object",
)


def _sql_source(name: str, d: _Dialect) -> str:
    """The SQL value of an export column (before CSV or JSON encoding), as :func:`export_values` gives it."""
    if name == "time_utc":
        return "time"
    if name == "cert_cn":
        return d.cert_cn
    return name


def _sql_neutral_cell(name: str, d: _Dialect) -> str:
    """:func:`csv_cell` in SQL: the value, an apostrophe before a formula's first character."""
    if name == "cert_cn" and d.neutral_cert_cn:
        return d.neutral_cert_cn
    value = _sql_source(name, d)
    if name in _INTEGER_FIELDS:
        return f"coalesce(CAST({value} AS TEXT), '')"  # digits: never risky
    risky = ", ".join(f"'{c}'" for c in "=+-@＝＋－＠") + f", {d.char}(9), {d.char}(13)"
    return (
        f"(CASE WHEN substr({value}, 1, 1) IN ({risky}) AND NOT {d.is_negative_number.format(value)}"
        f" THEN {d.char}(39) || {value} ELSE {value} END)"
    )


def _sql_csv_cell(name: str, d: _Dialect) -> str:
    """:func:`csv_cell` and the csv module's minimal quoting, in SQL."""
    neutral = _sql_neutral_cell(name, d)
    if name in _INTEGER_FIELDS:
        return neutral  # digits: never quoted
    # The apostrophe a neutral cell adds needs no quotes: whether to quote is decided on the value itself.
    quoted = f"{_QUOTE} || replace({neutral}, {_QUOTE}, {_TWO_QUOTES}) || {_QUOTE}"
    return f"(CASE WHEN {d.needs_quotes.format(_sql_source(name, d))} THEN {quoted} ELSE {neutral} END)"


def csv_line_sql(d: _Dialect) -> str:
    return " || ',' || ".join(_sql_csv_cell(name, d) for name in EXPORT_COLUMNS)


def json_line_sql(d: _Dialect) -> str:
    pairs = ", ".join(f"'{name}', {_sql_source(name, d)}" for name in EXPORT_COLUMNS)
    return f"{d.json_object}({pairs})" + ("::text" if d is _POSTGRES else "")


# SQLite: the neutral cells, quoted by the csv module (C; cheaper there than SQLite's per-cell checks).
# PostgreSQL: the whole line, on the server (its CPU, not the gateway's).
CSV_CELLS_SQL, JSON_LINE_SQL = ", ".join(_sql_neutral_cell(n, _SQLITE) for n in EXPORT_COLUMNS), json_line_sql(_SQLITE)
PG_CSV_LINE_SQL, PG_JSON_LINE_SQL = csv_line_sql(_POSTGRES), json_line_sql(_POSTGRES)


@functools.lru_cache(maxsize=4096)
def neutral_cert_cn(subject: str) -> str:
    """The certificate-name cell before quoting (SQLite's export calls it once a row)."""
    return csv_cell(cert_cn(subject)) if subject else ""


def csv_rows_chunk(rows: Sequence[Sequence[Any]], *, header: bool) -> str:
    """CSV_CELLS_SQL's rows as CSV text, by the csv module (as :func:`csv_chunk` writes them)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    if header:
        writer.writerow(EXPORT_COLUMNS)
    writer.writerows(rows)
    return buffer.getvalue()


def csv_lines_chunk(rows: Sequence[Sequence[Any]], *, header: bool) -> str:
    """CSV_LINE_SQL's rows as CSV text (CRLF, like :func:`csv_chunk`)."""
    lines = [row[0] for row in rows]
    if header:
        lines.insert(0, ",".join(EXPORT_COLUMNS))
    return "\r\n".join(lines) + "\r\n" if lines else ""


def json_lines_chunk(rows: Sequence[Sequence[Any]], *, first: bool) -> str:
    """JSON_LINE_SQL's rows as the inside of the export's array (like :func:`json_chunk`)."""
    return ("" if first else ",\n") + ",\n".join([row[0] for row in rows])


def csv_chunk(rows: Sequence[Sequence[Any]], *, header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    if header:
        writer.writerow(EXPORT_COLUMNS)
    writer.writerows([csv_cell(v) for v in export_values(row)] for row in rows)
    return buffer.getvalue()


def json_chunk(rows: Sequence[Sequence[Any]], *, first: bool) -> str:
    parts = [json.dumps(dict(zip(EXPORT_COLUMNS, export_values(row), strict=True)), ensure_ascii=False) for row in rows]
    return ("" if first else ",\n") + ",\n".join(parts)


class AuditWorkspace:
    """The workspace's three GET routes, checked by the login layer's session and the user's role."""

    def __init__(self, access: LoginAccess) -> None:
        self.access = access
        self.store_path = Path(access.config.audit.database)
        self.path = access.paths.prefix + "audit"
        self._backend: Backend | None = None
        self._own_backend = False
        self._states = StateCache()  # the period's verification, kept while paging

    @property
    def backend(self) -> Backend:
        """Where the trail is (the shared database or the SQLite file); its pool opens on first use."""
        if self._backend is None:
            storage = getattr(self.access, "storage", None)  # the worker's own pool, when it has one
            self._backend = storage if isinstance(storage, Backend) else Backend(self.access.config, role="auditor")
            self._own_backend = self._backend is not storage
        return self._backend

    async def _close(self, _app: web.Application) -> None:
        self._states.close()
        if self._backend is not None:
            backend, self._backend = self._backend, None
            if self._own_backend:
                backend.close()

    def setup(self, app: web.Application) -> None:
        app.on_cleanup.append(self._close)
        app.router.add_get(self.path, self.page)
        app.router.add_get(self.path + "/export.csv", self.export_csv)
        app.router.add_get(self.path + "/export.json", self.export_json)

    async def _auditor(self, request: web.Request) -> str | web.StreamResponse:
        """The auditor's user ID, or the answer for anyone else (login page, password page, 403)."""
        access = self.access
        session = access._live_session(request)
        if session is None:
            return see_other(access.paths.login + "?next=" + quote(request.path_qs, safe="/"), headers=NO_STORE)
        if session.must_change_password:
            return see_other(access.paths.password, headers=NO_STORE)
        user = await access._run(access.users.get_user, session.user_id)
        verdict = decide_audit_access(user)
        if not verdict.allowed:
            return request.app[RUNTIME].refuse(request, verdict, peer=request[PEER], user_id=session.user_id)
        return session.user_id

    async def page(self, request: web.Request) -> web.StreamResponse:
        from gateway.audit.report import render_report

        who = await self._auditor(request)
        if not isinstance(who, str):
            return who
        filters = shown_filters(request.query)
        now = utcnow()
        try:
            page = parse_page(request.query.get("page", "").strip())
            f = workspace_filter(filters, now)
            loop = asyncio.get_running_loop()
            events, total, summary, state = await loop.run_in_executor(
                None, _load, self.backend, f, page, now, self._states
            )
        except StoreError as exc:
            return self._html(render_report([], None, filters, error=str(exc), workspace=self._links(filters)), 503)
        except GatewayError as exc:
            error_ja = BAD_FILTER_JA
            html = render_report([], None, filters, error=str(exc), error_ja=error_ja, workspace=self._links(filters))
            return self._html(html, 400)
        first = (page - 1) * f.limit
        paging = {
            "total": total,
            "page": page,
            "first": first + 1 if events else 0,
            "last": first + len(events),
            "prev": self._url(filters, page - 1) if page > 1 else "",
            "next": self._url(filters, page + 1) if first + len(events) < total else "",
        }
        detail = f"filter: {filter_text(filters) or 'since=24h'}; page={page} rows={len(events)} total={total}"
        self.access._record(request, EventKind.AUDIT_VIEWED, Reason.OK, user_id=who, detail=detail)
        html = render_report(
            events,
            summary,
            filters,
            rows=page_rows(events),
            paging=paging,
            workspace=self._links(filters),
            trail_state=state,
        )
        return self._html(html, 200)

    async def export_csv(self, request: web.Request) -> web.StreamResponse:
        return await self._export(request, "csv")

    async def export_json(self, request: web.Request) -> web.StreamResponse:
        return await self._export(request, "json")

    async def _export(self, request: web.Request, fmt: str) -> web.StreamResponse:
        """Stream every row of the filter (page and limit ignored) in batches from a cursor."""
        who = await self._auditor(request)
        if not isinstance(who, str):
            return who
        filters = shown_filters(request.query)
        loop = asyncio.get_running_loop()
        try:
            f = workspace_filter(filters, utcnow())
            store = await loop.run_in_executor(None, lambda: _reader(self.backend))
        except StoreError as exc:
            return web.json_response({"error": "store_unavailable", "message": str(exc)}, status=503, headers=NO_STORE)
        except GatewayError as exc:
            message = f"検索条件を読み取れません / Bad filter: {exc}"
            return web.json_response({"error": "bad_request", "message": message}, status=400, headers=NO_STORE)
        stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
        media = "text/csv; charset=utf-8" if fmt == "csv" else "application/json; charset=utf-8"
        response = web.StreamResponse(
            headers={
                **NO_STORE,
                "Content-Type": media,
                "Content-Disposition": f'attachment; filename="audit-{stamp}.{fmt}"',
            }
        )
        rows = 0
        complete = False
        try:
            await response.prepare(request)
            cursor, encode = await loop.run_in_executor(None, export_cursor, store, f, fmt)
            await response.write(("\ufeff" if fmt == "csv" else "[\n").encode())
            if fmt == "csv":
                await response.write(csv_chunk([], header=True).encode())
            while batch := await loop.run_in_executor(None, cursor.fetchmany, EXPORT_BATCH):
                await response.write(encode(batch, rows == 0).encode())
                rows += len(batch)
            if fmt == "json":
                await response.write(b"\n]\n")
            complete = True
        finally:  # recorded before the end of the body, so an export is never seen unaudited
            await loop.run_in_executor(None, store.close)
            detail = f"format={fmt} filter: {filter_text(filters) or 'since=24h'}; rows={rows} complete={complete}"
            self.access._record(request, EventKind.AUDIT_EXPORTED, Reason.OK, user_id=who, detail=detail)
        await response.write_eof()
        return response

    def _url(self, filters: Mapping[str, str], page: int) -> str:
        query = filter_text(filters)
        extra = f"page={page}" if page > 1 else ""
        joined = "&".join(part for part in (query, extra) if part)
        return self.path + ("?" + joined if joined else "")

    def _links(self, filters: Mapping[str, str]) -> dict[str, str]:
        query = filter_text(filters)
        suffix = "?" + query if query else ""
        return {
            "action": self.path,
            "csv": self.path + "/export.csv" + suffix,
            "json": self.path + "/export.json" + suffix,
        }

    @staticmethod
    def _html(text: str, status: int) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/html", charset="utf-8", headers=NO_STORE)


Encoder = Callable[[Sequence[Sequence[Any]], bool], str]


def export_cursor(
    store: AuditStore | PgAuditStore, f: AuditFilter, fmt: str
) -> tuple[sqlite3.Cursor | ExportCursor, Encoder]:
    """The export's cursor and how a batch (and whether it is the first) becomes text: the database builds the lines."""
    cursor: sqlite3.Cursor | ExportCursor
    if isinstance(store, AuditStore):
        cursor = store.cursor(f, CSV_CELLS_SQL if fmt == "csv" else JSON_LINE_SQL, {"neutral_cert_cn": neutral_cert_cn})
        if fmt == "csv":
            return cursor, lambda batch, first: csv_rows_chunk(batch, header=False)
    else:
        cursor = store.cursor(f, PG_CSV_LINE_SQL if fmt == "csv" else PG_JSON_LINE_SQL, PG_EXPORT_SOURCE)
    if fmt == "csv":
        return cursor, lambda batch, first: csv_lines_chunk(batch, header=False)
    return cursor, lambda batch, first: json_lines_chunk(batch, first=first)


def _reader(source: Backend | Path) -> AuditStore | PgAuditStore:
    """A read-only store that can page and stream (both backends' stores can); a Path is a SQLite file."""
    store = source.audit(readonly=True) if isinstance(source, Backend) else AuditStore(source, readonly=True)
    assert isinstance(store, AuditStore | PgAuditStore)
    return store


def _load(
    source: Backend | Path, f: AuditFilter, page: int, now: dt.datetime, states: StateCache | None = None
) -> tuple[list[AuditEvent], int, AuditSummary, TrailState | None]:
    """The blocking part of a page: one read-only store; the page, its total, the chart's counts, the verification."""
    from gateway.audit.report import DEFAULT_WINDOW, verification

    with _reader(source) as store:
        events, total = store.page(f, (page - 1) * f.limit)
        since = f.since or now - DEFAULT_WINDOW
        summary = store.summary(since, f.until or now, match=f)
        state = None
        if states is not None and isinstance(source, Backend):  # a bare SQLite file (the bench) has no key
            backend = source
            state = verification(
                store, lambda: _reader(backend), backend.config, since, f.until or now, f.instance, states
            )
    return events, total, summary, state

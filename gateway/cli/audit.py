"""Sub-commands ``gateway audit list|summary|show|prune|verify|export|pubkey``: how the security team reads the trail.

``list`` prints newest first, as a table for people or JSON lines / CSV
for tools; ``summary`` counts refusals; ``show`` finds the event behind a
support ID a user read out from a refusal page; ``prune`` applies the
retention period. The formatting functions are pure and take plain
events, so they are tested without a terminal. Every string from the
outside world (user agents, DNs, user IDs) is escaped by
:func:`printable` in the table and detail views, so a hostile value cannot
move the cursor or recolour the terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import getpass
import io
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.audit import chain, signing
from gateway.audit.events import (
    FIELDS,
    AuditEvent,
    AuditFilter,
    event_to_dict,
    format_time,
    normalize_serial,
    parse_filter,
    parse_when,
    utcnow,
)
from gateway.audit.store import AuditSummary
from gateway.cli.common import JST, add_config_argument, config_path, format_person_time
from gateway.config import load_config
from gateway.errors import GatewayError
from gateway.storage.backends import Backend
from gateway.storage.interfaces import AuditStoreProtocol
from gateway.web.messages import plural

MIN_RETENTION = dt.timedelta(days=1)
_SPARK = "▁▂▃▄▅▆▇█"
_TABLE_COLUMNS = (
    ("TIME (JST)", "time", 25),
    ("EVENT", "event", 18),
    ("REASON", "reason", 28),
    ("SUPPORT ID", "support_id", 12),
    ("CLIENT", "client", 40),
    ("USER", "user_id", 16),
    ("SERIAL", "cert_serial", 40),
    ("REQUEST", "request", 60),
    ("INSTANCE", "instance", 24),
)


# -- formatting (pure) --------------------------------------------------------


def printable(text: str) -> str:
    r"""``text`` with control and other invisible characters as ``\x1b``-style escapes.

    Backslashes are doubled so an escape in the output is never ambiguous.
    """
    return "".join("\\\\" if ch == "\\" else ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def client_address(ip: str, port: int | None) -> str:
    if port is None:
        return ip
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _cell(event: AuditEvent, key: str) -> str:
    if key == "client":
        return client_address(event.client_ip, event.client_port)
    if key == "request":
        return f"{event.method} {event.path}".strip()
    if key == "time":
        return format_person_time(event.time)
    if key == "cert_serial":
        return normalize_serial(event.cert_serial) if event.cert_serial else ""
    return str(getattr(event, key))


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(events: Sequence[AuditEvent]) -> str:
    """A fixed-width table for people; long cells are cut, all cells escaped."""
    rows = [[_clip(printable(_cell(e, key)), cap) for _, key, cap in _TABLE_COLUMNS] for e in events]
    headers = [title for title, _, _ in _TABLE_COLUMNS]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines) + "\n"


def format_jsonl(events: Sequence[AuditEvent]) -> str:
    """One JSON object per line, UTF-8 as is (json escapes control characters)."""
    return "".join(json.dumps(event_to_dict(e), ensure_ascii=False) + "\n" for e in events)


def _csv_safe(value: Any) -> Any:
    # A cell starting with = + - @ is a formula in spreadsheet programs
    # (CSV injection); user agents and DNs are attacker-chosen, so such cells
    # get a leading apostrophe, as OWASP advises.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


def format_csv(events: Sequence[AuditEvent]) -> str:
    """CSV with a header row of field names (the JSON keys)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FIELDS)
    for e in events:
        data = event_to_dict(e)
        writer.writerow([_csv_safe(data[name]) for name in FIELDS])
    return out.getvalue()


def format_event(event: AuditEvent) -> str:
    """Every field of one event, one per line, escaped; the time in JST for people."""
    data = event_to_dict(event)
    data["time"] = format_person_time(event.time)
    width = max(len(name) for name in FIELDS)
    lines = [f"{name.ljust(width)}  {printable('' if data[name] is None else str(data[name]))}" for name in FIELDS]
    return "\n".join(lines) + "\n"


def hourly_chart(summary: AuditSummary) -> list[str]:
    """Refusals per hour: one line per JST day, one character per hour, scaled to the peak."""
    counts: dict[dt.datetime, int] = {}
    for hour, _, n in summary.per_hour:
        counts[hour] = counts.get(hour, 0) + n
    peak = max(counts.values(), default=0)
    if not peak:
        return ["  (no refusals)"]
    day = summary.since.astimezone(JST).replace(hour=0, minute=0, second=0, microsecond=0)
    lines = [f"  {'':10}  00    06    12    18      (one column per hour, █ = {peak})"]
    while day < summary.until:
        hours = [day + dt.timedelta(hours=h) for h in range(24)]
        cells = [counts.get(h, 0) for h in hours]
        spark = "".join(
            " "  # outside the window
            if h + dt.timedelta(hours=1) <= summary.since or h >= summary.until
            else "."
            if n == 0
            else _SPARK[min(len(_SPARK) - 1, (n * len(_SPARK) - 1) // peak)]
            for h, n in zip(hours, cells, strict=True)
        )
        lines.append(f"  {day:%Y-%m-%d}  {spark}  {sum(cells)}")
        day += dt.timedelta(days=1)
    return lines


def format_summary(summary: AuditSummary) -> str:
    """The text ``gateway audit summary`` prints."""
    lines = [
        f"Audit summary {format_person_time(summary.since)} .. {format_person_time(summary.until)}",
        f"Events: {summary.total}   refusals: {summary.refusals}",
    ]
    sections = (
        ("Refusals by reason", summary.by_reason),
        ("Events by kind", summary.by_event),
        ("Top refused user IDs", summary.top_users),
        ("Top refused client IPs", summary.top_ips),
        ("Top refused certificate serials", summary.top_serials),
    )
    for title, rows in sections:
        lines += ["", title]
        width = max((len(printable(v)) for v, _ in rows), default=0)
        lines += [f"  {printable(v).ljust(width)}  {n:>7}" for v, n in rows] or ["  -"]
    lines += ["", "Refusals per hour (JST)", *hourly_chart(summary)]
    return "\n".join(lines) + "\n"


def summary_to_dict(summary: AuditSummary) -> dict[str, Any]:
    return {
        "since": format_time(summary.since),
        "until": format_time(summary.until),
        "total": summary.total,
        "refusals": summary.refusals,
        "by_event": dict(summary.by_event),
        "by_reason": dict(summary.by_reason),
        "top_users": dict(summary.top_users),
        "top_ips": dict(summary.top_ips),
        "top_serials": dict(summary.top_serials),
        "per_hour": [[format_time(h), r, n] for h, r, n in summary.per_hour],
    }


# -- commands -----------------------------------------------------------------


@contextlib.contextmanager
def _store(args: argparse.Namespace, *, readonly: bool = True) -> Iterator[AuditStoreProtocol]:
    """The trail the config names: the shared database, or the SQLite file."""
    config = load_config(config_path(args.config))
    with Backend(config, role="cli") as backend, backend.audit(readonly=readonly) as store:
        yield store


def cmd_list(args: argparse.Namespace) -> int:
    params = {
        "since": args.since,
        "until": args.until,
        "event": args.event,
        "reason": args.reason,
        "user": args.user,
        "ip": args.ip,
        "serial": args.serial,
        "instance": args.instance,
        "limit": str(args.limit),
    }
    f = parse_filter(params, utcnow())
    with _store(args) as store:
        events = store.query(f)
    formats = {"table": format_table, "json": format_jsonl, "csv": format_csv}
    sys.stdout.write(formats[args.format](events))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    now = utcnow()
    since = parse_when(args.since, now)
    until = parse_when(args.until, now) if args.until else now
    if since >= until:
        raise GatewayError(f"--since ({format_person_time(since)}) must be before --until")
    match = AuditFilter(instance=args.instance.strip()) if args.instance else None
    with _store(args) as store:
        summary = store.summary(since, until, top=args.top, match=match)
    if args.format == "json":
        sys.stdout.write(json.dumps(summary_to_dict(summary), ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(format_summary(summary))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    f = parse_filter({"support_id": args.support_id, "instance": args.instance, "limit": "100"}, utcnow())
    with _store(args) as store:
        events = store.query(f)
    if not events:
        raise GatewayError(f"no audit event has support ID {printable(f.support_id)}")
    if args.format == "json":
        sys.stdout.write(format_jsonl(events))
    else:
        sys.stdout.write("\n".join(format_event(e) for e in events))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    now = utcnow()
    cutoff = parse_when(args.older_than, now)
    if cutoff > now - MIN_RETENTION:
        raise GatewayError(f"--older-than {args.older_than}: refusing to delete events younger than a day")
    config = load_config(config_path(args.config))
    if config.database is None and not config.audit.database.is_file():
        raise GatewayError(f"no audit database at {config.audit.database}")
    key = signing.load_signing_key(config.audit.signing_key)  # the prune anchors are signed
    with _store(args, readonly=False) as store:
        deleted = store.prune(cutoff, actor=f"cli:{getpass.getuser()}", key=key)
    print(f"deleted {plural(deleted, 'audit event')} recorded before {format_person_time(cutoff)}")
    return 0


def _public_key(args: argparse.Namespace) -> Ed25519PublicKey:
    """--pubkey, else the public half of the config's signing key."""
    if args.pubkey:
        return signing.load_public_key(Path(args.pubkey))
    if args.file:
        raise GatewayError("--file needs --pubkey (the audit public key, from gateway audit pubkey)")
    config = load_config(config_path(args.config))
    if not config.audit.signing_key.exists():
        raise GatewayError(f"no audit signing key at {config.audit.signing_key}; give --pubkey FILE")
    return signing.load_public_key(config.audit.signing_key)


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify the chains and signatures of the trail (the database, or an export with --file)."""
    public_key = _public_key(args)
    if args.file:
        if args.since:
            raise GatewayError("--since applies to the database; export with --since instead")
        try:
            with open(args.file, encoding="utf-8") as handle:
                trail = chain.read_lines(handle, args.file)
        except OSError as exc:
            raise GatewayError(f"{args.file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise GatewayError(f"{args.file}: not UTF-8 text") from None
        partial = args.partial
    else:
        since = parse_when(args.since, utcnow()) if args.since else None
        with _store(args) as store:
            trail = store.chain_trail(since)
        partial = since is not None
    report = chain.verify_chain(trail.events, trail.checkpoints, trail.anchors, public_key, partial=partial)
    if args.format == "json":
        sys.stdout.write(json.dumps(report.to_dict(), ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(printable_lines(chain.render_report(report)) + "\n")
    return 0 if report.ok else 1


def printable_lines(text: str) -> str:
    return "\n".join(printable(line) for line in text.split("\n"))


def cmd_export(args: argparse.Namespace) -> int:
    """The trail with its chain fields and marks as JSON lines (what verify --file reads)."""
    since = parse_when(args.since, utcnow()) if args.since else None
    with _store(args) as store:
        trail = store.chain_trail(since)
    events = (record for instance in sorted(trail.events) for record in trail.events[instance])
    lines = chain.trail_lines(events, [*trail.anchors, *trail.checkpoints])
    if args.out:
        try:
            with open(args.out, "w", encoding="utf-8") as handle:
                for line in lines:
                    handle.write(line + "\n")
        except OSError as exc:
            raise GatewayError(f"{args.out}: {exc.strerror}") from None
    else:
        for line in lines:
            sys.stdout.write(line + "\n")
    return 0


def cmd_pubkey(args: argparse.Namespace) -> int:
    """The audit public key (PEM) for the security team."""
    config = load_config(config_path(args.config))
    if not config.audit.signing_key.exists():
        raise GatewayError(f"no audit signing key at {config.audit.signing_key} (the gateway creates it at start)")
    key = signing.load_signing_key(config.audit.signing_key)
    if args.out:
        signing.export_public_key(key, Path(args.out))
        print(f"wrote the audit public key (key id {chain.key_id(key.public_key())}) to {args.out}")
    else:
        sys.stdout.write(signing.public_key_pem(key).decode())
    return 0


# -- argparse -----------------------------------------------------------------

_WHEN = (
    "a duration before now (30m, 24h, 7d, 2w) or a date/time, UTC unless an offset is given "
    "(2026-11-01, 2026-11-01T10:00, 2026-11-01T19:00+09:00)"
)


def _add_config(p: argparse.ArgumentParser) -> None:
    add_config_argument(p)


def _positive(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the `audit` sub-commands to the CLI."""
    audit = sub.add_parser(
        "audit",
        help="read, summarise and prune the audit trail",
        description="Read the audit trail (refusals, logins, admin actions). Tables and text show JST with the "
        "offset (2026-11-30 21:00:00+09:00); JSON and CSV keep UTC.",
    )
    actions = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    p = actions.add_parser("list", help="events, newest first", description="List audit events, newest first.")
    _add_config(p)
    p.add_argument("--since", metavar="WHEN", help=f"from this time: {_WHEN}")
    p.add_argument("--until", metavar="WHEN", help="up to this time (same forms as --since)")
    p.add_argument("--reason", metavar="CODE", help="only this reason code, e.g. certificate_revoked")
    p.add_argument("--user", metavar="ID", help="only this attempted user ID")
    p.add_argument("--ip", metavar="ADDR", help="only this client IP address")
    p.add_argument("--serial", metavar="HEX", help="only this certificate serial (any hex spelling)")
    p.add_argument("--event", metavar="KIND", help="only this event kind, e.g. request_refused")
    p.add_argument("--instance", metavar="NAME", help="only events this gateway instance recorded")
    p.add_argument(
        "--format",
        choices=("table", "json", "csv"),
        default="table",
        help="table for people; json (one object per line) or csv for tools",
    )
    p.add_argument("--limit", type=_positive, default=100, metavar="N", help="at most N events (default 100)")
    p.set_defaults(func=cmd_list)

    p = actions.add_parser(
        "summary",
        help="counts by reason, user, IP, serial and hour",
        description="Summarise refusals in a time window.",
    )
    _add_config(p)
    p.add_argument("--since", metavar="WHEN", default="7d", help=f"from this time (default 7d): {_WHEN}")
    p.add_argument("--until", metavar="WHEN", help="up to this time (default now)")
    p.add_argument("--top", type=_positive, default=10, metavar="N", help="rows per top list (default 10)")
    p.add_argument("--instance", metavar="NAME", help="only events this gateway instance recorded")
    p.add_argument("--format", choices=("text", "json"), default="text", help="text or one JSON object")
    p.set_defaults(func=cmd_summary)

    p = actions.add_parser(
        "show",
        help="everything about the event with a support ID",
        description="Show the event behind a support ID from a refusal page.",
    )
    _add_config(p)
    p.add_argument("support_id", metavar="SUPPORT_ID", help="the ID the user read from the page")
    p.add_argument("--instance", metavar="NAME", help="only the event this gateway instance recorded")
    p.add_argument("--format", choices=("text", "json"), default="text", help="text or JSON lines")
    p.set_defaults(func=cmd_show)

    p = actions.add_parser(
        "prune",
        help="delete events past the retention period",
        description="Delete events older than a given age (retention). "
        "The prune itself is recorded as an admin_action event.",
    )
    _add_config(p)
    p.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 400d; at least 1d")
    p.set_defaults(func=cmd_prune)
    _register_integrity(actions)


def _register_integrity(actions: argparse._SubParsersAction[Any]) -> None:
    """``verify``, ``export`` and ``pubkey``: the tamper-evidence commands (docs/audit-integrity.md)."""
    p = actions.add_parser(
        "verify",
        help="check the hash chains and signed checkpoints",
        description="Verify the tamper-evident audit trail: every instance's hash chain and the signed "
        "checkpoints and prune anchors (docs/audit-integrity.md). Exit status 0 only when nothing is found.",
    )
    _add_config(p)
    p.add_argument("--file", metavar="EXPORT", help="verify an export (gateway audit export) instead, offline")
    p.add_argument("--pubkey", metavar="FILE", help="the audit public key (default: the config's signing key)")
    p.add_argument("--since", metavar="WHEN", help=f"only from the last signed point before this time: {_WHEN}")
    p.add_argument(
        "--partial", action="store_true", help="with --file: the export was made with --since (may start later)"
    )
    p.add_argument("--format", choices=("text", "json"), default="text", help="text or one JSON object")
    p.set_defaults(func=cmd_verify)

    p = actions.add_parser(
        "export",
        help="the trail with chain fields and marks, as JSON lines",
        description="Export the trail for offline verification (gateway audit verify --file): signed marks, "
        "then every instance's events in storage order with seq, prev_hash and hash.",
    )
    _add_config(p)
    p.add_argument("--format", choices=("jsonl",), default="jsonl", help="jsonl (the only format)")
    p.add_argument("--since", metavar="WHEN", help=f"from the last signed point before this time: {_WHEN}")
    p.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    p.set_defaults(func=cmd_export)

    p = actions.add_parser(
        "pubkey",
        help="print or write the audit public key",
        description="The public half of audit.signing_key (PEM), for the security team's offline verify.",
    )
    _add_config(p)
    p.add_argument("--out", metavar="FILE", help="write the PEM here (0644) instead of standard output")
    p.set_defaults(func=cmd_pubkey)

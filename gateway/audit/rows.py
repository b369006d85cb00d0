"""Audit events as people read them: JST times and certificate names (pure; the page and the exports share it)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Any

from gateway.audit.events import AuditEvent, event_to_dict

JST = dt.timezone(dt.timedelta(hours=9), "JST")
_CN = re.compile(r"(?:^|,)\s*CN=((?:[^,\\]|\\.)*)", re.IGNORECASE)


def cert_cn(subject: str) -> str:
    """The certificate name people recognise: ``cert_subject`` as recorded (the CN), or the CN of a full DN."""
    match = _CN.search(subject or "")
    if match:
        return re.sub(r"\\(.)", r"\1", match.group(1))
    return "" if "=" in (subject or "") else subject or ""


def jst_text(utc_text: str) -> str:
    """``2026-11-30T04:50:12.345Z`` as ``2026-11-30 13:50:12`` (JST)."""
    try:
        when = dt.datetime.fromisoformat(utc_text.replace("Z", "+00:00"))
    except ValueError:
        return utc_text
    return when.astimezone(JST).strftime("%Y-%m-%d %H:%M:%S")


def page_rows(events: Sequence[AuditEvent]) -> list[dict[str, Any]]:
    """Template rows: the stored fields plus the JST time and the certificate name."""
    rows = []
    for event in events:
        row = event_to_dict(event)
        row["time_jst"] = jst_text(str(row["time"]))
        row["cert_cn"] = cert_cn(event.cert_subject)
        rows.append(row)
    return rows

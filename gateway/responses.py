"""Refusal responses: the HTML page or the JSON body, chosen by the Accept header.

The page and the JSON carry the reason code and the support ID that the
audit record holds, and nothing else about the request.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from aiohttp import web

from gateway.messages import message_for
from gateway.pages import render
from gateway.verdict import Reason


def _dumps(data: object) -> str:
    return json.dumps(data, ensure_ascii=False)


NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def wants_json(request: web.BaseRequest) -> bool:
    """JSON when the client asks for it and does not prefer HTML (browsers send text/html)."""
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/html" not in accept


def refusal(
    request: web.BaseRequest,
    reason: Reason,
    support_id: str,
    *,
    status: int | None = None,
    links: Sequence[tuple[str, str, str]] = (),
    headers: dict[str, str] | None = None,
) -> web.Response:
    """The response a refused client sees (403 by default, per-reason status otherwise)."""
    msg = message_for(reason)
    code = status or msg.status
    all_headers = {**NO_STORE, **(headers or {})}
    if wants_json(request):
        body = {"error": str(reason), "message": f"{msg.title_ja} / {msg.title_en}", "support_id": support_id}
        return web.json_response(body, status=code, headers=all_headers, dumps=_dumps)
    html = render("refusal.html", msg=msg, reason=str(reason), support_id=support_id, links=links)
    return web.Response(text=html, status=code, content_type="text/html", charset="utf-8", headers=all_headers)

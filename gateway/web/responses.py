"""Refusal responses: the HTML page or the JSON body, chosen by the Accept header.

The page and the JSON carry the reason code and the support ID that the
audit record holds, and nothing else about the request.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from importlib.resources import files

from aiohttp import web

from gateway.config import SupportConfig
from gateway.verdict import Reason
from gateway.web.messages import message_for
from gateway.web.pages import render


def _dumps(data: object) -> str:
    return json.dumps(data, ensure_ascii=False)


# What the gateway says it is: no version (a scanner's first question). aiohttp adds
# "Python/x aiohttp/y" to any response without a Server header, so our responses carry this.
SERVER = "tse-gateway"
# One year, the floor of browsers' preload lists. A property of the host name the gateway
# terminates, so proxied answers without their own get it too (see gateway.forward.proxy).
HSTS = "max-age=31536000"
# The headers a security review asks for on the gateway's and the portal's own pages. The
# pages are self-contained: one inline <style> (and style attributes), no script, the
# favicon as the only image, forms posting to the same origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Strict-Transport-Security": HSTS,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# Every response the gateway makes itself (pages, refusals, redirects): never cached, plus the above.
NO_STORE = {"Cache-Control": "no-store", **SECURITY_HEADERS, "Server": SERVER}


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
    support: SupportConfig | None = None,
    portal: bool = False,
    issuance_url: str | None = None,
    presented: str = "",
) -> web.Response:
    """The response a refused client sees (403 by default, per-reason status otherwise).

    ``support`` is the desk the page names beside the support ID; ``portal``
    gives the page the issuance service's name; ``issuance_url`` is linked from
    the no-certificate steps; ``presented`` is the name of the certificate the
    browser chose (subject mismatch), shown escaped.
    """
    msg = message_for(reason)
    code = status or msg.status
    all_headers = {**NO_STORE, **(headers or {})}
    if wants_json(request):
        body = {"error": str(reason), "message": f"{msg.title_ja} / {msg.title_en}", "support_id": support_id}
        return web.json_response(body, status=code, headers=all_headers, dumps=_dumps)
    html = render(
        "refusal.html",
        layout="portal_layout.html" if portal else "base.html",
        msg=msg,
        reason=str(reason),
        support_id=support_id,
        links=links,
        support=support,
        issuance_url=issuance_url if reason is Reason.NO_CERTIFICATE else None,
        presented=presented,
    )
    return web.Response(text=html, status=code, content_type="text/html", charset="utf-8", headers=all_headers)


@cache
def _favicon_bytes() -> bytes:
    return files("gateway.web").joinpath("static/favicon.ico").read_bytes()


def favicon() -> web.Response:
    """The gateway's icon, public (browsers fetch it on their own, certificate or not, on every refusal page)."""
    headers = {**SECURITY_HEADERS, "Server": SERVER, "Cache-Control": "public, max-age=86400"}
    return web.Response(body=_favicon_bytes(), content_type="image/x-icon", headers=headers)

"""The gateway's HTTP/1.1 connection: aiohttp's protocol, with the parser's refusals made the gateway's own.

aiohttp's parser refuses malformed requests itself (Content-Length with
Transfer-Encoding, two Content-Lengths, two Hosts, an oversized line or
header, a broken request line, ...) and answers them in
:meth:`RequestHandler.handle_error` with a plain-text 400 and an error-level
traceback, before any middleware runs. :class:`GatewayRequestHandler`
overrides only that method, which runs for those refusals and for handler
crashes, never on a served request, so the per-request path is aiohttp's
own. A parser refusal gets the gateway's ``bad_request`` page, a support ID
and an audit event naming the client and its certificate (the TLS
connection knows both though the request never parsed), and one warning
line: a client's mistake is not a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from gateway.web.responses import NO_STORE

# Builds the refusal for a request the parser could not read: (request, what was wrong) -> response.
UnparsedHook = Callable[[web.BaseRequest, str], web.StreamResponse]


class GatewayRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol; parser refusals go to ``on_unparsed``."""

    __slots__ = ("_on_unparsed",)

    def __init__(self, manager: web.Server, *, on_unparsed: UnparsedHook, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._on_unparsed = on_unparsed

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or request.writer.output_size > 0:
            # A handler crash (500) or timeout (504): aiohttp's answer and traceback are right
            # there (a bug of ours), only without the version it would put in Server.
            response = super().handle_error(request, status, exc, message)
            response.headers.update(NO_STORE)
            return response
        response = self._on_unparsed(request, parse_error_detail(exc, self.max_line_size, self.max_field_size))
        response.force_close()
        return response


def parse_error_detail(exc: HttpProcessingError, max_line: int, max_field: int) -> str:
    """What the parser refused, for the audit trail; an oversized head names the limit and its config key."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == max_line and limit != max_field:
            return f"request line over {max_line} bytes (limits.max_line_bytes)"
        if limit == max_field and limit != max_line:
            return f"header field over {max_field} bytes (limits.max_header_bytes)"
        return f"request line or header field over {limit} bytes (limits.max_line_bytes, limits.max_header_bytes)"
    return " ".join(str(exc.message).split())[:300] or type(exc).__name__

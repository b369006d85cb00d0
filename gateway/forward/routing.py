"""Which backend serves a request, and is its path safe to forward? Pure functions.

Routing is by longest prefix, optionally per ``Host``. The ``Host`` header
must name the server the client opened the TLS connection to (its SNI):
see :func:`check_host`. Paths are forwarded
byte for byte (``raw_path``), so anything a backend could decode into a
different path — dot segments, encoded slashes or dots, backslashes, NUL —
is refused here rather than trusted to every backend's parser.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from gateway.config import Backend
from gateway.verdict import Reason, Verdict

# Encoded '/', '\', '.', NUL and '%' itself (double encoding) in a path.
_ENCODED_TRICKS = re.compile(r"%(2f|5c|2e|00|25)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x20\x7f\\]")
# Overlong UTF-8 for '.', '/' and '\' (old IIS-style decoders turn them into the real thing).
_OVERLONG = re.compile(r"%c0%a[ef]|%c1%9c|%e0%80%a[ef]|%e0%81%9c", re.IGNORECASE)


class Router:
    """Longest-prefix routing; host-specific routes win over host-less ones."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self._routes = sorted(backends, key=lambda b: (b.host is not None, len(b.prefix)), reverse=True)

    def match(self, host: str | None, path: str) -> Backend | None:
        name = normalise_host(host)
        for backend in self._routes:
            if backend.host is not None and backend.host != name:
                continue
            if path.startswith(backend.prefix) or path == backend.prefix[:-1]:
                return backend
        return None

    def for_system(self, system: str, host: str | None = None) -> Backend | None:
        """The first backend of a system (the landing page after login)."""
        name = normalise_host(host)
        candidates = [b for b in self._routes if b.system_name == system]
        for backend in candidates:
            if backend.host in (None, name):
                return backend
        return candidates[0] if candidates else None

    @property
    def backends(self) -> tuple[Backend, ...]:
        return tuple(self._routes)


# Pure and asked on every request with the same few Host values: memoised (bounded, so Host
# values a client makes up only churn the cache). ~1 µs each call saved, two or three a request.
@functools.lru_cache(maxsize=1024)
def normalise_host(host: str | None) -> str | None:
    """Host header without port, lower case; IPv6 brackets kept."""
    if not host:
        return None
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def check_path(raw_path: str) -> Verdict:
    """Refuse request targets a backend could resolve outside its prefix."""
    path = raw_path.split("?", 1)[0]
    if not path.startswith("/"):
        return Verdict.deny(Reason.BAD_REQUEST, "request target is not an origin-form path")
    if _CONTROL.search(path):
        return Verdict.deny(Reason.BAD_REQUEST, "control character, space or backslash in path")
    if _ENCODED_TRICKS.search(path):
        return Verdict.deny(Reason.BAD_REQUEST, "encoded slash, dot, backslash or percent in path")
    if _OVERLONG.search(path):
        return Verdict.deny(Reason.BAD_REQUEST, "overlong UTF-8 encoding of a dot or slash in path")
    # "..;x" is ".." to servlet containers (path parameters are stripped first).
    if any(segment.split(";", 1)[0] in (".", "..") for segment in path.split("/")):
        return Verdict.deny(Reason.BAD_REQUEST, "dot segment in path")
    if "//" in path:
        return Verdict.deny(Reason.BAD_REQUEST, "empty path segment")
    return Verdict.allow()


@functools.lru_cache(maxsize=1024)
def check_host(host: str | None, server_name: str | None, *, http11: bool = True) -> Verdict:
    """The ``Host`` header must agree with the TLS server name (SNI) the client sent.

    Backends may be routed by host name and the session cookie is host-only,
    so a request must not reach one host name's backends over a connection
    opened to another (a TLS session, or a cookie, carried across names;
    RFC 9110 7.4 allows refusing a misdirected request). HTTP/1.1 needs a
    ``Host`` (RFC 9112 3.2). Without SNI (clients send none for an IP
    address) there is nothing to compare, and authorisation still rests on
    the session's systems, checked per backend.
    """
    name = normalise_host(host)
    if name is None:
        if http11:
            return Verdict.deny(Reason.BAD_REQUEST, "HTTP/1.1 request without a Host header")
        return Verdict.allow()
    if server_name and name.strip("[]") != server_name.lower().rstrip("."):
        return Verdict.deny(Reason.BAD_REQUEST, f"Host {name!r} does not match the TLS server name {server_name!r}")
    return Verdict.allow()

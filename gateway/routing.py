"""Which backend serves a request, and is its path safe to forward? Pure functions.

Routing is by longest prefix, optionally per ``Host``. Paths are forwarded
byte for byte (``raw_path``), so anything a backend could decode into a
different path — dot segments, encoded slashes or dots, backslashes, NUL —
is refused here rather than trusted to every backend's parser.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from gateway.config import Backend
from gateway.verdict import Reason, Verdict

# Encoded '/', '\', '.', NUL and '%' itself (double encoding) in a path.
_ENCODED_TRICKS = re.compile(r"%(2f|5c|2e|00|25)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x20\x7f\\]")


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
    if any(segment in (".", "..") for segment in path.split("/")):
        return Verdict.deny(Reason.BAD_REQUEST, "dot segment in path")
    if "//" in path:
        return Verdict.deny(Reason.BAD_REQUEST, "empty path segment")
    return Verdict.allow()

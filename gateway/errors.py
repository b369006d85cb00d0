"""The small family of errors the CLI reports in one line each.

Low-level exceptions (OSError, ssl.SSLError, sqlite3.Error, ValueError from
parsers) are translated into these at the I/O edge, with a message a person
can act on; ``gateway.cli.main`` catches :class:`GatewayError` once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


class GatewayError(Exception):
    """Base of every error the CLI reports without a traceback."""


class ConfigError(GatewayError):
    """A configuration file is missing, unreadable or invalid.

    ``problems`` holds one line per problem, each naming the file, the key
    path and what was expected, so an operator can fix them all in one go.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


class PkiError(GatewayError):
    """A certificate, key or CRL file cannot be read or does not fit."""


class CaError(GatewayError):
    """The certificate authority refused an operation (exists, not found, ...)."""


class StoreError(GatewayError):
    """A SQLite store (users, sessions, audit, issuance) failed."""


class StartupError(GatewayError):
    """A service could not start for a reason the operator can fix (a port taken, a worker that died)."""


def listener_error(listener: str, host: str, port: int, exc: OSError) -> StartupError:
    """One line naming the listener and its address: ``admin listener 127.0.0.1:9100: address already in use``."""
    # asyncio wraps bind errors ("error while attempting to bind on address ..."): say only the cause.
    why = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return StartupError(f"{listener} listener {address}: {why[:1].lower()}{why[1:]}")

"""The ``gateway`` command: one argparse tree, one exit path for errors.

Each concern registers its own sub-commands (``register(subparsers)`` in the
``gateway.cli.*`` modules: serve, users, audit, ca) so this package's face
stays the table of contents. Errors of the :class:`GatewayError` family print
one line (several for config problems) and exit 2, or 1 for a service
(``serve``, ``portal``, ``demo``) that could not start (its
``failure_status``); tracebacks only with ``--debug``. The command line is the
top layer: it may import any package, lazily, so a command loads only what it
runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.errors import ConfigError, GatewayError

# Modules that add sub-commands, in the order they appear in --help.
COMMAND_MODULES = (
    "gateway.cli.serve",
    "gateway.cli.users",
    "gateway.cli.audit",
    "gateway.cli.ca",
    "gateway.cli.init",
    "gateway.cli.db",
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command tree, or only as much of it as defines ``command``.

    Modules register in order until one adds ``command``: ``gateway serve``
    imports ``gateway.cli.serve`` alone, so a serving process never holds the
    user, audit and CA commands' modules (the CA and issuance code among them)
    for its whole life. An unknown command gets the whole tree (and its error).
    """
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="mTLS login gateway for TDnet, J-IRISS and clearing, and the TSE SSO CA.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
        if command is not None and command in sub.choices:
            break
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The sub-command named on the line, when only ``--debug`` precedes it (``--help`` needs the whole tree)."""
    for arg in argv:
        if arg != "--debug":
            return None if arg.startswith("-") else arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        if args.debug:
            raise
        return int(getattr(args, "failure_status", 2))
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.debug:
            raise
        return int(getattr(args, "failure_status", 2))
    except KeyboardInterrupt:
        return 130

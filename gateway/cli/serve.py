"""Sub-commands that run things: ``serve``, ``check-config``, ``reload``, ``portal``, ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from gateway.cli.common import add_config_argument, config_path
from gateway.config import load_config, shadowed_paths
from gateway.errors import ConfigError, GatewayError


def _parser(sub: argparse._SubParsersAction[Any], name: str, help_text: str, description: str, example: str) -> Any:
    """A sub-command whose ``--help`` says what it does and shows an example."""
    return sub.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = _parser(
        sub,
        "serve",
        "run the gateway in the foreground (SIGTERM/SIGINT stop, SIGHUP reloads)",
        "Run the gateway in the foreground: TLS listener, workers and the admin listener.\n"
        "SIGTERM or SIGINT drain open requests and stop; SIGHUP re-reads the TLS files, CAs, CRLs\n"
        "and backends (see `gateway reload`). Logs are JSON lines on stdout.",
        "gateway serve --config /etc/tse-gateway/tdnet.yaml",
    )
    add_config_argument(p)
    p.set_defaults(func=_serve, failure_status=1)

    p = _parser(
        sub,
        "check-config",
        "validate a config file; one line per problem",
        "Run the start-up checks `gateway serve` runs (and with --portal those of `gateway portal`)\n"
        "without starting anything: one line per problem naming the file and key; exit 0 when OK.",
        "gateway check-config --config /etc/tse-gateway/tdnet.yaml",
    )
    add_config_argument(p)
    p.add_argument("--portal", action="store_true", help="also require the portal and CA sections")
    p.set_defaults(func=_check_config)

    p = _parser(
        sub,
        "reload",
        "ask a running gateway to reload its config and files (via the admin listener)",
        "Ask a running gateway to reload (the same as SIGHUP) through its admin listener, and print\n"
        "the result as JSON. Exit 1 if the new files are refused; the gateway then keeps the old ones.",
        "gateway reload --config /etc/tse-gateway/tdnet.yaml",
    )
    add_config_argument(p)
    p.set_defaults(func=_reload)

    p = _parser(
        sub,
        "portal",
        "run the TSE-CA certificate issuance service",
        "Run the TSE-CA issuance service in the foreground: users log in with their password and\n"
        "download their certificate; it also re-signs the CRL on schedule. Uses the config's\n"
        "ca:, portal: and users: sections.",
        "gateway portal --config /etc/tse-gateway/portal.yaml",
    )
    add_config_argument(p)
    p.set_defaults(func=_portal, failure_status=1)

    p = _parser(
        sub,
        "demo",
        "run a self-contained demo: throwaway CA, backends, gateway, portal",
        "Run the whole product on this machine with a throwaway CA, demo backends, the gateway and\n"
        "the portal, and print what to import into a browser.",
        "gateway demo --dir /tmp/gateway-demo --port 8443",
    )
    p.add_argument("--dir", default=None, help="where to write the demo's PKI and databases (default: a temp dir)")
    p.add_argument("--port", type=int, default=8443, help="gateway port (portal: +1, admin: 9100)")
    p.add_argument("--once", action="store_true", help="start, print the instructions, self-check and exit")
    p.set_defaults(func=_demo, failure_status=1)


def _serve(args: argparse.Namespace) -> int:
    from gateway.server import run
    from gateway.startup import check_startup

    config = load_config(config_path(args.config))
    check_startup(config)  # the same checks and lines as check-config
    return run(config)


def _check_config(args: argparse.Namespace) -> int:
    """The start-up checks of ``serve`` (and of ``portal``), the same functions: same refusals, same lines."""
    from gateway.startup import GATEWAY_CHECKS, PORTAL_CHECKS, ca_warnings, startup_problems

    config = load_config(config_path(args.config))
    if config.database is not None:
        from gateway.storage.postgres import redact_url

        print(f"{config.path}: database: {redact_url(config.database.url)}")  # never the password
    problems: list[str] = []
    gateway_wanted = config.tls is not None or config.backends or config.revocation is not None or config.portal is None
    for wanted, checks in (
        (gateway_wanted, GATEWAY_CHECKS),
        (args.portal or config.portal is not None, PORTAL_CHECKS),
    ):
        if wanted:
            problems += [line for line in startup_problems(config, checks) if line not in problems]
    if problems:
        raise ConfigError(problems)
    if gateway_wanted:
        for warning in ca_warnings(config):
            print(f"{config.path}: warning: {warning}", file=sys.stderr)
    for note in shadowed_paths(config):
        print(f"note: {note}")
    print(f"{config.path}: OK")
    return 0


def _reload(args: argparse.Namespace) -> int:
    config = load_config(config_path(args.config))
    if config.admin is None:
        raise ConfigError([f"{config.path}: admin: missing; reload talks to the admin listener"])
    url = f"http://{config.admin.host}:{config.admin.port}/reload"
    request = urllib.request.Request(url, method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - admin URL from config
            result = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        result = json.loads(exc.read() or b"{}")
    except OSError as exc:
        raise GatewayError(f"cannot reach the admin listener at {url}: {exc}") from exc
    print(json.dumps(result, ensure_ascii=False))
    return 0 if result.get("ok") else 1


def _portal(args: argparse.Namespace) -> int:
    from gateway.ca.portal import run_portal
    from gateway.startup import PORTAL_CHECKS, check_startup

    config = load_config(config_path(args.config))
    check_startup(config, PORTAL_CHECKS)
    return run_portal(config)


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo.runner import run_demo

    return run_demo(args.dir, args.port, once=args.once)

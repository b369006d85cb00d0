"""Sub-commands that run things: ``serve``, ``check-config``, ``reload``, ``portal``, ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from gateway.config import load_config, shadowed_paths
from gateway.errors import ConfigError, GatewayError


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("serve", help="run the gateway in the foreground (SIGTERM/SIGINT stop, SIGHUP reloads)")
    p.add_argument("--config", required=True, help="YAML config file")
    p.set_defaults(func=_serve, failure_status=1)

    p = sub.add_parser("check-config", help="validate a config file; one line per problem")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--portal", action="store_true", help="also require the portal and CA sections")
    p.set_defaults(func=_check_config)

    p = sub.add_parser("reload", help="ask a running gateway to reload its config and files (via the admin listener)")
    p.add_argument("--config", required=True, help="YAML config file of the running gateway")
    p.set_defaults(func=_reload)

    p = sub.add_parser("portal", help="run the TSE-CA certificate issuance service")
    p.add_argument("--config", required=True, help="YAML config file (ca:, portal:, users:)")
    p.set_defaults(func=_portal, failure_status=1)

    p = sub.add_parser("demo", help="run a self-contained demo: throwaway CA, backends, gateway, portal")
    p.add_argument("--dir", default=None, help="where to write the demo's PKI and databases (default: a temp dir)")
    p.add_argument("--port", type=int, default=8443, help="gateway port (portal: +1, admin: 9100)")
    p.add_argument("--once", action="store_true", help="start, print the instructions, self-check and exit")
    p.set_defaults(func=_demo, failure_status=1)


def _serve(args: argparse.Namespace) -> int:
    from gateway.server import run
    from gateway.startup import check_startup

    config = load_config(args.config)
    check_startup(config)  # the same checks and lines as check-config
    return run(config)


def _check_config(args: argparse.Namespace) -> int:
    """The start-up checks of ``serve`` (and of ``portal``), the same functions: same refusals, same lines."""
    from gateway.startup import GATEWAY_CHECKS, PORTAL_CHECKS, ca_warnings, startup_problems

    config = load_config(args.config)
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
    config = load_config(args.config)
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

    config = load_config(args.config)
    check_startup(config, PORTAL_CHECKS)
    return run_portal(config)


def _demo(args: argparse.Namespace) -> int:
    from gateway.demo.runner import run_demo

    return run_demo(args.dir, args.port, once=args.once)

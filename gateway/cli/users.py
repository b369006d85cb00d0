"""Sub-commands ``gateway users ...``: manage accounts in the users database.

Every command finds its config by the one rule (:mod:`gateway.cli.common`; only its ``users:`` section matters;
the database defaults to gateway.db next to the config file) and records an
audit event for the change it made. Passwords are read from stdin or
generated, never taken from the command line (where ``ps`` would show them).
Changes that must take effect at once (disable, new systems, password
reset) are applied to the open sessions too, which live in the same file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import sys
from typing import Any

from gateway.access.passwords import (
    check_password_policy,
    generate_temporary_password,
    hash_password,
    policy_message,
)
from gateway.access.users import ROLES, User, UserError, validate_roles
from gateway.audit.events import AuditEvent, EventKind
from gateway.cli.common import add_config_argument, config_path
from gateway.config import SYSTEMS, Config, load_config
from gateway.storage.backends import Backend as Storage
from gateway.web.messages import plural


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the `users` sub-commands to the CLI."""
    users = sub.add_parser(
        "users",
        help="manage gateway user accounts",
        description="Manage the gateway's user accounts (user ID, password, systems, lock).",
    )
    cmds = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_config_argument(common)

    add = cmds.add_parser(
        "add",
        parents=[common],
        help="create a user",
        description=(
            "Create a user. With --password-stdin the first line of stdin is the password"
            " (it must meet the password policy). Without it a temporary password is"
            " generated and printed; the user must change it at the first login."
        ),
    )
    add.add_argument("user_id", metavar="USER_ID", help="the user ID (the certificate's CN)")
    add.add_argument("--systems", required=True, metavar="LIST", help=f"comma-separated, from {_systems_help()}")
    add.add_argument(
        "--roles", default="", metavar="LIST", help=f"comma-separated, from {', '.join(ROLES)}; default none"
    )
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.set_defaults(func=cmd_add)

    listing = cmds.add_parser("list", parents=[common], help="list users", description="List users.")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    listing.set_defaults(func=cmd_list)

    for name, enabled in (("disable", False), ("enable", True)):
        extra = " and end the user's sessions" if not enabled else ""
        p = cmds.add_parser(
            name,
            parents=[common],
            help=f"{name} a user",
            description=f"{name.title()} a user{extra}.",
        )
        p.add_argument("user_id", metavar="USER_ID")
        p.set_defaults(func=cmd_set_enabled, enabled=enabled)

    systems = cmds.add_parser(
        "set-systems",
        parents=[common],
        help="replace a user's systems",
        description="Replace the systems a user may use (open sessions follow at once).",
    )
    systems.add_argument("user_id", metavar="USER_ID")
    systems.add_argument("--systems", required=True, metavar="LIST", help=f"comma-separated, from {_systems_help()}")
    systems.set_defaults(func=cmd_set_systems)

    roles = cmds.add_parser(
        "set-roles",
        parents=[common],
        help="replace a user's roles",
        description=(
            "Replace a user's roles (separate from systems). auditor opens the audit workspace;"
            ' --roles "" takes every role away. Takes effect at the next request.'
        ),
    )
    roles.add_argument("user_id", metavar="USER_ID")
    roles.add_argument("--roles", required=True, metavar="LIST", help=f"comma-separated, from {', '.join(ROLES)}")
    roles.set_defaults(func=cmd_set_roles)

    reset = cmds.add_parser(
        "reset-password",
        parents=[common],
        help="set and print a temporary password",
        description=(
            "Forgotten password: set a new temporary password and print it. The user must"
            " change it at the next login. Also lifts a lock and ends the user's sessions."
        ),
    )
    reset.add_argument("user_id", metavar="USER_ID")
    reset.set_defaults(func=cmd_reset_password)

    unlock = cmds.add_parser(
        "unlock",
        parents=[common],
        help="lift a lock after failed logins",
        description="Lift the lock a user ID got after too many failed logins.",
    )
    unlock.add_argument("user_id", metavar="USER_ID")
    unlock.set_defaults(func=cmd_unlock)


def _systems_help() -> str:
    return ", ".join(SYSTEMS)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _actor() -> str:
    try:
        name = getpass.getuser()
    except (OSError, KeyError):
        name = f"uid{os.getuid()}"
    return f"cli:{name}"


def _record(config: Config, event: AuditEvent) -> None:
    """AUDIT HOOK: every users command hands its admin action to the audit trail here.

    ``record_now`` appends at once to config.audit.database (and the JSON-lines
    sink); if that fails it writes the event to stderr and does not raise,
    since the change itself has already been made.
    """
    from gateway.audit.writer import record_now

    record_now(config, event)


def _audit(config: Config, user_id: str, detail: str, kind: EventKind = EventKind.ADMIN_ACTION) -> None:
    _record(config, AuditEvent(event=kind, actor=_actor(), user_id=user_id, detail=detail))


def _parse_systems(config: Config, text: str) -> frozenset[str]:
    """The systems named in ``text``; each must be a known system."""
    known = set(SYSTEMS) | {b.system_name for b in config.backends}
    names = frozenset(s.strip() for s in text.split(",") if s.strip())
    if not names:
        raise UserError(f"no systems given; expected a comma-separated list from {', '.join(sorted(known))}")
    unknown = sorted(names - known)
    if unknown:
        raise UserError(f"unknown system {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
    return names


def _read_password(user_id: str, config: Config) -> str:
    """First line of stdin (without its line end), checked against the policy."""
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise UserError("no password on stdin")
    verdict = check_password_policy(user_id, "", password, password, config.login.password_min_length)
    if not verdict.allowed:
        raise UserError(policy_message(verdict.detail, config.login.password_min_length).en)
    return password


def cmd_add(args: argparse.Namespace) -> int:
    config = load_config(config_path(args.config))
    systems = _parse_systems(config, args.systems)
    roles = validate_roles(_split(args.roles))
    temporary = not args.password_stdin
    password = generate_temporary_password() if temporary else _read_password(args.user_id, config)
    with Storage(config, role="cli") as storage, storage.users() as store:
        store.add_user(
            args.user_id,
            hash_password(password),
            systems,
            now=_now(),
            must_change_password=temporary,
            roles=roles,
        )
    roles_note = f" roles={','.join(sorted(roles))}" if roles else ""
    _audit(config, args.user_id, f"users add systems={','.join(sorted(systems))}{roles_note}")
    granted = f"; roles: {', '.join(sorted(roles))}" if roles else ""
    print(f"user {args.user_id} added (systems: {', '.join(sorted(systems))}{granted})", file=sys.stderr)
    if temporary:
        print("temporary password (must be changed at the first login):", file=sys.stderr)
        print(password)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    config = load_config(config_path(args.config))
    now = _now()
    with Storage(config, role="cli") as storage, storage.users() as store:
        rows = [_describe(user, store.locked_until(user.user_id, now)) for user in store.list_users()]
    if args.format == "json":
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    else:
        _print_table(rows)
    return 0


def _describe(user: User, locked_until: dt.datetime | None) -> dict[str, Any]:
    return {
        "user_id": user.user_id,
        "systems": sorted(user.systems),
        "roles": sorted(user.roles),
        "enabled": user.enabled,
        "must_change_password": user.must_change_password,
        "locked_until": locked_until.isoformat(timespec="seconds") if locked_until else None,
        "created_at": user.created_at.isoformat(timespec="seconds"),
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = ("USER_ID", "SYSTEMS", "ROLES", "STATUS", "CREATED")
    lines = [header]
    for row in rows:
        status = ["enabled" if row["enabled"] else "disabled"]
        if row["must_change_password"]:
            status.append("temporary-password")
        if row["locked_until"]:
            status.append(f"locked-until={row['locked_until']}")
        roles = ",".join(row["roles"]) or "-"
        lines.append((row["user_id"], ",".join(row["systems"]), roles, " ".join(status), row["created_at"]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def cmd_set_enabled(args: argparse.Namespace) -> int:
    config = load_config(config_path(args.config))
    with Storage(config, role="cli") as storage, storage.users() as store:
        store.set_enabled(args.user_id, args.enabled, now=_now())
    ended = 0 if args.enabled else _end_sessions(config, args.user_id)
    action = "enable" if args.enabled else "disable"
    _audit(config, args.user_id, f"users {action}")
    note = f"; {plural(ended, 'session')} ended" if ended else ""
    print(f"user {args.user_id} {action}d{note}", file=sys.stderr)
    return 0


def cmd_set_systems(args: argparse.Namespace) -> int:
    config = load_config(config_path(args.config))
    systems = _parse_systems(config, args.systems)
    with Storage(config, role="cli") as storage, storage.users() as store:
        store.set_systems(args.user_id, systems, now=_now())
    with Storage(config, role="cli") as storage, storage.sessions() as sessions:
        sessions.set_systems_for_user(args.user_id, systems)  # PostgreSQL: announced to every instance
    joined = ",".join(sorted(systems))
    _audit(config, args.user_id, f"users set-systems systems={joined}")
    print(f"user {args.user_id} may now use: {', '.join(sorted(systems))}", file=sys.stderr)
    return 0


def cmd_set_roles(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    roles = validate_roles(_split(args.roles))
    with Storage(config, role="cli") as storage, storage.users() as store:
        store.set_roles(args.user_id, roles, now=_now())
    joined = ",".join(sorted(roles))
    _audit(config, args.user_id, f"users set-roles roles={joined}")
    print(f"user {args.user_id} roles: {', '.join(sorted(roles)) or '(none)'}", file=sys.stderr)
    return 0


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_reset_password(args: argparse.Namespace) -> int:
    config = load_config(config_path(args.config))
    password = generate_temporary_password()
    with Storage(config, role="cli") as storage, storage.users() as store:
        store.set_password(args.user_id, hash_password(password), temporary=True, now=_now())
        store.unlock(args.user_id)
    ended = _end_sessions(config, args.user_id)
    _audit(config, args.user_id, f"users reset-password sessions_ended={ended}")
    print(
        f"temporary password for {args.user_id} (must be changed at the next login):",
        file=sys.stderr,
    )
    print(password)
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    config = load_config(config_path(args.config))
    with Storage(config, role="cli") as storage, storage.users() as store:
        existed = store.unlock(args.user_id)
        known = store.get_user(args.user_id) is not None
    _audit(config, args.user_id, f"users unlock was_locked={existed}", EventKind.ACCOUNT_UNLOCKED)
    state = "unlocked" if existed else "was not locked"
    unknown = " (no such user in the store; failures for the ID cleared)" if not known else ""
    print(f"user ID {args.user_id} {state}{unknown}", file=sys.stderr)
    return 0


def _end_sessions(config: Config, user_id: str) -> int:
    """End the user's sessions everywhere (on PostgreSQL, every instance's cache hears of it at once)."""
    with Storage(config, role="cli") as storage, storage.sessions() as sessions:
        return sessions.delete_for_user(user_id)

"""Sub-commands ``gateway ca ...``: the administrator's side of the SSO CA.

Each command works on a CA directory, named directly (``--dir DIR``) or
through the config file's ``ca:`` section, found by the one rule of
:mod:`gateway.cli.common` (which also brings the CRL URL, nextUpdate and
drop-after settings). Serials print as ``openssl x509 -serial`` does
(upper-case hex, even number of digits) and are read in any hex spelling.
Times print in JST with the offset; ``--format json`` keeps UTC. Every change is handed to the
audit trail as an :class:`~gateway.audit.events.AuditEvent` with actor
``cli:<os user>``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import getpass
import json
import sys
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.audit.events import AuditEvent, EventKind
from gateway.ca import issuance
from gateway.ca.authority import CaSettings, CertificateAuthority
from gateway.ca.issuance import CertificateRecord, IssuanceRefused, RevocationReason, Status
from gateway.certs import p12
from gateway.certs.builders import KEY_TYPES, SSO_CA_NAME
from gateway.certs.files import write_atomic
from gateway.certs.p12 import MIN_PASSWORD_LENGTH, P12Format
from gateway.cli.common import add_config_argument, config_path, format_person_time
from gateway.config import Config, load_config
from gateway.errors import CaError, ConfigError
from gateway.storage.backends import Backend
from gateway.web.messages import plural


@dataclass(frozen=True)
class _Target:
    """Where a command acts: the CA directory, its settings, and the config if one was given."""

    directory: Path
    settings: CaSettings
    config: Config | None


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``ca`` sub-commands to the CLI."""
    ca = sub.add_parser(
        "ca",
        help="the Tokyo Stock Exchange SSO CA (issue, list, revoke, CRL)",
        description="The Tokyo Stock Exchange SSO CA: create it, issue server and client certificates, list and "
        "revoke them, publish the CRL. Each command takes the config's ca: section or --dir DIR.",
        epilog="example:\n  gateway ca issue LC000001 --config /etc/tse-gateway/portal.yaml --out LC000001.p12",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = ca.add_subparsers(dest="ca_command", metavar="CA_COMMAND", required=True)

    p = _command(commands, "init", "create a new CA (refuses to overwrite an existing one)")
    p.add_argument("--key-type", choices=KEY_TYPES, help="CA key type (default: ec-p256)")
    p.set_defaults(func=cmd_init)

    p = _command(commands, "server-cert", "issue a TLS server certificate for the given names")
    p.add_argument("hostnames", nargs="+", metavar="HOSTNAME", help="DNS name or IP address")
    p.add_argument("--out-cert", type=Path, help="certificate chain file (default: DIR/server.pem)")
    p.add_argument("--out-key", type=Path, help="private key file, 0600 (default: DIR/server.key)")
    p.add_argument("--force", action="store_true", help="replace existing certificate and key files")
    p.set_defaults(func=cmd_server_cert)

    p = _command(commands, "issue", "issue a user's client certificate as a PKCS#12 file")
    p.add_argument("user_id", metavar="USER_ID", help="the user ID (becomes the subject CN)")
    p.add_argument("--out", type=Path, required=True, help="PKCS#12 file to write (0600)")
    p.add_argument(
        "--format",
        dest="p12_format",
        choices=[f.value for f in P12Format],
        help="default: the manual's empty password (PBE-SHA1-3DES, SHA-1 MAC); password: your password, "
        "AES-256/PBKDF2/SHA-256 MAC; legacy: your password, PBE-SHA1-3DES/SHA-1 MAC for older Windows and macOS "
        "(without --format: password if --password-stdin gives one, else default)",
    )
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the PKCS#12 password from the first line of stdin "
        f"(password/legacy formats, at least {MIN_PASSWORD_LENGTH} characters; prompted for when not given)",
    )
    p.add_argument("--windows-login", metavar="ID", help="record the terminal's Windows login ID")
    p.set_defaults(func=cmd_issue)

    p = _command(commands, "list", "list certificates, newest expiry first")
    p.add_argument("--user", metavar="ID", help="only this user ID")
    p.add_argument("--status", choices=[s.value for s in Status], help="only this status")
    p.add_argument("--kind", choices=("client", "server", "all"), default="client", help="default: client")
    p.add_argument("--format", choices=("table", "json"), default="table", help="default: table")
    p.set_defaults(func=cmd_list)

    p = _command(commands, "revoke", "revoke a certificate and publish a new CRL")
    p.add_argument("serial", metavar="SERIAL", help="serial number in hex")
    p.add_argument(
        "--reason",
        required=True,
        choices=issuance.reasons(),
        help="RFC 5280 reason (certificateHold is not offered: revocation is final)",
    )
    p.set_defaults(func=cmd_revoke)

    p = _command(commands, "crl", "sign and publish a fresh CRL now")
    p.add_argument(
        "--if-due",
        action="store_true",
        help="only when one is due (for cron: a revocation is pending or a third of the validity is left)",
    )
    p.set_defaults(func=cmd_crl)


def _command(commands: argparse._SubParsersAction[Any], name: str, help_text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help_text, description=help_text)
    where = parser.add_mutually_exclusive_group()
    add_config_argument(where)
    where.add_argument("--dir", type=Path, metavar="DIR", help="CA directory, instead of a config's ca: section")
    return parser


# -- commands ---------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    target = _target(args)
    key_type = args.key_type or (target.config.ca.key_type if target.config and target.config.ca else "ec-p256")
    now = dt.datetime.now(dt.UTC)
    with _backend(target) as backend:
        records = backend.issuance(target.directory) if backend and backend.shared else None
        ca = CertificateAuthority.init(
            target.directory, key_type=key_type, now=now, settings=target.settings, records=records
        )
    print(f"created CA {issuance.format_serial(ca.certificate.serial_number)} ({key_type})")
    print(f"  certificate: {ca.cert_path}  (DER for Windows: {ca.cert_der_path})")
    print(f"  private key: {ca.directory / 'ca.key'} (0600)")
    print(f"  CRL:         {ca.crl_der_path}, {ca.crl_pem_path}")
    return 0


def cmd_server_cert(args: argparse.Namespace) -> int:
    target = _target(args)
    with _open_ca(target) as ca:
        now = dt.datetime.now(dt.UTC)
        files = ca.issue_server(
            args.hostnames, now, _actor(), out_cert=args.out_cert, out_key=args.out_key, force=args.force
        )
        _record(target, _event(EventKind.CERTIFICATE_ISSUED, files.record, detail="server"))
        print(f"issued server certificate {files.record.serial_hex} for {', '.join(args.hostnames)}")
        print(f"  expires {format_person_time(files.record.not_after)}")
        print(f"  chain: {files.cert}\n  key:   {files.key} (0600)")
        return 0


def cmd_issue(args: argparse.Namespace) -> int:
    target = _target(args)
    out: Path = args.out
    if out.exists():
        raise CaError(f"{out}: exists; refusing to overwrite it (choose another --out)")
    p12_format, password = _p12_choice(args)
    with _open_ca(target) as ca:
        now = dt.datetime.now(dt.UTC)
        try:
            issued = ca.issue_client(
                args.user_id, now, _actor(), windows_login=args.windows_login, p12_format=p12_format, password=password
            )
        except IssuanceRefused as exc:
            _record(
                target,
                AuditEvent(
                    event=EventKind.ISSUANCE_REFUSED,
                    reason=exc.verdict.reason.value,
                    user_id=args.user_id,
                    actor=_actor(),
                    detail=exc.verdict.detail,
                ),
            )
            raise
        write_atomic(out, issued.pkcs12, mode=0o600)
        record = issued.record
        _record(target, _event(EventKind.CERTIFICATE_ISSUED, record, detail=f"pkcs12 format {p12_format}"))
        print(f"issued {record.serial_hex} to {record.user_id}")
        print(f"  expires {format_person_time(record.not_after)}")
        print(f"  SHA-256 {record.fingerprint}")
        print(f"  PKCS#12 {out} (format {p12_format}, {'password set' if password else 'empty password'})")
        return 0


def cmd_list(args: argparse.Namespace) -> int:
    target = _target(args)
    with _open_ca(target) as ca:
        now = dt.datetime.now(dt.UTC)
        status = Status(args.status) if args.status else None
        kind = None if args.kind == "all" else args.kind
        rows = issuance.list_rows(ca.list(user=args.user, status=status, kind=kind, now=now), now)
        if args.format == "json":
            print(json.dumps([_json_row(row) for row in rows], ensure_ascii=False, indent=2))
        else:
            print(_table(rows))
        return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    target = _target(args)
    try:
        serial = issuance.parse_serial(args.serial)
    except ValueError as exc:
        raise CaError(str(exc)) from exc
    with _open_ca(target) as ca:
        now = dt.datetime.now(dt.UTC)
        result = ca.revoke(serial, RevocationReason(args.reason), now, _actor())
        _record(target, _event(EventKind.CERTIFICATE_REVOKED, result.record, reason=args.reason))
        _record(target, _crl_event(result.crl.number, result.crl.entries))
        print(f"revoked {result.record.serial_hex} ({result.record.user_id}, {args.reason})")
        print(f"  CRL #{result.crl.number} published with {plural(result.crl.entries, 'entry')}")
        return 0


def cmd_crl(args: argparse.Namespace) -> int:
    target = _target(args)
    with _open_ca(target) as ca:
        now = dt.datetime.now(dt.UTC)
        if args.if_due and not ca.crl_due(now):
            last = ca.last_crl()
            number = last.number if last else 0
            print(f"CRL #{number} is current; nothing to do")
            return 0
        info = ca.publish_crl(now)
        _record(target, _crl_event(info.number, info.entries))
        print(f"CRL #{info.number}: {plural(info.entries, 'entry')}, {plural(info.der_bytes, 'byte')}")
        print(f"  next update {format_person_time(info.next_update)}")
        print(f"  {ca.crl_der_path}\n  {ca.crl_pem_path}")
        return 0


# -- helpers ------------------------------------------------------------------


def _target(args: argparse.Namespace) -> _Target:
    if args.dir is not None:
        return _Target(Path(args.dir), CaSettings(), None)
    config = load_config(config_path(args.config))
    if config.ca is None:
        raise ConfigError([f"{config.path}: ca: missing; `gateway ca` needs ca.dir"])
    return _Target(config.ca.dir, CaSettings.from_config(config.ca), config)


@contextlib.contextmanager
def _backend(target: _Target) -> Iterator[Backend | None]:
    """The config's storage backend (its pool closed afterwards); None with ``--dir`` alone."""
    if target.config is None:
        yield None
        return
    with Backend(target.config, role="ca-cli") as backend:
        yield backend


@contextlib.contextmanager
def _open_ca(target: _Target) -> Iterator[CertificateAuthority]:
    """The CA with its records where the config keeps them (``database:`` or ``issuance.db``)."""
    with _backend(target) as backend:
        records = backend.issuance(target.directory, busy_timeout=target.settings.busy_timeout) if backend else None
        yield CertificateAuthority.open(target.directory, target.settings, records)


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. in a bare container
        user = "unknown"
    return f"cli:{user}"


def _p12_choice(args: argparse.Namespace) -> tuple[P12Format, str]:
    """The PKCS#12 format and its password, checked before anything is issued.

    The password comes from stdin or a prompt, never from argv (where ``ps``
    shows it). Without ``--format``, a password on stdin means the password
    format and an empty line the default, as before ``--format`` existed.
    """
    password = sys.stdin.readline().rstrip("\r\n") if args.password_stdin else ""
    if args.p12_format is None:
        p12_format = P12Format.PASSWORD if password else P12Format.DEFAULT
    else:
        p12_format = P12Format(args.p12_format)
    if p12_format is not P12Format.DEFAULT and not args.password_stdin:
        password = getpass.getpass("PKCS#12 password: ")
        if password != getpass.getpass("PKCS#12 password again: "):
            raise CaError("the two PKCS#12 passwords differ; nothing was issued")
    problem = p12.password_problem(p12_format, password)
    if problem is not None:
        raise CaError(f"--format {p12_format}: {problem[1]}; nothing was issued")
    return p12_format, password


def _event(kind: EventKind, record: CertificateRecord, *, reason: str = "", detail: str = "") -> AuditEvent:
    return AuditEvent(
        event=kind,
        reason=reason,
        user_id=record.user_id,
        cert_subject=record.user_id,
        cert_serial=record.serial_hex,
        cert_issuer=SSO_CA_NAME,
        cert_fingerprint=record.fingerprint,
        cert_not_after=record.not_after.isoformat(),
        actor=_actor(),
        detail=detail,
    )


def _crl_event(number: int, entries: int) -> AuditEvent:
    return AuditEvent(event=EventKind.CRL_PUBLISHED, actor=_actor(), detail=f"number={number} entries={entries}")


def _record(target: _Target, event: AuditEvent) -> None:
    """Hand an admin action to the audit trail of the config's ``audit.database``.

    Only with ``--config``: with ``--dir`` alone there is no audit store to
    write to, and the action is reported on stdout only. ``record_now``
    never raises (the action has already happened); a failure goes to
    stderr as an overflow line.
    """
    if target.config is None:
        return
    from gateway.audit.writer import record_now

    record_now(target.config, event)


def _json_row(row: issuance.ListRow) -> dict[str, Any]:
    r = row.record
    return {
        "no": row.no,
        "user_id": r.user_id,
        "kind": r.kind,
        "serial": row.serial,
        "not_before": r.not_before.isoformat(),
        "not_after": r.not_after.isoformat(),
        "status": row.status.value,
        "status_ja": row.status.label_ja,
        "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
        "revocation_reason": r.revocation_reason.value if r.revocation_reason else None,
        "revoked_by": r.revoked_by,
        "fingerprint": r.fingerprint,
        "requested_by": r.requested_by,
        "windows_login": r.windows_login,
    }


_HEADERS = ("No.", "User ID", "Serial", "Expiry", "Status", "Revoked")


def _table(rows: list[issuance.ListRow]) -> str:
    """A plain table, padded by display width so Japanese labels line up."""
    cells = [_HEADERS] + [
        (
            str(row.no),
            row.user_id,
            row.serial,
            format_person_time(row.record.not_after),
            f"{row.status.label_en} ({row.status.label_ja})",
            format_person_time(row.record.revoked_at) if row.record.revoked_at else "-",
        )
        for row in rows
    ]
    widths = [max(_width(line[i]) for line in cells) for i in range(len(_HEADERS))]
    lines = ["  ".join(_pad(c, w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells]
    if not rows:
        lines.append("(no certificates)")
    return "\n".join(lines)


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _width(text))

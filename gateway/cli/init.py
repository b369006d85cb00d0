"""``gateway init DIR``: from an empty directory to one ``check-config`` accepts and ``serve`` runs on.

It writes a CA (or uses an existing one given with ``--ca``), a server
certificate for the host names, a session secret (0600), a first CRL and a
commented ``gateway.yaml`` for the three systems whose every path exists, then
prints the next steps. It refuses to overwrite anything: every target is
checked before the first byte is written, so a refusal leaves nothing behind.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from gateway.ca.authority import CertificateAuthority
from gateway.certs.builders import server_name_problem
from gateway.certs.files import write_atomic
from gateway.errors import CaError

CONFIG_NAME = "gateway.yaml"
PORTAL_LINK = "portal.yaml"  # the name gateway-portal.service and gateway-crl.service read; one file serves both
SECRET_NAME = "session.key"  # noqa: S105 (a file name)
SERVER_CERT = Path("tls") / "server.pem"
SERVER_KEY = Path("tls") / "server.key"
CA_FILES = ("ca.key", "ca.pem", "issuance.db", "crl.der")
SECRET_BYTES = 32  # hex-encoded: 64 bytes on disk, above the 32-byte minimum


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``gateway init`` to the CLI."""
    p = sub.add_parser(
        "init",
        help="write a deployable directory: CA, server certificate, session secret, commented gateway.yaml",
        description="Write a CA (or use --ca), a server certificate for the host names, a session secret (0600), "
        "a first CRL and a commented gateway.yaml for TDnet, J-IRISS and clearing. Refuses to overwrite "
        "anything. Example: gateway init /etc/tse-gateway --state-dir /var/lib/tse-gateway "
        "--hostname tdnet.example.jp",
    )
    p.add_argument("directory", type=Path, metavar="DIR", help="where gateway.yaml, the secret and tls/ go")
    p.add_argument(
        "--hostname", action="append", required=True, metavar="NAME", help="server certificate name (repeatable)"
    )
    p.add_argument("--ca", type=Path, metavar="CA_DIR", help="use this existing CA instead of creating one")
    p.add_argument(
        "--state-dir",
        type=Path,
        metavar="STATE_DIR",
        help="databases and the new CA (default: DIR/state; the systemd units write only /var/lib/tse-gateway)",
    )
    p.add_argument("--port", type=int, default=443, help="the users' HTTPS port (default: 443)")
    p.add_argument("--admin-port", type=int, default=9100, help="the loopback admin listener (default: 9100)")
    p.add_argument("--portal-port", type=int, default=8444, help="the issuance portal's HTTPS port (default: 8444)")
    p.set_defaults(func=cmd_init)


@dataclass(frozen=True)
class Layout:
    """Every path ``init`` writes or names, absolute."""

    directory: Path
    state: Path
    ca: Path
    new_ca: bool

    @property
    def config(self) -> Path:
        return self.directory / CONFIG_NAME

    @property
    def secret(self) -> Path:
        return self.directory / SECRET_NAME

    @property
    def server_cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY

    @property
    def portal_link(self) -> Path:
        return self.directory / PORTAL_LINK

    def targets(self) -> list[Path]:
        """Files that must not exist yet (a new CA's own files included)."""
        files = [self.config, self.portal_link, self.secret, self.server_cert, self.server_key]
        return files + ([self.ca / name for name in CA_FILES] if self.new_ca else [])


def layout_of(args: argparse.Namespace) -> Layout:
    directory = Path(args.directory).resolve()
    state = Path(args.state_dir).resolve() if args.state_dir else directory / "state"
    ca = Path(args.ca).resolve() if args.ca else state / "ca"
    return Layout(directory, state, ca, new_ca=args.ca is None)


def refusal(layout: Layout, hostnames: list[str]) -> str | None:
    """Why ``init`` must not write anything, or None: decided before any file is touched."""
    present = [path for path in layout.targets() if path.exists() or path.is_symlink()]
    if present:
        return f"{present[0]}: exists; gateway init refuses to overwrite anything (choose an empty DIR)"
    problems = [p for p in map(server_name_problem, hostnames) if p]
    if problems:
        return "; ".join(problems)
    if not layout.new_ca and not (layout.ca / "ca.key").is_file():
        return f"{layout.ca}: no CA here (ca.key missing); run `gateway ca init --dir {layout.ca}` or drop --ca"
    return None


def cmd_init(args: argparse.Namespace) -> int:
    layout = layout_of(args)
    hostnames: list[str] = list(args.hostname)
    why = refusal(layout, hostnames)
    if why is not None:
        raise CaError(why)
    now = dt.datetime.now(dt.UTC)
    if layout.new_ca:
        ca = CertificateAuthority.init(layout.ca, now=now)
    else:
        ca = CertificateAuthority.open(layout.ca)
        if not ca.crl_der_path.exists() or ca.crl_due(now):
            ca.publish_crl(now)
    layout.directory.mkdir(parents=True, exist_ok=True)
    layout.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = ca.issue_server(
        hostnames, now, "cli:init", out_cert=layout.server_cert, out_key=layout.server_key, force=False
    )
    _create_secret(layout.secret)
    text = render_config(layout, hostnames, port=args.port, admin_port=args.admin_port, portal_port=args.portal_port)
    write_atomic(layout.config, text.encode("utf-8"))
    layout.portal_link.symlink_to(CONFIG_NAME)
    print(next_steps(layout, hostnames, files.record.serial_hex, args.admin_port))
    return 0


def _create_secret(path: Path) -> None:
    """The session secret, 0600 from its creation (O_EXCL: never replaces one)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(SECRET_BYTES) + "\n")


def _path(layout: Layout, path: Path) -> str:
    """Relative to the config's folder when inside it (the directory can move), else absolute; quoted for YAML."""
    try:
        text = str(path.relative_to(layout.directory))
    except ValueError:
        text = str(path)
    return json.dumps(text)


def _url_host(name: str) -> str:
    """A host name as it goes into a URL (an IPv6 address in brackets)."""
    return f"[{name}]" if ":" in name else name


def render_config(layout: Layout, hostnames: list[str], *, port: int, admin_port: int, portal_port: int) -> str:
    return CONFIG_TEMPLATE.substitute(
        hostnames=", ".join(hostnames),
        port=port,
        admin_port=admin_port,
        portal_port=portal_port,
        portal_admin_port=admin_port + 1,
        portal_url=json.dumps(f"https://{_url_host(hostnames[0])}:{portal_port}"),
        server_cert=_path(layout, layout.server_cert),
        server_key=_path(layout, layout.server_key),
        ca_dir=_path(layout, layout.ca),
        ca_pem=_path(layout, layout.ca / "ca.pem"),
        crl=_path(layout, layout.ca / "crl.der"),
        secret=_path(layout, layout.secret),
        users_db=_path(layout, layout.state / "gateway.db"),
        audit_db=_path(layout, layout.state / "audit.db"),
    )


def next_steps(layout: Layout, hostnames: list[str], serial: str, admin_port: int) -> str:
    config = layout.config
    ca = "created" if layout.new_ca else "used"
    return f"""\
wrote {config} (and {layout.portal_link.name}, a link to it)
  CA ({ca}):     {layout.ca}  (ca.key 0600: keep it off gateway hosts when you can)
  server certificate: {layout.server_cert} for {", ".join(hostnames)} (serial {serial}), key 0600
  session secret:     {layout.secret} (0600)
  CRL:                {layout.ca / "crl.der"}
  databases:          {layout.state}

next steps:
  1. point each backend's upstream in {config.name} at the real system (TDnet /onre/, J-IRISS /nt/,
     clearing /jpxcube/), then: gateway check-config --config {config}
  2. add users:   gateway users add LC000001 --systems tdnet,j-iriss,clearing --password-stdin --config {config}
     and issue their certificates: gateway ca issue LC000001 --out LC000001.p12 --config {config}
  3. start the units (deploy/systemd: they read /etc/tse-gateway/<instance>.yaml and portal.yaml and
     write only /var/lib/tse-gateway: gateway init /etc/tse-gateway --state-dir /var/lib/tse-gateway ...):
       systemctl enable --now gateway@gateway.service gateway-portal.service gateway-crl.timer
     The CRL must be re-signed before its nextUpdate (24 h): run gateway-crl.timer or the portal,
     or every user is refused an hour after it lapses. /healthz says "degraded" 6 h before.
  4. watch http://127.0.0.1:{admin_port}/healthz and /metrics (deploy/prometheus/alerts.yml)"""


CONFIG_TEMPLATE = Template("""\
# Written by `gateway init` for: $hostnames
# One file serves both: `gateway serve --config gateway.yaml` runs the gateway,
# `gateway portal --config gateway.yaml` the issuance service.
# Relative paths resolve against the folder of this file.
# Validate with: gateway check-config --config gateway.yaml

# Where the gateway accepts HTTPS connections from users' browsers.
listen: {host: 0.0.0.0, port: $port}

# Worker processes sharing the port (SO_REUSEPORT); "auto" = one per CPU core.
workers: 1

tls:
  cert: $server_cert   # server certificate chain, PEM (leaf first)
  key: $server_key     # server private key, PEM (keep it 0600)
  client_ca: $ca_pem   # PEM bundle of the CA(s) allowed to issue client certificates;
                       # a list of bundles is accepted for a CA rollover
  issuer: "Tokyo Stock Exchange SSO CA"   # CN the issuing CA must carry (default)
  handshake_timeout_seconds: 10   # a client that has not finished TLS by then is dropped
  send_ca_names: true             # name the CA in the CertificateRequest so browsers offer only its certificates
  profile: intermediate           # Mozilla's "intermediate" (TLS 1.2 ECDHE+AEAD, TLS 1.3) or "modern" (TLS 1.3 only)
  # max_chain_depth: 3            # most certificates a client chain may have, leaf included (default: the
                                  # longest configured CA path plus the leaf; copies of configured CAs not counted)
  key_types: [ec-p256, ec-p384, rsa]   # keys accepted in client and CA certificates (also ec-p521); never DSA
  rsa_min_bits: 2048              # smallest RSA key accepted; RSA sizes must be a multiple of 8
  session_resumption: auto        # auto: one worker keeps sessions in memory (cheapest resumption, ~12 MiB
                                  # for its 1,000 newest); several share encrypted tickets. Or: cache, tickets

revocation:
  crl: $crl                       # file path or http(s) URL, PEM or DER; a list for several CAs
  refresh_seconds: 60             # how often to look for a new CRL (file change, or HTTP ETag/Last-Modified)
  grace_seconds: 3600             # how long past its nextUpdate a CRL is still trusted; then every request is refused
  warn_before_next_update_seconds: 21600  # this close to nextUpdate /healthz says "degraded" and the log warns hourly
  fetch_timeout_seconds: 10       # for http(s) CRL sources
  max_bytes: 536870912            # a larger CRL is refused (the old one stays)

# Longest-prefix routing; add `host: tdnet.example.jp` to a backend to route by Host header too.
# Point each upstream at the real system before going live.
backends:
  - name: tdnet                   # also the system name users are authorised for (tdnet, j-iriss, clearing)
    prefix: /onre/
    upstream: "http://127.0.0.1:9001"
    timeout_seconds: 60           # waiting for the backend's answer (504 after that)
    connect_timeout_seconds: 5    # connecting to the backend (502 when it fails)
    max_body_bytes: 2147483648    # larger request bodies get 413
    # system: tdnet               # the system users must be allowed on; needed when name is not
    #                             # tdnet, j-iriss or clearing (e.g. a second backend "tdnet-api")
    # host: tdnet.example.jp      # route by Host header too
    # login: {mode: passthrough, path: /onre/login, user_field: userId}
    #   passthrough: the backend keeps its own login form; the gateway forwards its
    #   login POST only when user_field equals the certificate's CN.
    #   gateway (default): users log in at the gateway's own login page (/_gateway/login).
  - {name: j-iriss,  prefix: /nt/,      upstream: "http://127.0.0.1:9002"}
  - {name: clearing, prefix: /jpxcube/, upstream: "http://127.0.0.1:9003"}

# The gateway's own pages (login, logout, password change, certificate notice, landing page)
# live under this one reserved prefix; a backend prefix under it is refused.
gateway_paths:
  prefix: /_gateway/              # default; must start and end with /

# Plain HTTP for operators: /healthz, /metrics (Prometheus), /audit (report), /reload (POST).
# Keep it on loopback or a management network: it has no login of its own.
admin:
  host: 127.0.0.1
  port: $admin_port
  audit_report: false             # true: also serve /audit here with NO login; the audit workspace is
                                  # /_gateway/audit for users with the auditor role

limits:
  max_connections: 10000          # per worker; more are closed at once (LimitNOFILE in the unit is 65536)
  header_timeout_seconds: 15      # a request head must arrive within this (slowloris)
  body_timeout_seconds: 30        # a request body may not stall longer than this
  drain_timeout_seconds: 30       # SIGTERM: in-flight requests get this long to finish
  keepalive_timeout_seconds: 75   # idle keep-alive connections are closed after this
  max_header_bytes: 16384         # one header field
  max_line_bytes: 8190            # the request line

# This process's name on every audit event and metric (default: the host name).
# instance: gw-tdnet-1

# Shared state for several instances (users, sessions, login failures, audit events,
# the CA's records) in PostgreSQL. Absent: the SQLite files below (one host). With it,
# drop users.database and audit.database; run `gateway db migrate` once per release.
# database:
#   url: "postgresql://gateway@db.example.jp:5432/gateway?sslmode=verify-full"
#   password_file: /etc/tse-gateway/db.password   # first line; keeps the secret out of this file
#   pool_size: auto               # connections per worker; auto shares 24 per instance among the workers
#   outage_grace_seconds: 30      # sessions already in memory are served this long while the database is down
#   connect_timeout_seconds: 5    # a request waits this long for a connection, then gets service_unavailable

users:
  database: $users_db   # SQLite: accounts, lockouts, sessions (shared by all workers and the portal)

session:
  secret_file: $secret   # 0600, written by gateway init; replacing it logs every user out
  idle_minutes: 30                # a session unused this long ends
  absolute_hours: 10              # a session ends this long after login, used or not

login:
  max_failures: 5                 # failed logins for one user ID within the window lock it
  failure_window_minutes: 15
  lockout_minutes: 30
  ip_max_failures: 50             # failed logins from one address within the window: rate_limited
  password_min_length: 12
  expiry_notice_days: 30          # show "your certificate expires soon" after login

audit:
  database: $audit_db   # append-only SQLite (WAL), shared by all workers
  # jsonl: "-"                    # also write JSON lines: a file path, or "-" for stdout (SIEM shipping)
  queue_size: 10000               # events buffered before overflow goes to stderr (and is counted)
  # spool_dir: audit-spool         # with a database: events wait here (one file per worker) during an outage
  # spool_max_bytes: 67108864     # per file; events beyond it are counted as lost (alert on it)
  # signing_key: audit-signing.key        # Ed25519 key (0600) signing checkpoints; created on first use;
                                          # `gateway audit verify` checks the trail against its public half
  # checkpoint_interval_seconds: 3600     # each instance signs its chain's head this often and at shutdown

# The certificate authority (gateway ca ...) and the issuance service (gateway portal).
ca:
  dir: $ca_dir   # ca.pem, ca.key (0600), issuance.db, crl.der, crl.pem
  crl_next_update_hours: 24       # nextUpdate of each CRL; gateway-crl.timer or the portal re-signs it before
  # crl_url: "https://portal.example.jp/crl"   # put into issued certificates when set
  key_type: ec-p256               # client keys: ec-p256, rsa-2048 or rsa-3072
  crl_drop_expired_after_days: 90 # revoked entries leave the CRL this long after the certificate expired

portal:
  listen: {host: 0.0.0.0, port: $portal_port}
  tls: {cert: $server_cert, key: $server_key}
  admin: {host: 127.0.0.1, port: $portal_admin_port}   # /healthz, /metrics (plain HTTP, keep it on loopback)
  public_url: $portal_url   # the issuance service as users reach it (linked from the no-certificate page)

# Shown on every refusal page (gateway and portal) beside the support ID; every key optional.
# support:
#   name: TSE SSO ヘルプデスク / helpdesk
#   phone: 03-0000-0000
#   email: sso-support@example.jp
#   hours: 平日 9:00-17:00 (JST)

log_level: info                   # debug, info, warning or error (JSON lines on stdout)
""")

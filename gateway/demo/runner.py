"""``gateway demo``: the whole product on one machine, with throwaway everything.

It creates a CA (Tokyo Stock Exchange SSO CA), a server certificate, two
users with certificates, three demo backends (TDnet, J-IRISS, clearing) that
show what they received, the gateway in front of them and the issuance
portal, then prints what to try. TDnet keeps its own login form
(passthrough mode), so ``curl --cert`` reaches it directly; J-IRISS and
clearing need the gateway's login (a browser with the PKCS#12 imported).
Ctrl-C stops everything; ``--once`` checks the demo answers and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import signal
import ssl
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from gateway.access.passwords import hash_password
from gateway.access.sessions import create_session_key
from gateway.access.users import UserStore
from gateway.ca.authority import CertificateAuthority
from gateway.certs.files import write_atomic, write_private_key
from gateway.config import Config, GatewayPaths, load_config
from gateway.demo.backend import build_backend
from gateway.logs import setup_logging

DEMO_USERS = {"LC000001": ("tdnet", "j-iriss", "clearing"), "LC000002": ("tdnet",), "LC000003": ("tdnet", "j-iriss")}
NO_CERTIFICATE_YET = "LC000003"  # gets one in the portal
DEMO_PASSWORD = "demo-password-1"  # noqa: S105 - printed for the person running the demo
SYSTEMS = (("tdnet", "/onre/", "TDnet"), ("j-iriss", "/nt/", "J-IRISS"), ("clearing", "/jpxcube/", "Clearing"))


@dataclass
class DemoFiles:
    directory: Path
    config_path: Path
    ca: CertificateAuthority
    client_pem: dict[str, tuple[Path, Path, Path]]  # user -> (cert, key, p12)


def prepare(directory: Path, backend_ports: dict[str, int], port: int, portal_port: int, admin_port: int) -> DemoFiles:
    """Write the CA, certificates, users, session key and config for the demo."""
    now = dt.datetime.now(dt.UTC)
    ca = CertificateAuthority.init(directory / "ca", now=now)
    server = ca.issue_server(
        ["localhost", "127.0.0.1"], now, "demo", out_cert=directory / "server.crt", out_key=directory / "server.key"
    )
    clients: dict[str, tuple[Path, Path, Path]] = {}
    with UserStore(directory / "gateway.db") as users:
        for user_id, systems in DEMO_USERS.items():
            users.add_user(user_id, hash_password(DEMO_PASSWORD), systems, now=now)
            if user_id != NO_CERTIFICATE_YET:
                clients[user_id] = _write_client(directory, user_id, ca.issue_client(user_id, now, "demo"))
    create_session_key(directory / "session.key")
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "tls": {"cert": str(server.cert), "key": str(server.key), "client_ca": str(ca.cert_path)},
        "revocation": {"crl": str(ca.crl_der_path), "refresh_seconds": 5},
        "backends": [
            {
                "name": name,
                "prefix": prefix,
                "upstream": f"http://127.0.0.1:{backend_ports[name]}",
                **(
                    {"login": {"mode": "passthrough", "path": "/onre/login", "user_field": "userId"}}
                    if name == "tdnet"
                    else {}
                ),
            }
            for name, prefix, _title in SYSTEMS
        ],
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "users": {"database": "gateway.db"},
        "session": {"secret_file": "session.key"},
        "audit": {"database": "audit.db"},
        "ca": {"dir": "ca"},
        "portal": {
            "listen": {"host": "127.0.0.1", "port": portal_port},
            "tls": {"cert": str(server.cert), "key": str(server.key)},
        },
        "log_level": "warning",
    }
    config_path = directory / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return DemoFiles(directory, config_path, ca, clients)


def _write_client(directory: Path, user_id: str, issued: Any) -> tuple[Path, Path, Path]:
    from cryptography.hazmat.primitives.serialization import Encoding, pkcs12

    key, cert, _chain = pkcs12.load_key_and_certificates(issued.pkcs12, None)
    assert key is not None and cert is not None
    cert_path, key_path, p12_path = (directory / f"{user_id}{ext}" for ext in (".crt", ".key", ".p12"))
    write_atomic(cert_path, cert.public_bytes(Encoding.PEM))
    write_private_key(key_path, key)  # type: ignore[arg-type]
    write_atomic(p12_path, issued.pkcs12, mode=0o600)
    return cert_path, key_path, p12_path


async def _start_backends() -> tuple[list[web.AppRunner], dict[str, int]]:
    runners, ports = [], {}
    for name, _prefix, title in SYSTEMS:
        runner = web.AppRunner(build_backend(title), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports[name] = runner.addresses[0][1]
        runners.append(runner)
    return runners, ports


LOGIN_PAGE = GatewayPaths().login  # the demo's config keeps the default gateway_paths.prefix


def instructions(files: DemoFiles, gateway_port: int, admin_port: int, portal_port: int | None) -> str:
    cert, key, p12 = files.client_pem["LC000001"]
    ca = files.ca.cert_path
    base = f"https://localhost:{gateway_port}"
    lines = [
        "",
        "TSE SSO gateway demo is running. Ctrl-C stops everything.",
        f"  files:   {files.directory}",
        f"  gateway: {base}/  (its own pages: {base}{GatewayPaths().landing}; admin: "
        f"http://127.0.0.1:{admin_port}/healthz, /metrics, /audit)",
    ]
    if portal_port:
        lines.append(f"  portal:  https://localhost:{portal_port}/  (TSE-CA 証明書発行サービス;")
        lines.append(f"           {NO_CERTIFICATE_YET} has no certificate yet: log in there, 申請, 証明書ダウンロード)")
    lines += [
        f"  users:   {', '.join(DEMO_USERS)}  password: {DEMO_PASSWORD}",
        "",
        "Try with curl (TDnet keeps its own login, so the certificate is enough there):",
        f"  curl --cacert {ca} --cert {cert} --key {key} {base}/onre/",
        f"  curl --cacert {ca} {base}/onre/   # no certificate: 403 有効なクライアント証明書ではありません",
        f"  curl --cacert {ca} -H 'Accept: application/json' {base}/onre/",
        f"  curl --cacert {ca} --cert {cert} --key {key} -H 'X-Authenticated-User: ADMIN' {base}/onre/",
        "      # the forged header is dropped: the backend shows no authenticated user",
        f"  curl --cacert {ca} --cert {cert} --key {key} {base}/nt/   # J-IRISS needs a login: 303 to {LOGIN_PAGE}",
        "",
        "In a browser: import the CA and the PKCS#12 (empty password), restart the browser, open",
        f"  {base}/nt/   and log in as LC000001.",
        f"  CA: {ca}   PKCS#12: {p12}",
        "",
        f"Audit trail: {Path(sys.executable).parent / 'gateway'} audit list --config {files.config_path}",
    ]
    return "\n".join(lines)


async def _self_check(files: DemoFiles, gateway_port: int, portal_port: int | None) -> dict[str, int]:
    """Fetch TDnet with and without the certificate, and the portal's login; the demo's smoke test."""
    cert, key, _ = files.client_pem["LC000001"]
    results = {}
    for label, with_cert in (("with_certificate", True), ("without_certificate", False)):
        ctx = ssl.create_default_context(cafile=str(files.ca.cert_path))
        if with_cert:
            ctx.load_cert_chain(cert, key)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
            s.get(f"https://localhost:{gateway_port}/onre/") as r,
        ):
            results[label] = r.status
    if portal_port:
        ctx = ssl.create_default_context(cafile=str(files.ca.cert_path))
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
            s.get(f"https://localhost:{portal_port}/login") as r,
        ):
            results["portal_login_page"] = r.status
    return results


async def _run(directory: Path, port: int, once: bool) -> int:
    from gateway.access.login import LoginAccess
    from gateway.audit.writer import AuditLog
    from gateway.server import GatewayWorker

    runners, backend_ports = await _start_backends()
    files = prepare(directory, backend_ports, port, 0 if once else port + 1, 0 if once else 9100)
    config = load_config(files.config_path)
    audit = AuditLog(config, worker=0)
    await audit.start()
    worker = GatewayWorker(config, audit, access_factory=LoginAccess)
    portal_runner: Any = None
    try:
        portal_runner, portal_port = await _start_portal(config, audit)
        await worker.start()
        print(instructions(files, worker.port, worker.admin_port, portal_port), flush=True)
        if once:
            results = await _self_check(files, worker.port, portal_port)
            print(json.dumps({"self_check": results}), flush=True)
            expected = {"with_certificate": 200, "without_certificate": 403}
            if portal_port:
                expected["portal_login_page"] = 200
            return 0 if results == expected else 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("\nstopping ...", flush=True)
        return 0
    finally:
        await worker.stop()
        if portal_runner is not None:
            await portal_runner.cleanup()
        for runner in runners:
            await runner.cleanup()
        await audit.aclose()


async def _start_portal(config: Config, audit: Any) -> tuple[Any, int | None]:
    """Start the issuance portal if this build has it."""
    try:
        from gateway.ca.portal import start_portal
    except ImportError:
        return None, None
    runner, port = await start_portal(config, audit=audit)
    return runner, port


def run_demo(directory: str | None, port: int, *, once: bool = False) -> int:
    setup_logging("warning")
    with contextlib.ExitStack() as stack:
        path = (
            Path(directory)
            if directory
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-demo-")))
        )
        path.mkdir(parents=True, exist_ok=True)
        return asyncio.run(_run(path.resolve(), port, once))
    return 1

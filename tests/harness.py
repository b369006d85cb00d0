"""A real gateway on a real port in front of real demo backends, for the tests.

Everything is real: the PKI comes from the project's builders, the gateway
terminates TLS with the production code path (TlsAcceptor + aiohttp), the
backends are aiohttp servers, and the audit events go through the same sink
interface the production writer implements.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.audit.events import AuditEvent
from gateway.certs import builders as pki
from gateway.certs.files import ThrowawayPki, write_atomic, write_private_key
from gateway.config import Config, load_config
from gateway.demo.backend import build_backend
from gateway.server import AccessFactory, GatewayWorker


def without_instance(text: str) -> str:
    """A /metrics page without the ``gateway_instance`` label every sample carries (tests name only what they test)."""
    text = re.sub(r'\{gateway_instance="[^"]*"\}', "", text)
    return re.sub(r'gateway_instance="[^"]*",|,gateway_instance="[^"]*"', "", text)


def free_port() -> int:
    """A port nobody listens on (bound, then released): for servers the tests start as subprocesses."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SYSTEMS = (("tdnet", "/onre/", "TDnet"), ("j-iriss", "/nt/", "J-IRISS"), ("clearing", "/jpxcube/", "Clearing"))


class ListAudit:
    """Collects events in memory so a test can assert on exactly what was recorded."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def record(self, event: AuditEvent) -> None:
        self.events.append(event)

    def reasons(self) -> list[str]:
        return [e.reason for e in self.events]


async def start_backend(title: str) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(build_backend(title), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


def write_config(
    directory: Path,
    the_pki: ThrowawayPki,
    backend_ports: dict[str, int],
    *,
    login_mode: str = "passthrough",
    extra: dict[str, Any] | None = None,
    backend_extra: dict[str, Any] | None = None,
) -> Path:
    """A gateway config for the harness; ``extra`` overrides top-level sections."""
    secret = directory / "session.key"
    if not secret.exists():
        write_atomic(secret, b"s" * 16 + bytes(range(48)), mode=0o600)
    backends = []
    for name, prefix, _title in SYSTEMS:
        entry: dict[str, Any] = {"name": name, "prefix": prefix, "upstream": f"http://127.0.0.1:{backend_ports[name]}"}
        if login_mode == "passthrough":
            entry["login"] = {"mode": "passthrough", "path": f"{prefix}login", "user_field": "userId"}
        entry.update(backend_extra or {})
        backends.append(entry)
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "tls": {"cert": str(the_pki.server_cert), "key": str(the_pki.server_key), "client_ca": str(the_pki.ca_cert)},
        "revocation": {"crl": str(the_pki.crl), "refresh_seconds": 3600, "grace_seconds": 3600},
        "backends": backends,
        "admin": {"host": "127.0.0.1", "port": 0},
        "users": {"database": str(directory / "gateway.db")},
        "session": {"secret_file": str(secret)},
        "audit": {"database": str(directory / "audit.db")},
        "log_level": "warning",
    }
    data.update(extra or {})
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@dataclass
class Harness:
    pki: ThrowawayPki
    config: Config
    worker: GatewayWorker
    audit: Any
    backends: dict[str, int]
    directory: Path
    _runners: list[web.AppRunner] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.worker.port}{path}"

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.worker.admin_port}{path}"

    def client_context(
        self, user: str | None = "LC000001", *, cert: Path | None = None, key: Path | None = None
    ) -> ssl.SSLContext:
        """A client SSL context trusting the CA, presenting ``user``'s certificate (or none)."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        if cert is not None:
            ctx.load_cert_chain(cert, key)
        elif user is not None:
            files = self.pki.clients[user]
            ctx.load_cert_chain(files.cert, files.key)
        return ctx

    def session(self, user: str | None = "LC000001", **kwargs: Any) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=self.client_context(user, **kwargs))
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True))

    def issue(self, user_id: str, *, name: str | None = None, **build: Any) -> tuple[Path, Path, x509.Certificate]:
        """Issue an extra (possibly odd) client certificate from the harness CA."""
        key = build.pop("key", None) or pki.generate_key()
        build.setdefault("not_before", dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
        cert = pki.build_client_cert(
            self.pki.ca_certificate, self.pki.ca_private_key, key.public_key(), user_id, **build
        )
        stem = name or f"extra-{cert.serial_number:x}"
        cert_path, key_path = self.directory / f"{stem}.crt", self.directory / f"{stem}.key"
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        write_private_key(key_path, key)
        return cert_path, key_path, cert

    async def publish_crl(
        self,
        serials: Sequence[int],
        *,
        next_update: dt.timedelta = dt.timedelta(days=1),
        this_update: dt.datetime | None = None,
        number: int = 2,
    ) -> None:
        """Write a new CRL revoking ``serials`` and make the gateway load it now."""
        now = this_update or dt.datetime.now(dt.UTC)
        crl = pki.build_crl(
            self.pki.ca_certificate,
            self.pki.ca_private_key,
            [pki.RevokedEntry(s, now) for s in serials],
            this_update=now,
            next_update=now + next_update,
            number=number,
        )
        write_atomic(self.pki.crl, crl.public_bytes(serialization.Encoding.DER))
        assert self.worker.runtime is not None
        await self.worker.runtime.refresher.refresh_all()

    async def close(self) -> None:
        await self.worker.stop()
        for runner in self._runners:
            await runner.cleanup()


async def start_harness(
    directory: Path,
    the_pki: ThrowawayPki,
    *,
    audit: Any = None,
    access_factory: AccessFactory | None = None,
    login_mode: str = "passthrough",
    extra: dict[str, Any] | None = None,
    backend_extra: dict[str, Any] | None = None,
    clock: Callable[[], dt.datetime] | None = None,
) -> Harness:
    runners, ports = [], {}
    for name, _prefix, title in SYSTEMS:
        runner, port = await start_backend(title)
        runners.append(runner)
        ports[name] = port
    config = load_config(
        write_config(directory, the_pki, ports, login_mode=login_mode, extra=extra, backend_extra=backend_extra)
    )
    sink = audit if audit is not None else ListAudit()
    worker = GatewayWorker(config, sink, access_factory=access_factory, **({"clock": clock} if clock else {}))
    try:
        await worker.start()
    except BaseException:
        for runner in runners:
            await runner.cleanup()
        raise
    return Harness(the_pki, config, worker, sink, ports, directory, runners)

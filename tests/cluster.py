"""A cluster of real processes for the several-instances tests: gateways, a portal, one PostgreSQL.

Every part is started the way an operator starts it (``gateway db migrate``,
``gateway users add``, ``gateway ca ...``, ``gateway serve``, ``gateway
portal``), each on its own ports with its own ``instance:`` name and one
``database:`` URL. A gateway can run inside a network namespace of its own
(``ip netns``), reaching PostgreSQL and the backends over a veth link like a
separate host would. The backends are real aiohttp servers in a thread of the
test process; :class:`Client` is a small synchronous HTTPS client with one
keep-alive connection and a cookie jar.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from gateway.certs.files import write_atomic
from gateway.demo.backend import build_backend
from tests.harness import SYSTEMS, free_port
from tests.pgserver import PgServer

PASSWORD = "correct horse battery 1"
INSTANCES = ("gw-a", "gw-b", "gw-c")
MAX_FAILURES = 5
OUTAGE_GRACE = 3.0

# --- the cluster ------------------------------------------------------------------------------


class Backends:
    """The three systems' demo backends on a loop in a thread of the test process."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        """``host`` is where they listen (0.0.0.0 when gateways in other network namespaces must reach them)."""
        self.host = host
        self.loop = asyncio.new_event_loop()
        self.ports: dict[str, int] = {}
        self.runners: list[web.AppRunner] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> None:
        for name, _prefix, title in SYSTEMS:
            runner = web.AppRunner(build_backend(title), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, self.host, 0)
            await site.start()
            self.ports[name] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.runners.append(runner)

    def close(self) -> None:
        async def stop() -> None:
            for runner in self.runners:
                await runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Instance:
    """One ``gateway serve`` or ``gateway portal`` process; ``host`` is where it listens (its admin too)."""

    name: str
    config: Path
    port: int
    admin_port: int
    log: Path
    host: str = "127.0.0.1"
    netns: str | None = None  # the network namespace it runs in (None: the test's own)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, *argv: str) -> None:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "gateway", *argv, "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.log.read_text(errors='replace')[-3000:]}")
            if self.health()[0] == 200:
                return
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready: {self.log.read_text(errors='replace')[-3000:]}")

    def health(self) -> tuple[int, str]:
        """/healthz of its admin listener: (status, body); (0, reason) when it does not answer."""
        conn = http.client.HTTPConnection(self.host, self.admin_port, timeout=5)
        try:
            conn.request("GET", "/healthz")
            reply = conn.getresponse()
            return reply.status, reply.read().decode("utf-8", "replace")
        except OSError as exc:
            return 0, str(exc)
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the whole namespace-exec chain gets it too (same session)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def alive_without_tracebacks(self) -> bool:
        return (
            self.proc is not None
            and self.proc.poll() is None
            and "Traceback" not in self.log.read_text("utf-8", "replace")
        )


@dataclass
class Cluster:
    """The CA, the users and the processes of one test module, on one database."""

    directory: Path
    server: PgServer
    url: str
    backends: Backends
    base: Path  # the config the CLI uses (no listener of its own)
    ca_pem: Path
    instances: dict[str, Instance] = field(default_factory=dict)
    portal: Instance | None = None
    clients: dict[str, tuple[Path, Path, int]] = field(default_factory=dict)  # user -> cert, key, serial
    open_clients: list[Client] = field(default_factory=list)  # closed after each test

    def cli(self, *args: str, stdin: str = "", check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", *args, "--config", str(self.base)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"gateway {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def add_user(self, user_id: str, systems: str = "tdnet,j-iriss,clearing") -> None:
        """A user with a password and a client certificate issued through the CLI (records in the database)."""
        self.cli("users", "add", user_id, "--systems", systems, "--password-stdin", stdin=PASSWORD + "\n")
        p12 = self.directory / f"{user_id}.p12"
        self.cli("ca", "issue", user_id, "--out", str(p12), "--format", "default")
        key, cert, _ = pkcs12.load_key_and_certificates(p12.read_bytes(), None)
        assert key is not None and cert is not None
        cert_path, key_path = self.directory / f"{user_id}.crt", self.directory / f"{user_id}.key"
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        write_atomic(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            mode=0o600,
        )
        self.clients[user_id] = (cert_path, key_path, cert.serial_number)

    def client(self, instance: str, user_id: str | None) -> Client:
        ctx = ssl.create_default_context(cafile=str(self.ca_pem))
        if user_id is not None:
            cert, key, _ = self.clients[user_id]
            ctx.load_cert_chain(cert, key)
        target = self.instances[instance]
        self.open_clients.append(Client(target.host, target.port, ctx))
        return self.open_clients[-1]

    @classmethod
    def create(
        cls, directory: Path, server: PgServer, url: str, backends: Backends, *, server_names: tuple[str, ...] = ()
    ) -> Cluster:
        """Migrate the database, create the CA and the gateways' server certificate (for ``server_names`` too)."""
        write_atomic(directory / "session.key", os.urandom(32).hex().encode() + b"\n", mode=0o600)
        base = write_yaml(directory / "base.yaml", instance_config(directory, url, backends.ports))
        cluster = cls(directory, server, url, backends, base, directory / "ca" / "ca.pem")
        cluster.cli("db", "migrate")
        cluster.cli("ca", "init")
        cluster.cli("ca", "server-cert", "127.0.0.1", "localhost", *server_names)
        return cluster

    def start_gateway(
        self,
        name: str,
        *,
        workers: int = 1,
        host: str = "127.0.0.1",
        netns: str | None = None,
        url: str | None = None,
        upstream_host: str = "127.0.0.1",
    ) -> Instance:
        """``gateway serve`` as instance ``name`` (not waited for: call :meth:`Instance.wait_ready`)."""
        port, admin = free_port(), free_port()
        data = instance_config(
            self.directory,
            url or self.url,
            self.backends.ports,
            upstream_host=upstream_host,
            instance=name,
            workers=workers,
            listen={"host": host, "port": port},
            admin={"host": host, "port": admin},
        )
        inst = Instance(name, write_yaml(self.directory / f"{name}.yaml", data), port, admin,
                        self.directory / f"{name}.log", host, netns)  # fmt: skip
        self.instances[name] = inst
        inst.start("serve")
        return inst

    def start_portal(self, name: str = "portal-1") -> Instance:
        port, admin = free_port(), free_port()
        ca = self.directory / "ca"
        data = instance_config(
            self.directory,
            self.url,
            self.backends.ports,
            instance=name,
            portal={
                "listen": {"host": "127.0.0.1", "port": port},
                "tls": {"cert": str(ca / "server.pem"), "key": str(ca / "server.key")},
                "admin": {"host": "127.0.0.1", "port": admin},
            },
        )
        self.portal = Instance(name, write_yaml(self.directory / f"{name}.yaml", data), port, admin,
                               self.directory / f"{name}.log")  # fmt: skip
        self.portal.start("portal")
        return self.portal

    def close(self) -> None:
        for inst in [*self.instances.values(), *([self.portal] if self.portal else [])]:
            inst.stop()
        while self.open_clients:
            self.open_clients.pop().close()


def instance_config(
    cluster_dir: Path, url: str, backends: dict[str, int], *, upstream_host: str = "127.0.0.1", **extra: Any
) -> dict[str, Any]:
    """One process's config: the shared database, CA, session key and spool; ``extra`` per instance."""
    ca = cluster_dir / "ca"
    data: dict[str, Any] = {
        "database": {"url": url, "outage_grace_seconds": OUTAGE_GRACE, "connect_timeout_seconds": 2},
        "listen": {"host": "127.0.0.1", "port": 0},
        "tls": {"cert": str(ca / "server.pem"), "key": str(ca / "server.key"), "client_ca": str(ca / "ca.pem")},
        "revocation": {"crl": str(ca / "crl.der"), "refresh_seconds": 3600, "grace_seconds": 3600},
        "backends": [
            {"name": name, "prefix": prefix, "upstream": f"http://{upstream_host}:{backends[name]}"}
            for name, prefix, _title in SYSTEMS
        ],
        "session": {"secret_file": str(cluster_dir / "session.key")},  # one key for every instance
        "login": {"max_failures": MAX_FAILURES, "ip_max_failures": 1000},
        "audit": {"spool_dir": str(cluster_dir / "spool")},
        "ca": {"dir": str(ca)},
        "log_level": "info",
    }
    data.update(extra)
    return data


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# --- a small synchronous HTTPS client (keep-alive, one cookie) ----------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One keep-alive TLS connection to one instance, with the session cookie it was given."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext) -> None:
        self.port = port
        self.ctx = ctx
        self.cookies: dict[str, str] = {}
        self.conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)

    def request(self, method: str, path: str, form: dict[str, str] | None = None, **headers: str) -> Reply:
        head = {"Accept": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
        if self.cookies:
            head["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urlencode(form)
            head["Content-Type"] = "application/x-www-form-urlencoded"
        self.conn.request(method, path, body=body, headers=head)
        response = self.conn.getresponse()
        text = response.read().decode("utf-8", "replace")
        for value in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = value.partition("=")
            self.cookies[name] = rest.split(";", 1)[0]
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, text)

    def get(self, path: str, **headers: str) -> Reply:
        return self.request("GET", path, **headers)

    def login(self, user_id: str, password: str = PASSWORD) -> Reply:
        page = self.get("/_gateway/login", Accept="text/html")
        token = re.search(r'name="csrf" value="([^"]+)"', page.body)
        assert token, page.body[:500]
        form = {"user_id": user_id, "password": password, "csrf": token.group(1), "next": ""}
        return self.request("POST", "/_gateway/login", form, Accept="text/html")

    def close(self) -> None:
        self.conn.close()


def session_cookie(client: Client) -> dict[str, str]:
    return {k: v for k, v in client.cookies.items() if k == "__Host-gw_session"}


def until(check: Callable[[], bool], seconds: float) -> float:
    """Seconds until ``check()`` held (polling every 20 ms); fails after ``seconds``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds} s")
        time.sleep(0.02)
    return time.monotonic() - started


def logged_in_everywhere(cluster: Cluster, user_id: str, first_at: str = "gw-a") -> dict[str, Client]:
    """Log in at one instance; copy the cookie to a keep-alive client at every instance; each serves the backend."""
    first = cluster.client(first_at, user_id)
    assert first.login(user_id).status == 303
    clients = {}
    for name in cluster.instances:
        c = cluster.client(name, user_id)
        c.cookies.update(session_cookie(first))
        reply = c.get("/onre/")
        assert reply.status == 200, (name, reply.status, reply.body[:300])
        clients[name] = c
    first.close()
    return clients


def refused_everywhere(clients: dict[str, Client], path: str = "/onre/") -> bool:
    return all(c.get(path).status in (302, 303, 401, 403) for c in clients.values())

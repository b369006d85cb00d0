"""Several instances, one truth: three ``gateway serve`` processes and a portal sharing one real PostgreSQL.

Everything here is a separate process started the way an operator starts it
(``gateway db migrate``, ``gateway users add``, ``gateway ca ...``,
``gateway serve``, ``gateway portal``), on its own ports, with its own
``instance:`` name and one ``database:`` URL. Instance C runs two workers,
so a change must reach every worker process, not only every host. The
backends are real aiohttp servers in a thread of the test process.

The tests run in file order on one cluster; each uses user IDs of its own.
The outage test stops and restarts the database server and runs last.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
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

    def __init__(self) -> None:
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
            site = web.TCPSite(runner, "127.0.0.1", 0)
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
    name: str
    config: Path
    port: int
    admin_port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class Cluster:
    directory: Path
    server: PgServer
    url: str
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
        self.open_clients.append(Client(self.instances[instance].port, ctx))
        return self.open_clients[-1]


def _config(cluster_dir: Path, url: str, backends: dict[str, int], **extra: Any) -> dict[str, Any]:
    ca = cluster_dir / "ca"
    data: dict[str, Any] = {
        "database": {"url": url, "outage_grace_seconds": OUTAGE_GRACE, "connect_timeout_seconds": 2},
        "listen": {"host": "127.0.0.1", "port": 0},
        "tls": {"cert": str(ca / "server.pem"), "key": str(ca / "server.key"), "client_ca": str(ca / "ca.pem")},
        "revocation": {"crl": str(ca / "crl.der"), "refresh_seconds": 3600, "grace_seconds": 3600},
        "backends": [
            {"name": name, "prefix": prefix, "upstream": f"http://127.0.0.1:{backends[name]}"}
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


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _start(instance: Instance, *argv: str) -> None:
    with instance.log.open("ab") as out:
        instance.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *argv, "--config", str(instance.config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_ready(instance: Instance, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert instance.proc is not None
        if instance.proc.poll() is not None:
            raise AssertionError(f"{instance.name} exited: {instance.log.read_text(errors='replace')[-3000:]}")
        if _health(instance.admin_port)[0] == 200:
            return
        time.sleep(0.1)
    raise AssertionError(f"{instance.name} not ready: {instance.log.read_text(errors='replace')[-3000:]}")


def _health(port: int) -> tuple[int, str]:
    """/healthz of an admin listener: (status, body); (0, reason) when it does not answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        reply = conn.getresponse()
        return reply.status, reply.read().decode("utf-8", "replace")
    except OSError as exc:
        return 0, str(exc)
    finally:
        conn.close()


def _stop(instance: Instance) -> None:
    if instance.proc is not None and instance.proc.poll() is None:
        instance.proc.send_signal(signal.SIGTERM)
        try:
            instance.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(instance.proc.pid, signal.SIGKILL)
            instance.proc.wait(10)


@pytest.fixture(scope="module")
def cluster(postgres: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("cluster")
    write_atomic(directory / "session.key", os.urandom(32).hex().encode() + b"\n", mode=0o600)
    url = postgres.new_database()
    backends = Backends()
    base = _write(directory / "base.yaml", _config(directory, url, backends.ports))
    cluster = Cluster(directory, postgres, url, base, directory / "ca" / "ca.pem")
    try:
        cluster.cli("db", "migrate")
        cluster.cli("ca", "init")
        cluster.cli("ca", "server-cert", "127.0.0.1", "localhost")
        for i, name in enumerate(INSTANCES):
            port, admin = free_port(), free_port()
            data = _config(
                directory,
                url,
                backends.ports,
                instance=name,
                workers=2 if i == 2 else 1,
                listen={"host": "127.0.0.1", "port": port},
                admin={"host": "127.0.0.1", "port": admin},
            )
            inst = Instance(name, _write(directory / f"{name}.yaml", data), port, admin, directory / f"{name}.log")
            cluster.instances[name] = inst
            _start(inst, "serve")
        portal_port, portal_admin = free_port(), free_port()
        portal_data = _config(
            directory,
            url,
            backends.ports,
            instance="portal-1",
            portal={
                "listen": {"host": "127.0.0.1", "port": portal_port},
                "tls": {"cert": str(directory / "ca" / "server.pem"), "key": str(directory / "ca" / "server.key")},
                "admin": {"host": "127.0.0.1", "port": portal_admin},
            },
        )
        cluster.portal = Instance(
            "portal-1", _write(directory / "portal.yaml", portal_data), portal_port, portal_admin, directory / "p.log"
        )
        _start(cluster.portal, "portal")
        for inst in [*cluster.instances.values(), cluster.portal]:
            _wait_ready(inst)
        yield cluster
    finally:
        for inst in [*cluster.instances.values(), *([cluster.portal] if cluster.portal else [])]:
            _stop(inst)
        backends.close()


@pytest.fixture(autouse=True)
def _close_clients(cluster: Cluster) -> Iterator[None]:
    yield
    while cluster.open_clients:
        cluster.open_clients.pop().close()


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

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.port = port
        self.ctx = ctx
        self.cookies: dict[str, str] = {}
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)

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


def _session_cookie(client: Client) -> dict[str, str]:
    return {k: v for k, v in client.cookies.items() if k == "__Host-gw_session"}


def _until(check: Callable[[], bool], seconds: float) -> float:
    """Seconds until ``check()`` held (polling every 20 ms); fails after ``seconds``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds} s")
        time.sleep(0.02)
    return time.monotonic() - started


def _logged_in_everywhere(cluster: Cluster, user_id: str) -> dict[str, Client]:
    """Log in at gw-a; copy the cookie to a keep-alive client at every instance; each serves the backend."""
    first = cluster.client("gw-a", user_id)
    assert first.login(user_id).status == 303
    clients = {}
    for name in INSTANCES:
        c = cluster.client(name, user_id)
        c.cookies.update(_session_cookie(first))
        reply = c.get("/onre/")
        assert reply.status == 200, (name, reply.status, reply.body[:300])
        clients[name] = c
    first.close()
    return clients


def _refused_everywhere(clients: dict[str, Client], path: str = "/onre/") -> bool:
    return all(c.get(path).status in (302, 303, 401, 403) for c in clients.values())


# --- 1. one session, every instance -------------------------------------------------------------


def test_a_session_created_at_one_instance_is_accepted_at_the_others(cluster: Cluster) -> None:
    cluster.add_user("LC100001")
    clients = _logged_in_everywhere(cluster, "LC100001")
    for name, c in clients.items():
        reply = c.get("/jpxcube/")
        assert reply.status == 200, name
        c.close()


# --- 2. ending or changing a session anywhere ends it everywhere within a second -----------------


def test_logout_at_one_instance_refuses_the_cookie_everywhere_within_a_second(cluster: Cluster) -> None:
    cluster.add_user("LC100002")
    clients = _logged_in_everywhere(cluster, "LC100002")
    page = clients["gw-b"].get("/_gateway/logout", Accept="text/html")
    token = re.search(r'name="csrf" value="([^"]+)"', page.body)
    assert token, page.body[:500]
    assert clients["gw-b"].request("POST", "/_gateway/logout", {"csrf": token.group(1)}).status in (200, 303)
    others = {k: v for k, v in clients.items() if k != "gw-b"}
    assert _until(lambda: _refused_everywhere(others), 1.0) < 1.0


@pytest.mark.parametrize(
    ("user_id", "command"),
    [
        ("LC100003", ("users", "disable", "LC100003")),
        ("LC100004", ("users", "reset-password", "LC100004")),
        ("LC100005", ("users", "set-systems", "LC100005", "--systems", "j-iriss")),
    ],
    ids=["disable", "reset-password", "set-systems"],
)
def test_a_cli_change_refuses_the_cookie_everywhere_within_a_second(
    cluster: Cluster, user_id: str, command: tuple[str, ...]
) -> None:
    cluster.add_user(user_id)
    clients = _logged_in_everywhere(cluster, user_id)
    cluster.cli(*command)
    assert _until(lambda: _refused_everywhere(clients), 1.0) < 1.0
    if command[1] == "set-systems":  # the session lives on, for the system the user still has
        assert all(c.get("/nt/").status == 200 for c in clients.values())


# --- 3. one failure count per account, whichever instance is asked ------------------------------


def _wrong(cluster: Cluster, instance: str, user_id: str) -> int:
    c = cluster.client(instance, user_id)
    try:
        return c.login(user_id, "wrong password 123").status
    finally:
        c.close()


def test_wrong_passwords_spread_over_instances_lock_after_exactly_max_failures(cluster: Cluster) -> None:
    cluster.add_user("LC100006")
    threads = [
        threading.Thread(target=_wrong, args=(cluster, INSTANCES[i % 3], "LC100006")) for i in range(MAX_FAILURES - 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    good = cluster.client("gw-c", "LC100006")
    assert good.login("LC100006").status == 303  # four failures in total: not locked yet
    good.close()
    for i in range(MAX_FAILURES):
        _wrong(cluster, INSTANCES[i % 3], "LC100006")
    for name in INSTANCES:
        c = cluster.client(name, "LC100006")
        reply = c.login("LC100006")
        assert reply.status != 303, name  # locked at every instance, the right password too
        c.close()


# --- 4. one audit trail with every instance in it ----------------------------------------------


def test_refusals_of_every_instance_land_in_one_trail_with_an_instance_column(cluster: Cluster) -> None:
    for name in INSTANCES:
        c = cluster.client(name, None)  # no certificate: refused and audited
        assert c.get("/onre/").status == 403
        c.close()

    def seen() -> set[str]:
        out = cluster.cli("audit", "list", "--format", "json", "--since", "1h", "--limit", "1000").stdout
        return {json.loads(line).get("instance", "") for line in out.splitlines() if line.strip()}

    _until(lambda: set(INSTANCES) <= seen(), 10.0)
    only_b = cluster.cli("audit", "list", "--format", "json", "--instance", "gw-b", "--since", "1h").stdout
    assert {json.loads(line)["instance"] for line in only_b.splitlines() if line.strip()} == {"gw-b"}


# --- 5. a revocation in the CA reaches every gateway, open connections too ----------------------


def test_a_revocation_is_refused_at_every_instance_within_a_second_on_open_connections(cluster: Cluster) -> None:
    cluster.add_user("LC100007")
    clients = _logged_in_everywhere(cluster, "LC100007")
    serial = cluster.clients["LC100007"][2]
    cluster.cli("ca", "revoke", f"{serial:X}", "--reason", "keyCompromise")
    elapsed = _until(lambda: _refused_everywhere(clients), 1.0)
    assert elapsed < 1.0
    for c in clients.values():
        c.close()


def test_concurrent_issues_for_one_user_yield_exactly_one_valid_certificate(cluster: Cluster) -> None:
    cluster.cli("users", "add", "LC100008", "--systems", "tdnet", "--password-stdin", stdin=PASSWORD + "\n")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "ca",
                "issue",
                "LC100008",
                "--config",
                str(cluster.base),
                "--out",
                str(cluster.directory / f"race-{i}.p12"),
                "--format",
                "default",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(4)
    ]
    codes = [p.wait(120) for p in procs]
    assert codes.count(0) == 1, codes
    listing = cluster.cli("ca", "list", "--user", "LC100008").stdout
    rows = [line for line in listing.splitlines()[1:] if "LC100008" in line]
    assert len(rows) == 1 and "Valid (有効)" in rows[0], listing  # one certificate, and it is valid


# --- 6. PostgreSQL stops while the gateways run ------------------------------------------------


def test_a_database_outage_refuses_logins_serves_sessions_for_the_grace_then_recovers(cluster: Cluster) -> None:
    if cluster.server.external:
        pytest.fail("this test stops the database server; run it on the tests' own server (unset DATABASE_URL)")
    cluster.add_user("LC100009")
    clients = _logged_in_everywhere(cluster, "LC100009")
    support_ids: list[str] = []  # every refusal during the outage: each must reach the trail exactly once
    cluster.server.pg_ctl("stop", mode="immediate")
    try:
        stopped = time.monotonic()
        for c in clients.values():
            assert c.get("/onre/").status == 200  # within the grace: served from memory
        fresh = cluster.client("gw-a", "LC100009")
        login = fresh.login("LC100009")
        assert login.status == 503 and "service_unavailable" in login.body
        fresh.close()
        for name in INSTANCES:  # audited refusals while the database is down: spooled
            c = cluster.client(name, None)
            reply = c.get("/onre/")
            assert reply.status == 403
            support_ids.append(reply.json()["support_id"])
            c.close()
        status, body = _health(cluster.instances["gw-a"].admin_port)
        assert status == 503 and "database" in body, body
        time.sleep(max(0.0, OUTAGE_GRACE + 0.5 - (time.monotonic() - stopped)))
        for c in clients.values():
            reply = c.get("/onre/")
            assert reply.status == 503 and reply.json()["error"] == "service_unavailable"  # past the grace
            support_ids.append(reply.json()["support_id"])
    finally:
        cluster.server.pg_ctl("start")
    _until(lambda: all(c.get("/onre/").status == 200 for c in clients.values()), 20.0)
    _until(lambda: all(sid in _support_ids(cluster) for sid in support_ids), 20.0)
    time.sleep(1.0)  # a duplicate replay would show up by now
    trail = _support_ids(cluster)
    assert {sid: trail.count(sid) for sid in support_ids} == dict.fromkeys(support_ids, 1)
    for inst in cluster.instances.values():
        assert inst.proc is not None and inst.proc.poll() is None, inst.log.read_text()[-2000:]
        assert inst.log.read_text(errors="replace").count("Traceback") == 0


def _support_ids(cluster: Cluster) -> list[str]:
    out = cluster.cli("audit", "list", "--format", "json", "--since", "1h", "--limit", "100000").stdout
    return [json.loads(line)["support_id"] for line in out.splitlines() if line.strip()]

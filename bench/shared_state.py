"""Shared state in PostgreSQL against SQLite files: keep-alive, logins, revocation push, audit throughput.

    python -m bench.shared_state [--seconds N] [--quick] [--no-save]
    ./dev.sh bench shared-state [--seconds N] [--quick]

Starts its own PostgreSQL (initdb + pg_ctl as in tests/pgserver.py, as the ``postgres`` user when root,
``fsync=on``), the bench backend, and gateways as real ``gateway serve`` processes:

1. keep-alive, one gateway (one worker), 50 connections, logged in: SQLite and PostgreSQL interleaved twice;
2. logins per second (GET the login page + POST, argon2 included), a few concurrent clients;
3. revocation propagation: three instances + the CA records on one PostgreSQL; 100 certificates revoked
   one after the other through ``CertificateAuthority.revoke``; time from the revocation's commit until each
   instance refuses an open keep-alive connection of that certificate;
4. audit: the three instances refusing requests without a certificate at full speed (autocannon against each);
   events/s written to the shared ``events`` table and the row count checked against the refusals sent.

CPU per unit (from /proc, every process of the gateway) is printed first: the box may be shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import re
import resource
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import yaml

from bench import load, machine, procs
from bench.fixtures import OUT, PASSWORD, USER, BenchPki, ensure_crl, load_pki
from bench.run import log
from bench.servers import PY, ROOT, Backend, Gateway, client_ssl
from tests.pgserver import PgServer

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Shared state: PostgreSQL vs SQLite"
SYSTEMS = ("tdnet", "j-iriss", "clearing")
INSTANCES = ("gw-a", "gw-b", "gw-c")
PG_OPTIONS = ("fsync=on", "full_page_writes=on")  # durable, as in production (tests/pgserver.py turns it off)


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile (``pct`` in 0-100) of ``values``; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil(n * pct / 100), at least 1
    return ordered[int(rank) - 1]


def gateway_cli(config: Path, *args: str, stdin: str = "") -> str:
    """``gateway ARGS --config CONFIG``; its stdout, or an error with its output."""
    done = subprocess.run(
        [PY, "-m", "gateway", *args, "--config", str(config)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"gateway {' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done.stdout


# --- the systems ---------------------------------------------------------------------------------


@dataclass
class PgGateway(Gateway):
    """:class:`Gateway` with ``database:`` (users, sessions, failures, audit in PostgreSQL)."""

    url: str = ""
    instance: str = "bench-pg"
    name: str = "gateway-pg"

    def write_config(self) -> Path:
        path = super().write_config()
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        del data["users"]
        data["audit"] = {"spool_dir": str(self.workdir / f"spool-{self.instance}")}
        data["database"] = {"url": self.url}
        data["instance"] = self.instance
        self.config_path = self.workdir / f"{self.instance}.yaml"
        self.config_path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return self.config_path

    def ensure_user(self) -> None:
        gateway_cli(self.config_path, "db", "migrate")
        if USER not in gateway_cli(self.config_path, "users", "list"):  # each run has a fresh database
            add = ("users", "add", USER, "--systems", ",".join(SYSTEMS), "--password-stdin")
            gateway_cli(self.config_path, *add, stdin=PASSWORD + "\n")


def keepalive(
    gw: Gateway, pki: BenchPki, backend: Backend, seconds: float, conns: int, database: procs.CpuMeter
) -> dict[str, Any]:
    """autocannon at ``gw`` with LC000001's certificate and session cookie; CPU per request first.

    ``database``: PostgreSQL's meter, whose CPU counts per request beside the gateway's (SQLite's is in-process).
    """
    url = f"https://127.0.0.1:{gw.port}/onre/tiny"
    headers = {"Cookie": gw.cookie}
    load.autocannon(url, conns, 1, headers, pki)  # warm-up
    assert backend.proc is not None
    server, back = procs.CpuMeter(gw.all_pids()).start(), procs.CpuMeter([backend.proc.pid]).start()
    database.start()
    res = load.autocannon(url, conns, seconds, headers, pki)
    server.stop()
    back.stop()
    database.stop()
    total = max(1, res.ok + res.bad)
    return {
        "gateway_cpu_us": 1e6 * server.cpu / total,
        "postgres_cpu_us": 1e6 * database.cpu / total,
        "backend_cpu_us": 1e6 * back.cpu / total,
        "loadgen_cpu_us": 1e6 * res.client_cpu / total,
        "rps": res.requests_per_second,
        "p99_ms": res.p99_ms,
        "non_200": res.bad,
        "errors": res.errors,
    }


async def _login_loop(port: int, ctx: ssl.SSLContext, user: str, stop_at: float, counts: list[int]) -> None:
    base = f"https://127.0.0.1:{port}"
    jar = aiohttp.DummyCookieJar()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=1), cookie_jar=jar) as http:
        while time.perf_counter() < stop_at:
            async with http.get(base + "/_gateway/login") as resp:
                page = await resp.text()
                csrf_cookie = resp.cookies["__Host-gw_csrf"].value
            match = re.search(r'name="csrf" value="([^"]+)"', page)
            if match is None:
                counts[1] += 1
                continue
            form = {"user_id": user, "password": PASSWORD, "csrf": match.group(1)}
            headers = {"Cookie": f"__Host-gw_csrf={csrf_cookie}"}
            async with http.post(base + "/_gateway/login", data=form, headers=headers, allow_redirects=False) as resp:
                await resp.read()
                if resp.status == 303 and "__Host-gw_session" in resp.cookies:
                    counts[0] += 1
                else:
                    counts[1] += 1


def logins(gw: Gateway, pki: BenchPki, seconds: float, clients: int, database: procs.CpuMeter) -> dict[str, Any]:
    """``clients`` concurrent loops of GET login page + POST (303 with a session cookie = one login)."""
    ctx = client_ssl(pki)
    counts = [0, 0]

    async def run(duration: float) -> None:
        stop_at = time.perf_counter() + duration
        await asyncio.gather(*(_login_loop(gw.port, ctx, USER, stop_at, counts) for _ in range(clients)))

    asyncio.run(run(1.0))  # warm-up
    counts[:] = [0, 0]
    meter = procs.CpuMeter(gw.all_pids()).start()
    database.start()
    client_before = procs.cpu_seconds([os.getpid()])
    asyncio.run(run(seconds))
    meter.stop()
    database.stop()
    client_cpu = procs.cpu_seconds([os.getpid()]) - client_before
    ok = max(1, counts[0])
    return {
        "gateway_cpu_ms": 1e3 * meter.cpu / ok,
        "postgres_cpu_ms": 1e3 * database.cpu / ok,
        "client_cpu_ms": 1e3 * client_cpu / ok,
        "per_second": counts[0] / meter.wall,
        "logins": counts[0],
        "failed": counts[1],
    }


# --- the cluster: three instances and the CA on one PostgreSQL -----------------------------------


@dataclass
class Instance:
    name: str
    config: Path
    port: int
    admin_port: int
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class Cluster:
    directory: Path
    url: str
    backend_port: int
    base: Path = field(default=Path())
    instances: list[Instance] = field(default_factory=list)

    def config(self, **extra: Any) -> dict[str, Any]:
        ca = self.directory / "ca"
        data: dict[str, Any] = {
            "database": {"url": self.url},
            "listen": {"host": "127.0.0.1", "port": 0},
            "tls": {"cert": str(ca / "server.pem"), "key": str(ca / "server.key"), "client_ca": str(ca / "ca.pem")},
            "revocation": {"crl": str(ca / "crl.der"), "refresh_seconds": 3600, "grace_seconds": 3600},
            "backends": [
                {"name": name, "prefix": prefix, "upstream": f"http://127.0.0.1:{self.backend_port}"}
                for name, prefix in zip(SYSTEMS, ("/onre/", "/nt/", "/jpxcube/"), strict=True)
            ],
            "session": {"secret_file": str(self.directory / "session.key")},
            "login": {"ip_max_failures": 100000},
            "audit": {"spool_dir": str(self.directory / "spool")},
            "ca": {"dir": str(ca)},
            "log_level": "warning",
        }
        data.update(extra)
        return data

    def write(self, name: str, data: dict[str, Any]) -> Path:
        path = self.directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    def start(self) -> Cluster:
        (self.directory / "session.key").write_bytes(os.urandom(32).hex().encode() + b"\n")
        (self.directory / "session.key").chmod(0o600)
        self.base = self.write("base", self.config())
        gateway_cli(self.base, "db", "migrate")
        gateway_cli(self.base, "ca", "init")
        gateway_cli(self.base, "ca", "server-cert", "127.0.0.1", "localhost")
        for name in INSTANCES:
            port, admin = procs.free_port(), procs.free_port()
            data = self.config(
                instance=name,
                workers=1,
                listen={"host": "127.0.0.1", "port": port},
                admin={"host": "127.0.0.1", "port": admin},
            )
            inst = Instance(name, self.write(name, data), port, admin)
            argv = [PY, "-m", "gateway", "serve", "--config", str(inst.config)]
            inst.proc = procs.start(argv, self.directory / f"{name}.log", env=_env())
            self.instances.append(inst)
        for inst in self.instances:
            procs.wait_port(inst.port, 120, inst.proc)
        return self

    def stop(self) -> None:
        for inst in self.instances:
            procs.stop(inst.proc)

    def pids(self) -> list[int]:
        return [p for inst in self.instances if inst.proc is not None for p in procs.tree(inst.proc.pid)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ":".join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


class _StampedRecords:
    """The CA's records, noting when :meth:`revoke` returned (the revocation and its push committed)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.committed = 0.0

    def revoke(self, *args: Any, **kwargs: Any) -> Any:
        result = self.inner.revoke(*args, **kwargs)
        self.committed = time.perf_counter()
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class Holder:
    """A user with a certificate (PEM files) and a session cookie."""

    user_id: str
    cert: Path
    key: Path
    serial: int
    cookie: str = ""


def _https(port: int, ctx: ssl.SSLContext) -> Any:
    import http.client

    return http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)


def _get(conn: Any, path: str, cookie: str) -> int:
    conn.request("GET", path, headers={"Cookie": cookie, "Accept": "application/json"})
    reply = conn.getresponse()
    reply.read()
    return int(reply.status)


def _login_sync(port: int, ctx: ssl.SSLContext, user: str) -> str:
    from urllib.parse import urlencode

    conn = _https(port, ctx)
    try:
        conn.request("GET", "/_gateway/login", headers={"Accept": "text/html"})
        reply = conn.getresponse()
        page = reply.read().decode()
        csrf_cookie = next(
            v.split(";", 1)[0] for v in reply.headers.get_all("Set-Cookie") or [] if v.startswith("__Host-gw_csrf=")
        )
        token = re.search(r'name="csrf" value="([^"]+)"', page)
        assert token, page[:300]
        body = urlencode({"user_id": user, "password": PASSWORD, "csrf": token.group(1)})
        headers = {"Cookie": csrf_cookie, "Content-Type": "application/x-www-form-urlencoded"}
        conn.request("POST", "/_gateway/login", body=body, headers=headers)
        reply = conn.getresponse()
        reply.read()
        session = [v.split(";", 1)[0] for v in reply.headers.get_all("Set-Cookie") or [] if "gw_session=" in v]
        if reply.status != 303 or not session:
            raise RuntimeError(f"login of {user}: HTTP {reply.status}")
        return session[0]
    finally:
        conn.close()


def make_holders(cluster: Cluster, count: int) -> tuple[list[Holder], Any, Any]:
    """``count`` users (one password hash), each with a certificate from the CA; the CA and its backend."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    from gateway.access.passwords import hash_password
    from gateway.ca.authority import CaSettings, CertificateAuthority
    from gateway.certs.files import write_atomic
    from gateway.config import load_config
    from gateway.storage.backends import Backend as StorageBackend

    config = load_config(cluster.base)
    assert config.ca is not None
    backend = StorageBackend(config, role="bench")
    settings = CaSettings.from_config(config.ca)
    records = _StampedRecords(backend.issuance(config.ca.dir, busy_timeout=settings.busy_timeout))
    ca = CertificateAuthority.open(config.ca.dir, settings, records)  # type: ignore[arg-type]
    users = backend.users()
    hashed = hash_password(PASSWORD)
    now = dt.datetime.now(dt.UTC)
    holders = []
    for i in range(count):
        user_id = f"LC{500001 + i:06d}"
        if users.get_user(user_id) is None:
            users.add_user(user_id, hashed, SYSTEMS, now=now)
        issued = ca.issue_client(user_id, now, "bench")
        key, cert, _ = pkcs12.load_key_and_certificates(issued.pkcs12, None)
        assert key is not None and cert is not None
        cert_path, key_path = cluster.directory / f"{user_id}.crt", cluster.directory / f"{user_id}.key"
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_atomic(key_path, key_pem, mode=0o600)
        holders.append(Holder(user_id, cert_path, key_path, cert.serial_number))
    return holders, ca, backend


def _ctx(cluster: Cluster, holder: Holder | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cluster.directory / "ca" / "ca.pem"))
    if holder is not None:
        ctx.load_cert_chain(holder.cert, holder.key)
    return ctx


def _watch(
    conn: Any, cookie: str, started: threading.Event, refused: list[tuple[float, int]], i: int, poll: float
) -> None:
    """Poll one open connection every ``poll`` s until it is refused; note when and how in ``refused[i]``."""
    started.wait()
    deadline = time.perf_counter() + 10
    while time.perf_counter() < deadline:
        try:
            status = _get(conn, "/onre/tiny", cookie)
        except OSError:
            status = 0  # closed after a refusal counts as refused
        if status != 200:
            refused[i] = (time.perf_counter(), status)
            return
        time.sleep(poll)


def revocations(cluster: Cluster, count: int, poll: float = 0.002) -> dict[str, Any]:
    """Revoke ``count`` certificates one by one; per instance, seconds from commit to the first refusal."""
    from gateway.ca.issuance import RevocationReason

    log(f"revocation: issuing {count} certificates and logging each user in")
    holders, ca, backend = make_holders(cluster, count)
    try:
        for h in holders:
            h.cookie = _login_sync(cluster.instances[0].port, _ctx(cluster, h), h.user_id)
        delays: list[float] = []
        statuses: dict[int, int] = {}  # the refusals' HTTP status (0: the connection was closed)
        missed = 0
        for n, h in enumerate(holders):
            ctx = _ctx(cluster, h)
            conns = [_https(inst.port, ctx) for inst in cluster.instances]
            for conn in conns:
                status = _get(conn, "/onre/tiny", h.cookie)
                if status != 200:
                    raise RuntimeError(f"{h.user_id}: HTTP {status} before its revocation")
            refused: list[tuple[float, int]] = [(0.0, 0)] * len(conns)
            started = threading.Event()
            threads = [
                threading.Thread(target=_watch, args=(c, h.cookie, started, refused, i, poll))
                for i, c in enumerate(conns)
            ]
            for t in threads:
                t.start()
            started.set()
            ca.revoke(h.serial, RevocationReason("keyCompromise"), dt.datetime.now(dt.UTC), "bench")
            for t in threads:
                t.join(15)
            for at, status in refused:
                if at == 0.0:
                    missed += 1
                else:
                    delays.append(max(0.0, at - ca.records.committed))
                    statuses[status] = statuses.get(status, 0) + 1
            for conn in conns:
                conn.close()
            if (n + 1) % 25 == 0:
                log(f"  {n + 1}/{count} revoked, p99 so far {1e3 * percentile(delays, 99):.0f} ms")
    finally:
        backend.close()
    return {
        "revocations": count,
        "observations": len(delays),
        "missed": missed,
        "p50_ms": 1e3 * percentile(delays, 50),
        "p99_ms": 1e3 * percentile(delays, 99),
        "max_ms": 1e3 * max(delays, default=0.0),
        "poll_ms": 1e3 * poll,
        "statuses": ", ".join(f"{count} × HTTP {code}" for code, count in sorted(statuses.items())),
    }


def _count_events(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
    return int(row[0]) if row else 0


def _autocannon_nocert(port: int, conns: int, amount: int, cafile: Path) -> load.KeepAliveResult:
    """autocannon without a client certificate, exactly ``amount`` requests (so every answer is counted).

    ``Accept: application/json`` gets the 149-byte JSON refusal instead of the 4.4 KB page: less work
    for the load generator, which shares the cores; the gateway audits both the same way.
    """
    argv = [
        str(load.autocannon_bin()), "--json", "-c", str(conns), "-a", str(amount), "-t", "10",
        "--ca", str(cafile), "-H", "Accept: application/json", f"https://127.0.0.1:{port}/onre/tiny",
    ]  # fmt: skip
    out, wall, cpu = load.run_timed(argv, 600)
    return load.parse_autocannon(out, wall, cpu)


def audit(cluster: Cluster, seconds: float, conns: int, database: procs.CpuMeter) -> dict[str, Any]:
    """Every instance refusing requests without a certificate at once; rows in ``events`` against refusals."""
    cafile = cluster.directory / "ca" / "ca.pem"
    probe = [_autocannon_nocert(inst.port, conns, 2000, cafile) for inst in cluster.instances]  # warm-up + pace
    pace = sum(r.bad + r.ok for r in probe) / max(1e-6, sum(r.seconds for r in probe))
    per_instance = max(1000, int(pace * seconds / len(cluster.instances)))
    time.sleep(1.0)
    before = _settled(cluster.url, 30)
    meter = procs.CpuMeter(cluster.pids()).start()
    database.start()
    loadgen_before = _children_cpu()
    started = time.perf_counter()
    results: list[load.KeepAliveResult] = [None] * len(cluster.instances)  # type: ignore[list-item]

    def drive(i: int, inst: Instance) -> None:
        results[i] = _autocannon_nocert(inst.port, conns, per_instance, cafile)

    threads = [threading.Thread(target=drive, args=(i, inst)) for i, inst in enumerate(cluster.instances)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load_done = time.perf_counter()
    loadgen_cpu = _children_cpu() - loadgen_before  # the three tools together (RUSAGE_CHILDREN is per process)
    refusals = sum(r.bad for r in results)
    served = sum(r.ok for r in results)
    expected = before + refusals
    written = _count_events(cluster.url)
    while written < expected and time.perf_counter() - load_done < 60:
        time.sleep(0.05)
        written = _count_events(cluster.url)
    drained = time.perf_counter()
    meter.stop()
    database.stop()
    time.sleep(1.0)
    final = _count_events(cluster.url)  # a duplicate or a late row shows up by now
    rows = final - before
    return {
        "events_per_second": rows / (drained - started),
        "refusals_per_second": refusals / (load_done - started),
        "drain_seconds": drained - load_done,
        "refusals": refusals,
        "rows": rows,
        "lost": refusals - rows,
        "served_200": served,
        "errors": "; ".join(r.errors for r in results if r.errors),
        "gateway_cpu_us": 1e6 * meter.cpu / max(1, refusals),
        "postgres_cpu_us": 1e6 * database.cpu / max(1, refusals),
        "loadgen_cpu_us": 1e6 * loadgen_cpu / max(1, refusals),
        "seconds": load_done - started,
    }


def store_capacity(cluster: Cluster, per_instance: int, database: procs.CpuMeter) -> dict[str, Any]:
    """The events table alone, no HTTP: one thread per instance appends ``per_instance`` refusal events
    through the gateway's own ``PgAuditStore.append`` (hash chain included) in the writer's batch size."""
    from gateway.audit.events import AuditEvent, EventKind
    from gateway.audit.writer import BATCH_SIZE
    from gateway.config import load_config
    from gateway.storage.backends import Backend as StorageBackend

    def write(inst: Instance) -> None:
        with StorageBackend(load_config(inst.config), role="bench") as backend:
            store = backend.audit()
            for start in range(0, per_instance, BATCH_SIZE):
                size = min(BATCH_SIZE, per_instance - start)
                store.append(
                    [
                        AuditEvent(
                            event=EventKind.REQUEST_REFUSED,
                            reason="no_certificate",
                            client_ip="127.0.0.1",
                            method="GET",
                            path="/onre/tiny",
                            instance=f"{inst.name}-store",
                        )
                        for _ in range(size)
                    ]
                )
            store.close()

    before = _count_events(cluster.url)
    threads = [threading.Thread(target=write, args=(inst,)) for inst in cluster.instances]
    meter = procs.CpuMeter([os.getpid()]).start()
    database.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    meter.stop()
    database.stop()
    rows = _count_events(cluster.url) - before
    return {
        "events_per_second": rows / meter.wall,
        "rows": rows,
        "sent": per_instance * len(cluster.instances),
        "writer_cpu_us": 1e6 * meter.cpu / max(1, rows),
        "postgres_cpu_us": 1e6 * database.cpu / max(1, rows),
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _settled(url: str, timeout: float) -> int:
    """The events count once it stops moving (the warm-up's writers drained)."""
    last, deadline = -1, time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        now = _count_events(url)
        if now == last:
            return now
        last = now
        time.sleep(0.5)
    return last


# --- the run ------------------------------------------------------------------------------------


class PgMeter(procs.CpuMeter):
    """PostgreSQL's CPU: the postmaster and its live backends, plus what exited backends used.

    A backend (one per connection) that exits in between is reaped by the postmaster, whose
    cutime/cstime (/proc/<pid>/stat fields 16-17) then include it, so no connection is missed.
    """

    def __init__(self, server: PgServer) -> None:
        assert server.dir is not None
        self.postmaster = int((server.dir / "data" / "postmaster.pid").read_text().split()[0])
        super().__init__([self.postmaster])

    def _total(self) -> float:
        fields = Path(f"/proc/{self.postmaster}/stat").read_text().rsplit(")", 1)[1].split()
        reaped = (int(fields[13]) + int(fields[14])) / procs.TICKS
        return procs.cpu_seconds(procs.tree(self.postmaster)) + reaped

    def start(self) -> PgMeter:
        super().start()
        self._before = self._total()
        return self

    def stop(self) -> PgMeter:
        super().stop()
        self.cpu = self._total() - self._before
        return self


class NoMeter(procs.CpuMeter):
    """No PostgreSQL (the SQLite gateway): zero."""

    def __init__(self) -> None:
        super().__init__([])


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@contextlib.contextmanager
def postgres() -> Iterator[PgServer]:
    server = PgServer(options=PG_OPTIONS)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def run(seconds: float, quick: bool, workdir: Path, pki: BenchPki) -> dict[str, Any]:
    out: dict[str, Any] = {"load": [loadavg()]}
    crl = ensure_crl(pki, 0, log=log)
    backend = Backend(workdir).start()
    try:
        with postgres() as pg:
            log(f"PostgreSQL on port {pg.port} ({', '.join(PG_OPTIONS)})")
            sqlite_dir, pg_dir = workdir / "sqlite", workdir / "pg"
            sqlite_dir.mkdir()
            pg_dir.mkdir()
            sqlite = Gateway(sqlite_dir, pki, backend.port, 1, crl)
            pgw = PgGateway(pg_dir, pki, backend.port, 1, crl, url=pg.new_database())
            for gw in (sqlite, pgw):
                gw.start()
            try:
                rows: dict[str, list[dict[str, Any]]] = {"sqlite": [], "postgres": []}
                for rnd in range(2):
                    for label, gw in (("sqlite", sqlite), ("postgres", pgw)):
                        row = keepalive(gw, pki, backend, seconds, 50, PgMeter(pg) if gw is pgw else NoMeter())
                        rows[label].append(row)
                        log(
                            f"keep-alive {label} #{rnd + 1}: {row['gateway_cpu_us']:.0f} µs/req, {row['rps']:.0f} req/s"
                        )
                out["keepalive"] = rows
                out["load"].append(loadavg())
                login_rows: dict[str, dict[str, Any]] = {}
                for label, gw in (("sqlite", sqlite), ("postgres", pgw)):
                    login_rows[label] = logins(gw, pki, max(3.0, seconds), 4, PgMeter(pg) if gw is pgw else NoMeter())
                    r = login_rows[label]
                    log(f"logins {label}: {r['gateway_cpu_ms']:.1f} ms CPU/login, {r['per_second']:.1f}/s")
                out["logins"] = login_rows
                out["load"].append(loadavg())
            finally:
                for gw in (sqlite, pgw):
                    gw.stop()
            cluster = Cluster(workdir / "cluster", pg.new_database(), backend.port)
            cluster.directory.mkdir()
            cluster.start()
            try:
                out["revocation"] = revocations(cluster, 20 if quick else 100)
                r = out["revocation"]
                log(f"revocation: p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, max {r['max_ms']:.0f} ms")
                out["load"].append(loadavg())
                out["audit"] = audit(cluster, seconds, 50, PgMeter(pg))
                a = out["audit"]
                log(f"audit: {a['events_per_second']:.0f} events/s, {a['rows']} rows for {a['refusals']} refusals")
                out["load"].append(loadavg())
                out["store"] = store_capacity(cluster, 10_000 if quick else 30_000, PgMeter(pg))
                log(f"audit store alone: {out['store']['events_per_second']:.0f} events/s")
            finally:
                cluster.stop()
    finally:
        backend.stop()
    return out


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows) if rows else 0.0


def render(res: dict[str, Any], desc: dict[str, str], command: str, seconds: float) -> str:
    lines = [
        f"{SECTION}",
        "",
        f"{desc['date']}, `{command}`, {desc['cpu']} × {desc['cores']} cores, Python {desc['python']}, "
        f"autocannon {load.AUTOCANNON_VERSION} (1 thread). PostgreSQL {_pg_version()} on loopback, "
        f"{', '.join(PG_OPTIONS)}; SQLite in WAL with synchronous=NORMAL (the gateway's setting).",
        f"Load average (1/5/15 min) at start and after each figure: {' → '.join(res['load'])}. "
        "**The box is shared with other work right now**: throughput moves with it; CPU per unit is the figure "
        "to trust.",
        "",
        f"**1. Keep-alive, one gateway (1 worker), 50 connections, logged in, {seconds:.0f} s per run, "
        "interleaved SQLite, PostgreSQL, SQLite, PostgreSQL**",
        "",
        "| state | gateway CPU µs/req | PostgreSQL µs/req | backend µs/req | loadgen µs/req | req/s | p99 ms "
        "| non-200 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ka = res["keepalive"]
    for i in range(len(ka["sqlite"])):
        for label in ("sqlite", "postgres"):
            r = ka[label][i]
            lines.append(
                f"| {label} #{i + 1} | {r['gateway_cpu_us']:.0f} | {_pg_cell(label, r['postgres_cpu_us'])} "
                f"| {r['backend_cpu_us']:.0f} | "
                f"{r['loadgen_cpu_us']:.0f} | {r['rps']:,.0f} | {r['p99_ms']:.0f} | {r['non_200']}"
                f"{' (' + r['errors'] + ')' if r['errors'] else ''} |"
            )
    cpu_s, cpu_p = _mean(ka["sqlite"], "gateway_cpu_us"), _mean(ka["postgres"], "gateway_cpu_us")
    rps_s, rps_p = _mean(ka["sqlite"], "rps"), _mean(ka["postgres"], "rps")
    ratio = rps_p / rps_s if rps_s else 0.0
    lines += [
        f"| **PostgreSQL / SQLite** (means) | **{cpu_p / cpu_s:.2f}x** | | | | **{100 * ratio:.0f} %** | | |",
        "",
        f"Target PG/SQLite req/s ≥ 90 %: **{'met' if ratio >= 0.9 else 'not met'}** ({100 * ratio:.0f} %; CPU per "
        f"request PG/SQLite {100 * cpu_s / cpu_p:.0f} % of the efficiency).",
        "",
        f"**2. Logins** (GET login page + POST, argon2 included; 4 concurrent clients, {max(3.0, seconds):.0f} s)",
        "",
        "| state | gateway CPU ms/login | PostgreSQL ms/login | client CPU ms/login | logins/s | failed |",
        "|---|---|---|---|---|---|",
    ]
    for label in ("sqlite", "postgres"):
        r = res["logins"][label]
        lines.append(
            f"| {label} | {r['gateway_cpu_ms']:.1f} | {_pg_cell(label, r['postgres_cpu_ms'], 1)} "
            f"| {r['client_cpu_ms']:.1f} | {r['per_second']:.1f} "
            f"| {r['failed']} |"
        )
    rv = res["revocation"]
    lines += [
        "",
        f"**3. Revocation propagation**: three `gateway serve` instances (1 worker each) and the CA records on one "
        f"PostgreSQL; {rv['revocations']} certificates revoked one after the other (`CertificateAuthority.revoke`, "
        "the CLI's and portal's path), from the commit to the first refusal on an open keep-alive connection "
        f"of that certificate at each instance (polled every {rv['poll_ms']:.0f} ms)",
        "",
        "| observations (revocations × 3) | missed (not refused within 10 s) | p50 ms | p99 ms | max ms "
        "| goal p99 < 1 s |",
        "|---|---|---|---|---|---|",
        f"| {rv['observations']} | {rv['missed']} | {rv['p50_ms']:.0f} | {rv['p99_ms']:.0f} | {rv['max_ms']:.0f} | "
        f"**{'met' if rv['p99_ms'] < 1000 and not rv['missed'] else 'not met'}** |",
        "",
        f"Refusals seen: {rv['statuses']}.",
    ]
    a = res["audit"]
    lines += [
        "",
        "**4. Audit**: the three instances refusing requests without a certificate (one autocannon each, 50 "
        "connections, a fixed number of requests so every answer is counted), rows in the shared `events` table "
        "after the writers drained",
        "",
        "| gateway CPU µs/refusal (3 instances) | PostgreSQL µs/event | loadgen µs/refusal | refusals/s "
        "| events/s written (to drained) | drain after load s | refusals | rows | lost | target ≥ 5,000 events/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {a['gateway_cpu_us']:.0f} | {a['postgres_cpu_us']:.0f} | {a['loadgen_cpu_us']:.0f} "
        f"| {a['refusals_per_second']:,.0f} | "
        f"{a['events_per_second']:,.0f} | {a['drain_seconds']:.1f} | {a['refusals']:,} | {a['rows']:,} | {a['lost']} "
        f"| **{'met' if a['events_per_second'] >= 5000 else 'not met'}** |",
    ]
    if a["served_200"] or a["errors"]:
        lines.append(f"\n(answers that were not refusals: {a['served_200']}; tool errors: {a['errors'] or 'none'})")
    st = res["store"]
    lines += [
        "",
        "**4b. The events table alone** (no HTTP): three threads, one per instance name, append "
        f"{st['sent'] // 3:,} refusal events each through `PgAuditStore.append` (hash chain included) in the "
        "audit writer's batches of 500",
        "",
        "| writer CPU µs/event (Python, GIL-shared) | PostgreSQL µs/event | events/s | rows / sent |",
        "|---|---|---|---|",
        f"| {st['writer_cpu_us']:.0f} | {st['postgres_cpu_us']:.0f} | {st['events_per_second']:,.0f} "
        f"| {st['rows']:,} / {st['sent']:,} |",
    ]
    return "\n".join(lines) + "\n"


def _pg_cell(label: str, value: float, digits: int = 0) -> str:
    return f"{value:.{digits}f}" if label == "postgres" else "–"


def _pg_version() -> str:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)
    return found[0].parent.parent.name if found else "?"


def save(text: str) -> None:
    current = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    RESULTS.write_text(current.rstrip("\n") + "\n\n" + text, encoding="utf-8")


def main(argv: list[str] | None = None, prog: str = "python -m bench.shared_state") -> int:
    args_list = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=None, help="seconds per load figure (default 10, quick 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 s per figure, 20 revocations")
    p.add_argument("--no-save", action="store_true", help="print the table but leave bench/RESULTS.md alone")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = p.parse_args(args_list)
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    load.autocannon_bin(log)
    OUT.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="shared-", dir=OUT))
    log(f"work directory {workdir}")
    pki = load_pki(log)
    try:
        res = run(seconds, args.quick, workdir, pki)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    command = f"{prog} {shlex.join(args_list)}"
    text = render(res, machine.describe(), command.strip(), seconds)
    print()
    print(text)
    if not args.no_save:
        save(text)
        log(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Soak: `gateway serve` with 2 workers under mixed load, CRL refreshes and two SIGHUP reloads.

    .venv/bin/python -m bench.soak [--minutes 10] [--idle-connections 10000]

Loopback only, bounded in time and connections. The load is a closed loop
per kind, paced so the box is busy but not saturated:

* **handshake**: a new TLS connection per request (certificate-only backend);
* **keepalive**: logged-in users on kept-alive connections (gateway login);
* **refused**: a revoked certificate (403 ``certificate_revoked``, audited);
* **login**: a full login (GET /_gateway/login, POST /_gateway/login; audited ``login``).

Meanwhile a new CRL is published every 20 s (the gateway refreshes every
5 s) and the supervisor gets SIGHUP at 1/3 and 2/3 of the run. Reported:
errors for valid clients (must be 0), p50/p99 latency per time slice, RSS of
each worker at start and end (growth < 10 %), audit events written against
expected (equal), and the memory per connection with N idle TLS connections
held open (each made one request first, so it sits in keep-alive, as a
browser's would).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import resource
import secrets
import signal
import socket
import sqlite3
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.access.passwords import hash_password
from gateway.access.users import UserStore
from gateway.certs import builders as pki
from gateway.certs.files import ThrowawayPki, make_throwaway_pki, write_atomic
from gateway.demo.backend import build_backend

PASSWORD = "soak-password-1234"
USERS = tuple(f"LC{n:06d}" for n in range(1, 9))
REVOKED_USER = "LC999999"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(match.group(1)) if match else 0


async def steady_rss(pids: list[int], seconds: float = 3.0) -> dict[int, int]:
    """Each worker's smallest RSS over a few seconds of samples.

    Logins hash passwords with argon2id (tens of MiB each, freed right
    after), so one sample can catch a worker mid-hash; the minimum is its
    steady state, which is what growth is about.
    """
    lowest = {pid: rss_kib(pid) for pid in pids}
    for _ in range(int(seconds / 0.1)):
        await asyncio.sleep(0.1)
        lowest = {pid: min(lowest[pid], rss_kib(pid)) for pid in pids}
    return lowest


def workers_of(supervisor: int) -> list[int]:
    """The supervisor's spawned gateway workers (not multiprocessing's resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == supervisor and "spawn_main" in cmd and "resource_tracker" not in cmd:
            found.append(int(entry.name))
    return sorted(found)


@dataclass
class Stats:
    """Latencies and outcomes of one kind of load."""

    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, latency)
    ok: int = 0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)

    def fail(self, why: str) -> None:
        self.errors += 1
        if len(self.error_examples) < 5:
            self.error_examples.append(why[:200])


@dataclass
class Soak:
    directory: Path
    minutes: float
    idle_connections: int
    port: int = 0
    admin: int = 0
    the_pki: ThrowawayPki | None = None
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    stats: dict[str, Stats] = field(
        default_factory=lambda: {k: Stats() for k in ("handshake", "keepalive", "refused", "login")}
    )
    revoked_serials: list[int] = field(default_factory=list)
    crl_number: int = 2
    runners: list[web.AppRunner] = field(default_factory=list)

    # -- set-up ---------------------------------------------------------------------

    async def prepare(self) -> Path:
        the_pki = make_throwaway_pki(self.directory / "pki", users=(*USERS, REVOKED_USER))
        self.the_pki = the_pki
        self.revoked_serials = [the_pki.clients[REVOKED_USER].certificate.serial_number]
        self.publish_crl()
        with UserStore(self.directory / "gateway.db") as store:
            hashed = hash_password(PASSWORD)
            for user in USERS:
                store.add_user(user, hashed, ("tdnet", "j-iriss", "clearing"), now=dt.datetime.now(dt.UTC))
        ports = {}
        for name in ("tdnet", "j-iriss", "clearing"):
            runner = web.AppRunner(build_backend(name), access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            ports[name] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.runners.append(runner)
        self.port, self.admin = free_port(), free_port()
        secret = self.directory / "session.key"
        write_atomic(secret, secrets.token_bytes(48), mode=0o600)
        config = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "workers": 2,
            "admin": {"host": "127.0.0.1", "port": self.admin},
            "tls": {
                "cert": str(the_pki.server_cert),
                "key": str(the_pki.server_key),
                "client_ca": str(the_pki.ca_cert),
            },
            "revocation": {"crl": str(the_pki.crl), "refresh_seconds": 5, "grace_seconds": 3600},
            "backends": [
                {"name": "tdnet", "prefix": "/onre/", "upstream": f"http://127.0.0.1:{ports['tdnet']}"},
                {
                    "name": "j-iriss",
                    "prefix": "/nt/",
                    "upstream": f"http://127.0.0.1:{ports['j-iriss']}",
                    "login": {"mode": "passthrough", "path": "/nt/login"},
                },
                {"name": "clearing", "prefix": "/jpxcube/", "upstream": f"http://127.0.0.1:{ports['clearing']}"},
            ],
            "limits": {"keepalive_timeout_seconds": 900, "max_connections": 20_000},
            "users": {"database": str(self.directory / "gateway.db")},
            "session": {"secret_file": str(secret)},
            "audit": {"database": str(self.directory / "audit.db"), "queue_size": 100_000},
            "login": {"ip_max_failures": 1_000_000},
            "log_level": "warning",
        }
        path = self.directory / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def publish_crl(self) -> None:
        assert self.the_pki is not None
        now = dt.datetime.now(dt.UTC)
        crl = pki.build_crl(
            self.the_pki.ca_certificate,
            self.the_pki.ca_private_key,
            [pki.RevokedEntry(s, now) for s in self.revoked_serials],
            this_update=now,
            next_update=now + dt.timedelta(days=1),
            number=self.crl_number,
        )
        self.crl_number += 1
        write_atomic(self.the_pki.crl, crl.public_bytes(Encoding.DER))

    async def start_gateway(self, config: Path) -> None:
        log = (self.directory / "serve.log").open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config), stdout=log, stderr=log
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            if len(workers_of(self.proc.pid)) == 2 and await self.healthy():
                await asyncio.sleep(1.0)
                return
        raise SystemExit("gateway serve did not come up; see serve.log")

    async def healthy(self) -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{self.admin}/healthz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    def ctx(self, user: str) -> ssl.SSLContext:
        assert self.the_pki is not None
        ctx = ssl.create_default_context(cafile=str(self.the_pki.ca_cert))
        files = self.the_pki.clients[user]
        ctx.load_cert_chain(files.cert, files.key)
        return ctx

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    # -- load ------------------------------------------------------------------------------

    async def timed(self, kind: str, expect: int, call: Any) -> None:
        started = time.perf_counter()
        try:
            status = await call()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.stats[kind].fail(f"{type(exc).__name__}: {exc}")
            return
        latency = time.perf_counter() - started
        if status != expect:
            self.stats[kind].fail(f"status {status}, expected {expect}")
            return
        self.stats[kind].ok += 1
        self.stats[kind].samples.append((time.monotonic() - self.started, latency))

    async def handshake_loop(self, stop: asyncio.Event, user: str) -> None:
        ctx = self.ctx(user)
        while not stop.is_set():

            async def one() -> int:
                connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
                async with aiohttp.ClientSession(connector=connector) as s, s.get(self.url("/nt/tiny")) as r:
                    await r.read()
                    return r.status

            await self.timed("handshake", 200, one)
            await asyncio.sleep(0.02)

    async def login(self, session: aiohttp.ClientSession, user: str) -> int:
        async with session.get(self.url("/_gateway/login")) as r:
            page = await r.text()
        token = re.search(r'name="csrf" value="([^"]+)"', page)
        if token is None:
            return 0
        form = {"user_id": user, "password": PASSWORD, "csrf": token.group(1), "next": ""}
        async with session.post(self.url("/_gateway/login"), data=form, allow_redirects=False) as r:
            await r.read()
            return r.status

    async def keepalive_loop(self, stop: asyncio.Event, user: str) -> None:
        connector = aiohttp.TCPConnector(ssl=self.ctx(user), limit=1)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            if await self.login(s, user) != 303:
                self.stats["keepalive"].fail("login for the keep-alive loop failed")
                return
            while not stop.is_set():

                async def one() -> int:
                    async with s.get(self.url("/onre/tiny")) as r:
                        await r.read()
                        return r.status

                await self.timed("keepalive", 200, one)
                await asyncio.sleep(0.005)

    async def refused_loop(self, stop: asyncio.Event) -> None:
        connector = aiohttp.TCPConnector(ssl=self.ctx(REVOKED_USER))
        async with aiohttp.ClientSession(connector=connector) as s:
            while not stop.is_set():

                async def one() -> int:
                    async with s.get(self.url("/nt/tiny"), headers={"Accept": "application/json"}) as r:
                        body = await r.json()
                        return r.status if body.get("error") == "certificate_revoked" else -r.status

                await self.timed("refused", 403, one)
                await asyncio.sleep(0.05)

    async def login_loop(self, stop: asyncio.Event, user: str) -> None:
        ctx = self.ctx(user)
        while not stop.is_set():

            async def one() -> int:
                connector = aiohttp.TCPConnector(ssl=ctx)
                async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
                    return await self.login(s, user)

            await self.timed("login", 303, one)
            await asyncio.sleep(0.2)

    async def crl_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(20)
            self.publish_crl()

    async def reload_metric(self) -> dict[str, float]:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{self.admin}/metrics") as r:
            text = await r.text()
        return {
            m.group(1): float(m.group(2))
            for m in re.finditer(r'gateway_reloads_total\{result="(\w+)"\} ([\d.e+]+)', text)
        }

    # -- idle connections --------------------------------------------------------------------

    async def idle_phase(self, workers: list[int]) -> dict[str, Any]:
        n = self.idle_connections
        before = await steady_rss(workers, 1.0)
        ctx = self.ctx(USERS[0])
        held: list[asyncio.StreamWriter] = []
        failures = 0
        gate = asyncio.Semaphore(100)

        async def open_one() -> None:
            nonlocal failures
            async with gate:
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", self.port, ssl=ctx), 30
                    )
                    writer.write(b"GET /nt/tiny HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    await reader.readuntil(b"\r\n\r\n")
                    await reader.readexactly(2)
                    held.append(writer)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
                    failures += 1

        started = time.monotonic()
        await asyncio.gather(*(open_one() for _ in range(n)))
        opened = time.monotonic() - started
        await asyncio.sleep(3)
        after = await steady_rss(workers, 1.0)
        growth = sum(after.values()) - sum(before.values())
        for writer in held:
            writer.transport.abort()
        return {
            "requested": n,
            "held": len(held),
            "failures": failures,
            "open_seconds": round(opened, 1),
            "rss_kib_before": before,
            "rss_kib_after": after,
            "kib_per_connection": round(growth / max(len(held), 1), 1),
        }

    # -- the run -----------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        config = await self.prepare()
        await self.start_gateway(config)
        assert self.proc is not None
        workers = workers_of(self.proc.pid)
        duration = self.minutes * 60
        stop = asyncio.Event()
        self.started = time.monotonic()
        tasks = [
            *(asyncio.create_task(self.handshake_loop(stop, u)) for u in USERS[:2]),
            *(asyncio.create_task(self.keepalive_loop(stop, u)) for u in USERS[2:6]),
            asyncio.create_task(self.refused_loop(stop)),
            *(asyncio.create_task(self.login_loop(stop, u)) for u in USERS[6:8]),
            asyncio.create_task(self.crl_loop(stop)),
        ]
        await asyncio.sleep(min(10.0, duration / 6))  # warm-up before the first RSS sample
        rss_start = await steady_rss(workers)
        reloads: list[dict[str, Any]] = []
        for fraction in (1 / 3, 2 / 3):
            await asyncio.sleep(max(0.0, self.started + duration * fraction - time.monotonic()))
            before = await self.reload_metric()
            os.kill(self.proc.pid, signal.SIGHUP)
            await asyncio.sleep(3)
            reloads.append(
                {
                    "at_seconds": round(time.monotonic() - self.started),
                    "before": before,
                    "after": await self.reload_metric(),
                }
            )
        await asyncio.sleep(max(0.0, self.started + duration - time.monotonic()))
        stop.set()
        tasks[-1].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        rss_end = await steady_rss(workers_of(self.proc.pid))
        idle = await self.idle_phase(workers_of(self.proc.pid)) if self.idle_connections else None
        self.proc.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(self.proc.wait(), 120)
        for runner in self.runners:
            await runner.cleanup()
        return self.report(duration, workers, rss_start, rss_end, reloads, idle, exit_code)

    def audit_counts(self) -> dict[str, int]:
        with sqlite3.connect(self.directory / "audit.db") as db:
            rows = db.execute("SELECT event, reason, count(*) FROM events GROUP BY event, reason").fetchall()
        return {f"{event}/{reason}": count for event, reason, count in rows}

    def report(
        self,
        duration: float,
        workers: list[int],
        rss_start: dict[int, int],
        rss_end: dict[int, int],
        reloads: list[dict[str, Any]],
        idle: dict[str, Any] | None,
        exit_code: int,
    ) -> dict[str, Any]:
        slice_seconds = max(10.0, duration / 10)
        slices = []
        all_samples = [s for st in self.stats.values() for s in st.samples]
        t = 0.0
        while t < duration:
            lat = sorted(x for at, x in all_samples if t <= at < t + slice_seconds)
            if lat:
                slices.append(
                    {
                        "from_s": int(t),
                        "requests": len(lat),
                        "p50_ms": round(statistics.median(lat) * 1000, 1),
                        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 1),
                    }
                )
            t += slice_seconds
        audit = self.audit_counts()
        expected = {
            "request_refused/certificate_revoked": self.stats["refused"].ok,
            "login/ok": self.stats["login"].ok + 4,
        }  # + the 4 keep-alive users' logins
        written = {key: audit.get(key, 0) for key in expected}
        growth = {pid: round(100 * (rss_end.get(pid, 0) - rss_start[pid]) / rss_start[pid], 1) for pid in rss_start}
        return {
            "minutes": self.minutes,
            "workers": workers,
            "requests": {
                k: {"ok": v.ok, "errors": v.errors, "examples": v.error_examples} for k, v in self.stats.items()
            },
            "valid_client_errors": sum(self.stats[k].errors for k in ("handshake", "keepalive", "login")),
            "latency_slices": slices,
            "rss_kib_start": rss_start,
            "rss_kib_end": rss_end,
            "rss_growth_percent": growth,
            "rss_growth_ok": all(g < 10 for g in growth.values()),
            "reloads": reloads,
            "crl_published": self.crl_number - 2,
            "audit_expected": expected,
            "audit_written": written,
            "audit_equal": expected == written,
            "audit_all": audit,
            "idle_connections": idle,
            "exit_code": exit_code,
        }


def raise_fd_limit() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by `gateway serve`
    return hard


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration (default 10)")
    parser.add_argument("--idle-connections", type=int, default=10_000, help="idle TLS connections to hold (0: skip)")
    parser.add_argument("--out", default=None, help="write the JSON report here too")
    args = parser.parse_args(argv)
    limit = raise_fd_limit()
    if args.idle_connections + 1000 > limit:
        parser.error(
            f"--idle-connections {args.idle_connections} needs about {args.idle_connections + 1000} "
            f"file descriptors here; the hard limit is {limit}"
        )
    with tempfile.TemporaryDirectory(prefix="gateway-soak-") as tmp:
        soak = Soak(Path(tmp), args.minutes, args.idle_connections)
        result = asyncio.run(soak.run())
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    ok = result["valid_client_errors"] == 0 and result["rss_growth_ok"] and result["audit_equal"]
    print(
        f"\nsoak {'PASSED' if ok else 'FAILED'}: valid-client errors {result['valid_client_errors']}, "
        f"RSS growth {result['rss_growth_percent']} %, audit {result['audit_written']} vs {result['audit_expected']}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

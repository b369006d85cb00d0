"""The systems under test and the load generator's TLS leg, each a real process on loopback.

* :class:`Backend` — gateway.demo.backend (``/onre/tiny``, ``/upload``, ``/download``).
* :class:`Gateway` — ``gateway serve --config`` with N workers, login mode ``gateway``;
  the bench user logs in once through the real HTTP flow and its session cookie is
  reused by every load tool.
* :class:`Nginx` — Debian's nginx, ``ssl_verify_client on``, ``ssl_crl``, keep-alive
  upstream, the client subject and serial passed in headers.
* :class:`Stunnel` — the client side for wrk: presents LC000001's certificate.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

from bench import procs
from bench.fixtures import PASSWORD, USER, BenchPki
from gateway.access.passwords import hash_password
from gateway.access.users import UserStore
from gateway.certs.files import write_atomic

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PREFIXES = (("tdnet", "/onre/"), ("j-iriss", "/nt/"), ("clearing", "/jpxcube/"))


@dataclass
class Backend:
    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Backend:
        self.port = procs.free_port()
        self.proc = procs.start([PY, "-m", "bench.backend", str(self.port)], self.workdir / "backend.log", env=_env())
        procs.wait_port(self.port, 30, self.proc)
        return self

    def stop(self) -> None:
        procs.stop(self.proc)


SHIM: list[Path] = []  # set by the runner: the event-loop shim for the gateway, if any


def _env(shim: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(p) for p in SHIM] if shim else []
    paths.append(str(ROOT))
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = ":".join(paths)
    return env


class Server:
    """What the figures need from either system under test."""

    name: str
    workers: int
    port: int
    proc: subprocess.Popen[bytes] | None
    cookie: str

    def worker_pids(self) -> list[int]:
        raise NotImplementedError

    def all_pids(self) -> list[int]:
        assert self.proc is not None
        return procs.tree(self.proc.pid)

    def stop(self) -> None:
        procs.stop(self.proc)


@dataclass
class Gateway(Server):
    workdir: Path
    pki: BenchPki
    backend_port: int
    workers: int
    crl: Path
    refresh_seconds: float = 3600.0
    name: str = "gateway"
    port: int = 0
    admin_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    cookie: str = ""
    ready_seconds: float = 0.0
    config_path: Path = field(default=Path())

    def write_config(self) -> Path:
        secret = self.workdir / "session.key"
        if not secret.exists():
            write_atomic(secret, bytes(range(64)), mode=0o600)
        self.port, self.admin_port = procs.free_port(), procs.free_port()
        data = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "workers": self.workers,
            "tls": {
                "cert": str(self.pki.server_cert),
                "key": str(self.pki.server_key),
                "client_ca": str(self.pki.ca_cert),
            },
            "revocation": {"crl": str(self.crl), "refresh_seconds": self.refresh_seconds, "grace_seconds": 3600},
            "backends": [
                {"name": name, "prefix": prefix, "upstream": f"http://127.0.0.1:{self.backend_port}"}
                for name, prefix in PREFIXES
            ],
            "admin": {"host": "127.0.0.1", "port": self.admin_port},
            "users": {"database": str(self.workdir / "gateway.db")},
            "session": {"secret_file": str(secret)},
            "audit": {"database": str(self.workdir / "audit.db")},
            "log_level": "warning",
        }
        self.config_path = self.workdir / f"gateway-w{self.workers}.yaml"
        self.config_path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return self.config_path

    def ensure_user(self) -> None:
        now = dt.datetime.now(dt.UTC)
        with UserStore(self.workdir / "gateway.db") as store:
            if store.get_user(USER) is None:
                store.add_user(USER, hash_password(PASSWORD), ["tdnet", "j-iriss", "clearing"], now=now)

    def start(self, timeout: float = 120.0) -> Gateway:
        self.write_config()
        self.ensure_user()
        started = time.perf_counter()
        argv = [str(ROOT / ".venv" / "bin" / "gateway"), "serve", "--config", str(self.config_path)]
        if not Path(argv[0]).exists():
            argv = [PY, "-m", "gateway", "serve", "--config", str(self.config_path)]
        self.proc = procs.start(argv, self.workdir / f"gateway-w{self.workers}.log", env=_env(shim=True))
        procs.wait_port(self.port, timeout, self.proc)
        self._wait_workers(timeout)
        self.cookie = asyncio.run(login(self.port, self.pki))
        self.ready_seconds = time.perf_counter() - started
        return self

    def _wait_workers(self, timeout: float) -> None:
        """With N workers the port opens with the first; wait until all N are up."""
        if self.workers <= 1:
            return
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            listening = _listeners(self.port)
            if listening >= self.workers:
                return
            time.sleep(0.1)
        raise TimeoutError(f"gateway: only {_listeners(self.port)} of {self.workers} workers listening")

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        if self.workers <= 1:
            return [self.proc.pid]
        return [p for p in procs.children(self.proc.pid) if "spawn_main" in procs.cmdline(p)]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=10) as resp:
            return resp.read().decode()

    def metric(self, name: str) -> float | None:
        """The first sample of ``name`` (summed over label sets) from /metrics, or None."""
        values = [
            float(line.rsplit(" ", 1)[1])
            for line in self.metrics().splitlines()
            if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {"
        ]
        return sum(values) if values else None


def _listeners(port: int) -> int:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=False).stdout
    return len([line for line in out.splitlines() if line.strip()])


def client_ssl(pki: BenchPki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx


async def login(port: int, pki: BenchPki) -> str:
    """Log LC000001 in through GET/POST /_gateway/login; return the ``__Host-gw_session`` cookie value."""
    base = f"https://127.0.0.1:{port}"
    jar = aiohttp.DummyCookieJar()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(pki)), cookie_jar=jar) as http:
        async with http.get(base + "/_gateway/login") as resp:
            page = await resp.text()
            csrf_cookie = resp.cookies["__Host-gw_csrf"].value
        match = re.search(r'name="csrf" value="([^"]+)"', page)
        if match is None:
            raise RuntimeError("login page has no csrf field")
        form = {"user_id": USER, "password": PASSWORD, "csrf": match.group(1)}
        headers = {"Cookie": f"__Host-gw_csrf={csrf_cookie}"}
        async with http.post(base + "/_gateway/login", data=form, headers=headers, allow_redirects=False) as resp:
            if resp.status != 303 or "__Host-gw_session" not in resp.cookies:
                raise RuntimeError(f"login failed: HTTP {resp.status} {(await resp.text())[:300]}")
            session = resp.cookies["__Host-gw_session"].value
        async with http.get(base + "/onre/tiny", headers={"Cookie": f"__Host-gw_session={session}"}) as resp:
            body = await resp.text()
            if resp.status != 200 or resp.headers.get("X-User") != USER:
                raise RuntimeError(f"logged-in GET /onre/tiny: HTTP {resp.status} X-User={resp.headers.get('X-User')}")
            del body
    return f"__Host-gw_session={session}"


NGINX_SESSION_CACHE = "\n        ssl_session_cache shared:SSL:10m;\n        ssl_session_tickets off;"
NGINX_CONF = """\
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 256;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {server_cert};
        ssl_certificate_key {server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_client_certificate {ca_cert};
        ssl_verify_client on;
        ssl_crl {crl};{resumption}
        client_max_body_size 0;
        location = /bench-direct {{ return 200 "ok"; }}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Client-Subject $ssl_client_s_dn;
            proxy_set_header X-Client-Cert-Serial $ssl_client_serial;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
}}
"""


class Ceiling(Server):
    """A :mod:`bench.ceiling` server (a floor of the gateway's design) as a system under test."""

    def __init__(self, kind: str, workdir: Path, pki: BenchPki, backend_port: int) -> None:
        self.name, self.workers, self.cookie = kind, 1, ""
        self.port = procs.free_port()
        argv = [PY, "-m", "bench.ceiling", kind, str(self.port)]
        argv += [str(pki.server_cert), str(pki.server_key), str(pki.ca_cert), str(backend_port)]
        self.proc = procs.start(argv, workdir / f"{kind}.log", env=_env())
        procs.wait_port(self.port, 30, self.proc)

    def worker_pids(self) -> list[int]:
        return self.all_pids()


@dataclass
class Nginx(Server):
    workdir: Path
    pki: BenchPki
    backend_port: int
    workers: int
    crl: Path
    # nginx resumes with session tickets unless told otherwise; True gives it a session cache shared by
    # its workers instead, tickets off (what the gateway does with one worker): a like-for-like check.
    session_cache: bool = False
    name: str = "nginx"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    cookie: str = ""
    ready_seconds: float = 0.0
    conf: Path = field(default=Path())

    def write_config(self) -> Path:
        prefix = self.workdir / f"nginx-w{self.workers}"
        prefix.mkdir(parents=True, exist_ok=True)
        self.port = procs.free_port()
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(
            NGINX_CONF.format(
                workers=self.workers,
                prefix=prefix,
                backend_port=self.backend_port,
                port=self.port,
                server_cert=self.pki.server_cert,
                server_key=self.pki.server_key,
                ca_cert=self.pki.ca_cert,
                crl=self.crl,
                resumption=NGINX_SESSION_CACHE if self.session_cache else "",
            )
        )
        return self.conf

    def start(self, timeout: float = 120.0) -> Nginx:
        self.write_config()
        started = time.perf_counter()
        argv = ["nginx", "-p", str(self.conf.parent), "-c", str(self.conf), "-g", "daemon off;"]
        self.proc = procs.start(argv, self.conf.parent / "stdout.log")
        procs.wait_port(self.port, timeout, self.proc)
        deadline = time.perf_counter() + timeout
        while len(self.worker_pids()) < self.workers and time.perf_counter() < deadline:
            time.sleep(0.05)
        self.ready_seconds = time.perf_counter() - started
        return self

    def config_test_seconds(self) -> float:
        """How long nginx takes to parse its configuration, CRL included (``nginx -t``)."""
        started = time.perf_counter()
        subprocess.run(
            ["nginx", "-t", "-q", "-p", str(self.conf.parent), "-c", str(self.conf)], check=True, capture_output=True
        )
        return time.perf_counter() - started

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        return [p for p in procs.children(self.proc.pid) if "worker process" in procs.cmdline(p)]


STUNNEL_CONF = """\
foreground = yes
pid =
output = {log}
debug = 4
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1
[bench]
client = yes
accept = 127.0.0.1:{accept}
connect = 127.0.0.1:{connect}
cert = {cert}
key = {key}
CAfile = {ca}
verifyChain = yes
"""


@dataclass
class Stunnel:
    """wrk speaks plain HTTP/1.1 keep-alive to this; stunnel speaks mTLS to the server."""

    workdir: Path
    pki: BenchPki
    target_port: int
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Stunnel:
        self.port = procs.free_port()
        conf = self.workdir / f"stunnel-{self.target_port}.conf"
        conf.write_text(
            STUNNEL_CONF.format(
                log=self.workdir / "stunnel.log",
                accept=self.port,
                connect=self.target_port,
                cert=self.pki.client_cert,
                key=self.pki.client_key,
                ca=self.pki.ca_cert,
            )
        )
        self.proc = procs.start(["stunnel4", str(conf)], self.workdir / "stunnel.out")
        procs.wait_port(self.port, 20, self.proc)
        return self

    def stop(self) -> None:
        procs.stop(self.proc)


def loop_shim(mode: str, out: Path) -> Path | None:
    """A PYTHONPATH entry choosing the gateway's event loop for this run.

    ``uvloop`` is what ``gateway serve`` does by itself; ``asyncio`` hides uvloop
    (an ``import uvloop`` that fails) to compare the two loops.
    """
    if mode == "uvloop":
        return None
    shim = out / f"shim-{mode}"
    shim.mkdir(parents=True, exist_ok=True)
    if mode == "asyncio":
        (shim / "uvloop.py").write_text('raise ImportError("uvloop hidden by the benchmark (--loop asyncio)")\n')
    else:
        raise ValueError(f"unknown loop mode {mode!r}")
    return shim

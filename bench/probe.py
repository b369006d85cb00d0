"""One figure, fast: logged-in keep-alive through one system, or the cost of a loopback send.

python -m bench.probe gateway|nginx|hello|aiohttp-proxy|upstream-proxy [--conns 50] [--seconds 8]
python -m bench.probe send-cost

The first form is figure 2 of ``python -m bench`` for one system and one connection count
(wrk -> stunnel with LC000001's certificate -> system -> the bench backend) and prints req/s,
p50/p99 and the CPU µs per request of the system, the backend and stunnel; ``hello`` and the two
``*-proxy`` kinds are the floors in :mod:`bench.ceiling`. Run systems back to back (the box is
shared) when comparing. ``send-cost`` times a 200-byte ``send()`` on loopback TCP to an echoing
peer process: the kernel's share of every proxied request.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from bench import load, procs
from bench.fixtures import OUT, BenchPki, ensure_crl, load_pki
from bench.run import log
from bench.servers import PY, Backend, Gateway, Nginx, Server, Stunnel, _env

CEILINGS = ("hello", "aiohttp-proxy", "upstream-proxy")


class Ceiling(Server):
    """A :mod:`bench.ceiling` server as a system under test."""

    def __init__(self, kind: str, workdir: Path, pki: BenchPki, backend_port: int) -> None:
        self.name, self.workers, self.cookie = kind, 1, ""
        self.port = procs.free_port()
        argv = [PY, "-m", "bench.ceiling", kind, str(self.port)]
        argv += [str(pki.server_cert), str(pki.server_key), str(pki.ca_cert), str(backend_port)]
        self.proc = procs.start(argv, workdir / f"{kind}.log", env=_env())
        procs.wait_port(self.port, 30, self.proc)

    def worker_pids(self) -> list[int]:
        return self.all_pids()


def keepalive(system: str, conns: int, seconds: float) -> None:
    pki = load_pki(log)
    workdir = Path(tempfile.mkdtemp(prefix="probe-", dir=OUT))
    crl = ensure_crl(pki, 0, log=log)
    backend = Backend(workdir).start()
    server: Server
    if system == "gateway":
        server = Gateway(workdir, pki, backend.port, 1, crl).start()
    elif system == "nginx":
        server = Nginx(workdir, pki, backend.port, 1, crl).start()
    else:
        server = Ceiling(system, workdir, pki, backend.port)
    try:
        stunnel = Stunnel(workdir, pki, server.port).start()
        try:
            url = f"http://127.0.0.1:{stunnel.port}/onre/tiny"
            headers = {"Cookie": server.cookie or "__Host-gw_session=none"}
            load.wrk(url, conns, 1, headers, workdir)  # warm-up
            assert backend.proc is not None and stunnel.proc is not None
            meters = [procs.CpuMeter(p).start() for p in (server.all_pids(), [backend.proc.pid], [stunnel.proc.pid])]
            res = load.wrk(url, conns, seconds, headers, workdir)
            cpu = [m.stop().cpu for m in meters]
        finally:
            stunnel.stop()
    finally:
        server.stop()
        backend.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    n = max(1, res.ok + res.bad)
    print(
        f"{system} c={conns}: {res.requests_per_second:,.0f} req/s, p50 {res.p50_ms:.1f} ms, p99 {res.p99_ms:.1f} ms,"
        f" non-200 {res.bad} | CPU µs/request: {system} {1e6 * cpu[0] / n:.0f}, backend {1e6 * cpu[1] / n:.0f},"
        f" stunnel {1e6 * cpu[2] / n:.0f}"
    )


def send_cost(count: int = 20_000) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    pid = os.fork()
    if pid == 0:  # the peer: echo until the sender closes
        peer = socket.create_connection(listener.getsockname())
        while data := peer.recv(65536):
            peer.sendall(data)
        os._exit(0)
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message, in_send, started = b"x" * 200, 0.0, time.perf_counter()
    for _ in range(count):
        before = time.perf_counter()
        conn.send(message)
        in_send += time.perf_counter() - before
        conn.recv(65536)
    total = time.perf_counter() - started
    conn.close()
    os.waitpid(pid, 0)
    print(f"loopback TCP: send() of 200 bytes {1e6 * in_send / count:.1f} µs, round trip {1e6 * total / count:.1f} µs")


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.probe", description=__doc__.splitlines()[0])
    p.add_argument("system", choices=("gateway", "nginx", *CEILINGS, "send-cost"))
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args()
    if args.system == "send-cost":
        send_cost()
    else:
        OUT.mkdir(parents=True, exist_ok=True)
        keepalive(args.system, args.conns, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

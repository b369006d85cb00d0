"""One figure, fast: logged-in keep-alive through one system, or the cost of a loopback send.

python -m bench.probe gateway|nginx|loadgen-ceiling|hello|aiohttp-proxy|upstream-proxy [--conns 50] [--seconds 8]
                      [--tool autocannon|autocannon-2|wrk-stunnel]
python -m bench.probe send-cost

The first form is figure 2 of ``python -m bench`` for one system and one connection count
(autocannon presenting LC000001's certificate -> system -> the bench backend) and prints the CPU
µs per request of the system, the backend and the load generator, then req/s and p50/p99.
``loadgen-ceiling`` is nginx answering ``return 200`` itself: the load generator's ceiling. ``--tool``
compares load generators on the same figure: autocannon on one thread (the bench's default), with two
worker threads (``autocannon-2``), or wrk behind a local stunnel that presents the certificate (the previous
method). ``hello`` and the two ``*-proxy`` kinds are the floors in :mod:`bench.ceiling`. Run
systems back to back (the box is shared) when comparing. ``send-cost`` times a 200-byte ``send()``
on loopback TCP to an echoing peer process: the kernel's share of every proxied request.
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
from bench.run import DIRECT, keepalive_row, log
from bench.servers import Backend, Ceiling, Gateway, Nginx, Server, Stunnel

CEILINGS = ("hello", "aiohttp-proxy", "upstream-proxy")
TOOLS = ("autocannon", "autocannon-2", "wrk-stunnel")


def keepalive(system: str, conns: int, seconds: float, tool: str) -> None:
    pki = load_pki(log)
    workdir = Path(tempfile.mkdtemp(prefix="probe-", dir=OUT))
    crl = ensure_crl(pki, 0, log=log)
    backend = Backend(workdir).start()
    server: Server
    path = DIRECT if system == "loadgen-ceiling" else "/onre/tiny"
    if system == "gateway":
        server = Gateway(workdir, pki, backend.port, 1, crl).start()
    elif system in ("nginx", "loadgen-ceiling"):
        server = Nginx(workdir, pki, backend.port, 1, crl).start()
    else:
        server = Ceiling(system, workdir, pki, backend.port)
    try:
        headers = {"Cookie": server.cookie or "__Host-gw_session=none"}
        drive(tool, server, path, conns, 1, headers, pki, workdir)  # warm-up
        assert backend.proc is not None
        meters = [procs.CpuMeter(server.all_pids()).start(), procs.CpuMeter([backend.proc.pid]).start()]
        res = drive(tool, server, path, conns, seconds, headers, pki, workdir)
        row = keepalive_row(res, meters[0].stop(), meters[1].stop())
    finally:
        server.stop()
        backend.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"{system} c={conns} ({tool}): CPU µs/request: {system} {row['server_cpu_us']:.0f}, backend"
        f" {row['backend_cpu_us']:.0f}, load generator {row['loadgen_cpu_us']:.0f} | {row['rps']:,.0f} req/s,"
        f" p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, non-200 {row['non_200']} {row['socket_errors']}"
    )


def drive(
    tool: str, server: Server, path: str, conns: int, seconds: float, headers: dict[str, str], pki: BenchPki, work: Path
) -> load.KeepAliveResult:
    """One keep-alive run with the chosen load generator; stunnel's CPU is counted as the load generator's."""
    if tool.startswith("autocannon"):
        threads = 2 if tool == "autocannon-2" else 1
        return load.autocannon(f"https://127.0.0.1:{server.port}{path}", conns, seconds, headers, pki, threads=threads)
    stunnel = Stunnel(work, pki, server.port).start()
    try:
        assert stunnel.proc is not None
        meter = procs.CpuMeter([stunnel.proc.pid]).start()
        res = load.wrk(f"http://127.0.0.1:{stunnel.port}{path}", conns, seconds, headers, work)
        res.client_cpu += meter.stop().cpu
        return res
    finally:
        stunnel.stop()


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
    p.add_argument("system", choices=("gateway", "nginx", "loadgen-ceiling", *CEILINGS, "send-cost"))
    p.add_argument("--tool", choices=TOOLS, default="autocannon", help="the keep-alive load generator")
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args()
    if args.system == "send-cost":
        send_cost()
    else:
        OUT.mkdir(parents=True, exist_ok=True)
        keepalive(args.system, args.conns, args.seconds, args.tool)
    return 0


if __name__ == "__main__":
    sys.exit(main())

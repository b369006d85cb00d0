"""The load tools: ``openssl s_time`` for handshakes, autocannon for keep-alive, curl for streams.

Each returns what it measured plus the CPU the load tool itself burned, so a
reader can see when the load generator, not the server, is the limit.
autocannon (Node, from the npm registry, pinned) speaks TLS and presents the
client certificate itself; wrk behind stunnel, the previous keep-alive client,
stays for ``bench.probe``'s comparison of load generators.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.fixtures import OUT, BenchPki

AUTOCANNON_VERSION = "8.0.0"
NODE_TOOLS = OUT / "node"
# One thread (Node's event loop): the same ceiling as two worker threads at 50 connections on 2 cores, and
# less CPU taken from the server per request (bench/README.md, "Why autocannon"); --loadgen-threads changes it.
AUTOCANNON_THREADS = 1

WRK_LUA = """\
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) ok = 0; bad = 0 end
function response(status, headers, body)
  if status == 200 then ok = ok + 1 else bad = bad + 1 end
end
function done(summary, latency, requests)
  local o, b = 0, 0
  for _, t in ipairs(threads) do o = o + t:get("ok"); b = b + t:get("bad") end
  io.write(string.format("STATUS ok=%d bad=%d\\n", o, b))
  io.write(string.format("LAT p50=%d p90=%d p99=%d max=%d\\n",
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass
class HandshakeResult:
    connections: int
    seconds: float
    resumed: int
    bytes_per_conn: float
    client_cpu: float

    @property
    def per_second(self) -> float:
        return self.connections / self.seconds if self.seconds else 0.0


def run_timed(argv: list[str], timeout: float) -> tuple[str, float, float]:
    """Run a load tool; (its stdout, wall seconds, its user+system CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False).stdout
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def s_time(
    port: int, pki: BenchPki, cookie: str, seconds: float, *, reuse: bool, path: str = "/onre/tiny"
) -> HandshakeResult:
    """``openssl s_time -new|-reuse -www`` with the session cookie smuggled into the request line.

    s_time sends ``GET <path> HTTP/1.0``; a path of ``/onre/tiny HTTP/1.0\\r\\nCookie: ...\\r\\nX-Bench:``
    turns that into a logged-in request, so every connection is handshake + one proxied GET on both systems.
    """
    request = f"{path} HTTP/1.0\r\nCookie: {cookie}\r\nX-Bench:"
    argv = [
        "openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-www", request,
        "-cert", str(pki.client_cert), "-key", str(pki.client_key), "-CAfile", str(pki.ca_cert),
        "-time", str(int(seconds)), "-reuse" if reuse else "-new",
    ]  # fmt: skip
    out, wall, cpu = run_timed(argv, seconds + 60)
    match = re.search(r"(\d+) connections in [\d.]+s", out)
    conns = int(match.group(1)) if match else 0
    per = re.search(r"(\d+) bytes read per connection", out)
    # s_time prints one mark per connection after "starting": 'r' when the session was resumed,
    # '*' for a full handshake (the pattern used to look after "seconds" and always found 0).
    marks = re.search(r"starting\n([r*t3]+)", out) if reuse else None
    resumed = marks.group(1).count("r") if marks else 0
    return HandshakeResult(conns, wall, resumed, float(per.group(1)) if per else 0.0, cpu)


@dataclass
class KeepAliveResult:
    """One keep-alive run of a load tool: throughput, answers by kind, latency, and the tool's own CPU."""

    requests_per_second: float
    ok: int
    bad: int
    errors: str
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    seconds: float
    client_cpu: float
    raw: str


def wrk(url: str, connections: int, seconds: float, headers: dict[str, str], workdir: Path) -> KeepAliveResult:
    """wrk with 2 threads, counting non-200 answers in Lua (wrk's own count lets 3xx pass)."""
    script = workdir / "status.lua"
    script.write_text(WRK_LUA)
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{max(1, int(seconds))}s", "--timeout", "10s", "-s", str(script)]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    out, wall, cpu = run_timed(argv, seconds + 60)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    status = re.search(r"STATUS ok=(\d+) bad=(\d+)", out)
    lat = re.search(r"LAT p50=(\d+) p90=(\d+) p99=(\d+) max=(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    us = [int(x) / 1000 for x in lat.groups()] if lat else [0.0] * 4
    return KeepAliveResult(
        requests_per_second=float(rps.group(1)) if rps else 0.0,
        ok=int(status.group(1)) if status else 0,
        bad=int(status.group(2)) if status else 0,
        errors=errors.group(0) if errors else "",
        p50_ms=us[0],
        p90_ms=us[1],
        p99_ms=us[2],
        max_ms=us[3],
        seconds=wall,
        client_cpu=cpu,
        raw=out,
    )


def autocannon_bin(log: Callable[[str], None] = print) -> Path:
    """autocannon's command, installed once under bench/out/node with npm at the pinned version."""
    installed = NODE_TOOLS / "node_modules" / "autocannon" / "package.json"
    command = NODE_TOOLS / "node_modules" / ".bin" / "autocannon"
    if installed.exists() and json.loads(installed.read_text())["version"] == AUTOCANNON_VERSION and command.exists():
        return command
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise RuntimeError("bench: node and npm are needed for autocannon; run ./dev.sh bench (installs nodejs npm)")
    log(f"installing autocannon {AUTOCANNON_VERSION} into {NODE_TOOLS} (npm)")
    NODE_TOOLS.mkdir(parents=True, exist_ok=True)
    argv = [npm, "install", "--prefix", str(NODE_TOOLS), "--no-audit", "--no-fund", "--save-exact"]
    done = subprocess.run([*argv, f"autocannon@{AUTOCANNON_VERSION}"], capture_output=True, text=True, check=False)
    if done.returncode != 0 or not command.exists():
        raise RuntimeError(f"bench: npm install autocannon@{AUTOCANNON_VERSION} failed: {done.stderr.strip()[-500:]}")
    return command


def autocannon(
    url: str,
    connections: int,
    seconds: float,
    headers: dict[str, str],
    pki: BenchPki,
    *,
    threads: int = AUTOCANNON_THREADS,
) -> KeepAliveResult:
    """autocannon over HTTP/1.1 keep-alive, presenting LC000001's certificate itself (no TLS proxy in between)."""
    argv = [
        str(autocannon_bin()), "--json", "-c", str(connections), "-d", str(max(1, int(seconds))),
        "-t", "10", "--cert", str(pki.client_cert), "--key", str(pki.client_key), "--ca", str(pki.ca_cert),
    ]  # fmt: skip
    if threads > 1:
        argv += ["-w", str(threads)]  # worker threads; without -w autocannon runs on Node's main thread
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    out, wall, cpu = run_timed(argv, seconds + 60)
    return parse_autocannon(out, wall, cpu)


def parse_autocannon(out: str, wall: float, cpu: float) -> KeepAliveResult:
    """autocannon's ``--json`` report as a :class:`KeepAliveResult`; a 200 is the only good answer.

    autocannon's own 2xx count would let a 204 through and counts 3xx apart, so the bad answers
    are every status but 200, and connection errors and timeouts are reported beside them.
    """
    start = out.find("{")
    data: dict[str, Any] = json.loads(out[start:]) if start >= 0 else {}
    statuses: dict[str, dict[str, int]] = data.get("statusCodeStats", {})
    ok = statuses.get("200", {}).get("count", 0)
    bad = sum(v.get("count", 0) for k, v in statuses.items() if k != "200")
    problems = {k: int(data.get(k, 0)) for k in ("errors", "timeouts", "resets", "mismatches")}
    lat: dict[str, float] = data.get("latency", {})
    return KeepAliveResult(
        requests_per_second=float(data.get("requests", {}).get("average", 0.0)),
        ok=ok,
        bad=bad,
        errors=", ".join(f"{k} {v}" for k, v in problems.items() if v),
        p50_ms=float(lat.get("p50", 0.0)),
        p90_ms=float(lat.get("p90", 0.0)),
        p99_ms=float(lat.get("p99", 0.0)),
        max_ms=float(lat.get("max", 0.0)),
        seconds=wall,
        client_cpu=cpu,
        raw=out,
    )


@dataclass
class TransferResult:
    status: str
    bytes: int
    seconds: float
    mib_per_second: float


def curl_transfer(url: str, pki: BenchPki, cookie: str, *, upload: Path | None) -> TransferResult:
    """Stream a body up (``-T``, no Expect: 100-continue) or down (to /dev/null) with the client certificate."""
    argv = [
        "curl", "-sS", "-o", os.devnull, "--cacert", str(pki.ca_cert), "--cert", str(pki.client_cert),
        "--key", str(pki.client_key), "-H", f"Cookie: {cookie}", "-H", "Expect:",
        "-w", "%{http_code} %{size_upload} %{size_download} %{time_total}",
    ]  # fmt: skip
    if upload is not None:
        argv += ["-X", "POST", "-T", str(upload)]
    argv.append(url)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    fields = (out.stdout.strip() or "000 0 0 0").split()
    status, up, down, total = fields[0], float(fields[1]), float(fields[2]), float(fields[3])
    moved = int(up if upload is not None else down)
    return TransferResult(
        status=status if not out.stderr else f"{status} ({out.stderr.strip()[:80]})",
        bytes=moved,
        seconds=total,
        mib_per_second=moved / 2**20 / total if total else 0.0,
    )

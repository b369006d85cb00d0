"""One benchmark invocation: every figure, the gateway and nginx one after the other.

Results go into one dict (saved as JSON under bench/out/) that :mod:`bench.report`
turns into the markdown table.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import load, procs
from bench.fixtures import BenchPki, ensure_crl, upload_file
from bench.servers import Backend, Ceiling, Gateway, Nginx, Server

DIRECT = "/bench-direct"  # nginx answers ``return 200 "ok"`` itself: the load generator's ceiling


@dataclass(frozen=True)
class Plan:
    workers: tuple[int, ...]
    crl_sizes: tuple[int, ...]
    handshake_seconds: float
    keepalive_seconds: float
    connections: tuple[int, ...]
    stream_bytes: int
    reload_entries: int
    reload_seconds: float
    loop: str
    quick: bool
    loadgen_threads: int = load.AUTOCANNON_THREADS


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Runner:
    def __init__(self, plan: Plan, pki: BenchPki, workdir: Path) -> None:
        self.plan = plan
        self.pki = pki
        self.workdir = workdir
        self.backend: Backend | None = None
        self.results: dict[str, Any] = {"plan": asdict(plan), "figures": {}}

    # -- plumbing -------------------------------------------------------------

    def make(self, system: str, workers: int, crl: Path, refresh: float = 3600.0) -> Server:
        assert self.backend is not None
        if system == "gateway":
            return Gateway(self.workdir, self.pki, self.backend.port, workers, crl, refresh_seconds=refresh)
        return Nginx(self.workdir, self.pki, self.backend.port, workers, crl)

    @contextlib.contextmanager
    def running(self, system: str, workers: int, crl: Path, refresh: float = 3600.0) -> Iterator[Server]:
        server = self.make(system, workers, crl, refresh)
        try:
            server.start()  # type: ignore[attr-defined]
            yield server
        finally:
            server.stop()

    def cookie(self, server: Server) -> str:
        # nginx ignores the cookie; it gets the same request bytes as the gateway.
        return server.cookie or self.results.get("cookie", "__Host-gw_session=none")

    def measure_handshakes(
        self, server: Server, *, reuse: bool, seconds: float, path: str = "/onre/tiny"
    ) -> dict[str, Any]:
        meter = procs.CpuMeter(server.all_pids()).start()
        res = load.s_time(server.port, self.pki, self.cookie(server), seconds, reuse=reuse, path=path)
        meter.stop()
        return {
            "per_second": res.per_second,
            "connections": res.connections,
            "resumed": res.resumed,
            "bytes_per_conn": res.bytes_per_conn,
            "server_cpu_ms": 1000 * meter.cpu / max(1, res.connections),
            "server_cpu_share": meter.cpu / meter.wall,
            "client_cpu_share": res.client_cpu / res.seconds if res.seconds else 0.0,
        }

    def measure_keepalive(
        self, server: Server, connections: int, seconds: float, path: str = "/onre/tiny"
    ) -> dict[str, Any]:
        """autocannon straight at the server (it presents the client certificate itself), after a 1 s warm-up."""
        url = f"https://127.0.0.1:{server.port}{path}"
        headers = {"Cookie": self.cookie(server)}
        threads = self.plan.loadgen_threads
        load.autocannon(url, connections, 1, headers, self.pki, threads=threads)  # warm-up: caches, the JIT
        assert self.backend is not None and self.backend.proc is not None
        meters = {"server": procs.CpuMeter(server.all_pids()), "backend": procs.CpuMeter([self.backend.proc.pid])}
        for meter in meters.values():
            meter.start()
        res = load.autocannon(url, connections, seconds, headers, self.pki, threads=threads)
        for meter in meters.values():
            meter.stop()
        return keepalive_row(res, meters["server"], meters["backend"])

    def memory(self, server: Server) -> dict[str, Any]:
        workers = server.worker_pids()
        everything = server.all_pids()
        return {
            "worker_rss_mib": max((procs.rss_mib(p) for p in workers), default=0.0),
            "worker_pss_mib": max((procs.pss_mib(p) for p in workers), default=0.0),
            "total_rss_mib": sum(procs.rss_mib(p) for p in everything),
            "processes": len(everything),
        }

    # -- figures ----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        load.autocannon_bin(log)  # installs it on first use, before any server starts
        self.backend = Backend(self.workdir).start()
        try:
            self.load_generator_check()
            for workers in self.plan.workers:
                self.base_figures(workers)
                if workers == 1:
                    self.floors()
                self.crl_figures(workers)
            self.streaming()
            self.reload_under_load()
        finally:
            self.backend.stop()
        return self.results

    def load_generator_check(self) -> None:
        """Is the backend fast enough to be no limit? autocannon against it alone, plain HTTP.

        The load generator's own ceiling (autocannon, same TLS and certificate, against nginx
        answering ``return 200`` itself) is measured beside each nginx figure in :meth:`base_figures`.
        """
        log("load generator check: the bare backend")
        assert self.backend is not None
        plain = load.autocannon(
            f"http://127.0.0.1:{self.backend.port}/onre/tiny",
            50,
            self.plan.keepalive_seconds,
            {},
            self.pki,
            threads=self.plan.loadgen_threads,
        )
        out: dict[str, Any] = {
            "tool": f"autocannon {load.AUTOCANNON_VERSION}, {self.plan.loadgen_threads} thread(s)",
            "bare_backend_rps": plain.requests_per_second,
            "bare_backend_p99_ms": plain.p99_ms,
        }
        self.results["figures"]["loadgen"] = out
        log(f"  bare backend {plain.requests_per_second:.0f} req/s")

    def ceiling(self, server: Server) -> dict[str, Any]:
        """The load tools against nginx ``return 200`` (no backend hop): the highest figure each can show.

        Same TLS settings, certificate and request bytes as the real figures; only the location differs.
        """
        out: dict[str, Any] = {
            "full": self.measure_handshakes(server, reuse=False, seconds=self.plan.handshake_seconds, path=DIRECT),
            "resumed": self.measure_handshakes(server, reuse=True, seconds=self.plan.handshake_seconds, path=DIRECT),
        }
        for conns in self.plan.connections:
            out[f"keepalive_{conns}"] = self.measure_keepalive(server, conns, self.plan.keepalive_seconds, DIRECT)
            log(f"  ceiling c={conns}: {out[f'keepalive_{conns}']['rps']:.0f} req/s (autocannon -> nginx return 200)")
        full, resumed = out["full"]["per_second"], out["resumed"]["per_second"]
        log(f"  ceiling handshakes (s_time -> nginx return 200): full {full:.0f}/s, resumed {resumed:.0f}/s")
        return out

    def base_figures(self, workers: int) -> None:
        for system in ("gateway", "nginx"):
            crl = ensure_crl(self.pki, 0, log=log)
            log(f"{system} workers={workers}: handshakes and keep-alive (CRL 0)")
            with self.running(system, workers, crl) as server:
                if server.cookie:
                    self.results["cookie"] = server.cookie
                row: dict[str, Any] = {"ready_seconds": server.ready_seconds}  # type: ignore[attr-defined]
                row["full"] = self.measure_handshakes(server, reuse=False, seconds=self.plan.handshake_seconds)
                row["resumed"] = self.measure_handshakes(server, reuse=True, seconds=self.plan.handshake_seconds)
                for conns in self.plan.connections:
                    row[f"keepalive_{conns}"] = self.measure_keepalive(server, conns, self.plan.keepalive_seconds)
                    k = row[f"keepalive_{conns}"]
                    log(
                        f"  c={conns}: {k['rps']:.0f} req/s p50 {k['p50_ms']:.1f} ms p99 {k['p99_ms']:.1f} ms non-200 {k['non_200']}"  # noqa: E501 - one markdown/log line
                    )
                row["memory"] = self.memory(server)
                if isinstance(server, Nginx):
                    row["ceiling"] = self.ceiling(server)
                    row["session_cache"] = self.nginx_session_cache(workers, crl)
                log(
                    f"  full {row['full']['per_second']:.0f}/s, resumed {row['resumed']['per_second']:.0f}/s "
                    f"({row['resumed']['resumed']}/{row['resumed']['connections']} resumed)"
                )
            self.results["figures"].setdefault("base", {}).setdefault(str(workers), {})[system] = row

    def floors(self) -> None:
        """Figure 2 for the design's floors: minimal aiohttp TLS servers (:mod:`bench.ceiling`), one worker.

        ``hello`` answers itself (aiohttp's server and TLS, nothing else); ``upstream-proxy`` forwards
        with the gateway's backend client and no checks. What the gateway costs above them is its own.
        """
        assert self.backend is not None
        conns = self.plan.connections[0]
        out: dict[str, Any] = {"connections": conns}
        for kind in ("hello", "upstream-proxy"):
            server = Ceiling(kind, self.workdir, self.pki, self.backend.port)
            try:
                out[kind] = self.measure_keepalive(server, conns, self.plan.keepalive_seconds)
            finally:
                server.stop()
            log(f"  floor {kind} c={conns}: {out[kind]['server_cpu_us']:.0f} µs/request, {out[kind]['rps']:.0f} req/s")
        self.results["figures"]["floors"] = out

    def nginx_session_cache(self, workers: int, crl: Path) -> dict[str, Any]:
        """Figure 1's handshakes on nginx resuming from a shared session cache, tickets off.

        The gateway resumes from its memory with one worker (``tls.session_resumption: auto``) and from
        tickets with several, while nginx as configured for the other figures uses tickets: this row is
        nginx given the cache too, so the resumption figure can be read like for like.
        """
        assert self.backend is not None
        server = Nginx(self.workdir, self.pki, self.backend.port, workers, crl, session_cache=True)
        try:
            server.start()
            seconds = self.plan.handshake_seconds
            out = {
                kind: self.measure_handshakes(server, reuse=kind == "resumed", seconds=seconds)
                for kind in ("full", "resumed")
            }
        finally:
            server.stop()
        full, resumed = out["full"]["per_second"], out["resumed"]["per_second"]
        log(f"  nginx with a session cache: full {full:.0f}/s, resumed {resumed:.0f}/s")
        return out

    def crl_figures(self, workers: int) -> None:
        for entries in self.plan.crl_sizes:
            crl = ensure_crl(self.pki, entries, log=log)
            for system in ("gateway", "nginx"):
                log(f"{system} workers={workers}: CRL {entries:,}")
                started = time.perf_counter()
                with self.running(system, workers, crl) as server:
                    row: dict[str, Any] = {"ready_seconds": time.perf_counter() - started}
                    if isinstance(server, Gateway):
                        row["load_seconds"] = server.metric("gateway_crl_load_seconds")
                    elif isinstance(server, Nginx):
                        row["load_seconds"] = server.config_test_seconds()
                    row["full"] = self.measure_handshakes(server, reuse=False, seconds=self.plan.handshake_seconds)
                    row["memory"] = self.memory(server)
                    log(
                        f"  {row['full']['per_second']:.0f} full handshakes/s; worker RSS {row['memory']['worker_rss_mib']:.0f} MiB; load {row['load_seconds'] or 0:.2f} s"  # noqa: E501 - one markdown/log line
                    )
                self.results["figures"].setdefault("crl", {}).setdefault(str(workers), {}).setdefault(str(entries), {})[
                    system
                ] = row

    def streaming(self) -> None:
        size = self.plan.stream_bytes
        body = upload_file(size)
        crl = ensure_crl(self.pki, 0, log=log)
        for system in ("gateway", "nginx"):
            log(f"{system} workers=1: streaming {size / 2**20:.0f} MiB up and down")
            with self.running(system, 1, crl) as server:
                row: dict[str, Any] = {}
                base = f"https://127.0.0.1:{server.port}/onre/"
                for name, url, upload in (
                    ("upload", base + "upload", body),
                    ("download", base + f"download?size={size}", None),
                ):
                    pids = server.worker_pids()
                    before = max(procs.rss_mib(p) for p in pids)
                    procs.reset_peak(pids)
                    meter = procs.CpuMeter(server.all_pids()).start()
                    res = load.curl_transfer(url, self.pki, self.cookie(server), upload=upload)
                    meter.stop()
                    peak = max(procs.hwm_mib(p) for p in pids)
                    row[name] = {
                        "status": res.status,
                        "bytes": res.bytes,
                        "mib_per_second": res.mib_per_second,
                        "rss_before_mib": before,
                        "peak_rss_mib": peak,
                        "growth_mib": peak - before,
                        "server_cpu_s_per_gib": meter.cpu / (max(1, res.bytes) / 2**30),
                    }
                    log(
                        f"  {name}: HTTP {res.status} {res.bytes / 2**20:.0f} MiB at {res.mib_per_second:.0f} MiB/s, peak RSS +{peak - before:.1f} MiB"  # noqa: E501 - one markdown/log line
                    )
            self.results["figures"].setdefault("streaming", {})[system] = row

    def reload_under_load(self) -> None:
        """p99 at 50 connections with and without a CRL swap of ``reload_entries`` during the run."""
        entries = self.plan.reload_entries
        first = ensure_crl(self.pki, entries, 10, log=log)
        second = ensure_crl(self.pki, entries, 11, log=log)
        live = self.workdir / "live-crl.pem"
        for system in ("gateway", "nginx"):
            shutil.copyfile(first, live)
            log(f"{system} workers=1: p99 with and without a {entries:,}-entry CRL reload")
            with self.running(system, 1, live, refresh=1.0) as server:
                row: dict[str, Any] = {"baseline": self.measure_keepalive(server, 50, self.plan.reload_seconds)}
                # +1: the warm-up second of measure_keepalive
                thread = threading.Thread(target=_swap, args=(server, second, live, self.plan.reload_seconds / 4 + 1))
                before_loads = server.metric("gateway_crl_refreshes_total") if isinstance(server, Gateway) else None
                thread.start()
                row["during_reload"] = self.measure_keepalive(server, 50, self.plan.reload_seconds)
                thread.join()
                if isinstance(server, Gateway):
                    row["reloads_seen"] = (server.metric("gateway_crl_refreshes_total") or 0) - (before_loads or 0)
                    row["load_seconds"] = server.metric("gateway_crl_load_seconds")
                row["memory_after"] = self.memory(server)
                b, d = row["baseline"], row["during_reload"]
                log(f"  p99 {b['p99_ms']:.1f} ms -> {d['p99_ms']:.1f} ms during reload (max {d['max_ms']:.0f} ms)")
            self.results["figures"].setdefault("reload", {})[system] = row


def _swap(server: Server, new: Path, live: Path, after: float) -> None:
    """Replace the live CRL file with ``new`` after ``after`` seconds; nginx also gets SIGHUP."""
    time.sleep(after)
    tmp = live.with_suffix(".tmp")
    shutil.copyfile(new, tmp)
    os.replace(tmp, live)
    if isinstance(server, Nginx) and server.proc is not None:
        os.kill(server.proc.pid, signal.SIGHUP)


def keepalive_row(res: load.KeepAliveResult, server: procs.CpuMeter, backend: procs.CpuMeter) -> dict[str, Any]:
    """One keep-alive figure: CPU per request first (server, backend, load generator), then throughput."""
    total = max(1, res.ok + res.bad)
    return {
        "server_cpu_us": 1e6 * server.cpu / total,
        "backend_cpu_us": 1e6 * backend.cpu / total,
        "loadgen_cpu_us": 1e6 * res.client_cpu / total,
        "server_cpu_share": server.cpu / server.wall if server.wall else 0.0,
        "rps": res.requests_per_second,
        "p50_ms": res.p50_ms,
        "p99_ms": res.p99_ms,
        "max_ms": res.max_ms,
        "ok": res.ok,
        "non_200": res.bad,
        "socket_errors": res.errors,
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0

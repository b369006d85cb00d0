"""Running the gateway: one worker's listeners and lifecycle, and the multi-worker supervisor.

A worker owns its TLS listener (``SO_REUSEPORT`` when there are several), its
aiohttp runner, the CRL refresher and the audit writer, and stops in order:
stop accepting, let in-flight requests finish (up to a deadline), flush the
audit queue. SIGHUP reloads certificates, CAs, routes and CRL sources,
validated first and swapped only when all of it loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding

from gateway import metrics
from gateway.admin import build_admin_app, health_from_metrics
from gateway.app import AccessLayer, AuditSink, GatewayRuntime, build_app, utcnow
from gateway.audit import AuditEvent, EventKind
from gateway.certpolicy import TrustAnchors, parse_peer
from gateway.config import Config, load_config, require_gateway
from gateway.logs import JsonAccessLogger, setup_logging
from gateway.revocation import CrlRefresher
from gateway.routing import Router
from gateway.tls import HandshakeFailure, TlsAcceptor, build_server_context, load_client_cas

log = logging.getLogger(__name__)


def install_uvloop() -> bool:
    """Use uvloop when installed (faster TLS and HTTP parsing); say which loop runs."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


@dataclass
class TlsState:
    """What a reload swaps: the SSL context and the trust anchors built from the same files."""

    context: ssl.SSLContext
    anchors: TrustAnchors
    ca_ders: list[bytes]


def load_tls_state(config: Config) -> TlsState:
    assert config.tls is not None
    cas = load_client_cas(config.tls.client_ca)
    return TlsState(
        context=build_server_context(config.tls, cas),
        anchors=TrustAnchors.of(cas, config.tls.issuer),
        ca_ders=[ca.public_bytes(Encoding.DER) for ca in cas],
    )


class _Refuse(asyncio.Protocol):
    """Answers a connection over the limit by closing it at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


AccessFactory = Callable[[Config, AuditSink], AccessLayer | None]


@dataclass
class GatewayWorker:
    """One worker process's gateway (also used in-process by tests and the demo)."""

    config: Config
    audit: AuditSink
    worker: int = 0
    reuse_port: bool = False
    serve_admin: bool = True
    access_factory: AccessFactory | None = None
    clock: Callable[[], Any] = utcnow
    port: int = 0
    admin_port: int = 0
    runtime: GatewayRuntime | None = None
    _tls: TlsState | None = None
    _runner: web.AppRunner | None = None
    _admin_runner: web.AppRunner | None = None
    _server: asyncio.AbstractServer | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _pending_handshakes: int = 0

    async def start(self) -> None:
        config = self.config
        require_gateway(config)
        assert config.revocation is not None and config.tls is not None
        self._tls = load_tls_state(config)
        refresher = CrlRefresher(config.revocation, self._tls.ca_ders, on_failure=self._crl_failed)
        await refresher.refresh_all()
        self.runtime = GatewayRuntime(
            config=config,
            anchors=self._tls.anchors,
            refresher=refresher,
            router=Router(config.backends),
            audit=self.audit,
            worker=self.worker,
            clock=self.clock,
        )
        access = self.access_factory(config, self.audit) if self.access_factory else None
        app = build_app(self.runtime, access)
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log_class=JsonAccessLogger,
            access_log=logging.getLogger("gateway.access"),
            keepalive_timeout=config.limits.keepalive_timeout,
            max_line_size=config.limits.max_line_bytes,
            max_field_size=config.limits.max_header_bytes,
            shutdown_timeout=30.0,
        )
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            config.listen.host,
            config.listen.port,
            reuse_port=self.reuse_port or None,
            backlog=1024,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._tasks.append(loop.create_task(refresher.run()))
        if self.serve_admin and config.admin is not None:
            await self._start_admin()
        log.info(
            "gateway listening",
            extra={
                "host": config.listen.host,
                "port": self.port,
                "crl_entries": sum(s.entries for s in refresher.state.by_issuer.values()),
            },
        )

    def _protocol(self) -> asyncio.Protocol:
        assert self._runner is not None and self._runner.server is not None and self._tls is not None
        open_now = len(self._runner.server.connections) + self._pending_handshakes
        if open_now >= self.config.limits.max_connections:
            return _Refuse()
        assert self.config.tls is not None
        return TlsAcceptor(
            lambda: self._context(),
            self._runner.server,
            self._handshake_failed,
            self.config.tls.handshake_timeout,
        )

    def _context(self) -> ssl.SSLContext:
        assert self._tls is not None
        return self._tls.context

    def _handshake_failed(self, failure: HandshakeFailure) -> None:
        metrics.HANDSHAKE_FAILURES.labels(failure.reason).inc()
        if failure.reason in ("connection_lost",) and failure.client_der is None:
            return  # port scanners and health probes: counted, not audited
        peer = parse_peer(failure.client_der) if failure.client_der else None
        self.audit.record(
            AuditEvent(
                event=EventKind.HANDSHAKE_FAILED,
                reason=failure.reason,
                client_ip=failure.peer[0] if failure.peer else "",
                client_port=failure.peer[1] if failure.peer else None,
                cert_subject=peer.common_name or peer.subject if peer else "",
                cert_serial=peer.serial_hex if peer else "",
                cert_issuer=peer.issuer_text if peer else "",
                cert_fingerprint=peer.fingerprint if peer else "",
                cert_not_after=peer.not_after.isoformat() if peer else "",
                worker=self.worker,
                detail=failure.message[:500],
            )
        )

    def _crl_failed(self, source: str, why: str) -> None:
        self.audit.record(
            AuditEvent(
                event=EventKind.CRL_REFRESH_FAILED,
                reason="crl_refresh_failed",
                worker=self.worker,
                detail=f"{source}: {why}"[:500],
            )
        )

    async def _start_admin(self) -> None:
        assert self.config.admin is not None
        app = build_admin_app(self.health)
        self._admin_runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._admin_runner.setup()
        site = web.TCPSite(self._admin_runner, self.config.admin.host, self.config.admin.port)
        await site.start()
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.admin_port = server.sockets[0].getsockname()[1]

    def health(self) -> tuple[bool, dict[str, Any]]:
        assert self.runtime is not None
        state = self.runtime.refresher.state
        fresh = state.fresh(self.runtime.clock())
        self.runtime.refresher.update_age_metrics()
        detail = {
            "crl_fresh": fresh,
            "crl_entries": sum(s.entries for s in state.by_issuer.values()),
            "backends": len(self.config.backends),
            "crl_errors": dict(self.runtime.refresher.last_error),
        }
        return fresh and bool(self.config.backends), detail

    async def reload(self) -> tuple[bool, str]:
        """Re-read the config and every file it names; swap only if all of it is good."""
        try:
            config = load_config(self.config.path)
            require_gateway(config)
            tls = load_tls_state(config)
            assert config.revocation is not None
            refresher = CrlRefresher(config.revocation, tls.ca_ders, on_failure=self._crl_failed)
            await refresher.refresh_all()
            if not refresher.state.by_issuer:
                await refresher.aclose()
                raise ValueError(
                    "no CRL could be loaded from the new configuration: " + "; ".join(refresher.last_error.values())
                )
        except Exception as exc:
            metrics.RELOADS.labels("failed").inc()
            log.error("reload failed; keeping the running configuration", extra={"error": str(exc)})
            return False, str(exc)
        assert self.runtime is not None
        old = self.runtime.refresher
        self._tls = tls
        self.runtime.config = config
        self.runtime.anchors = tls.anchors
        self.runtime.router = Router(config.backends)
        self.runtime.refresher = refresher
        self.runtime._issuer_verdicts.clear()
        self.config = config
        for task in self._tasks:
            task.cancel()
        self._tasks = [asyncio.get_running_loop().create_task(refresher.run())]
        await old.aclose()
        metrics.RELOADS.labels("ok").inc()
        log.info("reloaded", extra={"config": str(config.path)})
        return True, "reloaded"

    async def stop(self) -> None:
        """Stop accepting, drain in-flight requests, stop background tasks."""
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self.runtime is not None:
            await self.runtime.refresher.aclose()


# ---------------------------------------------------------------------------
# Process entry points.


def make_audit(config: Config) -> Any:
    """The audit writer for a process (see gateway.auditlog)."""
    from gateway.auditlog import AuditLog

    return AuditLog(config.audit)


def default_access_factory(config: Config, audit: AuditSink) -> AccessLayer | None:
    from gateway.login import LoginAccess

    return LoginAccess(config, audit)


async def serve_worker(config: Config, worker: int, *, reuse_port: bool, serve_admin: bool) -> int:
    """Run one worker until SIGTERM/SIGINT; SIGHUP reloads."""
    audit = make_audit(config)
    await audit.start()
    gw = GatewayWorker(
        config,
        audit,
        worker=worker,
        reuse_port=reuse_port,
        serve_admin=serve_admin,
        access_factory=default_access_factory,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(gw.reload()))
    try:
        await gw.start()
        await stop.wait()
        log.info("stopping: draining connections")
    finally:
        await gw.stop()
        await audit.aclose()
    return 0


def _worker_main(config_path: str, worker: int, log_level: str) -> None:
    setup_logging(log_level, worker)
    install_uvloop()
    config = load_config(config_path)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; SIGTERM stops us
    raise SystemExit(asyncio.run(serve_worker(config, worker, reuse_port=True, serve_admin=False)))


def run(config: Config) -> int:
    """``gateway serve``: one worker in-process, or a supervisor with N workers."""
    setup_logging(config.log_level)
    require_gateway(config)
    if config.workers <= 1:
        log.info("starting", extra={"workers": 1, "uvloop": install_uvloop()})
        return asyncio.run(serve_worker(config, 0, reuse_port=False, serve_admin=True))
    return asyncio.run(_supervise(config))


async def _supervise(config: Config) -> int:
    """Start N spawned workers sharing the port; restart crashes; forward signals."""
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, Any] = {}

    def spawn(i: int) -> None:
        proc = ctx.Process(
            target=_worker_main, args=(str(config.path), i, config.log_level), name=f"gateway-worker-{i}"
        )
        proc.start()
        procs[i] = proc

    for i in range(config.workers):
        spawn(i)
    log.info("supervisor started", extra={"workers": config.workers, "pids": [p.pid for p in procs.values()]})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: [os.kill(p.pid, signal.SIGHUP) for p in procs.values() if p.pid])
    admin_runner = None
    if config.admin is not None:
        grace = config.revocation.grace_seconds if config.revocation else 0.0
        admin_runner = web.AppRunner(build_admin_app(health_from_metrics(len(config.backends), grace)), access_log=None)
        await admin_runner.setup()
        await web.TCPSite(admin_runner, config.admin.host, config.admin.port).start()
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            for i, proc in list(procs.items()):
                if not proc.is_alive() and not stop.is_set():
                    log.error("worker exited; restarting", extra={"worker": i, "exitcode": proc.exitcode})
                    time.sleep(0.5)
                    spawn(i)
    finally:
        for proc in procs.values():
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            await loop.run_in_executor(None, proc.join, 40)
        if admin_runner is not None:
            await admin_runner.cleanup()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0

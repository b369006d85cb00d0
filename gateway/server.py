"""Running the gateway: one worker's listeners and lifecycle, and the multi-worker supervisor.

A worker owns its TLS listener (``SO_REUSEPORT`` when there are several), its
aiohttp runner, the CRL refresher and the audit writer, and stops in order:
stop accepting, close idle keep-alive connections, let in-flight requests
finish (up to ``limits.drain_timeout_seconds``), flush the audit queue, exit
0. SIGHUP reloads certificates, CAs, routes and CRL sources, validated first
and swapped only when all of it loaded.

Reload, step by step (:meth:`GatewayWorker.reload`): read the config, load
the server certificate and key, the client CA bundles and *every* CRL source
into new objects; if anything fails, count ``gateway_reloads_total{result=
"failed"}``, log it and keep serving with the old objects. Otherwise swap
them in with plain assignments and no ``await`` in between, so no request
ever sees a half-swapped state or an empty CRL state; then stop the old CRL
refresher. Open connections keep the TLS session they have (and are judged
per request against the new CAs and CRLs); new handshakes use the new
certificate. Sections that need a restart (listen, workers, admin, audit,
users, session, login) are named in the reload message.

With several workers the supervisor validates the same files first (so a
broken file is reported before any worker is touched), then sends SIGHUP to
each worker and collects every worker's result over a queue: ``gateway
reload`` succeeds only when all workers reloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
import os
import queue
import secrets
import shutil
import signal
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client.multiprocess import mark_process_dead

from gateway import metrics
from gateway.app import AccessLayer, AuditSink, GatewayRuntime, build_app, proxied_fast_path, utcnow
from gateway.audit.events import AuditEvent, EventKind
from gateway.certs.policy import KeyPolicy, TrustAnchors, expiring_cas, parse_peer
from gateway.certs.revocation import CrlRefresher
from gateway.config import Config, RevocationConfig, load_config, require_gateway
from gateway.errors import GatewayError, StartupError, listener_error
from gateway.forward.routing import Router
from gateway.logs import JsonAccessLogger, setup_logging
from gateway.sdnotify import Notifier
from gateway.storage import postgres
from gateway.tls.deadlines import ClientDeadlines, peer_address
from gateway.tls.listener import BatchListener, listen
from gateway.tls.termination import (
    TICKET_KEYS_BYTES,
    HandshakeFailure,
    TlsAcceptor,
    build_server_context,
    load_client_cas,
    resumption_mode,
)
from gateway.web.admin import build_admin_app, crl_health_detail, health_from_metrics
from gateway.web.messages import plural
from gateway.web.protocol import GatewayRequestHandler

if TYPE_CHECKING:
    from gateway.storage.pg_issuance import RevocationFeed

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


# The supervisor hands its workers one set of session-ticket keys through the
# environment (inherited by the spawned workers, readable only by the same
# user): a ticket from one worker then resumes at any other. A restart of
# the supervisor makes new keys, which is also the key rotation.
TICKET_KEYS_ENV = "GATEWAY_TLS_TICKET_KEYS"


def load_tls_state(config: Config) -> TlsState:
    """Server context and trust anchors; refuses malformed configured CAs (check-config, start-up, reload)."""
    assert config.tls is not None
    policy = KeyPolicy(frozenset(config.tls.key_types), config.tls.rsa_min_bits)
    cas = load_client_cas(config.tls.client_ca, policy)
    keys = os.environ.get(TICKET_KEYS_ENV)
    cache = resumption_mode(config.tls.session_resumption, config.workers) == "cache"
    return TlsState(
        context=build_server_context(config.tls, cas, bytes.fromhex(keys) if keys else None, session_cache=cache),
        anchors=TrustAnchors.of(cas, config.tls.issuer, key_policy=policy, max_chain_depth=config.tls.max_chain_depth),
        ca_ders=[ca.public_bytes(Encoding.DER) for ca in cas],
    )


CA_EXPIRY_WARNING = dt.timedelta(days=30)


def warn_expiring_cas(anchors: TrustAnchors, now: dt.datetime) -> list[str]:
    """Log and count configured CAs that expire within 30 days (or have); the lines, for /healthz and check-config."""
    lines = expiring_cas(anchors.cas, now, CA_EXPIRY_WARNING)
    metrics.CA_EXPIRING.set(len(lines))
    for line in lines:
        log.warning("configured client CA expires soon: %s", line, extra={"ca": line})
    return lines


CrlFailureHook = Callable[[str, str], None]
# Config sections a running worker cannot take over; changing them needs a restart.
RESTART_SECTIONS = ("listen", "workers", "admin", "audit", "users", "session", "login")


async def load_everything(
    path: Path, on_crl_failure: CrlFailureHook | None = None
) -> tuple[Config, TlsState, CrlRefresher]:
    """Read a config and every file it names, as a reload would; raise on any problem.

    The returned refresher holds the loaded CRLs (the caller owns it: swap it
    in or ``aclose`` it). Every configured CRL source must load: a reload
    that would silently drop a source's CRL is refused as a whole.
    """
    config = load_config(path)
    require_gateway(config)
    assert config.revocation is not None
    tls = load_tls_state(config)
    refresher = await load_crls(config.revocation, tls.ca_ders, on_crl_failure)
    return config, tls, refresher


async def load_crls(
    revocation: RevocationConfig, ca_ders: list[bytes], on_crl_failure: CrlFailureHook | None = None
) -> CrlRefresher:
    """Every configured CRL source, loaded and verified, or a :class:`GatewayError` naming each bad one.

    The one rule for a bad CRL (see :mod:`gateway.certs.revocation`): when a
    configuration is taken (start-up, reload) every source must load, or the
    configuration is refused; only background refreshes keep the last good CRL.
    """
    refresher = CrlRefresher(revocation, ca_ders, on_failure=on_crl_failure)
    await refresher.refresh_all()
    if refresher.last_error:
        await refresher.aclose()
        problems = "; ".join(f"{source}: {why}" for source, why in refresher.last_error.items())
        raise GatewayError(f"CRL source not loaded: {problems}")
    return refresher


def restart_needed(old: Config, new: Config) -> list[str]:
    """The changed sections a reload cannot apply."""
    return [name for name in RESTART_SECTIONS if getattr(old, name) != getattr(new, name)]


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
    _server: BatchListener | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _pending_handshakes: int = 0
    _listening: bool = False
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _handler_args: dict[str, Any] = field(default_factory=dict)
    _ca_warnings: list[str] = field(default_factory=list)
    _access: AccessLayer | None = None
    _revocation_feed: RevocationFeed | None = None  # with a database: the CA's pushed revocations

    async def start(self) -> None:
        config = self.config
        require_gateway(config)
        assert config.revocation is not None and config.tls is not None
        self._tls = load_tls_state(config)
        self._ca_warnings = warn_expiring_cas(self._tls.anchors, self.clock())
        refresher = await load_crls(config.revocation, self._tls.ca_ders, self._crl_failed)
        self.runtime = GatewayRuntime(
            config=config,
            anchors=self._tls.anchors,
            refresher=refresher,
            router=Router(config.backends),
            audit=self.audit,
            worker=self.worker,
            clock=self.clock,
        )
        self._start_revocation_feed(config, self.runtime)
        access = self.access_factory(config, self.audit) if self.access_factory else None
        self._access = access
        app = build_app(self.runtime, access)
        # The connection protocol's settings: given to the runner's server and to each
        # GatewayRequestHandler (built in _protocol), so both read the same limits.
        self._handler_args = {
            "access_log_class": JsonAccessLogger,
            "access_log": logging.getLogger("gateway.access"),
            "keepalive_timeout": config.limits.keepalive_timeout,
            "max_line_size": config.limits.max_line_bytes,
            "max_field_size": config.limits.max_header_bytes,
            # A proxy forwards the body as sent. Decompressed, it went out under the client's
            # Content-Encoding and Content-Length, and the bytes past that length reached the
            # backend as a request of their own, identity headers and all.
            "auto_decompress": False,
        }
        self._runner = web.AppRunner(
            app, handle_signals=False, shutdown_timeout=config.limits.drain_timeout, **self._handler_args
        )
        await self._runner.setup()
        assert self._runner.server is not None
        server = self._runner.server  # proxied requests skip the router (gateway.app.proxied_fast_path)
        server.request_handler = proxied_fast_path(app, server.request_handler)
        loop = asyncio.get_running_loop()
        # Not loop.create_server: uvloop's accepts one connection per loop iteration (see listener.py).
        try:
            self._server = await listen(
                loop, self._protocol, config.listen.host, config.listen.port, reuse_port=self.reuse_port, backlog=1024
            )
        except OSError as exc:
            await refresher.aclose()
            if self._revocation_feed is not None:
                await self._revocation_feed.stop()
            raise listener_error("gateway", config.listen.host, config.listen.port, exc) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        metrics.WORKERS_LISTENING.inc()
        self._listening = True
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
        server, limits = self._runner.server, self.config.limits

        def application() -> asyncio.Protocol:
            http = GatewayRequestHandler(
                server, loop=asyncio.get_running_loop(), on_unparsed=self._unparsed, **self._handler_args
            )
            return ClientDeadlines(http, limits.header_timeout, limits.body_timeout, self._client_timeout)

        self._pending_handshakes += 1
        return TlsAcceptor(
            self._context, application, self._handshake_failed, self.config.tls.handshake_timeout, self._settled
        )

    def _unparsed(self, request: web.BaseRequest, detail: str) -> web.StreamResponse:
        assert self.runtime is not None
        return self.runtime.refuse_unparsed(request, detail)

    def _settled(self) -> None:
        self._pending_handshakes -= 1

    def _client_timeout(
        self, why: str, transport: asyncio.Transport, request: web.BaseRequest | None, started: bool
    ) -> None:
        """A client missed a deadline: counted, logged, and audited unless it never sent a byte.

        A connection that stays silent from its handshake on is a browser's
        speculative preconnect as often as an attack: counted, not audited.
        """
        metrics.CLIENT_TIMEOUTS.labels(why).inc()
        peer = peer_address(transport.get_extra_info("peername"))
        log.info("closed a stalled client connection", extra={"reason": why, "client_ip": peer[0] if peer else ""})
        if self.runtime is None or not started:
            return
        limits = self.config.limits
        if why == "header_timeout":
            detail = f"request head not complete within {limits.header_timeout:g} s (limits.header_timeout_seconds)"
        else:
            detail = f"request body silent for {limits.body_timeout:g} s (limits.body_timeout_seconds)"
        self.runtime.client_timed_out(transport, request, detail)

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
        app = build_admin_app(self.health, audit_routes(self.config), reload=self.reload, instance=self.config.instance)
        self._admin_runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._admin_runner.setup()
        site = await start_admin_site(self._admin_runner, self.config)
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
            "ca_expiring": list(self._ca_warnings),
            **crl_health_detail(
                [s.next_update.timestamp() for s in state.by_issuer.values()],
                self.runtime.clock().timestamp(),
                self.runtime.refresher.config.warn_before_next_update,
            ),
        }
        database = getattr(self._access, "database_health", None)  # PostgreSQL: is the session listener up?
        db_ok, db_detail = database() if database is not None else (True, {})
        return fresh and bool(self.config.backends) and db_ok, {**detail, **db_detail}

    async def reload(self) -> tuple[bool, str]:
        """Re-read the config and every file it names; swap only if all of it is good."""
        async with self._reload_lock:  # SIGHUP and POST /reload may overlap
            if self.runtime is None:
                return False, "the gateway has not started yet"
            try:
                config, tls, refresher = await load_everything(self.config.path, self._crl_failed)
            except Exception as exc:
                metrics.RELOADS.labels("failed").inc()
                log.error("reload failed; keeping the running configuration", extra={"error": str(exc)})
                return False, f"reload failed, still serving the previous configuration: {exc}"
            restart = restart_needed(self.config, config)
            await self._swap(config, tls, refresher)
        metrics.RELOADS.labels("ok").inc()
        message = "reloaded" + (f"; restart needed for: {', '.join(restart)}" if restart else "")
        log.info(message, extra={"config": str(config.path)})
        return True, message

    async def _swap(self, config: Config, tls: TlsState, refresher: CrlRefresher) -> None:
        """Assign everything without yielding to the loop, then stop the old refresher."""
        runtime = self.runtime
        assert runtime is not None
        old_refresher, old_tasks = runtime.refresher, self._tasks
        self._tls = tls
        self._ca_warnings = warn_expiring_cas(tls.anchors, runtime.clock())
        runtime.config = config
        runtime.anchors = tls.anchors
        runtime.router = Router(config.backends)
        runtime.refresher = refresher
        runtime.clear_verdicts()
        self.config = config
        self._tasks = [asyncio.get_running_loop().create_task(refresher.run())]
        for task in old_tasks:
            task.cancel()
        await asyncio.gather(*old_tasks, return_exceptions=True)
        await old_refresher.aclose()

    async def stop(self) -> None:
        """Stop accepting, drain in-flight requests, stop background tasks."""
        if self._server is not None:
            self._server.close()
        if self._listening:
            metrics.WORKERS_LISTENING.dec()
            self._listening = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self.runtime is not None:
            await self.runtime.refresher.aclose()
        if self._revocation_feed is not None:
            await self._revocation_feed.stop()

    def _start_revocation_feed(self, config: Config, runtime: GatewayRuntime) -> None:
        """With a ``database:``, listen for the CA's revocation pushes (see :mod:`gateway.storage.pg_issuance`)."""
        if config.database is None:
            return
        where = postgres.target_of(config.database, application_name=f"tse-gateway:{config.instance}")
        from gateway.storage.pg_issuance import RevocationFeed  # the CA's code only where a database pushes

        self._revocation_feed = RevocationFeed(where, clock=self.clock)
        runtime.pushed_revocations = self._revocation_feed.revoked
        self._revocation_feed.start()


# ---------------------------------------------------------------------------
# Process entry points.


def make_audit(config: Config, worker: int | None = None) -> Any:
    """The audit writer for a process (see gateway.audit.writer)."""
    from gateway.audit.writer import AuditLog

    return AuditLog(config, worker=worker, checkpoints=not worker)  # one checkpointer per instance: worker 0


def audit_routes(config: Config) -> Callable[[web.Application], None]:
    """Adds the read-only /audit report to an admin app, only when ``admin.audit_report`` is on.

    The admin listener has no login, so the report (user IDs, addresses,
    certificates) is off by default; the audit workspace on the gateway is the place for it.
    """
    from gateway.audit.report import audit_handler

    def add(app: web.Application) -> None:
        if config.admin is not None and config.admin.audit_report:
            from gateway.audit.trailstate import StateCache
            from gateway.storage.backends import Backend

            backend, states = Backend(config, role="admin"), StateCache()

            async def close(_app: web.Application) -> None:
                states.close()  # the page's background verifier
                backend.close()

            app.on_cleanup.append(close)
            app.router.add_get("/audit", audit_handler(backend, states))

    return add


def default_access_factory(config: Config, audit: AuditSink) -> AccessLayer | None:
    from gateway.access.login import LoginAccess

    return LoginAccess(config, audit)


def start_watchdog(notify: Notifier) -> asyncio.Task[None] | None:
    """Feed systemd's watchdog at half its interval while this event loop runs (None: no WatchdogSec)."""
    interval = notify.watchdog_seconds
    if interval is None:
        return None

    async def feed() -> None:
        while True:
            notify.watchdog()
            await asyncio.sleep(interval / 2)

    return asyncio.get_running_loop().create_task(feed())


async def serve_worker(
    config: Config,
    worker: int,
    *,
    reuse_port: bool,
    serve_admin: bool,
    results: Any = None,
    lifecycle: Any = None,
    notifier: Notifier | None = None,
) -> int:
    """Run one worker until SIGTERM/SIGINT; SIGHUP reloads.

    ``results`` (a multiprocessing queue from the supervisor) receives
    ``(pid, ok, message)`` after each reload, so ``gateway reload`` can say
    whether every worker took the new configuration; ``lifecycle`` receives
    ``("started", worker, pid)`` once the worker listens. ``notifier`` is
    systemd's (a single worker started by a unit): READY once listening,
    RELOADING/READY around a reload, STOPPING on drain, WATCHDOG meanwhile.
    """
    notify = notifier or Notifier(environ={})
    audit = make_audit(config, worker)
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
    reloads: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        notify.reloading()
        ok, message = await gw.reload()
        notify.ready(f"reload {'done' if ok else 'refused'}: {message}")
        if results is not None:
            results.put((os.getpid(), ok, message))

    def on_hup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    watchdog: asyncio.Task[None] | None = None
    try:
        await gw.start()
        metrics.WORKERS_CONFIGURED.set(config.workers)
        if lifecycle is not None:
            lifecycle.put(("started", worker, os.getpid()))
        notify.ready(f"serving on {config.listen.host}:{gw.port}")
        watchdog = start_watchdog(notify)
        # Everything loaded so far (CRL index, config, modules, templates) lives until exit: keep
        # it out of the collector's generations, so a full collection walks only what requests
        # made (gen-2 collections took ~17 ms each over ~60,000 start-up objects: p99 spikes).
        gc.freeze()
        await stop.wait()
        notify.stopping()
        log.info("stopping: draining connections", extra={"deadline_seconds": gw.config.limits.drain_timeout})
    finally:
        if watchdog is not None:
            watchdog.cancel()
        await gw.stop()
        await audit.aclose()
        log.info("stopped")
    return 0


async def start_admin_site(runner: web.AppRunner, config: Config) -> web.TCPSite:
    """Bind the admin listener; a taken port is one line naming it, not a traceback."""
    assert config.admin is not None
    site = web.TCPSite(runner, config.admin.host, config.admin.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise listener_error("admin", config.admin.host, config.admin.port, exc) from exc
    return site


def _worker_main(config: Config, worker: int, log_level: str, results: Any, lifecycle: Any) -> None:
    """A spawned worker: runs the configuration the supervisor validated, never a re-read of the file.

    A start-up failure the operator can fix goes to the supervisor as one
    line on ``lifecycle`` (no traceback per worker); the supervisor reports it.
    """
    setup_logging(log_level, worker)
    install_uvloop()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; SIGTERM stops us
    coro = serve_worker(config, worker, reuse_port=True, serve_admin=False, results=results, lifecycle=lifecycle)
    try:
        code = asyncio.run(coro)
    except GatewayError as exc:
        lifecycle.put(("failed", worker, str(exc)))
        raise SystemExit(1) from None
    raise SystemExit(code)


def run(config: Config) -> int:
    """``gateway serve``: one worker in-process, or a supervisor with N workers.

    The caller runs the start-up checks first (``gateway serve`` runs the very
    ones ``gateway check-config`` runs, :mod:`gateway.startup`), so both refuse
    the same files with the same lines.
    """
    setup_logging(config.log_level)
    notifier = Notifier.from_environment()  # taken, so spawned workers cannot speak for the unit
    if config.workers <= 1:
        log.info("starting", extra={"workers": 1, "uvloop": install_uvloop()})
        return asyncio.run(serve_worker(config, 0, reuse_port=False, serve_admin=True, notifier=notifier))
    return asyncio.run(Supervisor(config, notifier).run())


RELOAD_WAIT_SECONDS = 60.0


def _multiprocess_child(counter: Any, *labels: str) -> Any:
    """A labelled child of ``counter`` written to the multiprocess folder, so /metrics shows it.

    The supervisor imported the metrics before ``PROMETHEUS_MULTIPROC_DIR``
    was set, so its samples are process-local by default. Only this one
    child is switched: the supervisor's CRL gauges (set while validating a
    reload) must stay out of the workers' aggregated freshness.
    """
    from prometheus_client import values

    saved = values.ValueClass
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    try:
        return counter.labels(*labels)
    finally:
        values.ValueClass = saved


@dataclass
class Backoff:
    """How long to wait before restarting a worker that exited: doubling, capped, reset by a stable run.

    Pure (times are passed in), so the schedule is tested with plain numbers.
    A worker that crashes at once again and again is restarted after 1, 2,
    4 ... up to ``ceiling`` seconds, not in a tight loop; one that had run
    for ``stable`` seconds before it exited starts over at ``first``.
    """

    first: float = 1.0
    ceiling: float = 60.0
    stable: float = 60.0
    last: float = 0.0

    def next_delay(self, uptime: float) -> float:
        delay = self.first if uptime >= self.stable or not self.last else min(self.ceiling, self.last * 2)
        self.last = delay
        return delay


@dataclass
class _WorkerSlot:
    """The supervisor's view of one worker index: its process, when it started, its restart schedule."""

    proc: Any
    started: float
    backoff: Backoff
    restart_at: float | None = None
    restarts: int = 0


class Supervisor:
    """Starts N spawned workers sharing the port; restarts crashes with backoff; forwards signals.

    Serves the admin listener itself (health from the workers' metrics) and
    coordinates reloads: validate, SIGHUP every worker, wait for each
    worker's answer on ``results``. Workers get the :class:`Config` the
    supervisor validated (at start, or at the last good reload), pickled
    into the spawned process: a worker restarted after a crash runs that
    configuration, whatever the file on disk says by then.
    """

    backoff = Backoff  # a factory, so a test may shorten the schedule

    def __init__(self, config: Config, notifier: Notifier | None = None) -> None:
        import multiprocessing  # only the supervisor needs it; a single worker never loads it for this

        self.config = config
        self.notify = notifier or Notifier(environ={})
        self.ctx = multiprocessing.get_context("spawn")
        self.slots: dict[int, _WorkerSlot] = {}
        self.results: Any = self.ctx.Queue()
        self.lifecycle: Any = self.ctx.Queue()
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[tuple[bool, str]]] = set()
        self._refused: Any = None  # set in run(), once the metrics folder exists

    @property
    def procs(self) -> dict[int, Any]:
        return {i: slot.proc for i, slot in self.slots.items()}

    def spawn(self, i: int) -> None:
        proc = self.ctx.Process(
            target=_worker_main,
            args=(self.config, i, self.config.log_level, self.results, self.lifecycle),
            name=f"gateway-worker-{i}",
        )
        proc.start()
        now = asyncio.get_running_loop().time()
        slot = self.slots.get(i)
        if slot is None:
            self.slots[i] = _WorkerSlot(proc, now, self.backoff())
        else:
            slot.proc, slot.started, slot.restart_at = proc, now, None

    async def reload(self) -> tuple[bool, str]:
        """Validate the new files here, then reload every worker and gather their answers."""
        self.notify.reloading()
        try:
            ok, message = await self._reload()
        except BaseException:
            self.notify.ready("reload failed; still serving the previous configuration")
            raise
        self.notify.ready("reloaded" if ok else "reload refused; still serving the previous configuration")
        return ok, message

    async def _reload(self) -> tuple[bool, str]:
        async with self._reload_lock:
            try:
                config, _tls, refresher = await load_everything(self.config.path)
                await refresher.aclose()
            except Exception as exc:
                if self._refused is not None:
                    self._refused.inc()  # workers were not asked, so they do not count this one
                log.error("reload refused; workers keep the running configuration", extra={"error": str(exc)})
                return False, f"reload failed, still serving the previous configuration: {exc}"
            self._drain_results()
            pids = {p.pid for p in self.procs.values() if p.is_alive() and p.pid}
            for pid in pids:
                os.kill(pid, signal.SIGHUP)
            answers = await self._collect(pids)
        self.config = config
        failed = [f"worker {pid}: {msg}" for pid, (ok, msg) in answers.items() if not ok]
        missing = sorted(pids - set(answers))
        if missing:
            failed.append(
                f"no answer from {plural(len(missing), 'worker')} {missing} within {RELOAD_WAIT_SECONDS:.0f} s"
            )
        ok = not failed  # each worker counted its own result in gateway_reloads_total
        messages = {msg for good, msg in answers.values() if good}
        message = "; ".join(failed) if failed else f"{plural(len(answers), 'worker')} " + "; ".join(sorted(messages))
        (log.info if ok else log.error)("reload finished", extra={"ok": ok, "detail": message})
        return ok, message

    def _drain_results(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.results.get_nowait()

    async def _collect(self, pids: set[int]) -> dict[int, tuple[bool, str]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELOAD_WAIT_SECONDS
        answers: dict[int, tuple[bool, str]] = {}
        while not pids <= set(answers) and (left := deadline - loop.time()) > 0:
            try:
                pid, ok, message = await loop.run_in_executor(None, self.results.get, True, min(left, 1.0))
            except queue.Empty:
                continue
            answers[pid] = (ok, message)
        return answers

    def _on_hup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())  # logs its own outcome
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def run(self) -> int:
        metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        os.environ.setdefault(TICKET_KEYS_ENV, secrets.token_hex(TICKET_KEYS_BYTES))
        self._refused = _multiprocess_child(metrics.RELOADS, "failed")
        config = self.config
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        admin_runner = None
        watchdog: asyncio.Task[None] | None = None
        try:
            if config.admin is not None:  # first: a taken admin port stops us before any worker starts
                grace = config.revocation.grace_seconds if config.revocation else 0.0
                warn = config.revocation.warn_before_next_update if config.revocation else 0.0
                health = health_from_metrics(len(config.backends), grace, config.workers, warn)
                admin = build_admin_app(health, audit_routes(config), reload=self.reload, instance=config.instance)
                admin_runner = web.AppRunner(admin, access_log=None)
                await admin_runner.setup()
                await start_admin_site(admin_runner, config)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            for i in range(config.workers):
                self.spawn(i)
            await self._until_started(loop, stop)
            log.info("supervisor started", extra={"workers": config.workers, "pids": self._pids()})
            self.notify.ready(f"{config.workers} workers serving on {config.listen.host}:{config.listen.port}")
            watchdog = start_watchdog(self.notify)
            loop.add_signal_handler(signal.SIGHUP, self._on_hup)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
                if not stop.is_set():
                    self._tend(loop.time())
            self.notify.stopping()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            await self._shutdown(loop)
            if admin_runner is not None:
                await admin_runner.cleanup()
            shutil.rmtree(metrics_dir, ignore_errors=True)
        return 0

    def _pids(self) -> list[int | None]:
        return [slot.proc.pid for slot in self.slots.values()]

    async def _until_started(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        """Wait until every worker listens; the first one that cannot start stops the whole start.

        Its one line (``gateway listener 127.0.0.1:8443: address already in
        use``) becomes the supervisor's error: one line, not a traceback per worker.
        """
        started: set[int] = set()
        while len(started) < len(self.slots) and not stop.is_set():
            try:
                kind, worker, detail = await loop.run_in_executor(None, self.lifecycle.get, True, 0.2)
            except queue.Empty:
                dead = [i for i, slot in self.slots.items() if i not in started and not slot.proc.is_alive()]
                if dead and self.lifecycle.empty():
                    code = self.slots[dead[0]].proc.exitcode
                    raise StartupError(f"worker {dead[0]} exited with status {code} before it was listening") from None
                continue
            if kind == "failed":
                raise StartupError(str(detail))
            started.add(int(worker))

    def _tend(self, now: float) -> None:
        """Log start-up failures of restarted workers, schedule restarts with backoff, restart the due ones."""
        with contextlib.suppress(queue.Empty):
            while True:
                kind, worker, detail = self.lifecycle.get_nowait()
                if kind == "failed":
                    log.error("worker could not start", extra={"worker": worker, "error": detail})
        for i, slot in self.slots.items():
            if slot.proc.is_alive():
                continue
            if slot.restart_at is None:
                delay = slot.backoff.next_delay(now - slot.started)
                slot.restart_at = now + delay
                slot.restarts += 1
                if slot.proc.pid:  # its CRL gauges must not hold /healthz down
                    mark_process_dead(slot.proc.pid)  # type: ignore[no-untyped-call]
                _multiprocess_child(metrics.WORKER_RESTARTS, str(i)).inc()
                log.error(
                    "worker exited; restarting",
                    extra={
                        "worker": i,
                        "pid": slot.proc.pid,
                        "exitcode": slot.proc.exitcode,
                        "delay_seconds": delay,
                        "restarts": slot.restarts,
                    },
                )
            elif now >= slot.restart_at:
                self.spawn(i)
                log.info("worker restarted", extra={"worker": i, "pid": slot.proc.pid, "restarts": slot.restarts})

    async def _shutdown(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGTERM every worker (each drains on its own) and wait for them."""
        for proc in self.procs.values():
            if proc.is_alive() and proc.pid:
                os.kill(proc.pid, signal.SIGTERM)
        wait = self.config.limits.drain_timeout + 15
        for proc in self.procs.values():
            await loop.run_in_executor(None, proc.join, wait)
        self.results.close()
        self.lifecycle.close()

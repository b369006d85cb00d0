"""The portal's admin listener (``portal.admin``, plain HTTP, bind it to loopback): /healthz and /metrics.

The portal's one HTTPS listener is for users; monitoring gets a listener of
its own like the gateway's ``admin:``, so a scrape never meets the users'
login, and the listener is off unless configured.

Health means "the CA keeps its CRL signed": the last CRL the CA published
is before its nextUpdate (else 503: every gateway will soon refuse every
user), and "degraded" (still 200) within the same margin the gateways use.
The counters come from the audit events the portal records anyway
(issuance, revocation, login refusals), so no handler needs its own call.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from gateway import metrics
from gateway.audit.events import AuditEvent, EventKind
from gateway.errors import listener_error
from gateway.web.admin import HealthCheck, build_admin_app, crl_health_detail

if TYPE_CHECKING:
    from gateway.ca.authority import CertificateAuthority
    from gateway.ca.publisher import AuditSink
    from gateway.config import Config


class Portal(Protocol):
    """What the admin listener reads of the portal (a protocol: the portal imports this module, not the reverse)."""

    config: Config
    ca: CertificateAuthority
    admin_port: int | None
    clock: Callable[[], dt.datetime]


DEFAULT_WARN_BEFORE = 21600.0  # the gateways' default revocation.warn_before_next_update_seconds


class MeteredAudit:
    """An audit sink that counts the portal's issuances, revocations and login refusals, then passes the event on."""

    def __init__(self, sink: AuditSink) -> None:
        self.sink = sink

    def record(self, event: AuditEvent) -> None:
        count(event)
        self.sink.record(event)

    def __getattr__(self, name: str) -> Any:  # the wrapped sink's other methods (tests read ListAudit.events)
        return getattr(self.sink, name)


def count(event: AuditEvent) -> None:
    if event.event == EventKind.CERTIFICATE_ISSUED:
        metrics.PORTAL_ISSUED.inc()
    elif event.event == EventKind.CERTIFICATE_REVOKED:
        metrics.PORTAL_REVOKED.inc()
    elif event.event == EventKind.ISSUANCE_REFUSED:
        metrics.PORTAL_ISSUANCE_REFUSALS.labels(event.reason).inc()
    elif event.event in (EventKind.LOGIN_REFUSED, EventKind.ACCOUNT_LOCKED):
        metrics.PORTAL_LOGIN_REFUSALS.labels(event.reason).inc()


def portal_health(ca: CertificateAuthority, clock: Callable[[], dt.datetime], warn_before: float) -> HealthCheck:
    """Healthy while the CA's last CRL is before its nextUpdate; degraded within ``warn_before`` of it."""

    def check() -> tuple[bool, dict[str, Any]]:
        crl = ca.last_crl()
        now = clock().timestamp()
        next_updates = [crl.next_update.timestamp()] if crl else []
        fresh = bool(next_updates) and now <= next_updates[0]
        return fresh, {"crl_fresh": fresh, "crl_number": crl.number if crl else None} | crl_health_detail(
            next_updates, now, warn_before
        )

    return check


def crl_gauges(ca: CertificateAuthority, clock: Callable[[], dt.datetime]) -> None:
    """CRL age and time to nextUpdate, read from the CA's records at scrape time."""

    def age() -> float:
        crl = ca.last_crl()
        return (clock() - crl.this_update).total_seconds() if crl else float("nan")

    def left() -> float:
        crl = ca.last_crl()
        return (crl.next_update - clock()).total_seconds() if crl else float("nan")

    metrics.PORTAL_CRL_AGE.set_function(age)
    metrics.PORTAL_CRL_SECONDS_TO_NEXT_UPDATE.set_function(left)


def setup_portal_admin(app: web.Application, portal: Portal) -> None:
    """Serve /healthz and /metrics on ``portal.admin`` for as long as the portal app runs (none if unset)."""
    config = portal.config
    listen = config.portal.admin if config.portal else None
    if listen is None:
        return
    warn = config.revocation.warn_before_next_update if config.revocation else DEFAULT_WARN_BEFORE
    health = portal_health(portal.ca, portal.clock, warn)
    crl_gauges(portal.ca, portal.clock)

    async def listener(_app: web.Application) -> AsyncIterator[None]:
        admin = build_admin_app(health, instance=config.instance)
        runner = web.AppRunner(admin, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, listen.host, listen.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise listener_error("portal admin", listen.host, listen.port, exc) from exc
        portal.admin_port = int(runner.addresses[0][1])
        yield
        await runner.cleanup()

    app.cleanup_ctx.append(listener)

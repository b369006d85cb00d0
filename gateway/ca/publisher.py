"""The CRL schedule: re-sign the CA's CRL before it runs out, even when nothing changed.

A revocation publishes a fresh CRL at once (:meth:`CertificateAuthority.revoke`);
this task covers the rest. Relying parties (the gateway) refuse every
certificate once the CRL is past its nextUpdate, so a quiet week without
revocations must not let it lapse. :meth:`CertificateAuthority.crl_due`
holds the rule (no CRL yet, a revocation not yet published, files missing,
or less than a third of the validity left); this module only asks it on a
timer and publishes, in an executor because signing and SQLite block.

Several portal processes may run the schedule at once: the CA serialises
publications with a lock file and ``crl_due`` is re-asked under no lock, so
the worst case is one extra, harmless re-signing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Protocol

from gateway.audit.events import AuditEvent, EventKind
from gateway.ca.authority import CertificateAuthority
from gateway.ca.issuance import CrlInfo
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 60.0  # seconds between checks; a check is one SELECT and two stats


class AuditSink(Protocol):
    def record(self, event: AuditEvent) -> None: ...


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def publish_if_due(ca: CertificateAuthority, now: dt.datetime) -> CrlInfo | None:
    """Publish a new CRL when the CA says one is due; None when the current one is good."""
    if not ca.crl_due(now):
        return None
    return ca.publish_crl(now)


def crl_event(info: CrlInfo, actor: str, why: str) -> AuditEvent:
    """The audit record of one publication (no secrets: numbers and times only)."""
    return AuditEvent(
        event=EventKind.CRL_PUBLISHED,
        reason="ok",
        actor=actor,
        detail=(f"number={info.number} entries={info.entries} ({why}); next_update={info.next_update.isoformat()}"),
    )


class CrlPublisher:
    """Checks every ``interval`` seconds whether the CRL is due and re-signs it."""

    def __init__(
        self,
        ca: CertificateAuthority,
        audit: AuditSink,
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        interval: float = DEFAULT_INTERVAL,
        executor: Executor | None = None,
        actor: str = "portal:crl-schedule",
    ) -> None:
        self.ca = ca
        self.audit = audit
        self.clock = clock
        self.interval = interval
        self.executor = executor
        self.actor = actor
        self.last_error: str | None = None

    async def step(self) -> CrlInfo | None:
        """One check (and maybe one publication). Never raises for a CA failure.

        A failure is logged and kept in ``last_error``; the next step tries
        again, and the CA's "stale" mark makes sure the CRL is then re-signed.
        """
        loop = asyncio.get_running_loop()
        try:
            info = await loop.run_in_executor(self.executor, publish_if_due, self.ca, self.clock())
        except (GatewayError, OSError) as exc:
            self.last_error = str(exc)
            log.error("crl publication failed; will retry", extra={"error": str(exc)})
            return None
        self.last_error = None
        if info is not None:
            self.audit.record(crl_event(info, self.actor, "scheduled"))
            log.info(
                "crl published",
                extra={"crl_number": info.number, "entries": info.entries, "next_update": info.next_update.isoformat()},
            )
        return info

    async def run(self) -> None:
        """Check at once, then every ``interval`` seconds, until cancelled."""
        while True:
            await self.step()
            await asyncio.sleep(self.interval)

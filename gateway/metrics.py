"""Prometheus metrics: every counter and gauge the product exports, in one place.

With ``workers: N > 1`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR``
before the workers start, so each worker writes its samples to a shared
folder and the admin listener aggregates them (prometheus_client's
multiprocess mode, the same mechanism gunicorn deployments use). With one
worker the default registry is served directly.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

REQUESTS = Counter("gateway_requests_total", "Requests answered, by backend and status class", ["backend", "status"])
REFUSALS = Counter("gateway_refusals_total", "Requests refused, by reason code", ["reason"])
HANDSHAKE_FAILURES = Counter(
    "gateway_tls_handshake_failures_total", "TLS handshakes that failed, by reason", ["reason"]
)
HANDSHAKES = Counter("gateway_tls_handshakes_total", "TLS handshakes completed")
UPSTREAM_LATENCY = Histogram(
    "gateway_upstream_latency_seconds",
    "Time to the backend's response headers",
    ["backend"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CRL_AGE = Gauge(
    "gateway_crl_age_seconds",
    "Seconds since the loaded CRL's thisUpdate",
    ["source"],
    multiprocess_mode="max",
)
CRL_ENTRIES = Gauge("gateway_crl_entries", "Revoked serials in the loaded CRL", ["source"], multiprocess_mode="max")
CRL_NEXT_UPDATE = Gauge(
    "gateway_crl_next_update_timestamp_seconds",
    "nextUpdate of the loaded CRL",
    ["source"],
    multiprocess_mode="livemin",
)
CRL_SECONDS_TO_NEXT_UPDATE = Gauge(
    "gateway_crl_seconds_to_next_update",
    "Seconds left until the loaded CRL's nextUpdate (negative: past it); /healthz is degraded below the margin",
    ["source"],
    multiprocess_mode="livemin",
)
CRL_LOAD_SECONDS = Gauge(
    "gateway_crl_load_seconds",
    "Time the last CRL load took (parse, verify, index)",
    ["source"],
    multiprocess_mode="max",
)
CRL_REFRESH_FAILURES = Counter(
    "gateway_crl_refresh_failures_total", "CRL refreshes that failed (old CRL kept)", ["source"]
)
CRL_REFRESHES = Counter("gateway_crl_refreshes_total", "CRLs loaded and swapped in", ["source"])
CA_EXPIRING = Gauge(
    "gateway_client_ca_expiring",
    "Configured client CAs that expire within 30 days or have expired (warned at start-up and reload)",
    multiprocess_mode="livemax",
)
LOGINS = Counter("gateway_logins_total", "Login attempts, by result reason", ["reason"])
AUDIT_EVENTS = Counter("gateway_audit_events_total", "Audit events recorded", ["event", "reason"])
AUDIT_OVERFLOW = Counter(
    "gateway_audit_overflow_total",
    "Audit events that could not be queued or stored and went to stderr instead",
    ["cause"],
)
AUDIT_SPOOLED = Counter(
    "gateway_audit_spooled_total",
    "Audit events written to the local outage spool while the database was unreachable (replayed later)",
)
CLIENT_TIMEOUTS = Counter(
    "gateway_client_timeouts_total",
    "Connections closed because a request head or body stalled (slowloris)",
    ["phase"],
)
DATABASE_LISTENERS_DOWN = Gauge(
    "gateway_database_listeners_down",
    "Workers whose session listener (PostgreSQL LISTEN) is not connected; /healthz is 503 while any is",
    multiprocess_mode="livesum",
)
WORKERS_LISTENING = Gauge(
    "gateway_workers_listening", "Worker processes accepting connections", multiprocess_mode="livesum"
)
WORKERS_CONFIGURED = Gauge(
    "gateway_workers_configured", "Worker processes the configuration asks for", multiprocess_mode="max"
)
RELOADS = Counter("gateway_reloads_total", "Configuration reloads, by result", ["result"])
WORKER_RESTARTS = Counter(
    "gateway_worker_restarts_total", "Worker processes the supervisor restarted after they exited", ["worker"]
)


# Every sample carries ``gateway_instance`` (the config's ``instance:``), so the series of
# several instances stay apart however they are scraped. Not ``instance``: Prometheus sets
# that label itself (host:port of the target) and would rename ours.
INSTANCE_LABEL = "gateway_instance"


class _Labelled(Collector):
    """Another collector's samples with the instance label added."""

    def __init__(self, source: Collector, instance: str) -> None:
        self.source = source
        self.instance = instance

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            out.samples = [s._replace(labels={**s.labels, INSTANCE_LABEL: self.instance}) for s in family.samples]
            yield out


def render(instance: str = "") -> tuple[bytes, str]:
    """The metrics page body and its content type (aggregated across workers if any), labelled with ``instance``."""
    source: Collector = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        source = CollectorRegistry()
        _multiprocess.MultiProcessCollector(source)  # type: ignore[no-untyped-call]
    if not instance:
        return generate_latest(source), CONTENT_TYPE_LATEST
    labelled = CollectorRegistry(auto_describe=False)
    labelled.register(_Labelled(source, instance))
    return generate_latest(labelled), CONTENT_TYPE_LATEST


# The per-request metrics, by label values. ``labels()`` builds a key and takes a lock on
# every call (~2 µs); the children it returns never change, so the hot path keeps them.
@functools.lru_cache(maxsize=4096)
def requests_answered(backend: str, status_class: str) -> Counter:
    return REQUESTS.labels(backend, status_class)


@functools.lru_cache(maxsize=1024)
def upstream_latency(backend: str) -> Histogram:
    return UPSTREAM_LATENCY.labels(backend)


# The issuance portal (its own process, served on portal.admin).
PORTAL_ISSUED = Counter("gateway_portal_certificates_issued_total", "Client certificates the portal issued")
PORTAL_REVOKED = Counter("gateway_portal_certificates_revoked_total", "Certificates revoked through the portal")
PORTAL_ISSUANCE_REFUSALS = Counter(
    "gateway_portal_issuance_refusals_total", "Issuance requests the portal refused, by reason code", ["reason"]
)
PORTAL_LOGIN_REFUSALS = Counter(
    "gateway_portal_login_refusals_total", "Portal logins refused (and lockouts), by reason code", ["reason"]
)
PORTAL_CRL_AGE = Gauge("gateway_portal_crl_age_seconds", "Seconds since the CA's last CRL's thisUpdate")
PORTAL_CRL_SECONDS_TO_NEXT_UPDATE = Gauge(
    "gateway_portal_crl_seconds_to_next_update", "Seconds left until the CA's last CRL's nextUpdate"
)

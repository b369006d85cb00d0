"""The admin listener (plain HTTP, bind it to loopback): /healthz, /metrics, /audit.

Health means "would a valid user get through": a fresh CRL is loaded and
backends are configured. With several workers the supervisor serves this
listener and judges CRL freshness from the workers' metrics, so nothing is
parsed twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway import metrics

HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]
HEALTH = web.AppKey("gateway_health", object)


async def healthz(request: web.Request) -> web.Response:
    check: HealthCheck = request.app[HEALTH]  # type: ignore[assignment]
    ok, detail = check()
    return web.json_response({"status": "ok" if ok else "unhealthy", **detail}, status=200 if ok else 503)


async def metrics_page(request: web.Request) -> web.Response:
    body, content_type = metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def build_admin_app(
    health: HealthCheck, extra_routes: Callable[[web.Application], None] | None = None
) -> web.Application:
    app = web.Application()
    app[HEALTH] = health
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    if extra_routes is not None:
        extra_routes(app)
    return app


def health_from_metrics(backends: int, grace_seconds: float) -> HealthCheck:
    """Health for the multi-worker supervisor: every worker reported a fresh CRL."""

    def check() -> tuple[bool, dict[str, Any]]:
        from prometheus_client import CollectorRegistry
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        next_updates = [
            sample.value
            for family in registry.collect()
            if family.name == "gateway_crl_next_update_timestamp_seconds"
            for sample in family.samples
        ]
        fresh = bool(next_updates) and min(next_updates) + grace_seconds >= time.time()
        return fresh and backends > 0, {"crl_fresh": fresh, "backends": backends}

    return check

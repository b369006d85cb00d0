"""The admin listener (plain HTTP, bind it to loopback): /healthz, /metrics, /audit, /reload.

Health means "would a valid user get through": a fresh CRL is loaded and
backends are configured. With several workers the supervisor serves this
listener and judges CRL freshness from the workers' metrics, so nothing is
parsed twice.

``POST /reload`` runs the same reload as SIGHUP and answers
``{"ok": bool, "message": str}`` with 200 or 500 (``gateway reload`` turns
that into its exit status). The listener has no login of its own, so a
request carrying ``Origin`` or ``Sec-Fetch-Site`` (a browser, possibly
driven by another site) is refused: only tools like ``gateway reload`` and
curl may trigger it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway import metrics

HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]
ReloadHook = Callable[[], Awaitable[tuple[bool, str]]]
HEALTH = web.AppKey("gateway_health", object)
RELOAD = web.AppKey("gateway_reload", object)
INSTANCE = web.AppKey("gateway_instance", str)


async def healthz(request: web.Request) -> web.Response:
    check: HealthCheck = request.app[HEALTH]  # type: ignore[assignment]
    ok, detail = check()
    status = ("degraded" if detail.get("degraded") else "ok") if ok else "unhealthy"
    return web.json_response({"status": status, **detail}, status=200 if ok else 503)


async def metrics_page(request: web.Request) -> web.Response:
    body, content_type = metrics.render(request.app[INSTANCE])
    return web.Response(body=body, headers={"Content-Type": content_type})


async def reload_page(request: web.Request) -> web.Response:
    if "Origin" in request.headers or "Sec-Fetch-Site" in request.headers:
        return web.json_response({"ok": False, "message": "reload is not accepted from a browser"}, status=403)
    reload: ReloadHook = request.app[RELOAD]  # type: ignore[assignment]
    ok, message = await reload()
    return web.json_response({"ok": ok, "message": message}, status=200 if ok else 500)


def build_admin_app(
    health: HealthCheck,
    extra_routes: Callable[[web.Application], None] | None = None,
    reload: ReloadHook | None = None,
    *,
    instance: str = "",
) -> web.Application:
    """``instance`` labels every metric sample (``gateway_instance``), so several instances' series stay apart."""
    app = web.Application()
    app[HEALTH] = health
    app[INSTANCE] = instance
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    if reload is not None:
        app[RELOAD] = reload
        app.router.add_post("/reload", reload_page)
    if extra_routes is not None:
        extra_routes(app)
    return app


def crl_degraded(next_updates: list[float], now: float, warn_before: float) -> list[str]:
    """Why /healthz is "degraded" (still 200): a CRL within ``warn_before`` seconds of its nextUpdate.

    Past nextUpdate + grace every user is refused; this is the warning before
    that, while someone can still re-sign the CRL. No CRL at all is
    "unhealthy", not degraded; a margin of 0 turns the warning off.
    """
    if warn_before > 0 and next_updates and min(next_updates) - now < warn_before:
        return ["crl_near_next_update"]
    return []


def crl_health_detail(next_updates: list[float], now: float, warn_before: float) -> dict[str, Any]:
    left = round(min(next_updates) - now) if next_updates else None
    return {"degraded": crl_degraded(next_updates, now, warn_before), "crl_seconds_to_next_update": left}


def health_from_metrics(backends: int, grace_seconds: float, workers: int = 1, warn_before: float = 0.0) -> HealthCheck:
    """Health for the multi-worker supervisor: every worker listens and reported a fresh CRL."""

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
        listening = int(
            sum(
                sample.value
                for family in registry.collect()
                if family.name == "gateway_workers_listening"
                for sample in family.samples
            )
        )
        database_down = int(
            sum(
                sample.value
                for family in registry.collect()
                if family.name == "gateway_database_listeners_down"
                for sample in family.samples
            )
        )
        ok = fresh and backends > 0 and listening >= workers and database_down == 0
        detail: dict[str, Any] = {
            "crl_fresh": fresh,
            "backends": backends,
            "workers_listening": listening,
            "workers": workers,
        }
        if database_down:  # PostgreSQL: sessions are served from memory for the grace, then refused
            detail["database"] = f"session listener down in {database_down} worker(s)"
        return ok, {**detail, **crl_health_detail(next_updates, time.time(), warn_before)}

    return check

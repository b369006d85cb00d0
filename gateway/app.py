"""The gateway's aiohttp application: middleware order and the forwarding handler.

Order of the layers, outermost first (each one can refuse):

1. ``certificate_middleware`` (the only middleware) — first tells the
   connection's deadlines (:mod:`gateway.tls.deadlines`) that a request head
   arrived and, at the end, that it was answered (the slowloris timeouts);
   then, every request, every time (but ``GET /favicon.ico``, a public static
   asset answered first): the client certificate is re-judged
   (time, revocation), so a revocation or expiry takes effect on open
   keep-alive connections too. (One middleware, not two: each aiohttp
   layer costs a few µs on every request.)
2. the access layer (:mod:`gateway.access.login`) — session, login pages, per-system
   authorisation; passthrough backends get the certificate identity only.
3. ``proxy_handler`` — path safety, Host against SNI, routing, forwarding
   with identity headers.

Refusals all go through :meth:`GatewayRuntime.refuse`: one audit event, one
metric, one page or JSON body with the same support ID.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import aiohttp
from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import UrlMappingMatchInfo

from gateway import metrics
from gateway.audit.events import AuditEvent, EventKind, connection_fields, new_support_id
from gateway.certs.policy import (
    PeerCertificate,
    TrustAnchors,
    check_certificate,
    check_chain,
    check_shape,
    issued_by_trusted_ca,
    parse_peer,
)
from gateway.certs.revocation import CrlRefresher
from gateway.config import FAVICON_PATH, Backend, Config
from gateway.forward.proxy import BodyTooLarge, forward, identity_headers, make_client_session
from gateway.forward.routing import Router, check_host, check_path
from gateway.forward.upstream import UpstreamError, UpstreamPool
from gateway.keys import BACKEND, PEER, USER
from gateway.tls.deadlines import ClientDeadlines, peer_address, request_deadlines
from gateway.tls.termination import server_name_of
from gateway.verdict import Reason, Verdict
from gateway.web.responses import favicon, refusal

NO_CACHE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]  # aiohttp's web.Server calls this


class AuditSink(Protocol):
    def record(self, event: AuditEvent) -> None: ...


class _Lru(OrderedDict[Any, Any]):
    """A tiny LRU for per-certificate parse results (bounded memory)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: Any, value: Any) -> None:
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class GatewayRuntime:
    """Everything a worker needs per request; replaced piecewise on reload."""

    config: Config
    anchors: TrustAnchors
    refresher: CrlRefresher
    router: Router
    audit: AuditSink
    worker: int = 0
    clock: Callable[[], dt.datetime] = utcnow
    client: aiohttp.ClientSession | None = None  # WebSockets only
    upstreams: UpstreamPool | None = None
    _peers: _Lru = field(default_factory=lambda: _Lru(20_000))
    # Per certificate and chain sent with it: (issuer verdict, profile+subject verdict, chain
    # check). All time-independent (the chain check keeps the CA dates for the per-request
    # check); they depend on the CAs and the profile settings, so a reload clears this.
    _static_verdicts: _Lru = field(default_factory=lambda: _Lru(20_000))
    # (issuer key id, serial) revocations the CA pushed through PostgreSQL
    # (gateway.storage.pg_issuance.RevocationFeed fills it in place): they refuse
    # before the next CRL lists them. Only ever adds refusals; empty without a database.
    pushed_revocations: set[tuple[bytes, int]] = field(default_factory=set)

    def peer_of(self, request: web.BaseRequest) -> tuple[PeerCertificate | None, bool]:
        """The client's leaf, parsed once per distinct certificate and kept per connection; (None, sent?)."""
        return self.peer_of_connection(request.transport)

    def peer_of_connection(self, transport: Any) -> tuple[PeerCertificate | None, bool]:
        """:meth:`peer_of` for a connection (also before or without a parsed request)."""
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is None:
            return None, False
        slot = getattr(ssl_object, "_gateway_slot", None)
        if slot is not None and slot.peer is not None:
            return slot.peer, True  # a TLS connection's certificate cannot change (renegotiation is off)
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            return None, False
        # What else the client sent with the leaf (the message callback kept it; a resumed
        # session sends nothing, and its path is then judged from the configured CAs alone).
        chain = slot.client_chain if slot is not None else ()
        presented = chain[1:] if chain and chain[0] == der else ()
        peer = self._peers.get((der, presented))
        if peer is None:
            peer = parse_peer(der, presented)
            if peer is None:
                return None, True
            self._peers.put((der, presented), peer)
        if slot is not None:
            slot.peer = peer
        return peer, True

    def judge_certificate(self, peer: PeerCertificate | None, sent: bool) -> Verdict:
        if peer is None:
            if sent:
                return Verdict.deny(Reason.MALFORMED_SUBJECT, "certificate could not be parsed")
            return Verdict.deny(Reason.NO_CERTIFICATE)
        key = (peer.fingerprint, peer.presented)
        static = self._static_verdicts.get(key)
        if static is None:
            static = (
                issued_by_trusted_ca(peer, self.anchors),
                check_shape(peer, self.anchors.key_policy),
                check_chain(peer, self.anchors),
            )
            self._static_verdicts.put(key, static)
        verdict = check_certificate(
            peer,
            self.anchors,
            self.refresher.state,
            self.clock(),
            issuer_verdict=static[0],
            shape_verdict=static[1],
            chain=static[2],
        )
        if verdict.allowed and (peer.issuer_key_id, peer.serial) in self.pushed_revocations:
            # Step 7 again, from the push: the same reason the CRL would give.
            return Verdict.deny(Reason.CERTIFICATE_REVOKED, f"serial {peer.serial_hex} revoked (pushed by the CA)")
        return verdict

    def clear_verdicts(self) -> None:
        """Forget cached issuer verdicts (a reload changed the CAs)."""
        self._static_verdicts.clear()

    def event(
        self,
        request: web.BaseRequest,
        kind: EventKind,
        reason: Reason | str = "",
        *,
        peer: PeerCertificate | None = None,
        user_id: str = "",
        backend: str = "",
        detail: str = "",
        support_id: str | None = None,
    ) -> AuditEvent:
        """An audit event filled from the request and its connection."""
        connection = connection_fields(request.transport)
        if not connection["client_ip"]:
            # The connection is gone (a client that was cut off): the address it had.
            address = peer_address(request.protocol.peername if request.protocol is not None else None)
            connection.update(client_ip=address[0] if address else "", client_port=address[1] if address else None)
        return AuditEvent(
            event=kind,
            reason=str(reason),
            support_id=support_id or new_support_id(),
            **connection,
            **_certificate_fields(peer),
            backend=backend or request.get(BACKEND, ""),
            method=request.method,
            path=request.path,
            user_id=user_id,
            user_agent=request.headers.get("User-Agent", ""),
            worker=self.worker,
            detail=detail,
        )

    def client_timed_out(self, transport: Any, request: web.BaseRequest | None, detail: str) -> AuditEvent:
        """Audit a client that missed a deadline (its head or body stalled): the client's fault, never a backend's.

        Called while the connection is still open, so the event names the
        client's address and certificate, and the request if its head had arrived.
        """
        peer, _sent = self.peer_of_connection(transport)
        if request is not None:
            user = request.get(USER, "")
            kind, reason = EventKind.REQUEST_REFUSED, Reason.CLIENT_TIMEOUT
            event = self.event(request, kind, reason, peer=peer, user_id=user, detail=detail)
        else:
            event = AuditEvent(
                event=EventKind.REQUEST_REFUSED,
                reason=Reason.CLIENT_TIMEOUT,
                **connection_fields(transport),
                **_certificate_fields(peer),
                worker=self.worker,
                detail=detail,
            )
        self.audit.record(event)
        metrics.REFUSALS.labels(str(Reason.CLIENT_TIMEOUT)).inc()
        return event

    def refuse(
        self,
        request: web.BaseRequest,
        verdict: Verdict,
        *,
        peer: PeerCertificate | None = None,
        kind: EventKind = EventKind.REQUEST_REFUSED,
        user_id: str = "",
        status: int | None = None,
        links: tuple[tuple[str, str, str], ...] = (),
        headers: dict[str, str] | None = None,
        presented: str = "",
    ) -> web.Response:
        """Record and answer one refusal (same support ID in both)."""
        event = self.record_refusal(request, verdict, peer=peer, kind=kind, user_id=user_id)
        return refusal(
            request,
            verdict.reason,
            event.support_id,
            status=status,
            links=links,
            headers=headers,
            presented=presented,
            **self.page_context(),
        )

    def record_refusal(
        self,
        request: web.BaseRequest,
        verdict: Verdict,
        *,
        peer: PeerCertificate | None = None,
        kind: EventKind = EventKind.REQUEST_REFUSED,
        user_id: str = "",
    ) -> AuditEvent:
        """The audit half of :meth:`refuse`, for refusals answered with a page of their own (the login form)."""
        event = self.event(request, kind, verdict.reason, peer=peer, user_id=user_id, detail=verdict.detail)
        self.audit.record(event)
        metrics.REFUSALS.labels(str(verdict.reason)).inc()
        return event

    def refuse_recorded(self, request: web.BaseRequest, reason: Reason, support_id: str) -> web.Response:
        """The refusal response for an event :meth:`record_refusal` already wrote."""
        return refusal(request, reason, support_id, **self.page_context())

    def page_context(self) -> dict[str, Any]:
        """What every refusal page of the gateway names: the support desk and the issuance service."""
        portal = self.config.portal
        return {"support": self.config.support, "issuance_url": portal.public_url if portal else None}

    def refuse_unparsed(self, request: web.BaseRequest, detail: str) -> web.StreamResponse:
        """A request aiohttp's parser refused: audited with the connection's client and certificate.

        Nothing of the request can be trusted (its method, path and headers never
        parsed), so the event carries none of it; the page is HTML, as no Accept
        header was read.
        """
        peer, _sent = self.peer_of(request)
        event = self.event(request, EventKind.REQUEST_REFUSED, Reason.BAD_REQUEST, peer=peer, detail=detail)
        event = dataclasses.replace(event, method="", path="", user_agent="", backend="")
        self.audit.record(event)
        metrics.REFUSALS.labels(str(Reason.BAD_REQUEST)).inc()
        log.warning(
            "refused a request the HTTP parser could not read",
            extra={"client_ip": event.client_ip, "support_id": event.support_id, "detail": detail},
        )
        return refusal(
            request, Reason.BAD_REQUEST, event.support_id, headers={"Connection": "close"}, **self.page_context()
        )


def _certificate_fields(peer: PeerCertificate | None) -> dict[str, Any]:
    if peer is None:
        return {}
    return {
        "cert_subject": peer.common_name,
        "cert_serial": peer.serial_hex,
        "cert_issuer": peer.issuer_text,
        "cert_fingerprint": peer.fingerprint,
        "cert_not_after": peer.not_after.isoformat(),
    }


RUNTIME = web.AppKey("gateway_runtime", GatewayRuntime)


@web.middleware
async def certificate_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Report the request to its connection's deadlines; refuse unless the certificate is acceptable now."""
    deadlines = request_deadlines(request)
    if deadlines is None:
        return await _certified(request, handler)
    try:
        return await _certified(request, handler)
    except ConnectionError:
        if request.transport is not None:
            raise  # not the client's connection that failed
        return _client_gone(deadlines)
    finally:
        deadlines.request_finished()


def _client_gone(deadlines: ClientDeadlines) -> web.StreamResponse:
    """The client's connection ended while its request was being handled (its body was being read).

    Nothing can be sent; the answer is only for the access log. A missed
    deadline was audited as ``client_timeout`` when it expired; a client that
    closed on its own is nobody's refusal. Neither is a backend failure.
    """
    if deadlines.expired:
        return web.Response(status=408)
    log.info("client closed the connection mid-request")
    return web.Response(status=499)  # nginx's "client closed request"


async def _certified(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.raw_path == FAVICON_PATH and request.method in ("GET", "HEAD"):
        # Before the certificate check and without an audit event: a browser asks for it on
        # its own after every page, so a refused user's page view stays one refusal event.
        return favicon()
    rt = request.app[RUNTIME]
    peer, sent = rt.peer_of(request)
    verdict = rt.judge_certificate(peer, sent)
    if not verdict.allowed:
        hook = getattr(request.app[ACCESS], "on_certificate_refused", None)
        if hook is not None:
            await hook(request, verdict)
        return rt.refuse(request, verdict, peer=peer)
    assert peer is not None  # an allowed verdict always has a certificate
    request[PEER] = peer
    return await handler(request)


class AccessLayer(Protocol):
    """Decides, per request, whether and as whom a backend may be reached (login issue)."""

    async def authorize(
        self, request: web.Request, backend: Backend, peer: PeerCertificate
    ) -> web.StreamResponse | str | None: ...


class CertificateOnlyAccess:
    """Passthrough backends: the certificate identity is the only identity.

    Backends in ``gateway`` login mode need a session; without the login
    layer they are refused with ``login_required`` (fail closed).
    """

    async def authorize(
        self, request: web.Request, backend: Backend, peer: PeerCertificate
    ) -> web.StreamResponse | str | None:
        if backend.login.mode == "passthrough":
            return None
        rt = request.app[RUNTIME]
        return rt.refuse(request, Verdict.deny(Reason.LOGIN_REQUIRED), peer=peer)


ACCESS = web.AppKey("gateway_access", AccessLayer)


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    """Route, authorise and forward one request."""
    rt = request.app[RUNTIME]
    peer: PeerCertificate = request[PEER]
    path_verdict = check_path(request.raw_path)
    if not path_verdict.allowed:
        return rt.refuse(request, path_verdict, peer=peer)
    host_verdict = check_host(request.headers.get("Host"), _server_name(request), http11=request.version >= (1, 1))
    if not host_verdict.allowed:
        return rt.refuse(request, host_verdict, peer=peer)
    # The gateway's own namespace never reaches a backend, whatever is mounted at "/" (any method).
    owned = rt.config.gateway_paths.owns(request.path)
    backend = None if owned else rt.router.match(request.host, request.path)
    if backend is None:
        return rt.refuse(request, Verdict.deny(Reason.NO_ROUTE), peer=peer)
    request[BACKEND] = backend.name
    decision = await request.app[ACCESS].authorize(request, backend, peer)
    if isinstance(decision, web.StreamResponse):
        return decision
    return await forward_to(request, backend, peer, decision)


def _server_name(request: web.Request) -> str | None:
    transport = request.transport
    return server_name_of(transport.get_extra_info("ssl_object")) if transport is not None else None


async def forward_to(
    request: web.Request, backend: Backend, peer: PeerCertificate, user_id: str | None, body: bytes | None = None
) -> web.StreamResponse:
    """Forward with identity headers; backend failures become 502/504/413 pages."""
    rt = request.app[RUNTIME]
    assert rt.client is not None and rt.upstreams is not None
    if user_id is not None:
        request[USER] = user_id
    try:
        response = await forward(
            request,
            backend,
            rt.upstreams,
            rt.client,
            identity_headers(peer, user_id),
            body=body,
            # Pages behind a login must not come back from a cache after logout.
            response_extra=NO_CACHE if backend.login.mode == "gateway" else None,
            still_allowed=lambda: still_allowed(request, backend, peer),
        )
    except BodyTooLarge as exc:
        return rt.refuse(
            request,
            Verdict.deny(Reason.PAYLOAD_TOO_LARGE, str(exc)),
            peer=peer,
            user_id=user_id or "",
            headers={"Connection": "close"},
        )
    except UpstreamError as exc:
        reason = Reason.BACKEND_TIMEOUT if exc.timeout else Reason.BACKEND_UNAVAILABLE
        log.warning("upstream failure", extra={"backend": backend.name, "error": str(exc)})
        return rt.refuse(request, Verdict.deny(reason, str(exc)), peer=peer, user_id=user_id or "")
    metrics.requests_answered(backend.name, f"{response.status // 100}xx").inc()
    return response


async def still_allowed(request: web.Request, backend: Backend, peer: PeerCertificate) -> bool:
    """Would this request still be let through now? (For WebSockets, which outlive their request.)"""
    rt = request.app[RUNTIME]
    if not rt.judge_certificate(peer, True).allowed:
        return False
    recheck = getattr(request.app[ACCESS], "still_authorized", None)
    return True if recheck is None else bool(await recheck(request, backend, peer))


async def _client_ctx(app: web.Application) -> Any:
    rt = app[RUNTIME]
    rt.client = make_client_session(rt.config.limits.max_connections)
    rt.upstreams = UpstreamPool()
    yield
    await rt.upstreams.close()
    await rt.client.close()


def build_app(runtime: GatewayRuntime, access: AccessLayer | None = None) -> web.Application:
    """The gateway application for one worker (no listening sockets here)."""
    app = web.Application(middlewares=[certificate_middleware], client_max_size=1024**2)
    app[RUNTIME] = runtime
    app[ACCESS] = access or CertificateOnlyAccess()
    app.cleanup_ctx.append(_client_ctx)
    setup = getattr(access, "setup_routes", None)
    if setup is not None:
        setup(app)
    app.router.add_route("*", "/{tail:.*}", proxy_handler)
    return app


def proxied_fast_path(app: web.Application, fallback: ServerHandler) -> ServerHandler:
    """The application's request handler, with a shorter way in for requests only the proxy route serves.

    A request the router could only give to the catch-all ``proxy_handler`` (its
    path starts with "/", is none of the pages' exact paths, under none of their
    prefixes, and plainly encoded) skips the router and aiohttp's middleware chain: it gets
    a shared, frozen match for the catch-all route and goes through
    :func:`certificate_middleware` and :func:`proxy_handler` directly, the same
    checks in the same order. Everything else (pages, ``Expect``, anything
    unusual) goes through ``fallback``, the Application's own handler. The
    router and two middleware layers cost ~5-10 µs a keep-alive request.

    Middlewares added after :func:`certificate_middleware` (the access
    layer's, e.g. the one that turns an unreachable database into 503
    ``service_unavailable``) run on the short way too, in the same order,
    between the certificate check and the proxy; an application whose first
    middleware is not the certificate check gets no short way at all.
    """
    middlewares = list(app.middlewares)
    if not middlewares or middlewares[0] is not certificate_middleware:
        return fallback  # the certificate check must come first, as the router's chain has it
    inner: ServerHandler = cast(ServerHandler, proxy_handler)
    for outer in reversed(middlewares[1:]):
        inner = functools.partial(outer, handler=inner)
    catch_all = None
    exact: set[str] = set()
    prefixes: list[str] = []
    for resource in app.router.resources():
        routes = list(resource)
        if len(routes) == 1 and routes[0].handler is proxy_handler and routes[0].method == "*":
            catch_all = routes[0]
            continue
        info = resource.get_info()
        if "path" in info:
            exact.add(str(info["path"]))
        else:  # a dynamic or prefix resource: everything from its first placeholder on
            prefix = str(info.get("prefix") or info.get("formatter") or "").split("{", 1)[0]
            if not prefix.startswith("/") or prefix == "/":
                return fallback  # a resource that could match anything: no short way
            prefixes.append(prefix)
    if catch_all is None:
        return fallback
    match = UrlMappingMatchInfo({}, catch_all)
    match.add_app(app)
    match.freeze()
    starts = tuple(prefixes)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        unusual = "%" in request.rel_url.raw_path or hdrs.EXPECT in request.headers
        if unusual or path[:1] != "/" or path in exact or path.startswith(starts):
            return await fallback(request)
        req = cast(web.Request, request)
        req._match_info = match  # what the router would have found (aiohttp reads apps from it)
        return await certificate_middleware(req, inner)

    return handle

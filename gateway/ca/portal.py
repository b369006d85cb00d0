"""The TSE-CA certificate issuance service (証明書発行サービス): the portal's web edge.

Users log in with user ID and password (the gateway's user store, lockout and
temporary-password rules), then issue a certificate (申請 -> 証明書ダウンロード
of a PKCS#12), list and revoke their own certificates, download the CA
certificate and read the help. No client certificate is asked for: this is
where users get one. The rules live elsewhere and are only called here:
:mod:`gateway.access.policy` (login and session decisions), :mod:`gateway.ca.issuance`
(duplicate rule, renewal window, list rows), :mod:`gateway.ca.authority` (the I/O of
issuing and revoking), :mod:`gateway.ca.publisher` (the CRL schedule).

Decisions worth knowing:

* Portal sessions live in the gateway's ``sessions`` table but cannot be used
  there, nor gateway sessions here: another cookie (``__Host-portal_session``),
  ``systems={"portal"}`` and an empty certificate fingerprint, which the
  gateway's :func:`decide_session` never matches against a presented
  certificate (and a gateway session's fingerprint never matches "" here).
* The private key is generated per request, put in the PKCS#12 and held in
  memory only, under a random one-time token, for one download by the same
  user within ten minutes. Nothing holding it is ever written to disk or
  logged; the token is masked in the access log and the audit path.
* Two injectable clocks. ``clock`` is the CA's "now": issuance (notBefore and
  the renewal rule), certificate status, revocation time, the CRL schedule,
  so a test (or a demo) can issue back-dated certificates. ``session_clock``
  (default: the real UTC clock) drives the security mechanics: login
  lockout, session limits, form tokens and download expiry, so moving the
  CA's clock does not log anyone out.
* ``/crl``, ``/crl.pem``, ``/ca.der`` and ``/ca.pem`` need no login (relying
  parties and fresh terminals fetch them) and carry caching headers; every
  logged-in page is ``Cache-Control: no-store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import logging
import re
import secrets
import signal
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.access import accounts
from gateway.access.passwords import (
    dummy_verify,
)
from gateway.access.policy import LoginSettings, SessionLimits, decide_session, safe_next
from gateway.access.sessions import (
    SessionRecord,
    check_login_csrf,
    check_session_csrf,
    clear_cookie_header,
    load_session_key,
    login_csrf_token,
    new_login_nonce,
    set_cookie_header,
    sign,
    unsign,
)
from gateway.audit.events import AuditEvent, EventKind, connection_fields, new_support_id
from gateway.ca import issuance
from gateway.ca.authority import CaSettings, CertificateAuthority
from gateway.ca.issuance import CertificateRecord, IssuanceRefused, RevocationReason, Status
from gateway.ca.portal_admin import MeteredAudit, setup_portal_admin
from gateway.ca.publisher import DEFAULT_INTERVAL, AuditSink, CrlPublisher, crl_event
from gateway.certs import builders as pki
from gateway.certs import p12
from gateway.certs.p12 import P12Format
from gateway.config import Config, PortalConfig
from gateway.errors import CaError, ConfigError, PkiError, listener_error
from gateway.storage.backends import Backend
from gateway.verdict import Reason, Verdict
from gateway.web.messages import message_for
from gateway.web.pages import render
from gateway.web.responses import NO_STORE, SECURITY_HEADERS, refusal, wants_json

log = logging.getLogger(__name__)
T = TypeVar("T")

SESSION_COOKIE = "__Host-portal_session"
LOGIN_CSRF_COOKIE = "__Host-portal_csrf"
PORTAL_SYSTEM = "portal"  # the only "system" a portal session is good for
NO_FINGERPRINT = ""  # portal sessions are bound to no certificate
LOGIN_FORM_MAX_AGE = accounts.LOGIN_FORM_MAX_AGE
MAX_FORM_BYTES = accounts.MAX_FORM_BYTES
DOWNLOAD_LIFETIME = dt.timedelta(minutes=10)
TOUCH_AFTER = dt.timedelta(seconds=30)
# A cached CRL must not hide a revocation for long, nor outlive nextUpdate:
# caches may keep it for half the time left, but never more than ten minutes.
CRL_CACHE_FRACTION = 0.5
CRL_MAX_AGE_SECONDS = 600
CA_FILE_STEM = "TokyoStockExchangeSSOCA"
LOGIN_LINK = (("/login", "ログイン画面へ", "Back to login"),)
MENU_LINK = (("/", "メニューへ", "Back to the menu"),)
_DOWNLOAD_PATH = re.compile(r"^/download/[^/]+$")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def public_path(path: str) -> str:
    """The request path as logs and audit records may hold it (download tokens masked)."""
    return "/download/***" if _DOWNLOAD_PATH.match(path) else path


# -- one-time downloads -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Download:
    """A PKCS#12 waiting for its one download; ``data`` holds a private key."""

    data: bytes = field(repr=False)
    filename: str
    user_id: str
    expires: dt.datetime


class Downloads:
    """One-time PKCS#12 downloads, in memory only (the key is never stored).

    A token is 256 random bits, good once, for the user it was made for,
    until ``DOWNLOAD_LIFETIME`` has passed. Expired entries are dropped on
    every access, so an abandoned download does not stay in memory.
    """

    def __init__(self, lifetime: dt.timedelta = DOWNLOAD_LIFETIME) -> None:
        self.lifetime = lifetime
        self._items: dict[str, Download] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, user_id: str, data: bytes, filename: str, now: dt.datetime) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._purge(now)
            self._items[token] = Download(data, filename, user_id, now + self.lifetime)
        return token

    def take(self, token: str, user_id: str, now: dt.datetime) -> Download | None:
        """The download, removed so it cannot be fetched again; None if unknown, used, expired or not yours."""
        with self._lock:
            self._purge(now)
            item = self._items.get(token)
            if item is None or item.user_id != user_id:
                return None
            del self._items[token]
            return item

    def _purge(self, now: dt.datetime) -> None:
        for token in [t for t, item in self._items.items() if now >= item.expires]:
            del self._items[token]


# -- the CRL and CA files ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublishedFile:
    """A CRL file as served: bytes, validator and lifetime."""

    data: bytes = field(repr=False)
    etag: str
    last_modified: dt.datetime
    next_update: dt.datetime | None
    stat_key: tuple[int, int, int]


def load_crl_file(path: Path, previous: PublishedFile | None) -> PublishedFile:
    """Read a CRL file (DER or PEM by suffix), reusing ``previous`` when the file did not change."""
    st = path.stat()
    key = (st.st_mtime_ns, st.st_size, st.st_ino)
    if previous is not None and previous.stat_key == key:
        return previous
    data = path.read_bytes()
    crl = x509.load_pem_x509_crl(data) if path.suffix == ".pem" else x509.load_der_x509_crl(data)
    return PublishedFile(
        data=data,
        etag=hashlib.sha256(data).hexdigest()[:32],
        last_modified=crl.last_update_utc,
        next_update=crl.next_update_utc,
        stat_key=key,
    )


def crl_max_age(next_update: dt.datetime | None, now: dt.datetime) -> int:
    """Seconds a cache may keep the CRL: a fraction of its time left, capped, never past nextUpdate."""
    if next_update is None:
        return 0
    left = (next_update - now).total_seconds()
    return max(0, min(CRL_MAX_AGE_SECONDS, int(left * CRL_CACHE_FRACTION)))


def not_modified(request: web.BaseRequest, etag: str, last_modified: dt.datetime) -> bool:
    """RFC 9110 13.1: If-None-Match wins over If-Modified-Since when both are sent."""
    tags = request.if_none_match
    if tags is not None:
        return any(tag.value in (etag, "*") for tag in tags)
    since = request.if_modified_since
    return since is not None and last_modified <= since


# -- the application --------------------------------------------------------------

PageHandler = Callable[["Portal", web.Request, SessionRecord], Awaitable[web.StreamResponse]]
FormHandler = Callable[["Portal", web.Request, SessionRecord, Mapping[str, Any]], Awaitable[web.StreamResponse]]


def logged_in(handler: PageHandler) -> Callable[[Portal, web.Request], Awaitable[web.StreamResponse]]:
    """A page that needs a valid portal session (else: to the login or password page)."""

    @functools.wraps(handler)
    async def wrapper(self: Portal, request: web.Request) -> web.StreamResponse:
        found = await self.authenticate(request)
        if isinstance(found, web.StreamResponse):
            return found
        return await handler(self, request, found)

    return wrapper


def logged_in_form(handler: FormHandler) -> Callable[[Portal, web.Request], Awaitable[web.StreamResponse]]:
    """A POST that needs a valid portal session and the session's CSRF token."""

    @functools.wraps(handler)
    async def wrapper(self: Portal, request: web.Request) -> web.StreamResponse:
        found = await self.authenticate(request)
        if isinstance(found, web.StreamResponse):
            return found
        form = await request.post()
        if not check_session_csrf(found, _text(form.get("csrf"))):
            return self.refuse(request, Reason.CSRF_FAILED, user_id=found.user_id, detail="form token invalid")
        return await handler(self, request, found, form)

    return wrapper


class Portal:
    """The issuance service's state and handlers (one per process)."""

    def __init__(
        self,
        config: Config,
        audit: AuditSink,
        ca: CertificateAuthority,
        clock: Callable[[], dt.datetime],
        crl_interval: float | None = DEFAULT_INTERVAL,
        session_clock: Callable[[], dt.datetime] = utcnow,
        storage: Backend | None = None,
    ) -> None:
        """``storage``: the process's stores (one pool, shared with the CA's records); made here when None."""
        self.config = config
        self.audit = audit
        self.ca = ca
        self.clock = clock
        self.session_clock = session_clock
        self.key = load_session_key(config.session.secret_file)
        # SQLite files or the shared PostgreSQL database (the config's ``database:``), as the gateway.
        self._own_storage = storage is None
        self.storage = storage if storage is not None else Backend(config, role="portal")
        self.users = self.storage.users()
        self.sessions = self.storage.sessions()  # PostgreSQL: its ends and changes reach every gateway's cache
        self.settings = LoginSettings.from_config(config.login)
        self.limits = SessionLimits.from_config(config.session)
        self.accounts = accounts.Accounts(self.users, self.settings, self._run)
        self.downloads = Downloads()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="portal")
        self.crl_interval = crl_interval
        self.publisher = CrlPublisher(
            ca, audit, clock=clock, interval=crl_interval or DEFAULT_INTERVAL, executor=self.pool
        )
        self.ca_der = ca.certificate.public_bytes(serialization.Encoding.DER)
        self.ca_pem = pki.cert_pem(ca.certificate)
        self._crl_files: dict[Path, PublishedFile] = {}
        self.admin_port: int | None = None  # the portal.admin listener's port once it listens

    # -- plumbing ---------------------------------------------------------------

    async def _run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(func, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.pool, call)

    def setup_routes(self, app: web.Application) -> None:
        add_get, add_post = app.router.add_get, app.router.add_post
        add_get("/login", self.login_page)
        add_post("/login", self.login_post)
        add_get("/password", self.password_page)
        add_post("/password", self.password_post)
        add_post("/logout", self.logout)
        add_get("/", self.main_page)
        add_get("/issue", self.issue_page)
        add_post("/issue", self.issue_post)
        add_get("/download/{token}", self.download)
        add_get("/certificates", self.certificates)
        add_get("/certificates/{serial}", self.detail)
        add_post("/certificates/{serial}/revoke", self.revoke_ask)
        add_post("/certificates/{serial}/revoke/confirm", self.revoke_confirm)
        add_get("/ca", self.ca_page)
        add_get("/ca.der", self.ca_der_file)
        add_get("/ca.pem", self.ca_pem_file)
        add_get("/crl", self.crl_der)
        add_get("/crl.pem", self.crl_pem)
        add_get("/help", self.help_page)

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """Warm the KDF, run the CRL schedule while serving, then close everything."""
        # Compute the dummy hash now, in the background, so the first
        # unknown-user login is not slower than a known one (timing).
        asyncio.get_running_loop().run_in_executor(self.pool, dummy_verify, "warm-up")
        task = asyncio.create_task(self.publisher.run()) if self.crl_interval else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.pool.shutdown(wait=True)
        self.users.close()
        self.sessions.close()
        if self._own_storage:
            self.storage.close()

    def _session(self, request: web.Request) -> SessionRecord | None:
        cookie = request.cookies.get(SESSION_COOKIE)
        session_id = unsign(cookie, self.key) if cookie else None
        return self.sessions.get(session_id) if session_id else None

    async def authenticate(self, request: web.Request) -> SessionRecord | web.StreamResponse:
        """The caller's valid portal session, or the response that sends them to log in."""
        now = self.session_clock()
        session = await self._run(self._session, request)
        verdict = decide_session(session, NO_FINGERPRINT, PORTAL_SYSTEM, now, self.limits)
        if verdict.allowed:
            assert session is not None
            if now - session.last_seen >= TOUCH_AFTER:
                await self._run(self.sessions.touch, session.session_id, now)
            return session
        if session is not None and verdict.reason is Reason.SESSION_EXPIRED:
            await self._run(self.sessions.delete, session.session_id)
            self.record(
                request, EventKind.SESSION_ENDED, verdict.reason, user_id=session.user_id, detail=verdict.detail
            )
        if verdict.reason is Reason.PASSWORD_CHANGE_REQUIRED:
            return see_other("/password")
        if request.method in ("GET", "HEAD"):
            return see_other("/login?next=" + quote(request.path_qs, safe="/"))
        reason = Reason.SESSION_EXPIRED if verdict.reason is Reason.SESSION_EXPIRED else Reason.LOGIN_REQUIRED
        return self.refuse(request, reason, detail=verdict.detail, links=LOGIN_LINK)

    def event(
        self,
        request: web.BaseRequest,
        kind: EventKind,
        reason: Reason | str = "",
        *,
        user_id: str = "",
        record: CertificateRecord | None = None,
        detail: str = "",
    ) -> AuditEvent:
        """An audit event for this request (no form values, no cookies, no tokens)."""
        return AuditEvent(
            event=kind,
            reason=str(reason),
            support_id=new_support_id(),
            **connection_fields(request.transport),
            method=request.method,
            path=public_path(request.path),
            user_id=user_id,
            cert_subject=record.user_id if record else "",
            cert_serial=record.serial_hex if record else "",
            cert_issuer=pki.SSO_CA_NAME if record else "",
            cert_fingerprint=record.fingerprint if record else "",
            cert_not_after=record.not_after.isoformat() if record else "",
            user_agent=request.headers.get("User-Agent", "")[:512],
            actor=f"portal:{user_id}" if user_id else "portal",
            detail=detail[:500],
        )

    def record(self, request: web.BaseRequest, kind: EventKind, reason: Reason | str = "", **fields: Any) -> AuditEvent:
        event = self.event(request, kind, reason, **fields)
        self.audit.record(event)
        return event

    def refuse(
        self,
        request: web.BaseRequest,
        reason: Reason,
        *,
        kind: EventKind = EventKind.REQUEST_REFUSED,
        user_id: str = "",
        detail: str = "",
        links: Sequence[tuple[str, str, str]] = MENU_LINK,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        """The refusal page (reason code and support ID), recorded in the audit trail."""
        event = self.record(request, kind, reason, user_id=user_id, detail=detail)
        return refusal(
            request, reason, event.support_id, links=links, headers=headers, support=self.config.support, portal=True
        )

    def not_found(self, request: web.BaseRequest, user_id: str, detail: str) -> web.Response:
        """Someone else's certificate looks exactly like no certificate at all."""
        return self.refuse(request, Reason.NO_ROUTE, user_id=user_id, detail=detail)

    # -- login, password, logout -------------------------------------------------

    async def login_page(self, request: web.Request) -> web.Response:
        return self._login_form(request, next_path=safe_next(request.query.get("next")) or "")

    def _login_form(
        self, request: web.Request, *, next_path: str, user_id: str = "", support_id: str = ""
    ) -> web.Response:
        """The login form; with ``support_id``, after a wrong password: the error, the typed ID, 401.

        An unknown user ID gets the very same answer (it never says which of the two was wrong).
        """
        nonce = request.cookies.get(LOGIN_CSRF_COOKIE) or new_login_nonce()
        token = login_csrf_token(self.key, nonce, self.session_clock())
        error = message_for(Reason.BAD_CREDENTIALS) if support_id else None
        response = page(
            "portal_login.html",
            status=401 if error else 200,
            csrf=token,
            next=next_path,
            user_id=user_id,
            error=error,
            support_id=support_id,
            reason=str(Reason.BAD_CREDENTIALS),
        )
        response.headers.add("Set-Cookie", set_cookie_header(LOGIN_CSRF_COOKIE, nonce))
        return response

    async def login_post(self, request: web.Request) -> web.StreamResponse:
        now = self.session_clock()
        form = await request.post()
        user_id, password = _text(form.get("user_id")), _text(form.get("password"))
        csrf_ok = check_login_csrf(
            self.key, _text(form.get("csrf")), request.cookies.get(LOGIN_CSRF_COOKIE), now, LOGIN_FORM_MAX_AGE
        )
        result = await self.accounts.login(
            user_id=user_id,
            password=password,
            ip=request.remote or "",
            now=now,
            csrf_ok=csrf_ok,
            # No client certificate here, so no certificate check and no
            # subject binding: the typed ID stands in for the subject.
            certificate=Verdict.allow("the portal asks for no client certificate"),
            cert_subject=user_id,
        )
        outcome = result.outcome
        if result.locked_until is not None:
            detail = f"locked until {result.locked_until.isoformat()}"
            self.record(request, EventKind.ACCOUNT_LOCKED, Reason.ACCOUNT_LOCKED, user_id=user_id, detail=detail)
        if outcome.verdict.reason is Reason.BAD_CREDENTIALS and not wants_json(request):
            event = self.record(
                request, EventKind.LOGIN_REFUSED, outcome.verdict.reason, user_id=user_id, detail=outcome.verdict.detail
            )
            next_path = safe_next(_text(form.get("next")) or None) or ""
            return self._login_form(request, next_path=next_path, user_id=user_id, support_id=event.support_id)
        if not outcome.verdict.allowed:
            return self.refuse(
                request,
                outcome.verdict.reason,
                kind=EventKind.LOGIN_REFUSED,
                user_id=user_id,
                detail=outcome.verdict.detail,
                links=LOGIN_LINK,
            )
        session_id, _ = await self._run(
            self.sessions.create, user_id, NO_FINGERPRINT, {PORTAL_SYSTEM}, outcome.must_change_password, now
        )
        self.record(request, EventKind.LOGIN, Reason.OK, user_id=user_id, detail=outcome.verdict.detail)
        target = "/password" if outcome.must_change_password else safe_next(_text(form.get("next")) or None) or "/"
        response = see_other(target)
        response.headers.add("Set-Cookie", set_cookie_header(SESSION_COOKIE, sign(session_id, self.key)))
        response.headers.add("Set-Cookie", clear_cookie_header(LOGIN_CSRF_COOKIE))
        return response

    async def _password_session(self, request: web.Request) -> SessionRecord | web.StreamResponse:
        """The password page accepts a session that still must change its password."""
        session = await self._run(self._session, request)
        if session is None:
            return see_other("/login")
        probe = dataclasses.replace(session, must_change_password=False)
        verdict = decide_session(probe, NO_FINGERPRINT, PORTAL_SYSTEM, self.session_clock(), self.limits)
        return session if verdict.allowed else see_other("/login")

    async def password_page(
        self, request: web.Request, *, error: tuple[str, str] | None = None, status: int = 200
    ) -> web.StreamResponse:
        session = await self._password_session(request)
        if isinstance(session, web.StreamResponse):
            return session
        return page(
            "portal_password.html",
            status=status,
            csrf=session.csrf_token,
            user_id=session.user_id,
            forced=session.must_change_password,
            error=error,
            min_length=self.config.login.password_min_length,
        )

    async def password_post(self, request: web.Request) -> web.StreamResponse:
        now = self.session_clock()
        session = await self._password_session(request)
        if isinstance(session, web.StreamResponse):
            return session
        form = await request.post()
        if not check_session_csrf(session, _text(form.get("csrf"))):
            return self.refuse(request, Reason.CSRF_FAILED, user_id=session.user_id, detail="password form token")
        old, new, again = (_text(form.get(k)) for k in ("old_password", "new_password", "new_password_again"))
        verdict, message = await self.accounts.change_password(session.user_id, old, new, again, now)
        if not verdict.allowed:
            self.record(
                request, EventKind.LOGIN_REFUSED, verdict.reason, user_id=session.user_id, detail=verdict.detail
            )
            return await self.password_page(request, error=message, status=400)
        user = await self._run(self.users.get_user, session.user_id)
        assert user is not None
        await self._run(self.sessions.delete_for_user, user.user_id)  # every old session, gateway ones too
        session_id, _ = await self._run(self.sessions.create, user.user_id, NO_FINGERPRINT, {PORTAL_SYSTEM}, False, now)
        self.record(request, EventKind.PASSWORD_CHANGED, Reason.OK, user_id=user.user_id)
        response = see_other("/")
        response.headers.add("Set-Cookie", set_cookie_header(SESSION_COOKIE, sign(session_id, self.key)))
        return response

    @logged_in_form
    async def logout(self, request: web.Request, session: SessionRecord, form: Mapping[str, Any]) -> web.StreamResponse:
        await self._run(self.sessions.delete, session.session_id)
        self.record(request, EventKind.LOGOUT, Reason.OK, user_id=session.user_id)
        response = page("portal_loggedout.html")
        response.headers.add("Set-Cookie", clear_cookie_header(SESSION_COOKIE))
        response.headers["Clear-Site-Data"] = '"cache"'
        return response

    # -- main menu and issuance ---------------------------------------------------

    @logged_in
    async def main_page(self, request: web.Request, session: SessionRecord) -> web.StreamResponse:
        records = await self._run(self.ca.list, user=session.user_id)
        return page(
            "portal_main.html",
            user_id=session.user_id,
            csrf=session.csrf_token,
            glance=at_a_glance(records, self.clock()),
        )

    @logged_in
    async def issue_page(self, request: web.Request, session: SessionRecord) -> web.StreamResponse:
        advisory = await self._run(self.ca.check_issue, session.user_id, self.clock())
        return self._issue_form(session, advisory=advisory)

    def _issue_form(
        self,
        session: SessionRecord,
        *,
        advisory: Verdict | None = None,
        error: str = "",
        error_ja: str = "",
        p12_format: P12Format = P12Format.DEFAULT,
        status: int = 200,
    ) -> web.Response:
        return page(
            "portal_issue.html",
            status=status,
            user_id=session.user_id,
            csrf=session.csrf_token,
            duplicate=advisory is not None and not advisory.allowed,
            error=error,
            error_ja=error_ja,
            p12_format=p12_format.value,
            min_password=p12.MIN_PASSWORD_LENGTH,
        )

    @logged_in_form
    async def issue_post(
        self, request: web.Request, session: SessionRecord, form: Mapping[str, Any]
    ) -> web.StreamResponse:
        now = self.clock()
        user_id = session.user_id
        windows_login = _text(form.get("windows_login")).strip() or None
        password = _text(form.get("p12_password"))
        p12_format = _p12_format(form, password)
        problem = issuance.windows_login_problem(windows_login) if windows_login else None
        if problem is not None:
            return self._issue_form(session, error=problem, p12_format=p12_format or P12Format.DEFAULT, status=400)
        if p12_format is None:
            return self._issue_form(session, error="unknown download format", status=400)
        password_problem = p12.password_problem(p12_format, password)
        if password_problem is not None:
            ja, en = password_problem
            return self._issue_form(session, error=en, error_ja=ja, p12_format=p12_format, status=400)
        try:
            issued = await self._run(
                self.ca.issue_client,
                user_id,
                now,
                f"portal:{user_id}",
                windows_login=windows_login,
                p12_format=p12_format,
                password=password,
            )
        except IssuanceRefused as exc:
            verdict = exc.verdict
            self.record(request, EventKind.ISSUANCE_REFUSED, verdict.reason, user_id=user_id, detail=verdict.detail)
            return page("portal_duplicate.html", status=409, user_id=user_id)
        except CaError as exc:  # the user ID cannot be a certificate subject
            self.record(request, EventKind.ISSUANCE_REFUSED, Reason.BAD_REQUEST, user_id=user_id, detail=str(exc))
            return self._issue_form(session, error=str(exc), status=400)
        filename = f"{user_id}.p12"
        token = self.downloads.put(user_id, issued.pkcs12, filename, self.session_clock())
        record = issued.record
        detail = f"pkcs12 format {p12_format}"
        self.record(request, EventKind.CERTIFICATE_ISSUED, Reason.OK, user_id=user_id, record=record, detail=detail)
        return page(
            "portal_issued.html",
            user_id=user_id,
            csrf=session.csrf_token,
            token=token,
            filename=filename,
            serial=record.serial_hex,
            expiry=issuance.format_jst(record.not_after),
            with_password=bool(password),
            p12_format=p12_format.value,
            minutes=int(DOWNLOAD_LIFETIME.total_seconds() // 60),
        )

    @logged_in
    async def download(self, request: web.Request, session: SessionRecord) -> web.StreamResponse:
        item = self.downloads.take(request.match_info["token"], session.user_id, self.session_clock())
        if item is None:
            return self.not_found(request, session.user_id, "download token unknown, used, expired or another user's")
        return web.Response(
            body=item.data,
            content_type="application/x-pkcs12",
            headers={**NO_STORE, "Content-Disposition": f'attachment; filename="{item.filename}"'},
        )

    # -- the certificate list, detail and revocation --------------------------------

    @logged_in
    async def certificates(self, request: web.Request, session: SessionRecord) -> web.StreamResponse:
        """The list at once: the manual's 実行 on this screen only repeats the search (``?run=1`` still works)."""
        records = await self._run(self.ca.list, user=session.user_id)
        rows = issuance.list_rows(records, self.clock())
        return page("portal_certificates.html", user_id=session.user_id, csrf=session.csrf_token, rows=rows)

    async def _own_certificate(
        self, request: web.Request, session: SessionRecord
    ) -> CertificateRecord | web.StreamResponse:
        """The certificate named in the URL if it is the caller's own, else the 404 page."""
        text = request.match_info["serial"]
        try:
            record = await self._run(self.ca.get, issuance.parse_serial(text))
        except (ValueError, CaError):
            return self.not_found(request, session.user_id, f"no certificate {text[:48]!r}")
        if record.kind != "client" or record.user_id != session.user_id:
            return self.not_found(request, session.user_id, f"certificate {record.serial_hex} of another user")
        return record

    @logged_in
    async def detail(self, request: web.Request, session: SessionRecord) -> web.StreamResponse:
        record = await self._own_certificate(request, session)
        if isinstance(record, web.StreamResponse):
            return record
        return self._detail_page(session, record)

    def _detail_page(self, session: SessionRecord, record: CertificateRecord) -> web.Response:
        status = issuance.status_of(record, self.clock())
        window = issuance.renewal_window(record.not_after)
        return page(
            "portal_detail.html",
            user_id=session.user_id,
            csrf=session.csrf_token,
            record=record,
            cert_status=status,
            valid=status is Status.VALID,
            issuer=pki.SSO_CA_NAME,
            not_before=issuance.format_jst(record.not_before),
            not_after=issuance.format_jst(record.not_after),
            issued_at=issuance.format_jst(record.issued_at),
            revoked_at=issuance.format_revoked_at(record),
            window=(window.first_day.strftime("%Y/%m/%d"), window.last_day.strftime("%Y/%m/%d")),
        )

    @logged_in_form
    async def revoke_ask(
        self, request: web.Request, session: SessionRecord, form: Mapping[str, Any]
    ) -> web.StreamResponse:
        record = await self._own_certificate(request, session)
        if isinstance(record, web.StreamResponse):
            return record
        if issuance.status_of(record, self.clock()) is not Status.VALID:
            return see_other(f"/certificates/{record.serial_hex}")
        return page(
            "portal_revoke_confirm.html",
            user_id=session.user_id,
            csrf=session.csrf_token,
            serial=record.serial_hex,
            expiry=issuance.format_jst(record.not_after),
        )

    @logged_in_form
    async def revoke_confirm(
        self, request: web.Request, session: SessionRecord, form: Mapping[str, Any]
    ) -> web.StreamResponse:
        record = await self._own_certificate(request, session)
        if isinstance(record, web.StreamResponse):
            return record
        user_id = session.user_id
        try:
            result = await self._run(
                self.ca.revoke,
                record.serial,
                RevocationReason.UNSPECIFIED,
                self.clock(),
                f"portal:{user_id}",
                owner=user_id,
            )
        except IssuanceRefused as exc:  # revoked meanwhile (another tab): show it as it is now
            self.record(
                request, EventKind.REQUEST_REFUSED, exc.verdict.reason, user_id=user_id, detail=exc.verdict.detail
            )
            return see_other(f"/certificates/{record.serial_hex}")
        revoked = result.record
        self.record(
            request,
            EventKind.CERTIFICATE_REVOKED,
            RevocationReason.UNSPECIFIED.value,
            user_id=user_id,
            record=revoked,
        )
        self.audit.record(crl_event(result.crl, f"portal:{user_id}", f"revocation of {revoked.serial_hex}"))
        return page(
            "portal_revoked.html",
            user_id=user_id,
            csrf=session.csrf_token,
            serial=revoked.serial_hex,
            revoked_at=issuance.format_revoked_at(revoked),
        )

    # -- public pages and files ---------------------------------------------------

    async def ca_page(self, request: web.Request) -> web.Response:
        fingerprint = pki.fingerprint_sha256(self.ca.certificate).upper()
        pairs = ":".join(fingerprint[i : i + 2] for i in range(0, len(fingerprint), 2))
        return page("portal_ca.html", ca_name=pki.SSO_CA_NAME, fingerprint=pairs)

    async def ca_der_file(self, request: web.Request) -> web.Response:
        return _attachment(self.ca_der, "application/x-x509-ca-cert", f"{CA_FILE_STEM}.cer")

    async def ca_pem_file(self, request: web.Request) -> web.Response:
        return _attachment(self.ca_pem, "application/x-pem-file", f"{CA_FILE_STEM}.pem")

    async def help_page(self, request: web.Request) -> web.Response:
        return page(
            "portal_help.html",
            opens=issuance.RENEWAL_OPENS_DAYS_BEFORE,
            closes=issuance.RENEWAL_CLOSES_DAYS_BEFORE,
            ca_name=pki.SSO_CA_NAME,
        )

    async def crl_der(self, request: web.Request) -> web.StreamResponse:
        return await self._crl(request, self.ca.crl_der_path, "application/pkix-crl")

    async def crl_pem(self, request: web.Request) -> web.StreamResponse:
        return await self._crl(request, self.ca.crl_pem_path, "application/x-pem-file")

    async def _crl(self, request: web.Request, path: Path, content_type: str) -> web.StreamResponse:
        """The current CRL with validators, so relying parties revalidate cheaply."""
        try:
            file = await self._run(load_crl_file, path, self._crl_files.get(path))
        except (OSError, ValueError) as exc:
            log.error("cannot serve the CRL", extra={"path": str(path), "error": str(exc)})
            return web.Response(status=503, text="CRL unavailable\n", headers={"Retry-After": "60"})
        self._crl_files[path] = file
        max_age = crl_max_age(file.next_update, self.clock())
        headers = {"Cache-Control": f"public, max-age={max_age}"}
        if not_modified(request, file.etag, file.last_modified):
            response = web.Response(status=304, headers=headers)
        else:
            response = web.Response(body=file.data, content_type=content_type, headers=headers)
        response.etag = file.etag
        response.last_modified = file.last_modified
        return response


# -- helpers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Glance:
    """The main page's summary of the user's current certificate (None fields: not applicable)."""

    record: CertificateRecord | None
    status: Status | None
    expiry: str  # JST with its offset, e.g. 2027/11/30 09:00:00 JST (+09:00)
    window_open: bool  # a new certificate may be issued now (renewal window, or nothing valid)
    window_first: str  # the first day of the renewal window (JST), "" without a valid certificate
    window_last: str


def at_a_glance(records: Sequence[CertificateRecord], now: dt.datetime) -> Glance:
    """The certificate the user holds now: the valid one expiring last, else the newest.

    Issuing is open when no certificate is valid, or inside the 30-day renewal
    window of the valid one (the same rule as :func:`gateway.ca.issuance.may_issue`).
    """
    clients = [r for r in records if r.kind == "client"]
    if not clients:
        return Glance(None, None, "", True, "", "")
    valid = [r for r in clients if issuance.status_of(r, now) is Status.VALID]
    current = max(valid or clients, key=lambda r: (r.not_after, r.issued_at))
    status = issuance.status_of(current, now)
    expiry = issuance.format_jst(current.not_after) + " JST (+09:00)"
    if status is not Status.VALID:
        return Glance(current, status, expiry, True, "", "")
    window = issuance.renewal_window(current.not_after)
    first, last = (day.strftime("%Y/%m/%d") for day in (window.first_day, window.last_day))
    return Glance(current, status, expiry, issuance.may_issue(valid, now).allowed, first, last)


def page(template: str, status: int = 200, **ctx: Any) -> web.Response:
    """A portal page: never stored by the browser or a proxy."""
    return web.Response(
        text=render(template, **ctx), status=status, content_type="text/html", charset="utf-8", headers=NO_STORE
    )


def see_other(location: str) -> web.Response:
    """A 303 redirect that no cache keeps."""
    return accounts.see_other(location, NO_STORE)


def _attachment(data: bytes, content_type: str, filename: str) -> web.Response:
    return web.Response(
        body=data,
        content_type=content_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "public, max-age=3600"},
    )


_text = accounts.form_text


def _p12_format(form: Mapping[str, Any], password: str) -> P12Format | None:
    """The download format asked for; None if unknown.

    A form without the field (a client of the page before formats existed)
    gets what its password meant then: with one the password format, without
    the manual's default.
    """
    value = _text(form.get("p12_format"))
    if not value:
        return P12Format.PASSWORD if password else P12Format.DEFAULT
    try:
        return P12Format(value)
    except ValueError:
        return None


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response, error pages included: no framing, no foreign content, no sniffing, no version.

    aiohttp has set its ``Server: Python/x aiohttp/y`` before this hook runs, so it can go here.
    """
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.popall("Server", None)


PORTAL = web.AppKey("portal", Portal)


def build_portal_app(
    config: Config,
    *,
    audit: AuditSink,
    clock: Callable[[], dt.datetime] | None = None,
    crl_interval: float | None = DEFAULT_INTERVAL,
    session_clock: Callable[[], dt.datetime] | None = None,
) -> web.Application:
    """The portal as an aiohttp application (HTTPS is up to the caller; see :func:`start_portal`).

    ``clock`` replaces the real UTC clock for the CA's decisions and
    ``session_clock`` for logins and sessions (see the module doc);
    ``crl_interval`` None turns the CRL schedule off (tests drive it by hand).
    """
    if config.ca is None:
        raise ConfigError([f"{config.path}: ca: missing; the portal needs ca.dir"])
    settings = CaSettings.from_config(config.ca)
    backend = Backend(config, role="portal")
    try:
        records = backend.issuance(config.ca.dir, busy_timeout=settings.busy_timeout)
        ca = CertificateAuthority.open(config.ca.dir, settings, records)
    except BaseException:
        backend.close()
        raise
    portal = Portal(
        config, MeteredAudit(audit), ca, clock or utcnow, crl_interval, session_clock or utcnow, storage=backend
    )
    app = web.Application(client_max_size=MAX_FORM_BYTES)
    app[PORTAL] = portal
    portal.setup_routes(app)
    app.on_response_prepare.append(_security_headers)
    app.cleanup_ctx.append(portal.lifecycle)

    async def close_backend(_app: web.Application) -> None:
        backend.close()  # the stores' and the CA records' pool (PostgreSQL), after the portal's own cleanup

    app.on_cleanup.append(close_backend)
    setup_portal_admin(app, portal)
    return app


def server_context(portal: PortalConfig) -> ssl.SSLContext:
    """HTTPS without client certificates: TLS 1.2+, the portal's certificate and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(portal.tls.cert, portal.tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise PkiError(
            f"{portal.tls.cert}, {portal.tls.key}: cannot load the portal's certificate and key: {exc}"
        ) from exc
    return ctx


class PortalAccessLogger(AbstractAccessLogger):
    """JSON access log without query strings or download tokens."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "access",
            extra={
                "client_ip": request.remote,
                "method": request.method,
                "path": public_path(request.path),
                "status": response.status,
                "bytes": response.body_length,
                "duration_ms": round(time * 1000, 2),
            },
        )


async def start_portal(
    config: Config,
    *,
    audit: AuditSink,
    clock: Callable[[], dt.datetime] | None = None,
    crl_interval: float | None = DEFAULT_INTERVAL,
    session_clock: Callable[[], dt.datetime] | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve the portal over HTTPS on ``config.portal.listen``; return the runner and the real port."""
    if config.portal is None:
        raise ConfigError([f"{config.path}: portal: missing; expected portal.listen and portal.tls"])
    context = server_context(config.portal)
    app = build_portal_app(config, audit=audit, clock=clock, crl_interval=crl_interval, session_clock=session_clock)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log_class=PortalAccessLogger,
        access_log=logging.getLogger("gateway.access"),
        shutdown_timeout=10.0,
    )
    await runner.setup()
    listen = config.portal.listen
    site = web.TCPSite(runner, listen.host, listen.port, ssl_context=context, backlog=512)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise listener_error("portal", listen.host, listen.port, exc) from exc
    port = int(runner.addresses[0][1])
    return runner, port


def run_portal(config: Config) -> int:
    """``gateway portal``: serve in the foreground until SIGTERM or SIGINT."""
    from gateway.logs import setup_logging
    from gateway.server import install_uvloop

    setup_logging(config.log_level)
    uvloop = install_uvloop()
    log.info("starting the issuance portal", extra={"uvloop": uvloop})
    return asyncio.run(_serve(config))


async def _serve(config: Config) -> int:
    from gateway.audit.writer import AuditLog

    audit = AuditLog(config, checkpoints=True)  # the whole config: its database, instance and signing key
    await audit.start()
    try:
        runner, port = await start_portal(config, audit=audit)
        assert config.portal is not None
        log.info("portal listening", extra={"host": config.portal.listen.host, "port": port})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("portal stopping")
        await runner.cleanup()
    finally:
        await audit.aclose()
    return 0

"""The login layer: user ID + password + certificate, sessions pinned to the certificate.

This is the aiohttp edge of :mod:`gateway.access.policy` (the decisions),
:mod:`gateway.access.users` and :mod:`gateway.access.sessions` (the stores). It serves the
gateway's own pages under one reserved prefix (``gateway_paths.prefix``,
default ``/_gateway/``: ``login``, ``logout``, ``password``, ``notice`` and
the landing page at the prefix itself) and answers a bare ``/`` with the
landing page unless a backend is mounted there. As the gateway's
:class:`~gateway.app.AccessLayer`, it decides for every backend request:

* ``gateway`` mode (default): a valid session made with *this* certificate,
  for a user allowed on the backend's system; else a 303 to the login page
  (HTML navigations) or 401.
* ``passthrough`` mode: the backend keeps its own login form; its login POST
  is forwarded only when the user field equals the certificate's CN.

Blocking work (argon2, database writes) runs in a thread pool. The per-request
session read goes through a :class:`~gateway.access.sessions.SessionCache`, inline
on a read-only connection of its own: mostly a ``PRAGMA data_version`` and a
dict lookup, else one primary-key SELECT on a WAL database (WAL readers
never wait for writers, and a thread hop would cost more than the read).
With ``database:`` (PostgreSQL, shared by several instances) the stores come
from :class:`~gateway.storage.backends.Backend`, the cache is kept current by
LISTEN/NOTIFY (:mod:`gateway.storage.pg_sessions`), and anything that needs
the unreachable database is answered ``service_unavailable`` (503).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway import metrics
from gateway.access.accounts import (
    LOGIN_FORM_MAX_AGE,
    MAX_FORM_BYTES,
    Accounts,
    FormError,
    form_text,
    parse_form,
    read_capped,
    see_other,
)
from gateway.access.passwords import (
    dummy_verify,
)
from gateway.access.policy import (
    LoginAttempt,
    LoginSettings,
    SessionLimits,
    decide_login,
    decide_session,
    safe_next,
)
from gateway.access.sessions import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    TOUCH_INTERVAL,
    SessionCache,
    SessionRecord,
    check_login_csrf,
    check_session_csrf,
    clear_cookie_header,
    cookie_value,
    load_session_key,
    login_csrf_token,
    new_login_nonce,
    set_cookie_header,
    sign,
)
from gateway.app import RUNTIME, forward_to, proxy_handler
from gateway.audit.events import EventKind
from gateway.audit.workspace import AuditWorkspace
from gateway.certs.policy import PeerCertificate
from gateway.config import SYSTEMS, Backend, Config
from gateway.keys import PEER, USER
from gateway.storage.backends import Backend as Storage
from gateway.storage.pg_sessions import SCHEMA as SESSIONS_SCHEMA
from gateway.storage.pg_sessions import PgSessionReader
from gateway.storage.pg_users import SCHEMA as USERS_SCHEMA
from gateway.storage.postgres import DatabaseUnavailable, check_schema
from gateway.verdict import Reason, Verdict
from gateway.web.messages import Message, message_for
from gateway.web.pages import render
from gateway.web.responses import NO_STORE, wants_json

log = logging.getLogger(__name__)
T = TypeVar("T")
# At most one "database unavailable" log line per worker this often (the refusals are all audited).
UNAVAILABLE_LOG_INTERVAL = 60.0
SYSTEM_LABELS = {"tdnet": "TDnet", "j-iriss": "J-IRISS", "clearing": "清算受渡 / Clearing"}


def _jst(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone(dt.timedelta(hours=9))).strftime("%Y/%m/%d %H:%M:%S")


class LoginAccess:
    """Login pages and the per-request session check (one per worker)."""

    def __init__(self, config: Config, audit: Any, storage: Storage | None = None) -> None:
        self.config = config
        self.audit = audit
        self.paths = config.gateway_paths
        self.login_link = ((self.paths.login, "ログイン画面へ", "Back to login"),)
        self.key = load_session_key(config.session.secret_file)
        # SQLite files or the shared PostgreSQL database: the config decides, in Backend.
        self.storage = storage or Storage(config, role="gateway", workers=config.workers)
        self._owns_storage = storage is None
        self.users = self.storage.users()
        self.sessions = self.storage.sessions()  # writes, from the pool
        self.reader = self.storage.session_reader()  # reads, inline on the loop, never writes
        self.session_cache = SessionCache(self.reader, self.key)
        try:
            self._check_schemas()
        except BaseException:
            self.storage.close()
            raise
        self._unavailable_logged = -UNAVAILABLE_LOG_INTERVAL
        self.settings = LoginSettings.from_config(config.login)
        self.limits = SessionLimits.from_config(config.session)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="login")
        # last_seen updates must not queue behind argon2 under login load.
        self.toucher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="session-touch")
        self.accounts = Accounts(self.users, self.settings, self._run)

    # -- plumbing ---------------------------------------------------------------

    async def _run(self, func: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, func, *args)

    def setup_routes(self, app: web.Application) -> None:
        paths = self.paths
        app.router.add_get(paths.login, self.login_page)
        app.router.add_post(paths.login, self.login_post)
        app.router.add_get(paths.logout, self.logout_page)
        app.router.add_post(paths.logout, self.logout)
        app.router.add_get(paths.password, self.password_page)
        app.router.add_post(paths.password, self.password_post)
        app.router.add_get(paths.notice, self.notice_page)
        app.router.add_get(paths.landing, self.landing)
        app.router.add_get(paths.landing.rstrip("/"), self.to_landing)
        app.router.add_get("/", self.root)
        # The workspace's protocol names the SQLite UserStore; it only calls get_user, which every store has.
        AuditWorkspace(self).setup(app)  # <prefix>audit, for users with the auditor role
        app.middlewares.append(self._database_errors())
        app.on_startup.append(self._warm)
        app.on_startup.append(self._listen)
        app.cleanup_ctx.append(self._housekeeping)
        app.on_cleanup.append(self._close)

    async def _warm(self, app: web.Application) -> None:
        await self._run(dummy_verify, "warm-up")  # the first unknown-user login is not slower

    async def _housekeeping(self, app: web.Application) -> Any:
        """Purge expired sessions and old failure/lock rows every ten minutes."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(600)
                now = dt.datetime.now(dt.UTC)
                try:
                    await self._run(self.sessions.purge_expired, now, self.limits)
                    await self._run(self.users.purge, now, self.settings.failure_window)
                except Exception:  # housekeeping must not take the worker down
                    log.exception("session housekeeping failed")

        task = asyncio.get_running_loop().create_task(loop())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _listen(self, app: web.Application) -> None:
        """PostgreSQL: hear other instances' session changes, on this worker's loop, before serving."""
        if isinstance(self.reader, PgSessionReader):
            self.reader.start()
            assert self.config.database is not None
            if not await self.reader.listener.wait_up(self.config.database.connect_timeout):
                log.warning("database listener not connected yet: sessions are refused until it is")

    def _check_schemas(self) -> None:
        """A schema that is behind stops the start (``gateway db migrate`` first); an unreachable
        database does not: the worker answers ``service_unavailable`` until it is back."""
        if self.storage.db is None:
            return
        try:
            for schema in (USERS_SCHEMA, SESSIONS_SCHEMA):
                check_schema(self.storage.db, schema)
        except DatabaseUnavailable as exc:
            log.warning("database unreachable at start-up (schema not checked): %s", exc)

    async def _close(self, app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(self.reader, PgSessionReader):
            await self.reader.stop()
        await loop.run_in_executor(None, self.toucher.shutdown, True)
        await loop.run_in_executor(None, self.pool.shutdown, True)
        for store in (self.users, self.sessions, self.reader):
            store.close()
        if self._owns_storage:
            self.storage.close()

    def database_health(self) -> tuple[bool, dict[str, Any]]:
        """For /healthz: False while the session listener is down (sessions are served from memory, then refused)."""
        if not isinstance(self.reader, PgSessionReader):
            return True, {}
        down_for = self.reader.down_for
        if down_for is None:
            return True, {"database": "ok"}
        why = f"listener down for {down_for:.0f} s; sessions refused after {self.reader.grace:g} s"
        return False, {"database": why}

    def _database_up(self) -> bool:
        return not isinstance(self.reader, PgSessionReader) or self.reader.listener.up

    def _database_errors(self) -> Middleware:
        """A login or session check that needs the unreachable database: 503 ``service_unavailable``.

        Audited with a support ID like every refusal; logged once a minute at most, without a
        traceback (an outage is one event, not one per request).
        """

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                return await handler(request)
            except DatabaseUnavailable as exc:
                return self._unavailable(request, exc)

        return middleware

    def _unavailable(self, request: web.Request, exc: DatabaseUnavailable) -> web.StreamResponse:
        verdict = Verdict.deny(Reason.SERVICE_UNAVAILABLE, str(exc))
        now = asyncio.get_running_loop().time()
        if now - self._unavailable_logged >= UNAVAILABLE_LOG_INTERVAL:
            self._unavailable_logged = now
            log.warning("refusing logins and session checks: %s", exc)
        return request.app[RUNTIME].refuse(request, verdict, peer=request.get(PEER))

    def _now(self, request: web.Request) -> dt.datetime:
        return request.app[RUNTIME].clock()

    def _live_session(self, request: web.Request) -> SessionRecord | None:
        """The session if it is unexpired and pinned to this certificate (for the gateway's own pages)."""
        session = self._session(request)
        verdict = decide_session(session, request[PEER].fingerprint, "", self._now(request), self.limits)
        ok = verdict.allowed or verdict.reason in (Reason.PASSWORD_CHANGE_REQUIRED, Reason.NOT_AUTHORIZED)
        return session if ok else None

    def _session(self, request: web.Request) -> SessionRecord | None:
        """The cookie's session, via the worker's cache (exact: see SessionCache)."""
        cookie = cookie_value(request.headers.get("Cookie"), SESSION_COOKIE)
        return self.session_cache.lookup(cookie) if cookie else None

    def _record(self, request: web.Request, kind: EventKind, reason: Reason | str = "", **fields: Any) -> None:
        rt = request.app[RUNTIME]
        self.audit.record(rt.event(request, kind, reason, peer=request.get(PEER), **fields))

    # -- the per-request decision -------------------------------------------------

    async def authorize(
        self, request: web.Request, backend: Backend, peer: PeerCertificate
    ) -> web.StreamResponse | str | None:
        if backend.login.mode == "passthrough":
            return await self._passthrough(request, backend, peer)
        now = self._now(request)
        session = self._session(request)
        verdict = decide_session(session, peer.fingerprint, backend.system_name, now, self.limits)
        if not verdict.allowed:
            return await self._session_refused(request, verdict, session, peer)
        assert session is not None
        # During an outage a touch would only queue up behind the pool's timeout.
        if now - session.last_seen >= TOUCH_INTERVAL and self._database_up():
            touch = asyncio.get_running_loop().run_in_executor(
                self.toucher, self.sessions.touch, session.session_id, now
            )
            touch.add_done_callback(_log_touch_failure)
        return session.user_id

    async def still_authorized(self, request: web.Request, backend: Backend, peer: PeerCertificate) -> bool:
        """The session check of :meth:`authorize`, again, for a long-lived WebSocket."""
        if backend.login.mode == "passthrough":
            return True
        try:
            session = self._session(request)
        except DatabaseUnavailable:
            return False  # past the outage grace: a long-lived WebSocket ends like any request is refused
        return decide_session(session, peer.fingerprint, backend.system_name, self._now(request), self.limits).allowed

    async def _session_refused(
        self, request: web.Request, verdict: Verdict, session: SessionRecord | None, peer: PeerCertificate
    ) -> web.StreamResponse:
        rt = request.app[RUNTIME]
        reason = verdict.reason
        if session is not None and reason in (Reason.SESSION_EXPIRED, Reason.SESSION_CERTIFICATE_MISMATCH):
            await self._run(self.sessions.delete, session.session_id)
            self._record(request, EventKind.SESSION_ENDED, reason, user_id=session.user_id, detail=verdict.detail)
        navigation = request.method in ("GET", "HEAD") and not wants_json(request)
        if reason in (Reason.LOGIN_REQUIRED, Reason.SESSION_EXPIRED) and navigation:
            target = self.paths.login + "?next=" + quote(request.path_qs, safe="/")
            return see_other(target, headers=NO_STORE)
        if reason is Reason.PASSWORD_CHANGE_REQUIRED and navigation:
            return see_other(self.paths.password, headers=NO_STORE)
        user = session.user_id if session else ""
        extra = (
            {"Set-Cookie": clear_cookie_header(SESSION_COOKIE)}
            if reason is Reason.SESSION_CERTIFICATE_MISMATCH
            else None
        )
        return rt.refuse(request, verdict, peer=peer, user_id=user, links=self.login_link, headers=extra)

    async def _passthrough(
        self, request: web.Request, backend: Backend, peer: PeerCertificate
    ) -> web.StreamResponse | None:
        """The backend keeps its own login: its user field must be the certificate's CN.

        The field is looked for in the query string of every request and in
        the form body of any non-GET request to the login path (compared
        without ``;parameters``, trailing slash or case, the ways servlet
        containers and case-insensitive servers see the same path). It must
        appear exactly once: containers read the query first, PHP the last
        duplicate, so two values could bind one user and log in another.
        The body is read once, at most ``MAX_FORM_BYTES`` (declared or sent),
        parsed by :func:`~gateway.access.accounts.parse_form` and forwarded as read;
        a body that is not a form the gateway can read is ``bad_request``.
        """
        field = backend.login.user_field
        values: list[object] = list(request.query.getall(field, []))
        body: bytes | None = None
        if request.method not in ("GET", "HEAD") and login_path(request.path, backend.login.path or ""):
            encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):  # a backend that inflates it would read other fields
                verdict = Verdict.deny(Reason.BAD_REQUEST, f"login body: Content-Encoding {encoding!r} not accepted")
                return request.app[RUNTIME].refuse(request, verdict, peer=peer)
            body = await read_capped(request, MAX_FORM_BYTES)
            if body is None:
                verdict = Verdict.deny(Reason.PAYLOAD_TOO_LARGE, f"login body over {MAX_FORM_BYTES} bytes")
                return request.app[RUNTIME].refuse(request, verdict, peer=peer, headers={"Connection": "close"})
            try:
                form = await parse_form(request.headers.get("Content-Type"), body)
            except FormError as exc:
                return request.app[RUNTIME].refuse(
                    request, Verdict.deny(Reason.BAD_REQUEST, f"login body: {exc}"), peer=peer
                )
            values += form.getall(field, [])
        if body is None and not values:
            return None  # not a login: forward with the certificate identity
        typed_text = values[0] if len(values) == 1 and isinstance(values[0], str) else ""
        attempt = LoginAttempt(Verdict.allow(), peer.common_name, typed_text, True, 0, None, True)
        outcome = decide_login(attempt, self._now(request), self.settings)
        if not outcome.verdict.allowed:
            metrics.LOGINS.labels(str(outcome.verdict.reason)).inc()
            return request.app[RUNTIME].refuse(
                request, outcome.verdict, peer=peer, kind=EventKind.LOGIN_REFUSED, user_id=typed_text
            )
        if body is None:
            return None
        metrics.LOGINS.labels("passthrough").inc()
        return await forward_to(request, backend, peer, None, body=body)

    async def on_certificate_refused(self, request: web.Request, verdict: Verdict) -> None:
        """A refused certificate ends the session it carried (revocation, expiry, a bad certificate).

        Not for ``revocation_unavailable`` (the operator's CRL outage should not
        log everyone out) nor ``no_certificate`` (nothing was presented to end it for).
        """
        if verdict.reason in (Reason.REVOCATION_UNAVAILABLE, Reason.NO_CERTIFICATE):
            return
        session = self._session(request)
        if session is not None:
            await self._run(self.sessions.delete, session.session_id)
            self._record(
                request, EventKind.SESSION_ENDED, verdict.reason, user_id=session.user_id, detail=verdict.detail
            )

    # -- pages ---------------------------------------------------------------------

    def _page(self, template: str, status: int = 200, cookies: tuple[str, ...] = (), **ctx: Any) -> web.Response:
        response = web.Response(
            text=render(template, paths=self.paths, **ctx),
            status=status,
            content_type="text/html",
            charset="utf-8",
            headers=NO_STORE,
        )
        for cookie in cookies:
            response.headers.add("Set-Cookie", cookie)
        return response

    async def login_page(self, request: web.Request) -> web.Response:
        return self._login_form(request)

    def _login_form(
        self, request: web.Request, *, user_id: str = "", error: Message | None = None, support_id: str = ""
    ) -> web.Response:
        """The login form; after a wrong password, again with the error, the typed user ID and 401.

        The error is the same for an unknown user ID (it never says which of the two was wrong).
        """
        peer: PeerCertificate = request[PEER]
        now = self._now(request)
        nonce = request.cookies.get(LOGIN_CSRF_COOKIE) or new_login_nonce()
        token = login_csrf_token(self.key, nonce, now)
        next_path = safe_next(request.query.get("next")) or ""
        days_left = (peer.not_after - now).days
        return self._page(
            "login.html",
            status=401 if error else 200,
            cookies=(set_cookie_header(LOGIN_CSRF_COOKIE, nonce),),
            user_id=user_id,
            error=error,
            support_id=support_id,
            reason=str(Reason.BAD_CREDENTIALS) if error else "",
            csrf=token,
            next=next_path,
            cert_subject=peer.common_name,
            cert_issuer=peer.issuer_cn,
            cert_expiry=_jst(peer.not_after),
            expiry_soon=days_left < self.config.login.expiry_notice_days,
            days_left=days_left,
        )

    async def login_post(self, request: web.Request) -> web.StreamResponse:
        rt = request.app[RUNTIME]
        peer: PeerCertificate = request[PEER]
        now = self._now(request)
        if (request.content_length or 0) > MAX_FORM_BYTES:
            return rt.refuse(request, Verdict.deny(Reason.PAYLOAD_TOO_LARGE), peer=peer)
        form = await request.post()
        user_id = form_text(form.get("user_id"))
        csrf_ok = check_login_csrf(
            self.key, form_text(form.get("csrf")), request.cookies.get(LOGIN_CSRF_COOKIE), now, LOGIN_FORM_MAX_AGE
        )
        result = await self.accounts.login(
            user_id=user_id,
            password=form_text(form.get("password")),
            ip=request.remote or "",
            now=now,
            csrf_ok=csrf_ok,
            certificate=Verdict.allow(),  # the certificate middleware already passed it
            cert_subject=peer.common_name,
        )
        outcome, user = result.outcome, result.user
        metrics.LOGINS.labels(str(outcome.verdict.reason)).inc()
        if result.locked_until is not None:
            detail = f"locked until {result.locked_until.isoformat()}"
            self._record(request, EventKind.ACCOUNT_LOCKED, Reason.ACCOUNT_LOCKED, user_id=user_id, detail=detail)
        if outcome.verdict.reason is Reason.BAD_CREDENTIALS:
            event = rt.record_refusal(
                request, outcome.verdict, peer=peer, kind=EventKind.LOGIN_REFUSED, user_id=user_id
            )
            if wants_json(request):
                return rt.refuse_recorded(request, outcome.verdict.reason, event.support_id)
            return self._login_form(
                request, user_id=user_id, error=message_for(Reason.BAD_CREDENTIALS), support_id=event.support_id
            )
        if not outcome.verdict.allowed:
            mismatch = outcome.verdict.reason is Reason.SUBJECT_MISMATCH
            return rt.refuse(
                request,
                outcome.verdict,
                peer=peer,
                kind=EventKind.LOGIN_REFUSED,
                user_id=user_id,
                links=self.login_link,
                presented=peer.common_name if mismatch else "",
            )
        assert user is not None
        session_id, _csrf = await self._run(
            self.sessions.create, user_id, peer.fingerprint, user.systems, outcome.must_change_password, now
        )
        self._record(request, EventKind.LOGIN, Reason.OK, user_id=user_id, detail=outcome.verdict.detail)
        if outcome.must_change_password:
            target = self.paths.password
        else:
            target = self._landing_target(request, user.systems, form)
        if not outcome.must_change_password and (peer.not_after - now).days < self.config.login.expiry_notice_days:
            target = self.paths.notice + "?next=" + quote(target, safe="/")
        response = see_other(target, headers=NO_STORE)
        response.headers.add("Set-Cookie", set_cookie_header(SESSION_COOKIE, sign(session_id, self.key)))
        response.headers.add("Set-Cookie", clear_cookie_header(LOGIN_CSRF_COOKIE))
        return response

    def _landing_target(self, request: web.Request, systems: frozenset[str], form: Any) -> str:
        wanted = safe_next(form_text(form.get("next")) or None)
        if wanted:
            return wanted
        router = request.app[RUNTIME].router
        for system in SYSTEMS:
            backend = router.for_system(system, request.host) if system in systems else None
            if backend is not None:
                return backend.prefix
        return self.paths.landing

    async def root(self, request: web.Request) -> web.StreamResponse:
        """``/``: the backend mounted there if there is one (a system at ``/``), else the landing page."""
        if request.app[RUNTIME].router.match(request.host, "/") is not None:
            return await proxy_handler(request)
        return await self.landing(request)

    async def to_landing(self, request: web.Request) -> web.StreamResponse:
        return see_other(self.paths.landing, headers=NO_STORE)

    async def landing(self, request: web.Request) -> web.StreamResponse:
        """After login: the first system the user may use; never a redirect to itself."""
        session = self._live_session(request)
        if session is None:
            return see_other(self.paths.login, headers=NO_STORE)
        if session.must_change_password:
            return see_other(self.paths.password, headers=NO_STORE)
        target = self._landing_target(request, session.systems, {})
        if target == self.paths.landing:  # no system of this user is routed here: say so, do not loop
            verdict = Verdict.deny(Reason.NOT_AUTHORIZED, "no backend for any of the user's systems")
            return request.app[RUNTIME].refuse(request, verdict, peer=request[PEER], user_id=session.user_id)
        return see_other(target, headers=NO_STORE)

    async def notice_page(self, request: web.Request) -> web.Response:
        peer: PeerCertificate = request[PEER]
        now = self._now(request)
        return self._page(
            "notice.html",
            next=safe_next(request.query.get("next")) or self.paths.landing,
            cert_expiry=_jst(peer.not_after),
            days_left=max((peer.not_after - now).days, 0),
        )

    async def logout_page(self, request: web.Request) -> web.StreamResponse:
        session = self._live_session(request)
        if session is None:
            return see_other(self.paths.login, headers=NO_STORE)
        return self._page("logout.html", csrf=session.csrf_token, user_id=session.user_id)

    async def logout(self, request: web.Request) -> web.StreamResponse:
        rt = request.app[RUNTIME]
        session = self._live_session(request)
        form = await request.post() if (request.content_length or 0) <= MAX_FORM_BYTES else {}
        if session is None or not check_session_csrf(session, form_text(form.get("csrf"))):
            return rt.refuse(
                request,
                Verdict.deny(Reason.CSRF_FAILED, "logout without a valid session token"),
                peer=request[PEER],
                links=self.login_link,
            )
        await self._run(self.sessions.delete, session.session_id)
        self._record(request, EventKind.LOGOUT, Reason.OK, user_id=session.user_id)
        response = self._page("loggedout.html")
        response.headers.add("Set-Cookie", clear_cookie_header(SESSION_COOKIE))
        response.headers["Clear-Site-Data"] = '"cache"'
        return response

    async def password_page(
        self, request: web.Request, *, error: tuple[str, str] | None = None, status: int = 200
    ) -> web.Response:
        session = self._live_session(request)
        if session is None:
            return see_other(f"{self.paths.login}?next={self.paths.password}", headers=NO_STORE)
        return self._page(
            "password.html",
            status=status,
            csrf=session.csrf_token,
            user_id=session.user_id,
            forced=session.must_change_password,
            error=error,
            min_length=self.config.login.password_min_length,
        )

    async def password_post(self, request: web.Request) -> web.StreamResponse:
        rt = request.app[RUNTIME]
        peer: PeerCertificate = request[PEER]
        now = self._now(request)
        session = self._live_session(request)
        if session is None:
            return see_other(f"{self.paths.login}?next={self.paths.password}", headers=NO_STORE)
        form = await request.post() if (request.content_length or 0) <= MAX_FORM_BYTES else {}
        if not check_session_csrf(session, form_text(form.get("csrf"))):
            return rt.refuse(request, Verdict.deny(Reason.CSRF_FAILED), peer=peer, user_id=session.user_id)
        old, new, again = (form_text(form.get(k)) for k in ("old_password", "new_password", "new_password_again"))
        verdict, message = await self.accounts.change_password(session.user_id, old, new, again, now)
        if not verdict.allowed:
            self._record(
                request, EventKind.LOGIN_REFUSED, verdict.reason, user_id=session.user_id, detail=verdict.detail
            )
            return await self.password_page(request, error=message, status=400)
        user = await self._run(self.users.get_user, session.user_id)
        assert user is not None
        await self._run(self.sessions.delete_for_user, session.user_id)
        session_id, _ = await self._run(self.sessions.create, user.user_id, peer.fingerprint, user.systems, False, now)
        self._record(request, EventKind.PASSWORD_CHANGED, Reason.OK, user_id=user.user_id)
        response = see_other(self._landing_target(request, user.systems, {}), headers=NO_STORE)
        response.headers.add("Set-Cookie", set_cookie_header(SESSION_COOKIE, sign(session_id, self.key)))
        return response


def login_path(path: str, login: str) -> bool:
    """Would a backend route ``path`` to its login handler at ``login``?

    The path itself (see :func:`same_path`), a path below it (PHP's PATH_INFO:
    ``/login.php/x``) and a suffix of it (Spring's ``/login.do``, ``/login.json``).
    """
    if same_path(path, login):
        return True
    base = _norm(login)
    full = _norm(path)
    return bool(base) and (full.startswith(base + "/") or full.startswith(base + "."))


def _norm(path: str) -> str:
    return "/".join(segment.split(";", 1)[0] for segment in path.split("/")).rstrip("/").casefold()


def same_path(a: str, b: str) -> bool:
    """Equal as a backend may read them: ``;params`` dropped, no trailing slash, any case."""
    return bool(b) and _norm(a) == _norm(b)


def _log_touch_failure(future: asyncio.Future[bool]) -> None:
    if future.cancelled() or isinstance(future.exception(), DatabaseUnavailable):
        return  # an outage is logged once, by the listener and the refusals
    if future.exception() is not None:
        log.error("session last_seen update failed", extra={"error": str(future.exception())})


__all__ = ["USER", "LoginAccess"]

"""TLS termination: the server context, CA names, and handshakes we can see fail.

Three gaps of the stdlib ``ssl`` module are closed here, each deliberately:

1. **Refuse with a page, not an alert.** The context uses ``CERT_OPTIONAL``
   (no certificate still completes the handshake, so the user gets the
   "install your certificate" page) and OpenSSL's ``X509_V_FLAG_NO_CHECK_TIME``
   (an expired certificate completes the handshake, so the user gets the
   "renew" page). Chain and signature are still verified by OpenSSL; time,
   revocation, key usage and subject are checked per request by
   :mod:`gateway.certs.policy`.
2. **CA names in the CertificateRequest.** The stdlib sends none, so browsers
   offer every certificate the user holds. ``SSL_CTX_set_client_CA_list`` is
   called through ctypes on the context's own ``SSL_CTX`` (the pointer that
   follows ``PyObject_HEAD`` in CPython's ``PySSLContext``). The pointer is
   checked against the context's verify mode before use; if the layout ever
   differs, we log and carry on without names rather than crash.
3. **Failed handshakes are recorded.** asyncio logs them only in debug mode.
   :class:`TlsAcceptor` accepts plain TCP and runs ``loop.start_tls`` itself,
   so a failure raises in our code with OpenSSL's reason; a message callback
   keeps the client's certificate as it arrives, so the audit record can name
   the refused certificate's subject, serial and issuer. OpenSSL would go on
   calling it for every record of the connection (a Python call per record
   header, ~5 µs a keep-alive request), so once the handshake is done it is
   switched off for that connection (``SSL_set_msg_callback``, same ctypes
   care: the ``SSL*`` is checked to belong to our ``SSL_CTX`` first).
"""

from __future__ import annotations

import _ssl
import asyncio
import ctypes
import logging
import os
import ssl
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from gateway import metrics
from gateway.certs.files import read_pem_certs
from gateway.certs.policy import KeyPolicy, ca_problems
from gateway.config import TlsConfig
from gateway.errors import PkiError
from gateway.tls.deadlines import peer_address

log = logging.getLogger(__name__)

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME: verify chain and signatures, not dates.
X509_V_FLAG_NO_CHECK_TIME = 0x200000
_TLS_HANDSHAKE = 22
_HS_CERTIFICATE = 11


# Mozilla's "intermediate" TLS 1.2 suites (server-side TLS guidelines, v5.7): ECDHE key
# exchange and AEAD ciphers only, for ECDSA and RSA server keys alike (the gateway's own
# CA makes EC server keys; an operator's certificate may be RSA). Mozilla also lists
# DHE-RSA-AES*-GCM; they are left out: finite-field DH adds nothing a 2016+ client lacks.
# TLS 1.3's suites are all AEAD and OpenSSL's defaults are kept for it.
INTERMEDIATE_TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)


@dataclass(slots=True)
class HandshakeSlot:
    """What one connection's handshake left behind: the client's leaf, if sent."""

    client_der: bytes | None = None
    client_chain: tuple[bytes, ...] = ()  # every certificate the client sent, leaf first
    sslobj: ssl.SSLObject | None = None
    server_name: str | None = None  # SNI as the client sent it (None: no SNI)
    peer: Any = None  # the HTTP layer's parse of the verified leaf, kept for the connection's later requests


_current_slot: ContextVar[HandshakeSlot | None] = ContextVar("gateway_tls_slot", default=None)


class _TrackedSSLObject(ssl.SSLObject):
    """SSLObject that links itself to the handshake slot of the accepting task.

    ``loop.start_tls`` schedules the SSL protocol's ``connection_made`` with a
    copy of the calling task's context, and ``wrap_bio`` runs there: the
    context variable set by :class:`TlsAcceptor` is visible at creation time.
    """

    _gateway_slot: HandshakeSlot | None

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> _TrackedSSLObject:
        obj: _TrackedSSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        slot = _current_slot.get()
        obj._gateway_slot = slot
        if slot is not None:
            slot.sslobj = obj
        return obj


def _certificates(body: bytes, tls13: bool) -> tuple[bytes, ...]:
    """Every certificate's DER from a Certificate handshake message body (RFC 8446 4.4.2 / 5246 7.4.2).

    Leaf first, as the client sent them. Truncated input ends the list (the
    handshake then fails in OpenSSL anyway); TLS 1.3 per-certificate extensions
    are skipped.
    """
    pos = 1 + body[0] if tls13 else 0  # TLS 1.3: certificate_request_context
    if len(body) < pos + 3:
        return ()
    end = min(len(body), pos + 3 + int.from_bytes(body[pos : pos + 3], "big"))
    pos += 3
    found: list[bytes] = []
    while pos + 3 <= end:
        length = int.from_bytes(body[pos : pos + 3], "big")
        der = body[pos + 3 : pos + 3 + length]
        if length == 0 or len(der) != length:
            break
        found.append(der)
        pos += 3 + length
        if tls13:
            if pos + 2 > end:
                break
            pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    return tuple(found)


def _on_tls_message(conn: Any, direction: str, version: int, content_type: int, msg_type: int, data: bytes) -> None:
    """Keep the client's certificates as they are read (plaintext, TLS 1.2 and 1.3)."""
    if content_type != _TLS_HANDSHAKE or msg_type != _HS_CERTIFICATE or direction != "read":
        return
    slot = getattr(conn, "_gateway_slot", None)
    if slot is None or len(data) < 8:
        return
    try:
        slot.client_chain = _certificates(data[4:], version == ssl.TLSVersion.TLSv1_3)
    except IndexError:
        slot.client_chain = ()
    slot.client_der = slot.client_chain[0] if slot.client_chain else None


def _on_server_name(sslobj: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
    """Keep the client's SNI so the HTTP layer can compare it with ``Host``."""
    slot = getattr(sslobj, "_gateway_slot", None)
    if slot is not None:
        slot.server_name = server_name.lower() if server_name else None


def server_name_of(ssl_object: Any) -> str | None:
    """The SNI server name a connection's client sent (lower case), or None."""
    slot = getattr(ssl_object, "_gateway_slot", None)
    return slot.server_name if slot is not None else None


def load_client_cas(paths: Sequence[Path], policy: KeyPolicy | None = None) -> list[x509.Certificate]:
    """All CA certificates of the configured bundles, each held to the CA profile.

    The operator's own CAs: a malformed one (no SKI, non-critical
    basicConstraints, an AKI without keyIdentifier, a DSA or odd-sized RSA
    key, ...) is refused here, naming the file and the defect, so check-config,
    start-up and reload refuse it alike (:func:`gateway.certs.policy.ca_problems`).
    """
    certs: list[x509.Certificate] = []
    for path in paths:
        for cert in read_pem_certs(path):
            try:
                bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            except (x509.ExtensionNotFound, ValueError) as exc:
                raise PkiError(f"{path}: {cert.subject.rfc4514_string()} is not a CA certificate") from exc
            if not bc.ca:
                raise PkiError(f"{path}: {cert.subject.rfc4514_string()} is not a CA certificate")
            problems = ca_problems(cert, policy or KeyPolicy())
            if problems:
                raise PkiError(f"{path}: CA {cert.subject.rfc4514_string()!r}: {'; '.join(problems)}")
            certs.append(cert)
    return certs


def build_server_context(
    tls: TlsConfig,
    client_cas: Sequence[x509.Certificate],
    ticket_keys: bytes | None = None,
    *,
    session_cache: bool = False,
) -> ssl.SSLContext:
    """The server SSLContext: TLS 1.2+, client certificate requested and chain-verified.

    Resumption is either by session tickets or from the worker's session cache:

    * ``ticket_keys`` (80 bytes) makes every worker encrypt session tickets with
      the same keys, so a ticket issued by one worker resumes at another (the
      port is shared by SO_REUSEPORT, so the next connection may land anywhere).
    * ``session_cache`` turns tickets off: the session (client certificate
      included) stays in this process's memory, at most
      :data:`SESSION_CACHE_SIZE` of them, and the client gets only its id. A
      resumption is then a lookup, where a ticket costs a decryption and a
      decode of the whole session, certificate and public key included (about
      a quarter of a resumed connection's CPU). Only one process can find its own
      sessions, so this pays with one worker only (:func:`resumption_mode`).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    apply_profile(ctx, tls.profile)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    load_served_chain(ctx, tls.cert, tls.key)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in client_cas)
    ctx.load_verify_locations(cadata=pem.decode("ascii"))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
    ctx.sslobject_class = _TrackedSSLObject
    ctx.sni_callback = _on_server_name
    # The base setter takes raw integers; ssl.SSLContext's wrapper converts
    # every argument to an enum on every record, which costs ~100 µs a handshake.
    _ssl._SSLContext._msg_callback.__set__(ctx, _on_tls_message)  # type: ignore[attr-defined]
    # One TLS 1.3 ticket per full handshake, not OpenSSL's two: a resumption brings a fresh
    # one, and each costs an encryption of the session (client certificate included).
    ctx.num_tickets = 1
    lib, pointer = _openssl_ctx(ctx)
    if lib is not None and pointer is not None:
        ctx._gateway_ctx_pointer = pointer  # type: ignore[attr-defined]
        _purpose_any(lib, pointer)
        _no_auto_chain(lib, pointer)
        if tls.send_ca_names:
            set_client_ca_names(ctx, client_cas, lib, pointer)
        if session_cache:
            # Only a bounded cache: unbounded, OpenSSL would keep 20,480 sessions (~240 MiB). Without
            # ctypes this branch is skipped and the one worker keeps its own tickets instead.
            lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_SIZE, SESSION_CACHE_SIZE, None)
            ctx.options |= ssl.OP_NO_TICKET  # TLS 1.3 then sends the session's id as its "ticket"
        elif ticket_keys is not None:
            set_ticket_keys(lib, pointer, ticket_keys)
    return ctx


# Sessions one worker keeps for resumption (OpenSSL's default is 20,480). One costs ~12 KiB
# with its client certificate; the oldest go first, and an evicted client does one full handshake.
SESSION_CACHE_SIZE = 1_000
_SSL_CTRL_SET_SESS_CACHE_SIZE = 42  # SSL_CTX_sess_set_cache_size is this SSL_CTX_ctrl


def resumption_mode(setting: str, workers: int) -> str:
    """``tickets`` or ``cache`` for ``tls.session_resumption``; ``auto`` picks by worker count.

    A cached session is found only by the worker that made it, and SO_REUSEPORT
    sends a returning client to any worker: with several workers most lookups
    would miss, so they share ticket keys instead.
    """
    if setting != "auto":
        return setting
    return "cache" if workers == 1 else "tickets"


def apply_profile(ctx: ssl.SSLContext, profile: str) -> None:
    """Mozilla's "intermediate" (TLS 1.2 with ECDHE + AEAD suites, and 1.3) or "modern" (TLS 1.3 only)."""
    if profile == "modern":
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        return
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_TLS12_CIPHERS)


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def served_chain(certs: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """What the server sends: its certificate and the intermediates, never a self-signed root.

    A client must already hold the root to trust it, so sending it only costs
    bytes and makes scanners flag the chain. The first certificate (the server's
    own) is always kept, even if it is self-signed.
    """
    return [cert for i, cert in enumerate(certs) if i == 0 or not _self_signed(cert)]


def load_served_chain(ctx: ssl.SSLContext, cert_path: Path, key_path: Path) -> None:
    """``load_cert_chain`` with the self-signed root left out of ``tls.cert`` if the file has one.

    The stdlib loads a chain only from a file, so a file holding a root is
    rewritten without it into a private temporary file (certificates only,
    0600, removed at once); the key is always read from ``tls.key`` itself.
    """
    try:
        certs = read_pem_certs(cert_path)
    except (OSError, PkiError, ValueError):
        certs = []  # load_cert_chain below names the problem
    kept = served_chain(certs)
    try:
        if len(kept) == len(certs):
            ctx.load_cert_chain(cert_path, key_path)
            return
        fd, name = tempfile.mkstemp(prefix="gateway-chain-", suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in kept))
            ctx.load_cert_chain(name, key_path)
        finally:
            os.unlink(name)
    except (OSError, ssl.SSLError) as exc:
        raise PkiError(f"{cert_path}, {key_path}: cannot load server certificate and key: {exc}") from exc


TICKET_KEYS_BYTES = 80  # key name 16 + HMAC secret 32 + AES key 32 (OpenSSL 3)
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59


def set_ticket_keys(lib: ctypes.CDLL, pointer: int, keys: bytes) -> None:
    """``SSL_CTX_set_tlsext_ticket_keys``: the session-ticket keys shared by all workers."""
    if len(keys) != TICKET_KEYS_BYTES:
        raise ValueError(f"ticket keys must be {TICKET_KEYS_BYTES} bytes")
    buffer = ctypes.create_string_buffer(keys, len(keys))
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, len(keys), buffer) != 1:
        log.warning("tls: OpenSSL refused the shared session-ticket keys; each worker keeps its own")


def _load_lib() -> ctypes.CDLL | None:
    """libssl as ``_ssl`` loaded it, once, with the prototypes of the calls made through it."""
    try:
        lib = ctypes.CDLL(_ssl.__file__)
        lib.SSL_get_SSL_CTX.restype = ctypes.c_void_p
        lib.SSL_get_SSL_CTX.argtypes = [ctypes.c_void_p]
        lib.SSL_set_msg_callback.restype = None
        lib.SSL_set_msg_callback.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    except (OSError, AttributeError) as exc:
        log.warning("tls: cannot reach OpenSSL through ctypes: %s", exc)
        return None
    return lib


_LIB = _load_lib()


def _openssl_ctx(ctx: ssl.SSLContext) -> tuple[ctypes.CDLL | None, int | None]:
    """libssl (as loaded by ``_ssl``) and the context's ``SSL_CTX*``, or (None, None)."""
    if _LIB is None:
        return None, None
    try:
        pointer = _ssl_ctx_pointer(ctx, _LIB)
    except AttributeError as exc:
        log.warning("tls: cannot reach OpenSSL through ctypes: %s", exc)
        return None, None
    if pointer is None:
        log.warning("tls: unexpected SSLContext layout; CA names not sent, EKU checked by OpenSSL")
        return None, None
    return _LIB, pointer


_SSL_CTRL_MODE = 33
_SSL_MODE_NO_AUTO_CHAIN = 0x8


def _no_auto_chain(lib: ctypes.CDLL, pointer: int) -> None:
    """Send exactly the chain :func:`load_served_chain` loaded.

    With no intermediate in ``tls.cert`` OpenSSL builds the server's chain
    itself from the verify store, and that store holds the client CAs: with
    the same CA issuing the server and the client certificates, the self-signed
    root went out with every handshake. ``SSL_MODE_NO_AUTO_CHAIN`` stops that.
    """
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_MODE, _SSL_MODE_NO_AUTO_CHAIN, None)


def _purpose_any(lib: ctypes.CDLL, pointer: int) -> None:
    """Let certificates with the wrong key usage finish the handshake.

    OpenSSL checks the "SSL client" purpose (EKU clientAuth, keyUsage) during
    the handshake and answers with an alert, which a browser shows as a
    connection error. With the purpose set to "any", chain and signatures are
    still verified and :func:`gateway.certs.policy.check_usage` refuses the
    certificate with the ``wrong_key_usage`` page instead. If this call is
    unavailable OpenSSL keeps its stricter check: still fail closed.
    """
    lib.SSL_CTX_get0_param.restype = ctypes.c_void_p
    lib.SSL_CTX_get0_param.argtypes = [ctypes.c_void_p]
    lib.X509_VERIFY_PARAM_set_purpose.argtypes = [ctypes.c_void_p, ctypes.c_int]
    param = lib.SSL_CTX_get0_param(pointer)
    if param:
        lib.X509_VERIFY_PARAM_set_purpose(param, 7)  # X509_PURPOSE_ANY


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib: ctypes.CDLL) -> int | None:
    """The ``SSL_CTX*`` inside a CPython SSLContext, or None if the layout is unexpected."""
    pointer = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not pointer:
        return None
    lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    # Probe with a verify mode that differs from the default to be sure.
    saved = ctx.verify_mode
    ctx.verify_mode = ssl.CERT_REQUIRED
    ok = lib.SSL_CTX_get_verify_mode(pointer) == 3  # SSL_VERIFY_PEER | FAIL_IF_NO_PEER_CERT
    ctx.verify_mode = saved
    expected = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}[saved]
    return pointer if ok and lib.SSL_CTX_get_verify_mode(pointer) == expected else None


def set_client_ca_names(ctx: ssl.SSLContext, cas: Sequence[x509.Certificate], lib: ctypes.CDLL, pointer: int) -> None:
    """Name the trusted CAs in the CertificateRequest (nginx's ssl_client_certificate does)."""
    lib.OPENSSL_sk_new_null.restype = ctypes.c_void_p
    lib.OPENSSL_sk_push.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.d2i_X509_NAME.restype = ctypes.c_void_p
    lib.d2i_X509_NAME.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]
    lib.SSL_CTX_set_client_CA_list.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    stack = lib.OPENSSL_sk_new_null()
    for cert in cas:
        der = cert.subject.public_bytes()
        buf = ctypes.c_char_p(der)
        name = lib.d2i_X509_NAME(None, ctypes.byref(buf), len(der))
        if name:
            lib.OPENSSL_sk_push(stack, name)
    lib.SSL_CTX_set_client_CA_list(pointer, stack)  # takes ownership of the stack


def _ssl_pointer(sslobj: ssl.SSLObject) -> int | None:
    """The ``SSL*`` of an SSLObject if it provably belongs to our context, else None.

    CPython's ``PySSLSocket`` (3.11-3.13) starts with PyObject_HEAD, a weakref to
    the socket, then the ``SSL*``. The pointer is used only if OpenSSL confirms
    that it belongs to the ``SSL_CTX`` found (and checked) when the context was built.
    """
    ctx_pointer = getattr(sslobj.context, "_gateway_ctx_pointer", None)
    inner = getattr(sslobj, "_sslobj", None)
    if (
        _LIB is None
        or ctx_pointer is None
        or type(inner) is not getattr(_ssl, "_SSLSocket", None)
        or not (3, 11) <= sys.version_info[:2] <= (3, 13)
    ):
        return None
    pointer = ctypes.c_void_p.from_address(id(inner) + object.__basicsize__ + ctypes.sizeof(ctypes.c_void_p)).value
    if not pointer or _LIB.SSL_get_SSL_CTX(pointer) != ctx_pointer:
        return None
    return pointer


def stop_message_callback(sslobj: ssl.SSLObject) -> bool:
    """No more message callbacks on this connection (the handshake is over); False if not possible."""
    pointer = _ssl_pointer(sslobj)
    if pointer is None or _LIB is None:
        return False
    _LIB.SSL_set_msg_callback(pointer, None)
    return True


@dataclass(frozen=True, slots=True)
class HandshakeFailure:
    """A handshake that did not complete, for the audit trail."""

    peer: tuple[str, int] | None
    reason: str  # OpenSSL's reason, e.g. TLSV1_ALERT_UNKNOWN_CA or CERTIFICATE_VERIFY_FAILED
    message: str
    client_der: bytes | None = field(default=None, repr=False)


def describe_ssl_error(exc: BaseException) -> tuple[str, str]:
    """(reason code, human message) for a handshake exception, from OpenSSL's words."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate_verify_failed", exc.verify_message or str(exc)
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "ssl_error").lower()
        return reason, str(exc)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError | ConnectionAbortedError):
        return "handshake_timeout", "TLS handshake did not complete in time"
    if isinstance(exc, ConnectionError):
        return "connection_lost", "client closed the connection during the handshake"
    return type(exc).__name__.lower(), str(exc)


ProtocolFactory = Callable[[], asyncio.Protocol]
FailureHook = Callable[[HandshakeFailure], None]


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The SSL protocol ``loop.start_tls`` would use: uvloop's own, or asyncio's."""
    module = type(loop).__module__
    if module.startswith("uvloop"):
        import uvloop.loop

        return uvloop.loop.SSLProtocol  # type: ignore[attr-defined]
    import asyncio.sslproto

    return asyncio.sslproto.SSLProtocol


class TlsAcceptor(asyncio.Protocol):
    """Accepts TCP, runs the TLS handshake, then hands the stream to the HTTP protocol.

    On failure the hook gets the peer address, OpenSSL's reason and the
    client's certificate when one was sent; nothing reaches the HTTP layer.
    ``context_getter`` is read per connection so a reload can swap the
    certificate for new handshakes without touching open connections.

    The SSL protocol is installed *synchronously* in ``connection_made``
    (what ``loop.start_tls`` does inside, minus its await): uvloop starts
    reading a new connection right after ``connection_made`` returns, so a
    ``pause_reading`` there does not hold, and a ClientHello arriving before
    a ``start_tls`` task ran would be lost and the handshake would hang until
    its timeout (seen as ~1 in 2 connections under ``gateway serve``).
    """

    def __init__(
        self,
        context_getter: Callable[[], ssl.SSLContext],
        app_factory: ProtocolFactory,
        on_failure: FailureHook,
        handshake_timeout: float,
        on_settled: Callable[[], None] | None = None,
    ) -> None:
        self._context_getter = context_getter
        self._app_factory = app_factory
        self._on_failure = on_failure
        self._on_settled = on_settled
        self._timeout = handshake_timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        tcp = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        slot = HandshakeSlot()
        waiter: asyncio.Future[None] = loop.create_future()
        app = self._app_factory()
        # Read by _TrackedSSLObject when the protocol wraps its BIOs: asyncio's SSLProtocol
        # does that in its constructor, uvloop's only in connection_made, so the slot must
        # stay current across both (else, under uvloop, no SNI and no refused certificate).
        token = _current_slot.set(slot)
        try:
            tls = _ssl_protocol_class(loop)(
                loop,
                app,
                self._context_getter(),
                waiter,
                server_side=True,
                call_connection_made=False,
                ssl_handshake_timeout=self._timeout,
            )
            tcp.set_protocol(tls)
            tls.connection_made(tcp)
        finally:
            _current_slot.reset(token)
        if slot.sslobj is None:
            # Fail closed: without the slot the Host-vs-SNI check and the handshake audit
            # would silently see nothing. Refuse the connection rather than serve it blind.
            log.error("tls: the SSL protocol created no tracked SSLObject; connection refused")
            tcp.abort()
            return
        peer = tcp.get_extra_info("peername")
        # A callback, not a task awaiting the waiter: one task and coroutine less per connection.
        waiter.add_done_callback(lambda done: self._handshake_done(done, tcp, tls, app, slot, peer))

    def _handshake_done(
        self,
        waiter: asyncio.Future[None],
        transport: asyncio.Transport,
        tls: Any,
        app: asyncio.Protocol,
        slot: HandshakeSlot,
        peer: Any,
    ) -> None:
        if self._on_settled is not None:
            self._on_settled()
        if waiter.cancelled():
            transport.abort()
            return
        exc = waiter.exception()
        if exc is not None:
            transport.abort()
            if not isinstance(exc, TimeoutError | OSError | ConnectionError):
                raise exc  # not a handshake failure: a bug, for the loop's exception handler
            reason, message = describe_ssl_error(exc)
            self._on_failure(HandshakeFailure(peer_address(peer), reason, message, slot.client_der))
            return
        if transport.is_closing():  # the peer went away as the handshake ended
            transport.abort()
            return
        metrics.HANDSHAKES.inc()
        if slot.sslobj is not None:
            stop_message_callback(slot.sslobj)
        app.connection_made(tls._get_app_transport())

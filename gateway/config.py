"""One typed configuration, read from YAML, validated as a whole.

The schema is declared once: every section is a frozen dataclass whose
fields say, through :func:`setting`, :func:`section` and :func:`sections`,
their YAML key, default and :class:`Check` (conversion plus the words used
when a value is wrong). One generic walker (:func:`_build`) reads any
section, so adding a key is one line and, where needed, its check.
Cross-field rules (a passthrough login needs a path, routes are unique) are
small ``validate`` functions beside the section they judge.

Validation collects *all* problems, each one line naming the file, the key
path and what was expected, and raises them together in a
:class:`ConfigError`. Relative paths resolve against the config file's
folder. The gateway, the portal and the CLI all read the same file;
:func:`require_gateway` and :func:`require_portal` say which sections a
command needs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import parse_qsl, urlsplit

import yaml

from gateway.certs.builders import KEY_TYPES, SSO_CA_NAME, KeyType
from gateway.errors import ConfigError

T = TypeVar("T")
LoginMode = Literal["gateway", "passthrough"]
# Mozilla's server-side TLS profiles: "intermediate" (TLS 1.2 AEAD + 1.3) or "modern" (TLS 1.3 only).
TlsProfile = Literal["intermediate", "modern"]
SessionResumption = Literal["auto", "tickets", "cache"]
# Client and CA key types the certificate profile accepts (tls.key_types).
KEY_TYPE_NAMES = ("ec-p256", "ec-p384", "ec-p521", "rsa")
DEFAULT_KEY_TYPES: tuple[str, ...] = ("ec-p256", "ec-p384", "rsa")
SYSTEMS = ("tdnet", "j-iriss", "clearing")


# --- checks: a conversion and the words for "what was expected" -----------------------------


class Expected(ValueError):
    """Raised by a check whose expectation depends on the value (it names the right one)."""

    def __init__(self, expected: str) -> None:
        super().__init__("")
        self.expected = expected


@dataclass(frozen=True)
class Check(Generic[T]):
    """Turns a raw YAML value into a typed one, or raises ValueError/TypeError.

    ``base`` is the config file's folder (for relative paths); ``zero`` stands
    in for a required value that is missing or wrong, so the rest of the file
    can still be checked (the file is refused anyway).
    """

    convert: Callable[[Any, Path], T]
    expected: str
    zero: Any = None
    # How a wrong value is echoed in the error (a URL's password must not be).
    shown: Callable[[Any], str] = repr


def _plain(convert: Callable[[Any], T]) -> Callable[[Any, Path], T]:
    return lambda raw, _base: convert(raw)


def _kind(value: Any) -> str:
    return type(value).__name__


def _string(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
        raise ValueError("")
    return raw


def _port(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 65535:
        raise ValueError("")
    return raw


def _positive_number(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw <= 0:
        raise ValueError("")
    return float(raw)


def _non_negative(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < 0:
        raise ValueError("")
    return float(raw)


def _positive_int(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw <= 0:
        raise ValueError("")
    return raw


def _boolean(raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise ValueError("")
    return raw


def _http_url(raw: Any) -> str:
    text = _string(raw)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("")
    return text.rstrip("/")


def _path(raw: Any, base: Path) -> Path:
    return (base / os.path.expanduser(_string(raw))).resolve()


def _prefix(raw: Any) -> str:
    text = _string(raw)
    if not text.startswith("/") or not text.endswith("/") or "//" in text or ".." in text:
        raise ValueError("must start and end with '/'")
    return text


def _one_of(*choices: str) -> Callable[[Any], Any]:
    def convert(raw: Any) -> Any:
        if raw not in choices:
            raise ValueError("")
        return raw

    return convert


def _workers(raw: Any) -> int:
    return os.cpu_count() or 1 if raw == "auto" else _positive_int(raw)


def _jsonl(raw: Any, base: Path) -> str:
    return "-" if raw == "-" else str(_path(raw, base))


def _crl_source(raw: Any, base: Path) -> str:
    """A CRL file (resolved) or an http(s) URL; the words differ for each."""
    if isinstance(raw, str) and raw.startswith(("http://", "https://")):
        try:
            return _http_url(raw)
        except ValueError as exc:
            raise Expected("an http(s) URL") from exc
    return str(_path(raw, base))


def _chain_depth(raw: Any) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or not 2 <= raw <= 10:
        raise ValueError("")
    return raw


def _key_types(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw or any(item not in KEY_TYPE_NAMES for item in raw):
        raise ValueError("")
    return tuple(raw)


def _rsa_bits(raw: Any) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 2048 or raw % 8:
        raise ValueError("")
    return raw


PATH_TO_PEM = Check(_path, "a path to a PEM file", Path())
SECONDS = Check(_plain(_positive_number), "a positive number of seconds")
MINUTES = Check(_plain(_positive_number), "a positive number of minutes")
HOURS = Check(_plain(_positive_number), "a positive number of hours")
POSITIVE_INT = Check(_plain(_positive_int), "a positive integer")
BYTE_COUNT = Check(_plain(_positive_int), "a positive byte count")
SQLITE_FILE = Check(_path, "a SQLite file path")
HTTP_URL = Check(_plain(_http_url), "an http(s) URL", "")
INSTANCE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)


def _postgres_url(raw: Any) -> str:
    """A libpq URL (postgresql://USER@HOST:PORT/DB?...); a password only in the user part, redacted on display."""
    text = _string(raw)
    parts = urlsplit(text)
    if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
        raise ValueError("")
    if any(key == "password" for key, _ in parse_qsl(parts.query)):
        raise Expected("a URL without ?password= (it would show wherever the URL is named): use password_file")
    return text


def _redacted_url(raw: Any) -> str:
    """``repr`` of a wrong database URL without its secrets (user-part password, ?password=)."""
    if not isinstance(raw, str):
        return repr(raw)
    text = re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", raw)
    return repr(re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", text))


def _instance(raw: Any) -> str:
    text = _string(raw)
    if not INSTANCE_NAME.fullmatch(text):
        raise ValueError("1-64 of A-Z a-z 0-9 . _ -")
    return text


def _default_instance() -> str:
    """The host name's first label: what an operator calls the machine in alerts."""
    name = socket.gethostname().split(".")[0]
    return name if INSTANCE_NAME.fullmatch(name or "") else "gateway"


def _pool_size(raw: Any) -> int | None:
    return None if raw == "auto" else _positive_int(raw)


# --- declaring fields -----------------------------------------------------------------------


def setting(default: Any = dataclasses.MISSING, check: Check[Any] | None = None, *, key: str = "", **meta: Any) -> Any:
    """A scalar key. No default means required; ``key`` is the YAML name when it differs.

    ``default_path`` (a file name) defaults to that file beside the config;
    ``many`` accepts one value or a list (a tuple either way), with
    ``missing`` as the words when there is none.
    """
    if "default_path" in meta:
        default = Path(meta["default_path"])  # resolved against the config's folder when read
    return field(default=default, metadata={"check": check, "key": key, **meta})


def section(cls: type[Any], *, optional: bool = False, key: str = "", **defaults: Any) -> Any:
    """A nested mapping read as ``cls``; absent: None if optional, else all defaults."""
    metadata = {"section": cls, "optional": optional, "key": key, "defaults": defaults}
    if optional:
        return field(default=None, metadata=metadata)
    return field(default_factory=lambda: cls(**defaults), metadata=metadata)


def sections(cls: type[Any], validate: Callable[[Sequence[tuple[str, Any]]], Iterator[tuple[str, str]]]) -> Any:
    """A non-empty list of mappings, each read as ``cls``, then judged together by ``validate``."""
    return field(default=(), metadata={"sections": cls, "validate": validate, "key": ""})


# --- the schema -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Listen:
    host: str = setting("127.0.0.1", Check(_plain(_string), "a host name or address"))
    port: int = setting(0, Check(_plain(_port), "a port number 0-65535"))


@dataclass(frozen=True)
class AdminListen(Listen):
    """The plain-HTTP admin listener. ``/audit`` (personal data, no login) only when enabled."""

    audit_report: bool = setting(False, Check(_plain(_boolean), "true or false"))


@dataclass(frozen=True)
class TlsConfig:
    cert: Path = setting(check=PATH_TO_PEM)
    key: Path = setting(check=PATH_TO_PEM)
    client_ca: tuple[Path, ...] = setting(check=PATH_TO_PEM, many=True, missing="a PEM bundle path (or a list of them)")
    issuer: str = setting(SSO_CA_NAME, Check(_plain(_string), "the issuing CA's CN"))
    handshake_timeout: float = setting(10.0, SECONDS, key="handshake_timeout_seconds")
    send_ca_names: bool = setting(True, Check(_plain(_boolean), "true or false"))
    profile: TlsProfile = setting(
        "intermediate", Check(_plain(_one_of("intermediate", "modern")), "intermediate or modern")
    )
    # None: the longest configured CA path plus the leaf.
    max_chain_depth: int | None = setting(None, Check(_plain(_chain_depth), "an integer from 2 to 10"))
    key_types: tuple[str, ...] = setting(
        DEFAULT_KEY_TYPES, Check(_plain(_key_types), f"a list from {', '.join(KEY_TYPE_NAMES)}")
    )
    rsa_min_bits: int = setting(2048, Check(_plain(_rsa_bits), "2048 or more, a multiple of 8"))
    # How a returning client skips the full handshake: "cache" keeps sessions in the worker's
    # memory, "tickets" hands them to the client encrypted with keys all workers share;
    # "auto" is the cache with one worker and tickets with several (see resumption_mode).
    session_resumption: SessionResumption = setting(
        "auto", Check(_plain(_one_of("auto", "tickets", "cache")), "auto, tickets or cache")
    )


@dataclass(frozen=True)
class RevocationConfig:
    sources: tuple[str, ...] = setting(
        check=Check(_crl_source, "a CRL file path or http(s) URL"),
        key="crl",
        many=True,
        missing="a CRL file path or http(s) URL",
    )
    refresh_seconds: float = setting(60.0, SECONDS)
    grace_seconds: float = setting(3600.0, Check(_plain(_non_negative), "a positive number of seconds"))
    # /healthz says "degraded" (and the log warns hourly) this close to nextUpdate; 0 turns it off
    warn_before_next_update: float = setting(
        21600.0, Check(_plain(_non_negative), "a number of seconds (0: off)"), key="warn_before_next_update_seconds"
    )
    fetch_timeout: float = setting(10.0, SECONDS, key="fetch_timeout_seconds")
    max_bytes: int = setting(512 * 1024 * 1024, BYTE_COUNT)


def _passthrough_needs_path(login: BackendLogin) -> Iterator[tuple[str, str]]:
    if login.mode == "passthrough" and not login.path:
        yield "path", "missing; passthrough mode needs the backend's login path"


@dataclass(frozen=True)
class BackendLogin:
    mode: LoginMode = setting("gateway", Check(_plain(_one_of("gateway", "passthrough")), "'gateway' or 'passthrough'"))
    path: str | None = setting(None, Check(_plain(_string), "a URL path like /onre/login"))
    user_field: str = setting("userId", Check(_plain(_string), "a form field name"))

    validate = _passthrough_needs_path


def _system_named(backend: Backend) -> Iterator[tuple[str, str]]:
    if backend.system is None and backend.name and backend.name not in SYSTEMS:  # no name: already reported
        yield (
            "system",
            f"missing; backend {backend.name!r} is not one of {', '.join(SYSTEMS)}, so name the system it belongs to",
        )


@dataclass(frozen=True)
class Backend:
    name: str = setting(check=Check(_plain(_string), "a backend name", ""))
    prefix: str = setting(check=Check(_plain(_prefix), "a path prefix like /onre/", "/"))
    upstream: str = setting(check=HTTP_URL)
    host: str | None = setting(None, Check(_plain(lambda raw: _string(raw).lower()), "a host name"))
    system: str | None = setting(None, Check(_plain(_one_of(*SYSTEMS)), f"one of {', '.join(SYSTEMS)}"))
    timeout: float = setting(60.0, SECONDS, key="timeout_seconds")
    connect_timeout: float = setting(5.0, SECONDS, key="connect_timeout_seconds")
    max_body_bytes: int = setting(2 * 1024**3, BYTE_COUNT)
    login: BackendLogin = section(BackendLogin)

    validate = _system_named

    @property
    def system_name(self) -> str:
        """The user-store system this backend belongs to (its name unless ``system`` says)."""
        return self.system or self.name


def _unique_routes(backends: Sequence[tuple[str, Backend]]) -> Iterator[tuple[str, str]]:
    """Backend names are unique, and so is each (host, prefix) route."""
    names: set[str] = set()
    routes: set[tuple[str | None, str]] = set()
    for where, backend in backends:
        if backend.name and backend.name in names:
            yield f"{where}.name", f"duplicate backend name {backend.name!r}"
        if (backend.host, backend.prefix) in routes:
            yield f"{where}.prefix", f"duplicate route {backend.host or '*'}{backend.prefix}"
        names.add(backend.name)
        routes.add((backend.host, backend.prefix))


@dataclass(frozen=True)
class Limits:
    max_connections: int = setting(10_000, POSITIVE_INT)
    header_timeout: float = setting(15.0, SECONDS, key="header_timeout_seconds")
    body_timeout: float = setting(30.0, SECONDS, key="body_timeout_seconds")  # longest silence within a body
    drain_timeout: float = setting(30.0, SECONDS, key="drain_timeout_seconds")  # SIGTERM: in-flight requests' time
    keepalive_timeout: float = setting(75.0, SECONDS, key="keepalive_timeout_seconds")
    max_header_bytes: int = setting(16_384, POSITIVE_INT)
    max_line_bytes: int = setting(8_190, POSITIVE_INT)


# Connections one instance (all its workers) may hold with ``pool_size: auto``; three
# gateway instances and the portal then stay under PostgreSQL's default
# max_connections (100, 3 of them reserved for superusers).
INSTANCE_CONNECTION_BUDGET = 24
# Connections a gateway worker holds besides its pool: the audit writer's one and two
# listening ones (session changes, pushed revocations).
WORKER_EXTRA_CONNECTIONS = 3


@dataclass(frozen=True)
class DatabaseConfig:
    """Shared state in PostgreSQL (users, sessions, login failures, audit, CA records).

    Written either as a URL string (shorthand for ``{url: ...}``) or as a
    mapping. Absent: every store stays a SQLite file (the embedded default).
    """

    url: str = setting(
        check=Check(_plain(_postgres_url), "a postgresql:// URL with a database name", "", shown=_redacted_url)
    )
    # The password, kept out of the YAML (and out of every log line): the file's first line.
    password_file: Path | None = setting(None, Check(_path, "a file path"))
    # Connections per worker process; "auto" shares INSTANCE_CONNECTION_BUDGET among the workers.
    pool_size: int | None = setting(None, Check(_plain(_pool_size), "a positive integer or 'auto'"))
    # How long sessions already in memory keep being served while PostgreSQL is unreachable.
    outage_grace: float = setting(30.0, Check(_plain(_non_negative), "a number of seconds"), key="outage_grace_seconds")
    # How long a request waits for a pooled connection before it is refused (service_unavailable).
    connect_timeout: float = setting(5.0, SECONDS, key="connect_timeout_seconds")

    def pool_for(self, workers: int) -> int:
        """Connections per worker: the setting, or the instance budget shared among the workers.

        Each worker also holds WORKER_EXTRA_CONNECTIONS outside the pool, so with
        ``auto`` an instance of up to 6 workers holds at most the budget.
        """
        if self.pool_size is not None:
            return self.pool_size
        return max(1, INSTANCE_CONNECTION_BUDGET // max(1, workers) - WORKER_EXTRA_CONNECTIONS)


@dataclass(frozen=True)
class UsersConfig:
    database: Path = setting(check=SQLITE_FILE, default_path="gateway.db")


@dataclass(frozen=True)
class SessionConfig:
    secret_file: Path = setting(check=Check(_path, "a file path"), default_path="session.key")
    idle_minutes: float = setting(30.0, MINUTES)
    absolute_hours: float = setting(10.0, HOURS)


@dataclass(frozen=True)
class LoginConfig:
    max_failures: int = setting(5, POSITIVE_INT)
    failure_window_minutes: float = setting(15.0, MINUTES)
    lockout_minutes: float = setting(30.0, MINUTES)
    ip_max_failures: int = setting(50, POSITIVE_INT)
    password_min_length: int = setting(12, POSITIVE_INT)
    expiry_notice_days: int = setting(30, Check(_plain(_positive_int), "a positive number of days"))


@dataclass(frozen=True)
class AuditConfig:
    database: Path = setting(check=SQLITE_FILE, default_path="audit.db")
    jsonl: str | None = setting(None, Check(_jsonl, "a file path or '-' for stdout"))  # a file, or "-" for stdout
    queue_size: int = setting(10_000, POSITIVE_INT)
    # With a database: where events wait (one file per worker) while PostgreSQL is unreachable.
    spool_dir: Path = setting(check=Check(_path, "a directory path"), default_path="audit-spool")
    spool_max_bytes: int = setting(64 * 1024 * 1024, BYTE_COUNT)
    # Ed25519 key (0600) signing the chain's checkpoints and prune anchors; created on first use.
    signing_key: Path = setting(check=Check(_path, "a file path"), default_path="audit-signing.key")
    checkpoint_interval_seconds: float = setting(3600.0, SECONDS)


@dataclass(frozen=True)
class CaConfig:
    dir: Path = setting(check=Check(_path, "a directory path", Path()))
    crl_next_update_hours: float = setting(24.0, HOURS)
    crl_url: str | None = setting(None, HTTP_URL)
    key_type: KeyType = setting("ec-p256", Check(_plain(_one_of(*KEY_TYPES)), f"one of {', '.join(KEY_TYPES)}"))
    crl_drop_expired_after_days: float = setting(90.0, Check(_plain(_non_negative), "a number of days"))


@dataclass(frozen=True)
class PortalTls:
    cert: Path = setting(check=PATH_TO_PEM)
    key: Path = setting(check=PATH_TO_PEM)


@dataclass(frozen=True)
class PortalConfig:
    listen: Listen = section(Listen, port=8444)
    tls: PortalTls = section(PortalTls)
    admin: Listen | None = section(Listen, optional=True, port=9101)  # /healthz, /metrics: plain HTTP, loopback
    # Where users reach the issuance service; the gateway's no-certificate page links to it.
    public_url: str | None = setting(None, HTTP_URL)


@dataclass(frozen=True)
class SupportConfig:
    """Who a refused user calls: shown on every refusal page of the gateway and the portal."""

    name: str | None = setting(None, Check(_plain(_string), "the support desk's name"))
    phone: str | None = setting(None, Check(_plain(_string), "a phone number"))
    email: str | None = setting(None, Check(_plain(_string), "an e-mail address"))
    hours: str | None = setting(None, Check(_plain(_string), "opening hours, e.g. 平日 9:00-17:00"))


# Browsers ask every site for this; the gateway answers it itself, whatever backend sits at ``/``.
FAVICON_PATH = "/favicon.ico"
DEFAULT_GATEWAY_PREFIX = "/_gateway/"


def _gateway_prefix(raw: Any) -> str:
    text = _prefix(raw)
    if text == "/":
        raise ValueError("'/' would leave no path to the backends")
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+/", text) or any(seg in (".", "..") for seg in text.split("/")):
        raise ValueError("only letters, digits and . _ ~ - between the slashes, no dot segments")
    return text


@dataclass(frozen=True)
class GatewayPaths:
    """The gateway's own pages, all under one reserved prefix (``gateway_paths.prefix``).

    One prefix rather than fixed paths like ``/login``, so a system mounted
    at ``/`` keeps every path but this one namespace (and ``/favicon.ico``),
    and no backend's own ``/login`` is shadowed.
    """

    prefix: str = setting(DEFAULT_GATEWAY_PREFIX, Check(_plain(_gateway_prefix), "a path prefix like /_gateway/"))

    @property
    def landing(self) -> str:
        return self.prefix

    @property
    def login(self) -> str:
        return self.prefix + "login"

    @property
    def logout(self) -> str:
        return self.prefix + "logout"

    @property
    def password(self) -> str:
        return self.prefix + "password"

    @property
    def notice(self) -> str:
        return self.prefix + "notice"

    def owns(self, path: str) -> bool:
        """Is ``path`` in the reserved namespace (the prefix, with or without its final slash)?"""
        return path.startswith(self.prefix) or path == self.prefix[:-1]

    def reserved(self, path: str) -> bool:
        """Does the gateway answer ``path`` itself (so no backend ever sees it)?"""
        return self.owns(path) or path == FAVICON_PATH


def _reserved_paths_unused(config: Config) -> Iterator[tuple[str, str]]:
    """A backend prefix or passthrough login path the gateway answers itself could never be reached: refuse it."""
    paths = config.gateway_paths
    for i, backend in enumerate(config.backends):
        for key, value in (("prefix", backend.prefix), ("login.path", backend.login.path)):
            if value and (paths.reserved(value) or paths.reserved(value.rstrip("/"))):
                yield (
                    f"backends[{i}].{key}",
                    f"{value!r} lies under the gateway's own paths ({paths.prefix}, {FAVICON_PATH}): "
                    "no request would reach the backend; use another path or change gateway_paths.prefix",
                )


@dataclass(frozen=True)
class Config:
    """The whole file. Sections a command does not need may be absent (None)."""

    path: Path = field(metadata={"internal": True})
    # Names this process on every audit event and metric; default: the host name.
    instance: str = setting(None, Check(_plain(_instance), "an instance name"))
    database: DatabaseConfig | None = section(DatabaseConfig, optional=True, shorthand="url")
    listen: Listen = section(Listen, port=8443)
    workers: int = setting(1, Check(_plain(_workers), "a positive integer or 'auto'"))
    admin: AdminListen | None = section(AdminListen, optional=True, port=9100)
    tls: TlsConfig | None = section(TlsConfig, optional=True)
    revocation: RevocationConfig | None = section(RevocationConfig, optional=True)
    backends: tuple[Backend, ...] = sections(Backend, _unique_routes)
    limits: Limits = section(Limits)
    users: UsersConfig = section(UsersConfig)
    session: SessionConfig = section(SessionConfig)
    login: LoginConfig = section(LoginConfig)
    audit: AuditConfig = section(AuditConfig)
    ca: CaConfig | None = section(CaConfig, optional=True)
    portal: PortalConfig | None = section(PortalConfig, optional=True)
    support: SupportConfig = section(SupportConfig)
    gateway_paths: GatewayPaths = section(GatewayPaths)
    log_level: str = setting(
        "info", Check(_plain(_one_of("debug", "info", "warning", "error")), "debug, info, warning or error")
    )

    validate = _reserved_paths_unused


# --- reading: one walker for every section ---------------------------------------------------


class _Reader:
    """Walks the YAML tree, converting values and collecting problems."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.base = file.parent
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.file}: {key}: {message}")

    def mapping(self, value: Any, path: str) -> Mapping[str, Any] | None:
        """``value`` if it is a mapping; None (and a problem unless it is absent) otherwise."""
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.problem(path, f"expected a mapping, got {_kind(value)}")
            return None
        return value

    def convert(self, raw: Any, path: str, check: Check[Any]) -> tuple[bool, Any]:
        """(ok, value) for one present value."""
        try:
            return True, check.convert(raw, self.base)
        except Expected as exc:
            self.problem(path, f"expected {exc.expected}, got {check.shown(raw)}")
        except (TypeError, ValueError) as exc:
            why = f" ({exc})" if str(exc) else ""
            self.problem(path, f"expected {check.expected}, got {check.shown(raw)}{why}")
        return False, None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _key(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("key") or f.name)


def _build(
    r: _Reader, cls: type[T], data: Mapping[str, Any], where: str, defaults: Mapping[str, Any], **internal: Any
) -> T:
    """Read one section: every declared key, unknown keys refused, then its own ``validate``.

    ``internal`` fills fields that do not come from the file (the Config's own path).
    """
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]  # type: ignore[arg-type]
    known = {_key(f) for f in fields}
    for key in data:
        if key not in known:
            r.problem(_join(where, str(key)), f"unknown key (expected one of: {', '.join(sorted(known))})")
    values = {f.name: _field(r, f, data.get(_key(f)), _join(where, _key(f)), defaults) for f in fields}
    result = cls(**values, **internal)
    validate = getattr(cls, "validate", None)
    for key, message in validate(result) if validate is not None else ():
        r.problem(_join(where, key), message)
    return result


def _field(r: _Reader, f: dataclasses.Field[Any], raw: Any, path: str, defaults: Mapping[str, Any]) -> Any:
    meta = f.metadata
    if "section" in meta:
        return _section(r, meta, raw, path)
    if "sections" in meta:
        return _sections(r, meta, raw, path)
    if meta.get("many"):
        return _many(r, meta, raw, path)
    check: Check[Any] = meta["check"]
    default = _default(r, f, defaults)
    if raw is None:
        if default is dataclasses.MISSING:
            r.problem(path, f"missing; expected {check.expected}")
            return check.zero
        return default
    ok, value = r.convert(raw, path, check)
    if ok:
        return value
    return check.zero if default is dataclasses.MISSING else default


def _default(r: _Reader, f: dataclasses.Field[Any], defaults: Mapping[str, Any]) -> Any:
    if f.name in defaults:
        return defaults[f.name]
    if "default_path" in f.metadata:
        return (r.base / f.metadata["default_path"]).resolve()
    return f.default


def _section(r: _Reader, meta: Mapping[str, Any], raw: Any, path: str) -> Any:
    shorthand = meta["defaults"].get("shorthand")
    if shorthand and isinstance(raw, str):
        raw = {shorthand: raw}  # `database: URL` means `database: {url: URL}`
    data = r.mapping(raw, path)
    if data is None and meta["optional"]:
        return None
    defaults = {k: v for k, v in meta["defaults"].items() if k != "shorthand"}
    return _build(r, meta["section"], data or {}, path, defaults)


def _sections(r: _Reader, meta: Mapping[str, Any], raw: Any, path: str) -> tuple[Any, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        r.problem(path, f"expected a non-empty list of {path}, got {_kind(raw)}")
        return ()
    built: list[tuple[str, Any]] = []
    for i, item in enumerate(raw):
        where = f"{path}[{i}]"
        data = r.mapping(item, where)
        if data is not None:
            built.append((where, _build(r, meta["sections"], data, where, {})))
        elif item is None:
            r.problem(where, "expected a mapping, got NoneType")
    for key, message in meta["validate"](built):
        r.problem(key, message)
    return tuple(item for _, item in built)


def _many(r: _Reader, meta: Mapping[str, Any], raw: Any, path: str) -> tuple[Any, ...]:
    """One value or a list of them; each item is named ``key[i]`` when a list was given."""
    check: Check[Any] = meta["check"]
    items = raw if isinstance(raw, list) else [] if raw is None or raw == "" else [raw]
    if not items:
        r.problem(path, f"missing; expected {meta['missing']}")
        return ()
    values = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if isinstance(raw, list) else path
        if item is None:
            r.problem(where, f"missing; expected {check.expected}")
            continue
        ok, value = r.convert(item, where, check)
        if ok:
            values.append(value)
    return tuple(values)


def shadowed_paths(config: Config) -> list[str]:
    """Notes for backends whose prefix contains the gateway's own paths (a system at ``/``, say).

    Not an error: a system at ``/`` is the common deployment. The operator is
    told which of its paths the gateway answers itself.
    """
    notes = []
    paths = config.gateway_paths
    for i, backend in enumerate(config.backends):
        shadowed = [p for p in (paths.prefix, FAVICON_PATH) if p.startswith(backend.prefix)]
        if shadowed and not paths.reserved(backend.prefix):
            notes.append(
                f"{config.path}: backends[{i}].prefix: {backend.prefix!r}: the gateway answers "
                f"{' and '.join(shadowed)} itself; backend {backend.name!r} never sees those paths"
            )
    return notes


def _one_home_per_store(r: _Reader, data: Mapping[str, Any], config: Config) -> None:
    """A store is either a SQLite file or in the database, never both: say which key to drop."""
    if config.database is None:
        return
    for section_name in ("users", "audit"):
        block = data.get(section_name)
        if isinstance(block, Mapping) and "database" in block:
            r.problem(
                f"{section_name}.database",
                "set together with the top-level database:; the "
                f"{section_name} store lives in PostgreSQL then, so remove {section_name}.database",
            )


def parse_config(data: Any, file: Path) -> Config:
    """Validate a parsed YAML document; raise ConfigError with every problem."""
    r = _Reader(file)
    if not isinstance(data, Mapping):
        raise ConfigError([f"{file}: (top level): expected a mapping of sections, got {_kind(data)}"])
    config = _build(r, Config, data, "", {}, path=file)
    _one_home_per_store(r, data, config)
    if config.instance is None:
        config = dataclasses.replace(config, instance=_default_instance())
    if r.problems:
        raise ConfigError(r.problems)
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    file = Path(path).resolve()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read config file: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{file}: not UTF-8 text ({exc.reason})"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"{file}: {where}{problem}"]) from exc
    return parse_config(data, file)


def require_gateway(config: Config) -> None:
    """The sections ``gateway serve`` cannot run without, and the files they name."""
    problems: list[str] = []
    f = config.path
    if config.tls is None:
        problems.append(f"{f}: tls: missing; the gateway needs tls.cert, tls.key and tls.client_ca")
    if config.revocation is None:
        problems.append(f"{f}: revocation: missing; the gateway refuses to run without a CRL source (revocation.crl)")
    if not config.backends:
        problems.append(f"{f}: backends: missing; expected a list of backends")
    if config.tls is not None:
        problems += _missing_files(f, {"tls.cert": config.tls.cert, "tls.key": config.tls.key})
        problems += _missing_files(f, {f"tls.client_ca[{i}]": p for i, p in enumerate(config.tls.client_ca)})
    problems += _missing_files(f, {"session.secret_file": config.session.secret_file})
    if problems:
        raise ConfigError(problems)


def require_portal(config: Config) -> None:
    """The sections ``gateway portal`` cannot run without."""
    problems: list[str] = []
    f = config.path
    if config.ca is None:
        problems.append(f"{f}: ca: missing; the portal needs ca.dir")
    if config.portal is None:
        problems.append(f"{f}: portal: missing; expected portal.listen and portal.tls")
    else:
        problems += _missing_files(
            f, {"portal.tls.cert": config.portal.tls.cert, "portal.tls.key": config.portal.tls.key}
        )
    if problems:
        raise ConfigError(problems)


def _missing_files(file: Path, paths: Mapping[str, Path]) -> list[str]:
    out = []
    for key, p in paths.items():
        if not p.is_file():
            out.append(f"{file}: {key}: file not found: {p}")
        elif not os.access(p, os.R_OK):
            out.append(f"{file}: {key}: file not readable: {p}")
    return out

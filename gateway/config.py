"""One typed configuration, read from YAML, validated as a whole.

Every section is a frozen dataclass built once at load time. Validation
collects *all* problems, each one line naming the file, the key path and
what was expected, and raises them together in a :class:`ConfigError`.
Relative paths resolve against the config file's folder. The gateway, the
portal and the CLI all read the same file; :func:`require_gateway` and
:func:`require_portal` say which sections a command needs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

import yaml

from gateway.errors import ConfigError
from gateway.pki import KEY_TYPES, SSO_CA_NAME, KeyType

T = TypeVar("T")
LoginMode = Literal["gateway", "passthrough"]
# Mozilla's server-side TLS profiles: "intermediate" (TLS 1.2 AEAD + 1.3) or "modern" (TLS 1.3 only).
TlsProfile = Literal["intermediate", "modern"]
# Client and CA key types the certificate profile accepts (tls.key_types).
KEY_TYPE_NAMES = ("ec-p256", "ec-p384", "ec-p521", "rsa")
DEFAULT_KEY_TYPES: tuple[str, ...] = ("ec-p256", "ec-p384", "rsa")
SYSTEMS = ("tdnet", "j-iriss", "clearing")


@dataclass(frozen=True)
class Listen:
    host: str
    port: int


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path
    client_ca: tuple[Path, ...]
    issuer: str = SSO_CA_NAME
    handshake_timeout: float = 10.0
    send_ca_names: bool = True
    profile: TlsProfile = "intermediate"
    max_chain_depth: int | None = None  # None: the longest configured CA path plus the leaf
    key_types: tuple[str, ...] = DEFAULT_KEY_TYPES
    rsa_min_bits: int = 2048


@dataclass(frozen=True)
class RevocationConfig:
    sources: tuple[str, ...]  # file paths (resolved) or http(s) URLs
    refresh_seconds: float = 60.0
    grace_seconds: float = 3600.0
    fetch_timeout: float = 10.0
    max_bytes: int = 512 * 1024 * 1024


@dataclass(frozen=True)
class BackendLogin:
    mode: LoginMode = "gateway"
    path: str | None = None
    user_field: str = "userId"


@dataclass(frozen=True)
class Backend:
    name: str
    prefix: str
    upstream: str
    host: str | None = None
    system: str | None = None  # the user-store system name; defaults to name
    timeout: float = 60.0
    connect_timeout: float = 5.0
    max_body_bytes: int = 2 * 1024**3
    login: BackendLogin = field(default_factory=BackendLogin)

    @property
    def system_name(self) -> str:
        return self.system or self.name


@dataclass(frozen=True)
class Limits:
    max_connections: int = 10_000
    header_timeout: float = 15.0
    body_timeout: float = 30.0  # longest silence while a request body is still arriving
    drain_timeout: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    keepalive_timeout: float = 75.0
    max_header_bytes: int = 16_384
    max_line_bytes: int = 8_190


@dataclass(frozen=True)
class UsersConfig:
    database: Path


@dataclass(frozen=True)
class SessionConfig:
    secret_file: Path
    idle_minutes: float = 30.0
    absolute_hours: float = 10.0


@dataclass(frozen=True)
class LoginConfig:
    max_failures: int = 5
    failure_window_minutes: float = 15.0
    lockout_minutes: float = 30.0
    ip_max_failures: int = 50
    password_min_length: int = 12
    expiry_notice_days: int = 30


@dataclass(frozen=True)
class AuditConfig:
    database: Path
    jsonl: str | None = None  # a file path, or "-" for stdout
    queue_size: int = 10_000


@dataclass(frozen=True)
class CaConfig:
    dir: Path
    crl_next_update_hours: float = 24.0
    crl_url: str | None = None
    key_type: KeyType = "ec-p256"
    crl_drop_expired_after_days: float = 90.0


@dataclass(frozen=True)
class PortalConfig:
    listen: Listen
    cert: Path
    key: Path


@dataclass(frozen=True)
class Config:
    """The whole file. Sections a command does not need may be absent (None)."""

    path: Path
    listen: Listen
    workers: int
    admin: Listen | None
    tls: TlsConfig | None
    revocation: RevocationConfig | None
    backends: tuple[Backend, ...]
    limits: Limits
    users: UsersConfig
    session: SessionConfig
    login: LoginConfig
    audit: AuditConfig
    ca: CaConfig | None
    portal: PortalConfig | None
    log_level: str = "info"


class _Reader:
    """Walks the YAML tree, converting values and collecting problems."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.base = file.parent
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.file}: {key}: {message}")

    def section(self, data: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any] | None:
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.problem(path, f"expected a mapping, got {_kind(value)}")
            return None
        return value

    def get(
        self,
        data: Mapping[str, Any],
        key: str,
        path: str,
        convert: Callable[[Any], T],
        expected: str,
        default: T | None = None,
        *,
        required: bool = False,
    ) -> T | None:
        if key not in data or data[key] is None:
            if required:
                self.problem(path, f"missing; expected {expected}")
            return default
        try:
            return convert(data[key])
        except (TypeError, ValueError) as exc:
            why = f" ({exc})" if str(exc) else ""
            self.problem(path, f"expected {expected}, got {data[key]!r}{why}")
            return default

    def path(self, raw: Any) -> Path:
        if not isinstance(raw, str) or not raw:
            raise ValueError("")
        return (self.base / os.path.expanduser(raw)).resolve()

    def unknown_keys(self, data: Mapping[str, Any], known: set[str], path: str) -> None:
        for key in data:
            if key not in known:
                where = f"{path}.{key}" if path else str(key)
                self.problem(where, f"unknown key (expected one of: {', '.join(sorted(known))})")


def _kind(value: Any) -> str:
    return type(value).__name__


def _port(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 65535:
        raise ValueError("")
    return raw


def _positive_number(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw <= 0:
        raise ValueError("")
    return float(raw)


def _positive_int(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw <= 0:
        raise ValueError("")
    return raw


def _string(raw: Any) -> str:
    if not isinstance(raw, str) or not raw:
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


def _workers(raw: Any) -> int:
    if raw == "auto":
        return os.cpu_count() or 1
    return _positive_int(raw)


def _listen(r: _Reader, data: Mapping[str, Any] | None, path: str, port: int) -> Listen:
    data = data or {}
    r.unknown_keys(data, {"host", "port"}, path)
    host = r.get(data, "host", f"{path}.host", _string, "a host name or address", "127.0.0.1")
    number = r.get(data, "port", f"{path}.port", _port, "a port number 0-65535", port)
    return Listen(host or "127.0.0.1", port if number is None else number)


def _tls(r: _Reader, data: Mapping[str, Any]) -> TlsConfig:
    r.unknown_keys(
        data,
        {
            "cert",
            "key",
            "client_ca",
            "issuer",
            "handshake_timeout_seconds",
            "send_ca_names",
            "profile",
            "max_chain_depth",
            "key_types",
            "rsa_min_bits",
        },
        "tls",
    )
    pem = "a path to a PEM file"
    cert = r.get(data, "cert", "tls.cert", r.path, pem, required=True)
    key = r.get(data, "key", "tls.key", r.path, pem, required=True)
    raw_ca = data.get("client_ca")
    cas: list[Path] = []
    if raw_ca is None:
        r.problem("tls.client_ca", "missing; expected a PEM bundle path (or a list of them)")
    for i, item in enumerate(raw_ca if isinstance(raw_ca, list) else [raw_ca] if raw_ca else []):
        ca = r.get({"v": item}, "v", f"tls.client_ca[{i}]", r.path, pem, required=True)
        if ca is not None:
            cas.append(ca)
    issuer = r.get(data, "issuer", "tls.issuer", _string, "the issuing CA's CN", SSO_CA_NAME)
    timeout = r.get(
        data,
        "handshake_timeout_seconds",
        "tls.handshake_timeout_seconds",
        _positive_number,
        "a positive number of seconds",
        10.0,
    )
    names = r.get(data, "send_ca_names", "tls.send_ca_names", _boolean, "true or false", True)
    profile: TlsProfile | None = r.get(data, "profile", "tls.profile", _tls_profile, "intermediate or modern")
    depth = r.get(data, "max_chain_depth", "tls.max_chain_depth", _chain_depth, "an integer from 2 to 10")
    key_types = r.get(
        data, "key_types", "tls.key_types", _key_types, f"a list from {', '.join(KEY_TYPE_NAMES)}", DEFAULT_KEY_TYPES
    )
    rsa_bits = r.get(data, "rsa_min_bits", "tls.rsa_min_bits", _rsa_bits, "2048 or more, a multiple of 8", 2048)
    return TlsConfig(
        cert=cert or Path(),
        key=key or Path(),
        client_ca=tuple(cas),
        issuer=issuer or SSO_CA_NAME,
        handshake_timeout=timeout or 10.0,
        send_ca_names=bool(names),
        profile=profile or "intermediate",
        max_chain_depth=depth,
        key_types=key_types or DEFAULT_KEY_TYPES,
        rsa_min_bits=rsa_bits or 2048,
    )


def _tls_profile(raw: Any) -> TlsProfile:
    if raw not in ("intermediate", "modern"):
        raise ValueError
    return cast(TlsProfile, raw)


def _chain_depth(raw: Any) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or not 2 <= raw <= 10:
        raise ValueError
    return raw


def _key_types(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw or any(item not in KEY_TYPE_NAMES for item in raw):
        raise ValueError
    return tuple(raw)


def _rsa_bits(raw: Any) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 2048 or raw % 8:
        raise ValueError
    return raw


def _revocation(r: _Reader, data: Mapping[str, Any]) -> RevocationConfig:
    r.unknown_keys(
        data,
        {"crl", "refresh_seconds", "grace_seconds", "fetch_timeout_seconds", "max_bytes"},
        "revocation",
    )
    raw = data.get("crl")
    items = raw if isinstance(raw, list) else [raw] if raw else []
    if not items:
        r.problem("revocation.crl", "missing; expected a CRL file path or http(s) URL")
    sources: list[str] = []
    for i, item in enumerate(items):
        key = f"revocation.crl[{i}]" if isinstance(raw, list) else "revocation.crl"
        if isinstance(item, str) and item.startswith(("http://", "https://")):
            url = r.get({"v": item}, "v", key, _http_url, "an http(s) URL")
            if url:
                sources.append(url)
        else:
            p = r.get({"v": item}, "v", key, r.path, "a CRL file path or http(s) URL")
            if p:
                sources.append(str(p))
    seconds = "a positive number of seconds"
    return RevocationConfig(
        sources=tuple(sources),
        refresh_seconds=r.get(data, "refresh_seconds", "revocation.refresh_seconds", _positive_number, seconds, 60.0)
        or 60.0,
        grace_seconds=r.get(data, "grace_seconds", "revocation.grace_seconds", _non_negative, seconds, 3600.0) or 0.0,
        fetch_timeout=r.get(
            data,
            "fetch_timeout_seconds",
            "revocation.fetch_timeout_seconds",
            _positive_number,
            seconds,
            10.0,
        )
        or 10.0,
        max_bytes=r.get(
            data,
            "max_bytes",
            "revocation.max_bytes",
            _positive_int,
            "a positive byte count",
            512 * 1024 * 1024,
        )
        or 512 * 1024 * 1024,
    )


def _non_negative(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw < 0:
        raise ValueError("")
    return float(raw)


def _prefix(raw: Any) -> str:
    text = _string(raw)
    if not text.startswith("/") or not text.endswith("/") or "//" in text or ".." in text:
        raise ValueError("must start and end with '/'")
    return text


def _backend_login(r: _Reader, data: Mapping[str, Any] | None, path: str) -> BackendLogin:
    if not data:
        return BackendLogin()
    r.unknown_keys(data, {"mode", "path", "user_field"}, path)
    mode = r.get(data, "mode", f"{path}.mode", _login_mode, "'gateway' or 'passthrough'")
    login_path = r.get(data, "path", f"{path}.path", _string, "a URL path like /onre/login")
    field_name = r.get(data, "user_field", f"{path}.user_field", _string, "a form field name", "userId")
    if mode == "passthrough" and not login_path:
        r.problem(f"{path}.path", "missing; passthrough mode needs the backend's login path")
    return BackendLogin(mode=mode or "gateway", path=login_path, user_field=field_name or "userId")


def _login_mode(raw: Any) -> LoginMode:
    if raw == "gateway":
        return "gateway"
    if raw == "passthrough":
        return "passthrough"
    raise ValueError("")


def _backends(r: _Reader, raw: Any) -> tuple[Backend, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        r.problem("backends", f"expected a non-empty list of backends, got {_kind(raw)}")
        return ()
    result: list[Backend] = []
    seen: set[tuple[str | None, str]] = set()
    names: set[str] = set()
    known = {
        "name",
        "prefix",
        "upstream",
        "host",
        "system",
        "timeout_seconds",
        "connect_timeout_seconds",
        "max_body_bytes",
        "login",
    }
    for i, item in enumerate(raw):
        path = f"backends[{i}]"
        if not isinstance(item, Mapping):
            r.problem(path, f"expected a mapping, got {_kind(item)}")
            continue
        r.unknown_keys(item, known, path)
        name = r.get(item, "name", f"{path}.name", _string, "a backend name", required=True)
        prefix = r.get(item, "prefix", f"{path}.prefix", _prefix, "a path prefix like /onre/", required=True)
        upstream = r.get(item, "upstream", f"{path}.upstream", _http_url, "an http(s) URL", required=True)
        host = r.get(item, "host", f"{path}.host", _string, "a host name")
        system = r.get(item, "system", f"{path}.system", _system, f"one of {', '.join(SYSTEMS)}")
        if name and name in names:
            r.problem(f"{path}.name", f"duplicate backend name {name!r}")
        if prefix and (host, prefix) in seen:
            r.problem(f"{path}.prefix", f"duplicate route {host or '*'}{prefix}")
        names.add(name or "")
        seen.add((host, prefix or ""))
        seconds = "a positive number of seconds"
        backend = Backend(
            name=name or "",
            prefix=prefix or "/",
            upstream=upstream or "",
            host=host.lower() if host else None,
            system=system,
            timeout=r.get(item, "timeout_seconds", f"{path}.timeout_seconds", _positive_number, seconds, 60.0) or 60.0,
            connect_timeout=r.get(
                item,
                "connect_timeout_seconds",
                f"{path}.connect_timeout_seconds",
                _positive_number,
                seconds,
                5.0,
            )
            or 5.0,
            max_body_bytes=r.get(
                item,
                "max_body_bytes",
                f"{path}.max_body_bytes",
                _positive_int,
                "a positive byte count",
                2 * 1024**3,
            )
            or 2 * 1024**3,
            login=_backend_login(r, r.section(item, "login", f"{path}.login"), f"{path}.login"),
        )
        if backend.system is None and backend.name not in SYSTEMS:
            r.problem(
                f"{path}.system",
                f"missing; backend {name!r} is not one of {', '.join(SYSTEMS)}, so name the system it belongs to",
            )
        result.append(backend)
    return tuple(result)


def _system(raw: Any) -> str:
    if raw not in SYSTEMS:
        raise ValueError("")
    return str(raw)


def _limits(r: _Reader, data: Mapping[str, Any] | None) -> Limits:
    data = data or {}
    d = Limits()
    r.unknown_keys(
        data,
        {
            "max_connections",
            "header_timeout_seconds",
            "body_timeout_seconds",
            "drain_timeout_seconds",
            "keepalive_timeout_seconds",
            "max_header_bytes",
            "max_line_bytes",
        },
        "limits",
    )
    secs = "a positive number of seconds"
    count = "a positive integer"
    return Limits(
        max_connections=r.get(
            data, "max_connections", "limits.max_connections", _positive_int, count, d.max_connections
        )
        or d.max_connections,
        header_timeout=r.get(
            data, "header_timeout_seconds", "limits.header_timeout_seconds", _positive_number, secs, d.header_timeout
        )
        or d.header_timeout,
        body_timeout=r.get(
            data, "body_timeout_seconds", "limits.body_timeout_seconds", _positive_number, secs, d.body_timeout
        )
        or d.body_timeout,
        drain_timeout=r.get(
            data, "drain_timeout_seconds", "limits.drain_timeout_seconds", _positive_number, secs, d.drain_timeout
        )
        or d.drain_timeout,
        keepalive_timeout=r.get(
            data,
            "keepalive_timeout_seconds",
            "limits.keepalive_timeout_seconds",
            _positive_number,
            secs,
            d.keepalive_timeout,
        )
        or d.keepalive_timeout,
        max_header_bytes=r.get(
            data, "max_header_bytes", "limits.max_header_bytes", _positive_int, count, d.max_header_bytes
        )
        or d.max_header_bytes,
        max_line_bytes=r.get(data, "max_line_bytes", "limits.max_line_bytes", _positive_int, count, d.max_line_bytes)
        or d.max_line_bytes,
    )


def _simple_section(
    r: _Reader,
    data: Mapping[str, Any] | None,
    name: str,
    cls: type[T],
    spec: dict[str, tuple[Callable[[Any], Any], str]],
) -> T:
    """Build a flat dataclass whose fields all have defaults from ``spec``."""
    data = data or {}
    r.unknown_keys(data, set(spec), name)
    defaults = cls()
    values = {}
    for key, (convert, expected) in spec.items():
        attr = key.removesuffix("_seconds")
        value = r.get(data, key, f"{name}.{key}", convert, expected)
        if value is not None:
            values[attr] = value
    return type(defaults)(**{**_fields(defaults), **values})


def _fields(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}


def _ca(r: _Reader, data: Mapping[str, Any]) -> CaConfig:
    r.unknown_keys(data, {"dir", "crl_next_update_hours", "crl_url", "key_type", "crl_drop_expired_after_days"}, "ca")
    directory = r.get(data, "dir", "ca.dir", r.path, "a directory path", required=True)
    hours = r.get(
        data, "crl_next_update_hours", "ca.crl_next_update_hours", _positive_number, "a positive number of hours", 24.0
    )
    url = r.get(data, "crl_url", "ca.crl_url", _http_url, "an http(s) URL")
    key_type = r.get(data, "key_type", "ca.key_type", _key_type, f"one of {', '.join(KEY_TYPES)}")
    drop = r.get(
        data, "crl_drop_expired_after_days", "ca.crl_drop_expired_after_days", _non_negative, "a number of days", 90.0
    )
    return CaConfig(
        dir=directory or Path(),
        crl_next_update_hours=hours or 24.0,
        crl_url=url,
        key_type=key_type or "ec-p256",
        crl_drop_expired_after_days=90.0 if drop is None else drop,
    )


def _key_type(raw: Any) -> KeyType:
    for kind in KEY_TYPES:
        if raw == kind:
            return kind
    raise ValueError("")


def _portal(r: _Reader, data: Mapping[str, Any]) -> PortalConfig:
    r.unknown_keys(data, {"listen", "tls"}, "portal")
    listen = _listen(r, r.section(data, "listen", "portal.listen"), "portal.listen", 8444)
    tls = r.section(data, "tls", "portal.tls") or {}
    r.unknown_keys(tls, {"cert", "key"}, "portal.tls")
    cert = r.get(tls, "cert", "portal.tls.cert", r.path, "a path to a PEM file", required=True)
    key = r.get(tls, "key", "portal.tls.key", r.path, "a path to a PEM file", required=True)
    return PortalConfig(listen=listen, cert=cert or Path(), key=key or Path())


TOP_LEVEL = {
    "listen",
    "workers",
    "admin",
    "tls",
    "revocation",
    "backends",
    "limits",
    "users",
    "session",
    "login",
    "audit",
    "ca",
    "portal",
    "log_level",
}


def parse_config(data: Any, file: Path) -> Config:
    """Validate a parsed YAML document; raise ConfigError with every problem."""
    r = _Reader(file)
    if not isinstance(data, Mapping):
        raise ConfigError([f"{file}: (top level): expected a mapping of sections, got {_kind(data)}"])
    r.unknown_keys(data, TOP_LEVEL, "")
    listen = _listen(r, r.section(data, "listen", "listen"), "listen", 8443)
    workers = r.get(data, "workers", "workers", _workers, "a positive integer or 'auto'", 1) or 1
    admin_data = r.section(data, "admin", "admin")
    admin = _listen(r, admin_data, "admin", 9100) if admin_data is not None else None
    tls_data = r.section(data, "tls", "tls")
    rev_data = r.section(data, "revocation", "revocation")
    users_data = r.section(data, "users", "users") or {}
    r.unknown_keys(users_data, {"database"}, "users")
    users_db = r.get(users_data, "database", "users.database", r.path, "a SQLite file path") or r.path("gateway.db")
    session_data = r.section(data, "session", "session") or {}
    r.unknown_keys(session_data, {"secret_file", "idle_minutes", "absolute_hours"}, "session")
    secret = r.get(session_data, "secret_file", "session.secret_file", r.path, "a file path") or r.path("session.key")
    idle = (
        r.get(
            session_data, "idle_minutes", "session.idle_minutes", _positive_number, "a positive number of minutes", 30.0
        )
        or 30.0
    )
    absolute = (
        r.get(
            session_data,
            "absolute_hours",
            "session.absolute_hours",
            _positive_number,
            "a positive number of hours",
            10.0,
        )
        or 10.0
    )
    login = _simple_section(
        r,
        r.section(data, "login", "login"),
        "login",
        LoginConfig,
        {
            "max_failures": (_positive_int, "a positive integer"),
            "failure_window_minutes": (_positive_number, "a positive number of minutes"),
            "lockout_minutes": (_positive_number, "a positive number of minutes"),
            "ip_max_failures": (_positive_int, "a positive integer"),
            "password_min_length": (_positive_int, "a positive integer"),
            "expiry_notice_days": (_positive_int, "a positive number of days"),
        },
    )
    audit_data = r.section(data, "audit", "audit") or {}
    r.unknown_keys(audit_data, {"database", "jsonl", "queue_size"}, "audit")
    audit_db = r.get(audit_data, "database", "audit.database", r.path, "a SQLite file path") or r.path("audit.db")
    jsonl_raw = r.get(audit_data, "jsonl", "audit.jsonl", _string, "a file path or '-' for stdout")
    jsonl = jsonl_raw if jsonl_raw in (None, "-") else str(r.path(jsonl_raw))
    queue = r.get(audit_data, "queue_size", "audit.queue_size", _positive_int, "a positive integer", 10_000) or 10_000
    ca_data = r.section(data, "ca", "ca")
    portal_data = r.section(data, "portal", "portal")
    level = r.get(data, "log_level", "log_level", _log_level, "debug, info, warning or error", "info")
    config = Config(
        path=file,
        listen=listen,
        workers=workers,
        admin=admin,
        tls=_tls(r, tls_data) if tls_data is not None else None,
        revocation=_revocation(r, rev_data) if rev_data is not None else None,
        backends=_backends(r, data.get("backends")),
        limits=_limits(r, r.section(data, "limits", "limits")),
        users=UsersConfig(users_db),
        session=SessionConfig(secret, idle, absolute),
        login=login,
        audit=AuditConfig(audit_db, jsonl, queue),
        ca=_ca(r, ca_data) if ca_data is not None else None,
        portal=_portal(r, portal_data) if portal_data is not None else None,
        log_level=level or "info",
    )
    if r.problems:
        raise ConfigError(r.problems)
    return config


def _log_level(raw: Any) -> str:
    if raw not in ("debug", "info", "warning", "error"):
        raise ValueError("")
    return str(raw)


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
        problems += _missing_files(f, {"portal.tls.cert": config.portal.cert, "portal.tls.key": config.portal.key})
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

"""The start-up checks: one list that ``gateway serve`` and ``gateway check-config`` both run.

Whatever ``serve`` refuses at start-up because of the configuration or the
files it names, ``check-config`` refuses with the same line, because both
call :func:`startup_problems` over :data:`GATEWAY_CHECKS` (and the portal's
``gateway portal`` and ``check-config --portal`` share :data:`PORTAL_CHECKS`
the same way). Each check reads plain facts from the file system and returns
one line per problem, naming the config file, the key and the fix: an
operator can repair them all in one go. Only what needs the running process
(a port already taken) is left to ``serve`` itself.

Fail closed: a CRL file that is missing or unreadable at start-up stops the
gateway (there is no last good CRL to keep), as does a private key or the
session secret that group or others may read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from gateway.config import Config, require_gateway, require_portal
from gateway.errors import ConfigError, GatewayError, StoreError

Check = Callable[[Config], list[str]]


def sections(config: Config) -> list[str]:
    """The sections the gateway cannot run without, and the files they name exist and are readable."""
    try:
        require_gateway(config)
    except ConfigError as exc:
        return list(exc.problems)
    return []


def private_files(config: Config) -> list[str]:
    """The server key, the session secret and the audit signing key are for this user only.

    A missing audit signing key is fine: the audit writer creates it (0600) at first start.
    """
    files = {"session.secret_file": config.session.secret_file, "audit.signing_key": config.audit.signing_key}
    if config.tls is not None:
        files = {"tls.key": config.tls.key, **files}
    return list(_open_to_others(config, files))


def session_secret(config: Config) -> list[str]:
    """The cookie-signing key is long enough (the message never holds the key's bytes)."""
    from gateway.access.sessions import load_session_key

    if not config.session.secret_file.is_file():
        return []  # reported by sections()
    try:
        load_session_key(config.session.secret_file)
    except ConfigError as exc:
        return [f"{config.path}: {line}" for line in exc.problems]
    return []


def crl_files(config: Config) -> list[str]:
    """Every CRL file source exists and is readable: with none loaded, every request would be refused."""
    if config.revocation is None:
        return []
    problems = []
    many = len(config.revocation.sources) > 1
    for i, source in enumerate(config.revocation.sources):
        if source.startswith(("http://", "https://")):
            continue  # fetched by the refresher; an outage there is not the operator's file mistake
        key = f"revocation.crl[{i}]" if many else "revocation.crl"
        path = Path(source)
        if not path.is_file():
            problems.append(
                f"{config.path}: {key}: CRL file not found: {path} (the gateway does not start without a CRL;"
                " publish one with: gateway ca crl)"
            )
        elif not os.access(path, os.R_OK):
            problems.append(f"{config.path}: {key}: CRL file not readable: {path}")
    return problems


def databases(config: Config) -> list[str]:
    """The SQLite files (and the JSONL audit file) can be created or written where configured."""
    files = {"users.database": config.users.database, "audit.database": config.audit.database}
    if config.audit.jsonl not in (None, "-"):
        files["audit.jsonl"] = Path(config.audit.jsonl)
    problems = []
    for key, path in files.items():
        why = _not_writable(path)
        if why:
            problems.append(f"{config.path}: {key}: {why}")
    return problems


def database(config: Config) -> list[str]:
    """PostgreSQL answers and holds this release's tables (with ``database:`` only).

    A process must not run on tables it does not know: a schema that is
    behind is refused with the command that brings it up to date (the
    running services never change the schema themselves). An unreachable
    server is named with the driver's reason; neither line shows the password.
    """
    if config.database is None:
        return []
    from gateway.storage import postgres
    from gateway.storage.schemas import all_schemas

    try:
        where = postgres.target_of(config.database, application_name=f"tse-check:{config.instance}")
    except ConfigError as exc:
        return [f"{config.path}: {line}" for line in exc.problems]
    timeout = config.database.connect_timeout
    try:
        postgres.connect(where, timeout=timeout).close()  # the driver's own reason when it cannot connect
        with postgres.Database(where, pool_size=1, timeout=timeout) as db:
            for schema in all_schemas():
                postgres.check_schema(db, schema)
    except postgres.DatabaseUnavailable as exc:
        return [f"{config.path}: database: cannot connect: {' '.join(str(exc).split())}"]  # the driver's hint, one line
    except StoreError as exc:
        return [f"{config.path}: database: {str(exc).replace('--config FILE', f'--config {config.path}')}"]
    return []


def tls_files(config: Config) -> list[str]:
    """The certificate, key and CA bundle load as ``serve`` loads them (only once they all exist)."""
    if config.tls is None or sections(config):
        return []
    from gateway.server import load_tls_state

    try:
        load_tls_state(config)
    except GatewayError as exc:
        return [f"{config.path}: tls: {exc}"]
    return []


def crl_sources(config: Config) -> list[str]:
    """Every CRL source loads and verifies against the configured CAs: the one rule for a bad CRL.

    ``serve`` refuses a configuration whose CRL does not load (see
    :mod:`gateway.certs.revocation`); checking it here, once the files and the CAs
    are known to be good, makes ``check-config`` refuse it with the same line.
    """
    if config.revocation is None or config.tls is None or sections(config) or crl_files(config) or tls_files(config):
        return []
    import asyncio

    from gateway.server import load_crls, load_tls_state

    async def load() -> None:
        assert config.revocation is not None
        refresher = await load_crls(config.revocation, load_tls_state(config).ca_ders)
        await refresher.aclose()

    try:
        asyncio.run(load())
    except GatewayError as exc:
        return [f"{config.path}: revocation.crl: {exc}"]
    return []


def ca_warnings(config: Config) -> list[str]:
    """Configured client CAs that expire within 30 days (a warning: their users will soon be refused)."""
    if config.tls is None or sections(config) or tls_files(config):
        return []
    import datetime as dt

    from gateway.certs.policy import expiring_cas
    from gateway.server import CA_EXPIRY_WARNING, load_tls_state

    cas = load_tls_state(config).anchors.cas
    return [f"tls.client_ca: {line}" for line in expiring_cas(cas, dt.datetime.now(dt.UTC), CA_EXPIRY_WARNING)]


def portal_sections(config: Config) -> list[str]:
    """The sections the portal cannot run without."""
    try:
        require_portal(config)
    except ConfigError as exc:
        return list(exc.problems)
    return []


def portal_private_files(config: Config) -> list[str]:
    """The portal's TLS key, the CA's signing key and the audit signing key are for this user only."""
    files: dict[str, Path] = {"audit.signing_key": config.audit.signing_key}
    if config.portal is not None:
        files["portal.tls.key"] = config.portal.tls.key
    if config.ca is not None:
        from gateway.ca.authority import CA_KEY

        files[f"ca.dir ({CA_KEY})"] = config.ca.dir / CA_KEY
    return list(_open_to_others(config, files))


# In the order they are reported; each returns [] when what it checks is absent (another check says so).
GATEWAY_CHECKS: tuple[Check, ...] = (
    sections,
    private_files,
    session_secret,
    crl_files,
    databases,
    database,
    tls_files,
    crl_sources,
)
PORTAL_CHECKS: tuple[Check, ...] = (portal_sections, portal_private_files, session_secret, databases, database)


def startup_problems(config: Config, checks: tuple[Check, ...] = GATEWAY_CHECKS) -> list[str]:
    """Every problem every check finds, in order, without duplicates."""
    problems: list[str] = []
    for check in checks:
        problems += [line for line in check(config) if line not in problems]
    return problems


def check_startup(config: Config, checks: tuple[Check, ...] = GATEWAY_CHECKS) -> None:
    """Raise :class:`ConfigError` with every problem; what ``serve`` and ``check-config`` both call."""
    problems = startup_problems(config, checks)
    if problems:
        raise ConfigError(problems)


def _open_to_others(config: Config, files: dict[str, Path]) -> Iterator[str]:
    for key, path in files.items():
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            continue  # missing or unreadable: the sections check names it
        if mode & 0o077:
            yield (
                f"{config.path}: {key}: {path} is readable by group/others (mode {mode:04o}): chmod 600 {path}"
                if mode & 0o044
                else f"{config.path}: {key}: {path} is open to group/others (mode {mode:04o}): chmod 600 {path}"
            )


def _not_writable(path: Path) -> str:
    """Why ``path`` could not be opened for writing (created if missing), or ''."""
    if path.exists():
        if path.is_dir():
            return f"{path} is a directory; expected a file"
        return "" if os.access(path, os.R_OK | os.W_OK) else f"{path} is not writable by this user"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # missing folders are created on first use
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {path}: {parent} is not a writable folder"
    return ""

"""A real, throwaway PostgreSQL server for the tests (Debian's binaries, initdb + pg_ctl in a temp dir).

``initdb`` and ``postgres`` refuse to run as root, and CI runs as root: then
every command runs as the ``postgres`` system user the package creates, in a
directory that user owns. The server listens on 127.0.0.1 only, on a free
port, with test-only speed settings (``fsync=off``). If ``DATABASE_URL`` is
set, that server is used instead and nothing is started.

Missing binaries fail the tests that need them (as the browser tests do):
``./dev.sh setup`` installs the ``postgresql`` package.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from tests.harness import free_port


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError("PostgreSQL server binaries not found (initdb); run ./dev.sh setup (apt: postgresql)")


class PgServer:
    """One server for the whole test run; each test gets a database of its own (:meth:`new_database`)."""

    def __init__(self, *, options: tuple[str, ...] = (), hba: str | None = None) -> None:
        """``options``: extra ``-c name=value`` settings; ``hba``: a pg_hba.conf to use instead of initdb's.

        With ``hba`` (e.g. passwords over TCP), the tests' own admin connection
        goes through the Unix socket, which ``hba`` should keep on ``trust``.
        """
        self.options = options
        self.hba = hba
        self.external = None if options or hba else os.environ.get("DATABASE_URL")
        self.dir: Path | None = None
        self.port = 0
        self._as_root = os.geteuid() == 0

    # --- life cycle ---

    def start(self) -> None:
        if self.external:
            return
        bindir = _bin_dir()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-pg-"))
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        self._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.dir / "data"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        if self.hba is not None:
            (self.dir / "data" / "pg_hba.conf").write_text(self.hba, encoding="utf-8")
        (self.dir / "sock").mkdir()
        if self._as_root:
            shutil.chown(self.dir / "sock", "postgres", "postgres")
        self.pg_ctl("start")

    def pg_ctl(self, action: str, *, mode: str = "fast") -> None:
        """``start``, ``stop`` (``mode``: fast or immediate = a crash) or ``restart`` the server."""
        assert self.dir is not None, "an external DATABASE_URL server cannot be stopped by the tests"
        opts = (
            f"-p {self.port} -k {self.dir / 'sock'} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c full_page_writes=off -c max_connections=200"
        )
        opts += "".join(f" -c {option}" for option in self.options)
        argv = [str(_bin_dir() / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w"]
        if action in ("start", "restart"):
            argv += ["-o", opts]
        if action in ("stop", "restart"):
            argv += ["-m", mode]
        self._run([*argv, action])

    def stop(self) -> None:
        if self.dir is None:
            return
        with contextlib.suppress(subprocess.CalledProcessError):
            self.pg_ctl("stop", mode="immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def _run(self, argv: list[str]) -> None:
        if self._as_root:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, capture_output=True, timeout=60)

    # --- URLs and databases ---

    @property
    def admin_url(self) -> str:
        if self.external:
            return self.external
        if self.hba is not None:
            return f"postgresql://postgres@127.0.0.1:{self.port}/postgres?host={self.dir / 'sock'}"
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str, user: str | None = None) -> str:
        parts = urlsplit(self.admin_url)
        netloc = parts.netloc
        if user is not None:
            netloc = f"{user}@{parts.hostname}:{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc, path=f"/{database}"))

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL (the superuser's)."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def sql(self, url: str, statement: str) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type] - tests' own constant SQL

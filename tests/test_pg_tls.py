"""PostgreSQL over TLS with ``sslmode=verify-full``, and passwords that stay out of every message.

A second throwaway server runs with ``ssl=on``, a server certificate made by
the project's own builders for 127.0.0.1 and localhost, and password
(SCRAM) authentication over TCP for a ``gw`` role. The pool connects with
``?sslmode=verify-full&sslrootcert=...``; a root that did not sign the
server's certificate is refused, as is a wrong password, and neither the
right nor the wrong password appears in any output.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gateway import cli
from gateway.certs import builders as pki
from gateway.storage import postgres
from tests.pgserver import PgServer

NOW = dt.datetime.now(dt.UTC)
PASSWORD = "Scram-pw-only-in-the-file-91d2"
HBA = (
    "local all all trust\n"  # the tests' own admin connection, over the socket
    "hostssl all all 127.0.0.1/32 scram-sha-256\n"
    "host all all 127.0.0.1/32 reject\n"  # no password in clear over TCP
)


@dataclass(frozen=True)
class TlsServer:
    server: PgServer
    root: Path  # the CA that signed the server's certificate
    other_root: Path  # a CA that did not

    def url(self, host: str = "127.0.0.1", root: Path | None = None, mode: str = "verify-full") -> str:
        return f"postgresql://gw@{host}:{self.server.port}/postgres?sslmode={mode}&sslrootcert={root or self.root}"


@pytest.fixture(scope="module")
def tls_server() -> Iterator[TlsServer]:
    files = Path(tempfile.mkdtemp(prefix="gw-pgtls-"))
    ca_key = pki.generate_key()
    ca_cert = pki.build_ca(ca_key, now=NOW, common_name="Test PostgreSQL CA")
    other_key = pki.generate_key()
    other = pki.build_ca(other_key, now=NOW, common_name="Test PostgreSQL CA")  # same name, other key
    key = pki.generate_key()
    cert = pki.build_server_cert(ca_cert, ca_key, key.public_key(), ["localhost", "127.0.0.1"], now=NOW)
    (files / "root.pem").write_bytes(pki.cert_pem(ca_cert))
    (files / "other.pem").write_bytes(pki.cert_pem(other))
    (files / "server.crt").write_bytes(pki.cert_pem(cert))
    (files / "server.key").write_bytes(pki.key_pem(key))
    (files / "server.key").chmod(0o600)  # PostgreSQL refuses a key others may read
    if os.geteuid() == 0:  # the server runs as postgres: its files must be postgres's
        for path in (files, files / "server.crt", files / "server.key"):
            shutil.chown(path, "postgres", "postgres")
    server = PgServer(
        options=("ssl=on", f"ssl_cert_file={files / 'server.crt'}", f"ssl_key_file={files / 'server.key'}"), hba=HBA
    )
    server.start()
    try:
        server.sql(server.admin_url, f"CREATE ROLE gw LOGIN SUPERUSER PASSWORD '{PASSWORD}'")
        yield TlsServer(server, files / "root.pem", files / "other.pem")
    finally:
        server.stop()
        shutil.rmtree(files, ignore_errors=True)


def password_file(tmp_path: Path, password: str = PASSWORD) -> Path:
    path = tmp_path / "db.password"
    path.write_text(password + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_verify_full_connects_to_the_server_our_ca_signed(tls_server: TlsServer, tmp_path: Path, host: str) -> None:
    where = postgres.target(tls_server.url(host), password_file(tmp_path))
    with postgres.Database(where, pool_size=1, timeout=5) as db, db.connection() as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row == (True,)


def test_verify_full_refuses_a_root_that_did_not_sign_the_server(tls_server: TlsServer, tmp_path: Path) -> None:
    where = postgres.target(tls_server.url(root=tls_server.other_root), password_file(tmp_path))
    with pytest.raises(postgres.DatabaseUnavailable) as refused:
        postgres.connect(where, timeout=3).close()
    assert "certificate verify failed" in str(refused.value)
    with (
        postgres.Database(where, pool_size=1, timeout=1) as db,
        pytest.raises(postgres.DatabaseUnavailable),
        db.connection(),
    ):
        pass
    assert PASSWORD not in str(refused.value)


def test_without_tls_the_server_refuses_the_password_login(tls_server: TlsServer, tmp_path: Path) -> None:
    where = postgres.target(tls_server.url(mode="disable"), password_file(tmp_path))
    with pytest.raises(postgres.DatabaseUnavailable) as refused:
        postgres.connect(where, timeout=3).close()
    assert "no encryption" in str(refused.value) or "rejects connection" in str(refused.value)


@pytest.mark.parametrize("where", ["url", "password_file"])
def test_a_wrong_password_is_named_never_shown(
    tls_server: TlsServer, tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "Wrong-pw-0f3c9e"
    database: dict[str, object] = {"url": tls_server.url(), "connect_timeout_seconds": 2}
    if where == "url":
        database["url"] = str(database["url"]).replace("gw@", f"gw:{wrong}@")
    else:
        database["password_file"] = str(password_file(tmp_path, wrong))
    config = tmp_path / "pg.yaml"
    config.write_text(yaml.safe_dump({"database": database}), encoding="utf-8")
    for argv in (["db", "migrate"], ["db", "status"]):
        code = cli.main([*argv, "--config", str(config)])
        out, err = capsys.readouterr()
        assert code == 2
        assert 'password authentication failed for user "gw"' in err
        assert wrong not in out + err and PASSWORD not in out + err
    database["password_file"] = str(password_file(tmp_path))  # the accept twin: the right password
    database["url"] = tls_server.url()
    config.write_text(yaml.safe_dump({"database": database}), encoding="utf-8")
    assert cli.main(["db", "migrate", "--config", str(config)]) == 0
    assert cli.main(["db", "status", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err

"""Start-up: what ``serve`` refuses, ``check-config`` refuses with the same line; failures are one line, exit 1.

The real CLI runs as a subprocess, over a table with one broken config per
start-up check (the table must cover :data:`gateway.startup.GATEWAY_CHECKS`).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.audit.signing import generate_signing_key
from gateway.certs import builders as pki
from gateway.certs.files import ThrowawayPki
from gateway.config import load_config
from gateway.startup import GATEWAY_CHECKS
from tests.harness import write_config

NOW = dt.datetime.now(dt.UTC)
Mutation = Callable[[Path, ThrowawayPki], None]


@dataclass(frozen=True)
class Broken:
    name: str
    check: str  # the start-up check that must report it
    mutate: Mutation
    message: str  # the problem line, with {cfg}, {dir} and {pki} placeholders


def _edit(directory: Path, change: Callable[[dict], None]) -> None:  # type: ignore[type-arg]
    path = directory / "gateway.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")


def _write(path: Path, data: bytes, mode: int) -> None:
    path.write_bytes(data)
    path.chmod(mode)


CASES = [
    Broken(
        "server certificate missing",
        "sections",
        lambda d, p: p.server_cert.unlink(),
        "{cfg}: tls.cert: file not found: {pki}/server.crt",
    ),
    Broken(
        "server key readable by others",
        "private_files",
        lambda d, p: p.server_key.chmod(0o644),
        "{cfg}: tls.key: {pki}/server.key is readable by group/others (mode 0644): chmod 600 {pki}/server.key",
    ),
    Broken(
        "session secret readable by others",
        "private_files",
        lambda d, p: (d / "session.key").chmod(0o640),
        "{cfg}: session.secret_file: {dir}/session.key is readable by group/others (mode 0640):"
        " chmod 600 {dir}/session.key",
    ),
    Broken(
        "audit signing key readable by the group",
        "private_files",
        lambda d, p: (generate_signing_key(d / "audit-signing.key"), (d / "audit-signing.key").chmod(0o640)),
        "{cfg}: audit.signing_key: {dir}/audit-signing.key is readable by group/others (mode 0640):"
        " chmod 600 {dir}/audit-signing.key",
    ),
    Broken(
        "session secret of 5 bytes",
        "session_secret",
        lambda d, p: _write(d / "session.key", b"short", 0o600),
        "{cfg}: session.secret_file: {dir}/session.key holds 5 bytes; need at least 32"
        " (create one with: openssl rand -hex 32 > {dir}/session.key)",
    ),
    Broken(
        "CRL file missing",
        "crl_files",
        lambda d, p: p.crl.unlink(),
        "{cfg}: revocation.crl: CRL file not found: {pki}/ca.crl (the gateway does not start without a CRL;"
        " publish one with: gateway ca crl)",
    ),
    Broken(
        "audit database under a file",
        "databases",
        lambda d, p: (
            (d / "plain").write_text("x"),
            _edit(d, lambda c: c["audit"].update(database=str(d / "plain" / "audit.db"))),
        ),
        "{cfg}: audit.database: cannot create {dir}/plain/audit.db: {dir}/plain is not a writable folder",
    ),
    Broken(
        "database unreachable",
        "database",
        lambda d, p: _edit(
            d,
            lambda c: (
                c.pop("users"),
                c.pop("audit"),
                c.update(database={"url": "postgresql://gw@127.0.0.1:1/gateway", "connect_timeout_seconds": 1}),
            ),
        ),
        "{cfg}: database: cannot connect: database postgresql://gw@127.0.0.1:1/gateway: ",
    ),
    Broken(
        "CRL without a CRLNumber",
        "crl_sources",
        lambda d, p: _write(
            p.crl,
            pki.build_crl(
                p.ca_certificate,
                p.ca_private_key,
                [],
                this_update=NOW,
                next_update=NOW + dt.timedelta(days=1),
                number=None,
            ).public_bytes(Encoding.DER),
            0o644,
        ),
        "{cfg}: revocation.crl: CRL source not loaded: {pki}/ca.crl: ",
    ),
    Broken(
        "server certificate not PEM",
        "tls_files",
        lambda d, p: _write(p.server_cert, b"not a certificate\n", 0o644),
        "{cfg}: tls: ",
    ),
]


@pytest.fixture
def good(tmp_path: Path) -> Iterator[tuple[Path, ThrowawayPki]]:
    from gateway.certs.files import make_throwaway_pki

    the_pki = make_throwaway_pki(tmp_path / "pki", users=("LC000001",))
    ports = {"tdnet": 9, "j-iriss": 9, "clearing": 9}
    path = write_config(tmp_path, the_pki, ports, extra={"log_level": "info"})
    yield path, the_pki
    shutil.rmtree(tmp_path / "pki", ignore_errors=True)


def gateway(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], check=False, capture_output=True, text=True, timeout=timeout
    )


def test_the_table_covers_every_start_up_check() -> None:
    assert {case.check for case in CASES} == {check.__name__ for check in GATEWAY_CHECKS}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_serve_and_check_config_refuse_alike(good: tuple[Path, ThrowawayPki], case: Broken) -> None:
    path, the_pki = good
    case.mutate(path.parent, the_pki)
    expected = case.message.format(cfg=path, dir=path.parent, pki=the_pki.directory)
    [check] = [c for c in GATEWAY_CHECKS if c.__name__ == case.check]
    [found] = check(load_config(path))
    assert found.startswith(expected), found

    checked = gateway("check-config", "--config", str(path))
    served = gateway("serve", "--config", str(path))
    assert (checked.returncode, served.returncode) == (2, 1), (checked.stderr, served.stderr)
    assert checked.stderr == served.stderr, "serve and check-config must say the same"
    assert f"error: {found}" in served.stderr.splitlines()
    assert "Traceback" not in served.stderr + served.stdout


def test_the_good_config_passes_check_config_and_serve_starts(good: tuple[Path, ThrowawayPki]) -> None:
    path, _ = good
    checked = gateway("check-config", "--config", str(path))
    assert checked.returncode == 0 and checked.stdout.strip() == f"{path}: OK", checked.stderr
    with subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as serve:
        assert serve.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = serve.stdout.readline()
            if "gateway listening" in line or not line:
                break
        serve.send_signal(signal.SIGTERM)
        rest, _ = serve.communicate(timeout=60)
    assert "gateway listening" in line, line + rest
    assert serve.returncode == 0 and "Traceback" not in rest


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("listener", ["admin", "gateway"])
def test_a_taken_port_is_one_line_naming_the_listener(
    good: tuple[Path, ThrowawayPki], taken_port: int, listener: str, workers: int
) -> None:
    path, _ = good
    key = "admin" if listener == "admin" else "listen"
    _edit(path.parent, lambda c: (c[key].update(port=taken_port), c.update(workers=workers)))
    served = gateway("serve", "--config", str(path))
    assert served.returncode == 1
    assert served.stderr == f"error: {listener} listener 127.0.0.1:{taken_port}: address already in use\n"
    assert "Traceback" not in served.stdout


def test_debug_shows_the_traceback(good: tuple[Path, ThrowawayPki], taken_port: int) -> None:
    path, _ = good
    _edit(path.parent, lambda c: c["admin"].update(port=taken_port))
    served = gateway("--debug", "serve", "--config", str(path))
    assert served.returncode == 1
    assert "Traceback" in served.stderr and "StartupError" in served.stderr


def test_demo_with_a_taken_port_is_one_line(tmp_path: Path, taken_port: int) -> None:
    demo = gateway("demo", "--once", "--port", str(taken_port), "--dir", str(tmp_path / "demo"), timeout=120)
    assert demo.returncode == 1
    assert demo.stderr.splitlines()[-1] == f"error: gateway listener 127.0.0.1:{taken_port}: address already in use"
    assert "Traceback" not in demo.stderr


def test_a_private_key_at_0600_is_accepted(good: tuple[Path, ThrowawayPki]) -> None:
    """The accept twin of the permission refusals: 0600 and 0400 both pass; a missing audit key too (made at start)."""
    path, the_pki = good
    assert not (path.parent / "audit-signing.key").exists()
    assert gateway("check-config", "--config", str(path)).returncode == 0
    generate_signing_key(path.parent / "audit-signing.key")
    for mode in (0o600, 0o400):
        the_pki.server_key.chmod(mode)
        (path.parent / "session.key").chmod(mode)
        (path.parent / "audit-signing.key").chmod(mode)
        assert gateway("check-config", "--config", str(path)).returncode == 0
    assert os.stat(the_pki.server_key).st_mode & 0o777 == 0o400

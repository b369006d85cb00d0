"""``gateway init``: an empty directory to one check-config accepts and serve runs on; never overwrites anything."""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from tests.harness import free_port
from tests.test_config import schema_keys

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def gateway(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def init(directory: Path, *extra: str, port: int = 8443, admin: int = 9100) -> subprocess.CompletedProcess[str]:
    return gateway(
        "init",
        str(directory),
        "--hostname",
        "tdnet.example.jp",
        "--hostname",
        "127.0.0.1",
        "--port",
        str(port),
        "--admin-port",
        str(admin),
        *extra,
    )


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_init_writes_a_directory_check_config_accepts(tmp_path: Path) -> None:
    target = tmp_path / "etc"
    result = init(target)
    assert result.returncode == 0, result.stderr
    for name in ("gateway.yaml", "session.key", "tls/server.pem", "tls/server.key", "state/ca/ca.key"):
        assert (target / name).is_file(), name
    for secret in ("session.key", "tls/server.key", "state/ca/ca.key"):
        assert stat.S_IMODE((target / secret).stat().st_mode) == 0o600, secret
    assert (target / "portal.yaml").resolve() == (target / "gateway.yaml").resolve()
    assert (target / "state/ca/crl.der").is_file()  # the CA's first CRL: serve starts only with one
    assert "gateway users add" in result.stdout and "gateway-crl.timer" in result.stdout
    assert "systemctl enable --now gateway@" in result.stdout
    check = gateway("check-config", "--config", str(target / "gateway.yaml"))
    assert (check.returncode, check.stderr) == (0, ""), check.stderr
    doc = yaml.safe_load((target / "gateway.yaml").read_text(encoding="utf-8"))
    assert [(b["name"], b["prefix"]) for b in doc["backends"]] == [
        ("tdnet", "/onre/"),
        ("j-iriss", "/nt/"),
        ("clearing", "/jpxcube/"),
    ]


def test_the_written_config_names_every_key_with_its_comment(tmp_path: Path) -> None:
    assert init(tmp_path / "etc").returncode == 0
    text = (tmp_path / "etc" / "gateway.yaml").read_text(encoding="utf-8")
    for key, _check in schema_keys():
        leaf = key.rsplit(".", 1)[-1]
        assert re.search(rf"^\s*(#\s*)?(- )?{re.escape(leaf)}:", text, re.M) or re.search(
            rf"[{{,]\s*{re.escape(leaf)}:", text
        ), f"{key} is not in the written gateway.yaml"


@pytest.mark.parametrize(
    "existing", ["gateway.yaml", "portal.yaml", "session.key", "tls/server.key", "state/ca/ca.key"]
)
def test_init_refuses_to_overwrite_anything_and_writes_nothing(tmp_path: Path, existing: str) -> None:
    target = tmp_path / "etc"
    (target / existing).parent.mkdir(parents=True)
    (target / existing).write_text("mine\n", encoding="utf-8")
    before = files_under(target)
    result = init(target)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "refuses to overwrite" in result.stderr, result.stderr
    assert str(target / existing) in result.stderr
    assert files_under(target) == before
    assert (target / existing).read_text(encoding="utf-8") == "mine\n"


def test_init_uses_an_existing_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    assert gateway("ca", "init", "--dir", str(ca)).returncode == 0
    key_before = (ca / "ca.key").read_bytes()
    result = init(tmp_path / "etc", "--ca", str(ca))
    assert result.returncode == 0, result.stderr
    assert (ca / "ca.key").read_bytes() == key_before
    assert not (tmp_path / "etc" / "state" / "ca").exists()
    config = yaml.safe_load((tmp_path / "etc" / "gateway.yaml").read_text(encoding="utf-8"))
    assert config["ca"]["dir"] == str(ca)
    assert gateway("check-config", "--config", str(tmp_path / "etc" / "gateway.yaml")).returncode == 0


def test_init_refuses_a_ca_dir_without_a_ca(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = init(tmp_path / "etc", "--ca", str(tmp_path / "empty"))
    assert result.returncode == 2 and "no CA here" in result.stderr
    assert not (tmp_path / "etc").exists()


def test_init_refuses_a_bad_host_name_before_writing(tmp_path: Path) -> None:
    result = gateway("init", str(tmp_path / "etc"), "--hostname", "bad_name!")
    assert result.returncode == 2
    assert not (tmp_path / "etc").exists()


def _client_files(p12: Path, directory: Path) -> tuple[Path, Path]:
    key, cert, _chain = pkcs12.load_key_and_certificates(p12.read_bytes(), b"")
    assert key is not None and cert is not None
    cert_path, key_path = directory / "client.pem", directory / "client.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_serve_starts_on_the_written_directory(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    target = tmp_path / "etc"
    assert init(target, port=port, admin=admin).returncode == 0
    config = str(target / "gateway.yaml")
    assert gateway("check-config", "--config", config).returncode == 0
    issued = gateway("ca", "issue", "LC000001", "--out", str(tmp_path / "LC000001.p12"), "--config", config)
    assert issued.returncode == 0, issued.stderr
    log = (tmp_path / "serve.out").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", config], stdout=log, stderr=log)
    try:
        deadline, status = time.monotonic() + 60, 0
        while time.monotonic() < deadline and status != 200:
            assert proc.poll() is None, (tmp_path / "serve.out").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=5) as r:
                    status = r.status
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        assert status == 200
        ctx = ssl.create_default_context(cafile=str(target / "state" / "ca" / "ca.pem"))
        ctx.load_cert_chain(*_client_files(tmp_path / "LC000001.p12", tmp_path))
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), _NoRedirect())
        try:
            opener.open(f"https://127.0.0.1:{port}/onre/", timeout=10)
            raise AssertionError("expected a redirect to the login page")
        except urllib.error.HTTPError as exc:
            assert exc.code in (302, 303), exc.code
            location = exc.headers["Location"]
        assert "/_gateway/login" in location
        with opener.open(urllib.parse.urljoin(f"https://127.0.0.1:{port}/onre/", location), timeout=10) as r:
            assert r.status == 200
            assert 'name="password"' in r.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def readme_bootstrap() -> list[str]:
    """The commands of the README's bootstrap block (the fenced block after its marker comment)."""
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- bootstrap: tested -->\s*```sh\n(.*?)```", text, re.S)
    assert found, "README.md lost its bootstrap block"
    return [line for line in found.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_readme_bootstrap_runs_as_written_on_an_empty_directory(tmp_path: Path) -> None:
    commands = readme_bootstrap()
    assert commands[0].startswith("gateway init ")
    bindir = Path(sys.executable).parent
    assert shutil.which("gateway", path=str(bindir)), "the gateway script is not installed in the venv"
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("GATEWAY_CONFIG", None)
    for command in commands:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"

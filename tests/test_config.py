"""Config loading: every problem named with file, key path and expectation; the example parses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.cli import main
from gateway.config import load_config, require_gateway
from gateway.errors import ConfigError
from gateway.pkifiles import ThrowawayPki
from tests.harness import write_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "gateway.example.yaml"


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return list(info.value.problems)


def test_example_config_parses_with_every_section() -> None:
    config = load_config(EXAMPLE)
    assert config.listen.port == 8443
    assert [b.name for b in config.backends] == ["tdnet", "j-iriss", "clearing"]
    assert config.tls is not None and config.tls.issuer == "Tokyo Stock Exchange SSO CA"
    assert config.ca is not None and config.portal is not None
    assert config.revocation is not None and config.revocation.sources[0].endswith("certs/ca/crl.der")


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    path = write(tmp_path, {"users": {"database": "db/users.db"}})
    assert load_config(path).users.database == (tmp_path / "db" / "users.db").resolve()


def test_every_problem_names_file_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "listen": {"port": "eighty"},
            "workers": 0,
            "backends": [{"name": "tdnet", "prefix": "onre", "upstream": "ftp://x"}],
            "revocation": {"crl": "x.crl", "refresh_seconds": -1},
            "tls": {"cert": "a"},
            "unknown": 1,
        },
    )
    lines = problems(path)
    joined = "\n".join(lines)
    assert all(line.startswith(f"{path.resolve()}: ") for line in lines)
    for key in (
        "listen.port",
        "workers",
        "backends[0].prefix",
        "backends[0].upstream",
        "revocation.refresh_seconds",
        "tls.key",
        "tls.client_ca",
        "unknown",
    ):
        assert f": {key}: " in joined, key
    assert "a port number" in joined and "must start and end with '/'" in joined


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: {host: [\n")
    [line] = problems(path)
    assert "line 2" in line or "line 1" in line


def test_duplicate_backends_and_unknown_system(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "backends": [
                {"name": "tdnet", "prefix": "/a/", "upstream": "http://h"},
                {"name": "tdnet", "prefix": "/a/", "upstream": "http://h"},
                {"name": "other", "prefix": "/b/", "upstream": "http://h"},
            ]
        },
    )
    joined = "\n".join(problems(path))
    assert "duplicate backend name" in joined and "duplicate route" in joined
    assert "backends[2].system: missing" in joined


def test_gateway_requires_files_to_exist(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "tls": {"cert": "c.pem", "key": "k.pem", "client_ca": "ca.pem"},
            "revocation": {"crl": "ca.crl"},
            "backends": [{"name": "tdnet", "prefix": "/onre/", "upstream": "http://h"}],
        },
    )
    with pytest.raises(ConfigError) as info:
        require_gateway(load_config(path))
    joined = "\n".join(info.value.problems)
    assert "tls.cert: file not found" in joined and "session.secret_file: file not found" in joined


def test_check_config_cli_ok_and_failing(tmp_path: Path, pki: ThrowawayPki, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_config(tmp_path, pki, {"tdnet": 1, "j-iriss": 2, "clearing": 3})
    assert main(["check-config", "--config", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    pki.server_key.write_text("not a key")
    assert main(["check-config", "--config", str(good)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "tls" in err


def test_check_config_cli_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err

"""Config loading: every problem named with file, key path and expectation; the example parses."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.certs.files import ThrowawayPki
from gateway.cli import main
from gateway.config import Check, Config, load_config, parse_config, require_gateway
from gateway.errors import ConfigError
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


# --- the declared schema, key by key ------------------------------------------------------------
# These walk the schema itself (gateway.config's dataclasses), so a key added there is covered here
# without editing this file.


def schema_keys(cls: type[Any] = Config, where: str = "") -> Iterator[tuple[str, Check[Any]]]:
    """(key path, check) of every scalar setting, descending into sections (backends as backends[0])."""
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f.metadata.get("key") or f.name
        path = f"{where}.{key}" if where else key
        if "section" in f.metadata:
            yield from schema_keys(f.metadata["section"], path)
        elif "sections" in f.metadata:
            yield from schema_keys(f.metadata["sections"], f"{path}[0]")
        else:
            yield path, f.metadata["check"]


def schema_sections(cls: type[Any] = Config, where: str = "") -> Iterator[str]:
    for f in dataclasses.fields(cls):
        key = f.metadata.get("key") or f.name
        path = f"{where}.{key}" if where else key
        if "section" in f.metadata:
            yield path
            yield from schema_sections(f.metadata["section"], path)
        elif "sections" in f.metadata:
            yield f"{path}[0]"
            yield from schema_sections(f.metadata["sections"], f"{path}[0]")


def example_with(path: str, value: object) -> dict[str, Any]:
    """The example config (every section present) with ``value`` put at ``path``."""
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    node: Any = doc
    parts = [int(p) if p.isdigit() else p for p in re.split(r"\.|\[(\d+)\]", path) if p]
    for part in parts[:-1]:
        if isinstance(node, dict) and node.get(part) is None:
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return doc


@pytest.mark.parametrize(("key", "check"), list(schema_keys()), ids=[k for k, _ in schema_keys()])
def test_every_key_refuses_a_wrong_value_naming_file_key_and_expectation(
    tmp_path: Path, key: str, check: Check[Any]
) -> None:
    lines = problems(write(tmp_path, example_with(key, {"wrong": 1})))
    assert f"{(tmp_path / 'g.yaml').resolve()}: {key}: expected {check.expected}, got {{'wrong': 1}}" in lines, lines


@pytest.mark.parametrize("where", list(schema_sections()))
def test_every_section_refuses_an_unknown_key(tmp_path: Path, where: str) -> None:
    lines = problems(write(tmp_path, example_with(f"{where}.colour", 1)))
    assert any(f": {where}.colour: unknown key (expected one of: " in line for line in lines), lines


@pytest.mark.parametrize("key", [k for k, _ in schema_keys()])
def test_every_key_is_documented_in_the_example_config(key: str) -> None:
    leaf = re.sub(r"\[\d+\]", "", key).rsplit(".", 1)[-1]
    assert re.search(rf"^\s*(#\s*)?(- )?{re.escape(leaf)}:", EXAMPLE.read_text(encoding="utf-8"), re.M) or re.search(
        rf"[{{,]\s*{re.escape(leaf)}:", EXAMPLE.read_text(encoding="utf-8")
    ), f"{key} is not in {EXAMPLE.name}"


def test_required_keys_are_named_when_missing(tmp_path: Path) -> None:
    doc = example_with("tls.cert", None)
    doc["backends"][0].pop("upstream")
    lines = problems(write(tmp_path, doc))
    assert any(": tls.cert: missing; expected a path to a PEM file" in line for line in lines), lines
    assert any(": backends[0].upstream: missing; expected an http(s) URL" in line for line in lines), lines


def test_an_empty_client_ca_list_is_refused(tmp_path: Path) -> None:
    lines = problems(write(tmp_path, example_with("tls.client_ca", [])))
    assert any(": tls.client_ca: missing; expected a PEM bundle path (or a list of them)" in line for line in lines)


def test_the_database_string_is_shorthand_for_a_mapping_and_auto_pools_fit_the_default_max_connections(
    tmp_path: Path,
) -> None:
    from gateway.config import INSTANCE_CONNECTION_BUDGET, WORKER_EXTRA_CONNECTIONS

    config = parse_config({"database": "postgresql://gw@db.example.jp/gateway"}, tmp_path / "g.yaml")
    assert config.database is not None and config.database.url == "postgresql://gw@db.example.jp/gateway"
    assert config.database.outage_grace == 30.0 and config.database.pool_size is None
    for workers in range(1, 7):  # workers: auto on hosts of up to 6 cores
        per_instance = workers * (config.database.pool_for(workers) + WORKER_EXTRA_CONNECTIONS)
        assert per_instance <= INSTANCE_CONNECTION_BUDGET, workers
    portal = config.database.pool_for(1) + 1  # one process: its pool and its audit writer
    assert 3 * INSTANCE_CONNECTION_BUDGET + portal <= 100 - 3  # PostgreSQL's default, minus superuser slots


def test_a_store_set_both_as_a_file_and_in_the_database_is_refused(tmp_path: Path) -> None:
    data = {"database": "postgresql://gw@db/gateway", "users": {"database": "x.db"}, "audit": {"database": "a.db"}}
    lines = problems(write(tmp_path, data))
    assert any(": users.database: set together with the top-level database:" in line for line in lines), lines
    assert any(": audit.database: set together with the top-level database:" in line for line in lines), lines
    assert parse_config({"users": {"database": "x.db"}}, tmp_path / "g.yaml").database is None  # SQLite alone: fine


def test_the_instance_defaults_to_the_host_name_and_refuses_odd_names(tmp_path: Path) -> None:
    assert parse_config({}, tmp_path / "g.yaml").instance
    assert parse_config({"instance": "gw-tdnet-1"}, tmp_path / "g.yaml").instance == "gw-tdnet-1"
    lines = problems(write(tmp_path, {"instance": "gw a"}))
    assert any(": instance: expected an instance name, got 'gw a'" in line for line in lines), lines


@pytest.mark.parametrize(
    "url",
    ["mysql://gw:S3cret-pw@db/gateway", "postgresql://gw:S3cret-pw@db/", "postgresql://gw@db/gw?password=S3cret-pw"],
)
def test_a_wrong_database_url_is_named_without_its_password(tmp_path: Path, url: str) -> None:
    lines = problems(write(tmp_path, {"database": url}))
    assert any(": database.url: expected " in line for line in lines), lines
    assert not any("S3cret-pw" in line for line in lines), lines

"""``gateway ca ...`` end to end through ``gateway.cli.main``, on real CA directories."""

from __future__ import annotations

import datetime as dt
import io
import json
import stat
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, pkcs12

from gateway import cli
from gateway.audit.events import AuditFilter, EventKind, serial_hex
from gateway.audit.store import AuditStore
from gateway.storage import pg_issuance, postgres


@pytest.fixture(autouse=True)
def _only_ca_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the real parser with just the ``ca`` commands (other concerns land separately)."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("gateway.cli.ca",))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def ca_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    directory = tmp_path / "ca"
    assert run(capsys, "ca", "init", "--dir", str(directory))[0] == 0
    return directory


def _serials(capsys: pytest.CaptureFixture[str], ca_dir: Path, *extra: str) -> list[str]:
    code, out, _ = run(capsys, "ca", "list", "--dir", str(ca_dir), "--format", "json", *extra)
    assert code == 0
    return [row["serial"] for row in json.loads(out)]


# -- init ---------------------------------------------------------------------


def test_init_creates_and_never_prints_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "ca", "init", "--dir", str(tmp_path / "ca"))
    assert code == 0, err
    assert "PRIVATE KEY" not in out + err
    key_text = (tmp_path / "ca" / "ca.key").read_text()
    assert key_text.splitlines()[1] not in out + err
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600


def test_init_refuses_an_existing_ca(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (ca_dir / "ca.key").read_bytes()
    code, out, err = run(capsys, "ca", "init", "--dir", str(ca_dir))
    assert code == 2 and out == ""
    assert "refusing to overwrite" in err
    assert err.count("\n") == 1  # one line
    assert (ca_dir / "ca.key").read_bytes() == before


def test_init_key_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "ca", "init", "--dir", str(tmp_path / "ca"), "--key-type", "rsa-2048")
    assert code == 0 and "rsa-2048" in out
    key = load_pem_private_key((tmp_path / "ca" / "ca.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048


def test_commands_need_dir_or_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    assert cli.main(["ca", "crl"]) == 2
    assert "--config FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["ca", "crl", "--dir", str(tmp_path), "--config", str(tmp_path / "g.yaml")])
    capsys.readouterr()


# -- issue --------------------------------------------------------------------


def test_issue_writes_a_pkcs12_without_password(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "LC000001.p12"
    code, out, err = run(
        capsys,
        "ca",
        "issue",
        "LC000001",
        "--out",
        str(out_file),
        "--dir",
        str(ca_dir),
        "--windows-login",
        "CORP\\taro",
    )
    assert code == 0, err
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
    key, cert, chain = pkcs12.load_key_and_certificates(out_file.read_bytes(), None)
    assert key is not None and cert is not None
    assert cert.subject.rfc4514_string() == "CN=LC000001"
    assert [c.subject for c in chain] == [cert.issuer]
    assert serial_hex(cert.serial_number) in out
    assert "format default, empty password" in out


def test_issue_twice_is_the_duplicate_error(ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "ca", "issue", "LC000001", "--out", str(tmp_path / "a.p12"), "--dir", str(ca_dir))[0] == 0
    code, _, err = run(capsys, "ca", "issue", "LC000001", "--out", str(tmp_path / "b.p12"), "--dir", str(ca_dir))
    assert code == 2
    assert "証明書重複エラー: 既に有効な証明書が発行されています" in err
    assert "revoke it first" in err
    assert not (tmp_path / "b.p12").exists()
    # Twin: another user gets one.
    assert run(capsys, "ca", "issue", "LC000002", "--out", str(tmp_path / "c.p12"), "--dir", str(ca_dir))[0] == 0


def test_issue_refuses_to_overwrite_the_output(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "x.p12"
    existing.write_bytes(b"keep me")
    code, _, err = run(capsys, "ca", "issue", "LC000001", "--out", str(existing), "--dir", str(ca_dir))
    assert code == 2 and "refusing to overwrite" in err
    assert existing.read_bytes() == b"keep me"
    assert _serials(capsys, ca_dir) == []  # nothing was issued


@pytest.mark.parametrize(("stdin", "password"), [("pa ss word\n", b"pa ss word"), ("\n", None)])
def test_issue_password_stdin(
    ca_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    stdin: str,
    password: bytes | None,
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    out_file = tmp_path / "u.p12"
    code, out, err = run(
        capsys, "ca", "issue", "LC000001", "--out", str(out_file), "--password-stdin", "--dir", str(ca_dir)
    )
    assert code == 0, err
    _, cert, _ = pkcs12.load_key_and_certificates(out_file.read_bytes(), password)
    assert cert is not None
    if password:
        assert password.decode() not in out + err
        with pytest.raises(ValueError):
            pkcs12.load_key_and_certificates(out_file.read_bytes(), None)


@pytest.mark.parametrize(("fmt", "mac"), [("password", "sha256"), ("legacy", "sha1")])
def test_issue_format_with_password_stdin(
    ca_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    mac: str,
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("file secret\n"))
    out_file = tmp_path / "u.p12"
    argv = ("ca", "issue", "LC000001", "--out", str(out_file), "--format", fmt, "--password-stdin")
    code, out, err = run(capsys, *argv, "--dir", str(ca_dir))
    assert code == 0, err
    assert f"format {fmt}, password set" in out and "file secret" not in out + err
    info = subprocess.run(
        ["openssl", "pkcs12", "-info", "-nokeys", "-in", str(out_file), "-passin", "pass:file secret"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert info.returncode == 0 and f"MAC: {mac}" in info.stdout + info.stderr


def test_issue_format_prompts_for_the_password_twice(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter(["file secret", "file secret", "file secret", "other secret"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    out_file = tmp_path / "u.p12"
    code, _, err = run(
        capsys, "ca", "issue", "LC000001", "--out", str(out_file), "--format", "legacy", "--dir", str(ca_dir)
    )
    assert code == 0, err
    assert pkcs12.load_key_and_certificates(out_file.read_bytes(), b"file secret")[1] is not None
    # Twin: two different answers issue nothing.
    code, _, err = run(
        capsys, "ca", "issue", "LC000002", "--out", str(tmp_path / "v.p12"), "--format", "legacy", "--dir", str(ca_dir)
    )
    assert code == 2 and "differ" in err
    assert not (tmp_path / "v.p12").exists()
    assert len(_serials(capsys, ca_dir)) == 1


@pytest.mark.parametrize(
    ("fmt", "stdin", "why"),
    [
        ("password", "\n", "needs a password"),
        ("legacy", "\n", "needs a password"),
        ("password", "short\n", "at least 8 characters"),
        ("default", "file secret\n", "the default format has no password"),
    ],
)
def test_issue_refuses_a_password_that_does_not_fit_the_format(
    ca_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
    stdin: str,
    why: str,
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    out_file = tmp_path / "u.p12"
    argv = ("ca", "issue", "LC000001", "--out", str(out_file), "--format", fmt, "--password-stdin")
    code, out, err = run(capsys, *argv, "--dir", str(ca_dir))
    assert code == 2 and out == "" and why in err and "nothing was issued" in err
    assert not out_file.exists()
    assert _serials(capsys, ca_dir) == []


# -- list ---------------------------------------------------------------------


def test_list_table_and_json(ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for user in ("LC000001", "LC000002"):
        run(capsys, "ca", "issue", user, "--out", str(tmp_path / f"{user}.p12"), "--dir", str(ca_dir))
    (first,) = _serials(capsys, ca_dir, "--user", "LC000001")
    (second,) = _serials(capsys, ca_dir, "--user", "LC000002")
    run(capsys, "ca", "revoke", first, "--reason", "superseded", "--dir", str(ca_dir))

    code, out, _ = run(capsys, "ca", "list", "--dir", str(ca_dir))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["No.", "User", "ID", "Serial", "Expiry", "Status", "Revoked"]
    assert any(first in line and line.count("+09:00") == 2 for line in lines)  # expiry and revocation, JST
    assert any(first in line and "Revoked (失効)" in line for line in lines)
    assert any(second in line and "Valid (有効)" in line and line.rstrip().endswith("-") for line in lines)

    code, out, _ = run(capsys, "ca", "list", "--dir", str(ca_dir), "--format", "json", "--status", "revoked")
    rows = json.loads(out)
    assert [(r["serial"], r["status"], r["status_ja"], r["revocation_reason"]) for r in rows] == [
        (first, "revoked", "失効", "superseded")
    ]
    assert rows[0]["revoked_at"].endswith("+00:00") and rows[0]["not_after"].endswith("+00:00")  # JSON: UTC
    assert rows[0]["requested_by"].startswith("cli:")
    assert _serials(capsys, ca_dir, "--user", "LC000002") == [second]
    assert _serials(capsys, ca_dir, "--status", "valid") == [second]
    assert _serials(capsys, ca_dir, "--status", "expired") == []


def test_list_empty(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "ca", "list", "--dir", str(ca_dir))
    assert code == 0 and "(no certificates)" in out


# -- revoke and crl -------------------------------------------------------------


def test_revoke_accepts_pasted_serial_and_publishes(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "ca", "issue", "LC000001", "--out", str(tmp_path / "u.p12"), "--dir", str(ca_dir))
    (serial,) = _serials(capsys, ca_dir)
    pasted = ":".join(serial.lower()[i : i + 2] for i in range(0, len(serial), 2))
    code, out, err = run(capsys, "ca", "revoke", pasted, "--reason", "keyCompromise", "--dir", str(ca_dir))
    assert code == 0, err
    assert serial in out and "CRL #2" in out
    crl = x509.load_der_x509_crl((ca_dir / "crl.der").read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(int(serial, 16))
    assert entry is not None
    code, _, err = run(capsys, "ca", "revoke", serial, "--reason", "keyCompromise", "--dir", str(ca_dir))
    assert code == 2 and "already revoked" in err


@pytest.mark.parametrize(("serial", "message"), [("ABCDEF", "no certificate"), ("xyz", "hexadecimal")])
def test_revoke_bad_serial(ca_dir: Path, capsys: pytest.CaptureFixture[str], serial: str, message: str) -> None:
    code, _, err = run(capsys, "ca", "revoke", serial, "--reason", "unspecified", "--dir", str(ca_dir))
    assert code == 2 and message in err


def test_revoke_reason_must_be_rfc5280(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["ca", "revoke", "ABC", "--reason", "certificateHold", "--dir", str(ca_dir)])
    assert "invalid choice" in capsys.readouterr().err


def test_crl_now_and_if_due(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "ca", "crl", "--dir", str(ca_dir), "--if-due")
    assert code == 0 and "nothing to do" in out
    code, out, _ = run(capsys, "ca", "crl", "--dir", str(ca_dir))
    assert code == 0 and "CRL #2" in out
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2


def test_server_cert(ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert_path, key_path = tmp_path / "gw.pem", tmp_path / "gw.key"
    code, out, err = run(
        capsys,
        "ca",
        "server-cert",
        "gateway.example",
        "127.0.0.1",
        "--dir",
        str(ca_dir),
        "--out-cert",
        str(cert_path),
        "--out-key",
        str(key_path),
    )
    assert code == 0, err
    leaf, ca_cert = x509.load_pem_x509_certificates(cert_path.read_bytes())
    assert ca_cert.subject == leaf.issuer
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert "PRIVATE KEY" not in out
    assert _serials(capsys, ca_dir, "--kind", "server") == [serial_hex(leaf.serial_number)]


# -- --config -------------------------------------------------------------------


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(body, encoding="utf-8")
    return path


def test_config_supplies_dir_settings_and_audit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(
        tmp_path,
        "ca:\n  dir: ca\n  crl_url: http://gw.example/crl\n  crl_next_update_hours: 6\naudit:\n  database: audit.db\n",
    )
    assert run(capsys, "ca", "init", "--config", str(config))[0] == 0
    out_file = tmp_path / "u.p12"
    code, _, err = run(capsys, "ca", "issue", "LC000001", "--out", str(out_file), "--config", str(config))
    assert code == 0, err
    _, cert, _ = pkcs12.load_key_and_certificates(out_file.read_bytes(), None)
    assert cert is not None
    cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert cdp[0].full_name is not None and cdp[0].full_name[0].value == "http://gw.example/crl"
    serial = serial_hex(cert.serial_number)
    assert run(capsys, "ca", "revoke", serial, "--reason", "superseded", "--config", str(config))[0] == 0
    crl = x509.load_der_x509_crl((tmp_path / "ca" / "crl.der").read_bytes())
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(hours=6)
    # Revoked: a new one at once; then a third is refused, and the refusal is audited too.
    assert run(capsys, "ca", "issue", "LC000001", "--out", str(tmp_path / "v.p12"), "--config", str(config))[0] == 0
    assert run(capsys, "ca", "issue", "LC000001", "--out", str(tmp_path / "w.p12"), "--config", str(config))[0] == 2
    with AuditStore(tmp_path / "audit.db") as store:
        events = store.query(AuditFilter(limit=100))
    assert sorted(e.event.value for e in events) == [
        "certificate_issued",
        "certificate_issued",
        "certificate_revoked",
        "crl_published",
        "issuance_refused",
    ]
    issued = [e for e in events if e.event is EventKind.CERTIFICATE_ISSUED]
    assert [e.detail for e in issued] == ["pkcs12 format default"] * 2
    refused = next(e for e in events if e.event is EventKind.ISSUANCE_REFUSED)
    assert refused.reason == "certificate_duplicate" and refused.user_id == "LC000001"
    revoked = [e for e in events if e.event is EventKind.CERTIFICATE_REVOKED]
    assert revoked[0].cert_serial == serial and revoked[0].reason == "superseded"
    assert revoked[0].actor.startswith("cli:")


def test_config_without_ca_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, "log_level: info\n")
    code, _, err = run(capsys, "ca", "crl", "--config", str(config))
    assert code == 2 and "ca: missing" in err


def test_dir_without_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "ca", "list", "--dir", str(tmp_path))
    assert code == 2 and "gateway ca init" in err


# -- server-cert: names are validated, existing files are kept (real CLI, a subprocess) -------------------------

LONG_NAME = "a" * 40 + "." + "b" * 40 + ".example"  # 89 characters: a fine DNS name, too long for a CN


def _server_cert(ca_dir: Path, *names: str, force: bool = False) -> subprocess.CompletedProcess[str]:
    flags = ["--force"] if force else []
    return subprocess.run(
        [sys.executable, "-m", "gateway", "ca", "server-cert", "--dir", str(ca_dir), *flags, "--", *names],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty host name"),
        ("bad name!", "is not a DNS name or IP address"),
        ("-gw.example", "is not a DNS name or IP address"),
        ("gw..example", "is not a DNS name or IP address"),
        ("*.example.jp", "is not a DNS name or IP address"),
        ("a" * 64 + ".example", "is 64 characters; at most 63"),
        (".".join(["a" * 63] * 4), "is 255 characters; at most 253"),
        ("1.2.3.256", "looks like an IP address but is not one"),
    ],
)
def test_server_cert_refuses_a_bad_name_in_one_line(ca_dir: Path, name: str, why: str) -> None:
    result = _server_cert(ca_dir, name)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and why in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (ca_dir / "server.pem").exists()


@pytest.mark.parametrize(
    ("names", "common_name", "sans"),
    [
        (["gw.example.jp", "127.0.0.1", "::1"], "gw.example.jp", ["gw.example.jp", "127.0.0.1", "::1"]),
        (["gw.example.jp."], "gw.example.jp.", ["gw.example.jp."]),
        ([LONG_NAME, "gw.example.jp"], "gw.example.jp", [LONG_NAME, "gw.example.jp"]),
        ([LONG_NAME], None, [LONG_NAME]),
    ],
)
def test_server_cert_accepts_host_names_and_addresses(
    ca_dir: Path, names: list[str], common_name: str | None, sans: list[str]
) -> None:
    result = _server_cert(ca_dir, *names)
    assert result.returncode == 0, result.stderr
    leaf = x509.load_pem_x509_certificates((ca_dir / "server.pem").read_bytes())[0]
    cns = [a.value for a in leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    assert cns == ([common_name] if common_name else [])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    got = [str(v) for v in san.value.get_values_for_type(x509.DNSName)]
    got += [str(v) for v in san.value.get_values_for_type(x509.IPAddress)]
    assert sorted(got) == sorted(sans)
    assert san.critical is (common_name is None)  # no CN: the SANs are the only name (RFC 5280 4.2.1.6)


def test_server_cert_keeps_an_existing_key_unless_forced(ca_dir: Path) -> None:
    assert _server_cert(ca_dir, "gw.example.jp").returncode == 0
    key_before = (ca_dir / "server.key").read_bytes()
    again = _server_cert(ca_dir, "gw.example.jp")
    assert again.returncode == 2
    assert again.stderr == f"error: {ca_dir}/server.key: exists; refusing to overwrite it (--force replaces it)\n"
    assert (ca_dir / "server.key").read_bytes() == key_before
    forced = _server_cert(ca_dir, "gw.example.jp", force=True)
    assert forced.returncode == 0, forced.stderr
    assert (ca_dir / "server.key").read_bytes() != key_before
    assert stat.S_IMODE((ca_dir / "server.key").stat().st_mode) == 0o600


def test_with_a_database_concurrent_cli_issues_yield_one_valid_certificate(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``gateway ca`` processes sharing PostgreSQL (as on several hosts): the database enforces the rule."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        postgres.migrate(conn, [pg_issuance.SCHEMA])
    config = _config(tmp_path, f"ca:\n  dir: ca\ndatabase:\n  url: {pg_url}\n")
    assert run(capsys, "ca", "init", "--config", str(config))[0] == 0
    assert not (tmp_path / "ca" / "issuance.db").exists()  # the records are in the database
    argv = [sys.executable, "-m", "gateway", "ca", "issue", "LC000001", "--config", str(config), "--out"]
    procs = [
        subprocess.Popen(
            [*argv, str(tmp_path / f"{i}.p12")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(4)
    ]
    outcomes = []
    for proc in procs:
        _out, err = proc.communicate(timeout=120)
        outcomes.append(proc.returncode)
        assert proc.returncode == 0 or "証明書重複エラー" in err.decode(), err.decode()
    assert sorted(outcomes) == [0, 2, 2, 2]
    code, out, _ = run(capsys, "ca", "list", "--status", "valid", "--format", "json", "--config", str(config))
    assert code == 0 and len(json.loads(out)) == 1

"""One set of rules for every ``gateway`` command: config lookup, spellings, times, serials, counts, help.

Run through the real entry point (``gateway.cli.main``) on real files, and
as real subprocesses where the environment and the working directory are
the point.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from gateway import cli
from gateway.audit.events import FIELDS, AuditEvent, EventKind, normalize_serial, serial_hex, utcnow
from gateway.audit.store import _INSERT, AuditStore, _row
from gateway.ca.authority import CertificateAuthority
from gateway.certs import builders as pki
from gateway.cli.common import CONFIG_ENV, format_person_time
from gateway.web.messages import plural

REPO = Path(__file__).resolve().parent.parent
CONFIG_BODY = "users:\n  database: users.db\naudit:\n  database: audit.db\nca:\n  dir: ca\n"
# An odd number of hex digits: openssl prints it with a leading zero (0F1127...).
ODD_SERIAL = int("F1127" + "AB" * 17, 16)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory and no $GATEWAY_CONFIG."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    return work


@pytest.fixture
def deployment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A config with users, audit and a CA, in a directory of its own."""
    directory = tmp_path / "deploy"
    directory.mkdir()
    config = directory / "gateway.yaml"
    config.write_text(CONFIG_BODY, encoding="utf-8")
    assert run(capsys, "ca", "init", "--config", str(config))[0] == 0
    with AuditStore(directory / "audit.db"):
        pass  # created, as a running gateway would have
    return config


# -- one rule for finding the config -------------------------------------------------

COMMANDS_WITH_CONFIG = [
    ["serve"],
    ["check-config"],
    ["reload"],
    ["portal"],
    ["users", "list"],
    ["audit", "list"],
    ["ca", "list"],
]


@pytest.mark.parametrize("command", COMMANDS_WITH_CONFIG, ids=" ".join)
def test_without_any_config_every_command_names_the_three_ways(
    command: list[str], no_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, *command)
    assert code in (1, 2) and out == ""
    assert err.count("\n") == 1, err  # one line
    assert "--config FILE" in err and "$GATEWAY_CONFIG" in err and "./gateway.yaml" in err


@pytest.mark.parametrize("command", [["users", "list"], ["audit", "list"], ["ca", "list"]], ids=" ".join)
def test_config_from_env_then_cwd_then_flag(
    command: list[str],
    no_config: Path,
    deployment: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # $GATEWAY_CONFIG
    monkeypatch.setenv(CONFIG_ENV, str(deployment))
    code, _, err = run(capsys, *command)
    assert code == 0, err
    # ./gateway.yaml in the working directory
    monkeypatch.delenv(CONFIG_ENV)
    monkeypatch.chdir(deployment.parent)
    code, _, err = run(capsys, *command)
    assert code == 0, err
    # --config wins over $GATEWAY_CONFIG
    monkeypatch.chdir(no_config)
    monkeypatch.setenv(CONFIG_ENV, str(no_config / "missing.yaml"))
    code, _, err = run(capsys, *command, "--config", str(deployment))
    assert code == 0, err
    code, _, err = run(capsys, *command)
    assert code == 2 and "missing.yaml" in err


def test_the_rule_holds_in_a_real_process(no_config: Path, deployment: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    argv = [sys.executable, "-m", "gateway", "users", "list", "--format", "json"]
    found = subprocess.run(argv, cwd=deployment.parent, env=env, capture_output=True, text=True, check=False)
    assert found.returncode == 0 and json.loads(found.stdout) == [], found.stderr
    env[CONFIG_ENV] = str(deployment)
    found = subprocess.run(argv, cwd=no_config, env=env, capture_output=True, text=True, check=False)
    assert found.returncode == 0, found.stderr
    del env[CONFIG_ENV]
    missing = subprocess.run(argv, cwd=no_config, env=env, capture_output=True, text=True, check=False)
    assert missing.returncode == 2 and "$GATEWAY_CONFIG" in missing.stderr


def _leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the tree with its command line, the root included."""
    yield " ".join(("gateway", *path)), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _leaves(child, (*path, name))


def test_every_config_option_is_the_one_option() -> None:
    """Same flag, same default (resolved later), same help, on every command that reads a config."""
    with_config = []
    for line, parser in _leaves(cli.build_parser()):
        options = {opt: action for action in parser._actions for opt in action.option_strings}
        if "--config" in options:
            action = options["--config"]
            assert action.default is None and action.metavar == "FILE", line
            assert "$GATEWAY_CONFIG" in (action.help or ""), line
            with_config.append(line)
    assert {" ".join(("gateway", *c)) for c in COMMANDS_WITH_CONFIG} <= set(with_config)


# -- one spelling for systems --------------------------------------------------------


def test_set_systems_takes_the_same_option_as_add(
    deployment: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("correct horse battery\n"))
    assert run(capsys, "users", "add", "LC000001", "--systems", "tdnet", "--config", str(deployment))[0] == 0
    code, _, err = run(capsys, "users", "set-systems", "LC000001", "--systems", "clearing", "--config", str(deployment))
    assert code == 0 and "may now use: clearing" in err
    with pytest.raises(SystemExit) as exited:  # the old positional spelling is gone
        cli.main(["users", "set-systems", "LC000001", "tdnet", "--config", str(deployment)])
    assert exited.value.code == 2
    capsys.readouterr()


# -- times: JST for people, UTC in JSON ----------------------------------------------


def test_person_time_is_jst_with_the_offset() -> None:
    moment = dt.datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=dt.UTC)
    assert format_person_time(moment) == "2026-11-30 21:00:00+09:00"
    assert format_person_time(moment.replace(tzinfo=None)) == "2026-11-30 21:00:00+09:00"  # naive = UTC


def test_audit_table_in_jst_json_in_utc(deployment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    when = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
    with AuditStore(deployment.parent / "audit.db") as store:
        store.append([AuditEvent(EventKind.LOGIN, time=when, user_id="LC000001")])
    common = ("audit", "list", "--config", str(deployment), "--since", "2026-11-29")
    code, out, _ = run(capsys, *common)
    assert code == 0 and "2026-11-30 21:00:00+09:00" in out and out.startswith("TIME (JST)")
    code, out, _ = run(capsys, *common, "--format", "json")
    assert code == 0 and json.loads(out)["time"] == "2026-11-30T12:00:00.000Z"


# -- serials as openssl prints them, any spelling accepted ----------------------------


def test_serial_is_printed_as_openssl_prints_it(
    deployment: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(pki, "random_serial", lambda: ODD_SERIAL)
    out_file = tmp_path / "u.p12"
    code, out, err = run(capsys, "ca", "issue", "LC000001", "--out", str(out_file), "--config", str(deployment))
    assert code == 0, err
    ca = CertificateAuthority.open(deployment.parent / "ca")
    pem = tmp_path / "u.pem"
    pem.write_bytes(pki.cert_pem(ca.certificate_of(ODD_SERIAL)))
    shown = subprocess.run(
        ["openssl", "x509", "-noout", "-serial", "-in", str(pem)], capture_output=True, text=True, check=True
    )
    openssl_form = shown.stdout.strip().removeprefix("serial=")
    assert openssl_form.startswith("0F1127") and serial_hex(ODD_SERIAL) == openssl_form
    assert f"issued {openssl_form} to LC000001" in out
    code, out, _ = run(capsys, "ca", "list", "--config", str(deployment), "--format", "json")
    assert [row["serial"] for row in json.loads(out)] == [openssl_form]
    code, out, _ = run(capsys, "ca", "list", "--config", str(deployment))
    assert openssl_form in out


@pytest.mark.parametrize("spelling", ["0F1127", "F1127", "0x0f1127", "0f:11:27"])
def test_revoke_accepts_both_spellings(
    spelling: str,
    deployment: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(pki, "random_serial", lambda: ODD_SERIAL)
    assert run(capsys, "ca", "issue", "LC000001", "--out", str(tmp_path / "u.p12"), "--config", str(deployment))[0] == 0
    typed = spelling + ("AB" * 17 if ":" not in spelling else ":ab" * 17)
    code, out, err = run(capsys, "ca", "revoke", typed, "--reason", "superseded", "--config", str(deployment))
    assert code == 0, err
    assert f"revoked {serial_hex(ODD_SERIAL)}" in out
    crl = x509.load_der_x509_crl((deployment.parent / "ca" / "crl.der").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(ODD_SERIAL) is not None


def test_audit_serial_filter_finds_both_spellings_and_older_rows(
    deployment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = serial_hex(ODD_SERIAL)
    now = utcnow()
    with AuditStore(deployment.parent / "audit.db") as store:
        store.append([AuditEvent(EventKind.REQUEST_REFUSED, reason="certificate_revoked", time=now, cert_serial=odd)])
    # An older store kept serials without the leading zero: such rows are found too.
    old = _row(AuditEvent(EventKind.REQUEST_REFUSED, reason="certificate_expired", time=now))
    old[1 + FIELDS.index("cert_serial")] = odd.lstrip("0")
    with sqlite3.connect(deployment.parent / "audit.db") as conn:
        conn.execute(_INSERT, [*old, None, None, None])  # an unchained row, as before the chain
    for spelling in (odd, odd.lstrip("0"), odd.lower(), "0x" + odd):
        code, out, _ = run(
            capsys, "audit", "list", "--config", str(deployment), "--serial", spelling, "--format", "json"
        )
        rows = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and sorted(r["reason"] for r in rows) == ["certificate_expired", "certificate_revoked"]
    code, out, _ = run(capsys, "audit", "list", "--config", str(deployment), "--serial", odd.lstrip("0"))
    assert out.count(odd) == 2  # the table prints openssl's form for both


def test_normalize_serial_gives_openssl_form() -> None:
    assert normalize_serial("F1127") == normalize_serial("0F1127") == normalize_serial("0x0f:11:27") == "0F1127"
    assert normalize_serial("1A2B") == "1A2B"


# -- counts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "word", "expected"),
    [(0, "entry", "0 entries"), (1, "entry", "1 entry"), (2, "entry", "2 entries"), (1, "byte", "1 byte"),
     (3, "session", "3 sessions"), (1, "audit event", "1 audit event"), (2, "day", "2 days")],
)  # fmt: skip
def test_plural(count: int, word: str, expected: str) -> None:
    assert plural(count, word) == expected


def test_crl_messages_use_the_right_form(deployment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "ca", "crl", "--config", str(deployment))
    assert code == 0 and ": 0 entries, " in out
    run(capsys, "ca", "issue", "LC000001", "--out", str(tmp_path / "u.p12"), "--config", str(deployment))
    (row,) = json.loads(run(capsys, "ca", "list", "--config", str(deployment), "--format", "json")[1])
    code, out, _ = run(capsys, "ca", "revoke", row["serial"], "--reason", "superseded", "--config", str(deployment))
    assert code == 0 and "published with 1 entry\n" in out and "entries" not in out
    code, out, _ = run(capsys, "ca", "crl", "--config", str(deployment))
    assert ": 1 entry, " in out


# -- help ------------------------------------------------------------------------------


def test_every_command_and_subcommand_has_a_description() -> None:
    missing = [line for line, parser in _leaves(cli.build_parser()) if not (parser.description or "").strip()]
    assert missing == []


@pytest.mark.parametrize("command", ["serve", "check-config", "reload", "portal"])
def test_service_commands_help_describes_and_shows_an_example(command: str) -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "gateway", command, "--help"], capture_output=True, text=True, check=False
    )
    assert shown.returncode == 0
    lines = [line for line in shown.stdout.splitlines() if line.strip()]
    assert len(lines) > 4
    assert "example:" in shown.stdout and f"gateway {command} --config " in shown.stdout


# -- ./dev.sh --------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [[], ["no-such-command"]])
def test_dev_sh_without_a_command_prints_its_usage(argv: list[str]) -> None:
    shown = subprocess.run([str(REPO / "dev.sh"), *argv], capture_output=True, text=True, check=False)
    assert shown.returncode == 2
    assert shown.stderr.startswith("usage: ./dev.sh COMMAND")
    assert "set -euo" not in shown.stdout + shown.stderr
    for command in ("demo", "test", "bench", "setup"):
        assert re.search(rf"^  \./dev\.sh {command} ", shown.stderr, re.M), shown.stderr


# -- documents stand on their own ------------------------------------------------------

# Paths outside the repository and references to an issue tracker's numbers.
_OUTSIDE = re.compile(r"\.\./shared|/work/shared")
_ISSUE_REF = re.compile(r"\b(?:issues?|tickets?)\s*#?\d+\b|(?:^|[\s(])(?:see|fixes|closes|refs?)\s+#\d+|\(#\d+\)", re.I)


def _project_files() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    untracked = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    names = {*tracked.split(), *untracked.split()}
    return sorted(
        REPO / n for n in names if n.endswith((".md", ".py", ".sh", ".yaml", ".yml")) and (REPO / n).is_file()
    )


def test_documents_point_nowhere_outside_and_to_no_issue_numbers() -> None:
    problems = []
    for path in _project_files():
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _OUTSIDE.search(line) or _ISSUE_REF.search(line):
                problems.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert problems == []


@pytest.mark.parametrize(
    ("text", "flagged"),
    [("# Benchmark (issue 8)", True), ("see `../shared/notes.md`", True), ("fixes #12", True), ("(#3)", True),
     ("PKCS#12 downloads", False), ("CRL #2 published", False), ("order #1", False)],
)  # fmt: skip
def test_the_document_check_itself(text: str, flagged: bool) -> None:
    assert bool(_OUTSIDE.search(text) or _ISSUE_REF.search(text)) is flagged

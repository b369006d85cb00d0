"""The command tree: a sub-command builds only as much of it as it needs, and parses the same."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from gateway.cli import build_parser, command_of, main


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_command_of_finds_the_sub_command_only_after_debug() -> None:
    assert command_of(["serve", "--config", "x.yaml"]) == "serve"
    assert command_of(["--debug", "users", "add"]) == "users"
    assert command_of(["--help", "serve"]) is None  # the top-level help lists every command
    assert command_of(["--version"]) is None
    assert command_of([]) is None


def test_each_command_parses_as_in_the_whole_tree() -> None:
    whole = commands(build_parser())
    assert {"serve", "check-config", "reload", "users", "audit", "ca"} <= set(whole)
    for name, parser in whole.items():
        partial = commands(build_parser(name))
        assert partial[name].format_help() == parser.format_help()


def test_serve_imports_no_other_command_module() -> None:
    """A serving process never holds the user, audit and CA commands' modules (the CA code among them)."""
    code = (
        "import sys; from gateway.cli import build_parser, command_of; "
        "build_parser(command_of(sys.argv[1:])); "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('gateway.cli.', 'gateway.ca.authority')))))"
    )
    argv = [sys.executable, "-c", code]
    serve = subprocess.run(
        [*argv, "--debug", "serve", "--config", "x.yaml"], check=False, capture_output=True, text=True
    )
    assert serve.returncode == 0, serve.stderr
    assert serve.stdout.split() == ["gateway.cli.common", "gateway.cli.serve"]  # common: config rule, texts
    everything = subprocess.run([*argv, "--help"], check=False, capture_output=True, text=True)
    assert everything.returncode == 0, everything.stderr
    assert {
        "gateway.cli.serve",
        "gateway.cli.users",
        "gateway.cli.audit",
        "gateway.cli.ca",
        "gateway.ca.authority",
    } <= set(everything.stdout.split())


def test_help_and_unknown_commands_still_see_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    listed = capsys.readouterr().out
    assert all(f"\n    {name} " in listed for name in ("serve", "reload", "users", "audit", "ca"))
    with pytest.raises(SystemExit) as exited:
        main(["no-such-command"])
    assert exited.value.code == 2
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    assert "--config" in capsys.readouterr().out


SERVE_PATH = """
import sys
from gateway.cli import build_parser
build_parser("serve")
import gateway.web.admin, gateway.audit.writer, gateway.cli.serve, gateway.access.login, gateway.server
lazy = ("jinja2", "multiprocessing", "gateway.audit.report", "gateway.ca.authority", "gateway.ca.issuance")
print(" ".join(m for m in lazy if m in sys.modules) or "-")
from gateway.web.messages import message_for
from gateway.web.pages import render
from gateway.verdict import Reason
html = render("refusal.html", msg=message_for(Reason.CERTIFICATE_REVOKED), reason="x", support_id="S-1", links=())
print("jinja2" in sys.modules, "S-1" in html)
"""


def test_serve_path_loads_pages_ca_and_multiprocessing_only_when_used() -> None:
    """What ``gateway serve`` imports up front (one worker, small CRLs) leaves out Jinja2, the CA,
    the audit report and multiprocessing; the first page then brings Jinja2 in and renders."""
    out = subprocess.run([sys.executable, "-c", SERVE_PATH], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["-", "True True"]

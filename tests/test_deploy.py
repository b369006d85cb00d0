"""The deployment files are checked by the tools that will read them.

systemd units by ``systemd-analyze verify`` (Debian's ``systemd``; it needs no
running systemd), alert rules by ``promtool check rules`` and unit-tested by
``promtool test rules`` (Debian's ``prometheus``). Each check has a twin that
proves it can fail: a broken unit or a changed threshold is caught.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import metrics

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
ALERTS = ROOT / "deploy" / "prometheus"


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install Debian's {package} (./dev.sh test does)")
    return path


def verify_units(directory: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` on every unit, with ExecStart pointing at this checkout's gateway."""
    gateway = Path(sys.executable).with_name("gateway")
    assert gateway.exists(), gateway
    names = []
    for unit in sorted(directory.iterdir()):
        text = unit.read_text(encoding="utf-8").replace("/usr/local/bin/gateway", str(gateway))
        name = unit.name.replace("@.", "@tdnet.")  # a template is verified as one of its instances
        (directory / name).write_text(text, encoding="utf-8")
        names.append(f"./{name}")
    analyze = tool("systemd-analyze", "systemd")
    return subprocess.run(
        [analyze, "verify", "--man=no", *names], cwd=directory, capture_output=True, text=True, check=False
    )


def copy_units(tmp_path: Path) -> Path:
    target = tmp_path / "units"
    shutil.copytree(UNITS, target)
    return target


def test_every_unit_verifies_clean(tmp_path: Path) -> None:
    result = verify_units(copy_units(tmp_path))
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_a_broken_unit_is_caught(tmp_path: Path) -> None:
    units = copy_units(tmp_path)
    broken = units / "gateway-crl.service"
    broken.write_text(broken.read_text(encoding="utf-8") + "ProtectEverything=yes\n", encoding="utf-8")
    result = verify_units(units)
    assert "Unknown key 'ProtectEverything'" in result.stdout + result.stderr


@pytest.mark.parametrize("unit", ["gateway@.service", "gateway-portal.service"])
def test_long_running_units_are_hardened_and_notify(unit: str) -> None:
    text = (UNITS / unit).read_text(encoding="utf-8")
    for line in (
        "Type=notify",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ReadWritePaths=/var/lib/tse-gateway",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "User=gateway",
    ):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), f"{unit}: {line}"
    assert re.search(r"^LimitNOFILE=\d+$", text, re.M)


def test_the_gateway_unit_reloads_with_sighup_and_has_a_watchdog() -> None:
    text = (UNITS / "gateway@.service").read_text(encoding="utf-8")
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text and re.search(r"^WatchdogSec=\d+", text, re.M)


def test_the_crl_timer_drives_the_crl_service() -> None:
    timer = (UNITS / "gateway-crl.timer").read_text(encoding="utf-8")
    service = (UNITS / "gateway-crl.service").read_text(encoding="utf-8")
    assert "Unit=gateway-crl.service" in timer and "OnCalendar=hourly" in timer
    assert "gateway ca crl --if-due" in service


def test_alert_rules_check_and_their_unit_tests_pass() -> None:
    promtool = tool("promtool", "prometheus")
    check = subprocess.run(
        [promtool, "check", "rules", "alerts.yml"], cwd=ALERTS, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"], cwd=ALERTS, capture_output=True, text=True, check=False
    )
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def test_the_alert_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    promtool = tool("promtool", "prometheus")
    shutil.copytree(ALERTS, tmp_path / "p")
    rules = tmp_path / "p" / "alerts.yml"
    rules.write_text(rules.read_text(encoding="utf-8").replace("< 6 * 3600", "< 3 * 3600"), encoding="utf-8")
    test = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"], cwd=tmp_path / "p", capture_output=True, check=False
    )
    assert test.returncode != 0


def test_every_metric_an_alert_uses_is_exported() -> None:
    exported = {
        name
        for collector in vars(metrics).values()
        if hasattr(collector, "_name")
        for name in (collector._name, f"{collector._name}_total")
    }
    used = set(re.findall(r"\bgateway_[a-z_]+", (ALERTS / "alerts.yml").read_text(encoding="utf-8")))
    assert used - {"gateway_crl_timer"} <= exported, sorted(used - exported)

"""The operations guide stays complete: every metric, reason code, audit field and log field is in it.

The lists are taken from the code itself (the metric objects, the ``Reason``
enum, the ``AuditEvent`` fields, the ``extra=`` keys of every log call), so
adding one without documenting it fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from prometheus_client import Counter, Gauge, Histogram

from gateway import metrics
from gateway.audit.events import FIELDS, EventKind
from gateway.verdict import Reason

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "operations.md"


def section(title: str) -> str:
    """The text of one ``## title`` section of the guide."""
    text = GUIDE.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def table_keys(text: str) -> set[str]:
    """The backticked names in the first column of the markdown tables in ``text``."""
    keys: set[str] = set()
    for line in text.splitlines():
        if line.startswith("| "):
            keys.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return keys


def exposed_name(metric: Counter | Gauge | Histogram) -> str:
    return metric._name + ("_total" if isinstance(metric, Counter) else "")


def test_readme_links_the_guide() -> None:
    assert "(docs/operations.md)" in (REPO / "README.md").read_text(encoding="utf-8")


def test_every_metric_is_in_the_reference_with_its_labels() -> None:
    rows = {
        line.split("|")[1].strip(" `"): line
        for line in section("Metrics reference").splitlines()
        if line.startswith("| `")
    }
    defined = [m for m in vars(metrics).values() if isinstance(m, Counter | Gauge | Histogram)]
    assert len(defined) >= 19
    for metric in defined:
        name = exposed_name(metric)
        assert name in rows, f"{name} missing from docs/operations.md"
        for label in metric._labelnames:
            assert f"`{label}`" in rows[name], f"{name}: label {label} not documented"


def test_every_reason_code_has_a_troubleshooting_row() -> None:
    documented = table_keys(section("Troubleshooting by reason code"))
    assert {reason.value for reason in Reason} <= documented


def test_every_audit_field_and_kind_is_described() -> None:
    text = section("Audit event schema")
    documented = table_keys(text)
    assert set(FIELDS) <= documented
    for kind in EventKind:
        assert f"`{kind.value}`" in text


def _log_fields() -> set[str]:
    """The keys of every ``extra={...}`` given to a log call in the package."""
    keys: set[str] = set()
    for path in (REPO / "gateway").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "extra" and isinstance(keyword.value, ast.Dict):
                        keys.update(k.value for k in keyword.value.keys if isinstance(k, ast.Constant))
    return keys


def test_every_log_field_is_described() -> None:
    fields = _log_fields()
    assert {"client_ip", "error", "source"} <= fields  # the walk finds them
    assert fields <= table_keys(section("JSON log format"))


@pytest.mark.parametrize("unit", sorted(p.name for p in (REPO / "deploy" / "systemd").iterdir()))
def test_every_unit_is_explained(unit: str) -> None:
    assert f"`{unit}`" in section("systemd units")


def test_every_alert_is_explained() -> None:
    alerts = re.findall(r"^\s*- alert: (\w+)", (REPO / "deploy" / "prometheus" / "alerts.yml").read_text(), re.M)
    assert alerts
    assert set(alerts) <= table_keys(section("Monitoring"))

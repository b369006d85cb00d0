"""Fixtures of the browser suite, and what a failure leaves behind.

Missing chromium / certutil / pk12util / playwright skip the suite with the
reason, unless ``GATEWAY_REQUIRE_BROWSER=1`` (CI), where they fail it. A
failing test gets a screenshot of every open tab in ``test-artifacts/`` and
the gateway's audit events of that test in its report.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.support import (
    AUTO_SELECT_RULE,
    POLICY_DIR,
    POLICY_FILE,
    NssDb,
    Servers,
    Terminal,
    missing_tools,
    start_servers,
)

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TERMINALS = pytest.StashKey[list[Terminal]]()
AUDIT_MARK = pytest.StashKey[tuple[int, int]]()
SERVERS: list[Servers] = []  # the running servers, for the failure report


@pytest.fixture(scope="package")
def browser_tools() -> None:
    missing = missing_tools()
    if not missing:
        return
    why = f"browser suite needs {', '.join(missing)}"
    if os.environ.get("GATEWAY_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{why} (GATEWAY_REQUIRE_BROWSER=1)")
    pytest.skip(why)


@pytest.fixture(scope="package")
def auto_select_in_profile(browser_tools: None) -> Iterator[bool]:
    """Install the AutoSelectCertificateForUrls policy; True when only the profile route is open.

    As root (CI) the rule goes where an administrator puts it, the managed
    policy directory, and is removed afterwards. Without root each profile
    gets the same rule as a content setting before every start.
    """
    if os.environ.get("GATEWAY_E2E_PROFILE_RULE") == "1":
        yield True
        return
    try:
        POLICY_DIR.mkdir(parents=True, exist_ok=True)
        POLICY_FILE.write_text(json.dumps({"AutoSelectCertificateForUrls": [json.dumps(AUTO_SELECT_RULE)]}))
    except OSError:
        yield True
        return
    try:
        yield False
    finally:
        POLICY_FILE.unlink(missing_ok=True)


@pytest.fixture(scope="package")
def playwright(browser_tools: None) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    manager = sync_playwright().start()
    try:
        yield manager
    finally:
        manager.stop()


@pytest.fixture(scope="package")
def servers(browser_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    started = start_servers(tmp_path_factory.mktemp("e2e-servers"))
    SERVERS.append(started)
    try:
        yield started
    finally:
        SERVERS.remove(started)
        started.close()


@pytest.fixture
def portal(servers: Servers) -> Servers:
    """The servers with the issuance portal running too."""
    servers.start_portal()
    return servers


@pytest.fixture(autouse=True)
def _audit_mark(request: pytest.FixtureRequest) -> None:
    if SERVERS:
        request.node.stash[AUDIT_MARK] = (len(SERVERS[0].audit.events), len(SERVERS[0].portal_audit.events))


@pytest.fixture
def terminal(
    request: pytest.FixtureRequest,
    playwright: Any,
    servers: Servers,
    auto_select_in_profile: bool,
    tmp_path: Path,
) -> Iterator[Callable[[str], Terminal]]:
    """A factory of terminals (fresh HOME + NSS DB trusting the CA); all closed at teardown."""
    made: list[Terminal] = []
    request.node.stash[TERMINALS] = made

    def make(name: str) -> Terminal:
        home = tmp_path / f"home-{name}"
        home.mkdir()
        made.append(Terminal(name, home, NssDb(home, servers.ca.cert_path), playwright, auto_select_in_profile))
        return made[-1]

    yield make
    for term in made:
        with contextlib.suppress(Exception):
            term.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report: pytest.TestReport = yield
    if report.failed and report.when in ("call", "setup"):
        shots = _screenshots(item)
        if shots:
            report.sections.append(("screenshots", "\n".join(shots)))
        if SERVERS:
            mark = item.stash.get(AUDIT_MARK, (0, 0))
            gateway, portal = SERVERS[0].audit.events[mark[0] :], SERVERS[0].portal_audit.events[mark[1] :]
            report.sections.append(("gateway audit events of this test", _audit_lines(gateway) or "(none)"))
            if portal:
                report.sections.append(("portal audit events of this test", _audit_lines(portal)))
    return report


def _screenshots(item: pytest.Item) -> list[str]:
    lines = []
    folder = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid)
    for term in item.stash.get(TERMINALS, []):
        for index, page in enumerate(term.pages()):
            path = folder / f"{term.name}-tab{index}.png"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(path), full_page=True, timeout=5000)
                lines.append(f"{path}  ({page.url})")
            except Exception as exc:
                lines.append(f"{path}: screenshot failed: {exc}".splitlines()[0])
    return lines


def _audit_lines(events: list[Any]) -> str:
    return "\n".join(
        f"{e.time:%H:%M:%S.%f} {e.event} reason={e.reason} user={e.user_id} cert={e.cert_subject}/{e.cert_serial}"
        f" {e.method} {e.path} port={e.client_port} support={e.support_id} {e.detail}"
        for e in events
    )

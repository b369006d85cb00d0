"""axe-core on every page of the gateway and the portal, in real Chromium: no serious or critical violation.

The page set comes from the running apps' routers: every GET route is opened
(logged in, with the route's parameters filled from :data:`PARAMS`), so a new
page is checked without editing this test; a GET route that is not a page
must be listed in :data:`SKIPPED` with the reason. Pages that only a state
produces (refusals, the wrong-password form, the issued and confirm pages,
logged out) are reached by doing what the user does.

axe-core comes from the npm registry, pinned, installed once into
``tests/e2e/.axe``. It is injected as a script, which the pages' CSP (no
script at all) blocks, so the browser of this test alone runs with
Playwright's ``bypass_csp``; the other browser tests keep the CSP.
Focus is checked here too: each form page opens with its first field focused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.e2e.support import Servers, Terminal, gateway_login, portal_login

pytestmark = pytest.mark.browser

AXE_VERSION = "4.10.3"
AXE_DIR = Path(__file__).parent / ".axe"
AXE_JS = AXE_DIR / "node_modules" / "axe-core" / "axe.min.js"
BLOCKING = ("serious", "critical")

# GET routes that are not pages, and why they are not checked.
SKIPPED = {
    ("gateway", "/favicon.ico"): "an icon",
    ("gateway", "/{tail}"): "the backends' pages, proxied (the demo backend's page is checked through /onre/)",
    ("gateway", "/_gateway"): "a redirect to /_gateway/",
    ("gateway", "/"): "the landing redirect (to the user's first system)",
    ("gateway", "/_gateway/"): "the landing redirect (to the user's first system)",
    ("portal", "/ca.der"): "a certificate file",
    ("portal", "/ca.pem"): "a certificate file",
    ("portal", "/crl"): "a CRL file",
    ("portal", "/crl.pem"): "a CRL file",
    ("portal", "/download/{token}"): "the one-time PKCS#12 download",
}
# Where a route has parameters, what to fill in (``serial``: the test user's certificate).
PARAMS = {"serial"}
USER = "LC009201"


@pytest.fixture(scope="package")
def axe_script() -> Path:
    """axe-core from the npm registry (pinned), installed once; skipped (or failed in CI) without npm."""
    if AXE_JS.exists() and f'"version": "{AXE_VERSION}"' in (AXE_JS.parent / "package.json").read_text():
        return AXE_JS
    npm = shutil.which("npm")
    if npm is None:
        if os.environ.get("GATEWAY_REQUIRE_BROWSER") == "1":
            pytest.fail("the accessibility check needs npm (GATEWAY_REQUIRE_BROWSER=1)")
        pytest.skip("the accessibility check needs npm to install axe-core")
    AXE_DIR.mkdir(exist_ok=True)
    subprocess.run(
        [npm, "install", "--prefix", str(AXE_DIR), f"axe-core@{AXE_VERSION}", "--no-audit", "--no-fund", "--no-save"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return AXE_JS


def violations(page: Any, axe: Path) -> list[str]:
    """The serious and critical axe violations of the page now shown, one line each."""
    page.add_script_tag(path=str(axe))
    found = page.evaluate(
        """async () => (await axe.run(document, {resultTypes: ['violations']})).violations.map(v => ({
            id: v.id, impact: v.impact, nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))}))"""
    )
    return [f"{v['id']} ({v['impact']}): {', '.join(v['nodes'])}" for v in found if v["impact"] in BLOCKING]


def get_routes(app: web.Application) -> list[str]:
    """The canonical paths of the app's GET routes, ``{tail:.*}`` shown as ``{tail}``."""
    paths = []
    for route in app.router.routes():
        if route.method in ("GET", "*"):
            paths.append(route.resource.canonical if route.resource else "")
    return sorted(set(paths))


def first_field_focused(page: Any) -> bool | None:
    """None for a page without a field to type in; else whether focus is on the first empty one.

    Pages whose forms are a lone button (log out, revoke) get no focus: a
    destructive button should not be one Enter away. After a wrong password the
    kept user ID is filled, so focus is on the password.
    """
    return page.evaluate(  # type: ignore[no-any-return]
        """() => {
            const fields = [...document.querySelectorAll('form input[type=text], form input[type=password]')];
            const f = fields.find(e => e.value === '');
            return f ? document.activeElement === f : null; }"""
    )


class Checker:
    """Opens pages and collects what axe (and the focus check) say about each."""

    def __init__(self, page: Any, axe: Path) -> None:
        self.page, self.axe = page, axe
        self.problems: dict[str, list[str]] = {}
        self.checked: list[str] = []

    def check(self, label: str, focus: bool = True) -> None:
        found = violations(self.page, self.axe)
        if focus and first_field_focused(self.page) is False:
            found.append("focus: the first form field is not focused")
        self.checked.append(label)
        if found:
            self.problems[label] = found

    def visit(self, url: str, label: str) -> None:
        response = self.page.goto(url)
        assert response is not None, url
        self.check(f"{label} ({response.status})")


def test_axe_finds_nothing_serious_on_any_page(
    portal: Servers, terminal: Callable[[str], Terminal], tmp_path: Path, axe_script: Path
) -> None:
    portal.add_user(USER)
    portal.add_user("LC009202")
    p12, cert = portal.issue_p12(USER, tmp_path)
    serial = f"{cert.serial_number:X}"
    assert portal.worker._runner is not None
    apps = {"gateway": portal.worker._runner.app, "portal": portal._runners[-1].app}
    routes = {(name, path) for name, app in apps.items() for path in get_routes(app)}

    # No certificate at all: the gateway's refusal with its steps.
    bare = terminal("axe-bare")
    c = Checker(bare.start(bypass_csp=True), axe_script)
    c.visit(portal.gateway_url("/onre/"), "gateway no_certificate")
    bare.close()

    term = terminal("axe")
    term.nss.import_p12(p12)
    c.page = term.start(bypass_csp=True)
    page = c.page
    # The gateway before login, the wrong-password form, the subject mismatch.
    c.visit(portal.gateway_url("/_gateway/login"), "gateway /_gateway/login")
    assert gateway_login(page, portal, USER, "wrong password!").status == 401
    c.check("gateway login, wrong password")
    gateway_login(page, portal, "LC009202")
    c.check("gateway subject_mismatch")
    gateway_login(page, portal, USER)
    c.check("gateway after login (demo backend)", focus=False)
    page.set_viewport_size({"width": 1280, "height": 800})
    fits = page.evaluate("() => { const m = document.querySelector('main'); return m.scrollWidth <= m.clientWidth; }")
    assert fits, "the demo backend's page overflows its card at 1280 px"

    visited: set[tuple[str, str]] = set()
    in_portal = False
    for name, path in sorted(routes):
        if (name, path) in SKIPPED or path == "/login":
            continue
        url_path = path.replace("{serial}", serial)
        assert "{" not in url_path, f"{name} route {path}: add its parameter to PARAMS or the route to SKIPPED"
        base = portal.gateway_url if name == "gateway" else portal.portal_url
        if name == "portal" and not in_portal:
            portal_login(page, portal, USER)
            in_portal = True
        c.visit(base(url_path), f"{name} {path}")
        visited.add((name, path))

    # Pages only a step produces: the portal's issue result, revoke confirmation, error and logged-out pages.
    page.goto(portal.portal_url(f"/certificates/{serial}"))
    with page.expect_navigation():
        page.click("button#revoke")
    c.check("portal revoke confirmation")
    sizes = {b: page.locator(b).bounding_box() for b in ("#confirm", "#cancel")}
    fonts = {b: page.eval_on_selector(b, "e => getComputedStyle(e).fontSize") for b in sizes}
    assert "失効する / Revoke" in page.inner_text("#confirm")
    assert fonts["#confirm"] == fonts["#cancel"], fonts  # not smaller than Cancel
    confirm, cancel = sizes["#confirm"], sizes["#cancel"]
    assert confirm and cancel and confirm["height"] >= cancel["height"] - 0.5, sizes
    assert confirm["width"] * confirm["height"] >= 0.9 * cancel["width"] * cancel["height"], sizes
    page.goto(portal.portal_url("/certificates/ABCDEF"))
    c.check("portal not-found refusal")
    page.goto(portal.portal_url("/"))
    with page.expect_navigation():
        page.click("button#logout")
    c.check("portal logged out")
    c.visit(portal.portal_url("/login"), "portal /login")
    page.fill("#user_id", USER)
    page.fill("#password", "wrong password!")
    with page.expect_navigation():
        page.click("#go")
    c.check("portal login, wrong password")

    unchecked = routes - visited - set(SKIPPED) - {("gateway", "/_gateway/login"), ("portal", "/login")}
    assert not unchecked, f"routes neither checked nor skipped: {sorted(unchecked)}"
    assert not c.problems, "\n".join(f"{label}: {p}" for label, found in c.problems.items() for p in found)
    assert len(c.checked) >= 20, c.checked

"""The package layout draws the architecture: few top-level modules, documented rooms, arrows pointing down.

The import graph is read with ``ast`` from the source (every ``import`` and
``from ... import`` anywhere in a module: function-level lazy imports and
``TYPE_CHECKING`` imports count, since they are dependencies all the same).
:data:`LAYERS` lists the modules from the bottom (plain data and pure
decisions) to the top (the command line); a module may import its own layer
or lower ones, never a higher one. A new module must be placed in a layer.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"
MAX_TOP_LEVEL_MODULES = 12

# Bottom first. Patterns are fnmatch patterns over dotted module names; the first match wins.
LAYERS: list[tuple[str, list[str]]] = [
    (
        "data: errors, reason codes, metrics, certificate builders, the SQLite base",
        [
            "gateway",
            "gateway.errors",
            "gateway.verdict",
            "gateway.metrics",
            "gateway.certs.builders",
            "gateway.storage.sqlite",
            "gateway.sdnotify",
            # the subpackages' faces hold only their docstrings
            "gateway.tls",
            "gateway.certs",
            "gateway.access",
            "gateway.forward",
            "gateway.audit",
            "gateway.ca",
            "gateway.web",
            "gateway.storage",
            "gateway.demo",
        ],
    ),
    ("configuration and PKI files", ["gateway.config", "gateway.certs.files", "gateway.certs.p12"]),
    (
        "decisions (pure) and the texts of refusals",
        [
            "gateway.certs.policy",
            "gateway.certs.revocation",
            "gateway.forward.routing",
            "gateway.access.policy",
            "gateway.access.passwords",
            "gateway.ca.issuance",
            "gateway.audit.events",
            "gateway.audit.rows",
            "gateway.audit.chain",
            "gateway.web.messages",
        ],
    ),
    (
        "stores, connections and rendering",
        [
            "gateway.access.users",
            "gateway.access.sessions",
            "gateway.audit.store",
            "gateway.audit.spool",
            "gateway.audit.writer",
            "gateway.audit.signing",
            "gateway.audit.trailstate",
            "gateway.ca.authority",
            "gateway.ca.publisher",
            "gateway.storage.interfaces",
            "gateway.storage.postgres",
            "gateway.storage.backends",
            "gateway.storage.schemas",
            "gateway.storage.transfer",
            "gateway.storage.pg_*",
            "gateway.storage.sqlite_*",
            "gateway.forward.upstream",
            "gateway.tls.*",
            "gateway.keys",
            "gateway.logs",
            "gateway.web.pages",
            "gateway.web.responses",
        ],
    ),
    (
        "web edges and the app",
        [
            "gateway.forward.proxy",
            "gateway.app",
            "gateway.access.accounts",
            "gateway.access.login",
            "gateway.audit.report",
            "gateway.audit.workspace",
            "gateway.web.admin",
            "gateway.web.protocol",
            "gateway.demo.backend",
        ],
    ),
    ("processes: workers and the supervisor", ["gateway.server"]),
    ("the start-up checks serve, portal and check-config share", ["gateway.startup"]),
    (
        "programs built on the processes: the portal (and its admin listener), the demo",
        ["gateway.ca.portal", "gateway.ca.portal_admin", "gateway.demo.runner"],
    ),
    ("the command line", ["gateway.cli", "gateway.cli.*", "gateway.__main__"]),
]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                anchor = here[: len(here) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def layer_of(name: str) -> int | None:
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            return index
    return None


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    problems = []
    for name, targets in sorted(edges.items()):
        for target in sorted(targets):
            low, high = layer_of(name), layer_of(target)
            if low is not None and high is not None and high > low:
                problems.append(f"{name} ({LAYERS[low][0]}) imports {target} ({LAYERS[high][0]})")
    return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_top_level_holds_at_most_twelve_modules() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_every_subpackage_says_what_it_owns_and_may_import() -> None:
    packages = sorted(p.parent for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE)
    assert packages
    for init in (p / "__init__.py" for p in packages):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 20, f"{init}: a one-paragraph docstring (what it owns, what it may import)"


def test_every_module_has_a_layer() -> None:
    unplaced = [name for name in modules() if layer_of(name) is None]
    assert not unplaced, f"add these modules to LAYERS in tests/test_layout.py: {unplaced}"


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_no_module_imports_a_higher_layer() -> None:
    assert upward_imports(graph()) == []


@pytest.mark.parametrize(
    ("edge", "upward"),
    [
        (("gateway.certs.policy", "gateway.app"), True),  # a decision reaching up to the app
        (("gateway.web.pages", "gateway.access.login"), True),
        (("gateway.access.login", "gateway.certs.policy"), False),  # the edge imports the decision
        (("gateway.access.login", "gateway.app"), False),  # same layer
    ],
)
def test_the_layer_check_catches_an_upward_import(edge: tuple[str, str], upward: bool) -> None:
    edges = graph()
    edges[edge[0]] = {*edges[edge[0]], edge[1]}
    assert (f"{edge[0]} (" in "\n".join(upward_imports(edges))) is upward


def test_the_cycle_check_and_the_reader_see_real_files(tmp_path: Path) -> None:
    """A lazy import inside a function counts, and a two-module cycle is found."""
    root = tmp_path / "gateway"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text('"""x."""\n')
    (root / "sub" / "__init__.py").write_text('"""x."""\n')
    (root / "a.py").write_text("from gateway.sub import b\n")
    (root / "sub" / "b.py").write_text("def f():\n    from gateway import a\n    from . import c\n")
    (root / "sub" / "c.py").write_text("")
    edges = graph(root)
    assert edges["gateway.sub.b"] == {"gateway.a", "gateway.sub.c"}
    assert cycles(edges) == [["gateway.a", "gateway.sub.b"]]

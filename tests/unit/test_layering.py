"""Imports flow one way: config <- bus <- subscribers <- dispatcher (DESIGN.md, "Layout"), and inside the
dispatcher cli -> api -> ops | bridge -> delivery -> store -> rules (dispatcher/__init__.py).

Walks every import statement (including ones inside functions) of every module with ``ast``; relative imports are
resolved against the importing module's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from config.settings import PROJECT_ROOT

LAYERS = ("config", "bus", "subscribers", "dispatcher")
#: package -> project packages it may import (besides itself)
ALLOWED = {
    "config": set(),
    "bus": {"config"},
    "subscribers": {"config", "bus"},
    "dispatcher": {"config", "bus", "subscribers"},
}
#: third-party libraries that belong to another layer (DESIGN.md: aiohttp and httpx live in dispatcher;
#: nats-py and msgspec in bus and subscribers; config holds settings only)
FORBIDDEN_LIBRARIES = {
    "config": {"nats", "msgspec", "aiohttp", "httpx", "sqlalchemy"},
    "bus": {"aiohttp", "httpx"},
    "subscribers": {"aiohttp", "httpx"},
}
#: module -> libraries it may import despite FORBIDDEN_LIBRARIES: built-in subscribers whose job is an HTTP call
#: (DESIGN.md "Layout": the legacy step-complete webhook lives in subscribers/). The runner itself stays HTTP-free.
LIBRARY_EXCEPTIONS = {
    "subscribers/legacy_step_webhook.py": {"httpx"},
}
#: the dispatcher's packages, bottom first: a package may import the packages of lower rank. ``ops`` and ``bridge``
#: share a rank and may not import each other.
DISPATCHER_RANKS = {"rules": 0, "store": 1, "delivery": 2, "ops": 3, "bridge": 3, "api": 4, "cli": 5}


def modules() -> list[tuple[str, Path]]:
    found = []
    for package in LAYERS:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            found.append((package, path))
    return found


def imported_modules(path: Path, root: Path = PROJECT_ROOT) -> set[tuple[str, int]]:
    """Dotted names of everything ``path`` imports, with line numbers: ``from a.b import c`` gives ``a.b.c`` (``c``
    may be a module or a name in ``a.b``); relative imports resolved; ``<beyond the project root>`` for a relative
    import that climbs out of it."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    package_parts = parts[:-1]  # the package a module (or an __init__) belongs to
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.add((alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module.split(".")
            else:
                up = node.level - 1
                if up > len(package_parts):
                    out.add(("<beyond the project root>", node.lineno))
                    continue
                base = package_parts[: len(package_parts) - up] + (node.module.split(".") if node.module else [])
                if not base:
                    out.add(("<beyond the project root>", node.lineno))
                    continue
            for alias in node.names:
                out.add((".".join([*base, alias.name]), node.lineno))
    return out


def imported_tops(path: Path, root: Path = PROJECT_ROOT) -> set[tuple[str, int]]:
    """Top-level names of everything ``path`` imports, with line numbers."""
    return {(name.split(".")[0], line) for name, line in imported_modules(path, root)}


def dispatcher_package(dotted: str) -> str | None:
    """The dispatcher package a dotted name lies in (``dispatcher.store.models`` -> ``store``), else None."""
    parts = dotted.split(".")
    if len(parts) >= 2 and parts[0] == "dispatcher" and parts[1] in DISPATCHER_RANKS:
        return parts[1]
    return None


def dispatcher_violations(root: Path = PROJECT_ROOT) -> list[str]:
    """Every import inside ``root/dispatcher`` that runs back up (or sideways) the dispatcher's layers, and every
    dispatcher module outside the layered packages (besides ``dispatcher/__init__.py``)."""
    out = []
    for path in sorted((root / "dispatcher").rglob("*.py")):
        rel = path.relative_to(root)
        if rel.as_posix() == "dispatcher/__init__.py":
            continue
        own = dispatcher_package(".".join(rel.with_suffix("").parts))
        if own is None:
            out.append(f"{rel.as_posix()} is outside the packages {sorted(DISPATCHER_RANKS)}")
            continue
        for name, line in sorted(imported_modules(path, root)):
            other = dispatcher_package(name)
            if name.split(".")[0] == "dispatcher" and other is None and name != "dispatcher":
                out.append(f"{rel.as_posix()}:{line} imports {name}, outside the layered packages")
            elif other is not None and other != own and DISPATCHER_RANKS[other] >= DISPATCHER_RANKS[own]:
                below = sorted(p for p, r in DISPATCHER_RANKS.items() if r < DISPATCHER_RANKS[own])
                out.append(f"{rel.as_posix()}:{line} imports {name}: {own} may import only {below or 'nothing'}")
    return out


def test_every_layer_has_modules():
    counts = {p: sum(1 for q, _ in modules() if q == p) for p in LAYERS}
    assert all(counts[p] >= 1 for p in LAYERS), counts


def test_the_walker_sees_imports():
    """Self-check: the dispatcher imports bus and config, bus imports config (else this test proves nothing)."""
    tops = {top for package, path in modules() if package == "dispatcher" for top, _ in imported_tops(path)}
    assert {"bus", "config", "aiohttp"} <= tops
    tops = {top for package, path in modules() if package == "bus" for top, _ in imported_tops(path)}
    assert "config" in tops and "nats" in tops


@pytest.mark.parametrize("package", LAYERS)
def test_imports_flow_one_way(package):
    violations = []
    for pkg, path in modules():
        if pkg != package:
            continue
        for top, line in sorted(imported_tops(path)):
            if top in LAYERS and top != package and top not in ALLOWED[package]:
                violations.append(f"{path.relative_to(PROJECT_ROOT)}:{line} imports {top}")
            if top == "<beyond the project root>":
                violations.append(f"{path.relative_to(PROJECT_ROOT)}:{line} relative import beyond the root")
    assert not violations, f"{package} may import only {sorted(ALLOWED[package]) or 'nothing of ours'}: " + "; ".join(
        violations)


def test_nothing_imports_dispatcher():
    offenders = [
        f"{path.relative_to(PROJECT_ROOT)}:{line}"
        for package, path in modules() if package != "dispatcher"
        for top, line in imported_tops(path) if top == "dispatcher"
    ]
    assert not offenders, f"only dispatcher imports dispatcher: {offenders}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN_LIBRARIES))
def test_libraries_stay_in_their_layer(package):
    violations = [
        f"{path.relative_to(PROJECT_ROOT)}:{line} imports {top}"
        for pkg, path in modules() if pkg == package
        for top, line in sorted(imported_tops(path)) if top in FORBIDDEN_LIBRARIES[package]
        and top not in LIBRARY_EXCEPTIONS.get(path.relative_to(PROJECT_ROOT).as_posix(), set())
    ]
    assert not violations, "; ".join(violations)


def test_relative_imports_are_resolved(tmp_path):
    """The walker maps ``from . import x`` and ``from ..config import y`` to their packages."""
    pkg = tmp_path / "bus"
    pkg.mkdir()
    mod = pkg / "mod.py"
    mod.write_text("from . import envelope\nfrom .catalog import X\n")
    assert {top for top, _ in imported_tops(mod, tmp_path)} == {"bus"}
    mod.write_text("from ..dispatcher import y\n")
    assert {top for top, _ in imported_tops(mod, tmp_path)} == {"dispatcher"}
    mod.write_text("def f():\n    import dispatcher.store\n")
    assert {top for top, _ in imported_tops(mod, tmp_path)} == {"dispatcher"}
    mod.write_text("from ... import z\n")
    assert {top for top, _ in imported_tops(mod, tmp_path)} == {"<beyond the project root>"}
    init = pkg / "__init__.py"
    init.write_text("from .mod import f\n")
    assert {top for top, _ in imported_tops(init, tmp_path)} == {"bus"}


def test_dispatcher_layers_flow_one_way():
    """cli -> api -> ops | bridge -> delivery -> store -> rules; an import that runs back up fails."""
    assert not dispatcher_violations(), "; ".join(dispatcher_violations())


def test_dispatcher_layers_walker_sees_imports():
    """Self-check: the layers really import each other downwards (else the test above proves nothing)."""
    seen = set()
    for path in (PROJECT_ROOT / "dispatcher").rglob("*.py"):
        own = dispatcher_package(".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts))
        seen |= {(own, dispatcher_package(n)) for n, _ in imported_modules(path)
                 if dispatcher_package(n) not in (None, own)}
    assert {("store", "rules"), ("delivery", "store"), ("ops", "delivery"), ("api", "ops"),
            ("cli", "api"), ("cli", "bridge")} <= seen, seen


@pytest.mark.parametrize(("module", "source", "expected"), [
    ("store/x.py", "from dispatcher.delivery.signing import Signer\n", "store may import only ['rules']"),
    ("delivery/x.py", "def f():\n    from dispatcher.ops import replay\n", "imports dispatcher.ops.replay"),
    ("ops/x.py", "from dispatcher import bridge\n", "imports dispatcher.bridge"),
    ("bridge/x.py", "from ..ops.replay import replay\n", "imports dispatcher.ops.replay.replay"),
    ("rules/x.py", "import dispatcher.store.models\n", "rules may import only nothing"),
    ("api/x.py", "from dispatcher.cli.app import app\n", "imports dispatcher.cli.app.app"),
    ("x.py", "", "dispatcher/x.py is outside the packages"),
    ("cli/x.py", "from dispatcher.legacy import y\n", "outside the layered packages"),
])
def test_dispatcher_layers_refuse_upward_imports(tmp_path, module, source, expected):
    """The check fails on each kind of import that runs back up, sideways between ops and bridge, or out of the
    layered packages, including relative and function-level imports."""
    target = tmp_path / "dispatcher" / module
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source)
    (tmp_path / "dispatcher" / "store").mkdir(exist_ok=True)
    (tmp_path / "dispatcher" / "store" / "ok.py").write_text("from dispatcher.rules.ssrf import check_webhook_url\n")
    found = dispatcher_violations(tmp_path)
    assert len(found) == 1 and expected in found[0], found

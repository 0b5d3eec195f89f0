"""Imports flow one way: config <- bus <- subscribers <- dispatcher (DESIGN.md, "Layout").

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


def modules() -> list[tuple[str, Path]]:
    found = []
    for package in LAYERS:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            found.append((package, path))
    return found


def imported_tops(path: Path, root: Path = PROJECT_ROOT) -> set[tuple[str, int]]:
    """Top-level names of everything ``path`` imports, with line numbers."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    package_parts = parts[:-1]  # the package a module (or an __init__) belongs to
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.add((alias.name.split(".")[0], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.add((node.module.split(".")[0], node.lineno))
            else:
                up = node.level - 1
                if up > len(package_parts):
                    out.add(("<beyond the project root>", node.lineno))
                    continue
                full = package_parts[: len(package_parts) - up] + (node.module.split(".") if node.module else [])
                top = full[0] if full else "<beyond the project root>"
                out.add((top, node.lineno))
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

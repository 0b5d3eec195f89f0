"""Post-import hooks: run ``callback(module)`` right after a named module executed (its body ran, before the
importer gets it), without touching the module's files.

Mechanism: :class:`PostImportFinder` sits first in ``sys.meta_path``. For a watched name it asks the other finders
for the spec and wraps the spec's loader in :class:`_HookedLoader`, whose ``exec_module`` runs the real loader,
then each callback. Every callback is try/except-logged: a failing hook never fails the import. A name already
in ``sys.modules`` when registered gets its callback at once. Unwatched imports cost one dict lookup.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from types import ModuleType
from typing import Callable

from bus.instrument.logs import log

Hook = Callable[[ModuleType], None]

_lock = threading.RLock()
_hooks: dict[str, list[Hook]] = {}


def _run(name: str, module: ModuleType, hooks: list[Hook]) -> None:
    for hook in hooks:
        try:
            hook(module)
        except Exception as exc:  # noqa: BLE001 - a hook must never fail the host's import
            log.warning("post-import hook %s for %s failed: %r", getattr(hook, "__qualname__", hook), name, exc)


class _HookedLoader(importlib.abc.Loader):
    """Delegates to ``loader``; after ``exec_module`` runs the hooks registered for ``name``."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec):  # noqa: ANN001 - importlib protocol
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)  # the module's own errors propagate unchanged
        with _lock:
            hooks = _hooks.pop(self._name, [])
        _run(self._name, module, hooks)

    def __getattr__(self, item: str):  # get_source, is_package, get_resource_reader...
        return getattr(self._loader, item)


class PostImportFinder(importlib.abc.MetaPathFinder):
    """The ``sys.meta_path`` entry: finds nothing itself, wraps the loader of watched modules."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib protocol
        if fullname not in _hooks:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookedLoader(spec.loader, fullname)
                return spec
        return None


_finder = PostImportFinder()


def install_finder() -> None:
    """Put the finder first in ``sys.meta_path`` (idempotent)."""
    with _lock:
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def uninstall_finder() -> None:
    """Remove the finder and forget every pending hook (tests)."""
    with _lock:
        while _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        _hooks.clear()


def register(name: str, hook: Hook) -> None:
    """Run ``hook(module)`` once after module ``name`` executes; at once if it is already imported. Installs the
    finder."""
    install_finder()
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__spec__", None) is not None \
            and not getattr(module.__spec__, "_initializing", False):
        _run(name, module, [hook])
        return
    with _lock:
        _hooks.setdefault(name, []).append(hook)


def pending() -> dict[str, int]:
    """Watched module names not imported yet -> number of hooks waiting (for tests and diagnostics)."""
    with _lock:
        return {name: len(hooks) for name, hooks in _hooks.items()}

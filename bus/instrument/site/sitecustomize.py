"""letta-bus's ``sitecustomize``: imported by Python's ``site`` at start-up because ``letta-bus instrument``
put this directory first on ``PYTHONPATH``.

1. Chains: finds the next ``sitecustomize`` on ``sys.path`` (this directory excluded) and executes it, so a
   virtualenv's or distribution's own keeps working.
2. Makes ``bus`` importable when the interpreter does not have letta-bus installed (appends the checkout root
   to ``sys.path``, after everything else, so nothing of the host is shadowed).
3. Calls :func:`bus.instrument.install.install`: post-import hooks for Letta's modules; nothing when Letta is
   not installed or not supported.

Never raises: a problem is printed as one line on stderr and the program runs uninstrumented.
"""

import os
import sys


def _chain() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None or os.path.dirname(os.path.abspath(spec.origin or "")) == here:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["_letta_bus_chained_sitecustomize"] = module
    spec.loader.exec_module(module)


def _install() -> None:
    try:
        import bus.instrument.install  # noqa: F401
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        sys.path.append(root)
    from bus.instrument.install import install

    install()


try:
    _chain()
except Exception as _exc:  # noqa: BLE001 - the other sitecustomize's failure is reported, not fatal
    sys.stderr.write(f"letta-bus instrument: the next sitecustomize failed: {_exc!r}\n")
try:
    _install()
except Exception as _exc:  # noqa: BLE001 - never prevent the program from starting
    sys.stderr.write(f"letta-bus instrument: not instrumenting: {_exc!r}\n")

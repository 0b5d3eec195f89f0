"""The instrumentation's own machinery (bus/instrument/): post-import hooks, the version and signature checks, the
guarded wrapper, point isolation, the launcher's environment and the sitecustomize chain. Fake modules written to
``tmp_path`` stand in for Letta's: these test our hook mechanism, not Letta (tests/letta_real/ does that)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from bus.instrument import SITE_DIR, hooks, launcher, logs, shapes
from bus.instrument.compat import SUPPORTED_LETTA, signature_problem, version_problem
from bus.instrument.wrap import ORIGINAL, unwrap_method, wrap_method


@pytest.fixture
def records(caplog, monkeypatch):
    """``caplog`` with exactly the ``letta_bus.instrument`` logger's records (which, once its own handler is set,
    do not propagate to the root logger)."""
    monkeypatch.setattr(logs.log, "propagate", False)
    logs.log.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger=logs.log.name)
    logs.DISABLED.clear()
    yield caplog
    logs.log.removeHandler(caplog.handler)
    logs.DISABLED.clear()


@pytest.fixture
def fake_pkg(tmp_path, monkeypatch):
    """A package ``fakeletta_<n>`` in tmp_path; returns a function writing ``<pkg>/<name>.py`` and giving its dotted
    name. The finder and its hooks are removed afterwards."""
    name = f"fakeletta_{os.getpid()}_{id(tmp_path)}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(module: str, source: str) -> str:
        (tmp_path / name / f"{module}.py").write_text(textwrap.dedent(source))
        return f"{name}.{module}"

    yield write
    hooks.uninstall_finder()
    for mod in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[mod]


# --- post-import hooks -----------------------------------------------------------------------------------------

def test_a_hook_runs_once_right_after_the_module_executed(fake_pkg):
    target = fake_pkg("managers", """
        EVENTS = ["body ran"]
        class StepManager:
            async def update(self, step_id):
                return step_id
    """)
    seen = []
    hooks.register(target, lambda module: seen.append(list(module.EVENTS)))
    assert hooks.pending() == {target: 1}
    import importlib

    module = importlib.import_module(target)
    assert seen == [["body ran"]]  # the body had run when the hook saw the module
    importlib.reload(module)  # not re-run: a hook is for one import
    assert seen == [["body ran"]]
    assert hooks.pending() == {}


def test_a_hook_registered_after_the_import_runs_at_once(fake_pkg):
    target = fake_pkg("already", "X = 1\n")
    import importlib

    importlib.import_module(target)
    seen = []
    hooks.register(target, lambda module: seen.append(module.X))
    assert seen == [1]


def test_a_failing_hook_is_logged_and_the_import_still_works(fake_pkg, records):
    target = fake_pkg("fragile", "VALUE = 42\n")

    def broken(module):
        raise RuntimeError("hook bug")

    later = []
    hooks.register(target, broken)
    hooks.register(target, lambda module: later.append(module.VALUE))
    import importlib

    assert importlib.import_module(target).VALUE == 42
    assert later == [42]  # the next hook still ran
    assert any("hook bug" in r.getMessage() for r in records.records)


def test_the_module_s_own_import_error_propagates_unchanged(fake_pkg):
    target = fake_pkg("broken", "raise ImportError('letta itself is broken')\n")
    hooks.register(target, lambda module: None)
    import importlib

    with pytest.raises(ImportError, match="letta itself is broken"):
        importlib.import_module(target)


def test_unwatched_modules_keep_their_loader(fake_pkg):
    watched = fake_pkg("watched", "")
    plain = fake_pkg("plain", "")
    hooks.register(watched, lambda module: None)
    import importlib

    assert type(importlib.import_module(plain).__spec__.loader).__name__ == "SourceFileLoader"
    assert type(importlib.import_module(watched).__spec__.loader).__name__ == "_HookedLoader"


# --- version and signature checks -----------------------------------------------------------------------------

def test_only_letta_0_16_is_supported():
    assert SUPPORTED_LETTA == "0.16.*"
    assert version_problem("0.16.8") is None
    assert version_problem("0.16.0") is None
    assert "not supported" in version_problem("0.17.0")
    assert "not supported" in version_problem("0.1.16")
    assert "not installed" in version_problem(None)


class _Manager:
    async def update_step_success_async(self, actor, step_id, usage, stop_reason=None):
        return ("stored", step_id)

    async def update_step_error_async(self, actor, step_id, error_type, error_message):
        raise LookupError(f"no step {step_id}")


def test_signature_problem_names_what_is_missing():
    assert signature_problem(_Manager, "update_step_success_async", ("actor", "step_id")) is None
    assert "does not exist" in signature_problem(_Manager, "update_step_cancelled_async", ("step_id",))
    assert "lacks the parameter(s) error_details" in signature_problem(
        _Manager, "update_step_error_async", ("step_id", "error_details"))
    assert "does not exist" in signature_problem(None, "anything", ())


# --- the guarded wrapper and point isolation ------------------------------------------------------------------

def test_the_wrapper_returns_and_raises_exactly_what_letta_did_and_survives_its_own_errors(records):
    class Manager(_Manager):
        pass

    calls = []

    def after_ok(call, result, ctx):
        calls.append((call["step_id"], result, ctx))

    def after_broken(call, result, ctx):
        raise RuntimeError("our bug")

    assert wrap_method(Manager, "update_step_success_async", ("step_id",), before=lambda call: "ctx", after=after_ok)
    assert wrap_method(Manager, "update_step_error_async", ("step_id",), after=after_broken)
    manager = Manager()
    assert asyncio.run(manager.update_step_success_async("actor", "step-1", usage=None)) == ("stored", "step-1")
    assert calls == [("step-1", ("stored", "step-1"), "ctx")]
    with pytest.raises(LookupError, match="no step step-2"):  # Letta's error, unchanged; after did not run
        asyncio.run(manager.update_step_error_async("actor", "step-2", "E", "m"))
    assert getattr(Manager.update_step_success_async, ORIGINAL) is _Manager.update_step_success_async
    assert "step_id" in str(__import__("inspect").signature(Manager.update_step_success_async))

    class Other(_Manager):
        async def update_step_error_async(self, actor, step_id, error_type, error_message):
            return "ok"

    wrap_method(Other, "update_step_error_async", ("step_id",), after=after_broken)
    assert asyncio.run(Other().update_step_error_async("a", "s", "E", "m")) == "ok"  # our bug is not Letta's
    assert any("our bug" in r.getMessage() for r in records.records)
    unwrap_method(Other, "update_step_error_async")
    assert not hasattr(Other.update_step_error_async, ORIGINAL)


def test_a_missing_or_changed_point_disables_only_that_point_with_one_log_line(records):
    from bus.instrument import steps

    class StepManager:  # as if Letta changed: no cancelled method, success lost step_id, error as before
        async def update_step_success_async(self, actor, id, usage):
            return id

        async def update_step_error_async(self, actor, step_id, error_type, error_message, error_traceback,
                                          error_details=None, stop_reason=None):
            return None

    original_success = StepManager.update_step_success_async
    steps.install_step_manager(SimpleNamespace(StepManager=StepManager))
    steps.install_step_manager(SimpleNamespace(StepManager=StepManager))  # a second install logs nothing new
    lines = [r.getMessage() for r in records.records if r.levelno >= logging.WARNING]
    assert len(lines) == 2, lines
    assert sum("StepManager.update_step_success_async disabled" in line and "step_id" in line for line in lines) == 1
    assert sum("StepManager.update_step_cancelled_async disabled" in line and "does not exist" in line
               for line in lines) == 1
    assert StepManager.update_step_success_async is original_success  # untouched
    assert hasattr(StepManager.update_step_error_async, ORIGINAL)  # the healthy point is wrapped
    assert set(logs.DISABLED) == {"StepManager.update_step_success_async", "StepManager.update_step_cancelled_async"}
    # the wrapped point still behaves as Letta's (no running loop: nothing is published, nothing raised)
    assert asyncio.run(StepManager().update_step_error_async("a", "s", "E", "m", "tb")) is None


def test_a_router_without_the_endpoint_disables_that_route_only(records):
    from bus.instrument import routes

    async def send_message_async(agent_id, server, request, headers):
        return None

    module = SimpleNamespace(router=SimpleNamespace(routes=[]), send_message_async=send_message_async)
    routes.install_agents_router(module)
    lines = [r.getMessage() for r in records.records if r.levelno >= logging.WARNING]
    assert len(lines) == 2, lines  # send_message missing; send_message_async on no route
    assert any("routers.v1.agents.send_message disabled" in line and "does not exist" in line for line in lines)
    assert any("routers.v1.agents.send_message_async disabled" in line for line in lines)


# --- shapes ---------------------------------------------------------------------------------------------------

def test_tool_calls_and_usage_take_letta_s_shapes():
    call = SimpleNamespace(id="call_1", function=SimpleNamespace(name="conversation_search", arguments='{"q": 1}'))
    messages = [SimpleNamespace(tool_calls=None),
                SimpleNamespace(tool_calls=[call, SimpleNamespace(id="", function=None)])]
    assert shapes.tool_calls_of(messages) == [
        {"id": "call_1", "type": "function", "function": {"name": "conversation_search", "arguments": '{"q": 1}'}}]
    step = SimpleNamespace(completion_tokens=2, prompt_tokens=5, total_tokens=7, run_id="run-1")
    assert shapes.usage_of_step(step) == {"message_type": "usage_statistics", "completion_tokens": 2,
                                          "prompt_tokens": 5, "total_tokens": 7, "step_count": 1,
                                          "run_ids": ["run-1"]}
    from datetime import datetime

    assert shapes.rfc3339(datetime(2026, 1, 2, 3, 4, 5, 6)) == "2026-01-02T03:04:05.000006Z"


# --- launcher and sitecustomize -------------------------------------------------------------------------------

def test_the_launcher_prepends_the_site_dir_once_and_keeps_the_environment():
    env = launcher.instrumented_env({"PYTHONPATH": f"/a{os.pathsep}{SITE_DIR}", "LETTA_BUS_NATS_URL": "nats://x"})
    assert env["PYTHONPATH"] == os.pathsep.join([SITE_DIR, "/a"])
    assert env["LETTA_BUS_NATS_URL"] == "nats://x"
    assert launcher.instrumented_env({})["PYTHONPATH"] == SITE_DIR
    with pytest.raises(launcher.LaunchError, match="no command given"):
        launcher.resolve([], {"PATH": "/usr/bin"})
    with pytest.raises(launcher.LaunchError, match="command not found: 'no-such-program-xyz'"):
        launcher.resolve(["no-such-program-xyz"], {"PATH": "/usr/bin"})


def test_sitecustomize_chains_to_the_next_one_and_does_nothing_without_letta(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import builtins\nbuiltins.CHAINED = True\n")
    env = launcher.instrumented_env({**os.environ, "PYTHONPATH": str(tmp_path)})
    code = ("import builtins, sys; print(getattr(builtins, 'CHAINED', False), "
            "sys.modules['sitecustomize'].__file__.startswith(%r), 'bus.letta' in sys.modules, "
            "'msgspec' in sys.modules)" % SITE_DIR)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "False", "False"]
    assert proc.stderr == ""  # letta is not installed here: not a word


def test_the_cli_command_reports_a_missing_command():
    from typer.testing import CliRunner

    from dispatcher.cli.app import app

    result = CliRunner().invoke(app, ["instrument", "--", "no-such-program-xyz"])
    assert result.exit_code == 2
    result = CliRunner().invoke(app, ["instrument"])
    assert result.exit_code == 2

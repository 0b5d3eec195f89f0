"""The browser tier (``make test-browser``): headless Chromium, driven by Playwright for Python, against the console
of a real ``letta-bus up``.

- The browser is the system's Chromium (Debian's ``chromium`` package): ``LETTA_BUS_CHROMIUM``, default
  ``/usr/bin/chromium``; Playwright never downloads one (``playwright install`` is not used). Without it, or
  without the ``browser`` extra (``pip install -e '.[browser]'``), the tests skip with the reason; under
  ``CI=true`` (``.ci/run``) they fail instead, so CI cannot pass without having run them.
- :func:`stack`: ``letta-bus up`` as a subprocess, as ``tests/integration/test_api_server.py`` starts it: its own
  temporary directory (the development API key lands in ``var/api.key``), the embedded nats-server on free ports,
  the API on a free port, short retries (3 attempts 0.2 s apart), the SSRF guard opened for 127.0.0.0/8.
- :func:`receiver`: a real HTTP server on 127.0.0.1 whose answer the test switches (``receiver.status = 503``).
- :func:`page`: a fresh browser context per test; every console message of type ``error`` and every page error is
  recorded and fails the test at teardown (``console_errors.allow(pattern)`` accepts an expected one);
  ``shot("step")`` screenshots into ``LETTA_BUS_SCREENSHOT_DIR`` (default: a new ``letta-bus-screens-*``
  temporary directory), named in the pytest summary.

Everything waits with a deadline; the processes started here are stopped by their PID at teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

LETTA_BUS = str(Path(sys.executable).parent / "letta-bus")
DEFAULT_CHROMIUM = "/usr/bin/chromium"
#: Milliseconds Playwright waits for a selector, an assertion or a navigation before failing.
WAIT_MS = 10_000
#: Seconds `letta-bus up` may take to say "dispatcher running", and to stop after SIGINT.
START_S = 30
STOP_S = 20


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> None:
    """Skip (a developer's machine) or fail (CI=true) the browser tests for want of the browser or Playwright."""
    if _in_ci():
        pytest.fail(f"browser tier under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


# --- screenshots ----------------------------------------------------------------------------------------------

_screens: dict[str, Path] = {}


def screenshot_dir() -> Path:
    """Where screenshots go: LETTA_BUS_SCREENSHOT_DIR (created), else one new temporary directory per run."""
    if "dir" not in _screens:
        chosen = os.environ.get("LETTA_BUS_SCREENSHOT_DIR")
        if chosen:
            path = Path(chosen)
            path.mkdir(parents=True, exist_ok=True)
        else:
            path = Path(tempfile.mkdtemp(prefix="letta-bus-screens-"))
        _screens["dir"] = path
    return _screens["dir"]


def pytest_terminal_summary(terminalreporter) -> None:
    if "dir" in _screens:
        count = len(list(_screens["dir"].glob("*.png")))
        terminalreporter.write_sep("-", "browser screenshots")
        terminalreporter.write_line(f"{count} screenshot(s) in {_screens['dir']}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item, so the page fixture knows at teardown whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


# --- the stack ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Hook(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        status = self.server.status
        with self.server.lock:
            self.server.received.append({"path": self.path, "status": status, "body": body,
                                         "event": self.headers.get("X-Letta-Event")})
        payload = b"ok" if status < 300 else b"receiver is down (test)"
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


class Receiver(ThreadingHTTPServer):
    """A webhook receiver on 127.0.0.1 answering every POST with ``status`` (set it: 200, 503, ...)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Hook)
        self.status = 200
        self.received: list[dict] = []
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def count(self, path: str) -> int:
        with self.lock:
            return sum(1 for r in self.received if r["path"] == path)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@dataclass
class Stack:
    """A running `letta-bus up`: ``api`` (http://127.0.0.1:<port>), ``key`` (the operator's development key),
    ``env``/``cwd`` for CLI calls, and its output so far (``output()``)."""

    api: str
    key: str
    env: dict[str, str]
    cwd: Path
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "".join(self.lines[-200:])

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.api, timeout=10,
                            headers={"Authorization": f"Bearer {token or self.key}"})

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([LETTA_BUS, *args], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def publish(self, event_type: str, agent: str, org: str, data: dict) -> None:
        r = self.cli("publish", event_type, "--agent", agent, "--org", org, "--data", json.dumps(data))
        assert r.returncode == 0, f"letta-bus publish failed: {r.stdout}{r.stderr}"

    def portal_session(self, organization_id: str, *, ttl: int = 3600, role: str = "admin") -> dict:
        with self.client() as c:
            r = c.post("/v1/portal-sessions", json={"scope": "organization", "organization_id": organization_id,
                                                    "role": role, "ttl": ttl})
        assert r.status_code == 201, f"POST /v1/portal-sessions: HTTP {r.status_code} {r.text}"
        body = r.json()
        assert body["url"].startswith(f"{self.api}/console/#token=lbp_"), body["url"]
        return body


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    cwd = tmp_path_factory.mktemp("up")
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETTA_BUS_")}
    env.update({
        "LETTA_BUS_EMBEDDED_PORT": "-1", "LETTA_BUS_EMBEDDED_MONITOR_PORT": "-1", "COLUMNS": "200",
        "LETTA_BUS_API_PORT": str(api_port), "LETTA_BUS_METRICS_PORT": "0",
        "LETTA_BUS_SSRF_ALLOW_CIDRS": '["127.0.0.0/8"]',
        # 3 attempts 0.2 s apart: a delivery to a receiver answering 503 fails for good within about a second
        "LETTA_BUS_RETRY_SCHEDULE_S": "[0.2, 0.2]", "LETTA_BUS_HTTP_TIMEOUT_S": "3",
        # a failing endpoint's circuit stays closed, so a retry goes out at once instead of after a cool-down
        "LETTA_BUS_CIRCUIT_FAILURE_THRESHOLD": "1000",
        "LETTA_BUS_ENDPOINT_REFRESH_S": "0.2", "LETTA_BUS_HISTORY_FLUSH_S": "0.05",
    })
    proc = subprocess.Popen([LETTA_BUS, "up"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    started = threading.Event()

    def drain() -> None:  # keep reading, so a full pipe never blocks the server
        for line in proc.stdout:
            lines.append(line)
            if "dispatcher running" in line:
                started.set()
        started.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        if not started.wait(START_S) or proc.poll() is not None or not any("dispatcher running" in x for x in lines):
            pytest.fail(f"letta-bus up did not start within {START_S} s:\n{''.join(lines)}", pytrace=False)
        out = "".join(lines)
        nats_url = re.search(r"(nats://127\.0\.0\.1:\d+)", out).group(1)
        env["LETTA_BUS_NATS_URL"] = nats_url
        api = f"http://127.0.0.1:{api_port}"
        key = (cwd / "var" / "api.key").read_text().strip()
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{api}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{api}/healthz did not answer 200:\n{''.join(lines)}", pytrace=False)
            time.sleep(0.1)
        yield Stack(api=api, key=key, env=env, cwd=cwd, proc=proc, lines=lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its own process group (start_new_session): it and its children
                proc.wait(timeout=5)
        reader.join(timeout=5)


# --- the browser ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (LETTA_BUS_CHROMIUM, default /usr/bin/chromium) through Playwright; closed after."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("Playwright for Python is not installed: pip install -e '.[browser]' (make test-browser)")
    executable = os.environ.get("LETTA_BUS_CHROMIUM", DEFAULT_CHROMIUM)
    if not (os.path.isfile(executable) and os.access(executable, os.X_OK)):
        unavailable(f"no Chromium at {executable}: apt-get install -y chromium (Debian), or set LETTA_BUS_CHROMIUM")
    pw = sync_playwright().start()
    try:
        try:
            chromium = pw.chromium.launch(executable_path=executable, headless=True, timeout=30_000)
        except Exception as exc:  # noqa: BLE001 - any launch failure means no browser
            unavailable(f"Chromium at {executable} did not start under Playwright: {exc}")
        yield chromium
        chromium.close()
    finally:
        pw.stop()


class ConsoleErrors:
    """Console messages of type error and uncaught page errors of one page."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._allowed: list[re.Pattern] = []

    def allow(self, pattern: str) -> None:
        """Accept errors matching ``pattern`` (a regular expression), e.g. the 401 of a refused portal link."""
        self._allowed.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [e for e in self.seen if not any(p.search(e) for p in self._allowed)]


@pytest.fixture
def console_errors() -> ConsoleErrors:
    return ConsoleErrors()


@pytest.fixture
def shot(request) -> Callable:
    """``shot(page, "label")``: a full-page screenshot named <test>-<nn>-<label>.png; returns its path."""
    test = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    counter = {"n": 0}

    def take(page, label: str) -> Path:
        counter["n"] += 1
        path = screenshot_dir() / f"{test}-{counter['n']:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.png"
        page.screenshot(path=str(path), full_page=True, timeout=WAIT_MS)
        return path

    return take


@pytest.fixture
def page(browser, stack, console_errors, shot, request):
    """A page in a fresh context (no cookies) with ``base_url`` the API; fails the test at teardown when the page
    logged a console error or threw (beyond ``console_errors.allow``); screenshots the page of a failed test."""
    context = browser.new_context(base_url=stack.api, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    context.set_default_navigation_timeout(WAIT_MS)
    p = context.new_page()

    def on_console(msg) -> None:
        if msg.type == "error":
            loc = msg.location or {}
            where = f"{loc.get('url', '?')}:{loc.get('lineNumber', '?')}"
            console_errors.seen.append(f"console.error at {p.url} ({where}): {msg.text}")

    p.on("console", on_console)
    p.on("pageerror", lambda exc: console_errors.seen.append(f"page error at {p.url}: {exc}"))
    yield p
    call = getattr(request.node, "rep_call", None)
    if call is not None and call.failed:
        with contextlib.suppress(Exception):  # a failed screenshot must not hide the test's own failure
            shot(p, "failed")
    unexpected = console_errors.unexpected()
    context.close()
    if unexpected:
        pytest.fail("the console logged errors:\n" + "\n".join(unexpected), pytrace=False)

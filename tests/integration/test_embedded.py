"""The embedded nats-server launcher (bus.embedded) and the project's nats.conf."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from bus.embedded import EmbeddedServer, EmbeddedServerError, nats_server_binary
from config.settings import PROJECT_ROOT


@pytest.fixture
def busy_port():
    """A port on 127.0.0.1 held by a listening socket of this test."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.parametrize("conf", [PROJECT_ROOT / "nats.conf", None], ids=["nats.conf", "no-conf"])
def test_client_port_in_use_names_the_settings(tmp_path, busy_port, conf):
    server = EmbeddedServer(workdir=tmp_path / "nats", conf=conf, port=busy_port, monitor_port=-1)
    try:
        with pytest.raises(EmbeddedServerError) as exc:
            server.start(timeout_s=10)
        message = str(exc.value)
        assert "LETTA_BUS_NATS_URL" in message and "LETTA_BUS_EMBEDDED_PORT" in message
        assert str(busy_port) in message
        assert server.process is not None and server.process.poll() is not None, "no server left running"
    finally:
        server.stop()


def test_monitor_port_in_use_names_the_port_and_setting(tmp_path, busy_port):
    server = EmbeddedServer(workdir=tmp_path / "nats", conf=PROJECT_ROOT / "nats.conf", port=-1,
                            monitor_port=busy_port)
    try:
        with pytest.raises(EmbeddedServerError) as exc:
            server.start(timeout_s=10)
        message = str(exc.value)
        assert "LETTA_BUS_EMBEDDED_MONITOR_PORT" in message
        assert str(busy_port) in message, f"the message should name the busy port {busy_port}: {message}"
        assert server.process is not None and server.process.poll() is not None
    finally:
        server.stop()


def test_nats_server_accepts_the_project_conf(tmp_path):
    binary = nats_server_binary()
    assert binary.exists()
    result = subprocess.run([str(binary), "-t", "-c", str(PROJECT_ROOT / "nats.conf")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=15)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in (result.stdout + result.stderr)


def test_nats_server_t_rejects_a_broken_conf(tmp_path):
    """Control for the test above: -t really checks the file."""
    broken = tmp_path / "broken.conf"
    broken.write_text("jetstream {\n  max_file_store: lots\n  store_dir: \n")
    result = subprocess.run([str(nats_server_binary()), "-t", "-c", str(broken)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=15)
    assert result.returncode != 0


def test_start_on_free_ports_and_stop(tmp_path):
    server = EmbeddedServer(workdir=tmp_path / "nats", conf=PROJECT_ROOT / "nats.conf", port=-1, monitor_port=-1)
    server.start(timeout_s=10)
    try:
        assert server.client_port and server.url == f"nats://127.0.0.1:{server.client_port}"
        assert server.http_port and server.http_port != server.client_port
        # JetStream store under the workdir, as nats.conf's relative store_dir says
        assert (tmp_path / "nats" / "var" / "nats").is_dir()
        with socket.create_connection(("127.0.0.1", server.client_port), timeout=2) as conn:
            assert conn.recv(4096).startswith(b"INFO ")
    finally:
        server.stop()
    assert server.process.poll() is not None


def test_the_broker_does_not_outlive_a_sigkilled_parent(tmp_path):
    # A SIGKILLed `letta-bus up` (or test process) cannot stop its broker: the kernel does (PR_SET_PDEATHSIG).
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from bus.embedded import EmbeddedServer\n"
        f"s = EmbeddedServer(workdir=Path({str(tmp_path / 'nats')!r}), conf=Path({str(PROJECT_ROOT / 'nats.conf')!r}),"
        " port=-1, monitor_port=-1).start()\n"
        "print(s.process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    broker_pid = None
    try:
        broker_pid = int(parent.stdout.readline())
        os.kill(broker_pid, 0)  # it runs
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(broker_pid):
            time.sleep(0.05)
        assert not _alive(broker_pid), "nats-server outlived the process that started it"
    finally:
        if parent.poll() is None:
            parent.kill()
        if broker_pid is not None and _alive(broker_pid):
            os.kill(broker_pid, signal.SIGKILL)  # only the broker this test's child started


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, already dead but not reaped by its new parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

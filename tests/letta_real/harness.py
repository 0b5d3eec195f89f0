"""The real Letta 0.16.8 server on 127.0.0.1, offline: its environment, a private PostgreSQL with pgvector, a fake
OpenAI-compatible LLM and the server process. Used by the ``letta_real`` test tier (tests/letta_real/conftest.py).

Facts this follows: ../shared/letta-0.16.8/README.md (pins, pgvector from the ``pgserver`` wheel, Alembic scripts
from the sdist, ``Connection: close`` from the LLM, ``HOME`` in a temporary directory).

* :func:`letta_env` builds (or finds, cached) the environment with ``build_env.sh``.
* :class:`PgCluster` copies a cached, migrated template cluster (initdb + ``CREATE EXTENSION vector`` + Letta's
  ``alembic upgrade head``, built once per environment: about 40 s) and serves it on a free port, as the
  ``postgres`` user when run as root (initdb and postgres refuse root).
* :class:`FakeLLM` (:mod:`tests.letta_real.fake_llm`) answers Letta's chat completions in a thread.
* :class:`LettaServer` runs ``letta server`` (optionally behind a wrapper command such as ``letta-bus instrument
  --``) and stops it by its PID.

Every wait is bounded; every process started here is stopped by PID at ``stop()``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
#: Where copies of the PostgreSQL binaries and the template cluster live: readable by the ``postgres`` user
#: (root's home is not).
PG_CACHE = Path(os.environ.get("LETTA_BUS_PG_CACHE", "/var/tmp/letta-bus-pg"))
LETTA_DB = "letta"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class LettaEnv:
    """The built environment: ``root`` (cache dir), ``venv``, ``sdist`` (Letta's Alembic scripts)."""

    root: Path

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    def bin(self, name: str) -> str:
        """Path of a console script or interpreter in the environment's venv."""
        return str(self.venv / "bin" / name)

    @property
    def sdist(self) -> Path:
        return self.root / "sdist" / "letta-0.16.8"

    @property
    def key(self) -> str:
        return self.root.name.rsplit("-", 1)[-1]

    @property
    def pginstall(self) -> Path:
        return self.venv / "lib" / "python3.11" / "site-packages" / "pgserver" / "pginstall"


def letta_env(timeout_s: float = 900) -> LettaEnv:
    """Build or find the cached environment (``build_env.sh``; about 80 s cold, a few seconds warm). Raises
    ``RuntimeError`` with the script's output when it fails."""
    proc = subprocess.run(["bash", str(HERE / "build_env.sh")], capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"tests/letta_real/build_env.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return LettaEnv(Path(proc.stdout.strip().splitlines()[-1]))


def stop_group(proc: subprocess.Popen | None) -> None:
    """Stop a process started with ``start_new_session=True`` and its children: SIGTERM to its process group,
    SIGKILL after 15 s."""
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _chown_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "postgres:postgres", str(path)], check=True)


class PgCluster:
    """A private PostgreSQL 16 + pgvector with Letta's schema, on a free port of 127.0.0.1 (trust auth, user
    ``postgres``, database ``letta``). :attr:`uri` is Letta's ``LETTA_PG_URI``.

    ``start()`` copies the template (:meth:`template`) into a new directory and starts it (at most 30 s);
    ``stop()`` stops it (``pg_ctl stop -m fast``) and removes the directory. Raises ``RuntimeError`` with
    PostgreSQL's log when it does not start.
    """

    def __init__(self, env: LettaEnv) -> None:
        self.env = env
        self.port = 0
        self.dir: Path | None = None

    @property
    def uri(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{LETTA_DB}"

    def _bin(self, name: str) -> str:
        return str(self._binaries() / "bin" / name)

    def _binaries(self) -> Path:
        """The pgserver binaries copied where the ``postgres`` user can run them (once per environment), with
        the libraries their RPATH names (``$ORIGIN/../../../pgserver.libs``)."""
        target = PG_CACHE / f"binaries-{self.env.key}"
        if not (target / ".ready").exists():
            PG_CACHE.mkdir(parents=True, exist_ok=True)
            os.chmod(PG_CACHE, 0o755)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(self.env.pginstall, target / "pgserver" / "pginstall", symlinks=True)
            shutil.copytree(self.env.pginstall.parent.parent / "pgserver.libs", target / "pgserver.libs",
                            symlinks=True)
            (target / ".ready").touch()
        return target / "pgserver" / "pginstall"

    def template(self) -> Path:
        """The migrated template cluster (cached per environment; built here when missing)."""
        template = PG_CACHE / f"template-{self.env.key}"
        if (template / ".ready").exists():
            return template / "data"
        shutil.rmtree(template, ignore_errors=True)
        (template / "data").mkdir(parents=True)
        _chown_postgres(template)
        subprocess.run(_as_postgres([self._bin("initdb"), "-D", str(template / "data"), "-U", "postgres",
                                     "--auth=trust", "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        self._start(template / "data")
        try:
            self._psql("postgres", f"CREATE DATABASE {LETTA_DB}")
            self._psql(LETTA_DB, "CREATE EXTENSION IF NOT EXISTS vector")
            home = Path(tempfile.mkdtemp(prefix="letta-home-"))
            try:
                proc = subprocess.run([self.env.bin("alembic"), "upgrade", "head"], cwd=self.env.sdist,
                                      env=_letta_base_env(home, self.uri), capture_output=True, text=True,
                                      timeout=600)
            finally:
                shutil.rmtree(home, ignore_errors=True)
            if proc.returncode != 0:
                raise RuntimeError(f"Letta's alembic upgrade head failed:\n{proc.stderr[-4000:]}")
        finally:
            self._stop(template / "data")
        (template / ".ready").touch()
        return template / "data"

    def start(self) -> "PgCluster":
        template = self.template()
        PG_CACHE.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="pg-", dir=PG_CACHE))
        subprocess.run(["cp", "-a", str(template), str(self.dir / "data")], check=True)
        _chown_postgres(self.dir)
        self._start(self.dir / "data")
        return self

    def _start(self, data: Path) -> None:
        self.port = free_port()
        log = data.parent / "postgres.log"
        proc = subprocess.run(_as_postgres([
            self._bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "30", "start",
            "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={data.parent} "
                  "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
        ]), capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            tail = log.read_text()[-3000:] if log.exists() else proc.stderr
            raise RuntimeError(f"the private PostgreSQL did not start on port {self.port}:\n{tail}")

    def _stop(self, data: Path) -> None:
        subprocess.run(_as_postgres([self._bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop"]),
                       capture_output=True, timeout=60)

    def _psql(self, db: str, sql: str) -> None:
        subprocess.run(_as_postgres([self._bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                                     "-d", db, "-v", "ON_ERROR_STOP=1", "-c", sql]),
                       check=True, capture_output=True, timeout=60)

    def stop(self) -> None:
        if self.dir is not None:
            self._stop(self.dir / "data")
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _letta_base_env(home: Path, pg_uri: str) -> dict[str, str]:
    """The environment a Letta process gets: no inherited Letta/letta-bus/OpenAI settings, ``HOME`` private."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("LETTA_", "OPENAI_", "STEP_COMPLETE_", "PYTHON")) and k != "VIRTUAL_ENV"}
    keep.update(HOME=str(home), LETTA_PG_URI=pg_uri, NO_PROXY="*", no_proxy="*")
    return keep


class LettaServer:
    """``letta server`` on a free port of 127.0.0.1 with the fake LLM as its OpenAI provider.

    ``env``: extra variables (``STEP_COMPLETE_WEBHOOK``, ``LETTA_BUS_*``...); ``prefix``: a wrapper command put
    before ``letta server``; ``port``: 0 for a free one. :meth:`start` waits until ``GET /v1/health/`` answers
    (at most ``start_timeout_s`` seconds) and raises ``RuntimeError`` with the server's log otherwise.
    :attr:`log` is the server's stdout+stderr file.
    """

    def __init__(self, letta: LettaEnv, pg: PgCluster, llm_url: str, *, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None, port: int = 0, start_timeout_s: float = 120) -> None:
        self.letta = letta
        self.pg = pg
        self.llm_url = llm_url
        self.extra_env = env or {}
        self.prefix = prefix or []
        self.start_timeout_s = start_timeout_s
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.home: Path | None = None
        self.log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LettaServer":
        self.port = self.port or free_port()
        self.home = Path(tempfile.mkdtemp(prefix="letta-home-"))
        self.log = self.home / "server.log"
        env = _letta_base_env(self.home, self.pg.uri)
        env.update(OPENAI_BASE_URL=f"{self.llm_url}/v1", OPENAI_API_KEY="sk-fake-llm", **self.extra_env)
        cmd = [*self.prefix, self.letta.bin("letta"), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.home,
                                         start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"letta server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/v1/health/", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"letta server did not answer within {self.start_timeout_s} s:\n{self.tail()}")

    def tail(self, size: int = 6000) -> str:
        """The end of the server's log."""
        return self.log.read_text(errors="replace")[-size:] if self.log and self.log.exists() else ""

    def stop(self) -> None:
        """Stop the server (:func:`stop_group`) and remove its home directory."""
        stop_group(self.proc)
        self.proc = None
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None


class LettaAPI:
    """The few calls of Letta's REST API the tier makes (httpx, 60 s per request); each returns the JSON answer
    and raises ``AssertionError`` with Letta's answer on an unexpected status."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=60)

    def _ok(self, response: httpx.Response, *ok: int) -> Any:
        assert response.status_code in (ok or (200,)), f"{response.request.method} {response.request.url}: " \
            f"{response.status_code} {response.text[:2000]}"
        return response.json() if response.content else None

    def create_agent(self, name: str) -> dict[str, Any]:
        return self._ok(self.http.post("/v1/agents/", json={
            "name": name, "model": "openai-proxy/fake-model", "embedding": "openai/text-embedding-3-small"}))

    def send(self, agent_id: str, text: str, *ok: int) -> httpx.Response:
        """``POST /v1/agents/{id}/messages`` with one user message; returns the response (status checked)."""
        response = self.http.post(f"/v1/agents/{agent_id}/messages",
                                  json={"messages": [{"role": "user", "content": text}]})
        self._ok(response, *(ok or (200,)))
        return response

    def send_async(self, agent_id: str, text: str, callback_url: str) -> dict[str, Any]:
        return self._ok(self.http.post(f"/v1/agents/{agent_id}/messages/async", json={
            "messages": [{"role": "user", "content": text}], "callback_url": callback_url}))

    def get(self, path: str, *ok: int) -> Any:
        return self._ok(self.http.get(path), *ok)

    def post(self, path: str, body: Any, *ok: int) -> Any:
        return self._ok(self.http.post(path, json=body), *ok)

    def close(self) -> None:
        self.http.close()


@dataclass
class RunningLetta:
    """A Letta server in use by the tier: ``server`` (its process), ``api`` (its REST API), ``pg`` (its database);
    ``bridge_url``: the ``letta-bus bridge`` its step webhook points at, if any."""

    server: LettaServer
    api: LettaAPI
    pg: PgCluster
    bridge_url: str = ""


def start_letta(letta_env: LettaEnv, llm_url: str, env: dict[str, str] | None = None, *, instrument: bool = False,
                port: int = 0) -> RunningLetta:
    """A private PostgreSQL and ``letta server`` on ``port`` (0: a free one), behind ``letta-bus instrument --``
    when ``instrument`` (else the stock server); ``env``: extra variables (``bus.client_env()``, Letta's
    ``STEP_COMPLETE_WEBHOOK``...)."""
    pg = PgCluster(letta_env).start()
    prefix = [letta_env.bin("letta-bus"), "instrument", "--"] if instrument else None
    server = LettaServer(letta_env, pg, llm_url, env=env, prefix=prefix, port=port)
    try:
        server.start()
    except BaseException:
        pg.stop()
        raise
    return RunningLetta(server, LettaAPI(server.url), pg)


def stop_letta(letta: RunningLetta) -> None:
    """Stop the server and its database (by PID)."""
    letta.api.close()
    letta.server.stop()
    letta.pg.stop()


def step_ids(response: httpx.Response) -> list[str]:
    """The step ids of a LettaResponse, in order."""
    ids: list[str] = []
    for message in response.json()["messages"]:
        if message.get("step_id") and message["step_id"] not in ids:
            ids.append(message["step_id"])
    return ids


def token_counts(obj: dict[str, Any]) -> tuple[int, int, int]:
    """(completion, prompt, total) tokens of a usage, step or run-usage object."""
    return obj["completion_tokens"], obj["prompt_tokens"], obj["total_tokens"]


def assert_step_completed(event: dict[str, Any], step: dict[str, Any], agent_id: str, organization_id: str) -> None:
    """``event`` (a delivered ``agent.step.completed`` without tool calls) carries what Letta shows for ``step``."""
    assert event["agent_id"] == agent_id == step["agent_id"]
    assert event["organization_id"] == step["organization_id"] == organization_id
    data = event["data"]
    assert data["status"] == step["status"] == "success"
    assert data["run_id"] == step["run_id"]
    assert token_counts(data["usage"]) == token_counts(step)
    assert data["tool_calls"] == []
    assert data["stop_reason"] == step["stop_reason"]

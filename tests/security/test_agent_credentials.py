"""Agents with credentials (contract section 8): a node token as the MQTT password (username =
client id = node id) and the REST bearer token; enrollment with an enroll key, the token kept
in a 0600 file and reused; ``fleetmq agent`` and ``fleetmq simulate`` with both.

The broker is a real Mosquitto with ``allow_anonymous false`` and a password file of
``mosquitto_hash(token)`` lines. The manager's enrollment route is not in this branch yet: an
``EnrollServer`` (a real aiohttp server on a free port) answers ``POST /api/v1/fleet/enroll``
as the contract says: 201 with the register answer plus ``"token"``, 401 for a wrong key, 403
for an id the key does not allow, 409 for an id already enrolled.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from fleetmq.agent import Agent
from fleetmq.agent.credentials import EnrollmentError
from fleetmq.auth.tokens import new_token
from fleetmq.errors import ConfigError
from tests.conftest import eventually, make_settings, running
from tests.security.conftest import MosquittoFactory
from tests.support import REPO

ENROLL_KEY = new_token("enr")


class EnrollServer:
    """The contract's enrollment route, played by a tiny aiohttp server; it also records what
    REST agents send to register and heartbeat."""

    def __init__(self, tokens: dict[str, str], unavailable: int = 0) -> None:
        self.tokens = tokens
        """node id -> the token enrollment hands out (the broker's password file has it)."""
        self.unavailable = unavailable
        """Answer this many requests 503 first (a manager still starting)."""
        self.enrolled: set[str] = set()
        self.calls: list[tuple[str | None, dict[str, Any]]] = []
        self.rest_requests: list[tuple[str, str | None]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def enroll(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append((request.headers.get("Authorization"), body))
        if self.unavailable > 0:
            self.unavailable -= 1
            return web.json_response({"error": "Unavailable", "message": "starting"}, status=503)
        if request.headers.get("Authorization") != f"Bearer {ENROLL_KEY}":
            return web.json_response({"error": "Unauthorized", "message": "unknown key"},
                                     status=401, headers={"WWW-Authenticate": "Bearer"})
        node_id = body.get("node_id")
        if node_id in self.enrolled:
            return web.json_response({"error": "Conflict", "message": "has a credential"},
                                     status=409)
        if node_id not in self.tokens:
            return web.json_response({"error": "Forbidden", "message": "id outside the key's "
                                      "pattern"}, status=403)
        self.enrolled.add(node_id)
        return web.json_response({"node_id": node_id, "status": "registered",
                                  "message": "Node successfully registered",
                                  "timestamp": "2026-12-04T23:30:00.000Z",
                                  "token": self.tokens[node_id]}, status=201)

    async def answer_rest(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.rest_requests.append((request.path, request.headers.get("Authorization")))
        if request.path.endswith("/register"):
            return web.json_response({"node_id": body["node_id"], "status": "registered",
                                      "message": "Node successfully registered",
                                      "timestamp": "2026-12-04T23:30:00.000Z"})
        return web.json_response({"node_id": body["node_id"], "received": True,
                                  "next_check_seconds": 1})

    async def __aenter__(self) -> EnrollServer:
        app = web.Application()
        app.router.add_post("/api/v1/fleet/enroll", self.enroll)
        app.router.add_post("/api/v1/fleet/register", self.answer_rest)
        app.router.add_post("/api/v1/fleet/heartbeat", self.answer_rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def node(http: aiohttp.ClientSession, port: int, node_id: str) -> Any:
    async with http.get(f"http://127.0.0.1:{port}/api/v1/fleet/nodes/{node_id}") as resp:
        return await resp.json() if resp.status == 200 else None


async def heartbeats_seen(http: aiohttp.ClientSession, port: int, node_id: str) -> None:
    """Wait until the node is online with a heartbeat's telemetry, then one more beat."""
    first = await eventually(lambda: _with_uptime(http, port, node_id), timeout=10)

    async def later() -> Any:
        doc = await node(http, port, node_id)
        return doc and doc["last_seen"] > first["last_seen"]
    await eventually(later, timeout=5)


async def _with_uptime(http: aiohttp.ClientSession, port: int, node_id: str) -> Any:
    doc = await node(http, port, node_id)
    return doc if doc and doc["status"] == "online" and doc["uptime_seconds"] is not None \
        else None


# --- the node token over MQTT ------------------------------------------------------------------

async def test_an_agent_logs_in_with_its_token_and_heartbeats_where_the_broker_checks_passwords(
    root: str, mosquitto_with: MosquittoFactory
) -> None:
    token = new_token("node")
    broker = mosquitto_with(passwords={"pw-node-1": token})
    async with running(make_settings(broker.broker_url(), root)) as svc, \
            aiohttp.ClientSession() as http:
        agent = Agent("pw-node-1", "picclaw", broker=broker.broker_url(login=False),
                      token=token, interval_s=1, topic_root=root)
        async with agent:
            assert await agent.wait_registered(10)
            await heartbeats_seen(http, svc.http_port, "pw-node-1")


async def test_an_agent_without_its_token_or_with_a_wrong_one_is_refused_and_the_node_untouched(
    root: str, mosquitto_with: MosquittoFactory, caplog: pytest.LogCaptureFixture
) -> None:
    token = new_token("node")
    broker = mosquitto_with(passwords={"victim-1": token})
    url = broker.broker_url(login=False)
    caplog.set_level(logging.ERROR, logger="fleetmq.agent")
    async with running(make_settings(broker.broker_url(), root)) as svc, \
            aiohttp.ClientSession() as http:
        victim = Agent("victim-1", "picclaw", broker=url, token=token, interval_s=1,
                       topic_root=root)
        async with victim:
            assert await victim.wait_registered(10)
            for attempt, words in ((None, "no token was given"),
                                   (new_token("node"), "its token was not accepted")):
                intruder = Agent("victim-1", "picclaw", broker=url, token=attempt,
                                 interval_s=1, topic_root=root)
                async with intruder:
                    await eventually(lambda w=words: any(  # type: ignore[misc]
                        "agent_login_refused" in r.getMessage() and w in r.getMessage()
                        for r in caplog.records), timeout=10)
                    assert not intruder.connected
                caplog.clear()
            # The real node kept its connection (a takeover would have cut it) and its beat.
            assert victim.connected
            assert victim.registered.is_set()
            await heartbeats_seen(http, svc.http_port, "victim-1")


async def test_a_rest_agent_sends_its_token_as_a_bearer_token() -> None:
    token = new_token("node")
    async with EnrollServer({}) as server:
        agent = Agent("rest-1", "picclaw", api=server.url, token=token, interval_s=1)
        async with agent:
            assert await agent.wait_registered(5)
            await eventually(lambda: any(path.endswith("/heartbeat")
                                         for path, _ in server.rest_requests), timeout=5)
    assert {auth for _path, auth in server.rest_requests} == {f"Bearer {token}"}


def test_credentials_that_cannot_work_are_refused_when_the_agent_is_made(
    tmp_path: Path
) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"token": ENROLL_KEY}, "pass it as --enroll-key"),
        ({"token": "secret"}, "is not a node token"),
        ({"enroll_key": ENROLL_KEY, "enroll_api": "http://h:1"}, "needs --token-file"),
        ({"enroll_key": ENROLL_KEY, "token_file": str(tmp_path / "t")}, "REST URL"),
        ({"enroll_key": new_token("key"), "token_file": "t", "enroll_api": "http://h:1"},
         "is not an enroll key"),
        ({"token_file": str(tmp_path / "missing")}, "holds no token"),
        ({"token": new_token("node"), "broker": "mqtt://u:p@h:1"}, "drop the user"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ConfigError, match=words):
            Agent("n-1", "picclaw", **kwargs)


# --- enrollment ------------------------------------------------------------------------------

async def test_enrollment_keeps_the_token_in_a_0600_file_and_the_next_start_reuses_it(
    root: str, mosquitto_with: MosquittoFactory, tmp_path: Path
) -> None:
    token = new_token("node")
    broker = mosquitto_with(passwords={"enr-node-1": token})
    (tmp_path / "keep").mkdir()
    token_file = tmp_path / "keep" / "node.token"
    async with running(make_settings(broker.broker_url(), root)) as svc, \
            EnrollServer({"enr-node-1": token}, unavailable=2) as server, \
            aiohttp.ClientSession() as http:
        def agent() -> Agent:
            return Agent("enr-node-1", "microclaw", broker=broker.broker_url(login=False),
                         enroll_key=ENROLL_KEY, token_file=str(token_file),
                         enroll_api=server.url, interval_s=1, topic_root=root)
        async with agent() as first:
            assert await first.wait_registered(15)  # after two 503s: waited out
        assert len(server.calls) == 3
        auth, body = server.calls[-1]
        assert auth == f"Bearer {ENROLL_KEY}"
        assert (body["node_id"], body["node_type"]) == ("enr-node-1", "microclaw")
        assert token_file.read_text().strip() == token
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert os.listdir(tmp_path / "keep") == ["node.token"]  # no temporary file left behind

        async with agent() as second:
            assert await second.wait_registered(10)
            await heartbeats_seen(http, svc.http_port, "enr-node-1")
        assert len(server.calls) == 3  # the kept token, no second enrollment


async def test_a_refused_enrollment_ends_the_agent_with_the_reason_and_writes_no_file(
    tmp_path: Path
) -> None:
    token_file = tmp_path / "node.token"
    async with EnrollServer({}) as server:
        agent = Agent("not-allowed-1", "picclaw", broker="mqtt://127.0.0.1:1",
                      enroll_key=ENROLL_KEY, token_file=str(token_file),
                      enroll_api=server.url)
        async with agent:
            async with asyncio.timeout(10):
                await agent.ended.wait()
        assert isinstance(agent.error, EnrollmentError)
        assert "HTTP 403" in str(agent.error)
        assert not token_file.exists()


# --- the command line ------------------------------------------------------------------------

_logs = itertools.count()


@asynccontextmanager
async def fleetmq_process(workdir: Path, *args: str,
                          env: dict[str, str]) -> AsyncIterator[tuple[Any, Path]]:
    """``python -m fleetmq ARGS`` with its output in a file; killed on the way out."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMQ_")} | env
    log = workdir / f"fleetmq-{next(_logs)}.txt"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleetmq", *args, stdout=out, stderr=asyncio.subprocess.STDOUT,
            env=full_env, cwd=REPO)
    try:
        yield proc, log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def exit_code(proc: Any, timeout: float = 20) -> int:
    async with asyncio.timeout(timeout):
        return int(await proc.wait())


async def test_fleetmq_agent_takes_its_token_from_the_environment_and_is_refused_without_it(
    root: str, mosquitto_with: MosquittoFactory, tmp_path: Path
) -> None:
    token = new_token("node")
    broker = mosquitto_with(passwords={"cli-node-1": token})
    args = ("agent", "--node-id", "cli-node-1", "--node-type", "picclaw", "--interval", "1",
            "--broker", broker.broker_url(login=False), "--topic-root", root)
    async with running(make_settings(broker.broker_url(), root)) as svc, \
            aiohttp.ClientSession() as http, \
            fleetmq_process(tmp_path, *args, env={"FLEETMQ_AGENT_TOKEN": token}) as (agent, _), \
            fleetmq_process(tmp_path, *args, env={}) as (_bare, bare_log):
        await heartbeats_seen(http, svc.http_port, "cli-node-1")
        await eventually(lambda: "refused the login" in bare_log.read_text(), timeout=10)
        assert "no token was given" in bare_log.read_text()
        agent.send_signal(signal.SIGTERM)
        assert await exit_code(agent) == 0
        doc = await node(http, svc.http_port, "cli-node-1")
        assert (doc["status"], doc["status_reason"]) == ("offline", "shutdown")


async def test_fleetmq_agent_exits_1_with_one_line_when_its_enrollment_is_refused(
    tmp_path: Path
) -> None:
    async with EnrollServer({}) as server, fleetmq_process(
        tmp_path, "agent", "--node-id", "cli-refused-1", "--node-type", "picclaw",
        "--broker", "mqtt://127.0.0.1:1", "--enroll-key", ENROLL_KEY,
        "--token-file", str(tmp_path / "t"), "--enroll-api", server.url,
        env={"FLEETMQ_AGENT_LOG_LEVEL": "warning"},
    ) as (proc, log):
        assert await exit_code(proc) == 1
    errors = [line for line in log.read_text().splitlines() if line.startswith("fleetmq: error")]
    assert len(errors) == 1, log.read_text()
    assert "HTTP 403" in errors[0]
    assert "Traceback" not in log.read_text()
    assert not (tmp_path / "t").exists()


async def test_fleetmq_simulate_enrolls_each_node_and_logs_each_in_with_its_own_token(
    root: str, mosquitto_with: MosquittoFactory, tmp_path: Path
) -> None:
    ids = [f"sim-{i:06d}" for i in range(1, 4)]
    tokens = {node_id: new_token("node") for node_id in ids}
    broker = mosquitto_with(passwords=tokens)
    token_file = tmp_path / "sim.tokens"
    async with running(make_settings(broker.broker_url(), root)) as svc, \
            EnrollServer(tokens) as server, aiohttp.ClientSession() as http:
        args = ("simulate", "--nodes", "3", "--interval", "1", "--duration", "3",
                "--broker", broker.broker_url(login=False), "--topic-root", root,
                "--enroll-key", ENROLL_KEY, "--api", server.url,
                "--token-file", str(token_file))
        for run in (1, 2):
            async with fleetmq_process(tmp_path, *args, env={}) as (proc, log):
                assert await exit_code(proc, 30) == 0, log.read_text()
            text = log.read_text()
            assert "Traceback" not in text
            assert any(line.split() == ["errors", "0"] for line in text.splitlines()), text
            assert len(server.calls) == 3, f"run {run}"  # the second run reused the file
        for node_id in ids:
            doc = await node(http, svc.http_port, node_id)
            assert doc["uptime_seconds"] is not None  # heartbeats under its own login
        kept = dict(line.split() for line in token_file.read_text().splitlines())
        assert kept == tokens
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


def test_simulate_refuses_one_token_for_many_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    from fleetmq.cli import main

    code = main(["simulate", "--nodes", "2", "--token", new_token("node")], env={})
    assert code == 2
    assert "--token is one node's token: it works with --nodes 1 only" in capsys.readouterr().err

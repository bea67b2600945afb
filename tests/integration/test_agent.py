"""The edge-agent library and ``fleetmq agent`` against a running manager (issue 3).

Everything is checked from the outside: the manager's REST view, the agent's public state, and
the exit code of the ``fleetmq agent`` process. Every subprocess is killed in a finally.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fleetmq.agent import Agent
from fleetmq.app import FleetService
from fleetmq.config import HttpSettings
from fleetmq.errors import ConfigError
from tests.conftest import broker_port, eventually, make_settings, running
from tests.support import REPO, Mosquitto, free_port

FAST = 1
"""Heartbeat interval (s) of agents in tests that wait for heartbeats."""


def mqtt_url(broker_url: str) -> str:
    """What an agent connects to: the embedded broker is a plain MQTT broker from outside."""
    return f"mqtt://127.0.0.1:{broker_port(broker_url)}"


def node_url(svc: FleetService, node_id: str) -> str:
    return f"http://127.0.0.1:{svc.http_port}/api/v1/fleet/nodes/{node_id}"


async def get_node(http: aiohttp.ClientSession, svc: FleetService, node_id: str) -> Any:
    async with http.get(node_url(svc, node_id)) as resp:
        return await resp.json() if resp.status == 200 else None


async def node_where(http: aiohttp.ClientSession, svc: FleetService, node_id: str,
                     timeout: float = 5.0, **fields: Any) -> Any:
    """The node's REST document once every given field has the given value."""
    async def check() -> Any:
        doc = await get_node(http, svc, node_id)
        return doc if doc and all(doc.get(k) == v for k, v in fields.items()) else None
    return await eventually(check, timeout=timeout)


# --- the library over MQTT -----------------------------------------------------------------

async def test_agent_registers_and_heartbeats_its_telemetry_then_says_shutdown(
    broker_url: str, root: str, http: aiohttp.ClientSession
) -> None:
    async def telemetry() -> dict[str, int]:
        return {"free_memory_kb": 200, "sensors_active": 2}

    async with running(make_settings(broker_url, root)) as svc:
        agent = Agent("pic-01", "picclaw", broker=mqtt_url(broker_url), interval_s=FAST,
                      telemetry=telemetry, capabilities=["dht22"], location="lab",
                      metadata={"firmware": "v1"}, topic_root=root)
        async with agent:
            assert await agent.wait_registered(5)
            assert agent.connected
            assert agent.last_reply is not None
            assert agent.last_reply["message"] == "Node successfully registered"
            doc = await node_where(http, svc, "pic-01", free_memory_kb=200)
            assert (doc["type"], doc["capabilities"], doc["location"]) == ("picclaw", ["dht22"],
                                                                          "lab")
            assert doc["metadata"] == {"firmware": "v1"}
            assert doc["heartbeat_interval_seconds"] == FAST
            assert doc["sensors_active"] == 2
            assert doc["uptime_seconds"] >= 0
            assert doc["status"] == "online"
        assert not agent.connected
        doc = await node_where(http, svc, "pic-01", status="offline")
        assert doc["status_reason"] == "shutdown"


async def test_a_bare_agent_heartbeats_its_uptime(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession
) -> None:
    async with running(make_settings(mosquitto.url, root)) as svc, \
            Agent("bare-1", "microclaw", broker=mosquitto.url, interval_s=FAST,
                  topic_root=root):
        async def uptime_reported() -> Any:
            doc = await get_node(http, svc, "bare-1")
            return doc if doc and doc["uptime_seconds"] is not None else None

        doc = await eventually(uptime_reported)
        assert doc["status"] == "online"
        assert (doc["free_memory_kb"], doc["sensors_active"]) == (None, None)


async def test_a_failing_telemetry_callable_costs_its_telemetry_not_the_heartbeat(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession
) -> None:
    calls: list[int] = []

    def telemetry() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("sensor bus down")
        if len(calls) == 2:
            return {"free_memory_kb": "lots"}  # invalid: not an integer
        return {"free_memory_kb": 3}

    async with running(make_settings(mosquitto.url, root)) as svc, \
            Agent("flaky-1", "picclaw", broker=mosquitto.url, interval_s=FAST,
                  telemetry=telemetry, topic_root=root):
        async def uptime_reported() -> Any:
            doc = await get_node(http, svc, "flaky-1")
            return doc if doc and doc["uptime_seconds"] is not None else None

        doc = await eventually(uptime_reported)  # the first heartbeat, without telemetry
        assert doc["free_memory_kb"] is None
        await node_where(http, svc, "flaky-1", timeout=5, free_memory_kb=3)


async def test_agent_registers_again_when_a_heartbeat_is_answered_404(
    broker_url: str, root: str, http: aiohttp.ClientSession
) -> None:
    async with running(make_settings(broker_url, root)) as svc, \
            Agent("gw-7", "nanoclaw", broker=mqtt_url(broker_url), interval_s=FAST,
                  topic_root=root) as agent:
        assert await agent.wait_registered(5)
        first = await node_where(http, svc, "gw-7", status="online")
        async with http.delete(node_url(svc, "gw-7")) as resp:
            assert resp.status == 204
        # The next heartbeat is from an unknown node: 404 reply, and the agent registers again.
        again = await node_where(http, svc, "gw-7", timeout=5, status="online")
        assert again["registered_at"] != first["registered_at"]
        await eventually(lambda: agent.registered.is_set()
                         and agent.last_reply is not None and "code" not in agent.last_reply)


async def test_agent_reconnects_with_a_new_session_after_a_broker_restart(
    own_mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession
) -> None:
    async with running(make_settings(own_mosquitto.url, root)) as svc, \
            Agent("pic-9", "picclaw", broker=own_mosquitto.url, interval_s=FAST,
                  topic_root=root) as agent:
        assert await agent.wait_registered(5)
        before = agent.session
        await asyncio.to_thread(own_mosquitto.stop)
        await eventually(lambda: not agent.connected)
        assert not agent.registered.is_set()
        await asyncio.to_thread(own_mosquitto.start)
        # Backoff: 0.5 s doubling with full jitter; the manager reconnects too.
        await eventually(lambda: agent.connected and agent.registered.is_set(), timeout=20)
        assert agent.session != before
        doc = await node_where(http, svc, "pic-9", timeout=10, status="online")
        assert doc["status_reason"] in ("registered", "heartbeat")


# --- the library over REST -----------------------------------------------------------------

async def test_rest_agent_waits_for_the_manager_registers_heartbeats_and_says_shutdown(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    settings = make_settings(mosquitto.url, root, http=HttpSettings("127.0.0.1", port))
    agent = Agent("rest-1", "moltclaw", api=f"http://127.0.0.1:{port}", interval_s=FAST,
                  telemetry=lambda: {"free_memory_kb": 64, "sensors_active": 1},
                  topic_root=root)
    async with agent:
        # Nothing listens yet: the agent retries with backoff.
        assert not await agent.wait_registered(0.3)
        assert not agent.connected
        async with running(settings) as svc:
            assert await agent.wait_registered(10)
            doc = await node_where(http, svc, "rest-1", free_memory_kb=64)
            assert (doc["type"], doc["sensors_active"]) == ("moltclaw", 1)
            assert doc["heartbeat_interval_seconds"] == FAST
            async with http.delete(node_url(svc, "rest-1")) as resp:
                assert resp.status == 204
            again = await node_where(http, svc, "rest-1", status="online")
            assert again["registered_at"] != doc["registered_at"]
            await agent.stop()
            doc = await node_where(http, svc, "rest-1", status="offline")
            assert doc["status_reason"] == "shutdown"


# --- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("node_id", ["-dash", "_manager", "a/b", "a+b", "kitchen sensor",
                                     "$SYS", "x" * 129, ""])
def test_an_invalid_node_id_is_refused_with_a_config_error(node_id: str) -> None:
    with pytest.raises(ConfigError, match="node id"):
        Agent(node_id, "picclaw")


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"interval_s": 0}, "interval"),
    ({"interval_s": 0.5}, "interval"),
    ({"node_type": ""}, "node_type"),
    ({"broker": "embedded"}, "mqtt://"),
    ({"broker": "ftp://x"}, "--broker"),
    ({"api": "localhost:8080"}, "--api"),
    ({"api": "http://h:1", "broker": "mqtt://h:2"}, "not both"),
    ({"topic_root": "fleet/#"}, "topic root"),
    ({"capabilities": "dht22"}, "capabilities"),
])
def test_bad_agent_arguments_are_refused_with_a_message_naming_them(
    kwargs: dict[str, Any], words: str
) -> None:
    args = {"node_type": "picclaw", **kwargs}
    with pytest.raises(ConfigError, match=words.replace("+", r"\+")):
        Agent("ok-1", **args)


# --- the command line ----------------------------------------------------------------------

class AgentProcess:
    """``fleetmq agent`` as a subprocess, its output in files (a full pipe would block it)."""

    def __init__(self, workdir: Path, args: list[str], extra_env: dict[str, str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMQ_")}
        env.update(extra_env)
        self.stderr = workdir / "agent-stderr.txt"
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "fleetmq", "agent", *args],
                                         stdout=subprocess.DEVNULL, stderr=err, env=env,
                                         cwd=REPO)

    @property
    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    async def wait_exit(self, timeout: float = 15) -> int:
        await eventually(lambda: self.proc.poll() is not None, timeout=timeout, interval=0.05)
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def agent_processes(tmp_path: Path) -> Iterator[Any]:
    started: list[AgentProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> AgentProcess:
        workdir = tmp_path / f"agent-{len(started)}"
        workdir.mkdir()
        started.append(AgentProcess(workdir, list(args), env or {}))
        return started[-1]

    try:
        yield start
    finally:
        for process in started:
            process.kill()


async def test_a_killed_agent_process_goes_offline_at_once_through_its_will(
    broker_url: str, root: str, http: aiohttp.ClientSession, agent_processes: Any
) -> None:
    async with running(make_settings(broker_url, root)) as svc:
        # A 60 s interval: the timeout (180 s) cannot be what turns it offline.
        agent = agent_processes("--node-id", "doomed-1", "--node-type", "picclaw",
                                "--broker", mqtt_url(broker_url), "--topic-root", root)
        await node_where(http, svc, "doomed-1", timeout=15, status="online")
        agent.proc.send_signal(signal.SIGKILL)
        assert await agent.wait_exit() == -signal.SIGKILL
        doc = await node_where(http, svc, "doomed-1", timeout=3, status="offline")
        assert doc["status_reason"] == "connection_lost"


async def test_sigterm_makes_the_agent_process_say_shutdown_and_exit_0(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession, agent_processes: Any
) -> None:
    async with running(make_settings(mosquitto.url, root)) as svc:
        agent = agent_processes("--node-id", "calm-1", "--node-type", "nanoclaw",
                                "--broker", mosquitto.url, "--topic-root", root,
                                "--interval", "30")
        doc = await node_where(http, svc, "calm-1", timeout=15, status="online")
        assert doc["heartbeat_interval_seconds"] == 30
        agent.proc.send_signal(signal.SIGTERM)
        assert await agent.wait_exit() == 0, agent.log
        assert "Traceback" not in agent.log
        doc = await node_where(http, svc, "calm-1", timeout=3, status="offline")
        assert doc["status_reason"] == "shutdown"


async def test_agent_options_come_from_the_environment_and_flags_win(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession, agent_processes: Any
) -> None:
    env = {"FLEETMQ_AGENT_NODE_ID": "env-1", "FLEETMQ_AGENT_NODE_TYPE": "picclaw",
           "FLEETMQ_AGENT_TOPIC_ROOT": root, "FLEETMQ_AGENT_INTERVAL": "7",
           "FLEETMQ_AGENT_API": f"http://127.0.0.1:{free_port()}",  # nothing listens there
           "FLEETMQ_AGENT_LOG_LEVEL": "loud"}  # would exit 2 if the flag did not win
    async with running(make_settings(mosquitto.url, root)) as svc:
        agent = agent_processes("--broker", mosquitto.url, "--log-level", "warning", env=env)
        doc = await node_where(http, svc, "env-1", timeout=15, status="online")
        assert (doc["type"], doc["heartbeat_interval_seconds"]) == ("picclaw", 7)
        agent.proc.send_signal(signal.SIGINT)
        assert await agent.wait_exit() == 0, agent.log


async def test_the_agent_command_describes_the_node_and_a_restart_keeps_its_location(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession, agent_processes: Any
) -> None:
    args = ("--node-id", "described-1", "--node-type", "picclaw", "--broker", mosquitto.url,
            "--topic-root", root, "--name", "Gate <north>", "--location", "dock-3",
            "--capabilities", "dht22, relay", "--metadata", '{"fw": "1.4.2", "rev": 3}')
    async with running(make_settings(mosquitto.url, root)) as svc:
        first = agent_processes(*args)
        doc = await node_where(http, svc, "described-1", timeout=15, status="online")
        assert (doc["name"], doc["location"], doc["capabilities"], doc["metadata"]) == (
            "Gate <north>", "dock-3", ["dht22", "relay"], {"fw": "1.4.2", "rev": 3})
        first.proc.send_signal(signal.SIGTERM)
        assert await first.wait_exit() == 0, first.log
        await node_where(http, svc, "described-1", timeout=3, status="offline")
        # Registering again (a restarted agent) sends the same description: nothing is wiped.
        second = agent_processes(*args)
        doc = await node_where(http, svc, "described-1", timeout=15, status="online")
        assert (doc["location"], doc["metadata"]) == ("dock-3", {"fw": "1.4.2", "rev": 3})
        second.proc.send_signal(signal.SIGTERM)
        assert await second.wait_exit() == 0, second.log


@pytest.mark.parametrize(("args", "words"), [
    (["--node-id", "n1", "--node-type", "picclaw", "--metadata", "fw=1"], "--metadata"),
    (["--node-id", "n1", "--node-type", "picclaw", "--metadata", "[1]"], "--metadata"),
    (["--node-id", "n1", "--node-type", "picclaw", "--metadata", '{"a": {"b": 1}}'],
     "metadata"),
    (["--node-id", "a/b", "--node-type", "picclaw"], "node id"),
    (["--node-type", "picclaw"], "--node-id"),
    (["--node-id", "n1", "--node-type", "picclaw", "--interval", "soon"], "--interval"),
    (["--node-id", "n1", "--node-type", "picclaw", "--broker", "mqtt://h:1",
      "--api", "http://h:2"], "--api"),
])
async def test_bad_agent_options_exit_2_with_a_message(
    agent_processes: Any, args: list[str], words: str
) -> None:
    agent = agent_processes(*args)
    assert await agent.wait_exit() == 2
    assert words in agent.log
    assert "Traceback" not in agent.log

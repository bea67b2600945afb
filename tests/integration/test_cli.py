"""The real command line, run as a subprocess (contract section 7).

Every manager started here gets --broker (or FLEETMQ_BROKER) pointing at the session Mosquitto
or at an embedded broker on a free port, never the default 1883, and is killed in a finally.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fleetmq import __version__
from tests.conftest import broker_port, eventually, free_port

REPO = Path(__file__).resolve().parents[2]

SERVE_OPTIONS = ("--broker", "--http", "--topic-root", "--heartbeat-interval",
                 "--offline-after", "--log-level")
EXIT_TIMEOUT_S = 15.0
READY_TIMEOUT_S = 20.0


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any FLEETMQ_* setting, plus ``extra``; the store is
    in memory unless ``extra`` says otherwise (a file in the repo would outlive the test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMQ_")}
    env["FLEETMQ_STORE"] = "memory://"
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """A short-lived CLI run: version, help, or a start that must fail."""
    return subprocess.run([sys.executable, "-m", "fleetmq", *args], capture_output=True,
                          text=True, env=env if env is not None else clean_env(), cwd=REPO,
                          timeout=timeout, check=False)


class Manager:
    """``fleetmq serve`` as a subprocess, its output in files (a full pipe would block it)."""

    def __init__(self, args: list[str], env: dict[str, str], workdir: Path) -> None:
        self.args = args
        self.env = env
        self.stdout = workdir / "stdout.txt"
        self.stderr = workdir / "stderr.txt"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Manager:
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "fleetmq", "serve", *self.args],
                                         stdout=out, stderr=err, env=self.env, cwd=REPO)
        return self

    @property
    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        assert self.proc is not None
        proc = self.proc

        def exited() -> bool:
            return proc.poll() is not None

        try:
            await eventually(exited, timeout=timeout, interval=0.05)
        except AssertionError:
            raise AssertionError(f"fleetmq did not exit within {timeout}s; log:\n{self.log}")\
                from None
        return int(proc.returncode)

    async def wait_ready(self, http_port: int, session: aiohttp.ClientSession) -> None:
        """Poll /readyz until 200; fail early (with the log) if the process exits."""
        assert self.proc is not None
        proc = self.proc
        url = f"http://127.0.0.1:{http_port}/readyz"

        async def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"fleetmq exited with {proc.returncode}:\n{self.log}")
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    return resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        try:
            await eventually(ready, timeout=READY_TIMEOUT_S, interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlog:\n{self.log}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def managers(tmp_path: Path) -> Iterator[Any]:
    """Start ``fleetmq serve`` subprocesses; every one is killed at the end of the test."""
    started: list[Manager] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Manager:
        workdir = tmp_path / f"manager-{len(started)}"
        workdir.mkdir()
        manager = Manager(list(args), env if env is not None else clean_env(), workdir)
        started.append(manager)
        return manager.start()

    try:
        yield start
    finally:
        for manager in started:
            manager.kill()


def payloads(client: Any, topic: str) -> list[Any]:
    return [json.loads(m.payload) if m.payload else None for m in client.received(topic)]


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# --- plain invocations -------------------------------------------------------------------------

def test_version_prints_the_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"fleetmq {__version__}"


def test_serve_help_lists_every_option_with_its_environment_variable() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for option in SERVE_OPTIONS:
        assert option in text
        variable = "FLEETMQ_" + option.lstrip("-").replace("-", "_").upper()
        assert variable in text, variable
    assert "FLEETMQ_HTTP" in text
    assert "HOST:PORT" in text


@pytest.mark.parametrize(("option", "value"), [
    ("--heartbeat-interval", "abc"),
    ("--heartbeat-interval", "0"),
    ("--offline-after", "soon"),
    ("--broker", "ftp://x"),
    ("--http", "nope"),
    ("--log-level", "loud"),
    ("--topic-root", "fleet/#"),
    ("--loop", "trio"),
])
def test_a_bad_option_value_exits_2_with_a_message_naming_the_option(
    mosquitto: Any, option: str, value: str
) -> None:
    # Everything else valid and harmless, so only the bad value can be the cause.
    settings = {"--broker": mosquitto.url, "--http": "127.0.0.1:0", option: value}
    args = [word for pair in settings.items() for word in pair]
    result = run_cli("serve", *args)
    assert result.returncode == 2, result.stderr
    assert option in result.stderr
    assert value in result.stderr
    assert_no_traceback(result.stderr)


def test_a_bad_environment_value_exits_2_with_a_message_naming_the_option(
    mosquitto: Any
) -> None:
    env = clean_env(FLEETMQ_BROKER=mosquitto.url, FLEETMQ_HTTP="127.0.0.1:0",
                    FLEETMQ_HEARTBEAT_INTERVAL="often")
    result = run_cli("serve", env=env)
    assert result.returncode == 2, result.stderr
    assert "heartbeat-interval" in result.stderr.lower().replace("_", "-")
    assert_no_traceback(result.stderr)


# --- serving -----------------------------------------------------------------------------------

async def test_environment_variables_configure_serve(
    mosquitto: Any, root: str, managers: Any, http: aiohttp.ClientSession,
    mqtt_clients: Any
) -> None:
    port = free_port()
    env = clean_env(FLEETMQ_BROKER=mosquitto.url, FLEETMQ_HTTP=f"127.0.0.1:{port}",
                    FLEETMQ_TOPIC_ROOT=root, FLEETMQ_HEARTBEAT_INTERVAL="17")
    manager = managers(env=env)
    await manager.wait_ready(port, http)

    base = f"http://127.0.0.1:{port}/api/v1/fleet"
    async with http.post(f"{base}/register", json={"node_id": "n1", "type": "picclaw"}) as r:
        assert r.status == 200
    async with http.post(f"{base}/heartbeat", json={"node_id": "n1"}) as r:
        assert (await r.json())["next_check_seconds"] == 17  # FLEETMQ_HEARTBEAT_INTERVAL

    # FLEETMQ_TOPIC_ROOT: the manager's presence and the node's status live under our root.
    watcher = await mqtt_clients(mosquitto.port).connect()
    await watcher.subscribe(f"{root}/#")
    await eventually(lambda: payloads(watcher, f"{root}/_manager/status"))
    assert payloads(watcher, f"{root}/_manager/status")[-1]["status"] == "online"
    await eventually(lambda: payloads(watcher, f"{root}/n1/status"))

    manager.signal(signal.SIGTERM)
    assert await manager.wait_exit() == 0


@pytest.mark.parametrize(("choice", "expected"), [
    ("asyncio", "asyncio"),
    ("auto", "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"),
])
async def test_serve_says_which_event_loop_runs(
    mosquitto: Any, root: str, managers: Any, http: aiohttp.ClientSession,
    choice: str, expected: str
) -> None:
    port = free_port()
    env = clean_env(FLEETMQ_LOOP=choice)
    manager = managers("--broker", mosquitto.url, "--http", f"127.0.0.1:{port}",
                       "--topic-root", root, "--store", "memory://", env=env)
    await manager.wait_ready(port, http)
    await eventually(lambda: "fleetmq_ready_to_serve" in manager.log)
    assert f"loop={expected}" in manager.log
    base = f"http://127.0.0.1:{port}/api/v1/fleet"
    async with http.post(f"{base}/register", json={"node_id": "n1", "type": "picclaw"}) as r:
        assert r.status == 200
    async with http.get(f"{base}/nodes?limit=1") as r:
        assert (await r.json())["nodes"][0]["id"] == "n1"
    manager.signal(signal.SIGTERM)
    assert await manager.wait_exit() == 0


async def test_flags_win_over_environment_variables(
    mosquitto: Any, root: str, managers: Any, http: aiohttp.ClientSession,
    mqtt_clients: Any
) -> None:
    env_port, flag_port = free_port(), free_port()
    env = clean_env(
        FLEETMQ_BROKER=f"mqtt://127.0.0.1:{free_port()}",  # nothing listens there
        FLEETMQ_HTTP=f"127.0.0.1:{env_port}",
        FLEETMQ_TOPIC_ROOT=f"{root}-from-env",
        FLEETMQ_LOG_LEVEL="not-a-level",  # would exit 2 if the flag did not win
    )
    manager = managers("--broker", mosquitto.url, "--http", f"127.0.0.1:{flag_port}",
                       "--topic-root", root, "--log-level", "info", env=env)
    await manager.wait_ready(flag_port, http)  # ready: connected to the flag's broker

    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(f"http://127.0.0.1:{env_port}/healthz"):
            pass

    watcher = await mqtt_clients(mosquitto.port).connect()
    await watcher.subscribe(f"{root}/_manager/status")
    await eventually(lambda: payloads(watcher, f"{root}/_manager/status"))
    manager.signal(signal.SIGTERM)
    assert await manager.wait_exit() == 0


async def manager_watched_online(managers: Any, mosquitto: Any, root: str,
                                 http: aiohttp.ClientSession, mqtt_clients: Any
                                 ) -> tuple[Manager, Any, str]:
    """A ready ``fleetmq serve`` on the session Mosquitto, and a client that has seen its
    presence ``online``; returns them and the presence topic."""
    port = free_port()
    manager = managers("--broker", mosquitto.url, "--http", f"127.0.0.1:{port}",
                       "--topic-root", root)
    await manager.wait_ready(port, http)
    topic = f"{root}/_manager/status"
    watcher = await mqtt_clients(mosquitto.port).connect()
    await watcher.subscribe(topic)
    await eventually(lambda: payloads(watcher, topic))
    assert payloads(watcher, topic)[-1]["status"] == "online"
    return manager, watcher, topic


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stop_signal_publishes_offline_shutdown_and_exits_0(
    mosquitto: Any, root: str, managers: Any, http: aiohttp.ClientSession,
    mqtt_clients: Any, sig: int
) -> None:
    manager, watcher, topic = await manager_watched_online(
        managers, mosquitto, root, http, mqtt_clients)

    manager.signal(sig)
    started = time.monotonic()
    assert await manager.wait_exit() == 0, manager.log
    assert time.monotonic() - started < EXIT_TIMEOUT_S
    assert_no_traceback(manager.log)

    await eventually(lambda: payloads(watcher, topic)[-1]["status"] == "offline")
    goodbye = payloads(watcher, topic)[-1]
    assert goodbye["reason"] == "shutdown"
    assert "since" in goodbye

    # It is retained: a dashboard that comes later learns the manager is gone.
    late = await mqtt_clients(mosquitto.port).connect()
    await late.subscribe(topic)
    retained = (await eventually(lambda: late.received(topic)))[0]
    assert retained.retain
    assert json.loads(retained.payload) == goodbye


async def test_kill_9_makes_the_broker_publish_the_managers_last_will(
    mosquitto: Any, root: str, managers: Any, http: aiohttp.ClientSession,
    mqtt_clients: Any
) -> None:
    manager, watcher, topic = await manager_watched_online(
        managers, mosquitto, root, http, mqtt_clients)

    manager.signal(signal.SIGKILL)
    killed = time.monotonic()
    assert await manager.wait_exit() == -signal.SIGKILL

    # MQTT 5's will delay (5 s): a standby taking over sooner resumes the session and no
    # offline presence flashes (contract section 10).
    await eventually(lambda: payloads(watcher, topic)[-1]["status"] == "offline", timeout=10.0)
    assert time.monotonic() - killed >= 4.5
    assert payloads(watcher, topic)[-1] == {"status": "offline", "reason": "connection_lost"}
    late = await mqtt_clients(mosquitto.port).connect()
    await late.subscribe(topic)
    retained = (await eventually(lambda: late.received(topic)))[0]
    assert retained.retain
    assert json.loads(retained.payload) == {"status": "offline", "reason": "connection_lost"}


async def test_embedded_broker_serves_mqtt_and_rest_and_stops_on_sigterm(
    managers: Any, http: aiohttp.ClientSession, mqtt_clients: Any
) -> None:
    mqtt_url = f"embedded://127.0.0.1:{free_port()}"
    port = free_port()
    manager = managers("--broker", mqtt_url, "--http", f"127.0.0.1:{port}",
                       "--broker-ws", f"127.0.0.1:{free_port()}")
    await manager.wait_ready(port, http)

    # The default topic root is "fleet"; the broker is this manager's own, so nothing else
    # shares it.
    agent = await mqtt_clients(broker_port(mqtt_url), "picclaw-01").connect()
    await agent.subscribe("fleet/picclaw-01/reply")
    await agent.publish("fleet/picclaw-01/register",
                        json.dumps({"type": "picclaw", "location": "lab"}))
    replies = await eventually(lambda: payloads(agent, "fleet/picclaw-01/reply"))
    assert replies[0]["message"] == "Node successfully registered"

    async with http.get(f"http://127.0.0.1:{port}/api/v1/fleet/nodes/picclaw-01") as resp:
        assert resp.status == 200
        node = await resp.json()
    assert (node["type"], node["location"], node["status"]) == ("picclaw", "lab", "online")

    # The agent stays connected: the manager must stop even so.
    manager.signal(signal.SIGTERM)
    assert await manager.wait_exit() == 0, manager.log
    assert_no_traceback(manager.log)


async def exit_over_taken_port(start: Callable[[int], Manager]) -> tuple[str, int]:
    """Start a manager with ``start(port)`` while that port is taken: it must exit non-zero
    within 10 s with one line of error and no traceback. Returns the line and the port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        manager = start(busy)
        started = time.monotonic()
        code = await manager.wait_exit(timeout=10)
    assert code != 0
    assert time.monotonic() - started < 10
    lines = [line for line in manager.log.splitlines() if line.strip()]
    assert len(lines) == 1, manager.log
    assert_no_traceback(manager.log)
    return lines[0], busy


async def test_embedded_broker_port_taken_exits_with_a_one_line_hint_to_use_broker(
    managers: Any
) -> None:
    line, busy = await exit_over_taken_port(lambda busy: managers(
        "--broker", f"embedded://127.0.0.1:{busy}", "--http", f"127.0.0.1:{free_port()}",
        "--broker-ws", "off"))
    assert "already in use" in line
    assert str(busy) in line
    assert "--broker" in line


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
async def test_http_port_taken_exits_with_a_one_line_hint_to_use_http(
    request: pytest.FixtureRequest, root: str, managers: Any, broker: str
) -> None:
    url = (request.getfixturevalue("mosquitto").url if broker == "mosquitto"
           else f"embedded://127.0.0.1:{free_port()}")
    ws = ["--broker-ws", "off"] if broker == "embedded" else []
    line, busy = await exit_over_taken_port(lambda busy: managers(
        "--broker", url, "--http", f"127.0.0.1:{busy}", "--topic-root", root, *ws))
    assert "already in use" in line
    assert str(busy) in line
    assert "--http" in line

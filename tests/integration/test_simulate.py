"""``fleetmq simulate`` as a subprocess against Mosquitto and a running manager (issue 3).

Checked from the outside only: the manager's REST view, the exit code and the printed summary.
Every subprocess is killed in a finally.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from fleetmq.app import FleetService
from tests.conftest import eventually, make_settings, running
from tests.support import REPO, Mosquitto


class Simulation:
    """A running ``fleetmq simulate``; its output goes to files (a full pipe would block it)."""

    def __init__(self, proc: asyncio.subprocess.Process, stdout: Path, stderr: Path) -> None:
        self.proc = proc
        self._stdout = stdout
        self._stderr = stderr

    @property
    def stdout(self) -> str:
        return self._stdout.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self._stderr.read_text(errors="replace")

    async def wait_exit(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            return await self.proc.wait()


@asynccontextmanager
async def simulation(workdir: Path, *args: str) -> AsyncIterator[Simulation]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMQ_")}
    out, err = workdir / "sim-stdout.txt", workdir / "sim-stderr.txt"
    with out.open("wb") as out_file, err.open("wb") as err_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleetmq", "simulate", *args,
            stdout=out_file, stderr=err_file, env=env, cwd=REPO)
    try:
        yield Simulation(proc, out, err)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def fleet(http: aiohttp.ClientSession, svc: FleetService) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{svc.http_port}/api/v1/fleet/nodes?limit=10000"
    async with http.get(url) as resp:
        assert resp.status == 200
        nodes: list[dict[str, Any]] = (await resp.json())["nodes"]
        return nodes


def summary_row(stdout: str, name: str) -> str:
    """The value column of one row of the summary table."""
    for line in stdout.splitlines():
        if line.startswith(name + "  "):
            return line[len(name):].strip()
    raise AssertionError(f"no {name!r} row in the summary:\n{stdout}")


async def test_simulated_nodes_share_connections_register_heartbeat_and_come_back_after_404(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with running(make_settings(mosquitto.url, root)) as svc, simulation(
        tmp_path, "--nodes", "300", "--interval", "2", "--connections", "10",
        "--duration", "6", "--broker", mosquitto.url, "--topic-root", root,
    ) as sim:
        async def all_online() -> bool:
            nodes = await fleet(http, svc)
            return len(nodes) == 300 and all(n["status"] == "online" for n in nodes)
        await eventually(all_online, timeout=10, interval=0.2)
        nodes = await fleet(http, svc)
        assert nodes[0]["id"] == "sim-000001"
        assert nodes[-1]["id"] == "sim-000300"
        assert {n["heartbeat_interval_seconds"] for n in nodes} == {2}

        async def heartbeats_arrived() -> bool:
            return all(n["uptime_seconds"] is not None for n in await fleet(http, svc))
        await eventually(heartbeats_arrived, timeout=5, interval=0.2)
        assert all(n["free_memory_kb"] > 0 and n["sensors_active"] > 0
                   for n in await fleet(http, svc))

        # A node the manager forgot hears 404 on its next heartbeat and registers again.
        url = f"http://127.0.0.1:{svc.http_port}/api/v1/fleet/nodes/sim-000042"
        async with http.delete(url) as resp:
            assert resp.status == 204

        async def back() -> bool:
            async with http.get(url) as resp:
                return resp.status == 200 and (await resp.json())["status"] == "online"
        await eventually(back, timeout=5, interval=0.1)

        assert await sim.wait_exit(timeout=15) == 0, sim.stderr
        assert "Traceback" not in sim.stderr
        assert "elapsed" in sim.stderr  # the progress line (every 5 s on a pipe)
        assert summary_row(sim.stdout, "nodes") == "300"
        assert summary_row(sim.stdout, "connections") == "10"
        assert summary_row(sim.stdout, "errors") == "0"
        assert int(summary_row(sim.stdout, "404s seen")) >= 1
        # About 300 registers and 2 beats of 300 in 6 s, give or take the edges.
        assert int(summary_row(sim.stdout, "messages sent").replace(",", "")) >= 600


async def test_killed_own_connections_take_their_nodes_offline_through_their_wills(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with running(make_settings(mosquitto.url, root)) as svc, simulation(
        tmp_path, "--nodes", "40", "--interval", "1", "--connections", "40",
        "--duration", "5", "--kill-fraction", "0.5", "--broker", mosquitto.url,
        "--topic-root", root,
    ) as sim:
        async def half_lost() -> Counter[tuple[str, str]] | None:
            nodes = await fleet(http, svc)
            states = Counter((n["status"], n["status_reason"]) for n in nodes)
            return states if states[("offline", "connection_lost")] == 20 else None
        # Killed at 2.5 s; the survivors beat every second, so none can time out meanwhile.
        states = await eventually(half_lost, timeout=10, interval=0.1)
        assert len(await fleet(http, svc)) == 40
        assert sum(n for (status, _), n in states.items() if status == "online") == 20

        assert await sim.wait_exit(timeout=15) == 0, sim.stderr
        assert summary_row(sim.stdout, "connections") == "40"
        assert summary_row(sim.stdout, "killed connections") == "20"

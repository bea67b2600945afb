"""``fleetmq nodes`` run as a subprocess against a running manager (and against nothing)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import free_port, make_settings, running

REPO = Path(__file__).resolve().parents[2]
PREFIX = "/api/v1/fleet"
CLI_TIMEOUT_S = 30.0


async def nodes_cli(*args: str) -> tuple[int, str, str]:
    """Run ``fleetmq nodes`` without blocking the loop (the manager under test runs on it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMQ_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleetmq", "nodes", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(CLI_TIMEOUT_S):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def post(http: aiohttp.ClientSession, port: int, path: str, body: dict[str, Any]) -> None:
    async with http.post(f"http://127.0.0.1:{port}{PREFIX}/{path}", json=body) as resp:
        assert resp.status == 200, await resp.text()


def table_rows(out: str) -> dict[str, list[str]]:
    """Data rows by id; cells split on runs of two or more spaces (cells hold no such run)."""
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "TYPE", "STATUS", "REASON", "LAST", "SEEN", "LOCATION"]
    rows = {}
    for line in lines[1:-1]:
        cells = [cell for cell in line.split("  ") if cell]
        rows[cells[0].strip()] = [cell.strip() for cell in cells]
    return rows


async def test_nodes_prints_the_fleet_as_an_aligned_table_and_counts_per_status(
    mosquitto: Any, root: str, http: aiohttp.ClientSession
) -> None:
    async with running(make_settings(mosquitto.url, root)) as service:
        port = service.http_port
        await post(http, port, "register", {"node_id": "microclaw-esp32-f4cfa210",
                                            "node_type": "microclaw",
                                            "location": "office-floor-2"})
        await post(http, port, "register", {"node_id": "picclaw-01", "type": "picclaw"})
        await post(http, port, "register", {"node_id": "nanoclaw-pi-01", "node_type": "nanoclaw",
                                            "location": "lab"})
        await post(http, port, "heartbeat", {"node_id": "picclaw-01", "status": "degraded"})
        await post(http, port, "heartbeat", {"node_id": "nanoclaw-pi-01", "status": "offline",
                                             "reason": "shutdown"})

        code, out, err = await nodes_cli("--api", f"http://127.0.0.1:{port}")

        assert code == 0, err
        lines = out.splitlines()
        # Aligned: every column starts at the same offset on every line.
        status_at = lines[0].index("STATUS")
        assert all(line[status_at - 2:status_at] == "  " for line in lines[1:-1])
        rows = table_rows(out)
        assert list(rows) == ["microclaw-esp32-f4cfa210", "nanoclaw-pi-01", "picclaw-01"]
        assert rows["microclaw-esp32-f4cfa210"][1:4] == ["microclaw", "online", "registered"]
        assert rows["microclaw-esp32-f4cfa210"][5] == "office-floor-2"
        assert rows["nanoclaw-pi-01"][2:4] == ["offline", "shutdown"]
        assert rows["picclaw-01"][2:4] == ["degraded", "heartbeat"]
        assert rows["picclaw-01"][5] == "-"
        assert all(row[4].endswith("s ago") for row in rows.values())
        assert lines[-1] == "3 nodes: 1 online, 1 degraded, 1 offline"

        code, out, err = await nodes_cli("--api", f"127.0.0.1:{port}", "--status", "OFFLINE")
        assert code == 0, err
        assert list(table_rows(out)) == ["nanoclaw-pi-01"]
        assert out.splitlines()[-1] == "1 node: 0 online, 0 degraded, 1 offline"

        code, out, err = await nodes_cli("--api", f"http://127.0.0.1:{port}/", "--type", "PicClaw")
        assert code == 0, err
        assert list(table_rows(out)) == ["picclaw-01"]


async def test_nodes_pages_through_a_fleet_larger_than_one_page(
    mosquitto: Any, root: str, http: aiohttp.ClientSession
) -> None:
    count = 1_050  # more than one page of 1,000
    async with running(make_settings(mosquitto.url, root)) as service:
        port = service.http_port
        for first in range(0, count, 50):
            await asyncio.gather(*(
                post(http, port, "register", {"node_id": f"node-{i:05d}", "node_type": "sensor"})
                for i in range(first, min(first + 50, count))))

        code, out, err = await nodes_cli("--api", f"http://127.0.0.1:{port}")

        assert code == 0, err
        rows = table_rows(out)
        assert list(rows) == [f"node-{i:05d}" for i in range(count)]
        assert out.splitlines()[-1] == f"{count} nodes: {count} online, 0 degraded, 0 offline"


async def test_nodes_limit_shows_the_first_n_and_how_many_match(
    mosquitto: Any, root: str, http: aiohttp.ClientSession
) -> None:
    async with running(make_settings(mosquitto.url, root)) as service:
        port = service.http_port
        api = f"http://127.0.0.1:{port}"
        await asyncio.gather(*(post(http, port, "register", {"node_id": f"n-{i:04d}",
                                                            "node_type": "sensor"})
                               for i in range(1_005)))

        code, out, err = await nodes_cli("--api", api, "--limit", "1002")
        assert code == 0, err
        assert list(table_rows(out)) == [f"n-{i:04d}" for i in range(1_002)]  # two pages
        assert out.splitlines()[-1] == "first 1002 of 1005 nodes (--limit 1002)"

        code, out, err = await nodes_cli("--api", api, "--limit", "5000")
        assert code == 0, err
        assert out.splitlines()[-1] == "1005 nodes: 1005 online, 0 degraded, 0 offline"

        for bad in ("0", "-3", "many"):
            code, out, err = await nodes_cli("--api", api, "--limit", bad)
            assert (code, out) == (2, ""), bad
            assert err.strip() == f"fleetmq: error: --limit {bad!r} is not a whole number " \
                                  "of nodes from 1 up"


async def test_nodes_watch_keeps_the_table_live_and_ctrl_c_ends_it(
    mosquitto: Any, root: str, http: aiohttp.ClientSession
) -> None:
    async with running(make_settings(mosquitto.url, root)) as service:
        port = service.http_port
        for node_id in ("w-1", "w-2"):
            await post(http, port, "register", {"node_id": node_id, "node_type": "sensor",
                                                "location": "lab"})
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMQ_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleetmq", "nodes", "--watch", "--api",
            f"http://127.0.0.1:{port}", cwd=REPO, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            tables = _tables(proc.stdout)
            first = await asyncio.wait_for(anext(tables), CLI_TIMEOUT_S)
            assert table_rows(first)["w-1"][2] == "online"
            assert first.splitlines()[-1] == "2 nodes: 2 online, 0 degraded, 0 offline"

            await post(http, port, "heartbeat", {"node_id": "w-1", "status": "offline"})
            async with asyncio.timeout(3):
                async for table in tables:
                    if table_rows(table)["w-1"][2] == "offline":
                        break
            assert table.splitlines()[-1] == "2 nodes: 1 online, 0 degraded, 1 offline"

            await post(http, port, "register", {"node_id": "w-0", "node_type": "sensor"})
            async with asyncio.timeout(3):
                async for table in tables:
                    if "w-0" in table_rows(table):
                        break
            assert list(table_rows(table)) == ["w-0", "w-1", "w-2"]

            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), CLI_TIMEOUT_S) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _tables(stream: asyncio.StreamReader) -> AsyncIterator[str]:
    """Each table the command prints (not a terminal: one after the other, a blank line
    after each)."""
    lines: list[str] = []
    while line := (await stream.readline()).decode():
        if line == "\n":
            if lines:
                yield "".join(lines)
            lines = []
        else:
            lines.append(line)


async def test_nodes_on_an_empty_fleet_says_so(
    mosquitto: Any, root: str
) -> None:
    async with running(make_settings(mosquitto.url, root)) as service:
        code, out, err = await nodes_cli("--api", f"http://127.0.0.1:{service.http_port}")
    assert code == 0, err
    assert out == "no nodes\n"


async def test_nodes_exits_1_with_one_line_when_the_api_is_unreachable() -> None:
    api = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    code, out, err = await nodes_cli("--api", api)

    assert code == 1
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("fleetmq: error: cannot reach the fleetmq API at " + api)
    assert "--api" in err
    assert "Traceback" not in err


async def test_nodes_exits_1_with_the_apis_message_when_it_answers_an_error(
    mosquitto: Any, root: str
) -> None:
    async with running(make_settings(mosquitto.url, root)) as service:
        code, out, err = await nodes_cli("--api", f"http://127.0.0.1:{service.http_port}",
                                         "--status", "sleeping")
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1, err
    assert "answered 400" in err
    assert "Parameter 'status' must be one of online, degraded, offline" in err
    assert "Traceback" not in err

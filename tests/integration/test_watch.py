"""The watch stream and list-then-watch (contract sections 9 and 11), over real HTTP against a
real manager: memory, SQLite and PostgreSQL stores, the session's Mosquitto.

Events are made through the manager's routes, or in bulk through ``FleetService.fleet`` (the
one write path MQTT ingest and REST share) where thousands are needed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from fleetmq.app import FleetService
from fleetmq.config import AuthSettings, HttpSettings, Settings, StoreSettings, parse_store
from fleetmq.core.models import RegisterRequest
from fleetmq.http.watch import BUFFER_EVENTS
from fleetmq.store import Batch, HistoryEvent, make_store
from fleetmq.store.writer import RUN_IDS
from tests.conftest import eventually, make_settings, running
from tests.integration.mqtt_support import api
from tests.integration.test_durability import FlakyStore, post
from tests.support import Mosquitto

WATCH = "/api/v1/fleet/watch"


class Stream:
    """An SSE client reading an aiohttp response: events as dicts, comments counted."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next event: {"event", "id", "data"} (data parsed as JSON)."""
        fields: dict[str, Any] = {}
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.response.content.readline()).decode()
                if line == "":
                    raise EOFError("the stream ended")
                line = line.rstrip("\n")
                if line == "":
                    if fields:
                        fields["data"] = orjson.loads(fields.get("data", "null"))
                        return fields
                    continue
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value

    async def take(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        return [await self.next(timeout) for _ in range(count)]

    async def quiet(self, seconds: float) -> bool:
        """True if no event comes within ``seconds`` (comments may)."""
        try:
            await self.next(seconds)
        except TimeoutError:
            return True
        return False


@contextlib.asynccontextmanager
async def watching(http: aiohttp.ClientSession, svc: FleetService, query: str = "",
                   headers: dict[str, str] | None = None) -> AsyncIterator[Stream]:
    """A watch, open: once its headers are here, every later commit reaches it."""
    async with http.get(api(svc, WATCH + query), headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        yield Stream(response)


async def register(http: aiohttp.ClientSession, svc: FleetService, node_id: str,
                   node_type: str = "microclaw", **fields: Any) -> None:
    status, doc = await post(http, svc, "register",
                             {"node_id": node_id, "node_type": node_type, **fields})
    assert status == 200, doc


async def get_json(http: aiohttp.ClientSession, svc: FleetService, path: str) -> Any:
    async with http.get(api(svc, path)) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def event_number(event: dict[str, Any]) -> int:
    return int(event["id"].rsplit(".", 1)[1])


# --- the stream --------------------------------------------------------------------------------


async def test_committed_events_stream_in_order_with_the_node_as_it_was(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession
) -> None:
    async with running(make_settings(mosquitto.url, root)) as svc, \
            watching(http, svc) as every, \
            watching(http, svc, "?node_type=PICCLAW") as picclaws, \
            watching(http, svc, "?location=roof&node_type=picclaw") as roof, \
            watching(http, svc, "?node_id=a") as only_a:
        await register(http, svc, "a", "microclaw", location="lab")
        await register(http, svc, "b", "picclaw", location="roof")
        await post(http, svc, "heartbeat", {"node_id": "b", "status": "degraded",
                                            "reason": "low_battery"})
        async with http.delete(api(svc, "/api/v1/fleet/nodes/b")) as resp:
            assert resp.status == 204
        await register(http, svc, "c", "PicClaw")

        events = await every.take(5)
        store_id = svc.store.store_id
        assert [e["event"] for e in events] == ["transition"] * 5
        assert [e["id"] for e in events] == [f"{store_id}.{n}" for n in range(1, 6)]
        assert [e["data"]["id"] for e in events] == [1, 2, 3, 4, 5]
        registered_b, degraded, deleted = (e["data"] for e in events[1:4])
        assert registered_b == {
            "id": 2, "node_id": "b", "node_type": "picclaw", "location": "roof", "from": None,
            "to": "online", "reason": "registered", "at": registered_b["at"],
            "last_seen": registered_b["at"]}
        assert (degraded["from"], degraded["to"], degraded["reason"]) == (
            "online", "degraded", "low_battery")
        assert (deleted["from"], deleted["to"], deleted["reason"], deleted["node_type"],
                deleted["location"]) == ("degraded", "deleted", "deleted", "picclaw", "roof")
        # Filters on the event's own fields: type and location case-insensitive, id exact.
        assert [e["data"]["id"] for e in await picclaws.take(4)] == [2, 3, 4, 5]
        assert [e["data"]["id"] for e in await roof.take(3)] == [2, 3, 4]
        assert [e["data"]["id"] for e in await only_a.take(1)] == [1]
        assert await only_a.quiet(0.3)
        # The history route serves the same objects.
        history = await get_json(http, svc, "/api/v1/fleet/nodes/b/events")
        assert history["events"] == [deleted, degraded, registered_b]


async def test_a_quiet_stream_gets_a_comment_line_and_a_bad_position_is_a_400(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(mosquitto.url, root)
    settings = replace(settings, http=replace(settings.http, watch_keepalive_s=0.2))
    async with running(settings) as svc:
        async with watching(http, svc) as stream:
            assert await stream.quiet(0.7)
            assert stream.comments.count("keep-alive") >= 2
        for bad in ("?since=12", "?since=xyz.1", "?since=ab.-1", "?since=ab.1.2"):
            async with http.get(api(svc, WATCH + bad)) as resp:
                assert resp.status == 400, bad
                assert (await resp.json())["error"] == "Invalid parameter"
        async with http.get(api(svc, WATCH), headers={"Last-Event-ID": "nope"}) as resp:
            assert resp.status == 400
            assert "Last-Event-ID" in (await resp.json())["message"]


# --- list, then watch ----------------------------------------------------------------------------


async def test_list_then_watch_misses_nothing_and_the_summary_counts_match_the_list(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession
) -> None:
    async with running(make_settings(mosquitto.url, root)) as svc:
        for i in range(6):
            await register(http, svc, f"n{i}", ("microclaw", "picclaw", "nanoclaw")[i % 3])
        await post(http, svc, "heartbeat", {"node_id": "n1", "status": "degraded"})
        await post(http, svc, "heartbeat", {"node_id": "n2", "status": "offline"})
        listed = await get_json(http, svc, "/api/v1/fleet/nodes")
        store_id = svc.store.store_id
        assert listed["event_id"] == f"{store_id}.8"
        assert (await get_json(http, svc, "/api/v1/fleet/nodes?limit=2&status=online")
                )["event_id"] == listed["event_id"]
        summary = await get_json(http, svc, "/api/v1/fleet/summary")
        assert summary == {
            "total": 6, "by_status": {"online": 4, "degraded": 1, "offline": 1},
            "by_type": {"microclaw": 2, "picclaw": 2, "nanoclaw": 2},
            "event_id": listed["event_id"]}
        for status, count in summary["by_status"].items():
            page = await get_json(http, svc, f"/api/v1/fleet/nodes?status={status}")
            assert page["total"] == count
        for node_type, count in summary["by_type"].items():
            page = await get_json(http, svc, f"/api/v1/fleet/nodes?node_type={node_type}")
            assert page["total"] == count

        # Changes after the list, before the watch: they come first, then live ones.
        await register(http, svc, "late", "picclaw")
        await post(http, svc, "heartbeat", {"node_id": "n0", "status": "degraded"})
        async with watching(http, svc, f"?since={listed['event_id']}") as stream:
            await register(http, svc, "live")
            events = await stream.take(3)
            assert [(e["data"]["node_id"], e["data"]["to"]) for e in events] == [
                ("late", "online"), ("n0", "degraded"), ("live", "online")]
            assert [event_number(e) for e in events] == [9, 10, 11]
            assert await stream.quiet(0.3)
        # Without a position: from the next event only.
        async with watching(http, svc) as stream:
            await register(http, svc, "next")
            assert event_number(await stream.next()) == 12


async def test_a_client_resumes_across_a_manager_restart_missing_nothing(
    mosquitto: Mosquitto, root: str, durable_store: StoreSettings, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(mosquitto.url, root, store=durable_store)
    async with running(settings) as svc:
        store_id = svc.store.store_id
        async with watching(http, svc) as stream:
            for i in range(3):
                await register(http, svc, f"n{i}")
            seen = await stream.take(3)
        last = seen[-1]["id"]  # the client drops here; the fleet goes on
        await post(http, svc, "heartbeat", {"node_id": "n0", "status": "degraded"})
        async with http.delete(api(svc, "/api/v1/fleet/nodes/n1")) as resp:
            assert resp.status == 204
    async with running(settings) as svc:
        assert svc.store.store_id == store_id
        await register(http, svc, "n3")
        async with watching(http, svc, headers={"Last-Event-ID": last}) as stream:
            await register(http, svc, "n4")
            resumed = await stream.take(4)
            assert await stream.quiet(0.3)
    assert [(e["data"]["node_id"], e["data"]["to"]) for e in resumed] == [
        ("n0", "degraded"), ("n1", "deleted"), ("n3", "online"), ("n4", "online")]
    numbers = [event_number(e) for e in seen + resumed]
    assert numbers == sorted(set(numbers))  # increasing within the store, never reused
    # Each run numbers from a fresh block: ids the first run may have handed out past its
    # last commit are never given to other events.
    assert numbers[:5] == list(range(RUN_IDS + 1, RUN_IDS + 6))
    assert numbers[5:] == [2 * RUN_IDS + 1, 2 * RUN_IDS + 2]


async def test_a_client_resumes_on_the_standby_that_took_over_missing_nothing(
    mosquitto: Mosquitto, root: str, postgres_store_url: str, http: aiohttp.ClientSession
) -> None:
    """High availability (contract section 10): the active stops, the standby takes over, and
    a watch client that resumes there with its Last-Event-ID misses nothing and sees nothing
    twice."""
    settings = make_settings(mosquitto.url, root, lease_s=4.0,
                             store=parse_store(postgres_store_url, flush_interval_s=0.2))
    async with contextlib.AsyncExitStack() as stack:
        first = contextlib.AsyncExitStack()  # the active, stopped on purpose below
        stack.push_async_callback(first.aclose)
        active = await first.enter_async_context(running(settings))
        standby = await stack.enter_async_context(FleetService(settings))
        assert (active.role, standby.role) == ("active", "standby")
        async with watching(http, active) as stream:
            for i in range(3):
                await register(http, active, f"n{i}")
            seen = await stream.take(3)
        last = seen[-1]["id"]
        await post(http, active, "heartbeat", {"node_id": "n0", "status": "degraded"})
        async with http.delete(api(active, "/api/v1/fleet/nodes/n1")) as resp:
            assert resp.status == 204
        await first.aclose()  # a clean stop: its lock goes at once
        await eventually(lambda: standby.ready, timeout=5.0)
        assert standby.metrics.takeovers == 1
        await register(http, standby, "n3")
        async with watching(http, standby, headers={"Last-Event-ID": last}) as stream:
            await register(http, standby, "n4")
            resumed = await stream.take(4)
            assert await stream.quiet(0.3)
    assert [(e["data"]["node_id"], e["data"]["to"]) for e in resumed] == [
        ("n0", "degraded"), ("n1", "deleted"), ("n3", "online"), ("n4", "online")]
    numbers = [event_number(e) for e in seen + resumed]
    assert numbers == sorted(set(numbers))
    assert numbers[:5] == list(range(RUN_IDS + 1, RUN_IDS + 6))
    assert numbers[5:] == [2 * RUN_IDS + 1, 2 * RUN_IDS + 2]  # the new active's own block


async def test_positions_that_cannot_be_resumed_get_a_reset(
    mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    store_settings = parse_store(f"sqlite:///{tmp_path / 'f.db'}", history_days=1)
    store = make_store(store_settings)
    await store.open()
    store_id = store.store_id
    old = 1_000_000_000.0  # 2001: pruned at start
    await store.write(Batch(events=[
        HistoryEvent(i, f"n{i}", "gw", None, None, "online", "registered", old + i, old + i)
        for i in range(1, 6)]))
    await store.close()
    async with running(make_settings(mosquitto.url, root, store=store_settings)) as svc:
        async def pruned() -> bool:
            return await svc.store.first_event_id() == 5  # the newest is always kept
        await eventually(pruned)
        # 99: past the store's last event and before this run's first, so handed out by a
        # run before whose events were lost: gone as well.
        cases = ((f"{store_id}.3", "gone"), (f"{store_id}.99", "gone"),
                 ("0123456789abcdef.5", "another_store"),
                 (f"{store_id}.{2 * RUN_IDS}", "future"))
        for done, (since, reason) in enumerate(cases):
            async with watching(http, svc, f"?since={since}") as stream:
                reset = await stream.next()
                position = f"{store_id}.{RUN_IDS + done}"  # each case adds one event below
                assert (reset["event"], reset["data"]) == (
                    "reset", {"reason": reason, "event_id": position}), since
                assert reset["id"] == position
                await register(http, svc, f"after-{done}")  # the stream goes on from there
                assert (await stream.next())["data"]["node_id"] == f"after-{done}"
        # The position just before the oldest kept misses nothing: no reset.
        async with watching(http, svc, f"?since={store_id}.4") as stream:
            assert [e["data"]["node_id"] for e in await stream.take(5)] == [
                "n5", "after-0", "after-1", "after-2", "after-3"]


# --- slow clients ------------------------------------------------------------------------------


async def open_slow_watch(port: int) -> socket.socket:
    """A client that asks for the stream and then reads nothing (a bare socket: asyncio's
    streams would read ahead into memory), with a small receive buffer so the manager's writes
    to it stall soon. HTTP/1.0: the body comes unchunked, until the manager closes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, f"GET {WATCH} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock


async def read_to_end(sock: socket.socket) -> bytes:
    """Everything the manager sent, after the response head."""
    loop = asyncio.get_running_loop()
    chunks = []
    while chunk := await loop.sock_recv(sock, 1 << 16):
        chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"200", head
    return body


def parse_events(body: bytes) -> list[dict[str, Any]]:
    events = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n")
                      if line and not line.startswith(":"))
        if fields:
            events.append({**fields, "data": orjson.loads(fields["data"])})
    return events


async def test_a_slow_client_overflows_alone_and_resumes_where_it_was(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession
) -> None:
    async with running(make_settings(mosquitto.url, root)) as svc:
        slow_socket = await open_slow_watch(svc.http_port)
        try:
            async with watching(http, svc) as fast:
                got: list[int] = []

                async def keep_up() -> None:
                    while True:
                        got.append(event_number(await fast.next()))

                reading = asyncio.create_task(keep_up())
                # Registrations until the slow client is past its buffer (the kernel's socket
                # buffers take a few MB first): at least BUFFER_EVENTS.
                request = RegisterRequest.model_validate({"node_type": "sensor"})
                count = 0
                while not svc.watch.overflows and count < 200_000:
                    for _ in range(1_000):
                        svc.fleet.register(f"s{count:06}", request)
                        count += 1
                    await asyncio.sleep(0.01)
                assert svc.watch.overflows == 1
                assert count > BUFFER_EVENTS
                await eventually(lambda: len(got) == count, timeout=30)
                reading.cancel()
                assert got == list(range(1, count + 1))  # the fast one kept up, in order
            body = await asyncio.wait_for(read_to_end(slow_socket), 10)  # then the close
        finally:
            slow_socket.close()
        slow = parse_events(body)
        assert slow[-1]["event"] == "overflow"
        received = [e for e in slow if e["event"] == "transition"]
        assert slow[-1]["data"] == {"reason": "too_slow", "event_id": received[-1]["id"]}
        assert len(received) < count
        # It resumes with its last id and gets the rest, once each.
        async with watching(http, svc, headers={"Last-Event-ID": received[-1]["id"]}) as again:
            rest = await again.take(count - len(received), timeout=10)
            assert await again.quiet(0.3)
        assert [event_number(e) for e in received + rest] == list(range(1, count + 1))


# --- the store, auth, CORS -----------------------------------------------------------------------


async def test_the_stream_pauses_while_the_store_is_down_and_continues_in_order(
    mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(mosquitto.url, root, store=parse_store(
        f"sqlite:///{tmp_path / 'f.db'}", flush_interval_s=0.2))
    flaky = FlakyStore(make_store(settings.store))
    async with FleetService(settings, store=flaky) as svc:
        await eventually(lambda: svc.ready, timeout=10)
        await register(http, svc, "a")
        first = f"{svc.store.store_id}.{RUN_IDS + 1}"
        async with watching(http, svc) as live:
            flaky.broken = True
            for status in ("degraded", "online", "degraded"):  # applied in memory, queued
                await post(http, svc, "heartbeat", {"node_id": "a", "status": status})
            assert await live.quiet(1.0)  # nothing is committed: nothing is streamed
            # A client resuming now waits too (its backlog is in the store).
            async with watching(http, svc, f"?since={first}") as resuming:
                assert await resuming.quiet(1.5)
                assert "store unavailable, paused" in resuming.comments
                flaky.broken = False
                expected = [("online", "degraded"), ("degraded", "online"),
                            ("online", "degraded")]
                for stream in (live, resuming):
                    events = await stream.take(3, timeout=15)
                    assert [(e["data"]["from"], e["data"]["to"]) for e in events] == expected
                    assert [event_number(e) for e in events] == [
                        RUN_IDS + 2, RUN_IDS + 3, RUN_IDS + 4]


def guarded_settings(mosquitto: Mosquitto, root: str, tmp_path: Path) -> Settings:
    settings = make_settings(mosquitto.url, root, auth=AuthSettings(
        admin_token_file=str(tmp_path / "admin.token"), broker_auth="external"))
    return replace(settings, http=HttpSettings(
        host="127.0.0.1", port=0, cors_origins=("https://dash.example.com",)))


async def test_the_stream_and_summary_need_a_read_key_and_cors_preflights_need_none(
    mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with running(guarded_settings(mosquitto, root, tmp_path)) as svc:
        admin = (tmp_path / "admin.token").read_text().strip()
        async with http.post(api(svc, "/api/v1/keys"), json={"role": "read"},
                             headers={"Authorization": f"Bearer {admin}"}) as resp:
            reader = (await resp.json())["token"]
        for path in (WATCH, "/api/v1/fleet/summary"):
            async with http.get(api(svc, path)) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        read = {"Authorization": f"Bearer {reader}"}
        async with http.get(api(svc, "/api/v1/fleet/summary"), headers=read) as resp:
            assert resp.status == 200
        origin = {"Origin": "https://dash.example.com"}
        async with watching(http, svc, headers={**read, **origin}) as stream:
            assert stream.response.headers["Access-Control-Allow-Origin"] == origin["Origin"]
            assert "Origin" in stream.response.headers["Vary"]
            async with http.post(api(svc, "/api/v1/fleet/register"),
                                 json={"node_id": "x", "node_type": "gw"},
                                 headers={"Authorization": f"Bearer {admin}"}) as resp:
                assert resp.status == 200
            assert (await stream.next())["data"]["node_id"] == "x"
        preflight = {**origin, "Access-Control-Request-Method": "GET",
                     "Access-Control-Request-Headers": "authorization, last-event-id"}
        async with http.options(api(svc, WATCH), headers=preflight) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == origin["Origin"]
            allowed = resp.headers["Access-Control-Allow-Headers"].lower()
            assert "authorization" in allowed
            assert "last-event-id" in allowed
        async with http.options(api(svc, WATCH), headers={
                **preflight, "Origin": "https://evil.example.com"}) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
        async with http.get(api(svc, "/api/v1/fleet/summary"),
                            headers={**read, "Origin": "https://evil.example.com"}) as resp:
            assert resp.status == 200
            assert "Access-Control-Allow-Origin" not in resp.headers


async def test_a_filtered_stream_gets_its_keep_alive_while_other_nodes_change(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(mosquitto.url, root)
    settings = replace(settings, http=replace(settings.http, watch_keepalive_s=0.5))
    async with running(settings) as svc, watching(http, svc, "?node_id=quiet") as filtered:
        await register(http, svc, "busy")
        for i in range(12):  # a change every 0.15 s: none of them the filter's
            status = "degraded" if i % 2 == 0 else "online"
            await post(http, svc, "heartbeat", {"node_id": "busy", "status": status})
            await asyncio.sleep(0.15)
        assert await filtered.quiet(0.2)
        assert filtered.comments.count("keep-alive") >= 2  # about 1.8 s at one per 0.5 s


async def test_a_revoked_key_s_open_stream_ends_and_gets_nothing_after(
    mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with running(guarded_settings(mosquitto, root, tmp_path)) as svc:
        admin = {"Authorization": f"Bearer {(tmp_path / 'admin.token').read_text().strip()}"}
        async with http.post(api(svc, "/api/v1/keys"), json={"role": "read"},
                             headers=admin) as resp:
            key = await resp.json()
        async with watching(http, svc, headers={"Authorization": f"Bearer {key['token']}"}
                            ) as stream:
            async with http.delete(api(svc, f"/api/v1/keys/{key['id']}"),
                                   headers=admin) as resp:
                assert resp.status == 204
            async with http.post(api(svc, "/api/v1/fleet/register"), headers=admin,
                                 json={"node_id": "secret", "node_type": "gw",
                                       "location": "vault"}) as resp:
                assert resp.status == 200
            with pytest.raises(EOFError):  # ended at that commit's wake, before sending it
                await stream.next(timeout=5)


async def test_shutdown_does_not_wait_for_a_watch_client_that_stopped_reading(
    mosquitto: Mosquitto, root: str
) -> None:
    loop = asyncio.get_running_loop()
    stalled: socket.socket | None = None
    try:
        async with FleetService(make_settings(mosquitto.url, root)) as svc:
            await eventually(lambda: svc.ready, timeout=10)
            stalled = await open_slow_watch(svc.http_port)
            await eventually(lambda: svc.watch.watchers == 1)
            request = RegisterRequest.model_validate({"node_type": "gw", "location": "x" * 64})
            for i in range(30_000):  # far more than its socket's buffers hold
                svc.fleet.register(f"n{i:05d}", request)
            await eventually(lambda: svc.watch.fanned_id >= 30_000, timeout=20)
            stopping = loop.time()
        # Its write waits for a drain that never comes: shutdown aborts it, not the 10 s wait.
        assert loop.time() - stopping < 5
    finally:
        if stalled is not None:
            stalled.close()

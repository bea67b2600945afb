"""The REST facade over real HTTP (contract section 4): every route, every error.

Most tests run against the session Mosquitto; the MQTT side effect of a REST write runs
against both brokers.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
import yarl

from fleetmq.app import FleetService
from fleetmq.http.api import STREAM_ABOVE
from tests.conftest import (
    broker_port,
    eventually,
    free_port,
    make_settings,
    running,
)

FLEET = "/api/v1/fleet"
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
# The keys of the contract's node example (section 4, "A node").
NODE_KEYS = {
    "id", "name", "type", "capabilities", "location", "metadata", "status", "status_reason",
    "status_since", "last_seen", "registered_at", "heartbeat_interval_seconds",
    "uptime_seconds", "free_memory_kb", "sensors_active",
}
TELEMETRY = ("uptime_seconds", "free_memory_kb", "sensors_active")
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


class Api:
    """A thin client for the manager's REST API: raw bytes in, status, headers and body out."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def request(self, method: str, path: str, *, body: Any = None, data: bytes | None = None,
                      headers: dict[str, str] | None = None, params: Any = None,
                      skip_auto_headers: tuple[str, ...] = ()) -> Reply:
        if body is not None:
            data = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        async with self.session.request(method, self.base + path, data=data, headers=headers,
                                        params=params,
                                        skip_auto_headers=skip_auto_headers) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    async def register(self, node_id: str | None = None, node_type: str | None = "microclaw",
                       **fields: Any) -> Reply:
        body = dict(fields)
        if node_id is not None:
            body["node_id"] = node_id
        if node_type is not None:
            body["node_type"] = node_type
        return await self.request("POST", f"{FLEET}/register", body=body)

    async def heartbeat(self, node_id: str, **fields: Any) -> Reply:
        return await self.request("POST", f"{FLEET}/heartbeat", body={"node_id": node_id, **fields})

    async def node(self, node_id: str) -> dict[str, Any]:
        reply = await self.request("GET", f"{FLEET}/nodes/{node_id}")
        assert reply.status == 200, reply.raw
        doc: dict[str, Any] = reply.json
        return doc

    async def nodes(self, **params: Any) -> Reply:
        return await self.request("GET", f"{FLEET}/nodes", params=params)


def assert_error(reply: Reply, status: int, error: str | None = None,
                 mentions: tuple[str, ...] = ()) -> dict[str, str]:
    """Every error, on every route, is JSON with exactly ``error`` and ``message``."""
    assert reply.status == status, reply.raw
    assert reply.headers["Content-Type"].startswith("application/json")
    body: dict[str, str] = reply.json
    assert set(body) == {"error", "message"}, body
    assert isinstance(body["error"], str)
    assert body["error"]
    assert isinstance(body["message"], str)
    assert body["message"]
    if error is not None:
        assert body["error"] == error
    for word in mentions:
        assert word in body["message"], body
    return body


def assert_timestamp(value: str) -> datetime:
    """RFC 3339, UTC, milliseconds, ending in Z, and close to now."""
    assert TIMESTAMP.match(value), value
    moment = datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - moment) < timedelta(seconds=30)
    return moment


@pytest.fixture
async def api(mosquitto: Any, root: str,
              http: aiohttp.ClientSession) -> AsyncIterator[Api]:
    async with running(make_settings(mosquitto.url, root)) as svc:
        yield Api(http, f"http://127.0.0.1:{svc.http_port}")


# --- POST /register ----------------------------------------------------------------------------

FULL_REGISTER = {
    "node_type": "microclaw", "name": "office sensor", "capabilities": ["dht22", "mqtt"],
    "location": "office-floor-2", "metadata": {"gateway": "nanoclaw-pi-01", "firmware": "v1.0.0",
                                              "rev": 3, "beta": False, "note": None},
    "heartbeat_interval_seconds": 30,
}


async def test_register_returns_registered_with_a_millisecond_utc_timestamp(api: Api) -> None:
    reply = await api.register("microclaw-esp32-f4cfa210")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    body = reply.json
    assert set(body) == {"node_id", "status", "message", "timestamp"}
    assert body["node_id"] == "microclaw-esp32-f4cfa210"
    assert body["status"] == "registered"
    assert body["message"] == "Node successfully registered"
    assert_timestamp(body["timestamp"])


async def test_registering_again_says_registration_updated(api: Api) -> None:
    first = await api.register("n1")
    second = await api.register("n1")
    assert first.json["message"] == "Node successfully registered"
    assert second.status == 200
    assert second.json["message"] == "Node registration updated"
    assert second.json["status"] == "registered"


async def test_register_stores_every_described_field(api: Api) -> None:
    reply = await api.register("n1", **FULL_REGISTER)
    assert reply.status == 200
    doc = await api.node("n1")
    assert doc["name"] == "office sensor"
    assert doc["type"] == "microclaw"
    assert doc["capabilities"] == ["dht22", "mqtt"]
    assert doc["location"] == "office-floor-2"
    assert doc["metadata"] == FULL_REGISTER["metadata"]
    assert doc["heartbeat_interval_seconds"] == 30
    assert doc["status"] == "online"
    assert doc["status_reason"] == "registered"
    assert doc["registered_at"] == doc["status_since"] == doc["last_seen"] \
        == reply.json["timestamp"]


async def test_register_accepts_the_type_and_node_name_aliases_of_existing_agents(
    api: Api
) -> None:
    # The real PicClaw agent sends "type" rather than "node_type".
    reply = await api.request("POST", f"{FLEET}/register", body={
        "node_id": "picclaw-01", "type": "picclaw", "node_name": "PicClaw in the lab"})
    assert reply.status == 200, reply.raw
    doc = await api.node("picclaw-01")
    assert doc["type"] == "picclaw"
    assert doc["name"] == "PicClaw in the lab"


async def test_register_name_defaults_to_the_node_id(api: Api) -> None:
    await api.register("n1")
    doc = await api.node("n1")
    assert doc["name"] == "n1"
    assert doc["capabilities"] == []
    assert doc["location"] is None
    assert doc["metadata"] == {}


@pytest.mark.parametrize("headers", [
    pytest.param({}, id="no-content-type"),
    pytest.param({"Content-Type": "text/plain"}, id="text-plain"),
    pytest.param({"Content-Type": "application/x-www-form-urlencoded"}, id="form"),
])
async def test_register_body_is_json_whatever_the_content_type(
    api: Api, headers: dict[str, str]
) -> None:
    data = b'{"node_id": "tiny-agent", "node_type": "microclaw"}'
    reply = await api.request("POST", f"{FLEET}/register", data=data, headers=headers,
                              skip_auto_headers=("Content-Type",))
    assert reply.status == 200, reply.raw
    assert (await api.node("tiny-agent"))["type"] == "microclaw"


async def test_register_ignores_unknown_fields(api: Api) -> None:
    reply = await api.register("n1", firmware_build=42, extra={"nested": [1, 2]}, status="weird")
    assert reply.status == 200, reply.raw
    doc = await api.node("n1")
    assert set(doc) == NODE_KEYS
    assert doc["status"] == "online"


async def test_reregister_replaces_the_description_and_keeps_registered_at_and_telemetry(
    api: Api
) -> None:
    first = await api.register("n1", **FULL_REGISTER)
    await api.heartbeat("n1", uptime_seconds=100, free_memory_kb=200, sensors_active=2)
    await api.heartbeat("n1", status="offline", reason="maintenance")
    assert (await api.node("n1"))["status"] == "offline"

    second = await api.register("n1", node_type="microclaw")
    assert second.json["message"] == "Node registration updated"
    doc = await api.node("n1")
    # What the new request omits is cleared ...
    assert doc["name"] == "n1"
    assert doc["capabilities"] == []
    assert doc["location"] is None
    assert doc["metadata"] == {}
    assert doc["heartbeat_interval_seconds"] == 60  # the manager's default again
    # ... registered_at and the latest telemetry are kept, and the node is online again.
    assert doc["registered_at"] == first.json["timestamp"]
    assert (doc["uptime_seconds"], doc["free_memory_kb"], doc["sensors_active"]) == (100, 200, 2)
    assert doc["status"] == "online"
    assert doc["status_reason"] == "registered"
    assert doc["status_since"] == doc["last_seen"] == second.json["timestamp"]


async def test_register_with_another_node_type_is_a_409_conflict(api: Api) -> None:
    await api.register("shared-id", node_type="microclaw", location="lab")
    reply = await api.register("shared-id", node_type="picclaw")
    assert_error(reply, 409, mentions=("shared-id", "microclaw"))
    doc = await api.node("shared-id")
    assert doc["type"] == "microclaw"  # the first device keeps its id and description
    assert doc["location"] == "lab"

    # Deleting the node frees the id for another type.
    assert (await api.request("DELETE", f"{FLEET}/nodes/shared-id")).status == 204
    assert (await api.register("shared-id", node_type="picclaw")).status == 200


@pytest.mark.parametrize(("body", "field"), [
    pytest.param({"node_type": "microclaw"}, "node_id", id="missing-node_id"),
    pytest.param({"node_id": "n1"}, "node_type", id="missing-node_type"),
    pytest.param({"node_id": "n1", "node_type": ""}, "node_type", id="empty-node_type"),
    pytest.param({"node_id": "n1", "node_type": "x" * 65}, "node_type", id="long-node_type"),
    pytest.param({"node_id": "a/b", "node_type": "microclaw"}, "node_id", id="id-with-slash"),
    pytest.param({"node_id": "a+b", "node_type": "microclaw"}, "node_id", id="id-with-plus"),
    pytest.param({"node_id": "a b", "node_type": "microclaw"}, "node_id", id="id-with-space"),
    pytest.param({"node_id": "$SYS", "node_type": "microclaw"}, "node_id", id="id-with-dollar"),
    pytest.param({"node_id": "x" * 129, "node_type": "microclaw"}, "node_id", id="id-129-chars"),
    pytest.param({"node_id": 7, "node_type": "microclaw"}, "node_id", id="id-not-a-string"),
    pytest.param({"node_id": "n1", "node_type": "microclaw", "metadata": {"a": {"b": 1}}},
                 "metadata", id="metadata-nested-object"),
    pytest.param({"node_id": "n1", "node_type": "microclaw", "metadata": {"a": [1]}},
                 "metadata", id="metadata-list-value"),
    pytest.param({"node_id": "n1", "node_type": "microclaw", "capabilities": "dht22"},
                 "capabilities", id="capabilities-not-a-list"),
    pytest.param({"node_id": "n1", "node_type": "microclaw", "heartbeat_interval_seconds": 0},
                 "heartbeat_interval_seconds", id="interval-0"),
    pytest.param({"node_id": "n1", "node_type": "microclaw",
                  "heartbeat_interval_seconds": 86401},
                 "heartbeat_interval_seconds", id="interval-86401"),
    pytest.param({"node_id": "n1", "node_type": "microclaw", "heartbeat_interval_seconds": "60"},
                 "heartbeat_interval_seconds", id="interval-string"),
])
async def test_register_rejects_an_invalid_field_with_a_400_naming_it(
    api: Api, body: dict[str, Any], field: str
) -> None:
    reply = await api.request("POST", f"{FLEET}/register", body=body)
    assert_error(reply, 400, mentions=(field,))
    assert (await api.nodes()).json["total"] == 0


@pytest.mark.parametrize("data", [
    pytest.param(b'{"node_id": "n1", "node_type": ', id="truncated"),
    pytest.param(b"node_id=n1&node_type=x", id="form-encoded"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\xff\xfe{}", id="not-utf8"),
])
async def test_register_rejects_invalid_json_with_a_400(api: Api, data: bytes) -> None:
    reply = await api.request("POST", f"{FLEET}/register", data=data)
    assert_error(reply, 400, error="Invalid JSON")


@pytest.mark.parametrize("data", [b"[1, 2]", b'"n1"', b"null", b"42"])
async def test_register_rejects_json_that_is_not_an_object_with_a_400(
    api: Api, data: bytes
) -> None:
    reply = await api.request("POST", f"{FLEET}/register", data=data)
    assert_error(reply, 400, mentions=("object",))


async def test_register_interval_bounds_1_and_86400_are_accepted(api: Api) -> None:
    assert (await api.register("fast", heartbeat_interval_seconds=1)).status == 200
    assert (await api.register("slow", heartbeat_interval_seconds=86400)).status == 200
    assert (await api.node("fast"))["heartbeat_interval_seconds"] == 1
    assert (await api.node("slow"))["heartbeat_interval_seconds"] == 86400


def _padded_register(size: int) -> bytes:
    """A valid register body of exactly ``size`` bytes (padded with an unknown field)."""
    head = b'{"node_id": "big", "node_type": "microclaw", "pad": "'
    tail = b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def test_register_body_over_64_kib_is_413(api: Api) -> None:
    reply = await api.request("POST", f"{FLEET}/register", data=_padded_register(70 * 1024))
    assert_error(reply, 413)
    assert (await api.request("GET", f"{FLEET}/nodes/big")).status == 404


async def test_register_body_of_exactly_64_kib_is_accepted(api: Api) -> None:
    reply = await api.request("POST", f"{FLEET}/register", data=_padded_register(64 * 1024))
    assert reply.status == 200, reply.raw


async def test_a_chunked_body_over_64_kib_is_413(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"node_id": "big", "node_type": "microclaw", "pad": "'
        for _ in range(70):
            yield b"x" * 1024
        yield b'"}'

    async with api.session.post(f"{api.base}{FLEET}/register", data=chunks()) as resp:
        reply = Reply(resp.status, resp.headers, await resp.read())
    assert_error(reply, 413)


@pytest.mark.parametrize(("method", "path", "body"), [
    pytest.param("POST", f"{FLEET}/register",
                 {"node_id": "x" * 5000 + "/", "node_type": "microclaw"}, id="register-id"),
    pytest.param("POST", f"{FLEET}/register", {"node_id": "n1", "node_type": "t" * 5000},
                 id="register-type"),
    pytest.param("POST", f"{FLEET}/heartbeat", {"node_id": "n1", "status": "s" * 5000},
                 id="heartbeat-status"),
    pytest.param("GET", f"{FLEET}/nodes?status={'s' * 5000}", None, id="status-filter"),
    pytest.param("GET", f"{FLEET}/nodes?limit={'9' * 5000}", None, id="limit"),
    pytest.param("GET", f"{FLEET}/nodes/{'x' * 5000}", None, id="path-id"),
    pytest.param("GET", f"/{'y' * 5000}", None, id="unknown-route"),
])
async def test_error_messages_cut_quoted_values_to_64_characters(
    api: Api, method: str, path: str, body: Any
) -> None:
    await api.register("n1")
    reply = await api.request(method, path, body=body)
    message = assert_error(reply, reply.status)["message"]
    assert 400 <= reply.status < 500
    assert "x" * 65 not in message
    assert "t" * 65 not in message
    assert "s" * 65 not in message
    assert "9" * 65 not in message
    assert "y" * 65 not in message


async def test_heartbeat_body_over_64_kib_is_413(api: Api) -> None:
    await api.register("n1")
    data = b'{"node_id": "n1", "pad": "' + b"x" * (70 * 1024) + b'"}'
    assert_error(await api.request("POST", f"{FLEET}/heartbeat", data=data), 413)


# --- POST /heartbeat ---------------------------------------------------------------------------

async def test_heartbeat_replies_with_the_declared_interval_as_next_check(api: Api) -> None:
    await api.register("n1", heartbeat_interval_seconds=15)
    reply = await api.heartbeat("n1", uptime_seconds=86400, free_memory_kb=200,
                                sensors_active=2, status="online")
    assert reply.status == 200, reply.raw
    body = reply.json
    assert set(body) == {"node_id", "received", "next_check_seconds"}
    assert body["node_id"] == "n1"
    assert body["next_check_seconds"] == 15
    assert_timestamp(body["received"])
    assert (await api.node("n1"))["last_seen"] == body["received"]


async def test_heartbeat_next_check_is_the_default_interval_when_none_is_declared(
    mosquitto: Any, root: str, http: aiohttp.ClientSession
) -> None:
    async with running(make_settings(mosquitto.url, root, heartbeat_interval_s=45)) as svc:
        api = Api(http, f"http://127.0.0.1:{svc.http_port}")
        await api.register("n1")
        reply = await api.heartbeat("n1")
        assert reply.json["next_check_seconds"] == 45
        assert (await api.node("n1"))["heartbeat_interval_seconds"] == 45


async def test_heartbeat_keeps_each_telemetry_field_until_it_is_reported_again(api: Api) -> None:
    await api.register("n1")
    doc = await api.node("n1")
    assert all(doc[key] is None for key in TELEMETRY)

    await api.heartbeat("n1", uptime_seconds=10, free_memory_kb=200, sensors_active=2)
    await api.heartbeat("n1", uptime_seconds=70)
    doc = await api.node("n1")
    assert (doc["uptime_seconds"], doc["free_memory_kb"], doc["sensors_active"]) == (70, 200, 2)

    bare = await api.heartbeat("n1")
    assert bare.status == 200
    doc = await api.node("n1")
    assert (doc["uptime_seconds"], doc["free_memory_kb"], doc["sensors_active"]) == (70, 200, 2)
    assert doc["last_seen"] == bare.json["received"]


async def test_heartbeat_counters_accept_zero_max_and_integral_floats(api: Api) -> None:
    await api.register("n1")
    reply = await api.heartbeat("n1", uptime_seconds=5.0, free_memory_kb=0,
                                sensors_active=2**63 - 1)
    assert reply.status == 200, reply.raw
    doc = await api.node("n1")
    assert doc["uptime_seconds"] == 5
    assert isinstance(doc["uptime_seconds"], int)
    assert doc["free_memory_kb"] == 0
    assert doc["sensors_active"] == 2**63 - 1


@pytest.mark.parametrize("field", TELEMETRY)
@pytest.mark.parametrize("value", [
    pytest.param("5", id="string"),
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    pytest.param(5.5, id="fraction"),
    pytest.param(-1, id="negative"),
    pytest.param(2**63, id="over-2^63-1"),
])
async def test_heartbeat_refuses_a_counter_that_is_not_a_whole_number(
    api: Api, field: str, value: Any
) -> None:
    await api.register("n1")
    reply = await api.heartbeat("n1", **{field: value})
    assert_error(reply, 400, mentions=(field,))
    assert (await api.node("n1"))[field] is None


@pytest.mark.parametrize(("body", "field"), [
    pytest.param({"uptime_seconds": 1}, "node_id", id="missing-node_id"),
    pytest.param({"node_id": "a/b"}, "node_id", id="invalid-node_id"),
    pytest.param({"node_id": "n1", "status": "sleeping"}, "status", id="unknown-status"),
    pytest.param({"node_id": "n1", "status": "offline", "reason": "x" * 65}, "reason",
                 id="long-reason"),
    pytest.param({"node_id": "n1", "status": "offline", "reason": "bad\nreason"}, "reason",
                 id="unprintable-reason"),
])
async def test_heartbeat_rejects_an_invalid_field_with_a_400_naming_it(
    api: Api, body: dict[str, Any], field: str
) -> None:
    await api.register("n1")
    reply = await api.request("POST", f"{FLEET}/heartbeat", body=body)
    assert_error(reply, 400, mentions=(field,))
    assert (await api.node("n1"))["status"] == "online"


@pytest.mark.parametrize("data", [b"{oops", b"[]", b""])
async def test_heartbeat_rejects_a_body_that_is_not_a_json_object(api: Api, data: bytes) -> None:
    assert_error(await api.request("POST", f"{FLEET}/heartbeat", data=data), 400)


async def test_heartbeat_degraded_then_online_records_each_transition(api: Api) -> None:
    await api.register("n1")
    degraded = await api.heartbeat("n1", status="degraded")
    assert degraded.status == 200
    doc = await api.node("n1")
    assert doc["status"] == "degraded"
    assert doc["status_reason"] == "heartbeat"
    assert doc["status_since"] == degraded.json["received"]

    still = await api.heartbeat("n1", status="degraded")
    doc = await api.node("n1")
    assert doc["status"] == "degraded"
    assert doc["status_since"] == degraded.json["received"]  # no transition, no new since
    assert doc["last_seen"] == still.json["received"]

    online = await api.heartbeat("n1")  # without status: online
    doc = await api.node("n1")
    assert doc["status"] == "online"
    assert doc["status_reason"] == "heartbeat"
    assert doc["status_since"] == online.json["received"]


async def test_heartbeat_offline_takes_the_node_offline_with_its_reason(api: Api) -> None:
    await api.register("n1")
    alive = await api.heartbeat("n1", uptime_seconds=50)
    offline = await api.heartbeat("n1", status="offline", reason="shutdown", uptime_seconds=99)
    assert offline.status == 200
    doc = await api.node("n1")
    assert doc["status"] == "offline"
    assert doc["status_reason"] == "shutdown"
    assert doc["status_since"] == offline.json["received"]
    # An offline report is not proof of life: last_seen and telemetry stay.
    assert doc["last_seen"] == alive.json["received"]
    assert doc["uptime_seconds"] == 50

    # Offline again is no transition: the first report's reason and moment stay.
    await api.heartbeat("n1", status="offline", reason="maintenance")
    again = await api.node("n1")
    assert (again["status_reason"], again["status_since"]) == ("shutdown", doc["status_since"])

    await api.heartbeat("n1")
    back = await api.node("n1")
    assert back["status"] == "online"
    assert back["status_reason"] == "heartbeat"


async def test_heartbeat_offline_without_reason_is_reported(api: Api) -> None:
    await api.register("n1")
    await api.heartbeat("n1", status="offline")
    doc = await api.node("n1")
    assert doc["status"] == "offline"
    assert doc["status_reason"] == "reported"


async def test_heartbeat_from_an_unknown_node_is_404_must_register_first(api: Api) -> None:
    reply = await api.heartbeat("never-registered", uptime_seconds=1)
    assert_error(reply, 404)
    assert reply.json == {"error": "Node not found", "message": "Node must register first"}


@pytest.mark.parametrize("route", ["register", "heartbeat"])
async def test_a_write_answers_alike_however_its_path_is_spelled(
    api: Api, http: aiohttp.ClientSession, route: str
) -> None:
    """The exact path is served without aiohttp's router (fleetmq.http.direct); a query,
    percent-encoding or an Expect header go through it. Either way, the same answers."""
    await api.register("n1", heartbeat_interval_seconds=15)
    exact = f"{FLEET}/{route}"
    ways: list[tuple[str, dict[str, Any]]] = [
        (exact, {}), (f"{exact}?via=router", {}),
        (f"{FLEET}/%{ord(route[0]):x}{route[1:]}", {}), (exact, {"expect100": True})]
    bodies = [b'{"node_id": "n1", "node_type": "microclaw", "heartbeat_interval_seconds": 15}',
              b'{"node_id": "gone"}', b'{"node_id": "n1"', b"[]",
              b'{"node_id": "n1", "node_type": "sensor"}', b"{}", b"x" * (64 * 1024 + 1)]
    answers = []
    for path, options in ways:
        url = yarl.URL(api.base + path, encoded=True)
        answered = []
        for body in bodies:
            async with http.post(url, data=body, **options) as resp:
                doc = json.loads(await resp.read())
                if isinstance(doc, dict):
                    doc.pop("received", None)  # the moment of each answer
                    doc.pop("timestamp", None)
                answered.append((resp.status, resp.headers["Content-Type"], doc))
        answers.append(answered)
    first, *others = answers
    assert {status for status, _, _ in first} >= {200, 400, 413}
    for other in others:
        assert other == first
    if route == "heartbeat":
        assert first[0] == (200, "application/json", {"node_id": "n1", "next_check_seconds": 15})
        assert first[1][0] == 404


# --- GET /nodes --------------------------------------------------------------------------------

async def _register_all(api: Api, nodes: list[dict[str, Any]]) -> None:
    replies = await asyncio.gather(*(api.request("POST", f"{FLEET}/register", body=node)
                                     for node in nodes))
    assert all(r.status == 200 for r in replies), [r.raw for r in replies if r.status != 200]


def _ids(reply: Reply) -> list[str]:
    assert reply.status == 200, reply.raw
    return [node["id"] for node in reply.json["nodes"]]


async def test_list_is_sorted_by_id_with_counts(api: Api) -> None:
    ids = ["m-2", "A-1", "b-1", "a-2", "a-10", "Z.9", "0-first"]
    for node_id in ids:  # registration order is not id order
        await api.register(node_id)
    reply = await api.nodes()
    body = reply.json
    assert set(body) == {"nodes", "count", "total", "next", "event_id"}
    assert _ids(reply) == sorted(ids)
    assert body["count"] == body["total"] == len(ids)
    assert body["next"] is None
    assert all(set(node) == NODE_KEYS for node in body["nodes"])


async def test_list_of_an_empty_fleet(api: Api) -> None:
    body = (await api.nodes()).json
    event_id = body.pop("event_id")
    assert body == {"nodes": [], "count": 0, "total": 0, "next": None}
    assert event_id.endswith(".0")  # no event yet


@pytest.fixture
async def mixed_fleet(api: Api) -> Api:
    await _register_all(api, [
        {"node_id": "esp-1", "node_type": "microclaw", "location": "Office-Floor-2"},
        {"node_id": "esp-2", "node_type": "MicroClaw", "location": "office-floor-2"},
        {"node_id": "esp-3", "node_type": "microclaw", "location": "warehouse"},
        {"node_id": "pic-1", "node_type": "picclaw", "location": "office-floor-2"},
        {"node_id": "pic-2", "node_type": "picclaw"},
        {"node_id": "gw-1", "node_type": "nanoclaw", "location": "office-floor-2-annex"},
    ])
    await api.heartbeat("esp-2", status="degraded")
    await api.heartbeat("pic-1", status="offline")
    return api


@pytest.mark.parametrize(("params", "expected"), [
    pytest.param({"node_type": "microclaw"}, ["esp-1", "esp-2", "esp-3"], id="type"),
    pytest.param({"node_type": "MICROCLAW"}, ["esp-1", "esp-2", "esp-3"], id="type-case"),
    pytest.param({"node_type": "micro"}, [], id="type-is-not-a-prefix"),
    pytest.param({"status": "online"}, ["esp-1", "esp-3", "gw-1", "pic-2"], id="online"),
    pytest.param({"status": "Degraded"}, ["esp-2"], id="degraded-case"),
    pytest.param({"status": "offline"}, ["pic-1"], id="offline"),
    pytest.param({"location": "OFFICE-floor-2"}, ["esp-1", "esp-2", "pic-1"], id="location"),
    pytest.param({"location": "office"}, [], id="location-is-not-a-prefix"),
    pytest.param({"node_type": "microclaw", "location": "office-floor-2"}, ["esp-1", "esp-2"],
                 id="type-and-location"),
    pytest.param({"node_type": "microclaw", "location": "office-floor-2", "status": "online"},
                 ["esp-1"], id="all-three"),
    pytest.param({"node_type": "picclaw", "status": "degraded"}, [], id="and-not-or"),
])
async def test_list_filters_are_exact_case_insensitive_and_combined_with_and(
    mixed_fleet: Api, params: dict[str, str], expected: list[str]
) -> None:
    reply = await mixed_fleet.nodes(**params)
    assert _ids(reply) == expected
    assert reply.json["count"] == reply.json["total"] == len(expected)
    assert reply.json["next"] is None


async def test_list_ignores_unknown_parameters(mixed_fleet: Api) -> None:
    reply = await mixed_fleet.nodes(colour="blue", page="2", sort="desc")
    assert _ids(reply) == ["esp-1", "esp-2", "esp-3", "gw-1", "pic-1", "pic-2"]


@pytest.mark.parametrize(("params", "parameter"), [
    pytest.param({"status": "bogus"}, "status", id="status-bogus"),
    pytest.param({"status": ""}, "status", id="status-empty"),
    pytest.param({"limit": "0"}, "limit", id="limit-0"),
    pytest.param({"limit": "10001"}, "limit", id="limit-10001"),
    pytest.param({"limit": "-1"}, "limit", id="limit-negative"),
    pytest.param({"limit": "ten"}, "limit", id="limit-word"),
    pytest.param({"limit": "2.5"}, "limit", id="limit-fraction"),
    pytest.param({"limit": "\u00b2"}, "limit", id="limit-superscript-two"),
    pytest.param({"limit": "1" * 5000}, "limit", id="limit-5000-digits"),
])
async def test_list_rejects_a_bad_status_or_limit_with_a_400(
    api: Api, params: dict[str, str], parameter: str
) -> None:
    assert_error(await api.nodes(**params), 400, mentions=(parameter,))


async def test_list_limit_bounds_1_and_10000_are_accepted(api: Api) -> None:
    await api.register("n1")
    assert (await api.nodes(limit="1")).status == 200
    assert (await api.nodes(limit="10000")).status == 200
    padded = await api.nodes(limit="0" * 5000 + "1")  # leading zeros: still the number 1
    assert padded.status == 200, padded.raw
    assert padded.json["count"] == 1


async def test_list_pages_with_limit_and_after(api: Api) -> None:
    ids = [f"node-{i:02d}" for i in range(7)]
    await _register_all(api, [{"node_id": i, "node_type": "microclaw"} for i in ids])

    seen: list[str] = []
    after: str | None = None
    pages = []
    while True:
        params = {"limit": "3"} | ({"after": after} if after is not None else {})
        body = (await api.nodes(**params)).json
        pages.append(body)
        seen += [n["id"] for n in body["nodes"]]
        assert body["count"] == len(body["nodes"])
        assert body["total"] == 7
        after = body["next"]
        if after is None:
            break
        assert after == body["nodes"][-1]["id"]
    assert seen == ids
    assert [p["count"] for p in pages] == [3, 3, 1]

    # A page that ends exactly on the last node has no next page.
    body = (await api.nodes(limit="7")).json
    assert (body["count"], body["total"], body["next"]) == (7, 7, None)
    body = (await api.nodes(limit="3", after="node-03")).json
    assert [n["id"] for n in body["nodes"]] == ["node-04", "node-05", "node-06"]
    assert body["next"] is None
    # "after" need not be a known id: paging resumes at the next id in order.
    body = (await api.nodes(limit="2", after="node-02a")).json
    assert [n["id"] for n in body["nodes"]] == ["node-03", "node-04"]
    assert body["next"] == "node-04"
    # Past the end: an empty last page.
    body = (await api.nodes(limit="2", after="zzz")).json
    assert (body["nodes"], body["count"], body["next"]) == ([], 0, None)


async def test_list_pages_through_a_filter(mixed_fleet: Api) -> None:
    first = (await mixed_fleet.nodes(status="online", limit="2")).json
    assert [n["id"] for n in first["nodes"]] == ["esp-1", "esp-3"]
    assert (first["count"], first["total"], first["next"]) == (2, 4, "esp-3")
    second = (await mixed_fleet.nodes(status="online", limit="2", after="esp-3")).json
    assert [n["id"] for n in second["nodes"]] == ["gw-1", "pic-2"]
    assert (second["count"], second["total"], second["next"]) == (2, 4, None)


async def _pages(api: Api, limit: str, **params: str) -> tuple[list[str], set[int]]:
    """Every id of a filtered list read page by page, and the totals the pages gave."""
    seen: list[str] = []
    totals: set[int] = set()
    after: str | None = None
    while True:
        body = (await api.nodes(limit=limit, **params,
                                **({"after": after} if after is not None else {}))).json
        seen += [n["id"] for n in body["nodes"]]
        totals.add(body["total"])
        assert body["count"] == len(body["nodes"])
        after = body["next"]
        if after is None:
            return seen, totals
        assert after == body["nodes"][-1]["id"]


@pytest.mark.parametrize("params", [
    {"status": "online"}, {"status": "DEGRADED"}, {"status": "offline"},
    {"status": "online", "node_type": "MicroClaw"}, {"status": "offline", "node_type": "picclaw"},
    {"status": "online", "location": "OFFICE-floor-2"},
    {"status": "online", "node_type": "microclaw", "location": "office-floor-2"},
])
async def test_status_pages_and_totals_follow_every_change(
    mixed_fleet: Api, params: dict[str, str]
) -> None:
    async def check() -> None:
        expected = _ids(await mixed_fleet.nodes(**params))  # without limit: every node read
        for limit in ("1", "2", "10000"):
            seen, totals = await _pages(mixed_fleet, limit, **params)
            assert seen == expected, (limit, params)
            assert totals == {len(expected)}, (limit, params)

    await check()
    await mixed_fleet.heartbeat("esp-2")  # degraded -> online
    await mixed_fleet.heartbeat("esp-3", status="offline")
    await check()
    await mixed_fleet.heartbeat("pic-1")  # offline -> online
    assert (await mixed_fleet.request("DELETE", "/api/v1/fleet/nodes/esp-1")).status == 204
    await check()
    await _register_all(mixed_fleet, [
        {"node_id": "esp-1", "node_type": "picclaw", "location": "office-floor-2"},
        {"node_id": "esp-0", "node_type": "microclaw", "location": "office-floor-2"},
    ])
    await mixed_fleet.heartbeat("esp-0", status="degraded")
    await check()


@pytest.mark.parametrize(("params", "expected"), [
    pytest.param({"q": "esp"}, ["esp-1", "esp-2", "esp-3"], id="prefix"),
    pytest.param({"q": "esp-2"}, ["esp-2"], id="a-whole-id"),
    pytest.param({"q": "ESP"}, [], id="case-sensitive-as-ids-sort"),
    pytest.param({"q": "e"}, ["esp-1", "esp-2", "esp-3"], id="one-character"),
    pytest.param({"q": "esp-20"}, [], id="longer-than-any"),
    pytest.param({"q": "pic", "status": "offline"}, ["pic-1"], id="with-status"),
    pytest.param({"q": "esp", "status": "online"}, ["esp-1", "esp-3"], id="with-status-2"),
    pytest.param({"q": "esp", "location": "office-floor-2"}, ["esp-1", "esp-2"],
                 id="with-location"),
    pytest.param({"q": "g", "node_type": "nanoclaw", "status": "online"}, ["gw-1"],
                 id="with-all"),
    pytest.param({"q": "f"}, [], id="between-ids"),
    pytest.param({"q": "z"}, [], id="after-every-id"),
    pytest.param({"q": "0"}, [], id="before-every-id"),
])
async def test_q_lists_the_ids_that_start_with_it_page_by_page(
    mixed_fleet: Api, params: dict[str, str], expected: list[str]
) -> None:
    reply = await mixed_fleet.nodes(**params)
    assert _ids(reply) == expected
    assert (reply.json["count"], reply.json["total"]) == (len(expected), len(expected))
    for limit in ("1", "2"):
        seen, totals = await _pages(mixed_fleet, limit, **params)
        assert seen == expected, limit
        assert totals == {len(expected)}, limit


@pytest.mark.parametrize("q", ["-esp", "esp/1", "a b", "é", "n" * 129, "esp+", "#"])
async def test_q_that_no_id_can_start_with_is_a_400(api: Api, q: str) -> None:
    assert_error(await api.nodes(q=q), 400, mentions=("'q'",))


async def test_a_list_larger_than_the_stream_threshold_is_streamed_whole(api: Api) -> None:
    n = STREAM_ABOVE + 500
    ids = [f"bulk-{i:05d}" for i in range(n)]
    await _register_all(api, [
        {"node_id": node_id, "node_type": "microclaw" if i % 2 else "picclaw"}
        for i, node_id in enumerate(ids)
    ])
    reply = await api.nodes()
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.headers.get("Transfer-Encoding") == "chunked"  # streamed, not built whole
    body = json.loads(reply.raw)  # the streamed document is one valid JSON value
    assert (body["count"], body["total"], body["next"]) == (n, n, None)
    assert [node["id"] for node in body["nodes"]] == ids
    assert all(set(node) == NODE_KEYS for node in body["nodes"])

    half = await api.nodes(node_type="PICCLAW")
    body = json.loads(half.raw)
    assert (body["count"], body["total"], body["next"]) == (n // 2, n // 2, None)
    assert [node["id"] for node in body["nodes"]] == ids[0::2]

    paged = (await api.nodes(limit="10000")).json
    assert (paged["count"], paged["total"], paged["next"]) == (10000, n, ids[9999])

    # A prefix narrows the stream to its range of ids; after= starts within it.
    await api.register("aaa-1")
    await api.register("zzz-1")
    prefixed = await api.nodes(q="bulk-")
    assert prefixed.headers.get("Transfer-Encoding") == "chunked"
    body = json.loads(prefixed.raw)
    assert [node["id"] for node in body["nodes"]] == ids
    assert (body["count"], body["total"]) == (n, n)
    resumed = await api.nodes(q="bulk-", after=ids[10])
    assert resumed.headers.get("Transfer-Encoding") == "chunked"
    body = json.loads(resumed.raw)
    assert [node["id"] for node in body["nodes"]] == ids[11:]
    assert (body["count"], body["total"]) == (n - 11, n)
    assert _ids(await api.nodes(q="bulk-1", limit="3")) == ids[10000:10003]


async def test_the_whole_fleet_list_follows_every_change(api: Api) -> None:
    await api.register("cache-a")
    await api.register("cache-b")
    first = (await api.nodes()).json
    again = (await api.nodes()).json  # served again, unchanged
    assert again == first
    assert [n["uptime_seconds"] for n in first["nodes"]] == [None, None]

    await api.heartbeat("cache-b", uptime_seconds=7)
    after_heartbeat = (await api.nodes()).json
    assert [n["uptime_seconds"] for n in after_heartbeat["nodes"]] == [None, 7]

    assert (await api.request("DELETE", "/api/v1/fleet/nodes/cache-a")).status == 204
    after_delete = (await api.nodes()).json
    assert [n["id"] for n in after_delete["nodes"]] == ["cache-b"]
    assert after_delete["count"] == after_delete["total"] == 1


async def test_a_page_and_a_filtered_page_follow_every_change(api: Api) -> None:
    """Pages are kept while the fleet does not change: each change shows in the next read."""
    for node_id in ("page-a", "page-b", "page-c"):
        await api.register(node_id, location="lab")
    first = (await api.nodes(limit="2")).json
    assert (await api.nodes(limit="2")).json == first  # served again, unchanged
    assert [n["id"] for n in first["nodes"]] == ["page-a", "page-b"]
    assert (first["count"], first["total"], first["next"]) == (2, 3, "page-b")
    lab = (await api.nodes(limit="2", location="LAB")).json
    assert (lab["count"], lab["total"], lab["next"]) == (2, 3, "page-b")

    await api.heartbeat("page-b", uptime_seconds=9)
    changed = (await api.nodes(limit="2")).json
    assert [n["uptime_seconds"] for n in changed["nodes"]] == [None, 9]

    await api.register("page-0", location="attic")  # sorts first: the page moves
    moved = (await api.nodes(limit="2")).json
    assert [n["id"] for n in moved["nodes"]] == ["page-0", "page-a"]
    assert (moved["total"], moved["next"]) == (4, "page-a")
    lab = (await api.nodes(limit="2", location="lab")).json
    assert [n["id"] for n in lab["nodes"]] == ["page-a", "page-b"]
    assert lab["total"] == 3

    assert (await api.request("DELETE", "/api/v1/fleet/nodes/page-a")).status == 204
    after = (await api.nodes(limit="2", after="page-0")).json
    assert [n["id"] for n in after["nodes"]] == ["page-b", "page-c"]
    assert (after["count"], after["total"], after["next"]) == (2, 3, None)
    lab = (await api.nodes(limit="2", location="lab")).json
    assert [n["id"] for n in lab["nodes"]] == ["page-b", "page-c"]
    assert (lab["total"], lab["next"]) == (2, None)


# --- GET and DELETE /nodes/{node_id} -----------------------------------------------------------

async def test_node_document_has_exactly_the_contract_fields(api: Api) -> None:
    reply = await api.register("microclaw-esp32-f4cfa210", **FULL_REGISTER)
    doc = await api.node("microclaw-esp32-f4cfa210")
    assert set(doc) == NODE_KEYS
    assert doc["id"] == "microclaw-esp32-f4cfa210"
    assert all(doc[key] is None for key in TELEMETRY)  # null until a heartbeat reports them
    for key in ("status_since", "last_seen", "registered_at"):
        assert_timestamp(doc[key])
    assert doc["registered_at"] == reply.json["timestamp"]

    await api.heartbeat("microclaw-esp32-f4cfa210", uptime_seconds=86400, free_memory_kb=200,
                        sensors_active=2)
    doc = await api.node("microclaw-esp32-f4cfa210")
    assert set(doc) == NODE_KEYS
    assert (doc["uptime_seconds"], doc["free_memory_kb"], doc["sensors_active"]) == (86400, 200, 2)


async def test_node_ids_are_case_sensitive(api: Api) -> None:
    await api.register("Node-1", node_type="microclaw")
    await api.register("node-1", node_type="picclaw")
    assert (await api.node("Node-1"))["type"] == "microclaw"
    assert (await api.node("node-1"))["type"] == "picclaw"


async def test_get_an_unknown_node_is_404(api: Api) -> None:
    reply = await api.request("GET", f"{FLEET}/nodes/x")
    assert_error(reply, 404)
    assert reply.json == {"error": "Node not found", "message": "No node with ID x"}


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("path_id", [
    pytest.param("bad%24id", id="dollar"),
    pytest.param("x" * 129, id="129-chars"),
    pytest.param("-leading-dash", id="leading-dash"),
    pytest.param("a%20b", id="space"),
    pytest.param("a%2Bb", id="plus"),
    pytest.param("a%23b", id="hash"),
    pytest.param("a%2Fb", id="encoded-slash"),
])
async def test_a_path_id_that_is_not_a_valid_node_id_is_400(
    api: Api, method: str, path_id: str
) -> None:
    async with api.session.request(
        method, f"{api.base}{FLEET}/nodes/{path_id}",
    ) as resp:
        reply = Reply(resp.status, resp.headers, await resp.read())
    assert_error(reply, 400, mentions=("node id",))


async def test_an_id_of_128_characters_is_valid(api: Api) -> None:
    node_id = "x" * 128
    assert (await api.register(node_id)).status == 200
    assert (await api.node(node_id))["id"] == node_id


async def test_delete_removes_the_node_then_404s(api: Api) -> None:
    await api.register("n1")
    await api.register("n2")
    deleted = await api.request("DELETE", f"{FLEET}/nodes/n1")
    assert deleted.status == 204
    assert deleted.raw == b""
    assert_error(await api.request("GET", f"{FLEET}/nodes/n1"), 404)
    again = await api.request("DELETE", f"{FLEET}/nodes/n1")
    assert_error(again, 404)
    assert again.json == {"error": "Node not found", "message": "No node with ID n1"}
    assert _ids(await api.nodes()) == ["n2"]
    assert_error(await api.heartbeat("n1"), 404)


# --- routing, service routes -------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/nope", "/dashboard/nope.js", "/dashboard/", "/api/v1/fleet", "/api/v1/fleet/",
    "/api/v1/fleet/nodes/a/b", "/api/v1/fleet/nodes/",
    "/api/v2/fleet/nodes", "/api/v1/fleet/registerx",
])
async def test_an_unknown_route_is_a_404_json_error(api: Api, path: str) -> None:
    assert_error(await api.request("GET", path), 404)


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", f"{FLEET}/register", {"POST"}),
    ("PUT", f"{FLEET}/register", {"POST"}),
    ("GET", f"{FLEET}/heartbeat", {"POST"}),
    ("POST", f"{FLEET}/nodes", {"GET"}),
    ("DELETE", f"{FLEET}/nodes", {"GET"}),
    ("PUT", f"{FLEET}/nodes/x", {"GET", "DELETE"}),
    ("POST", f"{FLEET}/nodes/x", {"GET", "DELETE"}),
    ("PATCH", f"{FLEET}/nodes/x", {"GET", "DELETE"}),
    ("POST", "/healthz", {"GET"}),
    ("DELETE", "/readyz", {"GET"}),
    ("POST", "/api/v1/openapi.json", {"GET"}),
])
async def test_a_wrong_method_is_a_405_json_error_with_an_allow_header(
    api: Api, method: str, path: str, allowed: set[str]
) -> None:
    reply = await api.request(method, path, data=b"{}")
    assert_error(reply, 405, mentions=(method,))
    allow = {m.strip() for m in reply.headers["Allow"].split(",")}
    assert allow - {"HEAD"} == allowed


async def test_healthz_is_200(api: Api) -> None:
    reply = await api.request("GET", "/healthz")
    assert reply.status == 200
    assert reply.json["status"] == "ok"


async def test_readyz_is_200_while_the_broker_is_connected(api: Api) -> None:
    reply = await api.request("GET", "/readyz")
    assert reply.status == 200, reply.raw
    assert reply.json["status"] == "ready"


async def test_readyz_is_503_with_the_reason_while_the_broker_is_unreachable(
    root: str, http: aiohttp.ClientSession
) -> None:
    nobody = f"mqtt://127.0.0.1:{free_port()}"  # a free port: nothing listens there
    async with FleetService(make_settings(nobody, root)) as svc:
        api = Api(http, f"http://127.0.0.1:{svc.http_port}")
        ready = await api.request("GET", "/readyz")
        assert ready.status == 503
        assert ready.json["status"] == "not_ready"  # a status object in every state (§11)
        assert "broker" in ready.json["message"]
        assert (await api.request("GET", "/healthz")).status == 200
        # REST keeps serving the registry meanwhile.
        assert (await api.register("n1")).status == 200
        assert (await api.node("n1"))["status"] == "online"


def _refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        found = [value["$ref"]] if isinstance(value.get("$ref"), str) else []
        return found + [ref for item in value.values() for ref in _refs(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in _refs(item)]
    return []


async def test_openapi_document_describes_every_route_the_server_accepts(api: Api) -> None:
    reply = await api.request("GET", "/api/v1/openapi.json")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    doc = reply.json
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"]
    assert doc["info"]["version"]
    paths = doc["paths"]
    expected = {
        f"{FLEET}/register": {"post"},
        f"{FLEET}/heartbeat": {"post"},
        f"{FLEET}/nodes": {"get"},
        f"{FLEET}/nodes/{{node_id}}": {"get", "delete"},
        f"{FLEET}/nodes/{{node_id}}/events": {"get"},
        "/healthz": {"get"},
        "/readyz": {"get"},
        "/api/v1/openapi.json": {"get"},
    }
    for path, methods in expected.items():
        assert path in paths, f"{path} is missing from the OpenAPI document"
        assert set(paths[path]) & HTTP_METHODS == methods, path

    # Each documented path accepts exactly the documented methods (HEAD comes with GET).
    for path, item in paths.items():
        documented = {m.upper() for m in item if m in HTTP_METHODS}
        probe = await api.request("TRACE", path.replace("{node_id}", "some-node")
                                  .replace("{key_id}", "0123456789ab"))
        assert_error(probe, 405)
        allow = {m.strip() for m in probe.headers["Allow"].split(",")} - {"HEAD"}
        assert allow == documented, path
        for operation in item.values():
            assert {"200", "201", "204"} & set(operation["responses"])

    # Every reference resolves inside the document.
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/")
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    register = schemas["RegisterRequest"]
    assert {"node_id", "node_type", "heartbeat_interval_seconds"} <= set(register["properties"])
    assert "node_id" in register["required"]
    # node_type is required under either spelling the agents use.
    (either,) = [rule["anyOf"] for rule in register["allOf"]
                 if {"required": ["node_type"]} in rule["anyOf"]]
    assert [rule["required"] for rule in either] == [["node_type"], ["type"]]


async def test_openapi_register_schema_accepts_the_contract_example(api: Api) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    doc = (await api.request("GET", "/api/v1/openapi.json")).json
    example = {"node_id": "microclaw-esp32-f4cfa210", "node_type": "microclaw",
               "capabilities": ["dht22", "mqtt"], "location": "office-floor-2",
               "metadata": {"gateway": "nanoclaw-pi-01", "firmware": "v1.0.0"},
               "heartbeat_interval_seconds": 60}
    jsonschema.validate(example, doc["components"]["schemas"]["RegisterRequest"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"node_id": "n1", "heartbeat_interval_seconds": 0},
                            doc["components"]["schemas"]["RegisterRequest"])


# --- the MQTT side of REST writes --------------------------------------------------------------

async def test_rest_writes_publish_the_retained_status_over_mqtt(
    broker_url: str, root: str, http: aiohttp.ClientSession, mqtt_clients: Any
) -> None:
    async with running(make_settings(broker_url, root)) as svc:
        api = Api(http, f"http://127.0.0.1:{svc.http_port}")
        registered = await api.register("rest-node", heartbeat_interval_seconds=30)
        assert registered.status == 200
        topic = f"{root}/rest-node/status"

        # A dashboard that subscribes afterwards gets the state from the retained message.
        dashboard = await mqtt_clients(broker_port(broker_url)).connect()
        await dashboard.subscribe(f"{root}/+/status")
        first = (await eventually(lambda: dashboard.received(topic)))[0]
        assert first.retain
        status = json.loads(first.payload)
        assert status == {"node_id": "rest-node", "status": "online", "reason": "registered",
                          "since": registered.json["timestamp"],
                          "last_seen": registered.json["timestamp"]}

        # Then each change as it happens (found by content: the manager may also republish
        # the unchanged state once after it connects).
        def statuses() -> list[Any]:
            return [json.loads(m.payload) if m.payload else None
                    for m in dashboard.received(topic)]

        degraded = await api.heartbeat("rest-node", status="degraded")
        await eventually(lambda: any(s and s["status"] == "degraded" for s in statuses()))
        assert {"node_id": "rest-node", "status": "degraded", "reason": "heartbeat",
                "since": degraded.json["received"],
                "last_seen": degraded.json["received"]} in statuses()

        # Deleting clears the retained status with an empty message.
        assert (await api.request("DELETE", f"{FLEET}/nodes/rest-node")).status == 204
        await eventually(lambda: statuses()[-1] is None)

        # A later subscriber no longer gets the deleted node's status; a node registered after
        # it subscribed shows that the retained messages have been delivered by then.
        late = await mqtt_clients(broker_port(broker_url)).connect()
        await late.subscribe(f"{root}/+/status")
        await api.register("marker-node")
        await eventually(lambda: late.received(f"{root}/marker-node/status"))
        assert late.received(topic) == []

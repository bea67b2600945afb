"""Helpers for the MQTT integration tests: REST and /metrics reads, JSON replies, MQTT 5 clients.

Only what the manager shows from the outside (REST, /metrics, MQTT) is read here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleetmq.app import FleetService
from tests.conftest import MqttClient, Received
from tests.support import metric_samples


def api(svc: FleetService, path: str) -> str:
    return f"http://127.0.0.1:{svc.http_port}{path}"


async def get_node(http: aiohttp.ClientSession, svc: FleetService, node_id: str
                   ) -> dict[str, Any] | None:
    """The node's REST document, or None while it is unknown (404)."""
    async with http.get(api(svc, f"/api/v1/fleet/nodes/{node_id}")) as resp:
        if resp.status == 404:
            return None
        assert resp.status == 200, await resp.text()
        doc: dict[str, Any] = await resp.json()
        return doc


async def readyz(http: aiohttp.ClientSession, svc: FleetService) -> tuple[int, dict[str, Any]]:
    async with http.get(api(svc, "/readyz")) as resp:
        return resp.status, await resp.json()


async def metrics(http: aiohttp.ClientSession, svc: FleetService) -> dict[str, float]:
    """GET /metrics parsed: ``{'name{labels}': value}``."""
    async with http.get(api(svc, "/metrics")) as resp:
        assert resp.status == 200
        text = await resp.text()
    return metric_samples(text)


def dropped(values: dict[str, float], reason: str) -> float:
    return values[f'fleetmq_mqtt_messages_dropped_total{{reason="{reason}"}}']


def bodies(client: MqttClient, topic: str) -> list[dict[str, Any]]:
    """JSON payloads received on ``topic`` (empty payloads, which clear a status, left out)."""
    return [json.loads(m.payload) for m in client.received(topic) if m.payload]


def offline_statuses(client: MqttClient, topic: str) -> list[dict[str, Any]]:
    return [body for body in bodies(client, topic) if body["status"] == "offline"]


def codes(client: MqttClient, topic: str) -> list[int | None]:
    """The ``code`` of every reply on ``topic`` (None for a success reply)."""
    return [body.get("code") for body in bodies(client, topic)]


def request_properties(response_topic: str, correlation: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation
    return props


@dataclass
class Answer:
    topic: str
    body: dict[str, Any]
    correlation: bytes | None


@dataclass
class V5Client(MqttClient):
    """An MQTT 5 test client that also keeps each message's Correlation Data."""

    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5
    answers: list[Answer] = field(default_factory=list)

    async def connect(self, will: tuple[str, bytes] | None = None) -> V5Client:
        await super().connect(will)
        return self

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        correlation = getattr(props, "CorrelationData", None)
        with self._lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))
            if msg.payload:
                self.answers.append(Answer(msg.topic, json.loads(msg.payload), correlation))

    def answers_on(self, topic: str) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.topic == topic]

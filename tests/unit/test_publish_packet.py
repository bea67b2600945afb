"""``publish_packet``: the manager's own QoS 1 PUBLISH is the packet gmqtt builds from a
``Message``, byte for byte, at MQTT 5 and 3.1.1, with and without Correlation Data."""

from __future__ import annotations

from dataclasses import dataclass

from gmqtt import Message  # type: ignore[import-untyped]
from gmqtt.mqtt.constants import MQTTv50, MQTTv311  # type: ignore[import-untyped]
from gmqtt.mqtt.package import PublishPacket  # type: ignore[import-untyped]
from hypothesis import example, given
from hypothesis import strategies as st

from fleetmq.mqtt.gmqtt_client import publish_packet


@dataclass
class FixedIds:
    mid: int

    def next_id(self) -> int:
        return self.mid


@dataclass
class Protocol:
    """What ``PublishPacket.build_package`` reads of gmqtt's protocol."""

    proto_ver: int
    id_generator: FixedIds


def gmqtt_packet(topic: str, payload: bytes, mid: int, *, retain: bool, mqtt5: bool,
                 correlation: bytes | None) -> bytes:
    props = {"correlation_data": correlation} if correlation is not None and mqtt5 else {}
    message = Message(topic, payload, qos=1, retain=retain, **props)
    protocol = Protocol(MQTTv50 if mqtt5 else MQTTv311, FixedIds(mid))
    built_mid, packet = PublishPacket.build_package(message, protocol)
    assert built_mid == mid
    return bytes(packet)


@given(topic=st.text(max_size=300), payload=st.binary(max_size=20_000),
       mid=st.integers(1, 65_535), retain=st.booleans(), mqtt5=st.booleans(),
       correlation=st.none() | st.binary(max_size=300))
@example(topic="fleet/node-0000001/status", payload=b'{"status":"online"}', mid=1,
         retain=True, mqtt5=True, correlation=None)
@example(topic="fleet/n/status", payload=b"", mid=65_535, retain=True, mqtt5=True,
         correlation=None)
@example(topic="replies/\ud800", payload=b"x" * 200_000, mid=7, retain=False, mqtt5=True,
         correlation=b"c" * 200)
def test_the_packet_is_the_one_gmqtt_builds(topic: str, payload: bytes, mid: int,
                                           retain: bool, mqtt5: bool,
                                           correlation: bytes | None) -> None:
    mine = publish_packet(topic, payload, mid, retain=retain, mqtt5=mqtt5,
                          correlation=correlation if mqtt5 else None)
    assert mine == gmqtt_packet(topic, payload, mid, retain=retain, mqtt5=mqtt5,
                                correlation=correlation)

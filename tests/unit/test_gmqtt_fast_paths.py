"""The manager's own handling of incoming PUBLISH and PUBACK packets does what gmqtt's does:
the same ``on_message`` calls, the same bytes written back, the same outbox, the same errors,
for any packet, MQTT 5 and 3.1.1."""

from __future__ import annotations

from typing import Any

from gmqtt.mqtt.constants import MQTTv50, MQTTv311  # type: ignore[import-untyped]
from gmqtt.mqtt.package import CommandWithMidPacket  # type: ignore[import-untyped]
from hypothesis import example, given
from hypothesis import strategies as st

from fleetmq.mqtt.gmqtt_client import GmqttClient, Outbox, publish_packet


class Protocol:
    def __init__(self, proto_ver: int) -> None:
        self.proto_ver = proto_ver
        self.written: list[bytes] = []

    def write_data(self, data: bytes) -> None:
        self.written.append(bytes(data))


class Connection:
    def __init__(self, proto_ver: int) -> None:
        self._protocol = Protocol(proto_ver)

    def send_command_with_mid(self, cmd: int, mid: int, dup: bool, reason_code: int = 0) -> None:
        self._protocol.written.append(("gmqtt", cmd, mid, dup, reason_code))  # type: ignore[arg-type]


def run(cmd: int, raw: bytes, *, mqtt5: bool, fast: bool) -> tuple[Any, ...]:
    """What handling one packet does: the messages delivered, what was written back (as
    bytes), the outbox left, and the error raised."""
    client = GmqttClient("probe", persistent_storage=Outbox(lambda: None))
    version = MQTTv50 if mqtt5 else MQTTv311
    client._connection_state.protocol_version = version
    client._connection = connection = Connection(version)
    delivered: list[tuple[Any, ...]] = []
    client.on_message = lambda _c, *args: delivered.append(args)
    for mid in (1, 2, 0x1234):  # two of our publishes in flight, plus a stray id
        client._package_handler.id_generator._used_ids.add(mid)
        client._persistent_storage.push_message(mid, b"p%d" % mid)
    handler = client._package_handler
    handle = (handler._handler_cache[cmd & 0xF0] if fast else
              {0x30: handler._handle_publish_packet,
               0x40: handler._handle_puback_packet}[cmd & 0xF0])
    try:
        handle(cmd, raw)
        error = None
    except Exception as exc:
        error = type(exc)
    written = []
    for item in connection._protocol.written:
        if isinstance(item, tuple):  # gmqtt's own PUBACK, built as gmqtt builds it
            _, c, mid, dup, code = item
            written.append(CommandWithMidPacket.build_package(c, mid, dup, code,
                                                              proto_ver=version))
        else:
            written.append(item)
    return (delivered, written, client._persistent_storage.get_all(),
            sorted(handler.id_generator._used_ids), error)


def assert_same(cmd: int, raw: bytes, mqtt5: bool) -> None:
    assert run(cmd, raw, mqtt5=mqtt5, fast=True) == run(cmd, raw, mqtt5=mqtt5, fast=False)


def body(packet: bytes) -> tuple[int, bytes]:
    """A whole packet's first byte and what follows its remaining length."""
    at = 1
    while packet[at] & 0x80:
        at += 1
    return packet[0], packet[at + 1:]


topics = st.one_of(st.sampled_from(["fleet/node-1/register", "", "a/\u00e9", "t"]),
                   st.text(max_size=40))


@given(topic=topics, payload=st.binary(max_size=300), mid=st.integers(1, 65_535),
       retain=st.booleans(), mqtt5=st.booleans(), correlation=st.none() | st.binary(max_size=9))
@example(topic="fleet/n/register", payload=b"{}", mid=1, retain=False, mqtt5=True,
         correlation=None)
def test_a_qos_1_publish_is_handled_as_gmqtt_handles_it(
        topic: str, payload: bytes, mid: int, retain: bool, mqtt5: bool,
        correlation: bytes | None) -> None:
    cmd, raw = body(publish_packet(topic, payload, mid, retain=retain, mqtt5=mqtt5,
                                   correlation=correlation))
    assert_same(cmd, raw, mqtt5)
    assert_same(cmd | 0x08, raw, mqtt5)  # dup


@given(topic=topics, payload=st.binary(max_size=300), flags=st.integers(0, 15),
       mqtt5=st.booleans(), props=st.sampled_from([b"\x00", b"", b"\x02\x01\x01",
                                                   b"\x03\x23\x00\x05", b"\x01\xff"]))
def test_a_publish_of_any_qos_and_properties_is_handled_as_gmqtt_handles_it(
        topic: str, payload: bytes, flags: int, mqtt5: bool, props: bytes) -> None:
    name = topic.encode("utf-8", "surrogatepass")
    qos = (flags >> 1) & 3
    mid = b"\x00\x07" if qos else b""
    raw = len(name).to_bytes(2, "big") + name + mid + (props if mqtt5 else b"") + payload
    assert_same(0x30 | flags, raw, mqtt5)


@given(raw=st.binary(max_size=40), flags=st.integers(0, 15), mqtt5=st.booleans())
@example(raw=b"\x00\x05ab", flags=2, mqtt5=True)
@example(raw=b"\x00\x01a\x00", flags=2, mqtt5=True)
@example(raw=b"\x00\x01\xff\x00", flags=0, mqtt5=True)
@example(raw=b"\x00\x00\x00\x01\x00", flags=2, mqtt5=True)
def test_any_bytes_as_a_publish_are_handled_as_gmqtt_handles_them(
        raw: bytes, flags: int, mqtt5: bool) -> None:
    assert_same(0x30 | flags, raw, mqtt5)


@given(raw=st.one_of(st.binary(max_size=6), st.sampled_from(
    [b"\x00\x01", b"\x00\x02\x00", b"\x12\x34\x00\x00", b"\x00\x09", b"\x00"])),
    mqtt5=st.booleans())
def test_a_puback_is_handled_as_gmqtt_handles_it(raw: bytes, mqtt5: bool) -> None:
    assert_same(0x40, raw, mqtt5)

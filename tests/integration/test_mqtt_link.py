"""MqttLink on the event loop, against a scripted MQTT 3.1.1/5 broker on the same loop.

The scripted broker shows what the real ones cannot be made to do on cue: hold a message
burst while the link's deque is full, drop the connection, see the DISCONNECT arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from fleetmq.config import BrokerSettings
from fleetmq.core.clock import FakeClock, Instant
from fleetmq.core.registry import Registry
from fleetmq.core.topics import Topics
from fleetmq.errors import BrokerError
from fleetmq.mqtt import inbox
from fleetmq.mqtt import link as mqtt
from fleetmq.mqtt.ingest import waiting_in
from fleetmq.mqtt.link import Inbound, MqttLink, Will
from tests.conftest import eventually
from tests.unit.conftest import reg

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 0x10, 0x20, 0x30, 0x40, 0x80, 0x90
UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 0xA0, 0xB0, 0xC0, 0xD0, 0xE0


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _length(len(body)) + body


def publish(topic: str, payload: bytes, *, mqtt5: bool) -> bytes:
    name = topic.encode()
    return packet(PUBLISH, struct.pack("!H", len(name)) + name + (b"\0" if mqtt5 else b"")
                  + payload)


@dataclass
class Session:
    level: int
    """4: MQTT 3.1.1, 5: MQTT 5."""
    writer: asyncio.StreamWriter
    received: list[int] = field(default_factory=list)
    """Packet types received, in order."""
    topics: list[str] = field(default_factory=list)
    """Topics of the PUBLISH packets received, in order."""


@dataclass
class ScriptedBroker:
    """Answers CONNECT (unless told not to), SUBSCRIBE, UNSUBSCRIBE, PINGREQ and QoS 1 PUBLISH."""

    answer_mqtt5: bool = True
    close_mqtt5: bool = False
    """Close an MQTT 5 CONNECT's connection without answering (as amqtt does with a will)."""
    sessions: list[Session] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    on_subscribed: Callable[[Session], None] | None = None
    acks_from_session: int = 0
    """QoS 1 publishes of earlier sessions (by index) are left unacknowledged."""
    resume: bool = False
    """Every connection after the first is told its session is present (it was kept)."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session: Session | None = None
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                first = (await reader.readexactly(1))[0]
                length, mult = 0, 1
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length += (byte & 0x7F) * mult
                    mult *= 128
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                kind = first & 0xF0
                if session is not None:
                    session.received.append(kind)
                if kind == CONNECT:
                    session = Session(level=body[6], writer=writer, received=[CONNECT])
                    self.sessions.append(session)
                    if session.level == 5 and self.close_mqtt5:
                        break
                    if session.level == 5 and not self.answer_mqtt5:
                        continue  # like amqtt: a CONNECT it cannot read goes unanswered
                    present = b"\1" if self.resume and len(self.sessions) > 1 else b"\0"
                    writer.write(packet(CONNACK, present + (b"\0\0" if session.level == 5
                                                            else b"\0")))
                    self.connected.set()
                elif kind in (SUBSCRIBE, UNSUBSCRIBE):
                    assert session is not None
                    props = b"\0" if session.level == 5 else b""
                    granted = b"\1" if kind == SUBSCRIBE or session.level == 5 else b""
                    writer.write(packet(SUBACK if kind == SUBSCRIBE else UNSUBACK,
                                        body[:2] + props + granted))
                    if kind == SUBSCRIBE and self.on_subscribed is not None:
                        self.on_subscribed(session)
                elif kind == PINGREQ:
                    writer.write(packet(PINGRESP, b""))
                elif kind == PUBLISH:
                    assert session is not None
                    self._published(session, first, body)
                elif kind == DISCONNECT:
                    break
                await writer.drain()
        writer.close()


    def _published(self, session: Session, first: int, body: bytes) -> None:
        """Notes the topic; a QoS 1 publish is acknowledged unless its session is one that
        must not be."""
        topic_len = struct.unpack("!H", body[:2])[0]
        session.topics.append(body[2:2 + topic_len].decode())
        if first & 0x06 and len(self.sessions) > self.acks_from_session:
            mid = body[2 + topic_len: 4 + topic_len]
            session.writer.write(packet(PUBACK, mid + (b"\0" if session.level == 5 else b"")))


@contextlib.asynccontextmanager
async def scripted_broker(**kwargs: object) -> AsyncIterator[ScriptedBroker]:
    broker = ScriptedBroker(**kwargs)  # type: ignore[arg-type]
    server = await asyncio.start_server(broker.serve, "127.0.0.1", 0)
    broker.port = server.sockets[0].getsockname()[1]
    async with server:
        yield broker
        for session in broker.sessions:
            session.writer.close()


def link_to(broker: ScriptedBroker, *, mqtt5: bool = False, will: Will | None = None,
            subscriptions: tuple[str, ...] = ("t/#",)) -> MqttLink:
    return MqttLink(BrokerSettings("mqtt", "127.0.0.1", broker.port), "link-test",
                    subscriptions=list(subscriptions), will=will, keepalive_s=5,
                    prefer_mqtt5=mqtt5, monotonic=asyncio.get_running_loop().time)


async def test_the_gmqtt_names_the_link_reaches_still_exist() -> None:
    # fleetmq.mqtt.gmqtt_client reaches the transport through them (backpressure, abort,
    # coalesced writes).
    import gmqtt.mqtt.connection
    import gmqtt.mqtt.handler
    import gmqtt.mqtt.protocol
    import gmqtt.mqtt.utils

    client = gmqtt.Client("probe")
    assert hasattr(client, "_connection")
    assert hasattr(client, "_create_connection")
    assert "_transport" in gmqtt.mqtt.connection.MQTTConnection.__init__.__code__.co_names
    assert "_protocol" in gmqtt.mqtt.connection.MQTTConnection.__init__.__code__.co_names
    assert "_transport" in gmqtt.mqtt.protocol.BaseMQTTProtocol.write_data.__code__.co_names
    # ... builds its own PUBLISH packets (ids from gmqtt's allocator) and handles PUBLISH and
    # PUBACK itself, through the handler's cache of its methods.
    assert hasattr(gmqtt.mqtt.utils.IdGenerator, "_mid_generate")
    assert hasattr(gmqtt.mqtt.protocol.MQTTProtocol, "proto_ver")
    handler = client._package_handler
    get_handler = gmqtt.mqtt.handler.MqttPackageHandler.__get_handler__
    assert "_handler_cache" in get_handler.__code__.co_names
    assert hasattr(handler, "_handle_publish_packet")
    assert hasattr(handler, "_handle_puback_packet")
    assert hasattr(handler, "_optimistic_acknowledgement")
    assert hasattr(handler._connection_state, "protocol_version")
    assert hasattr(handler.id_generator, "_used_ids")


@pytest.mark.parametrize("mqtt5", [False, True], ids=["3.1.1", "5"])
async def test_messages_arrive_in_order_and_the_socket_waits_while_the_deque_is_full(
    monkeypatch: pytest.MonkeyPatch, mqtt5: bool
) -> None:
    monkeypatch.setattr(inbox, "INBOUND_BOUND", 100)
    # What gmqtt has read already (its stream buffer and one read: under 512 KiB) still lands
    # once the deque is full; the burst is much larger, so most of it must wait in the socket.
    count = 200_000
    burst = b"".join(publish(f"t/{i}", b"%d" % i, mqtt5=mqtt5) for i in range(count))
    slack = 512 * 1024 // 8  # messages: each is at least 8 bytes

    def send_burst(session: Session) -> None:
        session.writer.write(burst)  # all at once: many packets per read

    async with scripted_broker(on_subscribed=send_burst) as broker:
        link = link_to(broker, mqtt5=mqtt5)
        async with link:
            await eventually(lambda: len(link._inbox.queue) >= 100)
            await asyncio.sleep(0.2)  # the socket is not read meanwhile
            held = len(link._inbox.queue)
            assert 100 <= held <= 100 + slack < count
            taken: list[Inbound] = []
            while len(taken) < count:
                await link.wait_inbound()
                taken += link.take_inbound(3_000)
                assert len(link._inbox.queue) <= 100 + slack
            assert [m.topic for m in taken] == [f"t/{i}" for i in range(count)]
            assert [m.payload for m in taken] == [b"%d" % i for i in range(count)]
            assert link.connected
            assert link.protocol_name == ("5" if mqtt5 else "3.1.1")


async def test_an_unanswered_mqtt5_connect_falls_back_to_3_1_1_with_the_will(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mqtt, "CONNACK_TIMEOUT_S", 0.3)
    async with scripted_broker(answer_mqtt5=False) as broker:
        link = link_to(broker, mqtt5=True, will=Will("m/status", b"offline"))
        async with link:
            await eventually(lambda: link.connected)
            assert link.protocol_name == "3.1.1"
            assert [s.level for s in broker.sessions] == [5, 4]


async def test_an_mqtt5_connect_closed_unanswered_falls_back_at_once() -> None:
    async with scripted_broker(close_mqtt5=True) as broker:
        link = link_to(broker, mqtt5=True, will=Will("m/status", b"offline"))
        async with link:
            # Well before CONNACK_TIMEOUT_S (5 s): the close itself ends the wait.
            await eventually(lambda: link.connected, timeout=2.0)
            assert link.protocol_name == "3.1.1"
            assert [s.level for s in broker.sessions] == [5, 4]


async def test_a_dropped_connection_is_reconnected_and_resubscribed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(mqtt, "RECONNECT_MIN_S", 0.05)
    async with scripted_broker() as broker:
        link = link_to(broker)
        async with link:
            await eventually(lambda: link.connected)
            broker.sessions[0].writer.transport.abort()
            await eventually(lambda: link.connections == 2 and link.connected)
            assert [s.received.count(SUBSCRIBE) for s in broker.sessions] == [1, 1]


async def test_publishes_are_acknowledged_and_exit_sends_disconnect_and_leaves_no_thread(
) -> None:
    async with scripted_broker() as broker:
        link = link_to(broker, subscriptions=())
        async with link:
            await eventually(lambda: link.connected)
            for i in range(300):
                assert link.publish(f"out/{i}", b"x")
            assert await link.flush(5.0)
            assert link.in_flight == 0
            await link.subscribe(["a/b"])
            await link.unsubscribe(["a/b"])
        assert not link.connected
        await eventually(lambda: broker.sessions[0].received[-1:] == [DISCONNECT])
        assert broker.sessions[0].received.count(PUBLISH) == 300
    assert not [t for t in threading.enumerate() if t.name.startswith("paho")]


@pytest.mark.parametrize("mqtt5", [False, True], ids=["3.1.1", "5"])
async def test_publishes_sent_in_one_loop_turn_arrive_complete_and_in_order(mqtt5: bool) -> None:
    # The link writes what one turn of the loop sends in one go (gmqtt_client.py).
    async with scripted_broker() as broker:
        link = link_to(broker, mqtt5=mqtt5, subscriptions=())
        async with link:
            await eventually(lambda: link.connected)
            sent = [f"out/{i}" for i in range(5_000)]
            for i, topic in enumerate(sent):  # packets of all sizes, some over a TCP segment
                assert link.publish(topic, b"x" * (i % 3_000))
            assert await link.flush(10.0)
            assert broker.sessions[0].topics == sent


@pytest.mark.parametrize("mqtt5", [False, True], ids=["3.1.1", "5"])
async def test_qos1_publishes_in_flight_when_the_connection_drops_are_sent_again_in_order(
    monkeypatch: pytest.MonkeyPatch, mqtt5: bool,
) -> None:
    monkeypatch.setattr(mqtt, "RECONNECT_MIN_S", 0.05)
    async with scripted_broker(acks_from_session=1, resume=True) as broker:
        link = link_to(broker, mqtt5=mqtt5, subscriptions=())
        async with link:
            await eventually(lambda: link.connected)
            sent = [f"out/{i}" for i in range(3_000)]
            for topic in sent:
                assert link.publish(topic, b"x")
            await eventually(lambda: len(broker.sessions[0].topics) == len(sent))
            assert link.in_flight == len(sent)  # none acknowledged by the first session
            broker.sessions[0].writer.transport.abort()
            assert await link.flush(10.0)
            assert broker.sessions[1].topics == sent


async def test_an_unreachable_broker_is_retried_and_exit_does_not_wait() -> None:
    async with scripted_broker() as broker:
        port = broker.port
    link = MqttLink(BrokerSettings("mqtt", "127.0.0.1", port), "link-test", subscriptions=[],
                    will=None, prefer_mqtt5=False, monotonic=asyncio.get_running_loop().time)
    async with asyncio.timeout(5.0):
        async with link:
            await eventually(lambda: "cannot connect" in link.last_error)
            assert not link.connected


@pytest.mark.parametrize("mqtt5", [False, True], ids=["3.1.1", "5"])
async def test_with_ack_after_apply_a_qos1_puback_waits_until_the_consumer_comes_back(
    mqtt5: bool,
) -> None:
    def send_qos1(session: Session) -> None:
        name = b"t/1"
        session.writer.write(packet(PUBLISH | 0x02, struct.pack("!H", len(name)) + name
                                    + b"\0\7" + (b"\0" if mqtt5 else b"") + b"hello"))

    async with scripted_broker(on_subscribed=send_qos1) as broker:
        link = MqttLink(BrokerSettings("mqtt", "127.0.0.1", broker.port), "link-test",
                        subscriptions=["t/#"], will=None, keepalive_s=5, prefer_mqtt5=mqtt5,
                        monotonic=asyncio.get_running_loop().time, ack_after_apply=True)
        async with link:
            await link.wait_inbound()
            session = broker.sessions[-1]
            await asyncio.sleep(0.2)
            assert PUBACK not in session.received  # received, not applied
            [msg] = link.take_inbound(10)
            assert msg.payload == b"hello"
            await asyncio.sleep(0.2)
            assert PUBACK not in session.received  # taken: the consumer is still at it
            assert link.take_inbound(10) == []  # back for more: the message was applied
            await eventually(lambda: PUBACK in session.received)


async def test_a_refused_subscription_is_reported() -> None:
    async with scripted_broker() as broker:
        link = link_to(broker, subscriptions=())
        async with link:
            await eventually(lambda: link.connected)
            session = broker.sessions[0]
            # The broker grants one and refuses one (0x80) of the next SUBSCRIBE's filters.
            original = session.writer.write

            def refuse(data: bytes) -> None:
                if data[0] == SUBACK:
                    data = data[:-1] + b"\x80"
                original(data)

            session.writer.write = refuse  # type: ignore[method-assign]
            with pytest.raises(BrokerError, match="subscription refused"):
                await link.subscribe(["a/b"])


async def test_expiry_waits_for_the_queued_messages_of_a_node_and_for_nothing_else() -> None:
    # Contract §3: a node is not expired while a message of its own, received by its
    # deadline, is still queued; nobody else waits for that queue.
    clock = FakeClock(mono=100.0)
    registry = Registry(10)  # timeout 30 s
    for node_id, at in (("n3", 95.0), ("n1", 100.0), ("n2", 100.0), ("n4", 105.0)):
        registry.register(node_id, reg(), Instant(at, at))
    topics = Topics("fleet")
    clock.advance(30)  # the moment the messages arrive: n1's and n2's deadline

    def send(session: Session) -> None:
        for node_id in ("n2", "n3", "other"):  # n3's comes 5 s after its deadline
            session.writer.write(publish(topics.heartbeat(node_id), b"{}", mqtt5=False))

    async with scripted_broker(on_subscribed=send) as broker:
        link = MqttLink(BrokerSettings("mqtt", "127.0.0.1", broker.port), "link-test",
                        subscriptions=[topics.heartbeat_filter], will=None, keepalive_s=5,
                        prefer_mqtt5=False, monotonic=clock.monotonic)
        async with link:
            await eventually(lambda: len(link.earliest_pending()) == 3)
            now = clock.advance(10)

            expired = registry.expire(now, waiting=waiting_in(link, topics))

            assert [e.node_id for e in expired] == ["n3", "n1", "n4"]
            # n2's heartbeat is taken and refused, say: nothing holds it back any more.
            assert len(link.take_inbound(10)) == 3
            assert waiting_in(link, topics) is None
            assert [e.node_id for e in registry.expire(clock.advance(0.2))] == ["n2"]

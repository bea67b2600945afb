"""gmqtt as the manager's link uses it: the client, its store of unacknowledged publishes,
and the transport its packets are written to.

gmqtt offers no public handle on its transport: pausing reads (backpressure), closing a
connection that never got its CONNACK and coalescing writes reach the client's
``_connection`` (and its protocol's ``_transport``) here, and only here. The packets that
make up the manager's traffic (its QoS 1 PUBLISHes out; PUBLISHes and PUBACKs in) are built
and read here too, past gmqtt's generic and costly path, through its packet id allocator and
its handler's cache of methods (tests/integration/test_mqtt_link.py checks those names still
exist; tests/unit/test_publish_packet.py and test_gmqtt_fast_paths.py that the result is
gmqtt's, byte for byte and call for call).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any

from gmqtt import Client  # type: ignore[import-untyped]
from gmqtt.mqtt.constants import MQTTv50  # type: ignore[import-untyped]
from gmqtt.storage import PersistentStorage  # type: ignore[import-untyped]

NO_RECONNECT = -2
"""gmqtt's ``reconnect_retries``: -1 is unlimited, 0 still allows one; below that, none (the
link reconnects itself)."""


class Outbox(PersistentStorage):  # type: ignore[misc]  # gmqtt is untyped
    """gmqtt's store of QoS 1 publishes awaiting PUBACK (a documented ``Client`` argument),
    counting them and telling the link when one is acknowledged."""

    def __init__(self, on_ack: Callable[[], None]) -> None:
        super().__init__()
        self._on_ack = on_ack
        self.size = 0

    def push_message(self, mid: int, raw_package: bytes) -> None:
        super().push_message(mid, raw_package)
        self.size = len(self._messages)

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        self.size = len(self._messages)
        self._on_ack()

    def clear(self) -> None:
        super().clear()
        self.size = 0
        self._on_ack()


class CoalescingTransport:
    """A transport that writes everything asked of it within one turn of the event loop in
    one ``write``: gmqtt writes each packet (each PUBLISH, each PUBACK) on its own, one
    ``send`` system call apiece, which cost 11% of the manager's time while registering.

    Order is kept (one buffer, written whole); ``close`` writes what is buffered first,
    ``abort`` drops it (QoS 1 publishes stay in the ``Outbox`` and are sent again on the
    resumed session). Everything else is the wrapped transport's.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._parts: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._parts:
            self._loop.call_soon(self.flush)
        self._parts.append(data)

    def flush(self) -> None:
        parts, self._parts = self._parts, []
        if parts and not self._transport.is_closing():
            self._transport.write(parts[0] if len(parts) == 1 else b"".join(parts))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._parts = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


_PUBLISH_QOS1 = 0x32
"""PUBLISH's first byte at QoS 1 (retain is its lowest bit)."""
_PUBLISH = 0x30
_PUBACK = 0x40
_PUBACK_V5 = struct.Struct("!BBHBB").pack
"""A PUBACK as gmqtt writes it at MQTT 5: success, no properties."""
_PUBACK_V311 = struct.Struct("!BBH").pack


def _length(value: int) -> bytes:
    """MQTT's variable byte integer (a remaining or property length)."""
    if value < 128:
        return bytes((value,))
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | 0x80 if value else digit)
        if not value:
            return bytes(out)


def publish_packet(topic: str, payload: bytes, mid: int, *, retain: bool, mqtt5: bool,
                   correlation: bytes | None = None) -> bytes:
    """A QoS 1 PUBLISH, byte for byte what gmqtt's ``PublishPacket`` builds from a ``Message``
    (topic encoded with ``errors="replace"`` as it does), with Correlation Data as the only
    MQTT 5 property. tests/unit/test_publish_packet.py holds the two to the same bytes."""
    name = topic.encode("utf-8", "replace")
    if not mqtt5:
        properties = b""
    elif correlation is None:
        properties = b"\x00"
    else:
        properties = (_length(3 + len(correlation)) + b"\x09"
                      + len(correlation).to_bytes(2, "big") + correlation)
    body_length = 4 + len(name) + len(properties) + len(payload)
    return b"".join((bytes((_PUBLISH_QOS1 | retain,)), _length(body_length),
                     len(name).to_bytes(2, "big"), name, mid.to_bytes(2, "big"), properties,
                     payload))


class _QuietRetries(logging.Filter):
    """gmqtt logs an error each time it declines to reconnect, which is by our design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max number of failed connection attempts" not in str(record.msg)



GMQTT_LOG = logging.getLogger("fleetmq.mqtt.gmqtt")
"""The logger gmqtt's client writes to."""
GMQTT_LOG.addFilter(_QuietRetries())


class GmqttClient(Client):  # type: ignore[misc]  # gmqtt is untyped
    """gmqtt's client with the few things the link asks of its connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # What arrives most (PUBLISHes, PUBACKs of our own publishes) skips gmqtt's generic
        # handling: the handler looks its methods up in this cache by packet type.
        handler = self._package_handler
        handler._handler_cache[_PUBLISH] = self._handle_publish
        handler._handler_cache[_PUBACK] = self._handle_puback

    def _handle_publish(self, cmd: int, raw: bytes) -> None:
        """gmqtt's ``_handle_publish_packet`` for a QoS 0 or 1 PUBLISH without MQTT 5
        properties, acknowledged on receipt: the same ``on_message`` call (topic, payload,
        QoS, ``{"dup", "retain"}``) and the same PUBACK before it, without gmqtt's struct
        formats built per packet, its property dictionaries and its debug formatting (the
        MQTT 5 part of which made MQTT 5 ingest the slower). Anything else (QoS 2, properties,
        a topic alias, acknowledgement after the callback, a malformed packet) is gmqtt's.
        tests/unit/test_gmqtt_fast_paths.py holds the two to the same calls and bytes."""
        handler = self._package_handler
        qos = (cmd >> 1) & 3
        size = len(raw)
        # gmqtt runs an async on_message as a task; the link's is async only when it
        # acknowledges after applying, which is never optimistic.
        if qos > 1 or size < 2 or not handler._optimistic_acknowledgement:
            return self._gmqtt_publish(cmd, raw)
        at = 2 + (raw[0] << 8 | raw[1])
        mid_at = at
        if qos:
            at += 2
        mqtt5 = handler._connection_state.protocol_version >= MQTTv50
        if at + mqtt5 > size or at == 2 + 2 * qos:  # short, or no topic (an alias)
            return self._gmqtt_publish(cmd, raw)
        if mqtt5:
            if raw[at]:  # properties: gmqtt parses them
                return self._gmqtt_publish(cmd, raw)
            at += 1
        try:
            topic = raw[2:mid_at].decode("utf-8")
        except UnicodeDecodeError:
            return self._gmqtt_publish(cmd, raw)
        if qos:
            mid = raw[mid_at] << 8 | raw[mid_at + 1]
            self._connection._protocol.write_data(
                _PUBACK_V5(_PUBACK, 4, mid, 0, 0) if mqtt5 else _PUBACK_V311(_PUBACK, 2, mid))
        handler.on_message(topic, raw[at:], qos, {"dup": (cmd & 0x08) >> 3,
                                                  "retain": cmd & 0x01})
        return None

    def _gmqtt_publish(self, cmd: int, raw: bytes) -> None:
        self._package_handler._handle_publish_packet(cmd, raw)

    def _handle_puback(self, cmd: int, packet: bytes) -> None:
        """gmqtt's ``_handle_puback_packet`` (free the packet id, drop the publish from the
        outbox) without its three calls and two debug logs on the way."""
        if len(packet) < 2:
            self._package_handler._handle_puback_packet(cmd, packet)
            return
        mid = packet[0] << 8 | packet[1]
        self._package_handler.id_generator._used_ids.discard(mid)
        self._persistent_storage.remove_message_by_mid(mid)

    async def _create_connection(self, *args: Any, **kwargs: Any) -> Any:
        """gmqtt's connection, its packets written through a ``CoalescingTransport``."""
        connection = await super()._create_connection(*args, **kwargs)
        coalescing = CoalescingTransport(connection._transport)
        # The connection writes replays through its reference, the protocol everything else.
        connection._transport = connection._protocol._transport = coalescing
        return connection

    def publish_qos1(self, topic: str, payload: bytes, *, retain: bool,
                     correlation: bytes | None = None) -> None:
        """``Client.publish(topic, payload, qos=1, retain=retain, correlation_data=...)``,
        without gmqtt's ``Message`` and its generic property encoding (13% of the manager's
        time while registering, bench/README.md sections 14 and 19): the packet is built here, gets
        its id from gmqtt's allocator, is written and kept in the outbox for a resumed
        session as gmqtt does. Raises OverflowError when no packet id is free and
        AttributeError without a connection, as ``Client.publish`` does."""
        protocol = self._connection._protocol
        mid = protocol.id_generator._mid_generate()
        packet = publish_packet(topic, payload, mid, retain=retain,
                                mqtt5=protocol.proto_ver >= MQTTv50, correlation=correlation)
        protocol.write_data(packet)
        self._persistent_storage.push_message(mid, packet)

    def connection(self) -> object:
        """The current connection (changes once a connect got as far as TCP and TLS)."""
        return self._connection

    def connection_state(self, before: object) -> str:
        """Of a connect under way: "none" (no new connection yet), "open" or "closed"."""
        connection = self._connection
        if connection is None or connection is before:
            return "none"
        return "closed" if connection.is_closing() else "open"

    def is_connected_safe(self) -> bool:
        return self._connection is not None and not self._connection.is_closing()

    def refusal(self) -> Exception | None:
        """The CONNACK refusal of the last connect, if there was one."""
        handler = self._package_handler
        if not handler.has_error:
            return None
        try:
            handler.propagate_error()
        except Exception as exc:  # gmqtt hands its error over by raising it
            return exc
        return None

    def pause_reading(self) -> None:
        transport = self._transport()
        if transport is not None and transport.is_reading():
            transport.pause_reading()

    def resume_reading(self) -> None:
        transport = self._transport()
        if transport is not None and not transport.is_closing() and not transport.is_reading():
            transport.resume_reading()

    def _transport(self) -> Any:
        connection = self._connection
        return None if connection is None else connection._transport

    def drop(self) -> None:
        """Close the connection at once, without DISCONNECT (a failed or abandoned connect)."""
        transport = self._transport()
        if transport is not None:
            transport.abort()

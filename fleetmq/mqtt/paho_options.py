"""Options fleetmq's paho-mqtt clients share: the agent, the simulator, the dynsec session reset.

The manager's own MQTT link runs on gmqtt (``fleetmq.mqtt.link``); paho stays where a client
speaks as a device does.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any

import paho.mqtt.client as paho

from fleetmq.config import BrokerSettings
from fleetmq.tls import broker_context


def use_broker(client: paho.Client, broker: BrokerSettings,
               tls: ssl.SSLContext | None = None) -> None:
    """The credentials and TLS a broker URL asks for, on any of fleetmq's paho clients (the
    agent, the simulator). ``tls``: the context ``broker_context(broker)`` made once (made here
    if not given): TLS 1.2+, the broker's certificate and host name checked against
    ``--broker-ca`` (else the system's CAs), ``--broker-cert`` presented if given."""
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.scheme == "mqtts":
        client.tls_set_context(tls if tls is not None else broker_context(broker))


def set_nodelay(_c: paho.Client, _u: object, sock: Any) -> None:
    """paho's ``on_socket_open``: paho leaves Nagle on, so a small publish (a status, a
    heartbeat) would wait 40-90 ms for the ACK clock."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

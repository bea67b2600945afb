"""Discarding a client's persistent session on an external broker (contract section 8:
revoking a credential also discards that identity's broker sessions).

Mosquitto's dynamic security plugin has no command for it: disabling or deleting a client
kicks its connection but keeps its session (subscriptions, queued messages), which a later
login under the same client id would resume. The standard way is one connection as that
client id with a clean session, which makes the broker drop the old one, then a DISCONNECT.
This module owns only that connection; ``dynsec_outbox`` gives the client a password for it
and decides when it is due.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
from dataclasses import replace
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from fleetmq.config import BrokerSettings
from fleetmq.mqtt.dynsec import DynsecAdmin, DynsecError
from fleetmq.mqtt.paho_options import use_broker

CONNECT_TIMEOUT_S = 5.0
"""The clean-session connection's TCP, TLS and CONNACK, together."""
LOOP_S = 0.05
"""One turn of paho's loop while waiting for the CONNACK."""


async def reset_dynsec_session(admin: DynsecAdmin, broker: BrokerSettings,
                               tls: ssl.SSLContext | None, identity: str, *, exists: bool,
                               textname: str, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """Discard the persistent session of dynsec client ``identity`` (username = client id),
    which the caller has disabled already (its live connection kicked). The client gets a fresh
    random password that only this call ever holds (``exists`` False: it is created, with no
    role, just for this), is enabled, and logs in once with a clean session. None once done,
    else why not; the client is left enabled under that password for the caller to delete.
    A refused command is reported the same way; a lost admin connection raises BrokerError."""
    password = secrets.token_urlsafe(32)
    try:
        if exists:
            await admin.set_client_password(identity, password)
        else:
            await admin.create_client(identity, password, clientid=identity, roles=[],
                                      textname=textname)
        await admin.enable_client(identity)
    except DynsecError as exc:
        return exc.error
    login = replace(broker, username=identity, password=password)
    # paho blocks; its every wait is bounded by timeout_s, so the thread ends soon after.
    return await asyncio.to_thread(discard_session, login, identity, tls, timeout_s)


def discard_session(broker: BrokerSettings, client_id: str, tls: ssl.SSLContext | None,
                    timeout_s: float) -> str | None:
    """Blocking (run it in a thread): connect as ``client_id`` with ``broker``'s login and
    MQTT 3.1.1's clean session, which every 3.1.1 or 5 broker answers by discarding the id's
    old session (whichever protocol made it), then disconnect. None once the broker accepted
    the connection, else why not. Every wait (TCP, TLS, CONNACK) ends within ``timeout_s``."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=MQTTProtocolVersion.MQTTv311, clean_session=True)
    use_broker(client, broker, tls)
    client.connect_timeout = timeout_s
    answers: list[int] = []

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
        answers.append(int(getattr(rc, "value", rc)))

    client.on_connect = on_connect
    deadline = time.monotonic() + timeout_s
    try:
        client.connect(broker.host, broker.port, keepalive=max(5, int(timeout_s) + 1))
        while not answers and time.monotonic() < deadline:
            if client.loop(timeout=LOOP_S) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        if not answers:
            return f"no CONNACK within {timeout_s:g} s"
        if answers[0] != 0:
            return f"connection refused (reason {answers[0]:#x})"
        client.disconnect()
        client.loop(timeout=LOOP_S)  # sends the DISCONNECT
        return None
    except (OSError, ssl.SSLError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        sock = client.socket()
        if sock is not None:
            sock.close()

"""TLS wherever fleetmq listens or connects (contract section 8): HTTPS for REST, the embedded
broker's TLS listener, ``mqtts://`` with an own CA and client certificates, for the manager and
the agent. The CA is made at run time (tests/security/pki.py).

Attacks: a client without the CA, a broker whose certificate another CA signed or that names
another host, a broker that wants a client certificate the manager does not have, and wrong
certificate files: each fails, and fails with one clear line.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from fleetmq.agent import Agent
from fleetmq.app import FleetService
from fleetmq.auth.service import AuthService
from fleetmq.auth.startup import AuthSetupError, decide_mode, listeners
from fleetmq.auth.store import MemoryAuthStore
from fleetmq.config import BrokerTlsSettings, HttpSettings, Settings, parse_broker
from fleetmq.core.clock import SystemClock
from fleetmq.errors import ConfigError
from fleetmq.tls import HTTP_OPTIONS, client_context, server_context
from tests.conftest import eventually, make_settings, running
from tests.security.conftest import MosquittoFactory
from tests.security.pki import Pki
from tests.support import REPO, free_port


def https_settings(pki: Pki, broker: str, root: str) -> Settings:
    return make_settings(broker, root, http=HttpSettings(
        host="127.0.0.1", port=0, tls_cert=pki.server.cert, tls_key=pki.server.key))


# --- HTTPS for REST ------------------------------------------------------------------------

async def test_https_rest_answers_a_client_that_trusts_the_ca_and_no_other(
    pki: Pki, root: str, embedded_url: str
) -> None:
    async with running(https_settings(pki, embedded_url, root)) as svc, \
            aiohttp.ClientSession() as http:
        base = f"https://127.0.0.1:{svc.http_port}"
        trusting = ssl.create_default_context(cafile=pki.ca)
        async with http.get(f"{base}/healthz", ssl=trusting) as resp:
            assert resp.status == 200
        async with http.get(f"{base}/api/v1/fleet/nodes", ssl=trusting) as resp:
            assert resp.status == 200
        # The system's CAs, or another CA, do not vouch for this server.
        stranger = ssl.create_default_context(cafile=pki.other_ca)
        for context in (True, stranger):
            with pytest.raises(aiohttp.ClientConnectorCertificateError,
                               match="certificate verify failed"):
                await http.get(f"{base}/healthz", ssl=context)
        # No cleartext fallback on the HTTPS port.
        with pytest.raises(aiohttp.ClientError):
            await http.get(f"http://127.0.0.1:{svc.http_port}/healthz")
        # The server refuses anything older than TLS 1.2 (the same client, capped at 1.2, is
        # served: the version is what is refused).
        for newest, served in ((ssl.TLSVersion.TLSv1_1, False), (ssl.TLSVersion.TLSv1_2, True)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1: on purpose
                weak = ssl.create_default_context(cafile=pki.ca)
                weak.minimum_version = ssl.TLSVersion.TLSv1
                weak.maximum_version = newest
            weak.set_ciphers("ALL:@SECLEVEL=0")
            try:
                async with http.get(f"{base}/healthz", ssl=weak) as resp:
                    assert served
                    assert resp.status == 200
            except aiohttp.ClientError:
                assert not served
        async with http.get(f"{base}/readyz", ssl=trusting) as resp:
            assert resp.status == 200  # the server is untouched by the failed handshakes


# --- the embedded broker's TLS listener ----------------------------------------------------

def paho_tls_client(port: int, ca: str | None, client_id: str) -> paho.Client:
    """Connect (blocking: call it in a thread) a paho client over TLS trusting ``ca``."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=MQTTProtocolVersion.MQTTv311)
    client.tls_set(ca_certs=ca, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.connect("127.0.0.1", port, keepalive=30)
    return client


async def test_the_embedded_brokers_tls_listener_serves_a_client_that_trusts_the_ca(
    pki: Pki, root: str, embedded_url: str
) -> None:
    tls_port = free_port()
    settings = replace(make_settings(embedded_url, root), broker_tls=BrokerTlsSettings(
        "127.0.0.1", tls_port, pki.server.cert, pki.server.key))
    async with running(settings):
        client = await asyncio.to_thread(paho_tls_client, tls_port, pki.ca, "tls-dashboard")
        received: list[paho.MQTTMessage] = []
        client.on_message = lambda _c, _u, msg: received.append(msg)
        client.loop_start()
        try:
            client.subscribe(f"{root}/_manager/status", qos=1)
            await eventually(lambda: received, timeout=5)
            assert b'"online"' in received[0].payload
            # A client that trusts another CA never gets as far as CONNECT.
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.to_thread(paho_tls_client, tls_port, pki.other_ca, "stranger")
            assert client.is_connected()  # the first client is untouched
        finally:
            client.disconnect()
            client.loop_stop()


def test_the_tls_listener_counts_as_encrypted_for_the_loopback_rule_and_warnings() -> None:
    tls = BrokerTlsSettings("0.0.0.0", 8883, "c.pem", "k.pem")
    settings = Settings(broker_tls=tls)
    assert ("embedded MQTT broker's TLS listener (--broker-tls)", "0.0.0.0", True) \
        in listeners(settings)
    auth = AuthService(MemoryAuthStore(), SystemClock())
    # Encrypted or not, a listener beyond loopback while auth is off is refused.
    with pytest.raises(AuthSetupError, match="TLS listener"):
        decide_mode(settings, auth)


def test_broker_tls_options_are_checked_together() -> None:
    with pytest.raises(ConfigError, match="embedded broker"):
        Settings(broker=parse_broker("mqtt://127.0.0.1:1"),
                 broker_tls=BrokerTlsSettings("127.0.0.1", 8883, "c", "k"))


# --- mqtts:// with an own CA and client certificates -----------------------------------------

async def test_manager_and_agent_connect_over_mqtts_to_mosquitto_with_an_own_ca(
    pki: Pki, root: str, mosquitto_with: MosquittoFactory
) -> None:
    broker = mosquitto_with(tls=pki)
    url = broker.broker_url("mqtts")
    settings = make_settings(parse_broker(url, ca_file=pki.ca), root)
    async with running(settings) as svc, aiohttp.ClientSession() as http:
        agent = Agent("tls-agent-1", "picclaw", broker=url, ca_file=pki.ca, interval_s=1,
                      topic_root=root)
        async with agent:
            assert await agent.wait_registered(10)
            node_url = f"http://127.0.0.1:{svc.http_port}/api/v1/fleet/nodes/tls-agent-1"

            async def uptime() -> Any:
                async with http.get(node_url) as resp:
                    return (await resp.json()).get("uptime_seconds")
            await eventually(uptime, timeout=10)  # a heartbeat came through


async def test_the_manager_presents_its_client_certificate_where_mosquitto_requires_one(
    pki: Pki, root: str, mosquitto_with: MosquittoFactory
) -> None:
    broker = mosquitto_with(tls=pki, require_certificate=True)
    url = broker.broker_url("mqtts")
    with_cert = make_settings(parse_broker(url, ca_file=pki.ca, cert_file=pki.client.cert,
                                           key_file=pki.client.key), root)
    async with running(with_cert) as svc:
        assert svc.ready
        # Without a certificate the same broker refuses it; the first manager is untouched.
        without = make_settings(parse_broker(url, ca_file=pki.ca), f"{root}-x",
                                client_id="_fleetmq-nocert")
        async with FleetService(without) as other:
            await eventually(lambda: other.link.connections == 0
                             and "not connected yet" not in other.link.last_error, timeout=10)
            assert not other.ready
        assert svc.ready


@pytest.mark.parametrize("case", ["another CA's certificate", "another host's certificate"])
async def test_the_manager_refuses_a_broker_its_ca_does_not_vouch_for(
    pki: Pki, root: str, mosquitto_with: MosquittoFactory, case: str
) -> None:
    server = pki.other_server if case == "another CA's certificate" else pki.wrong_host
    broker = mosquitto_with(tls=pki, server=server)
    settings = make_settings(parse_broker(broker.broker_url("mqtts"), ca_file=pki.ca), root)
    async with FleetService(settings) as svc:
        error = await eventually(lambda: "CERTIFICATE_VERIFY_FAILED" in svc.link.last_error
                                 and svc.link.last_error, timeout=10)
        assert ("IP address mismatch" in error) == (case == "another host's certificate")
        assert not svc.ready


# --- certificate files: one clear line ---------------------------------------------------------

def test_tls_contexts_refuse_wrong_files_with_a_sentence_naming_the_option(
    pki: Pki, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"^--http-tls-cert /nowhere/c.pem: cannot read it"):
        server_context("/nowhere/c.pem", pki.server.key, HTTP_OPTIONS)
    with pytest.raises(ConfigError, match=r"--http-tls-key .* is not the key of the certificate"):
        server_context(pki.server.cert, pki.client.key, HTTP_OPTIONS)
    with pytest.raises(ConfigError, match=r"--broker-ca .* holds no PEM certificate"):
        client_context(pki.server.key, None, None)
    with pytest.raises(ConfigError, match="--broker-key was given without --broker-cert"):
        client_context(pki.ca, None, pki.client.key)
    # An encrypted key is refused in a sentence, never with a passphrase prompt.
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(Path(pki.server.key).read_bytes(), None)
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(ConfigError, match="is encrypted: give an unencrypted PEM key"):
        server_context(pki.server.cert, str(encrypted), HTTP_OPTIONS)
    context = client_context(pki.ca, pki.client.cert, pki.client.key)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMQ_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "fleetmq", *args], capture_output=True,
                          text=True, timeout=30, env=env, cwd=tmp_path, check=False)


@pytest.mark.parametrize(("case", "words"), [
    ("http cert alone", "--http-tls-cert was given without --http-tls-key"),
    ("http cert missing", "--http-tls-cert /nowhere/server.pem: cannot read it"),
    ("http key of another cert", "is not the key of the certificate"),
    ("broker tls without files", "--broker-tls needs --broker-tls-cert and --broker-tls-key"),
    ("broker tls key of another cert", "--broker-tls-key"),
    ("broker ca missing", "--broker-ca /nowhere/ca.pem: cannot read it"),
    ("broker ca with mqtt://", "--broker-ca is for an mqtts:// broker"),
])
def test_serve_with_bad_tls_files_exits_2_with_one_line(
    pki: Pki, tmp_path: Path, case: str, words: str
) -> None:
    base = ["serve", "--store", "memory://", "--http", f"127.0.0.1:{free_port()}",
            "--broker", f"embedded://127.0.0.1:{free_port()}", "--broker-ws", "off"]
    port = free_port()
    extra = {
        "http cert alone": ["--http-tls-cert", pki.server.cert],
        "http cert missing": ["--http-tls-cert", "/nowhere/server.pem",
                              "--http-tls-key", pki.server.key],
        "http key of another cert": ["--http-tls-cert", pki.server.cert,
                                     "--http-tls-key", pki.client.key],
        "broker tls without files": ["--broker-tls", f"127.0.0.1:{port}"],
        "broker tls key of another cert": ["--broker-tls", f"127.0.0.1:{port}",
                                           "--broker-tls-cert", pki.server.cert,
                                           "--broker-tls-key", pki.client.key],
        "broker ca missing": ["--broker", f"mqtts://127.0.0.1:{port}",
                              "--broker-ca", "/nowhere/ca.pem"],
        "broker ca with mqtt://": ["--broker", f"mqtt://127.0.0.1:{port}",
                                   "--broker-ca", pki.ca],
    }[case]
    result = run_cli(tmp_path, *base, *extra)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("fleetmq: error: ")
    assert words in errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "words"), [
    (["--broker", "mqtts://127.0.0.1:1", "--broker-ca", "/nowhere/ca.pem"],
     "--broker-ca /nowhere/ca.pem: cannot read it"),
    (["--broker", "mqtt://127.0.0.1:1", "--broker-cert", "c.pem"], "--broker-cert"),
    (["--api", "http://127.0.0.1:1", "--api-ca", "ca.pem"], "--api-ca is for an https://"),
])
def test_agent_with_bad_tls_options_exits_2_with_one_line(
    tmp_path: Path, args: list[str], words: str
) -> None:
    result = run_cli(tmp_path, "agent", "--node-id", "n-1", "--node-type", "picclaw", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert words in result.stderr

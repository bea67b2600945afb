"""TLS contexts from certificate files, with one-line errors that name the option at fault.

Every TLS endpoint of fleetmq gets its context here: the HTTPS server, the embedded broker's
TLS listener (checked here, built by amqtt), and every MQTT or HTTPS client (the manager's
links, the agent, the simulator). TLS 1.2 is the floor everywhere; clients always verify the
server's certificate and host name. Files are read when the context is made (at start), so a
wrong path fails at once, not at the first connection.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from fleetmq.config import BrokerSettings
from fleetmq.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Options:
    """The names a user gave the files under, for error messages."""

    ca: str = "--broker-ca"
    cert: str = "--broker-cert"
    key: str = "--broker-key"


HTTP_OPTIONS = Options(ca="", cert="--http-tls-cert", key="--http-tls-key")
BROKER_TLS_OPTIONS = Options(ca="", cert="--broker-tls-cert", key="--broker-tls-key")
BROKER_OPTIONS = Options()
API_OPTIONS = Options(ca="--api-ca", cert="", key="")


def server_context(cert_file: str, key_file: str, names: Options) -> ssl.SSLContext:
    """A server context (TLS 1.2+) holding the certificate and its key; no client certificates
    are asked for."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_pair(context, cert_file, key_file, names)
    return context


def client_context(ca_file: str | None, cert_file: str | None, key_file: str | None,
                   names: Options = BROKER_OPTIONS) -> ssl.SSLContext:
    """A client context (TLS 1.2+, certificate and host name verified) that trusts ``ca_file``
    (else the system's CAs) and presents ``cert_file``/``key_file`` if given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if ca_file is not None:
        _readable(ca_file, names.ca)
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError as exc:
            raise ConfigError(f"{names.ca} {ca_file} holds no PEM certificate: "
                              f"{_reason(exc)}") from exc
    if cert_file is not None or key_file is not None:
        if cert_file is None or key_file is None:
            given, missing = (names.cert, names.key) if key_file is None else (names.key,
                                                                                names.cert)
            raise ConfigError(f"{given} was given without {missing}: give both")
        _load_pair(context, cert_file, key_file, names)
    return context


def broker_context(broker: BrokerSettings) -> ssl.SSLContext | None:
    """The client context an ``mqtts://`` broker needs; None for plain ``mqtt://``."""
    if broker.scheme != "mqtts":
        return None
    return client_context(broker.ca_file, broker.cert_file, broker.key_file)


def _load_pair(context: ssl.SSLContext, cert_file: str, key_file: str, names: Options) -> None:
    _readable(cert_file, names.cert)
    _readable(key_file, names.key)
    def no_passphrase() -> str:
        # OpenSSL would prompt on the terminal for an encrypted key: a service cannot answer.
        raise ConfigError(f"{names.key} {key_file} is encrypted: give an unencrypted PEM key "
                          "(readable by fleetmq's user only)")

    try:
        context.load_cert_chain(cert_file, key_file, password=no_passphrase)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(f"{names.key} {key_file} is not the key of the certificate in "
                              f"{names.cert} {cert_file}: give the matching pair") from exc
        raise ConfigError(f"{names.cert} {cert_file} and {names.key} {key_file} are not a PEM "
                          f"certificate and its unencrypted PEM key: {_reason(exc)}") from exc


def _readable(path: str, option: str) -> None:
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot read it: {exc.strerror or exc}") from exc


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).lower().replace("_", " ")

"""One frozen settings tree, built once by the CLI; components receive their slice.

Nothing else in fleetmq reads the environment or parses option strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from fleetmq.core.topics import is_valid_root
from fleetmq.errors import ConfigError

BrokerScheme = Literal["embedded", "mqtt", "mqtts"]
DEFAULT_PORTS: dict[str, int] = {"embedded": 1883, "mqtt": 1883, "mqtts": 8883}
CLIENT_ID_PREFIX = "_fleetmq"
OUTPUT_USER_SUFFIX = "-out"
"""A broker username beginning with CLIENT_ID_PREFIX: the output connection adds this to it."""


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    scheme: BrokerScheme = "embedded"
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    """``mqtts://``: the CA that signed the broker's certificate (default: the system's)."""
    cert_file: str | None = None
    """``mqtts://``: a client certificate, for brokers that ask for one."""
    key_file: str | None = None

    @property
    def embedded(self) -> bool:
        return self.scheme == "embedded"

    def describe(self) -> str:
        """The URL without its password, for logs and errors."""
        user = f"{self.username}@" if self.username else ""
        return f"{self.scheme}://{user}{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"BrokerSettings({self.describe()!r})"


@dataclass(frozen=True, slots=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: str | None = None
    """With ``tls_key``: serve HTTPS."""
    tls_key: str | None = None
    body_timeout_s: float = 15.0
    idle_timeout_s: float = 60.0
    shutdown_timeout_s: float = 10.0
    watch_keepalive_s: float = 15.0
    """A comment line on a quiet watch stream this often keeps proxies from closing it."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins allowed to call the API (``--cors-origin``); none by default."""

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = (("--http-tls-cert", "--http-tls-key") if self.tls_key is None
                              else ("--http-tls-key", "--http-tls-cert"))
            raise ConfigError(f"{given} was given without {missing}: give both to serve HTTPS")


@dataclass(frozen=True, slots=True)
class BrokerTlsSettings:
    """The embedded broker's TLS listener (``--broker-tls HOST:PORT``), beside its TCP one."""

    host: str
    port: int
    cert_file: str
    key_file: str


@dataclass(frozen=True, slots=True)
class BrokerWsSettings:
    """The embedded broker's WebSocket listener (``--broker-ws HOST:PORT``): MQTT over
    WebSockets for browser dashboards (MQTT.js), with the same logins and topic rules as TCP."""

    host: str = "127.0.0.1"
    port: int = 9001


StoreScheme = Literal["memory", "sqlite", "postgresql"]
DEFAULT_STORE = "sqlite:///fleetmq.db"


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Where the fleet survives restarts: ``memory://``, ``sqlite:///PATH`` (three slashes
    and a relative path, four for an absolute one) or ``postgresql://user@host/db``."""

    scheme: StoreScheme = "sqlite"
    location: str = "fleetmq.db"
    """The file of SQLite, the full URL (DSN) of PostgreSQL, empty for memory."""
    flush_interval_s: float = 1.0
    """Heartbeats (last_seen, telemetry) reach the store at most this much later."""
    history_days: float = 30.0

    def describe(self) -> str:
        """The URL without its password, for logs and errors."""
        if self.scheme == "memory":
            return "memory://"
        if self.scheme == "sqlite":
            return f"sqlite:///{self.location}"
        parts = urlsplit(self.location)
        userinfo, at, host = parts.netloc.rpartition("@")
        if ":" in userinfo:
            netloc = f"{userinfo.partition(':')[0]}:***{at}{host}"
            return parts._replace(netloc=netloc, query="").geturl()
        return parts._replace(query="").geturl()

    def __repr__(self) -> str:
        return f"StoreSettings({self.describe()!r})"

    def __post_init__(self) -> None:
        if not 0.05 <= self.flush_interval_s <= 60:
            raise ConfigError(f"--flush-interval {self.flush_interval_s:g} is out of range: "
                              "give seconds from 0.05 to 60")
        if not 0 < self.history_days <= 36_500:
            raise ConfigError(f"--history-days {self.history_days:g} is out of range: "
                              "give days above 0 and at most 36500")


def parse_store(text: str, flush_interval_s: float = 1.0,
                history_days: float = 30.0) -> StoreSettings:
    """``memory://``, ``sqlite:///PATH`` or ``postgresql://...`` (``postgres://`` too)."""
    tail = {"flush_interval_s": flush_interval_s, "history_days": history_days}
    if text in ("memory://", "memory"):
        return StoreSettings("memory", "", **tail)
    if text.startswith("sqlite:///") and len(text) > len("sqlite:///"):
        return StoreSettings("sqlite", text[len("sqlite:///"):], **tail)
    if urlsplit(text).scheme in ("postgresql", "postgres"):  # host may be a ?host=/socket dir
        return StoreSettings("postgresql", text, **tail)
    raise ConfigError(
        f"--store {text!r} is not a store URL: use sqlite:///fleetmq.db (a file; four slashes "
        "for an absolute path), postgresql://user@host/db or memory:// (nothing kept)")


AuthMode = Literal["auto", "on", "off"]
BrokerAuth = Literal["none", "dynsec", "external"]


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Access control (contract section 8)."""

    mode: AuthMode = "auto"
    """auto: on once the store has held an admin key; on: refuse to start without one;
    off: on purpose (a warning at every start)."""
    admin_token_file: str | None = None
    broker_auth: BrokerAuth = "none"
    """How an external broker checks logins: dynsec (fleetmq mirrors credentials into
    Mosquitto's dynamic security plugin), external (the operator configured it, e.g. EMQX
    calling fleetmq's HTTP hooks) or none."""
    broker_admin: BrokerSettings | None = None
    """dynsec: the plugin's admin login (loopback or mqtts:// only)."""
    metrics_public: bool = False
    trusted_proxies: tuple[str, ...] = ()
    """CIDRs whose X-Forwarded-For is believed for the client address."""
    audit_days: float = 365.0
    node_rate: float = 5.0
    node_burst: int = 20
    key_rate: float = 1000.0
    key_burst: int = 2000

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "on", "off"):
            raise ConfigError(f"--auth {self.mode!r} is not one of auto, on, off")
        if self.broker_auth not in ("none", "dynsec", "external"):
            raise ConfigError(f"--broker-auth {self.broker_auth!r} is not one of "
                              "none, dynsec, external")
        if not 0 < self.audit_days <= 36_500:
            raise ConfigError(f"--audit-days {self.audit_days:g} is out of range: "
                              "give days above 0 and at most 36500")
        for name, rate in (("--node-rate", self.node_rate), ("--key-rate", self.key_rate)):
            if not 0 < rate <= 1_000_000:
                raise ConfigError(f"{name} {rate:g} is out of range: give messages per second "
                                  "above 0 and at most 1000000")


MIN_LEASE_S = 4.0


def check_advertise_url(url: str) -> None:
    """``--advertise-url``: an absolute http(s) URL without credentials, query or fragment."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"--advertise-url {url[:64]!r} is not a URL ({exc}): give one like "
                          "http://fleetmq-a.example:8080") from None
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.username
            or parts.password or parts.query or parts.fragment or len(url) > 512
            or (port is not None and not 0 < port < 65_536)):
        raise ConfigError(f"--advertise-url {url[:64]!r} must be an http:// or https:// URL "
                          "with a host and no credentials, query or fragment, like "
                          "http://fleetmq-a.example:8080")


@dataclass(frozen=True, slots=True)
class Settings:
    broker: BrokerSettings = BrokerSettings()
    http: HttpSettings = HttpSettings()
    store: StoreSettings = StoreSettings()
    auth: AuthSettings = AuthSettings()
    broker_tls: BrokerTlsSettings | None = None
    """The embedded broker's TLS listener; None: TCP only."""
    broker_ws: BrokerWsSettings | None = None
    """The embedded broker's WebSocket listener; None: none (the CLI's default is
    127.0.0.1:9001 with the embedded broker)."""
    topic_root: str = "fleet"
    heartbeat_interval_s: int = 60
    offline_after_s: float | None = None
    """Timeout of nodes that declare no interval; None means 3 x heartbeat_interval_s."""
    client_id: str | None = None
    """The manager's MQTT client id; None means ``_fleetmq-<root>``."""
    keepalive_s: int = 60
    mqtt_version: str = "5"
    """"5" (falls back to 3.1.1 when the broker refuses it) or "3.1.1" (no MQTT 5 response
    topics; ingests about as fast)."""
    puback: str = "receipt"
    """When the manager acknowledges a QoS 1 message: "receipt" (fastest; a message received
    but not yet applied is lost if the process dies) or "applied" (after it is applied, at
    about a third of the ingest rate: see docs/protocol.md)."""
    log_level: str = "info"
    lease_s: float = 10.0
    """High availability (contract section 10): the active's lease on a PostgreSQL store,
    renewed every quarter of it; a paused or cut-off active is replaced after it."""
    advertise_url: str | None = None
    """The URL clients use to reach this manager: the active records it with its lease and
    standbys name it in their 503s."""

    @property
    def default_timeout_s(self) -> float:
        if self.offline_after_s is not None:
            return self.offline_after_s
        return 3.0 * self.heartbeat_interval_s

    @property
    def mqtt_client_id(self) -> str:
        if self.client_id is not None:
            return self.client_id
        return f"{CLIENT_ID_PREFIX}-{self.topic_root.replace('/', '-')}"

    def __post_init__(self) -> None:
        if not is_valid_root(self.topic_root):
            raise ConfigError(
                f"--topic-root {self.topic_root!r} is not a plain topic: use letters, digits and "
                "'_.:-' in levels separated by '/', without wildcards, '$' or empty levels"
            )
        if not 1 <= self.heartbeat_interval_s <= 86_400:
            raise ConfigError(
                f"--heartbeat-interval {self.heartbeat_interval_s} is out of range: "
                "give whole seconds from 1 to 86400"
            )
        if self.offline_after_s is not None and not 0 < self.offline_after_s <= 3 * 86_400:
            raise ConfigError(
                f"--offline-after {self.offline_after_s} is out of range: "
                "give seconds above 0 and at most 259200"
            )
        if self.mqtt_version not in ("5", "3.1.1"):
            raise ConfigError(f"--mqtt-version {self.mqtt_version!r} is not 5 or 3.1.1")
        if self.puback not in ("receipt", "applied"):
            raise ConfigError(f"--puback {self.puback[:64]!r} is not receipt or applied")
        if not 5 <= self.keepalive_s <= 65_535:
            raise ConfigError(
                f"--keepalive {self.keepalive_s} is out of range: give whole seconds from 5 to "
                "65535 (long enough that a backlog of messages cannot outrun the ping)"
            )
        if self.broker_tls is not None and not self.broker.embedded:
            raise ConfigError(f"--broker-tls is a listener of the embedded broker, but --broker "
                              f"is {self.broker.describe()}: drop --broker-tls, or configure "
                              "TLS on that broker")
        if self.broker_ws is not None and not self.broker.embedded:
            raise ConfigError(f"--broker-ws is a listener of the embedded broker, but --broker "
                              f"is {self.broker.describe()}: drop --broker-ws (or pass "
                              "--broker-ws off), or configure WebSockets on that broker")
        if not MIN_LEASE_S <= self.lease_s <= 3_600:
            raise ConfigError(
                f"--lease {self.lease_s:g} is out of range: give seconds from {MIN_LEASE_S:g} "
                "(the active stops acting 2 s before its lease can expire) to 3600")
        if self.advertise_url is not None:
            check_advertise_url(self.advertise_url)
        self._check_ports_distinct()
        if self.client_id is not None and not self.client_id.startswith(CLIENT_ID_PREFIX):
            raise ConfigError(
                f"--client-id {self.client_id!r} must begin with {CLIENT_ID_PREFIX!r}, "
                "which no node id can, so no device can take over the manager's session"
            )


    def _check_ports_distinct(self) -> None:
        """Two of fleetmq's own listeners on one port would fail deep inside amqtt or aiohttp,
        after the port checks (each port is free until the other binds it)."""
        own = [("--http", self.http.host, self.http.port)]
        if self.broker.embedded:
            own.append(("--broker", self.broker.host, self.broker.port))
        if self.broker_tls is not None:
            own.append(("--broker-tls", self.broker_tls.host, self.broker_tls.port))
        if self.broker_ws is not None:
            own.append(("--broker-ws", self.broker_ws.host, self.broker_ws.port))
        for i, (option, host, port) in enumerate(own):
            for other, other_host, other_port in own[:i]:
                if port != 0 and port == other_port and (
                        host == other_host or "0.0.0.0" in (host, other_host)
                        or "::" in (host, other_host)):
                    raise ConfigError(f"{option} and {other} both ask for port {port}: give "
                                      f"{option} another port")


def parse_broker(text: str, *, ca_file: str | None = None, cert_file: str | None = None,
                 key_file: str | None = None) -> BrokerSettings:
    """``embedded``, ``embedded://HOST:PORT``, ``mqtt://[user:pass@]host[:port]``, ``mqtts://``;
    the TLS files (``--broker-ca``, ``--broker-cert``, ``--broker-key``) go with mqtts:// only."""
    tls_files = {"--broker-ca": ca_file, "--broker-cert": cert_file, "--broker-key": key_file}
    given = [option for option, path in tls_files.items() if path]
    if given and urlsplit(text).scheme != "mqtts":
        scheme = urlsplit(text).scheme or text
        raise ConfigError(f"{given[0]} is for an mqtts:// broker, not {scheme}: use --broker "
                          f"mqtts://host:port, or drop {given[0]}")
    if bool(cert_file) != bool(key_file):
        raise ConfigError("--broker-cert and --broker-key go together: give both")
    if text == "embedded":
        return BrokerSettings()
    parts = urlsplit(text)
    scheme = parts.scheme
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ConfigError(
            f"--broker {text!r} is not a broker URL: use embedded, embedded://HOST:PORT, "
            "mqtt://[user:pass@]host:port or mqtts://[user:pass@]host:port"
        )
    try:
        port = DEFAULT_PORTS[scheme] if parts.port is None else parts.port
    except ValueError as exc:
        port = 0
        cause: Exception | None = exc
    else:
        cause = None
    if not 1 <= port <= 65535:
        raise ConfigError(f"--broker {text!r} has an invalid port: give 1 to 65535") from cause
    if scheme == "embedded" and (parts.username or parts.password):
        raise ConfigError("--broker embedded://... takes no user or password")
    return BrokerSettings(
        scheme=scheme,  # type: ignore[arg-type]  # checked against DEFAULT_PORTS above
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ca_file=ca_file or None,
        cert_file=cert_file or None,
        key_file=key_file or None,
    )


def parse_broker_tls(text: str | None, cert_file: str | None,
                     key_file: str | None) -> BrokerTlsSettings | None:
    """``--broker-tls HOST:PORT`` with ``--broker-tls-cert`` and ``--broker-tls-key``."""
    if not text:
        if cert_file or key_file:
            raise ConfigError("--broker-tls-cert and --broker-tls-key need --broker-tls HOST:PORT "
                              "(the embedded broker's TLS listener, e.g. 127.0.0.1:8883)")
        return None
    host, port = parse_hostport(text, "--broker-tls")
    if not cert_file or not key_file:
        raise ConfigError("--broker-tls needs --broker-tls-cert and --broker-tls-key: "
                          "the listener's certificate and key files")
    if port == 0:
        raise ConfigError("--broker-tls needs a port from 1 to 65535 (e.g. 127.0.0.1:8883)")
    return BrokerTlsSettings(host, port, cert_file, key_file)


WS_DEFAULT = "127.0.0.1:9001"
WS_OFF = ("off", "none", "false", "no")


def parse_broker_ws(text: str | None, broker: BrokerSettings) -> BrokerWsSettings | None:
    """``--broker-ws HOST:PORT`` or ``off``; not given: 127.0.0.1:9001 with the embedded
    broker, none with another (whose own WebSocket listener, if any, is its business)."""
    if text is None or not text.strip():
        if not broker.embedded:
            return None
        text = WS_DEFAULT
    if text.strip().lower() in WS_OFF:
        return None
    try:
        host, port = parse_hostport(text, "--broker-ws")
    except ConfigError:
        raise ConfigError(f"--broker-ws {text!r} is not HOST:PORT (for example "
                          f"{WS_DEFAULT}) or off") from None
    if port == 0:
        raise ConfigError("--broker-ws needs a port from 1 to 65535 (e.g. 127.0.0.1:9001), "
                          "or off")
    return BrokerWsSettings(host, port)


def parse_hostport(text: str, option: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``:PORT`` (all interfaces) or ``[v6]:PORT``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{option} {text!r} is not HOST:PORT (for example 127.0.0.1:8080)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)

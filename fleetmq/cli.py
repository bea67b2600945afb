"""The command line: argv and ``FLEETMQ_*`` variables -> ``Settings`` -> run.

Flags win over the environment, which wins over defaults. Only the CLI configures logging.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from fleetmq import __version__
from fleetmq.aio import wait_first
from fleetmq.app import FleetService
from fleetmq.config import (
    DEFAULT_STORE,
    AuthSettings,
    HttpSettings,
    Settings,
    parse_broker,
    parse_broker_tls,
    parse_broker_ws,
    parse_hostport,
    parse_store,
)
from fleetmq.errors import ConfigError, FleetmqError, StoreError
from fleetmq.http.cors import check_origin
from fleetmq.http.server import HttpServer
from fleetmq.http.waiting import WaitingApi

log = logging.getLogger("fleetmq")

LOG_LEVELS = ("debug", "info", "warning", "error")
COMMAND_MODULES: tuple[str, ...] = ("nodes", "agent", "simulate", "keys", "credentials")
"""Commands besides ``serve``: modules of ``fleetmq.commands``, each with
``add_command(subparsers, env)`` that adds its parser and sets ``run=<fn(args) -> int>``."""


def _int(option: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{option} {text!r} is not a whole number") from None
    return parse


def _float(option: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{option} {text!r} is not a number of seconds") from None
    return parse


# option, default, help; the environment variable is FLEETMQ_<OPTION>.
SERVE_OPTIONS: tuple[tuple[str, str | None, str], ...] = (
    ("--broker", "embedded",
     "embedded, embedded://HOST:PORT, mqtt://[user:pass@]host:port or mqtts://... "
     "(default: embedded, an amqtt broker on 127.0.0.1:1883)"),
    ("--http", "127.0.0.1:8080", "HOST:PORT of the REST API (default: 127.0.0.1:8080)"),
    ("--store", DEFAULT_STORE,
     "where the fleet survives restarts: sqlite:///PATH (four slashes for an absolute path), "
     "postgresql://user@host/db (needs fleetmq[postgres]) or memory:// (nothing kept) "
     f"(default: {DEFAULT_STORE}, in the working directory)"),
    ("--flush-interval", "1",
     "seconds heartbeats (last_seen, telemetry) may wait before they are written to the store "
     "(default: 1)"),
    ("--history-days", "30", "days of status history kept per node (default: 30)"),
    ("--topic-root", "fleet", "first MQTT topic level (default: fleet)"),
    ("--heartbeat-interval", "60",
     "heartbeat interval in seconds of nodes that declare none (default: 60)"),
    ("--offline-after", None,
     "timeout in seconds of nodes that declare no interval (default: 3 x --heartbeat-interval)"),
    ("--client-id", None, "the manager's MQTT client id, beginning with _fleetmq "
                          "(default: _fleetmq-<topic root>)"),
    ("--keepalive", "60", "MQTT keepalive in seconds (default: 60)"),
    ("--mqtt-version", "5", "5 (falls back to 3.1.1 if refused) or 3.1.1, which ignores MQTT 5 "
                            "response topics (default: 5)"),
    ("--puback", "receipt",
     "when a QoS 1 message is acknowledged: receipt (fastest) or applied (nothing acknowledged "
     "is lost if the manager dies, at about a third of the ingest rate) (default: receipt)"),
    ("--lease", "10",
     "seconds of the active manager's lease on a PostgreSQL store: managers sharing one store "
     "are one active and standbys, and a paused or cut-off active is replaced after this "
     "(at least 4; default: 10)"),
    ("--advertise-url", None,
     "the http(s) URL clients use to reach this manager: standbys name the active's in their "
     "503 answers (default: none)"),
    ("--log-level", "info", "debug, info, warning or error (default: info)"),
    ("--loop", "auto",
     "the event loop: auto (uvloop when installed, with fleetmq[fast]; else asyncio's own), "
     "uvloop or asyncio (default: auto)"),
    ("--auth", "auto",
     "auto (on once the store has held an admin key), on (refuse to start without one) or off "
     "(loopback listeners only unless given on purpose) (default: auto)"),
    ("--admin-token-file", None,
     "a file holding an admin token to adopt; if missing, one is created and written there "
     "(mode 0600)"),
    ("--broker-auth", "none",
     "how an external broker checks logins: dynsec (mirror credentials into Mosquitto's dynamic "
     "security plugin), external (the broker calls fleetmq's HTTP hooks, or its operator "
     "configured it) or none (default: none)"),
    ("--broker-admin", None,
     "dynsec: mqtt://admin:pass@127.0.0.1:port (loopback) or mqtts://... of the plugin's admin"),
    ("--broker-ca", None, "mqtts://: the CA file that signed the broker's certificate"),
    ("--broker-cert", None, "mqtts://: a client certificate file, for brokers that ask for one"),
    ("--broker-key", None, "mqtts://: the client certificate's key file"),
    ("--broker-tls", None,
     "HOST:PORT of a TLS listener of the embedded broker, beside its TCP one (default: none)"),
    ("--broker-tls-cert", None, "the embedded broker's TLS certificate file (PEM)"),
    ("--broker-tls-key", None, "the embedded broker's TLS key file (PEM, unencrypted)"),
    ("--broker-ws", None,
     "HOST:PORT of the embedded broker's MQTT over WebSockets listener (browser dashboards "
     "with MQTT.js), with the same logins and topic rules as its TCP one, or off "
     "(default: 127.0.0.1:9001 with the embedded broker)"),
    ("--http-tls-cert", None, "serve HTTPS with this certificate file (with --http-tls-key)"),
    ("--http-tls-key", None, "the HTTPS certificate's key file"),
    ("--metrics-public", "false", "true: /metrics without a token (default: false)"),
    ("--trusted-proxy", "",
     "comma-separated CIDRs of proxies whose X-Forwarded-For gives the client address"),
    ("--audit-days", "365", "days the audit log is kept (default: 365)"),
    ("--node-rate", "5", "register and heartbeat messages per second per node (default: 5)"),
    ("--node-burst", "20", "burst of --node-rate (default: 20)"),
    ("--key-rate", "1000", "requests and messages per second per API key (default: 1000)"),
    ("--key-burst", "2000", "burst of --key-rate (default: 2000)"),
)


def env_name(option: str, prefix: str = "FLEETMQ_") -> str:
    return prefix + option.lstrip("-").replace("-", "_").upper()


def add_options(parser: argparse.ArgumentParser,
                options: Sequence[tuple[str, str | None, str]], env: Mapping[str, str],
                prefix: str = "FLEETMQ_", flags_only: Sequence[str] = ()) -> None:
    """Add ``(option, default, help)`` options whose defaults come from the environment
    (``<prefix><OPTION>``), so that flags win over the environment, which wins over defaults.
    Options in ``flags_only`` default to None: their command resolves the environment itself."""
    for option, default, text in options:
        var = env_name(option, prefix)
        value = None if option in flags_only else env.get(var, default)
        parser.add_argument(option, default=value, help=f"{text} [env: {var}]")


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetmq", description="MQTT-native fleet manager for edge agents.")
    parser.add_argument("--version", action="version", version=f"fleetmq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the manager (registry, MQTT ingest, status publishing, REST API)",
        description="Run the fleet manager. Every option can also be set with the environment "
                    "variable shown; flags win over the environment.")
    add_options(serve, SERVE_OPTIONS, env)
    serve.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                       help="a browser origin (scheme://host[:port]) that may call the REST API "
                            "and the watch stream; repeatable (default: none) "
                            "[env: FLEETMQ_CORS_ORIGIN, comma-separated]")
    serve.set_defaults(cors_origin_env=env.get("FLEETMQ_CORS_ORIGIN", ""))
    serve.set_defaults(run=run_serve)
    for name in COMMAND_MODULES:
        # Imported here, not at the top: command modules use this module's helpers.
        importlib.import_module(f"fleetmq.commands.{name}").add_command(commands, env)
    return parser


def _bool(option: str) -> Callable[[str], bool]:
    def parse(text: str) -> bool:
        value = text.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{option} {text!r} is not true or false")
    return parse


def _auth_settings(args: argparse.Namespace) -> AuthSettings:
    admin = parse_broker(args.broker_admin) if args.broker_admin else None
    return AuthSettings(
        mode=args.auth.lower(),
        admin_token_file=args.admin_token_file or None,
        broker_auth=args.broker_auth.lower(),
        broker_admin=admin,
        metrics_public=_bool("--metrics-public")(args.metrics_public),
        trusted_proxies=tuple(p.strip() for p in args.trusted_proxy.split(",") if p.strip()),
        audit_days=_float("--audit-days")(args.audit_days),
        node_rate=_float("--node-rate")(args.node_rate),
        node_burst=_int("--node-burst")(args.node_burst),
        key_rate=_float("--key-rate")(args.key_rate),
        key_burst=_int("--key-burst")(args.key_burst),
    )


def settings_from(args: argparse.Namespace) -> Settings:
    host, port = parse_hostport(args.http, "--http")
    if args.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level {args.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    broker = parse_broker(args.broker, ca_file=args.broker_ca, cert_file=args.broker_cert,
                          key_file=args.broker_key)
    return Settings(
        broker=broker,
        broker_tls=parse_broker_tls(args.broker_tls, args.broker_tls_cert, args.broker_tls_key),
        broker_ws=parse_broker_ws(args.broker_ws, broker),
        http=HttpSettings(host=host, port=port, tls_cert=args.http_tls_cert or None,
                          tls_key=args.http_tls_key or None,
                          cors_origins=tuple(map(check_origin, args.cors_origin or [
                              o.strip() for o in args.cors_origin_env.split(",") if o.strip()]))),
        auth=_auth_settings(args),
        store=parse_store(args.store, _float("--flush-interval")(args.flush_interval),
                          _float("--history-days")(args.history_days)),
        topic_root=args.topic_root,
        heartbeat_interval_s=_int("--heartbeat-interval")(args.heartbeat_interval),
        offline_after_s=(_float("--offline-after")(args.offline_after)
                         if args.offline_after not in (None, "") else None),
        client_id=args.client_id or None,
        keepalive_s=_int("--keepalive")(args.keepalive),
        mqtt_version=args.mqtt_version,
        puback=args.puback,
        log_level=args.log_level.lower(),
        lease_s=_float("--lease")(args.lease),
        advertise_url=args.advertise_url or None,
    )


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


LOOPS = ("auto", "uvloop", "asyncio")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop ``--loop`` asks for: uvloop when installed (``auto``), asyncio's own
    otherwise or when asked."""
    choice = choice.strip().lower()
    if choice not in LOOPS:
        raise ConfigError(f"--loop {choice!r} is not one of {', '.join(LOOPS)}")
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("--loop uvloop: uvloop is not installed; install it with "
                              "pip install 'fleetmq[fast]' or pass --loop asyncio") from None
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = False
    restarts = 0
    async with contextlib.AsyncExitStack() as waiting:
        # Between a step-down and the start again as a standby (which may have to wait for
        # the store), a placeholder answers on the same port: /healthz 200, /readyz 503.
        placeholder = WaitingApi()
        while not stop.is_set():
            try:
                async with FleetService(settings, port_shared=started) as service:
                    await waiting.aclose()
                    if not started:  # the port really bound (0 asks for any): kept for good
                        settings = replace(settings, http=replace(settings.http,
                                                                  port=service.http_port))
                    started, restarts = True, 0
                    log.info("fleetmq_ready_to_serve version=%s http=%s:%d broker=%s root=%s "
                             "auth=%s loop=%s role=%s", __version__, settings.http.host,
                             service.http_port, settings.broker.describe(),
                             settings.topic_root, "on" if service.auth_enabled else "off",
                             loop_name(loop), service.role)
                    await wait_first(stop, service.deposed)
                    if not stop.is_set():
                        placeholder.reason = f"stepped down: {service.deposed_why}"
                        await waiting.enter_async_context(HttpServer(placeholder,
                                                                     settings.http))
                    log.info("fleetmq_stopping reason=%s", "signal" if stop.is_set()
                             else "deposed, starting again as a standby")
            except StoreError as exc:
                if not started:
                    raise  # the first start: the error, exit 1
                # A deposed manager's store may be what failed (PostgreSQL cut off): it keeps
                # trying as a standby rather than leave the pair one short.
                delay = min(RESTART_MAX_S, RESTART_FIRST_S * 2 ** min(restarts, 5))
                restarts += 1
                placeholder.reason = f"waiting for the store: {exc}"
                log.warning("standby_restart_failed error=%s retry_in_s=%g", exc, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
    log.info("fleetmq_stopped")




def run_serve(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    factory = loop_factory(args.loop)
    configure_logging(settings.log_level)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(settings))
    return 0


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args: Any = build_parser(os.environ if env is None else env).parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"fleetmq: error: {exc}", file=sys.stderr)  # noqa: T201 (the CLI talks to users)
        return 2
    except FleetmqError as exc:
        print(f"fleetmq: error: {exc}", file=sys.stderr)  # noqa: T201
        return 1


if __name__ == "__main__":
    sys.exit(main())

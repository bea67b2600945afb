"""``fleetmq agent``: run one edge agent from the command line until SIGINT or SIGTERM.

Each option has a ``FLEETMQ_AGENT_*`` environment variable; flags win. The command, not the
library, configures logging.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from collections.abc import Mapping
from typing import Any

from fleetmq.agent import DEFAULT_BROKER, Agent
from fleetmq.aio import wait_first
from fleetmq.cli import LOG_LEVELS, SERVE_OPTIONS, add_options, configure_logging, env_name
from fleetmq.errors import ConfigError

log = logging.getLogger("fleetmq.agent.cli")

# option, default, help; the environment variable is FLEETMQ_AGENT_<OPTION>.
AGENT_OPTIONS: tuple[tuple[str, str | None, str], ...] = (
    ("--node-id", None, "the node id, also the MQTT client id (required)"),
    ("--node-type", None, "the node type, e.g. microclaw, picclaw, nanoclaw (required)"),
    ("--broker", None, f"MQTT broker URL, mqtt://[user:pass@]host:port or mqtts://... "
                       f"(default: {DEFAULT_BROKER})"),
    ("--api", None, "use the REST API at this URL instead of MQTT, e.g. http://127.0.0.1:8080"),
    ("--interval", "60", "heartbeat interval in whole seconds (default: 60)"),
    ("--name", None, "a display name (default: the node id)"),
    ("--location", None, "where the node is, e.g. office-floor-2 (sent with every registration: "
                         "without it, a registration clears a location set earlier)"),
    ("--capabilities", None, "what the node can do, comma-separated, e.g. dht22,relay"),
    ("--metadata", None, "a JSON object of flat values, e.g. '{\"fw\": \"1.4.2\"}'"),
    ("--topic-root", "fleet", "first MQTT topic level (default: fleet)"),
    ("--log-level", "info", "debug, info, warning or error (default: info)"),
    ("--token", None, "the node's token (fmq_node_...): its MQTT password (username and client "
                      "id: the node id) and its REST bearer token"),
    ("--token-file", None, "a file that holds the node's token; with --enroll-key, where the "
                           "enrolled token is kept (mode 0600)"),
    ("--enroll-key", None, "an enroll key (fmq_enr_...): if --token-file holds no token, enroll "
                           "at the manager and keep the token there"),
    ("--enroll-api", None, "the manager's REST URL to enroll at, for MQTT agents "
                           "(default: --api)"),
    ("--api-ca", None, "https:// API: the CA file that signed the manager's certificate "
                       "(default: the system's CAs)"),
)
TLS_CLIENT_OPTIONS: tuple[tuple[str, str | None, str], ...] = tuple(
    option for option in SERVE_OPTIONS
    if option[0] in ("--broker-ca", "--broker-cert", "--broker-key"))
"""``--broker-ca``, ``--broker-cert``, ``--broker-key``: as ``serve`` has them."""


ENV_PREFIX = "FLEETMQ_AGENT_"


def agent_env_name(option: str) -> str:
    return env_name(option, ENV_PREFIX)


def add_command(subparsers: Any, env: Mapping[str, str]) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "agent", help="run an edge agent: register, heartbeat, say goodbye on SIGTERM",
        description="Run one edge agent until SIGINT or SIGTERM, then publish its offline "
                    "(shutdown) message and exit 0. Every option can also be set with the "
                    "environment variable shown; flags win over the environment.")
    # --broker and --api come from flags first, so they are resolved in run_agent.
    add_options(parser, AGENT_OPTIONS + TLS_CLIENT_OPTIONS, env, ENV_PREFIX,
                flags_only=("--broker", "--api"))
    parser.set_defaults(run=run_agent, agent_env=dict(_transport_env(env)))


def _transport_env(env: Mapping[str, str]) -> dict[str, str]:
    return {key: env[key] for key in (agent_env_name("--broker"), agent_env_name("--api"))
            if env.get(key)}


def _transport(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(broker, api): flags win as a pair, so ``--broker`` overrides FLEETMQ_AGENT_API."""
    if args.broker and args.api:
        raise ConfigError("--broker and --api exclude each other: give one")
    if args.broker or args.api:
        return args.broker, args.api
    broker = args.agent_env.get(agent_env_name("--broker"))
    api = args.agent_env.get(agent_env_name("--api"))
    if broker and api:
        raise ConfigError("FLEETMQ_AGENT_BROKER and FLEETMQ_AGENT_API exclude each other: "
                          "set one")
    return broker, api


def _required(args: argparse.Namespace, option: str) -> str:
    value: str | None = getattr(args, option.lstrip("-").replace("-", "_"))
    if not value:
        raise ConfigError(f"{option} is required (or set {agent_env_name(option)})")
    return value


def agent_from(args: argparse.Namespace) -> Agent:
    if args.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level {args.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    try:
        interval = float(args.interval)
    except ValueError:
        raise ConfigError(f"--interval {args.interval!r} is not a number of seconds") from None
    broker, api = _transport(args)
    return Agent(_required(args, "--node-id"), _required(args, "--node-type"),
                 broker=broker, api=api, interval_s=interval, topic_root=args.topic_root,
                 name=args.name or None, location=args.location or None,
                 capabilities=_capabilities(args.capabilities),
                 metadata=_metadata(args.metadata),
                 token=args.token or None, token_file=args.token_file or None,
                 enroll_key=args.enroll_key or None, enroll_api=args.enroll_api or None,
                 ca_file=args.broker_ca or None, cert_file=args.broker_cert or None,
                 key_file=args.broker_key or None, api_ca_file=args.api_ca or None)


def _capabilities(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def _metadata(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--metadata is not JSON ({exc}): give an object such as "
                          '\'{"fw": "1.4.2"}\'') from None
    if not isinstance(value, dict):
        raise ConfigError("--metadata must be a JSON object such as '{\"fw\": \"1.4.2\"}'")
    return value


async def run_until_signalled(agent: Agent) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with agent:
        await wait_first(stop, agent.ended)
        if agent.error is not None:
            raise agent.error  # the CLI prints it in one line and exits 1
        log.info("agent_stopping node_id=%s", agent.node_id)




def run_agent(args: argparse.Namespace) -> int:
    agent = agent_from(args)
    configure_logging(args.log_level.lower())
    asyncio.run(run_until_signalled(agent))
    return 0

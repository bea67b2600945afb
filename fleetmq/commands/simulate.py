"""``fleetmq simulate``: a fleet of virtual nodes against a broker, for load and demos.

Options come from flags, then ``FLEETMQ_SIM_*`` variables, then defaults. A progress line goes
to stderr while it runs, the summary table to stdout at the end. The engine is
``fleetmq.agent.simulator``; this module only parses, reports and handles signals.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import urlsplit

from fleetmq.agent.credentials import (
    Credentials,
    probe_writable,
    read_tokens_file,
    write_tokens_file,
)
from fleetmq.agent.enroll import enroll_many
from fleetmq.agent.simulator import SimSettings, SimStats, Simulator
from fleetmq.cli import LOG_LEVELS, add_options, configure_logging
from fleetmq.commands.agent import TLS_CLIENT_OPTIONS
from fleetmq.config import parse_broker
from fleetmq.errors import ConfigError
from fleetmq.tls import API_OPTIONS, client_context

log = logging.getLogger("fleetmq.simulate")

DEFAULT_CONNECTIONS = 100
PROGRESS_TTY_S = 0.5
PROGRESS_PIPE_S = 5.0

# option, default, help; the environment variable is FLEETMQ_SIM_<OPTION>.
SIM_OPTIONS: tuple[tuple[str, str | None, str], ...] = (
    ("--nodes", "1000", "number of virtual nodes, ids sim-000001 ... (default: 1000)"),
    ("--interval", "60", "heartbeat interval of every node, whole seconds (default: 60)"),
    ("--connections", None,
     f"MQTT connections the nodes share (default: min(nodes, {DEFAULT_CONNECTIONS})); equal to "
     "--nodes gives each node its own connection, client id and last will"),
    ("--broker", "mqtt://127.0.0.1:1883",
     "mqtt://[user:pass@]host:port or mqtts://... (default: mqtt://127.0.0.1:1883)"),
    ("--duration", None, "stop after this many seconds (default: at Ctrl-C or SIGTERM)"),
    ("--kill-fraction", "0",
     "share of connections to drop abruptly at mid-run (half of --duration, else after two "
     "intervals), so the broker fires their wills (default: 0)"),
    ("--topic-root", "fleet", "first MQTT topic level (default: fleet)"),
    ("--node-type", "simulated", "node_type the nodes register with (default: simulated)"),
    ("--log-level", "warning", "debug, info, warning or error (default: warning)"),
    ("--token", None, "with --nodes 1: the node token of sim-000001 (its MQTT password)"),
    ("--enroll-key", None,
     "an enroll key (fmq_enr_...): enroll every node at --api first, a few at a time, and log "
     "each in with its own token (one connection per node)"),
    ("--token-file", None,
     "with --enroll-key: keep the nodes' tokens in this file (`<node id> <token>` lines, mode "
     "0600) and reuse them on the next run (default: in memory only)"),
    ("--api", "http://127.0.0.1:8080",
     "the manager's REST URL, for --enroll-key (default: http://127.0.0.1:8080)"),
    ("--api-ca", None, "https:// --api: the CA file that signed the manager's certificate"),
)


ENV_PREFIX = "FLEETMQ_SIM_"


def add_command(subparsers: Any, env: Mapping[str, str]) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "simulate", help="simulate a fleet of nodes that register and heartbeat over MQTT",
        description="Simulate N nodes that register, then heartbeat every interval (spread "
                    "evenly over it) over K shared MQTT connections, until --duration is over "
                    "or Ctrl-C/SIGTERM; then print a summary. Every option can also be set "
                    "with the environment variable shown; flags win over the environment.")
    add_options(parser, SIM_OPTIONS + TLS_CLIENT_OPTIONS, env, ENV_PREFIX)
    parser.set_defaults(run=run_simulate)


def _number(option: str, text: str, kind: type[int] | type[float]) -> Any:
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{option} {text!r} is not {what}") from None


def settings_from(args: argparse.Namespace) -> SimSettings:
    if args.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level {args.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    nodes: int = _number("--nodes", args.nodes, int)
    logins = bool(args.token or args.enroll_key)  # a login per node: a connection per node
    connections = (_number("--connections", args.connections, int)
                   if args.connections not in (None, "")
                   else nodes if logins else min(nodes, DEFAULT_CONNECTIONS))
    return SimSettings(
        nodes=nodes,
        interval_s=_number("--interval", args.interval, int),
        connections=connections,
        broker=parse_broker(args.broker, ca_file=args.broker_ca, cert_file=args.broker_cert,
                            key_file=args.broker_key),
        duration_s=(_number("--duration", args.duration, float)
                    if args.duration not in (None, "") else None),
        kill_fraction=_number("--kill-fraction", args.kill_fraction, float),
        topic_root=args.topic_root,
        node_type=args.node_type,
    )


@dataclass(frozen=True, slots=True)
class SimLogins:
    """How the simulated nodes log in: none, one given token, or enrolled tokens."""

    token: str | None = None
    enroll_key: str | None = None
    token_file: str | None = None
    api: str = "http://127.0.0.1:8080"
    api_ca: str | None = None

    def check(self, settings: SimSettings) -> None:
        Credentials(token=self.token, enroll_key=self.enroll_key, enroll_api=self.api).check()
        if self.token is not None and settings.nodes != 1:
            raise ConfigError("--token is one node's token: it works with --nodes 1 only; give "
                              "--enroll-key to enroll every simulated node")
        if self.token_file is not None and self.enroll_key is None:
            raise ConfigError("--token-file keeps enrolled tokens: it needs --enroll-key")
        if self.api_ca is not None and urlsplit(self.api).scheme != "https":
            raise ConfigError("--api-ca is for an https:// --api: give --api https://host:port, "
                              "or drop --api-ca")
        if self.token_file is not None:
            read_tokens_file(self.token_file)  # a malformed file fails now, not after enrolling
            probe_writable(self.token_file)


def logins_from(args: argparse.Namespace) -> SimLogins:
    return SimLogins(token=args.token or None, enroll_key=args.enroll_key or None,
                     token_file=args.token_file or None, api=args.api,
                     api_ca=args.api_ca or None)


async def node_tokens(settings: SimSettings, logins: SimLogins,
                      stop: asyncio.Event) -> dict[str, str] | None:
    """node id -> token for every simulated node (enrolling those without one); None if
    stopped meanwhile."""
    if logins.token is not None:
        return {settings.node_id(0): logins.token}
    if logins.enroll_key is None:
        return {}
    kept = read_tokens_file(logins.token_file) if logins.token_file is not None else {}
    bodies = [{"node_id": node_id, "node_type": settings.node_type,
               "capabilities": ["simulated"], "heartbeat_interval_seconds": settings.interval_s}
              for node_id in map(settings.node_id, range(settings.nodes)) if node_id not in kept]
    if not bodies:
        return kept
    log.warning("simulator_enrolling nodes=%d api=%s", len(bodies), logins.api)
    https = urlsplit(logins.api).scheme == "https"
    tls = client_context(logins.api_ca, None, None, API_OPTIONS) if https else None
    enrolled = await enroll_many(logins.api, logins.enroll_key, bodies, tls, stop)
    if enrolled is None:
        return None
    tokens = {**kept, **enrolled}
    if logins.token_file is not None:
        write_tokens_file(logins.token_file, tokens)
    return tokens


class Progress:
    """The live line on stderr: rewritten in place on a terminal, a line now and then else."""

    def __init__(self, sim: Simulator, stream: TextIO) -> None:
        self._sim = sim
        self._stream = stream
        self._tty = stream.isatty()
        self._last = (0.0, 0)

    @property
    def period_s(self) -> float:
        return PROGRESS_TTY_S if self._tty else PROGRESS_PIPE_S

    def line(self) -> str:
        stats, elapsed = self._sim.stats, self._sim.elapsed_s()
        then, sent_then = self._last
        rate = (stats.sent - sent_then) / (elapsed - then) if elapsed > then else 0.0
        self._last = (elapsed, stats.sent)
        return (f"elapsed {elapsed:6.1f}s  sent {stats.sent:,}  rate {rate:,.0f}/s  "
                f"errors {stats.errors:,}  reconnects {stats.reconnects:,}  "
                f"404s {stats.not_found:,}  connected {stats.connected:,}/"
                f"{self._sim.settings.connections:,}")

    def show(self) -> None:
        if self._tty:
            self._stream.write("\r" + self.line() + "\x1b[K")
        else:
            self._stream.write(self.line() + "\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()

    async def run(self, done: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.wait_for(done.wait(), self.period_s)
            except TimeoutError:
                self.show()
            else:
                return


def summary(settings: SimSettings, stats: SimStats, elapsed_s: float) -> str:
    rate = stats.sent / elapsed_s if elapsed_s > 0 else 0.0
    rows = [
        ("nodes", f"{settings.nodes:,}"),
        ("connections", f"{settings.connections:,}"),
        ("interval", f"{settings.interval_s} s"),
        ("duration", f"{elapsed_s:.1f} s"),
        ("messages sent", f"{stats.sent:,}"),
        ("average rate", f"{rate:,.1f}/s (target {settings.nodes / settings.interval_s:,.1f}/s)"),
        ("errors", f"{stats.errors:,}"),
        ("reconnects", f"{stats.reconnects:,}"),
        ("404s seen", f"{stats.not_found:,}"),
        ("killed connections", f"{stats.killed:,}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows) + "\n"


async def simulate(settings: SimSettings, out: TextIO, err: TextIO,
                   logins: SimLogins | None = None) -> SimStats:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    done = asyncio.Event()
    tokens = await node_tokens(settings, logins or SimLogins(), stop)
    if tokens is None:
        return SimStats()  # stopped while enrolling
    async with Simulator(settings, tokens) as sim:
        progress = Progress(sim, err)
        # Not a TaskGroup: it would wrap a BrokerError from run() in an ExceptionGroup.
        reporter = asyncio.create_task(progress.run(done))
        try:
            await sim.run(stop)
        finally:
            done.set()
            await reporter
            progress.finish()
        elapsed = sim.elapsed_s()
    out.write(summary(settings, sim.stats, elapsed))
    out.flush()
    return sim.stats


def run_simulate(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    logins = logins_from(args)
    logins.check(settings)
    configure_logging(args.log_level.lower())
    asyncio.run(simulate(settings, sys.stdout, sys.stderr, logins))
    return 0

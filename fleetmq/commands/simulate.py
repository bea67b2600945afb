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
from typing import Any, TextIO

from fleetmq.agent.simulator import SimSettings, SimStats, Simulator
from fleetmq.cli import LOG_LEVELS, add_options, configure_logging
from fleetmq.config import parse_broker
from fleetmq.errors import ConfigError

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
)


ENV_PREFIX = "FLEETMQ_SIM_"


def add_command(subparsers: Any, env: Mapping[str, str]) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "simulate", help="simulate a fleet of nodes that register and heartbeat over MQTT",
        description="Simulate N nodes that register, then heartbeat every interval (spread "
                    "evenly over it) over K shared MQTT connections, until --duration is over "
                    "or Ctrl-C/SIGTERM; then print a summary. Every option can also be set "
                    "with the environment variable shown; flags win over the environment.")
    add_options(parser, SIM_OPTIONS, env, ENV_PREFIX)
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
    connections = (_number("--connections", args.connections, int)
                   if args.connections not in (None, "") else min(nodes, DEFAULT_CONNECTIONS))
    return SimSettings(
        nodes=nodes,
        interval_s=_number("--interval", args.interval, int),
        connections=connections,
        broker=parse_broker(args.broker),
        duration_s=(_number("--duration", args.duration, float)
                    if args.duration not in (None, "") else None),
        kill_fraction=_number("--kill-fraction", args.kill_fraction, float),
        topic_root=args.topic_root,
        node_type=args.node_type,
    )


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


async def simulate(settings: SimSettings, out: TextIO, err: TextIO) -> SimStats:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    done = asyncio.Event()
    async with Simulator(settings) as sim:
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
    configure_logging(args.log_level.lower())
    asyncio.run(simulate(settings, sys.stdout, sys.stderr))
    return 0

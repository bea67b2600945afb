"""fleetmq: an MQTT-native fleet manager for edge agents.

Agents register and heartbeat over MQTT (or REST); fleetmq keeps the registry, detects silent
nodes by deadline, and publishes each node's state as a retained ``<root>/<id>/status`` message.
"""

from __future__ import annotations

__version__ = "0.1.0"

from fleetmq.app import FleetService
from fleetmq.config import (
    BrokerSettings,
    HttpSettings,
    Settings,
    StoreSettings,
    parse_broker,
    parse_store,
)
from fleetmq.core.clock import Clock, FakeClock, Instant, SystemClock
from fleetmq.core.registry import Registry
from fleetmq.errors import BrokerError, ConfigError, FleetmqError, StoreError

__all__ = [
    "BrokerError",
    "BrokerSettings",
    "Clock",
    "ConfigError",
    "FakeClock",
    "FleetService",
    "FleetmqError",
    "HttpSettings",
    "Instant",
    "Registry",
    "Settings",
    "StoreError",
    "StoreSettings",
    "SystemClock",
    "__version__",
    "parse_broker",
    "parse_store",
]

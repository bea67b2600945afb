"""The edge-agent library: ``async with Agent(node_id, node_type, ...) as agent``.

An agent registers with the fleetmq manager, heartbeats with its telemetry, registers again
when the manager answers 404, reconnects with backoff, and says goodbye on a clean exit; over
MQTT (with a last will, so a dead agent goes offline at once) or over REST (``api=``).
"""

from __future__ import annotations

from fleetmq.agent.agent import DEFAULT_BROKER, Agent
from fleetmq.agent.core import Telemetry

__all__ = ["DEFAULT_BROKER", "Agent", "Telemetry"]

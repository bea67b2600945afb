"""The edge-agent library: ``async with Agent(node_id, node_type, ...) as agent``.

An agent registers with the fleetmq manager, heartbeats with its telemetry, registers again
when the manager answers 404, reconnects with backoff, and says goodbye on a clean exit; over
MQTT (with a last will, so a dead agent goes offline at once) or over REST (``api=``); with a
node token or by enrollment where the fleet requires credentials, over TLS where asked
(docs/tls.md).
"""

from __future__ import annotations

from fleetmq.agent.agent import DEFAULT_BROKER, Agent
from fleetmq.agent.core import Telemetry
from fleetmq.agent.credentials import EnrollmentError

__all__ = ["DEFAULT_BROKER", "Agent", "EnrollmentError", "Telemetry"]

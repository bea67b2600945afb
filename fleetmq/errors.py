"""The exception tree of fleetmq: one root, one subclass per boundary.

Third-party errors are translated where that library is used (``raise ... from exc``), so
callers only ever catch these.
"""

from __future__ import annotations


class FleetmqError(Exception):
    """Root of every error fleetmq raises on purpose."""


class ConfigError(FleetmqError):
    """A setting is invalid: the message names the option, the value and the fix."""


class BrokerError(FleetmqError):
    """The MQTT broker (embedded or external) cannot be started or reached."""


class StoreError(FleetmqError):
    """The node store cannot be opened, is incompatible, or failed while running."""


class StoreDataError(StoreError):
    """The store refused a value (not an outage): retrying the same row cannot succeed."""


class FencedError(StoreError):
    """A write refused because another manager took the lease (contract section 10): this
    manager is no longer the active one and must step down, never retry."""

"""Durable node stores: SQLite (default), PostgreSQL (the ``postgres`` extra) and memory."""

from __future__ import annotations

from fleetmq.auth.store import AuthStore, MemoryAuthStore
from fleetmq.config import StoreSettings
from fleetmq.errors import StoreError
from fleetmq.store.base import SCHEMA_VERSION, Batch, HistoryEvent, Store, StoredEvent
from fleetmq.store.memory import MemoryStore
from fleetmq.store.sqlite import SqliteStore

__all__ = [
    "SCHEMA_VERSION",
    "Batch",
    "HistoryEvent",
    "MemoryStore",
    "SqliteStore",
    "Store",
    "StoredEvent",
    "make_auth_store",
    "make_store",
]


def make_store(settings: StoreSettings) -> Store:
    if settings.scheme == "memory":
        return MemoryStore()
    if settings.scheme == "sqlite":
        return SqliteStore(settings.location)
    try:
        # Imported only when asked for: asyncpg is an optional extra.
        from fleetmq.store.postgres import PostgresStore  # noqa: PLC0415
    except ImportError as exc:
        raise StoreError(
            f"--store {settings.describe()} needs the asyncpg package: "
            "pip install 'fleetmq[postgres]'") from exc
    return PostgresStore(settings.location, settings.describe())


def make_auth_store(settings: StoreSettings) -> AuthStore:
    """The access-control tables of the same store (no lock: the CLI shares them)."""
    if settings.scheme == "memory":
        return MemoryAuthStore()
    if settings.scheme == "sqlite":
        from fleetmq.store.auth_sqlite import SqliteAuthStore  # noqa: PLC0415
        return SqliteAuthStore(settings.location)
    try:
        from fleetmq.store.auth_postgres import PostgresAuthStore  # noqa: PLC0415
    except ImportError as exc:
        raise StoreError(
            f"--store {settings.describe()} needs the asyncpg package: "
            "pip install 'fleetmq[postgres]'") from exc
    return PostgresAuthStore(settings.location, settings.describe())

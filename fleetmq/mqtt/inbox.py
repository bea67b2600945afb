"""What the manager's link received and not yet handed over: a bounded queue, and the PUBACKs
that wait for the consumer when the link acknowledges after apply.

gmqtt calls ``on_message`` (or ``on_message_acked``) for every message on the event loop. Past
``INBOUND_BOUND`` messages the socket is not read (``pause_reading``), so a backlog stays in the
broker's queue for the persistent session; what gmqtt had read already (under 512 KiB) still
lands, and reading resumes once the queue has drained below half.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from operator import attrgetter
from typing import Any, NamedTuple

INBOUND_BOUND = 50_000
"""Messages received but not yet applied. Past it the socket is not read (backpressure)."""


class Inbound(NamedTuple):
    """One received message, as the ingest path needs it (a tuple: built for every message,
    where a frozen dataclass costs several times as much)."""

    topic: str
    payload: bytes | bytearray
    retain: bool
    received: float
    """Monotonic receipt time: expiry never runs ahead of messages still waiting."""
    response_topic: str | None = None
    correlation: bytes | None = None


_topic = attrgetter("topic")
_received = attrgetter("received")


class Inbox:
    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self.queue: deque[Inbound] = deque()
        self._acks: deque[asyncio.Future[int] | None] = deque()
        """With acknowledging after apply: beside each queued message, what releases its
        PUBACK."""
        self._taken: list[asyncio.Future[int] | None] = []
        self.paused = False
        self._waiting = False
        self._arrived = asyncio.Event()
        self.client: Any = None
        """The gmqtt client whose reading pauses and resumes."""

    def on_message(self, client: Any, topic: str, payload: bytes, _qos: int,
                   props: dict[str, Any]) -> int:
        response = props.get("response_topic")
        if response is None:
            inbound = Inbound(topic, payload, bool(props["retain"]), self._monotonic())
        else:
            correlation = props.get("correlation_data")
            inbound = Inbound(topic, payload, bool(props["retain"]), self._monotonic(),
                              response[0], correlation[0] if correlation else None)
        queue = self.queue
        queue.append(inbound)
        if self._waiting:
            self._waiting = False
            self._arrived.set()
        if len(queue) >= INBOUND_BOUND:
            self.paused = True
            client.pause_reading()  # each time: gmqtt's stream reader may have resumed it
        return 0

    async def on_message_acked(self, client: Any, topic: str, payload: bytes, qos: int,
                               props: dict[str, Any]) -> int:
        """gmqtt sends the PUBACK of a QoS 1 message with the code this returns, when it does."""
        if qos == 0:
            self._acks.append(None)
            return self.on_message(client, topic, payload, qos, props)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks.append(fut)
        self.on_message(client, topic, payload, qos, props)
        return await fut

    async def wait(self) -> None:
        if self._taken:
            self._release_taken()
        while not self.queue:
            self._arrived.clear()
            self._waiting = True
            await self._arrived.wait()

    def take(self, limit: int) -> list[Inbound]:
        queue = self.queue
        count = min(limit, len(queue))
        batch = [queue.popleft() for _ in range(count)]
        if self._taken:
            self._release_taken()
        if self._acks:
            acks = self._acks
            self._taken = [acks.popleft() for _ in range(min(count, len(acks)))]
        if self.paused and len(queue) < INBOUND_BOUND // 2:
            self.paused = False
            if self.client is not None:
                self.client.resume_reading()
        return batch

    def _release_taken(self) -> None:
        taken, self._taken = self._taken, []
        for fut in taken:
            if fut is not None and not fut.done():
                fut.set_result(0)

    def release_all(self) -> None:
        """The connection is gone: a PUBACK released now goes nowhere; let the tasks end."""
        for fut in [*self._taken, *self._acks]:
            if fut is not None and not fut.done():
                fut.set_result(0)
        self._taken.clear()
        self._acks.clear()

    def oldest(self) -> float | None:
        try:
            return self.queue[0].received
        except IndexError:
            return None

    def earliest_by_topic(self) -> dict[str, float]:
        """Each queued topic's earliest receipt time. Built on demand, in C (newest first, so
        the oldest message of a topic is written last and wins): a few milliseconds for a full
        queue, and nothing on the path of every message."""
        queue = self.queue
        return dict(zip(map(_topic, reversed(queue)), map(_received, reversed(queue)),
                        strict=True))

"""MQTT ingest: routes each received message by topic, validates it, and applies it.

Bad input is dropped, counted by reason and logged (rate-limited); when the topic's id is
valid the agent gets an error reply. Nothing here raises into the drain loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

from pydantic import ValidationError

from fleetmq.core.models import (
    BARE_HEARTBEAT,
    MAX_PAYLOAD_BYTES,
    RegisterRequest,
    Rejection,
    describe_error,
    node_conflict,
    node_not_registered,
    parse_heartbeat,
    quote,
    rate_limited,
    store_unavailable,
)
from fleetmq.core.registry import NodeConflictError, NodeNotFoundError, Waiting
from fleetmq.core.topics import Kind, Topics, is_valid_node_id
from fleetmq.errors import BrokerError
from fleetmq.fleet import Fleet
from fleetmq.metrics import Metrics, RateLimitedLog
from fleetmq.mqtt.link import Inbound, MqttLink
from fleetmq.mqtt.publisher import Publisher
from fleetmq.rates import RateLimitedError
from fleetmq.store.writer import StoreUnavailableError
from fleetmq.views import heartbeat_reply, register_reply

log = logging.getLogger(__name__)

BATCH = 256
COALESCE_S = 0.002
"""After a short batch, let messages gather this long before waiting again: the socket is read
as packets come, often one at a time, and a wake-up of this task per read would cost more than
the messages it applies, while 2 ms is nothing against a heartbeat's lag budget."""
IGNORED = "ignored"
"""``_take``'s outcome for a message that is not for ingest (counted apart from drops)."""
RECONCILE_QUIET_S = 0.5
RECONCILE_TIMEOUT_S = 30.0


class MqttIngest:
    def __init__(self, link: MqttLink, topics: Topics, fleet: Fleet, publisher: Publisher,
                 metrics: Metrics) -> None:
        self._link = link
        self._topics = topics
        self._fleet = fleet
        self._publisher = publisher
        self._metrics = metrics
        self._warn = RateLimitedLog(log)
        self._sync_token: bytes | None = None
        self._sync_seen = asyncio.Event()
        self._last_retained_at = 0.0
        self._stale_cleared = 0
        self.own_reply_only = False
        """Auth on (contract section 6): a Response Topic other than the sender's own reply
        topic is ignored and counted, and the answer goes to the sender's reply topic."""

    async def run(self) -> None:
        link = self._link
        while True:
            await link.wait_inbound()
            batch = link.take_inbound(BATCH)
            for msg in batch:
                try:
                    self.handle(msg)
                except Exception:
                    log.exception("ingest_failed topic=%s", msg.topic[:200])
            # Yield to REST and expiry between batches; after a short one, also let more gather.
            await asyncio.sleep(0 if len(batch) == BATCH else COALESCE_S)

    def handle(self, msg: Inbound) -> None:
        """Take one message. It is counted as received, then once more as applied, ignored or
        dropped by reason, whatever becomes of it (a failure included), so that received =
        applied + ignored + dropped at every scrape."""
        metrics = self._metrics
        metrics.mqtt_received += 1
        try:
            outcome = self._take(msg)
        except Exception:
            metrics.dropped["internal_error"] += 1
            raise
        if outcome is None:
            metrics.mqtt_applied += 1
        elif outcome == IGNORED:
            metrics.mqtt_ignored_topic += 1
        else:
            metrics.dropped[outcome] += 1

    def _take(self, msg: Inbound) -> str | None:
        """None when applied; else ``IGNORED`` or why it was dropped (``DROP_REASONS``)."""
        parsed = self._topics.parse(msg.topic)
        if parsed is None:
            # amqtt pushes retained messages beyond our own filters: route by our topics only.
            return IGNORED
        if parsed.kind is Kind.STATUS or parsed.kind is Kind.SYNC:
            self._reconcile(parsed.kind, parsed.node_id, msg)
            return IGNORED
        if msg.retain:
            return self._dropped("retained", msg, "retained message on an ingest topic is ignored")
        if not is_valid_node_id(parsed.node_id):
            return self._dropped("invalid_topic_id", msg, "topic id is not a valid node id")
        return self._apply(parsed.kind, parsed.node_id, msg)

    def _apply(self, kind: Kind, node_id: str, msg: Inbound) -> str | None:
        """A registration or heartbeat: None when applied, else why it was dropped (the node
        is answered on its reply topic)."""
        try:
            if len(msg.payload) > MAX_PAYLOAD_BYTES:
                raise Rejection(413, "Payload too large",
                                f"Payload of {len(msg.payload)} bytes is over the "
                                f"{MAX_PAYLOAD_BYTES} byte limit", "too_large")
            if kind is Kind.REGISTER:
                self._register(node_id, msg)
                return None
            return self._heartbeat(node_id, msg)
        except Rejection as rej:
            self._dropped(rej.reason, msg, rej.message)
            self._reply(node_id, msg, {"error": rej.title, "message": rej.message,
                                       "code": rej.code})
            return rej.reason
        except RateLimitedError as limited:
            if limited.answer:  # one 429 a second: a flood gets no flood of replies
                refusal = rate_limited(limited.retry_after_s)
                self._reply(node_id, msg, {"error": refusal.title, "message": refusal.message,
                                           "code": refusal.code})
            return "rate_limited"

    def _register(self, node_id: str, msg: Inbound) -> None:
        try:
            req = RegisterRequest.model_validate_json(msg.payload)
        except ValidationError as exc:
            raise describe_error(exc) from None
        _check_id(node_id, req.node_id)
        try:
            result, now = self._fleet.register(node_id, req)
        except NodeConflictError as exc:
            raise node_conflict(exc.node_id, exc.existing_type) from None
        except StoreUnavailableError:
            raise store_unavailable() from None
        body = register_reply(node_id, created=result.created, at=now.wall)
        # The reply acknowledges the registration: it goes out once the store has it.
        self._fleet.writer.when_durable(lambda: self._reply(node_id, msg, body))

    def _heartbeat(self, node_id: str, msg: Inbound) -> str | None:
        """None when applied; else why it changed nothing on purpose (``late_will``)."""
        if msg.payload.strip():
            try:
                req = parse_heartbeat(msg.payload)
            except ValidationError as exc:
                raise describe_error(exc) from None
        else:
            req = BARE_HEARTBEAT
        _check_id(node_id, req.node_id)
        try:
            result, now = self._fleet.heartbeat(node_id, req)
        except NodeNotFoundError:
            raise node_not_registered() from None
        if result.ignored is not None:
            self._warn.warning(result.ignored, msg.received,
                               "offline_ignored node_id=%s reason=%s", node_id, result.ignored)
            return result.ignored
        # Accepted heartbeats are answered only where MQTT 5 asks, at a topic we may write to.
        if msg.response_topic is None:
            return None
        topic = self._answer_topic(node_id, msg.response_topic)
        if topic is not None:
            body = heartbeat_reply(result.node, now.wall)
            if result.events:  # a transition is acknowledged once stored
                self._fleet.writer.when_durable(
                    lambda: self._publisher.reply(topic, body, msg.correlation))
            else:
                self._publisher.reply(topic, body, msg.correlation)
        return None

    def _reply(self, node_id: str, msg: Inbound, body: dict[str, Any]) -> None:
        topic = None
        if msg.response_topic is not None:
            topic = self._answer_topic(node_id, msg.response_topic)
        self._publisher.reply(topic or self._topics.reply(node_id), body, msg.correlation)

    def _answer_topic(self, node_id: str, asked: str) -> str | None:
        """Where an answer to a request with that Response Topic goes; None where the topic
        must not be written to (the manager never writes where a device points it inside the
        fleet's namespace)."""
        if self.own_reply_only:
            own = self._topics.reply(node_id)
            if asked != own:
                self._metrics.response_topics_refused += 1
            return own
        return None if self._topics.is_foreign_reply_target(asked, node_id) else asked

    def _dropped(self, reason: str, msg: Inbound, detail: str) -> str:
        """Log a drop (rate-limited per reason); ``handle`` counts it."""
        self._warn.warning(reason, msg.received,
                           "mqtt_message_dropped reason=%s topic=%s detail=%s",
                           reason, msg.topic[:200], detail)
        return reason

    # --- reconciliation of retained statuses (contract §6) -------------------------------

    async def reconcile(self) -> None:
        """Clear retained statuses of nodes this manager does not know, then unsubscribe.

        Raises BrokerError when the connection fails meanwhile (the caller retries on the next
        connection).
        """
        token = secrets.token_hex(8).encode()
        clock = self._fleet.clock
        self._sync_token = token
        self._sync_seen.clear()
        self._stale_cleared = 0
        self._last_retained_at = clock.now().mono
        filters = [self._topics.status_filter, self._topics.sync]
        try:
            await self._link.subscribe(filters)
            if not self._link.publish(self._topics.sync, token, retain=False):
                raise BrokerError("the reconciliation sentinel could not be published")
            try:
                async with asyncio.timeout(RECONCILE_TIMEOUT_S):
                    await self._sync_seen.wait()
                    # The sentinel closes Mosquitto's retained burst; amqtt's may trail it, so
                    # also wait for a quiet period. A time condition, not an event (ASYNC110).
                    while (quiet := clock.now().mono - self._last_retained_at) < RECONCILE_QUIET_S:  # noqa: ASYNC110
                        await asyncio.sleep(RECONCILE_QUIET_S - quiet)
            except TimeoutError:
                log.warning("reconcile_incomplete reason=no sentinel within %ss",
                            RECONCILE_TIMEOUT_S)
        finally:
            self._sync_token = None
        await self._link.unsubscribe(filters)
        log.info("reconcile_finished stale_statuses_cleared=%d", self._stale_cleared)

    def _reconcile(self, kind: Kind, node_id: str, msg: Inbound) -> None:
        """A status or the sentinel: read only while reconciling (``handle`` counts it as
        ignored: it is the manager's own traffic, not a node's)."""
        if self._sync_token is None:
            return
        if kind is Kind.SYNC:
            if msg.payload == self._sync_token:
                self._sync_seen.set()
            return
        if not msg.retain:
            return  # a live status (our own, most likely): not part of the retained burst
        self._last_retained_at = msg.received
        if not msg.payload or not is_valid_node_id(node_id):
            return
        if self._fleet.registry.get(node_id) is None:
            log.debug("stale_status_cleared node_id=%s", node_id)
            self._stale_cleared += 1
            self._publisher.clear_status(node_id)


def _check_id(topic_id: str, payload_id: str | None) -> None:
    if payload_id is not None and payload_id != topic_id:
        raise Rejection(400, "Invalid field",
                        f"Field 'node_id' ({quote(payload_id)}) differs from the topic's id "
                        f"({quote(topic_id)})",
                        "id_mismatch")


def waiting_in(link: MqttLink, topics: Topics) -> Waiting | None:
    """What expiry must not run ahead of, as the link's queue stands now: whether a
    registration or heartbeat of a node, received at or before its deadline, is still queued.
    None when nothing is queued. The queue's topics are read once, at the first node due after
    the oldest queued message: a message that arrives later was received later (after the
    caller's limit), and one taken meanwhile has been applied."""
    oldest = link.oldest_pending()
    if oldest is None:
        return None
    earliest: dict[str, float] | None = None

    def waiting(node_id: str, deadline: float) -> bool:
        nonlocal earliest
        if deadline < oldest:
            return False
        if earliest is None:
            earliest = link.earliest_pending()
        heard = earliest.get(topics.heartbeat(node_id))
        if heard is None or heard > deadline:
            heard = earliest.get(topics.register(node_id))
        return heard is not None and heard <= deadline

    return waiting

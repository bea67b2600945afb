"""Enrollment: ``POST /api/v1/fleet/enroll`` with an enroll key as bearer and the register
body, answered 201 with the register answer plus ``"token"`` (contract section 8).

For one agent (``obtain_token``: the kept token, else enroll once and keep it) and for the
simulator's many nodes (``enroll_many``, a bounded number at a time). An unreachable or busy
manager is waited out with backoff; a refusal is final (``EnrollmentError``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import aiohttp

from fleetmq.agent.core import NETWORK_TIMEOUT_S, Backoff, sleep_unless_stopped
from fleetmq.agent.credentials import (
    Credentials,
    EnrollmentError,
    probe_writable,
    read_token_file,
    write_token_file,
)
from fleetmq.auth.tokens import token_kind
from fleetmq.errors import ConfigError

log = logging.getLogger(__name__)

ENROLL_PATH = "/api/v1/fleet/enroll"
RETRY_AFTER_MAX_S = 300.0
"""A 429's Retry-After is obeyed up to this; a larger value is not believed."""
_CONNECTION_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)


class EnrollmentUnavailable(Exception):
    """The manager did not answer, or asked to wait (5xx, 429): try again later."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


async def enroll(http: aiohttp.ClientSession, api: str, enroll_key: str,
                 body: dict[str, Any]) -> dict[str, Any]:
    """One enrollment request: the 201 answer (with ``token``), EnrollmentError for a refusal,
    EnrollmentUnavailable when it is worth trying again."""
    url = api.rstrip("/") + ENROLL_PATH
    node_id = body.get("node_id")
    try:
        async with http.post(url, json=body,
                             headers={"Authorization": f"Bearer {enroll_key}"}) as resp:
            status = resp.status
            retry_after = resp.headers.get("Retry-After")
            try:
                reply = await resp.json(content_type=None)
            except ValueError:
                reply = None
    except _CONNECTION_ERRORS as exc:
        raise EnrollmentUnavailable(f"{url}: {exc or type(exc).__name__}") from exc
    if status >= 500 or status == 429:
        raise EnrollmentUnavailable(f"{url} answered HTTP {status}", _seconds(retry_after))
    if not isinstance(reply, dict):
        reply = {}
    if status != 201:
        detail = reply.get("message") or reply.get("error") or "no explanation"
        hint = {401: "the enroll key is unknown, expired or revoked",
                403: "the enroll key does not allow this node (its uses, id pattern or type)",
                404: "no enrollment route there: is --enroll-api the fleetmq manager's URL?",
                409: "this node already has a credential: issue it a new one "
                     "(fleetmq credentials issue) and pass it as --token"}.get(status, "")
        raise EnrollmentError(f"enrollment of {node_id} refused by {url}: HTTP {status}: "
                              f"{detail}" + (f" ({hint})" if hint else ""))
    token = reply.get("token")
    if not isinstance(token, str) or token_kind(token) != "node":
        raise EnrollmentError(f"enrollment of {node_id} at {url} answered 201 without a node "
                              "token: is that a fleetmq manager?")
    return reply


async def enroll_with_retry(http: aiohttp.ClientSession, api: str, enroll_key: str,
                            body: dict[str, Any], stop: asyncio.Event) -> str | None:
    """Enroll, waiting out an unreachable or busy manager with backoff; the token, or None if
    ``stop`` was set first. EnrollmentError passes through."""
    backoff = Backoff()
    while not stop.is_set():
        try:
            reply = await enroll(http, api, enroll_key, body)
        except EnrollmentUnavailable as exc:
            delay = exc.retry_after_s if exc.retry_after_s is not None else backoff.next_delay()
            log.warning("agent_enroll_unavailable node_id=%s error=%s retry_in_s=%.2f",
                        body.get("node_id"), exc, delay)
            if await sleep_unless_stopped(stop, delay):
                return None
            continue
        token: str = reply["token"]
        return token
    return None


async def obtain_token(credentials: Credentials, body: dict[str, Any],
                       tls: ssl.SSLContext | None, stop: asyncio.Event) -> str | None:
    """The node token to use: given, kept in the token file, or enrolled for (and then kept).
    None without credentials, or if ``stop`` was set while waiting for the manager."""
    if credentials.token is not None:
        return credentials.token
    if credentials.token_file is not None:
        kept = read_token_file(credentials.token_file)
        if kept is not None:
            return kept
    if credentials.token_file is None and credentials.enroll_key is None:
        return None  # no credentials: a broker or manager without auth
    if credentials.enroll_key is None or credentials.enroll_api is None:
        # Checked at construction; a file emptied since then lands here.
        raise ConfigError(f"--token-file {credentials.token_file} holds no token: give "
                          "--enroll-key to enroll, or --token")
    node_id = body.get("node_id")
    if credentials.token_file is not None:
        # Before the key is spent: a token that cannot be kept would be lost at the next start,
        # and the node could not enroll again (its id would have a credential).
        probe_writable(credentials.token_file)
    log.info("agent_enrolling node_id=%s api=%s", node_id, credentials.enroll_api)
    timeout = aiohttp.ClientTimeout(total=NETWORK_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(ssl=tls or True)) as http:
        token = await enroll_with_retry(http, credentials.enroll_api, credentials.enroll_key,
                                        body, stop)
    if token is None:
        return None
    if credentials.token_file is not None:
        try:
            write_token_file(credentials.token_file, token)
        except ConfigError as exc:
            log.error("agent_token_not_kept node_id=%s error=%s (the token is used for this run "
                      "only: the node needs a new credential after a restart)", node_id, exc)
    log.info("agent_enrolled node_id=%s token_file=%s", node_id, credentials.token_file)
    return token


def _seconds(header: str | None) -> float | None:
    try:
        value = float(header) if header is not None else None
    except ValueError:
        return None
    if value is None or not 0 <= value <= RETRY_AFTER_MAX_S:
        return None
    return value


ENROLL_CONCURRENCY = 32
"""Enrollments in flight at once in ``enroll_many``: enough to enroll thousands of simulated
nodes in seconds, few enough not to trip a manager's enrollment rate limit in one burst."""


async def enroll_many(api: str, enroll_key: str, bodies: list[dict[str, Any]],
                      tls: ssl.SSLContext | None, stop: asyncio.Event,
                      concurrency: int = ENROLL_CONCURRENCY) -> dict[str, str] | None:
    """Enroll every body's node, ``concurrency`` at a time: node id -> token, or None if
    ``stop`` was set first. The first refusal for good (EnrollmentError) stops them all."""
    tokens: dict[str, str] = {}
    queue = list(reversed(bodies))
    timeout = aiohttp.ClientTimeout(total=NETWORK_TIMEOUT_S)
    connector = aiohttp.TCPConnector(ssl=tls or True, limit=concurrency)

    async def worker(http: aiohttp.ClientSession) -> None:
        while queue and not stop.is_set():
            body = queue.pop()
            token = await enroll_with_retry(http, api, enroll_key, body, stop)
            if token is not None:
                tokens[body["node_id"]] = token

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(concurrency, len(bodies))):
                    group.create_task(worker(http))
        except ExceptionGroup as failed:
            # One refusal (the key spent, say) ends the others; report it as itself.
            refused, rest = failed.split(EnrollmentError)
            raise (refused or rest or failed).exceptions[0] from None
    return None if stop.is_set() else tokens

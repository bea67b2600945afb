"""The REST facade (contract §4) over aiohttp: the same registry for HTTP-only agents and tools.

Writes go through ``Fleet`` like MQTT messages do; reads serve each node's cached JSON form.
Every error on every route is ``{"error", "message"}`` JSON with the right status.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute
from pydantic import ValidationError

from fleetmq.aio import wait_set
from fleetmq.config import HttpSettings
from fleetmq.core.models import (
    MAX_PAYLOAD_BYTES,
    STATUSES,
    RegisterRequest,
    Rejection,
    Status,
    describe_error,
    node_conflict,
    node_not_registered,
    parse_heartbeat,
    quote,
    rate_limited,
    require_node_id,
    store_unavailable,
)
from fleetmq.core.registry import Node, NodeConflictError, NodeNotFoundError, Registry
from fleetmq.core.topics import is_valid_node_id
from fleetmq.errors import StoreError
from fleetmq.fleet import Fleet
from fleetmq.http.access import AccessRoutes
from fleetmq.http.auth import RestAccess
from fleetmq.http.cors import Cors
from fleetmq.http.dashboard import Dashboard
from fleetmq.http.direct import RequestHandler, direct
from fleetmq.http.openapi import openapi_document
from fleetmq.http.pages import PageCache, PageKey, document
from fleetmq.http.params import JSON, error_response, json_response, path_id, whole
from fleetmq.http.watch import WatchHub
from fleetmq.metrics import CONTENT_TYPE, Metrics, Readings, exposition, render
from fleetmq.mqtt.link import MqttLink
from fleetmq.mqtt.publisher import Publisher
from fleetmq.rates import RateLimitedError
from fleetmq.store.writer import StoreUnavailableError, StoreWriter
from fleetmq.views import (
    dumps,
    event_document,
    heartbeat_reply,
    node_json,
    node_views,
    register_reply,
)

if TYPE_CHECKING:  # broker_hooks imports this module's responses
    from fleetmq.http.broker_hooks import BrokerHooks

log = logging.getLogger(__name__)

PREFIX = "/api/v1/fleet"
API_ROOT = "/api/"
STANDBY_MESSAGE = ("this manager is a standby: the active manager serves the API (contract "
                   "section 10); send requests to it, or through a load balancer that checks "
                   "/readyz")
DIRECT_PATHS = (f"{PREFIX}/register", f"{PREFIX}/heartbeat")
"""POST routes served without aiohttp's router and middleware chain (``direct``)."""
STREAM_CHUNK = 1000
"""Nodes serialized between two yields to the event loop."""
PAGE_CHUNK = 2000
"""Nodes of an unfiltered page read between two yields (most have their JSON cached)."""
STREAM_ABOVE = 10_000
"""Without ``limit``, answers of more nodes than this are streamed; smaller ones go out as one
body with a Content-Length (cheaper: no chunked framing, one write)."""
MAX_LIMIT = 10_000
EVENTS_DEFAULT_LIMIT = 100
EVENTS_MAX_LIMIT = 1000
DURABLE_TIMEOUT_S = 5.0
"""How long a registration or delete waits for its commit before answering 503."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def answer_error(request: web.Request, exc: Exception,
                 refused: Counter[tuple[int, str]]) -> web.StreamResponse | None:
    """The contract's JSON answer to what a handler raised; 429s counted in ``refused`` by
    reason. None: not an error to answer (a redirect, a client that left), raise it again."""
    if isinstance(exc, Rejection):
        return error_response(exc.code, exc.title, exc.message)
    if isinstance(exc, RateLimitedError):  # a node over its rate (contract section 8, "Limits")
        refused[(429, "node_rate")] += 1
        limited = rate_limited(exc.retry_after_s)
        return error_response(limited.code, limited.title, limited.message,
                              {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            return None
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        message = {
            404: f"No route for {request.method} {quote(request.path)}",
            405: f"Method {request.method} is not allowed here; allowed: "
                 f"{exc.headers.get('Allow', '')}",
            413: f"Request body is over the {MAX_PAYLOAD_BYTES} byte limit",
        }.get(exc.status, exc.text or exc.reason)
        return error_response(exc.status, exc.reason, message, headers)
    if isinstance(exc, ConnectionResetError):
        return None  # the client left: nobody to answer, nothing to log as an error
    # A bug must still answer in the contract's error shape, not aiohttp's text/plain 500.
    log.error("http_request_failed method=%s path=%s", request.method, quote(request.path),
              exc_info=exc)
    return error_response(500, "Internal server error",
                          "The request failed inside fleetmq; see the manager's log")


class RestApi:
    def __init__(self, fleet: Fleet, registry: Registry, links: tuple[MqttLink, ...],
                 publisher: Publisher, metrics: Metrics, settings: HttpSettings,
                 topic_root: str, access: RestAccess | None = None,
                 broker_hooks: BrokerHooks | None = None, watch: WatchHub | None = None
                 ) -> None:
        """``access``: the bearer-token gate and the access-control routes (None: neither);
        ``broker_hooks``: the HTTP auth hooks a broker calls; ``watch``: the watch stream's
        hub (None: a hub of this API's own, its fan-out run by whoever runs ``watch.run``)."""
        self._broker_hooks = broker_hooks
        self.watch = watch if watch is not None else WatchHub(
            fleet.writer, settings.watch_keepalive_s)
        if access is not None:
            self.watch.allowed = access.still_valid
        self._fleet = fleet
        self._access = access
        self._access_routes = None if access is None else AccessRoutes(
            access.auth, access, fleet, registry, self._body, self._durable,
            fleet.clock.monotonic)
        self._writer: StoreWriter = fleet.writer
        self._registry = registry
        self._links = links
        self._publisher = publisher
        self._metrics = metrics
        self._exposition = exposition(metrics, Readings(
            nodes=registry.count,
            connected=lambda: all(link.connected for link in links),
            backlog=lambda: publisher.backlog, store=fleet.writer))
        self._settings = settings
        self._topic_root = topic_root
        self._openapi = b""
        self._cors = Cors(settings.cors_origins) if settings.cors_origins else None
        self._pages = PageCache()
        """Answers of GET /nodes (whole fleet, pages, filters) as of the registry's version
        (dashboards poll them; each is rebuilt after any change)."""
        self.standby: Callable[[], bool] = lambda: False
        """True while this manager is a standby (contract section 10): ``/api/v1`` answers 503."""
        self.active_url: Callable[[], str | None] = lambda: None
        """A standby's view of the active's ``--advertise-url``."""
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        """Made by ``wait_idle`` (shutdown): until then a request only counts itself."""

    @web.middleware
    def _middleware(self, request: web.Request, handler: Handler
                    ) -> Awaitable[web.StreamResponse]:
        """The one middleware: a plain function handing over ``_guard``'s coroutine, so a
        request costs no coroutine of its own here."""
        return self._guard(request, handler, request.match_info.route)

    async def _guard(self, request: web.Request, handler: Handler, route: AbstractRoute
                     ) -> web.StreamResponse:
        """What every request goes through, the middleware's or ``direct``'s: requests in
        flight are counted for shutdown, the token gate decides before any body is read, and
        every error is answered in the contract's shape."""
        self._in_flight += 1
        try:
            if self._cors is not None:
                preflight = self._cors.preflight(request)
                if preflight is not None:
                    return preflight
            if self.standby() and request.path.startswith(API_ROOT):
                return json_response({"error": "Standby", "message": STANDBY_MESSAGE,
                                      "active": self.active_url()}, 503)
            if self._access is not None:
                refusal = self._access.check(request, route)
                if refusal is not None:
                    return refusal
            return await handler(request)
        except Exception as exc:
            answer = answer_error(request, exc, self._metrics.auth_refused)
            if answer is None:
                raise
            return answer
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._idle is not None:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight (shutdown), watch streams ended; False on
        timeout."""
        self.watch.close()
        if not self._in_flight:
            return True
        self._idle = asyncio.Event()  # a new one each time: requests never clear it
        return await wait_set(self._idle, timeout_s)

    def build(self) -> web.Application:
        """The application; built once access control's mode is decided (the OpenAPI
        document declares bearer tokens only where the server requires them)."""
        access = self._access
        self._openapi = dumps(openapi_document(
            self._topic_root, auth=access is not None and access.enabled,
            metrics_public=access is not None and access.metrics_public))
        app = web.Application(middlewares=[self._middleware],
                              client_max_size=MAX_PAYLOAD_BYTES)
        if self._cors is not None:
            app.on_response_prepare.append(self._cors.on_prepare)
        r = app.router
        r.add_post(f"{PREFIX}/register", self.register)
        r.add_post(f"{PREFIX}/heartbeat", self.heartbeat)
        r.add_get(f"{PREFIX}/nodes", self.list_nodes)
        r.add_get(f"{PREFIX}/nodes/{{node_id}}", self.get_node)
        r.add_delete(f"{PREFIX}/nodes/{{node_id}}", self.delete_node)
        r.add_get(f"{PREFIX}/nodes/{{node_id}}/events", self.node_events)
        r.add_get(f"{PREFIX}/summary", self.summary)
        r.add_get(f"{PREFIX}/watch", self.watch.handle)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/api/v1/openapi.json", self.openapi)
        Dashboard().add_routes(r)
        if self._broker_hooks is not None:
            self._broker_hooks.add_routes(r)
        if self._access is not None and self._access_routes is not None:
            self._access_routes.add_to(r)
            self._access.bind(app)
        return app

    def direct(self, app: web.Application, app_handler: RequestHandler) -> RequestHandler:
        """The server's request handler for ``app`` (from ``build``), with the writes devices
        make at their own pace handed straight to ``_guard`` (``fleetmq.http.direct``)."""
        return direct(app, app_handler, self._guard, DIRECT_PATHS, self._middleware)

    async def _body(self, request: web.Request) -> bytes:
        content = request.content
        if content.is_eof():  # already all here (the usual small body): no timer, no await
            body = content.read_nowait()
            if len(body) > MAX_PAYLOAD_BYTES:  # as request.read() would
                raise web.HTTPRequestEntityTooLarge(MAX_PAYLOAD_BYTES, len(body))
            return body
        try:
            async with asyncio.timeout(self._settings.body_timeout_s):
                return await request.read()
        except TimeoutError:
            raise Rejection(408, "Request timeout",
                            "Request body did not arrive within "
                            f"{self._settings.body_timeout_s:g} s",
                            "timeout") from None

    # --- writes ----------------------------------------------------------------------------

    async def register(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        try:
            req = RegisterRequest.model_validate_json(body)
        except ValidationError as exc:
            raise describe_error(exc) from None
        node_id = require_node_id(req.node_id)
        sender = None if self._access is None else self._access.require_node(request, node_id)
        try:
            result, now = self._fleet.register(node_id, req, sender)
        except NodeConflictError as exc:
            raise node_conflict(exc.node_id, exc.existing_type) from None
        except StoreUnavailableError:
            raise store_unavailable() from None
        await self._durable()
        return json_response(register_reply(node_id, created=result.created, at=now.wall))

    async def heartbeat(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        try:
            req = parse_heartbeat(body)
        except ValidationError as exc:
            raise describe_error(exc) from None
        node_id = require_node_id(req.node_id)
        sender = None if self._access is None else self._access.require_node(request, node_id)
        try:
            result, now = self._fleet.heartbeat(node_id, req, sender)
        except NodeNotFoundError:
            raise node_not_registered() from None
        if result.events and self._writer.available:
            # A transition is acknowledged once stored. While the store is down heartbeats
            # keep flowing in memory (and /readyz says so); the writer catches up later.
            with contextlib.suppress(StoreUnavailableError):
                await self._writer.durable(DURABLE_TIMEOUT_S)
        return json_response(heartbeat_reply(result.node, now.wall))

    async def delete_node(self, request: web.Request) -> web.Response:
        node_id = path_id(request)
        if self._access is not None and self._registry.get(node_id) is not None:
            # Its credentials go first: if that fails nothing is deleted and a retry works.
            await self._access.revoke_node(request, node_id)
        try:
            self._fleet.delete(node_id)
        except NodeNotFoundError:
            raise _no_such_node(node_id) from None
        except StoreUnavailableError:
            raise store_unavailable() from None
        await self._durable()
        return web.Response(status=204)

    async def _durable(self) -> None:
        """An answer acknowledges the change: it waits until the store has it."""
        try:
            await self._writer.durable(DURABLE_TIMEOUT_S)
        except StoreUnavailableError as exc:
            log.warning("store_commit_late reason=%s", exc.reason)
            raise store_unavailable() from None

    # --- reads -----------------------------------------------------------------------------

    async def get_node(self, request: web.Request) -> web.Response:
        node_id = path_id(request)
        node = self._registry.get(node_id)
        if node is None:
            raise _no_such_node(node_id)
        return web.Response(body=node_json(node), content_type=JSON)

    async def node_events(self, request: web.Request) -> web.Response:
        node_id = path_id(request)
        query = request.query
        limit = whole(query.get("limit"), "limit", EVENTS_MAX_LIMIT) or EVENTS_DEFAULT_LIMIT
        before = whole(query.get("before"), "before", 2**63 - 1)
        try:
            events = await self._writer.store.events(node_id, limit + 1, before)
        except StoreError as exc:
            log.warning("store_read_failed error=%s", exc)
            raise store_unavailable() from None
        if not events and self._registry.get(node_id) is None and (
                before is None or not await self._writer.store.events(node_id, 1, None)):
            raise _no_such_node(node_id)
        more = len(events) > limit
        events = events[:limit]
        return json_response({
            "events": [event_document(e) for e in events],
            "next": events[-1].id if more else None,
        })

    def _event_id(self) -> str:
        """The last event the registry's state includes, as the watch stream names it."""
        return f"{self._writer.store.store_id}.{self._writer.last_event_id}"

    async def summary(self, _request: web.Request) -> web.Response:
        """Counts kept by the registry's index: O(types), whatever the fleet's size."""
        registry = self._registry
        return json_response({
            "total": len(registry),
            "by_status": {status: registry.count(status) for status in STATUSES},
            "by_type": registry.counts_by_type(),
            "event_id": self._event_id(),
        })

    async def list_nodes(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        match = _filter(query)
        limit_text = query.get("limit")
        limit = _limit(limit_text)
        after = query.get("after") or None
        status = query.get("status")
        prefix = _prefix(query)
        version = self._registry.version
        # Taken before any node is read: the answer includes at least every event up to it
        # (a later one may show too; watching from here repeats it, never misses one).
        event_id = self._event_id()
        key: PageKey = (after, limit_text, query.get("node_type"), status,
                        query.get("location"), prefix)
        body = self._pages.get(key, version)
        if body is not None:
            return web.Response(body=body, content_type=JSON)
        if status is not None and limit is not None:  # a page of one status: O(limit)
            # _filter checked the value
            body = await self._status_page(cast(Status, status.lower()), query, after, limit,
                                           match, prefix, event_id)
        else:
            ids = self._registry.sorted_ids()  # a snapshot: later changes build a new list
            lo, hi = _prefix_range(ids, prefix)
            start = max(lo, bisect.bisect_right(ids, after)) if after else lo
            if limit is None and hi - start > STREAM_ABOVE:
                return await self._stream(request, ids, start, hi, match,
                                          await self._count(ids, match, lo, start), event_id)
            if match is _all:
                parts, next_id = await self._page(ids, start, hi, limit)
            else:
                parts, next_id = await self._collect(_slices(ids, start, hi), limit, match)
            if prefix is None and query.get("location") is None and status is None:
                # All, or one type: from the counts kept by type, O(types).
                total = self._registry.count(None, query.get("node_type"))
            else:
                total = await self._count(ids, match, lo, hi)
            body = document(parts, total, next_id, event_id)
        if version == self._registry.version:  # unchanged while collected
            self._pages.put(key, version, body)
        return web.Response(body=body, content_type=JSON)

    async def _page(self, ids: list[str], start: int, hi: int, limit: int | None
                    ) -> tuple[list[bytes], str | None]:
        """An unfiltered page: the nodes of ``ids[start:min(start + limit, hi)]``, read as
        they are now, and the ``next`` id if more follow before ``hi``."""
        stop = hi if limit is None else min(hi, start + limit)
        get = self._registry.get
        nodes = [node for node in map(get, ids[start:stop]) if node is not None]
        if len(nodes) != stop - start:  # never while ids is the registry's own snapshot
            return await self._collect(_slices(ids, start, hi), limit, _all)
        parts: list[bytes] = []
        for offset in range(0, len(nodes), PAGE_CHUNK):
            if offset:
                await asyncio.sleep(0)  # a page of nodes whose JSON must be rebuilt
            parts += node_views(nodes[offset:offset + PAGE_CHUNK])
        return parts, (ids[stop - 1] if parts and stop < hi else None)

    async def _status_page(self, status: Status, query: Any, after: str | None, limit: int,
                           match: Callable[[Node], bool], prefix: str | None,
                           event_id: str) -> bytes:
        """A page of the nodes with one status, read from the registry's status index; the
        total from its counts by status and type (a location filter or an id prefix is counted
        by walking the nodes of that status that it could match)."""
        if prefix is not None:
            start = max(after, _below(prefix)) if after else _below(prefix)
            ids = _while_prefixed(self._registry.ids_with_status(status, start), prefix)
            parts, next_id = await self._collect(_batches(ids), limit, match)
            every = _while_prefixed(self._registry.ids_with_status(status, _below(prefix)),
                                    prefix)
            return document(parts, await self._matching(_batches(every), match), next_id,
                            event_id)
        ids = self._registry.ids_with_status(status, after or None)
        parts, next_id = await self._collect(_batches(ids), limit, match)
        if query.get("location") is None:
            total = self._registry.count(status, query.get("node_type"))
        else:
            total = await self._matching(_batches(self._registry.ids_with_status(status)),
                                         match)
        return document(parts, total, next_id, event_id)

    def _nodes(self, ids: Iterable[str]) -> Iterator[Node]:
        get = self._registry.get
        for node_id in ids:
            node = get(node_id)
            if node is not None:
                yield node

    async def _collect(self, chunks: Iterator[list[str]], limit: int | None,
                       match: Callable[[Node], bool]) -> tuple[list[bytes], str | None]:
        """Up to ``limit`` matches among the ids of ``chunks``, and the ``next`` id if more
        follow.

        Walks in chunks, yielding between them: a sparse filter over a large fleet must not
        stall ingest or expiry.
        """
        parts: list[bytes] = []
        last = None
        for chunk in chunks:
            for node in self._nodes(chunk):
                if not match(node):
                    continue
                if len(parts) == limit:
                    return parts, last
                parts.append(node_json(node))
                last = node.id
            await asyncio.sleep(0)
        return parts, None

    async def _count(self, ids: list[str], match: Callable[[Node], bool], start: int,
                     stop: int) -> int:
        """How many of ``ids[start:stop]`` match, counted in chunks that yield between them."""
        if match is _all:
            return stop - start
        return await self._matching(_slices(ids, start, stop), match)

    async def _matching(self, chunks: Iterable[list[str]], match: Callable[[Node], bool]
                        ) -> int:
        """How many nodes of ``chunks`` match, yielding between chunks."""
        total = 0
        for chunk in chunks:
            total += sum(1 for n in self._nodes(chunk) if match(n))
            await asyncio.sleep(0)
        return total

    async def _stream(self, request: web.Request, ids: list[str], start: int, stop: int,
                      match: Callable[[Node], bool], before: int, event_id: str
                      ) -> web.StreamResponse:
        # A large fleet goes out in chunks, yielding between them, so that listing a million
        # nodes never stalls ingest. Each node is read as it is when its chunk is written.
        # ``before``: the matches ahead of ``start`` (a page that began further on).
        response = web.StreamResponse(headers={"Content-Type": JSON})
        await response.prepare(request)
        count = 0
        try:
            await response.write(b'{"nodes":[')
            for chunk in _slices(ids, start, stop):
                parts = [node_json(n) for n in self._nodes(chunk) if match(n)]
                if parts:
                    await response.write((b"," if count else b"") + b",".join(parts))
                    count += len(parts)
                await asyncio.sleep(0)
            await response.write(b'],"count":%d,"total":%d,"next":null,"event_id":%s}'
                                 % (count, before + count, dumps(event_id)))
            await response.write_eof()
        except ConnectionResetError:
            log.debug("http_client_gone path=%s sent_nodes=%d", request.path, count)
        return response

    # --- service routes --------------------------------------------------------------------

    async def healthz(self, _request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        """A ``{"status": ...}`` object in every state (contract section 11)."""
        if self.standby():
            return json_response({"status": "standby", "active": self.active_url()}, 503)
        down = [link for link in self._links if not link.connected]
        if down:
            return json_response({"status": "not_ready", "message":
                                  f"broker connection is down: {down[0].last_error}"}, 503)
        if self._writer.failure is not None:
            return json_response({"status": "not_ready", "message":
                                  f"the node store is unavailable: {self._writer.failure}"}, 503)
        return json_response({"status": "ready", "role": "active", "nodes": len(self._registry),
                              "mqtt_protocol": self._links[0].protocol_name})

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=render(self._exposition),
                            headers={"Content-Type": CONTENT_TYPE})

    async def openapi(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type=JSON)


def _slices(ids: list[str], start: int, stop: int | None = None) -> Iterator[list[str]]:
    """``ids[start:stop]`` in chunks of ``STREAM_CHUNK`` (slices: no per-id Python step)."""
    stop = len(ids) if stop is None else stop
    return (ids[offset:min(offset + STREAM_CHUNK, stop)]
            for offset in range(start, stop, STREAM_CHUNK))


def _batches(ids: Iterator[str]) -> Iterator[list[str]]:
    """An iterator of ids in chunks of ``STREAM_CHUNK``."""
    while chunk := list(itertools.islice(ids, STREAM_CHUNK)):
        yield chunk


def _no_such_node(node_id: str) -> Rejection:
    return Rejection(404, "Node not found", f"No node with ID {quote(node_id)}", "unknown_node")


def _prefix(query: Any) -> str | None:
    """``?q=``: the start of a node id (contract section 9), case as in the ids."""
    prefix = query.get("q") or None
    if prefix is not None and not is_valid_node_id(prefix):
        raise Rejection(400, "Invalid parameter",
                        f"Parameter 'q' must be the start of a node id (letters, digits and "
                        f"'._:-', from a letter or digit, at most 128), not {quote(prefix)}",
                        "invalid_query")
    return prefix


def _prefix_range(ids: list[str], prefix: str | None) -> tuple[int, int]:
    """Where the ids that start with ``prefix`` are in sorted ``ids``: O(log n)."""
    if prefix is None:
        return 0, len(ids)
    return (bisect.bisect_left(ids, prefix),
            bisect.bisect_left(ids, prefix + _AFTER_EVERY_ID_CHAR))


_AFTER_EVERY_ID_CHAR = "\U0010ffff"


def _below(prefix: str) -> str:
    """A string below every id that starts with ``prefix`` and above every smaller id (ids
    hold only ASCII), for ``ids_after``, which starts after the string it is given."""
    return prefix[:-1] + chr(ord(prefix[-1]) - 1) + _AFTER_EVERY_ID_CHAR


def _while_prefixed(ids: Iterator[str], prefix: str) -> Iterator[str]:
    return itertools.takewhile(lambda node_id: node_id.startswith(prefix), ids)


def _all(_node: Node) -> bool:
    return True


def _filter(query: Any) -> Callable[[Node], bool]:
    node_type = query.get("node_type")
    status = query.get("status")
    location = query.get("location")
    if status is not None:
        status = status.lower()
        if status not in STATUSES:
            raise Rejection(400, "Invalid parameter",
                            f"Parameter 'status' must be one of online, degraded, offline, "
                            f"not {quote(repr(status))}", "invalid_query")
    if node_type is None and status is None and location is None:
        return _all
    want_type = node_type.casefold() if node_type is not None else None
    want_location = location.casefold() if location is not None else None

    def match(node: Node) -> bool:
        return (
            (status is None or node.status == status)
            and (want_type is None or node.type.casefold() == want_type)
            and (want_location is None
                 or (node.location is not None and node.location.casefold() == want_location))
        )

    return match


def _limit(text: str | None) -> int | None:
    return whole(text, "limit", MAX_LIMIT)

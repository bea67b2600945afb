"""Who may call which REST route (contract section 8, "REST"): the bearer-token gate.

``RestAccess.check`` runs in the API's one middleware, before any handler and so before any
body is read: one dict lookup finds the route's rule, one SHA-256 and one dict lookup
(``AuthService.verify``) find the token's principal, and ``rules.rest_allowed`` decides. A
route that names its node in the body (register, heartbeat) checks that node after parsing,
through ``require_node``. Failed attempts feed the login back-off. It decides nothing about
what a role may do (``fleetmq.auth.rules`` does) and never reads a token from a URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import logging
import math
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from fleetmq.auth.limits import KeyedLimiter, LoginBackoff
from fleetmq.auth.rules import Action, Principal, rest_allowed
from fleetmq.auth.service import AuthService
from fleetmq.auth.store import Credential
from fleetmq.auth.tokens import bearer_token
from fleetmq.auth.verifier import Verdict
from fleetmq.config import AuthSettings
from fleetmq.core.models import Rejection, store_unavailable
from fleetmq.errors import ConfigError, StoreError
from fleetmq.views import dumps

log = logging.getLogger(__name__)

PRINCIPAL = web.RequestKey("fleetmq_principal", Principal)
"""The request key under which an authenticated request carries its ``Principal``."""
CREDENTIAL = web.RequestKey("fleetmq_credential", Credential)
"""... and the ``Credential`` it presented."""
API_PREFIX = "/api/v1/"
FLEET = "/api/v1/fleet"
AUTH_OFF_MESSAGE = (
    "Access control is off on this manager, so there are no keys or credentials to manage. "
    "Turn it on: create the first admin key with `fleetmq keys create --role admin --store "
    "URL` (or start with --admin-token-file FILE), then restart the manager (--auth auto "
    "turns on once the store holds an admin key)")


@dataclass(frozen=True, slots=True)
class RouteRule:
    """What a route needs. ``action`` None: open to anyone."""

    action: Action | None
    node: Literal["none", "path", "body"] = "none"
    """Where the node the request is about is named: nowhere, the path's ``node_id``, or the
    body's ``node_id`` (checked by the handler after parsing)."""
    nodes_may: bool = False
    """A node token may use the route, for its own id only."""
    needs_auth: bool = False
    """Managing keys and credentials means nothing while auth is off: 409 then."""


OPEN = RouteRule(None)
_NODE = f"{FLEET}/nodes/{{node_id}}"
RULES: dict[tuple[str, str], RouteRule] = {
    ("GET", "/healthz"): OPEN,
    ("GET", "/readyz"): OPEN,
    ("GET", "/api/v1/openapi.json"): OPEN,
    # The dashboard's page and files hold no fleet data: the page asks for a key.
    ("GET", "/"): OPEN,
    ("GET", "/dashboard/{name}"): OPEN,
    ("GET", "/metrics"): RouteRule("metrics"),
    ("POST", f"{FLEET}/register"): RouteRule("register", "body", nodes_may=True),
    ("POST", f"{FLEET}/heartbeat"): RouteRule("heartbeat", "body", nodes_may=True),
    ("GET", f"{FLEET}/nodes"): RouteRule("fleet_read"),
    ("GET", _NODE): RouteRule("fleet_read", "path", nodes_may=True),
    ("DELETE", _NODE): RouteRule("delete", "path"),
    ("GET", f"{_NODE}/events"): RouteRule("fleet_read", "path"),
    ("GET", f"{FLEET}/summary"): RouteRule("fleet_read"),
    ("GET", f"{FLEET}/watch"): RouteRule("fleet_read"),
    ("POST", f"{_NODE}/credentials"): RouteRule("credentials_issue", "path", nodes_may=True,
                                                needs_auth=True),
    ("GET", f"{_NODE}/credentials"): RouteRule("credentials_read", "path", needs_auth=True),
    ("DELETE", f"{_NODE}/credentials"): RouteRule("credentials_revoke", "path",
                                                  needs_auth=True),
    ("POST", f"{FLEET}/enroll"): RouteRule("enroll", needs_auth=True),
    ("POST", "/api/v1/keys"): RouteRule("keys", needs_auth=True),
    ("GET", "/api/v1/keys"): RouteRule("keys", needs_auth=True),
    ("DELETE", "/api/v1/keys/{key_id}"): RouteRule("keys", needs_auth=True),
    ("GET", "/api/v1/audit"): RouteRule("audit", needs_auth=True),
    # The broker's HTTP auth hooks (served by their own module), for a broker key; they mean
    # nothing while auth is off (no broker checks logins against fleetmq then).
    ("POST", "/api/v1/broker/authenticate"): RouteRule("broker_hooks", needs_auth=True),
    ("POST", "/api/v1/broker/authorize"): RouteRule("broker_hooks", needs_auth=True),
}
"""Every route's rule, by method and path. A route missing here fails closed (admin only),
except static files (``add_static``: the dashboard's), which are open."""
RECHECK_S = 1.0
"""How long a connection's accepted token is taken on trust before it is verified in full
again (which also records its use); any credential written or ending anywhere ends the trust
at once, and so does the token's own expiry or revocation time."""
_UNLISTED = RouteRule("keys")  # an action only admin keys hold
_ANY_TOKEN = RouteRule("fleet_read")  # 404/405 under /api/v1: a valid token first


def rules_for(routes: Iterable[AbstractRoute], metrics_public: bool
              ) -> dict[AbstractRoute, RouteRule]:
    """The rule of each route of an application, looked up once per request by route."""
    table: dict[AbstractRoute, RouteRule] = {}
    for route in routes:
        resource = route.resource
        path = resource.canonical if resource is not None else ""
        method = "GET" if route.method == "HEAD" else route.method
        rule = RULES.get((method, path))
        if rule is None:
            if isinstance(resource, web.StaticResource):
                rule = OPEN  # the dashboard's static files hold no fleet data
            else:
                log.warning("route_without_access_rule method=%s path=%s (admin keys only)",
                            method, path)
                rule = _UNLISTED
        if rule.action == "metrics" and metrics_public:
            rule = OPEN
        table[route] = rule
    return table


class RestAccess:
    """The gate: authenticates, authorizes, answers 401/403/409/429 and counts them."""

    def __init__(self, auth: AuthService, settings: AuthSettings,
                 monotonic: Callable[[], float], refused: Counter[tuple[int, str]],
                 backoff: LoginBackoff | None = None) -> None:
        self.auth = auth
        self._settings = settings
        self._monotonic = monotonic
        self.refused = refused
        """(status, reason) -> count, rendered in /metrics."""
        self._backoff = backoff or LoginBackoff()
        self._key_rates = KeyedLimiter(settings.key_rate, settings.key_burst)
        self._proxies = _networks(settings.trusted_proxies)
        self._rules: dict[AbstractRoute, RouteRule] = {}
        self._accepted: weakref.WeakKeyDictionary[object, _Accepted] = (
            weakref.WeakKeyDictionary())
        """Per connection (its transport), the Authorization header last accepted on it:
        a client on a kept-alive connection sends the same token with every request, and
        its verification (a regular expression, a SHA-256 and the clock) cost most of the
        gate's time. Kept no longer than the connection."""
        self.enabled = False
        """Set once at start, before the REST listener opens (``FleetService``)."""

    @property
    def metrics_public(self) -> bool:
        return self._settings.metrics_public

    def bind(self, app: web.Application) -> None:
        """Learn the rule of every route of ``app`` (call after its routes are added)."""
        self._rules = rules_for(app.router.routes(), self._settings.metrics_public)

    def check(self, request: web.Request, route: AbstractRoute) -> web.Response | None:
        """None to let the request through, else the refusal to answer with. ``route``: the
        one the request matched (aiohttp's ``SystemRoute`` for a 404 or 405)."""
        rule = self._rules.get(route)
        if not self.enabled:
            if rule is not None and rule.needs_auth:
                return error(409, "Auth off", AUTH_OFF_MESSAGE)
            return None
        if rule is None:  # no route matched: 404 or 405
            if not request.path.startswith(API_PREFIX):
                return None
            rule = _ANY_TOKEN
        if rule.action is None:
            return None
        return self._authorize(request, rule)

    def still_valid(self, request: web.Request) -> bool:
        """Whether the token a long request (the watch stream) was let in with is still
        valid: revoked or expired, its stream ends. Counts nothing and takes no rate."""
        if not self.enabled:
            return True
        return self._verified(request, request.headers.get("Authorization")).principal \
            is not None

    def _verified(self, request: web.Request, header: str | None) -> Verdict:
        """The header's verdict: the connection's accepted one while it is trusted, else a
        full verification (an accepting one is then trusted on this connection)."""
        verdict = self._accepted_before(request, header)
        if verdict is None:
            verdict = self.auth.verify(bearer_token(header))
            if verdict.principal is not None:
                self._accept(request, header, verdict)
        return verdict

    def _authorize(self, request: web.Request, rule: RouteRule) -> web.Response | None:
        assert rule.action is not None
        header = request.headers.get("Authorization")
        verdict = self._verified(request, header)
        if verdict.principal is None:
            token = bearer_token(header)
            failure = verdict.failure or "unknown"
            if header is not None and token is None:
                failure = "malformed"  # another scheme, or a bearer without a token
            return self._unauthorized(request, header, token, failure)
        principal = verdict.principal
        assert principal is not None
        request[PRINCIPAL] = principal
        if verdict.credential is not None:
            request[CREDENTIAL] = verdict.credential
        if principal.kind == "key" and rule.action != "broker_hooks":
            # The broker's hook calls are its fleet's logins, not the key's own traffic: a
            # reconnect storm must not be throttled by the broker key's rate.
            wait = self._key_rates.take(principal.id, self._monotonic())
            if wait > 0:
                return self.too_many("key_rate", wait, "This API key is over its request "
                                     "rate (--key-rate); wait before trying again")
        if rule is _ANY_TOKEN:
            return None
        if principal.kind == "node" and not rule.nodes_may:
            return self._forbidden("node", "A node token may only register and heartbeat "
                                   "as its own node, read its own node and rotate its own "
                                   "credential")
        node_id = request.match_info.get("node_id") if rule.node == "path" else None
        if rule.node == "body" and principal.kind == "node":
            node_id = principal.id  # the body's id is checked once parsed (require_node)
        if not rest_allowed(principal, rule.action, node_id):
            return self._forbidden(principal.kind, _denial(principal, rule.action))
        return None

    def require_node(self, request: web.Request, node_id: str) -> str | None:
        """A node token acts only for its own id: raise 403 for a body naming another. The
        sender to hold to a node's rate (``NodeRates``): the key speaking for the node, None
        for the node itself (or with auth off)."""
        if not self.enabled:
            return None
        principal = request.get(PRINCIPAL)
        if principal is None:
            return None
        if principal.kind == "node" and principal.id != node_id:
            self.refused[(403, "node")] += 1
            raise Rejection(403, "Forbidden", "A node token acts only for its own node_id",
                            "forbidden")
        return principal.broker_identity if principal.kind == "key" else None

    async def revoke_node(self, request: web.Request, node_id: str) -> None:
        """Revoke a node's credentials (its deletion), or raise 503 if the store refuses."""
        try:
            await self.auth.revoke_credentials(node_id, actor=self.actor(request),
                                                address=self.client_address(request))
        except StoreError as exc:
            log.warning("auth_store_write_failed error=%s", exc)
            raise store_unavailable() from None

    def client_address(self, request: web.Request) -> str:
        """The peer, or behind a trusted proxy the nearest untrusted hop of X-Forwarded-For."""
        peer = request.remote or "unknown"
        if not self._proxies or not self._trusted(peer):
            return peer
        hops = [hop.strip() for value in request.headers.getall("X-Forwarded-For", ())
                for hop in value.split(",")]
        for hop in reversed(hops):
            if not self._trusted(hop):
                try:
                    # No IPv6 scope id ("%eth0 ..."): ip_address takes any text after "%",
                    # which would reach the audit log and the back-off as it was sent.
                    return str(ipaddress.ip_address(hop)) if "%" not in hop else peer
                except ValueError:
                    return peer  # a proxy we trust wrote garbage: keep its own address
        return peer

    def actor(self, request: web.Request) -> str:
        """``key:<id>`` or ``node:<id>`` for the audit log; ``anonymous`` while auth is off."""
        principal = request.get(PRINCIPAL)
        if principal is None:
            return "anonymous"
        return f"{principal.kind}:{principal.id}"

    def refuse(self, status: int, reason: str, title: str, message: str,
               headers: dict[str, str] | None = None) -> web.Response:
        self.refused[(status, reason)] += 1
        return error(status, title, message, headers)

    def too_many(self, reason: str, wait_s: float, message: str) -> web.Response:
        """429 with a whole number of seconds in Retry-After (at least 1)."""
        seconds = str(max(1, math.ceil(wait_s)))
        return self.refuse(429, reason, "Too many requests", message,
                           {"Retry-After": seconds})

    # --- internals -------------------------------------------------------------------------

    def _accepted_before(self, request: web.Request, header: str | None) -> Verdict | None:
        """The verdict on this connection's earlier request, if it holds for this one: the
        same header (compared in constant time: behind a proxy one connection carries many
        clients), no credential changed since, and still within its time."""
        if header is None or not header.isascii():
            return None
        try:
            seen = self._accepted.get(request.transport)
        except TypeError:  # a transport that takes no weak reference: no memory
            return None
        if (seen is None or seen.generation != self.auth.generation
                or self._monotonic() >= seen.until
                or not hmac.compare_digest(seen.header, header)):
            return None
        return seen.verdict

    def _accept(self, request: web.Request, header: str | None, verdict: Verdict) -> None:
        transport = request.transport
        if header is None or not header.isascii() or transport is None or (
                verdict.credential is None):
            return
        trust_s = min(RECHECK_S, self.auth.remaining_s(verdict.credential))
        accepted = _Accepted(header, verdict, self.auth.generation,
                             self._monotonic() + trust_s)
        with contextlib.suppress(TypeError):  # a transport that takes no weak reference
            self._accepted[transport] = accepted

    def _unauthorized(self, request: web.Request, header: str | None, token: str | None,
                      failure: str) -> web.Response:
        presented = token if token is not None else header
        # Section 11: a presented token is known by its digest (never kept as such), a
        # missing one as "none". The digest of a 10 kB header costs microseconds.
        identity = ("none" if presented is None else
                    hashlib.sha256(presented.encode("utf-8", "surrogatepass")).hexdigest())
        address = self.client_address(request)
        now = self._monotonic()
        self._backoff.failed(address, identity, now)
        wait = self._backoff.retry_after(address, identity, now)
        if wait > 0:
            return self.too_many("login_backoff", wait, "Too many failed attempts from this "
                                 "address with this token; wait before trying again")
        challenge = 'Bearer realm="fleetmq"'
        if presented is not None:
            challenge += ', error="invalid_token"'
        return self.refuse(401, failure, "Unauthorized", _FAILURES[failure],
                           {"WWW-Authenticate": challenge})

    def _forbidden(self, reason: str, message: str) -> web.Response:
        return self.refuse(403, reason, "Forbidden", message)

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._proxies)


@dataclass(frozen=True, slots=True)
class _Accepted:
    header: str
    verdict: Verdict
    generation: int
    until: float
    """Monotonic seconds."""


def error(status: int, title: str, message: str,
          headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps({"error": title, "message": message}), status=status,
                        content_type="application/json", headers=headers)


_FAILURES = {
    "missing": "This route needs a token: send Authorization: Bearer <token>",
    "malformed": "The Authorization header is not 'Bearer <token>' with a fleetmq token",
    "unknown": "The token is not known",
    "expired": "The token has expired",
    "revoked": "The token has been revoked",
}


def _denial(principal: Principal, action: Action) -> str:
    if principal.kind == "node":
        return "A node token acts only for its own node"
    return f"A key of role {principal.role} may not do this ({action})"


def _networks(cidrs: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise ConfigError(f"--trusted-proxy {cidr[:64]!r} is not a CIDR: give addresses "
                              "like 10.0.0.0/8 or 127.0.0.1/32, comma-separated") from None
    return tuple(networks)

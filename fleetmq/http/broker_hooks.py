"""The HTTP auth hooks a broker calls to check logins and topics live against fleetmq's
credentials: EMQX 5's HTTP authentication and HTTP authorization (contract section 8, "Brokers
with HTTP auth hooks").

``POST /api/v1/broker/authenticate`` answers ``{"result": "allow"|"deny", "is_superuser":
false}`` for a CONNECT; ``POST /api/v1/broker/authorize`` answers ``{"result": "allow"|"deny"}``
for a publish or subscribe. The decisions are ``TopicRules``'; this module only reads the
broker's request, finds the principal and answers. Each call is one SHA-256 and a few dict
lookups, so a reconnect storm costs little more than HTTP itself.

Only the broker calls these routes: the REST gate (``fleetmq.http.auth``) lets through a key of
role ``broker`` (or ``admin``) only, and answers 409 while auth is off; the handlers do not check
the bearer token a second time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from fleetmq.auth.rules import (
    BROKER_ROLES,
    KEY_IDENTITY_PREFIX,
    MANAGER_CLIENT_PREFIX,
    Principal,
    TopicRules,
)
from fleetmq.auth.service import AuthService
from fleetmq.auth.verifier import principal_of
from fleetmq.config import OUTPUT_USER_SUFFIX
from fleetmq.core.models import quote
from fleetmq.http.hook_fields import (
    AUTHENTICATE_FIELDS,
    AUTHENTICATE_PATH,
    AUTHORIZE_FIELDS,
    AUTHORIZE_PATH,
    Kinds,
)
from fleetmq.http.params import json_response
from fleetmq.metrics import RateLimitedLog

log = logging.getLogger(__name__)

BODY_TIMEOUT_S = 5.0
"""The broker sends small bodies at once; a slow one is not a broker."""
MAX_FIELD = 1024
"""Longest username, client id or topic judged at all: no identity or fleet topic comes near
(a node id has at most 128 characters, a token 52); longer ones are refused unread."""
CREDENTIAL_ATTR = "fleetmq_credential"
"""The ``client_attrs`` entry (EMQX 5.7 and later) naming the credential a session logged in
with; sent back as ``credential`` in authorize calls, it makes a rotation end old sessions too."""


Result = Literal["allow", "deny"]
_REASONS = {"identity": "wrong_identity", "role": "no_broker_rights"}
"""The hooks' own names (in /metrics) for two of ``AuthService.broker_login``'s reasons."""
_ALLOW: dict[str, object] = {"result": "allow"}
_DENY: dict[str, object] = {"result": "deny"}


@dataclass(frozen=True, slots=True)
class ManagerLogin:
    """The manager's own broker login on a broker that calls these hooks: a username beginning
    with ``_fleetmq`` (which no node id or key identity can) and a secret drawn per process."""

    username: str
    password: str

    @classmethod
    def new(cls, username: str) -> ManagerLogin:
        if not username.startswith(MANAGER_CLIENT_PREFIX):
            raise ValueError(f"the manager's username must begin with {MANAGER_CLIENT_PREFIX}")
        return cls(username, secrets.token_urlsafe(32))

    def owns(self, username: str) -> bool:
        """Whether ``username`` is one of the manager's two connections' usernames."""
        return username in (self.username, self.username + OUTPUT_USER_SUFFIX)

    def matches(self, username: str, password: str) -> bool:
        # Digests of equal length, so the comparison's time says nothing about the secret.
        return self.owns(username) and hmac.compare_digest(
            hashlib.sha256(password.encode("utf-8", "surrogatepass")).digest(),
            hashlib.sha256(self.password.encode()).digest())

    def __repr__(self) -> str:
        return f"ManagerLogin({self.username!r}, password=***)"


class BrokerHooks:
    """The two hook routes over one ``AuthService`` and one set of ``TopicRules``."""

    def __init__(self, auth: AuthService, rules: TopicRules, monotonic: Callable[[], float],
                 manager: ManagerLogin | None = None,
                 counts: Counter[tuple[str, str, str]] | None = None) -> None:
        self._auth = auth
        self._rules = rules
        self._monotonic = monotonic
        self._manager = manager
        self.counts: Counter[tuple[str, str, str]] = Counter() if counts is None else counts
        """Answers by (hook, result, reason): ``Metrics.broker_hooks`` renders them."""
        # The broker calls for every CONNECT an attacker sends: log a few, count them all.
        self._warn = RateLimitedLog(log)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post(AUTHENTICATE_PATH, self.authenticate)
        router.add_post(AUTHORIZE_PATH, self.authorize)

    # --- routes ----------------------------------------------------------------------------

    async def authenticate(self, request: web.Request) -> web.Response:
        fields = await _fields(request, AUTHENTICATE_FIELDS)
        username, password = fields.get("username", ""), fields.get("password", "")
        client_id = fields.get("clientid", "")
        result, reason, cred_id = self._login(username, password, client_id)
        self.counts["authenticate", result, reason] += 1
        if result == "deny":
            self._warn.warning(
                f"login:{reason}", self._monotonic(),
                "broker_login_refused reason=%s username=%.64r clientid=%.64r peer=%.64r",
                reason, username, client_id, fields.get("peerhost", "?"))
            return json_response({"result": "deny", "is_superuser": False})
        body: dict[str, object] = {"result": "allow", "is_superuser": False}
        if cred_id is not None:
            body["client_attrs"] = {CREDENTIAL_ATTR: cred_id}
        return json_response(body)

    async def authorize(self, request: web.Request) -> web.Response:
        fields = await _fields(request, AUTHORIZE_FIELDS)
        result, reason = self._judge(fields)
        self.counts["authorize", result, reason] += 1
        if result == "deny":
            log.debug("broker_action_refused reason=%s username=%.64r action=%.16s topic=%.128r",
                      reason, fields.get("username", ""), fields.get("action", ""),
                      fields.get("topic", ""))
            return json_response(_DENY)
        return json_response(_ALLOW)

    # --- decisions -------------------------------------------------------------------------

    def _login(self, username: str, password: str,
               client_id: str) -> tuple[Result, str, str | None]:
        """(result, reason, the credential's id) for a CONNECT."""
        if not username or not password or max(len(username), len(client_id)) > MAX_FIELD:
            return "deny", "malformed", None
        if username.startswith(MANAGER_CLIENT_PREFIX):
            return self._manager_login(username, password, client_id)
        # verify refuses a 10 kB password by its length first.
        decided = self._auth.broker_login(self._rules, username, password, client_id)
        if isinstance(decided, str):
            return "deny", _REASONS.get(decided, decided), None
        principal, cred = decided
        return "allow", principal.kind, cred.id

    def _manager_login(self, username: str, password: str,
                       client_id: str) -> tuple[Result, str, str | None]:
        manager = self._manager
        if manager is None or len(password) > MAX_FIELD or not manager.matches(username,
                                                                                password):
            return "deny", "not_manager", None
        if not self._rules.client_id_allowed(Principal("manager", username), client_id):
            return "deny", "client_id", None
        return "allow", "manager", None

    def _judge(self, fields: dict[str, str]) -> tuple[Result, str]:
        """(result, reason) for a publish or subscribe by an authenticated client."""
        username, topic = fields.get("username", ""), fields.get("topic", "")
        if max(len(username), len(topic)) > MAX_FIELD:
            return "deny", "malformed"
        principal = self._principal(username, fields.get("credential", ""))
        if principal is None:
            return "deny", "no_credential"
        client_id = fields.get("clientid")
        if client_id is not None and not self._rules.client_id_allowed(principal, client_id):
            return "deny", "client_id"
        action = fields.get("action", "")
        if action == "publish":
            allowed = self._rules.publish_allowed(principal, topic)
        elif action == "subscribe":
            allowed = self._rules.subscribe_allowed(principal, topic)  # judges $share/g/f as f
        else:
            return "deny", "unknown_action"
        return ("allow", action) if allowed else ("deny", action)

    def _principal(self, username: str, credential: str) -> Principal | None:
        """Whoever holds ``username`` now, None when nothing valid stands behind it: a revoked
        or expired identity loses every right at its next check."""
        if username.startswith(MANAGER_CLIENT_PREFIX):
            manager = self._manager
            ok = manager is not None and manager.owns(username)
            return Principal("manager", username) if ok else None
        if username.startswith(KEY_IDENTITY_PREFIX):
            key = self._auth.key(username[len(KEY_IDENTITY_PREFIX):])
            creds = [key] if key is not None and key.role in BROKER_ROLES else []
        else:
            creds = self._auth.node_credentials(username)
        if credential:
            # The session's own credential (EMQX client_attrs): it must still work itself.
            creds = [c for c in creds if c.id == credential]
        valid = [c for c in creds if self._auth.valid(c.id)]
        return principal_of(valid[0]) if valid else None

def _text(name: str, value: object, kinds: Kinds) -> str:
    """A JSON value of a field the hook reads, as the text the broker meant; 400 otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        if bool in kinds:
            return "true" if value else "false"
    elif isinstance(value, int) and int in kinds:
        return str(value)
    elif isinstance(value, float) and int in kinds and value.is_integer():
        return str(int(value))  # JSON has one number type: 1.0 is the integer 1
    raise _bad_body(f"field {quote(name)} must be "
                    + " or ".join({str: "a string", int: "an integer",
                                   bool: "a boolean"}[k] for k in kinds)
                    + f", not {quote(orjson.dumps(value).decode())}")


async def _fields(request: web.Request, kinds: dict[str, Kinds]) -> dict[str, str]:
    """The fields the hook reads (``kinds``) from a JSON object or a form body (EMQX sends
    either), as strings; other fields are ignored.

    A body that is neither, or that gives a read field the wrong type or twice, answers 400
    (a misconfigured broker, not a client to judge).
    """
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            body = await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout() from None
    if request.content_type == "application/x-www-form-urlencoded":
        fields: dict[str, str] = {}
        for name, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
            if name not in kinds:
                continue
            if name in fields:
                # A name twice is ambiguous (a value that smuggled in '&username=...'
                # unencoded): judge nothing rather than guess which one the broker meant.
                raise _bad_body(f"field {quote(name)} appears twice in the form")
            fields[name] = value
        return fields
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _bad_body("the body is not JSON (nor a form with Content-Type "
                        "application/x-www-form-urlencoded)") from None
    if not isinstance(value, dict):
        raise _bad_body("the body must be a JSON object")
    return {k: _text(k, v, kinds[k]) for k, v in value.items() if k in kinds}


def _bad_body(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=message)

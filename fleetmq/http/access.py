"""The access-control routes: API keys, node credentials, enrollment and the audit log.

Each change goes through ``AuthService`` (durable before it answers) with the caller's actor
(``key:<id>``, ``node:<id>``) and client address; enrollment then registers the node through
the fleet's one write path. Who may call these routes is ``RestAccess``'s decision, made
before a handler runs.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from fleetmq.auth.limits import KeyedLimiter
from fleetmq.auth.rules import Principal
from fleetmq.auth.service import AuthError, AuthService
from fleetmq.auth.store import Credential
from fleetmq.core.models import (
    RegisterRequest,
    Rejection,
    describe_error,
    node_conflict,
    quote,
    require_node_id,
    store_unavailable,
)
from fleetmq.core.registry import NodeConflictError, Registry
from fleetmq.errors import StoreError
from fleetmq.fleet import Fleet
from fleetmq.http.access_models import (
    CredentialRequest,
    KeyRequest,
    audit_entry,
    credential_issued,
    credential_shown,
    key_created,
    key_listed,
)
from fleetmq.http.auth import CREDENTIAL, FLEET, PRINCIPAL, RestAccess
from fleetmq.http.params import json_response, path_id, whole
from fleetmq.rates import RateLimitedError
from fleetmq.store.writer import StoreUnavailableError
from fleetmq.views import register_reply

log = logging.getLogger(__name__)

ENROLL_RATE = 10.0
ENROLL_BURST = 20
AUDIT_DEFAULT_LIMIT = 100
AUDIT_MAX_LIMIT = 1000
_KEY_ID = re.compile(r"[0-9a-f]{12}")
Model = TypeVar("Model", bound=BaseModel)


class AccessRoutes:
    def __init__(self, auth: AuthService, access: RestAccess, fleet: Fleet, registry: Registry,
                 read_body: Callable[[web.Request], Awaitable[bytes]],
                 durable: Callable[[], Awaitable[None]],
                 monotonic: Callable[[], float]) -> None:
        self._auth = auth
        self._access = access
        self._fleet = fleet
        self._registry = registry
        self._read_body = read_body
        self._durable = durable
        self._monotonic = monotonic
        self._enroll_rate = KeyedLimiter(ENROLL_RATE, ENROLL_BURST, max_keys=10_000)
        # One enrollment at a time: "has this id a credential yet?" and the key's use count
        # are read, then written; two at once could both pass the check.
        self._enrolling = asyncio.Lock()

    def add_to(self, router: web.UrlDispatcher) -> None:
        node = f"{FLEET}/nodes/{{node_id}}/credentials"
        router.add_post("/api/v1/keys", self.create_key)
        router.add_get("/api/v1/keys", self.list_keys)
        router.add_delete("/api/v1/keys/{key_id}", self.revoke_key)
        router.add_post(node, self.issue_credential)
        router.add_get(node, self.show_credentials)
        router.add_delete(node, self.revoke_credentials)
        router.add_post(f"{FLEET}/enroll", self.enroll)
        router.add_get("/api/v1/audit", self.audit)

    # --- keys ------------------------------------------------------------------------------

    async def create_key(self, request: web.Request) -> web.Response:
        req = await self._parse(request, KeyRequest, empty_ok=False)
        req.check_role()
        cred, token = await self._change(self._auth.create_key(
            req.role, name=req.name, expires_in_s=req.expires_in_seconds,
            max_uses=req.max_uses, id_pattern=req.id_pattern, node_type=req.node_type,
            allow_registered=req.allow_registered, **self._who(request)))
        log.info("key_created id=%s role=%s actor=%s", cred.id, cred.role,
                 self._access.actor(request))
        return json_response(key_created(cred, token), 201)

    async def list_keys(self, _request: web.Request) -> web.Response:
        return json_response({"keys": [key_listed(self._auth, c) for c in self._live_keys()]})

    async def revoke_key(self, request: web.Request) -> web.Response:
        key_id = request.match_info["key_id"]
        cascade = _flag(request.query.get("cascade"), "cascade")
        key = self._auth.key(key_id) if _KEY_ID.fullmatch(key_id) else None
        if key is None or key.revoked_at is not None:  # a revoked key is history
            raise Rejection(404, "Key not found", f"No API key with ID {quote(key_id)}",
                            "unknown_key")
        ended = await self._change(self._auth.revoke_key(key_id, cascade=cascade,
                                                         **self._who(request)))
        log.info("key_revoked id=%s cascade_credentials=%d actor=%s", key_id, len(ended) - 1,
                 self._access.actor(request))
        return web.Response(status=204)

    def _live_keys(self) -> list[Credential]:
        # Revoked keys are history (the audit log keeps it); expired ones are listed so that
        # an operator sees why a tool stopped working.
        keys = self._auth.keys()  # AuthService's list, not a dict's view
        return [c for c in keys if c.revoked_at is None]

    # --- node credentials ------------------------------------------------------------------

    async def issue_credential(self, request: web.Request) -> web.Response:
        node_id = path_id(request)
        req = await self._parse(request, CredentialRequest, empty_ok=True)
        presented = request.get(CREDENTIAL)
        rotated_by = presented if presented is not None and presented.node_id else None
        cred, token = await self._change(self._auth.issue_credential(
            node_id, expires_in_s=req.expires_in_seconds, grace_s=req.grace_seconds,
            rotated_by=rotated_by, **self._who(request)))
        log.info("credential_issued node_id=%s actor=%s", node_id, self._access.actor(request))
        return json_response(credential_issued(cred, token), 201)

    async def show_credentials(self, request: web.Request) -> web.Response:
        node_id = path_id(request)
        creds = self._auth.node_credentials(node_id)
        if not creds:
            raise _no_credential(node_id)
        return json_response({"node_id": node_id,
                      "credentials": [credential_shown(self._auth, c) for c in creds]})

    async def revoke_credentials(self, request: web.Request) -> web.Response:
        node_id = path_id(request)
        if not await self._change(self._auth.revoke_credentials(node_id, **self._who(request))):
            raise _no_credential(node_id)
        log.info("credentials_revoked node_id=%s actor=%s", node_id,
                 self._access.actor(request))
        return web.Response(status=204)

    # --- enrollment ------------------------------------------------------------------------

    async def enroll(self, request: web.Request) -> web.Response:
        principal = _principal(request)
        assert principal is not None  # the gate let only an enroll key through
        wait = self._enroll_rate.take(principal.id, self._monotonic())
        if wait > 0:
            return self._access.too_many("enroll_rate", wait,
                                         "Too many enrollments with this key; retry later")
        body = await self._read_body(request)
        try:
            req = RegisterRequest.model_validate_json(body)
        except ValidationError as exc:
            raise describe_error(exc) from None
        node_id = require_node_id(req.node_id)
        async with self._enrolling:
            key = self._auth.key(principal.id)
            if key is None:  # revoked between the gate and here
                raise Rejection(403, "Forbidden", "This enroll key is no longer valid",
                                "forbidden")
            existing = self._registry.get(node_id)
            if (existing is not None and existing.type != req.node_type
                    and not self._auth.node_credentials(node_id)):
                raise node_conflict(node_id, existing.type)
            try:
                _, token = await self._auth.enroll(
                    key, node_id, req.node_type, registered=existing is not None,
                    **self._who(request))
            except AuthError as exc:
                await self._refused(request, node_id, exc)
                raise Rejection(exc.code, exc.title, exc.message, "forbidden") from None
            except StoreError as exc:
                log.warning("auth_store_write_failed error=%s", exc)
                raise store_unavailable() from None
        try:
            result, now = self._fleet.register(node_id, req, principal.broker_identity)
        except (NodeConflictError, StoreUnavailableError, RateLimitedError) as exc:
            # Registered meanwhile as another type, the store is down or the node is over its
            # rate: the device gets no answer it could use, so the credential must not
            # outlive this request.
            await self._change(self._auth.revoke_credentials(node_id, **self._who(request)))
            if isinstance(exc, NodeConflictError):
                raise node_conflict(exc.node_id, exc.existing_type) from None
            if isinstance(exc, RateLimitedError):
                raise
            raise store_unavailable() from None
        await self._durable()
        log.info("node_enrolled node_id=%s key=%s", node_id, principal.id)
        reply = register_reply(node_id, created=result.created, at=now.wall)
        reply["token"] = token
        return json_response(reply, 201)

    async def _refused(self, request: web.Request, node_id: str, exc: AuthError) -> None:
        self._access.refused[(exc.code, "enroll_refused")] += 1
        try:
            await self._auth.audit("enrollment_refused", self._access.actor(request),
                                   self._access.client_address(request),
                                   f"node:{node_id} reason={exc.title}")
        except StoreError as err:
            log.warning("audit_write_failed error=%s", err)

    # --- audit -----------------------------------------------------------------------------

    async def audit(self, request: web.Request) -> web.Response:
        limit = whole(request.query.get("limit"), "limit", AUDIT_MAX_LIMIT)
        limit = limit or AUDIT_DEFAULT_LIMIT
        before = whole(request.query.get("before"), "before", 2**63 - 1)
        try:
            entries = await self._auth.store.audit(limit + 1, before)
        except StoreError as exc:
            log.warning("audit_read_failed error=%s", exc)
            raise store_unavailable() from None
        more = len(entries) > limit
        entries = entries[:limit]
        return json_response({"entries": [audit_entry(e) for e in entries],
                      "next": entries[-1].id if more else None})

    # --- helpers ---------------------------------------------------------------------------

    async def _parse(self, request: web.Request, model: type[Model], *,
                     empty_ok: bool) -> Model:
        body = await self._read_body(request)
        if empty_ok and not body:  # no body at all; a blank one is not JSON, so refused
            body = b"{}"
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            raise describe_error(exc) from None

    def _who(self, request: web.Request) -> dict[str, Any]:
        return {"actor": self._access.actor(request),
                "address": self._access.client_address(request)}

    async def _change(self, change: Awaitable[Any]) -> Any:
        try:
            return await change
        except AuthError as exc:
            raise Rejection(exc.code, exc.title, exc.message, "refused") from None
        except StoreError as exc:
            log.warning("auth_store_write_failed error=%s", exc)
            raise store_unavailable() from None


def _principal(request: web.Request) -> Principal | None:
    return request.get(PRINCIPAL)


def _no_credential(node_id: str) -> Rejection:
    return Rejection(404, "Credential not found",
                     f"Node {quote(node_id)} has no valid credential", "unknown_credential")


def _flag(text: str | None, name: str) -> bool:
    # Exactly the document's boolean: "cascade=" or "cascade=yes" is a mistake to point out,
    # not a quiet "false" that leaves the enrolled credentials valid.
    if text is None or text == "false":
        return False
    if text == "true":
        return True
    raise Rejection(400, "Invalid parameter",
                    f"Parameter '{name}' must be true or false, not {quote(repr(text))}",
                    "invalid_query")

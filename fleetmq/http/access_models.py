"""The bodies of the access-control routes (keys, node credentials) and the JSON they answer.

Validated once at the edge, like the fleet's own requests in ``fleetmq.core.models``; the
answers are written here so the routes, the CLI and the OpenAPI document agree on the shapes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
)

from fleetmq.auth.service import AuthService
from fleetmq.auth.store import AuditEntry, Credential
from fleetmq.auth.tokens import MAX_DURATION_S
from fleetmq.core.clock import format_timestamp
from fleetmq.core.models import Rejection, integral

MAX_GRACE_S = 30 * 86_400.0
"""A rotated-out token works at most 30 days more: long enough for any rollout, short enough
that a forgotten grace never keeps a leaked token alive for long."""
MAX_USES = 1_000_000_000
MIN_LIFETIME_S = 1.0
"""A key or credential must live a second at least: a shorter one has expired before anyone
could use it, and its creation would look like a success."""
ENROLL_ONLY = ("max_uses", "id_pattern", "node_type", "allow_registered")


def _printable(value: str) -> str:
    if not value.isprintable():  # NUL and every other control character
        raise ValueError("must contain printable characters only")
    return value


Seconds = Annotated[float, Field(strict=True, ge=MIN_LIFETIME_S, le=MAX_DURATION_S,
                                 allow_inf_nan=False)]
Grace = Annotated[float, Field(strict=True, ge=0, le=MAX_GRACE_S, allow_inf_nan=False)]
Name = Annotated[str, StringConstraints(max_length=64), AfterValidator(_printable)]
# A glob over node ids: the id's own characters and fnmatch's `* ? [ ] !`.
IdPattern = Annotated[str, StringConstraints(min_length=1, max_length=256,
                                             pattern=r"^[A-Za-z0-9._:*?\[\]!-]+$")]
NodeType = Annotated[str, StringConstraints(min_length=1, max_length=64),
                     AfterValidator(_printable)]


class KeyRequest(BaseModel):
    """``POST /api/v1/keys``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    role: Literal["read", "write", "admin", "broker", "enroll"]
    name: Name = ""
    expires_in_seconds: Seconds | None = None
    max_uses: Annotated[int, BeforeValidator(integral),
                        Field(strict=True, ge=1, le=MAX_USES)] | None = None
    id_pattern: IdPattern | None = None
    node_type: NodeType | None = None
    allow_registered: StrictBool = False

    def check_role(self) -> None:
        """Enrollment limits mean nothing on another role: refused rather than ignored."""
        if self.role == "enroll":
            return
        for field in ENROLL_ONLY:
            if field in self.model_fields_set and getattr(self, field) not in (None, False):
                raise Rejection(400, "Invalid field", f"Field '{field}' applies to enroll keys "
                                f"only, not to a key of role {self.role}", "invalid_payload")


class CredentialRequest(BaseModel):
    """``POST /api/v1/fleet/nodes/{id}/credentials`` (the body may be empty)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    expires_in_seconds: Seconds | None = None
    grace_seconds: Grace = 0.0


def timestamp(wall: float | None) -> str | None:
    return None if wall is None else format_timestamp(wall)


def key_created(cred: Credential, token: str) -> dict[str, Any]:
    return {"id": cred.id, "name": cred.name, "role": cred.role, "token": token,
            "created_at": format_timestamp(cred.created_at),
            "expires_at": timestamp(cred.expires_at)}


def key_listed(auth: AuthService, cred: Credential) -> dict[str, Any]:
    return {"id": cred.id, "name": cred.name, "role": cred.role,
            "created_at": format_timestamp(cred.created_at),
            "last_used_at": timestamp(auth.last_used_at(cred)),
            "expires_at": timestamp(cred.expires_at), "uses": cred.uses,
            "max_uses": cred.max_uses}


def credential_issued(cred: Credential, token: str) -> dict[str, Any]:
    node_id = cred.node_id
    return {"node_id": node_id, "token": token,
            "mqtt": {"username": node_id, "password": token, "client_id": node_id},
            "created_at": format_timestamp(cred.created_at),
            "expires_at": timestamp(cred.expires_at)}


def credential_shown(auth: AuthService, cred: Credential) -> dict[str, Any]:
    return {"id": cred.id, "created_at": format_timestamp(cred.created_at),
            "last_used_at": timestamp(auth.last_used_at(cred)),
            "expires_at": timestamp(cred.expires_at),
            "valid_until": timestamp(cred.ends_at()),
            "enrolled_by": cred.enrolled_by,
            "needs_reissue": cred.needs_reissue}


def audit_entry(entry: AuditEntry) -> dict[str, Any]:
    return {"id": entry.id, "at": format_timestamp(entry.at), "action": entry.action,
            "actor": entry.actor, "address": entry.address, "subject": entry.subject}

"""One credential's record: what every store reads and writes and every route shows.

``memory://`` and the verifier keep them packed (``table.py``) and build records when asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class Credential:
    """One token's record. ``node_id`` is set for a node credential, ``role`` for a key
    (``read``, ``write``, ``admin``, ``broker`` or ``enroll``)."""

    id: str
    digest: bytes
    created_at: float
    node_id: str | None = None
    role: str | None = None
    name: str = ""
    expires_at: float | None = None
    revoked_at: float | None = None
    """When it stops working: now at a revocation, later while a rotated-out token's grace runs."""
    last_used_at: float | None = field(default=None, compare=False)
    """Bookkeeping written behind: not part of a record's identity, so neither compared nor
    hashed."""
    uses: int = 0
    max_uses: int | None = None
    id_pattern: str | None = None
    node_type: str | None = None
    allow_registered: bool = False
    enrolled_by: str | None = None
    """The enroll key's id, for a node credential made by enrollment."""
    broker_hash: str | None = None
    """The token as a Mosquitto password-file hash (for ``credentials export``): the broker
    checks logins itself without fleetmq ever keeping the token."""
    needs_reissue: bool = False
    """The broker mirror (dynsec) lost this credential's client: fleetmq holds no token to
    re-create it, so MQTT logins fail until an admin issues a new credential."""
    seq: int = 0

    @property
    def is_key(self) -> bool:
        return self.node_id is None

    @property
    def broker_identity(self) -> str:
        """The MQTT username and client id: the node id, or ``_key.<id>``."""
        return self.node_id if self.node_id is not None else f"_key.{self.id}"

    def ends_at(self) -> float | None:
        """The earliest of expiry and revocation: from then on the token is refused."""
        ends = [t for t in (self.expires_at, self.revoked_at) if t is not None]
        return min(ends) if ends else None

    def valid_at(self, now: float) -> bool:
        ends = self.ends_at()
        return ends is None or now < ends

    def revoked(self, at: float) -> Credential:
        if self.revoked_at is not None and self.revoked_at <= at:
            return self
        return replace(self, revoked_at=at)

"""A packed table of credentials: what ``memory://`` keeps and the verifier checks tokens
against, a million node credentials in ~110 bytes each instead of ~550 as records and dicts.

A row is its fields in flat buffers: the token digest (32 bytes) in one ``bytearray``, the id
as 6 raw bytes when it is 12 hex characters (``new_key_id``), the node id as the string it was
given (kept, so the audit log and the registry can share it), times in ``array('d')`` (NaN for
none), the sequence number in an ``array('q')``. The fields a plain node credential leaves at
their defaults (role, name, uses, limits, enrolling key, broker hash, the reissue flag) are a
tuple beside the row only when one is set: every key, few node credentials. Rows are found
through open-addressing indexes of row numbers (by digest, by id, by node); rows are never
removed (a credential is revoked, not deleted), so the indexes need no tombstones.
``Credential`` records are built when asked for. It decides nothing and knows no clock.
"""

from __future__ import annotations

import math
import re
from array import array
from collections.abc import Callable, Iterator

from fleetmq.auth.credential import Credential

DIGEST_BYTES = 32
ID_BYTES = 6
_HEX_ID = re.compile(r"[0-9a-f]{12}")
_NONE = math.nan

_Extras = tuple[str | None, str, int, int | None, str | None, str | None, bool, str | None,
                str | None, bool]
_PLAIN: _Extras = (None, "", 0, None, None, None, False, None, None, False)
"""role, name, uses, max_uses, id_pattern, node_type, allow_registered, enrolled_by,
broker_hash, needs_reissue of a node credential issued by an admin on ``memory://``."""


def _extras(c: Credential) -> _Extras:
    return (c.role, c.name, c.uses, c.max_uses, c.id_pattern, c.node_type, c.allow_registered,
            c.enrolled_by, c.broker_hash, c.needs_reissue)


def _time(value: float | None) -> float:
    return _NONE if value is None else value


def _optional(value: float) -> float | None:
    return None if value != value else value  # NaN is no moment  # noqa: PLR0124


def _digest_hash(digest: bytes) -> int:
    return hash(digest)  # one C call: cheaper than taking 8 of its bytes as an int


MOVED_PER_ADD = 8
"""Slots of a grown index's old array re-placed per entry added: the move ends well before
the new array is half full (it has twice the slots), and no add stops the event loop to
re-place a million rows (1.8 s when done at once)."""


class _Index:
    """Row numbers (plus one; 0 is an empty slot) by a key's hash, linear probing, kept at
    most half full. Several rows may share a key (a node's credentials) and an entry may be
    stale (a row whose key changed) or found twice (while it moves): a reader checks each
    row it is offered.

    Growing allocates an array of twice the slots; the old one stays readable while its
    entries move over, ``MOVED_PER_ADD`` slots with each add, each re-placed by its row's
    key now."""

    def __init__(self, key_hash: Callable[[int], int | None]) -> None:
        self._key_hash = key_hash
        self.slots = array("i", bytes(4 * 8))
        self.mask = 7
        self._used = 0
        self._old: array[int] | None = None
        self._moved = 0

    @property
    def moving(self) -> bool:
        return self._old is not None

    def add(self, key_hash: int, row: int) -> None:
        if self._old is not None:
            self._move(MOVED_PER_ADD)
        if 2 * (self._used + 1) > len(self.slots):
            if self._old is not None:
                self._move(len(self._old))
            self._old, self._moved = self.slots, 0
            self.slots = array("i", bytes(8 * len(self._old)))
            self.mask = len(self.slots) - 1
            self._used = 0
        self._place(key_hash, row)
        self._used += 1

    def rows(self, key_hash: int) -> Iterator[int]:
        yield from _probe(self.slots, self.mask, key_hash)
        old = self._old
        if old is not None:
            yield from _probe(old, len(old) - 1, key_hash)

    def _place(self, key_hash: int, row: int) -> None:
        slots, mask = self.slots, self.mask
        i = key_hash & mask
        while slots[i]:
            i = (i + 1) & mask
        slots[i] = row + 1

    def _move(self, count: int) -> None:
        old = self._old
        if old is None:
            return
        end = min(self._moved + count, len(old))
        for j in range(self._moved, end):
            entry = old[j]
            if entry:
                key_hash = self._key_hash(entry - 1)
                if key_hash is not None:
                    self._place(key_hash, entry - 1)
                    self._used += 1
        self._moved = end
        if end == len(old):
            self._old = None


def _probe(slots: array[int], mask: int, key_hash: int) -> Iterator[int]:
    i = key_hash & mask
    while entry := slots[i]:
        yield entry - 1
        i = (i + 1) & mask


class CredentialTable:
    """Credentials by id, digest and node, packed. ``put`` adds or replaces by id; a last use
    only moves forward (``note_use``, and ``put`` keeps the later of the held and the given)."""

    def __init__(self) -> None:
        self._ids = bytearray()
        self._odd_ids: dict[int, str] = {}
        """Ids that are not 12 hex characters, by row (their 6 bytes are zero)."""
        self._digests = bytearray()
        self._odd_digests: dict[int, bytes] = {}
        """Digests that are not 32 bytes (only tests make them), by row."""
        self._node_ids: list[str | None] = []
        self._created = array("d")
        self._expires = array("d")
        self._revoked = array("d")
        self._used = array("d")
        self._seqs = array("q")
        self._extras: dict[int, _Extras] = {}
        self._by_digest = _Index(self._digest_hash)
        self._by_id = _Index(lambda row: hash(self.id_of(row)))
        self._by_node = _Index(self._node_hash)

    def __len__(self) -> int:
        return len(self._seqs)

    # --- reading ----------------------------------------------------------------------------

    def get(self, cred_id: str) -> Credential | None:
        row = self.row_of_id(cred_id)
        return None if row is None else self.record(row)

    def row_of_id(self, cred_id: str) -> int | None:
        for row in self._by_id.rows(hash(cred_id)):
            if self.id_of(row) == cred_id:
                return row
        return None

    def row_of_digest(self, digest: bytes) -> int | None:
        if len(digest) != DIGEST_BYTES or self._odd_digests or self._by_digest.moving:
            for row in self._by_digest.rows(_digest_hash(digest)):
                if self.digest_of(row) == digest:
                    return row
            return None
        # Every token check comes here: the probe inline, compared in place (no slice).
        index, digests = self._by_digest, self._digests
        slots, mask = index.slots, index.mask
        i = hash(digest) & mask
        while entry := slots[i]:
            if digests.startswith(digest, (entry - 1) * DIGEST_BYTES):
                return entry - 1
            i = (i + 1) & mask
        return None

    def node(self, node_id: str) -> list[Credential]:
        """Every credential of the node, valid or not, oldest row first."""
        node_ids = self._node_ids
        rows = [r for r in self._by_node.rows(hash(node_id)) if node_ids[r] == node_id]
        return [self.record(r) for r in sorted(set(rows))]

    def node_id_held(self, node_id: str) -> str | None:
        """The string held for that node id (an equal one), None if no credential has it."""
        node_ids = self._node_ids
        for row in self._by_node.rows(hash(node_id)):
            held = node_ids[row]
            if held == node_id:
                return held
        return None

    def record(self, row: int) -> Credential:
        e = self._extras.get(row, _PLAIN)
        return Credential(
            id=self.id_of(row), digest=self.digest_of(row),
            created_at=self._created[row], node_id=self._node_ids[row], role=e[0], name=e[1],
            expires_at=_optional(self._expires[row]), revoked_at=_optional(self._revoked[row]),
            last_used_at=_optional(self._used[row]), uses=e[2], max_uses=e[3],
            id_pattern=e[4], node_type=e[5], allow_registered=e[6], enrolled_by=e[7],
            broker_hash=e[8], needs_reissue=e[9], seq=self._seqs[row])

    def seq(self, row: int) -> int:
        return self._seqs[row]

    def last_used_at(self, row: int) -> float | None:
        return _optional(self._used[row])

    def records(self) -> Iterator[Credential]:
        return (self.record(r) for r in range(len(self._seqs)))

    def since(self, seq: int) -> list[Credential]:
        """The credentials written under a sequence number above ``seq``."""
        return [self.record(r) for r, s in enumerate(self._seqs) if s > seq]

    def unusual(self) -> list[Credential]:
        """The credentials with a field set beyond a plain node credential's: every key, and
        node credentials enrolled, hashed for a broker or flagged for reissue."""
        return [self.record(r) for r in self._extras]

    # --- writing ----------------------------------------------------------------------------

    def put(self, c: Credential) -> int:
        """Add or replace the credential of ``c.id``; its row."""
        row = self.row_of_id(c.id)
        if row is None:
            row = self._append(c)
        else:
            if self.digest_of(row) != c.digest:
                self._set_digest(row, c.digest)
                self._by_digest.add(_digest_hash(c.digest), row)
            if self._node_ids[row] != c.node_id:
                self._node_ids[row] = c.node_id
                if c.node_id is not None:
                    self._by_node.add(hash(c.node_id), row)
        self._created[row] = c.created_at
        self._expires[row] = _time(c.expires_at)
        self._revoked[row] = _time(c.revoked_at)
        self._seqs[row] = c.seq
        if c.last_used_at is not None:
            self.note_use(row, c.last_used_at)
        extras = _extras(c)
        if extras == _PLAIN:
            self._extras.pop(row, None)
        else:
            self._extras[row] = extras
        return row

    def note_use(self, row: int, at: float) -> None:
        """Set the row's last use to ``at`` if that is later (not a change: no sequence)."""
        used = self._used[row]
        if used != used or at > used:  # noqa: PLR0124  # NaN: never used
            self._used[row] = at

    def _append(self, c: Credential) -> int:
        row = len(self._seqs)
        if _HEX_ID.fullmatch(c.id):
            self._ids += bytes.fromhex(c.id)
        else:
            self._ids += bytes(ID_BYTES)
            self._odd_ids[row] = c.id
        self._digests += bytes(DIGEST_BYTES)
        self._set_digest(row, c.digest)
        # A node's credentials share one node id string (a rotation's new one too).
        held = None if c.node_id is None else self.node_id_held(c.node_id)
        self._node_ids.append(c.node_id if held is None else held)
        for column in (self._created, self._expires, self._revoked, self._used):
            column.append(_NONE)
        self._seqs.append(0)
        self._by_id.add(hash(c.id), row)
        self._by_digest.add(_digest_hash(c.digest), row)
        if c.node_id is not None:
            self._by_node.add(hash(c.node_id), row)
        return row

    # --- internals --------------------------------------------------------------------------

    def id_of(self, row: int) -> str:
        odd = self._odd_ids.get(row) if self._odd_ids else None
        if odd is not None:
            return odd
        start = row * ID_BYTES
        return self._ids[start:start + ID_BYTES].hex()

    def digest_of(self, row: int) -> bytes:
        odd = self._odd_digests.get(row) if self._odd_digests else None
        if odd is not None:
            return odd
        start = row * DIGEST_BYTES
        return bytes(self._digests[start:start + DIGEST_BYTES])

    def _set_digest(self, row: int, digest: bytes) -> None:
        if len(digest) == DIGEST_BYTES:
            self._odd_digests.pop(row, None)
            self._digests[row * DIGEST_BYTES:(row + 1) * DIGEST_BYTES] = digest
        else:
            self._odd_digests[row] = digest

    def _digest_hash(self, row: int) -> int:
        return _digest_hash(self.digest_of(row))

    def _node_hash(self, row: int) -> int | None:
        node_id = self._node_ids[row]
        return None if node_id is None else hash(node_id)

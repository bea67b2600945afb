"""Makes and recognises fleetmq's bearer tokens, key ids and CLI durations (contract section 8).

Pure: no I/O and no clock. A token is shown once; what is kept and compared is its digest.
"""

from __future__ import annotations

import hashlib
import re
import secrets

KINDS = ("key", "node", "enr")
TOKEN_BYTES = 32
_PREFIX = "fmq_"
# 32 bytes are 256 bits; 43 base64url characters carry 258, so the last one holds 4 bits and
# two zero bits: only 16 characters can end a token that new_token() made.
_TOKEN = re.compile(r"fmq_(key|node|enr)_[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")
MAX_TOKEN_LENGTH = len("fmq_node_") + 43

_SPACE = re.compile(r"\s")
"""What ``str.isspace`` calls a space (both use Py_UNICODE_ISSPACE): one C scan of a header
instead of a generator per character, on every authenticated request."""
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
MAX_DURATION_S = 100 * 365.25 * 86400.0
_QUOTED_MAX = 64  # contract section 4: an error message cuts a quoted value to 64 characters


def new_token(kind: str) -> str:
    """A fresh token of `kind` ("key", "node" or "enr") from 32 bytes of `secrets`."""
    if kind not in KINDS:
        raise ValueError(f"unknown token kind {kind[:_QUOTED_MAX]!r}: expected one of {KINDS}")
    # token_urlsafe is base64url without padding: 43 characters for 32 bytes.
    return f"{_PREFIX}{kind}_{secrets.token_urlsafe(TOKEN_BYTES)}"


def token_kind(text: str) -> str | None:
    """The kind of a well-formed token, None for anything else; never raises."""
    # The length test comes first so that a 10 kB header costs nothing to refuse.
    if not isinstance(text, str) or len(text) > MAX_TOKEN_LENGTH:
        return None
    match = _TOKEN.fullmatch(text)
    return match.group(1) if match else None


def digest(token: str) -> bytes:
    """SHA-256 of the token's UTF-8 bytes: what the store keeps instead of the token."""
    # surrogatepass: a malformed token from a header is still digested (its digest names the
    # presented identity in the login back-off) instead of raising.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def new_key_id() -> str:
    """12 lowercase hex characters: `_key.<id>` is a valid MQTT client id and never a node id."""
    return secrets.token_hex(6)


def parse_duration(text: str) -> float:
    """Seconds from a number of seconds or a number with s, m, h or d (`90m`, `30d`)."""
    match = _DURATION.fullmatch(text.strip()) if len(text) <= _QUOTED_MAX else None
    if match:
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
        if 0 < seconds <= MAX_DURATION_S:
            return seconds
    raise ValueError(
        f"invalid duration {text[:_QUOTED_MAX]!r}: expected a positive number of seconds or a "
        "number with s, m, h or d (90, 90m, 12h, 30d), at most 100 years")


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value, None for any other value."""
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token or _SPACE.search(token):
        return None
    return token

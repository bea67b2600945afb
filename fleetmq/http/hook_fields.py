"""What the broker hooks read: their paths, their fields and the JSON types each field takes.

Apart from ``broker_hooks`` so that the OpenAPI document (imported by ``api``, which the hooks
import) is built from the same table the hooks check bodies against.
"""

from __future__ import annotations

AUTHENTICATE_PATH = "/api/v1/broker/authenticate"
AUTHORIZE_PATH = "/api/v1/broker/authorize"

Kinds = tuple[type, ...]
_TEXT: Kinds = (str,)
AUTHENTICATE_FIELDS: dict[str, Kinds] = dict.fromkeys(
    ("username", "password", "clientid", "peerhost"), _TEXT)
AUTHORIZE_FIELDS: dict[str, Kinds] = {
    **dict.fromkeys(("username", "clientid", "action", "topic", "credential"), _TEXT),
    "qos": (str, int), "retain": (str, bool)}
"""The fields each hook reads and the JSON types it takes for them (EMQX renders every
placeholder as a string; a template may put qos and retain in bare). Any other field is
ignored, whatever it holds (contract section 4); the OpenAPI document is built from these."""
